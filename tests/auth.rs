//! Authentication and ACLs against the real broker: password files made by
//! `mosquitto_passwd` (tests/fixtures/auth, passwords in its README), `shardmq passwd`,
//! anonymous access, ACL enforcement on publish, subscribe, delivery (wildcards, shared
//! subscriptions, retained messages), `%c`/`%u` patterns, and SIGHUP reloads. Two shards, with
//! clients placed on chosen shards where the path between shards matters.
//!
//! "Not delivered" is shown by order, not by waiting: a forbidden message is followed by an
//! allowed one from the same publisher, and the allowed one must be the next thing received.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use bytes::Bytes;
use shardmq::protocol::{Packet, ProtocolVersion, QoS, ReasonCode};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use support::raw::{msg, opts, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const SHARDS: usize = 2;
/// Made by `mosquitto_passwd` 2.0.11: pbkdf2user / `pbkdf2-secret` ($7$), sha512user /
/// `sha512 secret` ($6$), alice / `alice-pw`, bob / `bob-pw` ($7$).
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth/passwd");

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A CONNECT with optional credentials.
fn login(
    version: ProtocolVersion,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> Packet {
    ConnectOpts::new(version, client_id, true).packet_with(|c| {
        c.username = user.map(|u| shardmq::protocol::MqttStr::new(u).unwrap());
        c.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    })
}

/// Connects and returns the CONNACK's code; a refused client must get nothing else.
fn try_login(
    b: &TestBroker,
    version: ProtocolVersion,
    user: Option<&str>,
    password: Option<&str>,
) -> ReasonCode {
    let (mut c, ack) = RawClient::connect_packet(b.addr, &login(version, "who", user, password));
    if ack.reason_code != ReasonCode::Success {
        let more = c.expect_closed();
        assert!(
            more.is_empty(),
            "a refused client gets only CONNACK: {more:?}"
        );
    }
    ack.reason_code
}

fn connect_as(
    b: &TestBroker,
    version: ProtocolVersion,
    id: &str,
    user: &str,
    pw: &str,
) -> RawClient {
    let (c, ack) = RawClient::connect_packet(b.addr, &login(version, id, Some(user), Some(pw)));
    assert_eq!(
        ack.reason_code,
        ReasonCode::Success,
        "login of {user} as {id}"
    );
    c
}

#[test]
fn mosquitto_hashes_accept_the_right_password_and_refuse_a_wrong_one() {
    let b = TestBroker::start_with(
        SHARDS,
        &format!(
            "[auth]\npassword_file = {}\n",
            toml_path(Path::new(FIXTURE))
        ),
    );
    for v in [ProtocolVersion::V5, ProtocolVersion::V3_1_1] {
        for (user, pw) in [
            ("pbkdf2user", "pbkdf2-secret"),
            ("sha512user", "sha512 secret"),
        ] {
            assert_eq!(
                try_login(&b, v, Some(user), Some(pw)),
                ReasonCode::Success,
                "{user} {v:?}"
            );
            assert_eq!(
                try_login(&b, v, Some(user), Some("wrong")),
                ReasonCode::BadUserNameOrPassword,
                "{user} {v:?}"
            );
        }
        assert_eq!(
            try_login(&b, v, Some("nobody"), Some("x")),
            ReasonCode::BadUserNameOrPassword
        );
        assert_eq!(
            try_login(&b, v, Some("alice"), None),
            ReasonCode::BadUserNameOrPassword
        );
    }
    // The exact 3.1.1 bytes: return code 0x04.
    let mut c = RawClient::tcp(b.addr);
    c.send(&login(
        ProtocolVersion::V3_1_1,
        "raw",
        Some("alice"),
        Some("nope"),
    ));
    let (_, bytes) = c.recv_frame();
    assert_eq!(&bytes[..], &[0x20, 0x02, 0x00, 0x04]);
    assert!(c.expect_closed().is_empty());
    // A real client.
    let pubs = |pw: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &b.port().to_string(), "-q", "1"])
            .args(["-u", "sha512user", "-P", pw, "-t", "t", "-m", "x"])
            .stderr(Stdio::null())
            .status()
            .expect("mosquitto_pub on the PATH")
    };
    assert!(pubs("sha512 secret").success());
    assert!(!pubs("sha512 secreT").success());
}

