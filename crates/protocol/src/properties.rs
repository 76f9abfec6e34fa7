//! MQTT 5 properties (section 2.2.2). Each packet family has its own struct holding exactly
//! the properties that packet may carry, so a property in the wrong packet cannot be
//! represented; decoding refuses it with [`DecodeError::PropertyNotAllowed`], and a property
//! that may appear once but appears twice with [`DecodeError::DuplicateProperty`].

use bytes::{BufMut, Bytes, BytesMut};
use std::num::NonZeroU16;

use super::error::DecodeError;
use super::types::{MqttStr, QoS, TopicName};
use super::wire::{prefixed_len, put_binary, put_str, put_varint, varint_len, Reader, VARINT_MAX};

/// Property identifiers (table 2-4).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Name/value pairs, in order; a name may repeat (section 3.1.2.11.8).
pub type UserProperties = Vec<(MqttStr, MqttStr)>;

/// One decoded property value; its type follows from the identifier.
enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(MqttStr),
    Bin(Bytes),
    Pair(MqttStr, MqttStr),
}

fn read_value(r: &mut Reader, pid: u8, packet: &'static str) -> Result<Value, DecodeError> {
    use id::*;
    Ok(match pid {
        PAYLOAD_FORMAT_INDICATOR
        | REQUEST_PROBLEM_INFORMATION
        | REQUEST_RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => Value::Byte(r.u8()?),
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => {
            Value::U16(r.u16()?)
        }
        MESSAGE_EXPIRY_INTERVAL
        | SESSION_EXPIRY_INTERVAL
        | WILL_DELAY_INTERVAL
        | MAXIMUM_PACKET_SIZE => Value::U32(r.u32()?),
        SUBSCRIPTION_IDENTIFIER => Value::VarInt(r.varint()?),
        CONTENT_TYPE
        | RESPONSE_TOPIC
        | ASSIGNED_CLIENT_IDENTIFIER
        | AUTHENTICATION_METHOD
        | RESPONSE_INFORMATION
        | SERVER_REFERENCE
        | REASON_STRING => Value::Str(r.string()?),
        CORRELATION_DATA | AUTHENTICATION_DATA => Value::Bin(r.binary()?),
        USER_PROPERTY => {
            let k = r.string()?;
            let v = r.string()?;
            Value::Pair(k, v)
        }
        other => return Err(DecodeError::PropertyNotAllowed { id: other, packet }),
    })
}

/// Reads a property block (its length, then the properties) and hands each to `apply`.
fn read_block(
    r: &mut Reader,
    packet: &'static str,
    mut apply: impl FnMut(u8, Value) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let len = r.varint()? as usize;
    let mut block = r.sub(len)?;
    while !block.is_empty() {
        // The identifier is a variable byte integer; every defined one fits in one byte.
        let pid = block.varint()?;
        let pid =
            u8::try_from(pid).map_err(|_| DecodeError::PropertyNotAllowed { id: 0xFF, packet })?;
        let value = read_value(&mut block, pid, packet)?;
        apply(pid, value)?;
    }
    Ok(())
}

fn set<T>(slot: &mut Option<T>, v: T, pid: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(pid));
    }
    *slot = Some(v);
    Ok(())
}

fn flag(v: u8, pid: u8) -> Result<bool, DecodeError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue(pid)),
    }
}

fn nonzero_u16(v: u16, pid: u8) -> Result<u16, DecodeError> {
    if v == 0 {
        Err(DecodeError::InvalidPropertyValue(pid))
    } else {
        Ok(v)
    }
}

fn nonzero_u32(v: u32, pid: u8) -> Result<u32, DecodeError> {
    if v == 0 {
        Err(DecodeError::InvalidPropertyValue(pid))
    } else {
        Ok(v)
    }
}

