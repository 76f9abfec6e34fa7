//! Fuzz target `decode`: arbitrary bytes through `shardmq::protocol::decode`, and every
//! packet that decodes must survive a round trip through `Packet::encode`.
//!
//! Input layout: the first byte picks the decoder's limits, the rest is the byte stream.
//!
//! - bits 0-1: the negotiated version: 0 = none yet (only CONNECT decodes), 1 = 3.1,
//!   2 = 3.1.1, 3 = 5.0. With "none yet", a decoded CONNECT switches the stream to its own
//!   version, as the broker does, so one input can carry a whole session.
//! - bits 2-7 (`k`, 0..=63): the maximum packet size: `2 + 4k` bytes for k < 32 (small
//!   limits, to reach "packet too large"), `256 << (k - 32)` for 32 <= k < 63, capped at the
//!   protocol maximum, which k = 63 gives outright.
//!
//! The stream is decoded packet after packet until the decoder needs more bytes or reports
//! an error (where a broker would close the connection). For every packet `p`:
//! `encode(p)` succeeds, writes `encoded_len` bytes, and `decode(encode(p)) == p` with
//! nothing left over; a PUBLISH written as `encode_header` + payload gives the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardmq::protocol::{decode, DecodeLimits, Packet, ProtocolVersion, MAX_PACKET_SIZE_PROTOCOL};

fn limits_from(selector: u8) -> DecodeLimits {
    let version = match selector & 0x03 {
        0 => None,
        1 => Some(ProtocolVersion::V3_1),
        2 => Some(ProtocolVersion::V3_1_1),
        _ => Some(ProtocolVersion::V5),
    };
    let k = (selector >> 2) as usize;
    let max_packet_size = match k {
        0..=31 => 2 + 4 * k,
        32..=62 => (256usize << (k - 32)).min(MAX_PACKET_SIZE_PROTOCOL),
        _ => MAX_PACKET_SIZE_PROTOCOL,
    };
    DecodeLimits::new(max_packet_size, version)
}

fn round_trip(packet: &Packet, limits: &DecodeLimits) {
    // CONNECT is written in its own protocol version whatever `version` says; the others in
    // the version the stream negotiated (which is Some here: only CONNECT decodes without).
    let version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => limits
            .version
            .expect("a non-CONNECT packet decoded before CONNECT"),
    };
    let mut wire = BytesMut::new();
    let written = packet
        .encode(version, &mut wire)
        .unwrap_or_else(|e| panic!("encode failed for decoded {packet:?}: {e:?}"));
    assert_eq!(
        written,
        wire.len(),
        "encode's return value vs bytes written"
    );
    assert_eq!(
        packet.encoded_len(version),
        wire.len(),
        "encoded_len vs bytes written for {packet:?}"
    );

    if let Packet::Publish(p) = packet {
        let mut header = BytesMut::new();
        let total = p.encode_header(version, &mut header);
        assert_eq!(total, wire.len(), "encode_header's total vs encode");
        header.extend_from_slice(&p.payload);
        assert_eq!(&header[..], &wire[..], "encode_header + payload vs encode");
    }

    let encoded = wire.clone();
    let back_limits = DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, limits.version);
    let back = match decode(&mut wire, &back_limits) {
        Ok(Some(back)) => back,
        other => panic!(
            "re-decoding failed: {other:?}\n packet: {packet:?}\n encoded: {:02x?}",
            &encoded[..]
        ),
    };
    assert!(
        wire.is_empty(),
        "{} bytes left after re-decoding {packet:?}",
        wire.len()
    );
    assert_eq!(
        &back,
        packet,
        "decode(encode(p)) != p; encoded: {:02x?}",
        &encoded[..]
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let mut limits = limits_from(selector);
    let mut buf = BytesMut::from(stream);
    // Every packet consumes at least two bytes, so this terminates; the bound is a guard.
    for _ in 0..=stream.len() {
        match decode(&mut buf, &limits) {
            Ok(Some(packet)) => {
                round_trip(&packet, &limits);
                if let (None, Packet::Connect(c)) = (limits.version, &packet) {
                    limits.version = Some(c.protocol);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
