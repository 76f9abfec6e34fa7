//! Retained messages: applying a write in version order on every shard, storing the winner
//! at the topic's home, and forgetting old deletion tombstones.

use super::*;

impl Core {
    /// Applies a retained write if it is newer than what this shard has for the topic; the
    /// topic's home shard also stores it (when `store_at_home`).
    pub(super) fn apply_retained(
        &mut self,
        msg: SharedMessage,
        version: RetainVersion,
        store_at_home: bool,
    ) {
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
    pub(super) fn prune_tombstones(&mut self, now: Instant) {
        self.retained_versions
            .retain(|_, (_, deleted)| match deleted {
                Some(at) => now.saturating_duration_since(*at) < TOMBSTONE_KEEP,
                None => true,
            });
    }
}
