//! A generic thread-per-core runtime: one glommio executor per shard, a full mesh of lock-free
//! channels between shards, a small sharding facade and an orderly stop. It knows nothing about
//! the application that runs on it.
//!
//! # Map of the crate
//!
//! - [`config`]: [`Config`] and [`Placement`]: how many shards, on which cores, and the
//!   per-executor limits (preemption timer, io_uring depth, locked I/O memory, mesh capacity).
//! - [`pool`]: [`Pool::start`] builds the executors, connects the mesh, runs one main future per
//!   shard and [`Pool::join`]s them; startup failures come back as [`StartError`].
//! - [`shard`]: the per-shard side. The application implements [`Service`] (what a shard does
//!   with a message or a query); [`Shard`] is the facade a shard uses to reach the others:
//!   [`Shard::send_to`] (with a local fast path), [`Shard::broadcast`], [`Shard::map_reduce`],
//!   and [`Shard::stopped`].
//! - [`control`]: [`Control`], the `Send` handle for threads that are not executors (an admin
//!   server, a signal handler): stop the pool, or run a map-reduce and wait for its answer.
//!   Also the nudger, a workaround for a lost wake-up in glommio 0.9.0 (see that module).
//! - [`outbox`]: [`Outbox`], per-destination batching so that many small events cost one
//!   cross-shard send per destination and tick.
//! - [`error`]: the error types, one per kind of failure.
//!
//! # Lifecycle (start and stop order)
//!
//! Start: validate the config; start the executors one by one (a failure aborts the ones
//! already made); start the nudger; build each shard's service; connect the mesh; start the
//! receive loops and the control loop; run `main`.
//! Stop: a stop request (from [`Control::stop`], [`Shard::request_stop`] or a panicking shard)
//! completes every shard's [`Shard::stopped`]; each `main` winds down and returns; a shard
//! whose `main` has returned keeps serving messages and queries until every shard's `main` has
//! returned, then closes its channels and its thread ends; [`Pool::join`] collects the results
//! and then stops the nudger. A shard that panics is reported to the others through their
//! control inboxes (glommio does not wake them when a dead executor's channels go away) and
//! the pool stops.
//!
//! # Delivery guarantees
//!
//! Messages from one task of shard A to shard B arrive in the order they were sent. Messages
//! are handled by [`Service::on_message`] synchronously, inside the receive loop, so a handler
//! never waits on another shard and the mesh cannot deadlock on full rings.

pub mod config;
pub mod control;
pub mod error;
mod event;
pub mod outbox;
pub mod pool;
pub mod shard;

pub use config::{Config, Placement};
pub use control::Control;
pub use error::{JoinError, QueryError, SendError, StartError};
pub use outbox::Outbox;
pub use pool::Pool;
pub use shard::{Service, Shard};

use std::fmt;

/// The index of a shard in its pool, `0..count`.
///
/// A type of its own so that a shard index is not confused with a core id, a connection
/// count or any other `usize`: shard `i` runs on core `cores[i]` only when the placement is
/// pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(usize);

impl ShardId {
    /// Names shard `index`; the pool checks the range where the id is used.
    pub const fn new(index: usize) -> Self {
        Self(index)
    }

    /// The position of the shard in per-shard tables (`0..count`).
    pub const fn index(self) -> usize {
        self.0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}
