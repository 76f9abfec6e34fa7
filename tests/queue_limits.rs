//! No silent drops: what happens to messages for persistent sessions whose queue, or the
//! broker's disk budget, is full. Over real sockets against the real binary:
//!
//! - at the default limits an offline 3.1.1 session keeps 30,000 QoS 1 messages, every one
//!   of which arrives when it comes back;
//! - with `limits.queue_messages_max = 100`, an MQTT 5 publisher hears 0x97 for each of the
//!   50 messages the offline session refused; the log names the session once when its queue
//!   becomes full and once when it takes messages again; the admin API counts the 50 drops,
//!   before and after a restart;
//! - the broker-wide budget (`storage.queued_bytes_max`) refuses, on every shard, what a
//!   persistent session would queue (MQTT 5: 0x97; 3.1.1: no PUBACK, the connection closed),
//!   and takes messages again once the queues drain.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::time::Instant;

use bytes::BytesMut;
use shardmq::protocol::{Ack, Packet, ProtocolVersion, QoS, ReasonCode};
use support::raw::{msg, publish_packet, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const SHARDS: usize = 2;

/// Publishes `n` QoS 1 messages `0..n` (payload: the number) to `topic`, keeping up to
/// `window` unacknowledged, and returns the reason code of every PUBACK, by message.
fn publish_pipelined(c: &mut RawClient, topic: &str, n: usize, window: usize) -> Vec<ReasonCode> {
    let mut codes = vec![None; n];
    let (mut sent, mut acked) = (0usize, 0usize);
    let mut batch = BytesMut::new();
    let deadline = Instant::now() + TIMEOUT * 6;
    while acked < n {
        while sent < n && sent - acked < window {
            // Packet ids 1..=window, reused once acknowledged (PUBACKs come in order).
            let id = (sent % window) as u16 + 1;
            let p = publish_packet(
                topic,
                sent.to_string().as_bytes(),
                QoS::AtLeastOnce,
                false,
                Some(id),
                false,
            );
            p.encode(c.version, &mut batch).expect("encode");
            sent += 1;
        }
        if !batch.is_empty() {
            c.send_bytes(&batch);
            batch.clear();
        }
        match c.read_frame_until(deadline) {
            Ok((Packet::PubAck(a), _)) => {
                let expect = (acked % window) as u16 + 1;
                assert_eq!(a.packet_id.get(), expect, "PUBACKs in order");
                codes[acked] = Some(a.reason_code);
                acked += 1;
            }
            Ok((other, _)) => panic!("expected PUBACK, got {other:?}"),
            Err(e) => panic!("after {acked} of {n} PUBACKs: {e:?}"),
        }
    }
    codes
        .into_iter()
        .map(|c| c.expect("every PUBACK"))
        .collect()
}

/// Receives `n` QoS 1 PUBLISHes, acknowledging each, and returns their payloads.
fn receive_all(c: &mut RawClient, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut acks = BytesMut::new();
    while out.len() < n {
        let p = c.recv_publish();
        if let Some(id) = p.packet_id {
            Packet::PubAck(Ack::new(id))
                .encode(c.version, &mut acks)
                .expect("encode");
        }
        out.push(String::from_utf8_lossy(&p.payload).into_owned());
        // One write per 64 acknowledgements: the broker refills its window as they come.
        if out.len() % 64 == 0 || out.len() == n {
            c.send_bytes(&acks);
            acks.clear();
        }
    }
    out
}

/// An offline persistent session on `shard`, subscribed to `topic` at QoS 1.
fn offline_subscriber(b: &TestBroker, opts: &ConnectOpts, topic: &str) {
    let (mut c, _) = match opts.version {
        ProtocolVersion::V5 => {
            let (c, ack) = RawClient::connect_v5(b.addr, opts);
            assert_eq!(ack.reason_code, ReasonCode::Success);
            (c, ack.session_present)
        }
        _ => RawClient::connect(b.addr, opts),
    };
    c.sub(&[(topic, QoS::AtLeastOnce)]);
    c.disconnect();
}

fn v5_persistent(id: &str) -> ConnectOpts {
    ConnectOpts::v5(id, false).expiry(3600)
}

/// The shipped defaults keep what a device offline for a while is sent: 30,000 QoS 1
/// messages from a 3.1.1 publisher, every one acknowledged and, after a `kill -9` and a
/// restart of the broker, every one delivered, in order, when the session comes back. (The
/// full size, a day at 10 messages/s, is measured in `perf/results/`.)
#[test]
fn thirty_thousand_messages_for_an_offline_session_all_arrive_at_the_defaults() {
    const N: usize = 30_000;
    let b = TestBroker::start(SHARDS);
    let id = id_on_shard("q30k-sub", 1, SHARDS);
    offline_subscriber(&b, &ConnectOpts::v311(&id, false), "q30k/t");

    let mut p = RawClient::connect_v311(b.addr, &id_on_shard("q30k-pub", 0, SHARDS));
    let codes = publish_pipelined(&mut p, "q30k/t", N, 256);
    assert!(codes.iter().all(|c| *c == ReasonCode::Success));

    let session = b.admin_json(&format!("/api/sessions/{id}"));
    assert_eq!(session["queued_messages"], N as u64, "{session}");
    assert_eq!(session["dropped"], 0, "{session}");

    // The device is away long enough for the broker to be killed and restarted.
    let b = TestBroker::start_in(SHARDS, "", b.kill9());
    let (mut s, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, false));
    assert!(present);
    let got = receive_all(&mut s, N);
    let expected: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert!(got == expected, "all {N} in order");
    s.ping();
    let session = b.admin_json(&format!("/api/sessions/{id}"));
    assert_eq!(session["queued_messages"], 0, "{session}");
}

