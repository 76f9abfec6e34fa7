//! CONNECT (3.1) and CONNACK (3.2).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;
use super::properties::{ConnAckProperties, ConnectProperties, WillProperties};
use super::types::{MqttStr, ProtocolVersion, QoS, ReasonCode, ReasonContext, TopicName};
use super::wire::{prefixed_len, put_binary, put_str, Reader};

/// The will: published by the server when the connection ends without a normal DISCONNECT.
#[derive(Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 only; empty for 3.x.
    pub properties: WillProperties,
}

impl std::fmt::Debug for LastWill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastWill")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("properties", &self.properties)
            .finish()
    }
}

/// A client's request to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// Clean Start (5.0) / Clean Session (3.x).
    pub clean_start: bool,
    /// Seconds; 0 turns keep alive off.
    pub keep_alive: u16,
    /// MQTT 5 only; empty for 3.x.
    pub properties: ConnectProperties,
    /// May be empty: the server then assigns one (or refuses, per version and Clean Start).
    pub client_id: MqttStr,
    pub will: Option<LastWill>,
    pub username: Option<MqttStr>,
    pub password: Option<Bytes>,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("protocol", &self.protocol)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("properties", &self.properties)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

impl Connect {
    pub(crate) fn decode(r: &mut Reader) -> Result<Connect, DecodeError> {
        let protocol = decode_protocol(r)?;
        let flags = r.u8()?;
        if flags & FLAG_RESERVED != 0 {
            return Err(DecodeError::ReservedConnectFlag);
        }
        let will_flag = flags & FLAG_WILL != 0;
        let will_qos = (flags >> 3) & 0x03;
        let will_retain = flags & FLAG_WILL_RETAIN != 0;
        if !will_flag && (will_qos != 0 || will_retain) {
            return Err(DecodeError::InvalidWillFlags);
        }
        if will_qos == 3 {
            return Err(DecodeError::InvalidWillFlags);
        }
        let has_username = flags & FLAG_USERNAME != 0;
        let has_password = flags & FLAG_PASSWORD != 0;
        if has_password && !has_username && !protocol.is_v5() {
            return Err(DecodeError::PasswordWithoutUsername);
        }
        let keep_alive = r.u16()?;
        let properties = if protocol.is_v5() {
            ConnectProperties::decode(r)?
        } else {
            ConnectProperties::default()
        };
        let client_id = r.string()?;
        let will = if will_flag {
            Some(decode_will(r, protocol, will_qos, will_retain)?)
        } else {
            None
        };
        let username = if has_username {
            Some(r.string()?)
        } else {
            None
        };
        let password = if has_password {
            Some(r.binary()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Connect {
            protocol,
            clean_start: flags & FLAG_CLEAN != 0,
            keep_alive,
            properties,
            client_id,
            will,
            username,
            password,
        })
    }

    pub(crate) fn remaining_len(&self) -> usize {
        let v5 = self.protocol.is_v5();
        let mut n = prefixed_len(self.protocol.protocol_name().len()) + 1 + 1 + 2;
        if v5 {
            n += self.properties.wire_len();
        }
        n += prefixed_len(self.client_id.len());
        if let Some(w) = &self.will {
            if v5 {
                n += w.properties.wire_len();
            }
            n += prefixed_len(w.topic.len()) + prefixed_len(w.payload.len());
        }
        if let Some(u) = &self.username {
            n += prefixed_len(u.len());
        }
        if let Some(p) = &self.password {
            n += prefixed_len(p.len());
        }
        n
    }

    pub(crate) fn encode_body(&self, buf: &mut BytesMut) {
        let v5 = self.protocol.is_v5();
        put_str(buf, self.protocol.protocol_name());
        buf.put_u8(self.protocol.level());
        let mut flags = 0u8;
        if self.clean_start {
            flags |= FLAG_CLEAN;
        }
        if let Some(w) = &self.will {
            flags |= FLAG_WILL | (w.qos.as_u8() << 3);
            if w.retain {
                flags |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            flags |= FLAG_PASSWORD;
        }
        buf.put_u8(flags);
        buf.put_u16(self.keep_alive);
        if v5 {
            self.properties.encode(buf);
        }
        put_str(buf, &self.client_id);
        if let Some(w) = &self.will {
            if v5 {
                w.properties.encode(buf);
            }
            put_str(buf, &w.topic);
            put_binary(buf, &w.payload);
        }
        if let Some(u) = &self.username {
            put_str(buf, u);
        }
        if let Some(p) = &self.password {
            put_binary(buf, p);
        }
    }
}

/// The protocol name and level at the start of a CONNECT, as the version they name.
fn decode_protocol(r: &mut Reader) -> Result<ProtocolVersion, DecodeError> {
    let name = r.binary()?;
    let is_mqtt = &name[..] == b"MQTT";
    let is_mqisdp = &name[..] == b"MQIsdp";
    if !is_mqtt && !is_mqisdp {
        return Err(DecodeError::InvalidProtocolName);
    }
    let level = r.u8()?;
    match (level, is_mqisdp) {
        (3, true) => Ok(ProtocolVersion::V3_1),
        (4, false) => Ok(ProtocolVersion::V3_1_1),
        (5, false) => Ok(ProtocolVersion::V5),
        (other, _) => Err(DecodeError::UnsupportedProtocolVersion(other)),
    }
}

/// The will of a CONNECT whose will flag is set: properties (5.0), topic and payload, with
/// the QoS and retain flag from the connect flags.
fn decode_will(
    r: &mut Reader,
    protocol: ProtocolVersion,
    will_qos: u8,
    will_retain: bool,
) -> Result<LastWill, DecodeError> {
    let properties = if protocol.is_v5() {
        WillProperties::decode(r)?
    } else {
        WillProperties::default()
    };
    let topic = TopicName::from_mqtt_str(r.string()?)?;
    if topic.is_empty() {
        return Err(DecodeError::TopicNameInvalid);
    }
    let payload = r.binary()?;
    Ok(LastWill {
        topic,
        payload,
        qos: QoS::from_u8(will_qos)?,
        retain: will_retain,
        properties,
    })
}

/// The server's answer to CONNECT.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// For MQTT 3.x this is mapped to and from the return codes 0-5.
    pub reason_code: ReasonCode,
    /// MQTT 5 only.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let ack_flags = r.u8()?;
        if ack_flags & 0xFE != 0 {
            return Err(DecodeError::InvalidFlags {
                packet_type: 2,
                flags: ack_flags,
            });
        }
        let code = r.u8()?;
        let reason_code = if version.is_v5() {
            ReasonCode::from_u8(code)
                .filter(|c| c.allowed_in(ReasonContext::ConnAck))
                .ok_or(DecodeError::InvalidReasonCode {
                    code,
                    packet: "CONNACK",
                })?
        } else {
            ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode {
                code,
                packet: "CONNACK",
            })?
        };
        let properties = if version.is_v5() {
            ConnAckProperties::decode(r)?
        } else {
            ConnAckProperties::default()
        };
        r.finish()?;
        Ok(ConnAck {
            session_present: ack_flags & 1 != 0,
            reason_code,
            properties,
        })
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() {
            self.properties.wire_len()
        } else {
            0
        }
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u8(self.session_present as u8);
        if version.is_v5() {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.encode(buf);
        } else {
            buf.put_u8(self.reason_code.to_v3_connack());
        }
    }
}
