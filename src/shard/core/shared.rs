//! Shared subscriptions at their home shard: choosing a member, offering the message to it
//! (possibly on another shard), and the next member when one refuses.

use super::*;

/// A shared subscription group, at its home shard.
#[derive(Debug, Default)]
struct Group {
    members: Vec<SharedMember>,
    /// Where the round robin looks first next time.
    next: usize,
}

/// The shared groups this shard is home to, by key (`$share/<group>/<filter>`): their
/// members (each client id once) and the round robin over them.
#[derive(Debug, Default)]
pub(super) struct SharedGroups {
    groups: HashMap<Arc<str>, Group>,
}

impl SharedGroups {
    /// `member` joins the group `key` (or updates its entry). Returns whether it is the
    /// group's first member (the group is new).
    pub fn join(&mut self, key: Arc<str>, member: SharedMember) -> bool {
        let g = self.groups.entry(key).or_default();
        let fresh = g.members.is_empty();
        g.members.retain(|m| m.client_id != member.client_id);
        g.members.push(member);
        fresh
    }

    /// `client_id` leaves the group `key`. Returns whether that ended the group (it had
    /// members and has none now).
    pub fn leave(&mut self, key: &Arc<str>, client_id: &MqttStr) -> bool {
        let Some(g) = self.groups.get_mut(key) else {
            return false;
        };
        g.members.retain(|m| m.client_id != *client_id);
        let ended = g.members.is_empty();
        if ended {
            self.groups.remove(key);
        }
        ended
    }

    /// The member `client_id` of the group `key` came online or went offline.
    pub fn set_online(&mut self, key: &Arc<str>, client_id: &MqttStr, online: bool) {
        if let Some(g) = self.groups.get_mut(key) {
            for m in g.members.iter_mut().filter(|m| m.client_id == *client_id) {
                m.online = online;
            }
        }
    }

    /// The next member of the group `key` to offer a message to: round robin over the
    /// online members that `may_take`, else over the offline persistent ones (which queue);
    /// never `not`. `None`: no such member (or no such group).
    pub fn pick(
        &mut self,
        key: &Arc<str>,
        not: Option<&MqttStr>,
        may_take: impl Fn(&SharedMember) -> bool,
    ) -> Option<SharedMember> {
        let g = self.groups.get_mut(key)?;
        let n = g.members.len();
        let eligible = |m: &SharedMember, online: bool| {
            Some(&m.client_id) != not
                && (m.online == online)
                && (online || m.persistent)
                && may_take(m)
        };
        let idx = [true, false].into_iter().find_map(|online| {
            (0..n)
                .map(|k| (g.next + k) % n)
                .find(|&idx| eligible(&g.members[idx], online))
        })?;
        g.next = (idx + 1) % n;
        Some(g.members[idx].clone())
    }
}

impl Core {
    /// At a group's home: picks a member (round robin over online members; if none is
    /// online, a persistent one, which queues) and sends it the message.
    /// `tried`: the member that just refused it (not picked again), how many tried
    /// before, and what they did with it (see [`Event::SharedDeliver`]).
    pub(super) fn shared_dispatch(
        &mut self,
        key: Arc<str>,
        msg: SharedMessage,
        tried: (Option<&MqttStr>, u8, Fate),
        reply: Option<(usize, Token)>,
        now: Instant,
    ) -> Dispatched {
        let (not, attempts, fate) = tried;
        let auth = &self.logins.auth;
        let may_read = |m: &SharedMember| {
            m.identity.as_ref().is_none_or(|user| {
                let user = user.as_ref().map(|u| u.as_str());
                auth.allows(user, &m.client_id, msg.topic.as_str(), Access::Read)
            })
        };
        // Members moving to another node take nothing here; if only such members are left,
        // the publisher hears a failure (it sends the message again), not a success.
        let moving = self.moving_bits();
        let may_take = |m: &SharedMember| {
            may_read(m) && moving.as_ref().is_none_or(|b| !in_bits(b, &m.client_id))
        };
        let Some(member) = self.groups.pick(&key, not, may_take) else {
            if moving.is_some() && msg.qos != QoS::AtMostOnce {
                self.fate.moving = true;
            }
            self.stats.shared_dropped_no_member += 1;
            return Dispatched::Dropped;
        };
        let to = member.shard as usize;
        if to != self.id {
            let event = Event::SharedDeliver {
                key,
                client_id: member.client_id,
                msg,
                attempts,
                reply,
                fate,
            };
            self.sink.push(to, event);
            return Dispatched::Remote;
        }
        // A member here: its copy is covered by this shard's own durability. One that
        // cannot take it passes it on at once, so that the caller learns where it went.
        if self.shared_take(&key, &member.client_id, &msg, now) {
            Dispatched::Local
        } else if attempts < SHARED_ATTEMPTS_MAX {
            let tried = (Some(&member.client_id), attempts + 1, fate);
            self.shared_dispatch(key, msg, tried, reply, now)
        } else {
            Dispatched::Dropped
        }
    }