/// Log lines of `b` up to and including the first that contains every one of `parts`.
fn log_until(b: &TestBroker, parts: &[&str]) -> Vec<String> {
    let rx = b.log.as_ref().expect("started with start_logged");
    let deadline = Instant::now() + TIMEOUT;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = parts.iter().all(|p| l.contains(p));
                lines.push(l);
                if done {
                    return lines;
                }
            }
            Err(_) => panic!("no log line with {parts:?} within {TIMEOUT:?}; saw {lines:#?}"),
        }
    }
}

/// `queue_messages_max = 100`: an MQTT 5 publisher of 150 messages to a topic whose only
/// subscriber is an offline session hears success for the 100 kept and 0x97 (Quota
/// exceeded) for the 50 refused. The log says so once, naming the session and the limit,
/// and once more when the queue takes messages again, with the count. The admin API counts
/// the 50 drops with the session, before and after a restart.
#[test]
fn a_v5_publisher_hears_quota_exceeded_for_what_a_full_queue_refused() {
    let cfg = "[limits]\nqueue_messages_max = 100\n";
    let b = TestBroker::start_logged(SHARDS, cfg, "warn");
    let id = id_on_shard("qfull5-sub", 1, SHARDS);
    offline_subscriber(&b, &v5_persistent(&id), "qfull5/t");

    let (mut p, ack) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id_on_shard("qfull5-pub", 0, SHARDS), true),
    );
    assert_eq!(ack.reason_code, ReasonCode::Success);
    let codes = publish_pipelined(&mut p, "qfull5/t", 150, 20);
    assert_eq!(codes[..100], [ReasonCode::Success; 100]);
    assert_eq!(codes[100..], [ReasonCode::QuotaExceeded; 50]);

    let session = b.admin_json(&format!("/api/sessions/{id}"));
    assert_eq!(session["dropped"], 50, "{session}");
    assert_eq!(session["dropped_queue_full"], 50, "{session}");
    assert_eq!(session["queue_full"], true, "{session}");
    assert_eq!(session["queued_messages"], 100, "{session}");

    // The subscriber comes back and takes the first hundred.
    let (mut s, ack) = RawClient::connect_v5(b.addr, &v5_persistent(&id));
    assert!(ack.session_present);
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(receive_all(&mut s, 100), expected);
    s.ping();
    s.disconnect();
    // The next message is kept: the queue has room again.
    assert_eq!(
        p.publish_v5(msg("qfull5/t", b"after", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let lines = log_until(&b, &["room again", &id, "dropped=50"]);
    let full: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("session queue full"))
        .collect();
    assert_eq!(
        full.len(),
        1,
        "one line when the queue became full: {lines:#?}"
    );
    assert!(full[0].contains(&id), "{}", full[0]);
    assert!(full[0].contains("queue_messages_max=100"), "{}", full[0]);
    assert!(full[0].contains("reject-newest"), "{}", full[0]);
    assert!(
        !full[0].contains('\x1b'),
        "no colour codes in a piped log: {:?}",
        full[0]
    );

    // The counts are kept with the session across a restart.
    let dir = b.stop_keep_dir();
    let b = TestBroker::start_in(SHARDS, cfg, dir);
    let session = b.admin_json(&format!("/api/sessions/{id}"));
    assert_eq!(session["dropped"], 50, "{session}");
    assert_eq!(session["dropped_queue_full"], 50, "{session}");
    assert_eq!(session["queued_messages"], 1, "{session}");
    // This run's metrics count this run's drops only.
    let (_, metrics) = b.http("GET", "/metrics");
    for line in metrics.lines() {
        if line.starts_with("shardmq_messages_dropped_total{") {
            assert!(line.ends_with(" 0"), "{line}");
        }
    }
}

/// A 3.1.1 publisher cannot be told: the message is acknowledged, the drop is counted and
/// logged. A message that some session kept is a success for an MQTT 5 publisher too.
#[test]
fn a_full_queue_is_counted_for_311_publishers_and_a_message_kept_elsewhere_is_a_success() {
    let b = TestBroker::start_logged(SHARDS, "[limits]\nqueue_messages_max = 2\n", "warn");
    let full = id_on_shard("qmix-full", 1, SHARDS);
    let roomy = id_on_shard("qmix-roomy", 0, SHARDS);
    offline_subscriber(&b, &ConnectOpts::v311(&full, false), "qmix/a");
    offline_subscriber(&b, &ConnectOpts::v311(&roomy, false), "qmix/+");

    let mut p311 = RawClient::connect_v311(b.addr, &id_on_shard("qmix-p3", 0, SHARDS));
    for i in 0..3 {
        p311.publish(
            "qmix/a",
            format!("m{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
        );
    }
    b.wait_log(&["session queue full", &full]);
    let (mut p5, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("qmix-p5", true));
    // `roomy` is full too now (two kept); a third message for both is refused by both.
    assert_eq!(
        p5.publish_v5(msg("qmix/a", b"both-full", QoS::AtLeastOnce)),
        Some(ReasonCode::QuotaExceeded)
    );
    // Room for `roomy` again: one of the two takes it, which is a success.
    let (mut r, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&roomy, false));
    assert!(present);
    assert_eq!(receive_all(&mut r, 2), ["m0", "m1"]);
    r.ping();
    r.disconnect();
    assert_eq!(
        p5.publish_v5(msg("qmix/a", b"one-kept", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let s = b.admin_json(&format!("/api/sessions/{full}"));
    assert_eq!(s["dropped_queue_full"], 3, "{s}");
}

/// `storage.queued_bytes_max` guards the disk for the whole broker: once the sessions of
/// one shard hold it, persistent sessions on every shard refuse what they would queue. An
/// MQTT 5 publisher hears 0x97, a 3.1.1 publisher gets no PUBACK and a closed connection
/// (it resends when it reconnects). Once the queues drain, messages are taken again.
#[test]
fn the_broker_wide_budget_refuses_on_every_shard_and_recovers_when_queues_drain() {
    // Each message costs its payload plus its topic: 1,007 bytes for the big ones.
    let cfg = "[storage]\nqueued_bytes_max = 4000\n";
    let b = TestBroker::start_logged(SHARDS, cfg, "warn");
    let big = id_on_shard("qbud-big", 1, SHARDS);
    let other = id_on_shard("qbud-other", 0, SHARDS);
    offline_subscriber(&b, &v5_persistent(&big), "qbud/bb");
    offline_subscriber(&b, &ConnectOpts::v311(&other, false), "qbud/oo");

    let (mut p5, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("qbud-p5", true));
    let payload = vec![b'x'; 1000];
    for i in 0..4 {
        assert_eq!(
            p5.publish_v5(msg("qbud/bb", &payload, QoS::AtLeastOnce)),
            Some(ReasonCode::Success),
            "message {i} fits"
        );
    }
    // 4,028 bytes queued on shard 1: spent.
    b.wait_log(&["budget for queued data spent"]);
    assert_eq!(
        p5.publish_v5(msg("qbud/bb", &payload, QoS::AtLeastOnce)),
        Some(ReasonCode::QuotaExceeded)
    );
    // A session on the other shard refuses too, even a small message, and QoS 2 as well.
    assert_eq!(
        p5.publish_v5(msg("qbud/oo", b"small", QoS::AtLeastOnce)),
        Some(ReasonCode::QuotaExceeded)
    );
    assert_eq!(
        p5.publish_v5(msg("qbud/oo", b"small", QoS::ExactlyOnce)),
        Some(ReasonCode::QuotaExceeded)
    );
    // 3.1.1: no PUBACK; the connection is closed so that the client resends.
    let mut p3 = RawClient::connect_v311(b.addr, &id_on_shard("qbud-p3", 0, SHARDS));
    p3.send(&publish_packet(
        "qbud/oo",
        b"small",
        QoS::AtLeastOnce,
        false,
        Some(7),
        false,
    ));
    let got = p3.expect_closed();
    assert!(
        !got.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "no PUBACK for a message that was not stored: {got:?}"
    );
    // Online clients with room in their window are served meanwhile.
    let (mut live, _) = RawClient::connect(b.addr, &ConnectOpts::v311("qbud-live", true));
    live.sub(&[("qbud/live", QoS::AtLeastOnce)]);
    assert_eq!(
        p5.publish_v5(msg("qbud/live", b"online", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(&live.recv_publish_ack().payload[..], b"online");

    // The big session drains its queue: room again, on every shard.
    let (mut s, ack) = RawClient::connect_v5(b.addr, &v5_persistent(&big));
    assert!(ack.session_present);
    assert_eq!(receive_all(&mut s, 4).len(), 4);
    s.ping();
    b.wait_log(&["budget for queued data has room again"]);
    let mut p3 = RawClient::connect_v311(b.addr, &id_on_shard("qbud-p3", 0, SHARDS));
    p3.publish("qbud/oo", b"resent", QoS::AtLeastOnce, false);
    assert_eq!(
        p5.publish_v5(msg("qbud/oo", b"later", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let (mut o, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&other, false));
    assert!(present);
    assert_eq!(receive_all(&mut o, 2), ["resent", "later"]);
    let s = b.admin_json(&format!("/api/sessions/{other}"));
    assert_eq!(s["dropped_storage_budget"], 3, "{s}");
    assert_eq!(
        b.metric("shardmq_messages_dropped_total{shard=\"0\",reason=\"storage_budget_full\"}"),
        3.0
    );
}

/// A shared subscription whose picked member has a full queue gives the message to another
/// member with room, instead of dropping it; when no member has room, an MQTT 5 publisher
/// hears 0x97.
#[test]
fn a_shared_message_refused_by_a_full_member_goes_to_another_member() {
    let b = TestBroker::start_with(SHARDS, "[limits]\nqueue_messages_max = 1\n");
    // Both offline: the group's round robin takes `a`, then `m`, then `a` again...
    let a = id_on_shard("qshare-a", 0, SHARDS);
    let m = id_on_shard("qshare-m", 1, SHARDS);
    let filter = "$share/g/qshare/t";
    for id in [&a, &m] {
        let (mut c, _) = RawClient::connect_v5(b.addr, &v5_persistent(id));
        c.subscribe_v5(&[(filter, support::raw::opts(QoS::AtLeastOnce))], None);
        c.disconnect();
    }
    let (mut p, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("qshare-pub", true));
    let mut send = |body: &str| p.publish_v5(msg("qshare/t", body.as_bytes(), QoS::AtLeastOnce));
    assert_eq!(send("one"), Some(ReasonCode::Success)); // to a
    assert_eq!(send("two"), Some(ReasonCode::Success)); // to m
                                                        // Both full: every member refuses it.
    assert_eq!(send("three"), Some(ReasonCode::QuotaExceeded));
    // m takes its message and leaves: room there, while a is still full.
    let (mut c, ack) = RawClient::connect_v5(b.addr, &v5_persistent(&m));
    assert!(ack.session_present);
    assert_eq!(receive_all(&mut c, 1), ["two"]);
    c.ping();
    c.disconnect();
    // The round robin picks a, which is full; the message goes on to m.
    assert_eq!(send("four"), Some(ReasonCode::Success));
    assert_eq!(send("five"), Some(ReasonCode::QuotaExceeded));
    for (id, expected) in [(&a, "one"), (&m, "four")] {
        let (mut c, ack) = RawClient::connect_v5(b.addr, &v5_persistent(id));
        assert!(ack.session_present);
        assert_eq!(receive_all(&mut c, 1), [expected], "{id}");
        c.ping();
    }
}
