//! Session life: CONNECT (new session, resume, takeover), the end of a connection (will,
//! expiry), the end of a session, client id assignment, and closing everything at stop.

use super::*;

impl Core {
    /// Accepts (or refuses) a CONNECT for a client this shard owns. Writes CONNACK and any
    /// resent messages to `out`. `Err` carries the refusal already written to `out`.
    pub fn connect(
        &mut self,
        c: &Connect,
        assigned_id: Option<MqttStr>,
        out: Rc<Outbound>,
        now: Instant,
    ) -> Result<Accepted, ReasonCode> {
        self.connect_as(c, assigned_id, Login::anonymous(), out, now)
    }

    /// [`Core::connect`] for a client whose login was checked ([`Core::check_login`]): a
    /// refused login gets CONNACK 0x86 (3.x: 0x04) and nothing else, before any session is
    /// touched; so does a will the user may not publish (0x87 / 0x05).
    pub fn connect_as(
        &mut self,
        c: &Connect,
        assigned_id: Option<MqttStr>,
        login: Login,
        out: Rc<Outbound>,
        now: Instant,
    ) -> Result<Accepted, ReasonCode> {
        let version = c.protocol;
        // What the session keeps of the CONNECT gets allocations of its own, so that the
        // rest of the packet (a password, user properties, up to the packet limit) is freed.
        let client_id = assigned_id
            .clone()
            .unwrap_or_else(|| c.client_id.detached());
        let username = login.username.as_ref().map(|u| u.detached());
        let admitted = self
            .check_placement(&client_id)
            .and_then(|()| self.admit_connect(c, &client_id, &login))
            .and_then(|()| self.check_owner(c, &client_id, &username, login.peer));
        if let Err(rc) = admitted {
            out.send(&Packet::ConnAck(Box::new(ConnAck {
                session_present: false,
                reason_code: rc,
                properties: ConnAckProperties::default(),
            })));
            out.close(None);
            return Err(rc);
        }
        let expiry_s = self.session_expiry_of(c);
        let session_present = self.take_over(c, &client_id, now);
        // CONNACK, before anything the session resends.
        let keep_alive_s = c.keep_alive.min(self.cfg.limits.keep_alive_max_s);
        out.send(&Packet::ConnAck(Box::new(ConnAck {
            session_present: session_present && version != ProtocolVersion::V3_1,
            reason_code: ReasonCode::Success,
            properties: self.connack_properties(c, assigned_id, keep_alive_s, expiry_s),
        })));
        let conn_id = self.next_conn_id;
        self.next_conn_id += 1;
        self.stats.connections += 1;
        self.stats.connects_total += 1;
        let link = self.link_of(c, conn_id, out.clone(), login.peer, keep_alive_s);
        let will = will_of(c, &client_id, now);
        self.attach_session(&client_id, version, expiry_s, &username, will, link, now);
        if self.conn_line(now) {
            tracing::info!(
                client = %client_id,
                peer = ?login.peer,
                user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                protocol = inspect::protocol_name(version),
                session_present,
                keep_alive_s,
                "client connected"
            );
        }
        Ok(Accepted {
            ctx: ConnCtx {
                conn_id,
                client_id,
                version,
                out,
                username,
                aliases_in: HashMap::new(),
                peer: login.peer,
            },
            keep_alive_s,
        })
    }

    /// CONNACK's MQTT 5 properties: this broker's limits, and what it changed of the
    /// client's asks (an assigned client id, keep alive, session expiry).
    fn connack_properties(
        &self,
        c: &Connect,
        assigned_id: Option<MqttStr>,
        keep_alive_s: u16,
        expiry_s: u32,
    ) -> ConnAckProperties {
        let mut props = ConnAckProperties::default();
        if !c.protocol.is_v5() {
            return props;
        }
        let l = &self.cfg.limits;
        props.receive_maximum = Some(l.receive_maximum).filter(|&r| r != u16::MAX);
        props.maximum_packet_size = Some(l.packet_bytes_max);
        props.topic_alias_maximum = Some(l.topic_alias_max).filter(|&a| a > 0);
        props.assigned_client_identifier = assigned_id;
        if keep_alive_s != c.keep_alive {
            props.server_keep_alive = Some(keep_alive_s);
        }
        if expiry_s != c.properties.session_expiry_interval.unwrap_or(0) {
            props.session_expiry_interval = Some(expiry_s);
        }
        props
    }

