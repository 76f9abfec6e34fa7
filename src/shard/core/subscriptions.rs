//! SUBSCRIBE and UNSUBSCRIBE: access checks, the session's subscriptions, the routing
//! index updates on every shard, and the SUBACK that waits for them.

use super::*;

impl Core {
    pub(super) fn on_subscribe(&mut self, ctx: &ConnCtx, s: Subscribe, now: Instant) {
        let token = self.token();
        let mut remaining = 0usize;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let sub_id = s.properties.subscription_identifier;
        let peers: Vec<usize> = self.peers().collect();
        let mut adding: Vec<Arc<str>> = Vec::new();
        let mut local_joins = Vec::new();
        for (filter, options) in s.filters {
            let rc = self.check_filter(ctx, &filter);
            if matches!(rc, ReasonCode::NotAuthorized | ReasonCode::UnspecifiedError) {
                self.stats.acl_denied_subscribe += 1;
            }
            if rc != ReasonCode::Success {
                codes.push(rc); // 3.x SUBACK encodes any failure as 0x80
                continue;
            }
            let Some(session) = self.sessions.get_mut(&ctx.client_id) else {
                codes.push(ReasonCode::UnspecifiedError);
                continue;
            };
            // Kept for the session's life: its own bytes, not its SUBSCRIBE packet's.
            let new_sub = Subscription {
                filter: filter.detached(),
                options,
                id: sub_id,
            };
            let previous = session
                .subscriptions
                .insert(filter.as_str().into(), new_sub.clone());
            let existed = previous.is_some();
            self.write_subscription(&ctx.client_id, Some(&new_sub), filter.as_str());
            let Some(session) = self.sessions.get(&ctx.client_id) else {
                continue;
            };
            let persistent = session.expiry_s > 0;
            if filter.is_shared() {
                let key: Arc<str> = Arc::from(filter.as_str());
                let home = owner_shard(key.as_bytes(), self.count);
                remaining += 1;
                let join = Event::SharedJoin {
                    key,
                    member: SharedMember {
                        client_id: ctx.client_id.clone(),
                        shard: self.id as u16,
                        options,
                        sub_id,
                        online: true,
                        persistent,
                        identity: Some(ctx.username.clone()),
                    },
                    reply: token,
                };
                if home == self.id {
                    // Handled here, and answered at once: only after the SUBACK's pending
                    // entry exists, or the answer would find nothing to count down.
                    local_joins.push(join);
                } else {
                    self.sink.push(home, join);
                }
            } else {
                let entry = self.subs.entry(filter.filter());
                let first = entry.is_empty();
                entry.retain(
                    |s| !matches!(s, LocalSub::Client { client_id, .. } if *client_id == ctx.client_id),
                );
                entry.push(LocalSub::Client {
                    client_id: ctx.client_id.clone(),
                    options,
                    id: sub_id,
                });
                // A filter whose addition is still on its way to the peers is added again
                // (the peers' indexes are sets, and each peer answers in order), so that this
                // SUBACK too waits until every peer routes the filter here.
                let in_flight = self.index_adding.contains_key(filter.filter());
                if first || in_flight {
                    let acks = self.index_add(filter.filter(), Some(token), &peers);
                    if acks > 0 {
                        remaining += acks;
                        let key: Arc<str> = Arc::from(filter.filter());
                        *self.index_adding.entry(key.clone()).or_insert(0) += 1;
                        adding.push(key);
                    }
                }
                let send_retained = match options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !existed,
                    RetainHandling::DoNotSend => false,
                };
                if send_retained {
                    let (auth, user) = (&self.auth, ctx.username.as_ref().map(|u| u.as_str()));
                    let denied = &mut self.stats.acl_denied_delivery;
                    self.retained.for_each_match(filter.filter(), |m| {
                        if !auth.allows(user, &ctx.client_id, m.topic.as_str(), Access::Read) {
                            *denied += 1;
                            return;
                        }
                        retained.push(Delivery {
                            msg: m.clone(),
                            qos: m.qos.min(options.qos),
                            retain: true,
                            sub_ids: sub_id.into_iter().collect(),
                            via_share: None,
                        });
                    });
                }
            }
            codes.push(match options.qos {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            });
        }
        let suback = SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: codes,
        };
        // A subscription of a persistent session is acknowledged once it is on disk.
        if self.durability == Durability::Durable && self.log.write_seq > self.log.synced_seq {
            self.log
                .waiters
                .push_back((self.log.write_seq, Waiter::Local(token)));
            remaining += 1;
        }
        if remaining == 0 {
            self.finish_suback(&ctx.client_id, ctx.conn_id, suback, retained, now);
        } else {
            self.begin(
                token,
                RoundTrip::new(
                    remaining,
                    Completion::SubAck(SubAckDone {
                        client_id: ctx.client_id.clone(),
                        conn_id: ctx.conn_id,
                        suback,
                        retained,
                        adding,
                    }),
                ),
            );
        }
        for join in local_joins {
            self.on_event(self.id, join, now);
        }
    }

    pub(super) fn check_filter(&self, ctx: &ConnCtx, filter: &TopicFilter) -> ReasonCode {
        let l = &self.cfg.limits;
        if filter.as_str().len() > l.topic_bytes_max as usize
            || filter.levels() > l.topic_levels_max as usize
        {
            return ReasonCode::TopicFilterInvalid;
        }
        let user = ctx.username.as_ref().map(|u| u.as_str());
        match self
            .auth
            .refuses_subscribe(user, &ctx.client_id, filter.as_str())
        {
            // `[access] subscribe_deny`: 0x80, the failure code every client version
            // understands (what the Paho suites expect).
            Some(true) => return ReasonCode::UnspecifiedError,
            // The ACL: 0x87 (3.x SUBACK encodes it as 0x80).
            Some(false) => return ReasonCode::NotAuthorized,
            None => {}
        }
        if let Some(s) = self.sessions.get(&ctx.client_id) {
            if s.subscriptions.len() >= l.subscriptions_per_session_max as usize
                && !s.subscriptions.contains_key(filter.as_str())
            {
                return ReasonCode::QuotaExceeded;
            }
        }
        ReasonCode::Success
    }

    pub(super) fn finish_suback(
        &mut self,
        client_id: &MqttStr,
        conn_id: u64,
        suback: SubAck,
        retained: Vec<Delivery>,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        match &s.link {
            Some(l) if l.conn_id == conn_id => {
                l.out.send(&Packet::SubAck(suback));
            }
            _ => return,
        }
        for d in retained {
            let _ = s.deliver(d, &self.limits, now);
        }
        self.sync_session(client_id, now);
    }

    /// Adds this shard to the index for `filter` everywhere; returns how many acks to await.
    pub(super) fn index_add(
        &mut self,
        filter: &str,
        reply: Option<Token>,
        peers: &[usize],
    ) -> usize {
        self.index.entry(filter).insert(self.id);
        let filter: Arc<str> = Arc::from(filter);
        for &p in peers {
            self.sink.push(
                p,
                Event::Index {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    add: true,
                    reply,
                },
            );
        }
        if reply.is_some() {
            peers.len()
        } else {
            0
        }
    }

    pub(super) fn index_remove(&mut self, filter: &str) {
        if let Some(set) = self.index.get_mut(filter) {
            set.remove(self.id);
            if set.is_empty() {
                self.index.remove(filter);
            }
        }
        let filter: Arc<str> = Arc::from(filter);
        for p in self.peers() {
            self.sink.push(
                p,
                Event::Index {
                    filter: filter.clone(),
                    shard: self.id as u16,
                    add: false,
                    reply: None,
                },
            );
        }
    }

    pub(super) fn on_unsubscribe(&mut self, ctx: &ConnCtx, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in u.filters {
            let removed = self
                .sessions
                .get_mut(&ctx.client_id)
                .and_then(|s| s.subscriptions.remove(filter.as_str()));
            if removed.is_some() {
                self.remove_subscription(&ctx.client_id, &filter);
                self.write_subscription(&ctx.client_id, None, filter.as_str());
                codes.push(ReasonCode::Success);
            } else {
                codes.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        ctx.out.send(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Default::default(),
            reason_codes: if ctx.version.is_v5() {
                codes
            } else {
                Vec::new()
            },
        }));
    }

    /// Takes one subscription of `client_id` out of the routing tables (the session's own
    /// map is the caller's business).
    pub(super) fn remove_subscription(&mut self, client_id: &MqttStr, filter: &TopicFilter) {
        if filter.is_shared() {
            let key: Arc<str> = Arc::from(filter.as_str());
            let home = owner_shard(key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedLeave {
                    key,
                    client_id: client_id.clone(),
                },
            );
            return;
        }
        let f = filter.filter();
        let Some(entry) = self.subs.get_mut(f) else {
            return;
        };
        entry.retain(|s| !matches!(s, LocalSub::Client { client_id: c, .. } if c == client_id));
        if entry.is_empty() {
            self.subs.remove(f);
            self.index_remove(f);
        }
    }

    // ---------------------------------------------------------------- events
}
