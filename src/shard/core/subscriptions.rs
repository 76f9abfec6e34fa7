//! SUBSCRIBE and UNSUBSCRIBE: access checks, the session's subscriptions, the routing
//! index updates on every shard, and the SUBACK that waits for them.

use super::*;

impl Core {
    /// A SUBSCRIBE: each filter checked and added to the session; the SUBACK is held
    /// until the routing index on every shard and the shared groups' homes have the new
    /// filters, and the subscriptions are durable (see [`SubAckDone`]).
    pub(super) fn on_subscribe(&mut self, ctx: &ConnCtx, s: Subscribe, now: Instant) {
        let mut w = SubscribeWork {
            token: self.token(),
            sub_id: s.properties.subscription_identifier,
            peers: self.peers().collect(),
            remaining: 0,
            retained: Vec::new(),
            adding: Vec::new(),
            local_joins: Vec::new(),
        };
        let mut codes = Vec::with_capacity(s.filters.len());
        for (filter, options) in s.filters {
            codes.push(self.subscribe_one(ctx, filter, options, &mut w));
        }
        let suback = SubAck {
            packet_id: s.packet_id,
            properties: Default::default(),
            reason_codes: codes,
        };
        // A subscription of a persistent session is acknowledged once it is on disk.
        if self.durability.acknowledges_committed() && self.log.unsynced() {
            self.log.wait(Waiter::Local(w.token));
            w.remaining += 1;
        }
        if w.remaining == 0 {
            self.finish_suback(&ctx.client_id, ctx.conn_id, suback, w.retained, now);
        } else {
            self.begin(
                w.token,
                RoundTrip::new(
                    w.remaining,
                    Completion::SubAck(SubAckDone {
                        client_id: ctx.client_id.clone(),
                        conn_id: ctx.conn_id,
                        suback,
                        retained: w.retained,
                        adding: w.adding,
                    }),
                ),
            );
        }
        for join in w.local_joins {
            self.on_event(self.id, join, now);
        }
    }

