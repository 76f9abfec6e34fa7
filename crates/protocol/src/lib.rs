//! The MQTT codec: bytes in, packets out, and back. Pure: no I/O, no knowledge of the
//! broker; it depends on `bytes` only.
//!
//! - [`decode`] takes the bytes read so far and the [`DecodeLimits`] in force and answers a
//!   packet, `None` ("need more bytes"), or a [`DecodeError`] that names the broken rule and
//!   maps to the MQTT 5 reason code to send. An oversized packet is refused from its fixed
//!   header, before its body is buffered.
//! - [`Packet::encode`] writes into a caller's `BytesMut` after one sizing pass, without
//!   intermediate allocations. [`Publish::encode_header`] writes a PUBLISH without its payload
//!   so that many receivers can share one payload buffer.
//! - The value types ([`TopicName`], [`TopicFilter`], [`PacketId`], [`QoS`], [`MqttStr`])
//!   are validated once, here, and trusted everywhere above.
//!
//! One file per packet family: `connect`, `publish`, `subscribe`, `control`; `properties`
//! holds the MQTT 5 property blocks and `wire` the data representations of section 1.5.

mod connect;
mod control;
mod error;
mod properties;
mod publish;
mod subscribe;
mod types;
pub mod wire;

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub use connect::{ConnAck, Connect, LastWill};
pub use control::{Auth, Disconnect};
pub use error::{DecodeError, EncodeError};
pub use properties::{
    id as property_id, AckProperties, AuthProperties, ConnAckProperties, ConnectProperties,
    DisconnectProperties, PublishProperties, SubscribeProperties, UnsubscribeProperties,
    UserProperties, WillProperties,
};
pub use publish::{Ack, Publish};
pub use subscribe::{SubAck, Subscribe, UnsubAck, Unsubscribe};
pub use types::{
    topic_matches, MqttStr, PacketId, ProtocolVersion, QoS, ReasonCode, ReasonContext,
    RetainHandling, SubscriptionOptions, TopicFilter, TopicName,
};

use wire::{peek_varint, put_varint, varint_len, Reader, VARINT_MAX};

/// The largest packet the protocol can express: 1 type byte, 4 length bytes, and the
/// largest remaining length.
pub const MAX_PACKET_SIZE_PROTOCOL: usize = 1 + 4 + VARINT_MAX as usize;

/// The limits a decoder enforces.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The largest whole packet (fixed header included) accepted, in bytes.
    pub max_packet_size: usize,
    /// The version negotiated by CONNECT; `None` until then, when only CONNECT decodes.
    pub version: Option<ProtocolVersion>,
}

impl DecodeLimits {
    pub fn new(max_packet_size: usize, version: Option<ProtocolVersion>) -> DecodeLimits {
        DecodeLimits {
            max_packet_size,
            version,
        }
    }
}

/// Every control packet of MQTT 3.1, 3.1.1 and 5.0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(Box<ConnAck>),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Box<Auth>),
}

/// Packet type numbers (section 2.1.2).
pub mod packet_type {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

/// The fixed-header flags each packet type requires (PUBLISH's are free).
fn required_flags(packet_type: u8) -> Option<u8> {
    use packet_type::*;
    match packet_type {
        PUBLISH => None,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Some(0b0010),
        _ => Some(0),
    }
}

/// Decodes one packet from the front of `buf`, consuming its bytes only when a whole packet
/// (or an error) is found. See the module docs.
pub fn decode(buf: &mut BytesMut, limits: &DecodeLimits) -> Result<Option<Packet>, DecodeError> {
    let Some(FixedHeader {
        ptype,
        flags,
        version,
        len_bytes,
        total,
    }) = fixed_header(buf, limits)?
    else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    // The packets whose parts can outlive them (strings, payloads, properties kept in
    // sessions, queues, retained messages) get an allocation of exactly their size: a kept
    // part then holds its own packet's bytes, never the connection's read buffer (which may
    // have grown large for another packet). The others are read in place.
    let keeps = matches!(
        ptype,
        packet_type::CONNECT | packet_type::PUBLISH | packet_type::SUBSCRIBE
    );
    let frame = if keeps {
        let body = Bytes::copy_from_slice(&buf[1 + len_bytes..total]);
        buf.advance(total);
        body
    } else {
        let mut frame = buf.split_to(total).freeze();
        frame.advance(1 + len_bytes);
        frame
    };
    let mut r = Reader::new(frame);
    decode_body(ptype, flags, &mut r, version).map(Some)
}

/// What the fixed header of a packet says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedHeader {
    pub ptype: u8,
    pub flags: u8,
    /// The version to decode the body in.
    pub version: ProtocolVersion,
    /// Bytes of the Remaining Length field.
    pub len_bytes: usize,
    /// The whole packet's size, fixed header included.
    pub total: usize,
}