fn response_topic(s: MqttStr) -> Result<TopicName, DecodeError> {
    let t = TopicName::from_mqtt_str(s)
        .map_err(|_| DecodeError::InvalidPropertyValue(id::RESPONSE_TOPIC))?;
    if t.is_empty() {
        return Err(DecodeError::InvalidPropertyValue(id::RESPONSE_TOPIC));
    }
    Ok(t)
}

fn not_allowed(pid: u8, packet: &'static str) -> Result<(), DecodeError> {
    Err(DecodeError::PropertyNotAllowed { id: pid, packet })
}

/// Accumulates the encoded size of a property block; one pass to size, one to write, so
/// encoding never allocates.
#[derive(Default)]
struct Size(usize);

impl Size {
    fn byte<T>(&mut self, o: &Option<T>) -> &mut Self {
        if o.is_some() {
            self.0 += 2;
        }
        self
    }
    fn u16<T>(&mut self, o: &Option<T>) -> &mut Self {
        if o.is_some() {
            self.0 += 3;
        }
        self
    }
    fn u32(&mut self, o: &Option<u32>) -> &mut Self {
        if o.is_some() {
            self.0 += 5;
        }
        self
    }
    fn str(&mut self, o: Option<&str>) -> &mut Self {
        if let Some(s) = o {
            self.0 += 1 + prefixed_len(s.len());
        }
        self
    }
    fn bin(&mut self, o: &Option<Bytes>) -> &mut Self {
        if let Some(b) = o {
            self.0 += 1 + prefixed_len(b.len());
        }
        self
    }
    fn varint(&mut self, v: u32) -> &mut Self {
        self.0 += 1 + varint_len(v);
        self
    }
    fn user(&mut self, u: &UserProperties) -> &mut Self {
        for (k, v) in u {
            self.0 += 1 + prefixed_len(k.len()) + prefixed_len(v.len());
        }
        self
    }
}

fn w_byte(buf: &mut BytesMut, pid: u8, v: Option<u8>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u8(v);
    }
}
fn w_u16(buf: &mut BytesMut, pid: u8, v: Option<u16>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u16(v);
    }
}
fn w_u32(buf: &mut BytesMut, pid: u8, v: Option<u32>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        buf.put_u32(v);
    }
}
fn w_str(buf: &mut BytesMut, pid: u8, v: Option<&str>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        put_str(buf, v);
    }
}
fn w_bin(buf: &mut BytesMut, pid: u8, v: &Option<Bytes>) {
    if let Some(v) = v {
        buf.put_u8(pid);
        put_binary(buf, v);
    }
}
fn w_user(buf: &mut BytesMut, u: &UserProperties) {
    for (k, v) in u {
        buf.put_u8(id::USER_PROPERTY);
        put_str(buf, k);
        put_str(buf, v);
    }
}

/// A property block's size on the wire, its length prefix included.
pub const fn block_wire_len(content_len: usize) -> usize {
    varint_len(content_len as u32) + content_len
}

macro_rules! block_impl {
    ($t:ty) => {
        impl $t {
            /// The size of the property block on the wire, length prefix included.
            pub fn wire_len(&self) -> usize {
                block_wire_len(self.content_len())
            }
            /// Writes the length prefix and the properties.
            pub fn encode(&self, buf: &mut BytesMut) {
                let len = self.content_len();
                put_varint(buf, len as u32);
                let start = buf.len();
                self.encode_content(buf);
                debug_assert_eq!(buf.len() - start, len);
            }
        }
    };
}

/// CONNECT properties (3.1.2.11).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    /// Non-zero when present.
    pub receive_maximum: Option<u16>,
    /// Non-zero when present.
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<bool>,
    pub request_problem_information: Option<bool>,
    pub user_properties: UserProperties,
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
}

