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
use std::time::Duration;
use support::cluster::*;
use support::etcd::Etcd;
use support::raw::{msg, ConnectOpts, RawClient};
use support::{TestBroker, TIMEOUT};

fn connack_within(addr: std::net::SocketAddr, id: &str, wait: Duration) -> Option<ReasonCode> {
    RawClient::connack_within(addr, &ConnectOpts::v5(id, false).expiry(600), wait)
}

/// Connects once the node serves the client (see `RawClient::connect_served`).
fn connect_when_served(node: &TestBroker, opts: &ConnectOpts) -> (RawClient, bool) {
    RawClient::connect_served(node.addr, opts)
}

fn prefix(test: &str) -> String {
    format!("/shardmq-msg-{test}-{}", std::process::id())
}

fn v5(node: &TestBroker, id: &str) -> RawClient {
    connect_when_served(node, &ConnectOpts::v5(id, true)).0
}

/// Ids served by each node (its sessions live there), for clients that connect to it.
struct Ids<'a> {
    etcd: &'a Etcd,
    prefix: &'a str,
}

impl Ids<'_> {
    fn on(&self, node: &str, stem: &str) -> String {
        id_owned_by(self.etcd, self.prefix, node, stem)
    }
}

#[test]
fn messages_cross_nodes_at_every_qos_and_through_wildcards() {
    let etcd = Etcd::start(3);
    let pre = prefix("qos");
    let [a, b, c] = three_nodes(&etcd, &pre);
    let ids = Ids {
        etcd: &etcd,
        prefix: &pre,
    };
    let mut sub_b = connect_when_served(&b, &ConnectOpts::v311(&ids.on("b", "sub"), true)).0;
    sub_b.sub(&[("t/+/x", QoS::ExactlyOnce)]);
    let mut sub_c = v5(&c, &ids.on("c", "sub"));
    sub_c.sub(&[("t/#", QoS::AtLeastOnce)]);
    // Right after the SUBACKs: the publisher's node knows both subscribers.
    let mut p = v5(&a, &ids.on("a", "pub"));
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
    // The plane's counters are published every 100 ms.
    wait_until("a's plane counted the forwards", TIMEOUT, || {
        let v = a.admin_json("/api/cluster");
        v["plane"]["messages_forwarded_total"].as_u64().unwrap() >= 4
    });
    let v = a.admin_json("/api/cluster");
    assert_eq!(v["plane"]["forward_failed_total"], 0, "{}", v["plane"]);
}

