//! QoS 2 dedup keys and failed persists, on a real store.

use super::cluster::{FromCluster, SlotBits, SlotMap, ToCluster, SLOT_HERE};
use super::tests_support::{cluster_link, connect_to, connect_v5, drain, subscribe_packet, Sink};
use super::*;
use crate::protocol::PacketId;
use crate::storage::StoreOptions;

fn open(dir: &std::path::Path) -> Store {
    let opts = StoreOptions {
        cache_bytes: 1 << 20,
        max_cached_files: 16,
        memtable_bytes: 1 << 20,
        max_journal_bytes: 64 << 20,
        worker_threads: 1,
    };
    Store::open(dir, &opts).unwrap()
}

fn durable_core(store: &Store) -> Core {
    let cfg = Config::default();
    assert_eq!(cfg.storage.durability, Durability::Durable);
    Core::new(
        0,
        1,
        Rc::new(cfg),
        Rc::new(Sink::default()),
        Some(store.clone()),
        Arc::new(QueuedBudget::new(1, u64::MAX)),
    )
}

/// What the committer does: every write so far made durable, its waiters released.
fn commit(c: &mut Core, now: Instant) {
    while let Some((store, target)) = c.commit_target() {
        store.persist().unwrap();
        c.committed(target, true, now);
    }
}

fn connect(c: &mut Core, id: &str, clean_start: bool, now: Instant) -> (ConnCtx, Rc<Outbound>) {
    connect_to(c, &connect_v5(id, clean_start, Some(3600)), now)
}

fn publish(pid: u16, dup: bool, payload: &'static [u8]) -> Packet {
    let mut p = Publish::new(
        TopicName::new("t").unwrap(),
        bytes::Bytes::from_static(payload),
    );
    p.qos = QoS::ExactlyOnce;
    p.packet_id = Some(PacketId::new(pid).unwrap());
    p.dup = dup;
    Packet::Publish(p)
}

fn id(s: &str) -> MqttStr {
    MqttStr::new(s).unwrap()
}

fn stored<'a>(
    r: &'a crate::storage::Recovered,
    client: &str,
) -> &'a crate::storage::RecoveredSession {
    r.sessions.iter().find(|s| s.client_id == client).unwrap()
}

