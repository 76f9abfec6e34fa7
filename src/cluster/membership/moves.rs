//! Moves of slots with their sessions: the periodic rebalance, the hand-over of a node that
//! stops, and settling a table change whose answer was lost.

use super::*;

impl Node {
    /// Gives slots to a member with fewer than its share, if this node holds more: only
    /// slots in which it holds no session (so nothing has to move with them). The slots
    /// offered are held first (no new session in them), then the shards say which hold
    /// sessions, then the table changes by compare-and-swap; the hold ends when the shards
    /// have the new table. Returns `false` when a plan existed but nothing could move.
    pub(super) async fn rebalance(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        control: &Control<BrokerShard>,
        ctl: &Ctl,
    ) -> bool {
        let (plan, table, rev) = {
            let st = handle.lock();
            if st.state != SelfState::Up || !self.clock.holds(Instant::now()) {
                return true;
            }
            // A node that is leaving takes no slots (it is handing its own over).
            let live: Vec<String> = st
                .live
                .iter()
                .filter(|(_, r)| r.state != "leaving")
                .map(|(id, _)| id.clone())
                .collect();
            (
                st.slots.plan_give(&self.record.id, &live),
                st.slots.clone(),
                st.slots_rev,
            )
        };
        let Some((to, give)) = plan else {
            return true;
        };
        // Which of them hold sessions: first without a hold (most often all are free or
        // all are not, and clients of used slots are never held up for nothing), then
        // again under a hold of the free ones, so that none gains a session meanwhile.
        // (Each read waits up to 2 s for the shards: the lease is renewed meanwhile.)
        let Some(used) = self.renewing(keys, handle, slots_in_use(control)).await else {
            return false;
        };
        let free = unused(&give, &used);
        if free.is_empty() {
            // Every slot to give holds sessions: they move with it, a batch at a time.
            let batch: Vec<u16> = give.iter().copied().take(MOVE_BATCH_SLOTS).collect();
            let rc = crate::protocol::ReasonCode::UseAnotherServer;
            return match self
                .move_slots(keys, handle, control, ctl, &to, &batch, rc)
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(to = %to, error = %e, "moving sessions to a member failed; they stay");
                    false
                }
            };
        }
        let held = bits_of(&free);
        hold(control, held, true);
        let free = match self.renewing(keys, handle, slots_in_use(control)).await {
            Some(used) => unused(&free, &used),
            None => Vec::new(),
        };
        if free.is_empty() {
            hold(control, held, false);
            return false;
        }
        let next = table.with_owner(&free, &to);
        let made = match self.swap_table(keys, handle, rev, &next, None).await {
            Ok(made) => made,
            // The change may have been made and only its answer lost: if it was, the slots
            // given stay held until the shards see they are not this node's (a session
            // made here in one of them would be in another node's slot).
            Err(e) => {
                let made = self.settle_lost_change(keys, handle, &free).await == Some(true);
                if !made {
                    tracing::warn!(to = %to, error = %e, "giving slots to a member failed");
                }
                made
            }
        };
        if !made {
            // Someone else changed the table first (or etcd is away): try again later.
            hold(control, held, false);
            return true;
        }
        tracing::info!(to = %to, slots = free.len(), epoch = next.epoch, "gave slots to a member");
        // Those that gained a session meanwhile stay, and serve again; the others are held
        // until the shards see they are not this node's any more.
        let given = bits_of(&free);
        let mut kept = held;
        for (k, g) in kept.iter_mut().zip(given.iter()) {
            *k &= !g;
        }
        hold(control, kept, false);
        true
    }

    /// Moves the sessions of `slots` (this node's) to the live member `to`, then gives it
    /// the slots: they are held here (no new session), their clients disconnected (MQTT 5:
    /// `rc`) and nothing new is stored for them (`FromCluster::Moving`: a QoS 1/2 message
    /// for them is refused, and sent again by its publisher); the shards read them as
    /// stored, the plane sends them to `to`, which stores them and routes their filters
    /// on every node before it answers; then the table changes by compare-and-swap, and
    /// the shards here delete their copies when they see it. On any failure the hold and
    /// the move end, and the sessions stay here. Returns how many sessions moved.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn move_slots(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        control: &Control<BrokerShard>,
        ctl: &Ctl,
        to: &str,
        slots: &[u16],
        rc: crate::protocol::ReasonCode,
    ) -> Result<usize, String> {
        let (table, rev) = {
            let st = handle.lock();
            if st.state != SelfState::Up || !self.clock.holds(Instant::now()) {
                return Err("this node does not hold its lease".into());
            }
            (st.slots.clone(), st.slots_rev)
        };
        let me = self.record.id.as_str();
        let slots: Vec<u16> = slots
            .iter()
            .copied()
            .filter(|s| table.owner(*s).is_some_and(|(o, _)| o == me))
            .collect();
        if slots.is_empty() {
            return Ok(0);
        }
        let bits = Arc::new(bits_of(&slots));
        hold(control, *bits, true);
        let moving = |on| FromCluster::Moving {
            bits: bits.clone(),
            on,
            rc,
        };
        post_all(control, moving(true));
        let r = self
            .move_held(keys, handle, control, ctl, to, &slots, (&table, rev))
            .await;
        if r.is_err() {
            post_all(control, moving(false));
            hold(control, *bits, false);
        }
        r
    }

    /// [`Node::move_slots`] once the slots are held and moving.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn move_held(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        control: &Control<BrokerShard>,
        ctl: &Ctl,
        to: &str,
        slots: &[u16],
        (table, rev): (&SlotTable, i64),
    ) -> Result<usize, String> {
        let read_at = Instant::now();
        let sessions = self
            .renewing(keys, handle, moving_sessions(control, bits_of(slots)))
            .await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        ctl.send(ToCluster::Move {
            to: to.to_string(),
            sessions: Box::new(sessions),
            read_at,
            reply: tx,
        })
        .map_err(|_| "the data plane is not running".to_string())?;
        let bound = Duration::from_secs(self.move_timeout_s as u64 + 5);
        let moved = match self
            .renewing(keys, handle, tokio::time::timeout(bound, rx))
            .await
        {
            Ok(Ok(r)) => r?,
            _ => return Err("no answer from the data plane".into()),
        };
        let next = table.with_owner(slots, to);
        match self.swap_table(keys, handle, rev, &next, None).await {
            Ok(true) => {
                tracing::info!(to = %to, slots = slots.len(), sessions = moved, epoch = next.epoch, "moved sessions and gave their slots to a member");
            }
            Ok(false) => return Err("the slot table changed meanwhile".into()),
            Err(e) => match self.settle_lost_change(keys, handle, slots).await {
                // Made, and only its answer lost: the move is done (lifting the hold would
                // serve sessions that are gone).
                Some(true) => {
                    tracing::info!(to = %to, "moved sessions; the table change was made although etcd's answer was lost");
                }
                _ => return Err(format!("etcd: {e}")),
            },
        }
        // The next move starts once the shards here have the new table and have let the
        // moved sessions go (bounded: they go anyway when it arrives). The lease is renewed
        // meanwhile: up to 5 s here, and 2 s more for a slow answer, is most of its time to
        // live.
        let bits = bits_of(slots);
        let deadline = Instant::now() + Duration::from_secs(5);
        let let_go = async {
            while Instant::now() < deadline {
                match slots_in_use(control).await {
                    Some(used) if used.iter().zip(bits.iter()).all(|(u, b)| u & b == 0) => break,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        self.renewing(keys, handle, let_go).await;
        Ok(moved)
    }

    /// After a change of owner of `slots` whose answer from etcd was lost: whether it was
    /// made, i.e. whether etcd's table now gives none of them to this node (`Some(false)`:
    /// all are still its own). The table read is this node's view at once: a node that gave
    /// slots away must not go on taking them for its own until its watch catches up (it
    /// would serve them, and take a session moved back to it for one it holds already).
    /// Asked a few times, the lease renewed in between; `None`: not known (etcd cannot be
    /// read, or this node was fenced and serves nothing).
    pub(super) async fn settle_lost_change(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        slots: &[u16],
    ) -> Option<bool> {
        for _ in 0..3 {
            if let Some(t) = self.table_in_etcd(keys, handle).await {
                let me = self.record.id.as_str();
                return Some(
                    slots
                        .iter()
                        .all(|s| t.owner(*s).is_none_or(|(o, _)| o != me)),
                );
            }
            if handle.lock().state != SelfState::Up {
                return None;
            }
            let cfg = self.cfg.clone();
            self.renew(keys, handle, &cfg).await;
        }
        None
    }

    /// The slot table as etcd holds it now, taken into this node's view when newer than
    /// what it has (`None`: it cannot be read).
    pub(super) async fn table_in_etcd(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
    ) -> Option<SlotTable> {
        for _ in 0..3 {
            let mut client = self.client.clone();
            if let Ok(r) = self.call(client.get(keys.slots(), None)).await {
                let kv = r.kvs().first()?;
                let t = SlotTable::decode(kv.value()).ok()?;
                let mut st = handle.lock();
                if kv.mod_revision() > st.slots_rev {
                    st.slots_rev = kv.mod_revision();
                    st.slots = t.clone();
                }
                return Some(t);
            }
            tokio::time::sleep(RETRY).await;
        }
        None
    }

    /// A graceful leave: every slot of this node, with its sessions, goes to the live
    /// members (evenly, one move per member), before the node stops serving. Returns what
    /// moved.
    pub(super) async fn hand_over(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        control: &Control<BrokerShard>,
        ctl: &Ctl,
    ) -> Result<String, String> {
        // The others see this node leaving first: none gives it slots any more.
        self.say_leaving(keys).await;
        let rc = crate::protocol::ReasonCode::ServerShuttingDown;
        let mut moved = 0;
        let mut failures = Vec::new();
        // A few passes over a fresh table: a move that failed (the table changed meanwhile,
        // a member went away) is tried again, with whoever is live then.
        for pass in 0..3 {
            if pass > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let (table, others) = {
                let st = handle.lock();
                let me = &self.record.id;
                let mut others: Vec<String> = st
                    .live
                    .iter()
                    .filter(|(id, r)| *id != me && r.state != "leaving")
                    .map(|(id, _)| id.clone())
                    .collect();
                others.sort();
                (st.slots.clone(), others)
            };
            if others.is_empty() {
                return Err("no other live member to hand the sessions to".into());
            }
            let Some(next) = table.without(&self.record.id, &others) else {
                return Ok(format!(
                    "{moved} sessions handed over; this node owns no slot"
                ));
            };
            let mine: Vec<u16> = (0..SLOTS)
                .filter(|s| table.owner(*s).is_some_and(|(o, _)| o == self.record.id))
                .collect();
            for to in &others {
                let theirs: Vec<u16> = mine
                    .iter()
                    .copied()
                    .filter(|s| next.owner(*s).is_some_and(|(o, _)| o == to))
                    .collect();
                match self
                    .move_slots(keys, handle, control, ctl, to, &theirs, rc)
                    .await
                {
                    Ok(n) => moved += n,
                    Err(e) => failures.push(format!("to {to}: {e}")),
                }
            }
        }
        let left = {
            let st = handle.lock();
            (0..SLOTS)
                .filter(|s| st.slots.owner(*s).is_some_and(|(o, _)| o == self.record.id))
                .count()
        };
        if left == 0 {
            Ok(format!("{moved} sessions handed over"))
        } else {
            Err(format!(
                "{left} slots not handed over ({})",
                failures.join("; ")
            ))
        }
    }

    /// Puts this node's record with the state `leaving` (the others give it no slot).
    pub(super) async fn say_leaving(&mut self, keys: &Keys) {
        let mut rec = self.record.clone();
        rec.state = "leaving".into();
        let value = serde_json::to_string(&rec).unwrap_or_default();
        let mut client = self.client.clone();
        let put = client.put(
            keys.node(&self.record.id),
            value,
            Some(PutOptions::new().with_lease(self.lease)),
        );
        if let Err(e) = self.call(put).await {
            tracing::warn!(error = %e, "could not tell etcd this node is leaving");
        }
    }
}

/// The slots in which some shard holds a session; `None` when a shard did not answer.
pub(super) async fn slots_in_use(control: &Control<BrokerShard>) -> Option<SlotBits> {
    let asked = control.clone();
    let used = tokio::task::spawn_blocking(move || {
        // Short: the membership loop (and the lease's renewal) waits for it.
        asked.map_reduce(
            Query::SlotsInUse,
            Duration::from_secs(2),
            [0u64; SLOTS as usize / 64],
            |mut acc, _, a| {
                if let Answer::Slots(b) = a {
                    for (x, y) in acc.iter_mut().zip(b.iter()) {
                        *x |= *y;
                    }
                }
                acc
            },
        )
    })
    .await;
    match used {
        Ok(Ok(u)) => Some(u),
        _ => None,
    }
}

/// The sessions of the slots moving away, read on every shard (as stored).
pub(super) async fn moving_sessions(
    control: &Control<BrokerShard>,
    bits: SlotBits,
) -> Result<crate::shard::api::MovedSessions, String> {
    let asked = control.clone();
    let bits = Arc::new(bits);
    let read = tokio::task::spawn_blocking(move || {
        asked.map_reduce(
            Query::MovingSessions(bits),
            Duration::from_secs(10),
            Ok(Vec::new()),
            |acc: Result<crate::shard::api::MovedSessions, String>, _, a| match (acc, a) {
                (Ok(mut v), Answer::Moving(Ok(more))) => {
                    v.extend(*more);
                    Ok(v)
                }
                (Ok(_), Answer::Moving(Err(e))) => Err(e),
                (Ok(_), _) => Err("a shard gave no sessions".to_string()),
                (Err(e), _) => Err(e),
            },
        )
    })
    .await;
    match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("the shards: {e}")),
        Err(e) => Err(format!("the shards: {e}")),
    }
}

/// Posts `m` to every shard (no answer).
pub(super) fn post_all(control: &Control<BrokerShard>, m: FromCluster) {
    for s in 0..control.shard_count() {
        let _ = control.post(shards::ShardId::new(s), Query::Cluster(vec![m.clone()]));
    }
}

/// The slots of `slots` not in `used`.
pub(super) fn unused(slots: &[u16], used: &SlotBits) -> Vec<u16> {
    slots
        .iter()
        .copied()
        .filter(|&s| used[s as usize / 64] & (1 << (s % 64)) == 0)
        .collect()
}

/// Tells every shard to serve no new session in `bits` (`on`), until they are not this
/// node's any more, or to serve them again (`!on`).
pub(super) fn hold(control: &Control<BrokerShard>, bits: SlotBits, on: bool) {
    post_all(
        control,
        FromCluster::Hold {
            bits: Arc::new(bits),
            on,
        },
    );
}

/// The set of `slots`.
pub(super) fn bits_of(slots: &[u16]) -> SlotBits {
    let mut bits: SlotBits = [0; SLOTS as usize / 64];
    for &s in slots {
        bits[s as usize / 64] |= 1 << (s % 64);
    }
    bits
}
