//! Fail-over: a member that is down loses its slots to the live nodes; with replicated
//! sessions they are rebuilt first from its stream. Automatic after
//! `cluster.failover_after_s` of silence, run by one survivor ([`failover_runner`]).

use super::*;

/// The first pause after an automatic fail-over that failed; it doubles with each try.
pub(super) const FAILOVER_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between tries of an automatic fail-over.
pub(super) const FAILOVER_RETRY_MAX: Duration = Duration::from_secs(30);
/// The live node that runs the fail-over of `gone`: every node picks the same one from
/// the same records (a hash of the name, not the first: fail-overs of several nodes
/// spread over the survivors). `None` when no node is up.
pub(super) fn failover_runner<'a>(gone: &str, live: &[&'a str]) -> Option<&'a str> {
    let mut live = live.to_vec();
    live.sort_unstable();
    let i = crate::cluster::slot_of(gone.as_bytes()) as usize % live.len().max(1);
    live.get(i).copied()
}

impl Node {
    /// Gives every slot of `gone` (a member that is down) to the live nodes, evenly, by
    /// compare-and-swap on the table. Its sessions start over, empty, at their new owners;
    /// if it comes back with its disk, it drops them (`discard_orphans`).
    pub(super) async fn failover(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        ctl: &Ctl,
        gone: &str,
        why: &str,
    ) -> Result<String, crate::cluster::FailoverError> {
        use crate::cluster::FailoverError as E;
        let (table, rev, mut live) = {
            let st = handle.lock();
            if st.state != SelfState::Up || !self.clock.holds(Instant::now()) {
                return Err(E::Unavailable("this node does not hold its lease".into()));
            }
            if !st.members.contains_key(gone) {
                return Err(E::Unknown(format!("no member {gone:?}")));
            }
            if st.live.contains_key(gone) {
                return Err(E::Live(format!("{gone} holds its lease: it is serving")));
            }
            let live: Vec<String> = st.live.keys().cloned().collect();
            (st.slots.clone(), st.slots_rev, live)
        };
        live.sort();
        if let Some(r) = self.replica.clone() {
            return self
                .failover_replicated(keys, handle, ctl, &r, gone, why, (&table, rev))
                .await;
        }
        let Some(next) = table.without(gone, &live) else {
            return Ok(format!("{gone} owns no slot"));
        };
        let moved = table.counts().get(gone).copied().unwrap_or(0);
        self.take_slots_of(keys, handle, gone, why, rev, &next, || {
            format!(
                "{moved} slots of {gone} given to {} (epoch {}): their sessions start over, empty",
                live.join(","),
                next.epoch
            )
        })
        .await
    }

    /// The fail-over's last step: the table changes to `next` by compare-and-swap, only if
    /// it is still at `rev` and `gone` is really gone, as etcd sees it now (this node's view
    /// may lag: a node that has just rejoined must not lose its slots and sessions).
    /// Counted and logged with `msg`. Sessions a replicated fail-over stored here for slots
    /// that stay another's are dropped when the shards see so (`discard_orphans`).
    #[allow(clippy::too_many_arguments)]
    async fn take_slots_of(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        gone: &str,
        why: &str,
        rev: i64,
        next: &SlotTable,
        msg: impl FnOnce() -> String,
    ) -> Result<String, crate::cluster::FailoverError> {
        use crate::cluster::FailoverError as E;
        let gone_now = Compare::create_revision(keys.node(gone), CompareOp::Equal, 0);
        match self
            .swap_table(keys, handle, rev, next, Some(gone_now))
            .await
        {
            Ok(true) => {
                handle.lock().counters.failovers_total += 1;
                let msg = msg();
                tracing::warn!(node = %gone, reason = why, "fail-over: {msg}");
                Ok(msg)
            }
            Ok(false) => Err(E::Unavailable(format!(
                "the slot table changed meanwhile, or {gone} is back: look again"
            ))),
            Err(e) => Err(E::Unavailable(format!("etcd: {e}"))),
        }
    }

