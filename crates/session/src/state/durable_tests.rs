//! Persistent sessions: the queue on disk, drops, QoS 2 keys, queue notes, the budget.

use super::*;
use crate::message::Message;
use bytes::Bytes;
use shardmq_protocol::PublishProperties;
use std::sync::Arc;

fn limits(max: u32, policy: QueuePolicy) -> SessionLimits {
    SessionLimits {
        inflight_max: 1,
        queue_messages_max: max,
        queue_bytes_max: 1 << 30,
        outbound_buffer_bytes_max: 1 << 20,
        queue_qos0_offline: true,
        queue_policy: policy,
        storage_budget_spent: false,
    }
}

fn d(n: u8) -> Delivery {
    Delivery {
        msg: Arc::new(Message {
            topic: TopicName::new("t").unwrap(),
            payload: Bytes::from(vec![n; 4]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            origin: None,
            qos2_id: None,
            created: Instant::now(),
            groups: None,
        }),
        qos: QoS::AtLeastOnce,
        retain: false,
        sub_ids: vec![],
        via_share: None,
    }
}

fn persistent() -> Session {
    let mut s = Session::new(MqttStr::new("p").unwrap(), ProtocolVersion::V5, 60);
    s.persistent = true;
    s
}

#[test]
fn offline_persistent_queue_stays_on_disk_and_comes_back_in_order() {
    let mut s = persistent();
    let l = limits(100, QueuePolicy::RejectNewest);
    let now = Instant::now();
    for n in 0..5 {
        assert_eq!(s.deliver(d(n), &l, now), DeliverOutcome::Queued);
    }
    assert_eq!(s.queued_messages(), 5);
    assert_eq!(s.queue.len(), 0, "nothing in memory while offline");
    let pushed: Vec<u64> = s
        .take_ops()
        .into_iter()
        .map(|op| match op {
            StoreOp::QueuePush { seq, .. } => seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(pushed, vec![0, 1, 2, 3, 4]);
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    s.attach(Link::new(1, out, 10, 1 << 20, 0), &l, now);
    let (from, max) = s.needs_refill().expect("queue on disk");
    assert_eq!(from, 0);
    s.refill((0..5).map(|n| (n, d(n as u8))).collect(), max);
    assert!(s.needs_refill().is_none());
    s.pump(&l, now);
    assert_eq!(s.inflight().count(), 1);
    assert_eq!(s.queued_messages(), 4);
    let ops = s.take_ops();
    assert!(matches!(ops[0], StoreOp::QueueDelete { seq: 0 }));
    assert!(matches!(ops[1], StoreOp::InflightPut { .. }));
}

#[test]
fn drop_oldest_makes_room_and_records_the_delete() {
    let mut s = persistent();
    let l = limits(2, QueuePolicy::DropOldest);
    let now = Instant::now();
    for n in 0..3 {
        assert_eq!(s.deliver(d(n), &l, now), DeliverOutcome::Queued);
    }
    assert_eq!(s.queued_messages(), 2);
    assert_eq!(s.stats.dropped_queue_full, 1);
    assert!(s
        .take_ops()
        .iter()
        .any(|op| matches!(op, StoreOp::QueueDelete { seq: 0 })));
}

fn q2(origin: &str, packet_id: u16, dup: bool) -> Delivery {
    let mut x = d(1);
    let mut msg = (*x.msg).clone();
    msg.qos = QoS::ExactlyOnce;
    msg.origin = Some(MqttStr::new(origin).unwrap());
    msg.qos2_id = Some(Qos2Id { packet_id, dup });
    x.msg = Arc::new(msg);
    x.qos = QoS::ExactlyOnce;
    x
}

#[test]
fn a_resent_qos2_message_is_skipped_until_its_key_is_released() {
    let mut s = persistent();
    let l = limits(100, QueuePolicy::RejectNewest);
    let now = Instant::now();
    let p = MqttStr::new("p").unwrap();
    assert_eq!(
        s.deliver(q2("p", 7, false), &l, now),
        DeliverOutcome::Queued
    );
    let ops = s.take_ops();
    assert!(
        matches!(ops[0], StoreOp::QueuePush { seq: 0, .. }),
        "{ops:?}"
    );
    assert!(
        matches!(&ops[1], StoreOp::DedupPut { origin, packet_id: 7 } if *origin == p),
        "the key in the same journal as the copy: {ops:?}"
    );
    assert_eq!(ops.len(), 2);
    assert!(s.holds_qos2(&p, 7));
    // The resend after a crash: skipped, nothing written.
    assert_eq!(
        s.deliver(q2("p", 7, true), &l, now),
        DeliverOutcome::Duplicate
    );
    assert!(s.take_ops().is_empty());
    assert_eq!(s.queued_messages(), 1);
    // Another publisher's message with the same packet id is another message.
    assert_eq!(s.deliver(q2("o", 7, true), &l, now), DeliverOutcome::Queued);
    assert_eq!(s.take_ops().len(), 2);
    // Released: the key goes (recorded), and the id may carry a new message.
    assert!(s.forget_qos2(&p, 7));
    assert!(!s.forget_qos2(&p, 7));
    let ops = s.take_ops();
    assert!(
        matches!(&ops[..], [StoreOp::DedupDelete { origin, packet_id: 7 }] if *origin == p),
        "{ops:?}"
    );
    assert_eq!(s.deliver(q2("p", 7, true), &l, now), DeliverOutcome::Queued);
    assert_eq!(s.take_ops().len(), 2);
    // DUP = 0 with the key held (a stale key): a new message, delivered; the key stays.
    assert_eq!(
        s.deliver(q2("p", 7, false), &l, now),
        DeliverOutcome::Queued
    );
    let ops = s.take_ops();
    assert!(matches!(&ops[..], [StoreOp::QueuePush { .. }]), "{ops:?}");
    assert_eq!(s.queued_messages(), 4);
}

#[test]
fn only_persistent_sessions_keep_qos2_keys_and_not_through_shared_subscriptions() {
    let l = limits(100, QueuePolicy::RejectNewest);
    let now = Instant::now();
    let p = MqttStr::new("p").unwrap();
    let mut n = Session::new(MqttStr::new("n").unwrap(), ProtocolVersion::V5, 0);
    assert_eq!(
        n.deliver(q2("p", 1, false), &l, now),
        DeliverOutcome::Queued
    );
    assert_eq!(n.deliver(q2("p", 1, true), &l, now), DeliverOutcome::Queued);
    assert!(!n.holds_qos2(&p, 1));
    let mut s = persistent();
    let mut shared = q2("p", 1, false);
    shared.via_share = Some(Arc::from("$share/g/t"));
    assert_eq!(s.deliver(shared.clone(), &l, now), DeliverOutcome::Queued);
    assert!(!s.holds_qos2(&p, 1));
    assert!(s
        .take_ops()
        .iter()
        .all(|op| !matches!(op, StoreOp::DedupPut { .. })));
}

#[test]
fn non_persistent_sessions_record_nothing() {
    let mut s = Session::new(MqttStr::new("n").unwrap(), ProtocolVersion::V5, 0);
    let l = limits(10, QueuePolicy::RejectNewest);
    s.deliver(d(1), &l, Instant::now());
    assert!(s.take_ops().is_empty());
}

/// One note when the queue becomes full and one when it takes a message again, with
/// the count of what was refused meanwhile; nothing per message.
#[test]
fn a_full_queue_leaves_one_note_when_full_and_one_when_it_has_room_again() {
    for policy in [QueuePolicy::RejectNewest, QueuePolicy::DropOldest] {
        // Not persistent: its queue stays in memory, so the test needs no store.
        let mut s = Session::new(MqttStr::new("n").unwrap(), ProtocolVersion::V5, 60);
        let l = limits(20, policy);
        let now = Instant::now();
        for n in 0..20 {
            assert_eq!(s.deliver(d(n), &l, now), DeliverOutcome::Queued);
        }
        s.check_queue_room(&l);
        assert!(s.take_queue_notes().is_empty());
        for n in 20..25 {
            let expect = match policy {
                QueuePolicy::RejectNewest => DeliverOutcome::Dropped(DropReason::QueueFull),
                QueuePolicy::DropOldest => DeliverOutcome::Queued,
            };
            assert_eq!(s.deliver(d(n), &l, now), expect, "{policy:?}");
            s.check_queue_room(&l);
        }
        assert_eq!(s.take_queue_notes(), [QueueNote::Full], "{policy:?}");
        assert!(s.queue_is_full());
        assert_eq!(s.stats.dropped_queue_full, 5);
        assert_eq!(s.queued_messages(), 20);
        // The client comes back and takes one (19 left, 95%): still full, no note.
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        s.attach(Link::new(1, out, 10, 1 << 20, 0), &l, now);
        s.check_queue_room(&l);
        assert!(s.take_queue_notes().is_empty(), "{policy:?}");
        assert!(s.queue_is_full());
        // A second one (18 left, 90%): room again, with the count.
        let sent = s.inflight().next().map(|i| i.packet_id).expect("one sent");
        s.on_puback(sent, &l, now).unwrap();
        s.check_queue_room(&l);
        assert_eq!(
            s.take_queue_notes(),
            [QueueNote::Room { dropped: 5 }],
            "{policy:?}"
        );
        assert!(!s.queue_is_full());
    }
}

/// While the broker-wide budget is spent, a persistent session refuses what it would
/// queue; a session that keeps nothing on disk is not concerned.
#[test]
fn a_spent_storage_budget_refuses_queueing_for_persistent_sessions_only() {
    let l = SessionLimits {
        storage_budget_spent: true,
        ..limits(100, QueuePolicy::DropOldest)
    };
    let now = Instant::now();
    let mut s = persistent();
    assert_eq!(
        s.deliver(d(1), &l, now),
        DeliverOutcome::Dropped(DropReason::StorageBudget)
    );
    assert_eq!(s.stats.dropped_storage_budget, 1);
    assert_eq!(s.stats.dropped_queue_full, 0);
    assert!(s.take_ops().is_empty(), "nothing written");
    assert!(
        s.take_queue_notes().is_empty(),
        "not the session's own limit"
    );
    let mut n = Session::new(MqttStr::new("n").unwrap(), ProtocolVersion::V5, 0);
    assert_eq!(n.deliver(d(1), &l, now), DeliverOutcome::Queued);
}

/// A message in flight that has expired by the time its client comes back is not resent,
/// and its stored record goes too (else it would come back at every restart, and a put of
/// its packet id that a later batch deletes again would be taken for a new one).
#[test]
fn an_inflight_message_dropped_on_reattach_is_deleted_from_disk() {
    let mut s = persistent();
    let l = limits(100, QueuePolicy::RejectNewest);
    let now = Instant::now();
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    s.attach(Link::new(1, out, 10, 1 << 20, 0), &l, now);
    let mut m = d(1);
    let mut msg = (*m.msg).clone();
    msg.properties.message_expiry_interval = Some(1);
    m.msg = Arc::new(msg);
    assert_eq!(s.deliver(m, &l, now), DeliverOutcome::Sent);
    let pid = match &s.take_ops()[..] {
        [StoreOp::InflightPut {
            packet_id,
            fresh: true,
            ..
        }] => *packet_id,
        other => panic!("{other:?}"),
    };
    s.detach(now);
    let later = now + std::time::Duration::from_secs(2);
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    s.attach(Link::new(2, out, 10, 1 << 20, 0), &l, later);
    assert_eq!(s.inflight().count(), 0, "expired: not resent");
    assert!(
        matches!(&s.take_ops()[..], [StoreOp::InflightDelete { packet_id }] if *packet_id == pid)
    );
}