/// An acknowledgement never overtakes the fsync of its write: the shard's open batch is in
/// the store when the committer takes its target, a write made after that is not covered by
/// it, and each PUBACK goes out only when the persist covering its copy has ended.
#[test]
fn an_acknowledgement_never_overtakes_the_fsync_of_its_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = Instant::now();
    let mut c = durable_core(&store);
    let (mut sub, _) = connect(&mut c, "s", false, now);
    c.on_packet(&mut sub, subscribe_packet(1, "t", QoS::AtLeastOnce), now)
        .unwrap();
    commit(&mut c, now);
    c.disconnected(&sub, Ending::Normal, now);
    commit(&mut c, now);
    let (mut publ, publ_out) = connect(&mut c, "p", true, now);
    let _ = drain(&publ_out); // CONNACK
    let publish = |pid: u16| {
        let mut p = Publish::new(
            TopicName::new("t").unwrap(),
            bytes::Bytes::from_static(b"m"),
        );
        p.qos = QoS::AtLeastOnce;
        p.packet_id = Some(PacketId::new(pid).unwrap());
        Packet::Publish(p)
    };
    let queued = |store: &Store| store.queue_read("s", 0, usize::MAX).unwrap().len();
    c.on_packet(&mut publ, publish(1), now).unwrap();
    assert_eq!(
        queued(&store),
        0,
        "the copy waits in the shard's open batch"
    );
    assert!(publ_out.is_empty(), "no PUBACK before the copy is durable");
    let (persisting, first) = c.commit_target().expect("a write waits for a persist");
    assert_eq!(
        queued(&store),
        1,
        "the batch is in the store before the persist starts"
    );
    // A write while that persist runs is not covered by it.
    c.on_packet(&mut publ, publish(2), now).unwrap();
    assert!(publ_out.is_empty());
    persisting.persist().unwrap();
    c.committed(first, true, now);
    let acks: Vec<u16> = drain(&publ_out)
        .into_iter()
        .map(|p| match p {
            Packet::PubAck(a) => a.packet_id.get(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(acks, vec![1], "only the message the persist covered");
    assert_eq!(
        queued(&store),
        1,
        "the second copy is still in the open batch"
    );
    commit(&mut c, now);
    assert!(matches!(&drain(&publ_out)[..], [Packet::PubAck(a)] if a.packet_id.get() == 2));
    assert_eq!(queued(&store), 2);
}

/// An fsync that fails never yields a success acknowledgement: the PUBACK that waited on
/// it goes out with 0x80 (MQTT 5), and nothing is acknowledged before the persist ends.
#[test]
fn a_failed_persist_fails_the_acknowledgements_that_waited_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = Instant::now();
    let mut c = durable_core(&store);
    let (mut sub, _) = connect(&mut c, "s", false, now);
    let subscribe = subscribe_packet(1, "t", QoS::AtLeastOnce);
    c.on_packet(&mut sub, subscribe, now).unwrap();
    commit(&mut c, now);
    c.disconnected(&sub, Ending::Normal, now);
    commit(&mut c, now);
    let (mut publ, publ_out) = connect(&mut c, "p", true, now);
    let _ = drain(&publ_out); // CONNACK
    let mut p = Publish::new(
        TopicName::new("t").unwrap(),
        bytes::Bytes::from_static(b"m"),
    );
    p.qos = QoS::AtLeastOnce;
    p.packet_id = Some(PacketId::new(9).unwrap());
    c.on_packet(&mut publ, Packet::Publish(p), now).unwrap();
    assert!(publ_out.is_empty(), "no PUBACK before the copy is durable");
    let (_, target) = c
        .commit_target()
        .expect("the queued copy waits for a persist");
    c.committed(target, false, now); // the fsync failed
    let acks = drain(&publ_out);
    assert!(
        matches!(&acks[..], [Packet::PubAck(a)]
            if a.packet_id.get() == 9 && a.reason_code == ReasonCode::UnspecifiedError),
        "{acks:?}"
    );
}

/// A QoS 2 message stored for an offline persistent session, then the broker "crashes"
/// before the publisher's packet id is stored: the resend (DUP) after the restart is
/// routed again and skipped by the session, which holds its key. PUBREL makes the shard
/// forget the key, durably, before PUBCOMP; the packet id then carries a new message.
#[test]
fn a_qos2_resend_after_a_restart_is_skipped_and_pubrel_releases_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = Instant::now();
    let (s, p) = (id("s"), id("p"));
    {
        let mut c = durable_core(&store);
        let (mut sub, _) = connect(&mut c, "s", false, now);
        let subscribe = subscribe_packet(1, "t", QoS::ExactlyOnce);
        c.on_packet(&mut sub, subscribe, now).unwrap();
        c.disconnected(&sub, Ending::Normal, now);
        let (mut publ, _) = connect(&mut c, "p", false, now);
        c.on_packet(&mut publ, publish(7, false, b"one"), now)
            .unwrap();
        assert!(c.session(&s).unwrap().holds_qos2(&p, 7));
        assert_eq!(c.qos2.holders(&p, 7), std::slice::from_ref(&s));
        commit(&mut c, now);
    }
    // The crash took the packet id's write (stored after the copies were durable).
    store.incoming_delete("p", 7).unwrap();
    store.persist().unwrap();
    let r = store.load().unwrap();
    assert_eq!(stored(&r, "s").dedup, vec![("p".to_owned(), 7)]);
    assert_eq!(stored(&r, "s").queue_len, 1);
    assert!(stored(&r, "p").incoming.is_empty());

    let mut c = durable_core(&store);
    c.recover(now);
    assert!(c.session(&s).unwrap().holds_qos2(&p, 7), "key restored");
    let (mut publ, out) = connect(&mut c, "p", false, now);
    assert!(matches!(&drain(&out)[..], [Packet::ConnAck(a)] if a.session_present));
    c.on_packet(&mut publ, publish(7, true, b"one"), now)
        .unwrap();
    assert_eq!(
        c.session(&s).unwrap().queued_messages(),
        1,
        "resend skipped"
    );
    commit(&mut c, now);
    let got = drain(&out);
    assert!(
        matches!(&got[..], [Packet::PubRec(a)] if a.packet_id.get() == 7),
        "{got:?}"
    );

    // PUBREL: the key goes at once in memory; PUBCOMP only after the deletion and then
    // the packet id's deletion are durable.
    let pubrel = Packet::PubRel(Ack::new(PacketId::new(7).unwrap()));
    c.on_packet(&mut publ, pubrel, now).unwrap();
    assert!(!c.session(&s).unwrap().holds_qos2(&p, 7));
    assert!(c.qos2.is_empty());
    assert!(out.is_empty(), "PUBCOMP waits for the disk");
    commit(&mut c, now);
    let got = drain(&out);
    assert!(
        matches!(&got[..], [Packet::PubComp(a)] if a.packet_id.get() == 7),
        "{got:?}"
    );
    let r = store.load().unwrap();
    assert!(stored(&r, "s").dedup.is_empty(), "key deleted on disk");
    assert!(stored(&r, "p").incoming.is_empty());

    // The packet id reused for a new message: delivered, keyed again.
    c.on_packet(&mut publ, publish(7, false, b"two"), now)
        .unwrap();
    assert_eq!(c.session(&s).unwrap().queued_messages(), 2);
    assert!(c.session(&s).unwrap().holds_qos2(&p, 7));

    // The publisher's session ends (clean start): every key of it is forgotten.
    c.disconnected(&publ, Ending::Lost, now);
    let _ = connect(&mut c, "p", true, now);
    assert!(!c.session(&s).unwrap().holds_qos2(&p, 7));
    assert!(c.qos2.is_empty());
    commit(&mut c, now);
    let r = store.load().unwrap();
    assert!(stored(&r, "s").dedup.is_empty());
}

