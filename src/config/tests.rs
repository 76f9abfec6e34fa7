//! Config reading and checking.

use super::*;

#[test]
fn log_filters() {
    for ok in [
        "info",
        "WARN",
        "off",
        "info,shardmq=debug",
        " debug , fjall=warn ",
    ] {
        assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
    }
    for bad in ["verbose", "shardmq", "info,shardmq=loud", "", " , "] {
        assert!(check_log_filter(bad).is_err(), "{bad}");
    }
    let mut c = Config::default();
    c.log.level = "chatty".into();
    let e = c.validate().unwrap_err();
    assert_eq!(e.key, "log.level");
    assert!(e.reason.contains("\"chatty\""), "{e}");
}

#[test]
fn core_lists() {
    assert_eq!(parse_core_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
    assert_eq!(parse_core_list("2").unwrap(), vec![2]);
    assert!(parse_core_list("3-1").is_err());
    assert!(parse_core_list("1,1").is_err());
    assert!(parse_core_list("a").is_err());
    assert!(parse_core_list("").is_err());
}

#[test]
fn the_annotated_default_file_is_the_default() {
    let text = include_str!("../../config/shardmq.toml");
    assert_eq!(Config::from_toml(text).unwrap(), Config::default());
}

#[test]
fn listener_tables_are_read_and_checked() {
    let cfg = Config::from_toml(
        "[[listeners]]\naddress = \"127.0.0.1:8883\"\ntransport = \"tls\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nconnections_max = 5\n\n[[listeners]]\naddress = \"127.0.0.1:8083\"\ntransport = \"ws\"\n",
    )
    .unwrap();
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.listeners[0].transport, Transport::Tls);
    assert_eq!(cfg.listeners[0].connections_max, Some(5));
    assert_eq!(cfg.listeners[1].ws_path, "/mqtt");
    // What check-config prints reads back the same.
    let text = toml::to_string_pretty(&cfg).unwrap();
    assert_eq!(Config::from_toml(&text).unwrap(), cfg);

    for (toml, key) in [
        ("address = \"127.0.0.1:1\"\ntransport = \"tls\"\n", "listeners[0].cert_file"),
        ("address = \"127.0.0.1:1\"\ncert_file = \"c\"\n", "listeners[0].cert_file"),
        ("address = \"127.0.0.1:1\"\ntransport = \"tls\"\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_cert = true\n", "listeners[0].require_client_cert"),
        ("address = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_path = \"mqtt\"\n", "listeners[0].ws_path"),
        ("address = \"127.0.0.1:1\"\nconnections_max = 0\n", "listeners[0].connections_max"),
        ("address = \"127.0.0.1:1\"\nconnect_rate_per_s = 0\n", "listeners[0].connect_rate_per_s"),
    ] {
        let e = Config::from_toml(&format!("[[listeners]]\n{toml}")).unwrap_err();
        assert_eq!(e.key, key, "{e}");
    }
    let e = Config::from_toml("[[listeners]]\naddress = \"127.0.0.1:1\"\ntransport = \"quic\"\n")
        .unwrap_err();
    assert_eq!(e.key, "listeners.transport", "{e}");
}

#[test]
fn defaults_are_valid_and_unknown_keys_refused() {
    Config::default().validate().unwrap();
    let e = Config::from_toml("[limits]\nbogus = 1\n").unwrap_err();
    assert!(e.reason.contains("bogus"), "{e}");
    let e = Config::from_toml("[limits]\nqueue_messages_max = 0\n").unwrap_err();
    assert_eq!(e.key, "limits.queue_messages_max");
    let e = Config::from_toml("[limits]\nqueue_messages_max = \"many\"\n").unwrap_err();
    assert_eq!(e.key, "limits.queue_messages_max", "{e}");
    let e = Config::from_toml("log = 3\n").unwrap_err();
    assert_eq!(e.key, "log", "{e}");
    for bad in [
        "retained_deletions_keep_s = 0",
        "retained_deletions_bytes_max = 0",
        "topic_bytes_max = 65535\nretained_deletions_bytes_max = 65000",
    ] {
        let e = Config::from_toml(&format!("[limits]\n{bad}\n")).unwrap_err();
        assert!(
            e.key.starts_with("limits.retained_deletions_"),
            "{bad}: {e}"
        );
    }
    Config::from_toml("[limits]\nretained_deletions_bytes_max = 4192\n").unwrap();
}

