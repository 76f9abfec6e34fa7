//! PUBLISH (3.3) and its acknowledgements PUBACK, PUBREC, PUBREL, PUBCOMP (3.4-3.7).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use super::properties::{AckProperties, PublishProperties};
use super::types::{PacketId, ProtocolVersion, QoS, ReasonCode, ReasonContext, TopicName};
use super::wire::{prefixed_len, put_str, put_varint, varint_len, Reader};

/// An application message on the wire. The payload and topic share the received buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty only when `properties.topic_alias` stands in for it (MQTT 5).
    pub topic: TopicName,
    /// Present exactly when `qos` is 1 or 2.
    pub packet_id: Option<PacketId>,
    /// MQTT 5 only.
    pub properties: PublishProperties,
    pub payload: Bytes,
}

impl std::fmt::Debug for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish")
            .field("dup", &self.dup)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("topic", &self.topic)
            .field("packet_id", &self.packet_id)
            .field("properties", &self.properties)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl Publish {
    /// A QoS 0 message with no properties.
    pub fn new(topic: TopicName, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            packet_id: None,
            properties: PublishProperties::default(),
            payload,
        }
    }

    pub(crate) fn decode(
        flags: u8,
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let dup = flags & 0x08 != 0;
        let qos = QoS::from_u8((flags >> 1) & 0x03)?;
        let retain = flags & 0x01 != 0;
        if dup && qos == QoS::AtMostOnce && version != ProtocolVersion::V3_1 {
            // MQTT-3.3.1-2: DUP must be 0 for QoS 0 (3.1 did not say so).
            return Err(DecodeError::InvalidFlags {
                packet_type: 3,
                flags,
            });
        }
        let topic = TopicName::from_mqtt_str(r.string()?)?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(r.packet_id()?)
        };
        let properties = if version.is_v5() {
            PublishProperties::decode(r)?
        } else {
            PublishProperties::default()
        };
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::TopicNameInvalid);
        }
        let payload = r.rest();
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload,
        })
    }

    pub(crate) fn flags(&self) -> u8 {
        (self.dup as u8) << 3 | self.qos.as_u8() << 1 | self.retain as u8
    }

    /// The size of everything but the payload, after the fixed header.
    fn header_body_len(&self, version: ProtocolVersion) -> usize {
        let mut n = prefixed_len(self.topic.len());
        if self.qos != QoS::AtMostOnce {
            n += 2;
        }
        if version.is_v5() {
            n += if self.properties.is_empty() {
                1
            } else {
                self.properties.wire_len()
            };
        }
        n
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        self.header_body_len(version) + self.payload.len()
    }

    /// Writes the fixed header and variable header, not the payload. A broker writes this
    /// per receiver and then the payload `Bytes` shared by every receiver (one buffer,
    /// reference-counted), so a message fanned out to many clients is never copied.
    /// Returns the total packet size (header plus payload).
    pub fn encode_header(&self, version: ProtocolVersion, buf: &mut BytesMut) -> usize {
        debug_assert_eq!(self.packet_id.is_some(), self.qos != QoS::AtMostOnce);
        let remaining = self.remaining_len(version);
        buf.reserve(1 + varint_len(remaining as u32) + self.header_body_len(version));
        buf.put_u8(0x30 | self.flags());
        put_varint(buf, remaining as u32);
        put_str(buf, &self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id.map_or(0, |p| p.get()));
        }
        if version.is_v5() {
            if self.properties.is_empty() {
                buf.put_u8(0);
            } else {
                self.properties.encode(buf);
            }
        }
        1 + varint_len(remaining as u32) + remaining
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        put_str(buf, &self.topic);
        if self.qos != QoS::AtMostOnce {
            buf.put_u16(self.packet_id.map_or(0, |p| p.get()));
        }
        if version.is_v5() {
            if self.properties.is_empty() {
                buf.put_u8(0);
            } else {
                self.properties.encode(buf);
            }
        }
        buf.put_slice(&self.payload);
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape: a packet id, and in MQTT 5 a reason
/// code and properties, both omitted on the wire when they are Success and empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    /// Always Success for MQTT 3.x.
    pub reason_code: ReasonCode,
    pub properties: AckProperties,
}

impl Ack {
    pub fn new(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason_code: ReasonCode::Success,
            properties: AckProperties::default(),
        }
    }

    pub fn with_reason(packet_id: PacketId, reason_code: ReasonCode) -> Ack {
        Ack {
            packet_id,
            reason_code,
            properties: AckProperties::default(),
        }
    }

    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
        ctx: ReasonContext,
        name: &'static str,
    ) -> Result<Ack, DecodeError> {
        let packet_id = r.packet_id()?;
        let mut ack = Ack::new(packet_id);
        if version.is_v5() && !r.is_empty() {
            let code = r.u8()?;
            ack.reason_code = ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ctx))
                .ok_or(DecodeError::InvalidReasonCode { code, packet: name })?;
            if !r.is_empty() {
                ack.properties = AckProperties::decode(r, name)?;
            }
        }
        r.finish()?;
        Ok(ack)
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        if !version.is_v5() {
            2
        } else if self.properties.is_empty() {
            if self.reason_code == ReasonCode::Success {
                2
            } else {
                3
            }
        } else {
            3 + self.properties.wire_len()
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if !version.is_v5() {
            return;
        }
        let props = !self.properties.is_empty();
        if props || self.reason_code != ReasonCode::Success {
            buf.put_u8(self.reason_code.as_u8());
        }
        if props {
            self.properties.encode(buf);
        }
    }
}
