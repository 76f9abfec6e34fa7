//! Two cores wired by hand: the SUBACK barrier and slow subscribers.

use super::tests_support::*;
use super::*;
use crate::protocol::PacketId;

/// Two cores whose sinks the test empties by hand.
fn pair() -> (Vec<Core>, Vec<Rc<Sink>>) {
    let sinks: Vec<Rc<Sink>> = (0..2).map(|_| Rc::new(Sink::default())).collect();
    let cfg = Rc::new(Config::default());
    let budget = Arc::new(QueuedBudget::new(2, u64::MAX));
    let cores = (0..2)
        .map(|i| Core::new(i, 2, cfg.clone(), sinks[i].clone(), None, budget.clone()))
        .collect();
    (cores, sinks)
}

fn deliver_all(cores: &mut [Core], sinks: &[Rc<Sink>], now: Instant) {
    loop {
        let mut any = false;
        for (from, sink) in sinks.iter().enumerate() {
            let events: Vec<_> = sink.0.borrow_mut().drain(..).collect();
            for (to, ev) in events {
                any = true;
                cores[to].on_event(from, ev, now);
            }
        }
        if !any {
            return;
        }
    }
}

fn subacks(out: &Outbound) -> Vec<u16> {
    if out.is_empty() {
        return Vec::new();
    }
    drain(out)
        .into_iter()
        .filter_map(|p| match p {
            Packet::SubAck(a) => Some(a.packet_id.get()),
            _ => None,
        })
        .collect()
}

/// Found by the session fuzz target: a second SUBSCRIBE to a filter whose addition to
/// the peers' indexes was still in flight was acknowledged at once, and a message
/// published on the other shard right after that SUBACK was not routed here.
#[test]
fn a_second_subscribe_waits_for_the_first_ones_index_update() {
    let (mut cores, sinks) = pair();
    let now = Instant::now();
    let (mut sub, sub_out) = conn(&mut cores[0], "s", now);
    drain(&sub_out);
    cores[0]
        .on_packet(&mut sub, subscribe_packet(1, "a", QoS::AtLeastOnce), now)
        .unwrap();
    cores[0]
        .on_packet(&mut sub, subscribe_packet(2, "a", QoS::AtLeastOnce), now)
        .unwrap();
    // Another client of the same shard, same filter: waits too.
    let (mut other, other_out) = conn(&mut cores[0], "o", now);
    drain(&other_out);
    cores[0]
        .on_packet(&mut other, subscribe_packet(1, "a", QoS::AtLeastOnce), now)
        .unwrap();
    assert_eq!(
        subacks(&sub_out),
        Vec::<u16>::new(),
        "SUBACK before the peer knows"
    );
    assert_eq!(
        subacks(&other_out),
        Vec::<u16>::new(),
        "SUBACK before the peer knows"
    );
    deliver_all(&mut cores, &sinks, now);
    let mut got = subacks(&sub_out);
    got.sort_unstable();
    assert_eq!(got, vec![1, 2]);
    assert_eq!(subacks(&other_out), vec![1]);
    // Once acknowledged, a publish on the other shard reaches both.
    let (mut publ, _) = conn(&mut cores[1], "p", now);
    let mut p = Publish::new(
        TopicName::new("a").unwrap(),
        bytes::Bytes::from_static(b"x"),
    );
    p.qos = QoS::AtLeastOnce;
    p.packet_id = PacketId::new(1);
    cores[1]
        .on_packet(&mut publ, Packet::Publish(p), now)
        .unwrap();
    deliver_all(&mut cores, &sinks, now);
    for out in [&sub_out, &other_out] {
        assert!(
            drain(out).iter().any(|p| matches!(p, Packet::Publish(_))),
            "the message was not routed to the subscriber"
        );
    }
    // The in-flight record is gone: a later subscribe is answered at once.
    assert!(cores[0].index.settled());
}

/// A subscriber whose outbound buffer is full gets its QoS 0 messages dropped and
/// counted in the shard's stats; its QoS 1 messages wait in the queue and move in when
/// the writer makes room.
#[test]
fn slow_subscriber_qos0_is_dropped_and_counted_qos1_waits_for_room() {
    let mut cfg = Config::default();
    cfg.limits.packet_bytes_max = 1024;
    cfg.limits.outbound_buffer_bytes_max = 1024;
    let mut c = Core::new(
        0,
        1,
        Rc::new(cfg),
        Rc::new(Sink::default()),
        None,
        Arc::new(QueuedBudget::new(1, u64::MAX)),
    );
    let now = Instant::now();
    let (mut sub, sub_out) = conn(&mut c, "s", now);
    c.on_packet(&mut sub, subscribe_packet(1, "q0", QoS::AtMostOnce), now)
        .unwrap();
    c.on_packet(&mut sub, subscribe_packet(2, "q1", QoS::AtLeastOnce), now)
        .unwrap();
    let (mut publ, _) = conn(&mut c, "p", now);
    let payload = bytes::Bytes::from(vec![0u8; 300]);
    for _ in 0..10 {
        let p = Publish::new(TopicName::new("q0").unwrap(), payload.clone());
        c.on_packet(&mut publ, Packet::Publish(p), now).unwrap();
    }
    let dropped = c.delivery_totals().dropped_qos0_slow;
    assert!(dropped >= 6, "{:?}", c.delivery_totals());
    for i in 1..=10u16 {
        let mut p = Publish::new(TopicName::new("q1").unwrap(), payload.clone());
        p.qos = QoS::AtLeastOnce;
        p.packet_id = PacketId::new(i);
        c.on_packet(&mut publ, Packet::Publish(p), now).unwrap();
    }
    // The writer takes what is buffered and writes it: the queue moves in.
    let count = |ps: &[Packet]| {
        ps.iter()
            .filter(|p| matches!(p, Packet::Publish(q) if q.topic.as_str() == "q1"))
            .count()
    };
    let mut got = 0;
    for _ in 0..20 {
        let batch = if sub_out.is_empty() {
            Vec::new()
        } else {
            drain(&sub_out)
        };
        sub_out.wrote(sub_out.pending_bytes());
        got += count(&batch);
        if sub_out.take_starved() {
            c.on_writable(&sub.client_id, sub.conn_id, now);
        }
    }
    assert_eq!(got, 10, "every QoS 1 message arrives once there is room");
}
