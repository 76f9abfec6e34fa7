//! One client's session: its subscriptions, the QoS 1/2 messages in flight towards it, the
//! queue of messages waiting for it (offline, or beyond its inflight window), the incoming
//! QoS 2 packet ids awaiting PUBREL, and its will. No I/O: while the client is connected the
//! session writes encoded packets into the connection's [`Outbound`] buffer.
//!
//! Queue policy: a full queue (`queue_messages_max` or `queue_bytes_max`) either refuses the
//! newest message for that session or drops its oldest ([`QueuePolicy`]), and counts it
//! (`dropped_queue_full`). QoS 0 beyond a connection's outbound buffer cap is dropped and
//! counted (`dropped_qos0_slow`); QoS 1/2 wait in the queue instead.
//!
//! Persistent sessions (those whose state outlives the connection, when the broker stores
//! sessions) record every change of their queue and in-flight window as a [`StoreOp`]; the
//! shard applies the ops to the store and waits for their durability before acknowledging.
//! Their queue lives on disk: while online, at most [`QUEUE_MEMORY_WINDOW`] messages are kept
//! in memory and the rest are read back in order ([`Session::needs_refill`]); while offline,
//! none are, so memory does not grow with the number of queued messages.
//!
//! Exactly once across a crash: a persistent session remembers the QoS 2 messages it has
//! stored, by the publisher's client id and packet id ([`Qos2Id`]), until the publisher
//! releases them (PUBREL). The key is recorded in the same journal as the copy
//! ([`StoreOp::DedupPut`]), so both are stored in one batch. A PUBLISH resent with DUP after
//! a crash is routed again; a session that holds its key skips it
//! ([`DeliverOutcome::Duplicate`]).

use bytes::BytesMut;
use hashbrown::{HashMap, HashSet};
use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::time::Instant;

use super::message::{Qos2Id, SharedMessage};
use super::outbound::Outbound;
use shardmq_protocol::{
    Ack, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS, SubscriptionOptions,
    TopicFilter, TopicName,
};

/// One subscription of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub filter: TopicFilter,
    pub options: SubscriptionOptions,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<u32>,
}

