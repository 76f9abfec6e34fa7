//! Helpers for the core's unit tests: a core with a recording sink, a connected client, packets.

use super::cluster::{ClusterLink, LeaseClock, ToCluster};
use super::*;
use crate::protocol::{decode, DecodeLimits};
use std::cell::RefCell;

#[derive(Default)]
pub struct Sink(pub RefCell<Vec<(usize, Event)>>);
impl EventSink for Sink {
    fn push(&self, to: usize, event: Event) {
        self.0.borrow_mut().push((to, event));
    }
    fn wake_committer(&self) {}
}

/// A cluster link for a test core: what the shard hands to the cluster thread arrives at
/// the receiver (the data channel's is dropped).
pub fn cluster_link() -> (ClusterLink, tokio::sync::mpsc::UnboundedReceiver<ToCluster>) {
    let (data, _) = tokio::sync::mpsc::channel(4);
    let (control, rx) = tokio::sync::mpsc::unbounded_channel();
    (
        ClusterLink {
            data,
            control,
            lease: LeaseClock::default(),
            replica: None,
        },
        rx,
    )
}

pub fn core() -> Core {
    Core::new(
        0,
        1,
        Rc::new(Config::default()),
        Rc::new(Sink::default()),
        None,
        Arc::new(QueuedBudget::new(1, u64::MAX)),
    )
}

/// An MQTT 5 CONNECT of client `id`, anonymous, without keep alive or will; `expiry`:
/// its Session Expiry Interval, when it sends one.
pub fn connect_v5(id: &str, clean_start: bool, expiry: Option<u32>) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 0,
        properties: crate::protocol::ConnectProperties {
            session_expiry_interval: expiry,
            ..Default::default()
        },
        client_id: MqttStr::new(id).unwrap(),
        will: None,
        username: None,
        password: None,
    }
}

/// Connects `connect` to the core; its connection context and outbound buffer.
pub fn connect_to(c: &mut Core, connect: &Connect, now: Instant) -> (ConnCtx, Rc<Outbound>) {
    let out = Rc::new(Outbound::new(ProtocolVersion::V5));
    let ctx = c.connect(connect, None, out.clone(), now).unwrap().ctx;
    (ctx, out)
}

/// A clean MQTT 5 client that keeps no session.
pub fn conn(c: &mut Core, id: &str, now: Instant) -> (ConnCtx, Rc<Outbound>) {
    connect_to(c, &connect_v5(id, true, None), now)
}

/// A SUBSCRIBE with one filter.
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: crate::protocol::PacketId::new(packet_id).unwrap(),
        properties: Default::default(),
        filters: vec![(
            TopicFilter::new(filter).unwrap(),
            SubscriptionOptions {
                qos,
                ..Default::default()
            },
        )],
    })
}

pub fn drain(out: &Outbound) -> Vec<Packet> {
    let mut buf = futures_lite::future::block_on(out.next_batch(bytes::BytesMut::new())).0;
    let limits = DecodeLimits::new(1 << 20, Some(ProtocolVersion::V5));
    let mut v = Vec::new();
    while let Ok(Some(p)) = decode(&mut buf, &limits) {
        v.push(p);
    }
    v
}
