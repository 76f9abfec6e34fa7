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

/// The crash tests' two offline persistent subscribers of `CRASH_TOPIC`, whose sessions
/// live on node `c`: MQTT 3.1.1 at QoS 1, MQTT 5 at QoS 2.
fn crash_subscribers_on_c(
    etcd: &Etcd,
    prefix: &str,
    c: &TestBroker,
    stem: &str,
) -> (ConnectOpts, ConnectOpts) {
    let sub1 = ConnectOpts::v311(
        &id_owned_by(etcd, prefix, "c", &format!("{stem}-q1")),
        false,
    );
    let sub2 = ConnectOpts::v5(
        &id_owned_by(etcd, prefix, "c", &format!("{stem}-q2")),
        false,
    )
    .expiry(3600);
    for (s, qos) in [(&sub1, QoS::AtLeastOnce), (&sub2, QoS::ExactlyOnce)] {
        let (mut cl, _) = RawClient::connect_served(c.addr, s);
        cl.sub(&[(CRASH_TOPIC, qos)]);
        cl.disconnect();
    }
    (sub1, sub2)
}

/// Nodes a and c (replicated, 3 s lease, `extra` in their [cluster] section), the slots
/// shared out, and an offline persistent 3.1.1 session on c subscribed to `topic` (QoS 1).
fn a_and_c_with_a_session_on_c(
    nats: &Nats,
    etcd: &Etcd,
    p: &str,
    extra: &str,
    stem: &str,
    topic: &str,
) -> (TestBroker, TestBroker, ConnectOpts) {
    let a = TestBroker::start_with(1, &(replicated_toml("a", etcd, nats, p, 3) + extra));
    let c = TestBroker::start_with(1, &(replicated_toml("c", etcd, nats, p, 3) + extra));
    wait_linked(&[&a, &c]);
    wait_balanced(&a, &["a", "c"]);
    let sub = ConnectOpts::v311(&id_owned_by(etcd, p, "c", stem), false);
    let (mut s, _) = RawClient::connect_served(c.addr, &sub);
    s.sub(&[(topic, QoS::AtLeastOnce)]);
    s.disconnect();
    (a, c, sub)
}

/// `c` SIGKILLed with its disk: once its sessions are failed over to `a`, `sub`'s session
/// drained there holds `m-00` .. `m-{count - 1}` (in c's store when it died) and `after`.
fn lost_with_its_disk_then_rebuilt_on_a(
    c: TestBroker,
    a: &TestBroker,
    etcd: &Etcd,
    p: &str,
    sub: &ConnectOpts,
    count: usize,
) {
    drop(c.kill9());
    wait_until("c's sessions taken over", 6 * TIMEOUT, || {
        owner_of(etcd, p, &sub.client_id) == "a"
    });
    let got = drain_all(a.addr, sub);
    let heads: Vec<&str> = got.iter().map(|g| &g[..g.len().min(5)]).collect();
    for i in 0..count {
        let want = format!("m-{i:02}");
        assert!(
            got.iter().any(|g| g.starts_with(&want)),
            "{want} (in c's store) rebuilt from the stream: {heads:?}"
        );
    }
    assert!(got.iter().any(|g| g == "after"), "{heads:?}");
}

/// Snapshots node `n` has written of its replicated sessions (`GET /api/cluster`).
fn snapshots(n: &TestBroker) -> u64 {
    n.admin_json("/api/cluster")["replication"]["snapshots_total"]
        .as_u64()
        .unwrap_or(0)
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
    wait_until("every member's stream in GET /api/cluster", TIMEOUT, || {
        let v = a.admin_json("/api/cluster");
        ["a", "b", "c"]
            .iter()
            .all(|id| member(&v, id)["stream"]["last_seq"].as_u64().is_some())
    });
    assert!(a.metric("shardmq_cluster_replica_appends_total{node=\"a\"}") >= 0.0);

    let c_stream = c.admin_json("/api/cluster")["replication"]["stream"]
        .as_str()
        .expect("c's stream")
        .to_string();
    // Both subscribers' sessions live on c, the node that dies; the publisher's on a.
    let (sub1, sub2) = crash_subscribers_on_c(&etcd, &p, &c, "rep");
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
    // The publisher's node waited for its stream in its group commits (the wait counted).
    let waits = a.metric("shardmq_cluster_replication_wait_seconds_count{shard=\"0\"}");
    assert!(
        waits >= 1.0,
        "a's group commits waited for the stream {waits} times"
    );
    let view = a.admin_json("/api/cluster");
    let rebuilt = |n: &TestBroker| {
        n.admin_json("/api/cluster")["replication"]["sessions_rebuilt_total"]
            .as_u64()
            .unwrap_or(0)
    };
    let (by_a, by_b) = (rebuilt(&a), rebuilt(&b));
    assert!(
        by_a + by_b >= 2,
        "the sessions were rebuilt from the stream: {view}"
    );
    // One survivor ran the fail-over; the other did not rebuild the same sessions too.
    assert!(
        by_a == 0 || by_b == 0,
        "both survivors rebuilt c's sessions (a {by_a}, b {by_b})"
    );
    let published_at = started.elapsed();
    // The fail-over gave all of c's slots to one node; the rebalance then moves a share
    // to the other with its sessions (their clients are sent away meanwhile).
    wait_balanced(&a, &["a", "b"]);
    // Drained through b: Session Present = 1 there too (relayed to the new owner).
    // A drain that stalls shows both survivors' view of the session.
    let drain = |s: &ConnectOpts| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crash_drain(b.addr, s, "END")
        }))
        .unwrap_or_else(|e| {
            for (n, node) in [("a", &a), ("b", &b)] {
                let path = format!("/api/sessions/{}", s.client_id);
                eprintln!("{n} {path}: {:?}", node.http("GET", &path));
            }
            eprintln!("b /api/cluster: {:?}", b.http("GET", "/api/cluster"));
            std::panic::resume_unwind(e)
        })
    };
    let got1 = drain(&sub1);
    let got2 = drain(&sub2);
    verify_crash(&publ, seed, 1, &log, &got1, &got2, published_at, started);
    // c's sessions live in their new owners' streams now: c's own keeps only the fence
    // (its sequence goes on, so a c still running would stay fenced).
    let held = nats.stream(&c_stream).expect("c's stream")["state"].clone();
    assert_eq!(
        held["messages"].as_u64(),
        Some(1),
        "c's stream after the fail-over holds only its fence: {held}"
    );
    assert!(held["last_seq"].as_u64().unwrap_or(0) > 1, "{held}");

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
        // Nothing the drain acknowledged comes again. A second `END` may: the publisher
        // sends it again when it was refused (a session moving), and a session that had
        // stored the first copy holds both; the drain stopped at the first.
        while let Ok((shardmq::protocol::Packet::Publish(m), _)) =
            cl.read_frame_until(Instant::now() + Duration::from_millis(500))
        {
            assert_eq!(
                &m.payload[..],
                b"END",
                "{}: delivered again: {m:?}",
                s.client_id
            );
            cl.ack(&m);
        }
        cl.disconnect();
    }

    // The rebuilt sessions are in their new owner's stream too: that node lost with its
    // disk in turn, they are rebuilt once more.
    let owner = owner_of(&etcd, &p, &sub1.client_id);
    let mut nodes = vec![("a", a), ("b", b), ("c", c)];
    let i = nodes.iter().position(|(id, _)| *id == owner).unwrap();
    let (_, gone) = nodes.remove(i);
    drop(gone.kill9());
    wait_until("the sessions rebuilt a second time", 6 * TIMEOUT, || {
        owner_of(&etcd, &p, &sub1.client_id) != owner
    });
    let (cl, present) = RawClient::connect_served(nodes[0].1.addr, &sub1);
    assert!(
        present,
        "{}: rebuilt from the stream of the node that rebuilt it",
        sub1.client_id
    );
    cl.disconnect();
}

