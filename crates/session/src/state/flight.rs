//! A session's messages in flight: packet ids, the window towards the client, resends on
//! reattach, and the acknowledgements that complete them.

use super::*;

impl Session {
    pub(super) fn alloc_packet_id(&mut self) -> PacketId {
        // The window is at most 65535 wide, so a free id always exists.
        if self.ids_in_flight.is_none() && self.inflight.len() > PACKET_ID_SCAN_MAX {
            let mut set = Box::new(PacketIdSet::default());
            for i in &self.inflight {
                set.insert(i.packet_id);
            }
            self.ids_in_flight = Some(set);
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            // Ids start at 1 and wrap to 1: never 0.
            let Some(pid) = PacketId::new(id) else {
                continue;
            };
            let taken = match &self.ids_in_flight {
                Some(set) => set.contains(pid),
                None => self.inflight.iter().any(|i| i.packet_id == pid),
            };
            if !taken {
                return pid;
            }
        }
    }

    pub(super) fn send_inflight(&mut self, d: Delivery, now: Instant) -> DeliverOutcome {
        let pid = self.alloc_packet_id();
        match self.send_publish(&d, Some(pid), false, now) {
            Ok(()) => {
                let state = if d.qos == QoS::AtLeastOnce {
                    OutState::AwaitPubAck
                } else {
                    OutState::AwaitPubRec
                };
                self.record(StoreOp::InflightPut {
                    packet_id: pid,
                    delivery: d.clone(),
                    state,
                    fresh: true,
                });
                if let Some(set) = &mut self.ids_in_flight {
                    set.insert(pid);
                }
                self.inflight.push_back(Inflight {
                    packet_id: pid,
                    delivery: d,
                    state,
                });
                debug_assert!(
                    self.inflight.len() <= usize::from(u16::MAX),
                    "more messages in flight than packet ids"
                );
                DeliverOutcome::Sent
            }
            Err(r) => DeliverOutcome::Dropped(r),
        }
    }

    /// Encodes a PUBLISH for the current link. A message too big for the client, or expired,
    /// is not sent (MQTT-3.1.2-25: discarded as if delivered).
    pub(super) fn send_publish(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> Result<(), DropReason> {
        let Some(link) = self.link.as_mut() else {
            return Err(DropReason::Offline);
        };
        let Ok(expiry) = d.msg.remaining_expiry(now) else {
            self.stats.dropped_expired += 1;
            return Err(DropReason::Expired);
        };
        let mut publish = Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic: d.msg.topic.clone(),
            packet_id,
            properties: Default::default(),
            payload: d.msg.payload.clone(),
        };
        if link.version.is_v5() {
            let mut props = d.msg.properties.clone();
            props.message_expiry_interval = expiry;
            props.subscription_identifiers.clone_from(&d.sub_ids);
            publish.properties = props;
        }
        let packet = Packet::Publish(publish);
        if packet.encoded_len(link.version) > link.max_packet_bytes as usize {
            self.stats.dropped_too_large += 1;
            return Err(DropReason::TooLarge);
        }
        let Packet::Publish(mut publish) = packet else {
            unreachable!("built above")
        };
        if link.version.is_v5() && link.topic_alias_max > 0 {
            assign_alias(link, &mut publish);
        }
        let out = &link.out;
        out.send_with(|buf: &mut BytesMut| {
            publish.encode_header(link.version, buf);
            buf.extend_from_slice(&publish.payload);
        });
        self.stats.delivered += 1;
        self.stats.delivered_qos[d.qos as usize] += 1;
        Ok(())
    }

    /// Moves queued messages into the window while it has room and the connection keeps up.
    pub fn pump(&mut self, limits: &SessionLimits, now: Instant) {
        let Some(link) = &self.link else { return };
        let out = link.out.clone();
        while let Some(q) = self.queue.front() {
            if out.pending_bytes() >= limits.outbound_buffer_bytes_max as usize {
                out.mark_starved();
                break;
            }
            if q.delivery.qos != QoS::AtMostOnce && self.inflight.len() >= self.window(limits) {
                break;
            }
            let Some(Queued { seq, delivery: d }) = self.queue.pop_front() else {
                break;
            };
            self.queue_bytes = take_bytes(self.queue_bytes, d.msg.cost_bytes());
            self.record(StoreOp::QueueDelete { seq });
            if d.qos == QoS::AtMostOnce {
                let _ = self.send_publish(&d, None, false, now);
            } else {
                self.send_inflight(d, now);
            }
        }
    }

