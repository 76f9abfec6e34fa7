//! Replicated sessions reach NATS over TLS with a client certificate and a password (real
//! JetStream servers that require all three): the node replicates, and a node with the
//! wrong password, or one that does not trust the servers' CA, or one without TLS, is
//! refused at start with one line naming the problem, rather than replicating in the clear
//! or not at all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use shardmq::protocol::QoS;
use support::cluster::*;
use support::etcd::Etcd;
use support::nats::Nats;
use support::raw::{ConnectOpts, RawClient};
use support::TestBroker;

const USER: &str = "shardmq-node";
const PASSWORD: &str = "correct horse battery staple";

/// A CA (and a second, untrusted one), the servers' certificate for 127.0.0.1 and a
/// client certificate, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, ca_pem) = make_ca("shardmq test NATS CA");
        let (_, other_pem) = make_ca("some other CA");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text);
        write("ca.pem", ca_pem).expect("write");
        write("other-ca.pem", other_pem).expect("write");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("params");
        let server = params.signed_by(&key, &ca).expect("sign");
        write("server.pem", server.pem()).expect("write");
        write("server.key", key.serialize_pem()).expect("write");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, USER);
        let client = params.signed_by(&key, &ca).expect("sign");
        write("client.pem", client.pem()).expect("write");
        write("client.key", key.serialize_pem()).expect("write");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The servers' configuration: TLS required, client certificates verified, one user.
    fn nats_conf(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n\
             authorization {{\n  user: {USER:?}\n  password: {PASSWORD:?}\n}}\n",
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem"),
        )
    }
}

fn make_ca(cn: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.self_signed(&key).expect("self-sign");
    let pem = cert.pem();
    (Issuer::new(params, key), pem)
}

