//! Overload and slow peers, end to end over real sockets: a subscriber that never reads, a
//! publisher that floods, a client that stops reading altogether, per-client inbound rate
//! limits, and well-behaved clients on another shard while one shard is flooded.
//!
//! Memory is read from /proc/PID/status (VmRSS) of the broker. The bounds are generous
//! failure bounds, far below what the same traffic would cost without the limits (the
//! tests say how much that is), never speed targets.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq::protocol::{Packet, ProtocolVersion, QoS};
use support::raw::{publish_packet, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const MIB: u64 = 1024;

fn raw_on(b: &TestBroker, prefix: &str, shard: usize) -> RawClient {
    RawClient::connect_v311(b.addr, &id_on_shard(prefix, shard, b.shards))
}

/// `count` QoS 0 PUBLISHes of `size`-byte payloads to `topic`, encoded back to back; the
/// first 8 bytes of each payload are its number.
fn qos0_burst(topic: &str, first: u64, count: u64, size: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut payload = vec![0u8; size];
    for n in first..first + count {
        payload[..8].copy_from_slice(&n.to_be_bytes());
        publish_packet(topic, &payload, QoS::AtMostOnce, false, None, false)
            .encode(ProtocolVersion::V3_1_1, &mut out)
            .expect("encode");
    }
    out.to_vec()
}

fn number(p: &shardmq::protocol::Publish) -> u64 {
    u64::from_be_bytes(p.payload[..8].try_into().expect("8-byte number"))
}

/// A subscriber that never reads is capped: QoS 0 beyond its outbound buffer is dropped
/// (the broker's memory does not follow the 128 MiB published), and what it does read once
/// it starts is a gap-ridden prefix, never the whole flood.
#[test]
fn slow_qos0_subscriber_is_capped_and_the_excess_dropped() {
    let b = TestBroker::start_with(
        1,
        "[limits]\npacket_bytes_max = 65536\noutbound_buffer_bytes_max = 262144\n\
         write_stall_timeout_s = 600\n",
    );
    let mut sub = raw_on(&b, "slow0-sub", 0);
    sub.sub(&[("slow/q0", QoS::AtMostOnce)]);
    let mut publ = raw_on(&b, "slow0-pub", 0);
    publ.ping();
    let rss_before = b.rss_kib();
    let (count, size) = (8192u64, 16 * 1024);
    let burst = qos0_burst("slow/q0", 0, 256, size);
    for round in 0..count / 256 {
        let _ = round;
        publ.send_bytes(&burst);
    }
    // Same shard: once the publisher's PINGRESP is back, every delivery was decided.
    publ.ping();
    let grown = b.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 48 * MIB,
        "broker memory grew by {grown} KiB for a subscriber that does not read (128 MiB sent)"
    );
    // The subscriber reads now: what was buffered, then PINGRESP.
    sub.send(&Packet::PingReq);
    let mut got = 0u64;
    loop {
        match sub.recv() {
            Packet::Publish(_) => got += 1,
            Packet::PingResp => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got > 0, "the subscriber got nothing at all");
    assert!(
        got < count,
        "all {count} messages reached a subscriber that did not read: nothing was dropped"
    );
    // Dropped, not stuck: new messages flow again.
    publ.publish("slow/q0", &[7u8; 8], QoS::AtMostOnce, false);
    let p = sub.recv_publish();
    assert_eq!(&p.payload[..], &[7u8; 8]);
}

/// A persistent QoS 1 subscriber that does not read: messages wait in its session queue
/// (on disk beyond a small memory window), the broker's memory stays bounded, and once the
/// subscriber reads every message arrives, in order; a reconnect in the middle loses none.
#[test]
fn slow_qos1_subscriber_gets_every_message_later_and_memory_stays_bounded() {
    let b = TestBroker::start_with(
        1,
        "[limits]\npacket_bytes_max = 65536\noutbound_buffer_bytes_max = 262144\n\
         write_stall_timeout_s = 600\ninflight_max = 32\nqueue_bytes_max = 268435456\n\
         [storage]\ndurability = \"batched\"\ncache_bytes = 1048576\n",
    );
    let sub_id = id_on_shard("slow1-sub", 0, 1);
    let (mut sub, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));
    sub.sub(&[("slow/q1", QoS::AtLeastOnce)]);
    let mut publ = raw_on(&b, "slow1-pub", 0);
    let rss_before = b.rss_kib();
    let (count, size) = (6000u64, 16 * 1024);
    let mut payload = vec![0u8; size];
    let mut max_grown = 0;
    // Windows of 100 QoS 1 publishes, each window's PUBACKs read before the next.
    for window in 0..count / 100 {
        let mut out = BytesMut::new();
        let mut ids = Vec::new();
        for i in 0..100 {
            let n = window * 100 + i;
            payload[..8].copy_from_slice(&n.to_be_bytes());
            let id = publ.next_pid();
            ids.push(id);
            publish_packet(
                "slow/q1",
                &payload,
                QoS::AtLeastOnce,
                false,
                Some(id),
                false,
            )
            .encode(ProtocolVersion::V3_1_1, &mut out)
            .expect("encode");
        }
        publ.send_bytes(&out);
        for id in ids {
            publ.recv_matching(
                "PUBACK",
                |p| matches!(p, Packet::PubAck(a) if a.packet_id.get() == id),
            );
        }
        max_grown = max_grown.max(b.rss_kib().saturating_sub(rss_before));
    }
    eprintln!("slow QoS 1 subscriber: memory grew by at most {max_grown} KiB");
    // The session layer holds at most its memory window (512 messages), the in-flight
    // window and the outbound cap; the storage engine's write path holds more (about the
    // backlog's size at this scale, see the README's "Overload" section): this bound is
    // for gross failures only.
    assert!(
        max_grown < 256 * MIB,
        "broker memory grew by {max_grown} KiB holding ~94 MiB for a subscriber that does not read"
    );
    // Read half, then reconnect (the rest is in the session), then read the rest.
    let mut next = 0u64;
    while next < count / 2 {
        let p = sub.recv_publish_ack();
        let n = number(&p);
        if n < next {
            continue; // a resend of one already seen
        }
        assert_eq!(n, next, "messages out of order or missing");
        next += 1;
    }
    sub.disconnect();
    let (mut sub, present) = RawClient::connect(b.addr, &ConnectOpts::v311(&sub_id, false));
    assert!(present, "the session survived");
    while next < count {
        let p = sub.recv_publish_ack();
        let n = number(&p);
        if n < next {
            assert!(p.dup, "an old message again without DUP: {n}");
            continue;
        }
        assert_eq!(n, next, "messages out of order or missing");
        next += 1;
    }
}

