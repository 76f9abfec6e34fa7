//! The MQTT work of one shard: its sessions, its subscriptions, its copy of the cross-shard
//! routing index and of the retained messages, the shared-subscription groups it is home to,
//! and the will/expiry timers. No sockets: connections reach it through [`ConnCtx`] and
//! [`Outbound`] buffers, other shards through [`Event`]s pushed to [`Core::send`].
//!
//! Routing (see `../../README.md`): a publish is matched once against the index (filter ->
//! shards with subscribers), then sent once to each target shard, which matches it against
//! its own subscriptions. A SUBSCRIBE that adds a filter to the index is acknowledged only
//! after every shard has applied the change, so that a publish that follows the SUBACK from
//! anywhere finds the new subscriber.
//!
//! QoS 2 exactly once across a crash: a client's QoS 2 message is routed with its dedup key
//! (publisher client id, publisher packet id; [`Message::qos2_id`]). Every persistent
//! session that stores it keeps the key, on disk in the same batch as its copy, so a resend
//! after a crash (DUP, same packet id, routed again because the publisher's shard had not
//! stored the id yet) is skipped where it was stored and stored where it was not. When the
//! publisher releases the message (PUBREL), its shard has every shard forget the key
//! ([`Event::Qos2Release`]) and waits for those deletions to be durable before it deletes
//! the packet id and sends PUBCOMP: only then may the client reuse the id. Each shard finds
//! the sessions holding a key through its [`Qos2Keys`].
//!
//! ## Parts
//! [`Core`] (below, with the types the parts share) holds the sessions and ties the parts
//! together; each part is a file, one concern each. Where a part has state of its own, a
//! struct in its file owns it behind a small API with unit tests that need no `Core`
//! (named in brackets); the file's `impl Core` block is the glue to the rest:
//! - `login` ([`Logins`]): credentials and access rules; `life`: CONNECT, takeover,
//!   disconnect, wills, expiry, the end of a session;
//! - `inbound`: a connection's packets (PUBLISH, DISCONNECT; SUBSCRIBE and UNSUBSCRIBE in
//!   `subscriptions`);
//! - `routing` ([`RoutingIndex`]): the cross-shard index and local delivery; `shared`
//!   ([`SharedGroups`]): shared groups at their home; `retained` ([`RetainedVersions`]):
//!   retained versions and tombstones; `qos2` ([`Qos2Keys`]): QoS 2 dedup keys;
//! - `events`: what other shards send; `round_trip`: this shard's cross-shard round trips,
//!   each a [`RoundTrip`] counting its answers and ending in a typed [`Completion`];
//! - `durable` ([`DurableLog`]): the store batch per session, group commit and the waiters
//!   on it, the queued-bytes budget; `recovery`: reading the store back at start,
//!   re-homing;
//! - `timers` ([`Timers`]): will and expiry timers; `inspect`: what the admin API reads.
//!
//! Unit tests sit in `*_tests.rs` beside them, with shared helpers in `tests_support`.

use hashbrown::HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::budget::QueuedBudget;
use super::event::{Event, Fate, Rehomed, RetainVersion, SharedMember, Token};
use super::metrics::LatencyHistogram;
use super::shardset::ShardSet;
use crate::auth::{Access, Auth, LoginCheck, LoginFailure, PasswordHash, VerifiedCache};
use crate::config::{Config, Durability};
use crate::protocol::{
    Ack, ConnAck, ConnAckProperties, Connect, Disconnect, MqttStr, Packet, ProtocolVersion,
    Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName, UnsubAck, Unsubscribe,
};
use crate::session::state::{DeliverOutcome, DropReason, QueueNote, SessionStats, StoreOp};
use crate::session::{
    owner_shard, retained::RetainedStore, trie::TopicTrie, Delivery, Link, Message, Outbound,
    Qos2Id, Session, SessionLimits, SharedMessage, Subscription, Will,
};
use crate::storage::{
    CountersRecord, InflightRecord, MessageRecord, QueuedRecord, SessionRecord, StorageError,
    Store, StoreBatch, SubscriptionRecord, WallClock, WillRecord,
};

