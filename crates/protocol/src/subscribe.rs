//! SUBSCRIBE (3.8), SUBACK (3.9), UNSUBSCRIBE (3.10), UNSUBACK (3.11).

use bytes::{BufMut, BytesMut};

use super::error::DecodeError;
use super::properties::{AckProperties, SubscribeProperties, UnsubscribeProperties};
use super::types::{
    PacketId, ProtocolVersion, QoS, ReasonCode, ReasonContext, RetainHandling, SubscriptionOptions,
    TopicFilter,
};
use super::wire::{prefixed_len, put_str, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    /// MQTT 5 only.
    pub properties: SubscribeProperties,
    /// At least one.
    pub filters: Vec<(TopicFilter, SubscriptionOptions)>,
}

impl Subscribe {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            SubscribeProperties::decode(r)?
        } else {
            SubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = TopicFilter::from_mqtt_str(r.string()?)?;
            let b = r.u8()?;
            let options = if version.is_v5() {
                if b & 0xC0 != 0 {
                    return Err(DecodeError::InvalidSubscriptionOptions(b));
                }
                // 3.8.3.1: Maximum QoS 3 and Retain Handling 3 are Protocol Errors.
                let qos = QoS::from_u8(b & 0x03)
                    .map_err(|_| DecodeError::InvalidSubscriptionOptionValue(b))?;
                let retain_handling = match (b >> 4) & 0x03 {
                    0 => RetainHandling::SendAtSubscribe,
                    1 => RetainHandling::SendAtSubscribeIfNew,
                    2 => RetainHandling::DoNotSend,
                    _ => return Err(DecodeError::InvalidSubscriptionOptionValue(b)),
                };
                let no_local = b & 0x04 != 0;
                if no_local && filter.is_shared() {
                    return Err(DecodeError::NoLocalOnSharedSubscription);
                }
                SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published: b & 0x08 != 0,
                    retain_handling,
                }
            } else {
                let qos = QoS::from_u8(b & 0x03)?;
                if b & 0xFC != 0 {
                    return Err(DecodeError::InvalidSubscriptionOptions(b));
                }
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                }
            };
            filters.push((filter, options));
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Subscribe {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let mut n = 2;
        if version.is_v5() {
            n += self.properties.wire_len();
        }
        for (f, _) in &self.filters {
            n += prefixed_len(f.as_str().len()) + 1;
        }
        n
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for (f, o) in &self.filters {
            put_str(buf, f.as_str());
            buf.put_u8(if version.is_v5() {
                o.to_byte()
            } else {
                o.qos.as_u8()
            });
        }
    }
}

/// The answer to SUBSCRIBE: one reason code per filter, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    /// MQTT 5 only.
    pub properties: AckProperties,
    /// MQTT 3.x: Success/GrantedQoS1/GrantedQoS2, and any error is sent as 0x80.
    pub reason_codes: Vec<ReasonCode>,
}

impl SubAck {
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            AckProperties::decode(r, "SUBACK")?
        } else {
            AckProperties::default()
        };
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let code = r.u8()?;
            let rc = if version.is_v5() {
                ReasonCode::from_u8(code).filter(|c| c.allowed_in(ReasonContext::SubAck))
            } else {
                match code {
                    0 => Some(ReasonCode::Success),
                    1 => Some(ReasonCode::GrantedQoS1),
                    2 => Some(ReasonCode::GrantedQoS2),
                    0x80 => Some(ReasonCode::UnspecifiedError),
                    _ => None,
                }
            }
            .ok_or(DecodeError::InvalidReasonCode {
                code,
                packet: "SUBACK",
            })?;
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(SubAck {
            packet_id,
            properties,
            reason_codes,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        2 + self.reason_codes.len()
            + if version.is_v5() {
                self.properties.wire_len()
            } else {
                0
            }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for rc in &self.reason_codes {
            let b = if version.is_v5() || !rc.is_error() {
                rc.as_u8()
            } else {
                0x80
            };
            buf.put_u8(b);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    /// MQTT 5 only.
    pub properties: UnsubscribeProperties,
    /// At least one.
    pub filters: Vec<TopicFilter>,
}

impl Unsubscribe {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Unsubscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if version.is_v5() {
            UnsubscribeProperties::decode(r)?
        } else {
            UnsubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(TopicFilter::from_mqtt_str(r.string()?)?);
        }
        if filters.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(Unsubscribe {
            packet_id,
            properties,
            filters,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        let mut n = 2;
        if version.is_v5() {
            n += self.properties.wire_len();
        }
        for f in &self.filters {
            n += prefixed_len(f.as_str().len());
        }
        n
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
        }
        for f in &self.filters {
            put_str(buf, f.as_str());
        }
    }
}

/// The answer to UNSUBSCRIBE. MQTT 3.x carries only the packet id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    /// MQTT 5 only.
    pub properties: AckProperties,
    /// MQTT 5: one per filter, in order. Empty for 3.x.
    pub reason_codes: Vec<ReasonCode>,
}

impl UnsubAck {
    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<UnsubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        if !version.is_v5() {
            r.finish()?;
            return Ok(UnsubAck {
                packet_id,
                properties: AckProperties::default(),
                reason_codes: Vec::new(),
            });
        }
        let properties = AckProperties::decode(r, "UNSUBACK")?;
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let code = r.u8()?;
            let rc = ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ReasonContext::UnsubAck))
                .ok_or(DecodeError::InvalidReasonCode {
                    code,
                    packet: "UNSUBACK",
                })?;
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::NoTopicFilters);
        }
        Ok(UnsubAck {
            packet_id,
            properties,
            reason_codes,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        if version.is_v5() {
            2 + self.properties.wire_len() + self.reason_codes.len()
        } else {
            2
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u16(self.packet_id.get());
        if version.is_v5() {
            self.properties.encode(buf);
            for rc in &self.reason_codes {
                buf.put_u8(rc.as_u8());
            }
        }
    }
}
