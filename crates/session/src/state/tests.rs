//! The session online: the window, the queue behind it, resends, aliases, packet limits.

use super::*;
use crate::message::Message;
use bytes::Bytes;
use shardmq_protocol::{decode, DecodeLimits, PublishProperties};
use std::sync::Arc;

const LIMITS: SessionLimits = SessionLimits {
    inflight_max: 2,
    queue_messages_max: 3,
    queue_bytes_max: 1 << 20,
    outbound_buffer_bytes_max: 1 << 20,
    queue_qos0_offline: true,
    queue_policy: QueuePolicy::RejectNewest,
    storage_budget_spent: false,
};

fn delivery(topic: &str, qos: QoS) -> Delivery {
    Delivery {
        msg: Arc::new(Message {
            topic: TopicName::new(topic).unwrap(),
            payload: Bytes::from_static(b"hello"),
            qos,
            retain: false,
            properties: PublishProperties::default(),
            origin: None,
            qos2_id: None,
            created: Instant::now(),
            groups: None,
        }),
        qos,
        retain: false,
        sub_ids: vec![],
        via_share: None,
    }
}

fn online(version: ProtocolVersion, alias_max: u16) -> (Session, Rc<Outbound>) {
    let mut s = Session::new(MqttStr::new("c").unwrap(), version, 0);
    let out = Rc::new(Outbound::new(version));
    s.attach(
        Link::new(1, out.clone(), 10, 1 << 20, alias_max),
        &LIMITS,
        Instant::now(),
    );
    (s, out)
}

fn sent(out: &Outbound, version: ProtocolVersion) -> Vec<Packet> {
    let mut buf = futures_lite::future::block_on(out.next_batch(BytesMut::new())).0;
    let limits = DecodeLimits::new(1 << 20, Some(version));
    let mut v = Vec::new();
    while let Some(p) = decode(&mut buf, &limits).unwrap() {
        v.push(p);
    }
    v
}

#[test]
fn window_then_queue_then_pump_on_ack() {
    let (mut s, out) = online(ProtocolVersion::V3_1_1, 0);
    let now = Instant::now();
    for _ in 0..4 {
        s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now);
    }
    assert_eq!(s.inflight().count(), 2);
    assert_eq!(s.queued_messages(), 2);
    let pids: Vec<_> = sent(&out, ProtocolVersion::V3_1_1)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p.packet_id.unwrap().get(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(pids, vec![1, 2]);
    s.on_puback(PacketId::new(1).unwrap(), &LIMITS, now)
        .unwrap();
    assert_eq!(s.queued_messages(), 1);
    assert_eq!(
        s.on_puback(PacketId::new(1).unwrap(), &LIMITS, now),
        Err(UnknownPacketId)
    );
}

#[test]
fn wide_window_never_reuses_an_id_in_flight_across_the_wrap() {
    let limits = SessionLimits {
        inflight_max: 100,
        queue_messages_max: 1000,
        ..LIMITS
    };
    let mut s = Session::new(MqttStr::new("c").unwrap(), ProtocolVersion::V5, 0);
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    let now = Instant::now();
    s.attach(Link::new(1, out.clone(), 100, 1 << 20, 0), &limits, now);
    for _ in 0..50 {
        s.deliver(delivery("t", QoS::AtLeastOnce), &limits, now);
    }
    // Acknowledge 1..=30 except 7, which stays in flight.
    for id in (1..=30).filter(|id| *id != 7) {
        s.on_puback(PacketId::new(id).unwrap(), &limits, now)
            .unwrap();
    }
    // Wrap: the next ids are 65534, 65535, then 1.. where 7 and 31..=50 are taken.
    s.next_packet_id = 65534;
    for _ in 0..40 {
        s.deliver(delivery("t", QoS::AtLeastOnce), &limits, now);
    }
    let ids: Vec<u16> = s.inflight().map(|i| i.packet_id.get()).collect();
    let unique: HashSet<u16> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 21 + 40);
    assert_eq!(unique.len(), ids.len(), "an id is in flight twice: {ids:?}");
    assert!(unique.contains(&65534) && unique.contains(&65535));
    assert!(!unique.contains(&0));
    // Every id acknowledged is usable again; the ones in flight were skipped.
    for id in (1..=6).chain(8..=30).chain(51..=57) {
        assert!(unique.contains(&id), "{id} not reused");
    }
    // Completing them all empties the window and frees the id set.
    for id in ids {
        s.on_puback(PacketId::new(id).unwrap(), &limits, now)
            .unwrap();
    }
    assert_eq!(s.inflight().count(), 0);
    assert!(s.ids_in_flight.is_none());
}

#[test]
fn queue_full_refuses_newest() {
    let mut s = Session::new(MqttStr::new("c").unwrap(), ProtocolVersion::V5, 60);
    let now = Instant::now();
    for _ in 0..3 {
        assert_eq!(
            s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now),
            DeliverOutcome::Queued
        );
    }
    assert_eq!(
        s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now),
        DeliverOutcome::Dropped(DropReason::QueueFull)
    );
    assert_eq!(s.stats.dropped_queue_full, 1);
}

#[test]
fn reattach_resends_with_dup_and_pubrel() {
    let (mut s, out) = online(ProtocolVersion::V5, 0);
    let now = Instant::now();
    s.deliver(delivery("a", QoS::AtLeastOnce), &LIMITS, now);
    s.deliver(delivery("b", QoS::ExactlyOnce), &LIMITS, now);
    s.on_pubrec(PacketId::new(2).unwrap(), false, true, &LIMITS, now)
        .unwrap();
    let _ = sent(&out, ProtocolVersion::V5);
    s.detach(now);
    let out2 = Rc::new(Outbound::new(ProtocolVersion::V5));
    s.attach(Link::new(2, out2.clone(), 10, 1 << 20, 0), &LIMITS, now);
    let packets = sent(&out2, ProtocolVersion::V5);
    assert!(matches!(&packets[0], Packet::Publish(p) if p.dup && p.packet_id.unwrap().get() == 1));
    assert!(matches!(&packets[1], Packet::PubRel(a) if a.packet_id.get() == 2));
    s.on_pubcomp(PacketId::new(2).unwrap(), &LIMITS, now)
        .unwrap();
    assert_eq!(s.inflight().count(), 1);
}

#[test]
fn topic_aliases_assigned_then_reused() {
    let (mut s, out) = online(ProtocolVersion::V5, 1);
    let now = Instant::now();
    for t in ["x/y", "x/y", "other"] {
        s.deliver(delivery(t, QoS::AtMostOnce), &LIMITS, now);
    }
    let p = sent(&out, ProtocolVersion::V5);
    let show: Vec<(String, Option<u16>)> = p
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => (
                p.topic.to_string(),
                p.properties.topic_alias.map(|a| a.get()),
            ),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        show,
        vec![
            ("x/y".into(), Some(1)),
            ("".into(), Some(1)),
            ("other".into(), None)
        ]
    );
}

#[test]
fn too_large_for_client_is_not_sent() {
    let mut s = Session::new(MqttStr::new("c").unwrap(), ProtocolVersion::V5, 0);
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    s.attach(
        Link::new(1, out.clone(), 10, 10, 0),
        &LIMITS,
        Instant::now(),
    );
    assert_eq!(
        s.deliver(delivery("topic", QoS::AtLeastOnce), &LIMITS, Instant::now()),
        DeliverOutcome::Dropped(DropReason::TooLarge)
    );
    assert!(out.is_empty());
}
