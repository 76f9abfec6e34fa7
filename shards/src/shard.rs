//! The per-shard side: the [`Service`] an application runs on every shard, and the [`Shard`]
//! facade through which a shard reaches the others.
//!
//! The service knows nothing about sharding (it handles a message or answers a query); the
//! facade holds the routing: send to one shard (calling the local service directly when the
//! target is this shard), broadcast, and map-reduce over all shards.
//!
//! Every ordered pair of shards has its own glommio `shared_channel`: a lock-free SPSC ring that
//! wakes the receiving executor through its eventfd only when it is parked. Each shard runs one
//! receive loop per peer; the loop hands messages to [`Service::on_message`] synchronously, in
//! ring order, which is what keeps per-pair order and makes the mesh deadlock-free (a receive
//! loop never waits for anything but its ring).
//!
//! The mesh is built from `shared_channel` pairs rather than glommio's `MeshBuilder`, which
//! is the same rings plus a registry: that registry is an `Rc` cloned into every executor
//! thread (its reference count is updated from several threads at once), and it numbers peers
//! by glommio's global executor id rather than by shard.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use futures_lite::future;
use glommio::channels::shared_channel::{
    ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{GlommioError, ResourceType};

use crate::control::{Control, ControlMsg, Inbox, Shared};
use crate::error::{QueryError, SendError};
use crate::event::LocalEvent;
use crate::ShardId;

/// What an application runs on each shard: the per-shard state and how it reacts to messages
/// and queries from other shards. It lives on its shard's thread only, so it may use `Rc` and
/// `RefCell` freely.
///
/// Do not store a [`Shard`] inside the service (the shard owns the service; the cycle would
/// keep both alive past shutdown): both methods receive the shard.
pub trait Service: Sized + 'static {
    /// What shards send each other. Usually a batch (a `Vec` of events): one cross-shard hop
    /// costs a ring slot and possibly a wake-up of the peer, so batching is what makes the mesh
    /// fast.
    type Msg: Send + 'static;
    /// A question asked of every shard by a map-reduce (stats, "who owns this session?").
    type Query: Clone + Send + 'static;
    /// One shard's answer to a [`Self::Query`].
    type Answer: Send + 'static;

    /// Handles a message sent to this shard by shard `from` (which is this shard itself on the
    /// local fast path).
    ///
    /// Synchronous on purpose: the receive loop calls it in ring order and must never wait on
    /// another shard, or two shards sending to each other through full rings would deadlock.
    /// Work that has to wait (I/O, sends to other shards) goes to a spawned task or an
    /// [`crate::Outbox`]. A panic here stops the whole pool (see [`crate::Pool::join`]).
    fn on_message(&self, shard: &Shard<Self>, from: ShardId, msg: Self::Msg);

    /// Answers one shard's part of a map-reduce. Runs in a task of its own, so it may await;
    /// it is the only place a service is asked to do so on behalf of another shard.
    fn answer(&self, shard: &Shard<Self>, query: Self::Query)
        -> impl Future<Output = Self::Answer>;
}

/// What travels on the mesh.
pub(crate) enum Envelope<S: Service> {
    Msg(S::Msg),
    Query {
        call: u64,
        query: S::Query,
    },
    Answer {
        call: u64,
        answer: S::Answer,
    },
    /// The sender's `main` has returned; nothing but answers and late task output follow.
    Done,
}

/// One shard's unconnected ends of the mesh, built on the thread that starts the pool and
/// connected on the shard's own executor.
pub(crate) struct Endpoints<S: Service> {
    pub(crate) senders: Vec<(ShardId, SharedSender<Envelope<S>>)>,
    pub(crate) receivers: Vec<(ShardId, SharedReceiver<Envelope<S>>)>,
}

/// Builds the full mesh: one ring for every ordered pair of distinct shards.
pub(crate) fn mesh<S: Service>(count: usize, capacity: usize) -> Vec<Endpoints<S>> {
    let mut ends: Vec<Endpoints<S>> = (0..count)
        .map(|_| Endpoints {
            senders: Vec::with_capacity(count.saturating_sub(1)),
            receivers: Vec::with_capacity(count.saturating_sub(1)),
        })
        .collect();
    for from in 0..count {
        for to in (0..count).filter(|to| *to != from) {
            let (tx, rx) = glommio::channels::shared_channel::new_bounded(capacity);
            ends[from].senders.push((ShardId::new(to), tx));
            ends[to].receivers.push((ShardId::new(from), rx));
        }
    }
    ends
}