pub mod cluster;
mod durable;
mod events;
mod inbound;
pub mod inspect;
mod life;
mod login;
mod qos2;
mod recovery;
mod retained;
mod round_trip;
mod routing;
mod shared;
mod subscriptions;
mod timers;
use cluster::{in_bits, ClusterPort, NodeGroups, ReplicaLink, Routed};
use durable::DurableLog;
pub use inspect::{
    Page, RetainedInfo, SessionFilter, SessionInfo, SubscriptionInfo, PAGE_ITEMS_MAX,
};
use login::Logins;
use qos2::Qos2Keys;
use retained::RetainedVersions;
use round_trip::{Completion, PubAckDone, RoundTrip, SubAckDone, Then};
use routing::RoutingIndex;
use shared::{SharedGroups, SharedOffer};
use timers::{TimerKind, Timers};

/// Reads of a session's queue from disk in one go: more happen only when a whole window
/// read back was dropped (its topics no longer readable); the rest waits for the next tick.
const REFILL_ROUNDS_MAX: usize = 8;

/// How many members a shared message is offered to before it is dropped.
const SHARED_ATTEMPTS_MAX: u8 = 3;

/// A subscription as the shard's topic tree holds it.
#[derive(Clone, Debug)]
enum LocalSub {
    /// A session of this shard.
    Client {
        client_id: MqttStr,
        options: SubscriptionOptions,
        id: Option<u32>,
    },
    /// A shared group whose home is this shard.
    Group { key: Arc<str> },
}

/// What a connection task knows about its connection, passed into every call.
#[derive(Debug)]
pub struct ConnCtx {
    pub conn_id: u64,
    pub client_id: MqttStr,
    pub version: ProtocolVersion,
    pub out: Rc<Outbound>,
    /// The user name access control knows the client by (`None`: anonymous).
    pub username: Option<MqttStr>,
    /// Topic aliases the client set on this connection (they do not outlive it).
    aliases_in: HashMap<u16, TopicName>,
    /// The client's address (for the log), when known.
    pub peer: Option<std::net::SocketAddr>,
}

impl ConnCtx {
    /// The context of a connection the broker is ending on its own (an operator's kick).
    fn closing(
        conn_id: u64,
        client_id: MqttStr,
        version: ProtocolVersion,
        out: Rc<Outbound>,
        peer: Option<std::net::SocketAddr>,
    ) -> ConnCtx {
        ConnCtx {
            conn_id,
            client_id,
            version,
            out,
            username: None,
            aliases_in: HashMap::new(),
            peer,
        }
    }
}

/// What the connection task does after a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client sent DISCONNECT: end the connection (with or without its will).
    Disconnect(Ending),
}

/// Why a connection ended, for will and session decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// DISCONNECT 0x00: discard the will.
    Normal,
    /// DISCONNECT 0x04: publish the will.
    WithWill,
    /// No DISCONNECT: socket closed, keep alive expired, protocol error.
    Lost,
}

/// What a completed CONNECT gives the connection task.
#[derive(Debug)]
pub struct Accepted {
    pub ctx: ConnCtx,
    /// The keep alive to enforce (seconds, 0 = none).
    pub keep_alive_s: u16,
}

/// The connect/disconnect lines of the current second (see [`Core::conn_line`]).
#[derive(Debug, Clone, Copy)]
struct ConnLines {
    since: Instant,
    used: u32,
    held_back: u64,
}

/// What a held acknowledgement waits for (see [`Core::ack_when_durable`]).
#[derive(Debug, Clone, Copy)]
struct AckWait {
    /// The round trip's token; `None`: nothing to wait for, send at once.
    token: Option<Token>,
    /// Answers to expect from other shards.
    remote: usize,
    /// What this shard's own sessions did with the message.
    fate: Fate,
    /// A node could not be handed the message: not stored everywhere.
    failed: bool,
}

