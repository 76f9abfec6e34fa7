//! A small blocking MQTT client over `std::net::TcpStream`, built on the broker's own codec,
//! for byte-level checks: exact flags (DUP, RETAIN), packet ids, return codes, and whether
//! the broker closed the socket. It never acknowledges anything by itself, so a test decides
//! what the broker sees. Every read is bounded by [`super::TIMEOUT`] (a failure bound, never
//! a synchronisation point): a test waits for the packet or the close it expects.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failure is a test failure"
)]
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shardmq::protocol::{
    decode, Ack, ConnAck, Connect, ConnectProperties, DecodeLimits, Disconnect, LastWill, MqttStr,
    Packet, PacketId, ProtocolVersion, Publish, QoS, ReasonCode, SubAck, Subscribe,
    SubscriptionOptions, TopicFilter, TopicName, Unsubscribe, MAX_PACKET_SIZE_PROTOCOL,
};

use super::TIMEOUT;

pub const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
pub const V5: ProtocolVersion = ProtocolVersion::V5;

/// What a read ended with when it did not produce a packet.
#[derive(Debug)]
pub enum ReadEnd {
    /// The broker closed the connection (EOF or reset).
    Closed,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// The broker sent bytes that do not decode.
    Malformed(String),
}

/// A CONNECT, with the fields tests vary.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    /// (topic, payload, qos, retain)
    pub will: Option<(String, Vec<u8>, QoS, bool)>,
    pub properties: ConnectProperties,
}

impl ConnectOpts {
    pub fn new(version: ProtocolVersion, client_id: &str, clean: bool) -> ConnectOpts {
        ConnectOpts {
            version,
            client_id: client_id.to_string(),
            clean,
            keep_alive: 0,
            will: None,
            properties: ConnectProperties::default(),
        }
    }

    pub fn v311(client_id: &str, clean: bool) -> ConnectOpts {
        ConnectOpts::new(V311, client_id, clean)
    }

    pub fn keep_alive(mut self, s: u16) -> ConnectOpts {
        self.keep_alive = s;
        self
    }

    pub fn will(mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) -> ConnectOpts {
        self.will = Some((topic.to_string(), payload.to_vec(), qos, retain));
        self
    }

    pub fn packet(&self) -> Packet {
        Packet::Connect(Box::new(Connect {
            protocol: self.version,
            clean_start: self.clean,
            keep_alive: self.keep_alive,
            properties: self.properties.clone(),
            client_id: MqttStr::new(&self.client_id).expect("valid client id"),
            will: self.will.as_ref().map(|(t, p, q, r)| LastWill {
                topic: topic(t),
                payload: Bytes::copy_from_slice(p),
                qos: *q,
                retain: *r,
                properties: Default::default(),
            }),
            username: None,
            password: None,
        }))
    }
}

pub fn topic(t: &str) -> TopicName {
    TopicName::new(t).expect("valid topic name")
}

pub fn filter(f: &str) -> TopicFilter {
    TopicFilter::new(f).expect("valid topic filter")
}

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero packet id")
}

/// A PUBLISH packet as a client would send it.
pub fn publish_packet(
    t: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    packet_id: Option<u16>,
    dup: bool,
) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain,
        topic: topic(t),
        packet_id: packet_id.map(pid),
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// One connection to the broker.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    pub version: ProtocolVersion,
    /// Packets read while waiting for something else, handed out first by `recv`.
    stash: VecDeque<(Packet, Bytes)>,
    next_pid: u16,
}

