//! Sessions crossing nodes on the plane: moves to another node (sent part by part within a
//! window, each answered once stored there) and rebuilds of a failed node's sessions here.

use super::forgets::Route;
use super::*;

impl Plane {
    /// Starts sending `sessions` (read on the shards, whose slots are held and moving) to
    /// `to`: a window of them at a time, each answered once `to` has stored it and routes
    /// its filters; `reply` gets how many moved, or why the move failed.
    pub(super) fn start_move(
        &mut self,
        to: &str,
        sessions: crate::shard::api::MovedSessions,
        read_at: Instant,
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    ) {
        if self.move_out.is_some() {
            let _ = reply.send(Err("another move is under way".into()));
            return;
        }
        let Some(n) = self
            .ix
            .get(to)
            .copied()
            .filter(|n| self.links.contains_key(n))
        else {
            let _ = reply.send(Err(format!("no link to {to}")));
            return;
        };
        // Keys the moving sessions forgot since they were read, before this move reached
        // the plane, are not moved.
        let mut sessions = sessions;
        let early = self.forgets.begin(read_at);
        if !early.is_empty() {
            // By origin, looked up by the records' own strings.
            let mut by_origin: HashMap<&str, hashbrown::HashSet<u16>> = HashMap::new();
            for (o, p) in &early {
                by_origin.entry(o.as_str()).or_default().insert(*p);
            }
            for (_, entries) in &mut sessions {
                drop_keys(entries, |o, p| {
                    by_origin.get(o).is_some_and(|ps| ps.contains(&p))
                });
            }
        }
        self.move_out = Some(MoveOut {
            node: n,
            todo: sessions.into(),
            sent: HashMap::new(),
            sent_bytes: 0,
            moved: 0,
            deadline: Instant::now() + self.limits.move_timeout,
            reply,
        });
        self.pump_move();
    }

    /// Sends moved sessions while the window has room; answers the move when all are in.
    pub(super) fn pump_move(&mut self) {
        let Some(mut m) = self.move_out.take() else {
            return;
        };
        while m.sent_bytes < self.limits.move_window_bytes {
            let Some((client_id, mut entries)) = m.todo.pop_front() else {
                break;
            };
            let gone = self.forgets.sent(&client_id, m.node, Instant::now());
            if !gone.is_empty() {
                drop_keys(&mut entries, |o, p| {
                    gone.iter().any(|(go, gp)| *gp == p && go.as_str() == o)
                });
            }
            self.next_id += 1;
            let id = self.next_id;
            let bytes: usize = entries.iter().map(|e| e.rest.len() + e.value.len()).sum();
            let part = self.limits.session_part_bytes;
            wire::session(self.buf(m.node), id, &client_id, &entries, part);
            m.sent.insert(id, bytes);
            m.sent_bytes += bytes;
        }
        if m.todo.is_empty() && m.sent.is_empty() {
            self.forgets.end();
            let _ = m.reply.send(Ok(m.moved));
        } else {
            self.move_out = Some(m);
        }
    }

    /// A session moving away forgot a QoS 2 key after it may have been read for the move:
    /// not sent yet, the key comes out of its records; sent, the node it went to forgets it
    /// too (a `FORGET` after the session on the same link, so it finds it there); its move
    /// not here yet, the move takes the key out when it comes.
    pub(super) fn forget_moved(
        &mut self,
        client_id: MqttStr,
        origin: MqttStr,
        packet_id: u16,
        at: Instant,
    ) {
        let moving = self.move_out.is_some();
        match self
            .forgets
            .forget(client_id.as_str(), origin.clone(), packet_id, at, moving)
        {
            Route::Send(n) if self.links.contains_key(&n) => {
                wire::forget(self.buf(n), &client_id, &origin, packet_id);
            }
            // The link to where it went is down (its move is over, or failed), or past the
            // bound: a moved copy may keep the stale key (README "Status (issue 16)").
            Route::Send(_) | Route::Lost => self.counters.moved_forgets_lost_total += 1,
            Route::Held => {}
        }
    }