impl AckWait {
    fn of(token: Option<Token>, remote: usize) -> AckWait {
        AckWait {
            token,
            remote,
            fate: Fate::default(),
            failed: false,
        }
    }
}

/// See [`Core::dispatch`].
#[derive(Debug, Clone, Copy)]
struct Dispatch {
    to: usize,
    token: Token,
    remote: usize,
}

/// Where [`Core::shared_dispatch`] sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatched {
    /// To a member on this shard: its copy is covered by this shard's own durability.
    Local,
    /// To a member on another shard, which answers the reply itself.
    Remote,
    /// No member could take it.
    Dropped,
}

/// Who waits for the shard's writes so far to be durable.
#[derive(Debug, Clone)]
enum Waiter {
    /// A round trip of this shard (see `round_trip`).
    Local(Token),
    /// Another shard's round trip: answer it `Ack`, with what this shard's sessions did
    /// with the message it asked about.
    Remote { to: usize, token: Token, fate: Fate },
}

impl Waiter {
    /// Another shard's round trip that asked nothing about a message's fate.
    fn answer(to: usize, token: Token) -> Waiter {
        Waiter::Remote {
            to,
            token,
            fate: Fate::default(),
        }
    }
}

/// Counters of one shard: plain integers, the shard is single-threaded. What sessions count
/// (deliveries, drops) stays in each [`Session`] while it lives and is added to
/// `ended_sessions` when it ends; [`Core::delivery_totals`] sums both.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoreStats {
    pub connections: u64,
    pub connects_total: u64,
    pub messages_received: u64,
    /// PUBLISH packets received from clients, by QoS.
    pub received_qos: [u64; 3],
    pub messages_routed_remote: u64,
    /// Messages other shards routed here.
    pub messages_from_remote: u64,
    pub retained_dropped_full: u64,
    /// Retained deletions forgotten before `limits.retained_deletions_keep_s` to stay
    /// within their bounds.
    pub retained_deletions_forgotten: u64,
    pub shared_dropped_no_member: u64,
    /// Client PUBLISHes to `$SYS/...` (and wills there), dropped.
    pub sys_publish_dropped: u64,
    pub wills_published: u64,
    pub sessions_expired: u64,
    /// CONNECTs refused for their credentials (or for none).
    pub logins_failed: u64,
    /// CONNECTs refused because `auth.verifications_inflight_max` checks were in flight.
    pub logins_busy: u64,
    /// PUBLISHes (wills included) dropped because the client may not write the topic.
    pub acl_denied_publish: u64,
    /// Subscriptions refused by the ACL or `[access] subscribe_deny`.
    pub acl_denied_subscribe: u64,
    /// Messages not delivered to a subscriber that may not read the topic.
    pub acl_denied_delivery: u64,
    /// Sessions discarded through the admin API.
    pub sessions_deleted: u64,
    /// Clients disconnected through the admin API.
    pub sessions_kicked: u64,
    /// CONNECTs refused because the client id's session belongs to another user.
    pub takeovers_refused: u64,
    /// Messages handed to the cluster thread for other nodes.
    pub cluster_forwarded: u64,
    /// Messages for other nodes dropped (or refused) because the cluster thread's queue
    /// was full.
    pub cluster_forward_dropped: u64,
    /// Messages other nodes sent here.
    pub cluster_received: u64,
    /// Sessions discarded because another node owns their slot now (a fail-over).
    pub sessions_orphaned: u64,
    /// Sessions moved here from another node (it joined, or it left).
    pub sessions_moved_in: u64,
    /// Sessions moved from here to another node (deleted here once it had them).
    pub sessions_moved_out: u64,
    /// Moved sessions refused (damaged records).
    pub sessions_move_refused: u64,
    /// Sessions of a failed node's stream skipped in a fail-over's rebuild: their records
    /// are damaged (nothing of them can be served; the rest of the node's sessions are).
    pub sessions_rebuild_damaged: u64,
    /// QoS 2 keys a session moving away forgot after it may have been read for the move,
    /// forwarded to the node it moves to.
    pub moved_keys_forwarded: u64,
    /// QoS 2 keys of sessions moved here past the bound on those tracked for a late
    /// `FORGET` (which then does not apply to them).
    pub adopted_keys_untracked: u64,
    /// Changes (units) dropped past `cluster.replication_pending_bytes_max` waiting for
    /// the replicated stream (after failed appends, or while one is slow to come back): a
    /// snapshot puts them in the stream.
    pub replica_changes_dropped: u64,
    /// QoS 1/2 messages refused (not stored) for a session that was moving to another node.
    pub moving_refused: u64,
    pub ended_sessions: SessionStats,
    /// The drop counters of the sessions read back from disk at start: part of the
    /// sessions' own counts, not of this run's (see [`Core::delivery_totals`]).
    pub restored_drops: SessionStats,
    /// Duration of each storage batch commit (the write, before fsync).
    pub write_latency: LatencyHistogram,
    /// Duration of each persist (fsync) of the shard's store.
    pub fsync_latency: LatencyHistogram,
    /// With replicated sessions: how much longer each group commit waited for the
    /// replicated stream after its fsync (zero when the stream answered first).
    pub replica_wait: LatencyHistogram,
}