impl RawClient {
    /// Opens a TCP connection and sends nothing.
    pub fn tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).expect("nodelay");
        RawClient {
            stream,
            buf: BytesMut::with_capacity(4096),
            version: V311,
            stash: VecDeque::new(),
            next_pid: 1,
        }
    }

    /// Connects and returns the CONNACK's reason code, or `None` when none came within
    /// `wait` (a bounded try, for a test that retries).
    pub fn connack_within(
        addr: SocketAddr,
        opts: &ConnectOpts,
        wait: Duration,
    ) -> Option<ReasonCode> {
        let mut c = RawClient::tcp(addr);
        c.version = opts.version;
        c.send(&opts.packet());
        match c.read_frame_until(Instant::now() + wait) {
            Ok((Packet::ConnAck(a), _)) => Some(a.reason_code),
            _ => None,
        }
    }

    /// Connects and returns the CONNACK, whatever it says.
    pub fn connect_raw(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, ConnAck) {
        let mut c = RawClient::tcp(addr);
        c.version = opts.version;
        c.send(&opts.packet());
        match c.recv() {
            Packet::ConnAck(a) => (c, *a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// [`RawClient::connect`], trying again while the broker answers "server unavailable"
    /// (a cluster node not serving the client yet: a table on its way, a slot held while
    /// it moves, a lease renewal late on a loaded machine), as clients do.
    pub fn connect_served(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (c, ack) = RawClient::connect_raw(addr, opts);
            if ack.reason_code != ReasonCode::ServerUnavailable || Instant::now() > deadline {
                assert_eq!(
                    ack.reason_code,
                    ReasonCode::Success,
                    "CONNACK for {:?}",
                    opts.client_id
                );
                return (c, ack.session_present);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Connects and asserts success; returns the client and Session Present.
    pub fn connect(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, bool) {
        let (c, ack) = RawClient::connect_raw(addr, opts);
        assert_eq!(
            ack.reason_code,
            ReasonCode::Success,
            "CONNACK for {:?}",
            opts.client_id
        );
        (c, ack.session_present)
    }

    /// A clean 3.1.1 connection.
    pub fn connect_v311(addr: SocketAddr, client_id: &str) -> RawClient {
        RawClient::connect(addr, &ConnectOpts::v311(client_id, true)).0
    }

    pub fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        p.encode(self.version, &mut out).expect("encode");
        self.send_bytes(&out);
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// Like `send`, but a broker that already closed the socket is not an error (the next
    /// read tells).
    pub fn try_send(&mut self, p: &Packet) -> bool {
        let mut out = BytesMut::new();
        p.encode(self.version, &mut out).expect("encode");
        self.try_send_bytes(&out)
    }

    /// Like `send`, but a broker that already closed the socket is not an error.
    pub fn try_send_bytes(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    fn take_frame(&mut self) -> Result<Option<(Packet, Bytes)>, ReadEnd> {
        let before = self.buf.clone();
        let limits = DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, Some(self.version));
        match decode(&mut self.buf, &limits) {
            Ok(Some(p)) => {
                let used = before.len() - self.buf.len();
                Ok(Some((p, before.freeze().slice(..used))))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ReadEnd::Malformed(format!("{e}: {:02x?}", &before[..]))),
        }
    }

    /// The next packet with its exact bytes, or why there is none by `deadline`.
    pub fn read_frame_until(&mut self, deadline: Instant) -> Result<(Packet, Bytes), ReadEnd> {
        if let Some(f) = self.stash.pop_front() {
            return Ok(f);
        }
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::TimedOut);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ReadEnd::TimedOut)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    }

    /// The next packet and its bytes; panics if none comes within TIMEOUT.
    pub fn recv_frame(&mut self) -> (Packet, Bytes) {
        match self.read_frame_until(Instant::now() + TIMEOUT) {
            Ok(f) => f,
            Err(e) => panic!("expected a packet from the broker, got {e:?}"),
        }
    }

    /// The next packet; panics if none comes within TIMEOUT.
    pub fn recv(&mut self) -> Packet {
        self.recv_frame().0
    }

    /// Reads packets until one satisfies `pick`; the others are kept for later `recv`s.
    pub fn recv_matching(&mut self, what: &str, mut pick: impl FnMut(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + TIMEOUT;
        let mut skipped = VecDeque::new();
        // Look at what is stashed first, without reordering it.
        let mut found = None;
        while let Some(f) = self.stash.pop_front() {
            if found.is_none() && pick(&f.0) {
                found = Some(f.0);
            } else {
                skipped.push_back(f);
            }
        }
        if let Some(p) = found {
            self.stash = skipped;
            return p;
        }
        loop {
            match self.read_frame_until(deadline) {
                Ok(f) if pick(&f.0) => {
                    self.stash = skipped;
                    return f.0;
                }
                Ok(f) => skipped.push_back(f),
                Err(e) => panic!("waiting for {what}: {e:?}; got meanwhile {skipped:?}"),
            }
        }
    }

    /// The next PUBLISH (panics on any other packet).
    pub fn recv_publish(&mut self) -> Publish {
        match self.recv() {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next PUBLISH, acknowledged as its QoS asks (QoS 2: PUBREC, PUBREL, PUBCOMP).
    pub fn recv_publish_ack(&mut self) -> Publish {
        let p = self.recv_publish();
        self.ack(&p);
        p
    }

    /// Acknowledges a received PUBLISH (for QoS 2 the whole flow, waiting for PUBREL).
    pub fn ack(&mut self, p: &Publish) {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(Ack::new(id))),
            (QoS::ExactlyOnce, Some(id)) => {
                self.send(&Packet::PubRec(Ack::new(id)));
                self.recv_matching(
                    "PUBREL",
                    |x| matches!(x, Packet::PubRel(a) if a.packet_id == id),
                );
                self.send(&Packet::PubComp(Ack::new(id)));
            }
            _ => {}
        }
    }

    /// The broker closes the connection (EOF or reset) within TIMEOUT. Packets that arrive
    /// first are returned (an MQTT 5 DISCONNECT, say).
    pub fn expect_closed(&mut self) -> Vec<Packet> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got: Vec<Packet> = self.stash.drain(..).map(|f| f.0).collect();
        loop {
            match self.read_frame_until(deadline) {
                Ok((p, _)) => got.push(p),
                Err(ReadEnd::Closed) => return got,
                Err(ReadEnd::TimedOut) => {
                    panic!(
                        "the broker did not close the connection within {TIMEOUT:?}; got {got:?}"
                    )
                }
                Err(ReadEnd::Malformed(m)) => panic!("malformed bytes from the broker: {m}"),
            }
        }
    }

    pub fn next_pid(&mut self) -> u16 {
        let id = self.next_pid;
        self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
        id
    }

    /// SUBSCRIBE and wait for the SUBACK; returns its packet (exact codes).
    pub fn subscribe(&mut self, filters: &[(&str, QoS)]) -> SubAck {
        let id = self.next_pid();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid(id),
            properties: Default::default(),
            filters: filters
                .iter()
                .map(|(f, q)| {
                    (
                        filter(f),
                        SubscriptionOptions {
                            qos: *q,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }));
        match self.recv_matching("SUBACK", |p| matches!(p, Packet::SubAck(_))) {
            Packet::SubAck(a) => {
                assert_eq!(a.packet_id.get(), id, "SUBACK packet id");
                a
            }
            _ => unreachable!(),
        }
    }

    /// SUBSCRIBE, asserting every filter is granted the QoS asked for.
    pub fn sub(&mut self, filters: &[(&str, QoS)]) {
        let a = self.subscribe(filters);
        let want: Vec<ReasonCode> = filters
            .iter()
            .map(|(_, q)| match q {
                QoS::AtMostOnce => ReasonCode::Success,
                QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
            })
            .collect();
        assert_eq!(a.reason_codes, want, "SUBACK codes for {filters:?}");
    }

    /// UNSUBSCRIBE and wait for the UNSUBACK.
    pub fn unsubscribe(&mut self, filters: &[&str]) {
        let id = self.next_pid();
        self.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(id),
            properties: Default::default(),
            filters: filters.iter().map(|f| filter(f)).collect(),
        }));
        match self.recv_matching("UNSUBACK", |p| matches!(p, Packet::UnsubAck(_))) {
            Packet::UnsubAck(a) => assert_eq!(a.packet_id.get(), id, "UNSUBACK packet id"),
            _ => unreachable!(),
        }
    }

    /// PUBLISH and complete its flow (PUBACK, or PUBREC/PUBREL/PUBCOMP). Messages that
    /// arrive meanwhile are kept for later `recv`s.
    pub fn publish(&mut self, t: &str, payload: &[u8], qos: QoS, retain: bool) {
        let id = (qos != QoS::AtMostOnce).then(|| self.next_pid());
        self.send(&publish_packet(t, payload, qos, retain, id, false));
        match (qos, id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.recv_matching(
                    "PUBACK",
                    |p| matches!(p, Packet::PubAck(a) if a.packet_id.get() == id),
                );
            }
            (QoS::ExactlyOnce, Some(id)) => {
                self.recv_matching(
                    "PUBREC",
                    |p| matches!(p, Packet::PubRec(a) if a.packet_id.get() == id),
                );
                self.send(&Packet::PubRel(Ack::new(pid(id))));
                self.recv_matching(
                    "PUBCOMP",
                    |p| matches!(p, Packet::PubComp(a) if a.packet_id.get() == id),
                );
            }
            _ => {}
        }
    }

    /// PINGREQ and wait for PINGRESP: everything the broker queued for this connection
    /// before it handled the PINGREQ has been read (kept for later `recv`s).
    pub fn ping(&mut self) {
        self.send(&Packet::PingReq);
        self.recv_matching("PINGRESP", |p| matches!(p, Packet::PingResp));
    }

    /// DISCONNECT, then wait for the broker to close the socket: after this the broker has
    /// processed the disconnect (will discarded, session detached).
    pub fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)));
        self.expect_closed();
    }

    /// Closes the socket without DISCONNECT (an abnormal close: the will is published).
    pub fn drop_abruptly(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Half-closes our side and waits for the broker to close its side, so that the broker
    /// has seen the connection end before this returns.
    pub fn close_and_wait(mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.read_frame_until(deadline) {
                Ok(_) => {}
                Err(ReadEnd::Closed) => return,
                Err(e) => panic!("waiting for the broker to close after our FIN: {e:?}"),
            }
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

// ---------------------------------------------------------------------------------- MQTT 5
// Helpers for the MQTT 5 tests (tests/broker_v5.rs, tests/broker_shared.rs): properties,
// subscription options, reason codes of acks and of the broker's DISCONNECT.

impl ConnectOpts {
    /// An MQTT 5 CONNECT with no properties (Session Expiry 0).
    pub fn v5(client_id: &str, clean: bool) -> ConnectOpts {
        ConnectOpts::new(V5, client_id, clean)
    }

    /// Session Expiry Interval in the CONNECT.
    pub fn expiry(mut self, s: u32) -> ConnectOpts {
        self.properties.session_expiry_interval = Some(s);
        self
    }

    /// Sets any CONNECT property.
    pub fn props(mut self, f: impl FnOnce(&mut ConnectProperties)) -> ConnectOpts {
        f(&mut self.properties);
        self
    }

    /// The CONNECT packet, changed by `f` (will properties, say).
    pub fn packet_with(&self, f: impl FnOnce(&mut Connect)) -> Packet {
        let mut p = self.packet();
        if let Packet::Connect(c) = &mut p {
            f(c);
        }
        p
    }
}

/// Subscription options with only the maximum QoS set.
pub fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

/// A PUBLISH to send; `RawClient::publish_v5` gives it a packet id when its QoS needs one.
pub fn msg(t: &str, payload: &[u8], qos: QoS) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(t),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

impl RawClient {
    /// Sends `connect` (any CONNECT packet) and returns the CONNACK, whatever it says.
    pub fn connect_packet(addr: SocketAddr, connect: &Packet) -> (RawClient, ConnAck) {
        let mut c = RawClient::tcp(addr);
        if let Packet::Connect(x) = connect {
            c.version = x.protocol;
        }
        c.send(connect);
        match c.recv() {
            Packet::ConnAck(a) => (c, *a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// An MQTT 5 connection that must succeed; returns the client and its CONNACK.
    pub fn connect_v5(addr: SocketAddr, opts: &ConnectOpts) -> (RawClient, ConnAck) {
        let (c, ack) = RawClient::connect_raw(addr, opts);
        assert_eq!(
            ack.reason_code,
            ReasonCode::Success,
            "CONNACK for {:?}",
            opts.client_id
        );
        (c, ack)
    }

    /// MQTT 5 SUBSCRIBE with options and an optional Subscription Identifier; waits for the
    /// SUBACK and returns it.
    pub fn subscribe_v5(
        &mut self,
        filters: &[(&str, SubscriptionOptions)],
        sub_id: Option<u32>,
    ) -> SubAck {
        let id = self.next_pid();
        let mut s = Subscribe {
            packet_id: pid(id),
            properties: Default::default(),
            filters: filters.iter().map(|(f, o)| (filter(f), *o)).collect(),
        };
        s.properties.subscription_identifier = sub_id;
        self.send(&Packet::Subscribe(s));
        match self.recv_matching("SUBACK", |p| matches!(p, Packet::SubAck(_))) {
            Packet::SubAck(a) => {
                assert_eq!(a.packet_id.get(), id, "SUBACK packet id");
                a
            }
            _ => unreachable!(),
        }
    }

    /// Sends `p` (with a fresh packet id when its QoS needs one and it has none) and
    /// completes its flow. Returns the reason code of the PUBACK or PUBREC (`None` for QoS 0).
    pub fn publish_v5(&mut self, mut p: Publish) -> Option<ReasonCode> {
        if p.qos != QoS::AtMostOnce && p.packet_id.is_none() {
            p.packet_id = Some(pid(self.next_pid()));
        }
        let (qos, id) = (p.qos, p.packet_id);
        self.send(&Packet::Publish(p));
        match (qos, id) {
            (QoS::AtLeastOnce, Some(id)) => {
                match self.recv_matching(
                    "PUBACK",
                    |x| matches!(x, Packet::PubAck(a) if a.packet_id == id),
                ) {
                    Packet::PubAck(a) => Some(a.reason_code),
                    _ => unreachable!(),
                }
            }
            (QoS::ExactlyOnce, Some(id)) => {
                let rc = match self.recv_matching(
                    "PUBREC",
                    |x| matches!(x, Packet::PubRec(a) if a.packet_id == id),
                ) {
                    Packet::PubRec(a) => a.reason_code,
                    _ => unreachable!(),
                };
                self.send(&Packet::PubRel(Ack::new(id)));
                self.recv_matching(
                    "PUBCOMP",
                    |x| matches!(x, Packet::PubComp(a) if a.packet_id == id),
                );
                Some(rc)
            }
            _ => None,
        }
    }

    /// The broker sends DISCONNECT and closes the socket; returns the reason code. Packets
    /// of other kinds that arrive first are allowed (they were sent before the error).
    pub fn expect_disconnect(&mut self) -> ReasonCode {
        let got = self.expect_closed();
        match got
            .iter()
            .rev()
            .find(|p| matches!(p, Packet::Disconnect(_)))
        {
            Some(Packet::Disconnect(d)) => {
                assert!(
                    matches!(got.last(), Some(Packet::Disconnect(_))),
                    "DISCONNECT must be the last packet: {got:?}"
                );
                d.reason_code
            }
            _ => panic!("expected a DISCONNECT before the close, got {got:?}"),
        }
    }

    /// Sends `d` and waits for the broker to close; returns what it sent first (an MQTT 5
    /// DISCONNECT when it refuses ours).
    pub fn disconnect_with(mut self, d: Disconnect) -> Vec<Packet> {
        self.send(&Packet::Disconnect(d));
        self.expect_closed()
    }
}
