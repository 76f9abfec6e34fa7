//! The durable log: what sessions change collects in the shard's one open batch, applied to
//! the store as a unit before each group commit, and acknowledgements wait ([`Waiter`])
//! until the group commit that covers their writes is on disk; the broker-wide queued-bytes
//! budget and the stored drop counters.

use super::*;

/// The group-commit log of one shard: every write takes the next sequence number; a
/// persist that started after write `n` makes everything up to `n` durable and releases
/// who waited on it, in order, failing them if a write in its range failed.
#[derive(Debug, Default)]
pub(super) struct DurableLog {
    write_seq: u64,
    synced_seq: u64,
    /// Writes not yet covered by a persist that failed, as the range (first, last) holding
    /// them all: a persist whose range reaches `first` fails its waiters. Never narrowed
    /// past a failed write, so a failure is never forgotten (at worst a write between two
    /// failed ones is counted as failed too).
    failed: Option<(u64, u64)>,
    /// Writes applied to the store (the open batch flushed) up to this one.
    applied_seq: u64,
    waiters: std::collections::VecDeque<(u64, Waiter)>,
}

impl DurableLog {
    /// One more write (`ok`: the store took it).
    pub(super) fn note(&mut self, ok: bool) {
        self.write_seq += 1;
        if !ok {
            self.fail_range(self.write_seq, self.write_seq);
        }
    }

    fn fail_range(&mut self, first: u64, last: u64) {
        self.failed = Some(match self.failed {
            Some((f, l)) => (f.min(first), l.max(last)),
            None => (first, last),
        });
    }

    /// The open batch was applied to the store: every write so far is in it.
    pub(super) fn applied(&mut self) {
        self.applied_seq = self.write_seq;
    }

    /// The open batch could not be applied: every write since the last one applied is lost.
    pub(super) fn fail_unapplied(&mut self) {
        if self.write_seq > self.applied_seq {
            self.fail_range(self.applied_seq + 1, self.write_seq);
        }
        self.applied_seq = self.write_seq;
    }

    /// Whether some write is not durable yet.
    pub(super) fn unsynced(&self) -> bool {
        self.write_seq > self.synced_seq
    }

    /// `w` waits for every write so far.
    pub(super) fn wait(&mut self, w: Waiter) {
        self.waiters.push_back((self.write_seq, w));
    }

    /// What a persist starting now would cover.
    pub(super) fn target(&self) -> Option<u64> {
        self.unsynced().then_some(self.write_seq)
    }

    /// A persist covering writes up to `target` ended (`ok`: its fsync succeeded). Returns
    /// whether the waiters it releases succeed, and those waiters, oldest first.
    pub(super) fn synced(&mut self, target: u64, ok: bool) -> (bool, Vec<Waiter>) {
        let failed_in_range = self.failed.is_some_and(|(first, _)| first <= target);
        self.failed = match self.failed {
            Some((_, last)) if last <= target => None,
            Some((first, last)) if first <= target => Some((target + 1, last)),
            kept => kept,
        };
        self.synced_seq = self.synced_seq.max(target);
        debug_assert!(
            self.waiters
                .iter()
                .zip(self.waiters.iter().skip(1))
                .all(|(a, b)| a.0 <= b.0),
            "waiters in write order"
        );
        let n = self.waiters.partition_point(|(seq, _)| *seq <= target);
        let done = self.waiters.drain(..n).map(|(_, w)| w).collect();
        (ok && !failed_in_range, done)
    }
}

impl Core {
    /// Records the outcome of one write to the store.
    pub(super) fn note_write(&mut self, r: Result<(), StorageError>) {
        self.log.note(r.is_ok());
        if let Err(e) = r {
            self.report_write_error(&e);
        }
        self.sink.wake_committer();
    }

    fn report_write_error(&self, e: &StorageError) {
        match &self.store {
            // Logged once per failure episode by the store.
            Some(store) if e.is_io_failure() => store.report_failure(e),
            _ => {
                tracing::error!(shard = self.id, error = %e, "storage write failed; acknowledgements that depend on it will fail")
            }
        }
    }

