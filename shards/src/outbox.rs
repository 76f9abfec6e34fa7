//! Per-destination batching of cross-shard traffic.
//!
//! A cross-shard send costs a ring slot and, when the peer is parked, a wake-up (~50 us).
//! Handlers and connection tasks push single items here as they go; one task flushes once per
//! tick, which sends each destination everything it accumulated as one message.

use std::cell::RefCell;
use std::fmt;

use glommio::sync::Semaphore;

use crate::error::SendError;
use crate::shard::{Service, Shard};
use crate::ShardId;

/// Items waiting to be sent, one batch per destination shard. Shard-local (not `Send`); usable
/// from synchronous code such as [`Service::on_message`] through `&self`.
pub struct Outbox<T> {
    batches: RefCell<Vec<Vec<T>>>,
    /// One flush at a time: two overlapping flushes could deliver a later batch to a shard
    /// before an earlier one.
    flushing: Semaphore,
}

impl<T> Outbox<T> {
    /// An empty outbox for a pool of `shard_count` shards.
    pub fn new(shard_count: usize) -> Self {
        Self {
            batches: RefCell::new((0..shard_count).map(|_| Vec::new()).collect()),
            flushing: Semaphore::new(1),
        }
    }

    /// Queues `item` for shard `to` and returns how many items that shard's batch now holds,
    /// so that the caller can flush early when a batch reaches its own limit.
    ///
    /// # Panics
    ///
    /// If `to` is not a shard of the pool this outbox was made for.
    pub fn push(&self, to: ShardId, item: T) -> usize {
        let mut batches = self.batches.borrow_mut();
        let count = batches.len();
        let batch = batches
            .get_mut(to.index())
            .unwrap_or_else(|| panic!("{to} is not in a pool of {count}"));
        batch.push(item);
        batch.len()
    }

    /// The number of items waiting, over all destinations.
    pub fn len(&self) -> usize {
        self.batches.borrow().iter().map(Vec::len).sum()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.batches.borrow().iter().all(Vec::is_empty)
    }

    /// Sends each destination its batch as one message (this shard's own batch goes straight
    /// to its service). Items pushed while the flush waits for ring room go out with the next
    /// flush. Keeps going past a stopped shard and reports the first one.
    pub async fn flush<S>(&self, shard: &Shard<S>) -> Result<(), SendError<S::Msg>>
    where
        S: Service,
        S::Msg: From<Vec<T>>,
    {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.flushing.acquire_permit(1).await;
        let ready: Vec<(ShardId, Vec<T>)> = self
            .batches
            .borrow_mut()
            .iter_mut()
            .enumerate()
            .filter(|(_, batch)| !batch.is_empty())
            .map(|(index, batch)| (ShardId::new(index), std::mem::take(batch)))
            .collect();
        let mut first_error = None;
        for (to, batch) in ready {
            if let Err(error) = shard.send_to(to, S::Msg::from(batch)).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<T> fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("shards", &self.batches.borrow().len())
            .field("items", &self.len())
            .finish()
    }
}