#[test]
fn anonymous_clients_follow_allow_anonymous() {
    let pw = toml_path(Path::new(FIXTURE));
    // A password file alone means passwords are required.
    let b = TestBroker::start_with(1, &format!("[auth]\npassword_file = {pw}\n"));
    assert_eq!(
        try_login(&b, ProtocolVersion::V5, None, None),
        ReasonCode::BadUserNameOrPassword
    );
    assert_eq!(
        try_login(&b, ProtocolVersion::V3_1_1, None, None),
        ReasonCode::BadUserNameOrPassword
    );
    drop(b);
    let b = TestBroker::start_with(
        1,
        &format!("[auth]\nallow_anonymous = true\npassword_file = {pw}\n"),
    );
    assert_eq!(
        try_login(&b, ProtocolVersion::V5, None, None),
        ReasonCode::Success
    );
    assert_eq!(
        try_login(&b, ProtocolVersion::V5, Some("bob"), Some("x")),
        ReasonCode::BadUserNameOrPassword
    );
    assert_eq!(
        try_login(&b, ProtocolVersion::V5, Some("bob"), Some("bob-pw")),
        ReasonCode::Success
    );
    drop(b);
    let b = TestBroker::start_with(1, "[auth]\nallow_anonymous = false\n");
    assert_eq!(
        try_login(&b, ProtocolVersion::V3_1_1, None, None),
        ReasonCode::BadUserNameOrPassword
    );
    drop(b);
    let b = TestBroker::start(1);
    assert_eq!(
        try_login(&b, ProtocolVersion::V3_1_1, None, None),
        ReasonCode::Success
    );
}

fn shardmq_passwd(file: &Path, user: &str, password: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shardmq passwd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn shardmq_passwd_creates_and_updates_entries() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::copy(FIXTURE, &file).unwrap();
    let out = shardmq_passwd(&file, "carol", "carol pw");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = shardmq_passwd(&file, "alice", "alice-new");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("carol:$argon2id$"), "{text}");
    assert_eq!(text.lines().count(), 5, "{text}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A new file is created too.
    let fresh = dir.path().join("fresh");
    assert!(shardmq_passwd(&fresh, "dave", "d").status.success());

    let b = TestBroker::start_with(
        SHARDS,
        &format!("[auth]\npassword_file = {}\n", toml_path(&file)),
    );
    let v = ProtocolVersion::V5;
    assert_eq!(
        try_login(&b, v, Some("carol"), Some("carol pw")),
        ReasonCode::Success
    );
    assert_eq!(
        try_login(&b, v, Some("carol"), Some("carol")),
        ReasonCode::BadUserNameOrPassword
    );
    assert_eq!(
        try_login(&b, v, Some("alice"), Some("alice-new")),
        ReasonCode::Success
    );
    assert_eq!(
        try_login(&b, v, Some("alice"), Some("alice-pw")),
        ReasonCode::BadUserNameOrPassword
    );
    assert_eq!(
        try_login(&b, v, Some("bob"), Some("bob-pw")),
        ReasonCode::Success,
        "others kept"
    );
    // A second login with the same password comes from the verified memory; still right.
    assert_eq!(
        try_login(&b, v, Some("carol"), Some("carol pw")),
        ReasonCode::Success
    );
}

/// Rules: admin reads and writes everything; alice has her tree, may write the sensors but
/// read only the non-secret ones; anonymous clients may read `public/#`; patterns give each
/// client its `devices/<client id>/#` and each user its `inbox/<user>/#`.
const ACL: &str = "\
# anonymous
topic read public/#

user admin
topic readwrite #

user alice
topic readwrite alice/#
topic read sensors/#
topic deny sensors/secret/#
topic write sensors/#

pattern readwrite devices/%c/#
pattern read inbox/%u/#
";

/// Replaces a file the running broker reads on SIGHUP as an operator's tools do (a new file
/// renamed over the old): the broker never reads it half written. (Written in place, a
/// SIGHUP handled during the write could load a truncated, empty ACL: deny everything.)
fn replace_file(path: &Path, text: impl AsRef<[u8]>) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct AclBroker {
    b: TestBroker,
    acl: PathBuf,
    /// The broker's config (to restart it).
    cfg: String,
    /// Holds the password and ACL files.
    _dir: tempfile::TempDir,
}