/// Drains `opts`'s session at `addr` (Session Present), acknowledging everything, until
/// nothing more comes within a second; the payloads in order.
fn drain_all(addr: std::net::SocketAddr, opts: &ConnectOpts) -> Vec<String> {
    let (mut c, present) = RawClient::connect_served(addr, opts);
    assert!(present, "{}: session present", opts.client_id);
    let mut got = Vec::new();
    loop {
        match c.read_frame_until(Instant::now() + Duration::from_secs(1)) {
            Ok((shardmq::protocol::Packet::Publish(p), _)) => {
                c.ack(&p);
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    c.disconnect();
    got
}

/// Snapshots are written and the log trimmed while traffic runs; a node lost with its disk
/// right after is rebuilt from the snapshot plus the log after it, every message in order.
/// The servers take at most 64 KiB per message: the snapshot's bodies, and a record of
/// 100 KB, go in parts.
#[test]
fn snapshots_trim_the_log_under_traffic_and_a_rebuild_uses_them() {
    let nats = Nats::start_with(3, "max_payload: 65536\n");
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-snap-{}", std::process::id());
    let extra = "snapshot_log_bytes = 1048576\n";
    let (a, c, sub) = a_and_c_with_a_session_on_c(&nats, &etcd, &p, extra, "snap-q", "snap/t");
    let before = snapshots(&c);
    let total = 1500;
    let body = vec![b'x'; 2000];
    let big = vec![b'y'; 100_000];
    {
        let (mut publ, _) = RawClient::connect_served(c.addr, &ConnectOpts::v311("snap-pub", true));
        for i in 0..total {
            let mut payload = format!("{i:05}:").into_bytes();
            payload.extend_from_slice(if i % 300 == 7 { &big } else { &body });
            publ.publish("snap/t", &payload, QoS::AtLeastOnce, false);
        }
        publ.disconnect();
    }
    wait_until("snapshots written under traffic", TIMEOUT, || {
        snapshots(&c) >= before + 2
    });
    let view = c.admin_json("/api/cluster");
    let last = &view["replication"]["last_snapshot"];
    assert!(
        last["start"].as_u64().unwrap() > 1,
        "the last snapshot started after the first appends: {view}"
    );
    assert!(last["records"].as_u64().unwrap() > 0, "{view}");
    let stream = view["replication"]["stream"].as_str().unwrap();
    let held = nats.stream(stream).expect("the stream")["state"]["messages"]
        .as_u64()
        .unwrap();
    assert!(
        held < total / 2,
        "the log was trimmed: {held} messages held of {total} appended"
    );
    drop(c.kill9());
    wait_until("c's sessions taken over", 6 * TIMEOUT, || {
        owner_of(&etcd, &p, &sub.client_id) == "a"
    });
    let got = drain_all(a.addr, &sub);
    let want: Vec<String> = (0..total).map(|i| format!("{i:05}:")).collect();
    let got_heads: Vec<String> = got.iter().map(|g| g[..6].to_string()).collect();
    assert_eq!(got_heads.len(), want.len(), "every message once, in order");
    assert_eq!(got_heads, want);
    for (i, g) in got.iter().enumerate() {
        let len = if i % 300 == 7 { 100_006 } else { 2006 };
        assert_eq!(g.len(), len, "message {i} whole");
    }
}

/// A node frozen past its lease (SIGSTOP) is failed over; when it resumes (SIGCONT) its
/// stream is fenced: whatever it still takes for the sessions it lost is never
/// acknowledged as stored there. Every acknowledged message reaches the session at its new
/// owner.
#[test]
fn the_old_owner_resumed_after_a_fail_over_is_fenced() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-fence-{}", std::process::id());
    let (a, c, sub) = a_and_c_with_a_session_on_c(&nats, &etcd, &p, "", "fence-q", "fence/t");
    // A publisher served by c, connected before the freeze.
    let (mut publ, _) = RawClient::connect_served(
        c.addr,
        &ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "fence-pub"), true),
    );
    publ.publish("fence/t", b"before", QoS::AtLeastOnce, false);
    c.signal(libc::SIGSTOP);
    wait_until("c's sessions taken over", 6 * TIMEOUT, || {
        owner_of(&etcd, &p, &sub.client_id) == "a"
    });
    c.signal(libc::SIGCONT);
    // Straight after the resume: QoS 1 messages through c, answered one way or another.
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..20u16 {
        let id = i + 100;
        let pkt = support::raw::publish_packet(
            "fence/t",
            format!("after-{i}").as_bytes(),
            QoS::AtLeastOnce,
            false,
            Some(id),
            false,
        );
        if !publ.try_send(&pkt) {
            break;
        }
        match publ.read_frame_until(Instant::now() + TIMEOUT) {
            Ok((shardmq::protocol::Packet::PubAck(ack), _)) if (ack.reason_code as u8) < 0x80 => {
                acked.push(format!("after-{i}"));
            }
            Ok((shardmq::protocol::Packet::PubAck(_), _)) => refused += 1,
            _ => break,
        }
    }
    eprintln!(
        "after the resume: {} acknowledged, {refused} refused",
        acked.len()
    );
    drop(publ);
    // c comes back as a member, takes slots again and replicates again: a persistent
    // session it serves now gets its SUBACK (which waits for the stream).
    let mut later_id = None;
    wait_until("c owns slots again", 3 * TIMEOUT, || {
        later_id = (0..64)
            .map(|i| format!("fence-later-{i}"))
            .find(|id| owner_of(&etcd, &p, id) == "c");
        later_id.is_some()
    });
    let later = ConnectOpts::v311(&later_id.unwrap(), false);
    wait_until("c serves and replicates again", 3 * TIMEOUT, || {
        let (mut s, _) = RawClient::connect_served(c.addr, &later);
        let ok = s
            .subscribe(&[("fence/later", QoS::AtLeastOnce)])
            .reason_codes
            .iter()
            .all(|r| (*r as u8) < 0x80);
        s.disconnect();
        ok
    });
    assert_eq!(
        c.admin_json("/api/cluster")["replication"]["fenced"],
        false,
        "c replicates again"
    );
    let got = drain_all(a.addr, &sub);
    assert!(got.contains(&"before".to_string()), "{got:?}");
    for m in &acked {
        assert!(
            got.contains(m),
            "{m} was acknowledged and never delivered: {got:?}"
        );
    }
}

