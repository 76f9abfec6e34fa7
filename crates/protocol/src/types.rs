//! Value types that carry the protocol's invariants: a packet id is never zero, a QoS is
//! never 3, a string is valid MQTT UTF-8, a topic name has no wildcards, a topic filter is
//! well formed. Each is validated once, where it enters, and trusted afterwards.

use bytes::Bytes;
use std::fmt;
use std::num::NonZeroU16;

use super::error::DecodeError;

/// The protocol level byte of CONNECT.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0, protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The level byte on the wire.
    pub const fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The protocol name that goes with the level.
    pub const fn protocol_name(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "MQIsdp",
            _ => "MQTT",
        }
    }

    /// MQTT 5 carries properties and reason codes; the 3.x versions do not.
    pub const fn is_v5(self) -> bool {
        matches!(self, ProtocolVersion::V5)
    }

    /// The three versions, for tests and generators.
    pub const ALL: [ProtocolVersion; 3] = [
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ];
}

/// Quality of service. QoS 3 cannot be represented.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub const fn from_u8(v: u8) -> Result<QoS, DecodeError> {
        match v {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            other => Err(DecodeError::InvalidQoS(other)),
        }
    }

    pub const fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A packet identifier: 1..=65535 (MQTT-2.2.1-3).
pub type PacketId = NonZeroU16;

/// A UTF-8 string as MQTT defines it (section 1.5.4): well-formed UTF-8, no U+0000, at most
/// 65535 bytes. It shares the bytes of the packet it was decoded from.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MqttStr(Bytes);