    /// One filter of a SUBSCRIBE; returns its SUBACK code.
    fn subscribe_one(
        &mut self,
        ctx: &ConnCtx,
        filter: TopicFilter,
        options: SubscriptionOptions,
        w: &mut SubscribeWork,
    ) -> ReasonCode {
        let rc = self.check_filter(ctx, &filter);
        if matches!(rc, ReasonCode::NotAuthorized | ReasonCode::UnspecifiedError) {
            self.stats.acl_denied_subscribe += 1;
        }
        if rc != ReasonCode::Success {
            return rc; // 3.x SUBACK encodes any failure as 0x80
        }
        let Some(session) = self.sessions.get_mut(&ctx.client_id) else {
            return ReasonCode::UnspecifiedError;
        };
        // Kept for the session's life: its own bytes, not its SUBSCRIBE packet's.
        let new_sub = Subscription {
            filter: filter.detached(),
            options,
            id: w.sub_id,
        };
        let existed = session.subscriptions.insert(new_sub.clone()).is_some();
        let persistent = session.expiry_s > 0;
        self.write_subscription(&ctx.client_id, Some(&new_sub), filter.as_str());
        if filter.is_shared() {
            self.join_shared(ctx, &filter, options, persistent, w);
        } else {
            self.subscribe_local(ctx, &filter, options, existed, w);
        }
        match options.qos {
            QoS::AtMostOnce => ReasonCode::Success,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }

    /// A shared subscription: the member joins at the group's home (a round trip).
    fn join_shared(
        &mut self,
        ctx: &ConnCtx,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        persistent: bool,
        w: &mut SubscribeWork,
    ) {
        let key: Arc<str> = Arc::from(filter.as_str());
        let home = owner_shard(key.as_bytes(), self.count);
        w.remaining += 1;
        let join = Event::SharedJoin {
            key,
            member: SharedMember {
                client_id: ctx.client_id.clone(),
                shard: self.id as u16,
                options,
                sub_id: w.sub_id,
                online: true,
                persistent,
                identity: Some(ctx.username.clone()),
            },
            reply: w.token,
        };
        if home == self.id {
            // Handled here, and answered at once: only after the SUBACK's round trip
            // exists, or the answer would find nothing to count down.
            w.local_joins.push(join);
        } else {
            self.sink.push(home, join);
        }
    }

    /// A plain subscription: this shard's subscribers of the filter, the routing index on
    /// every peer (a round trip when the filter is new here), and the retained messages it
    /// matches, as its Retain Handling asks.
    fn subscribe_local(
        &mut self,
        ctx: &ConnCtx,
        filter: &TopicFilter,
        options: SubscriptionOptions,
        existed: bool,
        w: &mut SubscribeWork,
    ) {
        let entry = self.subs.entry(filter.filter());
        let first = entry.is_empty();
        let had_clients = has_clients(entry);
        entry.retain(
            |s| !matches!(s, LocalSub::Client { client_id, .. } if *client_id == ctx.client_id),
        );
        entry.push(LocalSub::Client {
            client_id: ctx.client_id.clone(),
            options,
            id: w.sub_id,
        });
        // A filter whose addition is still on its way to the peers (and the other nodes) is
        // added again (their indexes are sets, and each answers in order), so that this
        // SUBACK too waits until every peer and node routes the filter here.
        let in_flight = self.index.is_adding(filter.filter());
        let mut acks = 0;
        if first || in_flight {
            acks += self.index_add(filter.filter(), Some(w.token), &w.peers);
        }
        if !had_clients || in_flight {
            // Other nodes route the filter here for client subscribers only: a shared
            // group is announced by its key (`shared_join`).
            acks += self.announce_route(&Arc::from(filter.filter()), true, Some(w.token));
        }
        if acks > 0 {
            w.remaining += acks;
            let key: Arc<str> = Arc::from(filter.filter());
            self.index.begin_adding(key.clone());
            w.adding.push(key);
        }
        let send_retained = match options.retain_handling {
            RetainHandling::SendAtSubscribe => true,
            RetainHandling::SendAtSubscribeIfNew => !existed,
            RetainHandling::DoNotSend => false,
        };
        if send_retained {
            let (auth, user) = (&self.logins.auth, ctx.username.as_ref().map(|u| u.as_str()));
            let denied = &mut self.stats.acl_denied_delivery;
            let sub_id = w.sub_id;
            let retained = &mut w.retained;
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

    pub(super) fn check_filter(&self, ctx: &ConnCtx, filter: &TopicFilter) -> ReasonCode {
        let l = &self.cfg.limits;
        if filter.as_str().len() > l.topic_bytes_max as usize
            || filter.levels() > l.topic_levels_max as usize
        {
            return ReasonCode::TopicFilterInvalid;
        }
        let user = ctx.username.as_ref().map(|u| u.as_str());
        match self
            .logins
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
        self.index.set(filter, self.id, true);
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
        self.index.set(filter, self.id, false);
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
        let clients = has_clients(entry);
        let empty = entry.is_empty();
        if !clients {
            self.announce_route(&Arc::from(f), false, None);
        }
        if empty {
            self.subs.remove(f);
            self.index_remove(f);
        }
    }

    // ---------------------------------------------------------------- events
}

/// Whether a filter's subscribers on a shard include a client (not only shared groups).
pub(super) fn has_clients(entry: &[LocalSub]) -> bool {
    entry.iter().any(|s| matches!(s, LocalSub::Client { .. }))
}

/// What one SUBSCRIBE gathers while its filters are handled.
struct SubscribeWork {
    /// The SUBACK's round trip.
    token: Token,
    sub_id: Option<u32>,
    peers: Vec<usize>,
    /// Answers the SUBACK waits for.
    remaining: usize,
    /// Retained messages to send after the SUBACK.
    retained: Vec<Delivery>,
    /// Filters whose index additions the SUBACK waits for.
    adding: Vec<Arc<str>>,
    /// Joins of groups whose home is this shard, handled once the round trip exists.
    local_joins: Vec<Event>,
}