/// The routings of a QoS 2 message that the shard of a publisher `p` (one of two) sent to
/// the other shard, and the round trips that wait for their answers.
fn routed_to_shard_1(sink: &Sink) -> Vec<(Qos2Id, Token)> {
    sink.0
        .borrow_mut()
        .drain(..)
        .filter_map(|(to, ev)| match ev {
            Event::Publish {
                msg,
                reply: Some(token),
            } if to == 1 => Some((msg.qos2_id.unwrap(), token)),
            _ => None,
        })
        .collect()
}

/// A QoS 2 message resent with DUP on a new connection while its first routing still waits
/// for an answer (another shard, or another node) is not acknowledged for itself: its
/// PUBREC is the first routing's, moved to the new connection. A PUBREC of its own (once
/// this shard's writes were durable) acknowledged a message that the first routing then
/// failed to store, and the id was forgotten with it: the message was lost.
#[test]
fn a_resend_while_the_first_routing_is_under_way_waits_for_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let now = Instant::now();
    let sink = Rc::new(Sink::default());
    let mut c = Core::new(
        0,
        2,
        Rc::new(Config::default()),
        sink.clone(),
        Some(store.clone()),
        Arc::new(QueuedBudget::new(2, u64::MAX)),
    );
    // A subscriber of `t` on shard 1.
    c.on_event(
        1,
        Event::Index {
            filter: Arc::from("t"),
            shard: 1,
            add: true,
            reply: None,
        },
        now,
    );
    // A publisher whose session lives on shard 0.
    let p = (0..)
        .map(|i| format!("p{i}"))
        .find(|id| owner_shard(id.as_bytes(), 2) == 0)
        .unwrap();
    let (mut publ, _) = connect(&mut c, &p, false, now);
    let ack_of = |pid: u16| PacketId::new(pid).unwrap();
    let pubrecs = |out: &Outbound| -> Vec<(u16, ReasonCode)> {
        drain(out)
            .into_iter()
            .filter_map(|p| match p {
                Packet::PubRec(a) => Some((a.packet_id.get(), a.reason_code)),
                _ => None,
            })
            .collect()
    };

    // Refused where it was routed (a store failure there, or a session moving away), kept
    // elsewhere: the resend waited, and its connection is closed unacknowledged.
    c.on_packet(&mut publ, publish(1, false, b"one"), now)
        .unwrap();
    commit(&mut c, now);
    let first = routed_to_shard_1(&sink);
    assert_eq!(first.len(), 1);
    let (mut publ, out) = connect(&mut c, &p, false, now);
    let _ = drain(&out); // CONNACK
    c.on_packet(&mut publ, publish(1, true, b"one"), now)
        .unwrap();
    commit(&mut c, now);
    assert!(routed_to_shard_1(&sink).is_empty(), "not routed twice");
    assert!(
        out.is_empty(),
        "no PUBREC before the first routing's outcome"
    );
    let fate = Fate {
        kept: true,
        ..Fate::default()
    };
    c.on_event(
        1,
        Event::Ack {
            token: first[0].1,
            ok: false,
            fate,
        },
        now,
    );
    commit(&mut c, now);
    let got = drain(&out);
    assert!(
        matches!(&got[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::UnspecifiedError),
        "closed without PUBREC: {got:?}"
    );
    // Its next resend is routed again (the sessions that kept it skip it by its key).
    let (mut publ, out) = connect(&mut c, &p, false, now);
    let _ = drain(&out);
    c.on_packet(&mut publ, publish(1, true, b"one"), now)
        .unwrap();
    let again = routed_to_shard_1(&sink);
    assert!(
        matches!(&again[..], [(q, _)] if q.packet_id == 1 && q.dup),
        "{again:?}"
    );
    c.on_event(
        1,
        Event::Ack {
            token: again[0].1,
            ok: true,
            fate,
        },
        now,
    );
    commit(&mut c, now);
    assert_eq!(pubrecs(&out), vec![(1, ReasonCode::Success)]);

    // Stored where it was routed: one PUBREC, on the new connection.
    c.on_packet(&mut publ, publish(2, false, b"two"), now)
        .unwrap();
    commit(&mut c, now);
    let first = routed_to_shard_1(&sink);
    let (mut publ, out) = connect(&mut c, &p, false, now);
    let _ = drain(&out);
    c.on_packet(&mut publ, publish(2, true, b"two"), now)
        .unwrap();
    // A second resend on the same connection: answered as on one connection, with its own
    // PUBREC after the held one (MQTT-4.6.0-3), never ahead of it.
    c.on_packet(&mut publ, publish(2, true, b"two"), now)
        .unwrap();
    commit(&mut c, now);
    assert!(out.is_empty(), "nothing before the first routing's outcome");
    c.on_event(
        1,
        Event::Ack {
            token: first[0].1,
            ok: true,
            fate,
        },
        now,
    );
    commit(&mut c, now);
    assert_eq!(
        pubrecs(&out),
        vec![(2, ReasonCode::Success), (2, ReasonCode::Success)]
    );
    let pubrel = Packet::PubRel(Ack::new(ack_of(2)));
    c.on_packet(&mut publ, pubrel, now).unwrap();
}

