//! Fuzz target `session`: the per-shard MQTT state machine ([`shardmq::shard::core::Core`])
//! of two shards, driven by several clients at once, with an injected clock and the
//! cross-shard events delivered when the input says so.
//!
//! Clients: three *tracked* clients that behave (persistent sessions, QoS 1/2
//! subscriptions, QoS 1 publishes with unique payloads, small Receive Maximum) and three
//! *hostile* ones whose packets are whatever the codec decodes from the input bytes (in the
//! version they connected with), exactly what the connection reader would hand the core.
//! The input is a list of operations (`Op` below), one opcode byte and its argument bytes
//! each. What the broker writes to a client is read back when the input says so, which
//! leaves buffers full in between (slow consumers) and makes the writer's "room" call.
//!
//! Checked, besides "no panic":
//! - everything the broker writes to any client decodes, whole, in the client's version;
//! - a tracked session never has more QoS 1/2 messages in flight than
//!   min(`limits.inflight_max`, the client's Receive Maximum), and the client never holds
//!   more unacknowledged PUBLISHes than that either;
//! - every tracked publish the broker acknowledged (PUBACK) reaches every tracked client
//!   whose QoS 1/2 subscription matched it before it was sent (the persistent sessions keep
//!   it while offline), once everyone reconnects and reads at the end.
#![no_main]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shardmq::config::Config;
use shardmq::protocol::{
    decode, Ack, Connect, ConnectProperties, DecodeLimits, MqttStr, Packet, PacketId,
    ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions, TopicFilter, TopicName,
};
use shardmq::session::{owner_shard, Outbound};
use shardmq::shard::budget::QueuedBudget;
use shardmq::shard::core::{ConnCtx, Core, Ending, EventSink, Flow};
use shardmq::shard::event::Event;

const SHARDS: usize = 2;
const TRACKED: usize = 3;
const HOSTILE: usize = 3;
const TOPICS: &[&str] = &["a", "a/b", "a/b/c", "x/y", "$sys/z"];
const FILTERS: &[&str] = &["a", "a/#", "a/+/c", "+/y", "#", "x/y", "$sys/#"];
const PAYLOAD_TAG: &[u8] = b"wb:";
/// Small limits so that short inputs reach the windows and caps.
const INFLIGHT_MAX: u16 = 4;
const PACKET_BYTES_MAX: u32 = 512;
const OUTBOUND_MAX: u32 = 1024;

#[derive(Default)]
struct QueueSink(RefCell<VecDeque<(usize, Event)>>);

impl EventSink for QueueSink {
    fn push(&self, to: usize, event: Event) {
        self.0.borrow_mut().push_back((to, event));
    }
    fn wake_committer(&self) {}
}

struct Conn {
    ctx: ConnCtx,
    out: Rc<Outbound>,
    version: ProtocolVersion,
    /// Receive Maximum the client announced (u16::MAX: none).
    receive_max: u16,
    /// PUBLISH packet ids received and not yet acknowledged, with their QoS.
    unacked: VecDeque<(u16, QoS)>,
    /// QoS 2 ids answered with PUBREC, waiting for PUBREL.
    awaiting_rel: HashSet<u16>,
}

struct Client {
    id: String,
    shard: usize,
    tracked: bool,
    conn: Option<Conn>,
    /// Filters granted (SUBACK seen) to this tracked client.
    granted: BTreeSet<usize>,
    /// SUBSCRIBEs sent: packet id -> filter index.
    subscribing: HashMap<u16, usize>,
    /// Tracked publishes sent: packet id -> (message number, who should get it).
    publishing: HashMap<u16, (u64, Vec<usize>)>,
    next_pid: u16,
    received: HashSet<u64>,
}

struct World {
    cores: Vec<Core>,
    sinks: Vec<Rc<QueueSink>>,
    now: Instant,
    clients: Vec<Client>,
    next_msg: u64,
    /// Acknowledged tracked messages and who must receive them.
    expected: Vec<(u64, Vec<usize>)>,
}

