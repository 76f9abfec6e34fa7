//! Replicated sessions (real etcd, real NATS JetStream, real processes): a node dies with
//! its disk under QoS 1/2 load, and after `cluster.failover_after_s` its sessions are
//! served by another node, rebuilt from its replicated stream, with every acknowledged
//! message (QoS 2 exactly once) and Session Present = 1 wherever the clients reconnect;
//! the node then rejoins with an empty disk and serves nothing stale.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shardmq::protocol::QoS;
use support::cluster::*;
use support::crash::{
    crash_drain, publish_v5_while, verify_crash, CrashPublisher, Rng, CRASH_TOPIC,
};
use support::etcd::Etcd;
use support::nats::Nats;
use support::raw::{ConnectOpts, RawClient};
use support::{TestBroker, TIMEOUT};

fn replicated_toml(id: &str, etcd: &Etcd, nats: &Nats, prefix: &str, ttl_s: u64) -> String {
    format!(
        "{}jetstream = [{}]\nfailover_after_s = {}\n",
        node_toml_ttl(id, etcd, prefix, ttl_s),
        nats.toml_urls(),
        ttl_s + 1
    )
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn a_node_lost_with_its_disk_is_rebuilt_elsewhere_from_its_stream_under_load() {
    let seed = support::crash::seed("replicated sessions test");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-{}", std::process::id());
    let a = TestBroker::start_with(1, &replicated_toml("a", &etcd, &nats, &p, 3));
    let b = TestBroker::start_with(1, &replicated_toml("b", &etcd, &nats, &p, 3));
    let c = TestBroker::start_with(1, &replicated_toml("c", &etcd, &nats, &p, 3));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);
    let view = a.admin_json("/api/cluster");
    assert!(
        view["replication"]["stream"].as_str().is_some(),
        "GET /api/cluster shows the replication: {view}"
    );

    // Both subscribers' sessions live on c, the node that dies; the publisher's on a.
    let sub1 = ConnectOpts::v311(&id_owned_by(&etcd, &p, "c", "rep-q1"), false);
    let sub2 = ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "rep-q2"), false).expiry(3600);
    {
        let (mut s, _) = RawClient::connect_served(c.addr, &sub1);
        s.sub(&[(CRASH_TOPIC, QoS::AtLeastOnce)]);
        s.disconnect();
        let (mut s, _) = RawClient::connect_served(c.addr, &sub2);
        s.sub(&[(CRASH_TOPIC, QoS::ExactlyOnce)]);
        s.disconnect();
    }
    let mut publ = CrashPublisher::new(id_owned_by(&etcd, &p, "a", "rep-pub"));
    let stop = AtomicBool::new(false);
    let mut log = Vec::new();
    let kill_after = rng.range(150, 400);
    let mut c = Some(c);
    let acked = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let publisher = scope.spawn(|| {
            publish_v5_while(&mut publ, &mut rng, a.addr, |acks, _| {
                acked.store(acks, Ordering::Release);
                !stop.load(Ordering::Acquire)
            });
        });
        wait_until("the publisher got acknowledgements", TIMEOUT, || {
            acked.load(Ordering::Acquire) >= kill_after
        });
        // Node and disk gone.
        drop(c.take().unwrap().kill9());
        let killed = Instant::now();
        log.push(format!(
            "c killed with its disk after {:?}",
            started.elapsed()
        ));
        wait_until("c's sessions taken over", 6 * TIMEOUT, || {
            owner_of(&etcd, &p, &sub1.client_id) != "c"
                && owner_of(&etcd, &p, &sub2.client_id) != "c"
        });
        log.push(format!("fail-over {:?} after the kill", killed.elapsed()));
        // More traffic into the rebuilt sessions, then stop.
        let at = acked.load(Ordering::Acquire);
        wait_until("acknowledgements after the fail-over", 3 * TIMEOUT, || {
            acked.load(Ordering::Acquire) >= at + 100
        });
        drop(_stop);
        publisher.join().unwrap();
    });
    eprintln!(
        "{} messages published again after a refusal, {} reconnects after a close; {log:?}",
        publ.republished, publ.reconnects
    );
    let view = a.admin_json("/api/cluster");
    let rebuilt = view["replication"]["sessions_rebuilt_total"]
        .as_u64()
        .unwrap_or(0)
        + b.admin_json("/api/cluster")["replication"]["sessions_rebuilt_total"]
            .as_u64()
            .unwrap_or(0);
    assert!(
        rebuilt >= 2,
        "the sessions were rebuilt from the stream: {view}"
    );
    let published_at = started.elapsed();
    // Drained through b: Session Present = 1 there too (relayed to the new owner).
    let got1 = crash_drain(b.addr, &sub1, "END");
    let got2 = crash_drain(b.addr, &sub2, "END");
    verify_crash(&publ, seed, 1, &log, &got1, &got2, published_at, started);

    // c rejoins with an empty disk: it owns nothing it could serve stale, and what it
    // takes later comes with its sessions.
    let c = TestBroker::start_with(1, &replicated_toml("c", &etcd, &nats, &p, 3));
    wait_linked(&[&a, &b, &c]);
    for s in [&sub1, &sub2] {
        let (mut cl, present) = RawClient::connect_served(c.addr, s);
        assert!(
            present,
            "{}: the session is found through the rejoined node",
            s.client_id
        );
        if let Ok((shardmq::protocol::Packet::Publish(m), _)) =
            cl.read_frame_until(Instant::now() + Duration::from_millis(500))
        {
            panic!("{}: delivered again: {m:?}", s.client_id);
        }
        cl.disconnect();
    }
}
