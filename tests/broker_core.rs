//! The broker core against MQTT 3.1.1, end to end: the real binary, real sockets, several
//! shards. Client ids are chosen with `support::id_on_shard` so that publisher, subscriber,
//! session owner and retained-topic home sit on different shards (and, in the same-shard
//! variants, on one).
//!
//! Clients: rumqttc 0.24 ([`Mq`], its event loop on a shared background runtime), the raw
//! codec client of `support::raw` for byte-level checks (flags, packet ids, return codes,
//! closes), and Debian's `mosquitto_sub` / `mosquitto_pub` for interop.
//!
//! No test sleeps to synchronise. A test waits for the packet, message or close it expects,
//! bounded by `support::TIMEOUT`. Where a test proves that something does NOT arrive, it
//! sends a marker after it along the same path (same publishing shard, same subscriber) and
//! asserts that the marker is what arrives next. Messages from one shard to another keep
//! their order, so anything wrongly delivered would have arrived first.
//!
//! "Path" matters: a message is routed from the shard that owns the publishing client (a
//! will from the shard that owns the will's client) to the shard that owns the subscriber.
//! A marker therefore comes from a client owned by the same shard as the thing it follows.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shardmq::protocol::{Packet, QoS, ReasonCode};
use support::raw::{publish_packet, ConnectOpts, RawClient};
use support::{
    drive_event_loop, id_on_shard, owner, stdout_lines, topic_on_shard, TestBroker, TIMEOUT,
};

// ------------------------------------------------------------------------------ helpers