/// A client that stops reading is closed after `limits.write_stall_timeout_s` (its will
/// says so), while the publisher flooding it and a bystander are unaffected.
#[test]
fn a_client_that_stops_reading_is_disconnected_after_the_stall_timeout() {
    let b = TestBroker::start_with(
        2,
        "[limits]\npacket_bytes_max = 65536\noutbound_buffer_bytes_max = 262144\n\
         write_stall_timeout_s = 1\n",
    );
    let mut watcher = raw_on(&b, "stall-watch", 1);
    watcher.sub(&[("stall/will", QoS::AtLeastOnce)]);
    let id = id_on_shard("stall-sub", 0, 2);
    let opts = ConnectOpts::v311(&id, true).will("stall/will", b"stalled", QoS::AtLeastOnce, false);
    let (mut stalled, _) = RawClient::connect(b.addr, &opts);
    stalled.sub(&[("stall/flood", QoS::AtMostOnce)]);
    let started = Instant::now();

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let mut publ = raw_on(&b, "stall-pub", 0);
        thread::spawn(move || {
            let burst = qos0_burst("stall/flood", 0, 64, 16 * 1024);
            while !stop.load(Ordering::Relaxed) {
                publ.send_bytes(&burst);
            }
            publ.ping();
        })
    };
    let will = watcher.recv_publish_ack();
    assert_eq!(&will.payload[..], b"stalled");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed before the stall timeout"
    );
    stop.store(true, Ordering::Relaxed);
    flooder.join().expect("the flooder kept its connection");
    // The stalled socket ends (after whatever the kernel still held for it).
    let mut sink = vec![0u8; 1 << 16];
    let deadline = Instant::now() + TIMEOUT;
    let mut s = stalled.stream();
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    loop {
        assert!(
            Instant::now() < deadline,
            "the stalled connection was not closed"
        );
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    watcher.ping();
}