impl CoreStats {
    /// A connection of this shard ended: counted down, never below zero (a second count
    /// of one connection is a bug, loud in debug builds).
    fn connection_ended(&mut self) {
        debug_assert!(self.connections > 0, "a connection ended twice");
        self.connections = self.connections.saturating_sub(1);
    }
}

/// What a publisher is told once its message's round trips are done: `None` for success,
/// or the reason of a refusal. A write that failed (a full disk) is 0x80; a message refused
/// for the broker-wide storage budget is 0x97 (Quota exceeded) — both mean "not stored",
/// and a 3.x client is disconnected instead so that it resends. A message that every
/// session it reached refused because its queue was full is 0x97 for an MQTT 5 client; a
/// 3.x client cannot be told and is acknowledged (the drop is counted and logged). A
/// message that some session took is a success, whatever the others did.
fn refusal(failed: bool, fate: Fate, v5: bool) -> Option<ReasonCode> {
    if failed || fate.moving {
        Some(ReasonCode::UnspecifiedError)
    } else if fate.budget_spent || (v5 && fate.queue_full && !fate.kept) {
        Some(ReasonCode::QuotaExceeded)
    } else {
        None
    }
}

/// Whether a topic is under the broker's own `$SYS/`, where clients may not publish. (The
/// bare topic `$SYS` is left to clients: nothing of the broker's is there.)
fn is_sys_topic(topic: &str) -> bool {
    topic.starts_with("$SYS/")
}

/// Who a connecting client is, as established before [`Core::connect_as`].
#[derive(Debug, Clone)]
pub struct Login {
    /// The user name access control knows the client by (`None`: anonymous).
    pub username: Option<MqttStr>,
    /// The credentials were refused: CONNACK 0x86 / 0x04 (0x89 / 0x03 when busy).
    pub refused: Option<LoginFailure>,
    /// For the log line of a refusal.
    pub peer: Option<std::net::SocketAddr>,
}

impl Login {
    /// An anonymous client, accepted.
    pub fn anonymous() -> Login {
        Login {
            username: None,
            refused: None,
            peer: None,
        }
    }
}

/// The next step of a login (see [`Core::check_login`]).
#[derive(Debug)]
pub enum LoginStep {
    Done(Login),
    /// Verify the password off the executor ([`Verification::run`]), then hand the result
    /// to [`Core::verified`].
    Verify(Verification),
}

/// A slow password check, to run on a blocking thread.
pub struct Verification {
    login: Login,
    hash: Arc<PasswordHash>,
    password: bytes::Bytes,
    digest: [u8; 32],
}

impl std::fmt::Debug for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verification")
            .field("user", &self.login.username)
            .field("hash", &self.hash)
            .finish()
    }
}