    /// The session's link to the connection, with the flow limits the client asked for.
    fn link_of(
        &self,
        c: &Connect,
        conn_id: u64,
        out: Rc<Outbound>,
        peer: Option<std::net::SocketAddr>,
        keep_alive_s: u16,
    ) -> Link {
        let cp = &c.properties;
        let mut link = Link::new(
            conn_id,
            out,
            cp.receive_maximum.unwrap_or(u16::MAX),
            cp.maximum_packet_size.unwrap_or(u32::MAX),
            cp.topic_alias_maximum
                .unwrap_or(0)
                .min(self.cfg.limits.topic_alias_max),
        );
        link.peer = peer;
        link.keep_alive_s = keep_alive_s;
        link
    }

    /// The checks a CONNECT passes before its session is touched: the client id, the
    /// authentication method, the login, the will topic's access. `Err`: the CONNACK code.
    fn admit_connect(
        &mut self,
        c: &Connect,
        client_id: &MqttStr,
        login: &Login,
    ) -> Result<(), ReasonCode> {
        let id_max = if c.protocol == ProtocolVersion::V3_1 {
            23
        } else {
            self.cfg.limits.client_id_bytes_max as usize
        };
        if client_id.len() > id_max || client_id.is_empty() {
            return Err(ReasonCode::ClientIdentifierNotValid);
        }
        if c.protocol.is_v5() && c.properties.authentication_method.is_some() {
            return Err(ReasonCode::BadAuthenticationMethod);
        }
        if login.refused == Some(LoginFailure::Busy) {
            // Not a verdict on the credentials: the shard has enough checks in flight.
            self.stats.logins_busy += 1;
            tracing::debug!(client = %client_id, peer = ?login.peer, "login refused: busy");
            return Err(ReasonCode::ServerBusy);
        }
        if let Some(why) = login.refused {
            self.stats.logins_failed += 1;
            tracing::warn!(
                user = login.username.as_ref().map_or("", |u| u.as_str()),
                client = %client_id,
                peer = ?login.peer,
                reason = why.as_str(),
                "login refused"
            );
            return Err(ReasonCode::BadUserNameOrPassword);
        }
        if let Some(w) = &c.will {
            let user = login.username.as_ref().map(|u| u.as_str());
            if !self
                .logins
                .auth
                .allows(user, client_id, w.topic.as_str(), Access::Write)
            {
                self.stats.acl_denied_publish += 1;
                tracing::info!(client = %client_id, topic = %w.topic.as_str(), "will topic not allowed");
                return Err(ReasonCode::NotAuthorized);
            }
        }
        Ok(())
    }

    /// The Session Expiry Interval a CONNECT gets: what it asks (MQTT 5) or its clean
    /// session flag means (3.x), capped by `sessions.session_expiry_max_s`.
    fn session_expiry_of(&self, c: &Connect) -> u32 {
        let cfg = &self.cfg.sessions;
        let requested = if c.protocol.is_v5() {
            c.properties
                .session_expiry_interval
                .unwrap_or(if c.clean_start {
                    0
                } else {
                    cfg.session_expiry_default_s
                })
        } else if c.clean_start {
            0
        } else {
            cfg.session_expiry_max_s
        };
        requested.min(cfg.session_expiry_max_s)
    }

