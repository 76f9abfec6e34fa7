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

use super::core::{Core, CoreStats, EventSink, Login, Verification};
use super::event::Event;
use crate::auth::Auth;
use crate::auth::LoginFailure;
use crate::config::{Config, Durability};
use crate::storage::Store;

/// How often due wills and session expiries are checked: the worst lateness of a will.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Longest a shard waits at start for its peers to finish recovering.
const RECOVERY_BARRIER_MAX: Duration = Duration::from_secs(300);
/// First wait before a failing store is tried again; doubled after each failed attempt up
/// to [`STORAGE_RETRY_MAX`].
const STORAGE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(5);

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

/// A wake-up flag for one waiting task.
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

/// A question for every shard (map-reduce).
#[derive(Clone, Debug)]
pub enum Query {
    Stats,
    /// Put these password and ACL rules in force (reload); answered with the stats.
    SetAuth(Arc<Auth>),
}

/// One shard's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub sessions: usize,
    pub retained: usize,
    pub handoffs: u64,
    pub core: CoreStats,
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

/// The per-shard service.
pub struct BrokerShard {
    pub core: RefCell<Core>,
    sink: Rc<OutboxSink>,
    connections: Cell<u32>,
    connections_max: u32,
    seed: Cell<u64>,
    handoffs: Cell<u64>,
    /// Duration of the last persist (fsync), for stats.
    persist_latency_us: Cell<u64>,
    /// The core's store (`None` in `memory` mode), for the storage recovery task.
    store: Option<Store>,
    /// Wakes the storage recovery task when the store reports a failure episode.
    storage_failed: Notify,
    /// The shard's password-verification thread (see [`start_verifier`]).
    verifier: Option<crossbeam_channel::Sender<VerifyJob>>,
}

impl std::fmt::Debug for BrokerShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerShard")
            .field("connections", &self.connections.get())
            .finish()
    }
}

impl BrokerShard {
    pub fn new(
        id: ShardId,
        count: usize,
        cfg: Rc<Config>,
        auth: Arc<Auth>,
        store: Option<Store>,
    ) -> BrokerShard {
        let sink = Rc::new(OutboxSink {
            outbox: Outbox::new(count),
            pending: Cell::new(false),
            waker: Cell::new(None),
            commit: Notify::default(),
        });
        // Each shard takes its share of the connection limit (rounded up).
        let connections_max = cfg.limits.connections_max.div_ceil(count as u32);
        let verifier = start_verifier(id.index(), cfg.auth.verifications_inflight_max as usize);
        let mut core = Core::new(id.index(), count, cfg, sink.clone(), store.clone());
        core.set_auth(auth);
        BrokerShard {
            core: RefCell::new(core),
            sink,
            connections: Cell::new(0),
            connections_max,
            seed: Cell::new(id.index() as u64 ^ std_seed()),
            handoffs: Cell::new(0),
            persist_latency_us: Cell::new(0),
            store,
            storage_failed: Notify::default(),
            verifier,
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
        self.connections
            .set(self.connections.get().saturating_sub(1));
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

    pub fn note_handoff(&self) {
        self.handoffs.set(self.handoffs.get() + 1);
    }

    /// Sends what the core queued for other shards, once per wake-up, until the pool stops.
    pub async fn flush_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let stopped = shard.stopped();
        futures_lite::pin!(stopped);
        loop {
            let stop = futures_lite::future::or(
                async {
                    svc.sink.wait().await;
                    false
                },
                async {
                    (&mut stopped).await;
                    true
                },
            )
            .await;
            let _ = svc.sink.outbox.flush(&shard).await;
            if stop {
                break;
            }
        }
    }

    /// Group commit: whenever there are writes, persists them off the executor thread
    /// (`spawn_blocking`) and releases the acknowledgements that waited on them. In `batched`
    /// mode it waits the batch interval first, so that one fsync covers the interval.
    pub async fn commit_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let interval = {
            let core = svc.core.borrow();
            match core.durability() {
                Durability::Memory => return,
                Durability::Durable => None,
                Durability::Batched => Some(Duration::from_millis(
                    core.config().storage.batched_interval_ms as u64,
                )),
            }
        };
        loop {
            let stopping = futures_lite::future::or(
                async {
                    svc.sink.commit.wait().await;
                    false
                },
                async {
                    shard.stopped().await;
                    true
                },
            )
            .await;
            if let (Some(d), false) = (interval, stopping) {
                glommio::timer::sleep(d).await;
            }
            let target = svc.core.borrow().commit_target();
            if let Some((store, seq)) = target {
                let started = Instant::now();
                let persisting = store.clone();
                let ok = match glommio::executor()
                    .spawn_blocking(move || persisting.persist())
                    .await
                {
                    Ok(()) => true,
                    Err(e) => {
                        // Logged once per failure episode by the store.
                        store.report_failure(&e);
                        false
                    }
                };
                svc.persist_latency_us
                    .set(started.elapsed().as_micros() as u64);
                svc.core.borrow_mut().committed(seq, ok, Instant::now());
                if store.is_failing() {
                    svc.storage_failed.notify();
                }
            }
            if stopping && svc.core.borrow().commit_target().is_none() {
                break;
            }
        }
    }