/// The JetStream server leading a node's stream is killed under QoS 1/2 load: appends wait
/// for the new leader (acknowledgements delayed, or refused and sent again, never lost),
/// and the node then loses its disk: everything acknowledged is rebuilt on another node.
#[test]
fn the_stream_leader_killed_under_load_loses_nothing_acknowledged() {
    let seed = support::crash::seed("replicated sessions (stream leader killed)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-leader-{}", std::process::id());
    let a = TestBroker::start_with(1, &replicated_toml("a", &etcd, &nats, &p, 3));
    let c = TestBroker::start_with(1, &replicated_toml("c", &etcd, &nats, &p, 3));
    wait_linked(&[&a, &c]);
    wait_balanced(&a, &["a", "c"]);
    let stream = c.admin_json("/api/cluster")["replication"]["stream"]
        .as_str()
        .unwrap()
        .to_string();
    // The subscribers' sessions and the publisher's all live on c.
    let (sub1, sub2) = crash_subscribers_on_c(&etcd, &p, &c, "lead");
    let mut publ = CrashPublisher::new(id_owned_by(&etcd, &p, "c", "lead-pub"));
    let stop = AtomicBool::new(false);
    let acked = std::sync::atomic::AtomicU64::new(0);
    let mut log = Vec::new();
    let kill_after = rng.range(100, 300);
    std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let publisher = scope.spawn(|| {
            publish_v5_while(&mut publ, &mut rng, c.addr, |acks, _| {
                acked.store(acks, Ordering::Release);
                !stop.load(Ordering::Acquire)
            });
        });
        wait_until("the publisher got acknowledgements", TIMEOUT, || {
            acked.load(Ordering::Acquire) >= kill_after
        });
        let leader = nats.stream_leader(&stream).expect("the stream's leader");
        nats.servers[leader].kill9();
        log.push(format!(
            "stream leader {} killed after {:?}",
            nats.servers[leader].name,
            started.elapsed()
        ));
        let at = acked.load(Ordering::Acquire);
        wait_until("acknowledgements after the new leader", 3 * TIMEOUT, || {
            acked.load(Ordering::Acquire) >= at + 200
        });
        drop(_stop);
        publisher.join().unwrap();
    });
    eprintln!(
        "{} messages published again after a refusal, {} reconnects after a close; {log:?}",
        publ.republished, publ.reconnects
    );
    // Every acknowledged message must be in the stream: c goes with its disk.
    drop(c.kill9());
    wait_until("c's sessions taken over", 6 * TIMEOUT, || {
        owner_of(&etcd, &p, &sub1.client_id) == "a" && owner_of(&etcd, &p, &sub2.client_id) == "a"
    });
    let published_at = started.elapsed();
    let got1 = crash_drain(a.addr, &sub1, "END");
    let got2 = crash_drain(a.addr, &sub2, "END");
    verify_crash(&publ, seed, 1, &log, &got1, &got2, published_at, started);
}

