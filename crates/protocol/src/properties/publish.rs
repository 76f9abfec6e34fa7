//! Properties of PUBLISH and of its acknowledgements (PUBACK, PUBREC, PUBREL, PUBCOMP).

use super::*;

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
