//! [`BrokerShard`]: the service each shard runs on the `shards` runtime. It owns the shard's
//! [`Core`], batches the events the core sends to other shards into one message per
//! destination and tick, and runs the shard's background tasks (flusher, timers).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use shards::{Outbox, Service, Shard, ShardId};

pub use super::api::{Answer, Query, ShardStats};
use super::budget::QueuedBudget;
use super::core::cluster::{ClusterLink, Placement};
use super::core::{Core, EventSink, Login, Verification};
use super::event::{Event, Handoff, Mail};
use super::history::{RateHistory, RatePoint};
use super::incomplete::IncompletePackets;
use crate::auth::Auth;
use crate::auth::LoginFailure;
use crate::config::Config;
use crate::storage::Store;

mod commit;
pub use commit::Fatal;
use commit::Unsynced;

/// How often due wills and session expiries are checked: the worst lateness of a will.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Longest a shard waits at start for its peers to finish recovering.
const RECOVERY_BARRIER_MAX: Duration = Duration::from_secs(300);

/// Events waiting for other shards, and the flusher's wake-up.
struct OutboxSink {
    outbox: Outbox<Event>,
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// Wakes the committer when there are writes to make durable.
    commit: Notify,
}

impl EventSink for OutboxSink {
    fn push(&self, to: usize, event: Event) {
        self.outbox.push(ShardId::new(to), event);
        self.pending.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn wake_committer(&self) {
        self.commit.notify();
    }
}

/// A wake-up flag for one waiting task (it keeps one waker: two tasks waiting on the same
/// `Notify` would lose a wake-up). Single-threaded: the flag is tested in the same poll that
/// stores the waker, so a notify between them cannot be missed.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

impl OutboxSink {
    async fn wait(&self) {
        poll_fn(|cx| {
            if self.pending.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// The nice value of the password threads (see [`start_verifier`]).
const VERIFIER_NICE: libc::c_int = 10;

/// A password check for the shard's verification thread, and where its answer goes.
type VerifyJob = (
    Verification,
    futures_channel::oneshot::Sender<(Verification, bool)>,
);

/// Starts the shard's password-verification thread: slow hashes (argon2, PBKDF2) run there,
/// not on the executor and not on its blocking thread (which makes the shard's writes
/// durable: a flood of bad logins must not delay acknowledgements). The core bounds the
/// checks in flight, so the channel never fills. The thread ends when the shard drops.
fn start_verifier(shard: usize, bound: usize) -> Option<crossbeam_channel::Sender<VerifyJob>> {
    let (tx, rx) = crossbeam_channel::bounded::<VerifyJob>(bound.max(1));
    let spawned = std::thread::Builder::new()
        .name(format!("shardmq-auth-{shard}"))
        .spawn(move || {
            // Below the shards' priority: under a flood of logins the hashing takes the CPU
            // the shards leave. On Linux the nice value is per thread (`who` 0: this one).
            // SAFETY: plain system call on the calling thread; failure leaves it at 0.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, VERIFIER_NICE) };
            for (v, reply) in rx {
                let ok = v.run();
                let _ = reply.send((v, ok));
            }
        });
    match spawned {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::error!(shard, error = %e, "no password thread; verifying on the blocking thread");
            None
        }
    }
}

/// Bytes through the shard's client sockets (a connection handed to another shard counts
/// its CONNECT where it was read).
#[derive(Debug, Default)]
pub struct IoCounters {
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
}

impl IoCounters {
    pub fn add_in(&self, n: usize) {
        self.bytes_in.set(self.bytes_in.get() + n as u64);
    }

    pub fn add_out(&self, n: usize) {
        self.bytes_out.set(self.bytes_out.get() + n as u64);
    }
}

/// The previous rate sample: when, PUBLISHes received, sent; and the rates it gave.
#[derive(Clone, Copy, Debug)]
struct RateSample {
    at: Instant,
    received: u64,
    sent: u64,
    rates: (f64, f64),
}

/// How far apart two rate samples must be.
const RATE_SAMPLE_MIN: Duration = Duration::from_secs(1);

/// The per-shard service.
pub struct BrokerShard {
    pub(super) core: RefCell<Core>,
    sink: Rc<OutboxSink>,
    connections: Cell<u32>,
    connections_max: u32,
    seed: Cell<u64>,
    handoffs: Cell<u64>,
    /// The core's store (`None` in `memory` mode), for the storage recovery task.
    store: Option<Store>,
    /// Wakes the storage recovery task when the store reports a failure episode.
    storage_failed: Notify,
    /// `replicated` mode: group commits acknowledged from the stream wrote the store
    /// through to the page cache only; the sync task fsyncs it ([`BrokerShard::sync_loop`]).
    unsynced: Unsynced,
    fatal: Fatal,
    /// The shard's password-verification thread (see [`start_verifier`]).
    verifier: Option<crossbeam_channel::Sender<VerifyJob>>,
    pub io: Rc<IoCounters>,
    /// The shard's share of the budget for incomplete packets.
    pub incomplete: IncompletePackets,
    rate: Cell<RateSample>,
    /// The shard's counters over the last minutes (sampled by the timer loop).
    history: RefCell<RateHistory>,
    /// Connections other shards handed to this one, for the network layer's hand-off loop
    /// ([`BrokerShard::next_handoff`]); it takes each at once.
    arrivals: RefCell<std::collections::VecDeque<Box<Handoff>>>,
    arrived: Notify,
    /// Set once every peer's recovery has been applied here (the start barrier).
    recovered: Notify,
    /// Set when the last open connection closes (the stop waits for it).
    all_closed: Notify,
}

impl std::fmt::Debug for BrokerShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerShard")
            .field("connections", &self.connections.get())
            .finish()
    }
}

impl BrokerShard {
    /// Where the client `client_id` is served (this node, another node, nowhere now).
    pub fn placement(&self, client_id: &[u8]) -> Placement {
        self.core.borrow().placement(client_id)
    }

