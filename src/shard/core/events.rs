//! Cross-shard events: what other shards tell this one, and the answers to this shard's
//! round trips (which finish PUBACKs, SUBACKs and the like once every shard has answered).

use super::*;

impl Core {
    /// Handles an event from shard `from` (this shard itself on the local path).
    pub fn on_event(&mut self, from: usize, event: Event, now: Instant) {
        match event {
            Event::Publish { msg, reply } => self.on_routed(from, msg, reply, now),
            Event::Index {
                filter,
                shard,
                add,
                reply,
            } => {
                self.apply_index(&filter, shard as usize, add);
                if let Some(token) = reply {
                    self.send(from, Event::done(token));
                }
            }
            Event::Ack { token, ok, fate } => self.on_ack(token, ok, fate, now),
            Event::RetainReplica {
                msg,
                version,
                reply,
            } => {
                // A version from another shard's (or, for a synced one, node's) clock: this
                // shard's later writes come after it.
                self.retained_versions.observe(version);
                self.apply_retained(msg, version, true);
                if let Some(token) = reply {
                    self.wait_durable(Waiter::answer(from, token), now);
                }
            }
            Event::RecoveryDone => self.recovered_peers += 1,
            Event::Rehome { session, reply } => self.adopt(from, *session, reply, now),
            Event::SharedJoin { key, member, reply } => self.shared_join(key, member, reply),
            Event::SharedLeave { key, client_id } => self.shared_leave(key, &client_id),
            Event::GroupHere { key, add } => self.set_group_here(key, add),
            Event::SharedOnline {
                key,
                client_id,
                online,
            } => self.groups.set_online(&key, &client_id, online),
            Event::SharedDeliver {
                key,
                client_id,
                msg,
                attempts,
                reply,
                fate,
            } => {
                let offer = SharedOffer {
                    key,
                    msg,
                    attempts,
                    reply,
                    carried: fate,
                };
                self.on_shared_deliver(offer, client_id, now)
            }
            Event::SharedBounce {
                key,
                msg,
                not,
                attempts,
                reply,
                fate: carried,
            } => {
                let mut dispatched = Dispatched::Dropped;
                let mut fate = self.with_fate(|c| {
                    let tried = (Some(&not), attempts, carried);
                    dispatched = c.shared_dispatch(key, msg, tried, reply, now);
                });
                fate.merge(carried);
                self.after_bounce(dispatched, reply, fate, now);
            }
            Event::Qos2Release {
                origin,
                packet_id,
                reply,
            } => {
                self.forget_qos2(&origin, packet_id, now);
                if let Some(token) = reply {
                    self.wait_durable(Waiter::answer(from, token), now);
                }
            }
        }
    }