impl MqttStr {
    /// Validates `bytes` as an MQTT string.
    pub fn from_bytes(bytes: Bytes) -> Result<MqttStr, DecodeError> {
        if bytes.len() > u16::MAX as usize {
            return Err(DecodeError::StringTooLong(bytes.len()));
        }
        let s = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(DecodeError::NullCharacter);
        }
        Ok(MqttStr(bytes))
    }

    /// Copies a `&str` after the same checks.
    pub fn new(s: &str) -> Result<MqttStr, DecodeError> {
        MqttStr::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// A string known at compile time to be valid.
    pub fn from_static(s: &'static str) -> MqttStr {
        debug_assert!(!s.contains('\0') && s.len() <= u16::MAX as usize);
        MqttStr(Bytes::from_static(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checked that the bytes are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// A copy with an allocation of its own: a decoded string is a slice of its packet,
    /// and one that outlives the packet must not keep the rest of it alive.
    pub fn detached(&self) -> MqttStr {
        MqttStr(Bytes::copy_from_slice(&self.0))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for MqttStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::ops::Deref for MqttStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// The topic of a PUBLISH: no `+` or `#` (MQTT-3.3.2-2). It may be empty on the wire only
/// when a Topic Alias stands in for it (MQTT 5); [`TopicName::new`] refuses the empty name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TopicName(MqttStr);

impl TopicName {
    /// A non-empty topic name without wildcards.
    pub fn new(s: &str) -> Result<TopicName, DecodeError> {
        let t = TopicName::from_mqtt_str(MqttStr::new(s)?)?;
        if t.is_empty() {
            return Err(DecodeError::TopicNameInvalid);
        }
        Ok(t)
    }

    /// Checks the wildcard rule only; the empty name is allowed (alias case).
    pub fn from_mqtt_str(s: MqttStr) -> Result<TopicName, DecodeError> {
        if s.as_bytes().iter().any(|&b| b == b'+' || b == b'#') {
            return Err(DecodeError::TopicNameInvalid);
        }
        Ok(TopicName(s))
    }

    /// The empty name used with a Topic Alias.
    pub fn empty() -> TopicName {
        TopicName(MqttStr::default())
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_mqtt_str(&self) -> &MqttStr {
        &self.0
    }

    /// See [`MqttStr::detached`].
    pub fn detached(&self) -> TopicName {
        TopicName(self.0.detached())
    }

    /// Topics beginning with `$` are not matched by filters starting with a wildcard.
    pub fn is_system(&self) -> bool {
        self.0.as_bytes().first() == Some(&b'$')
    }

    /// The number of levels (`a/b/c` has 3).
    pub fn levels(&self) -> usize {
        self.as_str().split('/').count()
    }
}

impl std::ops::Deref for TopicName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subscription's topic filter (section 4.7): `#` only last and alone in its level, `+`
/// alone in its level, not empty. `$share/{group}/{filter}` is parsed into its group and
/// filter (MQTT 5 section 4.8.2; accepted on every version, as Mosquitto does).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter {
    raw: MqttStr,
    /// Byte length of `$share/{group}/`, 0 when the filter is not shared.
    share_prefix_len: u16,
}

const SHARE_PREFIX: &str = "$share/";

impl TopicFilter {
    pub fn new(s: &str) -> Result<TopicFilter, DecodeError> {
        TopicFilter::from_mqtt_str(MqttStr::new(s)?)
    }

    /// See [`MqttStr::detached`].
    pub fn detached(&self) -> TopicFilter {
        TopicFilter {
            raw: self.raw.detached(),
            share_prefix_len: self.share_prefix_len,
        }
    }

    pub fn from_mqtt_str(raw: MqttStr) -> Result<TopicFilter, DecodeError> {
        let s = raw.as_str();
        let mut share_prefix_len = 0u16;
        let filter = if let Some(rest) = s.strip_prefix(SHARE_PREFIX) {
            let slash = rest.find('/').ok_or(DecodeError::TopicFilterInvalid)?;
            let group = &rest[..slash];
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(DecodeError::TopicFilterInvalid);
            }
            share_prefix_len = (SHARE_PREFIX.len() + slash + 1) as u16;
            &rest[slash + 1..]
        } else {
            s
        };
        validate_filter(filter)?;
        Ok(TopicFilter {
            raw,
            share_prefix_len,
        })
    }

    /// The filter as written, `$share/...` included.
    pub fn as_str(&self) -> &str {
        self.raw.as_str()
    }

    pub fn as_mqtt_str(&self) -> &MqttStr {
        &self.raw
    }

    /// The group name of a shared subscription.
    pub fn share_group(&self) -> Option<&str> {
        if self.share_prefix_len == 0 {
            None
        } else {
            Some(&self.raw.as_str()[SHARE_PREFIX.len()..self.share_prefix_len as usize - 1])
        }
    }

    /// The filter to match topics against (without the `$share/{group}/` prefix).
    pub fn filter(&self) -> &str {
        &self.raw.as_str()[self.share_prefix_len as usize..]
    }

    pub fn is_shared(&self) -> bool {
        self.share_prefix_len != 0
    }

    /// Whether the matching part contains `+` or `#`.
    pub fn has_wildcards(&self) -> bool {
        self.filter().contains(['+', '#'])
    }

    /// The number of levels of the matching part.
    pub fn levels(&self) -> usize {
        self.filter().split('/').count()
    }

    /// Whether `topic` matches this filter (section 4.7), the `$` rule included.
    pub fn matches(&self, topic: &str) -> bool {
        topic_matches(self.filter(), topic)
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn validate_filter(filter: &str) -> Result<(), DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::TopicFilterInvalid);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(DecodeError::TopicFilterInvalid);
        }
        if level.contains('+') && level != "+" {
            return Err(DecodeError::TopicFilterInvalid);
        }
    }
    Ok(())
}

/// Matches a topic name against a (validated, non-shared) filter string. A filter starting
/// with a wildcard does not match a topic starting with `$` (MQTT-4.7.2-1).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What the server does with retained messages when a subscription is made (MQTT 5).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// Send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// Send them only if the subscription did not exist before.
    SendAtSubscribeIfNew = 1,
    /// Do not send them.
    DoNotSend = 2,
}

/// The options byte of each SUBSCRIBE entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    /// MQTT 5: do not send the subscriber's own publications back to it.
    pub no_local: bool,
    /// MQTT 5: keep the RETAIN flag of forwarded messages as published.
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    pub fn to_byte(self) -> u8 {
        self.qos.as_u8()
            | (self.no_local as u8) << 2
            | (self.retain_as_published as u8) << 3
            | (self.retain_handling as u8) << 4
    }
}

