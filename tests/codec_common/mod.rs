//! Helpers shared by the codec test files (each integration test is its own crate, so not
//! every helper is used by every file).
#![allow(dead_code)]

use bytes::{Bytes, BytesMut};
use shardmq::protocol::{
    decode, DecodeError, DecodeLimits, MqttStr, Packet, PacketId, ProtocolVersion, TopicFilter,
    TopicName, MAX_PACKET_SIZE_PROTOCOL,
};

pub const V31: ProtocolVersion = ProtocolVersion::V3_1;
pub const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
pub const V5: ProtocolVersion = ProtocolVersion::V5;
pub const V3X: [ProtocolVersion; 2] = [V31, V311];

pub fn s(x: &str) -> MqttStr {
    MqttStr::new(x).unwrap()
}

pub fn topic(x: &str) -> TopicName {
    TopicName::new(x).unwrap()
}

pub fn filter(x: &str) -> TopicFilter {
    TopicFilter::new(x).unwrap()
}

pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

pub fn b(x: &'static [u8]) -> Bytes {
    Bytes::from_static(x)
}

pub fn limits(version: Option<ProtocolVersion>) -> DecodeLimits {
    DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, version)
}

/// Concatenates byte slices (to write vectors field by field).
pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A variable byte integer, written independently of the codec's own writer.
pub fn varint(mut v: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if v == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    cat(&[&[first], &varint(body.len() as u32), body])
}

/// A length-prefixed string or binary field.
pub fn lp(x: &[u8]) -> Vec<u8> {
    cat(&[&(x.len() as u16).to_be_bytes(), x])
}

/// A property block: its length, then the properties' bytes.
pub fn props(content: &[u8]) -> Vec<u8> {
    cat(&[&varint(content.len() as u32), content])
}

/// Decodes `bytes` (given whole) with the largest limit.
pub fn decode_all(
    version: Option<ProtocolVersion>,
    bytes: &[u8],
) -> (Result<Option<Packet>, DecodeError>, BytesMut) {
    let mut buf = BytesMut::from(bytes);
    let r = decode(&mut buf, &limits(version));
    (r, buf)
}

pub fn encode(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let n = packet
        .encode(version, &mut buf)
        .unwrap_or_else(|e| panic!("encoding {packet:?} for {version:?}: {e}"));
    assert_eq!(n, buf.len(), "encode's return value for {packet:?}");
    assert_eq!(
        packet.encoded_len(version),
        buf.len(),
        "encoded_len for {packet:?}"
    );
    buf.to_vec()
}

/// `bytes` decodes to `packet` (consuming exactly `bytes`) under `version`.
#[track_caller]
pub fn assert_decodes(version: ProtocolVersion, bytes: &[u8], packet: &Packet) {
    let (r, rest) = decode_all(Some(version), bytes);
    assert_eq!(
        r,
        Ok(Some(packet.clone())),
        "decoding {bytes:02X?} as {version:?}"
    );
    assert!(rest.is_empty(), "{} bytes left over", rest.len());
    // The same bytes followed by more: exactly one packet is consumed.
    let mut buf = BytesMut::from(bytes);
    buf.extend_from_slice(&[0xC0, 0x00]);
    assert_eq!(
        decode(&mut buf, &limits(Some(version))),
        Ok(Some(packet.clone()))
    );
    assert_eq!(&buf[..], &[0xC0, 0x00]);
    // Every strict prefix asks for more bytes and consumes nothing.
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(
            decode(&mut buf, &limits(Some(version))),
            Ok(None),
            "prefix of {cut} bytes"
        );
        assert_eq!(buf.len(), cut);
    }
}

/// `packet` encodes to exactly `bytes` under `version`.
#[track_caller]
pub fn assert_encodes(version: ProtocolVersion, packet: &Packet, bytes: &[u8]) {
    assert_eq!(
        encode(packet, version),
        bytes,
        "encoding {packet:?} as {version:?}"
    );
}

/// Both directions.
#[track_caller]
pub fn assert_vector(version: ProtocolVersion, bytes: &[u8], packet: Packet) {
    assert_decodes(version, bytes, &packet);
    assert_encodes(version, &packet, bytes);
}

/// `bytes` is refused with exactly `err`, whose MQTT 5 reason code is `reason`.
#[track_caller]
pub fn assert_error(version: Option<ProtocolVersion>, bytes: &[u8], err: DecodeError, reason: u8) {
    let (r, _) = decode_all(version, bytes);
    assert_eq!(r, Err(err.clone()), "decoding {bytes:02X?} as {version:?}");
    assert_eq!(err.reason_code().as_u8(), reason, "reason code of {err:?}");
}
