//! Retained messages: applying a write in version order on every shard, storing the winner
//! at the topic's home, and forgetting old deletion tombstones.

use super::*;

/// The version of the last write applied to each retained topic on this shard, and the
/// clock that versions this shard's own writes. Deletions stay as tombstones for `keep`
/// (`limits.retained_deletions_keep_s`): an older write arriving late cannot revive a
/// deleted message, and a node that starts asks for them with the retained set, so that a
/// copy it kept from before (an old disk) of a message deleted while it was away is
/// deleted too. At most `tombstones_max` of them (`limits.retained_messages_max`) and
/// `bytes_max` bytes (`limits.retained_deletions_bytes_max`, topics plus
/// [`TOMBSTONE_OVERHEAD`] each), the oldest forgotten first: a client deleting many topics
/// that never held a message cannot grow the map without bound.
#[derive(Debug)]
pub(super) struct RetainedVersions {
    applied: HashMap<TopicName, (RetainVersion, Option<Instant>)>,
    /// Tombstones in the order they were made (some may have been overwritten since).
    /// Each with when it was made and the deletion's version (which tells it from a later
    /// tombstone of the same topic).
    tombstones: std::collections::VecDeque<(TopicName, Instant, RetainVersion)>,
    tombstones_max: usize,
    /// What the tombstones in the deque hold (topic bytes plus [`TOMBSTONE_OVERHEAD`]).
    bytes: usize,
    /// Tombstones that are their topic's last write (the deque may hold more entries).
    current: usize,
    bytes_max: usize,
    keep: Duration,
    /// The last version this shard gave out (nanoseconds since the epoch, strictly rising).
    last_ns: u64,
    last_prune: Instant,
    shard: u16,
}

/// What a tombstone holds besides its topic's bytes (its map entry and its place in the
/// deque), for `limits.retained_deletions_bytes_max`.
pub(super) const TOMBSTONE_OVERHEAD: usize = 96;

/// Tombstones are swept at least this often (and at most once per `keep`, if shorter).
const TOMBSTONE_SWEEP: Duration = Duration::from_secs(60);

impl RetainedVersions {
    pub fn new(
        shard: usize,
        now: Instant,
        tombstones_max: usize,
        bytes_max: usize,
        keep: Duration,
    ) -> RetainedVersions {
        RetainedVersions {
            applied: HashMap::new(),
            tombstones: std::collections::VecDeque::new(),
            tombstones_max: tombstones_max.max(1),
            bytes: 0,
            current: 0,
            bytes_max,
            keep,
            last_ns: 0,
            last_prune: now,
            shard: shard as u16,
        }
    }

