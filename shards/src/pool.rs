//! Starting and joining the shards.
//!
//! Executors are made one at a time, each on a thread of its own named `<prefix>-<index>`:
//! a shard reports whether its executor could be built (CPU binding, io_uring, locked memory)
//! and then waits for a go. Only when every shard is ready do they all go; if one fails, the
//! ones already made are released without running anything and joined, and the failure comes
//! back as a [`StartError`]. Nothing of the application runs before the whole pool is up.

use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, PoolPlacement};

use crate::config::Config;
use crate::control::{Control, Shared};
use crate::error::{panic_message, JoinError, StartError};
use crate::shard::{self, Launch, Service, Shard};
use crate::ShardId;

/// How a shard's thread ended.
enum Outcome<T> {
    Finished(T),
    Panicked(String),
    /// Released before running: another shard failed to start.
    Aborted,
}

/// A running pool of shards, one executor thread each.
///
/// Dropping a pool that was not joined requests a stop and joins it, so that no shard outlives
/// its pool by accident.
pub struct Pool<S: Service, T: Send + 'static> {
    threads: Vec<JoinHandle<Outcome<T>>>,
    control: Control<S>,
    nudger: Option<Nudger>,
}

/// The thread that works around glommio 0.9's lost wake-up (see [`crate::control`]).
struct Nudger {
    thread: JoinHandle<()>,
    /// Dropping it ends the nudger.
    stop: mpsc::Sender<()>,
}

impl Nudger {
    fn start<Q: Send + 'static, A: Send + 'static>(
        shared: Arc<Shared<Q, A>>,
        interval: Duration,
        name: String,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new().name(name).spawn(move || {
            // A periodic tick, not a synchronisation: the wait is only the interval.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                shared.nudge_all();
            }
        })?;
        Ok(Self { thread, stop })
    }

    fn finish(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

impl<S: Service, T: Send + 'static> Pool<S, T> {
    /// Starts one shard per entry of the placement.
    ///
    /// On each shard's own thread, `build` makes the shard's service, then `main` runs with
    /// the shard's handle; its output is what [`Pool::join`] returns for that shard. `main`
    /// should return soon after [`Shard::stopped`] completes; once it has returned the shard
    /// keeps handling messages and queries until every other shard's `main` has returned as
    /// well. A `main` that returns early does not stop the others; call
    /// [`Shard::request_stop`] for that.
    pub fn start<B, M, F>(config: &Config, build: B, main: M) -> Result<Self, StartError>
    where
        B: FnOnce(ShardId) -> S + Clone + Send + 'static,
        M: FnOnce(Shard<S>) -> F + Clone + Send + 'static,
        F: Future<Output = T> + 'static,
    {
        config.validate()?;
        let count = config.placement.shard_count();
        let (shared, inboxes) = Shared::<S::Query, S::Answer>::new(count);
        let ends = shard::mesh::<S>(count, config.mesh_capacity);
        let mut ready: Vec<(JoinHandle<Outcome<T>>, mpsc::Sender<()>)> = Vec::new();
        for (index, (ends, inbox)) in ends.into_iter().zip(inboxes).enumerate() {
            let launch = Launch {
                id: ShardId::new(index),
                count,
                build: build.clone(),
                main: main.clone(),
                ends,
                inbox,
                shared: shared.clone(),
            };
            match start_shard(config, launch) {
                Ok(started) => ready.push(started),
                Err(error) => {
                    release(ready);
                    return Err(error);
                }
            }
        }
        let nudger = match config.nudge_interval {
            Some(interval) => {
                let name = format!("{}-nudge", config.thread_name_prefix);
                match Nudger::start(shared.clone(), interval, name) {
                    Ok(nudger) => Some(nudger),
                    Err(error) => {
                        release(ready);
                        return Err(StartError::Thread {
                            shard: ShardId::new(0),
                            reason: format!("nudger: {error}"),
                        });
                    }
                }
            }
            None => None,
        };
        let threads = ready
            .into_iter()
            .map(|(thread, go)| {
                // The shard is blocked waiting for this; it cannot have gone.
                let _ = go.send(());
                thread
            })
            .collect();
        Ok(Self {
            threads,
            control: Control::new(shared),
            nudger,
        })
    }

    /// A handle to stop the pool or query it from other threads.
    pub fn control(&self) -> Control<S> {
        self.control.clone()
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.control.shard_count()
    }

    /// Waits for every shard's thread to end and returns each shard's `main` output, in shard
    /// order, or the panic that ended the shard. Blocks until the shards stop: request a stop
    /// first (or have every `main` return on its own).
    pub fn join(mut self) -> Vec<Result<T, JoinError>> {
        let results = join_all(std::mem::take(&mut self.threads));
        if let Some(nudger) = self.nudger.take() {
            nudger.finish();
        }
        results
    }
}

