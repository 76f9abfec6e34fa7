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
//! the sessions holding a key through `qos2_holders`.

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
    Store, SubscriptionRecord, WallClock, WillRecord,
};

pub mod inspect;
pub use inspect::{
    Page, RetainedInfo, SessionFilter, SessionInfo, SubscriptionInfo, PAGE_ITEMS_MAX,
};

/// Reads of a session's queue from disk in one go: more happen only when a whole window
/// read back was dropped (its topics no longer readable); the rest waits for the next tick.
const REFILL_ROUNDS_MAX: usize = 8;

/// How many members a shared message is offered to before it is dropped.
const SHARED_ATTEMPTS_MAX: u8 = 3;

/// How long a retained deletion is remembered.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(60);

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

/// A shared subscription group, at its home shard.
#[derive(Debug, Default)]
struct Group {
    members: Vec<SharedMember>,
    next: usize,
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

#[derive(Debug)]
enum Pending {
    /// A SUBACK waiting for index updates and group joins to be applied everywhere.
    SubAck {
        client_id: MqttStr,
        conn_id: u64,
        remaining: usize,
        suback: SubAck,
        retained: Vec<Delivery>,
        /// Filters whose index additions this SUBACK waits for (see `Core::index_adding`).
        adding: Vec<Arc<str>>,
    },
    /// A group join at its home waiting for its index update; then answer `token` to `to`.
    Relay {
        to: usize,
        token: Token,
        remaining: usize,
        failed: bool,
        /// What the sessions reached so far did with the relayed message.
        fate: Fate,
    },
    /// A PUBACK/PUBREC/PUBCOMP held on the publisher's link until every shard that stored
    /// the message for a persistent session (or forgot its dedup key) and this shard's own
    /// writes are durable; then `then`.
    PubAck {
        client_id: MqttStr,
        conn_id: u64,
        remaining: usize,
        failed: bool,
        /// What the sessions the message reached did with it (see [`Fate`]).
        fate: Fate,
        then: Then,
    },
    /// A session sent to its new owner: delete the local copy once the owner has it.
    Rehome { client_id: String },
}

/// What a [`Pending::PubAck`] does once its round trips are done, before the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Send it.
    Ack,
    /// PUBREC: every copy of the QoS 2 message `pid` is durable. With `store`, store the
    /// packet id (the publisher's session is persistent) and send PUBREC once that is
    /// durable too. On failure, forget the id, so that a resend is routed again.
    Qos2Received { pid: u16, store: bool },
    /// PUBCOMP: every shard forgot the message's dedup key; delete the stored packet id and
    /// send PUBCOMP once that is durable.
    DeleteIncoming(u16),
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
}