/// This shard's view of one peer.
struct Peer<S: Service> {
    tx: ConnectedSender<Envelope<S>>,
    /// The peer's executor is gone (its ring to us closed): sends to it cannot succeed.
    gone: LocalEvent,
    /// The peer's `main` has returned (or the peer is gone).
    finished: Cell<bool>,
}

/// One map-reduce in progress on this shard.
struct Call<A> {
    answers: Vec<Option<A>>,
    missing: usize,
    failed: Option<ShardId>,
    waker: Option<Waker>,
}

/// Map-reduces in progress, by call id, so that answers arriving on any receive loop find
/// their caller.
struct Calls<A> {
    next: Cell<u64>,
    pending: RefCell<HashMap<u64, Rc<RefCell<Call<A>>>>>,
}

impl<A> Calls<A> {
    fn open(&self, count: usize, missing: usize) -> (u64, Rc<RefCell<Call<A>>>) {
        let id = self.next.get();
        self.next.set(id.wrapping_add(1));
        let call = Rc::new(RefCell::new(Call {
            answers: (0..count).map(|_| None).collect(),
            missing,
            failed: None,
            waker: None,
        }));
        self.pending.borrow_mut().insert(id, call.clone());
        (id, call)
    }

    fn deliver(&self, id: u64, from: ShardId, answer: A) {
        // A call whose caller gave up (its future was dropped) is no longer pending.
        let Some(call) = self.pending.borrow().get(&id).cloned() else {
            return;
        };
        let mut call = call.borrow_mut();
        let slot = &mut call.answers[from.index()];
        debug_assert!(slot.is_none(), "{from} answered call {id} twice");
        if slot.is_none() {
            *slot = Some(answer);
            call.missing -= 1;
            if call.missing == 0 {
                if let Some(waker) = call.waker.take() {
                    waker.wake();
                }
            }
        }
    }

    fn peer_gone(&self, peer: ShardId) {
        for call in self.pending.borrow().values() {
            let mut call = call.borrow_mut();
            if call.answers[peer.index()].is_none() && call.failed.is_none() {
                call.failed = Some(peer);
                if let Some(waker) = call.waker.take() {
                    waker.wake();
                }
            }
        }
    }
}

/// Removes a call from the pending table however its map-reduce ends (done, failed, dropped).
struct CallGuard<'a, A> {
    calls: &'a Calls<A>,
    id: u64,
}

impl<A> Drop for CallGuard<'_, A> {
    fn drop(&mut self) {
        self.calls.pending.borrow_mut().remove(&self.id);
    }
}

struct Inner<S: Service> {
    id: ShardId,
    count: usize,
    service: S,
    /// Indexed by shard; `None` at this shard's own index.
    peers: Vec<Option<Peer<S>>>,
    calls: Calls<S::Answer>,
    stop: LocalEvent,
    unfinished_peers: Cell<usize>,
    all_peers_finished: LocalEvent,
    shared: Arc<Shared<S::Query, S::Answer>>,
}

impl<S: Service> Inner<S> {
    #[expect(
        clippy::expect_used,
        reason = "callers pass peers only: a shard has no channel to itself, by construction"
    )]
    fn peer(&self, to: ShardId) -> &Peer<S> {
        assert!(
            to.index() < self.count,
            "{to} is not in a pool of {}",
            self.count
        );
        self.peers[to.index()]
            .as_ref()
            .expect("no mesh channel from a shard to itself")
    }

    fn finish_peer(&self, peer: ShardId) {
        if !self.peer(peer).finished.replace(true) {
            let left = self.unfinished_peers.get() - 1;
            self.unfinished_peers.set(left);
            if left == 0 {
                self.all_peers_finished.set();
            }
        }
    }

    fn peer_gone(&self, peer: ShardId) {
        self.peer(peer).gone.set();
        self.calls.peer_gone(peer);
        self.finish_peer(peer);
    }
}

/// A shard's handle on the pool: who it is, and how to reach the other shards.
///
/// Cheap to clone (an `Rc`), not `Send`: it belongs to its shard's executor. Hand threads
/// outside the pool a [`Control`] instead.
pub struct Shard<S: Service> {
    inner: Rc<Inner<S>>,
}

impl<S: Service> Clone for Shard<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Service> fmt::Debug for Shard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.inner.id)
            .field("count", &self.inner.count)
            .field("stopping", &self.inner.stop.is_set())
            .finish()
    }
}

impl<S: Service> Shard<S> {
    /// This shard's index in the pool.
    pub fn id(&self) -> ShardId {
        self.inner.id
    }

    /// The number of shards in the pool.
    pub fn count(&self) -> usize {
        self.inner.count
    }

    /// This shard's service, for the shard's own tasks (connections, timers).
    pub fn service(&self) -> &S {
        &self.inner.service
    }

