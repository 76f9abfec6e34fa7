//! Inbound packets of a connection: dispatch by type, PUBLISH (access, retained, routing,
//! the acknowledgement held until durable) and DISCONNECT.

use super::*;

impl Core {
    /// Handles one packet from a connected client. `Err` is the reason to close with.
    pub fn on_packet(
        &mut self,
        ctx: &mut ConnCtx,
        packet: Packet,
        now: Instant,
    ) -> Result<Flow, ReasonCode> {
        match packet {
            Packet::Publish(p) => self.on_publish(ctx, p, now).map(|()| Flow::Continue),
            Packet::PubAck(a) => {
                self.with_session(ctx, |s, l| {
                    let _ = s.on_puback(a.packet_id, l, now);
                });
                self.sync_session(&ctx.client_id, now);
                Ok(Flow::Continue)
            }
            Packet::PubRec(a) => {
                self.on_pubrec(ctx, a, now);
                Ok(Flow::Continue)
            }
            Packet::PubComp(a) => {
                self.with_session(ctx, |s, l| {
                    let _ = s.on_pubcomp(a.packet_id, l, now);
                });
                self.sync_session(&ctx.client_id, now);
                Ok(Flow::Continue)
            }
            Packet::PubRel(a) => {
                self.on_pubrel(ctx, a.packet_id, now);
                Ok(Flow::Continue)
            }
            Packet::Subscribe(s) => {
                self.on_subscribe(ctx, s, now);
                Ok(Flow::Continue)
            }
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(ctx, u);
                Ok(Flow::Continue)
            }
            Packet::PingReq => {
                ctx.out.send(&Packet::PingResp);
                Ok(Flow::Continue)
            }
            Packet::Disconnect(d) => {
                self.on_disconnect(ctx, &d)?;
                Ok(Flow::Disconnect(
                    if d.reason_code == ReasonCode::DisconnectWithWillMessage {
                        Ending::WithWill
                    } else {
                        Ending::Normal
                    },
                ))
            }
            // A second CONNECT, AUTH without an authentication method, or a packet only a
            // server sends.
            Packet::Connect(_)
            | Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => Err(ReasonCode::ProtocolError),
        }
    }

    /// PUBREC from the client: PUBREL (0x92 for an id not in flight).
    /// PUBREC from a subscriber. For a persistent session with durable storage the PUBREL
    /// waits until the session's new state (awaiting PUBCOMP) is durable, and replicated:
    /// after a crash or a fail-over the message is then never sent again as a PUBLISH to a
    /// subscriber that has its PUBREL (it would take it for a new message).
    fn on_pubrec(&mut self, ctx: &ConnCtx, a: Ack, now: Instant) {
        let error = a.reason_code.is_error();
        let hold = self.durability.acknowledges_committed()
            && self.store.is_some()
            && self
                .sessions
                .get(&ctx.client_id)
                .is_some_and(|s| s.persistent);
        let mut unknown = false;
        self.with_session(ctx, |s, l| {
            unknown = s.on_pubrec(a.packet_id, error, !hold, l, now).is_err();
        });
        if unknown && !error {
            ctx.out.send(&Packet::PubRel(Ack::with_reason(
                a.packet_id,
                ReasonCode::PacketIdentifierNotFound,
            )));
        }
        self.sync_session(&ctx.client_id, now);
        if hold && !unknown && !error {
            let token = Some(self.token());
            let rel = Packet::PubRel(Ack::new(a.packet_id));
            self.ack_when_durable(ctx, rel, AckWait::of(token, 0), Then::Ack, now);
        }
    }

    /// PUBREL from the client: every shard forgets the message's dedup key first, durably;
    /// only then is the id deleted here, and PUBCOMP sent once that is durable too. A key
    /// left behind would make the next message with this id look like a resend; an id
    /// deleted first would leave keys no PUBREL will release.
    fn on_pubrel(&mut self, ctx: &ConnCtx, packet_id: crate::protocol::PacketId, now: Instant) {
        let pid = packet_id.get();
        let (known, persistent) = self
            .sessions
            .get_mut(&ctx.client_id)
            .map_or((false, false), |s| {
                (s.incoming_qos2.remove(&pid), s.persistent)
            });
        let rc = if known {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        let comp = Packet::PubComp(Ack::with_reason(packet_id, rc));
        let (mut token, mut remote, mut then) = (None, 0, Then::Ack);
        if !known && self.replicating() && self.durability.acknowledges_committed() {
            // Released before (its delete is in the store), but maybe not in the replicated
            // stream yet (a failed append): a fail-over would bring the id back, and the
            // next message with it would be taken for a resend.
            token = Some(self.token());
            self.replica_barrier();
        }
        if known && self.store.is_some() {
            let wait = self.durability.acknowledges_committed();
            token = wait.then(|| self.token());
            remote = self.release_qos2(&ctx.client_id, Some(pid), token, now);
            if persistent && wait {
                then = Then::DeleteIncoming(pid);
            } else if persistent {
                self.write(|b| b.incoming_delete(ctx.client_id.as_str(), pid));
            }
        }
        self.ack_when_durable(ctx, comp, AckWait::of(token, remote), then, now);
    }

    pub(super) fn with_session(
        &mut self,
        ctx: &ConnCtx,
        f: impl FnOnce(&mut Session, &SessionLimits),
    ) {
        if let Some(s) = self.sessions.get_mut(&ctx.client_id) {
            f(s, &self.limits);
        }
    }

    pub(super) fn on_disconnect(
        &mut self,
        ctx: &ConnCtx,
        d: &Disconnect,
    ) -> Result<(), ReasonCode> {
        let Some(s) = self.sessions.get_mut(&ctx.client_id) else {
            return Ok(());
        };
        if let Some(new) = d.properties.session_expiry_interval {
            if s.expiry_s == 0 && new != 0 {
                // MQTT-3.14.2-2: a session that was to end cannot be given a life here.
                return Err(ReasonCode::ProtocolError);
            }
            s.expiry_s = new.min(self.cfg.sessions.session_expiry_max_s);
        }
        Ok(())
    }

    /// A PUBLISH from the client of `ctx`: checked (topic, alias, access, flow control),
    /// routed, and acknowledged once what it depends on is durable.
    pub(super) fn on_publish(
        &mut self,
        ctx: &mut ConnCtx,
        p: Publish,
        now: Instant,
    ) -> Result<(), ReasonCode> {
        let topic = self.resolve_topic(ctx, p.topic, &p.properties)?;
        let user = ctx.username.as_ref().map(|u| u.as_str());
        if !self
            .logins
            .auth
            .allows(user, &ctx.client_id, topic.as_str(), Access::Write)
        {
            // Dropped. MQTT 5 says so in the acknowledgement (0x87); a 3.x client cannot be
            // told and is acknowledged as usual, as Mosquitto does.
            self.stats.acl_denied_publish += 1;
            self.ack_dropped_publish(ctx, p.packet_id, p.qos, now);
            return Ok(());
        }
        if self.resend_or_over_window(ctx, p.packet_id, p.qos, now)? {
            return Ok(());
        }
        self.stats.messages_received += 1;
        self.stats.received_qos[p.qos as usize] += 1;
        if is_sys_topic(&topic) {
            // Only the broker publishes there (as Mosquitto does): dropped, acknowledged.
            self.stats.sys_publish_dropped += 1;
            self.ack_dropped_publish(ctx, p.packet_id, p.qos, now);
            return Ok(());
        }
        // The dedup key of a QoS 2 message, for the persistent sessions that store it.
        let qos2_id = match p.packet_id {
            Some(pid) if p.qos == QoS::ExactlyOnce && self.store.is_some() => Some(Qos2Id {
                packet_id: pid.get(),
                dup: p.dup,
            }),
            _ => None,
        };
        let (pid, qos, retain) = (p.packet_id, p.qos, p.retain);
        let mut properties = p.properties;
        properties.topic_alias = None;
        let msg = Arc::new(Message {
            topic,
            // A slice of this PUBLISH's own allocation (the codec copies it out of the read
            // buffer): a message that waits (queued, in flight, retained) holds exactly its
            // packet, never the connection's read buffer.
            payload: p.payload,
            qos,
            retain,
            properties,
            origin: Some(ctx.client_id.clone()),
            qos2_id,
            created: now,
            groups: None,
        });
        match pid {
            None => {
                self.route(msg, now, None);
            }
            Some(pid) => self.route_and_acknowledge(ctx, pid, msg, now),
        }
        Ok(())
    }

    /// The topic a PUBLISH is for: its own, or the one its topic alias stands for (a new
    /// alias is recorded); checked against the topic limits.
    fn resolve_topic(
        &self,
        ctx: &mut ConnCtx,
        mut topic: TopicName,
        properties: &PublishProperties,
    ) -> Result<TopicName, ReasonCode> {
        let l = &self.cfg.limits;
        if let Some(alias) = properties.topic_alias {
            if alias.get() > l.topic_alias_max {
                return Err(ReasonCode::TopicAliasInvalid);
            }
            if topic.is_empty() {
                topic = ctx
                    .aliases_in
                    .get(&alias.get())
                    .cloned()
                    .ok_or(ReasonCode::ProtocolError)?;
            } else {
                // Kept for the connection's life: not the whole PUBLISH it came in.
                ctx.aliases_in.insert(alias.get(), topic.detached());
            }
        }
        if topic.len() > l.topic_bytes_max as usize || topic.levels() > l.topic_levels_max as usize
        {
            return Err(ReasonCode::TopicNameInvalid);
        }
        if !properties.subscription_identifiers.is_empty() {
            return Err(ReasonCode::ProtocolError);
        }
        Ok(topic)
    }

    /// Flow control of a QoS 1/2 PUBLISH: a QoS 2 resend of a message already routed is
    /// acknowledged (once durable) and not routed again (`Ok(true)`); one past the Receive
    /// Maximum is a protocol error.
    fn resend_or_over_window(
        &mut self,
        ctx: &ConnCtx,
        packet_id: Option<crate::protocol::PacketId>,
        qos: QoS,
        now: Instant,
    ) -> Result<bool, ReasonCode> {
        let Some(pid) = packet_id else {
            return Ok(false);
        };
        let s = self
            .sessions
            .get(&ctx.client_id)
            .ok_or(ReasonCode::UnspecifiedError)?;
        if qos == QoS::ExactlyOnce && s.incoming_qos2.contains(&pid.get()) {
            let taken_over = match self.qos2_routing(&ctx.client_id, pid.get()) {
                // Its first routing is still under way on a connection that is gone (the
                // client reconnected): whether every copy is stored is not known yet (a
                // node may still refuse it, and then the id is forgotten and the message
                // must be routed again). The resend's PUBREC is that routing's, on this
                // connection. On the same connection the resend is answered as before, in
                // order after the first (MQTT-4.6.0-3: a PUBREC per PUBLISH; a refused
                // first try closes the connection or says so first).
                Some((token, first)) if first.conn_id != ctx.conn_id => {
                    first.conn_id = ctx.conn_id;
                    Some(token)
                }
                _ => None,
            };
            if let Some(token) = taken_over {
                if let Some(link) = self
                    .sessions
                    .get_mut(&ctx.client_id)
                    .and_then(|s| s.link.as_mut())
                    .filter(|l| l.conn_id == ctx.conn_id)
                {
                    link.hold_ack(token, Packet::PubRec(Ack::new(pid)));
                }
                return Ok(true);
            }
            let token = (self.durability.acknowledges_committed()).then(|| self.token());
            // The first try is in the store, but maybe not in the replicated stream (a
            // stream being made whole after a restart, a fence or dropped changes): the
            // resend's PUBREC waits until the stream is known whole.
            self.replica_barrier();
            let rec = Packet::PubRec(Ack::new(pid));
            self.ack_when_durable(ctx, rec, AckWait::of(token, 0), Then::Ack, now);
            return Ok(true);
        }
        // QoS 1/2 publishes not yet acknowledged: QoS 2 awaiting PUBREL and QoS 1 whose
        // PUBACK waits for the disk.
        let unacknowledged = s.incoming_qos2.len() + s.link.as_ref().map_or(0, |l| l.held_qos1());
        if unacknowledged >= self.cfg.limits.receive_maximum as usize {
            return Err(ReasonCode::ReceiveMaximumExceeded);
        }
        Ok(false)
    }

    /// Routes a QoS 1/2 message and holds its PUBACK/PUBREC until every copy stored for a
    /// persistent session is durable, here and on the other shards (one round trip each).
    /// A retained publish is also acknowledged only once every shard has its copy, so that
    /// a subscribe made anywhere after the acknowledgement finds it. It also waits for what
    /// every shard's sessions did with the message (its `Fate`): one refused for the storage
    /// budget is not acknowledged as stored, and an MQTT 5 client hears when every session
    /// refused it for a full queue. Only a 3.x client of a broker without a store (which
    /// neither applies to) is acknowledged at once.
    fn route_and_acknowledge(
        &mut self,
        ctx: &ConnCtx,
        pid: crate::protocol::PacketId,
        msg: SharedMessage,
        now: Instant,
    ) {
        let (qos, retain, qos2_id) = (msg.qos, msg.retain, msg.qos2_id);
        let wait = self.durability.acknowledges_committed()
            || retain
            || self.store.is_some()
            || ctx.version.is_v5()
            || self.clustered();
        let token = wait.then(|| self.token());
        let Routed {
            matched,
            remote,
            fate,
            failed,
        } = self.route(msg, now, token);
        let mut then = Then::Ack;
        if qos == QoS::ExactlyOnce {
            let persistent = match self.sessions.get_mut(&ctx.client_id) {
                Some(s) => {
                    s.incoming_qos2.insert(pid.get());
                    s.qos2_published |= qos2_id.is_some();
                    s.persistent
                }
                None => false,
            };
            if token.is_some() {
                // Stored only after every copy of the message is durable (see
                // `finish_pub_ack`): a stored id with a lost copy would make the resend
                // after a crash look like a duplicate, and the copy would never be delivered.
                then = Then::Qos2Received {
                    pid: pid.get(),
                    store: persistent,
                    dup: qos2_id.is_some_and(|q| q.dup),
                };
            } else if persistent {
                self.write(|b| b.incoming_put(ctx.client_id.as_str(), pid.get()));
            }
        }
        let rc = if matched || !ctx.version.is_v5() {
            ReasonCode::Success
        } else {
            ReasonCode::NoMatchingSubscribers
        };
        let ack = Ack::with_reason(pid, rc);
        let packet = if qos == QoS::AtLeastOnce {
            Packet::PubAck(ack)
        } else {
            Packet::PubRec(ack)
        };
        let wait = AckWait {
            token,
            remote,
            fate,
            failed,
        };
        self.ack_when_durable(ctx, packet, wait, then, now);
    }

    /// Sends an acknowledgement to the client of `ctx` now, or holds it (in order with the
    /// others held on that connection) until `remote` shards have answered `token` and this
    /// shard's writes so far are durable.
    /// Acknowledges a PUBLISH that is dropped instead of routed (a topic the client may not
    /// write, or under `$SYS/`): MQTT 5 hears 0x87 in its PUBACK/PUBREC; a 3.x client cannot
    /// be told and is acknowledged as usual, as Mosquitto does, its QoS 2 flow going on with
    /// PUBREL.
    pub(super) fn ack_dropped_publish(
        &mut self,
        ctx: &ConnCtx,
        packet_id: Option<crate::protocol::PacketId>,
        qos: QoS,
        now: Instant,
    ) {
        let Some(pid) = packet_id else {
            return;
        };
        let rc = if ctx.version.is_v5() {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        };
        let ack = Ack::with_reason(pid, rc);
        let packet = if qos == QoS::AtLeastOnce {
            Packet::PubAck(ack)
        } else {
            if !rc.is_error() {
                // The flow continues with PUBREL, answered by PUBCOMP.
                if let Some(s) = self.sessions.get_mut(&ctx.client_id) {
                    s.incoming_qos2.insert(pid.get());
                }
            }
            Packet::PubRec(ack)
        };
        self.ack_when_durable(ctx, packet, AckWait::of(None, 0), Then::Ack, now);
    }

    pub(super) fn ack_when_durable(
        &mut self,
        ctx: &ConnCtx,
        packet: Packet,
        wait: AckWait,
        then: Then,
        now: Instant,
    ) {
        let AckWait {
            token,
            remote,
            fate,
            failed,
        } = wait;
        let Some(link) = self
            .sessions
            .get_mut(&ctx.client_id)
            .and_then(|s| s.link.as_mut())
            .filter(|l| l.conn_id == ctx.conn_id)
        else {
            return;
        };
        let Some(token) = token else {
            link.send_ack(packet);
            return;
        };
        link.hold_ack(token, packet);
        self.begin(
            token,
            RoundTrip::new(
                remote + 1,
                Completion::PubAck(PubAckDone {
                    client_id: ctx.client_id.clone(),
                    conn_id: ctx.conn_id,
                    then,
                }),
            )
            .with_fate(fate)
            .with_failure(failed),
        );
        // The local part: this shard's own writes (or none, released at once).
        self.wait_durable(Waiter::Local(token), now);
    }

    // ---------------------------------------------------------------- routing
}