impl AckWait {
    fn of(token: Option<Token>, remote: usize) -> AckWait {
        AckWait {
            token,
            remote,
            fate: Fate::default(),
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
    /// A round trip of this shard (`Pending`).
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

/// The group-commit log of one shard: every write bumps `write_seq`; a persist that started
/// after write `n` makes everything up to `n` durable and releases who waited on it.
#[derive(Debug, Default)]
struct DurableLog {
    write_seq: u64,
    synced_seq: u64,
    /// The last write that failed: a persist covering it does not make it durable.
    failed_seq: u64,
    waiters: std::collections::VecDeque<(u64, Waiter)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimerKind {
    Will { client_id: MqttStr, epoch: u64 },
    Expire { client_id: MqttStr, epoch: u64 },
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
    pub ended_sessions: SessionStats,
    /// The drop counters of the sessions read back from disk at start: part of the
    /// sessions' own counts, not of this run's (see [`Core::delivery_totals`]).
    pub restored_drops: SessionStats,
    /// Duration of each storage batch commit (the write, before fsync).
    pub write_latency: LatencyHistogram,
    /// Duration of each persist (fsync) of the shard's store.
    pub fsync_latency: LatencyHistogram,
}

/// What a publisher is told once its message's round trips are done: `None` for success,
/// or the reason of a refusal. A write that failed (a full disk) is 0x80; a message refused
/// for the broker-wide storage budget is 0x97 (Quota exceeded) — both mean "not stored",
/// and a 3.x client is disconnected instead so that it resends. A message that every
/// session it reached refused because its queue was full is 0x97 for an MQTT 5 client; a
/// 3.x client cannot be told and is acknowledged (the drop is counted and logged). A
/// message that some session took is a success, whatever the others did.
fn refusal(failed: bool, fate: Fate, v5: bool) -> Option<ReasonCode> {
    if failed {
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
    index: TopicTrie<ShardSet>,
    retained: RetainedStore,
    groups: HashMap<Arc<str>, Group>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_kinds: HashMap<u64, TimerKind>,
    next_timer: u64,
    next_conn_id: u64,
    /// Source of session epochs: unique over every incarnation of every session, so that a
    /// timer set for an ended session can never match a new one with the same client id.
    next_epoch: u64,
    next_token: Token,
    pending: HashMap<Token, Pending>,
    sink: Rc<dyn EventSink>,
    /// The shard's database; `None` with `storage.durability = "memory"`.
    store: Option<Store>,
    durability: Durability,
    log: DurableLog,
    /// Peers whose recovery has been applied here (see [`Event::RecoveryDone`]).
    recovered_peers: usize,
    /// While a routed message with a reply is delivered here: where shared-group members on
    /// other shards answer, and how many were sent the message.
    dispatch: Option<Dispatch>,
    /// QoS 2 dedup keys held by this shard's persistent sessions: publisher client id ->
    /// publisher packet id -> the sessions holding the key (see the module docs).
    qos2_holders: HashMap<MqttStr, HashMap<u16, Vec<MqttStr>>>,
    /// Filters whose addition to the peers' indexes is still in flight, with how many
    /// SUBACKs wait for one. A SUBSCRIBE to such a filter (by any local client) must wait
    /// too: its SUBACK would otherwise promise messages the peers do not route here yet.
    index_adding: HashMap<Arc<str>, u32>,
    /// The version of the last write applied to each retained topic; deletions stay as
    /// tombstones for [`TOMBSTONE_KEEP`] so that an older write arriving late cannot revive
    /// a deleted message.
    retained_versions: HashMap<TopicName, (RetainVersion, Option<Instant>)>,
    last_retain_ns: u64,
    last_prune: Instant,
    /// Set by [`Core::close_all`]: the broker is stopping, and publishes no will.
    stopping: bool,
    /// Password and ACL rules, shared read-only by every shard; replaced on reload.
    auth: Arc<Auth>,
    /// Logins verified recently (see [`VerifiedCache`]).
    verified: VerifiedCache,
    /// Slow verifications running off the executor now.
    verifying: u32,
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
            index: TopicTrie::default(),
            retained: RetainedStore::default(),
            groups: HashMap::new(),
            timers: BinaryHeap::new(),
            timer_kinds: HashMap::new(),
            next_timer: 0,
            next_conn_id: 1,
            next_epoch: 1,
            next_token: 1,
            pending: HashMap::new(),
            sink,
            store,
            durability,
            log: DurableLog::default(),
            recovered_peers: 0,
            dispatch: None,
            qos2_holders: HashMap::new(),
            index_adding: HashMap::new(),
            retained_versions: HashMap::new(),
            last_retain_ns: 0,
            last_prune: Instant::now(),
            stopping: false,
            auth: Arc::new(Auth::new(
                cfg.auth.anonymous_allowed(),
                None,
                None,
                cfg.access.subscribe_deny.clone(),
            )),
            verified: VerifiedCache::new(cfg.auth.verified_cache_max as usize),
            verifying: 0,
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

    /// Puts new password and ACL rules in force (at start and on reload). Connected clients
    /// stay; every later operation is checked against the new rules.
    pub fn set_auth(&mut self, auth: Arc<Auth>) {
        self.auth = auth;
        self.verified.clear();
    }

    /// The first step of a CONNECT's login: decides at once, or asks for a password check
    /// off the executor. `cert_identity` is the client certificate's identity when the
    /// listener takes it as the user name (then no password is needed).
    pub fn check_login(
        &mut self,
        c: &Connect,
        cert_identity: Option<&str>,
        peer: Option<std::net::SocketAddr>,
    ) -> LoginStep {
        let password = c.password.as_deref();
        let user = c.username.as_ref().map(|u| u.as_str());
        let mut login = Login {
            username: None,
            refused: None,
            peer,
        };
        match self.auth.login(user, password, cert_identity) {
            LoginCheck::Done(Ok(None)) => {}
            LoginCheck::Done(Ok(Some(name))) => match MqttStr::new(&name) {
                Ok(n) => login.username = Some(n),
                // A name that is no MQTT string (a huge certificate subject) must not
                // become an anonymous login.
                Err(_) => login.refused = Some(LoginFailure::UnknownUser),
            },
            LoginCheck::Done(Err(why)) => {
                login.username = c.username.clone();
                login.refused = Some(why);
            }
            LoginCheck::Verify { user, hash } => {
                login.username = MqttStr::new(&user).ok();
                let password = c.password.clone().unwrap_or_default();
                let digest = self.verified.digest(&user, &password);
                if self.verified.contains(&digest) {
                    return LoginStep::Done(login);
                }
                if hash.is_slow() {
                    if self.verifying >= self.cfg.auth.verifications_inflight_max {
                        login.refused = Some(LoginFailure::Busy);
                        return LoginStep::Done(login);
                    }
                    self.verifying += 1;
                    return LoginStep::Verify(Verification {
                        login,
                        hash,
                        password,
                        digest,
                    });
                }
                if hash.verify(&password) {
                    self.verified.insert(digest);
                } else {
                    login.refused = Some(LoginFailure::WrongPassword);
                }
            }
        }
        LoginStep::Done(login)
    }

    /// The result of a [`Verification`] that ran off the executor.
    pub fn verified(&mut self, v: Verification, ok: bool) -> Login {
        self.verifying = self.verifying.saturating_sub(1);
        let mut login = v.login;
        if ok {
            self.verified.insert(v.digest);
        } else {
            login.refused = Some(LoginFailure::WrongPassword);
        }
        login
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

    /// Records the outcome of one write to the store.
    fn note_write(&mut self, r: Result<(), StorageError>) {
        self.log.write_seq += 1;
        if let Err(e) = r {
            self.log.failed_seq = self.log.write_seq;
            match &self.store {
                // Logged once per failure episode by the store.
                Some(store) if e.is_io_failure() => store.report_failure(&e),
                _ => {
                    tracing::error!(shard = self.id, error = %e, "storage write failed; acknowledgements that depend on it will fail")
                }
            }
        }
        self.sink.wake_committer();
    }

    /// Applies a session's journal to the store and, while it is online and its queue is
    /// on disk, reads the queue back into memory and sends what the window allows.
    /// Then logs the queue's changes between full and not, and counts its queued bytes
    /// against the broker-wide budget.
    fn sync_session(&mut self, client_id: &MqttStr, now: Instant) {
        if !self.sessions.get(client_id).is_some_and(|s| s.needs_sync()) {
            return;
        }
        self.sync_session_store(client_id, now);
        self.settle_session(client_id);
    }

    fn sync_session_store(&mut self, client_id: &MqttStr, now: Instant) {
        for round in 0.. {
            let Some(s) = self.sessions.get_mut(client_id) else {
                return;
            };
            let ops = s.take_ops();
            let refill = s.needs_refill();
            // The drop counters go to disk with the session's other changes; a drop that
            // changed nothing else (a refusal) is written by the next timer tick, so that
            // refusing costs no write of its own.
            let drops = s.stats.dropped_total();
            let mut counters = None;
            if s.persistent && drops != s.drops_stored {
                if ops.is_empty() {
                    if self.counters_dirty.len() < self.sessions.len() {
                        self.counters_dirty.insert(client_id.clone());
                    }
                } else {
                    s.drops_stored = drops;
                    counters = Some(CountersRecord::from_stats(&s.stats));
                }
            }
            if !ops.is_empty() {
                self.write_ops(client_id, ops, counters);
            }
            let Some((from, max)) = refill else {
                return;
            };
            if round == REFILL_ROUNDS_MAX {
                // Each round's messages were all dropped (access taken away): the rest of
                // the queue is read at the next timer tick, not all at once.
                if self.refill_later.len() < self.sessions.len() {
                    self.refill_later.insert(client_id.clone());
                }
                return;
            }
            let Some(entries) = self.read_queue(client_id, from, max) else {
                // The store is being reopened: the queue stays on disk, read at the
                // session's next event.
                return;
            };
            let Some(s) = self.sessions.get_mut(client_id) else {
                return;
            };
            s.refill(entries, max);
            // Read back from disk: checked again against the rules in force now.
            if let (true, Some(user)) = (self.auth.has_acl(), s.identity.clone()) {
                let auth = &self.auth;
                let dropped = s.drop_unreadable(|t| readable(auth, &user, client_id, t));
                self.stats.acl_denied_delivery += dropped;
            }
            s.pump(&self.limits, now);
        }
    }

    /// Writes the drop counters of the sessions whose drops changed nothing else (on the
    /// timer tick and at stop), in one batch.
    pub fn flush_counters(&mut self) {
        if self.counters_dirty.is_empty() {
            return;
        }
        let Some(store) = &self.store else {
            self.counters_dirty.clear();
            return;
        };
        let mut b = store.batch();
        let mut r = Ok(());
        for client_id in self.counters_dirty.drain() {
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            s.drops_stored = s.stats.dropped_total();
            let rec = CountersRecord::from_stats(&s.stats);
            r = r.and_then(|()| b.counters_put(client_id.as_str(), &rec));
        }
        let r = r.and_then(|()| b.commit());
        self.note_write(r);
    }

    /// The bookkeeping that follows a change of a session: one log line when its queue
    /// becomes full and one when it takes messages again, and its queued bytes counted
    /// against the broker-wide budget.
    fn settle_session(&mut self, client_id: &MqttStr) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        s.check_queue_room(&self.limits);
        for note in s.take_queue_notes() {
            let l = &self.limits;
            match note {
                QueueNote::Full => tracing::warn!(
                    client = %client_id,
                    online = s.is_online(),
                    queue_messages_max = l.queue_messages_max,
                    queue_bytes_max = l.queue_bytes_max,
                    policy = l.queue_policy.name(),
                    "session queue full: messages for this session are {} until it has room (limits.queue_messages_max, limits.queue_bytes_max)",
                    match l.queue_policy {
                        crate::config::QueuePolicy::RejectNewest => "refused",
                        crate::config::QueuePolicy::DropOldest => "pushing out its oldest",
                    }
                ),
                QueueNote::Room { dropped } => tracing::warn!(
                    client = %client_id,
                    dropped,
                    policy = l.queue_policy.name(),
                    "session queue has room again; messages dropped while it was full: {dropped}"
                ),
            }
        }
        let held = if s.persistent { s.queued_bytes() } else { 0 };
        if held != s.budget_counted {
            self.queued_bytes = (self.queued_bytes + held).saturating_sub(s.budget_counted);
            s.budget_counted = held;
            self.budget.set(self.id, self.queued_bytes);
            self.check_budget();
        }
    }

    /// Reads the budget (every shard's share) and logs when it becomes spent or has room
    /// again, once per shard each. Deliveries read the shared flag themselves
    /// ([`Core::read_budget`]).
    fn check_budget(&mut self) {
        let spent = self.budget.is_spent();
        self.limits.storage_budget_spent = spent;
        match (spent, self.budget_spent_since) {
            (true, None) => {
                self.budget_spent_since = Some(self.budget_refused);
                tracing::warn!(
                    shard = self.id,
                    queued_bytes_max = self.budget.max(),
                    "broker-wide budget for queued data spent (storage.queued_bytes_max): persistent sessions refuse what they would queue; MQTT 5 publishers get 0x97, MQTT 3.x publishers are disconnected and resend"
                );
            }
            (false, Some(since)) => {
                self.budget_spent_since = None;
                tracing::warn!(
                    shard = self.id,
                    refused = self.budget_refused - since,
                    "broker-wide budget for queued data has room again"
                );
            }
            _ => {}
        }
    }

    /// Takes the budget's state into the limits the sessions deliver under (one load).
    fn read_budget(&mut self) {
        self.limits.storage_budget_spent = self.budget.is_spent();
    }

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

    fn write_ops(
        &mut self,
        client_id: &MqttStr,
        ops: Vec<StoreOp>,
        counters: Option<CountersRecord>,
    ) {
        let Some(store) = &self.store else {
            return;
        };
        let clock = WallClock::now();
        let cid = client_id.as_str();
        let mut b = store.batch();
        let mut r = match &counters {
            Some(c) => b.counters_put(cid, c),
            None => Ok(()),
        };
        for op in ops {
            r = r.and_then(|()| match op {
                StoreOp::QueuePush { seq, delivery } => {
                    b.queue_push(cid, seq, &QueuedRecord::from_delivery(&delivery, &clock))
                }
                StoreOp::QueueDelete { seq } => b.queue_delete(cid, seq),
                StoreOp::InflightPut {
                    packet_id,
                    delivery,
                    state,
                } => {
                    let rec = InflightRecord::from_inflight(
                        &crate::session::state::Inflight {
                            packet_id,
                            delivery,
                            state,
                        },
                        &clock,
                    );
                    b.inflight_put(cid, packet_id.get(), &rec)
                }
                StoreOp::InflightDelete { packet_id } => b.inflight_delete(cid, packet_id.get()),
                StoreOp::DedupPut { origin, packet_id } => {
                    b.dedup_put(cid, origin.as_str(), packet_id)
                }
                StoreOp::DedupDelete { origin, packet_id } => {
                    b.dedup_delete(cid, origin.as_str(), packet_id)
                }
            });
        }
        let started = Instant::now();
        let r = r.and_then(|()| b.commit());
        self.stats.write_latency.observe(started.elapsed());
        self.note_write(r);
    }

    /// `None` while the store is being reopened after a failure.
    fn read_queue(
        &mut self,
        client_id: &MqttStr,
        from: u64,
        max: usize,
    ) -> Option<Vec<(u64, Delivery)>> {
        let Some(store) = &self.store else {
            return Some(Vec::new());
        };
        let clock = WallClock::now();
        match store.queue_read(client_id.as_str(), from, max) {
            Ok(recs) => Some(
                recs.into_iter()
                    .filter_map(|(seq, r)| match r.to_delivery(&clock) {
                        Ok(d) => Some((seq, d)),
                        Err(e) => {
                            tracing::warn!(client = %client_id, seq, error = %e, "skipping unreadable queued message");
                            None
                        }
                    })
                    .collect(),
            ),
            Err(StorageError::Unavailable { .. }) => None,
            Err(e) => {
                tracing::error!(client = %client_id, error = %e, "cannot read the session queue");
                Some(Vec::new())
            }
        }
    }

    /// Writes a persistent session's record (expiry, will, whether and since when offline).
    fn write_session_record(&mut self, client_id: &MqttStr, now: Instant) {
        let (Some(store), Some(s)) = (&self.store, self.sessions.get(client_id)) else {
            return;
        };
        if !s.persistent {
            return;
        }
        let clock = WallClock::now();
        let rec = SessionRecord {
            expiry_s: s.expiry_s,
            version: s.version.level(),
            will: s.will.as_ref().map(|w| WillRecord::from_will(w, &clock)),
            disconnected_unix_ms: (!s.is_online()).then(|| clock.unix_ms_of(now)),
            next_packet_id: 0,
            owner: s
                .owner
                .as_ref()
                .map(|user| user.as_ref().map(|u| u.as_str().to_owned())),
        };
        let r = store.put_session(client_id.as_str(), &rec);
        self.note_write(r);
    }

    fn write_subscription(
        &mut self,
        client_id: &MqttStr,
        sub: Option<&Subscription>,
        filter: &str,
    ) {
        let Some(store) = &self.store else {
            return;
        };
        if !self.sessions.get(client_id).is_some_and(|s| s.persistent) {
            return;
        }
        let r = match sub {
            Some(sub) => store.put_subscription(
                client_id.as_str(),
                filter,
                &SubscriptionRecord::from_subscription(sub),
            ),
            None => store.delete_subscription(client_id.as_str(), filter),
        };
        self.note_write(r);
    }

    /// Registers `w` to be released once every write so far is durable (at once when
    /// nothing is pending or acknowledgements do not wait for the disk).
    fn wait_durable(&mut self, w: Waiter, now: Instant) -> bool {
        if self.durability != Durability::Durable || self.log.write_seq <= self.log.synced_seq {
            self.release(w, true, now);
            return false;
        }
        self.log.waiters.push_back((self.log.write_seq, w));
        true
    }

    fn release(&mut self, w: Waiter, ok: bool, now: Instant) {
        match w {
            Waiter::Local(token) => self.on_ack(token, ok, Fate::default(), now),
            Waiter::Remote { to, token, fate } => self.send(to, Event::Ack { token, ok, fate }),
        }
    }

    /// What the committer should make durable: the store and the last write so far.
    pub fn commit_target(&self) -> Option<(Store, u64)> {
        let store = self.store.as_ref()?;
        (self.log.write_seq > self.log.synced_seq).then(|| (store.clone(), self.log.write_seq))
    }

    /// Whether the committer waits for the disk before acknowledging (`durable`) or persists
    /// on an interval (`batched`).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// A persist that covered every write up to `target` finished (`ok` = fsync succeeded).
    pub fn committed(&mut self, target: u64, ok: bool, now: Instant) {
        let failed_in_range =
            self.log.failed_seq > self.log.synced_seq && self.log.failed_seq <= target;
        let ok = ok && !failed_in_range;
        if !ok {
            // The store logs the failure episode; this is per persist.
            tracing::debug!(
                shard = self.id,
                "persist failed; failing the acknowledgements that waited on it"
            );
        }
        self.log.synced_seq = self.log.synced_seq.max(target);
        while let Some((seq, _)) = self.log.waiters.front() {
            if *seq > target {
                break;
            }
            let (_, w) = self.log.waiters.pop_front().expect("front exists");
            self.release(w, ok, now);
        }
    }

    // ---------------------------------------------------------------- recovery

    /// Rebuilds the shard from its store at start: sessions (offline, with subscriptions,
    /// in-flight messages, incoming QoS 2 ids, queue extent, will and expiry timers), the
    /// routing index on every shard, and the retained messages. Sessions whose client id now
    /// belongs to another shard are sent there. Then tells every peer it is done.
    pub fn recover(&mut self, now: Instant) {
        let Some(store) = self.store.clone() else {
            self.announce_recovered();
            return;
        };
        let started = Instant::now();
        let recovered = match store.load() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "cannot read the store; starting empty");
                self.announce_recovered();
                return;
            }
        };
        for d in &recovered.damaged {
            tracing::warn!(shard = self.id, record = %d, "damaged record skipped");
        }
        let clock = WallClock::now();
        let (mut restored, mut rehomed) = (0usize, 0usize);
        for rs in recovered.sessions {
            let owner = owner_shard(rs.client_id.as_bytes(), self.count);
            if owner == self.id {
                restored += usize::from(self.restore_session(rs, &clock, now));
                continue;
            }
            let queue = match store.queue_read(&rs.client_id, rs.queue_first_seq, usize::MAX) {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(client = %rs.client_id, error = %e, "cannot read a queue to re-home; the session stays");
                    continue;
                }
            };
            let token = self.token();
            self.pending.insert(
                token,
                Pending::Rehome {
                    client_id: rs.client_id.clone(),
                },
            );
            self.sink.push(
                owner,
                Event::Rehome {
                    session: Box::new(Rehomed { stored: rs, queue }),
                    reply: token,
                },
            );
            rehomed += 1;
        }
        let retained = recovered.retained.len();
        for m in recovered.retained {
            let Ok(msg) = m.to_message(&clock) else {
                continue;
            };
            let msg = Arc::new(msg);
            // Stored messages predate every live write: version 0.
            let version = RetainVersion {
                at_ns: 0,
                shard: self.id as u16,
            };
            let home = owner_shard(msg.topic.as_bytes(), self.count);
            if home != self.id {
                // The shard count changed: the new home stores it when it applies it.
                let r = store.retained_delete(msg.topic.as_str());
                self.note_write(r);
            }
            self.apply_retained(msg.clone(), version, home != self.id);
            for p in self.peers() {
                self.sink.push(
                    p,
                    Event::RetainReplica {
                        msg: msg.clone(),
                        version,
                        reply: None,
                    },
                );
            }
        }
        tracing::info!(
            shard = self.id,
            sessions = restored,
            rehomed,
            retained,
            damaged = recovered.damaged.len(),
            ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        self.announce_recovered();
    }

    fn announce_recovered(&mut self) {
        for p in self.peers() {
            self.sink.push(p, Event::RecoveryDone);
        }
    }

    /// Whether every peer's recovery has been applied here: only then is the routing index
    /// complete and may this shard accept connections.
    pub fn peers_recovered(&self) -> bool {
        self.recovered_peers + 1 >= self.count
    }

    /// Brings one stored session back into memory (offline) and into the routing tables.
    /// Returns false when it was already here or cannot be read.
    fn restore_session(
        &mut self,
        rs: crate::storage::RecoveredSession,
        clock: &WallClock,
        now: Instant,
    ) -> bool {
        let Ok(client_id) = MqttStr::new(&rs.client_id) else {
            return false;
        };
        if self.sessions.contains_key(&client_id) {
            return false;
        }
        let version = rs
            .record
            .protocol_version()
            .unwrap_or(ProtocolVersion::V3_1_1);
        let expiry_s = rs
            .record
            .expiry_s
            .min(self.cfg.sessions.session_expiry_max_s);
        let mut s = Session::new(client_id.clone(), version, expiry_s);
        s.persistent = true;
        // Its owner, as stored (a name that is no longer a valid MQTT string: unknown).
        s.owner = match &rs.record.owner {
            None => None,
            Some(None) => Some(None),
            Some(Some(user)) => MqttStr::new(user).ok().map(Some),
        };
        // Access checks of messages queued before its client returns use its owner.
        s.identity = s.owner.clone();
        s.will = rs.record.will.as_ref().and_then(|w| w.to_will(clock).ok());
        for (filter, sr) in &rs.subscriptions {
            match sr.to_subscription(filter) {
                Ok(sub) => {
                    s.subscriptions.insert(filter.as_str().into(), sub);
                }
                Err(e) => tracing::warn!(client = %client_id, error = %e, "subscription skipped"),
            }
        }
        let inflight = rs
            .inflight
            .iter()
            .filter_map(|(pid, ir)| ir.to_inflight(*pid, clock).ok())
            .collect();
        s.restore(
            rs.queue_first_seq,
            rs.queue_next_seq,
            rs.queue_len,
            rs.queue_bytes,
            inflight,
        );
        s.incoming_qos2 = rs.incoming.iter().copied().collect();
        if let Some(c) = &rs.counters {
            c.restore_into(&mut s.stats);
            self.stats.restored_drops.add(&s.stats);
            s.drops_stored = s.stats.dropped_total();
        }
        // Keys of QoS 2 messages it may have published before the restart may be held
        // anywhere: when this session ends, every shard forgets them.
        s.qos2_published = true;
        let keys: Vec<(MqttStr, u16)> = rs
            .dedup
            .iter()
            .filter_map(|(o, pid)| MqttStr::new(o).ok().map(|o| (o, *pid)))
            .collect();
        for (origin, pid) in &keys {
            self.note_qos2_holder(origin, *pid, &client_id);
        }
        s.restore_qos2_keys(keys);
        s.epoch = Core::bump(&mut self.next_epoch);
        let epoch = s.epoch;
        let subs: Vec<Subscription> = s.subscriptions.values().cloned().collect();
        let will_delay = s.will.as_ref().map(|w| w.delay_s);
        // Away since it disconnected (or since the crash, if it was online then); unknown
        // when the monotonic clock does not reach back that far.
        let away_ms = rs
            .record
            .disconnected_unix_ms
            .map_or(0, |d| clock.unix_ms_of(now).saturating_sub(d));
        s.since = now.checked_sub(Duration::from_millis(away_ms));
        self.sessions.insert(client_id.clone(), Box::new(s));
        self.settle_session(&client_id);
        let peers: Vec<usize> = self.peers().collect();
        for sub in subs {
            if sub.filter.is_shared() {
                let key: Arc<str> = Arc::from(sub.filter.as_str());
                let home = owner_shard(key.as_bytes(), self.count);
                let token = self.token(); // no one waits for this join
                self.send(
                    home,
                    Event::SharedJoin {
                        key,
                        member: SharedMember {
                            client_id: client_id.clone(),
                            shard: self.id as u16,
                            options: sub.options,
                            sub_id: sub.id,
                            online: false,
                            persistent: true,
                            identity: None,
                        },
                        reply: token,
                    },
                );
            } else {
                let entry = self.subs.entry(sub.filter.filter());
                let first = entry.is_empty();
                entry.push(LocalSub::Client {
                    client_id: client_id.clone(),
                    options: sub.options,
                    id: sub.id,
                });
                if first {
                    self.index_add(sub.filter.filter(), None, &peers);
                }
            }
        }
        // The client has been away since it disconnected (or since the crash, if it was
        // online then): its will and expiry timers resume from that moment.
        let away_s = rs
            .record
            .disconnected_unix_ms
            .map_or(0, |d| clock.unix_ms_of(now).saturating_sub(d) / 1000);
        let left = |total: u32| Duration::from_secs((total as u64).saturating_sub(away_s));
        if let Some(delay) = will_delay {
            if delay < expiry_s {
                self.schedule(
                    now + left(delay),
                    TimerKind::Will {
                        client_id: client_id.clone(),
                        epoch,
                    },
                );
            }
        }
        if expiry_s != u32::MAX {
            self.schedule(now + left(expiry_s), TimerKind::Expire { client_id, epoch });
        }
        true
    }

    /// Takes a session re-homed from shard `from`: stores it here, then answers once durable.
    fn adopt(&mut self, from: usize, r: Rehomed, reply: Token, now: Instant) {
        let cid = r.stored.client_id.clone();
        let exists = MqttStr::new(&cid).is_ok_and(|c| self.sessions.contains_key(&c));
        if let (Some(store), false) = (&self.store, exists) {
            let mut b = store.batch();
            let mut res = b.put_session(&cid, &r.stored.record);
            for (f, sr) in &r.stored.subscriptions {
                res = res.and_then(|()| b.put_subscription(&cid, f, sr));
            }
            for (pid, ir) in &r.stored.inflight {
                res = res.and_then(|()| b.inflight_put(&cid, *pid, ir));
            }
            for pid in &r.stored.incoming {
                res = res.and_then(|()| b.incoming_put(&cid, *pid));
            }
            for (origin, pid) in &r.stored.dedup {
                res = res.and_then(|()| b.dedup_put(&cid, origin, *pid));
            }
            for (seq, q) in &r.queue {
                res = res.and_then(|()| b.queue_push(&cid, *seq, q));
            }
            if let Some(c) = &r.stored.counters {
                res = res.and_then(|()| b.counters_put(&cid, c));
            }
            let res = res.and_then(|()| b.commit());
            let ok = res.is_ok();
            self.note_write(res);
            if ok {
                let clock = WallClock::now();
                self.restore_session(r.stored, &clock, now);
            }
        }
        self.wait_durable(Waiter::answer(from, reply), now);
    }

    // ---------------------------------------------------------------- connect / disconnect

    /// Accepts (or refuses) a CONNECT for a client this shard owns. Writes CONNACK and any
    /// resent messages to `out`. `Err` carries the refusal already written to `out`.
    pub fn connect(
        &mut self,
        c: &Connect,
        assigned_id: Option<MqttStr>,
        out: Rc<Outbound>,
        now: Instant,
    ) -> Result<Accepted, ReasonCode> {
        self.connect_as(c, assigned_id, Login::anonymous(), out, now)
    }

    /// [`Core::connect`] for a client whose login was checked ([`Core::check_login`]): a
    /// refused login gets CONNACK 0x86 (3.x: 0x04) and nothing else, before any session is
    /// touched; so does a will the user may not publish (0x87 / 0x05).
    pub fn connect_as(
        &mut self,
        c: &Connect,
        assigned_id: Option<MqttStr>,
        login: Login,
        out: Rc<Outbound>,
        now: Instant,
    ) -> Result<Accepted, ReasonCode> {
        let version = c.protocol;
        let v5 = version.is_v5();
        // What the session keeps of the CONNECT gets allocations of its own, so that the
        // rest of the packet (a password, user properties, up to the packet limit) is freed.
        let client_id = assigned_id
            .clone()
            .unwrap_or_else(|| c.client_id.detached());
        let refuse = |rc: ReasonCode| {
            out.send(&Packet::ConnAck(Box::new(ConnAck {
                session_present: false,
                reason_code: rc,
                properties: ConnAckProperties::default(),
            })));
            out.close(None);
            Err(rc)
        };
        let id_max = if version == ProtocolVersion::V3_1 {
            23
        } else {
            self.cfg.limits.client_id_bytes_max as usize
        };
        if client_id.len() > id_max || client_id.is_empty() {
            return refuse(ReasonCode::ClientIdentifierNotValid);
        }
        if v5 && c.properties.authentication_method.is_some() {
            return refuse(ReasonCode::BadAuthenticationMethod);
        }
        if login.refused == Some(LoginFailure::Busy) {
            // Not a verdict on the credentials: the shard has enough checks in flight.
            self.stats.logins_busy += 1;
            tracing::debug!(client = %client_id, peer = ?login.peer, "login refused: busy");
            return refuse(ReasonCode::ServerBusy);
        }
        if let Some(why) = login.refused {
            self.stats.logins_failed += 1;
            tracing::warn!(
                user = login.username.as_ref().map_or("", |u| u.as_str()),
                client = %client_id,
                peer = ?login.peer,
                reason = why.as_str(),
                "login refused"
            );
            return refuse(ReasonCode::BadUserNameOrPassword);
        }
        let username = login.username.map(|u| u.detached());
        if let Some(w) = &c.will {
            let user = username.as_ref().map(|u| u.as_str());
            if !self
                .auth
                .allows(user, &client_id, w.topic.as_str(), Access::Write)
            {
                self.stats.acl_denied_publish += 1;
                tracing::info!(client = %client_id, topic = %w.topic.as_str(), "will topic not allowed");
                return refuse(ReasonCode::NotAuthorized);
            }
        }
        let sessions_cfg = &self.cfg.sessions;
        let requested_expiry = if v5 {
            c.properties
                .session_expiry_interval
                .unwrap_or(if c.clean_start {
                    0
                } else {
                    sessions_cfg.session_expiry_default_s
                })
        } else if c.clean_start {
            0
        } else {
            sessions_cfg.session_expiry_max_s
        };
        let expiry_s = requested_expiry.min(sessions_cfg.session_expiry_max_s);

        // A session belongs to the user that made it: another user may neither take it
        // over (and read its queue) nor end it with a clean start.
        // Only a session that outlives its connection holds anything of its owner's (a
        // queue, subscriptions, a will): a clean session ends with its connection, and its
        // client id is taken over as the protocol has it.
        let owned = self.auth.sessions_have_owners();
        if owned {
            let owner = self
                .sessions
                .get(&client_id)
                .filter(|s| s.expiry_s > 0)
                .map(|s| s.owner.clone());
            if owner == Some(None) && !c.clean_start {
                tracing::warn!(
                    client = %client_id,
                    user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                    "a session without a recorded owner (made before owners were recorded, or while no password or ACL file was in force) now belongs to this user"
                );
            }
            if let Some(owner) = owner.flatten().filter(|o| *o != username) {
                self.stats.takeovers_refused += 1;
                tracing::warn!(
                    client = %client_id,
                    user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                    owner = owner.as_ref().map_or("(anonymous)", |u| u.as_str()),
                    peer = ?login.peer,
                    "connect refused: the session of this client id belongs to another user"
                );
                return refuse(ReasonCode::NotAuthorized);
            }
        }

        // Takeover: the old connection ends now, without DISCONNECT.
        let mut will_now: Option<Will> = None;
        let mut end_existing = false;
        if let Some(s) = self.sessions.get_mut(&client_id) {
            if let Some(old) = s.detach(now) {
                old.out.close(Some(ReasonCode::SessionTakenOver));
                self.stats.connections -= 1;
                s.epoch = Core::bump(&mut self.next_epoch);
                let ends = c.clean_start || s.expiry_s == 0;
                if let Some(w) = s.will.take() {
                    if ends || w.delay_s == 0 {
                        will_now = Some(w);
                    }
                }
                end_existing = ends;
            } else if c.clean_start {
                end_existing = true;
            } else {
                // Back before the will delay passed: the will is not sent (MQTT-3.1.3-9).
                s.will = None;
            }
        }
        if let Some(w) = will_now {
            self.publish_will(w, now);
        }
        if end_existing {
            self.end_session(&client_id, now);
        }
        let session_present = self.sessions.contains_key(&client_id);
        // Back online: the timers of its offline period are void.
        self.cancel_timers(&client_id);

        // CONNACK, before anything the session resends.
        let keep_alive_max = self.cfg.limits.keep_alive_max_s;
        let keep_alive_s = if c.keep_alive > keep_alive_max {
            keep_alive_max
        } else {
            c.keep_alive
        };
        let mut props = ConnAckProperties::default();
        if v5 {
            let l = &self.cfg.limits;
            props.receive_maximum = Some(l.receive_maximum).filter(|&r| r != u16::MAX);
            props.maximum_packet_size = Some(l.packet_bytes_max);
            props.topic_alias_maximum = Some(l.topic_alias_max).filter(|&a| a > 0);
            props.assigned_client_identifier = assigned_id;
            if keep_alive_s != c.keep_alive {
                props.server_keep_alive = Some(keep_alive_s);
            }
            if expiry_s != c.properties.session_expiry_interval.unwrap_or(0) {
                props.session_expiry_interval = Some(expiry_s);
            }
        }
        out.send(&Packet::ConnAck(Box::new(ConnAck {
            session_present: session_present && version != ProtocolVersion::V3_1,
            reason_code: ReasonCode::Success,
            properties: props,
        })));

        let conn_id = self.next_conn_id;
        self.next_conn_id += 1;
        self.stats.connections += 1;
        self.stats.connects_total += 1;
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Box::new(Session::new(client_id.clone(), version, expiry_s)));
        session.expiry_s = expiry_s;
        session.identity = Some(username.clone());
        // Recorded only under owner rules: a session made without them is not locked to a
        // name nobody verified.
        session.owner = owned.then(|| username.clone());
        session.epoch = Core::bump(&mut self.next_epoch);
        session.will = c.will.as_ref().map(|w| {
            let p = &w.properties;
            Will {
                msg: Arc::new(Message {
                    topic: w.topic.detached(),
                    payload: bytes::Bytes::copy_from_slice(&w.payload),
                    qos: w.qos,
                    retain: w.retain,
                    properties: PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        topic_alias: None,
                        response_topic: p.response_topic.as_ref().map(TopicName::detached),
                        correlation_data: p
                            .correlation_data
                            .as_deref()
                            .map(bytes::Bytes::copy_from_slice),
                        user_properties: p
                            .user_properties
                            .iter()
                            .map(|(k, v)| (k.detached(), v.detached()))
                            .collect(),
                        subscription_identifiers: Vec::new(),
                        content_type: p.content_type.as_ref().map(MqttStr::detached),
                    },
                    origin: Some(client_id.clone()),
                    qos2_id: None,
                    created: now,
                }),
                delay_s: p.will_delay_interval.unwrap_or(0),
            }
        });
        let cp = &c.properties;
        let mut link = Link::new(
            conn_id,
            out.clone(),
            cp.receive_maximum.unwrap_or(u16::MAX),
            cp.maximum_packet_size.unwrap_or(u32::MAX),
            cp.topic_alias_maximum
                .unwrap_or(0)
                .min(self.cfg.limits.topic_alias_max),
        );
        link.peer = login.peer;
        link.keep_alive_s = keep_alive_s;
        session.persistent |= self.store.is_some() && expiry_s > 0;
        // What waits for it was checked when queued, under the rules of that time: check
        // again (a reload may have taken read access away).
        if self.auth.has_acl() {
            let auth = &self.auth;
            let dropped = session.drop_unreadable(|t| readable(auth, &username, &client_id, t));
            self.stats.acl_denied_delivery += dropped;
        }
        session.attach(link, &self.limits, now);
        let shared: Vec<Arc<str>> = session
            .subscriptions
            .values()
            .filter(|s| s.filter.is_shared())
            .map(|s| Arc::from(s.filter.as_str()))
            .collect();
        for key in shared {
            let home = owner_shard(key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedOnline {
                    key,
                    client_id: client_id.clone(),
                    online: true,
                },
            );
        }
        self.write_session_record(&client_id, now);
        self.sync_session(&client_id, now);
        if self.conn_line(now) {
            tracing::info!(
                client = %client_id,
                peer = ?login.peer,
                user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                protocol = inspect::protocol_name(version),
                session_present,
                keep_alive_s,
                "client connected"
            );
        }
        Ok(Accepted {
            ctx: ConnCtx {
                conn_id,
                client_id,
                version,
                out,
                username,
                aliases_in: HashMap::new(),
                peer: login.peer,
            },
            keep_alive_s,
        })
    }