/// NATS frozen (every server SIGSTOPped) while a node takes QoS 1 messages for a persistent
/// session: none is acknowledged, and past `cluster.replication_pending_bytes_max` the
/// changes waiting to go again are dropped. Once NATS is back, the node writes a snapshot
/// before it acknowledges anything more; lost with its disk, the node's session is rebuilt
/// with every message its store took, the dropped ones included.
#[test]
fn changes_dropped_while_nats_was_away_reach_the_stream_by_a_snapshot() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-gap-{}", std::process::id());
    let extra = "replication_timeout_ms = 300\nreplication_pending_bytes_max = 1048576\n";
    let (a, c, sub) = a_and_c_with_a_session_on_c(&nats, &etcd, &p, extra, "gap-q", "gap/t");
    let (mut publ, _) = RawClient::connect_served(
        c.addr,
        &ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "gap-pub"), true),
    );
    let send = |publ: &mut RawClient, id: u16, payload: &[u8]| -> Option<u8> {
        let pkt = support::raw::publish_packet(
            "gap/t",
            payload,
            QoS::AtLeastOnce,
            false,
            Some(id),
            false,
        );
        assert!(publ.try_send(&pkt), "the publisher's connection stays open");
        match publ.read_frame_until(Instant::now() + TIMEOUT) {
            Ok((shardmq::protocol::Packet::PubAck(ack), _)) => Some(ack.reason_code as u8),
            _ => None,
        }
    };
    assert_eq!(
        send(&mut publ, 1, b"m-00"),
        Some(0),
        "replicated before the freeze"
    );
    for s in &nats.servers {
        s.signal(libc::SIGSTOP);
    }
    let big = vec![b'z'; 64 << 10];
    for i in 1..24u16 {
        let mut payload = format!("m-{i:02}").into_bytes();
        payload.extend_from_slice(&big);
        let rc = send(&mut publ, i + 1, &payload);
        assert!(
            rc.is_some_and(|rc| rc >= 0x80),
            "message {i} not acknowledged as stored while NATS is away: {rc:?}"
        );
    }
    let dropped = c.metric("shardmq_cluster_replica_changes_dropped_total{shard=\"0\"}");
    for s in &nats.servers {
        s.signal(libc::SIGCONT);
    }
    assert!(dropped > 0.0, "changes were dropped past the bound");
    // Acknowledged again once the stream is whole (a snapshot written first).
    let before = snapshots(&c);
    let mut id = 100;
    wait_until(
        "acknowledged again after NATS came back",
        4 * TIMEOUT,
        || {
            id += 1;
            send(&mut publ, id, b"after") == Some(0)
        },
    );
    assert!(snapshots(&c) > before, "a snapshot filled the gap first");
    publ.disconnect();
    lost_with_its_disk_then_rebuilt_on_a(c, &a, &etcd, &p, &sub, 24);
}

/// Two replicated nodes a and c with no automatic fail-over (a restart must find its
/// slots still its own), `extra` in their [cluster] section and an admin token, and the
/// clients of the restart tests: an offline persistent 3.1.1 session on c subscribed to
/// `<stem>/t` at QoS 1, and a publisher served by c.
struct Restarts<'a> {
    nats: &'a Nats,
    etcd: &'a Etcd,
    p: String,
    token: String,
    extra: &'a str,
    topic: String,
    sub: ConnectOpts,
    publ: ConnectOpts,
}

impl<'a> Restarts<'a> {
    fn start(
        nats: &'a Nats,
        etcd: &'a Etcd,
        stem: &str,
        extra: &'a str,
    ) -> (Restarts<'a>, TestBroker, TestBroker) {
        let p = format!("/shardmq-replica-{stem}-{}", std::process::id());
        let mut r = Restarts {
            nats,
            etcd,
            p,
            token: format!("{stem}-admin-token-1234"),
            extra,
            topic: format!("{stem}/t"),
            sub: ConnectOpts::v311("unset", false),
            publ: ConnectOpts::v311("unset", true),
        };
        let a = TestBroker::start_with(1, &r.toml("a"));
        let c = TestBroker::start_with(1, &r.toml("c"));
        wait_linked(&[&a, &c]);
        wait_balanced(&a, &["a", "c"]);
        r.sub = ConnectOpts::v311(&id_owned_by(etcd, &r.p, "c", &format!("{stem}-q")), false);
        r.publ = ConnectOpts::v311(&id_owned_by(etcd, &r.p, "c", &format!("{stem}-pub")), true);
        let (mut s, _) = RawClient::connect_served(c.addr, &r.sub);
        s.sub(&[(r.topic.as_str(), QoS::AtLeastOnce)]);
        s.disconnect();
        (r, a, c)
    }

    fn toml(&self, id: &str) -> String {
        format!(
            "{}jetstream = [{}]\n{}[admin]\ntoken = \"{}\"\n",
            node_toml_ttl(id, self.etcd, &self.p, 3),
            self.nats.toml_urls(),
            self.extra,
            self.token
        )
    }