impl<S: Service, T: Send + 'static> Drop for Pool<S, T> {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.stop();
            join_all(std::mem::take(&mut self.threads));
        }
        if let Some(nudger) = self.nudger.take() {
            nudger.finish();
        }
    }
}

impl<S: Service, T: Send + 'static> std::fmt::Debug for Pool<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("shard_count", &self.shard_count())
            .field("running", &self.threads.len())
            .finish()
    }
}

fn join_all<T>(threads: Vec<JoinHandle<Outcome<T>>>) -> Vec<Result<T, JoinError>> {
    threads
        .into_iter()
        .enumerate()
        .map(|(index, thread)| {
            let shard = ShardId::new(index);
            match thread.join() {
                Ok(Outcome::Finished(output)) => Ok(output),
                Ok(Outcome::Panicked(message)) => Err(JoinError { shard, message }),
                Ok(Outcome::Aborted) => Err(JoinError {
                    shard,
                    message: String::from("released before it ran"),
                }),
                Err(payload) => Err(JoinError {
                    shard,
                    message: panic_message(&*payload),
                }),
            }
        })
        .collect()
}

/// Lets shards that are waiting for a go end without running, and waits for them.
fn release<T>(ready: Vec<(JoinHandle<Outcome<T>>, mpsc::Sender<()>)>) {
    let threads: Vec<_> = ready
        .into_iter()
        .map(|(thread, go)| {
            drop(go);
            thread
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// Spawns one shard's thread and waits until its executor is built (or failed to build).
fn start_shard<S, B, M, F, T>(
    config: &Config,
    launch: Launch<S, B, M>,
) -> Result<(JoinHandle<Outcome<T>>, mpsc::Sender<()>), StartError>
where
    S: Service,
    B: FnOnce(ShardId) -> S + Send + 'static,
    M: FnOnce(Shard<S>) -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let shard = launch.id;
    let name = format!("{}-{}", config.thread_name_prefix, shard.index());
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let config = config.clone();
    let thread = thread::Builder::new()
        .name(name.clone())
        .spawn(move || shard_thread(&config, &name, launch, ready_tx, go_rx))
        .map_err(|error| StartError::Thread {
            shard,
            reason: error.to_string(),
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((thread, go_tx)),
        Ok(Err(reason)) => {
            let _ = thread.join();
            Err(StartError::Executor { shard, reason })
        }
        // The thread ended without a word: it panicked while building the executor.
        Err(mpsc::RecvError) => {
            let reason = match thread.join() {
                Err(payload) => panic_message(&*payload),
                Ok(_) => String::from("thread ended before its executor was built"),
            };
            Err(StartError::Executor { shard, reason })
        }
    }
}

/// The body of a shard's thread.
fn shard_thread<S, B, M, F, T>(
    config: &Config,
    name: &str,
    launch: Launch<S, B, M>,
    ready: mpsc::Sender<Result<(), String>>,
    go: mpsc::Receiver<()>,
) -> Outcome<T>
where
    S: Service,
    B: FnOnce(ShardId) -> S,
    M: FnOnce(Shard<S>) -> F,
    F: Future<Output = T>,
{
    let placement = match config.placement.core_of(launch.id.index()) {
        Some(core) => glommio::Placement::Fixed(core),
        None => glommio::Placement::Unbound,
    };
    let executor = LocalExecutorBuilder::new(placement)
        .name(name)
        .preempt_timer(config.preempt_timer)
        .io_memory(config.io_memory_bytes)
        .ring_depth(config.ring_depth)
        // The default puts every shard's blocking thread on the first core of the pool.
        .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
        .make();
    let executor = match executor {
        Ok(executor) => executor,
        Err(error) => {
            let _ = ready.send(Err(error.to_string()));
            return Outcome::Aborted;
        }
    };
    if ready.send(Ok(())).is_err() || go.recv().is_err() {
        return Outcome::Aborted;
    }
    drop(ready);
    let shared: Arc<Shared<S::Query, S::Answer>> = launch.shared.clone();
    let id = launch.id;
    // A panic in any task of the executor unwinds out of run().
    match panic::catch_unwind(AssertUnwindSafe(|| executor.run(shard::run(launch)))) {
        Ok(output) => Outcome::Finished(output),
        Err(payload) => {
            shared.announce_death(id);
            Outcome::Panicked(panic_message(&*payload))
        }
    }
}