/// Reason codes of MQTT 5 (section 2.4). The 3.x return codes of CONNACK and SUBACK are
/// mapped onto these when decoded and back when encoded, so the broker speaks one language.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum ReasonCode {
    /// Also "Normal disconnection" and "Granted QoS 0".
    #[default]
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWillMessage = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    ContinueAuthentication = 0x18,
    ReAuthenticate = 0x19,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    Banned = 0x8A,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierInUse = 0x91,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    MessageRateTooHigh = 0x96,
    QuotaExceeded = 0x97,
    AdministrativeAction = 0x98,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    UseAnotherServer = 0x9C,
    ServerMoved = 0x9D,
    SharedSubscriptionsNotSupported = 0x9E,
    ConnectionRateExceeded = 0x9F,
    MaximumConnectTime = 0xA0,
    SubscriptionIdentifiersNotSupported = 0xA1,
    WildcardSubscriptionsNotSupported = 0xA2,
}

impl ReasonCode {
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    pub const fn is_error(self) -> bool {
        (self as u8) >= 0x80
    }

    /// Any defined reason code; whether it fits a packet is checked by [`ReasonCode::allowed_in`].
    pub const fn from_u8(v: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match v {
            0x00 => Success,
            0x01 => GrantedQoS1,
            0x02 => GrantedQoS2,
            0x04 => DisconnectWithWillMessage,
            0x10 => NoMatchingSubscribers,
            0x11 => NoSubscriptionExisted,
            0x18 => ContinueAuthentication,
            0x19 => ReAuthenticate,
            0x80 => UnspecifiedError,
            0x81 => MalformedPacket,
            0x82 => ProtocolError,
            0x83 => ImplementationSpecificError,
            0x84 => UnsupportedProtocolVersion,
            0x85 => ClientIdentifierNotValid,
            0x86 => BadUserNameOrPassword,
            0x87 => NotAuthorized,
            0x88 => ServerUnavailable,
            0x89 => ServerBusy,
            0x8A => Banned,
            0x8B => ServerShuttingDown,
            0x8C => BadAuthenticationMethod,
            0x8D => KeepAliveTimeout,
            0x8E => SessionTakenOver,
            0x8F => TopicFilterInvalid,
            0x90 => TopicNameInvalid,
            0x91 => PacketIdentifierInUse,
            0x92 => PacketIdentifierNotFound,
            0x93 => ReceiveMaximumExceeded,
            0x94 => TopicAliasInvalid,
            0x95 => PacketTooLarge,
            0x96 => MessageRateTooHigh,
            0x97 => QuotaExceeded,
            0x98 => AdministrativeAction,
            0x99 => PayloadFormatInvalid,
            0x9A => RetainNotSupported,
            0x9B => QoSNotSupported,
            0x9C => UseAnotherServer,
            0x9D => ServerMoved,
            0x9E => SharedSubscriptionsNotSupported,
            0x9F => ConnectionRateExceeded,
            0xA0 => MaximumConnectTime,
            0xA1 => SubscriptionIdentifiersNotSupported,
            0xA2 => WildcardSubscriptionsNotSupported,
            _ => return None,
        })
    }

    /// Whether this code may appear in the given packet (the tables of section 3).
    pub fn allowed_in(self, kind: ReasonContext) -> bool {
        use ReasonCode::*;
        match kind {
            ReasonContext::ConnAck => self.allowed_in_connack(),
            ReasonContext::PubAck | ReasonContext::PubRec => matches!(
                self,
                Success
                    | NoMatchingSubscribers
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicNameInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | PayloadFormatInvalid
            ),
            ReasonContext::PubRel | ReasonContext::PubComp => {
                matches!(self, Success | PacketIdentifierNotFound)
            }
            ReasonContext::SubAck => matches!(
                self,
                Success
                    | GrantedQoS1
                    | GrantedQoS2
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
                    | QuotaExceeded
                    | SharedSubscriptionsNotSupported
                    | SubscriptionIdentifiersNotSupported
                    | WildcardSubscriptionsNotSupported
            ),
            ReasonContext::UnsubAck => matches!(
                self,
                Success
                    | NoSubscriptionExisted
                    | UnspecifiedError
                    | ImplementationSpecificError
                    | NotAuthorized
                    | TopicFilterInvalid
                    | PacketIdentifierInUse
            ),
            ReasonContext::Disconnect => self.allowed_in_disconnect(),
            ReasonContext::Auth => {
                matches!(self, Success | ContinueAuthentication | ReAuthenticate)
            }
        }
    }

    /// Whether this code may appear in a CONNACK: success or one of its error codes.
    #[inline]
    fn allowed_in_connack(self) -> bool {
        use ReasonCode::*;
        let v = self as u8;
        v == 0
            || matches!(
                self,
                UnspecifiedError
                    | MalformedPacket
                    | ProtocolError
                    | ImplementationSpecificError
                    | UnsupportedProtocolVersion
                    | ClientIdentifierNotValid
                    | BadUserNameOrPassword
                    | NotAuthorized
                    | ServerUnavailable
                    | ServerBusy
                    | Banned
                    | BadAuthenticationMethod
                    | TopicNameInvalid
                    | PacketTooLarge
                    | QuotaExceeded
                    | PayloadFormatInvalid
                    | RetainNotSupported
                    | QoSNotSupported
                    | UseAnotherServer
                    | ServerMoved
                    | ConnectionRateExceeded
            )
    }

    /// Whether this code may appear in a DISCONNECT: success, disconnect with will, or an
    /// error code (0x80 and up) but those about the CONNECT itself or packet identifiers.
    #[inline]
    fn allowed_in_disconnect(self) -> bool {
        use ReasonCode::*;
        let v = self as u8;
        matches!(self, Success | DisconnectWithWillMessage)
            || (v >= 0x80
                && !matches!(
                    self,
                    UnsupportedProtocolVersion
                        | ClientIdentifierNotValid
                        | BadUserNameOrPassword
                        | ServerUnavailable
                        | Banned
                        | BadAuthenticationMethod
                        | PacketIdentifierInUse
                        | PacketIdentifierNotFound
                ))
    }

    /// The MQTT 3.x CONNACK return code for this reason (3.1.1 table 3.1).
    pub fn to_v3_connack(self) -> u8 {
        use ReasonCode::*;
        match self {
            Success => 0,
            UnsupportedProtocolVersion => 1,
            ClientIdentifierNotValid => 2,
            BadUserNameOrPassword => 4,
            NotAuthorized | Banned | BadAuthenticationMethod => 5,
            _ => 3,
        }
    }

    /// The reason code for an MQTT 3.x CONNACK return code.
    pub fn from_v3_connack(v: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match v {
            0 => Success,
            1 => UnsupportedProtocolVersion,
            2 => ClientIdentifierNotValid,
            3 => ServerUnavailable,
            4 => BadUserNameOrPassword,
            5 => NotAuthorized,
            _ => return None,
        })
    }
}