    /// Adds writes to the shard's open batch: what the sessions change between two group
    /// commits goes to the store as one atomic batch ([`Core::flush_writes`]), in the
    /// order written, and a put that the same batch deletes again is not written at all.
    /// Counted in the durable log at once, so that an acknowledgement waiting from now on
    /// waits for them.
    pub(super) fn write(&mut self, f: impl FnOnce(&mut StoreBatch) -> Result<(), StorageError>) {
        let Some(store) = &self.store else {
            return;
        };
        let elide = self.elide;
        let b = self
            .open_batch
            .get_or_insert_with(|| store.batch().eliding(elide));
        // All of `f`'s writes or none (as when each call was a batch of its own).
        let mark = b.mark();
        let r = f(b);
        if r.is_err() {
            b.rollback(mark);
            self.elide = false;
        }
        let full = b.bytes() >= self.cfg.storage.write_batch_bytes_max as usize;
        self.note_write(r);
        if full {
            self.flush_writes();
        }
    }

    /// Applies the open batch to the store (durable only after the next persist): before
    /// each persist, before the store is read, and when the batch is full. A batch that
    /// cannot be applied fails every acknowledgement waiting for a write not yet durable.
    pub(super) fn flush_writes(&mut self) {
        let Some(b) = self.open_batch.take() else {
            return;
        };
        let started = Instant::now();
        let r = if self.replicating() {
            let number = self.replica_batch + 1;
            b.commit_numbered(self.id as u16, number).map(|unit| {
                if !unit.is_empty() {
                    self.replica_batch = number;
                }
                self.keep_replica_unit(unit)
            })
        } else {
            b.commit()
        };
        self.stats.write_latency.observe(started.elapsed());
        match r {
            Ok(()) => self.log.applied(),
            Err(e) => {
                self.log.fail_unapplied();
                // What the store holds may now differ from what the sessions hold: a key
                // is no longer known to be absent just because its session thinks so.
                self.elide = false;
                self.report_write_error(&e);
            }
        }
    }

    /// Applies a session's journal to the store and, while it is online and its queue is
    /// on disk, reads the queue back into memory and sends what the window allows.
    /// Then logs the queue's changes between full and not, and counts its queued bytes
    /// against the broker-wide budget.
    pub(super) fn sync_session(&mut self, client_id: &MqttStr, now: Instant) {
        if !self.sessions.get(client_id).is_some_and(|s| s.needs_sync()) {
            return;
        }
        self.sync_session_store(client_id, now);
        self.settle_session(client_id);
    }

    pub(super) fn sync_session_store(&mut self, client_id: &MqttStr, now: Instant) {
        for round in 0.. {
            let Some(s) = self.sessions.get_mut(client_id) else {
                return;
            };
            let ops = s.take_ops();
            let refill = s.needs_refill();
            // The drop counters go to disk with the session's other changes; a drop that
            // changed nothing else (a refusal) is written by the next timer tick, so that
            // refusing costs no write of its own.
            let drops = s.stats.dropped_total();
            let mut counters = None;
            if s.persistent && drops != s.drops_stored {
                if ops.is_empty() {
                    if self.counters_dirty.len() < self.sessions.len() {
                        self.counters_dirty.insert(client_id.clone());
                    }
                } else {
                    s.drops_stored = drops;
                    counters = Some(CountersRecord::from_stats(&s.stats));
                }
            }
            if !ops.is_empty() {
                self.write_ops(client_id, ops, counters);
            }
            let Some((from, max)) = refill else {
                return;
            };
            if round == REFILL_ROUNDS_MAX {
                // Each round's messages were all dropped (access taken away): the rest of
                // the queue is read at the next timer tick, not all at once.
                if self.refill_later.len() < self.sessions.len() {
                    self.refill_later.insert(client_id.clone());
                }
                return;
            }
            let Some(entries) = self.read_queue(client_id, from, max) else {
                // The store is being reopened: the queue stays on disk, read at the
                // session's next event.
                return;
            };
            let Some(s) = self.sessions.get_mut(client_id) else {
                return;
            };
            s.refill(entries, max);
            // Read back from disk: checked again against the rules in force now.
            if let (true, Some(user)) = (self.logins.auth.has_acl(), s.identity.clone()) {
                let auth = &self.logins.auth;
                let dropped = s.drop_unreadable(|t| readable(auth, &user, client_id, t));
                self.stats.acl_denied_delivery += dropped;
            }
            s.pump(&self.limits, now);
        }
    }