    /// Attaches a new connection: resends every message in flight (PUBLISH with DUP, or
    /// PUBREL), then drains the queue into the window (MQTT-4.4.0-1).
    pub fn attach(&mut self, link: Link, limits: &SessionLimits, now: Instant) {
        self.version = link.version;
        self.since = Some(now);
        self.link = Some(link);
        let inflight = std::mem::take(&mut self.inflight);
        self.ids_in_flight = None;
        for i in inflight {
            match i.state {
                OutState::AwaitPubAck | OutState::AwaitPubRec => {
                    if self
                        .send_publish(&i.delivery, Some(i.packet_id), true, now)
                        .is_ok()
                    {
                        self.inflight.push_back(i);
                    } else {
                        // Expired, or too big for this connection: gone from disk too, so
                        // that its packet id is free there as it is here.
                        self.record(StoreOp::InflightDelete {
                            packet_id: i.packet_id,
                        });
                    }
                }
                OutState::AwaitPubComp => {
                    if let Some(l) = &self.link {
                        l.out.send(&Packet::PubRel(Ack::new(i.packet_id)));
                    }
                    self.inflight.push_back(i);
                }
            }
        }
        self.pump(limits, now);
    }

    /// Detaches the connection (it closed); in-flight state stays for the next one. A
    /// persistent session's queue is on disk already and leaves memory.
    pub fn detach(&mut self, now: Instant) -> Option<Link> {
        if self.link.is_some() {
            self.since = Some(now);
        }
        if self.persistent {
            if let Some(first) = self.queue.front().map(|q| q.seq) {
                self.spilled_from = Some(first);
                self.spilled_len += self.queue.len() as u64;
                self.spilled_bytes += self.queue_bytes;
                self.queue.clear();
                self.queue_bytes = 0;
            }
        }
        self.link.take()
    }

    /// PUBACK from the client.
    pub fn on_puback(
        &mut self,
        pid: PacketId,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        self.complete(pid, OutState::AwaitPubAck)?;
        self.pump(limits, now);
        Ok(())
    }

    /// PUBREC from the client: answer PUBREL (`send_pubrel`; otherwise the caller sends it,
    /// once the state change it follows is durable: a PUBLISH resent after a PUBREL would be
    /// taken for a new message). A PUBREC with an error code ends the flow.
    pub fn on_pubrec(
        &mut self,
        pid: PacketId,
        error: bool,
        send_pubrel: bool,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        if error {
            self.complete(pid, OutState::AwaitPubRec)?;
            self.pump(limits, now);
            return Ok(());
        }
        let i = self
            .inflight
            .iter_mut()
            .find(|i| i.packet_id == pid)
            .ok_or(UnknownPacketId)?;
        match i.state {
            OutState::AwaitPubRec | OutState::AwaitPubComp => i.state = OutState::AwaitPubComp,
            OutState::AwaitPubAck => return Err(UnknownPacketId),
        }
        let op = StoreOp::InflightPut {
            packet_id: pid,
            delivery: i.delivery.clone(),
            state: OutState::AwaitPubComp,
            fresh: false,
        };
        self.record(op);
        if let Some(l) = self.link.as_ref().filter(|_| send_pubrel) {
            l.out.send(&Packet::PubRel(Ack::new(pid)));
        }
        Ok(())
    }

    /// PUBCOMP from the client.
    pub fn on_pubcomp(
        &mut self,
        pid: PacketId,
        limits: &SessionLimits,
        now: Instant,
    ) -> Result<(), UnknownPacketId> {
        self.complete(pid, OutState::AwaitPubComp)?;
        self.pump(limits, now);
        Ok(())
    }

    pub(super) fn complete(
        &mut self,
        pid: PacketId,
        expected: OutState,
    ) -> Result<(), UnknownPacketId> {
        let pos = self
            .inflight
            .iter()
            .position(|i| i.packet_id == pid && i.state == expected)
            .ok_or(UnknownPacketId)?;
        self.inflight.remove(pos);
        if self.inflight.is_empty() {
            self.ids_in_flight = None;
        } else if let Some(set) = &mut self.ids_in_flight {
            set.remove(pid);
        }
        self.record(StoreOp::InflightDelete { packet_id: pid });
        Ok(())
    }
}