impl Verification {
    /// Checks the password (slow; blocks the calling thread).
    pub fn run(&self) -> bool {
        self.hash.verify(&self.password)
    }
}

/// Where events for other shards go; the service implements it with its outbox.
pub trait EventSink {
    fn push(&self, to: usize, event: Event);
    /// There are writes to make durable.
    fn wake_committer(&self);
}

/// The matches of one publish on this shard, before they are grouped per client.
#[derive(Debug, Default)]
struct DeliverScratch {
    hits: Vec<(MqttStr, SubscriptionOptions, Option<u32>)>,
    groups: Vec<Arc<str>>,
}

/// The shard's MQTT state.
pub struct Core {
    pub id: usize,
    pub count: usize,
    cfg: Rc<Config>,
    limits: SessionLimits,
    /// Boxed: the table keeps a pointer per slot, not a whole session (a table is up to
    /// twice the live count, and its free slots would each hold a session's size).
    sessions: HashMap<MqttStr, Box<Session>>,
    /// Buffers of `deliver_local`, kept between publishes.
    scratch: DeliverScratch,
    subs: TopicTrie<Vec<LocalSub>>,
    /// Filter -> shards with subscribers of it (a copy on every shard; see `routing`).
    index: RoutingIndex,
    retained: RetainedStore,
    /// The shared groups whose home is this shard.
    groups: SharedGroups,
    timers: Timers,
    next_conn_id: u64,
    /// Source of session epochs: unique over every incarnation of every session, so that a
    /// timer set for an ended session can never match a new one with the same client id.
    next_epoch: u64,
    next_token: Token,
    /// Cross-shard round trips under way, by token (see `round_trip`).
    pending: HashMap<Token, RoundTrip>,
    /// This shard's side of a cluster; `None` for a broker that runs alone.
    cluster: Option<ClusterPort>,
    sink: Rc<dyn EventSink>,
    /// The shard's database; `None` with `storage.durability = "memory"`.
    store: Option<Store>,
    durability: Durability,
    /// Writes since the last commit to the store, applied as one atomic batch before the
    /// next persist (or a read of the store, or when `storage.write_batch_bytes_max` full).
    open_batch: Option<StoreBatch>,
    /// With replicated sessions: what the batches applied since the last group commit
    /// changed (one unit each, see `storage::replica`), for the replication log.
    replica_units: Vec<Vec<u8>>,
    /// Bytes of `replica_units`.
    replica_units_bytes: usize,
    /// The stop's last group commit is done (`end_replication`): a change applied to the
    /// store after it (this shard serves its peers until they end too) never reaches the
    /// stream, and says so on the replica link.
    replication_ended: bool,
    /// Changes waiting for the stream were dropped (past the bound): the next append asks
    /// for a snapshot.
    replica_gap: bool,
    /// An acknowledgement waits for an append even if nothing changed (`replica_barrier`).
    replica_barrier: bool,
    /// A retained message was written since the last group commit: in `replicated` mode
    /// that commit fsyncs (retained messages are not restored from the stream).
    fsync_due: bool,
    /// The number of the last batch whose changes went to the replicated stream, written
    /// in the batch itself (`StoreBatch::commit_numbered`): a restart that brings the store
    /// up to the stream applies only the units numbered after the store's.
    replica_batch: u64,
    /// Whether batches may drop a put that they delete again when the key is new (see
    /// `StoreBatch`); off for the rest of the run once the store and the sessions may
    /// disagree (a lost write, records skipped at start).
    elide: bool,
    log: DurableLog,
    /// Peers whose recovery has been applied here (see [`Event::RecoveryDone`]).
    recovered_peers: usize,
    /// While a routed message with a reply is delivered here: where shared-group members on
    /// other shards answer, and how many were sent the message.
    dispatch: Option<Dispatch>,
    /// QoS 2 dedup keys held by this shard's persistent sessions (see the module docs).
    qos2: Qos2Keys,
    /// Versions of the retained writes applied here, and the clock for this shard's own.
    retained_versions: RetainedVersions,
    /// Set by [`Core::close_all`]: the broker is stopping, and publishes no will.
    stopping: bool,
    /// Password and ACL rules in force, and logins verified or being verified.
    logins: Logins,
    /// What the sessions reached by the delivery under way did with it (see
    /// [`Core::with_fate`]).
    fate: Fate,
    /// How many [`Core::with_fate`] calls are under way (nested deliveries).
    fate_depth: u32,
    /// The connect/disconnect lines logged in the current second.
    conn_lines: ConnLines,
    /// The broker-wide budget for queued data, shared with the other shards.
    budget: Arc<QueuedBudget>,
    /// Queued bytes of this shard's persistent sessions (what it counts in `budget`).
    queued_bytes: u64,
    /// Persistent sessions whose drop counters changed without a write to carry them (at
    /// most one entry per session): written together by [`Core::flush_counters`].
    counters_dirty: hashbrown::HashSet<MqttStr>,
    /// Sessions whose queue is read back from disk at the next timer tick (see
    /// [`REFILL_ROUNDS_MAX`]).
    refill_later: hashbrown::HashSet<MqttStr>,
    /// While the budget is spent: the refusals counted when it became spent.
    budget_spent_since: Option<u64>,
    /// Messages refused by persistent sessions of this shard for the budget.
    budget_refused: u64,
    pub stats: CoreStats,
    /// The wall clock at start: what the admin API shows as times of day is read against
    /// one anchor, so that the same moment reads the same every time.
    wall: WallClock,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.id)
            .field("sessions", &self.sessions.len())
            .field("filters", &self.subs.len())
            .field("retained", &self.retained.len())
            .finish()
    }
}

