//! Sessions move between nodes under live traffic (real etcd, real processes): a node that
//! joins takes a share of the slots, with the sessions in them and their queues, and a
//! node that stops gracefully hands its sessions to the others before it goes. An MQTT 5
//! publisher keeps QoS 1/2 messages in flight to two offline persistent subscribers whose
//! sessions move to the joining node and away from it again when it leaves; every
//! acknowledged message must be delivered, QoS 2 exactly once, and the subscribers find
//! their sessions (Session Present) wherever they connect.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use shardmq::protocol::QoS;
use support::cluster::*;
use support::crash::{
    crash_drain, publish_v5_while, verify_crash, CrashPublisher, Rng, CRASH_TOPIC,
};
use support::etcd::Etcd;
use support::raw::{ConnectOpts, RawClient};
use support::{TestBroker, TIMEOUT};

/// A client id starting with `stem` whose session lives in slot `slot`.
fn id_in_slot(stem: &str, slot: u16) -> String {
    (0..1_000_000)
        .map(|i| format!("{stem}-{i}"))
        .find(|id| shardmq::cluster::slot_of(id.as_bytes()) == slot)
        .unwrap()
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn moved_in(node: &TestBroker) -> f64 {
    node.metric("shardmq_cluster_sessions_moved_in_total{shard=\"0\"}")
}

#[test]
fn sessions_move_to_a_joining_node_and_away_from_a_leaving_one_under_traffic() {
    let seed = support::crash::seed("cluster move test");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-move-{}", std::process::id());
    let a = TestBroker::start_with(1, &node_toml_ttl("a", &etcd, &p, 6));
    let b = TestBroker::start_with(1, &node_toml_ttl("b", &etcd, &p, 6));
    wait_linked(&[&a, &b]);
    wait_balanced(&a, &["a", "b"]);
    // a owns the lower half of the slots and b the upper. A third node is given the top
    // of each half, slots without sessions first: the subscribers' sessions, in a's two
    // highest slots, then move with theirs. The publisher's, low in b's half, stays on b.
    assert_eq!(owner_of(&etcd, &p, &id_in_slot("probe", 2047)), "a");
    assert_eq!(owner_of(&etcd, &p, &id_in_slot("probe", 2048)), "b");
    let sub1 = ConnectOpts::v311(&id_in_slot("move-q1", 2047), false);
    let sub2 = ConnectOpts::v5(&id_in_slot("move-q2", 2046), false).expiry(3600);
    {
        let (mut s, _) = RawClient::connect_served(a.addr, &sub1);
        s.sub(&[(CRASH_TOPIC, QoS::AtLeastOnce)]);
        s.disconnect();
        let (mut s, _) = RawClient::connect_served(b.addr, &sub2);
        s.sub(&[(CRASH_TOPIC, QoS::ExactlyOnce)]);
        s.disconnect();
    }
    let mut publ = CrashPublisher::new(id_in_slot("move-pub", 2100));
    let stop = AtomicBool::new(false);
    let mut log = Vec::new();
    std::thread::scope(|scope| {
        // The publisher stops when this part ends, a failure included.
        let _stop = StopOnDrop(&stop);
        let publisher = scope.spawn(|| {
            publish_v5_while(&mut publ, &mut rng, b.addr, |acks, _| {
                !stop.load(Ordering::Acquire) || acks == 0
            });
        });
        // Join under traffic: c takes a share, the subscribers' sessions with it.
        let c = TestBroker::start_with(1, &node_toml_ttl("c", &etcd, &p, 6));
        wait_linked(&[&a, &b, &c]);
        wait_until("the subscribers' sessions moved to c", 3 * TIMEOUT, || {
            owner_of(&etcd, &p, &sub1.client_id) == "c"
                && owner_of(&etcd, &p, &sub2.client_id) == "c"
        });
        wait_until("c counts them moved in", TIMEOUT, || moved_in(&c) >= 2.0);
        log.push(format!("joined after {:?}", started.elapsed()));
        // Leave under traffic: SIGTERM makes c hand its sessions to a and b first.
        let (in_a, in_b) = (moved_in(&a), moved_in(&b));
        let status = c.stop();
        assert!(status.success(), "c stopped with {status}");
        log.push(format!("left after {:?}", started.elapsed()));
        for s in [&sub1, &sub2] {
            let owner = owner_of(&etcd, &p, &s.client_id);
            assert!(
                owner == "a" || owner == "b",
                "{} is on {owner}",
                s.client_id
            );
        }
        // (The counters reach /metrics with the shards' stats, a moment later.)
        wait_until("a and b took c's sessions", TIMEOUT, || {
            moved_in(&a) + moved_in(&b) >= in_a + in_b + 2.0
        });
        drop(_stop);
        publisher.join().unwrap();
    });
    eprintln!(
        "{} messages published again after a refusal, {} reconnects after a close; {log:?}",
        publ.republished, publ.reconnects
    );
    let published_at = started.elapsed();
    let got1 = crash_drain(a.addr, &sub1, "END");
    let got2 = crash_drain(b.addr, &sub2, "END");
    verify_crash(&publ, seed, 2, &log, &got1, &got2, published_at, started);
}