#[test]
fn a_retained_message_reaches_a_late_subscriber_on_a_third_node() {
    let etcd = Etcd::start(3);
    let pre = prefix("retained");
    let [a, _b, c] = three_nodes(&etcd, &pre);
    let ids = Ids {
        etcd: &etcd,
        prefix: &pre,
    };
    let mut p = v5(&a, &ids.on("a", "pub"));
    let mut m = msg("r/1", b"kept", QoS::AtLeastOnce);
    m.retain = true;
    // Nobody subscribes yet (MQTT 5 says so), but every node has stored it once this
    // answer comes.
    assert_eq!(p.publish_v5(m), Some(ReasonCode::NoMatchingSubscribers));
    // Acknowledged once every node holds it: a subscriber on c gets it at once.
    let mut late = v5(&c, &ids.on("c", "late"));
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
    let mut later = v5(&c, &ids.on("c", "later"));
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
    let ids = Ids {
        etcd: &etcd,
        prefix: &p,
    };
    let keeper = ids.on("b", "keeper");
    // A persistent session on b, offline, with a subscription.
    let (mut s, _) = connect_when_served(&b, &ConnectOpts::v5(&keeper, false).expiry(3600));
    s.sub(&[("d/#", QoS::AtLeastOnce)]);
    drop(s);
    let mut pubr = v5(&a, &ids.on("a", "pub"));
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
    let mut old = connect_when_served(&c, &ConnectOpts::v311(&ids.on("c", "pub-311"), true)).0;
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
    let b = TestBroker::start_in(1, &node_toml_ttl("b", &etcd, &p, 6), dir);
    wait_linked(&[&a, &b, &c]);
    assert_eq!(
        pubr.publish_v5(msg("d/4", b"four", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let (mut s, present) = connect_when_served(&b, &ConnectOpts::v5(&keeper, false).expiry(3600));
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

#[test]
fn one_session_per_client_id_wherever_it_connects() {
    let etcd = Etcd::start(3);
    let p = prefix("owner");
    let [a, b, c] = three_nodes(&etcd, &p);
    let ids = Ids {
        etcd: &etcd,
        prefix: &p,
    };
    // A client owned by a connects to b: relayed to a, where its session lives.
    let k = ids.on("a", "roamer");
    let (mut first, present) = connect_when_served(&b, &ConnectOpts::v5(&k, false).expiry(600));
    assert!(!present);
    first.sub(&[("roam/#", QoS::AtLeastOnce)]);
    let v = a.admin_json(&format!("/api/sessions/{k}"));
    assert_eq!(v["online"], true, "{v}");
    let (status, _) = b.http("GET", &format!("/api/sessions/{k}"));
    assert_eq!(status, 404, "the session lives on its owner only");
    // The same id on c: the session is taken over (the old connection hears 0x8E), with
    // its subscription, and Session Present says so.
    let (mut second, present) = connect_when_served(&c, &ConnectOpts::v5(&k, false).expiry(600));
    assert!(present);
    assert_eq!(first.expect_disconnect(), ReasonCode::SessionTakenOver);
    let mut pubr = v5(&c, &ids.on("c", "pub"));
    assert_eq!(
        pubr.publish_v5(msg("roam/1", b"here", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(&second.recv_publish_ack().payload[..], b"here");
    // A client with no id gets one its node serves.
    let (mut anon, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("", true));
    let assigned = ack.properties.assigned_client_identifier.clone().unwrap();
    assert_eq!(owner_of(&etcd, &p, assigned.as_str()), "b");
    anon.send(&shardmq::protocol::Packet::PingReq);
    assert!(matches!(anon.recv(), shardmq::protocol::Packet::PingResp));

    // b's relay listener (where other nodes relay b's clients) serves b's clients and never
    // relays again: a client of a that arrives there is refused, not bounced on.
    let v = a.admin_json("/api/cluster");
    let relay_b: std::net::SocketAddr = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "b")
        .and_then(|m| m["relay"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        !b.ready_line.contains(&relay_b.to_string()),
        "{}",
        b.ready_line
    );
    let wait = Duration::from_secs(5);
    let of_a = ConnectOpts::v5(&ids.on("a", "via-relay"), true);
    assert_eq!(
        RawClient::connack_within(relay_b, &of_a, wait),
        Some(ReasonCode::ServerUnavailable)
    );
    let of_b = ConnectOpts::v5(&ids.on("b", "via-relay"), true);
    assert_eq!(
        RawClient::connack_within(relay_b, &of_b, wait),
        Some(ReasonCode::Success)
    );
}

#[test]
fn a_fenced_node_serves_nothing_and_its_clients_go_elsewhere() {
    let etcd = Etcd::start(3);
    let p = prefix("fence");
    let [a, b, _c] = three_nodes(&etcd, &p);
    let ids = Ids {
        etcd: &etcd,
        prefix: &p,
    };
    let kb = ids.on("b", "held");
    let (mut on_b, _) = connect_when_served(&b, &ConnectOpts::v5(&kb, false).expiry(600));
    on_b.sub(&[("f/#", QoS::AtLeastOnce)]);
    b.signal(libc::SIGSTOP);
    wait_until("a sees b down", TIMEOUT, || member_state(&a, "b") == "down");
    // While b's lease is gone nobody serves its clients: not a, not b. (a may relay one
    // more attempt to the frozen b before its slot map catches up: each try is bounded.)
    wait_until("a refuses b's client", TIMEOUT, || {
        connack_within(a.addr, &kb, Duration::from_secs(2)) == Some(ReasonCode::ServerUnavailable)
    });
    b.signal(libc::SIGCONT);
    // Back, b finds its lease gone: it drops its clients before anything else...
    assert_eq!(on_b.expect_disconnect(), ReasonCode::UseAnotherServer);
    // ...and serves them again once it has rejoined.
    wait_until("b rejoined", TIMEOUT, || {
        b.admin_json("/api/cluster")["state"] == "up" && member_state(&a, "b") == "up"
    });
    wait_until("the client is served again, through a", TIMEOUT, || {
        let (_c, ack) = RawClient::connect_raw(a.addr, &ConnectOpts::v5(&kb, false).expiry(600));
        ack.reason_code == ReasonCode::Success && ack.session_present
    });
}

#[test]
fn a_dead_nodes_slots_fail_over_and_it_drops_their_sessions_when_back() {
    let etcd = Etcd::start(3);
    let p = prefix("failover");
    let token = "a-long-enough-admin-token";
    let toml = |id: &str| {
        format!(
            "{}[admin]\ntoken = \"{token}\"\n",
            node_toml_ttl(id, &etcd, &p, 6)
        )
    };
    let a = TestBroker::start_with(1, &toml("a"));
    let b = TestBroker::start_with(1, &toml("b"));
    let c = TestBroker::start_with(1, &toml("c"));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);
    let k = id_owned_by(&etcd, &p, "c", "moved");
    let (mut s, _) = connect_when_served(&c, &ConnectOpts::v5(&k, false).expiry(3600));
    s.sub(&[("fo/#", QoS::AtLeastOnce)]);
    drop(s);

    let dir = c.kill9();
    wait_until("a sees c down", TIMEOUT, || member_state(&a, "c") == "down");
    let post = |node: &TestBroker, who: &str, auth: Option<&str>| {
        let bearer = auth.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|v| vec![("Authorization", v)])
            .unwrap_or_default();
        node.http_with(
            "POST",
            &format!("/api/cluster/nodes/{who}/failover"),
            &headers,
        )
    };
    assert_eq!(post(&a, "c", None).0, 401);
    assert_eq!(post(&a, "b", Some(token)).0, 409, "b is live");
    assert_eq!(post(&a, "zz", Some(token)).0, 404);
    let (status, body) = post(&a, "c", Some(token));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("slots of c given to a,b"), "{body}");
    assert_ne!(owner_of(&etcd, &p, &k), "c");
    assert_eq!(a.metric("shardmq_cluster_failovers_total{node=\"a\"}"), 1.0);

    // The client's session starts over, empty, at its new owner, reached through any node
    // (once b has the new table: until then nobody serves it).
    let (mut s, present) = connect_when_served(&b, &ConnectOpts::v5(&k, false).expiry(3600));
    assert!(!present);
    s.sub(&[("fo/#", QoS::AtLeastOnce)]);
    let mut pubr = v5(&a, &id_owned_by(&etcd, &p, "a", "pub"));
    assert_eq!(
        pubr.publish_v5(msg("fo/1", b"one", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(&s.recv_publish_ack().payload[..], b"one");

    // c comes back with its disk: it drops the session another node owns now.
    let c = TestBroker::start_in(1, &toml("c"), dir);
    wait_linked(&[&a, &b, &c]);
    wait_until("c dropped its old session", TIMEOUT, || {
        c.http("GET", &format!("/api/sessions/{k}")).0 == 404
    });
    assert_eq!(
        pubr.publish_v5(msg("fo/2", b"two", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(&s.recv_publish_ack().payload[..], b"two");
    s.send(&shardmq::protocol::Packet::PingReq);
    assert!(matches!(s.recv(), shardmq::protocol::Packet::PingResp));
}

#[test]
fn sys_topics_stay_on_their_node_and_name_it() {
    let etcd = Etcd::start(3);
    let p = prefix("sys");
    let toml = |id: &str| format!("{}[sys]\ninterval_s = 1\n", node_toml_ttl(id, &etcd, &p, 6));
    let a = TestBroker::start_with(1, &toml("a"));
    let b = TestBroker::start_with(1, &toml("b"));
    wait_linked(&[&a, &b]);
    wait_balanced(&a, &["a", "b"]);
    let mut s = v5(&b, &id_owned_by(&etcd, &p, "b", "sys"));
    s.sub(&[("$SYS/broker/node", QoS::AtMostOnce)]);
    // Several rounds of both nodes' $SYS publications: b's subscriber hears only b.
    for _ in 0..3 {
        let m = s.recv_publish();
        assert_eq!(&m.payload[..], b"b");
    }
    drop(a);
}

#[test]
fn a_shared_group_with_members_on_every_node_gets_each_message_once() {
    let etcd = Etcd::start(3);
    let pre = prefix("shared");
    let [a, b, c] = three_nodes(&etcd, &pre);
    let ids = Ids {
        etcd: &etcd,
        prefix: &pre,
    };
    // Group g: a member on each node. Group solo: one member, on c. A plain subscriber on b.
    let mut members: Vec<(String, RawClient)> = Vec::new();
    for (node, n) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let id = ids.on(n, "member");
        let mut m = v5(node, &id);
        m.sub(&[
            ("$share/g/jobs/#", QoS::AtLeastOnce),
            (&format!("fence/{id}"), QoS::AtLeastOnce),
        ]);
        members.push((id, m));
    }
    let solo_id = ids.on("c", "solo");
    let mut solo = v5(&c, &solo_id);
    solo.sub(&[
        ("$share/solo/jobs/+", QoS::AtLeastOnce),
        (&format!("fence/{solo_id}"), QoS::AtLeastOnce),
    ]);
    let plain_id = ids.on("b", "plain");
    let mut plain = v5(&b, &plain_id);
    plain.sub(&[
        ("jobs/#", QoS::AtLeastOnce),
        (&format!("fence/{plain_id}"), QoS::AtLeastOnce),
    ]);
    // Right after the SUBACKs: the publisher's node knows every group and subscriber.
    let mut p = v5(&a, &ids.on("a", "pub"));
    const N: usize = 60;
    for i in 0..N {
        assert_eq!(
            p.publish_v5(msg("jobs/x", format!("{i}").as_bytes(), QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
    }
    // A fence per subscriber, published after the jobs: with one shard per node, each
    // arrives after every job that went to its subscriber's node.
    let mut clients: Vec<(String, &mut RawClient)> =
        members.iter_mut().map(|(id, m)| (id.clone(), m)).collect();
    clients.push((solo_id.clone(), &mut solo));
    clients.push((plain_id.clone(), &mut plain));
    for (id, _) in &clients {
        assert_eq!(
            p.publish_v5(msg(&format!("fence/{id}"), b"", QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
    }
    let got: Vec<Vec<usize>> = clients
        .iter_mut()
        .map(|(_, c)| {
            let mut jobs = Vec::new();
            loop {
                let m = c.recv_publish_ack();
                if m.topic.as_str().starts_with("fence/") {
                    break jobs;
                }
                jobs.push(std::str::from_utf8(&m.payload).unwrap().parse().unwrap());
            }
        })
        .collect();
    let all: Vec<usize> = (0..N).collect();
    // Group g: every job once, spread over the members of all three nodes.
    let mut g: Vec<usize> = got[..3].iter().flatten().copied().collect();
    g.sort_unstable();
    assert_eq!(g, all, "group g's members got {:?}", &got[..3]);
    for (i, jobs) in got[..3].iter().enumerate() {
        assert!(
            jobs.len() >= N / 6,
            "the member on node {} got {} of {N}: {:?}",
            ["a", "b", "c"][i],
            jobs.len(),
            &got[..3]
        );
    }
    // A group of one member, and a plain subscriber: everything, in order.
    assert_eq!(got[3], all, "group solo");
    assert_eq!(got[4], all, "the plain subscriber");
    // The last member on c leaves group g: what follows is spread over a and b only, once
    // c's node has withdrawn the group (its key, as a route).
    let (_, c_member) = members.last_mut().unwrap();
    c_member.unsubscribe(&["$share/g/jobs/#"]);
    // A new filter's SUBACK from c waits until every node applied it, after the group's
    // withdrawal (one ordered stream from c to a).
    c_member.sub(&[("barrier/c", QoS::AtMostOnce)]);
    for i in N..2 * N {
        assert_eq!(
            p.publish_v5(msg("jobs/x", format!("{i}").as_bytes(), QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
    }
    let mut rest = Vec::new();
    for (id, m) in members.iter_mut() {
        assert_eq!(
            p.publish_v5(msg(&format!("fence/{id}"), b"", QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
        let mut jobs = Vec::new();
        loop {
            let m = m.recv_publish_ack();
            if m.topic.as_str().starts_with("fence/") {
                break;
            }
            jobs.push(
                std::str::from_utf8(&m.payload)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap(),
            );
        }
        rest.push(jobs);
    }
    assert!(rest[2].is_empty(), "c's member left, got {:?}", rest[2]);
    let mut g: Vec<usize> = rest.iter().flatten().copied().collect();
    g.sort_unstable();
    assert_eq!(g, (N..2 * N).collect::<Vec<_>>(), "after c left: {rest:?}");
}

/// The retained messages a new (not persistent) subscriber whose session lives on `node`
/// gets for `filter`, up to the PINGRESP that follows its SUBACK (topic=payload, sorted).
fn retained_seen(node: &TestBroker, id: &str, filter: &str) -> Vec<String> {
    let mut s = v5(node, id);
    s.sub(&[(filter, QoS::AtMostOnce)]);
    s.send(&shardmq::protocol::Packet::PingReq);
    let mut seen = Vec::new();
    loop {
        match s.recv() {
            shardmq::protocol::Packet::Publish(m) => {
                assert!(m.retain, "{m:?}");
                seen.push(format!(
                    "{}={}",
                    m.topic.as_str(),
                    String::from_utf8_lossy(&m.payload)
                ));
            }
            shardmq::protocol::Packet::PingResp => break,
            other => panic!("{other:?}"),
        }
    }
    s.disconnect();
    seen.sort();
    seen
}

/// Retained messages published before a node joined, or while it was down, reach it when
/// it starts (it asks a linked node for their set), deletions made before it joined
/// included, and so do deletions made while it was down of messages its disk still holds:
/// a late subscriber on it gets what the others would give.
#[test]
fn retained_messages_reach_a_node_that_joins_later_or_was_down_when_they_were_published() {
    let etcd = Etcd::start(3);
    let pre = prefix("retained-join");
    let a = TestBroker::start_with(1, &node_toml_ttl("a", &etcd, &pre, 6));
    let b = TestBroker::start_with(1, &node_toml_ttl("b", &etcd, &pre, 6));
    wait_linked(&[&a, &b]);
    wait_balanced(&a, &["a", "b"]);
    let ids = Ids {
        etcd: &etcd,
        prefix: &pre,
    };
    let retain = |p: &mut RawClient, topic: &str, body: &str| {
        let mut m = msg(topic, body.as_bytes(), QoS::AtLeastOnce);
        m.retain = true;
        let rc = p.publish_v5(m);
        assert!(rc.is_some_and(|rc| (rc as u8) < 0x80), "{topic}: {rc:?}");
    };
    let mut p = v5(&a, &ids.on("a", "pub"));
    retain(&mut p, "j/1", "one");
    retain(&mut p, "j/2", "two");
    retain(&mut p, "j/gone", "x");
    retain(&mut p, "j/gone", "");
    p.disconnect();
    let want = vec!["j/1=one".to_string(), "j/2=two".to_string()];
    assert_eq!(retained_seen(&b, &ids.on("b", "s0"), "j/#"), want);

    // c joins with nothing: it asks a linked node for the set at start.
    let c = TestBroker::start_with(1, &node_toml_ttl("c", &etcd, &pre, 6));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);
    let synced = |n: &TestBroker| {
        n.admin_json("/api/cluster")["plane"]["retained_synced_total"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until("c got the retained set", TIMEOUT, || synced(&c) >= 2);
    // (Filters that the publish below does not match: a subscription c still announces
    // when it dies would make that publish wait for c, as for any subscriber of a node
    // that is down.)
    assert_eq!(retained_seen(&c, &ids.on("c", "s1"), "j/1"), want[..1]);
    assert_eq!(retained_seen(&c, &ids.on("c", "s2"), "j/2"), want[1..]);
    assert!(retained_seen(&c, &ids.on("c", "s3"), "j/gone").is_empty());

    // c down (its disk kept) while one more is published; back, it has it too.
    let dir = c.kill9();
    let mut p = v5(&a, &ids.on("a", "pub2"));
    // Refused (0x80) while c is still a member (until its lease expires): tried again.
    wait_until("a retained publish taken with c down", 3 * TIMEOUT, || {
        let mut m = msg("j/3", b"three", QoS::AtLeastOnce);
        m.retain = true;
        p.publish_v5(m).is_some_and(|rc| (rc as u8) < 0x80)
    });
    // And one that c's disk holds is deleted meanwhile.
    retain(&mut p, "j/2", "");
    p.disconnect();
    let c = TestBroker::start_in(1, &node_toml_ttl("c", &etcd, &pre, 6), dir);
    wait_linked(&[&a, &b, &c]);
    wait_until(
        "c got the retained set again: j/1, j/3 and the deletions of j/2 and j/gone",
        TIMEOUT,
        || synced(&c) >= 4,
    );
    let all = vec!["j/1=one".to_string(), "j/3=three".to_string()];
    assert_eq!(retained_seen(&c, &ids.on("c", "s4"), "j/#"), all);
    assert_eq!(retained_seen(&a, &ids.on("a", "s5"), "j/#"), all);
}
