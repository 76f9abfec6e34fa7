//! Properties of SUBSCRIBE, UNSUBSCRIBE, DISCONNECT and AUTH.

use super::*;

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