fn acl_broker(acl: &str) -> AclBroker {
    let dir = tempfile::tempdir().unwrap();
    let acl_path = dir.path().join("acl");
    std::fs::write(&acl_path, acl).unwrap();
    let pw = dir.path().join("passwd");
    std::fs::copy(FIXTURE, &pw).unwrap();
    assert!(shardmq_passwd(&pw, "admin", "admin-pw").status.success());
    let cfg = format!(
        "[auth]\nallow_anonymous = true\npassword_file = {}\nacl_file = {}\n",
        toml_path(&pw),
        toml_path(&acl_path)
    );
    let b = TestBroker::start_with(SHARDS, &cfg);
    AclBroker {
        b,
        acl: acl_path,
        cfg,
        _dir: dir,
    }
}

fn admin(b: &TestBroker, shard: usize) -> RawClient {
    connect_as(
        b,
        ProtocolVersion::V5,
        &id_on_shard("admin", shard, SHARDS),
        "admin",
        "admin-pw",
    )
}

fn alice(b: &TestBroker, version: ProtocolVersion, shard: usize) -> RawClient {
    connect_as(
        b,
        version,
        &id_on_shard("alice", shard, SHARDS),
        "alice",
        "alice-pw",
    )
}

fn publish_payload(c: &mut RawClient) -> (String, Vec<u8>) {
    let p = c.recv_publish_ack();
    (p.topic.as_str().to_string(), p.payload.to_vec())
}

