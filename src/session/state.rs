//! One client's session: its subscriptions, the QoS 1/2 messages in flight towards it, the
//! queue of messages waiting for it (offline, or beyond its inflight window), the incoming
//! QoS 2 packet ids awaiting PUBREL, and its will. No I/O: while the client is connected the
//! session writes encoded packets into the connection's [`Outbound`] buffer.
//!
//! Queue policy: a full queue (`queue_messages_max` or `queue_bytes_max`) refuses the newest
//! message for that session and counts it (`dropped_queue_full`); what is queued is never
//! silently replaced. QoS 0 beyond a connection's outbound buffer cap is dropped and counted
//! (`dropped_qos0_slow`); QoS 1/2 wait in the queue instead.

use bytes::BytesMut;
use hashbrown::{HashMap, HashSet};
use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::rc::Rc;
use std::time::Instant;

use super::message::SharedMessage;
use super::outbound::Outbound;
use crate::protocol::{
    Ack, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS, SubscriptionOptions,
    TopicFilter, TopicName,
};

/// One subscription of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub filter: TopicFilter,
    pub options: SubscriptionOptions,
    /// MQTT 5 Subscription Identifier.
    pub id: Option<u32>,
}

/// A message on its way to one session, with what this session's subscriptions made of it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub msg: SharedMessage,
    /// min(published QoS, subscription QoS), maximised over overlapping subscriptions.
    pub qos: QoS,
    /// The RETAIN flag to send (retained-on-subscribe, or Retain As Published).
    pub retain: bool,
    /// Identifiers of the matching subscriptions (MQTT 5).
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/...`) it came through, so that it can be handed back
    /// to the group when this member leaves before taking it.
    pub via_share: Option<std::sync::Arc<str>>,
}

/// Where a message in flight towards the client stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 PUBLISH sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 PUBLISH sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP (the message itself is delivered).
    AwaitPubComp,
}

#[derive(Clone, Debug)]
pub struct Inflight {
    pub packet_id: PacketId,
    pub delivery: Delivery,
    pub state: OutState,
}

/// The connection-specific parameters negotiated by CONNECT, present while online.
#[derive(Debug)]
pub struct Link {
    /// Distinguishes this connection from a later one of the same client (takeover).
    pub conn_id: u64,
    pub version: ProtocolVersion,
    pub out: Rc<Outbound>,
    /// The client's Receive Maximum: our QoS 1/2 window towards it.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size.
    pub max_packet_bytes: u32,
    /// The client's Topic Alias Maximum: how many aliases we may assign towards it.
    pub topic_alias_max: u16,
    aliases: HashMap<TopicName, NonZeroU16>,
}

impl Link {
    pub fn new(
        conn_id: u64,
        out: Rc<Outbound>,
        receive_maximum: u16,
        max_packet_bytes: u32,
        topic_alias_max: u16,
    ) -> Link {
        Link {
            conn_id,
            version: out.version(),
            out,
            receive_maximum,
            max_packet_bytes,
            topic_alias_max,
            aliases: HashMap::new(),
        }
    }
}

/// A will message and its delay.
#[derive(Clone, Debug)]
pub struct Will {
    pub msg: SharedMessage,
    pub delay_s: u32,
}

/// Counters a session keeps about what it could not deliver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub dropped_queue_full: u64,
    pub dropped_qos0_slow: u64,
    pub dropped_expired: u64,
    pub dropped_too_large: u64,
    pub delivered: u64,
}

/// The limits a session works under (from the config).
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    pub inflight_max: u16,
    pub queue_messages_max: u32,
    pub queue_bytes_max: u64,
    pub outbound_buffer_bytes_max: u32,
    pub queue_qos0_offline: bool,
}

/// What happened to a message handed to [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverOutcome {
    Sent,
    Queued,
    Dropped(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    SlowConsumer,
    Expired,
    TooLarge,
    /// QoS 0 for an offline session with `queue_qos0_offline = false`.
    Offline,
}

/// Failure answering an acknowledgement from the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownPacketId;

#[derive(Debug)]
pub struct Session {
    pub client_id: MqttStr,
    /// By the filter as written (`$share/...` included).
    pub subscriptions: HashMap<Box<str>, Subscription>,
    /// Session Expiry Interval in seconds (u32::MAX: never).
    pub expiry_s: u32,
    pub will: Option<Will>,
    pub link: Option<Link>,
    /// Incoming QoS 2 packet ids for which PUBREC was sent and PUBREL not yet received.
    pub incoming_qos2: HashSet<u16>,
    /// The protocol version of the last connection (kept while offline).
    pub version: ProtocolVersion,
    pub stats: SessionStats,
    /// Bumped at every attach and detach, so that a timer set for one offline period (will
    /// delay, expiry) does nothing in a later one.
    pub epoch: u64,
    next_packet_id: u16,
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Delivery>,
    queue_bytes: u64,
}

impl Session {
    pub fn new(client_id: MqttStr, version: ProtocolVersion, expiry_s: u32) -> Session {
        Session {
            client_id,
            subscriptions: HashMap::new(),
            expiry_s,
            will: None,
            link: None,
            incoming_qos2: HashSet::new(),
            version,
            stats: SessionStats::default(),
            epoch: 0,
            next_packet_id: 1,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
        }
    }

    pub fn is_online(&self) -> bool {
        self.link.is_some()
    }

    pub fn queued_messages(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queue_bytes
    }

    pub fn inflight(&self) -> impl Iterator<Item = &Inflight> {
        self.inflight.iter()
    }

    /// Hands a message to the session: sent now if online and the window allows, queued
    /// otherwise, or dropped per the queue policy.
    pub fn deliver(&mut self, d: Delivery, limits: &SessionLimits, now: Instant) -> DeliverOutcome {
        if d.msg.remaining_expiry(now).is_err() {
            self.stats.dropped_expired += 1;
            return DeliverOutcome::Dropped(DropReason::Expired);
        }
        match &self.link {
            Some(link) => {
                let window_free =
                    self.inflight.len() < self.window(limits) && self.queue.is_empty();
                let buffer_free = link.out.len() < limits.outbound_buffer_bytes_max as usize;
                if d.qos == QoS::AtMostOnce {
                    if !buffer_free {
                        self.stats.dropped_qos0_slow += 1;
                        return DeliverOutcome::Dropped(DropReason::SlowConsumer);
                    }
                    return match self.send_publish(&d, None, false, now) {
                        Ok(()) => DeliverOutcome::Sent,
                        Err(r) => DeliverOutcome::Dropped(r),
                    };
                }
                if window_free && buffer_free {
                    return self.send_inflight(d, now);
                }
                self.enqueue(d, limits)
            }
            None => {
                if d.qos == QoS::AtMostOnce && !limits.queue_qos0_offline {
                    return DeliverOutcome::Dropped(DropReason::Offline);
                }
                self.enqueue(d, limits)
            }
        }
    }

    fn window(&self, limits: &SessionLimits) -> usize {
        let client = self.link.as_ref().map_or(u16::MAX, |l| l.receive_maximum);
        limits.inflight_max.min(client) as usize
    }

    fn enqueue(&mut self, d: Delivery, limits: &SessionLimits) -> DeliverOutcome {
        let cost = d.msg.cost_bytes();
        if self.queue.len() >= limits.queue_messages_max as usize
            || self.queue_bytes + cost > limits.queue_bytes_max
        {
            self.stats.dropped_queue_full += 1;
            return DeliverOutcome::Dropped(DropReason::QueueFull);
        }
        self.queue_bytes += cost;
        self.queue.push_back(d);
        DeliverOutcome::Queued
    }

    fn alloc_packet_id(&mut self) -> PacketId {
        // The window is at most 65535 wide, so a free id always exists.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            let pid = PacketId::new(id).expect("ids start at 1 and skip 0");
            if !self.inflight.iter().any(|i| i.packet_id == pid) {
                return pid;
            }
        }
    }

    fn send_inflight(&mut self, d: Delivery, now: Instant) -> DeliverOutcome {
        let pid = self.alloc_packet_id();
        match self.send_publish(&d, Some(pid), false, now) {
            Ok(()) => {
                let state = if d.qos == QoS::AtLeastOnce {
                    OutState::AwaitPubAck
                } else {
                    OutState::AwaitPubRec
                };
                self.inflight.push_back(Inflight {
                    packet_id: pid,
                    delivery: d,
                    state,
                });
                DeliverOutcome::Sent
            }
            Err(r) => DeliverOutcome::Dropped(r),
        }
    }

    /// Encodes a PUBLISH for the current link. A message too big for the client, or expired,
    /// is not sent (MQTT-3.1.2-25: discarded as if delivered).
    fn send_publish(
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
        Ok(())
    }

    /// Moves queued messages into the window while it has room and the connection keeps up.
    pub fn pump(&mut self, limits: &SessionLimits, now: Instant) {
        let Some(link) = &self.link else { return };
        let out = link.out.clone();
        while let Some(d) = self.queue.front() {
            if out.len() >= limits.outbound_buffer_bytes_max as usize {
                break;
            }
            if d.qos != QoS::AtMostOnce && self.inflight.len() >= self.window(limits) {
                break;
            }
            let d = self.queue.pop_front().expect("front exists");
            self.queue_bytes -= d.msg.cost_bytes();
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
        self.link = Some(link);
        let inflight = std::mem::take(&mut self.inflight);
        for i in inflight {
            match i.state {
                OutState::AwaitPubAck | OutState::AwaitPubRec => {
                    if self
                        .send_publish(&i.delivery, Some(i.packet_id), true, now)
                        .is_ok()
                    {
                        self.inflight.push_back(i);
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

    /// Detaches the connection (it closed); in-flight state stays for the next one.
    pub fn detach(&mut self) -> Option<Link> {
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

    /// PUBREC from the client: answer PUBREL. A PUBREC with an error code ends the flow.
    pub fn on_pubrec(
        &mut self,
        pid: PacketId,
        error: bool,
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
        if let Some(l) = &self.link {
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

    fn complete(&mut self, pid: PacketId, expected: OutState) -> Result<(), UnknownPacketId> {
        let pos = self
            .inflight
            .iter()
            .position(|i| i.packet_id == pid && i.state == expected)
            .ok_or(UnknownPacketId)?;
        self.inflight.remove(pos);
        Ok(())
    }

    /// Takes the queued (not in-flight) messages that came through shared subscriptions, so
    /// that the group can give them to a member that is online.
    pub fn take_queued_shared(&mut self) -> Vec<Delivery> {
        let (shared, own): (VecDeque<Delivery>, VecDeque<Delivery>) =
            std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|d| d.via_share.is_some());
        self.queue = own;
        self.queue_bytes = self.queue.iter().map(|d| d.msg.cost_bytes()).sum();
        shared.into()
    }

    /// Everything that came through shared subscriptions and was not yet delivered (queued,
    /// or QoS 1/2 sent but not acknowledged), for when the session ends.
    pub fn take_undelivered_shared(&mut self) -> Vec<Delivery> {
        let mut v: Vec<Delivery> = Vec::new();
        self.inflight.retain(|i| {
            if i.delivery.via_share.is_some() && i.state != OutState::AwaitPubComp {
                v.push(i.delivery.clone());
                false
            } else {
                true
            }
        });
        v.extend(self.take_queued_shared());
        v
    }
}

/// Uses an existing alias for the topic or assigns a new one while there is room; the first
/// PUBLISH with a new alias carries the topic, later ones an empty topic (MQTT-3.3.2-12).
fn assign_alias(link: &mut Link, publish: &mut Publish) {
    if let Some(&alias) = link.aliases.get(&publish.topic) {
        publish.properties.topic_alias = Some(alias);
        publish.topic = TopicName::empty();
        return;
    }
    let next = link.aliases.len() + 1;
    if next <= link.topic_alias_max as usize {
        let alias = NonZeroU16::new(next as u16).expect("starts at 1");
        link.aliases.insert(publish.topic.clone(), alias);
        publish.properties.topic_alias = Some(alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, DecodeLimits, PublishProperties};
    use crate::session::message::Message;
    use bytes::Bytes;
    use std::sync::Arc;

    const LIMITS: SessionLimits = SessionLimits {
        inflight_max: 2,
        queue_messages_max: 3,
        queue_bytes_max: 1 << 20,
        outbound_buffer_bytes_max: 1 << 20,
        queue_qos0_offline: true,
    };

    fn delivery(topic: &str, qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                topic: TopicName::new(topic).unwrap(),
                payload: Bytes::from_static(b"hello"),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                origin: None,
                created: Instant::now(),
            }),
            qos,
            retain: false,
            sub_ids: vec![],
            via_share: None,
        }
    }

    fn online(version: ProtocolVersion, alias_max: u16) -> (Session, Rc<Outbound>) {
        let mut s = Session::new(MqttStr::new("c").unwrap(), version, 0);
        let out = Rc::new(Outbound::new(version));
        s.attach(
            Link::new(1, out.clone(), 10, 1 << 20, alias_max),
            &LIMITS,
            Instant::now(),
        );
        (s, out)
    }

    fn sent(out: &Outbound, version: ProtocolVersion) -> Vec<Packet> {
        let mut buf = futures_lite::future::block_on(out.next_batch(BytesMut::new())).0;
        let limits = DecodeLimits::new(1 << 20, Some(version));
        let mut v = Vec::new();
        while let Some(p) = decode(&mut buf, &limits).unwrap() {
            v.push(p);
        }
        v
    }

    #[test]
    fn window_then_queue_then_pump_on_ack() {
        let (mut s, out) = online(ProtocolVersion::V3_1_1, 0);
        let now = Instant::now();
        for _ in 0..4 {
            s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now);
        }
        assert_eq!(s.inflight().count(), 2);
        assert_eq!(s.queued_messages(), 2);
        let pids: Vec<_> = sent(&out, ProtocolVersion::V3_1_1)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id.unwrap().get(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pids, vec![1, 2]);
        s.on_puback(PacketId::new(1).unwrap(), &LIMITS, now)
            .unwrap();
        assert_eq!(s.queued_messages(), 1);
        assert_eq!(
            s.on_puback(PacketId::new(1).unwrap(), &LIMITS, now),
            Err(UnknownPacketId)
        );
    }

    #[test]
    fn queue_full_refuses_newest() {
        let mut s = Session::new(MqttStr::new("c").unwrap(), ProtocolVersion::V5, 60);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now),
                DeliverOutcome::Queued
            );
        }
        assert_eq!(
            s.deliver(delivery("t", QoS::AtLeastOnce), &LIMITS, now),
            DeliverOutcome::Dropped(DropReason::QueueFull)
        );
        assert_eq!(s.stats.dropped_queue_full, 1);
    }

    #[test]
    fn reattach_resends_with_dup_and_pubrel() {
        let (mut s, out) = online(ProtocolVersion::V5, 0);
        let now = Instant::now();
        s.deliver(delivery("a", QoS::AtLeastOnce), &LIMITS, now);
        s.deliver(delivery("b", QoS::ExactlyOnce), &LIMITS, now);
        s.on_pubrec(PacketId::new(2).unwrap(), false, &LIMITS, now)
            .unwrap();
        let _ = sent(&out, ProtocolVersion::V5);
        s.detach();
        let out2 = Rc::new(Outbound::new(ProtocolVersion::V5));
        s.attach(Link::new(2, out2.clone(), 10, 1 << 20, 0), &LIMITS, now);
        let packets = sent(&out2, ProtocolVersion::V5);
        assert!(
            matches!(&packets[0], Packet::Publish(p) if p.dup && p.packet_id.unwrap().get() == 1)
        );
        assert!(matches!(&packets[1], Packet::PubRel(a) if a.packet_id.get() == 2));
        s.on_pubcomp(PacketId::new(2).unwrap(), &LIMITS, now)
            .unwrap();
        assert_eq!(s.inflight().count(), 1);
    }

    #[test]
    fn topic_aliases_assigned_then_reused() {
        let (mut s, out) = online(ProtocolVersion::V5, 1);
        let now = Instant::now();
        for t in ["x/y", "x/y", "other"] {
            s.deliver(delivery(t, QoS::AtMostOnce), &LIMITS, now);
        }
        let p = sent(&out, ProtocolVersion::V5);
        let show: Vec<(String, Option<u16>)> = p
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => (
                    p.topic.to_string(),
                    p.properties.topic_alias.map(|a| a.get()),
                ),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            show,
            vec![
                ("x/y".into(), Some(1)),
                ("".into(), Some(1)),
                ("other".into(), None)
            ]
        );
    }

    #[test]
    fn too_large_for_client_is_not_sent() {
        let mut s = Session::new(MqttStr::new("c").unwrap(), ProtocolVersion::V5, 0);
        let out = Rc::new(Outbound::new(ProtocolVersion::V5));
        s.attach(
            Link::new(1, out.clone(), 10, 10, 0),
            &LIMITS,
            Instant::now(),
        );
        assert_eq!(
            s.deliver(delivery("topic", QoS::AtLeastOnce), &LIMITS, Instant::now()),
            DeliverOutcome::Dropped(DropReason::TooLarge)
        );
        assert!(out.is_empty());
    }
}