    /// `<tag>-00` .. `<tag>-49` at QoS 1 through `at`, each acknowledged (3.x: a refusal
    /// would close the connection).
    fn publish(&self, at: std::net::SocketAddr, tag: &str) {
        let (mut cl, _) = RawClient::connect_served(at, &self.publ);
        for i in 0..50 {
            cl.publish(
                &self.topic,
                format!("{tag}-{i:02}").as_bytes(),
                QoS::AtLeastOnce,
                false,
            );
        }
        cl.disconnect();
    }

    /// c lost with its disk, failed over by the operator through a: what the session holds
    /// there, drained, must be `tags`' 50 messages each, once and in order (`skip`: a
    /// payload refused along the way that may have been stored all the same).
    fn lose_c_and_check(&self, a: &TestBroker, c: TestBroker, tags: &[&str], skip: &str) {
        drop(c.kill9());
        wait_until("a sees c down", TIMEOUT, || member_state(a, "c") == "down");
        let bearer = format!("Bearer {}", self.token);
        wait_until("c failed over by the operator", TIMEOUT, || {
            a.http_with(
                "POST",
                "/api/cluster/nodes/c/failover",
                &[("Authorization", bearer.as_str())],
            )
            .0 == 200
        });
        let got: Vec<String> = drain_all(a.addr, &self.sub)
            .into_iter()
            .filter(|m| m != skip)
            .collect();
        let want: Vec<String> = tags
            .iter()
            .flat_map(|s| (0..50).map(move |i| format!("{s}-{i:02}")))
            .collect();
        assert_eq!(got, want, "every acknowledged message once, in order");
    }
}

/// A node killed and restarted with its disk intact serves on: its first acknowledgements
/// wait for the snapshot that makes its stream whole again (a group commit may have reached
/// only the disk before the kill), and lost with its disk afterwards, its session is
/// rebuilt with every message, from before and after the restart.
#[test]
fn a_node_restarted_with_its_disk_acknowledges_after_its_start_snapshot() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let (r, a, c) = Restarts::start(&nats, &etcd, "restart", "");
    r.publish(c.addr, "pre");
    let dir = c.kill9();
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    r.publish(c.addr, "post");
    assert!(
        snapshots(&c) >= 1,
        "the restarted node acknowledged after a snapshot: {}",
        c.admin_json("/api/cluster")
    );
    assert_eq!(owner_of(&etcd, &r.p, &r.sub.client_id), "c");
    // Now lost with its disk: the session comes back whole from the stream.
    r.lose_c_and_check(&a, c, &["pre", "post"], "");
}

/// A node stopped in order (SIGTERM, no hand-over: it keeps its slots) notes that its
/// stream holds what its stores do; started again with its disk it writes no start
/// snapshot and acknowledges at once. Lost with its disk afterwards, its session is rebuilt
/// from the stream alone with every message, from before and after the restart: the
/// stream really was whole.
#[test]
fn a_node_stopped_in_order_restarts_without_a_snapshot_and_its_stream_is_whole() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let extra = "hand_over_timeout_s = 0\nreplication_timeout_ms = 500\n";
    let (r, a, c) = Restarts::start(&nats, &etcd, "clean", extra);
    r.publish(c.addr, "pre");
    let dir = c.stop_keep_dir();
    let marker = dir.path().join("data").join("replica-clean");
    assert!(marker.exists(), "the orderly stop wrote its marker");
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    assert!(!marker.exists(), "read once, at start");
    wait_linked(&[&a, &c]);
    assert_eq!(owner_of(&etcd, &r.p, &r.sub.client_id), "c");
    r.publish(c.addr, "post");
    assert_eq!(
        snapshots(&c),
        0,
        "no start snapshot after a clean stop: {}",
        c.admin_json("/api/cluster")
    );
    // An append that fails (NATS frozen) leaves changes the stream may lack: the next
    // orderly stop writes no marker, and the start after it writes a snapshot first.
    for s in &nats.servers {
        s.signal(libc::SIGSTOP);
    }
    let (mut frozen, _) = RawClient::connect_served(
        c.addr,
        &ConnectOpts::v5(&id_owned_by(&etcd, &r.p, "c", "clean-pub5"), true),
    );
    let pkt =
        support::raw::publish_packet(&r.topic, b"frozen", QoS::AtLeastOnce, false, Some(1), false);
    assert!(frozen.try_send(&pkt));
    match frozen.read_frame_until(Instant::now() + 2 * TIMEOUT) {
        Ok((shardmq::protocol::Packet::PubAck(ack), _)) => {
            assert!(
                ack.reason_code as u8 >= 0x80,
                "refused while NATS is away: {ack:?}"
            )
        }
        other => panic!("a PUBACK: {other:?}"),
    }
    for s in &nats.servers {
        s.signal(libc::SIGCONT);
    }
    frozen.disconnect();
    let dir = c.stop_keep_dir();
    assert!(
        !marker.exists(),
        "an append failed since the last snapshot: no marker"
    );
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    r.publish(c.addr, "again");
    assert!(snapshots(&c) >= 1, "a start snapshot first");
    // Lost with its disk now: everything comes back from the stream alone (the refused
    // one may have been stored all the same: it is not counted).
    r.lose_c_and_check(&a, c, &["pre", "post", "again"], "frozen");
}

