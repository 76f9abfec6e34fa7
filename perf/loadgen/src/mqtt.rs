//! MQTT over a tokio `TcpStream` with shardmq's codec: the handshake and control packets go
//! through [`shardmq::protocol`]; the hot path (PUBLISH out, PUBLISH and acks in) uses a
//! pre-encoded PUBLISH template patched per message and a small frame parser, so that the
//! generator spends far less per message than a broker does.

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use shardmq::protocol::{
    decode, packet_type, Ack, ConnAck, Connect, ConnectProperties, DecodeLimits, Disconnect,
    DisconnectProperties, MqttStr, Packet, PacketId, ProtocolVersion, Publish, QoS, ReasonCode,
    SubAck, Subscribe, SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName,
};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a handshake step (connect, CONNACK, SUBACK) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest packet we accept from the broker.
const MAX_PACKET: usize = 268_435_460;

/// What a connection asks for in CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval (seconds); ignored for 3.1.1.
    pub session_expiry: Option<u32>,
    pub keep_alive: u16,
    /// MQTT 5 Receive Maximum we offer; ignored for 3.1.1.
    pub receive_maximum: Option<u16>,
    /// Capacity the read buffer starts with.
    pub buf_size: usize,
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: ProtocolVersion,
    pub buf_size: usize,
    next_pid: u16,
}

/// The broker's answer to CONNECT, reduced to what the generator uses.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub session_present: bool,
    /// The broker's Receive Maximum (MQTT 5), 65535 when absent.
    pub receive_maximum: u16,
}

pub async fn connect(
    addr: SocketAddr,
    local: Option<IpAddr>,
    opts: &ConnectOpts,
) -> Result<(Conn, Accepted)> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect_inner(addr, local, opts))
        .await
        .map_err(|_| {
            anyhow!(
                "connect {}: no CONNACK within {HANDSHAKE_TIMEOUT:?}",
                opts.client_id
            )
        })?
}

async fn connect_inner(
    addr: SocketAddr,
    local: Option<IpAddr>,
    opts: &ConnectOpts,
) -> Result<(Conn, Accepted)> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(opts.buf_size),
        wbuf: BytesMut::with_capacity(opts.buf_size.min(16 * 1024)),
        version: opts.version,
        buf_size: opts.buf_size,
        next_pid: 0,
    };
    let v5 = opts.version.is_v5();
    let connect = Connect {
        protocol: opts.version,
        clean_start: opts.clean_start,
        keep_alive: opts.keep_alive,
        properties: ConnectProperties {
            session_expiry_interval: if v5 { opts.session_expiry } else { None },
            receive_maximum: if v5 { opts.receive_maximum } else { None },
            ..ConnectProperties::default()
        },
        client_id: MqttStr::new(&opts.client_id).map_err(|e| anyhow!("client id: {e}"))?,
        will: None,
        username: None,
        password: None,
    };
    conn.send(&Packet::Connect(Box::new(connect))).await?;
    let ack: ConnAck = match conn.next_packet().await? {
        Packet::ConnAck(a) => *a,
        other => bail!("expected CONNACK, got {}", other.name()),
    };
    if ack.reason_code.as_u8() >= 0x80 {
        bail!("CONNACK {}: {:?}", opts.client_id, ack.reason_code);
    }
    let accepted = Accepted {
        session_present: ack.session_present,
        receive_maximum: ack.properties.receive_maximum.unwrap_or(u16::MAX),
    };
    Ok((conn, accepted))
}