    /// Hands a shared message to the member `client_id`, a session of this shard. Returns
    /// whether it took it: not when it is gone, may not read the topic, left the group, or
    /// its queue (or the storage budget) refused it (what it did is noted in the fate).
    pub(super) fn shared_take(
        &mut self,
        key: &Arc<str>,
        client_id: &MqttStr,
        msg: &SharedMessage,
        now: Instant,
    ) -> bool {
        if self.is_moving(client_id) {
            // Moving to another node: another member takes it (see `shared_dispatch`).
            return false;
        }
        let outcome = match self.sessions.get_mut(client_id) {
            Some(s) if !may_read(&self.logins.auth, s, &msg.topic) => {
                self.stats.acl_denied_delivery += 1;
                None
            }
            Some(s) => {
                let d = s.subscriptions.get(key).map(|sub| Delivery {
                    qos: msg.qos.min(sub.options.qos),
                    retain: sub.options.retain_as_published && msg.retain,
                    sub_ids: sub.id.into_iter().collect(),
                    msg: msg.clone(),
                    via_share: Some(key.clone()),
                });
                d.map(|d| s.deliver(d, &self.limits, now))
            }
            None => None,
        };
        let Some(outcome) = outcome else {
            return false;
        };
        self.note_outcome(outcome);
        self.sync_session(client_id, now);
        !matches!(
            outcome,
            DeliverOutcome::Dropped(DropReason::QueueFull | DropReason::StorageBudget)
        )
    }

    /// After a bounced shared message was dispatched again at its group's home: a member
    /// here took it (answer once this shard's writes are durable), one elsewhere answers
    /// itself, or no member could take it (answer at once).
    pub(super) fn after_bounce(
        &mut self,
        dispatched: Dispatched,
        reply: Option<(usize, Token)>,
        fate: Fate,
        now: Instant,
    ) {
        let Some((to, token)) = reply else {
            return;
        };
        match dispatched {
            Dispatched::Local => {
                self.wait_durable(Waiter::Remote { to, token, fate }, now);
            }
            Dispatched::Remote => {}
            // What the members tried before did with it (a full queue, say) is the answer.
            Dispatched::Dropped => self.send(
                to,
                Event::Ack {
                    token,
                    ok: true,
                    fate,
                },
            ),
        }
    }

    /// At the group's home: `member` joins (or updates its subscription). The first member
    /// makes the group a subscriber of its filter here, and the index update on every
    /// shard is awaited before the member's shard is answered.
    pub(super) fn shared_join(&mut self, key: Arc<str>, member: SharedMember, reply: Token) {
        let to = member.shard as usize;
        let fresh = self.groups.join(key.clone(), member);
        let mut remaining = 0;
        // The key is a filter the codec validated on the member's shard.
        let filter = TopicFilter::new(&key).ok().filter(|_| fresh);
        if let Some(filter) = filter {
            // In a cluster, this node's shards learn of the group first (before the index
            // event), the other nodes by its key: the node a group gets a message on is
            // picked where it is published.
            self.announce_group_here(&key, true);
            let token = self.token();
            let entry = self.subs.entry(filter.filter());
            let first = entry.is_empty();
            entry.push(LocalSub::Group { key: key.clone() });
            if first {
                let peers: Vec<usize> = self.peers().collect();
                remaining += self.index_add(filter.filter(), Some(token), &peers);
            }
            remaining += self.announce_route(&key, true, Some(token));
            if remaining > 0 {
                self.begin(
                    token,
                    RoundTrip::new(remaining, Completion::Relay { to, token: reply }),
                );
            }
        }
        if remaining == 0 {
            self.send(to, Event::done(reply));
        }
    }

    /// At the group's home: a member left; the last one takes the group's subscription.
    pub(super) fn shared_leave(&mut self, key: Arc<str>, client_id: &MqttStr) {
        if self.groups.leave(&key, client_id) {
            // The key is a filter the codec validated on the member's shard.
            let Ok(filter) = TopicFilter::new(&key) else {
                return;
            };
            self.announce_route(&key, false, None);
            self.announce_group_here(&key, false);
            let f = filter.filter();
            if let Some(entry) = self.subs.get_mut(f) {
                entry.retain(|s| !matches!(s, LocalSub::Group { key: k } if *k == key));
                if entry.is_empty() {
                    self.subs.remove(f);
                    self.index_remove(f);
                }
            }
        }
    }

