//! Messages across cluster nodes (3 nodes, a real 3-member etcd, real sockets): QoS 0/1/2
//! and wildcards from a publisher on one node to subscribers on the others, the SUBACK that
//! makes a following publish on any node find the subscriber, retained messages for a late
//! subscriber on a third node, unsubscribing, and the durable acknowledgement when the
//! node holding a persistent session is dead (never a success for a message not stored).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use shardmq::protocol::{QoS, ReasonCode};
use support::cluster::*;
use support::etcd::Etcd;
use support::raw::{msg, ConnectOpts, RawClient};
use support::{TestBroker, TIMEOUT};

fn prefix(test: &str) -> String {
    format!("/shardmq-msg-{test}-{}", std::process::id())
}

fn v5(node: &TestBroker, id: &str) -> RawClient {
    RawClient::connect(node.addr, &ConnectOpts::v5(id, true)).0
}

#[test]
fn messages_cross_nodes_at_every_qos_and_through_wildcards() {
    let etcd = Etcd::start(3);
    let [a, b, c] = three_nodes(&etcd, &prefix("qos"));
    let mut sub_b = RawClient::connect_v311(b.addr, "sub-b");
    sub_b.sub(&[("t/+/x", QoS::ExactlyOnce)]);
    let mut sub_c = v5(&c, "sub-c");
    sub_c.sub(&[("t/#", QoS::AtLeastOnce)]);
    // Right after the SUBACKs: the publisher's node knows both subscribers.
    let mut p = v5(&a, "pub-a");
    assert_eq!(p.publish_v5(msg("t/1/x", b"q0", QoS::AtMostOnce)), None);
    assert_eq!(
        p.publish_v5(msg("t/1/x", b"q1", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(
        p.publish_v5(msg("t/1/x", b"q2", QoS::ExactlyOnce)),
        Some(ReasonCode::Success)
    );
    // Only c's filter matches this one.
    assert_eq!(
        p.publish_v5(msg("t/2", b"c only", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    for (want, qos) in [
        (&b"q0"[..], QoS::AtMostOnce),
        (b"q1", QoS::AtLeastOnce),
        (b"q2", QoS::ExactlyOnce),
    ] {
        let m = sub_b.recv_publish_ack();
        assert_eq!(
            (&m.payload[..], m.qos, m.topic.as_str()),
            (want, qos, "t/1/x")
        );
    }
    for (want, qos) in [
        (&b"q0"[..], QoS::AtMostOnce),
        (b"q1", QoS::AtLeastOnce),
        (b"q2", QoS::AtLeastOnce),
        (b"c only", QoS::AtLeastOnce),
    ] {
        let m = sub_c.recv_publish_ack();
        assert_eq!((&m.payload[..], m.qos), (want, qos));
    }
    // No match anywhere: MQTT 5 hears 0x10.
    assert_eq!(
        p.publish_v5(msg("nobody/here", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NoMatchingSubscribers)
    );
    // After an UNSUBSCRIBE on b and c, a's node forgets their routes.
    sub_b.unsubscribe(&["t/+/x"]);
    sub_c.unsubscribe(&["t/#"]);
    wait_until("a forgets the routes", TIMEOUT, || {
        p.publish_v5(msg("t/1/x", b"late", QoS::AtLeastOnce))
            == Some(ReasonCode::NoMatchingSubscribers)
    });
    let v = a.admin_json("/api/cluster");
    assert!(
        v["plane"]["messages_forwarded_total"].as_u64().unwrap() >= 4,
        "{v}"
    );
    assert_eq!(v["plane"]["forward_failed_total"], 0, "{v}");
}

#[test]
fn a_retained_message_reaches_a_late_subscriber_on_a_third_node() {
    let etcd = Etcd::start(3);
    let [a, _b, c] = three_nodes(&etcd, &prefix("retained"));
    let mut p = v5(&a, "pub-r");
    let mut m = msg("r/1", b"kept", QoS::AtLeastOnce);
    m.retain = true;
    // Nobody subscribes yet (MQTT 5 says so), but every node has stored it once this
    // answer comes.
    assert_eq!(p.publish_v5(m), Some(ReasonCode::NoMatchingSubscribers));
    // Acknowledged once every node holds it: a subscriber on c gets it at once.
    let mut late = v5(&c, "late");
    late.sub(&[("r/#", QoS::AtLeastOnce)]);
    let got = late.recv_publish_ack();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("r/1", &b"kept"[..])
    );
    assert!(got.retain);
    // An empty retained message deletes it everywhere.
    let mut del = msg("r/1", b"", QoS::AtLeastOnce);
    del.retain = true;
    assert_eq!(p.publish_v5(del), Some(ReasonCode::Success));
    let _ = late.recv_publish_ack();
    let mut later = v5(&c, "later");
    later.sub(&[("r/#", QoS::AtLeastOnce)]);
    later.send(&shardmq::protocol::Packet::PingReq);
    let next = later.recv();
    assert!(
        matches!(next, shardmq::protocol::Packet::PingResp),
        "expected no retained message, got {next:?}"
    );
}

#[test]
fn a_publish_for_a_dead_nodes_persistent_session_is_never_acknowledged_as_success() {
    let etcd = Etcd::start(3);
    let p = prefix("dead");
    let [a, b, c] = three_nodes(&etcd, &p);
    // A persistent session on b, offline, with a subscription.
    let (mut s, _) = RawClient::connect(b.addr, &ConnectOpts::v5("keeper", false).expiry(3600));
    s.sub(&[("d/#", QoS::AtLeastOnce)]);
    drop(s);
    let mut pubr = v5(&a, "pub-d");
    assert_eq!(
        pubr.publish_v5(msg("d/1", b"one", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );

    let dir = b.kill9();
    // While b is gone its session cannot store anything: MQTT 5 hears 0x80...
    assert_eq!(
        pubr.publish_v5(msg("d/2", b"two", QoS::AtLeastOnce)),
        Some(ReasonCode::UnspecifiedError)
    );
    // ...and a 3.1.1 publisher, which cannot be told, is disconnected.
    let mut old = RawClient::connect_v311(c.addr, "pub-311");
    old.send(&support::raw::publish_packet(
        "d/3",
        b"three",
        QoS::AtLeastOnce,
        false,
        Some(1),
        false,
    ));
    let got = old.expect_closed();
    assert!(
        !got.iter()
            .any(|x| matches!(x, shardmq::protocol::Packet::PubAck(_))),
        "{got:?}"
    );

    // b comes back with its disk: its session and route return, and publishes succeed.
    let b = TestBroker::start_in(1, &node_toml("b", &etcd, &p), dir);
    wait_linked(&[&a, &b, &c]);
    assert_eq!(
        pubr.publish_v5(msg("d/4", b"four", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let (mut s, present) =
        RawClient::connect(b.addr, &ConnectOpts::v5("keeper", false).expiry(3600));
    assert!(present);
    let got: Vec<Vec<u8>> = (0..2)
        .map(|_| s.recv_publish_ack().payload.to_vec())
        .collect();
    assert_eq!(got, vec![b"one".to_vec(), b"four".to_vec()]);
    // Nothing else: the refused messages were never stored.
    s.send(&shardmq::protocol::Packet::PingReq);
    assert!(matches!(s.recv(), shardmq::protocol::Packet::PingResp));
    let v = a.admin_json("/api/cluster");
    assert!(
        v["plane"]["forward_failed_total"].as_u64().unwrap() >= 1,
        "{v}"
    );
}