/// `tls://` URLs of the servers, as a TOML array's items.
fn tls_urls(nats: &Nats) -> String {
    nats.servers
        .iter()
        .map(|s| format!("\"tls://127.0.0.1:{}\"", s.client_port))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Node `id`'s replication settings: `urls`, then `access` (TLS and credentials).
fn node_conf(id: &str, etcd: &Etcd, prefix: &str, urls: &str, access: &str) -> String {
    format!(
        "{}jetstream = [{urls}]\n{access}",
        node_toml_ttl(id, etcd, prefix, 6)
    )
}

fn access(pki: &Pki, ca: &str, password: &str) -> String {
    format!(
        "jetstream_ca_file = {:?}\njetstream_cert_file = {:?}\njetstream_key_file = {:?}\n\
         jetstream_user = {USER:?}\njetstream_password = {password:?}\n",
        pki.path(ca),
        pki.path("client.pem"),
        pki.path("client.key"),
    )
}

#[test]
fn a_node_replicates_to_jetstream_over_tls_with_a_client_certificate_and_a_password() {
    let pki = Pki::new();
    let nats = Nats::start_with(3, &pki.nats_conf());
    let etcd = Etcd::start(1);
    let p = format!("/shardmq-replica-tls-{}", std::process::id());
    let a = TestBroker::start_with(
        1,
        &node_conf(
            "a",
            &etcd,
            &p,
            &tls_urls(&nats),
            &access(&pki, "ca.pem", PASSWORD),
        ),
    );
    let view = a.admin_json("/api/cluster");
    let rep = &view["replication"];
    assert_eq!(rep["nats_connected"], true, "{rep}");
    let stream = rep["stream"].as_str().expect("the stream").to_string();

    // A persistent session's SUBACK and a QoS 1 message's PUBACK wait for the stream.
    let sub = ConnectOpts::v5("tls-sub", false);
    let (mut s, _) = RawClient::connect_served(a.addr, &sub);
    let codes = s.subscribe(&[("tls/t", QoS::AtLeastOnce)]).reason_codes;
    assert!(codes.iter().all(|r| (*r as u8) < 0x80), "{codes:?}");
    s.disconnect();
    let (mut publ, _) = RawClient::connect_served(a.addr, &ConnectOpts::v5("tls-pub", true));
    for i in 0..10 {
        publ.publish("tls/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce, false);
    }
    publ.disconnect();
    let appends = a.admin_json("/api/cluster")["replication"]["appends_total"]
        .as_u64()
        .unwrap_or(0);
    assert!(appends >= 2, "appends over TLS: {appends}");
    let held = nats.stream(&stream).expect("the node's stream")["state"].clone();
    assert!(held["messages"].as_u64().unwrap_or(0) >= 2, "{held}");
    let (mut s, present) = RawClient::connect_served(a.addr, &sub);
    assert!(present, "the persistent session is there");
    // Every PUBACK was a success: all ten were stored (a refused one never is).
    let got: Vec<String> = (0..10)
        .map(|_| String::from_utf8_lossy(&s.recv_publish_ack().payload).into_owned())
        .collect();
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    s.disconnect();
}

#[test]
fn a_wrong_password_an_untrusted_server_or_no_tls_stops_the_start_with_one_line() {
    let pki = Pki::new();
    let nats = Nats::start_with(3, &pki.nats_conf());
    let etcd = Etcd::start(1);
    let p = format!("/shardmq-replica-tls-bad-{}", std::process::id());
    let urls = tls_urls(&nats);
    let cases = [
        (
            "wrong password",
            node_conf("a", &etcd, &p, &urls, &access(&pki, "ca.pem", "wrong")),
            "authorization",
        ),
        (
            "a CA that did not sign the servers' certificate",
            node_conf(
                "b",
                &etcd,
                &p,
                &urls,
                &access(&pki, "other-ca.pem", PASSWORD),
            ),
            "TLS",
        ),
        (
            "no TLS, no credentials",
            node_conf("c", &etcd, &p, &nats.toml_urls(), ""),
            "TLS",
        ),
    ];
    for (what, conf, says) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = run_with(dir.path(), &conf);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started; stderr: {stderr}");
        // Info lines of the start may come first; the problem is one line, the last.
        let lines: Vec<&str> = stderr.lines().collect();
        let loud = lines
            .iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count();
        assert_eq!(loud, 0, "{what}: no other warning or error: {lines:?}");
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.contains(says) && last.contains("cluster.jetstream"),
            "{what}: the last line names the problem ({says}): {stderr}"
        );
    }
}

/// An NKey user: the servers list its public key, the node holds the seed in a file and
/// signs their challenge with it. QoS 1 messages into a persistent session are acknowledged
/// through the stream. A seed the servers do not list stops the start with one line, and a
/// file that is not a seed is refused before anything starts, the seed never printed.
#[test]
fn a_node_logs_in_to_jetstream_with_an_nkey_and_an_unknown_one_stops_the_start() {
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let keys = tempfile::tempdir().expect("temp dir");
    let (good, unknown, junk) = (
        keys.path().join("good.nk"),
        keys.path().join("unknown.nk"),
        keys.path().join("junk.nk"),
    );
    std::fs::write(&good, format!("{}\n", user.seed().expect("seed"))).expect("write");
    std::fs::write(&unknown, other.seed().expect("seed")).expect("write");
    let secret = "SUSECRETBUTNOTASEEDATALL";
    std::fs::write(&junk, secret).expect("write");
    let nats = Nats::start_with(
        3,
        &format!(
            "authorization {{\n  users = [ {{ nkey: {:?} }} ]\n}}\n",
            user.public_key()
        ),
    );
    logs_in_one_way(
        &nats,
        "nkey",
        "cluster.jetstream_nkey_file",
        [&good, &unknown, &junk],
        secret,
    );
}