    /// The round trips of a held PUBACK/PUBREC/PUBCOMP are done: decides what the client
    /// is told (see [`refusal`]) and does what must follow.
    pub(super) fn finish_pub_ack(
        &mut self,
        token: Token,
        p: PubAckDone,
        failed: bool,
        fate: Fate,
        now: Instant,
    ) {
        let PubAckDone {
            client_id,
            conn_id,
            then,
        } = p;
        let v5 = self
            .sessions
            .get(&client_id)
            .is_some_and(|s| s.version.is_v5());
        let refused = refusal(failed, fate, v5);
        match (then, refused) {
            (
                Then::Qos2Received {
                    pid, store: true, ..
                },
                None,
            ) => {
                // Every copy is durable: now store the QoS 2 id, and send PUBREC once that is
                // durable too.
                self.write(|b| b.incoming_put(client_id.as_str(), pid));
                self.ack_after_write(token, client_id, conn_id, now);
            }
            (Then::Qos2Received { pid, store, dup }, Some(rc)) => {
                // Not every copy is stored: the id is forgotten, so that a resend is routed
                // again (the sessions that stored the message skip it by its key).
                let v5 = match self.sessions.get_mut(&client_id) {
                    Some(s) => {
                        s.incoming_qos2.remove(&pid);
                        s.version.is_v5()
                    }
                    None => false,
                };
                // Only for a store or link failure, or a session moving: where a refusal is
                // for a spent budget, a resend would be refused again.
                let unsure = rc == ReasonCode::UnspecifiedError;
                if v5 && store && unsure && (fate.kept || fate.moving || dup) {
                    // Some sessions kept it (a cluster node holding others is gone), or a
                    // session moving to another node may hold it already, or this is a
                    // resend and an earlier try may be held on a node that failed this
                    // one (down now: its disk, or its replicated stream, has it). PUBREC
                    // 0x80 would end the flow, and the client's next try would be a new
                    // message, stored twice where it was kept: instead the connection
                    // closes unacknowledged (as for 3.x), the keys stay, and the client
                    // resends it with DUP and the same packet id when it reconnects to its
                    // session; the sessions that have it skip it by its key.
                    self.close_unacknowledged(&client_id, conn_id, token, rc);
                    return;
                }
                // An MQTT 5 client gets PUBREC with the reason, which ends the flow: the
                // keys go too.
                if v5 && self.store.is_some() {
                    self.release_qos2(&client_id, Some(pid), None, now);
                }
                self.release_pub_ack(&client_id, conn_id, token, Some(rc));
            }
            (Then::DeleteIncoming(pid), _) => {
                if failed {
                    tracing::error!(client = %client_id, packet_id = pid, "a QoS 2 dedup key could not be deleted on every shard; it stays until the session holding it ends");
                }
                // Every shard forgot the key: now delete the id, and send PUBCOMP once that is
                // durable too.
                self.write(|b| b.incoming_delete(client_id.as_str(), pid));
                self.ack_after_write(token, client_id, conn_id, now);
            }
            (Then::Qos2Received { store: false, .. } | Then::Ack, refused) => {
                self.release_pub_ack(&client_id, conn_id, token, refused)
            }
        }
    }

    /// The last step of a held acknowledgement, after its write: releases the
    /// acknowledgement of `token` once everything written so far is durable.
    pub(super) fn ack_after_write(
        &mut self,
        token: Token,
        client_id: MqttStr,
        conn_id: u64,
        now: Instant,
    ) {
        self.begin(
            token,
            RoundTrip::new(
                1,
                Completion::PubAck(PubAckDone {
                    client_id,
                    conn_id,
                    then: Then::Ack,
                }),
            ),
        );
        self.wait_durable(Waiter::Local(token), now);
    }

    /// Closes the connection of `client_id` (MQTT 5: DISCONNECT `reason`) without the held
    /// acknowledgement of `token`; those held before it are sent first.
    fn close_unacknowledged(
        &mut self,
        client_id: &MqttStr,
        conn_id: u64,
        token: Token,
        reason: ReasonCode,
    ) {
        let Some(link) = self
            .sessions
            .get_mut(client_id)
            .and_then(|s| s.link.as_mut())
            .filter(|l| l.conn_id == conn_id)
        else {
            return;
        };
        tracing::debug!(client = %client_id, ?reason, "a QoS 2 message kept by some sessions only; the connection closes for a resend");
        link.withhold_ack(token);
        link.out.close(Some(reason));
    }

    /// Sends a held PUBACK/PUBREC/PUBCOMP (and those behind it). When the message was
    /// refused (`Some(reason)`: not stored, or refused by every session for full queues), an
    /// MQTT 5 client gets that reason; a 3.x client gets no acknowledgement, and its
    /// connection is closed, because a 3.x client resends unacknowledged messages only when
    /// it reconnects.
    pub(super) fn release_pub_ack(
        &mut self,
        client_id: &MqttStr,
        conn_id: u64,
        token: Token,
        refused: Option<ReasonCode>,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        let v5 = s.version.is_v5();
        let Some(link) = s.link.as_mut().filter(|l| l.conn_id == conn_id) else {
            return;
        };
        if let Some(reason) = refused {
            tracing::debug!(client = %client_id, v5, ?reason, "message not kept; its acknowledgement reports it");
        }
        link.release_ack(token, refused);
        if refused.is_some() && !v5 {
            link.out.close(None);
        }
    }
}
