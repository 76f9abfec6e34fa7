//! Helpers shared by the integration tests: a recording service and a join with a failure
//! bound. Synchronisation is by events (semaphores, channels), never by sleeping.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a test failure"
)]
#![allow(dead_code)] // each test binary uses a different subset

use std::cell::RefCell;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use glommio::sync::Semaphore;
use shards::{Config, JoinError, Placement, Pool, Service, Shard, ShardId};

/// Generous bound on a whole pool's life in a test: only a hang should ever reach it.
pub const JOIN_LIMIT: Duration = Duration::from_secs(60);

/// The default config with less locked memory (tests run many pools at once) and small
/// rings, so that senders often wait for room.
///
/// The ring depth stays at its default on purpose: glommio 0.9's throughput preemption fires
/// every `ring_depth` completions, and a tiny depth makes its lost wake-up (see the crate's
/// `control` module) far more frequent than anything a broker would see.
pub fn config(placement: Placement) -> Config {
    let mut config = Config::new(placement);
    config.io_memory_bytes = 256 << 10;
    config.mesh_capacity = 64;
    config.thread_name_prefix = String::from("test");
    config
}

/// Every message a pool handled, as (receiver, sender, message), shared with the test thread.
pub type Sink<M> = Arc<Mutex<Vec<(ShardId, ShardId, M)>>>;

/// Records every message it handles; answers a query `q` with `q * (shard index + 1)`.
pub struct Recorder<M> {
    pub received: RefCell<Vec<(ShardId, M)>>,
    /// One unit per message handled, so that a main can wait for N messages.
    pub arrived: Semaphore,
    /// Messages also go here, to be checked after the pool has stopped.
    pub sink: Option<Sink<M>>,
    /// Handling this message panics, to test how a dying shard is reported.
    pub poison: Option<M>,
}

impl<M> Recorder<M> {
    pub fn new() -> Self {
        Self {
            received: RefCell::new(Vec::new()),
            arrived: Semaphore::new(0),
            sink: None,
            poison: None,
        }
    }

    pub async fn wait_for(&self, count: u64) {
        self.arrived.acquire(count).await.expect("semaphore closed");
    }
}

impl<M: Clone + PartialEq + Send + 'static> Service for Recorder<M> {
    type Msg = M;
    type Query = u64;
    type Answer = u64;

    fn on_message(&self, shard: &Shard<Self>, from: ShardId, msg: M) {
        if self.poison.as_ref() == Some(&msg) {
            panic!("boom: poisoned message on {}", shard.id());
        }
        if let Some(sink) = &self.sink {
            sink.lock().unwrap().push((shard.id(), from, msg.clone()));
        }
        self.received.borrow_mut().push((from, msg));
        self.arrived.signal(1);
    }

    async fn answer(&self, shard: &Shard<Self>, query: u64) -> u64 {
        query * (shard.id().index() as u64 + 1)
    }
}

/// Joins the pool, failing the test instead of hanging if it does not stop within `limit`.
pub fn join_within<S: Service, T: Send + 'static>(
    pool: Pool<S, T>,
    limit: Duration,
) -> Vec<Result<T, JoinError>> {
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(pool.join());
    });
    done_rx
        .recv_timeout(limit)
        .expect("pool did not stop within the failure bound")
}

/// Unwraps every shard's result, naming the shard that failed.
pub fn all_ok<T>(results: Vec<Result<T, JoinError>>) -> Vec<T> {
    results
        .into_iter()
        .map(|result| result.unwrap_or_else(|error| panic!("{error}")))
        .collect()
}
