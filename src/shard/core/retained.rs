//! Retained messages: applying a write in version order on every shard, storing the winner
//! at the topic's home, and forgetting old deletion tombstones.

use super::*;

/// The version of the last write applied to each retained topic on this shard, and the
/// clock that versions this shard's own writes. Deletions stay as tombstones for
/// [`TOMBSTONE_KEEP`] so that an older write arriving late cannot revive a deleted message;
/// at most `tombstones_max` of them (`limits.retained_messages_max`), the oldest forgotten
/// first: a client deleting many topics that never held a message cannot grow the map
/// without bound.
#[derive(Debug)]
pub(super) struct RetainedVersions {
    applied: HashMap<TopicName, (RetainVersion, Option<Instant>)>,
    /// Tombstones in the order they were made (some may have been overwritten since).
    tombstones: std::collections::VecDeque<(TopicName, Instant)>,
    tombstones_max: usize,
    /// The last version this shard gave out (nanoseconds since the epoch, strictly rising).
    last_ns: u64,
    last_prune: Instant,
    shard: u16,
}

impl RetainedVersions {
    pub fn new(shard: usize, now: Instant, tombstones_max: usize) -> RetainedVersions {
        RetainedVersions {
            applied: HashMap::new(),
            tombstones: std::collections::VecDeque::new(),
            tombstones_max: tombstones_max.max(1),
            last_ns: 0,
            last_prune: now,
            shard: shard as u16,
        }
    }

    /// A version for a write made here at `now_ns` on the wall clock: strictly above every
    /// version given out before, even when the clock steps back.
    pub fn next(&mut self, now_ns: u64) -> RetainVersion {
        self.last_ns = now_ns.max(self.last_ns + 1);
        RetainVersion {
            at_ns: self.last_ns,
            shard: self.shard,
        }
    }

    /// A write versioned by another node's clock was applied here: this shard's later
    /// writes are versioned after it (its clock may be behind that node's).
    pub fn observe(&mut self, version: RetainVersion) {
        self.last_ns = self.last_ns.max(version.at_ns);
    }

    /// The version of the write applied to `topic` here, if any.
    pub fn version_of(&self, topic: &TopicName) -> Option<RetainVersion> {
        self.applied.get(topic).map(|(v, _)| *v)
    }

    /// Whether a write of `topic` at `version` is no newer than the one applied.
    pub fn is_stale(&self, topic: &TopicName, version: RetainVersion) -> bool {
        self.applied.get(topic).is_some_and(|(v, _)| *v >= version)
    }

    /// Notes the write applied to `topic` (`deleted_at`: it was a deletion, made then).
    pub fn applied(
        &mut self,
        topic: TopicName,
        version: RetainVersion,
        deleted_at: Option<Instant>,
    ) {
        if let Some(at) = deleted_at {
            self.tombstones.push_back((topic.clone(), at));
        }
        self.applied.insert(topic, (version, deleted_at));
        while self.tombstones.len() > self.tombstones_max {
            if let Some((t, at)) = self.tombstones.pop_front() {
                self.forget_tombstone(&t, at);
            }
        }
    }

    /// Removes `topic`'s entry if it is still the tombstone made at `at`.
    fn forget_tombstone(&mut self, topic: &TopicName, at: Instant) {
        if self.applied.get(topic).is_some_and(|(_, d)| *d == Some(at)) {
            self.applied.remove(topic);
        }
    }

    /// Forgets deletions older than [`TOMBSTONE_KEEP`] (cross-shard writes arrive within
    /// milliseconds; the tombstones only guard against reordering). Sweeps at most once per
    /// [`TOMBSTONE_KEEP`].
    pub fn prune(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_prune) < TOMBSTONE_KEEP {
            return;
        }
        self.last_prune = now;
        while let Some((t, at)) = self.tombstones.front().cloned() {
            if now.saturating_duration_since(at) < TOMBSTONE_KEEP {
                break;
            }
            self.tombstones.pop_front();
            self.forget_tombstone(&t, at);
        }
    }

    /// How many topics have a version noted (live writes and tombstones).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.applied.len()
    }
}

impl Core {
    /// Applies a retained write here (`store_at_home`: stored if this is its home) and
    /// hands it to every other shard (each applies it if newer; its home stores it), with
    /// no answer asked for.
    pub(super) fn apply_retained_everywhere(
        &mut self,
        msg: SharedMessage,
        version: RetainVersion,
        store_at_home: bool,
    ) {
        self.apply_retained(msg.clone(), version, store_at_home);
        for p in self.peers() {
            self.sink.push(
                p,
                Event::RetainReplica {
                    msg: msg.clone(),
                    version,
                    reply: None,
                },
            );
        }
    }

