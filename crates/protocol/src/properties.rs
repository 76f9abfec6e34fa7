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

// After the macro above: the blocks' files use it.
mod connect;
mod control;
mod publish;

pub use connect::{ConnAckProperties, ConnectProperties, WillProperties};
pub use control::{
    AuthProperties, DisconnectProperties, SubscribeProperties, UnsubscribeProperties,
};
pub use publish::{AckProperties, PublishProperties};