impl Conn {
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits::new(MAX_PACKET, Some(self.version))
    }

    /// Encodes and writes one packet now.
    pub async fn send(&mut self, p: &Packet) -> Result<()> {
        p.encode(self.version, &mut self.wbuf)
            .map_err(|e| anyhow!("encode {}: {e:?}", p.name()))?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Reads more bytes; an error when the broker closed the connection.
    pub async fn fill(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(self.buf_size.max(4096));
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            bail!("connection closed by the broker");
        }
        Ok(())
    }

    /// The next whole packet, decoded by the codec.
    pub async fn next_packet(&mut self) -> Result<Packet> {
        let limits = self.limits();
        loop {
            if let Some(p) = decode(&mut self.rbuf, &limits).map_err(|e| anyhow!("decode: {e}"))? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    pub fn pid(&mut self) -> PacketId {
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        PacketId::new(self.next_pid).expect("non-zero")
    }

    /// SUBSCRIBE and wait for the SUBACK; a refused filter is an error. PUBLISHes that arrive
    /// first (a resumed session's queue) are acknowledged and counted in the answer.
    pub async fn subscribe(&mut self, filters: &[String], qos: QoS) -> Result<u64> {
        let pid = self.pid();
        let mut list = Vec::with_capacity(filters.len());
        for f in filters {
            let filter = TopicFilter::new(f).map_err(|e| anyhow!("topic filter {f}: {e}"))?;
            list.push((
                filter,
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            ));
        }
        let sub = Subscribe {
            packet_id: pid,
            properties: SubscribeProperties::default(),
            filters: list,
        };
        self.send(&Packet::Subscribe(sub)).await?;
        let mut early = 0;
        let ack: SubAck = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match self.next_packet().await? {
                    Packet::SubAck(a) if a.packet_id == pid => break Ok::<_, anyhow::Error>(a),
                    Packet::Publish(p) => {
                        early += 1;
                        self.ack_publish(&p).await?;
                    }
                    Packet::PubRel(a) => self.send(&Packet::PubComp(Ack::new(a.packet_id))).await?,
                    other => bail!("expected SUBACK, got {}", other.name()),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK within {HANDSHAKE_TIMEOUT:?}"))??;
        if let Some(bad) = ack.reason_codes.iter().find(|c| c.as_u8() >= 0x80) {
            bail!("SUBSCRIBE refused: {bad:?}");
        }
        Ok(early)
    }

    async fn ack_publish(&mut self, p: &Publish) -> Result<()> {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send(&Packet::PubAck(Ack::new(id))).await,
            (QoS::ExactlyOnce, Some(id)) => self.send(&Packet::PubRec(Ack::new(id))).await,
            _ => Ok(()),
        }
    }

    /// DISCONNECT (normal), optionally ending an MQTT 5 session (Session Expiry 0), then close.
    pub async fn disconnect(mut self, end_session: bool) -> Result<()> {
        let mut d = Disconnect::new(ReasonCode::Success);
        if end_session && self.version.is_v5() {
            d.properties = DisconnectProperties {
                session_expiry_interval: Some(0),
                ..DisconnectProperties::default()
            };
        }
        self.send(&Packet::Disconnect(d)).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

/// A PUBLISH encoded once; each message is a copy with its packet id, timestamp (first 8
/// payload bytes) and, optionally, a fixed-width decimal topic suffix patched in.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    pid_at: Option<usize>,
    payload_at: usize,
    /// Offset and width of the topic's numeric suffix.
    number_at: Option<(usize, usize)>,
}

impl PublishTemplate {
    /// `topic` ends with `width` digits when `numbered` is given (they are overwritten per
    /// message).
    pub fn new(
        version: ProtocolVersion,
        qos: QoS,
        topic: &str,
        payload: usize,
        numbered: Option<usize>,
    ) -> Result<PublishTemplate> {
        if payload < 8 {
            bail!("payload must be at least 8 bytes (the timestamp)");
        }
        let topic_name = TopicName::new(topic).map_err(|e| anyhow!("topic {topic}: {e}"))?;
        let mut body = vec![0u8; payload];
        // A recognisable filler after the timestamp.
        for (i, b) in body.iter_mut().enumerate().skip(8) {
            *b = b'a' + (i % 26) as u8;
        }
        let mut p = Publish::new(topic_name, Bytes::from(body));
        p.qos = qos;
        if qos != QoS::AtMostOnce {
            p.packet_id = Some(PacketId::new(1).expect("non-zero"));
        }
        let mut buf = BytesMut::new();
        Packet::Publish(p)
            .encode(version, &mut buf)
            .map_err(|e| anyhow!("encode PUBLISH: {e:?}"))?;
        let total = buf.len();
        let payload_at = total - payload;
        let props = usize::from(version.is_v5());
        let pid_at = (qos != QoS::AtMostOnce).then(|| payload_at - props - 2);
        let topic_end = payload_at - props - if qos != QoS::AtMostOnce { 2 } else { 0 };
        let number_at = numbered.map(|w| (topic_end - w, w));
        Ok(PublishTemplate {
            bytes: buf.to_vec(),
            pid_at,
            payload_at,
            number_at,
        })
    }

    /// Appends one message to `out`.
    pub fn write(&self, out: &mut BytesMut, pid: u16, ts_ns: u64, number: u64) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let m = &mut out[start..];
        if let Some(at) = self.pid_at {
            m[at..at + 2].copy_from_slice(&pid.to_be_bytes());
        }
        m[self.payload_at..self.payload_at + 8].copy_from_slice(&ts_ns.to_be_bytes());
        if let Some((at, w)) = self.number_at {
            let mut n = number;
            for i in (0..w).rev() {
                m[at + i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        }
    }
}

/// A packet on the hot path, parsed in place.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A PUBLISH: its QoS, packet id (0 for QoS 0) and the timestamp from its payload
    /// (`None` when the payload is shorter than 8 bytes).
    Publish { qos: u8, pid: u16, ts: Option<u64> },
    /// PUBACK, PUBREC, PUBREL or PUBCOMP with its packet id and reason code (0 in 3.1.1).
    Ack { kind: u8, pid: u16, reason: u8 },
    /// Any other packet, decoded by the codec.
    Other(Box<Packet>),
}

/// Takes one frame off the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn next_frame(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<Frame>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let ptype = first >> 4;
    let hot = matches!(
        ptype,
        packet_type::PUBLISH
            | packet_type::PUBACK
            | packet_type::PUBREC
            | packet_type::PUBREL
            | packet_type::PUBCOMP
    );
    if !hot {
        return match decode(buf, limits).map_err(|e| anyhow!("decode: {e}"))? {
            Some(p) => Ok(Some(Frame::Other(Box::new(p)))),
            None => Ok(None),
        };
    }
    let Some((remaining, len_bytes)) =
        shardmq::protocol::wire::peek_varint(&buf[1..]).map_err(|e| anyhow!("decode: {e}"))?
    else {
        return Ok(None);
    };
    let hdr = 1 + len_bytes;
    let total = hdr + remaining as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let body = &buf[hdr..total];
    let frame = if ptype == packet_type::PUBLISH {
        let qos = (first >> 1) & 0x03;
        let short = || anyhow!("malformed PUBLISH");
        let tlen = u16::from_be_bytes(body.get(..2).ok_or_else(short)?.try_into()?) as usize;
        let mut at = 2 + tlen;
        let mut pid = 0;
        if qos > 0 {
            pid = u16::from_be_bytes(body.get(at..at + 2).ok_or_else(short)?.try_into()?);
            at += 2;
        }
        if limits.version.is_some_and(ProtocolVersion::is_v5) {
            let (plen, n) = shardmq::protocol::wire::peek_varint(body.get(at..).ok_or_else(short)?)
                .map_err(|e| anyhow!("decode: {e}"))?
                .ok_or_else(short)?;
            at += n + plen as usize;
        }
        let payload = body.get(at..).ok_or_else(short)?;
        let ts = payload
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        Frame::Publish { qos, pid, ts }
    } else {
        if body.len() < 2 {
            bail!("malformed acknowledgement");
        }
        let pid = u16::from_be_bytes([body[0], body[1]]);
        let reason = body.get(2).copied().unwrap_or(0);
        Frame::Ack {
            kind: ptype,
            pid,
            reason,
        }
    };
    buf.advance(total);
    Ok(Some(frame))
}

/// Appends a 4-byte acknowledgement (PUBACK/PUBREC/PUBREL/PUBCOMP, Success).
pub fn put_ack(out: &mut BytesMut, kind: u8, pid: u16) {
    let flags = if kind == packet_type::PUBREL { 0x02 } else { 0 };
    out.put_u8(kind << 4 | flags);
    out.put_u8(2);
    out.put_u16(pid);
}

/// Appends PINGREQ.
pub fn put_pingreq(out: &mut BytesMut) {
    out.put_u8(packet_type::PINGREQ << 4);
    out.put_u8(0);
}

pub fn qos(n: u8) -> QoS {
    QoS::from_u8(n).unwrap_or(QoS::AtMostOnce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(version: ProtocolVersion, q: QoS) {
        let t = PublishTemplate::new(version, q, "lg/x/00000", 64, Some(5)).unwrap();
        let mut out = BytesMut::new();
        t.write(&mut out, 513, 0x0102_0304_0506_0708, 4321);
        t.write(&mut out, 7, 99, 12);
        let limits = DecodeLimits::new(1 << 20, Some(version));
        // The codec agrees with the patched bytes.
        let mut copy = out.clone();
        let Packet::Publish(p) = decode(&mut copy, &limits).unwrap().unwrap() else {
            panic!("not a PUBLISH")
        };
        assert_eq!(p.topic.as_str(), "lg/x/04321");
        assert_eq!(p.qos, q);
        assert_eq!(p.payload.len(), 64);
        assert_eq!(&p.payload[..8], &0x0102_0304_0506_0708u64.to_be_bytes());
        if q != QoS::AtMostOnce {
            assert_eq!(p.packet_id.unwrap().get(), 513);
        }
        // The fast parser reads both.
        let f = next_frame(&mut out, &limits).unwrap().unwrap();
        let pid = if q == QoS::AtMostOnce { 0 } else { 513 };
        assert_eq!(
            f,
            Frame::Publish {
                qos: q.as_u8(),
                pid,
                ts: Some(0x0102_0304_0506_0708)
            }
        );
        let f = next_frame(&mut out, &limits).unwrap().unwrap();
        let pid = if q == QoS::AtMostOnce { 0 } else { 7 };
        assert_eq!(
            f,
            Frame::Publish {
                qos: q.as_u8(),
                pid,
                ts: Some(99)
            }
        );
        assert!(out.is_empty());
    }

    #[test]
    fn template_and_parser_agree_with_the_codec() {
        for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                roundtrip(v, q);
            }
        }
    }

    #[test]
    fn acks_parse_and_partial_frames_wait() {
        let limits = DecodeLimits::new(1 << 20, Some(ProtocolVersion::V5));
        let mut out = BytesMut::new();
        put_ack(&mut out, packet_type::PUBREL, 300);
        let mut copy = out.clone();
        assert_eq!(
            decode(&mut copy, &limits).unwrap().unwrap(),
            Packet::PubRel(Ack::new(PacketId::new(300).unwrap()))
        );
        let mut part = BytesMut::from(&out[..3]);
        assert!(next_frame(&mut part, &limits).unwrap().is_none());
        assert_eq!(
            next_frame(&mut out, &limits).unwrap().unwrap(),
            Frame::Ack {
                kind: packet_type::PUBREL,
                pid: 300,
                reason: 0
            }
        );
        // A v5 PUBACK with a reason code.
        let mut b = BytesMut::new();
        Packet::PubAck(Ack::with_reason(
            PacketId::new(9).unwrap(),
            ReasonCode::QuotaExceeded,
        ))
        .encode(ProtocolVersion::V5, &mut b)
        .unwrap();
        assert_eq!(
            next_frame(&mut b, &limits).unwrap().unwrap(),
            Frame::Ack {
                kind: packet_type::PUBACK,
                pid: 9,
                reason: 0x97
            }
        );
        let mut ping = BytesMut::from(&[0xD0u8, 0][..]);
        assert_eq!(
            next_frame(&mut ping, &limits).unwrap().unwrap(),
            Frame::Other(Box::new(Packet::PingResp))
        );
    }
}