    /// The writer of connection `conn_id` made room in a buffer a session had found full:
    /// moves the session's queued messages in (as far as window and buffer allow).
    pub fn on_writable(&mut self, client_id: &MqttStr, conn_id: u64, now: Instant) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        s.pump(&self.limits, now);
        self.sync_session(client_id, now);
    }

    /// The connection of `ctx` has ended. Decides the will and the session's future.
    pub fn disconnected(&mut self, ctx: &ConnCtx, ending: Ending, now: Instant) {
        let Some(s) = self.sessions.get(&ctx.client_id) else {
            return;
        };
        if s.link.as_ref().map(|l| l.conn_id) != Some(ctx.conn_id) {
            return; // taken over already
        }
        if self.conn_line(now) {
            tracing::info!(
                client = %ctx.client_id,
                peer = ?ctx.peer,
                reason = match ending {
                    Ending::Normal => "DISCONNECT",
                    Ending::WithWill => "DISCONNECT with will",
                    Ending::Lost => "connection lost or closed by the broker",
                },
                "client disconnected"
            );
        }
        let Some(s) = self.sessions.get_mut(&ctx.client_id) else {
            return;
        };
        s.detach(now);
        s.epoch = Core::bump(&mut self.next_epoch);
        self.stats.connections -= 1;
        if ending == Ending::Normal {
            s.will = None;
        }
        let epoch = s.epoch;
        let expiry_s = s.expiry_s;
        let persistent = expiry_s > 0;
        if self.stopping && !persistent {
            // Ends with the process: see `close_all`.
            s.will = None;
        }
        let shared: Vec<Arc<str>> = s
            .subscriptions
            .values()
            .filter(|s| s.filter.is_shared())
            .map(|s| Arc::from(s.filter.as_str()))
            .collect();
        let handback = if persistent {
            s.take_queued_shared()
        } else {
            Vec::new()
        };
        for key in shared {
            let home = owner_shard(key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedOnline {
                    key,
                    client_id: ctx.client_id.clone(),
                    online: false,
                },
            );
        }
        self.hand_back(&ctx.client_id, handback);
        if !persistent {
            self.end_session(&ctx.client_id, now);
            return;
        }
        let will_delay = self.sessions[&ctx.client_id]
            .will
            .as_ref()
            .map(|w| w.delay_s);
        if let Some(delay) = will_delay.filter(|_| !self.stopping) {
            if delay == 0 {
                let w = self
                    .sessions
                    .get_mut(&ctx.client_id)
                    .and_then(|s| s.will.take())
                    .expect("checked above");
                self.publish_will(w, now);
            } else if delay < expiry_s {
                self.schedule(
                    now + Duration::from_secs(delay as u64),
                    TimerKind::Will {
                        client_id: ctx.client_id.clone(),
                        epoch,
                    },
                );
            }
        }
        if expiry_s != u32::MAX {
            self.schedule(
                now + Duration::from_secs(expiry_s as u64),
                TimerKind::Expire {
                    client_id: ctx.client_id.clone(),
                    epoch,
                },
            );
        }
        self.write_session_record(&ctx.client_id, now);
        self.sync_session(&ctx.client_id, now);
    }

    fn hand_back(&mut self, client_id: &MqttStr, deliveries: Vec<Delivery>) {
        for d in deliveries {
            if let Some(key) = d.via_share {
                let home = owner_shard(key.as_bytes(), self.count);
                self.send(
                    home,
                    Event::SharedBounce {
                        key,
                        msg: d.msg,
                        not: client_id.clone(),
                        attempts: 0,
                        reply: None,
                        fate: Fate::default(),
                    },
                );
            }
        }
    }

    /// Publishes a will now (its delay or its session is over), counted from now for expiry.
    fn publish_will(&mut self, will: Will, now: Instant) {
        if is_sys_topic(&will.msg.topic) {
            self.stats.sys_publish_dropped += 1;
            return;
        }
        self.stats.wills_published += 1;
        let mut msg = (*will.msg).clone();
        msg.created = now;
        self.route(Arc::new(msg), now, None);
    }

    /// Ends a session: its subscriptions leave the routing tables, shared messages it had not
    /// taken go back to their groups, and a will still pending is published.
    fn end_session(&mut self, client_id: &MqttStr, now: Instant) {
        self.cancel_timers(client_id);
        let Some(mut s) = self.sessions.remove(client_id) else {
            return;
        };
        self.counters_dirty.remove(client_id);
        self.stats.ended_sessions.add(&s.stats);
        if s.budget_counted > 0 {
            self.queued_bytes = self.queued_bytes.saturating_sub(s.budget_counted);
            self.budget.set(self.id, self.queued_bytes);
            self.check_budget();
        }
        if let Some(l) = s.detach(now) {
            l.out.close(None);
            self.stats.connections -= 1;
        }
        let undelivered = s.take_undelivered_shared();
        self.hand_back(client_id, undelivered);
        for sub in s.subscriptions.values() {
            self.remove_subscription(client_id, &sub.filter);
        }
        for (origin, pid) in s.qos2_keys() {
            self.drop_qos2_holder(origin, *pid, client_id);
        }
        if s.qos2_published && self.store.is_some() {
            // Its QoS 2 messages not yet released (incoming ids outstanding, or left by a
            // crash before their id was stored) are forgotten everywhere; a later session
            // with this client id starts afresh. No one waits.
            self.release_qos2(client_id, None, None, now);
        }
        if s.persistent {
            if let Some(store) = &self.store {
                let r = store.delete_session(client_id.as_str());
                self.note_write(r);
            }
        }
        if let Some(w) = s.will.take() {
            self.publish_will(w, now);
        }
    }

    // ---------------------------------------------------------------- timers

    /// Sets a session's will or expiry timer, replacing the one it had of that kind: a
    /// client id holds at most one timer of each kind, however often it comes and goes.
    fn schedule(&mut self, at: Instant, kind: TimerKind) {
        let id = self.next_timer;
        self.next_timer += 1;
        let (client_id, will) = match &kind {
            TimerKind::Will { client_id, .. } => (client_id, true),
            TimerKind::Expire { client_id, .. } => (client_id, false),
        };
        if let Some(s) = self.sessions.get_mut(client_id) {
            let slot = if will {
                &mut s.will_timer
            } else {
                &mut s.expiry_timer
            };
            if let Some(old) = slot.replace(id) {
                self.timer_kinds.remove(&old);
            }
        }
        self.timers.push(Reverse((at, id)));
        self.timer_kinds.insert(id, kind);
        self.compact_timers();
    }

    /// Cancels a session's timers (it came back, or it ended).
    fn cancel_timers(&mut self, client_id: &MqttStr) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        for id in [s.will_timer.take(), s.expiry_timer.take()]
            .into_iter()
            .flatten()
        {
            self.timer_kinds.remove(&id);
        }
    }

    /// Drops the heap entries of cancelled timers once they are most of it, so that the
    /// heap holds at most about twice the live timers.
    fn compact_timers(&mut self) {
        if self.timers.len() > 2 * self.timer_kinds.len() + 64 {
            let live = &self.timer_kinds;
            self.timers.retain(|Reverse((_, id))| live.contains_key(id));
        }
    }

    /// Timer entries held (live and cancelled ones not yet dropped).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Fires every timer due at `now`.
    pub fn fire_timers(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        // The other shards' shares of the budget change without telling this one.
        self.budget.refresh();
        self.check_budget();
        self.flush_counters();
        for client_id in std::mem::take(&mut self.refill_later) {
            self.sync_session(&client_id, now);
        }
        if now.saturating_duration_since(self.last_prune) >= TOMBSTONE_KEEP {
            self.last_prune = now;
            self.prune_tombstones(now);
        }
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(kind) = self.timer_kinds.remove(&id) else {
                continue;
            };
            let (TimerKind::Will { client_id, .. } | TimerKind::Expire { client_id, .. }) = &kind;
            if let Some(s) = self.sessions.get_mut(client_id) {
                for slot in [&mut s.will_timer, &mut s.expiry_timer] {
                    if *slot == Some(id) {
                        *slot = None;
                    }
                }
            }
            match kind {
                TimerKind::Will { client_id, epoch } => {
                    let will = match self.sessions.get_mut(&client_id) {
                        Some(s) if s.epoch == epoch && !s.is_online() => s.will.take(),
                        _ => None,
                    };
                    if let Some(w) = will {
                        // The stored record loses the will too, or a restart would publish it
                        // again. Its offline time stays (about) when the client went away.
                        let away_since = now
                            .checked_sub(Duration::from_secs(w.delay_s as u64))
                            .unwrap_or(now);
                        self.publish_will(w, now);
                        self.write_session_record(&client_id, away_since);
                    }
                }
                TimerKind::Expire { client_id, epoch } => {
                    let due = matches!(self.sessions.get(&client_id),
                        Some(s) if s.epoch == epoch && !s.is_online());
                    if due {
                        self.stats.sessions_expired += 1;
                        self.end_session(&client_id, now);
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- packets

    /// Handles one packet from a connected client. `Err` is the reason to close with.
    pub fn on_packet(
        &mut self,
        ctx: &mut ConnCtx,
        packet: Packet,
        now: Instant,
    ) -> Result<Flow, ReasonCode> {
        match packet {
            Packet::Publish(p) => self.on_publish(ctx, p, now).map(|()| Flow::Continue),
            Packet::PubAck(a) => {
                self.with_session(ctx, |s, l| {
                    let _ = s.on_puback(a.packet_id, l, now);
                });
                self.sync_session(&ctx.client_id, now);
                Ok(Flow::Continue)
            }
            Packet::PubRec(a) => {
                let mut unknown = false;
                self.with_session(ctx, |s, l| {
                    unknown = s
                        .on_pubrec(a.packet_id, a.reason_code.is_error(), l, now)
                        .is_err();
                });
                if unknown && !a.reason_code.is_error() {
                    ctx.out.send(&Packet::PubRel(Ack::with_reason(
                        a.packet_id,
                        ReasonCode::PacketIdentifierNotFound,
                    )));
                }
                self.sync_session(&ctx.client_id, now);
                Ok(Flow::Continue)
            }
            Packet::PubComp(a) => {
                self.with_session(ctx, |s, l| {
                    let _ = s.on_pubcomp(a.packet_id, l, now);
                });
                self.sync_session(&ctx.client_id, now);
                Ok(Flow::Continue)
            }
            Packet::PubRel(a) => {
                let pid = a.packet_id.get();
                let (known, persistent) = self
                    .sessions
                    .get_mut(&ctx.client_id)
                    .map_or((false, false), |s| {
                        (s.incoming_qos2.remove(&pid), s.persistent)
                    });
                let rc = if known {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                let comp = Packet::PubComp(Ack::with_reason(a.packet_id, rc));
                let (mut token, mut remote, mut then) = (None, 0, Then::Ack);
                if known && self.store.is_some() {
                    // Every shard forgets the message's dedup key first, durably; only then is
                    // the id deleted here, and PUBCOMP sent once that is durable too. A key
                    // left behind would make the next message with this id look like a
                    // resend; an id deleted first would leave keys no PUBREL will release.
                    let wait = self.durability == Durability::Durable;
                    token = wait.then(|| self.token());
                    remote = self.release_qos2(&ctx.client_id, Some(pid), token, now);
                    if persistent && wait {
                        then = Then::DeleteIncoming(pid);
                    } else if persistent {
                        let r = self
                            .store
                            .as_ref()
                            .map_or(Ok(()), |st| st.incoming_delete(ctx.client_id.as_str(), pid));
                        self.note_write(r);
                    }
                }
                self.ack_when_durable(ctx, comp, AckWait::of(token, remote), then, now);
                Ok(Flow::Continue)
            }
            Packet::Subscribe(s) => {
                self.on_subscribe(ctx, s, now);
                Ok(Flow::Continue)
            }
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(ctx, u);
                Ok(Flow::Continue)
            }
            Packet::PingReq => {
                ctx.out.send(&Packet::PingResp);
                Ok(Flow::Continue)
            }
            Packet::Disconnect(d) => {
                self.on_disconnect(ctx, &d)?;
                Ok(Flow::Disconnect(
                    if d.reason_code == ReasonCode::DisconnectWithWillMessage {
                        Ending::WithWill
                    } else {
                        Ending::Normal
                    },
                ))
            }
            // A second CONNECT, AUTH without an authentication method, or a packet only a
            // server sends.
            Packet::Connect(_)
            | Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => Err(ReasonCode::ProtocolError),
        }
    }

    fn with_session(&mut self, ctx: &ConnCtx, f: impl FnOnce(&mut Session, &SessionLimits)) {
        if let Some(s) = self.sessions.get_mut(&ctx.client_id) {
            f(s, &self.limits);
        }
    }

    fn on_disconnect(&mut self, ctx: &ConnCtx, d: &Disconnect) -> Result<(), ReasonCode> {
        let Some(s) = self.sessions.get_mut(&ctx.client_id) else {
            return Ok(());
        };
        if let Some(new) = d.properties.session_expiry_interval {
            if s.expiry_s == 0 && new != 0 {
                // MQTT-3.14.2-2: a session that was to end cannot be given a life here.
                return Err(ReasonCode::ProtocolError);
            }
            s.expiry_s = new.min(self.cfg.sessions.session_expiry_max_s);
        }
        Ok(())
    }

    fn on_publish(
        &mut self,
        ctx: &mut ConnCtx,
        p: Publish,
        now: Instant,
    ) -> Result<(), ReasonCode> {
        let l = &self.cfg.limits;
        let mut topic = p.topic;
        if let Some(alias) = p.properties.topic_alias {
            if alias.get() > l.topic_alias_max {
                return Err(ReasonCode::TopicAliasInvalid);
            }
            if topic.is_empty() {
                topic = ctx
                    .aliases_in
                    .get(&alias.get())
                    .cloned()
                    .ok_or(ReasonCode::ProtocolError)?;
            } else {
                // Kept for the connection's life: not the whole PUBLISH it came in.
                ctx.aliases_in.insert(alias.get(), topic.detached());
            }
        }
        if topic.len() > l.topic_bytes_max as usize || topic.levels() > l.topic_levels_max as usize
        {
            return Err(ReasonCode::TopicNameInvalid);
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(ReasonCode::ProtocolError);
        }
        let user = ctx.username.as_ref().map(|u| u.as_str());
        if !self
            .auth
            .allows(user, &ctx.client_id, topic.as_str(), Access::Write)
        {
            // Dropped. MQTT 5 says so in the acknowledgement (0x87); a 3.x client cannot be
            // told and is acknowledged as usual, as Mosquitto does.
            self.stats.acl_denied_publish += 1;
            self.ack_dropped_publish(ctx, p.packet_id, p.qos, now);
            return Ok(());
        }
        let receive_maximum = l.receive_maximum as usize;
        if let Some(pid) = p.packet_id {
            let s = self
                .sessions
                .get(&ctx.client_id)
                .ok_or(ReasonCode::UnspecifiedError)?;
            if p.qos == QoS::ExactlyOnce && s.incoming_qos2.contains(&pid.get()) {
                // A resend of a message already routed: acknowledge (once what this shard
                // wrote for it is durable), do not route again.
                let token = (self.durability == Durability::Durable).then(|| self.token());
                let rec = Packet::PubRec(Ack::new(pid));
                self.ack_when_durable(ctx, rec, AckWait::of(token, 0), Then::Ack, now);
                return Ok(());
            }
            // QoS 1/2 publishes not yet acknowledged: QoS 2 awaiting PUBREL and QoS 1 whose
            // PUBACK waits for the disk.
            let unacknowledged =
                s.incoming_qos2.len() + s.link.as_ref().map_or(0, |l| l.held_qos1());
            if unacknowledged >= receive_maximum {
                return Err(ReasonCode::ReceiveMaximumExceeded);
            }
        }
        self.stats.messages_received += 1;
        self.stats.received_qos[p.qos as usize] += 1;
        if is_sys_topic(&topic) {
            // Only the broker publishes there (as Mosquitto does): dropped, acknowledged.
            self.stats.sys_publish_dropped += 1;
            self.ack_dropped_publish(ctx, p.packet_id, p.qos, now);
            return Ok(());
        }
        let mut properties = p.properties;
        properties.topic_alias = None;
        // The dedup key of a QoS 2 message, for the persistent sessions that store it.
        let qos2_id = match p.packet_id {
            Some(pid) if p.qos == QoS::ExactlyOnce && self.store.is_some() => Some(Qos2Id {
                packet_id: pid.get(),
                dup: p.dup,
            }),
            _ => None,
        };
        let msg = Arc::new(Message {
            topic,
            // A slice of this PUBLISH's own allocation (the codec copies it out of the read
            // buffer): a message that waits (queued, in flight, retained) holds exactly its
            // packet, never the connection's read buffer.
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            origin: Some(ctx.client_id.clone()),
            qos2_id,
            created: now,
        });
        let Some(pid) = p.packet_id else {
            self.route(msg, now, None);
            return Ok(());
        };
        // QoS 1/2: the acknowledgement waits until every copy stored for a persistent session
        // is durable, here and on the other shards (one round trip each).
        // A retained publish is also acknowledged only once every shard has its copy, so that
        // a subscribe made anywhere after the acknowledgement finds it.
        // It also waits for what every shard's sessions did with the message (its `Fate`):
        // one refused for the storage budget is not acknowledged as stored, and an MQTT 5
        // client hears when every session refused it for a full queue. Only a 3.x client
        // of a broker without a store (which neither applies to) is acknowledged at once.
        let wait = self.durability == Durability::Durable
            || p.retain
            || self.store.is_some()
            || ctx.version.is_v5();
        let token = wait.then(|| self.token());
        let (matched, remote, fate) = self.route(msg, now, token);
        let mut then = Then::Ack;
        if p.qos == QoS::ExactlyOnce {
            let persistent = match self.sessions.get_mut(&ctx.client_id) {
                Some(s) => {
                    s.incoming_qos2.insert(pid.get());
                    s.qos2_published |= qos2_id.is_some();
                    s.persistent
                }
                None => false,
            };
            if token.is_some() {
                // Stored only after every copy of the message is durable (see
                // `on_ack`): a stored id with a lost copy would make the resend after a
                // crash look like a duplicate, and the copy would never be delivered.
                then = Then::Qos2Received {
                    pid: pid.get(),
                    store: persistent,
                };
            } else if persistent {
                if let Some(store) = &self.store {
                    let r = store.incoming_put(ctx.client_id.as_str(), pid.get());
                    self.note_write(r);
                }
            }
        }
        let rc = if matched || !ctx.version.is_v5() {
            ReasonCode::Success
        } else {
            ReasonCode::NoMatchingSubscribers
        };
        let ack = Ack::with_reason(pid, rc);
        let packet = if p.qos == QoS::AtLeastOnce {
            Packet::PubAck(ack)
        } else {
            Packet::PubRec(ack)
        };
        let wait = AckWait {
            token,
            remote,
            fate,
        };
        self.ack_when_durable(ctx, packet, wait, then, now);
        Ok(())
    }

    /// Sends an acknowledgement to the client of `ctx` now, or holds it (in order with the
    /// others held on that connection) until `remote` shards have answered `token` and this
    /// shard's writes so far are durable.
    /// Acknowledges a PUBLISH that is dropped instead of routed (a topic the client may not
    /// write, or under `$SYS/`): MQTT 5 hears 0x87 in its PUBACK/PUBREC; a 3.x client cannot
    /// be told and is acknowledged as usual, as Mosquitto does, its QoS 2 flow going on with
    /// PUBREL.
    fn ack_dropped_publish(
        &mut self,
        ctx: &ConnCtx,
        packet_id: Option<crate::protocol::PacketId>,
        qos: QoS,
        now: Instant,
    ) {
        let Some(pid) = packet_id else {
            return;
        };
        let rc = if ctx.version.is_v5() {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        };
        let ack = Ack::with_reason(pid, rc);
        let packet = if qos == QoS::AtLeastOnce {
            Packet::PubAck(ack)
        } else {
            if !rc.is_error() {
                // The flow continues with PUBREL, answered by PUBCOMP.
                if let Some(s) = self.sessions.get_mut(&ctx.client_id) {
                    s.incoming_qos2.insert(pid.get());
                }
            }
            Packet::PubRec(ack)
        };
        self.ack_when_durable(ctx, packet, AckWait::of(None, 0), Then::Ack, now);
    }

    fn ack_when_durable(
        &mut self,
        ctx: &ConnCtx,
        packet: Packet,
        wait: AckWait,
        then: Then,
        now: Instant,
    ) {
        let AckWait {
            token,
            remote,
            fate,
        } = wait;
        let Some(link) = self
            .sessions
            .get_mut(&ctx.client_id)
            .and_then(|s| s.link.as_mut())
            .filter(|l| l.conn_id == ctx.conn_id)
        else {
            return;
        };
        let Some(token) = token else {
            link.send_ack(packet);
            return;
        };
        link.hold_ack(token, packet);
        self.pending.insert(
            token,
            Pending::PubAck {
                client_id: ctx.client_id.clone(),
                conn_id: ctx.conn_id,
                remaining: remote + 1,
                failed: false,
                fate,
                then,
            },
        );
        // The local part: this shard's own writes (or none, released at once).
        self.wait_durable(Waiter::Local(token), now);
    }

    // ---------------------------------------------------------------- routing

    /// Sends a message everywhere it has subscribers and updates the retained store. With
    /// `reply`, every other shard involved answers `Ack(reply)` once what it stored is
    /// durable. Returns whether any shard has a matching subscription, how many answers
    /// to expect, and what this shard's sessions did with the message.
    pub fn route(
        &mut self,
        msg: SharedMessage,
        now: Instant,
        reply: Option<Token>,
    ) -> (bool, usize, Fate) {
        let mut remote = 0;
        let mut fate = Fate::default();
        if msg.retain {
            // The retained copy is delivered to later subscribers: it must not leave dedup
            // keys (they would outlive the release of the message).
            let kept = if msg.qos2_id.is_some() {
                Arc::new(Message {
                    qos2_id: None,
                    ..(*msg).clone()
                })
            } else {
                msg.clone()
            };
            let version = self.retain_version();
            self.apply_retained(kept.clone(), version, true);
            for p in self.peers() {
                self.sink.push(
                    p,
                    Event::RetainReplica {
                        msg: kept.clone(),
                        version,
                        reply,
                    },
                );
                remote += usize::from(reply.is_some());
            }
        }
        let mut targets = ShardSet::default();
        self.index
            .for_each_match(&msg.topic, |s| targets.union_with(s));
        for shard in targets.iter() {
            if shard == self.id {
                // Shared-group members on other shards answer the publisher directly.
                self.dispatch = reply.map(|token| Dispatch {
                    to: self.id,
                    token,
                    remote: 0,
                });
                fate = self.with_fate(|c| c.deliver_local(&msg, now));
                remote += self.dispatch.take().map_or(0, |d| d.remote);
            } else {
                self.stats.messages_routed_remote += 1;
                self.sink.push(
                    shard,
                    Event::Publish {
                        msg: msg.clone(),
                        reply,
                    },
                );
                remote += usize::from(reply.is_some());
            }
        }
        (!targets.is_empty(), remote, fate)
    }

    /// A version for a retained write made here: this shard's clock, strictly increasing.
    fn retain_version(&mut self) -> RetainVersion {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.last_retain_ns = now_ns.max(self.last_retain_ns + 1);
        RetainVersion {
            at_ns: self.last_retain_ns,
            shard: self.id as u16,
        }
    }

    /// Delivers a message to this shard's matching subscribers: each session once, at the
    /// highest QoS of its matching subscriptions, with all their identifiers; each shared
    /// group homed here to one member.
    fn deliver_local(&mut self, msg: &SharedMessage, now: Instant) {
        // Reused across publishes (taken and put back): no allocation per message.
        let mut hits = std::mem::take(&mut self.scratch.hits);
        let mut groups = std::mem::take(&mut self.scratch.groups);
        self.subs.for_each_match(&msg.topic, |subs| {
            for s in subs {
                match s {
                    LocalSub::Client {
                        client_id,
                        options,
                        id,
                    } => {
                        if options.no_local && msg.origin.as_ref() == Some(client_id) {
                            continue;
                        }
                        hits.push((client_id.clone(), *options, *id));
                    }
                    LocalSub::Group { key } => groups.push(key.clone()),
                }
            }
        });
        hits.sort_by(|a, b| a.0.cmp(&b.0));
        let mut i = 0;
        while i < hits.len() {
            let client_id = hits[i].0.clone();
            let mut qos = QoS::AtMostOnce;
            let mut rap = false;
            let mut sub_ids = Vec::new();
            while i < hits.len() && hits[i].0 == client_id {
                let (_, o, id) = &hits[i];
                qos = qos.max(o.qos.min(msg.qos));
                rap |= o.retain_as_published;
                sub_ids.extend(*id);
                i += 1;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos,
                retain: rap && msg.retain,
                sub_ids,
                via_share: None,
            };
            if let Some(s) = self.sessions.get_mut(&client_id) {
                if !may_read(&self.auth, s, &msg.topic) {
                    self.stats.acl_denied_delivery += 1;
                    continue;
                }
                let outcome = s.deliver(d, &self.limits, now);
                self.note_outcome(outcome);
                let Some(s) = self.sessions.get(&client_id) else {
                    continue;
                };
                if let (Some(id), Some(origin)) = (msg.qos2_id, &msg.origin) {
                    if s.holds_qos2(origin, id.packet_id) {
                        self.note_qos2_holder(origin, id.packet_id, &client_id);
                    }
                }
                self.sync_session(&client_id, now);
            }
        }
        for key in groups.drain(..) {
            let reply = self.dispatch.map(|d| (d.to, d.token));
            let first = (None, 0, Fate::default());
            if self.shared_dispatch(key, msg.clone(), first, reply, now) == Dispatched::Remote {
                if let Some(d) = &mut self.dispatch {
                    d.remote += 1;
                }
            }
        }
        hits.clear();
        self.scratch = DeliverScratch { hits, groups };
    }

    /// At a group's home: picks a member (round robin over online members; if none is
    /// online, a persistent one, which queues) and sends it the message.
    /// `tried`: the member that just refused it (not picked again), how many tried
    /// before, and what they did with it (see [`Event::SharedDeliver`]).
    fn shared_dispatch(
        &mut self,
        key: Arc<str>,
        msg: SharedMessage,
        tried: (Option<&MqttStr>, u8, Fate),
        reply: Option<(usize, Token)>,
        now: Instant,
    ) -> Dispatched {
        let (not, attempts, fate) = tried;
        let Some(g) = self.groups.get_mut(&key) else {
            self.stats.shared_dropped_no_member += 1;
            return Dispatched::Dropped;
        };
        let n = g.members.len();
        let auth = &self.auth;
        let eligible = |m: &SharedMember, online: bool| {
            Some(&m.client_id) != not
                && (m.online == online)
                && (online || m.persistent)
                && m.identity.as_ref().is_none_or(|user| {
                    let user = user.as_ref().map(|u| u.as_str());
                    auth.allows(user, &m.client_id, msg.topic.as_str(), Access::Read)
                })
        };
        let mut pick = None;
        for online in [true, false] {
            for k in 0..n {
                let idx = (g.next + k) % n;
                if eligible(&g.members[idx], online) {
                    pick = Some(idx);
                    break;
                }
            }
            if pick.is_some() {
                break;
            }
        }
        let Some(idx) = pick else {
            self.stats.shared_dropped_no_member += 1;
            return Dispatched::Dropped;
        };
        g.next = (idx + 1) % n;
        let member = g.members[idx].clone();
        let to = member.shard as usize;
        if to != self.id {
            let event = Event::SharedDeliver {
                key,
                client_id: member.client_id,
                msg,
                attempts,
                reply,
                fate,
            };
            self.sink.push(to, event);
            return Dispatched::Remote;
        }
        // A member here: its copy is covered by this shard's own durability. One that
        // cannot take it passes it on at once, so that the caller learns where it went.
        if self.shared_take(&key, &member.client_id, &msg, now) {
            Dispatched::Local
        } else if attempts < SHARED_ATTEMPTS_MAX {
            let tried = (Some(&member.client_id), attempts + 1, fate);
            self.shared_dispatch(key, msg, tried, reply, now)
        } else {
            Dispatched::Dropped
        }
    }

    /// Hands a shared message to the member `client_id`, a session of this shard. Returns
    /// whether it took it: not when it is gone, may not read the topic, left the group, or
    /// its queue (or the storage budget) refused it (what it did is noted in the fate).
    fn shared_take(
        &mut self,
        key: &Arc<str>,
        client_id: &MqttStr,
        msg: &SharedMessage,
        now: Instant,
    ) -> bool {
        let outcome = match self.sessions.get_mut(client_id) {
            Some(s) if !may_read(&self.auth, s, &msg.topic) => {
                self.stats.acl_denied_delivery += 1;
                None
            }
            Some(s) => {
                let d = s.subscriptions.get(&**key).map(|sub| Delivery {
                    qos: msg.qos.min(sub.options.qos),
                    retain: sub.options.retain_as_published && msg.retain,
                    sub_ids: sub.id.into_iter().collect(),
                    msg: msg.clone(),
                    via_share: Some(key.clone()),
                });
                d.map(|d| s.deliver(d, &self.limits, now))
            }
            None => None,
        };
        let Some(outcome) = outcome else {
            return false;
        };
        self.note_outcome(outcome);
        self.sync_session(client_id, now);
        !matches!(
            outcome,
            DeliverOutcome::Dropped(DropReason::QueueFull | DropReason::StorageBudget)
        )
    }

    // ---------------------------------------------------------------- subscribe

    fn on_subscribe(&mut self, ctx: &ConnCtx, s: Subscribe, now: Instant) {
        let token = self.token();
        let mut remaining = 0usize;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let sub_id = s.properties.subscription_identifier;
        let peers: Vec<usize> = self.peers().collect();
        let mut adding: Vec<Arc<str>> = Vec::new();
        let mut local_joins = Vec::new();
        for (filter, options) in s.filters {
            let rc = self.check_filter(ctx, &filter);
            if matches!(rc, ReasonCode::NotAuthorized | ReasonCode::UnspecifiedError) {
                self.stats.acl_denied_subscribe += 1;
            }
            if rc != ReasonCode::Success {
                codes.push(rc); // 3.x SUBACK encodes any failure as 0x80
                continue;
            }
            let Some(session) = self.sessions.get_mut(&ctx.client_id) else {
                codes.push(ReasonCode::UnspecifiedError);
                continue;
            };
            // Kept for the session's life: its own bytes, not its SUBSCRIBE packet's.
            let new_sub = Subscription {
                filter: filter.detached(),
                options,
                id: sub_id,
            };
            let previous = session
                .subscriptions
                .insert(filter.as_str().into(), new_sub.clone());
            let existed = previous.is_some();
            self.write_subscription(&ctx.client_id, Some(&new_sub), filter.as_str());
            let Some(session) = self.sessions.get(&ctx.client_id) else {
                continue;
            };
            let persistent = session.expiry_s > 0;
            if filter.is_shared() {
                let key: Arc<str> = Arc::from(filter.as_str());
                let home = owner_shard(key.as_bytes(), self.count);
                remaining += 1;
                let join = Event::SharedJoin {
                    key,
                    member: SharedMember {
                        client_id: ctx.client_id.clone(),
                        shard: self.id as u16,
                        options,
                        sub_id,
                        online: true,
                        persistent,
                        identity: Some(ctx.username.clone()),
                    },
                    reply: token,
                };
                if home == self.id {
                    // Handled here, and answered at once: only after the SUBACK's pending
                    // entry exists, or the answer would find nothing to count down.
                    local_joins.push(join);
                } else {
                    self.sink.push(home, join);
                }
            } else {
                let entry = self.subs.entry(filter.filter());
                let first = entry.is_empty();
                entry.retain(
                    |s| !matches!(s, LocalSub::Client { client_id, .. } if *client_id == ctx.client_id),
                );
                entry.push(LocalSub::Client {
                    client_id: ctx.client_id.clone(),
                    options,
                    id: sub_id,
                });
                // A filter whose addition is still on its way to the peers is added again
                // (the peers' indexes are sets, and each peer answers in order), so that this
                // SUBACK too waits until every peer routes the filter here.
                let in_flight = self.index_adding.contains_key(filter.filter());
                if first || in_flight {
                    let acks = self.index_add(filter.filter(), Some(token), &peers);
                    if acks > 0 {
                        remaining += acks;
                        let key: Arc<str> = Arc::from(filter.filter());
                        *self.index_adding.entry(key.clone()).or_insert(0) += 1;
                        adding.push(key);
                    }
                }
                let send_retained = match options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
                if send_retained {
                    let (auth, user) = (&self.auth, ctx.username.as_ref().map(|u| u.as_str()));
                    let denied = &mut self.stats.acl_denied_delivery;
                    self.retained.for_each_match(filter.filter(), |m| {
                        if !auth.allows(user, &ctx.client_id, m.topic.as_str(), Access::Read) {
                            *denied += 1;
                            return;
                        }
                        retained.push(Delivery {
                            msg: m.clone(),
                            qos: m.qos.min(options.qos),
                            retain: true,
                            sub_ids: sub_id.into_iter().collect(),
                            via_share: None,
                        });
                    });
                }
            }
            codes.push(match options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
        }
        let suback = SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: codes,
        };
        // A subscription of a persistent session is acknowledged once it is on disk.
        if self.durability == Durability::Durable && self.log.write_seq > self.log.synced_seq {
            self.log
                .waiters
                .push_back((self.log.write_seq, Waiter::Local(token)));
            remaining += 1;
        }
        if remaining == 0 {
            self.finish_suback(&ctx.client_id, ctx.conn_id, suback, retained, now);
        } else {
            self.pending.insert(
                token,
                Pending::SubAck {
                    client_id: ctx.client_id.clone(),
                    conn_id: ctx.conn_id,
                    remaining,
                    suback,
                    retained,
                    adding,
                },
            );
        }
        for join in local_joins {
            self.on_event(self.id, join, now);
        }
    }

    fn check_filter(&self, ctx: &ConnCtx, filter: &TopicFilter) -> ReasonCode {
        let l = &self.cfg.limits;
        if filter.as_str().len() > l.topic_bytes_max as usize
            || filter.levels() > l.topic_levels_max as usize
        {
            return ReasonCode::TopicFilterInvalid;
        }
        let user = ctx.username.as_ref().map(|u| u.as_str());
        match self
            .auth
            .refuses_subscribe(user, &ctx.client_id, filter.as_str())
        {
            // `[access] subscribe_deny`: 0x80, the failure code every client version
            // understands (what the Paho suites expect).
            Some(true) => return ReasonCode::UnspecifiedError,
            // The ACL: 0x87 (3.x SUBACK encodes it as 0x80).
            Some(false) => return ReasonCode::NotAuthorized,
            None => {}
        }
        if let Some(s) = self.sessions.get(&ctx.client_id) {
            if s.subscriptions.len() >= l.subscriptions_per_session_max as usize
                && !s.subscriptions.contains_key(filter.as_str())
            {
                return ReasonCode::QuotaExceeded;
            }
        }
        ReasonCode::Success
    }

    fn finish_suback(
        &mut self,
        client_id: &MqttStr,
        conn_id: u64,
        suback: SubAck,
        retained: Vec<Delivery>,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        match &s.link {
            Some(l) if l.conn_id == conn_id => {
                l.out.send(&Packet::SubAck(suback));
            }
            _ => return,
        }
        for d in retained {
            let _ = s.deliver(d, &self.limits, now);
        }
        self.sync_session(client_id, now);
    }

    /// Adds this shard to the index for `filter` everywhere; returns how many acks to await.
    fn index_add(&mut self, filter: &str, reply: Option<Token>, peers: &[usize]) -> usize {
        self.index.entry(filter).insert(self.id);
        let filter: Arc<str> = Arc::from(filter);
        for &p in peers {
            self.sink.push(
                p,
                Event::Index {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    add: true,
                    reply,
                },
            );
        }
        if reply.is_some() {
            peers.len()
        } else {
            0
        }
    }

    fn index_remove(&mut self, filter: &str) {
        if let Some(set) = self.index.get_mut(filter) {
            set.remove(self.id);
            if set.is_empty() {
                self.index.remove(filter);
            }
        }
        let filter: Arc<str> = Arc::from(filter);
        for p in self.peers() {
            self.sink.push(
                p,
                Event::Index {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    add: false,
                    reply: None,
                },
            );
        }
    }

    fn on_unsubscribe(&mut self, ctx: &ConnCtx, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            let removed = self
                .sessions
                .get_mut(&ctx.client_id)
                .and_then(|s| s.subscriptions.remove(filter.as_str()));
            if removed.is_some() {
                self.remove_subscription(&ctx.client_id, &filter);
                self.write_subscription(&ctx.client_id, None, filter.as_str());
                codes.push(ReasonCode::Success);
            } else {
                codes.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        ctx.out.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Default::default(),
            reason_codes: if ctx.version.is_v5() {
                codes
            } else {
                Vec::new()
            },
        }));
    }

    /// Takes one subscription of `client_id` out of the routing tables (the session's own
    /// map is the caller's business).
    fn remove_subscription(&mut self, client_id: &MqttStr, filter: &TopicFilter) {
        if filter.is_shared() {
            let key: Arc<str> = Arc::from(filter.as_str());
            let home = owner_shard(key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedLeave {
                    key,
                    client_id: client_id.clone(),
                },
            );
            return;
        }
        let f = filter.filter();
        let Some(entry) = self.subs.get_mut(f) else {
            return;
        };
        entry.retain(|s| !matches!(s, LocalSub::Client { client_id: c, .. } if c == client_id));
        if entry.is_empty() {
            self.subs.remove(f);
            self.index_remove(f);
        }
    }

    // ---------------------------------------------------------------- events

    /// Handles an event from shard `from` (this shard itself on the local path).
    pub fn on_event(&mut self, from: usize, event: Event, now: Instant) {
        match event {
            Event::Publish { msg, reply } => {
                self.stats.messages_from_remote += u64::from(from != self.id);
                // Shared-group members on other shards answer a relay here, which answers
                // the publisher once they and this shard's own writes are durable.
                let relay = reply.map(|_| self.token());
                self.dispatch = relay.map(|token| Dispatch {
                    to: self.id,
                    token,
                    remote: 0,
                });
                let fate = self.with_fate(|c| c.deliver_local(&msg, now));
                let dispatched = self.dispatch.take().map_or(0, |d| d.remote);
                match (reply, relay) {
                    (Some(token), Some(relay)) if dispatched > 0 => {
                        self.pending.insert(
                            relay,
                            Pending::Relay {
                                to: from,
                                token,
                                remaining: dispatched + 1,
                                failed: false,
                                fate,
                            },
                        );
                        self.wait_durable(Waiter::Local(relay), now);
                    }
                    (Some(token), _) => {
                        self.wait_durable(
                            Waiter::Remote {
                                to: from,
                                token,
                                fate,
                            },
                            now,
                        );
                    }
                    _ => {}
                }
            }
            Event::Index {
                filter,
                shard,
                add,
                reply,
            } => {
                if add {
                    self.index.entry(&filter).insert(shard as usize);
                } else if let Some(set) = self.index.get_mut(&filter) {
                    set.remove(shard as usize);
                    if set.is_empty() {
                        self.index.remove(&filter);
                    }
                }
                if let Some(token) = reply {
                    self.send(from, Event::done(token));
                }
            }
            Event::Ack { token, ok, fate } => self.on_ack(token, ok, fate, now),
            Event::RetainReplica {
                msg,
                version,
                reply,
            } => {
                self.apply_retained(msg, version, true);
                if let Some(token) = reply {
                    self.wait_durable(Waiter::answer(from, token), now);
                }
            }
            Event::RecoveryDone => self.recovered_peers += 1,
            Event::Rehome { session, reply } => self.adopt(from, *session, reply, now),
            Event::SharedJoin { key, member, reply } => {
                let to = member.shard as usize;
                let g = self.groups.entry(key.clone()).or_default();
                let fresh = g.members.is_empty();
                g.members.retain(|m| m.client_id != member.client_id);
                g.members.push(member);
                let mut remaining = 0;
                if fresh {
                    let filter = TopicFilter::new(&key).expect("validated by the codec");
                    let entry = self.subs.entry(filter.filter());
                    let first = entry.is_empty();
                    entry.push(LocalSub::Group { key: key.clone() });
                    if first {
                        let token = self.token();
                        let peers: Vec<usize> = self.peers().collect();
                        remaining = self.index_add(filter.filter(), Some(token), &peers);
                        if remaining > 0 {
                            self.pending.insert(
                                token,
                                Pending::Relay {
                                    to,
                                    token: reply,
                                    remaining,
                                    failed: false,
                                    fate: Fate::default(),
                                },
                            );
                        }
                    }
                }
                if remaining == 0 {
                    self.send(to, Event::done(reply));
                }
            }
            Event::SharedLeave { key, client_id } => {
                let Some(g) = self.groups.get_mut(&key) else {
                    return;
                };
                g.members.retain(|m| m.client_id != client_id);
                if g.members.is_empty() {
                    self.groups.remove(&key);
                    let filter = TopicFilter::new(&key).expect("validated by the codec");
                    let f = filter.filter();
                    if let Some(entry) = self.subs.get_mut(f) {
                        entry.retain(|s| !matches!(s, LocalSub::Group { key: k } if *k == key));
                        if entry.is_empty() {
                            self.subs.remove(f);
                            self.index_remove(f);
                        }
                    }
                }
            }
            Event::SharedOnline {
                key,
                client_id,
                online,
            } => {
                if let Some(g) = self.groups.get_mut(&key) {
                    for m in &mut g.members {
                        if m.client_id == client_id {
                            m.online = online;
                        }
                    }
                }
            }
            Event::SharedDeliver {
                key,
                client_id,
                msg,
                attempts,
                reply,
                fate: carried,
            } => {
                let mut taken = false;
                let fate = self.with_fate(|c| taken = c.shared_take(&key, &client_id, &msg, now));
                let mut fate = fate;
                fate.merge(carried);
                if taken {
                    if let Some((to, token)) = reply {
                        self.wait_durable(Waiter::Remote { to, token, fate }, now);
                    }
                } else if attempts < SHARED_ATTEMPTS_MAX {
                    let home = owner_shard(key.as_bytes(), self.count);
                    self.send(
                        home,
                        Event::SharedBounce {
                            key,
                            msg,
                            not: client_id,
                            attempts: attempts + 1,
                            reply,
                            fate,
                        },
                    );
                } else if let Some((to, token)) = reply {
                    self.send(
                        to,
                        Event::Ack {
                            token,
                            ok: true,
                            fate,
                        },
                    );
                }
            }
            Event::SharedBounce {
                key,
                msg,
                not,
                attempts,
                reply,
                fate: carried,
            } => {
                let mut dispatched = Dispatched::Dropped;
                let mut fate = self.with_fate(|c| {
                    let tried = (Some(&not), attempts, carried);
                    dispatched = c.shared_dispatch(key, msg, tried, reply, now);
                });
                fate.merge(carried);
                self.after_bounce(dispatched, reply, fate, now);
            }
            Event::Qos2Release {
                origin,
                packet_id,
                reply,
            } => {
                self.forget_qos2(&origin, packet_id, now);
                if let Some(token) = reply {
                    self.wait_durable(Waiter::answer(from, token), now);
                }
            }
        }
    }

    /// After a bounced shared message was dispatched again at its group's home: a member
    /// here took it (answer once this shard's writes are durable), one elsewhere answers
    /// itself, or no member could take it (answer at once).
    fn after_bounce(
        &mut self,
        dispatched: Dispatched,
        reply: Option<(usize, Token)>,
        fate: Fate,
        now: Instant,
    ) {
        let Some((to, token)) = reply else {
            return;
        };
        match dispatched {
            Dispatched::Local => {
                self.wait_durable(Waiter::Remote { to, token, fate }, now);
            }
            Dispatched::Remote => {}
            // What the members tried before did with it (a full queue, say) is the answer.
            Dispatched::Dropped => self.send(
                to,
                Event::Ack {
                    token,
                    ok: true,
                    fate,
                },
            ),
        }
    }

    // ---------------------------------------------------------------- QoS 2 dedup keys

    /// Records that `client_id` (a session of this shard) holds the key (`origin`, `pid`).
    fn note_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let holders = self
            .qos2_holders
            .entry(origin.clone())
            .or_default()
            .entry(pid)
            .or_default();
        if !holders.contains(client_id) {
            holders.push(client_id.clone());
        }
    }

    /// `client_id` no longer holds the key (`origin`, `pid`) (its session ended).
    fn drop_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let Some(by_pid) = self.qos2_holders.get_mut(origin) else {
            return;
        };
        if let Some(holders) = by_pid.get_mut(&pid) {
            holders.retain(|c| c != client_id);
            if holders.is_empty() {
                by_pid.remove(&pid);
            }
        }
        if by_pid.is_empty() {
            self.qos2_holders.remove(origin);
        }
    }

    /// Makes every shard forget the key (`origin`, `pid`) (`None`: every key of `origin`):
    /// here at once, on the peers by [`Event::Qos2Release`]. With `reply`, each peer answers
    /// once its deletions are durable; returns how many answers to expect.
    fn release_qos2(
        &mut self,
        origin: &MqttStr,
        pid: Option<u16>,
        reply: Option<Token>,
        now: Instant,
    ) -> usize {
        let mut remote = 0;
        for p in self.peers() {
            self.sink.push(
                p,
                Event::Qos2Release {
                    origin: origin.clone(),
                    packet_id: pid,
                    reply,
                },
            );
            remote += usize::from(reply.is_some());
        }
        self.forget_qos2(origin, pid, now);
        remote
    }

    /// Removes the key (`origin`, `pid`) (`None`: every key of `origin`) from the sessions of
    /// this shard that hold it, and writes the deletions.
    fn forget_qos2(&mut self, origin: &MqttStr, pid: Option<u16>, now: Instant) {
        let held: Vec<(u16, Vec<MqttStr>)> = match pid {
            Some(pid) => {
                let Some(by_pid) = self.qos2_holders.get_mut(origin) else {
                    return;
                };
                let held = by_pid.remove(&pid);
                if by_pid.is_empty() {
                    self.qos2_holders.remove(origin);
                }
                held.map(|h| vec![(pid, h)]).unwrap_or_default()
            }
            None => self
                .qos2_holders
                .remove(origin)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        };
        let mut touched: Vec<MqttStr> = Vec::new();
        for (pid, clients) in held {
            for c in clients {
                if let Some(s) = self.sessions.get_mut(&c) {
                    if s.forget_qos2(origin, pid) && !touched.contains(&c) {
                        touched.push(c);
                    }
                }
            }
        }
        for c in touched {
            self.sync_session(&c, now);
        }
    }

    fn on_ack(&mut self, token: Token, ok: bool, answer: Fate, now: Instant) {
        let done = match self.pending.get_mut(&token) {
            Some(Pending::SubAck { remaining, .. }) => {
                *remaining -= 1;
                *remaining == 0
            }
            Some(Pending::Relay {
                remaining,
                failed,
                fate,
                ..
            })
            | Some(Pending::PubAck {
                remaining,
                failed,
                fate,
                ..
            }) => {
                *remaining -= 1;
                *failed |= !ok;
                fate.merge(answer);
                *remaining == 0
            }
            Some(Pending::Rehome { .. }) => true,
            None => false,
        };
        if !done {
            return;
        }
        match self.pending.remove(&token) {
            Some(Pending::SubAck {
                client_id,
                conn_id,
                suback,
                retained,
                adding,
                ..
            }) => {
                for f in adding {
                    if let Some(n) = self.index_adding.get_mut(&f) {
                        *n -= 1;
                        if *n == 0 {
                            self.index_adding.remove(&f);
                        }
                    }
                }
                self.finish_suback(&client_id, conn_id, suback, retained, now)
            }
            Some(Pending::Relay {
                to,
                token,
                failed,
                fate,
                ..
            }) => self.send(
                to,
                Event::Ack {
                    token,
                    ok: !failed,
                    fate,
                },
            ),
            Some(Pending::PubAck {
                client_id,
                conn_id,
                failed,
                fate,
                then,
                ..
            }) => self.finish_pub_ack(token, client_id, conn_id, failed, fate, then, now),
            Some(Pending::Rehome { client_id }) => {
                if !ok {
                    tracing::error!(client = %client_id, "re-homing failed; the session stays here until the next start");
                } else if let Some(store) = &self.store {
                    let r = store.delete_session(&client_id);
                    self.note_write(r);
                }
            }
            None => {}
        }
    }

    /// The round trips of a held PUBACK/PUBREC/PUBCOMP are done: decides what the client
    /// is told (see [`refusal`]) and does what must follow.
    #[allow(clippy::too_many_arguments)]
    fn finish_pub_ack(
        &mut self,
        token: Token,
        client_id: MqttStr,
        conn_id: u64,
        failed: bool,
        fate: Fate,
        then: Then,
        now: Instant,
    ) {
        let v5 = self
            .sessions
            .get(&client_id)
            .is_some_and(|s| s.version.is_v5());
        let refused = refusal(failed, fate, v5);
        match (then, refused) {
            (Then::Qos2Received { pid, store: true }, None) => {
                // Every copy is durable: now store the QoS 2 id, and send PUBREC once that is
                // durable too.
                let write = self
                    .store
                    .as_ref()
                    .map(|st| st.incoming_put(client_id.as_str(), pid));
                self.ack_after_write(token, client_id, conn_id, write, now);
            }
            (Then::Qos2Received { pid, .. }, Some(rc)) => {
                // Not every copy is stored: the id is forgotten, so that a resend is routed
                // again (the sessions that stored the message skip it by its key). An MQTT 5
                // client gets PUBREC 0x80, which ends the flow: the keys go too.
                let v5 = match self.sessions.get_mut(&client_id) {
                    Some(s) => {
                        s.incoming_qos2.remove(&pid);
                        s.version.is_v5()
                    }
                    None => false,
                };
                if v5 && self.store.is_some() {
                    self.release_qos2(&client_id, Some(pid), None, now);
                }
                self.release_pub_ack(&client_id, conn_id, token, Some(rc));
            }
            (Then::DeleteIncoming(pid), _) => {
                if failed {
                    tracing::error!(client = %client_id, packet_id = pid, "a QoS 2 dedup key could not be deleted on every shard; it stays until the session holding it ends");
                }
                // Every shard forgot the key: now delete the id, and send PUBCOMP once that is
                // durable too.
                let write = self
                    .store
                    .as_ref()
                    .map(|st| st.incoming_delete(client_id.as_str(), pid));
                self.ack_after_write(token, client_id, conn_id, write, now);
            }
            (Then::Qos2Received { store: false, .. } | Then::Ack, refused) => {
                self.release_pub_ack(&client_id, conn_id, token, refused)
            }
        }
    }

    /// The last step of a held acknowledgement: records `write` (when there is a store) and
    /// releases the acknowledgement of `token` once it is durable.
    fn ack_after_write(
        &mut self,
        token: Token,
        client_id: MqttStr,
        conn_id: u64,
        write: Option<Result<(), StorageError>>,
        now: Instant,
    ) {
        if let Some(r) = write {
            self.note_write(r);
        }
        self.pending.insert(
            token,
            Pending::PubAck {
                client_id,
                conn_id,
                remaining: 1,
                failed: false,
                fate: Fate::default(),
                then: Then::Ack,
            },
        );
        self.wait_durable(Waiter::Local(token), now);
    }

    /// Sends a held PUBACK/PUBREC/PUBCOMP (and those behind it). When the message was
    /// refused (`Some(reason)`: not stored, or refused by every session for full queues), an
    /// MQTT 5 client gets that reason; a 3.x client gets no acknowledgement, and its
    /// connection is closed, because a 3.x client resends unacknowledged messages only when
    /// it reconnects.
    fn release_pub_ack(
        &mut self,
        client_id: &MqttStr,
        conn_id: u64,
        token: Token,
        refused: Option<ReasonCode>,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let v5 = s.version.is_v5();
        let Some(link) = s.link.as_mut().filter(|l| l.conn_id == conn_id) else {
            return;
        };
        if let Some(reason) = refused {
            tracing::debug!(client = %client_id, v5, ?reason, "message not kept; its acknowledgement reports it");
        }
        link.release_ack(token, refused);
        if refused.is_some() && !v5 {
            link.out.close(None);
        }
    }

    /// Applies a retained write if it is newer than what this shard has for the topic; the
    /// topic's home shard also stores it (when `store_at_home`).
    fn apply_retained(&mut self, msg: SharedMessage, version: RetainVersion, store_at_home: bool) {
        let now = Instant::now();
        if let Some((v, _)) = self.retained_versions.get(&msg.topic) {
            if *v >= version {
                return; // an older write arriving late
            }
        }
        let delete = msg.payload.is_empty();
        // The broker's own `$SYS` topics (a fixed set, published again every interval) do
        // not count against the limit and are not stored.
        let sys = is_sys_topic(&msg.topic);
        if !delete
            && !sys
            && self.retained.get(&msg.topic).is_none()
            && self.retained.len() >= self.cfg.limits.retained_messages_max as usize
        {
            self.stats.retained_dropped_full += 1;
            return;
        }
        self.retained_versions
            .insert(msg.topic.clone(), (version, delete.then_some(now)));
        let home = owner_shard(msg.topic.as_bytes(), self.count) == self.id;
        if home && store_at_home && !sys {
            if let Some(store) = &self.store {
                let r = if delete {
                    store.retained_delete(msg.topic.as_str())
                } else {
                    store.retained_put(
                        msg.topic.as_str(),
                        &MessageRecord::from_message(&msg, &WallClock::now()),
                    )
                };
                self.note_write(r);
            }
        }
        if delete {
            self.retained.remove(&msg.topic);
        } else {
            self.retained.set(msg);
        }
    }

    /// Forgets deletions older than [`TOMBSTONE_KEEP`] (cross-shard writes arrive within
    /// milliseconds; the tombstones only guard against reordering).
    fn prune_tombstones(&mut self, now: Instant) {
        self.retained_versions
            .retain(|_, (_, deleted)| match deleted {
                Some(at) => now.saturating_duration_since(*at) < TOMBSTONE_KEEP,
                None => true,
            });
    }

    /// A fresh client id that this shard owns, for a client that sent an empty one, unique
    /// among this shard's sessions (MQTT-3.1.3-6).
    pub fn assign_client_id(&mut self, seed: u64) -> MqttStr {
        // Candidates step by 1. Seeds step by a large odd stride, so one search never runs
        // into the next seed (stepping by the seed stride did: a candidate rejected here was
        // the next seed, and two clients were given the same id).
        let mut n = seed;
        loop {
            let id = MqttStr::new(&format!("shardmq-{:x}-{:x}", self.id, n)).expect("ascii");
            if owner_shard(id.as_bytes(), self.count) == self.id && !self.sessions.contains_key(&id)
            {
                return id;
            }
            n = n.wrapping_add(1);
        }
    }

    /// Closes every connection (shutdown): MQTT 5 clients get DISCONNECT 0x8B.
    ///
    /// No will is published from here on: a stop of the broker is not a failure of its
    /// clients. A persistent session keeps its will, stored with the time the connection
    /// closed, so that after the restart its Will Delay Interval (0 included) runs on from
    /// that moment and the will is published then, unless the client is back first or the
    /// session ends. The will of a session that ends with the connection (clean session,
    /// Session Expiry Interval 0) is dropped with it.
    pub fn close_all(&mut self) {
        self.stopping = true;
        self.flush_counters();
        for s in self.sessions.values() {
            if let Some(l) = &s.link {
                l.out.close(Some(ReasonCode::ServerShuttingDown));
            }
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
mod tests {
    use super::*;
    use crate::protocol::ConnectProperties;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Sink(RefCell<Vec<(usize, Event)>>);
    impl EventSink for Sink {
        fn push(&self, to: usize, event: Event) {
            self.0.borrow_mut().push((to, event));
        }
        fn wake_committer(&self) {}
    }

    fn core() -> Core {
        Core::new(
            0,
            1,
            Rc::new(Config::default()),
            Rc::new(Sink::default()),
            None,
            Arc::new(QueuedBudget::new(1, u64::MAX)),
        )
    }

    fn connect(id: &str, clean_start: bool, expiry: u32) -> Connect {
        Connect {
            protocol: ProtocolVersion::V5,
            clean_start,
            keep_alive: 0,
            properties: ConnectProperties {
                session_expiry_interval: Some(expiry),
                ..Default::default()
            },
            client_id: MqttStr::new(id).unwrap(),
            will: None,
            username: None,
            password: None,
        }
    }

    fn session_of(c: &mut Core, id: &str, clean: bool, expiry: u32, now: Instant) -> ConnCtx {
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        c.connect(&connect(id, clean, expiry), None, out, now)
            .unwrap()
            .ctx
    }

    #[test]
    fn a_stale_expiry_timer_does_not_expire_a_new_session_with_the_same_id() {
        let mut c = core();
        let t0 = Instant::now();
        let ctx = session_of(&mut c, "x", true, 5, t0);
        c.disconnected(&ctx, Ending::Normal, t0); // expiry timer at t0 + 5
        let ctx = session_of(&mut c, "x", true, 10, t0 + Duration::from_secs(1));
        c.disconnected(&ctx, Ending::Normal, t0 + Duration::from_secs(1));
        c.fire_timers(t0 + Duration::from_secs(6));
        assert!(c.session(&MqttStr::new("x").unwrap()).is_some());
        c.fire_timers(t0 + Duration::from_secs(11));
        assert!(c.session(&MqttStr::new("x").unwrap()).is_none());
    }
}

#[cfg(test)]
mod subscribe_tests {
    use super::tests_support::*;
    use super::*;
    use crate::protocol::PacketId;

    #[test]
    fn two_subscribes_in_a_row_both_take_effect() {
        let mut c = core();
        let now = Instant::now();
        let (mut sub, sub_out) = conn(&mut c, "s", now);
        for (pid, f) in [(1u16, "TopicA/B"), (2, "Topic/C")] {
            let p = Packet::Subscribe(Subscribe {
                packet_id: PacketId::new(pid).unwrap(),
                properties: Default::default(),
                filters: vec![(
                    TopicFilter::new(f).unwrap(),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        ..Default::default()
                    },
                )],
            });
            c.on_packet(&mut sub, p, now).unwrap();
        }
        let (mut publ, _) = conn(&mut c, "p", now);
        let p = Packet::Publish(Publish::new(
            TopicName::new("TopicA/B").unwrap(),
            bytes::Bytes::from_static(b"one"),
        ));
        c.on_packet(&mut publ, p, now).unwrap();
        let got = drain(&sub_out);
        assert!(
            got.iter().any(|p| matches!(p, Packet::Publish(_))),
            "{got:?}"
        );
    }
}

#[cfg(test)]
mod flow_tests {
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
        assert!(cores[0].index_adding.is_empty());
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
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::protocol::{decode, DecodeLimits};
    use std::cell::RefCell;

    #[derive(Default)]
    pub struct Sink(pub RefCell<Vec<(usize, Event)>>);
    impl EventSink for Sink {
        fn push(&self, to: usize, event: Event) {
            self.0.borrow_mut().push((to, event));
        }
        fn wake_committer(&self) {}
    }

    pub fn core() -> Core {
        Core::new(
            0,
            1,
            Rc::new(Config::default()),
            Rc::new(Sink::default()),
            None,
            Arc::new(QueuedBudget::new(1, u64::MAX)),
        )
    }

    pub fn conn(c: &mut Core, id: &str, now: Instant) -> (ConnCtx, Rc<Outbound>) {
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            properties: Default::default(),
            client_id: MqttStr::new(id).unwrap(),
            will: None,
            username: None,
            password: None,
        };
        let ctx = c.connect(&connect, None, out.clone(), now).unwrap().ctx;
        (ctx, out)
    }

    /// A SUBSCRIBE with one filter.
    pub fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
        Packet::Subscribe(Subscribe {
            packet_id: crate::protocol::PacketId::new(packet_id).unwrap(),
            properties: Default::default(),
            filters: vec![(
                TopicFilter::new(filter).unwrap(),
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        })
    }

    pub fn drain(out: &Outbound) -> Vec<Packet> {
        let mut buf = futures_lite::future::block_on(out.next_batch(bytes::BytesMut::new())).0;
        let limits = DecodeLimits::new(1 << 20, Some(ProtocolVersion::V5));
        let mut v = Vec::new();
        while let Ok(Some(p)) = decode(&mut buf, &limits) {
            v.push(p);
        }
        v
    }
}

#[cfg(test)]
mod qos2_dedup_tests {
    use super::tests_support::{drain, subscribe_packet, Sink};
    use super::*;
    use crate::protocol::{ConnectProperties, PacketId};
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
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start,
            keep_alive: 0,
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                ..Default::default()
            },
            client_id: MqttStr::new(id).unwrap(),
            will: None,
            username: None,
            password: None,
        };
        let ctx = c.connect(&connect, None, out.clone(), now).unwrap().ctx;
        (ctx, out)
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
            assert_eq!(c.qos2_holders[&p][&7], vec![s.clone()]);
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
        assert!(c.qos2_holders.is_empty());
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
        assert!(c.qos2_holders.is_empty());
        commit(&mut c, now);
        let r = store.load().unwrap();
        assert!(stored(&r, "s").dedup.is_empty());
    }
}

