//! The broker-wide budget for queued data (`storage.queued_bytes_max`): the bytes queued for
//! persistent sessions on every shard together. It guards the disk as a whole, where the
//! per-session limits guard against one session; beyond it a persistent session refuses
//! what it would queue, and the publisher is told as it is for a full disk.
//!
//! Shared-nothing all the same: each shard writes only its own slot (one cache line) with
//! the bytes its sessions hold, and when its count changes it sums every slot and sets the
//! shared `spent` flag, which a delivery reads with one load. No lock: two shards updating
//! at once may leave the flag a step behind until the next update or timer tick
//! ([`QueuedBudget::refresh`]), so the total can pass the budget by a few messages (the disk
//! guard it is meant to be, not an exact quota).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One shard's count, alone on its cache line so that shards never write the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

#[derive(Debug)]
pub struct QueuedBudget {
    max: u64,
    slots: Box<[Slot]>,
    spent: Spent,
}

/// Written only when the budget becomes spent or has room again.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Spent(AtomicBool);

impl QueuedBudget {
    pub fn new(shards: usize, max: u64) -> QueuedBudget {
        QueuedBudget {
            max,
            slots: (0..shards).map(|_| Slot::default()).collect(),
            spent: Spent::default(),
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Sets shard `shard`'s count and updates the flag.
    pub fn set(&self, shard: usize, bytes: u64) {
        self.slots[shard].0.store(bytes, Ordering::Relaxed);
        self.refresh();
    }

    /// Sets the flag from every shard's count: spent at the budget, and spent until the
    /// total is back under 95% of it, so that a total hovering at the budget does not turn
    /// the flag (and the log lines that go with it) on and off with every message.
    pub fn refresh(&self) {
        let total = self.total();
        let was = self.spent.0.load(Ordering::Relaxed);
        let spent = if was {
            total > self.max / 20 * 19
        } else {
            total >= self.max
        };
        if was != spent {
            self.spent.0.store(spent, Ordering::Relaxed);
        }
    }

    /// Bytes queued on every shard together.
    pub fn total(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// Whether the queued bytes have reached the budget (as of the last update).
    pub fn is_spent(&self) -> bool {
        self.spent.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_spent_by_the_sum_of_every_shard() {
        let b = QueuedBudget::new(3, 100);
        b.set(0, 40);
        b.set(2, 59);
        assert!(!b.is_spent());
        b.set(1, 1);
        assert!(b.is_spent());
        assert_eq!(b.total(), 100);
        // Spent until under 95%.
        b.set(2, 55);
        assert!(b.is_spent(), "96 of 100");
        b.set(2, 54);
        assert!(!b.is_spent(), "95 of 100");
        b.set(2, 58);
        assert!(
            !b.is_spent(),
            "99 of 100: not spent again before the budget"
        );
        b.set(0, u64::MAX);
        assert!(b.is_spent(), "no overflow");
    }
}