    /// The answer to one moved session.
    pub(super) fn moved(&mut self, id: u64, ok: bool) {
        let Some(m) = &mut self.move_out else {
            return;
        };
        let Some(bytes) = m.sent.remove(&id) else {
            return;
        };
        m.sent_bytes -= bytes;
        if ok {
            m.moved += 1;
            self.pump_move();
        } else {
            self.fail_move("the other node could not store a session");
        }
    }

    pub(super) fn fail_move(&mut self, why: &str) {
        self.forgets.end();
        if let Some(m) = self.move_out.take() {
            let _ = m.reply.send(Err(why.to_string()));
        }
    }

    /// A part of a session `n` moves here: kept until its last part, then handed to the
    /// shard of its client id (answered from there). Over the bounds (sessions arriving at
    /// once, `link_buffer_bytes_max` for one session), it is refused.
    pub(super) fn session_part(
        &mut self,
        n: NodeIx,
        id: u64,
        client_id: String,
        last: bool,
        entries: Vec<crate::storage::ClientEntry>,
    ) {
        let bytes: usize = entries.iter().map(|e| e.rest.len() + e.value.len()).sum();
        let full = self.moves_in.len() >= self.limits.moves_in_max
            && !self.moves_in.contains_key(&(n, id));
        let deadline = Instant::now() + self.limits.move_timeout;
        let m = self.moves_in.entry((n, id)).or_insert_with(|| MoveIn {
            client_id: client_id.clone(),
            entries: Vec::new(),
            bytes: 0,
            deadline,
        });
        m.bytes += bytes;
        let refused =
            full || m.client_id != client_id || m.bytes > self.limits.link_buffer_bytes_max;
        if refused {
            self.moves_in.remove(&(n, id));
            self.counters.bad_frames_total += 1;
            tracing::warn!(client = %client_id, "a moved session refused: over the bounds of sessions arriving");
            if self.links.contains_key(&n) {
                wire::pub_ack(self.buf(n), id, false, Fate::default());
            }
            return;
        }
        m.entries.extend(entries);
        if !last {
            return;
        }
        let Some(m) = self.moves_in.remove(&(n, id)) else {
            return;
        };
        // Back here: where it went before is no place for its forgets any more.
        self.forgets.back(&m.client_id);
        // The shards judge a moved session against the slot table as this node knows it
        // now (the map goes out on the tick otherwise): a node that has just given the
        // slot away must not take the session moved back to it for its own.
        self.update_slots();
        let shard = crate::session::owner_shard(m.client_id.as_bytes(), self.shards);
        self.post(
            shard,
            FromCluster::Adopt {
                node: n,
                id,
                client_id: m.client_id,
                entries: Arc::new(m.entries),
                read_at: None,
            },
        );
    }

    /// Stores sessions rebuilt from a failed node's stream on their shards here; `reply`
    /// hears once every shard has them durably (and replicated) and their routes are
    /// known on every live node. First every linked node is asked for the QoS 2 releases
    /// it kept for `from` (`MISSED_WANTED`): `from`'s stream still holds those keys, stale,
    /// and a new message from that node's publisher reusing the packet id, resent with
    /// DUP, would be taken for the old one. The answers come before anything that node
    /// sends for the rebuilt sessions (it learns their routes only once they are stored);
    /// a node that does not answer within [`MISSED_WAIT`] (or whose link goes down) is
    /// gone on without, logged and counted.
    pub(super) fn start_rebuild(
        &mut self,
        from: &str,
        read_at: Instant,
        sessions: Vec<(String, Vec<crate::storage::ClientEntry>)>,
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    ) {
        if sessions.is_empty() {
            let _ = reply.send(Ok(0));
            return;
        }
        let from_ix = self.ix.get(from).copied();
        let asked: hashbrown::HashSet<NodeIx> = self
            .links
            .keys()
            .copied()
            .filter(|n| Some(*n) != from_ix)
            .collect();
        // A live node not linked now cannot be asked: what it kept for `from` stays
        // unknown here.
        let unlinked: Vec<String> = self
            .live_others()
            .into_iter()
            .filter(|m| m != from && !self.ix.get(m).is_some_and(|n| asked.contains(n)))
            .collect();
        if !unlinked.is_empty() {
            self.counters.rebuild_releases_unknown_total += unlinked.len() as u64;
            tracing::warn!(nodes = ?unlinked, from = %from, "rebuilding a failed node's sessions: live nodes not linked cannot say which QoS 2 releases it missed (its keys may stay stale)");
        }
        self.next_id += 1;
        let id = self.next_id;
        for n in &asked {
            wire::missed_wanted(self.buf(*n), id, from);
        }
        self.missed_asks.insert(
            id,
            MissedAsk {
                from: from.to_string(),
                read_at,
                sessions,
                reply,
                asked,
                releases: Vec::new(),
                per_node: HashMap::new(),
                deadline: Instant::now() + MISSED_WAIT,
            },
        );
        self.missed_ask_done(id);
    }

