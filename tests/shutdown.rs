//! The orderly stop on SIGTERM/SIGINT and the immediate exit on a second signal, with
//! clients connected over real sockets. (A 3.1.1 client's close and a SIGTERM right after
//! start are in `broker_cli`; queued QoS 1 messages of an offline persistent session
//! surviving a SIGTERM restart are the `durability::plain_*_restart` tests.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::time::{Duration, Instant};

use shardmq::protocol::{Packet, Publish, QoS, ReasonCode};
use support::raw::{ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker};

/// The broker's own bound on an orderly stop (`STOP_TIMEOUT` in src/main.rs).
const STOP_BOUND: Duration = Duration::from_secs(20);

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// A persistent MQTT 5 session subscribed to `filter` (QoS 1), left offline.
fn park_subscriber(b: &TestBroker, id: &str, filter: &str) {
    let (mut s, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(id, true).expiry(3600));
    s.subscribe(&[(filter, QoS::AtLeastOnce)]);
    s.disconnect();
}

/// Keeps `b`'s data directory across a stop.
fn take_dir(b: &mut TestBroker) -> tempfile::TempDir {
    std::mem::replace(&mut b.data_dir, tempfile::tempdir().expect("temp dir"))
}

#[test]
fn sigterm_sends_disconnect_0x8b_to_mqtt5_clients_and_exits_0_within_the_bound() {
    let b = TestBroker::start(2);
    let mut clients: Vec<RawClient> = (0..2)
        .map(|shard| {
            let id = id_on_shard("stop-v5", shard, 2);
            RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id, true)).0
        })
        .collect();
    for c in &mut clients {
        c.ping();
    }
    let started = Instant::now();
    b.signal(libc::SIGTERM);
    for c in &mut clients {
        assert_eq!(c.expect_disconnect(), ReasonCode::ServerShuttingDown);
    }
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        started.elapsed() < STOP_BOUND,
        "the stop took {:?}",
        started.elapsed()
    );
}

/// SIGINT is the same orderly stop as SIGTERM.
#[test]
fn sigint_stops_in_order_too() {
    let b = TestBroker::start(1);
    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("sigint-v5", true));
    b.signal(libc::SIGINT);
    assert_eq!(c.expect_disconnect(), ReasonCode::ServerShuttingDown);
    assert_eq!(b.wait().code(), Some(0));
}

/// A client that keeps its socket open after the broker's DISCONNECT holds the orderly stop
/// for a while (the broker lets it read the DISCONNECT); a second signal meanwhile ends the
/// process at once with status 130, and a restart has every acknowledged message.
#[test]
fn a_second_signal_exits_at_once_and_loses_nothing_acknowledged() {
    let mut b = TestBroker::start(2);
    let sub_id = id_on_shard("second-sub", 0, 2);
    park_subscriber(&b, &sub_id, "second/q");
    let (mut p, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id_on_shard("second-pub", 1, 2), true),
    );
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for m in &sent {
        let mut msg = support::raw::msg("second/q", m.as_bytes(), QoS::AtLeastOnce);
        msg.packet_id = None;
        assert_eq!(p.publish_v5(msg), Some(ReasonCode::Success));
    }
    // Still connected when the stop begins, and silent afterwards.
    let (mut holder, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("second-holder", true));
    b.signal(libc::SIGTERM);
    let d = holder.recv_matching("DISCONNECT", |p| matches!(p, Packet::Disconnect(_)));
    assert!(
        matches!(&d, Packet::Disconnect(d) if d.reason_code == ReasonCode::ServerShuttingDown),
        "{d:?}"
    );
    let second = Instant::now();
    b.signal(libc::SIGINT);
    let dir = take_dir(&mut b);
    let status = b.wait();
    assert_eq!(status.code(), Some(130), "exit status {status}");
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "the second signal took {:?} to end the process",
        second.elapsed()
    );
    drop((holder, p));

    let b = TestBroker::start_in(2, "", dir);
    let (mut s, present) =
        RawClient::connect(b.addr, &ConnectOpts::v5(&sub_id, false).expiry(3600));
    assert!(present, "the session is back");
    let got: Vec<String> = sent.iter().map(|_| text(&s.recv_publish_ack())).collect();
    assert_eq!(got, sent, "every acknowledged message, in order");
    s.disconnect();
}

/// No will is published by a stop: a persistent session's will waits out its delay from the
/// stop, after the restart; a clean session's will goes with it (see README, "Stopping").
#[test]
fn a_stop_publishes_no_will_and_a_persistent_sessions_will_resumes_after_the_restart() {
    let mut b = TestBroker::start(2);
    let topic = "stop-will/w";
    // On the will clients' shard: a will published by the stop would be queued for it
    // and stored, locally, before the stop ends.
    let sub_id = id_on_shard("stop-will-sub", 0, 2);
    park_subscriber(&b, &sub_id, topic);

    // A persistent MQTT 5 session with a will delayed 8 s.
    let opts = ConnectOpts::v5(&id_on_shard("stop-will-p", 0, 2), false)
        .expiry(600)
        .will(topic, b"persistent-will", QoS::AtLeastOnce, false);
    let packet = opts.packet_with(|c| {
        c.will
            .as_mut()
            .expect("will")
            .properties
            .will_delay_interval = Some(8);
    });
    let (mut w1, ack) = RawClient::connect_packet(b.addr, &packet);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    // A clean 3.1.1 session with a will (no delay in 3.1.1).
    let (mut w2, _) = RawClient::connect(
        b.addr,
        &ConnectOpts::v311(&id_on_shard("stop-will-c", 0, 2), true).will(
            topic,
            b"clean-will",
            QoS::AtLeastOnce,
            false,
        ),
    );
    w1.ping();
    w2.ping();

    let dir = take_dir(&mut b);
    let stopped = Instant::now();
    b.signal(libc::SIGTERM);
    assert_eq!(w1.expect_disconnect(), ReasonCode::ServerShuttingDown);
    w2.expect_closed();
    assert_eq!(b.wait().code(), Some(0));

    let b = TestBroker::start_in(2, "", dir);
    let (mut s, present) =
        RawClient::connect(b.addr, &ConnectOpts::v5(&sub_id, false).expiry(3600));
    assert!(present);
    let mut p = RawClient::connect_v311(b.addr, &id_on_shard("stop-will-m", 1, 2));
    p.publish(topic, b"marker", QoS::AtLeastOnce, false);
    assert!(
        stopped.elapsed() < Duration::from_secs(8),
        "the restart took too long for this test to tell a will fired at once from one \
         fired after its delay"
    );
    // Had the stop published a will, it would have been queued ahead of the marker.
    assert_eq!(text(&s.recv_publish_ack()), "marker");
    // The persistent session's will, after its delay counted from the stop.
    assert_eq!(text(&s.recv_publish_ack()), "persistent-will");
    assert!(stopped.elapsed() >= Duration::from_secs(8));
    // Nothing else: the clean session's will was not published.
    p.publish(topic, b"marker-2", QoS::AtLeastOnce, false);
    assert_eq!(text(&s.recv_publish_ack()), "marker-2");
    p.disconnect();
    s.disconnect();
}