    /// Whether this node owns any slot (a client id assigned here must be in one).
    pub fn owns_slots(&self) -> bool {
        self.core.borrow().owns_slots()
    }

    /// Any node that owns slots (for a client with no id when this node owns none).
    pub fn any_owner(&self) -> Placement {
        self.core.borrow().any_owner()
    }

    /// Makes this shard a cluster node's shard, talking to the cluster thread over `link`.
    /// Where a shard notes why the broker must stop and exit with an error (a failed
    /// background fsync in `replicated` mode); [`crate::broker::Broker::join`] reports it.
    pub fn with_fatal(mut self, fatal: Fatal) -> BrokerShard {
        self.fatal = fatal;
        self
    }

    pub fn with_cluster(self, link: Option<ClusterLink>) -> BrokerShard {
        if let Some(l) = link {
            self.core.borrow_mut().attach_cluster(l);
        }
        self
    }

    pub fn new(
        id: ShardId,
        count: usize,
        cfg: Rc<Config>,
        auth: Arc<Auth>,
        store: Option<Store>,
        budget: Arc<QueuedBudget>,
    ) -> BrokerShard {
        let sink = Rc::new(OutboxSink {
            outbox: Outbox::new(count),
            pending: Cell::new(false),
            waker: Cell::new(None),
            commit: Notify::default(),
        });
        // Each shard takes its share of the connection limit (rounded up), and of the
        // budget for incomplete packets.
        let connections_max = cfg.limits.connections_max.div_ceil(count as u32);
        // At least one whole packet, so that a legitimate packet of the largest size never
        // closes itself.
        let incomplete_share = (cfg.limits.incomplete_packet_bytes_max / count as u64)
            .max(cfg.limits.packet_bytes_max as u64);
        let verifier = start_verifier(id.index(), cfg.auth.verifications_inflight_max as usize);
        let mut core = Core::new(id.index(), count, cfg, sink.clone(), store.clone(), budget);
        core.set_auth(auth);
        BrokerShard {
            core: RefCell::new(core),
            sink,
            connections: Cell::new(0),
            connections_max,
            seed: Cell::new(id.index() as u64 ^ std_seed()),
            handoffs: Cell::new(0),
            store,
            storage_failed: Notify::default(),
            unsynced: Unsynced::default(),
            fatal: Fatal::default(),
            verifier,
            io: Rc::new(IoCounters::default()),
            incomplete: IncompletePackets::new(incomplete_share),
            rate: Cell::new(RateSample {
                at: Instant::now(),
                received: 0,
                sent: 0,
                rates: (0.0, 0.0),
            }),
            history: RefCell::new(RateHistory::default()),
            arrivals: RefCell::default(),
            arrived: Notify::default(),
            recovered: Notify::default(),
            all_closed: Notify::default(),
        }
    }