/// Checks the fixed header at the front of `buf` (type, flags, length against the limit)
/// without consuming anything: `Ok(None)` while it is incomplete. [`decode`] starts here; a
/// reader that assembles a big packet uses it to learn the size early.
pub fn fixed_header(buf: &[u8], limits: &DecodeLimits) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let ptype = first >> 4;
    let flags = first & 0x0F;
    let is_v5 = limits.version.is_some_and(ProtocolVersion::is_v5);
    if ptype == 0 || (ptype == packet_type::AUTH && limits.version.is_some() && !is_v5) {
        return Err(DecodeError::InvalidPacketType(ptype));
    }
    if let Some(required) = required_flags(ptype) {
        if flags != required {
            return Err(DecodeError::InvalidFlags {
                packet_type: ptype,
                flags,
            });
        }
    } else if (flags >> 1) & 0x03 == 3 {
        return Err(DecodeError::InvalidQoS(3));
    }
    let version = match limits.version {
        Some(v) => v,
        None if ptype == packet_type::CONNECT => ProtocolVersion::V5, // unused by CONNECT
        None => return Err(DecodeError::ExpectedConnect),
    };
    let Some((remaining, len_bytes)) = peek_varint(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + len_bytes + remaining as usize;
    if total > limits.max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: limits.max_packet_size,
        });
    }
    Ok(Some(FixedHeader {
        ptype,
        flags,
        version,
        len_bytes,
        total,
    }))
}

fn decode_body(
    ptype: u8,
    flags: u8,
    r: &mut Reader,
    version: ProtocolVersion,
) -> Result<Packet, DecodeError> {
    use packet_type::*;
    Ok(match ptype {
        CONNECT => Packet::Connect(Box::new(Connect::decode(r)?)),
        CONNACK => Packet::ConnAck(Box::new(ConnAck::decode(r, version)?)),
        PUBLISH => Packet::Publish(Publish::decode(flags, r, version)?),
        PUBACK => Packet::PubAck(Ack::decode(r, version, ReasonContext::PubAck, "PUBACK")?),
        PUBREC => Packet::PubRec(Ack::decode(r, version, ReasonContext::PubRec, "PUBREC")?),
        PUBREL => Packet::PubRel(Ack::decode(r, version, ReasonContext::PubRel, "PUBREL")?),
        PUBCOMP => Packet::PubComp(Ack::decode(r, version, ReasonContext::PubComp, "PUBCOMP")?),
        SUBSCRIBE => Packet::Subscribe(Subscribe::decode(r, version)?),
        SUBACK => Packet::SubAck(SubAck::decode(r, version)?),
        UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::decode(r, version)?),
        UNSUBACK => Packet::UnsubAck(UnsubAck::decode(r, version)?),
        PINGREQ => {
            r.finish()?;
            Packet::PingReq
        }
        PINGRESP => {
            r.finish()?;
            Packet::PingResp
        }
        DISCONNECT => Packet::Disconnect(Disconnect::decode(r, version)?),
        AUTH if version.is_v5() => Packet::Auth(Box::new(Auth::decode(r)?)),
        _ => return Err(DecodeError::InvalidPacketType(ptype)),
    })
}