    /// A fail-over with replicated sessions: fences `gone`'s stream (none of its appends
    /// succeeds from now on), rebuilds its sessions here from the stream (snapshot, then
    /// log), stores them (durably, and in this node's own stream), and only then takes
    /// its slots by compare-and-swap. Clients reconnecting anywhere find their sessions
    /// (Session Present) with every acknowledged message. The slots all come here; the
    /// periodic rebalance then moves a share to the other nodes with their sessions.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn failover_replicated(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        ctl: &Ctl,
        r: &crate::cluster::replica::Replica,
        gone: &str,
        why: &str,
        (table, rev): (&SlotTable, i64),
    ) -> Result<String, crate::cluster::FailoverError> {
        use crate::cluster::FailoverError as E;
        let me = self.record.id.clone();
        let theirs: Vec<u16> = (0..SLOTS)
            .filter(|s| table.owner(*s).is_some_and(|(o, _)| o == gone))
            .collect();
        if theirs.is_empty() {
            return Ok(format!("{gone} owns no slot"));
        }
        let started = Instant::now();
        let bits = bits_of(&theirs);
        let fence_seq = self
            .renewing(keys, handle, r.fence(gone, &me))
            .await
            .map_err(|e| E::Unavailable(format!("cannot fence {gone}'s stream: {e}")))?;
        let keep = move |cid: &str| {
            let slot = crate::cluster::slot_of(cid.as_bytes()) as usize;
            bits[slot / 64] & (1 << (slot % 64)) != 0
        };
        let read_at = Instant::now();
        let rebuilt = self
            .renewing(keys, handle, r.read(gone, &keep))
            .await
            .map_err(|e| E::Unavailable(format!("cannot read {gone}'s stream: {e}")))?;
        let (sessions, damaged) = (rebuilt.sessions, rebuilt.damaged);
        let count = sessions.len();
        let (tx, rx) = tokio::sync::oneshot::channel();
        ctl.send(ToCluster::Rebuild {
            from: gone.to_string(),
            read_at,
            sessions,
            reply: tx,
        })
        .map_err(|_| E::Unavailable("the data plane is not running".into()))?;
        let bound = Duration::from_secs(self.move_timeout_s as u64);
        let stored = match self
            .renewing(keys, handle, tokio::time::timeout(bound, rx))
            .await
        {
            Ok(Ok(Ok(n))) => n,
            Ok(Ok(Err(e))) => {
                return Err(E::Unavailable(format!("rebuilding {gone}'s sessions: {e}")))
            }
            _ => {
                return Err(E::Unavailable(format!(
                    "rebuilding {gone}'s sessions: not done within {bound:?}"
                )))
            }
        };
        if let Ok(mut v) = r.state.lock() {
            v.sessions_rebuilt_total += stored as u64;
        }
        let next = table.with_owner(&theirs, &me);
        let done = self
            .take_slots_of(keys, handle, gone, why, rev, &next, || {
                format!(
                    "{} slots of {gone} taken by {me} (epoch {}) with {count} sessions rebuilt from its replicated stream in {} ms",
                    theirs.len(),
                    next.epoch,
                    started.elapsed().as_millis()
                )
            })
            .await?;
        // Its sessions live here now, in this node's stream too: its own stream keeps only
        // its fence (a member that never comes back holds no disk in NATS). A failed trim
        // is harmless: the node trims it when it rejoins (it owns nothing then).
        if damaged > 0 {
            tracing::warn!(node = %gone, damaged, "fail-over: {gone}'s stream is kept untrimmed: it holds damaged units");
        } else {
            match self
                .renewing(keys, handle, r.trim_failed_over(gone, fence_seq))
                .await
            {
                Ok(left) => {
                    tracing::info!(node = %gone, left, "fail-over: {gone}'s stream trimmed to its fence")
                }
                Err(e) => {
                    tracing::warn!(node = %gone, error = %e, "fail-over: could not trim {gone}'s stream")
                }
            }
        }
        Ok(done)
    }

    /// `cluster.failover_after_s` (0: off): fails over every member silent for longer
    /// (counted from its last possible lease renewal). One live node runs each fail-over,
    /// the same by every node's view (`failover_runner`); the others step in only if the
    /// member is still not failed over a move's time later (the runner is stuck). A try
    /// that fails is tried again after a back-off that doubles, up to 30 s.
    pub(super) async fn automatic_failover(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        ctl: &Ctl,
        after_s: u32,
    ) {
        let due: Vec<String> = {
            let mut st = handle.lock();
            let now = Instant::now();
            let members: Vec<String> = st.members.keys().cloned().collect();
            let live: Vec<String> = st.live.keys().cloned().collect();
            st.down_since.retain(|id, _| !live.contains(id));
            self.failover_tries
                .retain(|id, _| !live.contains(id) && st.members.contains_key(id));
            for m in members {
                if !live.contains(&m) {
                    st.down_since.entry(m).or_insert(now);
                }
            }
            if after_s == 0 || st.state != SelfState::Up || !self.clock.holds(now) {
                return;
            }
            let counts = st.slots.counts();
            let me = self.record.id.as_str();
            let runners: Vec<&str> = st
                .live
                .values()
                .filter(|r| r.state == "up")
                .map(|r| r.id.as_str())
                .collect();
            let backup =
                Duration::from_secs(self.move_timeout_s as u64 + self.cfg.lease_ttl_s as u64);
            st.down_since
                .iter()
                .filter(|(id, t)| {
                    let mut wait = Duration::from_secs(after_s as u64);
                    if failover_runner(id, &runners) != Some(me) {
                        wait += backup;
                    }
                    now.duration_since(**t) >= wait
                        && counts.get(id.as_str()).copied().unwrap_or(0) > 0
                        && self
                            .failover_tries
                            .get(id.as_str())
                            .is_none_or(|(_, next)| now >= *next)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for gone in due {
            let why = format!("silent for more than cluster.failover_after_s ({after_s} s)");
            match self.failover(keys, handle, ctl, &gone, &why).await {
                Ok(_) => {
                    self.failover_tries.remove(&gone);
                }
                Err(e) => {
                    let tries = self.failover_tries.get(&gone).map_or(0, |(n, _)| *n) + 1;
                    let pause = FAILOVER_RETRY_FIRST
                        .saturating_mul(1 << (tries - 1).min(16))
                        .min(FAILOVER_RETRY_MAX);
                    self.failover_tries
                        .insert(gone.clone(), (tries, Instant::now() + pause));
                    tracing::warn!(node = %gone, error = %e, tries, retry_in = ?pause, "automatic fail-over not made");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::failover_runner;

    #[test]
    fn every_node_picks_the_same_failover_runner() {
        let a = failover_runner("c", &["a", "b", "d"]);
        assert!(a.is_some());
        assert_eq!(failover_runner("c", &["d", "b", "a"]), a);
        assert_eq!(failover_runner("c", &["b", "a", "d"]), a);
        assert_eq!(failover_runner("c", &[]), None);
        // Different dead nodes spread over the survivors.
        let names: Vec<String> = (0..64).map(|i| format!("node-{i}")).collect();
        let picked: std::collections::BTreeSet<&str> = names
            .iter()
            .filter_map(|g| failover_runner(g, &["a", "b", "c"]))
            .collect();
        assert_eq!(picked.len(), 3, "{picked:?}");
    }
}
