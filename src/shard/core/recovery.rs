//! Recovery: sessions, queues, subscriptions and retained messages read back from the store
//! at start (and sessions re-homed from another shard after a shard-count change); the
//! start barrier that waits for every peer's part of the routing index.

use super::*;

impl Core {
    /// Rebuilds the shard from its store at start: sessions (offline, with subscriptions,
    /// in-flight messages, incoming QoS 2 ids, queue extent, will and expiry timers), the
    /// routing index on every shard, and the retained messages. Sessions whose client id now
    /// belongs to another shard are sent there. Then tells every peer it is done.
    pub fn recover(&mut self, now: Instant) {
        let Some(store) = self.store.clone() else {
            self.announce_recovered();
            return;
        };
        let started = Instant::now();
        let recovered = match store.load() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(shard = self.id, error = %e, "cannot read the store; starting empty");
                self.announce_recovered();
                return;
            }
        };
        for d in &recovered.damaged {
            tracing::warn!(shard = self.id, record = %d, "damaged record skipped");
        }
        match store.replica_batch() {
            Ok(Some((shard, n))) if shard as usize == self.id => self.replica_batch = n,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(shard = self.id, error = %e, "cannot read the last replicated batch number")
            }
        }
        if !recovered.damaged.is_empty() {
            // Keys that could not be read may still be there: none is known to be absent.
            self.elide = false;
        }
        let clock = WallClock::now();
        let (mut restored, mut rehomed) = (0usize, 0usize);
        for rs in recovered.sessions {
            let owner = owner_shard(rs.client_id.as_bytes(), self.count);
            if owner == self.id {
                restored += usize::from(self.restore_session(rs, &clock, now));
                continue;
            }
            rehomed += usize::from(self.send_home(&store, rs, owner));
        }
        let retained = recovered.retained.len();
        self.restore_retained(recovered.retained, &clock);
        tracing::info!(
            shard = self.id,
            sessions = restored,
            rehomed,
            retained,
            damaged = recovered.damaged.len(),
            ms = started.elapsed().as_millis() as u64,
            "recovered"
        );
        self.announce_recovered();
    }

    /// Sends a stored session whose owner is now another shard (the shard count changed)
    /// there with its queue; it is deleted here once the owner has it on disk (see
    /// [`Completion::Rehome`]). Returns whether it was sent (a queue that cannot be read
    /// keeps the session here).
    fn send_home(
        &mut self,
        store: &Store,
        rs: crate::storage::RecoveredSession,
        owner: usize,
    ) -> bool {
        self.flush_writes();
        let queue = match store.queue_read(&rs.client_id, rs.queue_first_seq, usize::MAX) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(client = %rs.client_id, error = %e, "cannot read a queue to re-home; the session stays");
                return false;
            }
        };
        let token = self.token();
        let client_id = rs.client_id.clone();
        self.begin(token, RoundTrip::new(1, Completion::Rehome { client_id }));
        self.sink.push(
            owner,
            Event::Rehome {
                session: Box::new(Rehomed { stored: rs, queue }),
                reply: token,
            },
        );
        true
    }

    /// Applies the stored retained messages here and on every peer, versioned by when
    /// they were published (the store keeps no version: a write is versioned by its
    /// shard's clock when it is made, so this is at most the write's own version, and
    /// older than any write made after it); one whose home moved (the shard count
    /// changed) is deleted here and stored by its new home. In a cluster, a copy another
    /// node sends at start wins over this one if it was written later, and so does a
    /// deletion it remembers (see `FromCluster::Retained`).
    fn restore_retained(&mut self, retained: Vec<MessageRecord>, clock: &WallClock) {
        for m in retained {
            let Ok(msg) = m.to_message(clock) else {
                continue;
            };
            let msg = Arc::new(msg);
            // Never after now (a damaged record, or a clock that was ahead): it would hold
            // back every later write's version.
            let version = RetainVersion {
                at_ns: m
                    .created_unix_ms
                    .min(clock.unix_ms)
                    .saturating_mul(1_000_000),
                shard: self.id as u16,
            };
            // This shard's next writes are versioned after it, whatever the clock says now.
            self.retained_versions.observe(version);
            let home = owner_shard(msg.topic.as_bytes(), self.count);
            if home != self.id {
                self.write(|b| b.retained_delete(msg.topic.as_str()));
            }
            self.apply_retained_everywhere(msg, version, home != self.id);
        }
    }

    pub(super) fn announce_recovered(&mut self) {
        for p in self.peers() {
            self.sink.push(p, Event::RecoveryDone);
        }
    }

    /// Whether every peer's recovery has been applied here: only then is the routing index
    /// complete and may this shard accept connections.
    pub fn peers_recovered(&self) -> bool {
        self.recovered_peers + 1 >= self.count
    }

    /// Brings one stored session back into memory (offline) and into the routing tables.
    /// Returns false when it was already here or cannot be read.
    pub(super) fn restore_session(
        &mut self,
        rs: crate::storage::RecoveredSession,
        clock: &WallClock,
        now: Instant,
    ) -> bool {
        let Ok(client_id) = MqttStr::new(&rs.client_id) else {
            return false;
        };
        if self.sessions.contains_key(&client_id) {
            return false;
        }
        let mut s = self.session_from_store(&client_id, &rs, clock);
        s.epoch = Core::bump(&mut self.next_epoch);
        let epoch = s.epoch;
        let subs: Vec<Subscription> = s.subscriptions.values().cloned().collect();
        let will_delay = s.will.as_ref().map(|w| w.delay_s);
        let expiry_s = s.expiry_s;
        // The client has been away since it disconnected (or since the crash, if it was
        // online then): its will and expiry timers resume from that moment. (Unknown when
        // the monotonic clock does not reach back that far.)
        let away_ms = rs
            .record
            .disconnected_unix_ms
            .map_or(0, |d| clock.unix_ms_of(now).saturating_sub(d));
        s.since = now.checked_sub(Duration::from_millis(away_ms));
        self.sessions.insert(client_id.clone(), s);
        self.settle_session(&client_id);
        self.route_restored(&client_id, subs);
        let left = |total: u32| Duration::from_secs((total as u64).saturating_sub(away_ms / 1000));
        if let Some(delay) = will_delay {
            if delay < expiry_s {
                self.schedule(
                    now + left(delay),
                    TimerKind::Will {
                        client_id: client_id.clone(),
                        epoch,
                    },
                );
            }
        }
        if expiry_s != u32::MAX {
            self.schedule(now + left(expiry_s), TimerKind::Expire { client_id, epoch });
        }
        true
    }

    /// A session as the store kept it: owner, will, subscriptions, queue extent, in-flight
    /// messages, incoming QoS 2 ids, drop counters and the QoS 2 dedup keys it holds.
    fn session_from_store(
        &mut self,
        client_id: &MqttStr,
        rs: &crate::storage::RecoveredSession,
        clock: &WallClock,
    ) -> Box<Session> {
        let version = rs
            .record
            .protocol_version()
            .unwrap_or(ProtocolVersion::V3_1_1);
        let expiry_s = rs
            .record
            .expiry_s
            .min(self.cfg.sessions.session_expiry_max_s);
        let mut s = Box::new(Session::new(client_id.clone(), version, expiry_s));
        s.persistent = true;
        // Its owner, as stored (a name that is no longer a valid MQTT string: unknown).
        s.owner = match &rs.record.owner {
            None => None,
            Some(None) => Some(None),
            Some(Some(user)) => MqttStr::new(user).ok().map(Some),
        };
        // Access checks of messages queued before its client returns use its owner.
        s.identity = s.owner.clone();
        s.will = rs.record.will.as_ref().and_then(|w| w.to_will(clock).ok());
        for (filter, sr) in &rs.subscriptions {
            match sr.to_subscription(filter) {
                Ok(sub) => {
                    s.subscriptions.insert(sub);
                }
                Err(e) => tracing::warn!(client = %client_id, error = %e, "subscription skipped"),
            }
        }
        let inflight: Vec<_> = rs
            .inflight
            .iter()
            .filter_map(|(pid, ir)| ir.to_inflight(*pid, clock).ok())
            .collect();
        if inflight.len() != rs.inflight.len() {
            // A stored packet id the session does not know of: not known to be absent.
            self.elide = false;
        }
        s.restore(
            rs.queue_first_seq,
            rs.queue_next_seq,
            rs.queue_len,
            rs.queue_bytes,
            inflight,
        );
        s.incoming_qos2 = rs.incoming.iter().copied().collect();
        if let Some(c) = &rs.counters {
            c.restore_into(&mut s.stats);
            self.stats.restored_drops.add(&s.stats);
            s.drops_stored = s.stats.dropped_total();
        }
        // Keys of QoS 2 messages it may have published before the restart may be held
        // anywhere: when this session ends, every shard forgets them.
        s.qos2_published = true;
        let keys: Vec<(MqttStr, u16)> = rs
            .dedup
            .iter()
            .filter_map(|(o, pid)| MqttStr::new(o).ok().map(|o| (o, *pid)))
            .collect();
        for (origin, pid) in &keys {
            self.note_qos2_holder(origin, *pid, client_id);
        }
        s.restore_qos2_keys(keys);
        s
    }

    /// A restored session's subscriptions back in the routing tables: this shard's
    /// subscribers and the index on every peer; shared groups joined at their homes
    /// (offline; nobody waits for the answers).
    fn route_restored(&mut self, client_id: &MqttStr, subs: Vec<Subscription>) {
        let peers: Vec<usize> = self.peers().collect();
        for sub in subs {
            if sub.filter.is_shared() {
                let key: Arc<str> = Arc::from(sub.filter.as_str());
                let home = owner_shard(key.as_bytes(), self.count);
                let token = self.token(); // no one waits for this join
                self.send(
                    home,
                    Event::SharedJoin {
                        key,
                        member: SharedMember {
                            client_id: client_id.clone(),
                            shard: self.id as u16,
                            options: sub.options,
                            sub_id: sub.id,
                            online: false,
                            persistent: true,
                            identity: None,
                        },
                        reply: token,
                    },
                );
            } else {
                let entry = self.subs.entry(sub.filter.filter());
                let first = entry.is_empty();
                let had_clients = subscriptions::has_clients(entry);
                entry.push(LocalSub::Client {
                    client_id: client_id.clone(),
                    options: sub.options,
                    id: sub.id,
                });
                if first {
                    self.index_add(sub.filter.filter(), None, &peers);
                }
                if !had_clients {
                    self.announce_route(&Arc::from(sub.filter.filter()), true, None);
                }
            }
        }
    }

    /// Takes a session re-homed from shard `from`: stores it here, then answers once durable.
    pub(super) fn adopt(&mut self, from: usize, r: Rehomed, reply: Token, now: Instant) {
        self.store_adopted(&r, now);
        self.wait_durable(Waiter::answer(from, reply), now);
    }

    /// Stores a session that another shard or node sends here with its queue, in one
    /// batch, and brings it into memory (offline, routed); nothing when this shard holds
    /// that client's session already. Returns whether it is here now (durable once this
    /// shard's writes so far are).
    pub(super) fn store_adopted(&mut self, r: &Rehomed, now: Instant) -> bool {
        let cid = r.stored.client_id.clone();
        let exists = MqttStr::new(&cid).is_ok_and(|c| self.sessions.contains_key(&c));
        // This batch is committed now, after what the shard wrote before it.
        self.flush_writes();
        let mut here = exists;
        if let (Some(store), false) = (&self.store, exists) {
            let mut b = store.batch();
            let mut res = b.put_session(&cid, &r.stored.record);
            for (f, sr) in &r.stored.subscriptions {
                res = res.and_then(|()| b.put_subscription(&cid, f, sr));
            }
            for (pid, ir) in &r.stored.inflight {
                res = res.and_then(|()| b.inflight_put(&cid, *pid, ir, false));
            }
            for pid in &r.stored.incoming {
                res = res.and_then(|()| b.incoming_put(&cid, *pid));
            }
            for (origin, pid) in &r.stored.dedup {
                res = res.and_then(|()| b.dedup_put(&cid, origin, *pid));
            }
            for (seq, q) in &r.queue {
                res = res.and_then(|()| b.queue_push(&cid, *seq, q));
            }
            if let Some(c) = &r.stored.counters {
                res = res.and_then(|()| b.counters_put(&cid, c));
            }
            // With replicated sessions the adopted session goes to this node's stream too
            // (with the next group commit, before anything waiting on it is answered).
            let res = if self.replicating() {
                res.and_then(|()| b.commit_logged())
                    .map(|unit| self.keep_replica_unit(unit))
            } else {
                res.and_then(|()| b.commit())
            };
            let ok = res.is_ok();
            self.note_write(res);
            if ok {
                let clock = WallClock::now();
                here = self.restore_session(r.stored.clone(), &clock, now);
            }
        }
        here
    }

    // ---------------------------------------------------------------- connect / disconnect
}