    /// Runs a slow password check off the executor (see [`start_verifier`]) and hands the
    /// result to the core.
    pub async fn verify(&self, v: Verification) -> Login {
        let (v, ok) = match &self.verifier {
            Some(jobs) => {
                let (tx, rx) = futures_channel::oneshot::channel();
                match jobs.try_send((v, tx)) {
                    Ok(()) => match rx.await {
                        Ok(answer) => answer,
                        Err(_) => {
                            // The thread is gone (shutdown); the job went with it.
                            return Login {
                                username: None,
                                refused: Some(LoginFailure::Busy),
                                peer: None,
                            };
                        }
                    },
                    Err(e) => {
                        let (v, _) = e.into_inner();
                        let mut login = self.core.borrow_mut().verified(v, false);
                        login.refused = Some(LoginFailure::Busy);
                        return login;
                    }
                }
            }
            None => {
                glommio::executor()
                    .spawn_blocking(move || {
                        let ok = v.run();
                        (v, ok)
                    })
                    .await
            }
        };
        self.core.borrow_mut().verified(v, ok)
    }

    /// Counts a new connection against this shard's share of `connections_max`.
    pub fn admit_connection(&self) -> bool {
        let n = self.connections.get();
        if n >= self.connections_max {
            return false;
        }
        self.connections.set(n + 1);
        true
    }

    pub fn release_connection(&self) {
        let n = self.connections.get();
        debug_assert!(n > 0, "a connection released twice");
        self.connections.set(n.saturating_sub(1));
        if n <= 1 {
            self.all_closed.notify();
        }
    }

    /// Returns once no connection is open on this shard.
    pub async fn connections_closed(&self) {
        while self.connections.get() > 0 {
            self.all_closed.wait().await;
        }
    }

    pub fn open_connections(&self) -> u32 {
        self.connections.get()
    }

    /// A fresh number for assigned client ids.
    pub fn next_seed(&self) -> u64 {
        let s = self.seed.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        self.seed.set(s);
        s
    }

    /// The shard's counters and gauges now.
    pub fn stats(&self) -> ShardStats {
        let core = self.core.borrow();
        let delivery = core.delivery_totals();
        let (queued_messages, queued_bytes) = core.queue_depth();
        let now = Instant::now();
        let mut sample = self.rate.get();
        let elapsed = now.saturating_duration_since(sample.at);
        let (received, sent) = (core.stats.messages_received, delivery.delivered);
        if elapsed >= RATE_SAMPLE_MIN {
            let s = elapsed.as_secs_f64();
            sample = RateSample {
                at: now,
                received,
                sent,
                rates: (
                    (received - sample.received) as f64 / s,
                    (sent - sample.sent) as f64 / s,
                ),
            };
            self.rate.set(sample);
        }
        ShardStats {
            sessions: core.session_count(),
            retained: core.retained_count(),
            subscriptions: core.subscription_count(),
            handoffs: self.handoffs.get(),
            sockets: self.connections.get(),
            queued_messages,
            queued_bytes,
            bytes_received: self.io.bytes_in.get(),
            bytes_sent: self.io.bytes_out.get(),
            storage_bytes: core.storage_bytes(),
            timers: core.timer_count(),
            incomplete_packet_bytes: self.incomplete.held(),
            closed_incomplete_budget: self.incomplete.closed.get(),
            closed_packet_timeout: self.incomplete.timed_out.get(),
            received_per_s: sample.rates.0,
            sent_per_s: sample.rates.1,
            delivery,
            core: core.stats,
        }
    }