/// A clustered core that owns every slot (`here`) or none (node 0 owns them), its lease
/// held for an hour; and what it hands to the cluster thread.
fn node_core(
    store: &Store,
    here: bool,
    now: Instant,
) -> (Core, tokio::sync::mpsc::UnboundedReceiver<ToCluster>) {
    let mut c = durable_core(store);
    let (link, rx) = cluster_link();
    link.lease.hold_until(now + Duration::from_secs(3600));
    c.attach_cluster(link);
    let slots = crate::session::ownership::SLOTS as usize;
    let map = SlotMap {
        epoch: 1,
        owner: vec![if here { SLOT_HERE } else { 0 }; slots],
        relay: vec![Some("127.0.0.1:1".parse().unwrap())],
        serving: true,
    };
    c.on_cluster(FromCluster::Slots(Arc::new(map)), now);
    (c, rx)
}

/// The forwarded keys (`ToCluster::Forget`) among what a shard handed to the cluster thread.
fn forgets(rx: &mut tokio::sync::mpsc::UnboundedReceiver<ToCluster>) -> Vec<(String, String, u16)> {
    let mut v = Vec::new();
    while let Ok(m) = rx.try_recv() {
        if let ToCluster::Forget {
            client_id,
            origin,
            packet_id,
            ..
        } = m
        {
            v.push((
                client_id.as_str().to_owned(),
                origin.as_str().to_owned(),
                packet_id,
            ));
        }
    }
    v
}

/// A QoS 2 message from publisher `p` as another node forwards it.
fn forwarded(pid: u16, dup: bool, now: Instant) -> FromCluster {
    let msg = Message {
        topic: TopicName::new("t").unwrap(),
        payload: bytes::Bytes::from_static(b"m"),
        qos: QoS::ExactlyOnce,
        retain: false,
        properties: PublishProperties::default(),
        origin: Some(id("p")),
        qos2_id: Some(Qos2Id {
            packet_id: pid,
            dup,
        }),
        created: now,
        groups: None,
    };
    FromCluster::Publish {
        node: 0,
        id: None,
        msg: Arc::new(msg),
    }
}

