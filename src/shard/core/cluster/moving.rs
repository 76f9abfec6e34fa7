//! Sessions moving between nodes, the shard's side: slots whose sessions leave (their
//! clients sent away, nothing new stored), the sessions read for a move, a session moved
//! or rebuilt here (checked, stored, routed), and leftovers discarded once their slot is
//! another node's.

use super::*;

impl Core {
    /// The slots moving to another node now, if any.
    pub(in crate::shard::core) fn moving_bits(&self) -> Option<Box<SlotBits>> {
        self.cluster.as_ref().and_then(|c| c.moving.clone())
    }

    /// Whether `client_id`'s session is moving to another node (nothing new is stored for
    /// it here).
    pub(in crate::shard::core) fn is_moving(&self, client_id: &MqttStr) -> bool {
        self.cluster
            .as_ref()
            .and_then(|c| c.moving.as_ref())
            .is_some_and(|bits| {
                has_bit(
                    bits,
                    crate::session::ownership::slot_of(client_id.as_bytes()),
                )
            })
    }

    /// Starts moving the sessions of `bits` to another node (`!on`: gives it up): their
    /// clients are disconnected (MQTT 5: `rc`; they come back, and are placed again once
    /// the move is over), and from now on a QoS 1/2 message for them is refused rather
    /// than stored (`Fate::moving`: the publisher sends it again, and it reaches them at
    /// their new node), so that what is read for the move is all they hold.
    pub(in crate::shard::core) fn set_moving(
        &mut self,
        bits: &SlotBits,
        on: bool,
        rc: ReasonCode,
        now: Instant,
    ) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        update_bits(&mut c.moving, bits, on);
        if !on {
            return;
        }
        let moving: Vec<MqttStr> = self
            .sessions
            .keys()
            .filter(|id| self.is_moving(id))
            .cloned()
            .collect();
        for id in moving {
            self.offline_for_move(&id, rc, now);
        }
    }

    /// The stored sessions of the moving slots, each as its records, once what this shard
    /// wrote so far is applied. `Err` when a session cannot be read (the move must not
    /// go on: its slot would be given away without it).
    pub fn moving_sessions(
        &mut self,
        bits: &SlotBits,
    ) -> Result<Vec<(String, Vec<ClientEntry>)>, String> {
        let ids: Vec<MqttStr> = self
            .sessions
            .iter()
            .filter(|(id, s)| s.persistent && in_bits(bits, id) && self.is_moving(id))
            .map(|(id, _)| id.clone())
            .collect();
        let Some(store) = self.store.clone() else {
            return Ok(Vec::new());
        };
        self.flush_writes();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match store.client_entries(id.as_str()) {
                Ok(Some(entries)) => out.push((id.as_str().to_owned(), entries)),
                Ok(None) => {}
                Err(e) => return Err(format!("reading the session of {id}: {e}")),
            }
        }
        Ok(out)
    }

    /// A session moved here from `node`: checked, stored (replacing a stale copy), brought
    /// into memory offline, and its subscriptions routed here; `id` is answered once it is
    /// durable and every linked node routes its filters here, so that the other node may
    /// then give its slot away and delete it.
    pub(in crate::shard::core) fn adopt_from_node(
        &mut self,
        node: NodeIx,
        id: u64,
        client_id: &str,
        entries: &[ClientEntry],
        read_at: Option<Instant>,
        now: Instant,
    ) {
        let decoded = MqttStr::new(client_id)
            .map_err(|e| e.to_string())
            .and_then(|cid| crate::storage::decode_client(client_id, entries).map(|d| (cid, d)));
        let (cid, (stored, queue)) = match decoded {
            Ok(d) if self.store.is_some() => d,
            Ok(_) => {
                tracing::warn!(client = %client_id, "a moved session refused: this node has no store");
                self.answer_node(node, id, false, Fate::default());
                return;
            }
            Err(e) if node == REBUILD_NODE => {
                // Retrying cannot mend it, and refusing it would hold back the fail-over of
                // every other session of the dead node: skipped, loudly.
                tracing::error!(client = %client_id, error = %e, "a session rebuilt from a failed node's stream is damaged: skipped");
                self.stats.sessions_rebuild_damaged += 1;
                self.answer_node(node, id, true, Fate::default());
                return;
            }
            Err(e) => {
                tracing::warn!(client = %client_id, error = %e, "a moved session refused: damaged");
                self.stats.sessions_move_refused += 1;
                self.answer_node(node, id, false, Fate::default());
                return;
            }
        };
        let slot = crate::session::ownership::slot_of(cid.as_bytes());
        let owned = self
            .cluster
            .as_ref()
            .and_then(|c| c.slots.as_ref())
            .is_some_and(|m| m.owner.get(slot as usize) == Some(&SLOT_HERE));
        if owned {
            // By this node's view the slot is its own already, and one of the two views is
            // stale: the sender's (its change of owner went through without its hearing so:
            // its compare-and-swap fails anyway), or this one's (it gave the slot away and
            // has not applied that yet: what it holds is the copy it gave away, and the
            // sender's is the live one). "Stored" without storing would let the sender
            // delete what may be the only live copy: the move is refused, the sender keeps
            // its sessions and tries again once the views agree.
            tracing::warn!(client = %client_id, "a moved session for a slot this node owns by its view: refused");
            self.stats.sessions_move_refused += 1;
            self.answer_node(node, id, false, Fate::default());
            return;
        }
        if let Some(c) = &mut self.cluster {
            if c.incoming.len() < crate::session::ownership::SLOTS as usize {
                c.incoming.insert(slot, now);
            }
        }
        if self.sessions.contains_key(&cid) {
            // A stale copy (a move that did not finish, say): the moved one replaces it.
            self.end_moved_session(&cid, now);
        }
        // A key released after the sender read the session is stale here: a new message
        // with the same packet id, resent with DUP, must not be taken for the old one.
        // A session moved from a live node: that node forwards every release its copy
        // takes after the read (`ToCluster::Forget`, on the same link, after the session),
        // and a key released here before is not stale in itself (the publisher may have
        // reused the packet id since, for the message this key stands for). A session
        // rebuilt from a failed node's stream holds what that node had applied up to its
        // fence: the releases since the stream was read are newer than its keys (the
        // releases this node's publishers sent it and it missed are taken out before, by
        // the cluster thread).
        let mut stored = stored;
        if let (Some(c), Some(read_at)) = (&self.cluster, read_at) {
            stored.dedup.retain(|(o, p)| {
                !c.released.iter().any(|(ro, rp, t)| {
                    ro.as_str() == o && rp.is_none_or(|rp| rp == *p) && *t >= read_at
                })
            });
        }
        let keys: Vec<(String, u16)> = if read_at.is_none() {
            stored.dedup.clone()
        } else {
            Vec::new()
        };
        let filters: Vec<Arc<str>> = stored
            .subscriptions
            .iter()
            .filter(|(f, _)| !f.starts_with(SHARE_PREFIX))
            .map(|(f, _)| Arc::from(f.as_str()))
            .collect();
        let ok = self.store_adopted(&crate::shard::event::Rehomed { stored, queue }, now);
        let token = self.token();
        let mut remote = 0;
        if ok {
            self.note_adopted_keys(&cid, &keys, now);
            self.stats.sessions_moved_in += 1;
            for f in &filters {
                remote += self.announce_route(f, true, Some(token));
            }
        }
        self.begin(
            token,
            RoundTrip::new(remote + 1, Completion::Node { node, id }).with_failure(!ok),
        );
        self.wait_durable(Waiter::Local(token), now);
    }

    /// A key forgotten by a session of this shard (its publisher released it): while the
    /// session is moving away, it may have been read for the move with the key, and the
    /// node it moves to may have had the release already: the cluster thread forwards it
    /// there ([`ToCluster::Forget`]).
    pub(in crate::shard::core) fn forget_on_move(
        &mut self,
        client_id: &MqttStr,
        origin: &MqttStr,
        packet_id: u16,
    ) {
        if !self.is_moving(client_id) {
            return;
        }
        if let Some(c) = &self.cluster {
            self.stats.moved_keys_forwarded += 1;
            let _ = c.link.control.send(ToCluster::Forget {
                client_id: client_id.clone(),
                origin: origin.clone(),
                packet_id,
                at: Instant::now(),
            });
        }
    }

    /// The keys of a session just moved here, as they came (see `adopted_keys`).
    fn note_adopted_keys(&mut self, client_id: &MqttStr, keys: &[(String, u16)], now: Instant) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        if c.adopted_keys.len() + keys.len() > RELEASED_MAX {
            c.adopted_keys
                .retain(|_, t| now.saturating_duration_since(*t) < INCOMING_TTL);
        }
        for (o, p) in keys {
            if c.adopted_keys.len() >= RELEASED_MAX {
                // A late FORGET for the rest is not applied (their keys may stay stale).
                self.stats.adopted_keys_untracked += 1;
                continue;
            }
            if let Ok(o) = MqttStr::new(o) {
                c.adopted_keys.insert((client_id.clone(), o, *p), now);
            }
        }
    }

    /// `client_id`'s key (`origin`, `packet_id`) is not as it came with a move any more:
    /// this node released it, or a new message (DUP = 0) holds it.
    pub(in crate::shard::core) fn drop_adopted_key(
        &mut self,
        client_id: &MqttStr,
        origin: &MqttStr,
        packet_id: u16,
    ) {
        if let Some(c) = &mut self.cluster {
            if !c.adopted_keys.is_empty() {
                c.adopted_keys
                    .remove(&(client_id.clone(), origin.clone(), packet_id));
            }
        }
    }

    /// The node `client_id`'s session moved here from forgot the key (`origin`,
    /// `packet_id`) after reading the session for the move: forgotten here too, if the key
    /// is still the one that came with the session (the FORGET may come late, after this
    /// node released that key itself and a new message with the same packet id took it);
    /// passed on if the session is moving on already.
    pub(in crate::shard::core) fn forget_moved_key(
        &mut self,
        client_id: &MqttStr,
        origin: &MqttStr,
        packet_id: u16,
        now: Instant,
    ) {
        let as_it_came = self.cluster.as_mut().is_some_and(|c| {
            c.adopted_keys
                .remove(&(client_id.clone(), origin.clone(), packet_id))
                .is_some_and(|t| now.saturating_duration_since(t) < INCOMING_TTL)
        });
        if !as_it_came {
            return;
        }
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.forget_qos2(origin, packet_id) {
            self.drop_qos2_holder(origin, packet_id, client_id);
            self.forget_on_move(client_id, origin, packet_id);
            self.sync_session(client_id, now);
        }
    }

    /// Sessions kept here whose slot another live node owns now (a fail-over gave this
    /// node's slots away while it was gone: their sessions live on, empty, over there) are
    /// discarded, stored state included, so that nothing is stored for them here again.
    pub(in crate::shard::core) fn discard_orphans(&mut self, now: Instant) {
        let Some(map) = self.cluster.as_ref().and_then(|c| c.slots.clone()) else {
            return;
        };
        let incoming = self
            .cluster
            .as_ref()
            .map(|c| &c.incoming)
            .filter(|i| !i.is_empty());
        let orphans: Vec<MqttStr> = self
            .sessions
            .keys()
            .filter(|id| {
                let slot = crate::session::ownership::slot_of(id.as_bytes());
                let arriving = incoming.is_some_and(|i| {
                    i.get(&slot)
                        .is_some_and(|t| now.saturating_duration_since(*t) < INCOMING_TTL)
                });
                !arriving
                    && !matches!(
                        map.owner.get(slot as usize),
                        Some(&SLOT_HERE) | Some(&SLOT_NOWHERE) | None
                    )
            })
            .cloned()
            .collect();
        for id in orphans {
            if self.is_moving(&id) {
                // Moved: the other node stored it before its slot was given away.
                self.stats.sessions_moved_out += 1;
            } else {
                tracing::warn!(client = %id, "discarding a session whose slot another node owns now (failed over)");
                self.stats.sessions_orphaned += 1;
            }
            self.end_moved_session(&id, now);
        }
    }
}