    /// Writes the drop counters of the sessions whose drops changed nothing else (on the
    /// timer tick and at stop), in one batch.
    pub fn flush_counters(&mut self) {
        if self.counters_dirty.is_empty() {
            return;
        }
        if self.store.is_none() {
            self.counters_dirty.clear();
            return;
        }
        let mut records = Vec::with_capacity(self.counters_dirty.len());
        for client_id in self.counters_dirty.drain() {
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            s.drops_stored = s.stats.dropped_total();
            records.push((client_id, CountersRecord::from_stats(&s.stats)));
        }
        self.write(|b| {
            records
                .iter()
                .try_for_each(|(client_id, rec)| b.counters_put(client_id.as_str(), rec))
        });
    }

    /// The bookkeeping that follows a change of a session: one log line when its queue
    /// becomes full and one when it takes messages again, and its queued bytes counted
    /// against the broker-wide budget.
    pub(super) fn settle_session(&mut self, client_id: &MqttStr) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        s.check_queue_room(&self.limits);
        for note in s.take_queue_notes() {
            let l = &self.limits;
            match note {
                QueueNote::Full => tracing::warn!(
                    client = %client_id,
                    online = s.is_online(),
                    queue_messages_max = l.queue_messages_max,
                    queue_bytes_max = l.queue_bytes_max,
                    policy = l.queue_policy.name(),
                    "session queue full: messages for this session are {} until it has room (limits.queue_messages_max, limits.queue_bytes_max)",
                    match l.queue_policy {
                        crate::config::QueuePolicy::RejectNewest => "refused",
                        crate::config::QueuePolicy::DropOldest => "pushing out its oldest",
                    }
                ),
                QueueNote::Room { dropped } => tracing::warn!(
                    client = %client_id,
                    dropped,
                    policy = l.queue_policy.name(),
                    "session queue has room again; messages dropped while it was full: {dropped}"
                ),
            }
        }
        let held = if s.persistent { s.queued_bytes() } else { 0 };
        if held != s.budget_counted {
            self.queued_bytes = (self.queued_bytes + held).saturating_sub(s.budget_counted);
            s.budget_counted = held;
            self.budget.set(self.id, self.queued_bytes);
            self.check_budget();
        }
    }

    /// Reads the budget (every shard's share) and logs when it becomes spent or has room
    /// again, once per shard each. Deliveries read the shared flag themselves
    /// ([`Core::read_budget`]).
    pub(super) fn check_budget(&mut self) {
        let spent = self.budget.is_spent();
        self.limits.storage_budget_spent = spent;
        match (spent, self.budget_spent_since) {
            (true, None) => {
                self.budget_spent_since = Some(self.budget_refused);
                tracing::warn!(
                    shard = self.id,
                    queued_bytes_max = self.budget.max(),
                    "broker-wide budget for queued data spent (storage.queued_bytes_max): persistent sessions refuse what they would queue; MQTT 5 publishers get 0x97, MQTT 3.x publishers are disconnected and resend"
                );
            }
            (false, Some(since)) => {
                self.budget_spent_since = None;
                tracing::warn!(
                    shard = self.id,
                    refused = self.budget_refused - since,
                    "broker-wide budget for queued data has room again"
                );
            }
            _ => {}
        }
    }

    /// Takes the budget's state into the limits the sessions deliver under (one load).
    pub(super) fn read_budget(&mut self) {
        self.limits.storage_budget_spent = self.budget.is_spent();
    }

    pub(super) fn write_ops(
        &mut self,
        client_id: &MqttStr,
        ops: Vec<StoreOp>,
        counters: Option<CountersRecord>,
    ) {
        let clock = WallClock::now();
        let cid = client_id.as_str();
        self.write(|b| {
            if let Some(c) = &counters {
                b.counters_put(cid, c)?;
            }
            ops.into_iter().try_for_each(|op| match op {
                StoreOp::QueuePush { seq, delivery } => {
                    b.queue_push(cid, seq, &QueuedRecord::from_delivery(&delivery, &clock))
                }
                StoreOp::QueueDelete { seq } => b.queue_delete(cid, seq),
                StoreOp::InflightPut {
                    packet_id,
                    delivery,
                    state,
                    fresh,
                } => {
                    let rec = InflightRecord::from_inflight(
                        &crate::session::state::Inflight {
                            packet_id,
                            delivery,
                            state,
                        },
                        &clock,
                    );
                    b.inflight_put(cid, packet_id.get(), &rec, fresh)
                }
                StoreOp::InflightDelete { packet_id } => b.inflight_delete(cid, packet_id.get()),
                StoreOp::DedupPut { origin, packet_id } => {
                    b.dedup_put(cid, origin.as_str(), packet_id)
                }
                StoreOp::DedupDelete { origin, packet_id } => {
                    b.dedup_delete(cid, origin.as_str(), packet_id)
                }
            })
        });
    }

    /// `None` while the store is being reopened after a failure.
    pub(super) fn read_queue(
        &mut self,
        client_id: &MqttStr,
        from: u64,
        max: usize,
    ) -> Option<Vec<(u64, Delivery)>> {
        // What the open batch holds must be in the store before it is read.
        self.flush_writes();
        let Some(store) = &self.store else {
            return Some(Vec::new());
        };
        let clock = WallClock::now();
        match store.queue_read(client_id.as_str(), from, max) {
            Ok(recs) => Some(
                recs.into_iter()
                    .filter_map(|(seq, r)| match r.to_delivery(&clock) {
                        Ok(d) => Some((seq, d)),
                        Err(e) => {
                            tracing::warn!(client = %client_id, seq, error = %e, "skipping unreadable queued message");
                            None
                        }
                    })
                    .collect(),
            ),
            Err(StorageError::Unavailable { .. }) => None,
            Err(e) => {
                tracing::error!(client = %client_id, error = %e, "cannot read the session queue");
                Some(Vec::new())
            }
        }
    }

    /// Writes a persistent session's record (expiry, will, whether and since when offline).
    pub(super) fn write_session_record(&mut self, client_id: &MqttStr, now: Instant) {
        let (true, Some(s)) = (self.store.is_some(), self.sessions.get(client_id)) else {
            return;
        };
        if !s.persistent {
            return;
        }
        let clock = WallClock::now();
        let rec = SessionRecord {
            expiry_s: s.expiry_s,
            version: s.version.level(),
            will: s.will.as_ref().map(|w| WillRecord::from_will(w, &clock)),
            disconnected_unix_ms: (!s.is_online()).then(|| clock.unix_ms_of(now)),
            next_packet_id: 0,
            owner: s
                .owner
                .as_ref()
                .map(|user| user.as_ref().map(|u| u.as_str().to_owned())),
        };
        self.write(|b| b.put_session(client_id.as_str(), &rec));
    }

    pub(super) fn write_subscription(
        &mut self,
        client_id: &MqttStr,
        sub: Option<&Subscription>,
        filter: &str,
    ) {
        if !self.sessions.get(client_id).is_some_and(|s| s.persistent) {
            return;
        }
        self.write(|b| match sub {
            Some(sub) => b.put_subscription(
                client_id.as_str(),
                filter,
                &SubscriptionRecord::from_subscription(sub),
            ),
            None => b.delete_subscription(client_id.as_str(), filter),
        });
    }

    /// Registers `w` to be released once every write so far is durable (at once when
    /// nothing is pending or acknowledgements do not wait for the disk).
    pub(super) fn wait_durable(&mut self, w: Waiter, now: Instant) -> bool {
        if !self.replica_units.is_empty() || self.replica_gap || self.replica_barrier {
            // Changes that the replicated stream did not take yet (a failed append), or an
            // acknowledgement that depends on what the store holds (a barrier): it waits
            // for a group commit whose append is taken from now on (one already under way
            // may lack them), and that append waits until the stream is whole.
            self.note_write(Ok(()));
        }
        if !self.durability.acknowledges_committed() || !self.log.unsynced() {
            self.release(w, true, now);
            return false;
        }
        self.log.wait(w);
        true
    }

    pub(super) fn release(&mut self, w: Waiter, ok: bool, now: Instant) {
        match w {
            Waiter::Local(token) => self.on_ack(token, ok, Fate::default(), now),
            Waiter::Remote { to, token, fate } => self.send(to, Event::Ack { token, ok, fate }),
        }
    }

    /// What the committer should make durable: the store and the last write so far.
    pub fn commit_target(&mut self) -> Option<(Store, u64)> {
        self.flush_writes();
        let store = self.store.as_ref()?;
        self.log.target().map(|t| (store.clone(), t))
    }

    /// Whether the writes [`Core::commit_target`] just took hold a retained message (then
    /// a `replicated`-mode commit fsyncs too); resets.
    pub fn take_fsync_due(&mut self) -> bool {
        std::mem::take(&mut self.fsync_due)
    }

    /// Whether this shard's changes go to the replication log before acknowledgements.
    pub fn replicating(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.replica().is_some())
    }

    /// The replication log's way in, and what the batches applied so far changed (taken
    /// with [`Core::commit_target`]: the group commit replicates them with its fsync).
    /// Returns the link, the units, and whether to append even without units (a gap to
    /// report, or a barrier: an acknowledgement that needs the stream whole).
    pub fn take_replica_units(&mut self) -> Option<(ReplicaLink, Vec<Vec<u8>>, bool, bool)> {
        let link = self.cluster.as_ref()?.replica()?.clone();
        let gap = std::mem::take(&mut self.replica_gap);
        let barrier = std::mem::take(&mut self.replica_barrier);
        self.replica_units_bytes = 0;
        Some((link, std::mem::take(&mut self.replica_units), gap, barrier))
    }

    /// At the stop, after the last group commit: if this shard's store may hold a change its
    /// stream lacks (changes kept or dropped after failed appends; `commits_ok` false: the
    /// last commits failed), it says so, so that no clean-stop marker is written.
    pub fn end_replication(&mut self, commits_ok: bool) {
        self.replication_ended = true;
        if !commits_ok || !self.replica_units.is_empty() || self.replica_gap {
            self.left_behind();
        }
    }

    /// This shard's store holds, or may hold, a change its stream lacks at the stop.
    fn left_behind(&self) {
        if let Some(link) = self.cluster.as_ref().and_then(|c| c.replica()) {
            link.1.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Keeps what a batch applied to the store changed for the next group commit's append.
    /// Units pile up here while an append is slow to come back (NATS stalled, a snapshot
    /// making the stream whole); past `cluster.replication_pending_bytes_max` they are
    /// dropped, and the next append asks for a snapshot (their changes are in the store).
    pub(super) fn keep_replica_unit(&mut self, unit: Vec<u8>) {
        if unit.is_empty() {
            return;
        }
        if self.replication_ended {
            // Applied after the stop's last group commit: no append takes it any more.
            self.left_behind();
        }
        self.replica_units_bytes += unit.len();
        self.replica_units.push(unit);
        if self.replica_units_bytes as u64 > self.config().cluster.replication_pending_bytes_max {
            self.drop_replica_units("while an append was slow to come back");
        }
    }

    /// Drops the units waiting for the stream (their changes are in the store) and marks
    /// the next append `gap`: a snapshot makes the stream whole before anything more is
    /// acknowledged.
    fn drop_replica_units(&mut self, when: &str) {
        if !self.replica_gap {
            tracing::error!(
                shard = self.id,
                bytes = self.replica_units_bytes,
                "changes waiting for the replicated stream passed cluster.replication_pending_bytes_max {when}: dropped; a snapshot makes the stream whole before anything more is acknowledged"
            );
        }
        self.stats.replica_changes_dropped += self.replica_units.len() as u64;
        self.replica_units.clear();
        self.replica_units_bytes = 0;
        self.replica_gap = true;
    }

    /// The next acknowledgement made durable (`wait_durable`) writes nothing but depends on
    /// what the store holds already: with replicated sessions it waits for a group commit
    /// whose append (empty if nothing else changed) succeeds only while the stream holds
    /// everything the store does.
    pub(super) fn replica_barrier(&mut self) {
        if self.replicating() {
            self.replica_barrier = true;
        }
    }

    /// An append failed: its units go first in the next one (they are in the store, and
    /// the stream must have them, in order, before anything that depends on them is
    /// acknowledged). A fenced node drops them: its stream is not its own any more.
    pub fn replica_failed(&mut self, failed: crate::shard::api::AppendFailed) {
        if failed.fenced {
            return;
        }
        let mut units = failed.units;
        self.replica_units_bytes += units.iter().map(Vec::len).sum::<usize>();
        units.append(&mut self.replica_units);
        self.replica_units = units;
        if self.replica_units_bytes as u64 > self.config().cluster.replication_pending_bytes_max {
            self.drop_replica_units("after failed appends");
        }
    }

    /// Whether the committer waits for the disk before acknowledging (`durable`) or persists
    /// on an interval (`batched`).
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// A persist that covered every write up to `target` finished (`ok` = fsync succeeded).
    pub fn committed(&mut self, target: u64, ok: bool, now: Instant) {
        let (ok, released) = self.log.synced(target, ok);
        if !ok {
            // The store logs the failure episode; this is per persist.
            tracing::debug!(
                shard = self.id,
                "persist failed; failing the acknowledgements that waited on it"
            );
        }
        for w in released {
            self.release(w, ok, now);
        }
    }

    // ---------------------------------------------------------------- recovery
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ws: Vec<Waiter>) -> Vec<Token> {
        ws.into_iter()
            .map(|w| match w {
                Waiter::Local(t) => t,
                Waiter::Remote { token, .. } => token,
            })
            .collect()
    }

    #[test]
    fn a_persist_releases_who_waited_on_what_it_covered_in_order() {
        let mut log = DurableLog::default();
        assert_eq!(log.target(), None);
        log.note(true); // write 1
        log.wait(Waiter::Local(10));
        log.note(true); // write 2
        log.wait(Waiter::Local(20));
        assert_eq!(log.target(), Some(2));
        // A persist that started after write 1 only.
        let (ok, done) = log.synced(1, true);
        assert!(ok);
        assert_eq!(tokens(done), [10]);
        assert!(log.unsynced());
        let (ok, done) = log.synced(2, true);
        assert!(ok);
        assert_eq!(tokens(done), [20]);
        assert!(!log.unsynced());
    }

    #[test]
    fn a_failed_write_fails_the_persist_that_covers_it_and_no_later_one() {
        let mut log = DurableLog::default();
        log.note(false); // write 1 failed
        log.wait(Waiter::Local(1));
        let (ok, done) = log.synced(1, true);
        assert!(!ok, "the fsync succeeded but a write in its range did not");
        assert_eq!(tokens(done), [1]);
        log.note(true); // write 2
        log.wait(Waiter::Local(2));
        let (ok, done) = log.synced(2, true);
        assert!(ok);
        assert_eq!(tokens(done), [2]);
        // A failed fsync fails its waiters whatever the writes did.
        log.note(true);
        log.wait(Waiter::Local(3));
        assert!(!log.synced(3, false).0);
    }

    /// A batch lost while an earlier persist runs must not be forgotten by it: the waiter
    /// on write 5 fails (its batch was lost), and so does the one on write 8.
    #[test]
    fn a_second_lost_batch_does_not_hide_the_first() {
        let mut log = DurableLog::default();
        for _ in 0..5 {
            log.note(true);
        }
        log.wait(Waiter::Local(5));
        log.fail_unapplied(); // the batch of writes 1-5 could not be applied
        let target = log.target().unwrap();
        for _ in 0..3 {
            log.note(true);
        }
        log.wait(Waiter::Local(8));
        log.fail_unapplied(); // nor that of writes 6-8, while the persist of 1-5 runs
        let (ok, done) = log.synced(target, true);
        assert_eq!((ok, tokens(done)), (false, vec![5]));
        let (ok, done) = log.synced(log.target().unwrap(), true);
        assert_eq!((ok, tokens(done)), (false, vec![8]));
        // Then a batch that is applied succeeds again.
        log.note(true);
        log.wait(Waiter::Local(9));
        log.applied();
        let (ok, done) = log.synced(log.target().unwrap(), true);
        assert_eq!((ok, tokens(done)), (true, vec![9]));
    }

    /// Writes applied before a lost batch still succeed; only the lost ones fail.
    #[test]
    fn only_the_writes_of_the_lost_batch_fail() {
        let mut log = DurableLog::default();
        log.note(true);
        log.wait(Waiter::Local(1));
        log.applied();
        log.note(true);
        log.wait(Waiter::Local(2));
        log.fail_unapplied();
        let (ok, done) = log.synced(1, true);
        assert_eq!((ok, tokens(done)), (true, vec![1]));
        let (ok, done) = log.synced(2, true);
        assert_eq!((ok, tokens(done)), (false, vec![2]));
    }
}