/// A node that logs in to JetStream with the file named by `key` (`files`: one the servers
/// accept, one they do not know, one not of that kind): with the first, QoS 1 messages into
/// a persistent session are acknowledged through the stream; the second stops the start
/// with one line naming the authorization; the third is refused before anything starts
/// (exit 2, one line naming `key`, nothing of `secret`).
fn logs_in_one_way(nats: &Nats, tag: &str, key: &str, files: [&Path; 3], secret: &str) {
    let [good, refused, junk] = files;
    let etcd = Etcd::start(1);
    let p = format!("/shardmq-replica-{tag}-{}", std::process::id());
    let line = |f: &Path| format!("{} = {f:?}\n", key.trim_start_matches("cluster."));
    let a = TestBroker::start_with(
        1,
        &node_conf("a", &etcd, &p, &nats.toml_urls(), &line(good)),
    );
    assert_eq!(
        a.admin_json("/api/cluster")["replication"]["nats_connected"],
        true
    );
    let topic = format!("{tag}/t");
    let sub = ConnectOpts::v5(&format!("{tag}-sub"), false);
    let (mut s, _) = RawClient::connect_served(a.addr, &sub);
    s.sub(&[(topic.as_str(), QoS::AtLeastOnce)]);
    s.disconnect();
    let (mut publ, _) =
        RawClient::connect_served(a.addr, &ConnectOpts::v5(&format!("{tag}-pub"), true));
    for i in 0..5 {
        publ.publish(&topic, format!("m{i}").as_bytes(), QoS::AtLeastOnce, false);
    }
    publ.disconnect();
    let appends = a.admin_json("/api/cluster")["replication"]["appends_total"]
        .as_u64()
        .unwrap_or(0);
    assert!(appends >= 2, "appends with {key}: {appends}");
    let (mut s, present) = RawClient::connect_served(a.addr, &sub);
    assert!(present);
    let got: Vec<String> = (0..5)
        .map(|_| String::from_utf8_lossy(&s.recv_publish_ack().payload).into_owned())
        .collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    s.disconnect();

    let dir = tempfile::tempdir().expect("temp dir");
    let out = run_with(
        dir.path(),
        &node_conf("b", &etcd, &p, &nats.toml_urls(), &line(refused)),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a login the servers do not know: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default().to_lowercase();
    assert!(
        last.contains("authorization") && last.contains("cluster.jetstream"),
        "the last line names the problem: {stderr}"
    );
    let out = run_with(
        dir.path(),
        &node_conf("c", &etcd, &p, &nats.toml_urls(), &line(junk)),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(key) && !stderr.contains(secret), "{stderr}");
}

/// Runs `shardmq` with `conf` in `dir` until it exits (bounded).
fn run_with(dir: &Path, conf: &str) -> std::process::Output {
    let cfg = dir.join("node.toml");
    std::fs::write(&cfg, conf).expect("write config");
    let data = dir.join("data");
    support::run_to_exit(&[
        "--config",
        cfg.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
        "--no-pin",
        "--shards",
        "1",
        "--data-dir",
        data.to_str().expect("utf-8"),
    ])
}

/// NATS in operator mode (decentralised JWT authentication): the node logs in with a
/// credentials file (a user JWT of an account the servers know, and its seed). QoS 1
/// messages into a persistent session are acknowledged through the stream. A user of an
/// account the servers do not know stops the start with one line; a file that is not a
/// credentials file is refused before anything starts, its contents never printed.
#[test]
fn a_node_logs_in_to_jetstream_with_a_creds_file_and_an_unknown_account_stops_the_start() {
    let op = support::nats::Operator::new();
    let keys = tempfile::tempdir().expect("temp dir");
    let (good, stranger, junk) = (
        keys.path().join("node.creds"),
        keys.path().join("stranger.creds"),
        keys.path().join("junk.creds"),
    );
    std::fs::write(&good, op.user_creds("shardmq-a")).expect("write");
    std::fs::write(&stranger, op.stranger_creds()).expect("write");
    let secret = "-----BEGIN NATS USER JWT-----\nSECRETJWT\n";
    std::fs::write(&junk, secret).expect("write");
    let nats = Nats::start_with(3, &op.server_conf);
    logs_in_one_way(
        &nats,
        "creds",
        "cluster.jetstream_creds_file",
        [&good, &stranger, &junk],
        "SECRET",
    );
}
