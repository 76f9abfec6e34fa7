//! Reaching the shards from threads that are not executors: an admin server, a signal handler,
//! the thread that started the pool.
//!
//! Each shard has an inbox (a std mpsc channel) and a doorbell. A std channel cannot wake a
//! parked executor by itself, so the shard's control loop leaves its waker at the doorbell and
//! an outside thread wakes it after sending. glommio wakers may be woken from any thread (the
//! wake reaches the executor through its eventfd), so there is no polling timer and no latency
//! floor.
//!
//! The doorbell also carries the workaround for a glommio 0.9.0 bug (fixed upstream in
//! glommio/glommio#53, not released): `LocalExecutor::run` can park while a task is runnable
//! when the preemption timer fires at the wrong moment, and then sleeps until some other
//! thread writes its eventfd. Nothing else may ever do so (a shard waiting for its peers to
//! connect, or one whose peers all wait for it), so a nudger thread rings every doorbell every
//! [`crate::Config::nudge_interval`]: a hang becomes a stall of at most that long. One case
//! stays out of reach: an executor that parks before its first task ever ran has no waker to
//! wake (seen about once in a thousand test runs under heavy CPU contention); only a glommio
//! with the fix closes it. A nudge costs a busy executor nothing and an idle one a wake-up
//! (see the default interval).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use std::{fmt, future::poll_fn};

use crate::error::QueryError;
use crate::shard::Service;
use crate::ShardId;

/// How often a waiting [`Control::map_reduce`] checks whether a shard it waits for has died.
const DEATH_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// What an outside thread asks of a shard.
pub(crate) enum ControlMsg<Q, A> {
    Stop,
    /// The shard's thread panicked. Sent here rather than left to the mesh: glommio 0.9 does
    /// not wake the peers when an executor is torn down after a panic, so they would wait for
    /// the dead shard forever.
    PeerDied(ShardId),
    Query {
        query: Q,
        reply: mpsc::Sender<(ShardId, A)>,
    },
    /// A query whose answer nobody waits for (see [`Control::post`]).
    Post(Q),
}

/// The outside end of one shard's inbox.
struct Station<Q, A> {
    tx: mpsc::Sender<ControlMsg<Q, A>>,
    bell: Arc<Doorbell>,
}

/// Holds the waker of the task that serves a shard's inbox (the startup task while the mesh
/// connects, the control loop after that).
#[derive(Debug, Default)]
pub(crate) struct Doorbell {
    waker: Mutex<Option<Waker>>,
}

impl Doorbell {
    /// Wakes the parked task. The waker stays parked: a task that was woken but, through the
    /// glommio bug, never ran must still be reachable by the next ring.
    fn ring(&self) {
        // Woken under the lock so that once the shard has cleared the slot (on its way out)
        // no wake for it is still in flight.
        let slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(waker) = &*slot {
            waker.wake_by_ref();
        }
    }