#[test]
fn a_forbidden_publish_is_refused_in_v5_and_dropped_in_v311() {
    let ab = acl_broker(ACL);
    let b = &ab.b;
    let mut watcher = admin(b, 1);
    watcher.subscribe_v5(&[("#", opts(QoS::AtLeastOnce))], None);
    let mut a5 = alice(b, ProtocolVersion::V5, 0);
    assert_eq!(
        a5.publish_v5(msg("admin/x", b"no", QoS::AtLeastOnce)),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(
        a5.publish_v5(msg("admin/x", b"no", QoS::ExactlyOnce)),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(a5.publish_v5(msg("admin/x", b"no", QoS::AtMostOnce)), None);
    assert_eq!(
        a5.publish_v5(msg("alice/ok", b"yes5", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(
        publish_payload(&mut watcher),
        ("alice/ok".into(), b"yes5".to_vec())
    );
    // 3.1.1: acknowledged as usual, dropped all the same.
    let mut a3 = alice(b, ProtocolVersion::V3_1_1, 1);
    a3.publish("admin/y", b"no", QoS::AtLeastOnce, false);
    a3.publish("admin/y", b"no", QoS::ExactlyOnce, false);
    a3.publish("alice/ok", b"yes3", QoS::AtLeastOnce, false);
    assert_eq!(
        publish_payload(&mut watcher),
        ("alice/ok".into(), b"yes3".to_vec())
    );
    // A will on a topic the user may not write: the CONNECT is refused.
    let (mut c, ack) = RawClient::connect_packet(
        b.addr,
        &ConnectOpts::v5("alice-will", true)
            .will("admin/will", b"w", QoS::AtMostOnce, false)
            .packet_with(|c| {
                c.username = Some(shardmq::protocol::MqttStr::new("alice").unwrap());
                c.password = Some(Bytes::from_static(b"alice-pw"));
            }),
    );
    assert_eq!(ack.reason_code, ReasonCode::NotAuthorized);
    assert!(c.expect_closed().is_empty());
}

#[test]
fn a_forbidden_subscription_is_refused() {
    let ab = acl_broker(ACL);
    let b = &ab.b;
    let mut a5 = alice(b, ProtocolVersion::V5, 0);
    let ack = a5.subscribe_v5(
        &[
            ("admin/#", opts(QoS::AtLeastOnce)),
            ("alice/#", opts(QoS::AtLeastOnce)),
            ("sensors/secret/#", opts(QoS::AtMostOnce)),
            ("sensors/+/x", opts(QoS::AtMostOnce)),
            ("$share/g/admin/x", opts(QoS::AtMostOnce)),
        ],
        None,
    );
    assert_eq!(
        ack.reason_codes,
        vec![
            ReasonCode::NotAuthorized,
            ReasonCode::GrantedQoS1,
            ReasonCode::NotAuthorized,
            ReasonCode::Success,
            ReasonCode::NotAuthorized
        ]
    );
    let mut a3 = alice(b, ProtocolVersion::V3_1_1, 1);
    let ack = a3.subscribe(&[("admin/#", QoS::AtLeastOnce), ("alice/#", QoS::AtLeastOnce)]);
    assert_eq!(
        ack.reason_codes,
        vec![ReasonCode::UnspecifiedError, ReasonCode::GrantedQoS1]
    );
    // Anonymous: only public/#.
    let mut anon = RawClient::connect_v311(b.addr, "anon-sub");
    let ack = anon.subscribe(&[("public/#", QoS::AtMostOnce), ("alice/#", QoS::AtMostOnce)]);
    assert_eq!(
        ack.reason_codes,
        vec![ReasonCode::Success, ReasonCode::UnspecifiedError]
    );
}

#[test]
fn a_wildcard_subscriber_gets_only_what_it_may_read_live_and_retained() {
    let ab = acl_broker(ACL);
    let b = &ab.b;
    let mut publisher = admin(b, 0);
    // Retained first: one forbidden, one allowed (acknowledged once every shard has them).
    publisher.publish("sensors/secret/r", b"hidden", QoS::AtLeastOnce, true);
    publisher.publish("sensors/open/r", b"shown", QoS::AtLeastOnce, true);
    for shard in 0..SHARDS {
        let mut a = alice(b, ProtocolVersion::V5, shard);
        let ack = a.subscribe_v5(&[("#", opts(QoS::AtLeastOnce))], None);
        assert_eq!(
            ack.reason_codes,
            vec![ReasonCode::GrantedQoS1],
            "alice may read some of #"
        );
        let p = a.recv_publish_ack();
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("sensors/open/r", &b"shown"[..])
        );
        assert!(p.retain);
        publisher.publish("sensors/secret/live", b"hidden", QoS::AtLeastOnce, false);
        publisher.publish("admin/live", b"hidden", QoS::AtLeastOnce, false);
        publisher.publish("sensors/open/live", b"shown", QoS::AtLeastOnce, false);
        assert_eq!(
            publish_payload(&mut a),
            ("sensors/open/live".into(), b"shown".to_vec())
        );
        a.disconnect();
    }
}

#[test]
fn a_shared_subscription_delivers_only_to_members_that_may_read() {
    let ab = acl_broker(ACL);
    let b = &ab.b;
    let mut a = alice(b, ProtocolVersion::V5, 0);
    let mut reader = admin(b, 1);
    for c in [&mut a, &mut reader] {
        let ack = c.subscribe_v5(&[("$share/g/sensors/#", opts(QoS::AtLeastOnce))], None);
        assert_eq!(ack.reason_codes, vec![ReasonCode::GrantedQoS1]);
    }
    a.subscribe_v5(&[("alice/#", opts(QoS::AtLeastOnce))], None);
    let mut publisher = admin(b, 0);
    const N: usize = 6;
    for i in 0..N {
        publisher.publish(
            &format!("sensors/secret/{i}"),
            b"s",
            QoS::AtLeastOnce,
            false,
        );
    }
    // Each message goes to exactly one member: all of them reached the one that may read.
    let mut got: Vec<String> = (0..N).map(|_| publish_payload(&mut reader).0).collect();
    got.sort();
    assert_eq!(
        got,
        (0..N)
            .map(|i| format!("sensors/secret/{i}"))
            .collect::<Vec<_>>()
    );
    publisher.publish("alice/after", b"a", QoS::AtLeastOnce, false);
    assert_eq!(publish_payload(&mut a).0, "alice/after");
}

#[test]
fn patterns_give_each_client_and_user_their_own_tree() {
    let ab = acl_broker(ACL);
    let b = &ab.b;
    let dev = id_on_shard("dev", 0, SHARDS);
    let (mut d, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&dev, true));
    let ack = d.subscribe_v5(
        &[
            (&format!("devices/{dev}/#"), opts(QoS::AtLeastOnce)),
            ("devices/other/#", opts(QoS::AtLeastOnce)),
            ("inbox/+/#", opts(QoS::AtLeastOnce)),
        ],
        None,
    );
    assert_eq!(
        ack.reason_codes,
        vec![
            ReasonCode::GrantedQoS1,
            ReasonCode::NotAuthorized,
            ReasonCode::NotAuthorized
        ],
        "%u patterns do not apply to anonymous clients"
    );
    assert_eq!(
        d.publish_v5(msg("devices/other/t", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NotAuthorized)
    );
    assert_eq!(
        d.publish_v5(msg(&format!("devices/{dev}/t"), b"mine", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(
        publish_payload(&mut d),
        (format!("devices/{dev}/t"), b"mine".to_vec())
    );

    let mut a = alice(b, ProtocolVersion::V5, 1);
    let ack = a.subscribe_v5(
        &[
            ("inbox/alice/#", opts(QoS::AtLeastOnce)),
            ("inbox/bob/#", opts(QoS::AtLeastOnce)),
        ],
        None,
    );
    assert_eq!(
        ack.reason_codes,
        vec![ReasonCode::GrantedQoS1, ReasonCode::NotAuthorized]
    );
    let mut publisher = admin(b, 0);
    publisher.publish("inbox/alice/1", b"hi", QoS::AtLeastOnce, false);
    assert_eq!(
        publish_payload(&mut a),
        ("inbox/alice/1".into(), b"hi".to_vec())
    );
}

#[test]
fn sighup_reloads_the_acl_and_connections_stay() {
    let ab = acl_broker(ACL);
    let (b, acl) = (&ab.b, &ab.acl);
    let mut a = alice(b, ProtocolVersion::V5, 0);
    let mut watcher = admin(b, 1);
    watcher.subscribe_v5(&[("news/#", opts(QoS::AtLeastOnce))], None);
    assert_eq!(
        a.publish_v5(msg("news/1", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NotAuthorized)
    );

    replace_file(acl, format!("{ACL}\nuser alice\ntopic write news/#\n"));
    // SAFETY: signalling the broker this test started, by its PID.
    unsafe { libc::kill(b.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match a.publish_v5(msg("news/2", b"now", QoS::AtLeastOnce)) {
            Some(ReasonCode::Success) => break,
            Some(ReasonCode::NotAuthorized) if Instant::now() < deadline => {}
            other => panic!("the new rule did not apply within {TIMEOUT:?}: {other:?}"),
        }
    }
    assert_eq!(
        publish_payload(&mut watcher),
        ("news/2".into(), b"now".to_vec())
    );

    // A broken file: the reload is refused, the rules in force stay (then a good file again
    // takes the grant away, showing the broker still reloads).
    replace_file(acl, "topic bogus-access x y\nnonsense\n");
    // SAFETY: kill(2) on the broker this test started; no memory is involved.
    unsafe { libc::kill(b.pid() as i32, libc::SIGHUP) };
    replace_file(acl, ACL);
    // SAFETY: as above.
    unsafe { libc::kill(b.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match a.publish_v5(msg("news/3", b"x", QoS::AtLeastOnce)) {
            Some(ReasonCode::NotAuthorized) => break,
            Some(ReasonCode::Success) if Instant::now() < deadline => {
                assert_eq!(publish_payload(&mut watcher).0, "news/3");
            }
            other => panic!("the reload did not apply within {TIMEOUT:?}: {other:?}"),
        }
    }
    // The connection stayed up through all of it.
    a.ping();
    watcher.ping();
}

#[test]
fn a_bad_password_or_acl_file_stops_the_start_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |toml: &str| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_shardmq"))
            .arg("--config")
            .arg(&cfg)
            .args(["--listen", "127.0.0.1:0", "--shards", "1", "--no-pin"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap()
    };
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "topic read a/#\nuser\n").unwrap();
    let out = run(&format!("[auth]\nacl_file = {}\n", toml_path(&acl)));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("{}:2:", acl.display())), "{err}");
    // check-config reads the files too.
    let out = Command::new(env!("CARGO_BIN_EXE_shardmq"))
        .arg("check-config")
        .arg(dir.path().join("c.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:2:", acl.display())), "{err}");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "alice:plaintext\n").unwrap();
    let out = run(&format!("[auth]\npassword_file = {}\n", toml_path(&pw)));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:1:", pw.display())), "{err}");
    let out = run("[auth]\npassword_file = \"/nonexistent/pw\"\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pw"));
}

#[test]
fn subscribe_deny_still_answers_0x80() {
    let b = TestBroker::start_with(1, "[access]\nsubscribe_deny = [\"test/nosubscribe\"]\n");
    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("deny5", true));
    let ack = c.subscribe_v5(&[("test/nosubscribe", opts(QoS::AtMostOnce))], None);
    assert_eq!(ack.reason_codes, vec![ReasonCode::UnspecifiedError]);
}

#[test]
fn a_refused_login_does_not_take_over_the_session_of_its_client_id() {
    let b = TestBroker::start_with(
        SHARDS,
        &format!(
            "[auth]\npassword_file = {}\n",
            toml_path(Path::new(FIXTURE))
        ),
    );
    // Whichever shard accepts the intruder, the refusal comes before any takeover.
    let id = id_on_shard("victim", 1, SHARDS);
    let mut victim = connect_as(&b, ProtocolVersion::V5, &id, "bob", "bob-pw");
    victim.subscribe_v5(&[("bob/#", opts(QoS::AtLeastOnce))], None);
    for _ in 0..3 {
        let (mut c, ack) = RawClient::connect_packet(
            b.addr,
            &login(ProtocolVersion::V5, &id, Some("bob"), Some("guess")),
        );
        assert_eq!(ack.reason_code, ReasonCode::BadUserNameOrPassword);
        assert!(c.expect_closed().is_empty());
    }
    let mut p = connect_as(&b, ProtocolVersion::V5, "pub-bob", "bob", "bob-pw");
    p.publish("bob/still-here", b"1", QoS::AtLeastOnce, false);
    assert_eq!(publish_payload(&mut victim).0, "bob/still-here");
}

/// A persistent CONNECT as `user` with client id `id`; returns the CONNACK.
fn persistent_login(
    b: &TestBroker,
    version: ProtocolVersion,
    id: &str,
    user: &str,
    pw: &str,
) -> (RawClient, shardmq::protocol::ConnAck) {
    let mut opts = ConnectOpts::new(version, id, false);
    if version == ProtocolVersion::V5 {
        opts = opts.expiry(3600);
    }
    let packet = opts.packet_with(|c| {
        c.username = Some(shardmq::protocol::MqttStr::new(user).unwrap());
        c.password = Some(Bytes::copy_from_slice(pw.as_bytes()));
    });
    RawClient::connect_packet(b.addr, &packet)
}

/// Bob's CONNECTs with client id `id` (asking for the session, and a clean start) are
/// refused with 0x87 (3.1.1: 0x05) and get nothing else.
fn bob_is_refused(b: &TestBroker, version: ProtocolVersion, id: &str) {
    for clean in [false, true] {
        let mut opts = ConnectOpts::new(version, id, clean);
        if version == ProtocolVersion::V5 && !clean {
            opts = opts.expiry(3600);
        }
        let packet = opts.packet_with(|c| {
            c.username = Some(shardmq::protocol::MqttStr::new("bob").unwrap());
            c.password = Some(Bytes::from_static(b"bob-pw"));
        });
        let (mut bob, ack) = RawClient::connect_packet(b.addr, &packet);
        assert_eq!(
            ack.reason_code,
            ReasonCode::NotAuthorized,
            "{version:?} clean={clean}"
        );
        assert!(!ack.session_present);
        assert!(bob.expect_closed().is_empty(), "nothing after the refusal");
    }
}

/// A session belongs to the user that made it. Alice's offline session holds three messages
/// of `alice/secret`; Bob, with his own valid password and Alice's client id, is refused
/// (0x87; 3.1.1: 0x05) whether he asks for the session or a clean start, before and after a
/// restart (the owner is stored with the session); Alice's session, queue and all, is
/// untouched and hers when she returns.
#[test]
fn another_user_cannot_take_over_a_session_or_read_its_queue() {
    for version in [ProtocolVersion::V5, ProtocolVersion::V3_1_1] {
        let ab = acl_broker(ACL);
        let id = id_on_shard(&format!("alice-{}", version.level()), 1, SHARDS);
        let (mut a, ack) = persistent_login(&ab.b, version, &id, "alice", "alice-pw");
        assert_eq!(ack.reason_code, ReasonCode::Success);
        a.sub(&[("alice/#", QoS::AtLeastOnce)]);
        a.disconnect();
        let mut adm = admin(&ab.b, 0);
        for i in 0..3 {
            adm.publish(
                "alice/secret",
                format!("s{i}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            );
        }
        adm.disconnect();
        bob_is_refused(&ab.b, version, &id);
        let s = ab.b.admin_json(&format!("/api/sessions/{id}"));
        assert_eq!(s["queued_messages"], 3, "{s}");

        let dir = ab.b.stop_keep_dir();
        let b = TestBroker::start_in(SHARDS, &ab.cfg, dir);
        bob_is_refused(&b, version, &id);
        assert_eq!(
            b.metric("shardmq_takeovers_refused_total{shard=\"1\"}"),
            2.0
        );
        let (mut a, ack) = persistent_login(&b, version, &id, "alice", "alice-pw");
        assert_eq!(ack.reason_code, ReasonCode::Success);
        assert!(ack.session_present);
        let got: Vec<Vec<u8>> = (0..3).map(|_| publish_payload(&mut a).1).collect();
        assert_eq!(got, [b"s0".to_vec(), b"s1".to_vec(), b"s2".to_vec()]);
    }
}

/// Read access is checked again for what waits in a session when its client attaches: a
/// reload that takes Alice's read access to `alice/secret/#` away keeps those queued
/// messages from her (counted as denied deliveries), while the rest of her queue arrives.
#[test]
fn queued_messages_are_checked_against_the_rules_in_force_when_the_client_returns() {
    let ab = acl_broker(ACL);
    let (b, acl) = (&ab.b, &ab.acl);
    let id = id_on_shard("alice-recheck", 1, SHARDS);
    let (mut a, ack) = persistent_login(b, ProtocolVersion::V5, &id, "alice", "alice-pw");
    assert_eq!(ack.reason_code, ReasonCode::Success);
    a.sub(&[("alice/#", QoS::AtLeastOnce)]);
    a.disconnect();
    let mut adm = admin(b, 0);
    adm.publish("alice/secret/1", b"hidden", QoS::AtLeastOnce, false);
    adm.publish("alice/open", b"visible", QoS::AtLeastOnce, false);
    replace_file(
        acl,
        format!("{ACL}\nuser alice\ntopic deny alice/secret/#\n"),
    );
    // SAFETY: signalling the broker this test started, by its PID.
    unsafe { libc::kill(b.pid() as i32, libc::SIGHUP) };
    // The reload is in force once a publish there is refused to Alice.
    let probe_id = id_on_shard("alice-probe", 1, SHARDS);
    let mut probe = connect_as(b, ProtocolVersion::V5, &probe_id, "alice", "alice-pw");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let r = probe.subscribe_v5(&[("alice/secret/x", opts(QoS::AtLeastOnce))], None);
        if r.reason_codes[0] == ReasonCode::NotAuthorized {
            break;
        }
        assert!(Instant::now() < deadline, "the reload did not apply");
        probe.unsubscribe(&["alice/secret/x"]);
    }
    let (mut a, ack) = persistent_login(b, ProtocolVersion::V5, &id, "alice", "alice-pw");
    assert!(ack.session_present);
    assert_eq!(
        publish_payload(&mut a),
        ("alice/open".into(), b"visible".to_vec())
    );
    a.ping();
    let s = b.admin_json(&format!("/api/sessions/{id}"));
    assert_eq!(
        s["queued_messages"], 0,
        "the hidden message is gone, not waiting: {s}"
    );
    assert_eq!(
        b.metric("shardmq_messages_dropped_total{shard=\"1\",reason=\"acl_denied_delivery\"}"),
        1.0
    );
}

/// A clean session holds nothing of its user's beyond its connection: another user's CONNECT
/// with the same client id takes it over as the protocol has it (the first connection gets
/// DISCONNECT 0x8E), while a session that outlives its connection stays its owner's.
#[test]
fn a_clean_session_is_taken_over_by_another_user_as_the_protocol_has_it() {
    let ab = acl_broker(ACL);
    let id = id_on_shard("shared-device", 1, SHARDS);
    let (mut a, ack) = RawClient::connect_packet(
        ab.b.addr,
        &login(ProtocolVersion::V5, &id, Some("alice"), Some("alice-pw")),
    );
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let (_bob, ack) = RawClient::connect_packet(
        ab.b.addr,
        &login(ProtocolVersion::V5, &id, Some("bob"), Some("bob-pw")),
    );
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert_eq!(a.expect_disconnect(), ReasonCode::SessionTakenOver);
}