impl ConnectProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "CONNECT";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => set(&mut p.session_expiry_interval, x, pid),
            (RECEIVE_MAXIMUM, Value::U16(x)) => {
                set(&mut p.receive_maximum, nonzero_u16(x, pid)?, pid)
            }
            (MAXIMUM_PACKET_SIZE, Value::U32(x)) => {
                set(&mut p.maximum_packet_size, nonzero_u32(x, pid)?, pid)
            }
            (TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => set(&mut p.topic_alias_maximum, x, pid),
            (REQUEST_RESPONSE_INFORMATION, Value::Byte(x)) => {
                set(&mut p.request_response_information, flag(x, pid)?, pid)
            }
            (REQUEST_PROBLEM_INFORMATION, Value::Byte(x)) => {
                set(&mut p.request_problem_information, flag(x, pid)?, pid)
            }
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (AUTHENTICATION_METHOD, Value::Str(x)) => set(&mut p.authentication_method, x, pid),
            (AUTHENTICATION_DATA, Value::Bin(x)) => set(&mut p.authentication_data, x, pid),
            (pid, _) => not_allowed(pid, P),
        })?;
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(DecodeError::InvalidPropertyValue(AUTHENTICATION_DATA));
        }
        Ok(p)
    }

    fn content_len(&self) -> usize {
        Size::default()
            .u32(&self.session_expiry_interval)
            .u16(&self.receive_maximum)
            .u32(&self.maximum_packet_size)
            .u16(&self.topic_alias_maximum)
            .byte(&self.request_response_information)
            .byte(&self.request_problem_information)
            .user(&self.user_properties)
            .str(self.authentication_method.as_deref())
            .bin(&self.authentication_data)
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_u32(buf, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_u16(buf, RECEIVE_MAXIMUM, self.receive_maximum);
        w_u32(buf, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        w_u16(buf, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        w_byte(
            buf,
            REQUEST_RESPONSE_INFORMATION,
            self.request_response_information.map(u8::from),
        );
        w_byte(
            buf,
            REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information.map(u8::from),
        );
        w_user(buf, &self.user_properties);
        w_str(
            buf,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
        );
        w_bin(buf, AUTHENTICATION_DATA, &self.authentication_data);
    }
}
block_impl!(ConnectProperties);

/// Will properties (3.1.3.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<bool>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttStr>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
}

impl WillProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "will properties";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (WILL_DELAY_INTERVAL, Value::U32(x)) => set(&mut p.will_delay_interval, x, pid),
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                set(&mut p.payload_format_indicator, flag(x, pid)?, pid)
            }
            (MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => set(&mut p.message_expiry_interval, x, pid),
            (CONTENT_TYPE, Value::Str(x)) => set(&mut p.content_type, x, pid),
            (RESPONSE_TOPIC, Value::Str(x)) => set(&mut p.response_topic, response_topic(x)?, pid),
            (CORRELATION_DATA, Value::Bin(x)) => set(&mut p.correlation_data, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    fn content_len(&self) -> usize {
        Size::default()
            .u32(&self.will_delay_interval)
            .byte(&self.payload_format_indicator)
            .u32(&self.message_expiry_interval)
            .str(self.content_type.as_deref())
            .str(self.response_topic.as_deref())
            .bin(&self.correlation_data)
            .user(&self.user_properties)
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_u32(buf, WILL_DELAY_INTERVAL, self.will_delay_interval);
        w_byte(
            buf,
            PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator.map(u8::from),
        );
        w_u32(buf, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        w_str(buf, CONTENT_TYPE, self.content_type.as_deref());
        w_str(buf, RESPONSE_TOPIC, self.response_topic.as_deref());
        w_bin(buf, CORRELATION_DATA, &self.correlation_data);
        w_user(buf, &self.user_properties);
    }
}
block_impl!(WillProperties);

/// CONNACK properties (3.2.2.3).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    /// Only 0 or 1 may be sent; absent means 2.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<MqttStr>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<MqttStr>,
    pub user_properties: UserProperties,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<MqttStr>,
    pub server_reference: Option<MqttStr>,
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
}

impl ConnAckProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "CONNACK";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => set(&mut p.session_expiry_interval, x, pid),
            (RECEIVE_MAXIMUM, Value::U16(x)) => {
                set(&mut p.receive_maximum, nonzero_u16(x, pid)?, pid)
            }
            (MAXIMUM_QOS, Value::Byte(x)) => {
                let q = match x {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => return Err(DecodeError::InvalidPropertyValue(pid)),
                };
                set(&mut p.maximum_qos, q, pid)
            }
            (RETAIN_AVAILABLE, Value::Byte(x)) => set(&mut p.retain_available, flag(x, pid)?, pid),
            (MAXIMUM_PACKET_SIZE, Value::U32(x)) => {
                set(&mut p.maximum_packet_size, nonzero_u32(x, pid)?, pid)
            }
            (ASSIGNED_CLIENT_IDENTIFIER, Value::Str(x)) => {
                set(&mut p.assigned_client_identifier, x, pid)
            }
            (TOPIC_ALIAS_MAXIMUM, Value::U16(x)) => set(&mut p.topic_alias_maximum, x, pid),
            (REASON_STRING, Value::Str(x)) => set(&mut p.reason_string, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (WILDCARD_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                set(&mut p.wildcard_subscription_available, flag(x, pid)?, pid)
            }
            (SUBSCRIPTION_IDENTIFIER_AVAILABLE, Value::Byte(x)) => set(
                &mut p.subscription_identifiers_available,
                flag(x, pid)?,
                pid,
            ),
            (SHARED_SUBSCRIPTION_AVAILABLE, Value::Byte(x)) => {
                set(&mut p.shared_subscription_available, flag(x, pid)?, pid)
            }
            (SERVER_KEEP_ALIVE, Value::U16(x)) => set(&mut p.server_keep_alive, x, pid),
            (RESPONSE_INFORMATION, Value::Str(x)) => set(&mut p.response_information, x, pid),
            (SERVER_REFERENCE, Value::Str(x)) => set(&mut p.server_reference, x, pid),
            (AUTHENTICATION_METHOD, Value::Str(x)) => set(&mut p.authentication_method, x, pid),
            (AUTHENTICATION_DATA, Value::Bin(x)) => set(&mut p.authentication_data, x, pid),
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    fn content_len(&self) -> usize {
        Size::default()
            .u32(&self.session_expiry_interval)
            .u16(&self.receive_maximum)
            .byte(&self.maximum_qos)
            .byte(&self.retain_available)
            .u32(&self.maximum_packet_size)
            .str(self.assigned_client_identifier.as_deref())
            .u16(&self.topic_alias_maximum)
            .str(self.reason_string.as_deref())
            .user(&self.user_properties)
            .byte(&self.wildcard_subscription_available)
            .byte(&self.subscription_identifiers_available)
            .byte(&self.shared_subscription_available)
            .u16(&self.server_keep_alive)
            .str(self.response_information.as_deref())
            .str(self.server_reference.as_deref())
            .str(self.authentication_method.as_deref())
            .bin(&self.authentication_data)
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_u32(buf, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_u16(buf, RECEIVE_MAXIMUM, self.receive_maximum);
        w_byte(buf, MAXIMUM_QOS, self.maximum_qos.map(QoS::as_u8));
        w_byte(buf, RETAIN_AVAILABLE, self.retain_available.map(u8::from));
        w_u32(buf, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        w_str(
            buf,
            ASSIGNED_CLIENT_IDENTIFIER,
            self.assigned_client_identifier.as_deref(),
        );
        w_u16(buf, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        w_str(buf, REASON_STRING, self.reason_string.as_deref());
        w_user(buf, &self.user_properties);
        w_byte(
            buf,
            WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available.map(u8::from),
        );
        w_byte(
            buf,
            SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available.map(u8::from),
        );
        w_byte(
            buf,
            SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available.map(u8::from),
        );
        w_u16(buf, SERVER_KEEP_ALIVE, self.server_keep_alive);
        w_str(
            buf,
            RESPONSE_INFORMATION,
            self.response_information.as_deref(),
        );
        w_str(buf, SERVER_REFERENCE, self.server_reference.as_deref());
        w_str(
            buf,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
        );
        w_bin(buf, AUTHENTICATION_DATA, &self.authentication_data);
    }
}
block_impl!(ConnAckProperties);

/// PUBLISH properties (3.3.2.3).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<bool>,
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<NonZeroU16>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
    /// May repeat: one per matching subscription that carries an identifier (1..=268,435,455).
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<MqttStr>,
}

impl PublishProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "PUBLISH";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (PAYLOAD_FORMAT_INDICATOR, Value::Byte(x)) => {
                set(&mut p.payload_format_indicator, flag(x, pid)?, pid)
            }
            (MESSAGE_EXPIRY_INTERVAL, Value::U32(x)) => set(&mut p.message_expiry_interval, x, pid),
            (TOPIC_ALIAS, Value::U16(x)) => {
                let a = NonZeroU16::new(x).ok_or(DecodeError::TopicAliasZero)?;
                set(&mut p.topic_alias, a, pid)
            }
            (RESPONSE_TOPIC, Value::Str(x)) => set(&mut p.response_topic, response_topic(x)?, pid),
            (CORRELATION_DATA, Value::Bin(x)) => set(&mut p.correlation_data, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                p.subscription_identifiers.push(nonzero_u32(x, pid)?);
                Ok(())
            }
            (CONTENT_TYPE, Value::Str(x)) => set(&mut p.content_type, x, pid),
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    fn content_len(&self) -> usize {
        let mut s = Size::default();
        s.byte(&self.payload_format_indicator)
            .u32(&self.message_expiry_interval)
            .u16(&self.topic_alias)
            .str(self.response_topic.as_deref())
            .bin(&self.correlation_data)
            .user(&self.user_properties)
            .str(self.content_type.as_deref());
        for &sid in &self.subscription_identifiers {
            s.varint(sid);
        }
        s.0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_byte(
            buf,
            PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator.map(u8::from),
        );
        w_u32(buf, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        w_u16(buf, TOPIC_ALIAS, self.topic_alias.map(NonZeroU16::get));
        w_str(buf, RESPONSE_TOPIC, self.response_topic.as_deref());
        w_bin(buf, CORRELATION_DATA, &self.correlation_data);
        w_user(buf, &self.user_properties);
        for &sid in &self.subscription_identifiers {
            debug_assert!(sid > 0 && sid <= VARINT_MAX);
            buf.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, sid);
        }
        w_str(buf, CONTENT_TYPE, self.content_type.as_deref());
    }

    /// Whether nothing is set (the common case; lets the encoder skip the sizing pass).
    pub fn is_empty(&self) -> bool {
        *self == PublishProperties::default()
    }
}
block_impl!(PublishProperties);

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: a reason string
/// and user properties.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AckProperties {
    pub reason_string: Option<MqttStr>,
    pub user_properties: UserProperties,
}

impl AckProperties {
    pub fn decode(r: &mut Reader, packet: &'static str) -> Result<Self, DecodeError> {
        use id::*;
        let mut p = Self::default();
        read_block(r, packet, |pid, v| match (pid, v) {
            (REASON_STRING, Value::Str(x)) => set(&mut p.reason_string, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (pid, _) => not_allowed(pid, packet),
        })?;
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }

    fn content_len(&self) -> usize {
        Size::default()
            .str(self.reason_string.as_deref())
            .user(&self.user_properties)
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        w_str(buf, id::REASON_STRING, self.reason_string.as_deref());
        w_user(buf, &self.user_properties);
    }
}
block_impl!(AckProperties);

/// SUBSCRIBE properties (3.8.2.1).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SubscribeProperties {
    /// 1..=268,435,455 when present.
    pub subscription_identifier: Option<u32>,
    pub user_properties: UserProperties,
}

impl SubscribeProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "SUBSCRIBE";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (SUBSCRIPTION_IDENTIFIER, Value::VarInt(x)) => {
                set(&mut p.subscription_identifier, nonzero_u32(x, pid)?, pid)
            }
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    fn content_len(&self) -> usize {
        let mut s = Size::default();
        if let Some(sid) = self.subscription_identifier {
            s.varint(sid);
        }
        s.user(&self.user_properties).0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        if let Some(sid) = self.subscription_identifier {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, sid);
        }
        w_user(buf, &self.user_properties);
    }
}
block_impl!(SubscribeProperties);

