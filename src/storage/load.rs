//! Reading a store back at start (sessions with their subscriptions, queues, in-flight and QoS
//! 2 state; retained messages), and copying one store into another when the shard count
//! changed.

use super::*;

impl Store {
    /// Everything but the queued messages themselves, to rebuild the sessions at start.
    /// Damaged records are reported (in [`Recovered::damaged`] and the log) and skipped;
    /// orphaned keys are deleted (durable at the next `persist`). Reads every queued value
    /// once to verify it and count its bytes.
    pub fn load(&self) -> Result<Recovered, StorageError> {
        let mut rec = Recovered::default();
        let (index, damaged_clients) = self.load_sessions(&mut rec);
        let orphans = self.load_per_client(&mut rec, &index, &damaged_clients);
        self.load_retained(&mut rec);
        if !orphans.is_empty() {
            rec.orphans_removed = orphans.len() as u64;
            self.delete_orphans(orphans)?;
        }
        Ok(rec)
    }

    /// Reads the session records into `rec.sessions`; gives each one's key with its index
    /// there, and the keys of the damaged ones.
    fn load_sessions(&self, rec: &mut Recovered) -> (HashMap<Vec<u8>, usize>, HashSet<Vec<u8>>) {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut damaged_clients: HashSet<Vec<u8>> = HashSet::new();
        for item in self.scan(Space::Sessions) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(line) => {
                    rec.damaged.push(line);
                    break;
                }
            };
            let Some((_, id, _)) = split_client_key(&k).filter(|(_, _, r)| r.is_empty()) else {
                damage(&mut rec.damaged, Space::Sessions, &k, "malformed key");
                continue;
            };
            match SessionRecord::from_value(&v) {
                Ok(r) => {
                    index.insert(k.to_vec(), rec.sessions.len());
                    rec.sessions.push(RecoveredSession::new(id.to_owned(), r));
                }
                Err(reason) => {
                    damage(&mut rec.damaged, Space::Sessions, &k, &reason);
                    damaged_clients.insert(k.to_vec());
                }
            }
        }
        (index, damaged_clients)
    }

    /// Reads the per-client keyspaces into the sessions they belong to (by `index`); gives
    /// the keys of clients without a session record (and not damaged), the orphans.
    fn load_per_client(
        &self,
        rec: &mut Recovered,
        index: &HashMap<Vec<u8>, usize>,
        damaged_clients: &HashSet<Vec<u8>>,
    ) -> Vec<(Space, Vec<u8>)> {
        // Every known client prefix, in key order: where a per-client scan resumes after a
        // read error.
        let mut known: Vec<Vec<u8>> = index.keys().chain(damaged_clients).cloned().collect();
        known.sort_unstable();
        let mut orphans: Vec<(Space, Vec<u8>)> = Vec::new();
        for &space in &CLIENT_SPACES[1..] {
            let sessions = &mut rec.sessions;
            let damaged = &mut rec.damaged;
            let read_errors = self.scan_per_client(space, &known, |k, v| {
                let Some((prefix, _, rest)) = split_client_key(k) else {
                    damage(damaged, space, k, "malformed key");
                    return;
                };
                let Some(&i) = index.get(prefix) else {
                    if !damaged_clients.contains(prefix) {
                        orphans.push((space, k.to_vec()));
                    }
                    return;
                };
                if let Err(reason) = load_client_value(&mut sessions[i], space, rest, v) {
                    damage(damaged, space, k, &reason);
                }
            });
            rec.damaged.extend(read_errors);
        }
        orphans
    }

    /// Reads the retained messages into `rec.retained`.
    fn load_retained(&self, rec: &mut Recovered) {
        for item in self.scan(Space::Retained) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(line) => {
                    rec.damaged.push(line);
                    break;
                }
            };
            match MessageRecord::from_value(&v) {
                Ok(m) if m.topic.as_bytes() == &*k => rec.retained.push(m),
                Ok(m) => damage(
                    &mut rec.damaged,
                    Space::Retained,
                    &k,
                    &format!("record of topic {:?} under another key", m.topic),
                ),
                Err(reason) => damage(&mut rec.damaged, Space::Retained, &k, &reason),
            }
        }
    }

    /// Deletes the keys of clients without a session record, in one batch.
    fn delete_orphans(&self, orphans: Vec<(Space, Vec<u8>)>) -> Result<(), StorageError> {
        tracing::info!(
            store = %self.inner.dir.display(),
            keys = orphans.len(),
            "deleting keys of clients without a session record"
        );
        let engine = self.engine()?;
        let mut batch = engine.db.batch();
        for (space, key) in orphans {
            batch.remove(engine.ks(space), key);
        }
        batch
            .commit()
            .map_err(StorageError::engine("delete orphans"))?;
        Ok(())
    }

    /// Copies everything this store holds into `targets` (the stores of the shards that
    /// now own it), for a store left behind when the shard count shrank: every session with
    /// its subscriptions, messages in flight, incoming QoS 2 ids, dedup keys and whole queue
    /// (sequence numbers kept) into `targets[session_home(client_id)]`, every retained
    /// message into `targets[retained_home(topic)]`. Both functions must return an index
    /// into `targets`.
    ///
    /// A target that already holds the client id keeps its own session (logged); a target
    /// that holds a retained message of the topic keeps it unless this store's copy is
    /// newer. Each session is written as one atomic batch, session record included, so a
    /// target holds either all of a copied session or none of it; copying again after a
    /// crash is harmless. Every target written to is persisted (fsync) before this returns
    /// `Ok`. This store is only read, apart from [`Store::load`] deleting its orphaned keys.
    pub fn copy_into(
        &self,
        targets: &[Store],
        session_home: impl Fn(&str) -> usize,
        retained_home: impl Fn(&str) -> usize,
    ) -> Result<Copied, StorageError> {
        let recovered = self.load()?;
        let mut out = Copied {
            damaged: recovered.damaged,
            ..Copied::default()
        };
        let mut written = vec![false; targets.len()];
        for rs in recovered.sessions {
            let home = session_home(rs.client_id.as_str());
            if self.copy_session(&targets[home], &rs, &mut out)? {
                written[home] = true;
            }
        }
        let mut retained: Vec<StoreBatch> = targets.iter().map(Store::batch).collect();
        for m in recovered.retained {
            let home = retained_home(&m.topic);
            self.copy_retained(&targets[home], &mut retained[home], &m, &mut out)?;
        }
        for (i, b) in retained.into_iter().enumerate() {
            if !b.is_empty() {
                b.commit()?;
                written[i] = true;
            }
        }
        for (target, _) in targets.iter().zip(&written).filter(|(_, w)| **w) {
            target.persist()?;
        }
        Ok(out)
    }

    /// Copies one session, with its queue, into `target` as one batch, unless the target
    /// holds that client's session already (its copy wins); `true` when it wrote.
    fn copy_session(
        &self,
        target: &Store,
        rs: &RecoveredSession,
        out: &mut Copied,
    ) -> Result<bool, StorageError> {
        let cid = rs.client_id.as_str();
        let key = client_prefix(cid)?;
        if target
            .ks(Space::Sessions)?
            .contains_key(&key)
            .map_err(StorageError::engine("read session"))?
        {
            tracing::info!(
                from = %self.inner.dir.display(),
                to = %target.inner.dir.display(),
                client = %cid,
                "the target store already holds this client's session; its copy wins"
            );
            out.sessions_kept += 1;
            return Ok(false);
        }
        let queue = self.queue_read(cid, rs.queue_first_seq, usize::MAX)?;
        let mut b = target.batch();
        // The target holds no session of this client, so any key of it there is an
        // orphan: clear them, so that the copy is exact.
        b.delete_session(cid)?;
        for (filter, sr) in &rs.subscriptions {
            b.put_subscription(cid, filter, sr)?;
        }
        for (pid, ir) in &rs.inflight {
            b.inflight_put(cid, *pid, ir, false)?;
        }
        for pid in &rs.incoming {
            b.incoming_put(cid, *pid)?;
        }
        for (origin, pid) in &rs.dedup {
            b.dedup_put(cid, origin, *pid)?;
        }
        for (seq, q) in &queue {
            b.queue_push(cid, *seq, q)?;
        }
        if let Some(c) = &rs.counters {
            b.counters_put(cid, c)?;
        }
        b.put_session(cid, &rs.record)?;
        b.commit()?;
        out.sessions += 1;
        out.queued += queue.len() as u64;
        Ok(true)
    }

    /// Adds a retained message to `batch` (for `target`) unless the target holds one of
    /// the topic at least as new.
    fn copy_retained(
        &self,
        target: &Store,
        batch: &mut StoreBatch,
        m: &MessageRecord,
        out: &mut Copied,
    ) -> Result<(), StorageError> {
        let held = target
            .ks(Space::Retained)?
            .get(keys::retained_key(&m.topic)?)
            .map_err(StorageError::engine("read retained"))?;
        // A damaged record in the target counts as older than an intact copy.
        let newer = held.is_none_or(|v| {
            MessageRecord::from_value(&v).map_or(true, |t| m.created_unix_ms > t.created_unix_ms)
        });
        if newer {
            batch.retained_put(&m.topic, m)?;
            out.retained += 1;
        } else {
            tracing::info!(
                from = %self.inner.dir.display(),
                to = %target.inner.dir.display(),
                topic = %m.topic,
                "the target store holds a retained message of this topic at least as new; it wins"
            );
            out.retained_kept += 1;
        }
        Ok(())
    }

    /// Every key and value of a keyspace. An engine read error (a table block failing the
    /// engine's own checksum) is logged and ends the scan of that keyspace: it comes out as
    /// one `Err` with the line for [`Recovered::damaged`].
    pub(super) fn scan(
        &self,
        space: Space,
    ) -> impl Iterator<Item = Result<(fjall::UserKey, fjall::UserValue), String>> + '_ {
        let mut iter = self.ks(space).map(|ks| ks.iter());
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = match &mut iter {
                Ok(iter) => iter.next()?.into_inner(),
                Err(e) => {
                    failed = true;
                    let msg = format!("{}: cannot read: {e}", space.name());
                    tracing::warn!(store = %self.inner.dir.display(), "{msg}");
                    return Some(Err(msg));
                }
            };
            Some(next.map_err(|e| {
                failed = true;
                let msg = format!(
                    "{}: read error, rest of keyspace skipped: {e}",
                    space.name()
                );
                tracing::warn!(store = %self.inner.dir.display(), "{msg}");
                msg
            }))
        })
    }

    /// Every key and value of a per-client keyspace, given to `f` in key order. When the
    /// engine cannot read a part of the keyspace (a table block failing its own checksum),
    /// the scan resumes at the next known client prefix past the failure, so one bad block
    /// costs the clients whose keys it holds, not the rest of the keyspace. Returns one
    /// line per read error.
    pub(super) fn scan_per_client(
        &self,
        space: Space,
        known_prefixes: &[Vec<u8>],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Vec<String> {
        let mut errors = Vec::new();
        let mut start: Vec<u8> = Vec::new();
        loop {
            let mut last: Option<fjall::UserKey> = None;
            let mut failure = None;
            let ks = match self.ks(space) {
                Ok(ks) => ks,
                Err(e) => {
                    let line = format!("{}: cannot read: {e}", space.name());
                    tracing::warn!(store = %self.inner.dir.display(), "{line}");
                    errors.push(line);
                    return errors;
                }
            };
            for item in ks.range(start.as_slice()..) {
                match item.into_inner() {
                    Ok((k, v)) => {
                        f(&k, &v);
                        last = Some(k);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(e) = failure else {
                return errors;
            };
            let pos: &[u8] = last.as_deref().unwrap_or(&start);
            let next = known_prefixes
                .iter()
                .find(|p| p.as_slice() > pos && !pos.starts_with(p));
            let line = format!(
                "{}/{}: read error after this key, skipped to {}: {e}",
                space.name(),
                hex(pos),
                next.map_or_else(|| "the end".to_owned(), |p| hex(p))
            );
            tracing::warn!(store = %self.inner.dir.display(), "{line}");
            errors.push(line);
            match next {
                Some(p) => start = p.clone(),
                None => return errors,
            }
        }
    }
}

/// Adds one per-client record (of `space`, key suffix `rest`) to its session.
pub(super) fn load_client_value(
    s: &mut RecoveredSession,
    space: Space,
    rest: &[u8],
    v: &[u8],
) -> Result<(), String> {
    match space {
        Space::Subscriptions => match std::str::from_utf8(rest) {
            Ok(filter) => SubscriptionRecord::from_value(v)
                .map(|r| s.subscriptions.push((filter.to_owned(), r))),
            Err(_) => Err("malformed key".to_owned()),
        },
        Space::Queue => match seq_of(rest) {
            Some(seq) => {
                // The bounds cover damaged entries too, so that new sequence numbers never
                // land below a stored key.
                if s.queue_next_seq == 0 {
                    s.queue_first_seq = seq;
                }
                s.queue_next_seq = seq.saturating_add(1);
                queued_cost(v).map(|cost| {
                    s.queue_len += 1;
                    s.queue_bytes += cost;
                })
            }
            None => Err("malformed key".to_owned()),
        },
        Space::Inflight => match packet_id_of(rest) {
            Some(id) => InflightRecord::from_value(v).map(|r| s.inflight.push((id, r))),
            None => Err("malformed key".to_owned()),
        },
        Space::Counters if rest.is_empty() => {
            CountersRecord::from_value(v).map(|r| s.counters = Some(r))
        }
        Space::Counters => Err("malformed key".to_owned()),
        Space::Dedup => match dedup_of(rest) {
            Some((origin, id)) => {
                unframe(Kind::Dedup, v).map(|_| s.dedup.push((origin.to_owned(), id)))
            }
            None => Err("malformed key".to_owned()),
        },
        _ => match packet_id_of(rest) {
            Some(id) => unframe(Kind::Incoming, v).map(|_| s.incoming.push(id)),
            None => Err("malformed key".to_owned()),
        },
    }
}
