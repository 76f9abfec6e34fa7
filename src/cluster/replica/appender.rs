//! The appender: the only writer of this node's stream. Rounds of the shards' units, the
//! fence check on every append, snapshots and the trim after them.

use super::*;

/// Why an append failed.
#[derive(Debug)]
enum AppendError {
    /// Another node fenced this one (or wrote to its stream).
    Fenced,
    Failed(String),
}

/// The appender: the only writer of this node's stream.
pub(in crate::cluster) struct Appender {
    r: Replica,
    me: String,
    names: Names,
    last_seq: u64,
    fenced: bool,
    incarnation: u64,
    counter: u64,
    since_snapshot: u64,
    snapshot_log_bytes: u64,
    /// A snapshot is due (a failed append, or the log grew past its bound).
    snapshot_due: bool,
    /// A shard dropped changes the stream lacks (`Append::gap`): every append fails
    /// until a snapshot has put them in (their own changes are in the store: the
    /// snapshot takes them too).
    gap: bool,
    /// Whether the stream holds everything the stores do: not before the first snapshot
    /// after a start or an unfence (a group commit may have reached only the store), nor
    /// with a gap. An append without units (a barrier) succeeds only when it does.
    whole: bool,
    stores: Arc<OnceLock<Vec<Store>>>,
    handle: crate::cluster::ClusterHandle,
    /// When it found itself fenced: it appends again only once its lease has been renewed
    /// since (a fence means its lease had expired: that renewal is a new lease's, and
    /// the slot table it holds then is etcd's, not the one it had before a freeze).
    fenced_since: Instant,
    /// An append failed (or changes were dropped) since the last snapshot: a shard may
    /// hold, in its store, changes the stream lacks, until a snapshot reads them (no
    /// clean-stop marker meanwhile, whatever later rounds do).
    tainted: bool,
    /// `storage.durability = "replicated"`: the data directory whose marker says up to
    /// which sequence the stores durably hold the log (`replica/clean.rs`); moved forward,
    /// after an fsync of every store, before each snapshot (which trims the log before it).
    ahead: Option<std::path::PathBuf>,
    /// When this node's stream was made (see [`super::clean::Marker::created`]).
    created: i128,
}