    /// A version for a write made here at `now_ns` on the wall clock: strictly above every
    /// version given out before, even when the clock steps back.
    pub fn next(&mut self, now_ns: u64) -> RetainVersion {
        self.last_ns = now_ns.max(self.last_ns.saturating_add(1));
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
    /// Returns how many deletions were forgotten before their time to make room.
    pub fn applied(
        &mut self,
        topic: TopicName,
        version: RetainVersion,
        deleted_at: Option<Instant>,
    ) -> u64 {
        // The map keeps its own copy of a topic (a topic parsed from a PUBLISH shares that
        // packet's buffer, which a tombstone kept for a day must not hold).
        let key = match self.applied.get_key_value(&topic) {
            Some((k, (_, was))) => {
                if was.is_some() {
                    self.current -= 1;
                }
                k.clone()
            }
            None => topic.detached(),
        };
        if let Some(at) = deleted_at {
            self.current += 1;
            self.bytes += key.as_str().len() + TOMBSTONE_OVERHEAD;
            self.tombstones.push_back((key.clone(), at, version));
        }
        self.applied.insert(key, (version, deleted_at));
        // Entries of tombstones overwritten since (the topic written or deleted again)
        // stay in the deque until their turn: past as many as the live ones, they go.
        if self.tombstones.len() > 2 * self.current + 64 {
            self.compact();
        }
        let over = |v: &Self| v.current > v.tombstones_max || v.bytes > v.bytes_max;
        // Over a bound with a quarter or more of the entries overwritten: those go first
        // (amortized: a quarter of the deque is written between two compactions).
        if over(self) && (self.tombstones.len() - self.current) * 4 >= self.tombstones.len() {
            self.compact();
        }
        let mut early = 0;
        // The newest stays even alone over the byte bound (a topic from another node may
        // be longer than this node's `topic_bytes_max`): it does not clear the others.
        while over(self) && self.tombstones.len() > 1 {
            match self.forget_oldest() {
                Some(true) => early += 1,
                Some(false) => {}
                None => break,
            }
        }
        early
    }

    /// Drops the deque's entries whose tombstone was overwritten.
    fn compact(&mut self) {
        let applied = &self.applied;
        self.tombstones
            .retain(|(t, _, v)| applied.get(t).is_some_and(|(w, d)| d.is_some() && w == v));
        self.bytes = self
            .tombstones
            .iter()
            .map(|(t, _, _)| t.as_str().len() + TOMBSTONE_OVERHEAD)
            .sum();
    }

    /// Takes the oldest entry off the deque, forgetting its tombstone if it is still the
    /// topic's last write: `Some(true)` then, `Some(false)` for an entry overwritten since,
    /// `None` when there is none.
    fn forget_oldest(&mut self) -> Option<bool> {
        let (topic, _, version) = self.tombstones.pop_front()?;
        self.bytes -= topic.as_str().len() + TOMBSTONE_OVERHEAD;
        let current = self
            .applied
            .get(&topic)
            .is_some_and(|(v, d)| d.is_some() && *v == version);
        if current {
            self.applied.remove(&topic);
            self.current -= 1;
        }
        Some(current)
    }

    /// Forgets deletions older than `keep`. Sweeps at most once per `keep` or
    /// [`TOMBSTONE_SWEEP`], whichever is shorter.
    pub fn prune(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_prune) < self.keep.min(TOMBSTONE_SWEEP) {
            return;
        }
        self.last_prune = now;
        while let Some((_, at, _)) = self.tombstones.front() {
            if now.saturating_duration_since(*at) < self.keep {
                break;
            }
            self.forget_oldest();
        }
    }

    /// The deletions remembered here (topic and the version of the deletion).
    pub fn deletions(&self) -> impl Iterator<Item = (&TopicName, RetainVersion)> {
        self.applied
            .iter()
            .filter(|(_, (_, d))| d.is_some())
            .map(|(t, (v, _))| (t, *v))
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
        self.stats.retained_deletions_forgotten +=
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

    const KEEP: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    /// A version of shard 0 at `n` ns.
    fn at(n: u64) -> RetainVersion {
        RetainVersion { at_ns: n, shard: 0 }
    }

    /// The bytes `n` tombstones of 8-byte topics hold.
    fn room_for(n: usize) -> usize {
        n * (8 + TOMBSTONE_OVERHEAD)
    }

    fn topic(t: &str) -> TopicName {
        TopicName::new(t).unwrap()
    }

    #[test]
    fn versions_given_out_rise_even_when_the_clock_steps_back() {
        let mut v = RetainedVersions::new(3, Instant::now(), 100, usize::MAX, KEEP);
        let a = v.next(1_000);
        let b = v.next(500); // the wall clock stepped back
        let c = v.next(2_000);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!((a.shard, b.at_ns, c.at_ns), (3, 1_001, 2_000));
    }

    #[test]
    fn an_older_or_equal_write_is_stale_and_a_newer_one_is_not() {
        let mut v = RetainedVersions::new(0, Instant::now(), 100, usize::MAX, KEEP);
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
        let mut v = RetainedVersions::new(0, t0, 100, usize::MAX, KEEP);
        let (gone, live) = (topic("gone"), topic("live"));
        let del = RetainVersion {
            at_ns: 20,
            shard: 0,
        };
        v.applied(gone.clone(), del, Some(t0));
        v.applied(live.clone(), RetainVersion { at_ns: 5, shard: 0 }, None);
        v.prune(t0 + KEEP / 2);
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
        v.prune(t0 + KEEP);
        assert_eq!(v.len(), 1, "the old tombstone went");
        assert!(
            v.is_stale(&live, RetainVersion { at_ns: 5, shard: 0 }),
            "a live topic stays"
        );
    }

    #[test]
    fn tombstones_are_bounded_oldest_first_and_a_rewrite_is_not_a_tombstone() {
        let t0 = Instant::now();
        let mut v = RetainedVersions::new(0, t0, 3, usize::MAX, KEEP);
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
        let mut v = RetainedVersions::new(0, t0, 2, usize::MAX, KEEP);
        v.applied(topic("back"), at(1), Some(t0));
        v.applied(topic("back"), at(2), None);
        v.applied(topic("x"), at(3), Some(t0));
        v.applied(topic("y"), at(4), Some(t0));
        assert!(v.is_stale(&topic("back"), at(2)), "the rewrite stays");
        v.prune(t0 + KEEP);
        assert_eq!(v.len(), 1, "old tombstones go, the live topic stays");
        assert!(v.is_stale(&topic("back"), at(2)));
    }

    #[test]
    fn tombstones_are_bounded_by_bytes_kept_as_configured_and_listed_for_the_sync() {
        let t0 = Instant::now();
        // Room for two tombstones of 8-byte topics.
        let room = room_for(2);
        let keep = HOUR;
        let mut v = RetainedVersions::new(0, t0, 1000, room, keep);
        let early: u64 = (0..5u64)
            .map(|i| v.applied(topic(&format!("gone/{i:03}")), at(i + 1), Some(t0)))
            .sum();
        assert_eq!(early, 3, "forgotten before their time, counted");
        v.applied(topic("live/000"), at(9), None);
        let mut listed: Vec<(String, u64)> = v
            .deletions()
            .map(|(t, v)| (t.as_str().to_string(), v.at_ns))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [("gone/003".to_string(), 4), ("gone/004".to_string(), 5)],
            "the newest that fit, and no live topic"
        );
        assert_eq!(v.bytes, room);
        // Kept for `keep`, not the old 60 s; then swept.
        v.prune(t0 + Duration::from_secs(61));
        assert_eq!(v.deletions().count(), 2);
        v.prune(t0 + keep);
        assert_eq!(v.deletions().count(), 0);
        assert_eq!((v.bytes, v.len()), (0, 1), "the live topic stays");
    }