/// A session moving to another node takes its QoS 2 keys along. One its publisher releases
/// after the read is forwarded by the old node and forgotten by the new one; one released
/// on the new node before the session came is kept: the publisher may have reused the
/// packet id since, for the very message the key stands for, and a resend of that message
/// with DUP must be skipped there (dropping the key stored it twice). A forward that comes
/// after a new message (DUP = 0) took the key again leaves it alone.
#[test]
fn a_moved_session_keeps_its_qos2_keys_and_forgets_those_released_after_its_read() {
    let now = Instant::now();
    let (s, p) = (id("s"), id("p"));
    let dir_o = tempfile::tempdir().unwrap();
    let store_o = open(dir_o.path());
    let (mut o, mut o_rx) = node_core(&store_o, true, now);
    let (mut sub, _) = connect(&mut o, "s", false, now);
    o.on_packet(&mut sub, subscribe_packet(1, "t", QoS::ExactlyOnce), now)
        .unwrap();
    commit(&mut o, now);
    o.disconnected(&sub, Ending::Normal, now);
    let (mut publ, _) = connect(&mut o, "p", false, now);
    for pid in [1, 2, 3] {
        o.on_packet(&mut publ, publish(pid, false, b"m"), now)
            .unwrap();
    }
    commit(&mut o, now);
    assert_eq!(o.qos2.holders(&p, 2), std::slice::from_ref(&s));

    // The move: s's slot moving, its records read.
    let mut bits: SlotBits = [0; crate::session::ownership::SLOTS as usize / 64];
    let slot = crate::session::ownership::slot_of(b"s");
    bits[slot as usize / 64] |= 1 << (slot % 64);
    o.on_cluster(
        FromCluster::Moving {
            bits: Arc::new(bits),
            on: true,
            rc: ReasonCode::UseAnotherServer,
        },
        now,
    );
    let read = o.moving_sessions(&bits).unwrap();
    let (_, entries) = read.iter().find(|(c, _)| c == "s").unwrap();
    let keys: Vec<_> = entries
        .iter()
        .filter(|e| e.space == crate::storage::Space::Dedup)
        .filter_map(|e| crate::storage::dedup_entry_of(&e.rest).map(|(o, p)| (o.to_owned(), p)))
        .collect();
    let p_ = |pid| ("p".to_owned(), pid);
    assert_eq!(keys, vec![p_(1), p_(2), p_(3)]);
    assert!(forgets(&mut o_rx).is_empty());
    // Messages 1 and 3 released after the read: forwarded.
    for pid in [1, 3] {
        let pubrel = Packet::PubRel(Ack::new(PacketId::new(pid).unwrap()));
        o.on_packet(&mut publ, pubrel, now).unwrap();
    }
    let s_ = |pid| ("s".to_owned(), "p".to_owned(), pid);
    assert_eq!(forgets(&mut o_rx), vec![s_(1), s_(3)]);

    // The new node had a release of (p, 2) before, for an older message with that id.
    let dir_n = tempfile::tempdir().unwrap();
    let store_n = open(dir_n.path());
    let (mut n, _n_rx) = node_core(&store_n, false, now);
    n.on_cluster(
        FromCluster::Release {
            node: 0,
            id: None,
            origin: p.clone(),
            packet_id: Some(2),
        },
        now,
    );
    n.on_cluster(
        FromCluster::Adopt {
            node: 0,
            id: 1,
            client_id: "s".into(),
            entries: Arc::new(entries.clone()),
            read_at: None,
        },
        now,
    );
    commit(&mut n, now);
    let queued = |n: &Core| n.session(&s).unwrap().queued_messages();
    let at_n = n.session(&s).unwrap();
    assert!(
        at_n.holds_qos2(&p, 2),
        "a key released here before the move is kept"
    );
    assert!(at_n.holds_qos2(&p, 1) && at_n.holds_qos2(&p, 3), "as read");
    assert_eq!(queued(&n), 3);
    // Before the forward of 3 comes, the publisher reuses packet id 3 for a new message,
    // which reaches the adopted copy (DUP = 0: stored, the key is its own now).
    n.on_cluster(forwarded(3, false, now), now);
    assert_eq!(queued(&n), 4);

    // The forwarded releases come after the session, on the same link.
    for pid in [1, 3] {
        n.on_cluster(
            FromCluster::Forget {
                client_id: s.clone(),
                origin: p.clone(),
                packet_id: pid,
            },
            now,
        );
    }
    assert!(!n.session(&s).unwrap().holds_qos2(&p, 1));
    assert!(n.qos2.holders(&p, 1).is_empty());
    assert!(
        n.session(&s).unwrap().holds_qos2(&p, 3),
        "the new message's key is not the one forgotten over there"
    );
    assert_eq!(n.qos2.holders(&p, 2), std::slice::from_ref(&s));
    commit(&mut n, now);
    let r = store_n.load().unwrap();
    assert_eq!(stored(&r, "s").dedup, vec![p_(2), p_(3)]);

    // Resends with DUP (their first tries' PUBRECs withheld): 2 and the new 3 are skipped
    // here; 1, whose key went, is stored as a new message.
    n.on_cluster(forwarded(2, true, now), now);
    n.on_cluster(forwarded(3, true, now), now);
    assert_eq!(queued(&n), 4, "the resends of kept messages are skipped");
    n.on_cluster(forwarded(1, true, now), now);
    assert_eq!(queued(&n), 5, "a resend whose key went is stored");
}
