//! DISCONNECT (3.14) and AUTH (3.15). PINGREQ and PINGRESP have no body and live in
//! [`super::Packet`] directly.

use bytes::{BufMut, BytesMut};

use super::error::DecodeError;
use super::properties::{id as property_id, AuthProperties, DisconnectProperties};
use super::types::{ProtocolVersion, ReasonCode, ReasonContext};
use super::wire::Reader;

/// Either side ends the connection. MQTT 3.x has no body (and only the client sends it).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason_code: ReasonCode,
    /// MQTT 5 only.
    pub properties: DisconnectProperties,
}

impl Disconnect {
    pub fn new(reason_code: ReasonCode) -> Disconnect {
        Disconnect {
            reason_code,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(
        r: &mut Reader,
        version: ProtocolVersion,
    ) -> Result<Disconnect, DecodeError> {
        let mut d = Disconnect::default();
        if version.is_v5() && !r.is_empty() {
            d.reason_code = reason(r.u8()?, ReasonContext::Disconnect, "DISCONNECT")?;
            if !r.is_empty() {
                d.properties = DisconnectProperties::decode(r)?;
            }
        }
        r.finish()?;
        Ok(d)
    }

    pub(crate) fn remaining_len(&self, version: ProtocolVersion) -> usize {
        short_form_len(
            version,
            self.reason_code,
            self.properties.is_empty(),
            || self.properties.wire_len(),
        )
    }

    pub(crate) fn encode_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        if self.remaining_len(version) > 0 {
            buf.put_u8(self.reason_code.as_u8());
        }
        if version.is_v5() && !self.properties.is_empty() {
            self.properties.encode(buf);
        }
    }
}

/// Extended authentication exchange (MQTT 5 only). Every AUTH but the short form (Success,
/// no properties) carries an Authentication Method (3.15.2.2.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Auth {
    pub reason_code: ReasonCode,
    pub properties: AuthProperties,
}

impl Auth {
    pub(crate) fn decode(r: &mut Reader) -> Result<Auth, DecodeError> {
        let mut a = Auth::default();
        let short_form = r.is_empty();
        if !short_form {
            a.reason_code = reason(r.u8()?, ReasonContext::Auth, "AUTH")?;
            if !r.is_empty() {
                a.properties = AuthProperties::decode(r)?;
            }
        }
        r.finish()?;
        // 3.15.2.2.2: "It is a Protocol Error to omit the Authentication Method"; only the
        // short form (Success, Remaining Length 0, 3.15.2.1) goes without it.
        if !short_form && a.properties.authentication_method.is_none() {
            return Err(DecodeError::InvalidPropertyValue(
                property_id::AUTHENTICATION_METHOD,
            ));
        }
        Ok(a)
    }

    pub(crate) fn remaining_len(&self) -> usize {
        short_form_len(
            ProtocolVersion::V5,
            self.reason_code,
            self.properties.is_empty(),
            || self.properties.wire_len(),
        )
    }

    pub(crate) fn encode_body(&self, buf: &mut BytesMut) {
        if self.remaining_len() > 0 {
            buf.put_u8(self.reason_code.as_u8());
        }
        if !self.properties.is_empty() {
            self.properties.encode(buf);
        }
    }
}

fn reason(code: u8, ctx: ReasonContext, packet: &'static str) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(code)
        .filter(|c| c.allowed_in(ctx))
        .ok_or(DecodeError::InvalidReasonCode { code, packet })
}

/// DISCONNECT and AUTH omit the reason code when it is Success with no properties, and the
/// property length when there are no properties.
fn short_form_len(
    version: ProtocolVersion,
    code: ReasonCode,
    props_empty: bool,
    props_len: impl FnOnce() -> usize,
) -> usize {
    if !version.is_v5() {
        0
    } else if props_empty {
        usize::from(code != ReasonCode::Success)
    } else {
        1 + props_len()
    }
}