    #[test]
    fn a_topic_deleted_and_written_again_and_again_does_not_crowd_out_other_deletions() {
        let t0 = Instant::now();
        let room = room_for(4);
        let mut v = RetainedVersions::new(0, t0, 1000, room, HOUR);
        v.applied(topic("gone/aaa"), at(1), Some(t0));
        let mut early = 0;
        for i in 0..10_000u64 {
            // Cleared and set again, over and over.
            early += v.applied(topic("flip/aaa"), at(2 + 2 * i), Some(t0));
            early += v.applied(topic("flip/aaa"), at(3 + 2 * i), None);
        }
        assert_eq!(early, 0, "only overwritten entries made room");
        assert!(
            v.is_stale(&topic("gone/aaa"), at(1)),
            "the real deletion stays"
        );
        assert_eq!(v.current, 1);
        assert!(
            v.tombstones.len() <= 2 * v.current + 65,
            "{}",
            v.tombstones.len()
        );
        let held: usize = v
            .tombstones
            .iter()
            .map(|(t, _, _)| t.as_str().len() + TOMBSTONE_OVERHEAD)
            .sum();
        assert_eq!(v.bytes, held, "bytes counts what the deque holds");
        // Deleted twice: one tombstone.
        v.applied(topic("twice/aa"), at(50_000), Some(t0));
        v.applied(topic("twice/aa"), at(50_001), Some(t0));
        assert_eq!(v.current, 2);
        assert_eq!(v.deletions().count(), 2);
    }

    #[test]
    fn a_deletion_bigger_than_the_bound_is_kept_alone_and_the_clock_saturates() {
        let t0 = Instant::now();
        let room = room_for(2);
        let mut v = RetainedVersions::new(0, t0, 1000, room, HOUR);
        v.applied(topic("gone/aaa"), at(1), Some(t0));
        // A topic from a node whose topic_bytes_max is larger than this one's.
        let long = format!("long/{}", "x".repeat(300));
        v.applied(topic(&long), at(2), Some(t0));
        assert!(v.is_stale(&topic(&long), at(2)), "the newest stays");
        assert_eq!(v.current, 1);
        v.observe(at(u64::MAX));
        assert_eq!(
            v.next(5).at_ns,
            u64::MAX,
            "no overflow past the largest version"
        );
    }
}