impl Packet {
    /// The packet type number.
    pub fn packet_type(&self) -> u8 {
        use packet_type::*;
        match self {
            Packet::Connect(_) => CONNECT,
            Packet::ConnAck(_) => CONNACK,
            Packet::Publish(_) => PUBLISH,
            Packet::PubAck(_) => PUBACK,
            Packet::PubRec(_) => PUBREC,
            Packet::PubRel(_) => PUBREL,
            Packet::PubComp(_) => PUBCOMP,
            Packet::Subscribe(_) => SUBSCRIBE,
            Packet::SubAck(_) => SUBACK,
            Packet::Unsubscribe(_) => UNSUBSCRIBE,
            Packet::UnsubAck(_) => UNSUBACK,
            Packet::PingReq => PINGREQ,
            Packet::PingResp => PINGRESP,
            Packet::Disconnect(_) => DISCONNECT,
            Packet::Auth(_) => AUTH,
        }
    }

    /// The packet's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        const NAMES: [&str; 16] = [
            "RESERVED",
            "CONNECT",
            "CONNACK",
            "PUBLISH",
            "PUBACK",
            "PUBREC",
            "PUBREL",
            "PUBCOMP",
            "SUBSCRIBE",
            "SUBACK",
            "UNSUBSCRIBE",
            "UNSUBACK",
            "PINGREQ",
            "PINGRESP",
            "DISCONNECT",
            "AUTH",
        ];
        NAMES[self.packet_type() as usize]
    }

    fn remaining_len(&self, version: ProtocolVersion) -> usize {
        match self {
            Packet::Connect(c) => c.remaining_len(),
            Packet::ConnAck(c) => c.remaining_len(version),
            Packet::Publish(p) => p.remaining_len(version),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                a.remaining_len(version)
            }
            Packet::Subscribe(s) => s.remaining_len(version),
            Packet::SubAck(s) => s.remaining_len(version),
            Packet::Unsubscribe(u) => u.remaining_len(version),
            Packet::UnsubAck(u) => u.remaining_len(version),
            Packet::PingReq | Packet::PingResp => 0,
            Packet::Disconnect(d) => d.remaining_len(version),
            Packet::Auth(a) => a.remaining_len(),
        }
    }

    /// The size of the whole packet on the wire for `version` (to check a peer's Maximum
    /// Packet Size before sending).
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let rl = self.remaining_len(version);
        1 + varint_len(rl.min(VARINT_MAX as usize) as u32) + rl
    }

    fn first_byte(&self) -> u8 {
        let flags = match self {
            Packet::Publish(p) => p.flags(),
            Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
            _ => 0,
        };
        self.packet_type() << 4 | flags
    }

    /// Appends the packet, as `version` writes it, to `buf`. CONNECT is written in its own
    /// `protocol` version. Returns the number of bytes written.
    pub fn encode(
        &self,
        version: ProtocolVersion,
        buf: &mut BytesMut,
    ) -> Result<usize, EncodeError> {
        if matches!(self, Packet::Auth(_)) && !version.is_v5() {
            return Err(EncodeError::PacketNotInVersion("AUTH"));
        }
        let rl = self.remaining_len(version);
        if rl > VARINT_MAX as usize {
            return Err(EncodeError::PacketTooLarge {
                size: rl,
                max: VARINT_MAX as usize,
            });
        }
        let total = 1 + varint_len(rl as u32) + rl;
        buf.reserve(total);
        let start = buf.len();
        buf.put_u8(self.first_byte());
        put_varint(buf, rl as u32);
        match self {
            Packet::Connect(c) => c.encode_body(buf),
            Packet::ConnAck(c) => c.encode_body(version, buf),
            Packet::Publish(p) => p.encode_body(version, buf),
            Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                a.encode_body(version, buf)
            }
            Packet::Subscribe(s) => s.encode_body(version, buf),
            Packet::SubAck(s) => s.encode_body(version, buf),
            Packet::Unsubscribe(u) => u.encode_body(version, buf),
            Packet::UnsubAck(u) => u.encode_body(version, buf),
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(d) => d.encode_body(version, buf),
            Packet::Auth(a) => a.encode_body(buf),
        }
        debug_assert_eq!(buf.len() - start, total, "{} size mismatch", self.name());
        Ok(total)
    }
}