/// UNSUBSCRIBE properties (3.10.2.1): user properties only.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnsubscribeProperties {
    pub user_properties: UserProperties,
}

impl UnsubscribeProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        const P: &str = "UNSUBSCRIBE";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (id::USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    fn content_len(&self) -> usize {
        Size::default().user(&self.user_properties).0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        w_user(buf, &self.user_properties);
    }
}
block_impl!(UnsubscribeProperties);

/// DISCONNECT properties (3.14.2.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<MqttStr>,
    pub user_properties: UserProperties,
    pub server_reference: Option<MqttStr>,
}

impl DisconnectProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "DISCONNECT";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (SESSION_EXPIRY_INTERVAL, Value::U32(x)) => set(&mut p.session_expiry_interval, x, pid),
            (REASON_STRING, Value::Str(x)) => set(&mut p.reason_string, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (SERVER_REFERENCE, Value::Str(x)) => set(&mut p.server_reference, x, pid),
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        *self == DisconnectProperties::default()
    }

    fn content_len(&self) -> usize {
        Size::default()
            .u32(&self.session_expiry_interval)
            .str(self.reason_string.as_deref())
            .user(&self.user_properties)
            .str(self.server_reference.as_deref())
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_u32(buf, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_str(buf, REASON_STRING, self.reason_string.as_deref());
        w_user(buf, &self.user_properties);
        w_str(buf, SERVER_REFERENCE, self.server_reference.as_deref());
    }
}
block_impl!(DisconnectProperties);

