//! Routing: a message matched once against the cross-shard index and sent once to each
//! target shard; delivery to this shard's sessions.

use super::*;

impl Core {
    /// Sends a message everywhere it has subscribers, on this node and (in a cluster) on
    /// the others, and updates the retained store. With `reply`, every other shard and node
    /// involved answers `Ack(reply)` once what it stored is durable.
    pub fn route(&mut self, msg: SharedMessage, now: Instant, reply: Option<Token>) -> Routed {
        if !self.clustered() {
            return self.route_in_node(msg, now, reply);
        }
        // Each shared group gets it once in the cluster: here, or on the node picked for it.
        let picks = self.pick_groups(&msg);
        let (local, groups) = match picks {
            Some((here, there)) => (
                Arc::new(Message {
                    groups: Some(here.into()),
                    ..(*msg).clone()
                }),
                Some(NodeGroups::from(there)),
            ),
            None => (msg.clone(), None),
        };
        let mut r = self.route_in_node(local, now, reply);
        self.forward_to_nodes(&msg, groups, reply, &mut r);
        r
    }

    /// [`Core::route`] inside this node only: what a message from another node gets.
    pub(super) fn route_in_node(
        &mut self,
        msg: SharedMessage,
        now: Instant,
        reply: Option<Token>,
    ) -> Routed {
        let mut remote = 0;
        let mut fate = Fate::default();
        if msg.retain {
            // The retained copy is delivered to later subscribers: it must not leave dedup
            // keys (they would outlive the release of the message).
            let kept = if msg.qos2_id.is_some() {
                Arc::new(Message {
                    qos2_id: None,
                    ..(*msg).clone()
                })
            } else {
                msg.clone()
            };
            let version = self.retain_version();
            self.apply_retained(kept.clone(), version, true);
            for p in self.peers() {
                self.sink.push(
                    p,
                    Event::RetainReplica {
                        msg: kept.clone(),
                        version,
                        reply,
                    },
                );
                remote += usize::from(reply.is_some());
            }
        }
        let targets = self.index.targets(&msg.topic);
        for shard in targets.iter() {
            if shard == self.id {
                // Shared-group members on other shards answer the publisher directly.
                self.dispatch = reply.map(|token| Dispatch {
                    to: self.id,
                    token,
                    remote: 0,
                });
                fate = self.with_fate(|c| c.deliver_local(&msg, now));
                remote += self.dispatch.take().map_or(0, |d| d.remote);
            } else {
                self.stats.messages_routed_remote += 1;
                self.sink.push(
                    shard,
                    Event::Publish {
                        msg: msg.clone(),
                        reply,
                    },
                );
                remote += usize::from(reply.is_some());
            }
        }
        Routed {
            matched: !targets.is_empty(),
            remote,
            fate,
            failed: false,
        }
    }

    /// A version for a retained write made here: this shard's clock, strictly increasing.
    pub(super) fn retain_version(&mut self) -> RetainVersion {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.retained_versions.next(now_ns)
    }

    /// Delivers a message to this shard's matching subscribers: each session once, at the
    /// highest QoS of its matching subscriptions, with all their identifiers; each shared
    /// group homed here to one member.
    pub(super) fn deliver_local(&mut self, msg: &SharedMessage, now: Instant) {
        // Reused across publishes (taken and put back): no allocation per message.
        let mut hits = std::mem::take(&mut self.scratch.hits);
        let mut groups = std::mem::take(&mut self.scratch.groups);
        self.subs.for_each_match(&msg.topic, |subs| {
            for s in subs {
                match s {
                    LocalSub::Client {
                        client_id,
                        options,
                        id,
                    } => {
                        if options.no_local && msg.origin.as_ref() == Some(client_id) {
                            continue;
                        }
                        hits.push((client_id.clone(), *options, *id));
                    }
                    LocalSub::Group { key } if msg.serves_group(key) => groups.push(key.clone()),
                    LocalSub::Group { .. } => {}
                }
            }
        });
        hits.sort_by(|a, b| a.0.cmp(&b.0));
        let mut i = 0;
        while i < hits.len() {
            let client_id = hits[i].0.clone();
            let mut qos = QoS::AtMostOnce;
            let mut rap = false;
            let mut sub_ids = Vec::new();
            while i < hits.len() && hits[i].0 == client_id {
                let (_, o, id) = &hits[i];
                qos = qos.max(o.qos.min(msg.qos));
                rap |= o.retain_as_published;
                sub_ids.extend(*id);
                i += 1;
            }
            let d = Delivery {
                msg: msg.clone(),
                qos,
                retain: rap && msg.retain,
                sub_ids,
                via_share: None,
            };
            if self.is_moving(&client_id) {
                // Moving to another node: nothing new is stored for it here (see
                // `set_moving`); a QoS 1/2 publisher hears a failure and sends it again. A
                // resend it holds already is kept (it moves with the session).
                let held = match (msg.qos2_id, &msg.origin, self.sessions.get(&client_id)) {
                    (Some(q), Some(origin), Some(s)) => q.dup && s.holds_qos2(origin, q.packet_id),
                    _ => false,
                };
                if held {
                    self.fate.kept = true;
                } else if d.qos != QoS::AtMostOnce {
                    self.fate.moving = true;
                    self.stats.moving_refused += 1;
                }
                continue;
            }
            if let Some(s) = self.sessions.get_mut(&client_id) {
                if !may_read(&self.logins.auth, s, &msg.topic) {
                    self.stats.acl_denied_delivery += 1;
                    continue;
                }
                let outcome = s.deliver(d, &self.limits, now);
                self.note_outcome(outcome);
                let Some(s) = self.sessions.get(&client_id) else {
                    continue;
                };
                if let (Some(id), Some(origin)) = (msg.qos2_id, &msg.origin) {
                    if s.holds_qos2(origin, id.packet_id) {
                        self.note_qos2_holder(origin, id.packet_id, &client_id);
                        if !id.dup {
                            // A new message's key now, not one a moved session came with.
                            self.drop_adopted_key(&client_id, origin, id.packet_id);
                        }
                    }
                }
                self.sync_session(&client_id, now);
            }
        }
        for key in groups.drain(..) {
            let reply = self.dispatch.map(|d| (d.to, d.token));
            let first = (None, 0, Fate::default());
            if self.shared_dispatch(key, msg.clone(), first, reply, now) == Dispatched::Remote {
                if let Some(d) = &mut self.dispatch {
                    d.remote += 1;
                }
            }
        }
        hits.clear();
        self.scratch = DeliverScratch { hits, groups };
    }

