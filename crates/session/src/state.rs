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

mod flight;
mod link;
mod queue;

use link::HeldAck;

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
    /// A QoS 1/2 message is in flight under `packet_id`, in `state`. `fresh`: the packet
    /// id was just taken (nothing is stored under it); otherwise a state change.
    InflightPut {
        packet_id: PacketId,
        delivery: Delivery,
        state: OutState,
        fresh: bool,
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
    pub subscriptions: crate::subscriptions::Subscriptions,
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
            subscriptions: Default::default(),
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
                    fresh: false,
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
mod tests;

#[cfg(test)]
mod durable_tests;
