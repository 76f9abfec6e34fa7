//! Properties of CONNECT, the will and CONNACK.

use super::*;

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