    /// A message another shard (or this one) routed here: delivered to this shard's
    /// sessions; with `reply`, answered once what it wrote is durable, and once the shared
    /// members on other shards it was offered to have answered.
    pub(super) fn on_routed(
        &mut self,
        from: usize,
        msg: SharedMessage,
        reply: Option<Token>,
        now: Instant,
    ) {
        self.stats.messages_from_remote += u64::from(from != self.id);
        // Shared-group members on other shards answer a relay here, which answers the
        // publisher once they and this shard's own writes are durable.
        let relay = reply.map(|_| self.token());
        self.dispatch = relay.map(|token| Dispatch {
            to: self.id,
            token,
            remote: 0,
        });
        let fate = self.with_fate(|c| c.deliver_local(&msg, now));
        let dispatched = self.dispatch.take().map_or(0, |d| d.remote);
        match (reply, relay) {
            (Some(token), Some(relay)) if dispatched > 0 => {
                self.begin(
                    relay,
                    RoundTrip::new(dispatched + 1, Completion::Relay { to: from, token })
                        .with_fate(fate),
                );
                self.wait_durable(Waiter::Local(relay), now);
            }
            (Some(token), _) => {
                self.wait_durable(
                    Waiter::Remote {
                        to: from,
                        token,
                        fate,
                    },
                    now,
                );
            }
            _ => {}
        }
    }

    /// The routing index: `shard` has (`add`) or no longer has subscribers of `filter`.
    pub(super) fn apply_index(&mut self, filter: &str, shard: usize, add: bool) {
        self.index.set(filter, shard, add);
    }
}

/// Every shard's copy of the routing index: topic filter -> the shards with at least one
/// subscriber of it, and the filters whose addition is still on its way to the peers (with
/// how many SUBACKs wait for it: a SUBACK of such a filter waits too, see `subscribe_local`).
#[derive(Debug, Default)]
pub(super) struct RoutingIndex {
    trie: TopicTrie<ShardSet>,
    adding: HashMap<Arc<str>, u32>,
}

impl RoutingIndex {
    /// `shard` has (`add`) or no longer has subscribers of `filter`.
    pub(super) fn set(&mut self, filter: &str, shard: usize, add: bool) {
        if add {
            self.trie.entry(filter).insert(shard);
        } else if let Some(set) = self.trie.get_mut(filter) {
            set.remove(shard);
            if set.is_empty() {
                self.trie.remove(filter);
            }
        }
    }

    /// The shards a message on `topic` goes to.
    pub(super) fn targets(&self, topic: &TopicName) -> ShardSet {
        let mut targets = ShardSet::default();
        self.trie.for_each_match(topic, |s| targets.union_with(s));
        targets
    }

    /// Whether an addition of `filter` is still on its way to the peers.
    pub(super) fn is_adding(&self, filter: &str) -> bool {
        self.adding.contains_key(filter)
    }

    /// A SUBACK waits for the addition of `filter` to reach every peer.
    pub(super) fn begin_adding(&mut self, filter: Arc<str>) {
        *self.adding.entry(filter).or_insert(0) += 1;
    }

    /// A SUBACK that waited for the addition of `filter` has its answers.
    pub(super) fn end_adding(&mut self, filter: &str) {
        if let Some(n) = self.adding.get_mut(filter) {
            debug_assert!(*n > 0, "an addition ended twice");
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.adding.remove(filter);
            }
        }
    }

    /// No addition is under way (tests).
    #[cfg(test)]
    pub(super) fn settled(&self) -> bool {
        self.adding.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(t: &str) -> TopicName {
        TopicName::new(t).unwrap()
    }

    #[test]
    fn shards_are_added_and_removed_per_filter() {
        let mut ix = RoutingIndex::default();
        ix.set("a/+", 1, true);
        ix.set("a/#", 2, true);
        ix.set("a/+", 3, true);
        let t: Vec<usize> = ix.targets(&topic("a/b")).iter().collect();
        assert_eq!(t, [1, 2, 3]);
        ix.set("a/+", 1, false);
        ix.set("a/+", 3, false);
        let t: Vec<usize> = ix.targets(&topic("a/b")).iter().collect();
        assert_eq!(t, [2]);
        assert!(ix.targets(&topic("b")).iter().next().is_none());
    }

    #[test]
    fn additions_under_way_are_counted_per_waiting_suback() {
        let mut ix = RoutingIndex::default();
        ix.begin_adding(Arc::from("x"));
        ix.begin_adding(Arc::from("x"));
        assert!(ix.is_adding("x"));
        ix.end_adding("x");
        assert!(ix.is_adding("x"), "one SUBACK still waits");
        ix.end_adding("x");
        assert!(!ix.is_adding("x") && ix.settled());
    }
}