    /// Storage recovery: while the store is in a failure episode (a full disk, an I/O
    /// error), tries to recover it ([`Store::try_recover`], off the executor thread) after
    /// a wait that doubles from [`STORAGE_RETRY_MIN`] to [`STORAGE_RETRY_MAX`], until it
    /// works or the pool stops. Meanwhile the shard serves on: writes fail at once, and so
    /// do the acknowledgements that need them.
    pub async fn recovery_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let Some(store) = svc.store.clone() else {
            return;
        };
        let stopped = shard.stopped();
        futures_lite::pin!(stopped);
        loop {
            let stop = futures_lite::future::or(
                async {
                    svc.storage_failed.wait().await;
                    false
                },
                async {
                    (&mut stopped).await;
                    true
                },
            )
            .await;
            if stop {
                return;
            }
            let mut wait = STORAGE_RETRY_MIN;
            while store.is_failing() {
                let stop = futures_lite::future::or(
                    async {
                        glommio::timer::sleep(wait).await;
                        false
                    },
                    async {
                        (&mut stopped).await;
                        true
                    },
                )
                .await;
                if stop {
                    return;
                }
                let s = store.clone();
                match glommio::executor()
                    .spawn_blocking(move || s.try_recover())
                    .await
                {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(shard = shard.id().index(), error = %e, "storage still failing");
                        wait = (wait * 2).min(STORAGE_RETRY_MAX);
                    }
                }
            }
        }
    }

    /// The stop's last step, after the connections closed and the committer ended: makes
    /// durable what closing them wrote (session records with their offline time and will).
    pub async fn final_commit(shard: &Shard<BrokerShard>) {
        let svc = shard.service();
        loop {
            let target = svc.core.borrow().commit_target();
            let Some((store, seq)) = target else {
                return;
            };
            let persisting = store.clone();
            let ok = match glommio::executor()
                .spawn_blocking(move || persisting.persist())
                .await
            {
                Ok(()) => true,
                Err(e) => {
                    store.report_failure(&e);
                    false
                }
            };
            svc.core.borrow_mut().committed(seq, ok, Instant::now());
            if !ok {
                tracing::error!(
                    shard = shard.id().index(),
                    "the last writes before the stop could not be made durable"
                );
                return;
            }
        }
    }

    /// Recovers the shard from its store and waits until every peer's recovery has been
    /// applied here (the routing index is complete), bounded by [`RECOVERY_BARRIER_MAX`].
    pub async fn recover(shard: &Shard<BrokerShard>) {
        shard.service().core.borrow_mut().recover(Instant::now());
        let deadline = Instant::now() + RECOVERY_BARRIER_MAX;
        while !shard.service().core.borrow().peers_recovered() {
            if Instant::now() > deadline {
                tracing::error!(
                    shard = shard.id().index(),
                    "peers did not finish recovering; starting anyway"
                );
                break;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Fires will-delay and session-expiry timers until the pool stops.
    pub async fn timer_loop(shard: Shard<BrokerShard>) {
        while !shard.is_stopping() {
            glommio::timer::sleep(TIMER_TICK).await;
            shard
                .service()
                .core
                .borrow_mut()
                .fire_timers(Instant::now());
        }
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
    type Msg = Vec<Event>;
    type Query = Query;
    type Answer = ShardStats;

    fn on_message(&self, shard: &Shard<Self>, from: ShardId, batch: Vec<Event>) {
        let now = Instant::now();
        for event in batch {
            match event {
                Event::Handoff(handoff) => {
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        let svc = shard.service();
                        if !svc.admit_connection() {
                            // SAFETY: the fd was handed to us and nothing else uses it.
                            unsafe { libc::close(handoff.fd) };
                            return;
                        }
                        crate::net::serve_handoff(shard.clone(), *handoff).await;
                        shard.service().release_connection();
                    })
                    .detach();
                }
                other => self.core.borrow_mut().on_event(from.index(), other, now),
            }
        }
    }

    fn answer(&self, _shard: &Shard<Self>, query: Query) -> impl Future<Output = ShardStats> {
        if let Query::SetAuth(auth) = query {
            self.core.borrow_mut().set_auth(auth);
        }
        let core = self.core.borrow();
        let stats = ShardStats {
            sessions: core.session_count(),
            retained: core.retained_count(),
            handoffs: self.handoffs.get(),
            core: core.stats,
        };
        async move { stats }
    }
}
