//! Durable persistent sessions, end to end: the real binary on a temporary data directory,
//! restarted (SIGTERM) or killed (SIGKILL) and started again on the same directory.
//!
//! 1. The plain scenario as a user runs it, with rumqttc (3.1.1 and 5.0) and with Debian's
//!    `mosquitto_sub` / `mosquitto_pub`: a persistent subscriber goes away, messages are
//!    published, it comes back and gets them all, in order, with Session Present = 1; with no
//!    restart, across a SIGTERM restart and across a `kill -9`; with 1 and with 2 shards.
//! 2. Re-homing: sessions and retained messages written with 2 shards come back with 1
//!    shard, then with 3.
//! 3. Retained messages and a will whose delay was pending survive a `kill -9`; a will that
//!    was published before a restart is not published again after it.
//! 4. The crash test: QoS 1 and QoS 2 publishers to offline persistent subscribers, the
//!    broker SIGKILLed at seeded pseudo-random moments (set `SHARDMQ_CRASH_SEED` to replay
//!    one), then every acknowledged message must be delivered: QoS 1 at least once, QoS 2
//!    exactly once.
//! 5. No acknowledgement for data not stored: `durable` acknowledges what it stored (and a
//!    QoS 2 resend is not acknowledged ahead of the original); `memory` loses sessions on a
//!    restart, as documented.
//!
//! No test sleeps to synchronise: each waits for the packet, message or close it expects,
//! bounded by `support::TIMEOUT`. The only sleeps are the crash test's seeded jitter before a
//! kill (it chooses *when* to crash, it does not wait for anything).
//!
//! A QoS 1/2 PUBLISH is acknowledged only once the copies stored for persistent sessions are
//! durable on every shard that holds one, so "the publisher received PUBACK" is the event
//! after which a crash may lose nothing. The tests publish their last message before a crash
//! at QoS 1 for that reason: messages from one publisher reach a shard in order, and one
//! shard's journal is written in order, so that PUBACK covers the QoS 0 messages before it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shardmq::protocol::{Ack, Packet, QoS, ReasonCode};
use support::crash::{
    crash_drain, publish_through_crashes, verify_crash, CrashPublisher, CrashTarget, Rng,
    CRASH_TOPIC,
};
use support::raw::{publish_packet, ConnectOpts, RawClient};
use support::{id_on_shard, owner, rt, stdout_lines, topic_on_shard, TestBroker, TIMEOUT};

// ------------------------------------------------------------------------------ helpers

use support::crash::text;

/// How the broker is interrupted between publishing and the subscriber's return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    None,
    /// SIGTERM, wait for the exit, start again on the same data directory.
    Restart,
    /// SIGKILL, start again on the same data directory.
    Kill9,
}

/// Applies `how` to `b` and returns the broker that serves afterwards.
fn interrupt(b: TestBroker, how: Interrupt, toml: &str) -> TestBroker {
    let shards = b.shards;
    match how {
        Interrupt::None => b,
        Interrupt::Restart => {
            let dir = stop_keep_dir(b);
            TestBroker::start_in(shards, toml, dir)
        }
        Interrupt::Kill9 => {
            let dir = b.kill9();
            TestBroker::start_in(shards, toml, dir)
        }
    }
}

/// SIGTERM; asserts a clean exit and returns the data directory.
fn stop_keep_dir(mut b: TestBroker) -> tempfile::TempDir {
    let dir = std::mem::replace(&mut b.data_dir, tempfile::tempdir().expect("temp dir"));
    let status = b.stop();
    assert!(
        status.success(),
        "broker exit status after SIGTERM: {status}"
    );
    dir
}

// ---- rumqttc (3.1.1 and 5.0), driven from synchronous tests

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ver {
    V311,
    V5,
}

/// What the rumqttc event loop saw, the same for both protocol versions.
#[derive(Debug)]
enum Ev {
    ConnAck {
        session_present: bool,
        success: bool,
    },
    Publish {
        topic: String,
        payload: String,
        qos: u8,
    },
    PubAck,
    SubAck {
        granted: Vec<Option<u8>>,
    },
    Other(String),
}

enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A rumqttc client whose event loop runs on the background runtime and forwards every
/// incoming packet here; it stops at the first connection error (no reconnects). It
/// acknowledges QoS 1/2 messages itself, as applications using it do.
struct Mq {
    handle: Handle,
    rx: mpsc::Receiver<Result<Ev, String>>,
    task: tokio::task::JoinHandle<()>,
}

/// Session Expiry Interval the 5.0 clients ask for.
const EXPIRY_S: u32 = 3600;