    /// Applies a retained write if it is newer than what this shard has for the topic; the
    /// topic's home shard also stores it (when `store_at_home`).
    pub(super) fn apply_retained(
        &mut self,
        msg: SharedMessage,
        version: RetainVersion,
        store_at_home: bool,
    ) {
        let now = Instant::now();
        if self.retained_versions.is_stale(&msg.topic, version) {
            return; // an older write arriving late
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
            .applied(msg.topic.clone(), version, delete.then_some(now));
        let home = owner_shard(msg.topic.as_bytes(), self.count) == self.id;
        if home && store_at_home && !sys {
            self.fsync_due = true;
            self.write(|b| {
                if delete {
                    b.retained_delete(msg.topic.as_str())
                } else {
                    b.retained_put(
                        msg.topic.as_str(),
                        &MessageRecord::from_message(&msg, &WallClock::now()),
                    )
                }
            });
        }
        if delete {
            self.retained.remove(&msg.topic);
        } else {
            self.retained.set(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(t: &str) -> TopicName {
        TopicName::new(t).unwrap()
    }

    #[test]
    fn versions_given_out_rise_even_when_the_clock_steps_back() {
        let mut v = RetainedVersions::new(3, Instant::now(), 100);
        let a = v.next(1_000);
        let b = v.next(500); // the wall clock stepped back
        let c = v.next(2_000);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!((a.shard, b.at_ns, c.at_ns), (3, 1_001, 2_000));
    }

    #[test]
    fn an_older_or_equal_write_is_stale_and_a_newer_one_is_not() {
        let mut v = RetainedVersions::new(0, Instant::now(), 100);
        let t = topic("a/b");
        let old = RetainVersion {
            at_ns: 10,
            shard: 1,
        };
        let new = RetainVersion {
            at_ns: 20,
            shard: 0,
        };
        assert!(!v.is_stale(&t, old), "nothing applied yet");
        v.applied(t.clone(), new, None);
        assert!(v.is_stale(&t, old));
        assert!(v.is_stale(&t, new), "the same write twice is applied once");
        assert!(!v.is_stale(
            &t,
            RetainVersion {
                at_ns: 20,
                shard: 1
            }
        ));
        assert!(!v.is_stale(&topic("a/c"), old), "versions are per topic");
    }

    #[test]
    fn tombstones_outlive_a_late_write_then_are_forgotten_and_live_topics_stay() {
        let t0 = Instant::now();
        let mut v = RetainedVersions::new(0, t0, 100);
        let (gone, live) = (topic("gone"), topic("live"));
        let del = RetainVersion {
            at_ns: 20,
            shard: 0,
        };
        v.applied(gone.clone(), del, Some(t0));
        v.applied(live.clone(), RetainVersion { at_ns: 5, shard: 0 }, None);
        v.prune(t0 + TOMBSTONE_KEEP / 2);
        assert!(
            v.is_stale(
                &gone,
                RetainVersion {
                    at_ns: 19,
                    shard: 0
                }
            ),
            "kept while young"
        );
        v.prune(t0 + TOMBSTONE_KEEP);
        assert_eq!(v.len(), 1, "the old tombstone went");
        assert!(
            v.is_stale(&live, RetainVersion { at_ns: 5, shard: 0 }),
            "a live topic stays"
        );
    }

    #[test]
    fn tombstones_are_bounded_oldest_first_and_a_rewrite_is_not_a_tombstone() {
        let t0 = Instant::now();
        let mut v = RetainedVersions::new(0, t0, 3);
        let at = |n: u64| RetainVersion { at_ns: n, shard: 0 };
        for i in 0..10u64 {
            v.applied(topic(&format!("gone/{i}")), at(i + 1), Some(t0));
        }
        assert_eq!(v.len(), 3, "only the newest three tombstones stay");
        assert!(v.is_stale(&topic("gone/9"), at(1)));
        assert!(
            !v.is_stale(&topic("gone/0"), at(1)),
            "the oldest went first"
        );
        // A topic deleted, then written again: its entry is no longer a tombstone and is
        // kept when the old tombstone's turn comes.
        let mut v = RetainedVersions::new(0, t0, 2);
        v.applied(topic("back"), at(1), Some(t0));
        v.applied(topic("back"), at(2), None);
        v.applied(topic("x"), at(3), Some(t0));
        v.applied(topic("y"), at(4), Some(t0));
        assert!(v.is_stale(&topic("back"), at(2)), "the rewrite stays");
        v.prune(t0 + TOMBSTONE_KEEP);
        assert_eq!(v.len(), 1, "old tombstones go, the live topic stays");
        assert!(v.is_stale(&topic("back"), at(2)));
    }
}