    /// Closes the connections handed over and not served (the shard is stopping).
    pub fn drop_arrivals(&self) {
        self.arrivals.borrow_mut().clear();
    }

    /// The next connection another shard handed over, once there is one.
    pub async fn next_handoff(&self) -> Box<Handoff> {
        loop {
            if let Some(h) = self.arrivals.borrow_mut().pop_front() {
                return h;
            }
            self.arrived.wait().await;
        }
    }

    pub fn note_handoff(&self) {
        self.handoffs.set(self.handoffs.get() + 1);
    }

    /// Sends what the core queued for other shards, once per wake-up, until the pool stops.
    pub async fn flush_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let stopped = shard.stopped();
        futures_lite::pin!(stopped);
        loop {
            let stop = stopped_first(&mut stopped, svc.sink.wait()).await;
            let _ = svc.sink.outbox.flush(&shard).await;
            if stop {
                break;
            }
        }
    }

    /// Recovers the shard from its store and waits until every peer's recovery has been
    /// applied here (the routing index is complete), bounded by [`RECOVERY_BARRIER_MAX`].
    pub async fn recover(shard: &Shard<BrokerShard>) {
        let svc = shard.service();
        svc.core.borrow_mut().recover(Instant::now());
        let all_in = async {
            while !svc.core.borrow().peers_recovered() {
                svc.recovered.wait().await;
            }
            true
        };
        let late = async {
            glommio::timer::sleep(RECOVERY_BARRIER_MAX).await;
            false
        };
        if !futures_lite::future::or(all_in, late).await {
            tracing::error!(
                shard = shard.id().index(),
                "peers did not finish recovering; starting anyway"
            );
        }
    }

    /// On shard 0, every `sys.interval_s` (from the start on): gathers every shard's
    /// counters over the mesh and publishes the `$SYS/broker/...` topics (retained, QoS 0)
    /// through normal routing. Other shards, or an interval of 0: returns at once.
    pub async fn sys_loop(shard: Shard<BrokerShard>) {
        let interval_s = shard.service().core.borrow().config().sys.interval_s;
        if interval_s == 0 || shard.id().index() != 0 {
            return;
        }
        let interval = Duration::from_secs(interval_s as u64);
        let started = Instant::now();
        let mut last = started;
        let mut load = super::sys::SysLoad::default();
        loop {
            let gathered = shard
                .map_reduce(
                    Query::Stats,
                    super::sys::SysTotals::default(),
                    |mut t, _, a| {
                        if let Answer::Stats(s) = a {
                            t.add(&s);
                        }
                        t
                    },
                )
                .await;
            let now = Instant::now();
            if let Ok(totals) = gathered {
                let mut topics = load.publish(&totals, now - last, now - started);
                last = now;
                let mut core = shard.service().core.borrow_mut();
                // A cluster node names itself; its `$SYS` topics stay on it (see
                // `forward_to_nodes`).
                if let Some(node) = core.config().cluster.node.clone() {
                    topics.push(("$SYS/broker/node".to_string(), node));
                }
                for (topic, payload) in topics {
                    core.publish_sys(&topic, payload, now);
                }
            }
            let stop = stopped_first(shard.stopped(), glommio::timer::sleep(interval)).await;
            if stop {
                break;
            }
        }
    }

    /// Fires will-delay and session-expiry timers, and samples the rate history, until
    /// the pool stops.
    pub async fn timer_loop(shard: Shard<BrokerShard>) {
        // The history starts with the counters at the start.
        shard.service().sample_rates();
        while !shard.is_stopping() {
            glommio::timer::sleep(TIMER_TICK).await;
            let svc = shard.service();
            svc.core.borrow_mut().fire_timers(Instant::now());
            svc.core.borrow_mut().check_lease(Instant::now());
            svc.sample_rates();
        }
    }