impl Mq {
    /// Connects with a fixed client id; `keep` = Clean Session 0 (3.1.1) / Clean Start 0 and
    /// a Session Expiry Interval (5.0). Returns the client and the CONNACK's Session Present.
    fn connect(addr: SocketAddr, ver: Ver, id: &str, keep: bool) -> (Mq, bool) {
        let (tx, rx) = mpsc::channel();
        let (handle, task) = match ver {
            Ver::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(Duration::from_secs(60));
                o.set_clean_session(!keep);
                let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
                let task = rt().spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(rumqttc::Event::Incoming(p)) => Ok(match p {
                                rumqttc::Packet::ConnAck(a) => Ev::ConnAck {
                                    session_present: a.session_present,
                                    success: a.code == rumqttc::ConnectReturnCode::Success,
                                },
                                rumqttc::Packet::Publish(p) => Ev::Publish {
                                    topic: p.topic.clone(),
                                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                    qos: p.qos as u8,
                                },
                                rumqttc::Packet::PubAck(_) => Ev::PubAck,
                                rumqttc::Packet::SubAck(a) => Ev::SubAck {
                                    granted: a
                                        .return_codes
                                        .iter()
                                        .map(|c| match c {
                                            rumqttc::SubscribeReasonCode::Success(q) => {
                                                Some(*q as u8)
                                            }
                                            rumqttc::SubscribeReasonCode::Failure => None,
                                        })
                                        .collect(),
                                },
                                other => Ev::Other(format!("{other:?}")),
                            }),
                            Ok(rumqttc::Event::Outgoing(_)) => continue,
                            Err(e) => Err(e.to_string()),
                        };
                        let end = ev.is_err();
                        if tx.send(ev).is_err() || end {
                            break;
                        }
                    }
                });
                (Handle::V4(client), task)
            }
            Ver::V5 => {
                use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet as P5};
                let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
                o.set_keep_alive(Duration::from_secs(60));
                o.set_clean_start(!keep);
                let mut props = ConnectProperties::new();
                props.session_expiry_interval = keep.then_some(EXPIRY_S);
                o.set_connect_properties(props);
                let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 64);
                let task = rt().spawn(async move {
                    loop {
                        let ev = match el.poll().await {
                            Ok(rumqttc::v5::Event::Incoming(p)) => Ok(match p {
                                P5::ConnAck(a) => Ev::ConnAck {
                                    session_present: a.session_present,
                                    success: a.code
                                        == rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
                                },
                                P5::Publish(p) => Ev::Publish {
                                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                    payload: String::from_utf8_lossy(&p.payload).into_owned(),
                                    qos: p.qos as u8,
                                },
                                P5::PubAck(_) => Ev::PubAck,
                                P5::SubAck(a) => Ev::SubAck {
                                    granted: a
                                        .return_codes
                                        .iter()
                                        .map(|c| {
                                            use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                                            match c {
                                                R::Success(q) => Some(*q as u8),
                                                _ => None,
                                            }
                                        })
                                        .collect(),
                                },
                                other => Ev::Other(format!("{other:?}")),
                            }),
                            Ok(rumqttc::v5::Event::Outgoing(_)) => continue,
                            Err(e) => Err(e.to_string()),
                        };
                        let end = ev.is_err();
                        if tx.send(ev).is_err() || end {
                            break;
                        }
                    }
                });
                (Handle::V5(client), task)
            }
        };
        let mut mq = Mq { handle, rx, task };
        match mq.next() {
            Ev::ConnAck {
                session_present,
                success: true,
            } => (mq, session_present),
            other => panic!("{id}: expected a successful CONNACK, got {other:?}"),
        }
    }

    /// The next event; panics on a connection error or after TIMEOUT.
    fn next(&mut self) -> Ev {
        match self.rx.recv_timeout(TIMEOUT) {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => panic!("rumqttc connection error: {e}"),
            Err(e) => panic!("no event from rumqttc within {TIMEOUT:?}: {e}"),
        }
    }

    /// The next event that is not a PINGRESP.
    fn next_useful(&mut self) -> Ev {
        loop {
            match self.next() {
                Ev::Other(s) if s.starts_with("PingResp") => continue,
                ev => return ev,
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK; asserts the QoS granted.
    fn subscribe(&mut self, filter: &str, qos: u8) {
        let r = match &self.handle {
            Handle::V4(c) => rt()
                .block_on(c.subscribe(filter, rumqttc::qos(qos).unwrap()))
                .map_err(|e| e.to_string()),
            Handle::V5(c) => rt()
                .block_on(c.subscribe(filter, rumqttc::v5::mqttbytes::qos(qos).unwrap()))
                .map_err(|e| e.to_string()),
        };
        r.expect("queue SUBSCRIBE");
        match self.next_useful() {
            Ev::SubAck { granted } => assert_eq!(granted, vec![Some(qos)], "SUBACK for {filter}"),
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    /// PUBLISH; for QoS 1 waits for the PUBACK (this client publishes one at a time).
    fn publish(&mut self, topic: &str, qos: u8, payload: &str) {
        let r = match &self.handle {
            Handle::V4(c) => rt()
                .block_on(c.publish(
                    topic,
                    rumqttc::qos(qos).unwrap(),
                    false,
                    payload.as_bytes().to_vec(),
                ))
                .map_err(|e| e.to_string()),
            Handle::V5(c) => rt()
                .block_on(c.publish(
                    topic,
                    rumqttc::v5::mqttbytes::qos(qos).unwrap(),
                    false,
                    payload.as_bytes().to_vec(),
                ))
                .map_err(|e| e.to_string()),
        };
        r.expect("queue PUBLISH");
        if qos == 1 {
            match self.next_useful() {
                Ev::PubAck => {}
                other => panic!("expected PUBACK for {payload}, got {other:?}"),
            }
        }
    }

    /// The next PUBLISH: (topic, payload, qos).
    fn recv(&mut self) -> (String, String, u8) {
        match self.next_useful() {
            Ev::Publish {
                topic,
                payload,
                qos,
            } => (topic, payload, qos),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// DISCONNECT, then wait until the broker has closed the connection: after this the
    /// broker has processed the DISCONNECT (the session is offline).
    fn disconnect(self) {
        let r = match &self.handle {
            Handle::V4(c) => rt().block_on(c.disconnect()).map_err(|e| e.to_string()),
            Handle::V5(c) => rt().block_on(c.disconnect()).map_err(|e| e.to_string()),
        };
        r.expect("queue DISCONNECT");
        loop {
            match self.rx.recv_timeout(TIMEOUT) {
                Ok(Ok(Ev::Other(_))) => {}
                Ok(Ok(ev)) => panic!("unexpected {ev:?} after DISCONNECT"),
                Ok(Err(e)) => {
                    assert!(e.contains("closed by peer"), "end after DISCONNECT: {e}");
                    return;
                }
                Err(e) => panic!("the broker did not close after DISCONNECT: {e}"),
            }
        }
    }
}

impl Drop for Mq {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- mosquitto_sub

/// A running `mosquitto_sub` that prints each message as `MSG <topic> <payload> <qos>`.
struct MosqSub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl MosqSub {
    /// `mosquitto_sub -c` (persistent session) on `filters` at QoS 1, with extra arguments.
    fn start(b: &TestBroker, version: &str, id: &str, filters: &[&str], extra: &[&str]) -> Self {
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
            .arg(b.port().to_string())
            .args(["-V", version, "-i", id, "-c", "-q", "1", "-d"])
            .args(["-F", "MSG %t %p %q"])
            .args(["-W", &TIMEOUT.as_secs().to_string()]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mosquitto_sub (install mosquitto-clients)");
        let lines = stdout_lines(&mut child);
        MosqSub { child, lines }
    }

    /// Every line it printed, once it has exited successfully.
    fn finish(mut self) -> Vec<String> {
        let deadline = Instant::now() + TIMEOUT;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("mosquitto_sub did not finish: {e}; output so far: {out:#?}"),
            }
        }
        let status = self.child.wait().expect("wait mosquitto_sub");
        assert!(
            status.success(),
            "mosquitto_sub exited with {status}: {out:#?}"
        );
        out
    }
}

impl Drop for MosqSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub -l`: one message per line of `lines`, in order, on one connection; it
/// exits once the last one is acknowledged.
fn mosquitto_pub_lines(b: &TestBroker, version: &str, id: &str, topic: &str, lines: &[String]) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p"])
        .arg(b.port().to_string())
        .args(["-V", version, "-i", id, "-t", topic, "-q", "1", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_pub (install mosquitto-clients)");
    let mut stdin = child.stdin.take().expect("stdin");
    for l in lines {
        writeln!(stdin, "{l}").expect("write to mosquitto_pub");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------ 1. plain

/// The plain scenario. A subscriber with a fixed client id and a persistent session
/// subscribes to `d/q0` at QoS 0 and `d/q1` at QoS 1 and disconnects; a publisher owned by
/// another shard (when there are two) publishes 12 messages alternating QoS 0 and QoS 1
/// (the last at QoS 1); the broker is interrupted as `how` says; the subscriber comes back
/// with Session Present = 1 and receives all 12, in order, each at its QoS; then a marker
/// published after them is the next thing it gets (nothing else was queued).
fn plain_scenario(ver: Ver, shards: usize, how: Interrupt) {
    let b = TestBroker::start(shards);
    let sub_id = id_on_shard("plain-sub", 0, shards);
    let pub_id = id_on_shard("plain-pub", shards - 1, shards);

    let (mut sub, present) = Mq::connect(b.addr, ver, &sub_id, true);
    assert!(!present, "a new session has Session Present = 0");
    sub.subscribe("d/q0", 0);
    sub.subscribe("d/q1", 1);
    sub.disconnect();

    let (mut publ, _) = Mq::connect(b.addr, ver, &pub_id, false);
    let sent: Vec<(String, String, u8)> = (0..12)
        .map(|i| {
            let qos = (i % 2) as u8; // ends with a QoS 1
            (format!("d/q{qos}"), format!("m{i}-q{qos}"), qos)
        })
        .collect();
    for (t, p, q) in &sent {
        publ.publish(t, *q, p);
    }
    publ.disconnect();

    let b = interrupt(b, how, "");

    let (mut sub, present) = Mq::connect(b.addr, ver, &sub_id, true);
    assert!(
        present,
        "{how:?}: the stored session is back (Session Present = 1)"
    );
    let got: Vec<(String, String, u8)> = (0..sent.len()).map(|_| sub.recv()).collect();
    assert_eq!(got, sent, "{how:?}: every message, in order, at its QoS");

    // Nothing more was queued: a marker published now is the next message.
    let (mut publ, _) = Mq::connect(b.addr, ver, &pub_id, false);
    publ.publish("d/q1", 1, "marker");
    assert_eq!(sub.recv(), ("d/q1".into(), "marker".into(), 1));
    publ.disconnect();
    sub.disconnect();
}

macro_rules! plain {
    ($($name:ident: $ver:expr, $shards:expr, $how:expr;)*) => {$(
        #[test]
        fn $name() {
            plain_scenario($ver, $shards, $how);
        }
    )*};
}

plain! {
    plain_v311_2_shards_no_restart: Ver::V311, 2, Interrupt::None;
    plain_v311_2_shards_restart: Ver::V311, 2, Interrupt::Restart;
    plain_v311_2_shards_kill9: Ver::V311, 2, Interrupt::Kill9;
    plain_v5_2_shards_no_restart: Ver::V5, 2, Interrupt::None;
    plain_v5_2_shards_restart: Ver::V5, 2, Interrupt::Restart;
    plain_v5_2_shards_kill9: Ver::V5, 2, Interrupt::Kill9;
    plain_v311_1_shard_no_restart: Ver::V311, 1, Interrupt::None;
    plain_v311_1_shard_restart: Ver::V311, 1, Interrupt::Restart;
    plain_v311_1_shard_kill9: Ver::V311, 1, Interrupt::Kill9;
    plain_v5_1_shard_no_restart: Ver::V5, 1, Interrupt::None;
    plain_v5_1_shard_restart: Ver::V5, 1, Interrupt::Restart;
    plain_v5_1_shard_kill9: Ver::V5, 1, Interrupt::Kill9;
}

/// The same with the Mosquitto command-line clients, as the README's users type them:
/// `mosquitto_sub -c` subscribes and exits (`-E`), `mosquitto_pub -l` publishes (QoS 1) from
/// another shard's client, the broker is killed with SIGKILL and started again, and
/// `mosquitto_sub -c` receives everything in order.
fn plain_mosquitto(version: &str) {
    let b = TestBroker::start(2);
    let sub_id = id_on_shard(&format!("mosq-sub-{version}"), 0, 2);
    let pub_id = id_on_shard(&format!("mosq-pub-{version}"), 1, 2);
    let filters = ["md/a", "md/b"];
    let out = MosqSub::start(&b, version, &sub_id, &filters, &["-E"]).finish();
    assert!(
        out.iter().any(|l| l.contains("received SUBACK")),
        "mosquitto_sub subscribed: {out:#?}"
    );
    let a: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
    let bb: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    mosquitto_pub_lines(&b, version, &pub_id, "md/a", &a);
    mosquitto_pub_lines(&b, version, &pub_id, "md/b", &bb);

    let b = interrupt(b, Interrupt::Kill9, "");

    let out = MosqSub::start(&b, version, &sub_id, &filters, &["-C", "10"]).finish();
    let got: Vec<String> = out
        .iter()
        .filter_map(|l| l.strip_prefix("MSG "))
        .map(str::to_string)
        .collect();
    let want: Vec<String> = a
        .iter()
        .map(|p| format!("md/a {p} 1"))
        .chain(bb.iter().map(|p| format!("md/b {p} 1")))
        .collect();
    assert_eq!(got, want, "mosquitto_sub output: {out:#?}");
}

#[test]
fn plain_mosquitto_clients_v311_kill9() {
    plain_mosquitto("mqttv311");
}

#[test]
fn plain_mosquitto_clients_v5_kill9() {
    plain_mosquitto("mqttv5");
}

// ------------------------------------------------------------------------------ 2. re-homing

/// A persistent 3.1.1 session with QoS 1 subscriptions, left offline.
fn park_subscriber(b: &TestBroker, id: &str, filters: &[&str]) {
    let (mut c, present) = RawClient::connect(b.addr, &ConnectOpts::v311(id, false));
    assert!(!present, "{id}: new session");
    let f: Vec<(&str, QoS)> = filters.iter().map(|f| (*f, QoS::AtLeastOnce)).collect();
    c.sub(&f);
    c.disconnect();
}

/// Publishes `payloads` at QoS 1 to `topic`, each PUBACKed, from a clean client.
fn publish_all(b: &TestBroker, id: &str, topic: &str, payloads: &[String]) {
    let mut p = RawClient::connect_v311(b.addr, id);
    for m in payloads {
        p.publish(topic, m.as_bytes(), QoS::AtLeastOnce, false);
    }
    p.disconnect();
}

/// The topic only `id` subscribes to, for its markers.
fn marker_topic(id: &str) -> String {
    format!("marker/{id}")
}

/// Reconnects a persistent session (Session Present must be 1), receives `want` in order,
/// acknowledging each, and checks that a marker published afterwards (to a topic only this
/// session subscribes to) comes next: nothing else was queued.
fn drain_exactly(b: &TestBroker, id: &str, want: &[String], note: &str) {
    let (mut c, present) = RawClient::connect(b.addr, &ConnectOpts::v311(id, false));
    assert!(present, "{note}: {id} has its session back");
    let got: Vec<String> = want.iter().map(|_| text(&c.recv_publish_ack())).collect();
    assert_eq!(got, want, "{note}: {id}'s queue");
    let marker = format!("marker-{id}");
    publish_all(
        b,
        "marker-pub",
        &marker_topic(id),
        std::slice::from_ref(&marker),
    );
    let p = c.recv_publish_ack();
    assert_eq!(
        text(&p),
        marker,
        "{note}: {id} got something it should not have"
    );
    c.disconnect();
}

/// Sessions written by 2 shards are re-homed when the broker starts with 1 shard (all go to
/// shard 0), and again with 3: queues, subscriptions and Session Present survive both moves.
/// `b` is owned by shard 1 with 2 shards and by shard 2 with 3; `c` by shard 0, then by
/// shard 1.
#[test]
fn sessions_are_rehomed_when_the_shard_count_changes() {
    let a = id_on_shard("rehome-a", 0, 2);
    let bid = (0..)
        .map(|i| format!("rehome-b-{i}"))
        .find(|id| owner(id, 2) == 1 && owner(id, 3) == 2)
        .unwrap();
    let cid = (0..)
        .map(|i| format!("rehome-c-{i}"))
        .find(|id| owner(id, 2) == 0 && owner(id, 3) == 1)
        .unwrap();
    let ids = [&a, &bid, &cid];
    let t = "rehome/t";

    let b = TestBroker::start(2);
    for id in ids {
        park_subscriber(&b, id, &[t, &marker_topic(id)]);
    }
    let first: Vec<String> = (0..6).map(|i| format!("first-{i}")).collect();
    publish_all(&b, "rehome-pub", t, &first);
    let dir = stop_keep_dir(b);

    // 1 shard: every session is owned by shard 0.
    let b = TestBroker::start_in(1, "", dir);
    for id in ids {
        drain_exactly(&b, id, &first, "2 -> 1 shard (SIGTERM)");
    }
    let second: Vec<String> = (0..4).map(|i| format!("second-{i}")).collect();
    publish_all(&b, "rehome-pub", t, &second);
    let dir = b.kill9();

    // 3 shards: b and c move to shards that did not exist before.
    let b = TestBroker::start_in(3, "", dir);
    for id in ids {
        drain_exactly(&b, id, &second, "1 -> 3 shards (kill -9)");
    }
}

/// The retained messages a new subscriber finds on `filter`, sorted: everything that comes
/// before a live marker published after the SUBACK.
fn retained_seen(b: &TestBroker, id: &str, filter: &str) -> Vec<(String, String)> {
    let mut s = RawClient::connect_v311(b.addr, id);
    s.sub(&[(filter, QoS::AtLeastOnce)]);
    let marker_topic = format!("{}marker", filter.trim_end_matches('#'));
    let mut m = RawClient::connect_v311(b.addr, &format!("{id}-marker"));
    m.publish(&marker_topic, b"live", QoS::AtLeastOnce, false);
    let mut got = Vec::new();
    loop {
        let p = s.recv_publish_ack();
        if p.topic.as_str() == marker_topic {
            assert_eq!((text(&p), p.retain), ("live".into(), false));
            break;
        }
        assert!(p.retain, "{p:?} is a retained message");
        got.push((p.topic.as_str().to_string(), text(&p)));
    }
    got.sort();
    m.disconnect();
    s.disconnect();
    got
}

/// Retained messages written with 2 shards (one homed on each) are all there after a
/// restart with 1 shard, and again after one with 3.
#[test]
fn retained_messages_survive_a_shard_count_change() {
    let t0 = topic_on_shard("rr", 0, 2);
    let t1 = topic_on_shard("rr", 1, 2);
    let mut want = vec![
        (t0.clone(), "on-0".to_string()),
        (t1.clone(), "on-1".to_string()),
    ];
    want.sort();
    let b = TestBroker::start(2);
    let mut p = RawClient::connect_v311(b.addr, "rr-pub");
    p.publish(&t0, b"on-0", QoS::AtLeastOnce, true);
    p.publish(&t1, b"on-1", QoS::AtLeastOnce, true);
    p.disconnect();
    let dir = stop_keep_dir(b);

    let b = TestBroker::start_in(1, "", dir);
    assert_eq!(retained_seen(&b, "rr-sub-1", "rr/#"), want, "2 -> 1 shard");
    let dir = stop_keep_dir(b);

    let b = TestBroker::start_in(3, "", dir);
    for shard in 0..3 {
        let id = id_on_shard("rr-sub-3", shard, 3);
        assert_eq!(
            retained_seen(&b, &id, "rr/#"),
            want,
            "1 -> 3 shards, from {shard}"
        );
    }
}

// ------------------------------------------------------------------------------ 3. retained, wills

/// Retained messages published at QoS 1 (PUBACKed: durable) survive a `kill -9`: after the
/// restart, new subscribers on both shards receive both of them, whichever shard is their
/// topic's home.
#[test]
fn retained_messages_survive_kill9() {
    let b = TestBroker::start(2);
    let t0 = topic_on_shard("ret", 0, 2);
    let t1 = topic_on_shard("ret", 1, 2);
    let mut p = RawClient::connect_v311(b.addr, &id_on_shard("ret-pub", 0, 2));
    p.publish(&t0, b"kept-0", QoS::AtLeastOnce, true);
    p.publish(&t1, b"kept-1", QoS::AtLeastOnce, true);
    p.publish(&t1, b"replaced", QoS::AtLeastOnce, true);
    // Replaced and then cleared: must not come back.
    let t2 = topic_on_shard("ret", 1, 2);
    let t2 = format!("{t2}/gone");
    p.publish(&t2, b"cleared", QoS::AtLeastOnce, true);
    p.publish(&t2, b"", QoS::AtLeastOnce, true);
    p.publish(&t1, b"kept-1b", QoS::AtLeastOnce, true);
    p.disconnect();

    let b = interrupt(b, Interrupt::Kill9, "");
    for shard in 0..2 {
        let mut s = RawClient::connect_v311(b.addr, &id_on_shard("ret-sub", shard, 2));
        s.sub(&[("ret/#", QoS::AtLeastOnce)]);
        let mut got: Vec<(String, String, bool)> = (0..2)
            .map(|_| {
                let p = s.recv_publish_ack();
                (p.topic.as_str().to_string(), text(&p), p.retain)
            })
            .collect();
        got.sort();
        let mut want = vec![
            (t0.clone(), "kept-0".to_string(), true),
            (t1.clone(), "kept-1b".to_string(), true),
        ];
        want.sort();
        assert_eq!(got, want, "retained messages seen from shard {shard}");
        // Nothing else is retained: a live message published now is the next one.
        let mut m = RawClient::connect_v311(b.addr, "ret-marker");
        m.publish("ret/marker", b"live", QoS::AtLeastOnce, false);
        let p = s.recv_publish_ack();
        assert_eq!((text(&p), p.retain), ("live".into(), false));
        m.disconnect();
        s.disconnect();
    }
}

/// Makes every write shard `shard` has done so far durable, as an observable event: a QoS 1
/// PUBLISH from a client owned by `shard` to a persistent offline session owned by `shard` is
/// acknowledged only once its queue entry is durable, and one shard's journal is durable
/// in order.
struct Barrier {
    topic: String,
    pub_id: String,
}

impl Barrier {
    fn new(b: &TestBroker, shard: usize) -> Barrier {
        let topic = format!("barrier/{shard}");
        let sub_id = id_on_shard("barrier-sub", shard, b.shards);
        park_subscriber(b, &sub_id, &[&topic]);
        Barrier {
            topic,
            pub_id: id_on_shard("barrier-pub", shard, b.shards),
        }
    }

    fn pass(&self, b: &TestBroker) {
        let mut p = RawClient::connect_v311(b.addr, &self.pub_id);
        p.publish(&self.topic, b"barrier", QoS::AtLeastOnce, false);
        p.disconnect();
    }
}

/// An MQTT 5 connection with a will (QoS 1, `delay_s` Will Delay Interval) and a session
/// expiry of `expiry_s`.
fn connect_with_will(
    b: &TestBroker,
    id: &str,
    (topic, payload): (&str, &str),
    delay_s: u32,
    expiry_s: u32,
) -> RawClient {
    let opts = ConnectOpts::v5(id, false).expiry(expiry_s).will(
        topic,
        payload.as_bytes(),
        QoS::AtLeastOnce,
        false,
    );
    let packet = opts.packet_with(|c| {
        c.will
            .as_mut()
            .expect("will")
            .properties
            .will_delay_interval = Some(delay_s);
    });
    let (c, ack) = RawClient::connect_packet(b.addr, &packet);
    assert_eq!(ack.reason_code, ReasonCode::Success, "CONNACK for {id}");
    c
}

/// A will whose delay (2 s, session expiry 60 s) was running when the broker was killed is
/// published after the restart, no earlier than its delay after the connection was lost, and
/// only once. The subscriber is persistent, owned by the other shard, and connects after the
/// restart (it finds the will queued or receives it live, whichever comes first).
#[test]
fn a_pending_will_delay_resumes_after_kill9() {
    let b = TestBroker::start(2);
    let will_id = id_on_shard("will-w", 0, 2);
    let sub_id = id_on_shard("will-s", 1, 2);
    let topic = "will/w";
    park_subscriber(&b, &sub_id, &[topic]);
    let barrier = Barrier::new(&b, 0);

    let w = connect_with_will(&b, &will_id, (topic, "gone"), 2, 60);
    w.close_and_wait(); // abnormal end: the will waits its delay
    let lost = Instant::now();
    barrier.pass(&b); // shard 0 has stored the session with its pending will
    let before_kill = lost.elapsed();
    let b = interrupt(b, Interrupt::Kill9, "");

    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));
    assert!(present, "the subscriber's session is back");
    let p = s.recv_publish_ack();
    let after = lost.elapsed();
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        (topic, "gone"),
        "the will"
    );
    assert!(
        after >= Duration::from_millis(1900),
        "the will came {after:?} after the connection was lost, before its 2 s delay \
         (the kill was {before_kill:?} after)"
    );
    // Only once: a marker from the will client's shard comes next.
    let mut m = RawClient::connect_v311(b.addr, &id_on_shard("will-marker", 0, 2));
    m.publish(topic, b"marker", QoS::AtLeastOnce, false);
    assert_eq!(text(&s.recv_publish_ack()), "marker", "the will came twice");
    m.disconnect();
    s.disconnect();
}

/// A will published when its delay ran out is gone: a restart (session still alive, expiry
/// 60 s) does not publish it a second time.
#[test]
fn a_will_published_before_a_restart_is_not_published_again() {
    let b = TestBroker::start(2);
    let will_id = id_on_shard("will2-w", 0, 2);
    let sub_id = id_on_shard("will2-s", 1, 2);
    let topic = "will2/w";
    park_subscriber(&b, &sub_id, &[topic]);
    let (mut s, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));

    let w = connect_with_will(&b, &will_id, (topic, "gone"), 1, 60);
    w.close_and_wait();
    assert_eq!(text(&s.recv_publish_ack()), "gone", "the will, after 1 s");
    s.disconnect();
    // Everything shard 0 wrote (the session without its will) is durable; stop cleanly.
    Barrier::new(&b, 0).pass(&b);
    let b = interrupt(b, Interrupt::Restart, "");

    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));
    assert!(present);
    // A wrongly restored will would be due at once (its delay is over), so its timer fires
    // before that of a second will client of the same shard that goes away now with the
    // same delay; both are routed from that shard in timer order, so the second will is
    // what must arrive first.
    let w2 = connect_with_will(&b, &id_on_shard("will2-w2", 0, 2), (topic, "gone-2"), 1, 60);
    w2.close_and_wait();
    assert_eq!(
        text(&s.recv_publish_ack()),
        "gone-2",
        "the first will was published again after the restart"
    );
    s.disconnect();
}

// ------------------------------------------------------------------------------ 4. crash test

/// The crash test (about 10-60 s; bounded by `support::TIMEOUT` per wait). Two shards; a QoS 1
/// subscriber owned by shard 0 and a QoS 2 subscriber (MQTT 5) owned by shard 1, both on
/// `crash/t`, both offline; a raw persistent publisher owned by shard 0 keeps 16 numbered
/// QoS 1 / QoS 2 messages in flight. The broker is SIGKILLed 4-6 times, each after a seeded
/// number of acknowledgements plus a seeded jitter, and started again on the same data
/// directory; the publisher reconnects with its session (Session Present = 1), resends what
/// was not acknowledged (DUP, same packet ids; PUBREL where PUBREC had come) and goes on. At
/// the end it finishes everything in flight and publishes a marker; the subscribers drain.
///
/// Asserted: every PUBACKed QoS 1 message reaches both subscribers at least once; every
/// QoS 2 message whose PUBREC came reaches the QoS 2 subscriber exactly once at QoS 2 (and
/// the QoS 1 subscriber at least once); no QoS 2 message is delivered twice at QoS 2.
#[test]
fn crash_test_acknowledged_messages_survive_sigkill() {
    let seed = support::crash::seed("crash test");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let b = TestBroker::start(2);
    let sub1 = ConnectOpts::v311(&id_on_shard("crash-q1", 0, 2), false);
    let sub2 = ConnectOpts::v5(&id_on_shard("crash-q2", 1, 2), false).expiry(EXPIRY_S);
    {
        let (mut c, _) = RawClient::connect(b.addr, &sub1);
        c.sub(&[(CRASH_TOPIC, QoS::AtLeastOnce)]);
        c.disconnect();
        let (mut c, _) = RawClient::connect_v5(b.addr, &sub2);
        c.sub(&[(CRASH_TOPIC, QoS::ExactlyOnce)]);
        c.disconnect();
    }

    let mut publ = CrashPublisher::new(id_on_shard("crash-pub", 0, 2));
    let kills = rng.range(4, 6);
    let mut node = OneNode {
        broker: Some(b),
        dir: None,
    };
    let kill_log = publish_through_crashes(&mut publ, &mut rng, kills, &mut node);
    let b = node.broker.take().unwrap();
    let published_at = started.elapsed();

    let got1 = crash_drain(b.addr, &sub1, "END");
    let got2 = crash_drain(b.addr, &sub2, "END");
    verify_crash(
        &publ,
        seed,
        kills,
        &kill_log,
        &got1,
        &got2,
        published_at,
        started,
    );
}

/// The crash test's broker: two shards, killed and started again on its directory.
struct OneNode {
    broker: Option<TestBroker>,
    dir: Option<tempfile::TempDir>,
}

impl CrashTarget for OneNode {
    fn addr(&self) -> SocketAddr {
        self.broker.as_ref().unwrap().addr
    }
    fn kill(&mut self) {
        self.dir = Some(self.broker.take().unwrap().kill9());
    }
    fn restart(&mut self) {
        self.broker = Some(TestBroker::start_in(2, "", self.dir.take().unwrap()));
    }
}

// ------------------------------------------------------------------------------ 5. modes

/// A QoS 2 PUBLISH sent again (DUP, same packet id) while the broker still holds the first
/// PUBREC (the copy for an offline persistent session on the other shard is not durable
/// yet) is not acknowledged ahead of it: PUBRECs come in the order of the PUBLISHes
/// (MQTT-4.6.0-3), so the resend's PUBREC cannot vouch for data that is not stored. And the
/// message is delivered once. (MQTT 3.1.1 does not forbid resending on the same connection;
/// clients with a retry interval do it.) The three PUBLISHes go out in one write, so the
/// broker reads them before any fsync or cross-shard answer can complete.
#[test]
fn a_qos2_resend_is_not_acknowledged_before_the_original_is_stored() {
    let b = TestBroker::start(2);
    let sub = id_on_shard("dup-sub", 1, 2);
    park_subscriber(&b, &sub, &["dup/t", &marker_topic(&sub)]);
    let (mut p, _) = RawClient::connect(
        b.addr,
        &ConnectOpts::v311(&id_on_shard("dup-pub", 0, 2), false),
    );
    let mut bytes = bytes::BytesMut::new();
    for (payload, pid, dup) in [("A", 1, false), ("B", 2, false), ("A", 1, true)] {
        publish_packet(
            "dup/t",
            payload.as_bytes(),
            QoS::ExactlyOnce,
            false,
            Some(pid),
            dup,
        )
        .encode(p.version, &mut bytes)
        .expect("encode");
    }
    p.send_bytes(&bytes);
    let recs: Vec<u16> = (0..3)
        .map(|_| match p.recv() {
            Packet::PubRec(a) => a.packet_id.get(),
            other => panic!("expected PUBREC, got {other:?}"),
        })
        .collect();
    assert_eq!(recs, vec![1, 2, 1], "PUBRECs in the order of the PUBLISHes");
    for pid in [1, 2] {
        p.send(&Packet::PubRel(Ack::new(support::raw::pid(pid))));
        p.recv_matching(
            "PUBCOMP",
            |x| matches!(x, Packet::PubComp(a) if a.packet_id.get() == pid),
        );
    }
    p.disconnect();
    drain_exactly(
        &b,
        &sub,
        &["A".to_string(), "B".to_string()],
        "QoS 2 resend",
    );
}

/// `durability = "durable"`: the PUBACK of a message for an offline persistent subscriber
/// arrives (after the fsync), and what it acknowledged survives a `kill -9`.
#[test]
fn durable_mode_acknowledges_stored_messages() {
    let toml = "[storage]\ndurability = \"durable\"\n";
    let b = TestBroker::start_with(2, toml);
    let sub = id_on_shard("durable-sub", 1, 2);
    park_subscriber(&b, &sub, &["dm/t"]);
    let mut p = RawClient::connect(
        b.addr,
        &ConnectOpts::v5(&id_on_shard("durable-pub", 0, 2), true),
    )
    .0;
    let rc = p.publish_v5(support::raw::msg("dm/t", b"stored", QoS::AtLeastOnce));
    assert_eq!(rc, Some(ReasonCode::Success), "PUBACK of a stored message");
    let rc = p.publish_v5(support::raw::msg("dm/t", b"stored-2", QoS::ExactlyOnce));
    assert_eq!(rc, Some(ReasonCode::Success), "PUBREC of a stored message");
    drop(p);
    let b = interrupt(b, Interrupt::Kill9, toml);
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub, false));
    assert!(present);
    assert_eq!(text(&s.recv_publish_ack()), "stored");
    assert_eq!(text(&s.recv_publish_ack()), "stored-2");
    s.disconnect();
}

/// `durability = "memory"`: sessions live while the broker runs (queued messages are
/// delivered, Session Present = 1), and a restart loses them (Session Present = 0, nothing
/// delivered), which is the documented behaviour of that mode.
#[test]
fn memory_mode_keeps_sessions_until_a_restart_only() {
    let toml = "[storage]\ndurability = \"memory\"\n";
    let b = TestBroker::start_with(2, toml);
    let sub = id_on_shard("memory-sub", 1, 2);
    park_subscriber(&b, &sub, &["mm/t"]);
    publish_all(&b, "memory-pub", "mm/t", &["one".to_string()]);
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub, false));
    assert!(
        present,
        "memory mode keeps the session while the broker runs"
    );
    assert_eq!(text(&s.recv_publish_ack()), "one");
    s.disconnect();
    publish_all(&b, "memory-pub", "mm/t", &["two".to_string()]);

    let b = interrupt(b, Interrupt::Restart, toml);
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub, false));
    assert!(
        !present,
        "memory mode: the session did not survive the restart"
    );
    // And nothing of it: no subscription, no queue. A message published now is not
    // delivered; a message to a fresh subscription is the next thing that arrives.
    s.sub(&[("mm/marker", QoS::AtLeastOnce)]);
    publish_all(&b, "memory-pub", "mm/t", &["three".to_string()]);
    publish_all(&b, "memory-pub", "mm/marker", &["marker".to_string()]);
    assert_eq!(text(&s.recv_publish_ack()), "marker");
    s.disconnect();
}

/// A shared-subscription message goes from the publisher's shard to the group's home, then to
/// the member's shard: its PUBACK waits for the member's copy too, so every acknowledged
/// message is there after a `kill -9` (3 shards: publisher, member and group home spread).
#[test]
fn shared_subscription_messages_acknowledged_survive_kill9() {
    let b = TestBroker::start(3);
    let member = id_on_shard("sh-member", 2, 3);
    let publisher = id_on_shard("sh-pub", 0, 3);
    let filter = "$share/g/sh/t";
    let (mut m, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&member, false));
    m.subscribe(&[(filter, QoS::AtLeastOnce)]);
    m.disconnect();
    let (mut p, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&publisher, true));
    let sent: Vec<String> = (0..20).map(|i| format!("shared-{i}")).collect();
    for payload in &sent {
        p.publish("sh/t", payload.as_bytes(), QoS::AtLeastOnce, false); // waits for PUBACK
    }
    let dir = b.kill9();
    let b = TestBroker::start_in(3, "", dir);
    let (mut m, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&member, false));
    assert!(present, "the member's session is back");
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let publish = m.recv_publish_ack();
        got.push(String::from_utf8_lossy(&publish.payload).into_owned());
    }
    assert_eq!(got, sent, "every acknowledged message, in order");
}

/// A QoS 2 subscriber's PUBREL comes only once the session's step past PUBREC is durable:
/// the broker killed right after the subscriber got its PUBREL resends the PUBREL after the
/// restart, never the PUBLISH (the subscriber released the id: it would take a PUBLISH for a
/// new message, delivered twice).
#[test]
fn a_pubrel_to_a_subscriber_is_sent_only_once_its_state_is_durable() {
    let b = TestBroker::start(1);
    let opts = ConnectOpts::v311("rel-sub", false);
    {
        let (mut s, _) = RawClient::connect(b.addr, &opts);
        s.sub(&[("rel/t", QoS::ExactlyOnce)]);
        s.disconnect();
    }
    let (mut p, _) = RawClient::connect(b.addr, &ConnectOpts::v311("rel-pub", true));
    p.publish("rel/t", b"once", QoS::ExactlyOnce, false);
    p.disconnect();
    let (mut s, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    let pid = match s.recv() {
        Packet::Publish(m) => m.packet_id.expect("QoS 2"),
        other => panic!("expected the PUBLISH, got {other:?}"),
    };
    s.send(&Packet::PubRec(Ack::new(pid)));
    s.recv_matching(
        "PUBREL",
        |x| matches!(x, Packet::PubRel(a) if a.packet_id == pid),
    );
    // Straight after the PUBREL: no time for a later fsync to catch up.
    let dir = b.kill9();
    let b = TestBroker::start_in(1, "", dir);
    let (mut s, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    match s.recv() {
        Packet::PubRel(a) => assert_eq!(a.packet_id, pid),
        other => panic!("after the restart: expected the PUBREL again, got {other:?}"),
    }
    s.send(&Packet::PubComp(Ack::new(pid)));
    s.disconnect();
}
