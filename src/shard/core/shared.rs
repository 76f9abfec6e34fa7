//! Shared subscriptions at their home shard: choosing a member, offering the message to it
//! (possibly on another shard), and the next member when one refuses.

use super::*;

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
        let Some(g) = self.groups.get_mut(&key) else {
            self.stats.shared_dropped_no_member += 1;
            return Dispatched::Dropped;
        };
        let n = g.members.len();
        let auth = &self.auth;
        let eligible = |m: &SharedMember, online: bool| {
            Some(&m.client_id) != not
                && (m.online == online)
                && (online || m.persistent)
                && m.identity.as_ref().is_none_or(|user| {
                    let user = user.as_ref().map(|u| u.as_str());
                    auth.allows(user, &m.client_id, msg.topic.as_str(), Access::Read)
                })
        };
        let mut pick = None;
        for online in [true, false] {
            for k in 0..n {
                let idx = (g.next + k) % n;
                if eligible(&g.members[idx], online) {
                    pick = Some(idx);
                    break;
                }
            }
            if pick.is_some() {
                break;
            }
        }
        let Some(idx) = pick else {
            self.stats.shared_dropped_no_member += 1;
            return Dispatched::Dropped;
        };
        g.next = (idx + 1) % n;
        let member = g.members[idx].clone();
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
        let outcome = match self.sessions.get_mut(client_id) {
            Some(s) if !may_read(&self.auth, s, &msg.topic) => {
                self.stats.acl_denied_delivery += 1;
                None
            }
            Some(s) => {
                let d = s.subscriptions.get(&**key).map(|sub| Delivery {
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

    // ---------------------------------------------------------------- subscribe

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

    // ---------------------------------------------------------------- QoS 2 dedup keys
}