/// `limits.inbound_messages_per_s` slows a fast publisher down to its rate (TCP pushes
/// back; nothing is dropped), and a client on the same shard is not held up.
#[test]
fn inbound_rate_limit_slows_the_publisher_and_drops_nothing() {
    let b = TestBroker::start_with(1, "[limits]\ninbound_messages_per_s = 200\n");
    let mut sub = raw_on(&b, "rate-sub", 0);
    sub.sub(&[("rate/t", QoS::AtLeastOnce)]);
    let mut publ = raw_on(&b, "rate-pub", 0);
    let started = Instant::now();
    // 600 packets at 200/s with a burst of 200: at least 2 s.
    let mut out = BytesMut::new();
    for n in 0u64..599 {
        publish_packet(
            "rate/t",
            &n.to_be_bytes(),
            QoS::AtMostOnce,
            false,
            None,
            false,
        )
        .encode(ProtocolVersion::V3_1_1, &mut out)
        .expect("encode");
    }
    publ.send_bytes(&out);
    publ.ping();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1800),
        "600 packets at 200/s took only {elapsed:?}"
    );
    for n in 0u64..599 {
        let p = sub.recv_publish();
        assert_eq!(number(&p), n);
    }
    sub.ping();
}

/// Shard 0 is flooded by clients publishing QoS 0 as fast as they can (to a subscriber that
/// reads on shard 1 and one that never reads on shard 0); a publisher/subscriber pair on
/// shard 1 keeps doing QoS 1 round trips, each within a generous bound, and the broker's
/// memory stays bounded.
#[test]
fn a_flooded_shard_leaves_other_shards_responsive_and_memory_bounded() {
    let b = TestBroker::start_with(
        2,
        "[limits]\npacket_bytes_max = 65536\noutbound_buffer_bytes_max = 262144\n\
         write_stall_timeout_s = 600\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    // Subscribers of the flood: one reads on shard 1, one never reads on shard 0.
    let mut lazy = raw_on(&b, "flood-lazy", 0);
    lazy.sub(&[("flood/#", QoS::AtMostOnce)]);
    let mut reader = raw_on(&b, "flood-read", 1);
    reader.sub(&[("flood/#", QoS::AtMostOnce)]);
    let reader_thread = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = reader.stream();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let mut sink = vec![0u8; 1 << 16];
            while !stop.load(Ordering::Relaxed) {
                let _ = s.read(&mut sink);
            }
        })
    };
    let rss_before = b.rss_kib();
    let flooders: Vec<_> = (0..3)
        .map(|i| {
            let stop = stop.clone();
            let flooded = flooded.clone();
            let mut publ = raw_on(&b, &format!("flooder{i}"), 0);
            thread::spawn(move || {
                let burst = qos0_burst(&format!("flood/{i}"), 0, 256, 4096);
                while !stop.load(Ordering::Relaxed) {
                    publ.send_bytes(&burst);
                    flooded.fetch_add(burst.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the flood get going: a few MiB in.
    let deadline = Instant::now() + TIMEOUT;
    while flooded.load(Ordering::Relaxed) < 8 << 20 {
        assert!(Instant::now() < deadline, "the flood did not start");
        thread::yield_now();
    }
    let mut rt_sub = raw_on(&b, "rt-sub", 1);
    rt_sub.sub(&[("rt/echo", QoS::AtLeastOnce)]);
    let mut rt_pub = raw_on(&b, "rt-pub", 1);
    let bound = Duration::from_secs(5);
    let mut worst = Duration::ZERO;
    let mut max_grown = 0;
    // Round trips until the flood has pushed 128 MiB through the broker (at least 50).
    let flood_target = 128u64 << 20;
    let deadline = Instant::now() + 3 * TIMEOUT;
    let mut n = 0u64;
    while n < 50 || flooded.load(Ordering::Relaxed) < flood_target {
        assert!(
            Instant::now() < deadline,
            "the flood did not reach its volume"
        );
        let t = Instant::now();
        rt_pub.publish("rt/echo", &n.to_be_bytes(), QoS::AtLeastOnce, false);
        let p = rt_sub.recv_publish_ack();
        assert_eq!(number(&p), n);
        let rtt = t.elapsed();
        worst = worst.max(rtt);
        assert!(rtt < bound, "round trip {n} took {rtt:?} under the flood");
        max_grown = max_grown.max(b.rss_kib().saturating_sub(rss_before));
        n += 1;
    }
    let total = flooded.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().expect("flooder");
    }
    reader_thread.join().expect("reader");
    eprintln!(
        "flood: {} MiB sent, {n} round trips, worst {worst:?}, memory grew by at most {max_grown} KiB",
        total >> 20
    );
    assert!(
        max_grown < 64 * MIB,
        "broker memory grew by {max_grown} KiB under the flood"
    );
}