/// The packet a reason code appears in; the allowed sets differ.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReasonContext {
    ConnAck,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    SubAck,
    UnsubAck,
    Disconnect,
    Auth,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_section_4_7() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "$SYS/#", "sport/+",
        ] {
            assert!(TopicFilter::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "+a"] {
            assert_eq!(
                TopicFilter::new(bad).unwrap_err(),
                DecodeError::TopicFilterInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn shared_filters_are_parsed() {
        let f = TopicFilter::new("$share/g1/a/+/c").unwrap();
        assert_eq!(f.share_group(), Some("g1"));
        assert_eq!(f.filter(), "a/+/c");
        assert!(f.matches("a/b/c"));
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "$share/#/a",
        ] {
            assert!(TopicFilter::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(topic_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1"
        ));
        assert!(topic_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(topic_matches("sport/#", "sport"));
        assert!(topic_matches("#", "a/b"));
        assert!(topic_matches("+/+", "/finance"));
        assert!(topic_matches("/+", "/finance"));
        assert!(!topic_matches("+", "/finance"));
        assert!(topic_matches("sport/+", "sport/"));
        assert!(!topic_matches("sport/+", "sport"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(topic_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(topic_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn strings_reject_nul_and_bad_utf8() {
        assert_eq!(
            MqttStr::new("a\0b").unwrap_err(),
            DecodeError::NullCharacter
        );
        assert_eq!(
            MqttStr::from_bytes(Bytes::from_static(&[0xC3, 0x28])).unwrap_err(),
            DecodeError::InvalidUtf8
        );
        assert_eq!(
            TopicName::new("a/+").unwrap_err(),
            DecodeError::TopicNameInvalid
        );
    }
}