    /// Part of a node's answer to a `MISSED_WANTED`.
    pub(super) fn missed_from(
        &mut self,
        n: NodeIx,
        id: u64,
        last: bool,
        releases: Vec<(MqttStr, Option<u16>)>,
    ) {
        let max = self.limits.missed_releases_max;
        let Some(ask) = self
            .missed_asks
            .get_mut(&id)
            .filter(|a| a.asked.contains(&n))
        else {
            self.counters.bad_frames_total += 1;
            return;
        };
        // This node takes at most `missed_releases_max` from each (past it: counted once).
        let got = ask.per_node.entry(n).or_default();
        let room = max.saturating_sub(*got);
        if releases.len() > room && room > 0 {
            self.counters.releases_forgotten_total += 1;
            tracing::warn!(node = %self.names[n as usize], "rebuilding a failed node's sessions: a node kept more QoS 2 releases for it than cluster.missed_releases_max; the rest are not used");
        }
        *got += releases.len().min(room);
        ask.releases.extend(releases.into_iter().take(room));
        if last {
            ask.asked.remove(&n);
            self.missed_ask_done(id);
        }
    }

    /// A node asks for the releases this node kept for `node`: sent, in parts. While the
    /// link to the asker holds half its bound already, the answer waits (one per asker,
    /// the latest: a node asking again and again gets no more than one answer a tick),
    /// sent by the tick once there is room.
    pub(super) fn missed_wanted(&mut self, n: NodeIx, id: u64, node: &str) {
        let queued = self
            .links
            .get(&n)
            .map_or(0, |l| l.queued.load(Ordering::Acquire))
            + self.out.get(&n).map_or(0, BytesMut::len);
        if queued > self.limits.link_buffer_bytes_max / 2 {
            if self.links.contains_key(&n) {
                self.missed_waiting.insert(n, (id, node.to_string()));
            }
            return;
        }
        // Encoded straight from the kept list (no copy of it per ask).
        let kept = self
            .ix
            .get(node)
            .and_then(|x| self.missed_releases.get_mut(x))
            .map(|q| &*q.make_contiguous());
        wire::missed(self.out.entry(n).or_default(), id, kept.unwrap_or(&[]));
    }