    /// At a member's shard: the group's home offers it a message. Taken, it is answered
    /// once durable; refused, it goes back to the home for another member (at most
    /// [`SHARED_ATTEMPTS_MAX`] offers), then it is dropped and the publisher answered.
    pub(super) fn on_shared_deliver(&mut self, o: SharedOffer, client_id: MqttStr, now: Instant) {
        let mut taken = false;
        let mut fate = self.with_fate(|c| taken = c.shared_take(&o.key, &client_id, &o.msg, now));
        fate.merge(o.carried);
        if taken {
            if let Some((to, token)) = o.reply {
                self.wait_durable(Waiter::Remote { to, token, fate }, now);
            }
        } else if o.attempts < SHARED_ATTEMPTS_MAX {
            let home = owner_shard(o.key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedBounce {
                    key: o.key,
                    msg: o.msg,
                    not: client_id,
                    attempts: o.attempts + 1,
                    reply: o.reply,
                    fate,
                },
            );
        } else if let Some((to, token)) = o.reply {
            self.send(
                to,
                Event::Ack {
                    token,
                    ok: true,
                    fate,
                },
            );
        }
    }
}

/// A shared message offered to a member (see [`Core::on_shared_deliver`]).
pub(super) struct SharedOffer {
    pub key: Arc<str>,
    pub msg: SharedMessage,
    /// Offers made so far.
    pub attempts: u8,
    /// Who waits for the answer: (shard, token).
    pub reply: Option<(usize, Token)>,
    /// What the members offered before did with it.
    pub carried: Fate,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, online: bool, persistent: bool) -> SharedMember {
        SharedMember {
            client_id: MqttStr::new(id).unwrap(),
            shard: 0,
            options: SubscriptionOptions::default(),
            sub_id: None,
            online,
            persistent,
            identity: None,
        }
    }

    fn picks(g: &mut SharedGroups, key: &Arc<str>, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                g.pick(key, None, |_| true)
                    .map_or("-".into(), |m| m.client_id.as_str().to_string())
            })
            .collect()
    }

    #[test]
    fn members_take_turns_online_first_then_offline_persistent_ones() {
        let mut g = SharedGroups::default();
        let key: Arc<str> = Arc::from("$share/g/t");
        assert!(g.join(key.clone(), member("a", true, false)));
        assert!(!g.join(key.clone(), member("b", true, true)));
        assert!(!g.join(key.clone(), member("c", false, true)));
        assert_eq!(picks(&mut g, &key, 4), ["a", "b", "a", "b"]);
        g.set_online(&key, &MqttStr::new("a").unwrap(), false);
        g.set_online(&key, &MqttStr::new("b").unwrap(), false);
        // Nobody online: the offline persistent members queue in turn; "a" is not persistent.
        assert_eq!(picks(&mut g, &key, 3), ["c", "b", "c"]);
    }

    #[test]
    fn the_member_that_refused_and_members_that_may_not_read_are_skipped() {
        let mut g = SharedGroups::default();
        let key: Arc<str> = Arc::from("$share/g/t");
        g.join(key.clone(), member("a", true, false));
        g.join(key.clone(), member("b", true, false));
        let a = MqttStr::new("a").unwrap();
        for _ in 0..3 {
            let m = g.pick(&key, Some(&a), |_| true).unwrap();
            assert_eq!(m.client_id.as_str(), "b");
        }
        assert!(g
            .pick(&key, None, |m| m.client_id.as_str() == "zz")
            .is_none());
        assert!(g
            .pick(&Arc::from("$share/none/t"), None, |_| true)
            .is_none());
    }

    #[test]
    fn joining_again_updates_and_the_last_leaver_ends_the_group() {
        let mut g = SharedGroups::default();
        let key: Arc<str> = Arc::from("$share/g/t");
        g.join(key.clone(), member("a", false, false));
        g.join(key.clone(), member("a", true, false)); // the same client again, now online
        assert_eq!(picks(&mut g, &key, 2), ["a", "a"], "listed once, updated");
        g.join(key.clone(), member("b", true, false));
        assert!(!g.leave(&key, &MqttStr::new("a").unwrap()));
        assert!(!g.leave(&key, &MqttStr::new("nobody").unwrap()));
        assert!(
            g.leave(&key, &MqttStr::new("b").unwrap()),
            "the last member ends it"
        );
        assert!(!g.leave(&key, &MqttStr::new("b").unwrap()), "gone already");
        assert!(g.pick(&key, None, |_| true).is_none());
        assert!(g.join(key, member("c", true, false)), "a new group");
    }
}