/// `SESSION_FUZZ_TRACE=1` prints the operations and the packets in and out (to read a crash).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("SESSION_FUZZ_TRACE").is_some())
}

/// Reads operation arguments from the input; runs dry as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.limits.inflight_max = INFLIGHT_MAX;
    cfg.limits.receive_maximum = 4;
    cfg.limits.packet_bytes_max = PACKET_BYTES_MAX;
    cfg.limits.outbound_buffer_bytes_max = OUTBOUND_MAX;
    cfg.limits.topic_alias_max = 4;
    cfg.validate().expect("fuzz config is valid");
    cfg
}

/// A client id with `prefix` owned by `shard`.
fn id_on(prefix: &str, shard: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|id| owner_shard(id.as_bytes(), SHARDS) == shard)
        .expect("ids land on every shard")
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero")
}

impl World {
    fn new() -> World {
        let cfg = Rc::new(config());
        let now = Instant::now();
        let sinks: Vec<Rc<QueueSink>> = (0..SHARDS).map(|_| Rc::default()).collect();
        let budget = Arc::new(QueuedBudget::new(SHARDS, cfg.storage.queued_bytes_max));
        let mut cores: Vec<Core> = (0..SHARDS)
            .map(|i| {
                Core::new(
                    i,
                    SHARDS,
                    cfg.clone(),
                    sinks[i].clone(),
                    None,
                    budget.clone(),
                )
            })
            .collect();
        for c in &mut cores {
            c.recover(now);
        }
        let clients = (0..TRACKED + HOSTILE)
            .map(|i| {
                let tracked = i < TRACKED;
                let prefix = format!("{}{i}-", if tracked { "t" } else { "h" });
                let id = id_on(&prefix, i % SHARDS);
                Client {
                    shard: owner_shard(id.as_bytes(), SHARDS),
                    id,
                    tracked,
                    conn: None,
                    granted: BTreeSet::new(),
                    subscribing: HashMap::new(),
                    publishing: HashMap::new(),
                    next_pid: 1,
                    received: HashSet::new(),
                }
            })
            .collect();
        let mut w = World {
            cores,
            sinks,
            now,
            clients,
            next_msg: 0,
            expected: Vec::new(),
        };
        w.deliver_events(usize::MAX);
        w
    }

    /// Delivers up to `max` cross-shard events, oldest first per shard.
    fn deliver_events(&mut self, max: usize) {
        let mut n = 0;
        while n < max {
            let mut any = false;
            for from in 0..SHARDS {
                let next = self.sinks[from].0.borrow_mut().pop_front();
                if let Some((to, ev)) = next {
                    assert!(
                        to < SHARDS && to != from,
                        "event for shard {to} from {from}"
                    );
                    self.cores[to].on_event(from, ev, self.now);
                    any = true;
                    n += 1;
                }
            }
            if !any {
                break;
            }
        }
    }

    fn connect(&mut self, c: usize, inp: &mut Input) {
        if self.clients[c].conn.is_some() {
            return;
        }
        let b = inp.byte();
        let cl = &self.clients[c];
        // A tracked client keeps its version and Receive Maximum (a session resumed with a
        // smaller window resends everything it had in flight, which these checks would flag).
        let (version, clean_start, expiry, receive_max) = if cl.tracked {
            match c {
                0 => (ProtocolVersion::V5, false, Some(u32::MAX), Some(1)),
                1 => (ProtocolVersion::V5, false, Some(u32::MAX), Some(3)),
                _ => (ProtocolVersion::V3_1_1, false, None, None),
            }
        } else {
            let v = match b & 3 {
                0 => ProtocolVersion::V3_1,
                1 => ProtocolVersion::V3_1_1,
                _ => ProtocolVersion::V5,
            };
            let expiry = v.is_v5().then_some(u32::from(inp.byte()));
            let rm = (v.is_v5() && b & 8 != 0).then_some(1 + u16::from(inp.byte() % 8));
            (v, b & 4 != 0, expiry, rm)
        };
        let connect = Connect {
            protocol: version,
            clean_start,
            keep_alive: 0,
            properties: ConnectProperties {
                session_expiry_interval: expiry,
                receive_maximum: receive_max,
                topic_alias_maximum: version.is_v5().then_some(2),
                ..Default::default()
            },
            client_id: MqttStr::new(&cl.id).expect("valid id"),
            will: None,
            username: None,
            password: None,
        };
        let out = Rc::new(Outbound::new(version));
        let shard = cl.shard;
        match self.cores[shard].connect(&connect, None, out.clone(), self.now) {
            Ok(accepted) => {
                self.clients[c].conn = Some(Conn {
                    ctx: accepted.ctx,
                    out,
                    version,
                    receive_max: receive_max.unwrap_or(u16::MAX),
                    unacked: VecDeque::new(),
                    awaiting_rel: HashSet::new(),
                });
            }
            Err(_) => assert!(!self.clients[c].tracked, "a tracked client was refused"),
        }
        self.read(c);
    }