/// A node stopped in order notes where its stream ended. If that stream is then deleted and
/// made again under the same name (NATS lost it) and reaches the same sequence, the next
/// start does not take it for the stream it noted: it writes a start snapshot, so the
/// sessions its stores hold reach the new stream, and lost with its disk afterwards, its
/// session comes back with every message.
#[test]
fn a_stream_made_again_under_its_name_is_not_taken_for_the_one_a_clean_stop_noted() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let (r, a, c) = Restarts::start(&nats, &etcd, "remade", "hand_over_timeout_s = 0\n");
    r.publish(c.addr, "pre");
    let stream = c.admin_json("/api/cluster")["replication"]["stream"]
        .as_str()
        .expect("c's stream")
        .to_string();
    let dir = c.stop_keep_dir();
    let marker = dir.path().join("data").join("replica-clean");
    let noted = std::fs::read_to_string(&marker).expect("the orderly stop wrote its marker");
    let seq: u64 = noted.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(seq > 50, "{noted}");
    nats.remake_stream(&stream, seq);
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    assert_eq!(owner_of(&etcd, &r.p, &r.sub.client_id), "c");
    r.publish(c.addr, "post");
    assert!(
        snapshots(&c) >= 1,
        "a start snapshot into the stream made again: {}",
        c.admin_json("/api/cluster")
    );
    r.lose_c_and_check(&a, c, &["pre", "post"], "");
}

/// One QoS 2 flow with packet id `id`, PUBLISH to PUBCOMP (`dup`: sent as a resend).
fn qos2_flow(cl: &mut RawClient, topic: &str, payload: &str, id: u16, dup: bool) {
    use shardmq::protocol::{Ack, Packet};
    cl.send(&support::raw::publish_packet(
        topic,
        payload.as_bytes(),
        QoS::ExactlyOnce,
        false,
        Some(id),
        dup,
    ));
    cl.recv_matching(
        "PUBREC",
        |p| matches!(p, Packet::PubRec(a) if a.packet_id.get() == id),
    );
    cl.send(&Packet::PubRel(Ack::new(support::raw::pid(id))));
    cl.recv_matching(
        "PUBCOMP",
        |p| matches!(p, Packet::PubComp(a) if a.packet_id.get() == id),
    );
}

/// `storage.durability = "replicated"`, the store ahead of the stream: NATS frozen, a QoS 2
/// PUBLISH reaches the node's store (written through and fsynced) but not the stream, so
/// no PUBREC; the node is killed. The log after the node's marker holds an older flow with
/// the same packet id (its key put, then deleted). Restarted with its disk, the node must
/// keep what its store holds of that batch whole (not roll the key back to the log's older
/// word): the publisher's resend (DUP) is taken for the same message, and a later message
/// reusing the packet id is a new one. The subscriber gets each exactly once.
#[test]
fn replicated_mode_keeps_a_qos2_publish_the_store_took_and_the_stream_missed_exactly_once() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let extra = "[storage]\ndurability = \"replicated\"\n";
    let (r, a, c) = Restarts::start(&nats, &etcd, "q2ahead", extra);
    let topic = "q2ahead/t";
    let sub = ConnectOpts::v311(&id_owned_by(&etcd, &r.p, "c", "q2ahead-sub"), false);
    let publ = ConnectOpts::v311(&id_owned_by(&etcd, &r.p, "c", "q2ahead-pub"), false);
    let (mut s, _) = RawClient::connect_served(c.addr, &sub);
    s.sub(&[(topic, QoS::ExactlyOnce)]);
    s.disconnect();
    let (mut p, _) = RawClient::connect_served(c.addr, &publ);
    qos2_flow(&mut p, topic, "m0", 7, false);
    let fsyncs = || c.metric("shardmq_storage_fsync_seconds_count{shard=\"0\"}");
    let lag = || {
        c.admin_json("/api/cluster")["replication"]["lag_appends"]
            .as_u64()
            .unwrap_or(0)
    };
    for n in &nats.servers {
        n.signal(libc::SIGSTOP);
    }
    assert!(p.try_send(&support::raw::publish_packet(
        topic,
        b"m1",
        QoS::ExactlyOnce,
        false,
        Some(7),
        false
    )));
    wait_until("m1's append waits for the frozen stream", TIMEOUT, || {
        lag() >= 1
    });
    // The shard wrote m1's batch through to the page cache in the same step that sent its
    // append (a `kill -9` keeps it); a background fsync follows, since it left the store
    // dirty.
    let f1 = fsyncs();
    wait_until("a background fsync after m1", TIMEOUT, || fsyncs() > f1);
    assert!(
        p.read_frame_until(Instant::now() + Duration::from_millis(200))
            .is_err(),
        "no PUBREC while the stream lacks m1"
    );
    let dir = c.kill9();
    drop(p);
    for n in &nats.servers {
        n.signal(libc::SIGCONT);
    }
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    assert_eq!(owner_of(&etcd, &r.p, &publ.client_id), "c");
    let (mut p, present) = RawClient::connect_served(c.addr, &publ);
    assert!(present, "the publisher's session survived");
    qos2_flow(&mut p, topic, "m1", 7, true);
    qos2_flow(&mut p, topic, "m2", 7, false);
    p.disconnect();
    assert_eq!(
        drain_all(c.addr, &sub),
        ["m0", "m1", "m2"],
        "each once: the resend of m1 was known, m2 was new"
    );
}