#[cfg(test)]
mod auth_tests {
    use super::tests_support::*;
    use super::*;
    use crate::auth::PasswordFile;

    fn connect_with(user: &str, password: &[u8]) -> Connect {
        Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            properties: Default::default(),
            client_id: MqttStr::new("cid").unwrap(),
            will: None,
            username: Some(MqttStr::new(user).unwrap()),
            password: Some(bytes::Bytes::copy_from_slice(password)),
        }
    }

    #[test]
    fn failed_logins_are_counted_and_answered_with_connack_only() {
        let mut c = core();
        let pw =
            PasswordFile::parse(include_str!("../../tests/fixtures/auth/passwd"), "p").unwrap();
        c.set_auth(Arc::new(Auth::new(false, Some(pw), None, vec![])));
        let now = Instant::now();
        // sha512user's $6$ hash is fast: decided on the spot.
        for (password, ok) in [(&b"wrong"[..], false), (b"sha512 secret", true)] {
            let connect = connect_with("sha512user", password);
            let LoginStep::Done(login) = c.check_login(&connect, None, None) else {
                panic!("a $6$ hash is checked inline");
            };
            let out = Rc::new(Outbound::new(ProtocolVersion::V5));
            let r = c.connect_as(&connect, None, login, out.clone(), now);
            let got = drain(&out);
            assert_eq!(r.is_ok(), ok);
            match &got[..] {
                [Packet::ConnAck(a)] if !ok => {
                    assert_eq!(a.reason_code, ReasonCode::BadUserNameOrPassword)
                }
                [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::Success),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(c.stats.logins_failed, 1);
        // alice's $7$ (101 iterations) is fast too; a wrong one counts again.
        let connect = connect_with("alice", b"x");
        let LoginStep::Done(login) = c.check_login(&connect, None, None) else {
            panic!("101 PBKDF2 iterations are checked inline");
        };
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        assert!(c.connect_as(&connect, None, login, out, now).is_err());
        assert_eq!(c.stats.logins_failed, 2);
        // Anonymous refused.
        let mut anon = connect_with("x", b"");
        anon.username = None;
        anon.password = None;
        let LoginStep::Done(login) = c.check_login(&anon, None, None) else {
            panic!("no password to check");
        };
        assert_eq!(login.refused, Some(LoginFailure::Anonymous));
    }

    #[test]
    fn a_certificate_identity_is_the_user_name_without_a_password() {
        let mut c = core();
        let pw =
            PasswordFile::parse(include_str!("../../tests/fixtures/auth/passwd"), "p").unwrap();
        let acl = crate::auth::Acl::parse("user CN=dev1\ntopic readwrite dev1/#\n", "a").unwrap();
        c.set_auth(Arc::new(Auth::new(false, Some(pw), Some(acl), vec![])));
        let mut connect = connect_with("ignored", b"");
        connect.username = None;
        connect.password = None;
        let LoginStep::Done(login) = c.check_login(&connect, Some("CN=dev1"), None) else {
            panic!("nothing to verify");
        };
        assert_eq!(login.refused, None);
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        let mut ctx = c
            .connect_as(&connect, None, login, out.clone(), Instant::now())
            .unwrap()
            .ctx;
        assert_eq!(ctx.username.as_ref().map(|u| u.as_str()), Some("CN=dev1"));
        let publish = |t: &str| {
            let mut p = Publish::new(TopicName::new(t).unwrap(), bytes::Bytes::from_static(b"x"));
            p.qos = QoS::AtLeastOnce;
            p.packet_id = crate::protocol::PacketId::new(1);
            Packet::Publish(p)
        };
        c.on_packet(&mut ctx, publish("other/t"), Instant::now())
            .unwrap();
        c.on_packet(&mut ctx, publish("dev1/t"), Instant::now())
            .unwrap();
        let acks: Vec<ReasonCode> = drain(&out)
            .into_iter()
            .filter_map(|p| match p {
                Packet::PubAck(a) => Some(a.reason_code),
                _ => None,
            })
            .collect();
        assert_eq!(
            acks,
            vec![ReasonCode::NotAuthorized, ReasonCode::NoMatchingSubscribers]
        );
    }

    #[test]
    fn slow_hashes_go_off_the_executor_within_a_bound() {
        let mut c = core();
        let phc = crate::auth::password::hash_argon2id(b"pw").unwrap();
        let pw = PasswordFile::parse(&format!("u:{phc}\n"), "p").unwrap();
        c.set_auth(Arc::new(Auth::new(false, Some(pw), None, vec![])));
        let max = c.config().auth.verifications_inflight_max;
        let mut pending = Vec::new();
        for _ in 0..max {
            match c.check_login(&connect_with("u", b"bad"), None, None) {
                LoginStep::Verify(v) => pending.push(v),
                LoginStep::Done(l) => panic!("{l:?}"),
            }
        }
        // One more: refused as busy rather than queued without bound.
        match c.check_login(&connect_with("u", b"bad"), None, None) {
            LoginStep::Done(l) => assert_eq!(l.refused, Some(LoginFailure::Busy)),
            LoginStep::Verify(_) => panic!("beyond verifications_inflight_max"),
        }
        for v in pending {
            let ok = v.run();
            assert!(c.verified(v, ok).refused.is_some());
        }
        // The right password, verified once, is then remembered.
        let LoginStep::Verify(v) = c.check_login(&connect_with("u", b"pw"), None, None) else {
            panic!("first login verifies");
        };
        let ok = v.run();
        assert!(c.verified(v, ok).refused.is_none());
        assert!(matches!(
            c.check_login(&connect_with("u", b"pw"), None, None),
            LoginStep::Done(Login { refused: None, .. })
        ));
    }
}