fn payload(p: &shardmq::protocol::Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// Receives PUBLISHes (acknowledging them) and returns their payloads, `n` of them.
fn recv_payloads(c: &mut RawClient, n: usize) -> Vec<String> {
    (0..n).map(|_| payload(&c.recv_publish_ack())).collect()
}

/// A raw clean 3.1.1 client whose id lands on `shard`.
fn raw_on(b: &TestBroker, prefix: &str, shard: usize) -> RawClient {
    RawClient::connect_v311(b.addr, &id_on_shard(prefix, shard, b.shards))
}

// ---- rumqttc, driven from synchronous tests

fn rq(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

/// A rumqttc 3.1.1 client. Its event loop runs on the background runtime and forwards
/// every incoming packet here; it stops at the first connection error (no reconnects).
struct Mq {
    client: rumqttc::AsyncClient,
    rx: mpsc::Receiver<Result<rumqttc::Packet, String>>,
    stash: VecDeque<rumqttc::Packet>,
    task: tokio::task::JoinHandle<()>,
}

impl Mq {
    fn options(addr: SocketAddr, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(60));
        o
    }

    /// Connects with `opts`; returns the client and the CONNACK's Session Present.
    fn connect_with(opts: rumqttc::MqttOptions) -> (Mq, bool) {
        let (client, el) = rumqttc::AsyncClient::new(opts, 64);
        let (rx, task) = drive_event_loop(el);
        let mut mq = Mq {
            client,
            rx,
            stash: VecDeque::new(),
            task,
        };
        match mq.next() {
            rumqttc::Packet::ConnAck(a) => {
                assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "CONNACK");
                (mq, a.session_present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn connect(addr: SocketAddr, id: &str) -> Mq {
        Mq::connect_with(Mq::options(addr, id)).0
    }

    fn read(&mut self) -> rumqttc::Packet {
        match self.rx.recv_timeout(TIMEOUT) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => panic!("rumqttc connection ended: {e}"),
            Err(e) => panic!("no packet from the broker within {TIMEOUT:?}: {e}"),
        }
    }

    fn next(&mut self) -> rumqttc::Packet {
        match self.stash.pop_front() {
            Some(p) => p,
            None => self.read(),
        }
    }

    /// Waits for a packet satisfying `pick`; others stay stashed, in order.
    fn wait(&mut self, pick: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        if let Some(i) = self.stash.iter().position(&pick) {
            return self.stash.remove(i).expect("index found");
        }
        loop {
            let p = self.read();
            if pick(&p) {
                return p;
            }
            self.stash.push_back(p);
        }
    }

    fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .try_subscribe(filter, rq(qos))
            .expect("subscribe request");
        match self.wait(|p| matches!(p, rumqttc::Packet::SubAck(_))) {
            rumqttc::Packet::SubAck(a) => a.return_codes,
            _ => unreachable!(),
        }
    }

    /// Subscribes and asserts the QoS asked for is granted.
    fn sub(&mut self, filter: &str, qos: QoS) {
        let codes = self.subscribe(filter, qos);
        assert_eq!(
            codes,
            vec![rumqttc::SubscribeReasonCode::Success(rq(qos))],
            "SUBACK for {filter}"
        );
    }

    fn unsubscribe(&mut self, filter: &str) {
        self.client
            .try_unsubscribe(filter)
            .expect("unsubscribe request");
        self.wait(|p| matches!(p, rumqttc::Packet::UnsubAck(_)));
    }

    /// Publishes and waits for the end of the QoS flow (PUBACK or PUBCOMP).
    fn publish(&mut self, topic: &str, payload: &str, qos: QoS, retain: bool) {
        self.client
            .try_publish(topic, rq(qos), retain, payload.as_bytes().to_vec())
            .expect("publish request");
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.wait(|p| matches!(p, rumqttc::Packet::PubAck(_)));
            }
            QoS::ExactlyOnce => {
                self.wait(|p| matches!(p, rumqttc::Packet::PubComp(_)));
            }
        }
    }

    /// The next incoming PUBLISH (rumqttc acknowledges it).
    fn recv(&mut self) -> rumqttc::Publish {
        match self.wait(|p| matches!(p, rumqttc::Packet::Publish(_))) {
            rumqttc::Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    fn recv_payload(&mut self) -> String {
        String::from_utf8_lossy(&self.recv().payload).into_owned()
    }

    /// DISCONNECT, then wait until the broker closes the connection.
    fn disconnect(self) {
        self.client.try_disconnect().expect("disconnect request");
        loop {
            match self.rx.recv_timeout(TIMEOUT) {
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the broker did not close after DISCONNECT")
                }
            }
        }
    }
}

impl Drop for Mq {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---- mosquitto_sub / mosquitto_pub

/// A running `mosquitto_sub` that prints each message as `MSG <topic> <payload> <qos> <retain>`.
struct MosqSub {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl MosqSub {
    /// Starts it and waits until the broker has acknowledged its subscription.
    fn start(
        b: &TestBroker,
        version: &str,
        id: &str,
        filter: &str,
        qos: u8,
        count: usize,
    ) -> MosqSub {
        // stdbuf: line-buffered stdout, so that the debug line about the SUBACK is seen
        // when it is printed.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
            .arg(b.port().to_string())
            .args(["-V", version, "-i", id, "-t", filter, "-q"])
            .arg(qos.to_string())
            .args(["-C"])
            .arg(count.to_string())
            .args(["-W"])
            .arg(TIMEOUT.as_secs().to_string())
            .args(["-d", "-F", "MSG %t %p %q %r"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mosquitto_sub (install mosquitto-clients)");
        let lines = stdout_lines(&mut child);
        let mut s = MosqSub { child, lines };
        s.wait_line(|l| l.contains("received SUBACK"));
        s
    }

    fn wait_line(&mut self, pick: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pick(&l) => return l,
                Ok(l) => seen.push(l),
                Err(e) => panic!("mosquitto_sub: {e}; output so far: {seen:#?}"),
            }
        }
    }

    /// The next message line, without the `MSG ` prefix.
    fn recv(&mut self) -> String {
        self.wait_line(|l| l.starts_with("MSG "))
            .trim_start_matches("MSG ")
            .to_string()
    }

    /// Waits for it to exit (after its `-C` count) and checks it succeeded.
    fn finish(mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                assert!(s.success(), "mosquitto_sub exited with {s}");
                return;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub did not exit");
            // Polling a child's exit status; not a synchronisation point.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for MosqSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mosquitto_pub(
    b: &TestBroker,
    version: &str,
    id: &str,
    topic: &str,
    msg: &str,
    qos: u8,
    retain: bool,
) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p"])
        .arg(b.port().to_string())
        .args(["-V", version, "-i", id, "-t", topic, "-m", msg, "-q"])
        .arg(qos.to_string());
    if retain {
        cmd.arg("-r");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("run mosquitto_pub (install mosquitto-clients)");
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------------------------ connections

/// With two shards the kernel spreads connections over both listening sockets, so among
/// many clients some are accepted by the shard that owns their id and some by the other
/// (which hands the socket over). Every one of them must work: subscribe, and receive a
/// message published by a client on the other shard.
#[test]
fn many_clients_work_whichever_shard_accepts_them() {
    let b = TestBroker::start(2);
    let n = 40;
    let mut clients: Vec<(String, RawClient)> = (0..n)
        .map(|i| {
            let id = id_on_shard(&format!("many{i}"), i % 2, 2);
            let mut c = RawClient::connect_v311(b.addr, &id);
            c.sub(&[(&format!("many/{i}"), QoS::AtLeastOnce)]);
            (id, c)
        })
        .collect();
    let mut p0 = raw_on(&b, "many-pub", 0);
    let mut p1 = raw_on(&b, "many-pub", 1);
    for i in 0..n {
        // Always from the shard the subscriber is not on.
        let p = if i % 2 == 0 { &mut p1 } else { &mut p0 };
        p.publish(
            &format!("many/{i}"),
            format!("hello {i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
    }
    for (i, (id, c)) in clients.iter_mut().enumerate() {
        let m = c.recv_publish_ack();
        assert_eq!(m.topic.as_str(), format!("many/{i}"), "client {id}");
        assert_eq!(payload(&m), format!("hello {i}"), "client {id}");
    }
    // The same again through rumqttc, concurrently connected.
    let mut mqs: Vec<Mq> = (0..10)
        .map(|i| {
            let mut m = Mq::connect(b.addr, &id_on_shard(&format!("many-mq{i}"), i % 2, 2));
            m.sub(&format!("many-mq/{i}"), QoS::ExactlyOnce);
            m
        })
        .collect();
    for i in 0..10 {
        let p = if i % 2 == 0 { &mut p1 } else { &mut p0 };
        p.publish(&format!("many-mq/{i}"), b"x", QoS::ExactlyOnce, false);
    }
    for (i, m) in mqs.iter_mut().enumerate() {
        let got = m.recv();
        assert_eq!(got.topic, format!("many-mq/{i}"));
        assert_eq!(got.qos, rumqttc::QoS::ExactlyOnce);
    }
}

/// A client that pipelines CONNECT, SUBSCRIBE, PUBLISH and PINGREQ in one write, before
/// any CONNACK: the bytes after CONNECT travel with the hand-off to the owning shard and
/// are served in order there (and on the accepting shard when it owns the id).
#[test]
fn pipelined_packets_after_connect_survive_the_hand_off() {
    let b = TestBroker::start(2);
    for i in 0..20 {
        let id = id_on_shard(&format!("pipe{i}"), i % 2, 2);
        let topic = format!("pipe/{i}");
        let mut bytes = bytes::BytesMut::new();
        for p in [
            ConnectOpts::v311(&id, true).packet(),
            Packet::Subscribe(shardmq::protocol::Subscribe {
                packet_id: support::raw::pid(1),
                properties: Default::default(),
                filters: vec![(
                    support::raw::filter(&topic),
                    shardmq::protocol::SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                )],
            }),
            publish_packet(
                &topic,
                b"to myself",
                QoS::AtLeastOnce,
                false,
                Some(2),
                false,
            ),
            Packet::PingReq,
        ] {
            p.encode(support::raw::V311, &mut bytes).expect("encode");
        }
        let mut c = RawClient::tcp(b.addr);
        c.send_bytes(&bytes);
        assert!(matches!(c.recv(), Packet::ConnAck(a) if a.reason_code == ReasonCode::Success));
        // Then SUBACK, PUBLISH, PUBACK and PINGRESP; the server may send a matching PUBLISH
        // before the SUBACK (3.8.4), and nothing orders SUBACK against PINGRESP.
        let mut got: Vec<u8> = Vec::new();
        for _ in 0..4 {
            let p = c.recv();
            if let Packet::Publish(m) = &p {
                assert_eq!(payload(m), "to myself");
            }
            got.push(p.packet_type());
        }
        got.sort();
        assert_eq!(
            got,
            [3, 4, 9, 13],
            "PUBLISH, PUBACK, SUBACK, PINGRESP for {id}"
        );
    }
}

/// 3.1.1 client id "" with Clean Session 1 is accepted and usable; with Clean Session 0 it
/// is refused with CONNACK return code 0x02 and the connection is closed (MQTT-3.1.3-7/8).
#[test]
fn empty_client_id_rules() {
    let b = TestBroker::start(2);
    let (mut c, ack) = RawClient::connect_raw(b.addr, &ConnectOpts::v311("", true));
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert!(!ack.session_present);
    c.sub(&[("empty/id", QoS::AtLeastOnce)]);
    c.publish("empty/id", b"to myself", QoS::AtLeastOnce, false);
    assert_eq!(payload(&c.recv_publish_ack()), "to myself");

    let mut r = RawClient::tcp(b.addr);
    r.send(&ConnectOpts::v311("", false).packet());
    let (p, bytes) = r.recv_frame();
    assert!(matches!(p, Packet::ConnAck(_)), "{p:?}");
    assert_eq!(
        &bytes[..],
        &[0x20, 0x02, 0x00, 0x02],
        "CONNACK identifier rejected"
    );
    assert!(r.expect_closed().is_empty());
}

/// A second CONNECT on a connection is a protocol violation: the broker closes the
/// connection without answering it (MQTT-3.1.0-2). Other clients are unaffected.
#[test]
fn second_connect_closes_the_connection() {
    let b = TestBroker::start(2);
    for shard in 0..2 {
        let id = id_on_shard("twice", shard, 2);
        let (mut c, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, true));
        c.send(&ConnectOpts::v311(&id, true).packet());
        let got = c.expect_closed();
        assert!(got.is_empty(), "no answer to a second CONNECT: {got:?}");
    }
    let mut ok = raw_on(&b, "after-twice", 1);
    ok.sub(&[("twice/ok", QoS::AtMostOnce)]);
    ok.publish("twice/ok", b"fine", QoS::AtMostOnce, false);
    assert_eq!(payload(&ok.recv_publish()), "fine");
}

/// A CONNECT with a wrong protocol name is refused by closing; an unknown level gets
/// CONNACK 0x01 first (3.1.2.1, 3.1.2.2).
#[test]
fn bad_protocol_name_or_level_is_refused() {
    let b = TestBroker::start(2);
    // "hj" instead of "MQTT", level 4, clean, keep alive 0, client id "x".
    let mut c = RawClient::tcp(b.addr);
    c.send_bytes(&[
        0x10, 0x0b, 0x00, 0x02, b'h', b'j', 0x04, 0x02, 0x00, 0x00, 0x00, 0x01, b'x',
    ]);
    let got = c.expect_closed();
    assert!(
        !got.iter()
            .any(|p| matches!(p, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success)),
        "{got:?}"
    );
    // "MQTT" level 6.
    let mut c = RawClient::tcp(b.addr);
    c.send_bytes(&[
        0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x00, 0x00, 0x01, b'x',
    ]);
    let (_, bytes) = c.recv_frame();
    assert_eq!(&bytes[..], &[0x20, 0x02, 0x00, 0x01]);
    c.expect_closed();
}

/// A socket that never sends CONNECT is closed after `limits.connect_timeout_s`.
#[test]
fn connect_timeout_closes_a_silent_socket() {
    let b = TestBroker::start_with(2, "[limits]\nconnect_timeout_s = 1\n");
    let started = Instant::now();
    let mut silent = RawClient::tcp(b.addr);
    let mut partial = RawClient::tcp(b.addr);
    // Half a CONNECT is no better than none.
    partial.send_bytes(&[0x10, 0x0d, 0x00, 0x04, b'M']);
    assert!(silent.expect_closed().is_empty());
    assert!(partial.expect_closed().is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    // The broker still serves.
    let mut c = raw_on(&b, "after-timeout", 0);
    c.ping();
}

/// Keep alive 1 s and silence: the broker closes the connection after 1.5 s
/// (MQTT-3.1.2-24) and publishes the will to a subscriber on another shard.
#[test]
fn keep_alive_expiry_drops_the_client_and_publishes_its_will() {
    let b = TestBroker::start(3);
    let mut watcher = raw_on(&b, "ka-watch", 2);
    watcher.sub(&[("ka/will", QoS::AtLeastOnce)]);
    let id = id_on_shard("ka-client", 0, 3);
    let opts = ConnectOpts::v311(&id, true).keep_alive(1).will(
        "ka/will",
        b"gone quiet",
        QoS::AtLeastOnce,
        false,
    );
    let (mut quiet, _) = RawClient::connect(b.addr, &opts);
    let started = Instant::now();
    let will = watcher.recv_publish_ack();
    assert_eq!(payload(&will), "gone quiet");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    assert!(!will.retain);
    assert!(quiet.expect_closed().is_empty(), "3.1.1 gets no DISCONNECT");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "dropped too early: {:?}",
        started.elapsed()
    );
}

/// A malformed packet closes only the connection that sent it; the will of that client is
/// published (the server closed it for a protocol error, MQTT-3.1.2-8), and other clients
/// keep working.
#[test]
fn malformed_packet_closes_only_that_connection() {
    let b = TestBroker::start(2);
    let mut bystander = raw_on(&b, "bystander", 1);
    bystander.sub(&[("mal/#", QoS::AtLeastOnce)]);
    let mut other = raw_on(&b, "other", 0);
    let cases: &[(&str, &[u8])] = &[
        ("PUBLISH QoS 3", &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
        (
            "SUBSCRIBE with flags 0",
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        ("packet type 0", &[0x00, 0x00]),
        (
            "wildcard in a PUBLISH topic",
            &[0x30, 0x03, 0x00, 0x01, b'#'],
        ),
        ("AUTH in 3.1.1", &[0xF0, 0x00]),
        (
            "remaining length of 5 bytes",
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        ),
        ("PUBACK too long", &[0x40, 0x03, 0x00, 0x01, 0x00]),
        (
            "invalid UTF-8 topic",
            &[0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, b'x'],
        ),
        ("SUBSCRIBE without filters", &[0x82, 0x02, 0x00, 0x01]),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let id = id_on_shard(&format!("mal{i}"), i % 2, 2);
        let opts = ConnectOpts::v311(&id, true).will(
            &format!("mal/will/{i}"),
            what.as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
        let (mut bad, _) = RawClient::connect(b.addr, &opts);
        bad.send_bytes(bytes);
        let got = bad.expect_closed();
        assert!(got.is_empty(), "{what}: 3.1.1 gets no answer, got {got:?}");
        let will = bystander.recv_publish_ack();
        assert_eq!(will.topic.as_str(), format!("mal/will/{i}"), "{what}");
        // The others are fine.
        other.publish("mal/ok", what.as_bytes(), QoS::AtLeastOnce, false);
        let ok = bystander.recv_publish_ack();
        assert_eq!(
            (ok.topic.as_str(), payload(&ok).as_str()),
            ("mal/ok", *what)
        );
    }
}

// ------------------------------------------------------------------------------ routing

fn qos_flow(b: &TestBroker, a_shard: usize, b_shard: usize) {
    let tag = format!("{a_shard}{b_shard}");
    let mut a = Mq::connect(b.addr, &id_on_shard(&format!("qa{tag}"), a_shard, b.shards));
    let mut c = Mq::connect(b.addr, &id_on_shard(&format!("qb{tag}"), b_shard, b.shards));
    a.sub(&format!("to-a/{tag}"), QoS::ExactlyOnce);
    c.sub(&format!("to-b/{tag}"), QoS::ExactlyOnce);
    for dir in 0..2 {
        let (from, to, topic) = if dir == 0 {
            (&mut a, &mut c, "to-b")
        } else {
            (&mut c, &mut a, "to-a")
        };
        let topic = format!("{topic}/{tag}");
        for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            from.publish(&topic, &format!("qos {}", q as u8), q, false);
        }
        for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let m = to.recv();
            assert_eq!(m.topic, topic);
            assert_eq!(
                String::from_utf8_lossy(&m.payload),
                format!("qos {}", q as u8)
            );
            assert_eq!(m.qos, rq(q), "delivered at the published QoS");
            assert!(!m.retain && !m.dup);
        }
    }
}

/// QoS 0, 1 and 2 between clients on different shards, both directions.
#[test]
fn routing_across_shards_all_qos_both_directions() {
    let b = TestBroker::start(2);
    qos_flow(&b, 0, 1);
}

/// The same between two clients of one shard.
#[test]
fn routing_within_one_shard_all_qos() {
    let b = TestBroker::start(2);
    qos_flow(&b, 1, 1);
    qos_flow(&b, 0, 0);
}

/// A message is delivered at min(published QoS, subscription QoS) (MQTT-3.8.4-6).
#[test]
fn delivery_qos_is_capped_by_the_subscription() {
    let b = TestBroker::start(2);
    let mut s = raw_on(&b, "cap-sub", 1);
    s.sub(&[("cap/0", QoS::AtMostOnce), ("cap/1", QoS::AtLeastOnce)]);
    let mut p = raw_on(&b, "cap-pub", 0);
    p.publish("cap/0", b"a", QoS::ExactlyOnce, false);
    p.publish("cap/1", b"b", QoS::ExactlyOnce, false);
    p.publish("cap/1", b"c", QoS::AtMostOnce, false);
    let got: Vec<(String, QoS)> = (0..3)
        .map(|_| {
            let m = s.recv_publish_ack();
            (payload(&m), m.qos)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), QoS::AtMostOnce),
            ("b".into(), QoS::AtLeastOnce),
            ("c".into(), QoS::AtMostOnce)
        ]
    );
}

/// `+` matches exactly one level (an empty one too), `#` the parent and every level below.
#[test]
fn wildcards_plus_and_hash() {
    let b = TestBroker::start(2);
    let mut s = raw_on(&b, "wild-sub", 0);
    s.sub(&[
        ("sport/+/player1", QoS::AtLeastOnce),
        ("finance/#", QoS::AtLeastOnce),
        ("+", QoS::AtLeastOnce),
        ("end/marker", QoS::AtLeastOnce),
    ]);
    let mut p = raw_on(&b, "wild-pub", 1);
    let topics = [
        ("sport/tennis/player1", true),
        ("sport/tennis/player2", false),
        ("sport//player1", true),
        ("sport/tennis/x/player1", false),
        ("sport/player1", false),
        ("finance", true),
        ("finance/stock/ibm", true),
        ("financex", true), // matched by "+", not by "finance/#"
        ("finance/", true),
        ("/finance", false),
        ("top", true),
        ("top/", false),
    ];
    for (t, _) in topics {
        p.publish(t, t.as_bytes(), QoS::AtLeastOnce, false);
    }
    p.publish("end/marker", b"end", QoS::AtLeastOnce, false);
    let mut want: Vec<&str> = topics.iter().filter(|(_, m)| *m).map(|(t, _)| *t).collect();
    want.push("end/marker");
    let got: Vec<String> = (0..want.len())
        .map(|_| s.recv_publish_ack().topic.as_str().to_string())
        .collect();
    assert_eq!(got, want);
}

/// Topics starting with `$` are not matched by filters starting with a wildcard
/// (MQTT-4.7.2-1), but are by a filter naming them; the publish is still acknowledged and
/// the connection stays open.
#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let b = TestBroker::start(2);
    let mut wild = raw_on(&b, "dollar-wild", 1);
    wild.sub(&[
        ("#", QoS::AtLeastOnce),
        ("+/+", QoS::AtLeastOnce),
        ("+/B", QoS::AtLeastOnce),
        ("+", QoS::AtLeastOnce),
    ]);
    let mut named = raw_on(&b, "dollar-named", 1);
    named.sub(&[("$TopicA/#", QoS::AtLeastOnce), ("$SYS", QoS::AtLeastOnce)]);
    let mut p = raw_on(&b, "dollar-pub", 0);
    p.publish("$TopicA/B", b"dollar", QoS::AtLeastOnce, false);
    p.publish("$SYS", b"sys", QoS::AtLeastOnce, false);
    p.publish("TopicA/B", b"plain", QoS::AtLeastOnce, false);
    let first = wild.recv_publish_ack();
    assert_eq!(
        first.topic.as_str(),
        "TopicA/B",
        "the $ topics must not match"
    );
    assert_eq!(first.qos, QoS::AtLeastOnce);
    let n = named.recv_publish_ack();
    assert_eq!(
        (n.topic.as_str(), payload(&n).as_str()),
        ("$TopicA/B", "dollar")
    );
    let n = named.recv_publish_ack();
    assert_eq!((n.topic.as_str(), payload(&n).as_str()), ("$SYS", "sys"));
    // `wild` got "TopicA/B" once although four of its filters overlap: a marker shows
    // nothing else is pending.
    p.publish("marker", b"m", QoS::AtLeastOnce, false);
    assert_eq!(wild.recv_publish_ack().topic.as_str(), "marker");
}

fn overlapping(b: &TestBroker, sub_shard: usize, pub_shard: usize) {
    let tag = format!("{sub_shard}{pub_shard}");
    let mut s = raw_on(b, &format!("ov-sub{tag}"), sub_shard);
    s.sub(&[
        (&format!("ov{tag}/#"), QoS::ExactlyOnce),
        (&format!("ov{tag}/+"), QoS::AtLeastOnce),
    ]);
    let mut p = raw_on(b, &format!("ov-pub{tag}"), pub_shard);
    p.publish(&format!("ov{tag}/C"), b"two", QoS::ExactlyOnce, false);
    p.publish(&format!("ov{tag}/C"), b"one", QoS::AtLeastOnce, false);
    p.publish(&format!("ov{tag}/C"), b"marker", QoS::AtMostOnce, false);
    let got: Vec<(String, QoS)> = (0..3)
        .map(|_| {
            let m = s.recv_publish_ack();
            (payload(&m), m.qos)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("two".into(), QoS::ExactlyOnce),
            ("one".into(), QoS::AtLeastOnce),
            ("marker".into(), QoS::AtMostOnce),
        ],
        "one copy per message, at the highest matching QoS"
    );
}

/// Overlapping subscriptions of one client: the message is delivered once, at the highest
/// QoS of the matching subscriptions (what the Paho suite accepts, MQTT-3.3.5-1).
#[test]
fn overlapping_subscriptions_deliver_once_at_max_qos() {
    let b = TestBroker::start(2);
    overlapping(&b, 0, 1);
    overlapping(&b, 1, 1);
}

fn unsubscribe_case(b: &TestBroker, sub_shard: usize, pub_shard: usize) {
    let tag = format!("{sub_shard}{pub_shard}");
    let mut s = Mq::connect(
        b.addr,
        &id_on_shard(&format!("un-sub{tag}"), sub_shard, b.shards),
    );
    s.sub(&format!("un{tag}/a"), QoS::AtLeastOnce);
    s.sub(&format!("un{tag}/b"), QoS::AtLeastOnce);
    s.sub(&format!("un{tag}/+/deep"), QoS::AtLeastOnce);
    let mut p = Mq::connect(
        b.addr,
        &id_on_shard(&format!("un-pub{tag}"), pub_shard, b.shards),
    );
    p.publish(&format!("un{tag}/a"), "before", QoS::AtLeastOnce, false);
    assert_eq!(s.recv_payload(), "before");
    s.unsubscribe(&format!("un{tag}/a"));
    s.unsubscribe(&format!("un{tag}/+/deep"));
    // Unsubscribing from a filter never subscribed still gets UNSUBACK (MQTT-3.10.4-5).
    s.unsubscribe(&format!("un{tag}/never"));
    p.publish(&format!("un{tag}/a"), "after", QoS::AtLeastOnce, false);
    p.publish(&format!("un{tag}/x/deep"), "deep", QoS::AtLeastOnce, false);
    p.publish(&format!("un{tag}/b"), "marker", QoS::AtLeastOnce, false);
    let m = s.recv();
    assert_eq!(
        (
            m.topic.as_str(),
            String::from_utf8_lossy(&m.payload).as_ref()
        ),
        (format!("un{tag}/b").as_str(), "marker"),
        "nothing after UNSUBACK on the removed filters"
    );
}

/// UNSUBSCRIBE stops delivery, with the publisher on another shard or the same one.
#[test]
fn unsubscribe_stops_delivery() {
    let b = TestBroker::start(2);
    unsubscribe_case(&b, 0, 1);
    unsubscribe_case(&b, 1, 1);
}

// ------------------------------------------------------------------------------ retained

/// Retained messages with three shards: publisher, topic home and subscribers each on a
/// different shard. Set, replace, delete; delivered on subscribe with RETAIN=1 at
/// min(retained QoS, subscription QoS); a live subscriber gets RETAIN=0 (MQTT-3.3.1-9).
#[test]
fn retained_set_replace_delete_across_shards() {
    let b = TestBroker::start(3);
    let topic = topic_on_shard("ret", 1, 3);
    let mut live = raw_on(&b, "ret-live", 2);
    live.sub(&[(&topic, QoS::ExactlyOnce)]);
    let mut p = raw_on(&b, "ret-pub", 0);

    p.publish(&topic, b"v1", QoS::AtLeastOnce, true);
    let m = live.recv_publish_ack();
    assert_eq!(payload(&m), "v1");
    assert!(
        !m.retain,
        "live forwarding of a retained message has RETAIN=0 in 3.1.1"
    );

    let mut s1 = raw_on(&b, "ret-s1", 2);
    let (first, bytes) = {
        s1.subscribe(&[(&topic, QoS::ExactlyOnce)]);
        s1.recv_frame()
    };
    let Packet::Publish(first) = first else {
        panic!("{first:?}")
    };
    assert_eq!(payload(&first), "v1");
    assert!(first.retain, "RETAIN=1 on subscribe");
    assert_eq!(first.qos, QoS::AtLeastOnce, "the retained QoS");
    assert_eq!(bytes[0], 0x33, "PUBLISH, QoS 1, RETAIN");
    s1.ack(&first);

    p.publish(&topic, b"v2", QoS::ExactlyOnce, true);
    assert_eq!(payload(&live.recv_publish_ack()), "v2");
    let mut s2 = raw_on(&b, "ret-s2", 2);
    s2.sub(&[(&topic, QoS::AtLeastOnce)]);
    let m = s2.recv_publish_ack();
    assert_eq!(payload(&m), "v2", "the replacement, and only it");
    assert!(m.retain);
    assert_eq!(m.qos, QoS::AtLeastOnce, "min(2, 1)");
    p.publish(&topic, b"marker", QoS::AtMostOnce, false);
    assert_eq!(payload(&s2.recv_publish_ack()), "marker");
    assert_eq!(payload(&live.recv_publish_ack()), "marker");

    // An empty retained PUBLISH deletes, and is itself forwarded to the live subscriber.
    p.publish(&topic, b"", QoS::AtLeastOnce, true);
    let m = live.recv_publish_ack();
    assert!(m.payload.is_empty());
    let mut s3 = raw_on(&b, "ret-s3", 2);
    s3.sub(&[(&topic, QoS::AtLeastOnce)]);
    p.publish(&topic, b"marker", QoS::AtLeastOnce, false);
    let m = s3.recv_publish_ack();
    assert_eq!(payload(&m), "marker", "nothing retained any more");
    assert!(!m.retain);
}

/// The retained QoS is kept per topic, and a wildcard subscription gets every retained
/// message it matches (as in the Paho test_retained_messages), each topic on its own home.
#[test]
fn retained_messages_keep_their_qos_for_wildcard_subscribers() {
    let b = TestBroker::start(3);
    let mut p = raw_on(&b, "rq-pub", 0);
    let topics: Vec<String> = (0..3).map(|s| topic_on_shard("rq", s, 3)).collect();
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for (t, q) in topics.iter().zip(qos) {
        p.publish(t, t.as_bytes(), q, true);
    }
    // The QoS 0 one has no acknowledgement, but it was sent first: the acknowledgements of
    // the later ones show the publisher's shard handled it.
    for sub_shard in [1, 2] {
        let mut s = raw_on(&b, &format!("rq-sub{sub_shard}"), sub_shard);
        s.sub(&[("rq/+", QoS::ExactlyOnce)]);
        let mut got: Vec<(String, QoS, bool)> = (0..3)
            .map(|_| {
                let m = s.recv_publish_ack();
                (m.topic.as_str().to_string(), m.qos, m.retain)
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, QoS, bool)> = topics
            .iter()
            .zip(qos)
            .map(|(t, q)| (t.clone(), q, true))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }
}

/// A retained message published with QoS 1 and acknowledged is there for a subscriber that
/// subscribes right after, on any shard (MQTT-3.3.1-5: stored for future subscribers).
#[test]
fn retained_message_is_visible_everywhere_once_acknowledged() {
    let b = TestBroker::start(3);
    let mut p = raw_on(&b, "rv-pub", 0);
    for round in 0..20 {
        let topic = topic_on_shard(&format!("rv{round}"), 1, 3);
        p.publish(&topic, b"kept", QoS::AtLeastOnce, true);
        let mut s = raw_on(&b, &format!("rv-sub{round}"), 2);
        s.sub(&[(&topic, QoS::AtLeastOnce)]);
        p.publish(&topic, b"marker", QoS::AtLeastOnce, false);
        let m = s.recv_publish_ack();
        assert_eq!(
            (payload(&m).as_str(), m.retain),
            ("kept", true),
            "round {round}: the retained message must come before the marker"
        );
    }
}

/// Once a retained message has been delivered live to a subscriber on a shard, a new
/// subscription on that shard must get it (MQTT-3.3.1-5/6: stored for future subscribers,
/// sent when a new subscription is established); likewise a deletion (empty retained
/// message) once delivered. Publisher on shard 0, topic home on shard 1, subscribers on
/// shard 2, and a retained will from a client of shard 0.
#[test]
fn retained_message_is_visible_to_subscriptions_made_after_it_was_delivered() {
    let b = TestBroker::start(3);
    let mut p = raw_on(&b, "rd-pub", 0);
    let mut live = raw_on(&b, "rd-live", 2);
    live.sub(&[("rd/+", QoS::AtLeastOnce)]);
    let mut late = raw_on(&b, "rd-late", 2);
    let mut topic = String::new();
    for round in 0..10 {
        topic = (0..)
            .map(|i| format!("rd/{round}x{i}"))
            .find(|t| owner(t, 3) == 1)
            .expect("a topic homed on shard 1");
        p.publish(&topic, b"kept", QoS::AtMostOnce, true);
        assert_eq!(payload(&live.recv_publish_ack()), "kept");
        // `late` subscribes only after the message was delivered on its shard.
        late.sub(&[(&topic, QoS::AtLeastOnce)]);
        p.publish(&topic, b"marker", QoS::AtMostOnce, false);
        let m = late.recv_publish_ack();
        assert_eq!(
            (payload(&m).as_str(), m.retain),
            ("kept", true),
            "round {round}: retained message missing for a subscription made after it was delivered"
        );
        assert_eq!(payload(&late.recv_publish_ack()), "marker");
        assert_eq!(payload(&live.recv_publish_ack()), "marker");
        late.unsubscribe(&[&topic]);
    }
    // Deleted, and the deletion delivered: a new subscription gets nothing.
    p.publish(&topic, b"", QoS::AtMostOnce, true);
    assert!(live.recv_publish_ack().payload.is_empty());
    late.sub(&[(&topic, QoS::AtLeastOnce)]);
    p.publish(&topic, b"marker", QoS::AtMostOnce, false);
    assert_eq!(
        payload(&late.recv_publish_ack()),
        "marker",
        "a deleted retained message was sent after its deletion was delivered"
    );
    // A retained will of a client of shard 0, topic home shard 1.
    let will_topic = topic_on_shard("rd-will", 1, 3);
    let mut watcher = raw_on(&b, "rd-will-watch", 2);
    watcher.sub(&[(&will_topic, QoS::AtLeastOnce)]);
    let id = id_on_shard("rd-will-client", 0, 3);
    let opts = ConnectOpts::v311(&id, true).will(&will_topic, b"so long", QoS::ExactlyOnce, true);
    let (c, _) = RawClient::connect(b.addr, &opts);
    c.drop_abruptly();
    assert_eq!(payload(&watcher.recv_publish_ack()), "so long");
    let mut later = raw_on(&b, "rd-will-later", 2);
    later.sub(&[(&will_topic, QoS::ExactlyOnce)]);
    p.publish(&will_topic, b"marker", QoS::AtMostOnce, false);
    let m = later.recv_publish_ack();
    assert_eq!(
        (payload(&m).as_str(), m.retain, m.qos),
        ("so long", true, QoS::ExactlyOnce),
        "the retained will"
    );
}

// ------------------------------------------------------------------------------ sessions

/// Publishes `msgs` from `publisher` to `topic` and waits until the shard of `probe` has
/// handled all of them: `probe` is an online subscriber on the same shard as the offline
/// session, and both are served by the same delivery of each message.
fn publish_through(
    publisher: &mut RawClient,
    probe: &mut RawClient,
    topic: &str,
    msgs: &[(&str, QoS)],
) {
    for (m, q) in msgs {
        publisher.publish(topic, m.as_bytes(), *q, false);
    }
    let want: Vec<&str> = msgs.iter().map(|(m, _)| *m).collect();
    assert_eq!(recv_payloads(probe, msgs.len()), want, "probe");
}

/// Clean Session 0: while the client is away its session queues QoS 0, 1 and 2 messages
/// (QoS 0 too, by default); on reconnect CONNACK has Session Present 1 and the messages come
/// in order, at their QoS. A clean reconnect then discards the session.
#[test]
fn persistent_session_queues_while_offline_and_delivers_in_order() {
    let b = TestBroker::start(3);
    let id = id_on_shard("persist", 1, 3);
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(!present);
    s.sub(&[("persist/#", QoS::ExactlyOnce)]);
    s.disconnect();

    let mut probe = raw_on(&b, "persist-probe", 1);
    probe.sub(&[("persist/#", QoS::ExactlyOnce)]);
    let mut p = raw_on(&b, "persist-pub", 0);
    let msgs = [
        ("m0", QoS::AtMostOnce),
        ("m1", QoS::AtLeastOnce),
        ("m2", QoS::ExactlyOnce),
        ("m3", QoS::AtLeastOnce),
        ("m4", QoS::AtMostOnce),
        ("m5", QoS::ExactlyOnce),
    ];
    publish_through(&mut p, &mut probe, "persist/x", &msgs);

    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(present, "Session Present 1");
    for (want, q) in msgs {
        let m = s.recv_publish_ack();
        assert_eq!((payload(&m).as_str(), m.qos), (want, q));
        assert!(!m.dup, "first delivery");
    }
    // Still subscribed after the resumption.
    p.publish("persist/x", b"live", QoS::AtLeastOnce, false);
    assert_eq!(payload(&s.recv_publish_ack()), "live");
    s.disconnect();

    // Clean Session 1 discards it: no Session Present, now or on the next resumption.
    let (c, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, true));
    assert!(!present);
    c.disconnect();
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(!present, "the clean connection ended the old session");
    p.publish("persist/x", b"unsubscribed", QoS::AtLeastOnce, false);
    s.sub(&[("persist/marker", QoS::AtLeastOnce)]);
    p.publish("persist/marker", b"marker", QoS::AtLeastOnce, false);
    assert_eq!(payload(&s.recv_publish_ack()), "marker");
}

/// The same with rumqttc (Clean Session 0 on both connections), the publisher on a third
/// shard: Session Present 1 and the queued QoS 1 and 2 messages, in order.
#[test]
fn persistent_session_with_rumqttc() {
    let b = TestBroker::start(3);
    let id = id_on_shard("mq-persist", 2, 3);
    let mut opts = Mq::options(b.addr, &id);
    opts.set_clean_session(false);
    let (mut s, present) = Mq::connect_with(opts.clone());
    assert!(!present);
    s.sub("mq-persist/#", QoS::ExactlyOnce);
    s.disconnect();

    let mut probe = raw_on(&b, "mq-persist-probe", 2);
    probe.sub(&[("mq-persist/#", QoS::ExactlyOnce)]);
    let mut p = raw_on(&b, "mq-persist-pub", 0);
    let msgs = [
        ("a", QoS::AtLeastOnce),
        ("b", QoS::ExactlyOnce),
        ("c", QoS::AtLeastOnce),
    ];
    publish_through(&mut p, &mut probe, "mq-persist/t", &msgs);

    let (mut s, present) = Mq::connect_with(opts);
    assert!(present, "Session Present 1");
    for (want, q) in msgs {
        let m = s.recv();
        assert_eq!(String::from_utf8_lossy(&m.payload), want);
        assert_eq!(m.qos, rq(q));
    }
    s.disconnect();
}

/// An offline persistent session with `queue_qos0_offline = false` queues QoS 1 but not
/// QoS 0.
#[test]
fn offline_qos0_queueing_can_be_turned_off() {
    let b = TestBroker::start_with(2, "[sessions]\nqueue_qos0_offline = false\n");
    let id = id_on_shard("noq0", 1, 2);
    let (mut s, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    s.sub(&[("noq0", QoS::AtLeastOnce)]);
    s.disconnect();
    let mut probe = raw_on(&b, "noq0-probe", 1);
    probe.sub(&[("noq0", QoS::AtLeastOnce)]);
    let mut p = raw_on(&b, "noq0-pub", 0);
    publish_through(
        &mut p,
        &mut probe,
        "noq0",
        &[("zero", QoS::AtMostOnce), ("one", QoS::AtLeastOnce)],
    );
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(present);
    assert_eq!(payload(&s.recv_publish_ack()), "one");
    p.publish("noq0", b"marker", QoS::AtLeastOnce, false);
    assert_eq!(payload(&s.recv_publish_ack()), "marker");
}

/// `limits.queue_messages_max = 5`: an offline session offered 10 messages keeps the first
/// five and refuses the rest (the documented drop policy: the newest is refused).
#[test]
fn full_offline_queue_keeps_the_first_messages() {
    let b = TestBroker::start_with(2, "[limits]\nqueue_messages_max = 5\n");
    let id = id_on_shard("qfull", 1, 2);
    let (mut s, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    s.sub(&[("qfull", QoS::AtLeastOnce)]);
    s.disconnect();
    let mut probe = raw_on(&b, "qfull-probe", 1);
    probe.sub(&[("qfull", QoS::AtLeastOnce)]);
    let mut p = raw_on(&b, "qfull-pub", 0);
    let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    let msgs: Vec<(&str, QoS)> = names
        .iter()
        .map(|n| (n.as_str(), QoS::AtLeastOnce))
        .collect();
    publish_through(&mut p, &mut probe, "qfull", &msgs);

    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(present);
    assert_eq!(recv_payloads(&mut s, 5), ["n0", "n1", "n2", "n3", "n4"]);
    p.publish("qfull", b"marker", QoS::AtLeastOnce, false);
    assert_eq!(
        payload(&s.recv_publish_ack()),
        "marker",
        "exactly five were kept"
    );
}

/// QoS 1 and 2 messages sent but not acknowledged are sent again, with DUP=1 and the same
/// packet ids, when the session resumes (MQTT-4.4.0-1, MQTT-3.3.1-1); a PUBREC'd QoS 2 gets
/// its PUBREL again instead. Once everything is acknowledged nothing more is resent.
#[test]
fn unacknowledged_messages_are_resent_with_dup_on_reconnect() {
    let b = TestBroker::start(2);
    let id = id_on_shard("redeliver", 1, 2);
    let opts = ConnectOpts::v311(&id, false);
    let (mut s, _) = RawClient::connect(b.addr, &opts);
    s.sub(&[("redo/#", QoS::ExactlyOnce)]);
    let mut p = raw_on(&b, "redo-pub", 0);
    p.publish("redo/B", b"q1", QoS::AtLeastOnce, false);
    p.publish("redo/C", b"q2", QoS::ExactlyOnce, false);
    let (m1, b1) = s.recv_frame();
    let (m2, b2) = s.recv_frame();
    let (Packet::Publish(m1), Packet::Publish(m2)) = (m1, m2) else {
        panic!("two PUBLISHes")
    };
    assert_eq!(b1[0], 0x32, "QoS 1, DUP 0");
    assert_eq!(b2[0], 0x34, "QoS 2, DUP 0");
    // Away without acknowledging anything.
    s.close_and_wait();

    let (mut s, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    let (r1, rb1) = s.recv_frame();
    let (r2, rb2) = s.recv_frame();
    let (Packet::Publish(r1), Packet::Publish(r2)) = (r1, r2) else {
        panic!("two PUBLISHes")
    };
    assert_eq!(rb1[0], 0x3A, "QoS 1 resent with DUP 1");
    assert_eq!(rb2[0], 0x3C, "QoS 2 resent with DUP 1");
    assert_eq!((r1.packet_id, payload(&r1)), (m1.packet_id, "q1".into()));
    assert_eq!((r2.packet_id, payload(&r2)), (m2.packet_id, "q2".into()));
    // Acknowledge the QoS 1; PUBREC the QoS 2 and leave before PUBCOMP.
    s.send(&Packet::PubAck(shardmq::protocol::Ack::new(
        r1.packet_id.unwrap(),
    )));
    s.send(&Packet::PubRec(shardmq::protocol::Ack::new(
        r2.packet_id.unwrap(),
    )));
    match s.recv() {
        Packet::PubRel(a) => assert_eq!(Some(a.packet_id), r2.packet_id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    s.close_and_wait();

    let (mut s, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    let (rel, bytes) = s.recv_frame();
    assert!(
        matches!(rel, Packet::PubRel(_)),
        "the PUBREL is resent, not the PUBLISH: {rel:?}"
    );
    assert_eq!(bytes[0], 0x62);
    s.send(&Packet::PubComp(shardmq::protocol::Ack::new(
        r2.packet_id.unwrap(),
    )));
    s.disconnect();

    let (mut s, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    p.publish("redo/marker", b"marker", QoS::AtMostOnce, false);
    assert_eq!(
        payload(&s.recv_publish()),
        "marker",
        "nothing left to resend"
    );
}

/// QoS 2 from a client: a resent PUBLISH (DUP=1, same packet id) before PUBREL is
/// acknowledged but not delivered again, also across a reconnect of a persistent session
/// (MQTT-4.3.3-2); after PUBCOMP the packet id is free for a new message.
#[test]
fn qos2_publish_is_delivered_exactly_once() {
    let b = TestBroker::start(2);
    let mut s = raw_on(&b, "eo-sub", 1);
    s.sub(&[("eo/#", QoS::ExactlyOnce)]);
    let id = id_on_shard("eo-pub", 0, 2);
    let opts = ConnectOpts::v311(&id, false);
    let (mut p, _) = RawClient::connect(b.addr, &opts);

    let first = publish_packet("eo/x", b"once", QoS::ExactlyOnce, false, Some(7), false);
    let again = publish_packet("eo/x", b"once", QoS::ExactlyOnce, false, Some(7), true);
    p.send(&first);
    assert!(matches!(p.recv(), Packet::PubRec(a) if a.packet_id.get() == 7));
    p.send(&again);
    assert!(matches!(p.recv(), Packet::PubRec(a) if a.packet_id.get() == 7));
    p.send(&Packet::PubRel(shardmq::protocol::Ack::new(
        support::raw::pid(7),
    )));
    assert!(matches!(p.recv(), Packet::PubComp(a) if a.packet_id.get() == 7));
    // The id is free again: a new message with it is a new message.
    p.publish("eo/x", b"new", QoS::AtMostOnce, false);
    let reuse = publish_packet(
        "eo/x",
        b"reused id",
        QoS::ExactlyOnce,
        false,
        Some(7),
        false,
    );
    p.send(&reuse);
    assert!(matches!(p.recv(), Packet::PubRec(a) if a.packet_id.get() == 7));
    p.send(&Packet::PubRel(shardmq::protocol::Ack::new(
        support::raw::pid(7),
    )));
    assert!(matches!(p.recv(), Packet::PubComp(_)));

    // Across a reconnect: PUBLISH, PUBREC, connection lost, resent with DUP.
    p.send(&publish_packet(
        "eo/y",
        b"survives",
        QoS::ExactlyOnce,
        false,
        Some(9),
        false,
    ));
    assert!(matches!(p.recv(), Packet::PubRec(a) if a.packet_id.get() == 9));
    p.close_and_wait();
    let (mut p, present) = RawClient::connect(b.addr, &opts);
    assert!(present);
    p.send(&publish_packet(
        "eo/y",
        b"survives",
        QoS::ExactlyOnce,
        false,
        Some(9),
        true,
    ));
    assert!(matches!(p.recv(), Packet::PubRec(a) if a.packet_id.get() == 9));
    p.send(&Packet::PubRel(shardmq::protocol::Ack::new(
        support::raw::pid(9),
    )));
    assert!(matches!(p.recv(), Packet::PubComp(a) if a.packet_id.get() == 9));
    p.publish("eo/marker", b"marker", QoS::AtMostOnce, false);

    assert_eq!(
        recv_payloads(&mut s, 5),
        ["once", "new", "reused id", "survives", "marker"]
    );
}

/// A second connection with the same client id closes the first (MQTT-3.1.4-2); in 3.1.1
/// the first connection's will is published, here to a subscriber on a third shard. The
/// new connection resumes the session.
#[test]
fn session_takeover_closes_the_first_connection_and_publishes_its_will() {
    let b = TestBroker::start(3);
    let mut watcher = raw_on(&b, "to-watch", 2);
    watcher.sub(&[("takeover/#", QoS::AtLeastOnce)]);
    let id = id_on_shard("taken", 0, 3);
    let first_opts =
        ConnectOpts::v311(&id, false).will("takeover/will", b"first", QoS::AtLeastOnce, false);
    let (mut first, _) = RawClient::connect(b.addr, &first_opts);
    first.sub(&[("takeover/data", QoS::AtLeastOnce)]);

    let (mut second, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(present, "the session is resumed");
    let got = first.expect_closed();
    assert!(got.is_empty(), "3.1.1 gets no DISCONNECT: {got:?}");
    let will = watcher.recv_publish_ack();
    assert_eq!(
        (will.topic.as_str(), payload(&will).as_str()),
        ("takeover/will", "first")
    );

    // The subscription came along.
    let mut p = raw_on(&b, "to-pub", 1);
    p.publish("takeover/data", b"for the second", QoS::AtLeastOnce, false);
    assert_eq!(payload(&second.recv_publish_ack()), "for the second");
}

/// The will goes out when the connection is lost, to a subscriber on another shard, at
/// min(will QoS, subscription QoS), with RETAIN=0 even for a retained will (3.1.1 live
/// forwarding). That it is also stored as retained is checked by
/// `retained_message_is_visible_to_subscriptions_made_after_it_was_delivered`.
#[test]
fn will_is_published_on_abnormal_close() {
    let b = TestBroker::start(3);
    let will_topic = topic_on_shard("lastwill", 2, 3);
    let mut watcher = raw_on(&b, "will-watch", 1);
    watcher.sub(&[(&will_topic, QoS::AtLeastOnce)]);
    let id = id_on_shard("will-client", 0, 3);
    let opts = ConnectOpts::v311(&id, true).will(&will_topic, b"so long", QoS::ExactlyOnce, true);
    let (c, _) = RawClient::connect(b.addr, &opts);
    c.drop_abruptly();
    let will = watcher.recv_publish_ack();
    assert_eq!(payload(&will), "so long");
    assert_eq!(will.qos, QoS::AtLeastOnce, "min(2, 1)");
    assert!(!will.retain, "live forwarding");
}

/// A normal DISCONNECT discards the will (MQTT-3.14.4-3). The marker comes from a client of
/// the will client's own shard, after the broker has closed the will client's connection,
/// so a will would have been routed first.
#[test]
fn will_is_not_published_on_normal_disconnect() {
    let b = TestBroker::start(2);
    let mut watcher = raw_on(&b, "nowill-watch", 1);
    watcher.sub(&[("nowill", QoS::AtLeastOnce)]);
    let id = id_on_shard("nowill-client", 0, 2);
    let opts = ConnectOpts::v311(&id, true).will("nowill", b"should not", QoS::AtLeastOnce, false);
    let (c, _) = RawClient::connect(b.addr, &opts);
    c.disconnect();
    let mut marker = raw_on(&b, "nowill-marker", 0);
    marker.publish("nowill", b"marker", QoS::AtLeastOnce, false);
    assert_eq!(payload(&watcher.recv_publish_ack()), "marker");
}

// ------------------------------------------------------------------------------ access

/// `access.subscribe_deny` refuses the filter with SUBACK 0x80 (the Paho test/nosubscribe
/// case) while the other filters of the same SUBSCRIBE are granted, and nothing is
/// delivered through the refused one.
#[test]
fn denied_subscription_gets_suback_0x80() {
    let b = TestBroker::start_with(2, "[access]\nsubscribe_deny = [\"test/nosubscribe\"]\n");
    let mut c = raw_on(&b, "deny", 1);
    c.send(&Packet::Subscribe(shardmq::protocol::Subscribe {
        packet_id: support::raw::pid(0x1234),
        properties: Default::default(),
        filters: vec![
            (
                support::raw::filter("test/nosubscribe"),
                shardmq::protocol::SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            ),
            (
                support::raw::filter("test/ok"),
                shardmq::protocol::SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            ),
        ],
    }));
    let (_, bytes) = c.recv_frame();
    assert_eq!(&bytes[..], &[0x90, 0x04, 0x12, 0x34, 0x80, 0x01]);
    let mut p = raw_on(&b, "deny-pub", 0);
    p.publish("test/nosubscribe", b"no", QoS::AtLeastOnce, false);
    p.publish("test/ok", b"yes", QoS::AtLeastOnce, false);
    assert_eq!(payload(&c.recv_publish_ack()), "yes");
}

// ------------------------------------------------------------------------------ interop

/// mosquitto_sub and mosquitto_pub, MQTT 3.1.1 and 5, with subscriber and publisher on
/// different shards, in every version pairing; and a retained message set by
/// mosquitto_pub and read by mosquitto_sub.
#[test]
fn mosquitto_clients_interoperate_across_shards() {
    let b = TestBroker::start(2);
    for (sub_v, pub_v) in [
        ("mqttv311", "mqttv5"),
        ("mqttv5", "mqttv311"),
        ("mqttv311", "mqttv311"),
        ("mqttv5", "mqttv5"),
    ] {
        let tag = format!("{sub_v}-{pub_v}");
        let sub_id = id_on_shard(&format!("msub-{tag}"), 0, 2);
        let pub_id = id_on_shard(&format!("mpub-{tag}"), 1, 2);
        let topic = format!("interop/{tag}");
        let mut sub = MosqSub::start(&b, sub_v, &sub_id, &topic, 2, 2);
        mosquitto_pub(&b, pub_v, &pub_id, &topic, "hello-1", 1, false);
        mosquitto_pub(&b, pub_v, &pub_id, &topic, "hello-2", 2, false);
        assert_eq!(sub.recv(), format!("{topic} hello-1 1 0"));
        assert_eq!(sub.recv(), format!("{topic} hello-2 2 0"));
        sub.finish();
    }
    // A retained message from mosquitto_pub (QoS 1: acknowledged before it exits).
    let topic = topic_on_shard("interop-ret", 0, 2);
    mosquitto_pub(
        &b,
        "mqttv5",
        &id_on_shard("mpub-ret", 1, 2),
        &topic,
        "kept",
        1,
        true,
    );
    let mut sub = MosqSub::start(&b, "mqttv311", &id_on_shard("msub-ret", 0, 2), &topic, 1, 1);
    assert_eq!(sub.recv(), format!("{topic} kept 1 1"));
    sub.finish();
    // And rumqttc receiving from mosquitto_pub.
    let mut m = Mq::connect(b.addr, &id_on_shard("mq-interop", 1, 2));
    m.sub("interop/rumqttc", QoS::AtLeastOnce);
    mosquitto_pub(
        &b,
        "mqttv311",
        &id_on_shard("mpub-mq", 0, 2),
        "interop/rumqttc",
        "to rumqttc",
        1,
        false,
    );
    assert_eq!(m.recv_payload(), "to rumqttc");
}