/// A QoS 2 release that a node lost with its disk missed, from a publisher on a third node
/// (neither the lost node nor the survivor that rebuilds its sessions): the rebuilt session
/// must not keep the stale key. The survivor asks the other nodes which releases the lost
/// node missed before it stores the sessions. Without that, a new message from the
/// publisher reusing the packet id, sent with DUP (a resend after a first try that never
/// arrived), is taken for the old one: acknowledged (PUBREC, PUBCOMP) and never delivered
/// (checked: without the question the subscriber gets m0 and m2 only).
#[test]
fn a_release_the_lost_node_missed_from_a_third_nodes_publisher_leaves_no_stale_key() {
    use shardmq::protocol::{Ack, Packet};
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-missed-{}", std::process::id());
    let a = TestBroker::start_with(1, &replicated_toml("a", &etcd, &nats, &p, 3));
    let b = TestBroker::start_with(1, &replicated_toml("b", &etcd, &nats, &p, 3));
    let c = TestBroker::start_with(1, &replicated_toml("c", &etcd, &nats, &p, 3));
    wait_linked(&[&a, &b, &c]);
    wait_balanced(&a, &["a", "b", "c"]);
    // The survivor that runs c's fail-over (chosen by c's name), and the third node.
    let runner = ["a", "b"][shardmq::cluster::slot_of(b"c") as usize % 2];
    let (rebuilder, third, third_id) = if runner == "a" {
        (&a, &b, "b")
    } else {
        (&b, &a, "a")
    };
    let topic = "missed/t";
    let sub = ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "missed-sub"), false).expiry(3600);
    let (mut s, _) = RawClient::connect_served(c.addr, &sub);
    s.sub(&[(topic, QoS::ExactlyOnce)]);
    s.disconnect();
    let publ = ConnectOpts::v5(&id_owned_by(&etcd, &p, third_id, "missed-pub"), false).expiry(3600);
    let (mut pc, _) = RawClient::connect_served(third.addr, &publ);
    // m0 is stored on c with its key (publisher, 7).
    pc.send(&support::raw::publish_packet(
        topic,
        b"m0",
        QoS::ExactlyOnce,
        false,
        Some(7),
        false,
    ));
    pc.recv_matching(
        "PUBREC",
        |x| matches!(x, Packet::PubRec(a) if a.packet_id.get() == 7),
    );
    // c is lost with its disk before the release: the third node keeps it for c.
    drop(c.kill9());
    pc.send(&Packet::PubRel(Ack::new(support::raw::pid(7))));
    pc.recv_matching(
        "PUBCOMP",
        |x| matches!(x, Packet::PubComp(a) if a.packet_id.get() == 7),
    );
    wait_until("c's sessions rebuilt", 6 * TIMEOUT, || {
        owner_of(&etcd, &p, &sub.client_id) == runner
    });
    // A new message reusing packet id 7, sent with DUP. The rebalance that follows the
    // fail-over may be moving the session meanwhile: then the publisher is refused or
    // closed, and sends it again (reconnected, with DUP), as a client does.
    let deadline = Instant::now() + 2 * TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "m1 was never taken");
        pc.send(&support::raw::publish_packet(
            topic,
            b"m1",
            QoS::ExactlyOnce,
            false,
            Some(7),
            true,
        ));
        match pc.read_frame_until(Instant::now() + TIMEOUT) {
            Ok((Packet::PubRec(a), _)) if a.packet_id.get() == 7 => {
                if (a.reason_code as u8) < 0x80 {
                    pc.send(&Packet::PubRel(Ack::new(support::raw::pid(7))));
                    pc.recv_matching(
                        "PUBCOMP",
                        |x| matches!(x, Packet::PubComp(a) if a.packet_id.get() == 7),
                    );
                    break;
                }
            }
            Ok((Packet::Disconnect(_), _)) | Err(support::raw::ReadEnd::Closed) => {
                std::thread::sleep(Duration::from_millis(20));
                let (c, present) = RawClient::connect_served(third.addr, &publ);
                assert!(present, "the publisher's session");
                pc = c;
                continue;
            }
            other => panic!("m1: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    qos2_flow(&mut pc, topic, "m2", 8, false);
    pc.disconnect();
    assert_eq!(
        drain_all(rebuilder.addr, &sub),
        ["m0", "m1", "m2"],
        "the rebuilt session kept no stale key for the released packet id"
    );
    for n in [rebuilder, third] {
        let plane = &n.admin_json("/api/cluster")["plane"];
        assert_eq!(
            (
                plane["bad_frames_total"].as_u64(),
                plane["rebuild_releases_unknown_total"].as_u64()
            ),
            (Some(0), Some(0)),
            "the ask and its answer were understood, every node answered: {plane}"
        );
    }
}

/// NATS frozen while an append is out (its timeout long): the changes batches make pile up
/// in the shard until `cluster.replication_pending_bytes_max`, then are dropped (memory
/// stays bounded) and a snapshot puts them in the stream once NATS is back; lost with its
/// disk, the node's session is rebuilt with every message its store took.
#[test]
fn changes_piling_up_behind_a_slow_append_are_bounded_and_reach_the_stream_by_a_snapshot() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let p = format!("/shardmq-replica-pile-{}", std::process::id());
    let extra = "replication_timeout_ms = 120000\nreplication_pending_bytes_max = 1048576\n\
                 [storage]\nwrite_batch_bytes_max = 65536\n";
    let (a, c, sub) = a_and_c_with_a_session_on_c(&nats, &etcd, &p, extra, "pile-q", "pile/t");
    let (mut publ, _) = RawClient::connect_served(
        c.addr,
        &ConnectOpts::v5(&id_owned_by(&etcd, &p, "c", "pile-pub"), true),
    );
    publ.publish("pile/t", b"m-00", QoS::AtLeastOnce, false);
    for s in &nats.servers {
        s.signal(libc::SIGSTOP);
    }
    // QoS 0 into the offline persistent session: queued (written) with no acknowledgement
    // to wait for, so the writes go on while the group commit waits for its append.
    let big = vec![b'z'; 64 << 10];
    for i in 1..32u16 {
        let mut payload = format!("m-{i:02}").into_bytes();
        payload.extend_from_slice(&big);
        publ.publish("pile/t", &payload, QoS::AtMostOnce, false);
    }
    publ.ping();
    let dropped = "shardmq_cluster_replica_changes_dropped_total{shard=\"0\"}";
    wait_until(
        "the changes piling up dropped past the bound",
        TIMEOUT,
        || c.metric(dropped) > 0.0,
    );
    // Read while NATS is frozen: no snapshot can end meanwhile.
    let before = snapshots(&c);
    for s in &nats.servers {
        s.signal(libc::SIGCONT);
    }
    wait_until("a snapshot after NATS came back", 4 * TIMEOUT, || {
        snapshots(&c) > before
    });
    publ.publish("pile/t", b"after", QoS::AtLeastOnce, false);
    publ.disconnect();
    lost_with_its_disk_then_rebuilt_on_a(c, &a, &etcd, &p, &sub, 32);
}