#[test]
fn replication_settings_are_checked_with_one_line_naming_the_key() {
    let node = |extra: &str| -> Result<(), String> {
        let toml = format!(
            "[cluster]\nnode = \"a\"\nlisten = \"127.0.0.1:7000\"\netcd = [\"http://127.0.0.1:2379\"]\n{extra}"
        );
        let cfg: Config = toml::from_str(&toml).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())
    };
    assert!(node("jetstream = [\"nats://127.0.0.1:4222\"]\n").is_ok());
    assert!(node("jetstream = [\"tls://127.0.0.1:4222\"]\njetstream_tls = true\n").is_ok());
    for (extra, key) in [
        (
            "jetstream = [\"http://127.0.0.1:4222\"]\n",
            "cluster.jetstream",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:0\"]\n",
            "cluster.jetstream",
        ),
        ("jetstream_replicas = 0\n", "cluster.jetstream_replicas"),
        (
            "replication_timeout_ms = 10\n",
            "cluster.replication_timeout_ms",
        ),
        ("snapshot_log_bytes = 1000\n", "cluster.snapshot_log_bytes"),
        ("rebuild_bytes_max = 1000\n", "cluster.rebuild_bytes_max"),
        (
            "replication_pending_bytes_max = 1000\n",
            "cluster.replication_pending_bytes_max",
        ),
        (
            "jetstream = [\"tls://127.0.0.1\"]\n",
            "cluster.jetstream",
        ),
        ("jetstream_tls = true\n", "cluster.jetstream_tls"),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_cert_file = \"/nonexistent/c.pem\"\n",
            "cluster.jetstream_key_file",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_key_file = \"/nonexistent/c.key\"\n",
            "cluster.jetstream_cert_file",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_user = \"u\"\n",
            "cluster.jetstream_password",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_user = \"u\\n\"\njetstream_password = \"p\"\n",
            "cluster.jetstream_user",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_ca_file = \"/nonexistent/ca.pem\"\n",
            "cluster.jetstream_ca_file",
        ),
        (
            "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_ca_file = \"Cargo.toml\"\n",
            "cluster.jetstream_ca_file",
        ),
    ] {
        let e = node(extra).expect_err(extra);
        assert!(e.contains(key) && !e.contains('\n'), "{extra}: {e}");
    }
    let e = node("jetstream = [\"nats://127.0.0.1:4222\"]\n[storage]\ndurability = \"batched\"\n")
        .expect_err("batched");
    assert!(
        e.contains("cluster.jetstream") && e.contains("durable"),
        "{e}"
    );
    // An NKey seed file: a seed, or one line that names the key and not the secret.
    let keys = tempfile::tempdir().unwrap();
    let (seed, junk) = (keys.path().join("seed.nk"), keys.path().join("junk.nk"));
    std::fs::write(&seed, format!("\n SU{}\n", "A".repeat(56))).unwrap();
    std::fs::write(&junk, "SUSECRET").unwrap();
    let js = "jetstream = [\"nats://127.0.0.1:4222\"]\n";
    assert!(node(&format!("{js}jetstream_nkey_file = {seed:?}\n")).is_ok());
    for (extra, says) in [
        (format!("{js}jetstream_nkey_file = {junk:?}\n"), "NKey user seed"),
        (
            format!("{js}jetstream_nkey_file = {:?}\n", keys.path().join("none")),
            "cannot read",
        ),
        (
            format!("{js}jetstream_nkey_file = {seed:?}\njetstream_user = \"u\"\njetstream_password = \"p\"\n"),
            "exclude each other",
        ),
        (format!("jetstream_nkey_file = {seed:?}\n"), "cluster.jetstream is empty"),
    ] {
        let e = node(&extra).expect_err(&extra);
        assert!(
            e.contains("cluster.jetstream_nkey_file") && e.contains(says) && !e.contains("SECRET"),
            "{extra}: {e}"
        );
    }
    // A NATS credentials file: a user JWT and a seed, or one line that names the key and
    // quotes nothing of the file.
    let creds_text = |seed: &str| {
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJVIn0.c2ln\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    };
    let creds = keys.path().join("user.creds");
    let user = nkeys::KeyPair::new_user();
    std::fs::write(&creds, creds_text(&user.seed().unwrap())).unwrap();
    // The right shape, but a seed whose checksum is wrong: the client would refuse it.
    let bad_sum = keys.path().join("sum.creds");
    std::fs::write(&bad_sum, creds_text(&format!("SU{}", "A".repeat(56)))).unwrap();
    let bad_creds = keys.path().join("bad.creds");
    std::fs::write(
        &bad_creds,
        "-----BEGIN NATS USER JWT-----\nSECRET.JWT\n------END NATS USER JWT------\n-----BEGIN USER NKEY SEED-----\nSUSECRET\n",
    )
    .unwrap();
    assert!(node(&format!("{js}jetstream_creds_file = {creds:?}\n")).is_ok());
    for (extra, says) in [
        (format!("{js}jetstream_creds_file = {bad_creds:?}\n"), "credentials file"),
        (format!("{js}jetstream_creds_file = {seed:?}\n"), "credentials file"),
        (format!("{js}jetstream_creds_file = {bad_sum:?}\n"), "credentials file"),
        (
            format!("{js}jetstream_creds_file = \"/dev/zero\"\n"),
            "not a regular file",
        ),
        (
            format!("{js}jetstream_creds_file = {:?}\n", keys.path().join("none")),
            "cannot read",
        ),
        (
            format!("{js}jetstream_creds_file = {creds:?}\njetstream_nkey_file = {seed:?}\n"),
            "exclude each other",
        ),
        (
            format!("{js}jetstream_creds_file = {creds:?}\njetstream_user = \"u\"\njetstream_password = \"p\"\n"),
            "exclude each other",
        ),
        (format!("jetstream_creds_file = {creds:?}\n"), "cluster.jetstream is empty"),
    ] {
        let e = node(&extra).expect_err(&extra);
        assert!(
            e.contains("cluster.jetstream_creds_file")
                && e.contains(says)
                && !e.contains("SECRET")
                && !e.contains('\n'),
            "{extra}: {e}"
        );
    }
    node("jetstream = [\"nats://127.0.0.1:4222\"]\n[storage]\ndurability = \"replicated\"\n")
        .expect("replicated with jetstream");
    let e = node("[storage]\ndurability = \"replicated\"\n").expect_err("replicated alone");
    assert!(
        e.contains("storage.durability") && e.contains("cluster.jetstream") && !e.contains('\n'),
        "{e}"
    );
    // A "quorum" of one server is not a replica.
    let e = node(
        "jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_replicas = 1\n[storage]\ndurability = \"replicated\"\n",
    )
    .expect_err("replicated with one replica");
    assert!(
        e.contains("storage.durability") && e.contains("jetstream_replicas") && !e.contains('\n'),
        "{e}"
    );
    node("jetstream = [\"nats://127.0.0.1:4222\"]\njetstream_replicas = 1\n")
        .expect("one replica in durable mode: the local fsync still holds");
}