    /// The shard that owns a key, given the key's hash: one routing function for every caller,
    /// so that all shards agree on who owns what.
    pub fn shard_for(&self, key_hash: u64) -> ShardId {
        // The count is at most SHARD_COUNT_MAX, so both casts are lossless.
        ShardId::new((key_hash % self.inner.count as u64) as usize)
    }

    /// Delivers `msg` to shard `to`'s [`Service::on_message`].
    ///
    /// When `to` is this shard the handler is called right here, before this returns, with no
    /// channel hop. Otherwise the message goes into the ring to `to`, waiting while the ring is
    /// full. Messages sent one after another by one task arrive in that order. Fails only when
    /// `to` has stopped.
    ///
    /// # Panics
    ///
    /// If `to` is not a shard of this pool.
    pub async fn send_to(&self, to: ShardId, msg: S::Msg) -> Result<(), SendError<S::Msg>> {
        if to == self.inner.id {
            self.inner.service.on_message(self, to, msg);
            return Ok(());
        }
        self.send_envelope(to, Envelope::Msg(msg))
            .await
            .map_err(|envelope| SendError {
                to,
                msg: envelope.and_then(|envelope| match envelope {
                    Envelope::Msg(msg) => Some(msg),
                    _ => None,
                }),
            })
    }

    /// Delivers a copy of `msg` to every shard, this one included (its copy is handled last,
    /// directly). Keeps going past a stopped shard and reports the first one.
    pub async fn broadcast(&self, msg: S::Msg) -> Result<(), SendError<S::Msg>>
    where
        S::Msg: Clone,
    {
        let result = self.broadcast_peers(msg.clone()).await;
        self.inner.service.on_message(self, self.inner.id, msg);
        result
    }