impl Core {
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        sink: Rc<dyn EventSink>,
        store: Option<Store>,
        budget: Arc<QueuedBudget>,
    ) -> Core {
        let durability = if store.is_some() {
            cfg.storage.durability
        } else {
            Durability::Memory
        };
        let l = &cfg.limits;
        let limits = SessionLimits {
            inflight_max: l.inflight_max,
            queue_messages_max: l.queue_messages_max,
            queue_bytes_max: l.queue_bytes_max,
            outbound_buffer_bytes_max: l.outbound_buffer_bytes_max,
            queue_qos0_offline: cfg.sessions.queue_qos0_offline,
            queue_policy: cfg.sessions.queue_policy,
            storage_budget_spent: false,
        };
        Core {
            id,
            count,
            limits,
            sessions: HashMap::new(),
            scratch: DeliverScratch::default(),
            subs: TopicTrie::default(),
            index: RoutingIndex::default(),
            retained: RetainedStore::default(),
            groups: SharedGroups::default(),
            timers: Timers::default(),
            next_conn_id: 1,
            next_epoch: 1,
            next_token: 1,
            pending: HashMap::new(),
            cluster: None,
            sink,
            store,
            durability,
            open_batch: None,
            replica_units: Vec::new(),
            replica_units_bytes: 0,
            replication_ended: false,
            replica_gap: false,
            replica_barrier: false,
            fsync_due: false,
            replica_batch: 0,
            elide: true,
            log: DurableLog::default(),
            recovered_peers: 0,
            dispatch: None,
            qos2: Qos2Keys::default(),
            retained_versions: RetainedVersions::new(
                id,
                Instant::now(),
                cfg.limits.retained_messages_max as usize,
                cfg.limits.retained_deletions_bytes_max as usize,
                Duration::from_secs(cfg.limits.retained_deletions_keep_s as u64),
            ),
            stopping: false,
            logins: Logins::new(&cfg),
            fate: Fate::default(),
            fate_depth: 0,
            conn_lines: ConnLines {
                since: Instant::now(),
                used: 0,
                held_back: 0,
            },
            budget,
            queued_bytes: 0,
            counters_dirty: hashbrown::HashSet::new(),
            refill_later: hashbrown::HashSet::new(),
            budget_spent_since: None,
            budget_refused: 0,
            cfg,
            stats: CoreStats::default(),
            wall: WallClock::now(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn config_rc(&self) -> Rc<Config> {
        self.cfg.clone()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    pub fn session(&self, client_id: &MqttStr) -> Option<&Session> {
        self.sessions.get(client_id).map(|s| &**s)
    }

    /// Sends an event to shard `to`; events for this shard are handled at once.
    fn send(&mut self, to: usize, event: Event) {
        if to == self.id {
            self.on_event(self.id, event, Instant::now());
        } else {
            self.sink.push(to, event);
        }
    }

    fn peers(&self) -> impl Iterator<Item = usize> + 'static {
        let (id, count) = (self.id, self.count);
        (0..count).filter(move |&s| s != id)
    }

    fn bump(counter: &mut u64) -> u64 {
        *counter += 1;
        *counter
    }

    fn token(&mut self) -> Token {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---------------------------------------------------------------- storage

    /// Whether a connect/disconnect line may be logged now (`log.connection_lines_per_s`
    /// per second); the lines held back are summed up once the second is over.
    fn conn_line(&mut self, now: Instant) -> bool {
        let max = self.cfg.log.connection_lines_per_s;
        if max == 0 {
            return false;
        }
        let c = &mut self.conn_lines;
        if now.saturating_duration_since(c.since) >= Duration::from_secs(1) {
            if c.held_back > 0 {
                tracing::info!(
                    shard = self.id,
                    lines = c.held_back,
                    "connect/disconnect lines held back (log.connection_lines_per_s)"
                );
            }
            *c = ConnLines {
                since: now,
                used: 0,
                held_back: 0,
            };
        }
        if c.used < max {
            c.used += 1;
            true
        } else {
            c.held_back += 1;
            false
        }
    }

    /// Runs `f` (a delivery) and returns what the sessions it reached did with the message;
    /// an enclosing delivery sees it too.
    fn with_fate(&mut self, f: impl FnOnce(&mut Core)) -> Fate {
        self.read_budget();
        let outer = std::mem::take(&mut self.fate);
        self.fate_depth += 1;
        f(self);
        self.fate_depth -= 1;
        let mine = std::mem::replace(&mut self.fate, outer);
        if self.fate_depth > 0 {
            self.fate.merge(mine);
        }
        mine
    }

    /// Notes what a session did with a message, for the delivery's [`Fate`].
    fn note_outcome(&mut self, outcome: DeliverOutcome) {
        match outcome {
            DeliverOutcome::Sent | DeliverOutcome::Queued | DeliverOutcome::Duplicate => {
                self.fate.kept = true
            }
            DeliverOutcome::Dropped(DropReason::QueueFull) => self.fate.queue_full = true,
            DeliverOutcome::Dropped(DropReason::StorageBudget) => {
                self.fate.budget_spent = true;
                self.budget_refused += 1;
            }
            DeliverOutcome::Dropped(_) => {}
        }
    }
}

/// Whether the session's client may receive a message on `topic`. A session read back from
/// disk has no identity until its client returns: its messages are queued (its
/// subscriptions were checked when made).
fn may_read(auth: &Auth, s: &Session, topic: &TopicName) -> bool {
    match &s.identity {
        None => true,
        Some(user) => readable(auth, user, &s.client_id, topic),
    }
}

/// Whether `user` (`None`: anonymous) with client id `client_id` may read `topic`.
fn readable(auth: &Auth, user: &Option<MqttStr>, client_id: &MqttStr, topic: &TopicName) -> bool {
    auth.allows(
        user.as_ref().map(|u| u.as_str()),
        client_id,
        topic.as_str(),
        Access::Read,
    )
}
#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod qos2_dedup_tests;
#[cfg(test)]
mod subscribe_tests;
#[cfg(test)]
mod tests_support;
#[cfg(test)]
mod timer_tests;