    fn park(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some(parked) if parked.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    fn clear(&self) {
        self.waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// The shard's end of its inbox; clears the doorbell when the shard lets go of it, so no
/// waker of a finished executor is left for outside threads to wake.
pub(crate) struct Inbox<Q, A> {
    rx: mpsc::Receiver<ControlMsg<Q, A>>,
    bell: Arc<Doorbell>,
}

impl<Q, A> Inbox<Q, A> {
    /// Makes the calling task the one the doorbell wakes.
    pub(crate) fn park(&self, waker: &Waker) {
        self.bell.park(waker);
    }

    /// The next message; `None` once every outside handle is gone (not while a pool lives,
    /// as the pool's shared state keeps one).
    pub(crate) async fn recv(&self) -> Option<ControlMsg<Q, A>> {
        poll_fn(|cx| {
            match self.rx.try_recv() {
                Ok(msg) => return Poll::Ready(Some(msg)),
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) => {}
            }
            self.bell.park(cx.waker());
            // A message sent before the waker was parked would find no waker to ring.
            match self.rx.try_recv() {
                Ok(msg) => Poll::Ready(Some(msg)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }
}

impl<Q, A> Drop for Inbox<Q, A> {
    fn drop(&mut self) {
        self.bell.clear();
    }
}

/// State shared by every shard and every [`Control`] of one pool.
pub(crate) struct Shared<Q, A> {
    stations: Vec<Station<Q, A>>,
    stop_requested: AtomicBool,
    /// Per shard: its thread panicked, so it will answer nothing more.
    dead: Vec<AtomicBool>,
}

impl<Q, A> Shared<Q, A> {
    /// The shared state and one inbox per shard.
    pub(crate) fn new(count: usize) -> (Arc<Self>, Vec<Inbox<Q, A>>) {
        let mut stations = Vec::with_capacity(count);
        let mut inboxes = Vec::with_capacity(count);
        for _ in 0..count {
            let (tx, rx) = mpsc::channel();
            let bell = Arc::new(Doorbell::default());
            stations.push(Station {
                tx,
                bell: bell.clone(),
            });
            inboxes.push(Inbox { rx, bell });
        }
        let shared = Arc::new(Self {
            stations,
            stop_requested: AtomicBool::new(false),
            dead: (0..count).map(|_| AtomicBool::new(false)).collect(),
        });
        (shared, inboxes)
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.stations.len()
    }

    pub(crate) fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::Acquire)
    }

    /// Asks every shard to stop; idempotent; safe from any thread, including a shard's own
    /// thread after its executor has unwound.
    pub(crate) fn request_stop(&self) {
        if self.stop_requested.swap(true, Ordering::AcqRel) {
            return;
        }
        for station in &self.stations {
            // A shard that already exited has dropped its inbox; nothing to stop there.
            let _ = station.tx.send(ControlMsg::Stop);
            station.bell.ring();
        }
    }

    /// Wakes the inbox task of every shard but `except`.
    pub(crate) fn ring_others(&self, except: ShardId) {
        for (index, station) in self.stations.iter().enumerate() {
            if index != except.index() {
                station.bell.ring();
            }
        }
    }

    /// Wakes the inbox task of every shard (see the module doc for why).
    pub(crate) fn nudge_all(&self) {
        for station in &self.stations {
            station.bell.ring();
        }
    }

    /// Tells every other shard that `shard`'s thread panicked, and stops the pool.
    pub(crate) fn announce_death(&self, shard: ShardId) {
        self.dead[shard.index()].store(true, Ordering::Release);
        // The dead executor's waker would only pile up in its wake queue.
        self.stations[shard.index()].bell.clear();
        for (index, station) in self.stations.iter().enumerate() {
            if index != shard.index() {
                let _ = station.tx.send(ControlMsg::PeerDied(shard));
                station.bell.ring();
            }
        }
        self.request_stop();
    }

    fn is_dead(&self, shard: usize) -> bool {
        self.dead[shard].load(Ordering::Acquire)
    }

    fn send(&self, shard: usize, msg: ControlMsg<Q, A>) -> Result<(), ()> {
        let station = &self.stations[shard];
        station.tx.send(msg).map_err(|_| ())?;
        station.bell.ring();
        Ok(())
    }
}

/// A handle for threads outside the pool: stop the pool, or ask every shard a question and
/// wait for the combined answer.
///
/// Cheap to clone and `Send + Sync`. Its methods block the calling thread, so never call them
/// from a shard's executor: use [`crate::Shard`] there.
pub struct Control<S: Service> {
    shared: Arc<Shared<S::Query, S::Answer>>,
    // The service itself never crosses threads; only its query and answer types do.
    _service: PhantomData<fn() -> S>,
}

impl<S: Service> Control<S> {
    pub(crate) fn new(shared: Arc<Shared<S::Query, S::Answer>>) -> Self {
        Self {
            shared,
            _service: PhantomData,
        }
    }

    /// Requests an orderly stop: every shard's [`crate::Shard::stopped`] completes. Returns
    /// at once; [`crate::Pool::join`] waits for the shards to finish.
    pub fn stop(&self) {
        self.shared.request_stop();
    }

    /// Whether a stop was requested, by anyone.
    pub fn is_stop_requested(&self) -> bool {
        self.shared.stop_requested()
    }

    /// The number of shards in the pool.
    pub fn shard_count(&self) -> usize {
        self.shared.shard_count()
    }

    /// Hands `query` to one shard's [`Service::answer`] and returns at once, without
    /// waiting for the answer (which is dropped). Never blocks: for threads that feed the
    /// shards a stream of work (a network link, say) and learn the outcome by other means.
    /// Queries posted to one shard are answered in the order they were posted, provided
    /// the service's `answer` finishes them without awaiting.
    pub fn post(&self, shard: ShardId, query: S::Query) -> Result<(), QueryError> {
        if shard.index() >= self.shared.shard_count() || self.shared.is_dead(shard.index()) {
            return Err(QueryError::ShardStopped(shard));
        }
        self.shared
            .send(shard.index(), ControlMsg::Post(query))
            .map_err(|()| QueryError::ShardStopped(shard))
    }

    /// Asks every shard's [`Service::answer`] and folds the answers in shard order, waiting at
    /// most `timeout` for all of them. Answers are computed concurrently on the shards.
    pub fn map_reduce<R>(
        &self,
        query: S::Query,
        timeout: Duration,
        init: R,
        mut fold: impl FnMut(R, ShardId, S::Answer) -> R,
    ) -> Result<R, QueryError> {
        let deadline = Instant::now() + timeout;
        let count = self.shared.shard_count();
        let (reply, replies) = mpsc::channel();
        for shard in 0..count {
            if self.shared.is_dead(shard) {
                return Err(QueryError::ShardStopped(ShardId::new(shard)));
            }
            let msg = ControlMsg::Query {
                query: query.clone(),
                reply: reply.clone(),
            };
            if self.shared.send(shard, msg).is_err() {
                return Err(QueryError::ShardStopped(ShardId::new(shard)));
            }
        }
        // Only the shards hold reply senders now: if all of them drop theirs, no answer is
        // coming and the wait ends early.
        drop(reply);
        let mut answers: Vec<Option<S::Answer>> = (0..count).map(|_| None).collect();
        let mut answered = 0;
        while answered < count {
            let left = deadline.saturating_duration_since(Instant::now());
            // A shard that dies leaks its reply sender, so the channel never disconnects:
            // look at the death flags now and then instead.
            match replies.recv_timeout(left.min(DEATH_CHECK_INTERVAL)) {
                Ok((shard, answer)) => {
                    debug_assert!(answers[shard.index()].is_none(), "{shard} answered twice");
                    answers[shard.index()] = Some(answer);
                    answered += 1;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let dead =
                        (0..count).find(|s| answers[*s].is_none() && self.shared.is_dead(*s));
                    if let Some(shard) = dead {
                        return Err(QueryError::ShardStopped(ShardId::new(shard)));
                    }
                    if Instant::now() >= deadline {
                        return Err(QueryError::Timeout {
                            answered,
                            expected: count,
                        });
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                    return Err(QueryError::ShardStopped(ShardId::new(missing)));
                }
            }
        }
        let mut acc = init;
        for (index, answer) in answers.into_iter().enumerate() {
            if let Some(answer) = answer {
                acc = fold(acc, ShardId::new(index), answer);
            }
        }
        Ok(acc)
    }
}

impl<S: Service> Clone for Control<S> {
    fn clone(&self) -> Self {
        Self::new(self.shared.clone())
    }
}

impl<S: Service> fmt::Debug for Control<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("shard_count", &self.shared.shard_count())
            .field("stop_requested", &self.shared.stop_requested())
            .finish()
    }
}