    /// Delivers a copy of `msg` to every shard except this one, for news this shard has
    /// already applied to itself. Keeps going past a stopped shard and reports the first one.
    pub async fn broadcast_peers(&self, msg: S::Msg) -> Result<(), SendError<S::Msg>>
    where
        S::Msg: Clone,
    {
        let mut first_error = None;
        for peer in self.peer_ids() {
            if let Err(error) = self.send_to(peer, msg.clone()).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Asks every shard's [`Service::answer`] (this one's directly, the others' over the mesh,
    /// all concurrently) and folds the answers in shard order.
    ///
    /// Never call it from [`Service::on_message`] (which cannot await anyway) and do not await
    /// it while holding a `RefCell` borrow of the service: this shard answers too.
    pub async fn map_reduce<R>(
        &self,
        query: S::Query,
        init: R,
        mut fold: impl FnMut(R, ShardId, S::Answer) -> R,
    ) -> Result<R, QueryError> {
        let inner = &self.inner;
        let (id, call) = inner.calls.open(inner.count, inner.count - 1);
        let _guard = CallGuard {
            calls: &inner.calls,
            id,
        };
        // Registered before sending: a peer that goes away from now on fails the call.
        for peer in self.peer_ids() {
            let envelope = Envelope::Query {
                call: id,
                query: query.clone(),
            };
            if self.send_envelope(peer, envelope).await.is_err() {
                return Err(QueryError::ShardStopped(peer));
            }
        }
        let own = inner.service.answer(self, query).await;
        poll_fn(|cx| {
            let mut call = call.borrow_mut();
            if let Some(peer) = call.failed {
                return Poll::Ready(Err(QueryError::ShardStopped(peer)));
            }
            if call.missing == 0 {
                return Poll::Ready(Ok(()));
            }
            call.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await?;
        let answers = std::mem::take(&mut call.borrow_mut().answers);
        let mut acc = init;
        let mut own = Some(own);
        for (index, answer) in answers.into_iter().enumerate() {
            let answer = if index == inner.id.index() {
                own.take()
            } else {
                answer
            };
            debug_assert!(answer.is_some(), "missing answer from shard {index}");
            if let Some(answer) = answer {
                acc = fold(acc, ShardId::new(index), answer);
            }
        }
        Ok(acc)
    }

    /// Completes once a stop of the pool has been requested. `'static`, so it can be handed to
    /// spawned tasks (a listener racing `accept` against it, say).
    pub fn stopped(&self) -> impl Future<Output = ()> + 'static {
        self.inner.stop.wait()
    }

    /// Whether a stop of the pool has been requested.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_set()
    }

    /// Requests an orderly stop of the whole pool, as [`Control::stop`] does.
    pub fn request_stop(&self) {
        self.inner.stop.set();
        self.inner.shared.request_stop();
    }

    /// A handle for threads outside the pool (an admin server spawned by a shard, say).
    pub fn control(&self) -> Control<S> {
        Control::new(self.inner.shared.clone())
    }

    fn peer_ids(&self) -> impl Iterator<Item = ShardId> {
        let me = self.inner.id.index();
        (0..self.inner.count)
            .filter(move |index| *index != me)
            .map(ShardId::new)
    }

    /// Puts an envelope into the ring to `to`. On failure returns the envelope when the channel
    /// handed it back, `None` when `to` went away while the send waited for room.
    async fn send_envelope(
        &self,
        to: ShardId,
        envelope: Envelope<S>,
    ) -> Result<(), Option<Envelope<S>>> {
        let peer = self.inner.peer(to);
        if peer.gone.is_set() {
            return Err(Some(envelope));
        }
        match peer.tx.try_send(envelope) {
            Ok(()) => Ok(()),
            Err(GlommioError::WouldBlock(ResourceType::Channel(envelope))) => {
                // glommio 0.9's send() keeps waiting for room when the receiver is dropped with
                // a full ring, so the wait is raced against the peer going away.
                let send = async { peer.tx.send(envelope).await.map_err(recover) };
                let gone = async {
                    peer.gone.wait().await;
                    Err(None)
                };
                future::or(send, gone).await
            }
            Err(error) => Err(recover(error)),
        }
    }
}

/// The item a failed channel operation hands back, if any.
fn recover<T>(error: GlommioError<T>) -> Option<T> {
    match error {
        GlommioError::Closed(ResourceType::Channel(item))
        | GlommioError::WouldBlock(ResourceType::Channel(item)) => Some(item),
        _ => None,
    }
}

/// One connected end of the mesh.
enum End<S: Service> {
    Tx(ShardId, ConnectedSender<Envelope<S>>),
    Rx(ShardId, ConnectedReceiver<Envelope<S>>),
}

/// The connected receiving ends, each with the shard it hears from.
type Receivers<S> = Vec<(ShardId, ConnectedReceiver<Envelope<S>>)>;

/// A connect in progress.
type Connecting<'a, S> = Pin<Box<dyn Future<Output = End<S>> + 'a>>;

/// Everything one shard needs to run, moved onto its thread.
pub(crate) struct Launch<S: Service, B, M> {
    pub(crate) id: ShardId,
    pub(crate) count: usize,
    pub(crate) build: B,
    pub(crate) main: M,
    pub(crate) ends: Endpoints<S>,
    pub(crate) inbox: Inbox<S::Query, S::Answer>,
    pub(crate) shared: Arc<Shared<S::Query, S::Answer>>,
}

/// A shard's life on its executor: build the service, connect the mesh, serve, run `main`,
/// then stay until every peer's `main` has returned too.
pub(crate) async fn run<S, B, M, F, T>(launch: Launch<S, B, M>) -> T
where
    S: Service,
    B: FnOnce(ShardId) -> S,
    M: FnOnce(Shard<S>) -> F,
    F: Future<Output = T>,
{
    let Launch {
        id,
        count,
        build,
        main,
        ends,
        inbox,
        shared,
    } = launch;
    let service = build(id);
    let connected = connect_mesh(id, ends, &inbox, &shared).await;
    let (peers, receivers) = sort_ends(id, count, connected);

    let all_peers_finished = LocalEvent::default();
    if count == 1 {
        all_peers_finished.set();
    }
    let shard = Shard {
        inner: Rc::new(Inner {
            id,
            count,
            service,
            peers,
            calls: Calls {
                next: Cell::new(0),
                pending: RefCell::new(HashMap::new()),
            },
            stop: LocalEvent::default(),
            unfinished_peers: Cell::new(count - 1),
            all_peers_finished,
            shared,
        }),
    };
    let loops: Vec<_> = receivers
        .into_iter()
        .map(|(peer, rx)| glommio::spawn_local(receive_loop(shard.clone(), peer, rx)))
        .collect();
    let control = glommio::spawn_local(control_loop(shard.clone(), inbox));

    let output = main(shard.clone()).await;
    wind_down(&shard, control, loops).await;
    output
}

/// Connects every end of this shard's mesh and gives them once all are connected.
async fn connect_mesh<S: Service>(
    id: ShardId,
    ends: Endpoints<S>,
    inbox: &Inbox<S::Query, S::Answer>,
    shared: &Shared<S::Query, S::Answer>,
) -> Vec<End<S>> {
    // Connect every end. A connect completes once the peer has connected its end too, but
    // glommio 0.9 never tells the peer when that happens (it finds out only when polled again,
    // and its executor may be asleep). So the connects are polled right here, by this task,
    // whose waker is at the doorbell; every shard rings the others once its own ends are
    // registered (their first poll), and the nudger rings now and then in case of a lost wake.
    let mut connecting: Vec<Option<Connecting<'_, S>>> = Vec::new();
    for (peer, tx) in ends.senders {
        connecting.push(Some(Box::pin(
            async move { End::Tx(peer, tx.connect().await) },
        )));
    }
    for (peer, rx) in ends.receivers {
        connecting.push(Some(Box::pin(
            async move { End::Rx(peer, rx.connect().await) },
        )));
    }
    let mut connected = Vec::with_capacity(connecting.len());
    let mut announced = false;
    poll_fn(|cx| {
        inbox.park(cx.waker());
        for slot in &mut connecting {
            if let Some(end) = slot {
                if let Poll::Ready(end) = end.as_mut().poll(cx) {
                    connected.push(end);
                    *slot = None;
                }
            }
        }
        if !announced {
            announced = true;
            shared.ring_others(id);
        }
        if connecting.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    drop(connecting);
    connected
}

/// The connected ends by kind: a sender per peer (indexed by shard, `None` at `id`), and
/// the receivers with the shard each one hears from.
fn sort_ends<S: Service>(
    id: ShardId,
    count: usize,
    connected: Vec<End<S>>,
) -> (Vec<Option<Peer<S>>>, Receivers<S>) {
    let mut peers: Vec<Option<Peer<S>>> = (0..count).map(|_| None).collect();
    let mut receivers = Vec::with_capacity(count.saturating_sub(1));
    for end in connected {
        match end {
            End::Tx(peer, tx) => {
                peers[peer.index()] = Some(Peer {
                    tx,
                    gone: LocalEvent::default(),
                    finished: Cell::new(false),
                });
            }
            End::Rx(peer, rx) => receivers.push((peer, rx)),
        }
    }
    debug_assert!(peers
        .iter()
        .enumerate()
        .all(|(i, p)| p.is_some() == (i != id.index())));
    (peers, receivers)
}

/// After `main` returned: tells every peer, serves until every peer's `main` is done too,
/// then closes the rings and ends the control and receive loops.
async fn wind_down<S: Service>(
    shard: &Shard<S>,
    control: glommio::Task<()>,
    loops: Vec<glommio::Task<()>>,
) {
    // Tell every peer this shard's main is done, behind everything it sent before.
    for peer in shard.peer_ids() {
        // A peer that is already gone needs no notice.
        let _ = shard.send_envelope(peer, Envelope::Done).await;
    }
    // Keep serving until every peer's main is done: they may still send here.
    shard.inner.all_peers_finished.wait().await;
    for peer in shard.inner.peers.iter().flatten() {
        peer.tx.close();
    }
    control.cancel().await;
    for receive in loops {
        receive.cancel().await;
    }
}

/// Hands everything shard `from` sends here to the service, in ring order.
async fn receive_loop<S: Service>(
    shard: Shard<S>,
    from: ShardId,
    rx: ConnectedReceiver<Envelope<S>>,
) {
    while let Some(envelope) = rx.recv().await {
        match envelope {
            Envelope::Msg(msg) => shard.inner.service.on_message(&shard, from, msg),
            Envelope::Query { call, query } => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let answer = shard.inner.service.answer(&shard, query).await;
                    // The asker may be gone by now; then nobody wants the answer.
                    let _ = shard
                        .send_envelope(from, Envelope::Answer { call, answer })
                        .await;
                })
                .detach();
            }
            Envelope::Answer { call, answer } => shard.inner.calls.deliver(call, from, answer),
            Envelope::Done => shard.inner.finish_peer(from),
        }
        // A busy ring never makes recv() return Pending: leave room for other tasks.
        glommio::yield_if_needed().await;
    }
    shard.inner.peer_gone(from);
}

/// Serves the control inbox: stop requests and map-reduces from outside threads.
async fn control_loop<S: Service>(shard: Shard<S>, inbox: Inbox<S::Query, S::Answer>) {
    while let Some(msg) = inbox.recv().await {
        match msg {
            ControlMsg::Stop => shard.inner.stop.set(),
            ControlMsg::PeerDied(peer) => shard.inner.peer_gone(peer),
            ControlMsg::Query { query, reply } => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let answer = shard.inner.service.answer(&shard, query).await;
                    // The asker may have timed out; then nobody wants the answer.
                    let _ = reply.send((shard.id(), answer));
                })
                .detach();
            }
            ControlMsg::Post(query) => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let _ = shard.inner.service.answer(&shard, query).await;
                })
                .detach();
            }
        }
    }
}