    /// The link to `n` went down: its answers to this node's asks will not come.
    pub(super) fn missed_link_down(&mut self, n: NodeIx) {
        self.missed_waiting.remove(&n);
        let ids: Vec<u64> = self
            .missed_asks
            .iter()
            .filter(|(_, a)| a.asked.contains(&n))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(a) = self.missed_asks.get_mut(&id) {
                a.asked.remove(&n);
                self.counters.rebuild_releases_unknown_total += 1;
                tracing::warn!(node = %self.names[n as usize], from = %a.from, "rebuilding a failed node's sessions: the link to a node went down before it said which QoS 2 releases the failed node missed (its keys may stay stale)");
            }
            self.missed_ask_done(id);
        }
    }

    /// Asks past [`MISSED_WAIT`] go on without the answers still missing; answers that
    /// waited for room on their link are tried again.
    pub(super) fn missed_tick(&mut self, now: Instant) {
        for (n, (id, node)) in std::mem::take(&mut self.missed_waiting) {
            if self.links.contains_key(&n) {
                self.missed_wanted(n, id, &node);
            }
        }
        let late: Vec<u64> = self
            .missed_asks
            .iter()
            .filter(|(_, a)| now >= a.deadline)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(a) = self.missed_asks.get_mut(&id) {
                let names: Vec<&str> = a
                    .asked
                    .iter()
                    .map(|n| self.names[*n as usize].as_str())
                    .collect();
                self.counters.rebuild_releases_unknown_total += a.asked.len() as u64;
                tracing::warn!(nodes = ?names, from = %a.from, "rebuilding a failed node's sessions: no answer within {MISSED_WAIT:?} about the QoS 2 releases it missed (its keys may stay stale)");
                a.asked.clear();
            }
            self.missed_ask_done(id);
        }
    }

    /// Once every node asked has answered (or is given up), the rebuild goes on.
    fn missed_ask_done(&mut self, id: u64) {
        if !self
            .missed_asks
            .get(&id)
            .is_some_and(|a| a.asked.is_empty())
        {
            return;
        }
        let Some(ask) = self.missed_asks.remove(&id) else {
            return;
        };
        self.rebuild_sessions(ask);
    }

    fn rebuild_sessions(&mut self, ask: MissedAsk) {
        let MissedAsk {
            from,
            read_at,
            mut sessions,
            reply,
            releases,
            ..
        } = ask;
        // The QoS 2 releases that `from` missed, of this node's publishers and of the
        // other nodes' (their answers): its stream still holds those keys, stale.
        {
            let own = self
                .ix
                .get(from.as_str())
                .and_then(|n| self.missed_releases.get(n));
            let mut keys: hashbrown::HashSet<(&str, u16)> = hashbrown::HashSet::new();
            let mut origins: hashbrown::HashSet<&str> = hashbrown::HashSet::new();
            for (o, p) in own.into_iter().flatten().chain(releases.iter()) {
                match p {
                    Some(p) => keys.insert((o.as_str(), *p)),
                    None => origins.insert(o.as_str()),
                };
            }
            if !keys.is_empty() || !origins.is_empty() {
                for (_, entries) in &mut sessions {
                    drop_keys(entries, |o, p| {
                        origins.contains(o) || keys.contains(&(o, p))
                    });
                }
            }
        }
        self.next_id += 1;
        let rebuild = self.next_id;
        self.rebuilds.insert(
            rebuild,
            Rebuild {
                left: sessions.len(),
                stored: 0,
                failed: 0,
                reply: Some(reply),
            },
        );
        for (client_id, entries) in sessions {
            self.forgets.back(&client_id);
            self.next_id += 1;
            let id = self.next_id;
            self.rebuild_ids.insert(id, rebuild);
            let shard = crate::session::owner_shard(client_id.as_bytes(), self.shards);
            self.post(
                shard,
                FromCluster::Adopt {
                    node: REBUILD_NODE,
                    id,
                    client_id,
                    entries: Arc::new(entries),
                    read_at: Some(read_at),
                },
            );
        }
    }

    pub(super) fn rebuild_answer(&mut self, id: u64, ok: bool) {
        let Some(rebuild) = self.rebuild_ids.remove(&id) else {
            return;
        };
        let Some(r) = self.rebuilds.get_mut(&rebuild) else {
            return;
        };
        r.left -= 1;
        if ok {
            r.stored += 1;
        } else {
            r.failed += 1;
        }
        if r.left == 0 {
            if let Some(mut r) = self.rebuilds.remove(&rebuild) {
                let result = if r.failed == 0 {
                    Ok(r.stored)
                } else {
                    Err(format!(
                        "{} of {} sessions not stored",
                        r.failed,
                        r.failed + r.stored
                    ))
                };
                if let Some(reply) = r.reply.take() {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// Takes the dedup keys (origin, packet id) that `gone` names out of a session's records.
fn drop_keys(
    entries: &mut Vec<crate::storage::ClientEntry>,
    mut gone: impl FnMut(&str, u16) -> bool,
) {
    entries.retain(|e| {
        e.space != crate::storage::Space::Dedup
            || !crate::storage::dedup_entry_of(&e.rest).is_some_and(|(o, p)| gone(o, p))
    });
}