    /// The connection ends (the reader saw EOF, an error, or DISCONNECT).
    fn disconnect(&mut self, c: usize, ending: Ending) {
        if let Some(conn) = self.clients[c].conn.take() {
            let shard = self.clients[c].shard;
            self.cores[shard].disconnected(&conn.ctx, ending, self.now);
            // Publishes not acknowledged are not the broker's to keep.
            self.clients[c].publishing.clear();
            self.clients[c].subscribing.clear();
        }
    }

    /// Hands one packet to the core as the connection's reader would.
    fn feed(&mut self, c: usize, packet: Packet) {
        if trace() {
            eprintln!("  {} -> {packet:?}", self.clients[c].id);
        }
        let shard = self.clients[c].shard;
        let Some(conn) = self.clients[c].conn.as_mut() else {
            return;
        };
        match self.cores[shard].on_packet(&mut conn.ctx, packet, self.now) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Disconnect(e)) => self.disconnect(c, e),
            Err(rc) => {
                conn.out.close(Some(rc));
                self.disconnect(c, Ending::Lost);
            }
        }
    }

    fn next_pid(&mut self, c: usize) -> u16 {
        let cl = &mut self.clients[c];
        let p = cl.next_pid;
        cl.next_pid = if p == u16::MAX { 1 } else { p + 1 };
        p
    }

    fn subscribe(&mut self, c: usize, inp: &mut Input) {
        if self.clients[c].conn.is_none() {
            return;
        }
        let f = inp.byte() as usize % FILTERS.len();
        let qos = if inp.byte() & 1 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        let p = self.next_pid(c);
        self.clients[c].subscribing.insert(p, f);
        let sub = Subscribe {
            packet_id: pid(p),
            properties: Default::default(),
            filters: vec![(
                TopicFilter::new(FILTERS[f]).expect("valid filter"),
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            )],
        };
        self.feed(c, Packet::Subscribe(sub));
    }

    fn publish(&mut self, c: usize, inp: &mut Input) {
        if self.clients[c].conn.is_none() {
            return;
        }
        let t = inp.byte() as usize % TOPICS.len();
        let topic = TOPICS[t];
        // Who must receive it if it is acknowledged: tracked clients whose granted
        // subscriptions match now.
        let targets: Vec<usize> = (0..TRACKED)
            .filter(|&s| {
                self.clients[s]
                    .granted
                    .iter()
                    .any(|&f| TopicFilter::new(FILTERS[f]).expect("valid").matches(topic))
            })
            .collect();
        let n = self.next_msg;
        self.next_msg += 1;
        let p = self.next_pid(c);
        self.clients[c].publishing.insert(p, (n, targets));
        let mut payload = PAYLOAD_TAG.to_vec();
        payload.extend_from_slice(&n.to_be_bytes());
        let mut publish = Publish::new(TopicName::new(topic).expect("valid"), Bytes::from(payload));
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = Some(pid(p));
        self.feed(c, Packet::Publish(publish));
    }

    /// A hostile client sends whatever the input decodes to.
    fn hostile_send(&mut self, c: usize, inp: &mut Input) {
        let Some(conn) = self.clients[c].conn.as_ref() else {
            return;
        };
        let version = conn.version;
        let len = inp.byte() as usize;
        let mut buf = BytesMut::from(inp.bytes(len));
        let limits = DecodeLimits::new(PACKET_BYTES_MAX as usize, Some(version));
        loop {
            match decode(&mut buf, &limits) {
                Ok(Some(p)) => {
                    self.feed(c, p);
                    if self.clients[c].conn.is_none() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let conn = self.clients[c].conn.as_ref().expect("connected");
                    conn.out.close(Some(e.reason_code()));
                    self.disconnect(c, Ending::Lost);
                    return;
                }
            }
        }
    }

    /// The client reads everything written to it; tracked clients note what they got.
    fn read(&mut self, c: usize) {
        let Some(conn) = self.clients[c].conn.as_mut() else {
            return;
        };
        let out = conn.out.clone();
        let version = conn.version;
        // `next_batch` waits for bytes: only ask when there are some.
        let mut buf = if out.is_empty() {
            BytesMut::new()
        } else {
            futures_lite::future::block_on(out.next_batch(BytesMut::new())).0
        };
        out.wrote(buf.len());
        let limits = DecodeLimits::new(shardmq::protocol::MAX_PACKET_SIZE_PROTOCOL, Some(version));
        let mut packets = Vec::new();
        loop {
            match decode(&mut buf, &limits) {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => panic!("the broker wrote bytes that do not decode: {e}"),
            }
        }
        assert!(buf.is_empty(), "the broker wrote a partial packet");
        // The writer's call after it made room.
        if out.take_starved() {
            let shard = self.clients[c].shard;
            let conn = self.clients[c].conn.as_ref().expect("connected");
            let (id, conn_id) = (conn.ctx.client_id.clone(), conn.ctx.conn_id);
            self.cores[shard].on_writable(&id, conn_id, self.now);
        }
        for p in packets {
            if trace() {
                eprintln!("  {} <- {p:?}", self.clients[c].id);
            }
            self.on_packet_from_broker(c, p);
        }
    }

    fn on_packet_from_broker(&mut self, c: usize, p: Packet) {
        let tracked = self.clients[c].tracked;
        let cl = &mut self.clients[c];
        let Some(conn) = cl.conn.as_mut() else {
            return;
        };
        let mut reply = None;
        match p {
            Packet::Publish(p) => {
                if let Some(id) = p.packet_id {
                    let id = id.get();
                    if !conn.unacked.iter().any(|&(u, _)| u == id) {
                        conn.unacked.push_back((id, p.qos));
                    }
                    let window = usize::from(conn.receive_max.min(INFLIGHT_MAX));
                    // Hostile clients acknowledge behind the harness's back.
                    assert!(
                        !tracked || conn.unacked.len() <= window,
                        "client {} holds {} unacknowledged PUBLISHes, window {window}",
                        cl.id,
                        conn.unacked.len()
                    );
                }
                if tracked {
                    if let Some(n) = p.payload.strip_prefix(PAYLOAD_TAG) {
                        if let Ok(n) = <[u8; 8]>::try_from(n) {
                            cl.received.insert(u64::from_be_bytes(n));
                        }
                    }
                }
            }
            Packet::SubAck(a) => {
                if let Some(f) = cl.subscribing.remove(&a.packet_id.get()) {
                    if a.reason_codes.iter().all(|r| !r.is_error()) {
                        cl.granted.insert(f);
                    }
                }
            }
            Packet::PubAck(a) => {
                if let Some((n, targets)) = cl.publishing.remove(&a.packet_id.get()) {
                    if !a.reason_code.is_error() {
                        self.expected.push((n, targets));
                    }
                }
            }
            Packet::PubRel(a) => {
                let id = a.packet_id;
                if conn.awaiting_rel.remove(&id.get()) || tracked {
                    reply = Some(Packet::PubComp(Ack::new(id)));
                }
            }
            _ => {}
        }
        if let Some(r) = reply {
            self.feed(c, r);
        }
    }

    /// The client acknowledges up to `n` of the PUBLISHes it holds, oldest first.
    fn ack(&mut self, c: usize, n: u8) {
        for _ in 0..n {
            let Some(conn) = self.clients[c].conn.as_mut() else {
                return;
            };
            let Some((id, qos)) = conn.unacked.pop_front() else {
                return;
            };
            let packet = match qos {
                QoS::ExactlyOnce => {
                    conn.awaiting_rel.insert(id);
                    Packet::PubRec(Ack::new(pid(id)))
                }
                _ => Packet::PubAck(Ack::new(pid(id))),
            };
            self.feed(c, packet);
        }
    }

    fn check(&self) {
        for cl in self.clients.iter().filter(|c| c.tracked) {
            let Some(conn) = &cl.conn else { continue };
            let id = MqttStr::new(&cl.id).expect("valid");
            let s = self.cores[cl.shard]
                .session(&id)
                .expect("a connected client has a session");
            let window = usize::from(conn.receive_max.min(INFLIGHT_MAX));
            assert!(
                s.inflight().count() <= window,
                "session {} has {} in flight, window {window}",
                cl.id,
                s.inflight().count()
            );
        }
    }

    /// Everyone tracked comes back and reads and acknowledges until nothing moves; then every
    /// acknowledged message must have reached its subscribers.
    fn finish(&mut self) {
        self.deliver_events(usize::MAX);
        for c in 0..TRACKED {
            if self.clients[c].conn.is_none() {
                let mut zero = Input(&[]);
                self.connect(c, &mut zero);
            }
        }
        for _ in 0..10_000 {
            self.deliver_events(usize::MAX);
            let before: usize = self.clients.iter().map(|c| c.received.len()).sum();
            let mut moved = false;
            for c in 0..self.clients.len() {
                self.read(c);
                let held = self.clients[c].conn.as_ref().map_or(0, |k| k.unacked.len());
                if held > 0 {
                    moved = true;
                }
                self.ack(c, u8::MAX);
            }
            self.deliver_events(usize::MAX);
            let after: usize = self.clients.iter().map(|c| c.received.len()).sum();
            let queued = self.sinks.iter().any(|s| !s.0.borrow().is_empty());
            if !moved && !queued && before == after {
                break;
            }
        }
        for (n, targets) in &self.expected {
            for &t in targets {
                assert!(
                    self.clients[t].received.contains(n),
                    "acknowledged message {n} never reached tracked client {}",
                    self.clients[t].id
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = World::new();
    let mut inp = Input(data);
    let mut ops = 0;
    while !inp.0.is_empty() && ops < 512 {
        ops += 1;
        let op = inp.byte();
        let c = usize::from(inp.byte()) % w.clients.len();
        let tracked = w.clients[c].tracked;
        if trace() {
            eprintln!(
                "op {} client {} ({}) next {:?}",
                op % 10,
                c,
                w.clients[c].id,
                &inp.0[..inp.0.len().min(4)]
            );
        }
        match op % 10 {
            0 => w.connect(c, &mut inp),
            1 => {
                let ending = match inp.byte() % 3 {
                    0 => Ending::Normal,
                    1 => Ending::WithWill,
                    _ => Ending::Lost,
                };
                w.disconnect(c, ending);
            }
            2 if tracked => w.subscribe(c, &mut inp),
            3 if tracked => w.publish(c, &mut inp),
            2 | 3 => w.hostile_send(c, &mut inp),
            4 => w.read(c),
            5 => {
                let n = inp.byte() % 8;
                w.ack(c, n);
            }
            6 => {
                let n = usize::from(inp.byte());
                w.deliver_events(n);
            }
            7 => {
                w.now += Duration::from_millis(u64::from(inp.byte()) * 100);
                for core in &mut w.cores {
                    core.fire_timers(w.now);
                }
            }
            8 => w.hostile_send(c, &mut inp),
            _ => {
                w.read(c);
                let n = inp.byte() % 8;
                w.ack(c, n);
            }
        }
        w.check();
    }
    w.finish();
});