impl Appender {
    /// `owns_slots`: whether this node owns slots now; without, its stream holds nothing
    /// it will serve (a fail-over rebuilt its sessions elsewhere) and is emptied.
    /// `clean`: the clean-stop marker's sequence (see `clean.rs`): if the stream still ends
    /// there, it holds what the stores do and no start snapshot is needed. `ahead`: see
    /// [`Appender::ahead`](Appender).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        r: Replica,
        me: &str,
        owns_slots: bool,
        clean: Option<super::clean::Marker>,
        snapshot_log_bytes: u64,
        stores: Arc<OnceLock<Vec<Store>>>,
        handle: crate::cluster::ClusterHandle,
        ahead: Option<std::path::PathBuf>,
    ) -> Result<Appender, String> {
        let (last_seq, created) = r.stream_end(me, !owns_slots).await?;
        // Stopped in order with the stream holding everything, and nobody wrote to it since
        // (a fence would have moved its end): the stores and the stream agree.
        let names = r.names(me);
        let agree = owns_slots
            && clean.as_ref().is_some_and(|m| {
                m.last_seq == last_seq && m.stream == names.stream && m.same_stream_made(created)
            });
        if agree {
            tracing::info!(
                last_seq,
                "the replicated stream holds what the stores do (a clean stop): no start snapshot"
            );
        } else if owns_slots && clean.is_some() {
            tracing::info!(
                last_seq,
                marker = clean.as_ref().map(|m| m.last_seq),
                "the replicated stream moved since the clean stop: a start snapshot first"
            );
        }
        let mut a = Appender {
            r,
            me: me.to_string(),
            names,
            last_seq,
            fenced: false,
            incarnation: now_ms(),
            counter: 0,
            since_snapshot: 0,
            snapshot_log_bytes,
            // The store and the stream may differ by a group commit that reached only one
            // of them before the last stop: a snapshot makes the stream whole again.
            snapshot_due: owns_slots && !agree,
            gap: false,
            whole: !owns_slots || agree,
            stores,
            handle,
            fenced_since: Instant::now(),
            tainted: false,
            ahead,
            created,
        };
        if last_seq == 0 {
            // An empty stream takes any append whatever its expected sequence says (0
            // means "no check"): one marker first, so that a fence is always seen.
            let log = a.names.log.clone();
            a.publish(&log, "init", Vec::new(), &[])
                .await
                .map_err(|e| format!("JetStream stream {}: {e:?}", a.names.stream))?;
        }
        a.show(|v| {
            v.last_seq = a.last_seq;
            v.stream_created = Some(created);
        });
        Ok(a)
    }

    /// This node's stream.
    pub fn stream_name(&self) -> String {
        self.names.stream.clone()
    }

    /// The last sequence of this node's stream, as the appender knows it.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// `replicated` mode, before a snapshot trims the log up to `start`: every store
    /// fsynced (each holds every unit up to `start`: a shard applies a batch before it
    /// sends its units), then the marker moved to `start`, so that a restart that lost
    /// unsynced writes finds the log it needs.
    async fn mark_stores_at(&self, stores: &[Store], start: u64) -> Result<(), String> {
        let Some(dir) = self.ahead.clone() else {
            return Ok(());
        };
        let stores = stores.to_vec();
        let marker = super::clean::Marker {
            stream: self.names.stream.clone(),
            last_seq: start,
            shards: stores.len(),
            created: None,
        };
        tokio::task::spawn_blocking(move || {
            for s in &stores {
                s.persist().map_err(|e| format!("fsync a store: {e}"))?;
            }
            super::clean::write_ahead(&dir, &marker).map_err(|e| {
                format!(
                    "write {}: {e}",
                    dir.join(super::clean::AHEAD_FILE).display()
                )
            })
        })
        .await
        .map_err(|e| format!("marker writer: {e}"))?
    }

    fn show(&self, f: impl FnOnce(&mut ReplicaView)) {
        f(&mut self.r.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Appends one message after the last one this node knows of; retried within
    /// `cluster.replication_timeout_ms` (the same message id: stored once).
    async fn publish(
        &mut self,
        subject: &str,
        kind: &str,
        body: Vec<u8>,
        extra: &[(&'static str, String)],
    ) -> Result<u64, AppendError> {
        self.counter += 1;
        let mut h = HeaderMap::new();
        h.insert(KIND, kind);
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}-{}-{}", self.me, self.incarnation, self.counter).as_str(),
        );
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            self.last_seq.to_string().as_str(),
        );
        for (k, v) in extra {
            h.insert(*k, v.as_str());
        }
        let body = Bytes::from(body);
        let deadline = Instant::now() + self.r.timeout;
        loop {
            let attempt = async {
                self.r
                    .js
                    .publish_with_headers(subject.to_string(), h.clone(), body.clone())
                    .await?
                    .await
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(ack)) => {
                    self.last_seq = ack.sequence;
                    return Ok(ack.sequence);
                }
                Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::Fenced)
                }
                Ok(Err(e)) if Instant::now() + RETRY < deadline => {
                    tracing::debug!(error = %e, "append to the replicated stream failed; trying again");
                    tokio::time::sleep(RETRY).await;
                }
                Ok(Err(e)) => return Err(AppendError::Failed(e.to_string())),
                Err(_) => {
                    return Err(AppendError::Failed(format!(
                        "no answer within {:?}",
                        self.r.timeout
                    )))
                }
            }
        }
    }

    /// Appends one round: the units of the group commits that arrived together, in as
    /// few messages as the servers take (each part names the round; all but the last say
    /// there is more).
    async fn round(&mut self, units: &[&[u8]]) -> Result<(), AppendError> {
        let mut buf = Vec::with_capacity(units.iter().map(|u| u.len() + 4).sum());
        for u in units {
            buf.extend_from_slice(&(u.len() as u32).to_le_bytes());
            buf.extend_from_slice(u);
        }
        self.since_snapshot += buf.len() as u64;
        let round = format!("{}-{}", self.incarnation, self.counter + 1);
        let log = self.names.log.clone();
        self.publish_parts(&log, "log", &buf, (ROUND, round))
            .await
            .map(|_| ())
    }

    /// Appends `buf` in as few messages as the servers take, each naming `tag` (all but
    /// the last say there is more: a reader joins them). Returns the first message's
    /// sequence and the number of messages.
    async fn publish_parts(
        &mut self,
        subject: &str,
        kind: &str,
        buf: &[u8],
        tag: (&'static str, String),
    ) -> Result<(u64, u64), AppendError> {
        let part_max = self.r.part_max();
        let parts: Vec<&[u8]> = buf.chunks(part_max).collect();
        let n = parts.len();
        let mut first = 0;
        for (i, part) in parts.into_iter().enumerate() {
            let mut extra = vec![tag.clone()];
            if i + 1 < n {
                extra.push((MORE, "1".to_string()));
            }
            let seq = self.publish(subject, kind, part.to_vec(), &extra).await?;
            if first == 0 {
                first = seq;
            }
        }
        Ok((first, n as u64))
    }

    /// Appends one round of `waiting` and answers each append (a failed one gets its
    /// units back, to be sent again).
    async fn serve(&mut self, waiting: &mut Vec<Append>) -> Result<(), AppendError> {
        if waiting.iter().any(|a| a.gap) {
            self.gap = true;
            self.snapshot_due = true;
        }
        if self.gap && !self.fenced {
            self.note_clean(false);
            for a in waiting.drain(..) {
                let _ = a.reply.send(Err(AppendFailed {
                    why: "the replicated stream lacks changes dropped after failed appends; a snapshot is being written".into(),
                    fenced: false,
                    // In the store: the snapshot takes them.
                    units: Vec::new(),
                }));
            }
            return Err(AppendError::Failed("waiting for a snapshot".into()));
        }
        let units: Vec<&[u8]> = waiting
            .iter()
            .flat_map(|a| a.units.iter().map(Vec::as_slice))
            .collect();
        let r = if self.fenced {
            Err(AppendError::Fenced)
        } else if units.is_empty() {
            // Barriers only: nothing to write.
            Ok(())
        } else {
            match self.round(&units).await {
                // Another writer, or this node's own earlier append that was stored after
                // all: only a fence after its last append makes it fenced.
                Err(AppendError::Fenced) => match self.fenced_since_last().await {
                    Ok(false) => Err(AppendError::Failed(
                        "the stream moved on without this append (an earlier try stored late)"
                            .into(),
                    )),
                    Ok(true) => Err(AppendError::Fenced),
                    Err(e) => Err(AppendError::Failed(e)),
                },
                r => r,
            }
        };
        // Noted before the answers: once the shards have them, a stop may read it.
        self.note_clean(r.is_ok());
        // The answers first: the checks after a failure below may wait for NATS.
        for a in waiting.drain(..) {
            let answer = match &r {
                Ok(()) if a.units.is_empty() && !self.whole => Err(AppendFailed {
                    why: "the replicated stream is being made whole (a snapshot)".into(),
                    fenced: false,
                    units: Vec::new(),
                }),
                Ok(()) => Ok(()),
                Err(e) => Err(AppendFailed {
                    why: match e {
                        AppendError::Fenced => "this node was failed over (fenced)".into(),
                        AppendError::Failed(e) => e.clone(),
                    },
                    fenced: matches!(e, AppendError::Fenced),
                    units: a.units,
                }),
            };
            let _ = a.reply.send(answer);
        }
        match &r {
            Ok(()) => {}
            Err(AppendError::Fenced) => self.mark_fenced(),
            Err(AppendError::Failed(e)) => {
                tracing::warn!(error = %e, "append to the replicated stream failed: its acknowledgements fail, and its changes go again with the next");
                // The next append must know where the stream ends now (the failed one may
                // have been stored after all: its changes then go twice, harmlessly), but
                // a fence written meanwhile must not be taken for a new starting point.
                // Bounded as an append is: NATS may be the reason it failed.
                let me = self.me.clone();
                let check = async {
                    match self.fenced_since_last().await {
                        Ok(false) => self.r.last_seq(&me).await.map(Some),
                        Ok(true) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match tokio::time::timeout(self.r.timeout, check)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                {
                    Ok(Some(seq)) => self.last_seq = seq,
                    Ok(None) => self.mark_fenced(),
                    // Not known now: the next append says (its expected sequence).
                    Err(_) => {}
                }
            }
        }
        r
    }

    /// Serves the shards' appends until they stop: whatever arrived while the last round
    /// was out goes in the next, and a snapshot is written when one is due.
    pub async fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Append>) {
        let mut waiting: Vec<Append> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if waiting.is_empty() {
                tokio::select! {
                    a = rx.recv() => match a {
                        Some(a) => waiting.push(a),
                        None => return,
                    },
                    _ = tick.tick() => {}
                }
            }
            while let Ok(a) = rx.try_recv() {
                waiting.push(a);
            }
            if self.fenced {
                self.unfence().await;
            }
            if waiting.iter().any(|a| a.gap) {
                self.gap = true;
                self.whole = false;
                self.note_clean(false);
            }
            if !self.fenced && !self.whole && self.stores.get().is_none() {
                // No append comes before the stores are open; none is served before.
                let why = "the stores are not open yet".to_string();
                self.fail_all(&mut waiting, &why);
            } else if !self.fenced && !self.whole {
                // The stream lacks what the stores hold (a start, an unfence, dropped
                // changes): the appends wait for the snapshot that makes it whole (an
                // acknowledgement may depend on what it lacks), and fail if it fails.
                match self.snapshot(&mut rx, &mut waiting, false).await {
                    // Every append waiting here was sent after its shard applied its changes
                    // to the store, dropped ones included: the snapshot, read after, holds
                    // them, so they are answered (their units, if any, apply again
                    // harmlessly) rather than failed.
                    Ok(()) => waiting.iter_mut().for_each(|a| a.gap = false),
                    Err(e) => {
                        tracing::warn!(error = %e, "snapshot of the replicated sessions failed; the appends waiting for it fail, and it is tried again");
                        self.fail_all(&mut waiting, &e);
                    }
                }
            }
            if !waiting.is_empty() {
                let started = Instant::now();
                let n = waiting.len() as u64;
                self.show(|v| v.lag_appends = n);
                let failed = self.serve(&mut waiting).await.is_err();
                let (since, last) = (self.since_snapshot, self.last_seq);
                let fenced = self.fenced;
                self.show(|v| {
                    v.appends_total += n;
                    if failed {
                        v.append_failures_total += n;
                    }
                    v.lag_appends = 0;
                    v.lag_ms = started.elapsed().as_millis() as u64;
                    v.last_seq = last;
                    v.log_bytes_since_snapshot = since;
                    v.fenced = fenced;
                });
            }
            if !self.fenced
                && self.whole
                && (self.snapshot_due || self.since_snapshot >= self.snapshot_log_bytes)
            {
                if let Err(e) = self.snapshot(&mut rx, &mut waiting, true).await {
                    tracing::warn!(error = %e, "snapshot of the replicated sessions failed; tried again later");
                }
            }
        }
    }

    /// Fails every waiting append: their units go back to their shards (in the store, not
    /// surely in the stream), or are dropped with a gap (the next snapshot takes them).
    fn fail_all(&mut self, waiting: &mut Vec<Append>, why: &str) {
        self.note_clean(false);
        let n = waiting.len() as u64;
        for a in waiting.drain(..) {
            let _ = a.reply.send(Err(AppendFailed {
                why: format!("the replicated stream is not whole yet: {why}"),
                fenced: false,
                units: if self.gap { Vec::new() } else { a.units },
            }));
        }
        self.show(|v| {
            v.appends_total += n;
            v.append_failures_total += n;
        });
    }

    /// Another node fenced this one's stream: every append fails until the lease has been
    /// renewed since the first time this was seen (`unfence`).
    fn mark_fenced(&mut self) {
        if !self.fenced {
            tracing::error!(stream = %self.names.stream, "this node's replicated stream was fenced by another node: acknowledgements that need it fail until its lease is renewed");
            self.fenced = true;
            self.fenced_since = Instant::now();
            self.show(|v| v.fenced = true);
        }
        self.note_clean(false);
    }

    /// Notes whether the stream holds everything the stores do after the last round (`ok`:
    /// it succeeded), for the clean-stop marker.
    fn note_clean(&mut self, ok: bool) {
        self.tainted |= !ok;
        let clean =
            (!self.tainted && self.whole && !self.gap && !self.fenced).then_some(self.last_seq);
        self.show(|v| v.clean_seq = clean);
    }

    /// Where the stream ends now, or that another node fenced it: read before a snapshot
    /// (the last append may have failed without this node knowing where the stream ended).
    async fn resync(&mut self) -> Result<(), String> {
        if self.fenced_since_last().await? {
            self.mark_fenced();
            return Err("fenced".into());
        }
        let me = self.me.clone();
        self.last_seq = self.r.last_seq(&me).await?;
        Ok(())
    }

    /// Whether a fence was written into this node's stream after its last append.
    async fn fenced_since_last(&self) -> Result<bool, String> {
        let stream = self
            .r
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| err("stream", e))?;
        Ok(last_of(&stream, &self.names.fence)
            .await?
            .is_some_and(|m| m.sequence > self.last_seq))
    }

    /// A fenced node whose lease was renewed since: if it owns no slot, whatever its
    /// stream holds was rebuilt elsewhere and is emptied; if it still owns slots (the
    /// fail-over that fenced it did not take them), it goes on after the fence, with a
    /// snapshot first (appends failed meanwhile: the stream lacks changes its store has).
    async fn unfence(&mut self) {
        let (renewed, owned) = {
            let st = self.handle.lock();
            let owned = st
                .slots
                .counts()
                .get(self.me.as_str())
                .copied()
                .unwrap_or(0);
            let renewed = st.state == crate::cluster::SelfState::Up
                && st.renewed.is_some_and(|t| t > self.fenced_since);
            (renewed, owned)
        };
        if !renewed {
            return;
        }
        let me = self.me.clone();
        // The stream may have been made again meanwhile (reading it makes it if it is
        // gone): the clean-stop marker must name the one it is now.
        match self.r.stream_end(&me, owned == 0).await {
            Ok((seq, created)) => {
                self.created = created;
                self.show(|v| v.stream_created = Some(created));
                self.last_seq = seq;
                self.fenced = false;
                self.snapshot_due = owned > 0;
                // An emptied stream lacks nothing this node will serve.
                self.gap &= owned > 0;
                self.whole = owned == 0;
                self.since_snapshot = 0;
                tracing::warn!(
                    owned,
                    "replicating again after this node rejoined (its stream was fenced)"
                );
                self.show(|v| v.fenced = false);
            }
            Err(e) => tracing::warn!(error = %e, "cannot resume replicating yet"),
        }
    }

    /// Writes a snapshot of every shard's store, then trims what it makes unneeded.
    /// Appends that arrive meanwhile wait in `waiting` (they go in the next round).
    async fn snapshot(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Append>,
        waiting: &mut Vec<Append>,
        interleave: bool,
    ) -> Result<(), String> {
        let Some(stores) = self.stores.get().cloned() else {
            return if self.whole {
                Ok(())
            } else {
                Err("the stores are not open yet".into())
            };
        };
        self.resync().await?;
        let start = self.last_seq;
        // Before anything of the log is trimmed (and before the `done` record that says
        // where the trim goes).
        self.mark_stores_at(&stores, start).await?;
        let id = now_ms();
        // The stores are read on a blocking thread, a message's worth at a time.
        let (tx, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reader = tokio::task::spawn_blocking(move || {
            let mut records = 0;
            let mut msg = Vec::new();
            for store in &stores {
                let mut emit = |unit: Vec<u8>| {
                    msg.extend_from_slice(&(unit.len() as u32).to_le_bytes());
                    msg.extend_from_slice(&unit);
                    if msg.len() >= SNAP_UNIT_BYTES {
                        tx.blocking_send(std::mem::take(&mut msg))
                            .map_err(|_| "snapshot abandoned".to_string())?;
                    }
                    Ok(())
                };
                records += store.snapshot_units(SNAP_UNIT_BYTES / 2, &mut emit)?;
            }
            if !msg.is_empty() {
                tx.blocking_send(msg)
                    .map_err(|_| "snapshot abandoned".to_string())?;
            }
            Ok::<u64, String>(records)
        });
        let mut first = 0;
        let mut messages = 0;
        let snap = self.names.snap.clone();
        while let Some(body) = chunks.recv().await {
            // A body past the servers' max_payload (a record near the packet limit) goes
            // in parts.
            let (seq, n) = self
                .publish_parts(&snap, "snap", &body, (SNAP, id.to_string()))
                .await
                .map_err(|e| format!("{e:?}"))?;
            if first == 0 {
                first = seq;
            }
            messages += n;
            // Group commits that arrived meanwhile go out between the snapshot's messages
            // (after its start: a rebuild replays them after it), unless the snapshot
            // makes the stream whole: then nothing is acknowledged before its end.
            if interleave {
                while let Ok(a) = rx.try_recv() {
                    waiting.push(a);
                }
                if waiting.iter().any(|a| a.gap) {
                    return Err(
                        "changes were dropped: a snapshot that makes the stream whole comes next"
                            .into(),
                    );
                }
                if !waiting.is_empty() {
                    self.serve(waiting).await.map_err(|e| format!("{e:?}"))?;
                }
            }
        }
        let records = reader
            .await
            .map_err(|e| format!("snapshot reader: {e}"))??;
        let done = SnapshotDone {
            id,
            start,
            first,
            messages,
            records,
            at_ms: now_ms(),
        };
        let body = serde_json::to_vec(&done).map_err(|e| e.to_string())?;
        let done_subject = self.names.done.clone();
        self.publish(&done_subject, "done", body, &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        // Trim: the log up to the snapshot's start, the older snapshots and records.
        let stream = self
            .r
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| err("stream", e))?;
        let purge =
            |subject: &str, below: u64| stream.purge().filter(subject.to_string()).sequence(below);
        purge(&self.names.log, start + 1)
            .await
            .map_err(|e| err("trim the log", e))?;
        if first > 0 {
            purge(&self.names.snap, first)
                .await
                .map_err(|e| err("trim old snapshots", e))?;
        }
        stream
            .purge()
            .filter(self.names.done.clone())
            .keep(1)
            .await
            .map_err(|e| err("trim old snapshot records", e))?;
        self.since_snapshot = 0;
        self.snapshot_due = false;
        self.whole = true;
        if self.gap {
            self.gap = false;
            tracing::warn!(
                "the replicated stream is whole again (a snapshot took the dropped changes)"
            );
        }
        // Read after every append that failed before it: their changes are in it.
        self.tainted = false;
        self.note_clean(true);
        tracing::info!(
            records,
            messages,
            start,
            "wrote a snapshot of the replicated sessions and trimmed the log before it"
        );
        self.show(|v| {
            v.snapshots_total += 1;
            v.last_snapshot = Some(done);
            v.log_bytes_since_snapshot = 0;
        });
        Ok(())
    }
}
