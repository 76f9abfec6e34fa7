//! The crash tests across nodes: a publisher whose session lives on node a keeps QoS 1 and
//! QoS 2 messages in flight to two offline persistent subscribers whose sessions live on
//! nodes b and c; a node is SIGKILLed at seeded moments (set `SHARDMQ_CRASH_SEED` to
//! replay) and started again on its data: the publisher's (a QoS 2 message resent after a
//! crash reaches c with its dedup key, and c's session recognises it), or a subscriber's (b:
//! what b had to store and could not is refused, and published again: as a new message
//! after PUBACK/PUBREC 0x80, or resent with DUP after a reconnect when c kept it). Every
//! acknowledged message must be delivered, QoS 2 exactly once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a failure is a test failure"
)]

mod support;

use std::net::SocketAddr;
use std::time::Instant;

use shardmq::protocol::QoS;
use support::cluster::*;
use support::crash::{
    crash_drain, publish_through_crashes, publish_through_remote_crashes, verify_crash,
    CrashPublisher, CrashTarget, Rng, CRASH_TOPIC,
};
use support::etcd::Etcd;
use support::raw::{ConnectOpts, RawClient};
use support::TestBroker;

/// A node, killed and started again on its directory.
struct NodeA<'a> {
    id: &'static str,
    broker: Option<TestBroker>,
    dir: Option<tempfile::TempDir>,
    etcd: &'a Etcd,
    prefix: &'a str,
}

impl CrashTarget for NodeA<'_> {
    fn addr(&self) -> SocketAddr {
        self.broker.as_ref().unwrap().addr
    }
    fn kill(&mut self) {
        self.dir = Some(self.broker.take().unwrap().kill9());
    }
    fn restart(&mut self) {
        // Ready once its old record has expired, it has joined again and every other
        // node's subscriptions have reached it.
        self.broker = Some(TestBroker::start_in(
            1,
            &node_toml_ttl(self.id, self.etcd, self.prefix, 4),
            self.dir.take().unwrap(),
        ));
    }
}

#[test]
fn acknowledged_messages_survive_kill9_of_the_publishers_node() {
    let seed = support::crash::seed("cluster crash test");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-crash-{}", std::process::id());
    let a = TestBroker::start_with(1, &node_toml_ttl("a", &etcd, &p, 4));
    let b = TestBroker::start_with(1, &node_toml_ttl("b", &etcd, &p, 6));
    let c = TestBroker::start_with(1, &node_toml_ttl("c", &etcd, &p, 6));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);

    let sub1 = ConnectOpts::v311(&id_owned_by(&etcd, &p, "b", "crash-q1"), false);
    let sub2 = ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "crash-q2"), false).expiry(3600);
    {
        let (mut s, _) = RawClient::connect_served(b.addr, &sub1);
        s.sub(&[(CRASH_TOPIC, QoS::AtLeastOnce)]);
        s.disconnect();
        let (mut s, _) = RawClient::connect_served(c.addr, &sub2);
        s.sub(&[(CRASH_TOPIC, QoS::ExactlyOnce)]);
        s.disconnect();
    }
    let mut publ = CrashPublisher::new(id_owned_by(&etcd, &p, "a", "crash-pub"));
    let kills = rng.range(2, 3);
    let mut node = NodeA {
        id: "a",
        broker: Some(a),
        dir: None,
        etcd: &etcd,
        prefix: &p,
    };
    let kill_log = publish_through_crashes(&mut publ, &mut rng, kills, &mut node);
    let published_at = started.elapsed();
    let got1 = crash_drain(b.addr, &sub1, "END");
    let got2 = crash_drain(c.addr, &sub2, "END");
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

#[test]
fn acknowledged_messages_survive_kill9_of_a_subscribers_node() {
    let seed = support::crash::seed("cluster crash test (subscriber's node)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-crash-sub-{}", std::process::id());
    let a = TestBroker::start_with(1, &node_toml_ttl("a", &etcd, &p, 6));
    let b = TestBroker::start_with(1, &node_toml_ttl("b", &etcd, &p, 4));
    let c = TestBroker::start_with(1, &node_toml_ttl("c", &etcd, &p, 6));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);

    let sub1 = ConnectOpts::v311(&id_owned_by(&etcd, &p, "b", "crash-q1"), false);
    let sub2 = ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "crash-q2"), false).expiry(3600);
    {
        let (mut s, _) = RawClient::connect_served(b.addr, &sub1);
        s.sub(&[(CRASH_TOPIC, QoS::AtLeastOnce)]);
        s.disconnect();
        let (mut s, _) = RawClient::connect_served(c.addr, &sub2);
        s.sub(&[(CRASH_TOPIC, QoS::ExactlyOnce)]);
        s.disconnect();
    }
    let mut publ = CrashPublisher::new(id_owned_by(&etcd, &p, "a", "crash-pub"));
    let kills = rng.range(2, 3);
    let mut node = NodeA {
        id: "b",
        broker: Some(b),
        dir: None,
        etcd: &etcd,
        prefix: &p,
    };
    let kill_log = publish_through_remote_crashes(&mut publ, &mut rng, kills, a.addr, &mut node);
    eprintln!(
        "{} messages published again after a refusal, {} reconnects after a close",
        publ.republished, publ.reconnects
    );
    let published_at = started.elapsed();
    let b = node.broker.take().unwrap();
    let got1 = crash_drain(b.addr, &sub1, "END");
    let got2 = crash_drain(c.addr, &sub2, "END");
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