    /// Adds a sample to the rate history when a new step has begun.
    fn sample_rates(&self) {
        let unix_ms = crate::storage::WallClock::now().unix_ms;
        let mut history = self.history.borrow_mut();
        if !history.due(unix_ms) {
            return;
        }
        let core = self.core.borrow();
        history.note(
            unix_ms,
            RatePoint {
                step: 0,
                received: core.stats.messages_received,
                sent: core.delivery_totals().delivered,
                bytes_in: self.io.bytes_in.get(),
                bytes_out: self.io.bytes_out.get(),
            },
        );
    }
}

/// A seed that differs between runs, so that assigned client ids do not repeat.
fn std_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Service for BrokerShard {
    type Msg = Mail;
    type Query = Query;
    type Answer = Answer;

    fn on_message(&self, shard: &Shard<Self>, from: ShardId, mail: Mail) {
        match mail {
            Mail::Events(batch) => {
                let now = Instant::now();
                let mut core = self.core.borrow_mut();
                for event in batch {
                    core.on_event(from.index(), event, now);
                }
                if core.peers_recovered() {
                    self.recovered.notify();
                }
            }
            // Once the shard stops, nobody serves hand-offs: dropping one closes its socket.
            Mail::Handoff(_) if shard.is_stopping() => {}
            Mail::Handoff(h) => {
                self.arrivals.borrow_mut().push_back(h);
                self.arrived.notify();
            }
        }
    }

    fn answer(&self, _shard: &Shard<Self>, query: Query) -> impl Future<Output = Answer> {
        let answer = match query {
            Query::Cluster(batch) => {
                let now = Instant::now();
                let mut core = self.core.borrow_mut();
                for m in batch {
                    core.on_cluster(m, now);
                }
                Answer::Done
            }
            Query::SlotsInUse => Answer::Slots(Box::new(self.core.borrow().slots_in_use())),
            Query::SlotMapReady => Answer::Ready(self.core.borrow().has_slot_map()),
            Query::MovingSessions(bits) => {
                Answer::Moving(self.core.borrow_mut().moving_sessions(&bits).map(Box::new))
            }
            Query::Stats => Answer::Stats(Box::new(self.stats())),
            Query::SetAuth(auth) => {
                self.core.borrow_mut().set_auth(auth);
                Answer::Stats(Box::new(self.stats()))
            }
            Query::Sessions {
                after,
                limit,
                filter,
            } => Answer::Sessions(self.core.borrow().sessions_page(
                after.as_deref(),
                limit,
                &filter,
            )),
            Query::Session(id) => Answer::Session(self.core.borrow().inspect_session(&id)),
            Query::DeleteSession(id) => {
                Answer::Deleted(self.core.borrow_mut().delete_session(&id, Instant::now()))
            }
            Query::Kick(id) => {
                Answer::Kicked(self.core.borrow_mut().kick_session(&id, Instant::now()))
            }
            Query::Rates => Answer::Rates(self.history.borrow().points()),
            Query::Subscriptions {
                after,
                limit,
                search,
            } => Answer::Subscriptions(self.core.borrow().subscriptions_page(
                after.as_ref().map(|(f, c)| (f.as_str(), c.as_str())),
                limit,
                search.as_deref(),
            )),
            Query::Retained {
                after,
                limit,
                search,
                sys,
            } => Answer::Retained(self.core.borrow().retained_page(
                after.as_deref(),
                limit,
                search.as_deref(),
                sys,
            )),
        };
        async move { answer }
    }
}

/// Waits for `event` unless the pool stops first; `true` when it stopped.
async fn stopped_first(
    stopped: impl std::future::Future<Output = ()>,
    event: impl std::future::Future<Output = ()>,
) -> bool {
    futures_lite::future::or(
        async {
            event.await;
            false
        },
        async {
            stopped.await;
            true
        },
    )
    .await
}