/// A message on its way to one session, with what this session's subscriptions made of it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: SharedMessage,
    /// min(published QoS, subscription QoS), maximised over overlapping subscriptions.
    pub qos: QoS,
    /// The RETAIN flag to send (retained-on-subscribe, or Retain As Published).
    pub retain: bool,
    /// Identifiers of the matching subscriptions (MQTT 5).
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/...`) it came through, so that it can be handed back
    /// to the group when this member leaves before taking it.
    pub via_share: Option<std::sync::Arc<str>>,
}

/// Where a message in flight towards the client stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP (the message itself is delivered).
    AwaitPubComp,
}

#[derive(Clone, Debug)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub delivery: Delivery,
    pub state: OutState,
}

/// The connection-specific parameters negotiated by CONNECT, present while online.
#[derive(Debug)]
pub struct Link {
    /// Distinguishes this connection from a later one of the same client (takeover).
    pub conn_id: u64,
    pub version: ProtocolVersion,
    pub out: Rc<Outbound>,
    /// The client's Receive Maximum: our QoS 1/2 window towards it.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size.
    pub max_packet_bytes: u32,
    /// The client's Topic Alias Maximum: how many aliases we may assign towards it.
    pub topic_alias_max: u16,
    aliases: HashMap<TopicName, NonZeroU16>,
    /// PUBACK/PUBREC packets waiting for their messages to be durable, in the order the
    /// PUBLISHes arrived (MQTT-4.6.0-2): released from the front as they become ready.
    held_acks: VecDeque<HeldAck>,
    /// The client's address, when known (for operators).
    pub peer: Option<std::net::SocketAddr>,
    /// The keep alive the broker enforces on this connection (seconds, 0: none).
    pub keep_alive_s: u16,
}

/// An acknowledgement held until what it acknowledges is stored.
#[derive(Debug)]
struct HeldAck {
    token: u64,
    /// `None`: withheld for good (the store failed and the client speaks MQTT 3.x).
    packet: Option<Packet>,
    ready: bool,
    qos1: bool,
}

impl Link {
    /// Sends `packet` now, or after the acknowledgements held before it.
    pub fn send_ack(&mut self, packet: Packet) {
        if self.held_acks.is_empty() {
            self.out.send(&packet);
        } else {
            self.held_acks.push_back(HeldAck {
                token: 0,
                packet: Some(packet),
                ready: true,
                qos1: false,
            });
        }
    }

    /// Holds `packet` until [`Link::release_ack`] is called with `token`.
    pub fn hold_ack(&mut self, token: u64, packet: Packet) {
        let qos1 = matches!(packet, Packet::PubAck(_));
        self.held_acks.push_back(HeldAck {
            token,
            packet: Some(packet),
            ready: false,
            qos1,
        });
    }

    /// Marks the acknowledgement of `token` ready and sends every ready one at the front.
    /// When what it acknowledges was refused (`Some(reason)`: not stored, or not kept), an
    /// MQTT 5 client gets the acknowledgement with that reason and an MQTT 3.x client none
    /// (it will resend).
    pub fn release_ack(&mut self, token: u64, refused: Option<shardmq_protocol::ReasonCode>) {
        let v5 = self.version.is_v5();
        if let Some(h) = self
            .held_acks
            .iter_mut()
            .find(|h| h.token == token && !h.ready)
        {
            h.ready = true;
            if let Some(reason) = refused {
                h.packet = match h.packet.take() {
                    Some(Packet::PubAck(a)) if v5 => {
                        Some(Packet::PubAck(Ack::with_reason(a.packet_id, reason)))
                    }
                    Some(Packet::PubRec(a)) if v5 => {
                        Some(Packet::PubRec(Ack::with_reason(a.packet_id, reason)))
                    }
                    Some(Packet::PubAck(_)) | Some(Packet::PubRec(_)) => None,
                    other => other,
                };
            }
        }
        while let Some(h) = self.held_acks.pop_front() {
            if !h.ready {
                self.held_acks.push_front(h);
                break;
            }
            if let Some(p) = h.packet {
                self.out.send(&p);
            }
        }
    }

    /// QoS 1 publishes whose PUBACK is held: they count against our Receive Maximum.
    pub fn held_qos1(&self) -> usize {
        self.held_acks.iter().filter(|h| h.qos1 && !h.ready).count()
    }
}

impl Link {
    pub fn new(
        conn_id: u64,
        out: Rc<Outbound>,
        receive_maximum: u16,
        max_packet_bytes: u32,
        topic_alias_max: u16,
    ) -> Link {
        Link {
            conn_id,
            version: out.version(),
            out,
            receive_maximum,
            max_packet_bytes,
            topic_alias_max,
            aliases: HashMap::new(),
            held_acks: VecDeque::new(),
            peer: None,
            keep_alive_s: 0,
        }
    }
}

/// Queued messages a persistent, online session keeps in memory; the rest stay on disk.
pub const QUEUE_MEMORY_WINDOW: usize = 512;

/// What to do when a session's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueuePolicy {
    /// Refuse the new message (what is queued stays).
    #[default]
    RejectNewest,
    /// Drop the oldest queued message to make room.
    DropOldest,
}

impl QueuePolicy {
    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            QueuePolicy::RejectNewest => "reject-newest",
            QueuePolicy::DropOldest => "drop-oldest",
        }
    }
}

/// A change to a persistent session's durable state.
#[derive(Clone, Debug)]
pub enum StoreOp {
    /// A message entered the queue under `seq`.
    QueuePush { seq: u64, delivery: Delivery },
    /// The queue entry `seq` left the queue (sent, dropped or handed back).
    QueueDelete { seq: u64 },
    /// A QoS 1/2 message is in flight under `packet_id`, in `state` (also a state change).
    InflightPut {
        packet_id: PacketId,
        delivery: Delivery,
        state: OutState,
    },
    /// The flow of `packet_id` completed.
    InflightDelete { packet_id: PacketId },
    /// The session stored the QoS 2 message `packet_id` of publisher `origin` (recorded right
    /// after the op that stored the copy, so that both go to disk in one batch).
    DedupPut { origin: MqttStr, packet_id: u16 },
    /// The publisher released that message: its key is forgotten.
    DedupDelete { origin: MqttStr, packet_id: u16 },
}

/// A queued message and its place in the session's queue.
#[derive(Clone, Debug)]
struct Queued {
    seq: u64,
    delivery: Delivery,
}

/// A will message and its delay.
#[derive(Clone, Debug)]
pub struct Will {
    pub msg: SharedMessage,
    pub delay_s: u32,
}

/// Counters a session keeps about what it could not deliver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub dropped_queue_full: u64,
    /// Refused by a persistent session while the broker-wide budget for queued data
    /// (`storage.queued_bytes_max`) was spent.
    pub dropped_storage_budget: u64,
    pub dropped_qos0_slow: u64,
    pub dropped_expired: u64,
    pub dropped_too_large: u64,
    /// QoS 0 for an offline session with `queue_qos0_offline = false`.
    pub dropped_qos0_offline: u64,
    pub delivered: u64,
    /// PUBLISH packets sent to the client, by the QoS they were sent at.
    pub delivered_qos: [u64; 3],
}

impl SessionStats {
    /// Adds another session's counters to these.
    pub fn add(&mut self, o: &SessionStats) {
        self.dropped_queue_full += o.dropped_queue_full;
        self.dropped_storage_budget += o.dropped_storage_budget;
        self.dropped_qos0_slow += o.dropped_qos0_slow;
        self.dropped_expired += o.dropped_expired;
        self.dropped_too_large += o.dropped_too_large;
        self.dropped_qos0_offline += o.dropped_qos0_offline;
        self.delivered += o.delivered;
        for (a, b) in self.delivered_qos.iter_mut().zip(o.delivered_qos) {
            *a += b;
        }
    }

    /// Takes another's counters away from these (never below 0).
    pub fn sub(&mut self, o: &SessionStats) {
        let d = |a: &mut u64, b: u64| *a = a.saturating_sub(b);
        d(&mut self.dropped_queue_full, o.dropped_queue_full);
        d(&mut self.dropped_storage_budget, o.dropped_storage_budget);
        d(&mut self.dropped_qos0_slow, o.dropped_qos0_slow);
        d(&mut self.dropped_expired, o.dropped_expired);
        d(&mut self.dropped_too_large, o.dropped_too_large);
        d(&mut self.dropped_qos0_offline, o.dropped_qos0_offline);
        d(&mut self.delivered, o.delivered);
        for (a, b) in self.delivered_qos.iter_mut().zip(o.delivered_qos) {
            d(a, b);
        }
    }

    /// Every message dropped or refused, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full
            + self.dropped_storage_budget
            + self.dropped_qos0_slow
            + self.dropped_expired
            + self.dropped_too_large
            + self.dropped_qos0_offline
    }
}

/// The limits a session works under (from the config).
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub inflight_max: u16,
    pub queue_messages_max: u32,
    pub queue_bytes_max: u64,
    pub outbound_buffer_bytes_max: u32,
    pub queue_qos0_offline: bool,
    pub queue_policy: QueuePolicy,
    /// Set by the shard, not the config: the broker-wide budget for queued data
    /// (`storage.queued_bytes_max`) is spent, so a persistent session refuses what it would
    /// have to queue (on disk), as it would on a full disk.
    pub storage_budget_spent: bool,
}

/// A change of a session's queue between full and not (see [`Session::take_queue_notes`]),
/// for the one log line each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueNote {
    /// The queue refused (or, with `drop-oldest`, pushed out) its first message.
    Full,
    /// The queue is back under 90% of its limits; `dropped` were lost meanwhile.
    Room { dropped: u64 },
}

/// What happened to a message handed to [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverOutcome {
    Sent,
    Queued,
    Dropped(DropReason),
    /// A resend of a QoS 2 message this session has stored already: skipped.
    Duplicate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    /// A persistent session would have queued it while the broker-wide budget for queued
    /// data was spent.
    StorageBudget,
    SlowConsumer,
    Expired,
    TooLarge,
    /// QoS 0 for an offline session with `queue_qos0_offline = false`.
    Offline,
}

/// Failure answering an acknowledgement from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownPacketId;

#[derive(Debug)]
pub struct Session {
    pub client_id: MqttStr,
    /// By the filter as written (`$share/...` included).
    pub subscriptions: HashMap<Box<str>, Subscription>,
    /// Session Expiry Interval in seconds (u32::MAX: never).
    pub expiry_s: u32,
    pub will: Option<Will>,
    pub link: Option<Link>,
    /// Incoming QoS 2 packet ids for which PUBREC was sent and PUBREL not yet received.
    pub incoming_qos2: HashSet<u16>,
    /// The protocol version of the last connection (kept while offline).
    pub version: ProtocolVersion,
    pub stats: SessionStats,
    /// Bumped at every attach and detach, so that a timer set for one offline period (will
    /// delay, expiry) does nothing in a later one.
    pub epoch: u64,
    /// Whether changes are recorded as [`StoreOp`]s (set by the shard).
    pub persistent: bool,
    /// The client published a QoS 2 message that sessions may hold a dedup key of (or the
    /// session was read back from disk): when the session ends, every shard forgets the keys
    /// of this origin.
    pub qos2_published: bool,
    /// Who the client is for access control: `None` until a connection sets it (a session
    /// read back from disk keeps no identity until its client returns), then
    /// `Some(user name)` (`Some(None)`: anonymous).
    pub identity: Option<Option<MqttStr>>,
    /// The user the session belongs to (`Some(None)`: an anonymous client), recorded when
    /// it was made while owner rules were in force (a password or ACL file); `None`: not
    /// recorded, and the next user to connect with its client id under the rules gets it.
    pub owner: Option<Option<MqttStr>>,
    /// Dedup keys (publisher, publisher packet id) of the QoS 2 messages this persistent
    /// session stored and their publisher has not released yet.
    qos2_keys: HashSet<(MqttStr, u16)>,
    ops: Vec<StoreOp>,
    next_packet_id: u16,
    inflight: VecDeque<Inflight>,
    /// Which packet ids `inflight` holds, one bit each: a cache built when the window is
    /// wide enough that scanning it for a free id would cost more, kept up to date by
    /// sending and completing, dropped (rebuilt on demand) by any other change, and freed
    /// when the window empties.
    ids_in_flight: Option<Box<PacketIdSet>>,
    /// The queued messages held in memory, in order.
    queue: VecDeque<Queued>,
    /// Bytes of the messages in `queue`.
    queue_bytes: u64,
    /// The next queue sequence number.
    next_seq: u64,
    /// Queue entries `spilled_from..next_seq` are on disk only.
    spilled_from: Option<u64>,
    spilled_len: u64,
    spilled_bytes: u64,
    /// While the queue is full: `stats.dropped_queue_full` when it became full.
    full_since_drops: Option<u64>,
    /// Changes between full and not that the shard has not logged yet.
    queue_notes: Vec<QueueNote>,
    /// The shard's bookkeeping: the queued bytes of this session it last counted against
    /// the broker-wide budget.
    pub budget_counted: u64,
    /// The shard's bookkeeping: [`SessionStats::dropped_total`] when the counters were last
    /// written to the store.
    pub drops_stored: u64,
    /// The shard's bookkeeping: the ids of its will and expiry timers while it is offline.
    pub will_timer: Option<u64>,
    pub expiry_timer: Option<u64>,
    /// When its client last connected (while online) or went away (while offline);
    /// `None` when not known.
    pub since: Option<Instant>,
}

/// Up to this many messages in flight, a free packet id is found by scanning the window;
/// beyond, through a [`PacketIdSet`].
const PACKET_ID_SCAN_MAX: usize = 16;

/// A set of packet ids, one bit per id (8 KiB).
struct PacketIdSet {
    bits: [u64; 1024],
}

impl Default for PacketIdSet {
    fn default() -> PacketIdSet {
        PacketIdSet { bits: [0; 1024] }
    }
}

impl std::fmt::Debug for PacketIdSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: u32 = self.bits.iter().map(|w| w.count_ones()).sum();
        write!(f, "PacketIdSet({n} ids)")
    }
}

impl PacketIdSet {
    fn insert(&mut self, pid: PacketId) {
        let i = pid.get() as usize;
        self.bits[i / 64] |= 1 << (i % 64);
    }

    fn remove(&mut self, pid: PacketId) {
        let i = pid.get() as usize;
        self.bits[i / 64] &= !(1 << (i % 64));
    }

    fn contains(&self, pid: PacketId) -> bool {
        let i = pid.get() as usize;
        self.bits[i / 64] & (1 << (i % 64)) != 0
    }
}

impl Session {
    pub fn new(client_id: MqttStr, version: ProtocolVersion, expiry_s: u32) -> Session {
        Session {
            client_id,
            subscriptions: HashMap::new(),
            expiry_s,
            will: None,
            link: None,
            incoming_qos2: HashSet::new(),
            version,
            stats: SessionStats::default(),
            epoch: 0,
            persistent: false,
            qos2_published: false,
            identity: None,
            owner: None,
            qos2_keys: HashSet::new(),
            ops: Vec::new(),
            next_packet_id: 1,
            inflight: VecDeque::new(),
            ids_in_flight: None,
            queue: VecDeque::new(),
            queue_bytes: 0,
            next_seq: 0,
            spilled_from: None,
            spilled_len: 0,
            spilled_bytes: 0,
            full_since_drops: None,
            queue_notes: Vec::new(),
            budget_counted: 0,
            drops_stored: 0,
            will_timer: None,
            expiry_timer: None,
            since: None,
        }
    }

    /// The queue's changes between full and not since the last call, oldest first.
    pub fn take_queue_notes(&mut self) -> Vec<QueueNote> {
        std::mem::take(&mut self.queue_notes)
    }

    /// Whether the shard has anything to do after a change of this session: store writes,
    /// reading the queue back, queue notes to log, bytes counted against the budget. A
    /// clean session that only sends has none (the common case of a delivery).
    pub fn needs_sync(&self) -> bool {
        self.persistent
            || !self.ops.is_empty()
            || !self.queue_notes.is_empty()
            || self.full_since_drops.is_some()
            || self.budget_counted != 0
    }

    /// Whether the queue is refusing (or pushing out) messages now.
    pub fn queue_is_full(&self) -> bool {
        self.full_since_drops.is_some()
    }

    /// The durable changes made since the last call, in order.
    pub fn take_ops(&mut self) -> Vec<StoreOp> {
        std::mem::take(&mut self.ops)
    }

    fn record(&mut self, op: StoreOp) {
        if self.persistent {
            self.ops.push(op);
        }
    }

    pub fn is_online(&self) -> bool {
        self.link.is_some()
    }

    /// Messages queued, in memory and on disk.
    pub fn queued_messages(&self) -> u64 {
        self.queue.len() as u64 + self.spilled_len
    }

    /// Payload bytes queued, in memory and on disk.
    pub fn queued_bytes(&self) -> u64 {
        self.queue_bytes + self.spilled_bytes
    }

    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }

    /// Hands a message to the session: sent now if online and the window allows, queued
    /// otherwise, or dropped per the queue policy. A persistent session skips a QoS 2 message
    /// resent (DUP) by its publisher when it holds the message's key, and records the key of
    /// one it takes.
    pub fn deliver(&mut self, d: Delivery, limits: &SessionLimits, now: Instant) -> DeliverOutcome {
        let Some(key) = self.dedup_key(&d) else {
            return self.deliver_now(d, limits, now);
        };
        let (origin, id) = key;
        let held = (origin, id.packet_id);
        if id.dup && self.qos2_keys.contains(&held) {
            return DeliverOutcome::Duplicate;
        }
        let outcome = self.deliver_now(d, limits, now);
        if matches!(outcome, DeliverOutcome::Sent | DeliverOutcome::Queued)
            && !self.qos2_keys.contains(&held)
        {
            // A DUP = 0 PUBLISH whose key is held already (a stale key left by a crash) is a
            // new message: delivered above, and the key stays.
            let (origin, packet_id) = held;
            self.record(StoreOp::DedupPut {
                origin: origin.clone(),
                packet_id,
            });
            self.qos2_keys.insert((origin, packet_id));
        }
        outcome
    }

    /// The dedup key of a delivery, for a persistent session: only a client's QoS 2 message
    /// as routed from its publisher (not through a shared subscription, whose member is
    /// picked anew on a resend, and not a retained copy).
    fn dedup_key(&self, d: &Delivery) -> Option<(MqttStr, Qos2Id)> {
        if !self.persistent || d.via_share.is_some() {
            return None;
        }
        let id = d.msg.qos2_id?;
        Some((d.msg.origin.clone()?, id))
    }

    /// Whether the session holds the dedup key of publisher `origin`'s message `packet_id`.
    pub fn holds_qos2(&self, origin: &MqttStr, packet_id: u16) -> bool {
        self.qos2_keys.contains(&(origin.clone(), packet_id))
    }

    /// The dedup keys the session holds.
    pub fn qos2_keys(&self) -> impl Iterator<Item = &(MqttStr, u16)> {
        self.qos2_keys.iter()
    }

    /// Forgets a dedup key (its publisher released the message); records the deletion.
    pub fn forget_qos2(&mut self, origin: &MqttStr, packet_id: u16) -> bool {
        let removed = self.qos2_keys.remove(&(origin.clone(), packet_id));
        if removed {
            self.record(StoreOp::DedupDelete {
                origin: origin.clone(),
                packet_id,
            });
        }
        removed
    }

    /// Restores dedup keys read back from disk (nothing is recorded).
    pub fn restore_qos2_keys(&mut self, keys: impl IntoIterator<Item = (MqttStr, u16)>) {
        self.qos2_keys.extend(keys);
    }

    fn deliver_now(&mut self, d: Delivery, limits: &SessionLimits, now: Instant) -> DeliverOutcome {
        if d.msg.remaining_expiry(now).is_err() {
            self.stats.dropped_expired += 1;
            return DeliverOutcome::Dropped(DropReason::Expired);
        }
        match &self.link {
            Some(link) => {
                let window_free =
                    self.inflight.len() < self.window(limits) && self.queue.is_empty();
                let buffer_free =
                    link.out.pending_bytes() < limits.outbound_buffer_bytes_max as usize;
                if d.qos == QoS::AtMostOnce {
                    if !buffer_free {
                        self.stats.dropped_qos0_slow += 1;
                        return DeliverOutcome::Dropped(DropReason::SlowConsumer);
                    }
                    return match self.send_publish(&d, None, false, now) {
                        Ok(()) => DeliverOutcome::Sent,
                        Err(r) => DeliverOutcome::Dropped(r),
                    };
                }
                if window_free && buffer_free {
                    return self.send_inflight(d, now);
                }
                if !buffer_free {
                    link.out.mark_starved();
                }
                self.enqueue(d, limits)
            }
            None => {
                if d.qos == QoS::AtMostOnce && !limits.queue_qos0_offline {
                    self.stats.dropped_qos0_offline += 1;
                    return DeliverOutcome::Dropped(DropReason::Offline);
                }
                self.enqueue(d, limits)
            }
        }
    }

    fn window(&self, limits: &SessionLimits) -> usize {
        let client = self.link.as_ref().map_or(u16::MAX, |l| l.receive_maximum);
        limits.inflight_max.min(client) as usize
    }

    fn enqueue(&mut self, d: Delivery, limits: &SessionLimits) -> DeliverOutcome {
        if self.persistent && limits.storage_budget_spent {
            self.stats.dropped_storage_budget += 1;
            return DeliverOutcome::Dropped(DropReason::StorageBudget);
        }
        let cost = d.msg.cost_bytes();
        if cost > limits.queue_bytes_max {
            self.note_queue_full();
            return DeliverOutcome::Dropped(DropReason::QueueFull);
        }
        while self.queued_messages() >= limits.queue_messages_max as u64
            || self.queued_bytes() + cost > limits.queue_bytes_max
        {
            self.note_queue_full();
            match limits.queue_policy {
                QueuePolicy::RejectNewest => {
                    return DeliverOutcome::Dropped(DropReason::QueueFull);
                }
                QueuePolicy::DropOldest => self.drop_oldest(),
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.record(StoreOp::QueuePush {
            seq,
            delivery: d.clone(),
        });
        let on_disk_only = self.persistent
            && (self.spilled_from.is_some()
                || self.link.is_none()
                || self.queue.len() >= QUEUE_MEMORY_WINDOW);
        if on_disk_only {
            self.spilled_from.get_or_insert(seq);
            self.spilled_len += 1;
            self.spilled_bytes += cost;
        } else {
            self.queue_bytes += cost;
            debug_assert!(
                self.queue.back().is_none_or(|q| q.seq < seq),
                "queue sequence numbers go up"
            );
            self.queue.push_back(Queued { seq, delivery: d });
        }
        DeliverOutcome::Queued
    }

    /// Ends a full period once the queue is back under 90% of both limits (so that a queue
    /// hovering at its limit, a slow consumer taking one message at a time, does not log
    /// twice per message), leaving a [`QueueNote::Room`]. The shard calls it after every
    /// change of the session.
    pub fn check_queue_room(&mut self, limits: &SessionLimits) {
        let Some(since) = self.full_since_drops else {
            return;
        };
        let below = |used: u64, max: u64| used.saturating_mul(10) <= max.saturating_mul(9);
        if below(self.queued_messages(), limits.queue_messages_max as u64)
            && below(self.queued_bytes(), limits.queue_bytes_max)
        {
            self.full_since_drops = None;
            self.queue_notes.push(QueueNote::Room {
                dropped: self.stats.dropped_queue_full - since,
            });
        }
    }

    /// Counts one message refused or pushed out by the queue limits; the first of a full
    /// period leaves a [`QueueNote::Full`].
    fn note_queue_full(&mut self) {
        if self.full_since_drops.is_none() {
            self.full_since_drops = Some(self.stats.dropped_queue_full);
            self.queue_notes.push(QueueNote::Full);
        }
        self.stats.dropped_queue_full += 1;
    }

    /// Removes the oldest queued message (memory first; on disk, its size is taken as the
    /// average of what is there, so the byte count stays an estimate until refilled).
    fn drop_oldest(&mut self) {
        if let Some(q) = self.queue.pop_front() {
            self.queue_bytes = take_bytes(self.queue_bytes, q.delivery.msg.cost_bytes());
            self.record(StoreOp::QueueDelete { seq: q.seq });
        } else if let Some(from) = self.spilled_from {
            let avg = self.spilled_bytes / self.spilled_len.max(1);
            self.spilled_len -= 1;
            self.spilled_bytes = if self.spilled_len == 0 {
                0
            } else {
                self.spilled_bytes.saturating_sub(avg)
            };
            self.spilled_from = (self.spilled_len > 0).then_some(from + 1);
            self.record(StoreOp::QueueDelete { seq: from });
        }
    }

    /// Where to read the queue back from disk, and how many, when the memory window runs
    /// low while the client is online.
    pub fn needs_refill(&self) -> Option<(u64, usize)> {
        let from = self.spilled_from?;
        (self.link.is_some() && self.queue.len() < QUEUE_MEMORY_WINDOW / 2)
            .then_some((from, QUEUE_MEMORY_WINDOW - self.queue.len()))
    }

    /// Takes queue entries read back from disk (in order, starting at the `needs_refill`
    /// position). Entries the store could not read are skipped: fewer than asked, or none,
    /// ends the spill at what was read.
    pub fn refill(&mut self, entries: Vec<(u64, Delivery)>, asked: usize) {
        let got = entries.len();
        let mut last = None;
        for (seq, delivery) in entries {
            let cost = delivery.msg.cost_bytes();
            self.spilled_len = self.spilled_len.saturating_sub(1);
            self.spilled_bytes = self.spilled_bytes.saturating_sub(cost);
            self.queue_bytes += cost;
            debug_assert!(
                self.queue.back().is_none_or(|q| q.seq < seq),
                "queue read back in sequence order"
            );
            self.queue.push_back(Queued { seq, delivery });
            last = Some(seq);
        }
        match last {
            Some(l) if got == asked && l + 1 < self.next_seq => self.spilled_from = Some(l + 1),
            _ => {
                self.spilled_from = None;
                self.spilled_len = 0;
                self.spilled_bytes = 0;
            }
        }
    }

    /// Restores the durable state of a session read back at start: the queue's extent on
    /// disk and the messages in flight.
    pub fn restore(
        &mut self,
        queue_first_seq: u64,
        queue_next_seq: u64,
        queue_len: u64,
        queue_bytes: u64,
        inflight: Vec<Inflight>,
    ) {
        self.next_seq = queue_next_seq;
        if queue_len > 0 {
            self.spilled_from = Some(queue_first_seq);
            self.spilled_len = queue_len;
            self.spilled_bytes = queue_bytes;
        }
        self.inflight = inflight.into();
        self.ids_in_flight = None;
    }

    fn alloc_packet_id(&mut self) -> PacketId {
        // The window is at most 65535 wide, so a free id always exists.
        if self.ids_in_flight.is_none() && self.inflight.len() > PACKET_ID_SCAN_MAX {
            let mut set = Box::new(PacketIdSet::default());
            for i in &self.inflight {
                set.insert(i.packet_id);
            }
            self.ids_in_flight = Some(set);
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            // Ids start at 1 and wrap to 1: never 0.
            let Some(pid) = PacketId::new(id) else {
                continue;
            };
            let taken = match &self.ids_in_flight {
                Some(set) => set.contains(pid),
                None => self.inflight.iter().any(|i| i.packet_id == pid),
            };
            if !taken {
                return pid;
            }
        }
    }

    fn send_inflight(&mut self, d: Delivery, now: Instant) -> DeliverOutcome {
        let pid = self.alloc_packet_id();
        match self.send_publish(&d, Some(pid), false, now) {
            Ok(()) => {
                let state = if d.qos == QoS::AtLeastOnce {
                    OutState::AwaitPubAck
                } else {
                    OutState::AwaitPubRec
                };
                self.record(StoreOp::InflightPut {
                    packet_id: pid,
                    delivery: d.clone(),
                    state,
                });
                if let Some(set) = &mut self.ids_in_flight {
                    set.insert(pid);
                }
                self.inflight.push_back(Inflight {
                    packet_id: pid,
                    delivery: d,
                    state,
                });
                debug_assert!(
                    self.inflight.len() <= usize::from(u16::MAX),
                    "more messages in flight than packet ids"
                );
                DeliverOutcome::Sent
            }
            Err(r) => DeliverOutcome::Dropped(r),
        }
    }

    /// Encodes a PUBLISH for the current link. A message too big for the client, or expired,
    /// is not sent (MQTT-3.1.2-25: discarded as if delivered).
    fn send_publish(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> Result<(), DropReason> {
        let Some(link) = self.link.as_mut() else {
            return Err(DropReason::Offline);
        };
        let Ok(expiry) = d.msg.remaining_expiry(now) else {
            self.stats.dropped_expired += 1;
            return Err(DropReason::Expired);
        };
        let mut publish = Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: d.msg.topic.clone(),
            packet_id,
            properties: Default::default(),
            payload: d.msg.payload.clone(),
        };
        if link.version.is_v5() {
            let mut props = d.msg.properties.clone();
            props.message_expiry_interval = expiry;
            props.subscription_identifiers.clone_from(&d.sub_ids);
            publish.properties = props;
        }
        let packet = Packet::Publish(publish);
        if packet.encoded_len(link.version) > link.max_packet_bytes as usize {
            self.stats.dropped_too_large += 1;
            return Err(DropReason::TooLarge);
        }
        let Packet::Publish(mut publish) = packet else {
            unreachable!("built above")
        };
        if link.version.is_v5() && link.topic_alias_max > 0 {
            assign_alias(link, &mut publish);
        }
        let out = &link.out;
        out.send_with(|buf: &mut BytesMut| {
            publish.encode_header(link.version, buf);
            buf.extend_from_slice(&publish.payload);
        });
        self.stats.delivered += 1;
        self.stats.delivered_qos[d.qos as usize] += 1;
        Ok(())
    }

    /// Moves queued messages into the window while it has room and the connection keeps up.
    pub fn pump(&mut self, limits: &SessionLimits, now: Instant) {
        let Some(link) = &self.link else { return };
        let out = link.out.clone();
        while let Some(q) = self.queue.front() {
            if out.pending_bytes() >= limits.outbound_buffer_bytes_max as usize {
                out.mark_starved();
                break;
            }
            if q.delivery.qos != QoS::AtMostOnce && self.inflight.len() >= self.window(limits) {
                break;
            }
            let Some(Queued { seq, delivery: d }) = self.queue.pop_front() else {
                break;
            };
            self.queue_bytes = take_bytes(self.queue_bytes, d.msg.cost_bytes());
            self.record(StoreOp::QueueDelete { seq });
            if d.qos == QoS::AtMostOnce {
                let _ = self.send_publish(&d, None, false, now);
            } else {
                self.send_inflight(d, now);
            }
        }
    }

    /// Attaches a new connection: resends every message in flight (PUBLISH with DUP, or
    /// PUBREL), then drains the queue into the window (MQTT-4.4.0-1).
    pub fn attach(&mut self, link: Link, limits: &SessionLimits, now: Instant) {
        self.version = link.version;
        self.since = Some(now);
        self.link = Some(link);
        let inflight = std::mem::take(&mut self.inflight);
        self.ids_in_flight = None;
        for i in inflight {
            match i.state {
                OutState::AwaitPubAck | OutState::AwaitPubRec => {
                    if self
                        .send_publish(&i.delivery, Some(i.packet_id), true, now)
                        .is_ok()
                    {
                        self.inflight.push_back(i);
                    }
                }
                OutState::AwaitPubComp => {
                    if let Some(l) = &self.link {
                        l.out.send(&Packet::PubRel(Ack::new(i.packet_id)));
                    }
                    self.inflight.push_back(i);
                }
            }
        }
        self.pump(limits, now);
    }

    /// Detaches the connection (it closed); in-flight state stays for the next one. A
    /// persistent session's queue is on disk already and leaves memory.
    pub fn detach(&mut self, now: Instant) -> Option<Link> {
        if self.link.is_some() {
            self.since = Some(now);
        }
        if self.persistent {
            if let Some(first) = self.queue.front().map(|q| q.seq) {
                self.spilled_from = Some(first);
                self.spilled_len += self.queue.len() as u64;
                self.spilled_bytes += self.queue_bytes;
                self.queue.clear();
                self.queue_bytes = 0;
            }
        }
        self.link.take()
    }

    /// PUBACK from the client.
    pub fn on_puback(
        &mut self,
        pid: PacketId,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        self.complete(pid, OutState::AwaitPubAck)?;
        self.pump(limits, now);
        Ok(())
    }

    /// PUBREC from the client: answer PUBREL. A PUBREC with an error code ends the flow.
    pub fn on_pubrec(
        &mut self,
        pid: PacketId,
        error: bool,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        if error {
            self.complete(pid, OutState::AwaitPubRec)?;
            self.pump(limits, now);
            return Ok(());
        }
        let i = self
            .inflight
            .iter_mut()
            .find(|i| i.packet_id == pid)
            .ok_or(UnknownPacketId)?;
        match i.state {
            OutState::AwaitPubRec | OutState::AwaitPubComp => i.state = OutState::AwaitPubComp,
            OutState::AwaitPubAck => return Err(UnknownPacketId),
        }
        let op = StoreOp::InflightPut {
            packet_id: pid,
            delivery: i.delivery.clone(),
            state: OutState::AwaitPubComp,
        };
        self.record(op);
        if let Some(l) = &self.link {
            l.out.send(&Packet::PubRel(Ack::new(pid)));
        }
        Ok(())
    }

    /// PUBCOMP from the client.
    pub fn on_pubcomp(
        &mut self,
        pid: PacketId,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        self.complete(pid, OutState::AwaitPubComp)?;
        self.pump(limits, now);
        Ok(())
    }

    fn complete(&mut self, pid: PacketId, expected: OutState) -> Result<(), UnknownPacketId> {
        let pos = self
            .inflight
            .iter()
            .position(|i| i.packet_id == pid && i.state == expected)
            .ok_or(UnknownPacketId)?;
        self.inflight.remove(pos);
        if self.inflight.is_empty() {
            self.ids_in_flight = None;
        } else if let Some(set) = &mut self.ids_in_flight {
            set.remove(pid);
        }
        self.record(StoreOp::InflightDelete { packet_id: pid });
        Ok(())
    }

    /// Drops the messages in flight and queued in memory whose topic `readable` refuses (the
    /// client may no longer read it: access rules changed since they were queued). A QoS 2
    /// message already received by the client (PUBREL sent) stays, to finish its flow; one
    /// the client may have received (PUBLISH sent, no PUBREC yet) is not sent again but
    /// released (PUBREL), so that the client frees its packet id before the id is reused.
    /// Returns how many were dropped.
    pub fn drop_unreadable(&mut self, readable: impl Fn(&TopicName) -> bool) -> u64 {
        let mut dropped = Vec::new();
        self.inflight.retain_mut(|i| {
            if i.state == OutState::AwaitPubComp || readable(&i.delivery.msg.topic) {
                return true;
            }
            if i.state == OutState::AwaitPubRec {
                i.state = OutState::AwaitPubComp;
                dropped.push(StoreOp::InflightPut {
                    packet_id: i.packet_id,
                    delivery: i.delivery.clone(),
                    state: i.state,
                });
                return true;
            }
            dropped.push(StoreOp::InflightDelete {
                packet_id: i.packet_id,
            });
            false
        });
        let mut bytes = 0;
        self.queue.retain(|q| {
            let keep = readable(&q.delivery.msg.topic);
            if !keep {
                bytes += q.delivery.msg.cost_bytes();
                dropped.push(StoreOp::QueueDelete { seq: q.seq });
            }
            keep
        });
        self.queue_bytes = take_bytes(self.queue_bytes, bytes);
        let n = dropped.len() as u64;
        if n > 0 {
            self.ids_in_flight = None;
            for op in dropped {
                self.record(op);
            }
        }
        n
    }

    /// Takes the queued (not in-flight) messages that came through shared subscriptions, so
    /// that the group can give them to a member that is online.
    pub fn take_queued_shared(&mut self) -> Vec<Delivery> {
        let (shared, own): (VecDeque<Queued>, VecDeque<Queued>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| q.delivery.via_share.is_some());
        self.queue = own;
        self.queue_bytes = self.queue.iter().map(|q| q.delivery.msg.cost_bytes()).sum();
        shared
            .into_iter()
            .map(|q| {
                self.record(StoreOp::QueueDelete { seq: q.seq });
                q.delivery
            })
            .collect()
    }

    /// Everything that came through shared subscriptions and was not yet delivered (queued,
    /// or QoS 1/2 sent but not acknowledged), for when the session ends.
    pub fn take_undelivered_shared(&mut self) -> Vec<Delivery> {
        let mut v: Vec<Delivery> = Vec::new();
        let mut done = Vec::new();
        self.ids_in_flight = None;
        self.inflight.retain(|i| {
            if i.delivery.via_share.is_some() && i.state != OutState::AwaitPubComp {
                v.push(i.delivery.clone());
                done.push(i.packet_id);
                false
            } else {
                true
            }
        });
        for packet_id in done {
            self.record(StoreOp::InflightDelete { packet_id });
        }
        v.extend(self.take_queued_shared());
        v
    }
}

/// Uses an existing alias for the topic or assigns a new one while there is room; the first
/// PUBLISH with a new alias carries the topic, later ones an empty topic (MQTT-3.3.2-12).
fn assign_alias(link: &mut Link, publish: &mut Publish) {
    if let Some(&alias) = link.aliases.get(&publish.topic) {
        publish.properties.topic_alias = Some(alias);
        publish.topic = TopicName::empty();
        return;
    }
    let next = link.aliases.len() + 1;
    if next <= link.topic_alias_max as usize {
        let Some(alias) = u16::try_from(next).ok().and_then(NonZeroU16::new) else {
            return;
        };
        link.aliases.insert(publish.topic.clone(), alias);
        publish.properties.topic_alias = Some(alias);
    }
}

/// `held - bytes` for a byte count that can never go below zero: a larger `bytes` is a
/// bookkeeping bug, loud in debug builds; release builds clamp instead of wrapping.
fn take_bytes(held: u64, bytes: u64) -> u64 {
    debug_assert!(
        bytes <= held,
        "queued bytes would go negative: {held} - {bytes}"
    );
    held.saturating_sub(bytes)
}

#[cfg(test)]
mod tests {
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
        s.on_pubrec(PacketId::new(2).unwrap(), false, &LIMITS, now)
            .unwrap();
        let _ = sent(&out, ProtocolVersion::V5);
        s.detach(now);
        let out2 = Rc::new(Outbound::new(ProtocolVersion::V5));
        s.attach(Link::new(2, out2.clone(), 10, 1 << 20, 0), &LIMITS, now);
        let packets = sent(&out2, ProtocolVersion::V5);
        assert!(
            matches!(&packets[0], Packet::Publish(p) if p.dup && p.packet_id.unwrap().get() == 1)
        );
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
}

#[cfg(test)]
mod durable_tests {
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
}