/// AUTH properties (3.15.2.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AuthProperties {
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<MqttStr>,
    pub user_properties: UserProperties,
}

impl AuthProperties {
    pub fn decode(r: &mut Reader) -> Result<Self, DecodeError> {
        use id::*;
        const P: &str = "AUTH";
        let mut p = Self::default();
        read_block(r, P, |pid, v| match (pid, v) {
            (AUTHENTICATION_METHOD, Value::Str(x)) => set(&mut p.authentication_method, x, pid),
            (AUTHENTICATION_DATA, Value::Bin(x)) => set(&mut p.authentication_data, x, pid),
            (REASON_STRING, Value::Str(x)) => set(&mut p.reason_string, x, pid),
            (USER_PROPERTY, Value::Pair(k, v)) => {
                p.user_properties.push((k, v));
                Ok(())
            }
            (pid, _) => not_allowed(pid, P),
        })?;
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        *self == AuthProperties::default()
    }

    fn content_len(&self) -> usize {
        Size::default()
            .str(self.authentication_method.as_deref())
            .bin(&self.authentication_data)
            .str(self.reason_string.as_deref())
            .user(&self.user_properties)
            .0
    }

    fn encode_content(&self, buf: &mut BytesMut) {
        use id::*;
        w_str(
            buf,
            AUTHENTICATION_METHOD,
            self.authentication_method.as_deref(),
        );
        w_bin(buf, AUTHENTICATION_DATA, &self.authentication_data);
        w_str(buf, REASON_STRING, self.reason_string.as_deref());
        w_user(buf, &self.user_properties);
    }
}
block_impl!(AuthProperties);
