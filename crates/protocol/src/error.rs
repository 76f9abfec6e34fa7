//! What can be wrong with bytes on the wire, and the MQTT 5 reason code each maps to.

use std::fmt;

use super::types::ReasonCode;

/// A packet that cannot be accepted. Each variant names the rule that was broken;
/// [`DecodeError::reason_code`] gives the code the broker sends (CONNACK before a session
/// exists, DISCONNECT after; MQTT 3.x simply closes the connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The packet's total size is above the maximum in force (checked from the fixed header,
    /// before the body is buffered).
    PacketTooLarge { size: usize, max: usize },
    /// The remaining length does not fit in 4 bytes (MQTT-1.5.5-1) or is not minimally encoded.
    MalformedVarInt,
    /// Packet type 0 or 15 in MQTT 3.x (AUTH exists only in MQTT 5).
    InvalidPacketType(u8),
    /// The fixed header's reserved flag bits are not what the packet type requires.
    InvalidFlags { packet_type: u8, flags: u8 },
    /// QoS 3, or a QoS field where QoS 3 appeared.
    InvalidQoS(u8),
    /// A field runs past the packet's remaining length.
    Truncated,
    /// Bytes were left over after the last field of a packet that has no payload to absorb them.
    TrailingBytes,
    /// A string is not well-formed UTF-8 (MQTT-1.5.4-1).
    InvalidUtf8,
    /// A string contains U+0000 (MQTT-1.5.4-2).
    NullCharacter,
    /// A string is longer than 65535 bytes.
    StringTooLong(usize),
    /// CONNECT's protocol name is neither `MQTT` nor `MQIsdp` or does not fit the level.
    InvalidProtocolName,
    /// CONNECT's protocol level is not 3, 4 or 5.
    UnsupportedProtocolVersion(u8),
    /// CONNECT's reserved flag bit is set (MQTT-3.1.2-3).
    ReservedConnectFlag,
    /// Will QoS or Will Retain set without the Will Flag, or Will QoS 3 (MQTT-3.1.2-11..15).
    InvalidWillFlags,
    /// Password flag without the user name flag (MQTT 3.1.1: MQTT-3.1.2-22).
    PasswordWithoutUsername,
    /// A topic name with `+` or `#`, or empty without a Topic Alias.
    TopicNameInvalid,
    /// A topic filter that breaks section 4.7 or the `$share/{group}/{filter}` syntax.
    TopicFilterInvalid,
    /// A packet identifier of 0 where one is required (MQTT-2.2.1-3).
    PacketIdZero,
    /// A property identifier that does not exist or is not allowed in this packet.
    PropertyNotAllowed { id: u8, packet: &'static str },
    /// A property that may appear once appeared again.
    DuplicateProperty(u8),
    /// A property value outside its range (e.g. Receive Maximum 0, Payload Format 2).
    InvalidPropertyValue(u8),
    /// A Topic Alias of 0 (MQTT-3.3.2-8).
    TopicAliasZero,
    /// A reason code that is undefined or not allowed in this packet.
    InvalidReasonCode { code: u8, packet: &'static str },
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    NoTopicFilters,
    /// Reserved bits of subscription options set (MQTT-3.8.3-5; MQTT-3-8.3-4 in 3.1.1).
    InvalidSubscriptionOptions(u8),
    /// MQTT 5: Maximum QoS 3 or Retain Handling 3 in subscription options, a Protocol Error
    /// (3.8.3.1). MQTT 3.x reports QoS 3 as [`DecodeError::InvalidQoS`] (malformed).
    InvalidSubscriptionOptionValue(u8),
    /// No Local on a shared subscription (MQTT-3.8.3-4).
    NoLocalOnSharedSubscription,
    /// A packet type that this protocol version does not have (AUTH before MQTT 5).
    PacketNotInVersion(&'static str),
    /// A packet other than CONNECT arrived while the protocol version is still unknown.
    ExpectedConnect,
}

impl DecodeError {
    /// The MQTT 5 reason code for this error.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            UnsupportedProtocolVersion(_) | InvalidProtocolName => {
                ReasonCode::UnsupportedProtocolVersion
            }
            TopicNameInvalid => ReasonCode::TopicNameInvalid,
            TopicFilterInvalid => ReasonCode::TopicFilterInvalid,
            TopicAliasZero => ReasonCode::TopicAliasInvalid,
            PacketIdZero
            | DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | NoTopicFilters
            | NoLocalOnSharedSubscription
            | InvalidSubscriptionOptionValue(_)
            | ExpectedConnect
            | PacketNotInVersion(_) => ReasonCode::ProtocolError,
            MalformedVarInt
            | InvalidPacketType(_)
            | InvalidFlags { .. }
            | InvalidQoS(_)
            | Truncated
            | TrailingBytes
            | InvalidUtf8
            | NullCharacter
            | StringTooLong(_)
            | ReservedConnectFlag
            | InvalidWillFlags
            | PasswordWithoutUsername
            | PropertyNotAllowed { .. }
            | InvalidReasonCode { .. }
            | InvalidSubscriptionOptions(_) => ReasonCode::MalformedPacket,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use DecodeError::*;
        match self {
            PacketTooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the maximum of {max}")
            }
            MalformedVarInt => f.write_str("malformed variable byte integer"),
            InvalidPacketType(t) => write!(f, "invalid packet type {t}"),
            InvalidFlags { packet_type, flags } => write!(
                f,
                "invalid fixed header flags {flags:#06b} for packet type {packet_type}"
            ),
            InvalidQoS(q) => write!(f, "invalid QoS {q}"),
            Truncated => f.write_str("a field runs past the remaining length"),
            TrailingBytes => f.write_str("bytes left over after the last field"),
            InvalidUtf8 => f.write_str("string is not well-formed UTF-8"),
            NullCharacter => f.write_str("string contains U+0000"),
            StringTooLong(n) => write!(f, "string of {n} bytes exceeds 65535"),
            InvalidProtocolName => f.write_str("invalid protocol name"),
            UnsupportedProtocolVersion(v) => write!(f, "unsupported protocol level {v}"),
            ReservedConnectFlag => f.write_str("reserved CONNECT flag is set"),
            InvalidWillFlags => f.write_str("will QoS/retain inconsistent with the will flag"),
            PasswordWithoutUsername => f.write_str("password flag set without user name flag"),
            TopicNameInvalid => f.write_str("invalid topic name"),
            TopicFilterInvalid => f.write_str("invalid topic filter"),
            PacketIdZero => f.write_str("packet identifier 0"),
            PropertyNotAllowed { id, packet } => {
                write!(f, "property {id:#04x} not allowed in {packet}")
            }
            DuplicateProperty(id) => write!(f, "property {id:#04x} appears more than once"),
            InvalidPropertyValue(id) => write!(f, "invalid value for property {id:#04x}"),
            TopicAliasZero => f.write_str("topic alias 0"),
            InvalidReasonCode { code, packet } => {
                write!(f, "reason code {code:#04x} not allowed in {packet}")
            }
            NoTopicFilters => f.write_str("no topic filter in the packet"),
            InvalidSubscriptionOptions(b) => write!(f, "invalid subscription options {b:#04x}"),
            InvalidSubscriptionOptionValue(b) => {
                write!(
                    f,
                    "QoS 3 or Retain Handling 3 in subscription options {b:#04x}"
                )
            }
            NoLocalOnSharedSubscription => f.write_str("No Local on a shared subscription"),
            PacketNotInVersion(p) => write!(f, "{p} does not exist in this protocol version"),
            ExpectedConnect => f.write_str("the first packet must be CONNECT"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A packet that cannot be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The packet would exceed the largest remaining length (268,435,455) or the peer's limit.
    PacketTooLarge { size: usize, max: usize },
    /// The packet type does not exist in the target version (AUTH before MQTT 5).
    PacketNotInVersion(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::PacketTooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds the maximum of {max}")
            }
            EncodeError::PacketNotInVersion(p) => {
                write!(f, "{p} does not exist in this protocol version")
            }
        }
    }
}

impl std::error::Error for EncodeError {}