    /// A session belongs to the user that made it: another user may neither take it over
    /// (and read its queue) nor end it with a clean start. Only a session that outlives its
    /// connection holds anything of its owner's (a queue, subscriptions, a will): a clean
    /// session ends with its connection, and its client id is taken over as the protocol
    /// has it.
    fn check_owner(
        &mut self,
        c: &Connect,
        client_id: &MqttStr,
        username: &Option<MqttStr>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), ReasonCode> {
        if !self.logins.auth.sessions_have_owners() {
            return Ok(());
        }
        let owner = self
            .sessions
            .get(client_id)
            .filter(|s| s.expiry_s > 0)
            .map(|s| s.owner.clone());
        if owner == Some(None) && !c.clean_start {
            tracing::warn!(
                client = %client_id,
                user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                "a session without a recorded owner (made before owners were recorded, or while no password or ACL file was in force) now belongs to this user"
            );
        }
        if let Some(owner) = owner.flatten().filter(|o| o != username) {
            self.stats.takeovers_refused += 1;
            tracing::warn!(
                client = %client_id,
                user = username.as_ref().map_or("(anonymous)", |u| u.as_str()),
                owner = owner.as_ref().map_or("(anonymous)", |u| u.as_str()),
                peer = ?peer,
                "connect refused: the session of this client id belongs to another user"
            );
            return Err(ReasonCode::NotAuthorized);
        }
        Ok(())
    }

    /// Ends the client id's current connection (takeover, without DISCONNECT) and, for a
    /// clean start or a session that ends with its connection, the session, its will
    /// published as the protocol has it. Returns whether a session is present.
    fn take_over(&mut self, c: &Connect, client_id: &MqttStr, now: Instant) -> bool {
        let mut will_now: Option<Will> = None;
        let mut end_existing = false;
        if let Some(s) = self.sessions.get_mut(client_id) {
            if let Some(old) = s.detach(now) {
                old.out.close(Some(ReasonCode::SessionTakenOver));
                self.stats.connection_ended();
                s.epoch = Core::bump(&mut self.next_epoch);
                let ends = c.clean_start || s.expiry_s == 0;
                if let Some(w) = s.will.take() {
                    if ends || w.delay_s == 0 {
                        will_now = Some(w);
                    }
                }
                end_existing = ends;
            } else if c.clean_start {
                end_existing = true;
            } else {
                // Back before the will delay passed: the will is not sent (MQTT-3.1.3-9).
                s.will = None;
            }
        }
        if let Some(w) = will_now {
            self.publish_will(w, now);
        }
        if end_existing {
            self.end_session(client_id, now);
        }
        // Back online: the timers of its offline period are void.
        self.cancel_timers(client_id);
        self.sessions.contains_key(client_id)
    }