/// `storage.durability = "replicated"`: a PUBACK waits for the stream only, the store is
/// fsynced in the background, so a power cut can leave the node's disk behind what it
/// acknowledged. Here its data directory is put back to a copy taken before the last 50
/// acknowledged messages (the process frozen while it is taken, so the copy is what a
/// crash leaves): started again, the node applies its stream's log after the point its
/// marker names to its stores before it serves, and its session holds all 100, once and in
/// order. Without that, the start snapshot would have written the older store to the
/// stream and trimmed the log: the 50 would be gone everywhere. A `kill -9` with the disk
/// intact (the store ahead of the stream, if anything) then brings back nothing twice, and
/// lost with its disk at the end, the node's session is rebuilt elsewhere with what came
/// after.
#[test]
fn replicated_mode_brings_a_disk_that_lost_acknowledged_writes_up_to_the_stream() {
    let nats = Nats::start(3);
    let etcd = Etcd::start(3);
    let extra = "snapshot_log_bytes = 1048576\n[storage]\ndurability = \"replicated\"\n";
    let (r, a, c) = Restarts::start(&nats, &etcd, "ahead", extra);
    // 50 acknowledgements one after the other, each a group commit that waited for the
    // stream; the fsyncs are the background ones, at most one per 100 ms.
    let fsyncs = || c.metric("shardmq_storage_fsync_seconds_count{shard=\"0\"}");
    let commits = || c.metric("shardmq_cluster_replication_wait_seconds_count{shard=\"0\"}");
    let (f0, c0) = (fsyncs(), commits());
    r.publish(c.addr, "pre");
    let (f1, c1) = (fsyncs(), commits());
    assert!(
        c1 - c0 >= 50.0 && f1 - f0 < (c1 - c0) / 2.0,
        "acknowledged without an fsync each: {} fsyncs, {} commits",
        f1 - f0,
        c1 - c0
    );
    wait_until("a background fsync after them", TIMEOUT, || fsyncs() > f0);
    let data = |d: &tempfile::TempDir| d.path().join("data");
    let marker = |d: &tempfile::TempDir| {
        std::fs::read_to_string(data(d).join("replica-ahead")).expect("a replicated run's marker")
    };
    let seq_of = |m: &str| -> u64 { m.split_whitespace().nth(1).unwrap().parse().unwrap() };
    let at_start = marker(&c.data_dir);
    assert!(
        at_start.ends_with(" 1\n"),
        "stream, sequence, 1 shard: {at_start:?}"
    );
    // 1.3 MiB queued for another session of c's: past snapshot_log_bytes, so a snapshot
    // trims the log, and the marker moves first (the stores fsynced).
    let big = ConnectOpts::v311(&id_owned_by(&etcd, &r.p, "c", "ahead-big"), false);
    let (mut s, _) = RawClient::connect_served(c.addr, &big);
    s.sub(&[("ahead/big", QoS::AtLeastOnce)]);
    s.disconnect();
    let snaps = snapshots(&c);
    let (mut p, _) = RawClient::connect_served(c.addr, &r.publ);
    for _ in 0..20 {
        p.publish("ahead/big", &[b'b'; 64 << 10], QoS::AtLeastOnce, false);
    }
    p.disconnect();
    wait_until("a snapshot past the log bound", TIMEOUT, || {
        snapshots(&c) > snaps
    });
    let moved = marker(&c.data_dir);
    assert!(
        seq_of(&moved) > seq_of(&at_start),
        "the snapshot moved the marker: {at_start:?} -> {moved:?}"
    );
    let old = tempfile::tempdir().unwrap();
    c.signal(libc::SIGSTOP);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(data(&c.data_dir))
        .arg(old.path())
        .status()
        .unwrap();
    c.signal(libc::SIGCONT);
    assert!(copied.success());
    r.publish(c.addr, "post");
    let dir = c.kill9();
    std::fs::remove_dir_all(data(&dir)).unwrap();
    std::fs::rename(old.path().join("data"), data(&dir)).unwrap();
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    assert_eq!(owner_of(&etcd, &r.p, &r.sub.client_id), "c");
    let want = |tags: &[&str]| -> Vec<String> {
        tags.iter()
            .flat_map(|s| (0..50).map(move |i| format!("{s}-{i:02}")))
            .collect()
    };
    assert_eq!(
        drain_all(c.addr, &r.sub),
        want(&["pre", "post"]),
        "every acknowledged message once, in order, on c"
    );
    r.publish(c.addr, "again");
    let dir = c.kill9();
    let c = TestBroker::start_in(1, &r.toml("c"), dir);
    wait_linked(&[&a, &c]);
    assert_eq!(
        drain_all(c.addr, &r.sub),
        want(&["again"]),
        "after a kill -9 with the disk intact: nothing lost, nothing back"
    );
    r.publish(c.addr, "more");
    r.lose_c_and_check(&a, c, &["more"], "");
}