    /// Makes or resumes the client's session on `link`: its expiry, identity, owner and
    /// will; what waits for it checked against the access rules in force; the shared
    /// groups it is in told it is online; the record stored.
    #[allow(clippy::too_many_arguments)]
    fn attach_session(
        &mut self,
        client_id: &MqttStr,
        version: ProtocolVersion,
        expiry_s: u32,
        username: &Option<MqttStr>,
        will: Option<Will>,
        link: Link,
        now: Instant,
    ) {
        debug_assert_eq!(
            owner_shard(client_id.as_bytes(), self.count),
            self.id,
            "a session lives on the shard its client id hashes to (one owner per session)"
        );
        let owned = self.logins.auth.sessions_have_owners();
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Box::new(Session::new(client_id.clone(), version, expiry_s)));
        session.expiry_s = expiry_s;
        session.identity = Some(username.clone());
        // Recorded only under owner rules: a session made without them is not locked to a
        // name nobody verified.
        session.owner = owned.then(|| username.clone());
        session.epoch = Core::bump(&mut self.next_epoch);
        session.will = will;
        session.persistent |= self.store.is_some() && expiry_s > 0;
        // What waits for it was checked when queued, under the rules of that time: check
        // again (a reload may have taken read access away).
        if self.logins.auth.has_acl() {
            let auth = &self.logins.auth;
            let dropped = session.drop_unreadable(|t| readable(auth, username, client_id, t));
            self.stats.acl_denied_delivery += dropped;
        }
        session.attach(link, &self.limits, now);
        self.tell_groups(client_id, true);
        self.write_session_record(client_id, now);
        self.sync_session(client_id, now);
    }

    /// The writer of connection `conn_id` made room in a buffer a session had found full:
    /// moves the session's queued messages in (as far as window and buffer allow).
    pub fn on_writable(&mut self, client_id: &MqttStr, conn_id: u64, now: Instant) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.link.as_ref().map(|l| l.conn_id) != Some(conn_id) {
            return;
        }
        s.pump(&self.limits, now);
        self.sync_session(client_id, now);
    }

    /// The connection of `ctx` has ended. Decides the will and the session's future.
    pub fn disconnected(&mut self, ctx: &ConnCtx, ending: Ending, now: Instant) {
        let Some(s) = self.sessions.get(&ctx.client_id) else {
            return;
        };
        if s.link.as_ref().map(|l| l.conn_id) != Some(ctx.conn_id) {
            return; // taken over already
        }
        if self.conn_line(now) {
            tracing::info!(
                client = %ctx.client_id,
                peer = ?ctx.peer,
                reason = match ending {
                    Ending::Normal => "DISCONNECT",
                    Ending::WithWill => "DISCONNECT with will",
                    Ending::Lost => "connection lost or closed by the broker",
                },
                "client disconnected"
            );
        }
        let Some((epoch, expiry_s)) = self.go_offline(&ctx.client_id, ending, now) else {
            return;
        };
        if expiry_s == 0 {
            self.end_session(&ctx.client_id, now);
            return;
        }
        self.schedule_offline(&ctx.client_id, epoch, expiry_s, now);
        self.write_session_record(&ctx.client_id, now);
        self.sync_session(&ctx.client_id, now);
    }

    /// Detaches the session from its connection: a new epoch (timers of the old one are
    /// void), the will kept or dropped as the ending says, its shared groups told it is
    /// offline and, for a session that stays, what they had queued for it handed back.
    /// Returns its epoch and expiry.
    fn go_offline(
        &mut self,
        client_id: &MqttStr,
        ending: Ending,
        now: Instant,
    ) -> Option<(u64, u32)> {
        let s = self.sessions.get_mut(client_id)?;
        s.detach(now);
        s.epoch = Core::bump(&mut self.next_epoch);
        self.stats.connection_ended();
        let persistent = s.expiry_s > 0;
        if ending == Ending::Normal || (self.stopping && !persistent) {
            // A clean DISCONNECT discards the will; a clean session ends with the process
            // at stop (see `close_all`).
            s.will = None;
        }
        let (epoch, expiry_s) = (s.epoch, s.expiry_s);
        let handback = if persistent {
            s.take_queued_shared()
        } else {
            Vec::new()
        };
        self.tell_groups(client_id, false);
        self.hand_back(client_id, handback);
        Some((epoch, expiry_s))
    }

    /// A session moving to another node goes offline here as for a lost connection (its
    /// client is told `rc`), except that its will is neither published nor timed here: it
    /// stays in the stored record, which the move carries. A session that ends with its
    /// connection (expiry 0) ends.
    pub(super) fn offline_for_move(&mut self, client_id: &MqttStr, rc: ReasonCode, now: Instant) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(l) = s.link.as_ref() else {
            return;
        };
        l.out.close(Some(rc));
        let will = s.will.take();
        let Some((epoch, expiry_s)) = self.go_offline(client_id, Ending::Lost, now) else {
            return;
        };
        if expiry_s == 0 {
            self.end_session(client_id, now);
            return;
        }
        self.schedule_offline(client_id, epoch, expiry_s, now);
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.will = will;
        }
        self.write_session_record(client_id, now);
        self.sync_session(client_id, now);
    }

    /// The will (now, or after its delay if that comes before the expiry) and the expiry
    /// of a session that went offline.
    fn schedule_offline(&mut self, client_id: &MqttStr, epoch: u64, expiry_s: u32, now: Instant) {
        let will_delay = self
            .sessions
            .get(client_id)
            .and_then(|s| s.will.as_ref())
            .map(|w| w.delay_s);
        if let Some(delay) = will_delay.filter(|_| !self.stopping) {
            if delay == 0 {
                if let Some(w) = self.sessions.get_mut(client_id).and_then(|s| s.will.take()) {
                    self.publish_will(w, now);
                }
            } else if delay < expiry_s {
                self.schedule(
                    now + Duration::from_secs(delay as u64),
                    TimerKind::Will {
                        client_id: client_id.clone(),
                        epoch,
                    },
                );
            }
        }
        if expiry_s != u32::MAX {
            self.schedule(
                now + Duration::from_secs(expiry_s as u64),
                TimerKind::Expire {
                    client_id: client_id.clone(),
                    epoch,
                },
            );
        }
    }

    /// Tells the homes of the shared groups the session is in that its client came online
    /// or went offline.
    fn tell_groups(&mut self, client_id: &MqttStr, online: bool) {
        let Some(s) = self.sessions.get(client_id) else {
            return;
        };
        let keys: Vec<Arc<str>> = s
            .subscriptions
            .values()
            .filter(|s| s.filter.is_shared())
            .map(|s| Arc::from(s.filter.as_str()))
            .collect();
        for key in keys {
            let home = owner_shard(key.as_bytes(), self.count);
            self.send(
                home,
                Event::SharedOnline {
                    key,
                    client_id: client_id.clone(),
                    online,
                },
            );
        }
    }

    pub(super) fn hand_back(&mut self, client_id: &MqttStr, deliveries: Vec<Delivery>) {
        for d in deliveries {
            if let Some(key) = d.via_share {
                let home = owner_shard(key.as_bytes(), self.count);
                self.send(
                    home,
                    Event::SharedBounce {
                        key,
                        msg: d.msg,
                        not: client_id.clone(),
                        attempts: 0,
                        reply: None,
                        fate: Fate::default(),
                    },
                );
            }
        }
    }

    /// Publishes a will now (its delay or its session is over), counted from now for expiry.
    pub(super) fn publish_will(&mut self, will: Will, now: Instant) {
        if is_sys_topic(&will.msg.topic) {
            self.stats.sys_publish_dropped += 1;
            return;
        }
        self.stats.wills_published += 1;
        let mut msg = (*will.msg).clone();
        msg.created = now;
        self.route(Arc::new(msg), now, None);
    }

    /// Ends the session `client_id` here because it lives on another node now (moved there,
    /// or failed over): its routes go and its stored state is deleted, but nothing of it is
    /// published or released here (its will, the QoS 2 keys of what its client published,
    /// its shared messages are the other node's now). Its client, if connected, is told to
    /// go elsewhere.
    pub(super) fn end_moved_session(&mut self, client_id: &MqttStr, now: Instant) {
        if let Some(s) = self.sessions.get_mut(client_id) {
            s.will = None;
            s.qos2_published = false;
            drop(s.take_undelivered_shared());
            if let Some(l) = s.detach(now) {
                l.out.close(Some(ReasonCode::UseAnotherServer));
                self.stats.connection_ended();
            }
        }
        self.end_session(client_id, now);
    }

    /// Ends a session: its subscriptions leave the routing tables, shared messages it had not
    /// taken go back to their groups, and a will still pending is published.
    pub(super) fn end_session(&mut self, client_id: &MqttStr, now: Instant) {
        self.cancel_timers(client_id);
        let Some(mut s) = self.sessions.remove(client_id) else {
            return;
        };
        self.counters_dirty.remove(client_id);
        self.stats.ended_sessions.add(&s.stats);
        if s.budget_counted > 0 {
            self.queued_bytes = self.queued_bytes.saturating_sub(s.budget_counted);
            self.budget.set(self.id, self.queued_bytes);
            self.check_budget();
        }
        if let Some(l) = s.detach(now) {
            l.out.close(None);
            self.stats.connection_ended();
        }
        let undelivered = s.take_undelivered_shared();
        self.hand_back(client_id, undelivered);
        for sub in s.subscriptions.values() {
            self.remove_subscription(client_id, &sub.filter);
        }
        for (origin, pid) in s.qos2_keys() {
            self.drop_qos2_holder(origin, *pid, client_id);
        }
        if s.qos2_published && self.store.is_some() {
            // Its QoS 2 messages not yet released (incoming ids outstanding, or left by a
            // crash before their id was stored) are forgotten everywhere; a later session
            // with this client id starts afresh. No one waits.
            self.release_qos2(client_id, None, None, now);
        }
        if s.persistent {
            self.write(|b| b.delete_session(client_id.as_str()));
        }
        if let Some(w) = s.will.take() {
            self.publish_will(w, now);
        }
    }

    // ---------------------------------------------------------------- timers

    /// A fresh client id that this shard owns, for a client that sent an empty one, unique
    /// among this shard's sessions (MQTT-3.1.3-6).
    pub fn assign_client_id(&mut self, seed: u64) -> MqttStr {
        // Candidates step by 1. Seeds step by a large odd stride, so one search never runs
        // into the next seed (stepping by the seed stride did: a candidate rejected here was
        // the next seed, and two clients were given the same id).
        let mut n = seed;
        loop {
            // Short ASCII: always a valid MQTT string.
            if let Ok(id) = MqttStr::new(&format!("shardmq-{:x}-{:x}", self.id, n)) {
                if owner_shard(id.as_bytes(), self.count) == self.id
                    && !self.sessions.contains_key(&id)
                {
                    return id;
                }
            }
            n = n.wrapping_add(1);
        }
    }

    /// Closes every connection (shutdown): MQTT 5 clients get DISCONNECT 0x8B.
    ///
    /// No will is published from here on: a stop of the broker is not a failure of its
    /// clients. A persistent session keeps its will, stored with the time the connection
    /// closed, so that after the restart its Will Delay Interval (0 included) runs on from
    /// that moment and the will is published then, unless the client is back first or the
    /// session ends. The will of a session that ends with the connection (clean session,
    /// Session Expiry Interval 0) is dropped with it.
    pub fn close_all(&mut self) {
        self.stopping = true;
        self.flush_counters();
        for s in self.sessions.values() {
            if let Some(l) = &s.link {
                l.out.close(Some(ReasonCode::ServerShuttingDown));
            }
        }
    }
}

/// The will of a CONNECT, with allocations of its own (not pinning the packet's buffer).
fn will_of(c: &Connect, client_id: &MqttStr, now: Instant) -> Option<Will> {
    let w = c.will.as_ref()?;
    let p = &w.properties;
    Some(Will {
        msg: Arc::new(Message {
            topic: w.topic.detached(),
            payload: bytes::Bytes::copy_from_slice(&w.payload),
            qos: w.qos,
            retain: w.retain,
            properties: PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                topic_alias: None,
                response_topic: p.response_topic.as_ref().map(TopicName::detached),
                correlation_data: p
                    .correlation_data
                    .as_deref()
                    .map(bytes::Bytes::copy_from_slice),
                user_properties: p
                    .user_properties
                    .iter()
                    .map(|(k, v)| (k.detached(), v.detached()))
                    .collect(),
                subscription_identifiers: Vec::new(),
                content_type: p.content_type.as_ref().map(MqttStr::detached),
            },
            origin: Some(client_id.clone()),
            qos2_id: None,
            created: now,
            groups: None,
        }),
        delay_s: p.will_delay_interval.unwrap_or(0),
    })
}
