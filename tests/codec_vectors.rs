//! Byte-exact vectors: every packet type in each protocol version, decoded from and encoded
//! to the exact bytes of the specification (MQTT 3.1, 3.1.1 and 5.0), including the
//! specification's own examples. Every MQTT 5 property appears in at least one vector.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod codec_common;

use bytes::{Bytes, BytesMut};
use codec_common::*;
use shardmq::protocol::wire::{peek_varint, put_varint, varint_len};
use shardmq::protocol::{
    decode, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, DecodeError, DecodeLimits, Disconnect, DisconnectProperties, EncodeError,
    LastWill, Packet, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    SubAck, Subscribe, SubscribeProperties, SubscriptionOptions, UnsubAck, Unsubscribe,
    UnsubscribeProperties, WillProperties, MAX_PACKET_SIZE_PROTOCOL,
};
use std::num::NonZeroU16;

use ReasonCode as R;

fn connect(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        properties: ConnectProperties::default(),
        client_id: s(client_id),
        will: None,
        username: None,
        password: None,
    }
}

fn will(topic_name: &str, payload: &'static [u8], qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic(topic_name),
        payload: b(payload),
        qos,
        retain,
        properties: WillProperties::default(),
    }
}

fn kv(k: &str, v: &str) -> (shardmq::protocol::MqttStr, shardmq::protocol::MqttStr) {
    (s(k), s(v))
}

/// CONNECT vectors also decode while the version is still unknown (the first packet).
#[track_caller]
fn assert_connect_vector(bytes: &[u8], c: Connect) {
    let version = c.protocol;
    let packet = Packet::Connect(Box::new(c));
    assert_vector(version, bytes, packet.clone());
    let (r, rest) = decode_all(None, bytes);
    assert_eq!(r, Ok(Some(packet)));
    assert!(rest.is_empty());
}

// ---------------------------------------------------------------------------------------
// Section 1.5.5 / 2.2.3: variable byte integers (table 1.1 / table 2.1)
// ---------------------------------------------------------------------------------------

#[test]
fn variable_byte_integer_table() {
    // MQTT 3.1.1 table 2.4 and MQTT 5 table 1-1: the boundaries of each length.
    let table: [(u32, &[u8]); 8] = [
        (0, &[0x00]),
        (127, &[0x7F]),
        (128, &[0x80, 0x01]),
        (16_383, &[0xFF, 0x7F]),
        (16_384, &[0x80, 0x80, 0x01]),
        (2_097_151, &[0xFF, 0xFF, 0x7F]),
        (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
        (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
    ];
    for (value, bytes) in table {
        let mut buf = BytesMut::new();
        put_varint(&mut buf, value);
        assert_eq!(&buf[..], bytes, "{value}");
        assert_eq!(varint_len(value), bytes.len());
        assert_eq!(peek_varint(bytes), Ok(Some((value, bytes.len()))));
        // Every strict prefix needs more bytes.
        for cut in 0..bytes.len() {
            assert_eq!(peek_varint(&bytes[..cut]), Ok(None), "{value} cut at {cut}");
        }
    }
}

#[test]
fn remaining_length_boundaries_in_whole_packets() {
    // A QoS 0 PUBLISH to "t": remaining length = 3 + payload length.
    let table: [(usize, &[u8]); 6] = [
        (127, &[0x30, 0x7F][..]),
        (128, &[0x30, 0x80, 0x01]),
        (16_383, &[0x30, 0xFF, 0x7F]),
        (16_384, &[0x30, 0x80, 0x80, 0x01]),
        (2_097_151, &[0x30, 0xFF, 0xFF, 0x7F]),
        (2_097_152, &[0x30, 0x80, 0x80, 0x80, 0x01]),
    ];
    for (rl, header) in table {
        let payload = Bytes::from(vec![0xA5; rl - 3]);
        let bytes = cat(&[header, &[0x00, 0x01, b't'], &payload]);
        let p = Packet::Publish(Publish::new(topic("t"), payload));
        for v in ProtocolVersion::ALL {
            if v == V5 {
                continue; // MQTT 5 adds a property length byte
            }
            let (r, rest) = decode_all(Some(v), &bytes);
            assert_eq!(r.as_ref(), Ok(&Some(p.clone())), "rl {rl}");
            assert!(rest.is_empty());
            assert!(encode(&p, v) == bytes, "rl {rl}: encoding differs");
        }
    }
    // The largest remaining length, 268,435,455, is read from the fixed header alone.
    let header = [0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    let mut buf = BytesMut::from(&header[..]);
    let r = decode(&mut buf, &DecodeLimits::new(1000, Some(V311)));
    assert_eq!(
        r,
        Err(DecodeError::PacketTooLarge {
            size: 1 + 4 + 268_435_455,
            max: 1000
        })
    );
    let mut buf = BytesMut::from(&header[..]);
    let r = decode(
        &mut buf,
        &DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, Some(V311)),
    );
    assert_eq!(
        r,
        Ok(None),
        "the largest packet is allowed; more bytes are needed"
    );
    assert_eq!(MAX_PACKET_SIZE_PROTOCOL, 1 + 4 + 268_435_455);
}

// ---------------------------------------------------------------------------------------
// CONNECT (3.1)
// ---------------------------------------------------------------------------------------

#[test]
fn connect_v3_1() {
    // Protocol name "MQIsdp", level 3.
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x11],
            &[0x00, 0x06],
            b"MQIsdp",
            &[0x03, 0x02, 0x00, 0x3C],
            &[0x00, 0x03],
            b"abc",
        ]),
        connect(V31, "abc"),
    );
    // Will (QoS 1, retained), user name and password: flags 1110 1110.
    let mut c = connect(V31, "abc");
    c.keep_alive = 10;
    c.will = Some(will("w/t", b"bye", QoS::AtLeastOnce, true));
    c.username = Some(s("user"));
    c.password = Some(b(b"pass"));
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x27],
            &[0x00, 0x06],
            b"MQIsdp",
            &[0x03, 0xEE, 0x00, 0x0A],
            &[0x00, 0x03],
            b"abc",
            &[0x00, 0x03],
            b"w/t",
            &[0x00, 0x03],
            b"bye",
            &[0x00, 0x04],
            b"user",
            &[0x00, 0x04],
            b"pass",
        ]),
        c,
    );
}

#[test]
fn connect_v3_1_1_spec_example() {
    // MQTT 3.1.1 section 3.1.2.10, variable header example: protocol name "MQTT", level 4,
    // flags: user name 1, password 1, will retain 0, will QoS 01, will flag 1, clean
    // session 1, reserved 0 (0xCE); keep alive 10.
    let mut c = connect(V311, "client1");
    c.keep_alive = 10;
    c.will = Some(will("w/t", b"bye", QoS::AtLeastOnce, false));
    c.username = Some(s("user"));
    c.password = Some(b(b"pass"));
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x29],
            &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A],
            &[0x00, 0x07],
            b"client1",
            &[0x00, 0x03],
            b"w/t",
            &[0x00, 0x03],
            b"bye",
            &[0x00, 0x04],
            b"user",
            &[0x00, 0x04],
            b"pass",
        ]),
        c,
    );
}

#[test]
fn connect_v3_1_1() {
    // A zero-byte client identifier with clean session 1 (MQTT-3.1.3-6/7).
    assert_connect_vector(
        &[
            0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00,
        ],
        connect(V311, ""),
    );
    // Clean session 0, keep alive 0, will QoS 2 with an empty message, user name only.
    let mut c = connect(V311, "id");
    c.clean_start = false;
    c.keep_alive = 0;
    c.will = Some(will("t", b"", QoS::ExactlyOnce, false));
    c.username = Some(s("u"));
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x16],
            &[0x00, 0x04],
            b"MQTT",
            &[0x04, 0x94, 0x00, 0x00],
            &[0x00, 0x02],
            b"id",
            &[0x00, 0x01, b't'],
            &[0x00, 0x00],
            &[0x00, 0x01, b'u'],
        ]),
        c,
    );
}

#[test]
fn connect_v5_spec_example() {
    // MQTT 5 section 3.1.2.11 (variable header example): "MQTT", version 5, flags 0xCE,
    // keep alive 10, properties: length 5, Session Expiry Interval (17) = 10.
    let mut c = connect(V5, "client1");
    c.keep_alive = 10;
    c.properties.session_expiry_interval = Some(10);
    c.will = Some(will("w/t", b"bye", QoS::AtLeastOnce, false));
    c.username = Some(s("user"));
    c.password = Some(b(b"pass"));
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x30],
            &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xCE, 0x00, 0x0A],
            &[0x05, 0x11, 0x00, 0x00, 0x00, 0x0A],
            &[0x00, 0x07],
            b"client1",
            &[0x00], // will properties: none
            &[0x00, 0x03],
            b"w/t",
            &[0x00, 0x03],
            b"bye",
            &[0x00, 0x04],
            b"user",
            &[0x00, 0x04],
            b"pass",
        ]),
        c,
    );
}

#[test]
fn connect_v5_minimal_and_password_without_user_name() {
    assert_connect_vector(
        &[
            0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C, 0x00, 0x00,
            0x00,
        ],
        connect(V5, ""),
    );
    // MQTT 5 allows a password without a user name (3.1.2.9).
    let mut c = connect(V5, "c");
    c.password = Some(b(b"pwd"));
    assert_connect_vector(
        &cat(&[
            &[0x10, 0x13],
            &[0x00, 0x04],
            b"MQTT",
            &[0x05, 0x42, 0x00, 0x3C, 0x00],
            &[0x00, 0x01, b'c'],
            &[0x00, 0x03],
            b"pwd",
        ]),
        c,
    );
}

#[test]
fn connect_v5_every_connect_and_will_property() {
    let mut c = connect(V5, "cid1");
    c.properties = ConnectProperties {
        session_expiry_interval: Some(120),
        receive_maximum: Some(20),
        maximum_packet_size: Some(4096),
        topic_alias_maximum: Some(10),
        request_response_information: Some(true),
        request_problem_information: Some(false),
        user_properties: vec![kv("k", "v"), kv("k", "v2")],
        authentication_method: Some(s("SCRAM")),
        authentication_data: Some(b(&[1, 2, 3])),
    };
    c.will = Some(LastWill {
        topic: topic("w/t"),
        payload: b(b"bye"),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: WillProperties {
            will_delay_interval: Some(5),
            payload_format_indicator: Some(true),
            message_expiry_interval: Some(3600),
            content_type: Some(s("text/plain")),
            response_topic: Some(topic("r/t")),
            correlation_data: Some(b(&[0xCA, 0xFE])),
            user_properties: vec![kv("a", "b")],
        },
    });
    c.username = Some(s("user"));
    c.password = Some(b(b"pw"));
    let bytes = cat(&[
        &[0x10, 0x82, 0x01], // remaining length 130
        &[0x00, 0x04],
        b"MQTT",
        &[0x05, 0xF6, 0x00, 0x3C],
        &[0x31], // 49 bytes of properties
        &[0x11, 0x00, 0x00, 0x00, 0x78],
        &[0x21, 0x00, 0x14],
        &[0x27, 0x00, 0x00, 0x10, 0x00],
        &[0x22, 0x00, 0x0A],
        &[0x19, 0x01],
        &[0x17, 0x00],
        &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
        &[0x26, 0x00, 0x01, b'k', 0x00, 0x02, b'v', b'2'],
        &[0x15, 0x00, 0x05],
        b"SCRAM",
        &[0x16, 0x00, 0x03, 0x01, 0x02, 0x03],
        &[0x00, 0x04],
        b"cid1",
        &[0x2B], // 43 bytes of will properties
        &[0x18, 0x00, 0x00, 0x00, 0x05],
        &[0x01, 0x01],
        &[0x02, 0x00, 0x00, 0x0E, 0x10],
        &[0x03, 0x00, 0x0A],
        b"text/plain",
        &[0x08, 0x00, 0x03],
        b"r/t",
        &[0x09, 0x00, 0x02, 0xCA, 0xFE],
        &[0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'b'],
        &[0x00, 0x03],
        b"w/t",
        &[0x00, 0x03],
        b"bye",
        &[0x00, 0x04],
        b"user",
        &[0x00, 0x02],
        b"pw",
    ]);
    assert_connect_vector(&bytes, c);
}

#[test]
fn connect_properties_in_any_order() {
    // The specification does not fix the order of properties; user properties keep theirs.
    let bytes = cat(&[
        &[0x10, 0x1C],
        &[0x00, 0x04],
        b"MQTT",
        &[0x05, 0x02, 0x00, 0x3C],
        &[0x0F],
        &[0x26, 0x00, 0x01, b'z', 0x00, 0x00],
        &[0x21, 0x00, 0x01],
        &[0x26, 0x00, 0x01, b'a', 0x00, 0x00],
        &[0x00, 0x00],
    ]);
    let mut c = connect(V5, "");
    c.properties.receive_maximum = Some(1);
    c.properties.user_properties = vec![kv("z", ""), kv("a", "")];
    assert_decodes(V5, &bytes, &Packet::Connect(Box::new(c)));
}

// ---------------------------------------------------------------------------------------
// CONNACK (3.2)
// ---------------------------------------------------------------------------------------

fn connack(session_present: bool, reason_code: ReasonCode) -> Packet {
    Packet::ConnAck(Box::new(ConnAck {
        session_present,
        reason_code,
        properties: ConnAckProperties::default(),
    }))
}

#[test]
fn connack_v3_return_codes() {
    // MQTT 3.1.1 table 3.1 (and MQTT 3.1): return codes 0-5.
    let table = [
        (0x00, R::Success),
        (0x01, R::UnsupportedProtocolVersion),
        (0x02, R::ClientIdentifierNotValid),
        (0x03, R::ServerUnavailable),
        (0x04, R::BadUserNameOrPassword),
        (0x05, R::NotAuthorized),
    ];
    for v in V3X {
        for (code, reason) in table {
            assert_vector(v, &[0x20, 0x02, 0x00, code], connack(false, reason));
        }
        // Session present (3.2.2.2).
        assert_vector(v, &[0x20, 0x02, 0x01, 0x00], connack(true, R::Success));
    }
}

#[test]
fn connack_v3_maps_mqtt5_reasons_onto_return_codes() {
    for (reason, code) in [
        (R::ServerBusy, 0x03),
        (R::UnspecifiedError, 0x03),
        (R::Banned, 0x05),
        (R::BadAuthenticationMethod, 0x05),
    ] {
        assert_encodes(V311, &connack(false, reason), &[0x20, 0x02, 0x00, code]);
    }
}

#[test]
fn connack_v5() {
    assert_vector(
        V5,
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        connack(false, R::Success),
    );
    assert_vector(
        V5,
        &[0x20, 0x03, 0x01, 0x00, 0x00],
        connack(true, R::Success),
    );
    assert_vector(
        V5,
        &[0x20, 0x03, 0x00, 0x87, 0x00],
        connack(false, R::NotAuthorized),
    );
    assert_vector(
        V5,
        &[0x20, 0x03, 0x00, 0x9F, 0x00],
        connack(false, R::ConnectionRateExceeded),
    );
}

#[test]
fn connack_v5_every_property() {
    let p = ConnAckProperties {
        session_expiry_interval: Some(60),
        receive_maximum: Some(10),
        maximum_qos: Some(QoS::AtLeastOnce),
        retain_available: Some(false),
        maximum_packet_size: Some(65_536),
        assigned_client_identifier: Some(s("auto")),
        topic_alias_maximum: Some(5),
        reason_string: Some(s("ok")),
        user_properties: vec![kv("k", "v")],
        wildcard_subscription_available: Some(false),
        subscription_identifiers_available: Some(true),
        shared_subscription_available: Some(false),
        server_keep_alive: Some(30),
        response_information: Some(s("info")),
        server_reference: Some(s("srv")),
        authentication_method: Some(s("SCRAM")),
        authentication_data: Some(b(&[0xAA])),
    };
    let bytes = cat(&[
        &[0x20, 0x4C, 0x01, 0x00, 0x49],
        &[0x11, 0x00, 0x00, 0x00, 0x3C],
        &[0x21, 0x00, 0x0A],
        &[0x24, 0x01],
        &[0x25, 0x00],
        &[0x27, 0x00, 0x01, 0x00, 0x00],
        &[0x12, 0x00, 0x04],
        b"auto",
        &[0x22, 0x00, 0x05],
        &[0x1F, 0x00, 0x02],
        b"ok",
        &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
        &[0x28, 0x00],
        &[0x29, 0x01],
        &[0x2A, 0x00],
        &[0x13, 0x00, 0x1E],
        &[0x1A, 0x00, 0x04],
        b"info",
        &[0x1C, 0x00, 0x03],
        b"srv",
        &[0x15, 0x00, 0x05],
        b"SCRAM",
        &[0x16, 0x00, 0x01, 0xAA],
    ]);
    assert_vector(
        V5,
        &bytes,
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            reason_code: R::Success,
            properties: p,
        })),
    );
    // Maximum QoS 0 is the other value a server may send.
    assert_vector(
        V5,
        &[0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x00],
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: R::Success,
            properties: ConnAckProperties {
                maximum_qos: Some(QoS::AtMostOnce),
                ..Default::default()
            },
        })),
    );
}

// ---------------------------------------------------------------------------------------
// PUBLISH (3.3)
// ---------------------------------------------------------------------------------------

fn publish(qos: QoS, packet_id: Option<u16>, name: &str, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(name),
        packet_id: packet_id.map(pid),
        properties: PublishProperties::default(),
        payload: b(payload),
    }
}

#[test]
fn publish_v3() {
    for v in V3X {
        // QoS 0: no packet identifier.
        assert_vector(
            v,
            &cat(&[&[0x30, 0x0A, 0x00, 0x03], b"a/b", b"hello"]),
            Packet::Publish(publish(QoS::AtMostOnce, None, "a/b", b"hello")),
        );
        // MQTT 3.1.1 section 3.3.2.3 example: topic "a/b", packet identifier 10.
        assert_vector(
            v,
            &cat(&[
                &[0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A],
                b"hi",
            ]),
            Packet::Publish(publish(QoS::AtLeastOnce, Some(10), "a/b", b"hi")),
        );
        // QoS 2, DUP and RETAIN: flags 1101.
        let mut p = publish(QoS::ExactlyOnce, Some(11), "a/b", b"x");
        p.dup = true;
        p.retain = true;
        assert_vector(
            v,
            &cat(&[&[0x3D, 0x08, 0x00, 0x03], b"a/b", &[0x00, 0x0B], b"x"]),
            Packet::Publish(p),
        );
        // Empty payload, retained (a retained-message delete).
        let mut p = publish(QoS::AtMostOnce, None, "a/b", b"");
        p.retain = true;
        assert_vector(
            v,
            &cat(&[&[0x31, 0x05, 0x00, 0x03], b"a/b"]),
            Packet::Publish(p),
        );
    }
}

#[test]
fn publish_v3_1_allows_dup_with_qos_0() {
    // MQTT 3.1 did not forbid DUP on QoS 0; MQTT-3.3.1-2 (3.1.1) does.
    let mut p = publish(QoS::AtMostOnce, None, "a/b", b"x");
    p.dup = true;
    assert_vector(
        V31,
        &cat(&[&[0x38, 0x06, 0x00, 0x03], b"a/b", b"x"]),
        Packet::Publish(p),
    );
}

#[test]
fn publish_v5_spec_example() {
    // MQTT 5 section 3.3.2.4 example: topic "a/b", packet identifier 10, no properties.
    assert_vector(
        V5,
        &cat(&[
            &[0x32, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0x00],
            b"hi",
        ]),
        Packet::Publish(publish(QoS::AtLeastOnce, Some(10), "a/b", b"hi")),
    );
    assert_vector(
        V5,
        &cat(&[&[0x30, 0x0B, 0x00, 0x03], b"a/b", &[0x00], b"hello"]),
        Packet::Publish(publish(QoS::AtMostOnce, None, "a/b", b"hello")),
    );
}

#[test]
fn publish_v5_every_property() {
    let mut p = publish(QoS::AtLeastOnce, Some(10), "a/b", b"hi");
    p.dup = true;
    p.retain = true;
    p.properties = PublishProperties {
        payload_format_indicator: Some(true),
        message_expiry_interval: Some(60),
        topic_alias: NonZeroU16::new(5),
        response_topic: Some(topic("r/t")),
        correlation_data: Some(b(&[0xCA, 0xFE])),
        user_properties: vec![kv("k", "v")],
        // Repeats: one per matching subscription (3.3.2.3.8); 128 takes two bytes.
        subscription_identifiers: vec![1, 128],
        content_type: Some(s("json")),
    };
    let bytes = cat(&[
        &[0x3B, 0x32],
        &[0x00, 0x03],
        b"a/b",
        &[0x00, 0x0A],
        &[0x28],
        &[0x01, 0x01],
        &[0x02, 0x00, 0x00, 0x00, 0x3C],
        &[0x23, 0x00, 0x05],
        &[0x08, 0x00, 0x03],
        b"r/t",
        &[0x09, 0x00, 0x02, 0xCA, 0xFE],
        &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
        &[0x0B, 0x01],
        &[0x0B, 0x80, 0x01],
        &[0x03, 0x00, 0x04],
        b"json",
        b"hi",
    ]);
    assert_vector(V5, &bytes, Packet::Publish(p));
}

#[test]
fn publish_v5_topic_alias_with_empty_topic() {
    // 3.3.2.3.4: a Topic Alias stands in for a zero-length topic name.
    let mut p = Publish::new(shardmq::protocol::TopicName::empty(), b(b"x"));
    p.properties.topic_alias = NonZeroU16::new(1);
    assert_vector(
        V5,
        &[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'x'],
        Packet::Publish(p),
    );
    // Payload format 0 and the largest subscription identifier.
    let mut p = publish(QoS::ExactlyOnce, Some(0xFFFF), "t", b"");
    p.properties.payload_format_indicator = Some(false);
    p.properties.subscription_identifiers = vec![268_435_455];
    assert_vector(
        V5,
        &[
            0x34, 0x0D, 0x00, 0x01, b't', 0xFF, 0xFF, 0x07, 0x01, 0x00, 0x0B, 0xFF, 0xFF, 0xFF,
            0x7F,
        ],
        Packet::Publish(p),
    );
}

#[test]
fn publish_encode_header_then_shared_payload() {
    let mut p = publish(QoS::AtLeastOnce, Some(10), "a/b", b"payload");
    p.properties.user_properties = vec![kv("k", "v")];
    for v in ProtocolVersion::ALL {
        let packet = Packet::Publish(p.clone());
        let whole = encode(&packet, v);
        let mut buf = BytesMut::new();
        let total = p.encode_header(v, &mut buf);
        if !v.is_v5() {
            // 3.x cannot carry properties; compare against a property-less copy.
            let mut plain = p.clone();
            plain.properties = PublishProperties::default();
            assert_eq!(whole, encode(&Packet::Publish(plain), v));
        }
        assert_eq!(total, whole.len());
        buf.extend_from_slice(&p.payload);
        assert_eq!(&buf[..], &whole[..], "{v:?}");
    }
}

// ---------------------------------------------------------------------------------------
// PUBACK, PUBREC, PUBREL, PUBCOMP (3.4 - 3.7)
// ---------------------------------------------------------------------------------------

type AckCtor = fn(shardmq::protocol::Ack) -> Packet;

const ACKS: [(u8, AckCtor); 4] = [
    (0x40, Packet::PubAck),
    (0x50, Packet::PubRec),
    (0x62, Packet::PubRel),
    (0x70, Packet::PubComp),
];

#[test]
fn acks_v3_and_v5_short_form() {
    // 3.x: packet identifier only. MQTT 5: the same bytes when the reason is Success and
    // there are no properties (remaining length 2, 3.4.2.1).
    for v in ProtocolVersion::ALL {
        for (first, ctor) in ACKS {
            assert_vector(
                v,
                &[first, 0x02, 0x00, 0x0A],
                ctor(shardmq::protocol::Ack::new(pid(10))),
            );
            assert_vector(
                v,
                &[first, 0x02, 0xFF, 0xFF],
                ctor(shardmq::protocol::Ack::new(pid(0xFFFF))),
            );
        }
    }
}

#[test]
fn acks_v5_reason_codes_and_properties() {
    use shardmq::protocol::Ack;
    // Remaining length 3: reason code, no property length.
    let table: [(u8, AckCtor, ReasonCode); 4] = [
        (0x40, Packet::PubAck, R::NoMatchingSubscribers),
        (0x50, Packet::PubRec, R::UnspecifiedError),
        (0x62, Packet::PubRel, R::PacketIdentifierNotFound),
        (0x70, Packet::PubComp, R::PacketIdentifierNotFound),
    ];
    for (first, ctor, reason) in table {
        assert_vector(
            V5,
            &[first, 0x03, 0x00, 0x0A, reason.as_u8()],
            ctor(Ack::with_reason(pid(10), reason)),
        );
    }
    // Reason code and properties.
    let props = AckProperties {
        reason_string: Some(s("no")),
        user_properties: vec![kv("k", "v")],
    };
    for (first, ctor) in ACKS {
        let reason = if first == 0x40 || first == 0x50 {
            R::NoMatchingSubscribers
        } else {
            R::PacketIdentifierNotFound
        };
        let ack = Ack {
            packet_id: pid(10),
            reason_code: reason,
            properties: props.clone(),
        };
        assert_vector(
            V5,
            &cat(&[
                &[first, 0x10, 0x00, 0x0A, reason.as_u8(), 0x0C],
                &[0x1F, 0x00, 0x02, b'n', b'o'],
                &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
            ]),
            ctor(ack),
        );
    }
    // Success with properties keeps the explicit reason code.
    assert_vector(
        V5,
        &[
            0x70, 0x09, 0x00, 0x0A, 0x00, 0x05, 0x1F, 0x00, 0x02, b'o', b'k',
        ],
        Packet::PubComp(Ack {
            packet_id: pid(10),
            reason_code: R::Success,
            properties: AckProperties {
                reason_string: Some(s("ok")),
                user_properties: vec![],
            },
        }),
    );
}

#[test]
fn acks_v5_long_forms_of_success_decode() {
    use shardmq::protocol::Ack;
    for (first, ctor) in ACKS {
        let p = ctor(Ack::new(pid(10)));
        // Reason code 0 written out, with and without an empty property block.
        assert_decodes(V5, &[first, 0x03, 0x00, 0x0A, 0x00], &p);
        assert_decodes(V5, &[first, 0x04, 0x00, 0x0A, 0x00, 0x00], &p);
    }
}

// ---------------------------------------------------------------------------------------
// SUBSCRIBE (3.8) and SUBACK (3.9)
// ---------------------------------------------------------------------------------------

fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

#[test]
fn subscribe_v3_spec_example() {
    // MQTT 3.1.1 section 3.8.3 payload example: "a/b" QoS 1, "c/d" QoS 2; variable header
    // example: packet identifier 10.
    let sub = Subscribe {
        packet_id: pid(10),
        properties: SubscribeProperties::default(),
        filters: vec![
            (filter("a/b"), opts(QoS::AtLeastOnce)),
            (filter("c/d"), opts(QoS::ExactlyOnce)),
        ],
    };
    for v in V3X {
        assert_vector(
            v,
            &cat(&[
                &[0x82, 0x0E, 0x00, 0x0A],
                &[0x00, 0x03, b'a', b'/', b'b', 0x01],
                &[0x00, 0x03, b'c', b'/', b'd', 0x02],
            ]),
            Packet::Subscribe(sub.clone()),
        );
    }
    // The same in MQTT 5, with an empty property block.
    assert_vector(
        V5,
        &cat(&[
            &[0x82, 0x0F, 0x00, 0x0A, 0x00],
            &[0x00, 0x03, b'a', b'/', b'b', 0x01],
            &[0x00, 0x03, b'c', b'/', b'd', 0x02],
        ]),
        Packet::Subscribe(sub),
    );
}

#[test]
fn subscribe_v3_wildcards_and_qos_0() {
    let sub = Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![
            (filter("#"), opts(QoS::AtMostOnce)),
            (filter("+/x"), opts(QoS::AtMostOnce)),
        ],
    };
    for v in V3X {
        assert_vector(
            v,
            &[
                0x82, 0x0C, 0x00, 0x01, 0x00, 0x01, b'#', 0x00, 0x00, 0x03, b'+', b'/', b'x', 0x00,
            ],
            Packet::Subscribe(sub.clone()),
        );
    }
}

#[test]
fn subscribe_v5_every_option_and_property() {
    let sub = Subscribe {
        packet_id: pid(10),
        properties: SubscribeProperties {
            subscription_identifier: Some(5),
            user_properties: vec![kv("k", "v")],
        },
        filters: vec![
            (filter("a/b"), opts(QoS::AtLeastOnce)),
            (
                filter("c/d"),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::SendAtSubscribeIfNew,
                },
            ),
            (
                filter("e/#"),
                SubscriptionOptions {
                    qos: QoS::AtMostOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::DoNotSend,
                },
            ),
            (
                filter("$share/g/x/+"),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: true,
                    retain_handling: RetainHandling::SendAtSubscribe,
                },
            ),
        ],
    };
    let bytes = cat(&[
        &[0x82, 0x2D, 0x00, 0x0A],
        &[0x09, 0x0B, 0x05, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
        &[0x00, 0x03],
        b"a/b",
        &[0x01],
        &[0x00, 0x03],
        b"c/d",
        &[0x1E], // retain handling 1, RAP, NL, QoS 2
        &[0x00, 0x03],
        b"e/#",
        &[0x20], // retain handling 2, QoS 0
        &[0x00, 0x0C],
        b"$share/g/x/+",
        &[0x09], // RAP, QoS 1
    ]);
    assert_vector(V5, &bytes, Packet::Subscribe(sub));
    // The largest subscription identifier.
    assert_vector(
        V5,
        &[
            0x82, 0x0C, 0x00, 0x01, 0x05, 0x0B, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01, b'#', 0x00,
        ],
        Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            properties: SubscribeProperties {
                subscription_identifier: Some(268_435_455),
                user_properties: vec![],
            },
            filters: vec![(filter("#"), opts(QoS::AtMostOnce))],
        }),
    );
}

#[test]
fn subscribe_v3_encoding_drops_mqtt5_options() {
    let sub = Subscribe {
        packet_id: pid(2),
        properties: SubscribeProperties::default(),
        filters: vec![(
            filter("a"),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        )],
    };
    assert_encodes(
        V311,
        &Packet::Subscribe(sub),
        &[0x82, 0x06, 0x00, 0x02, 0x00, 0x01, b'a', 0x01],
    );
}

#[test]
fn suback_v3() {
    // MQTT 3.1.1 section 3.9.3 example: success QoS 0, success QoS 2, failure.
    for v in V3X {
        assert_vector(
            v,
            &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x02, 0x80],
            Packet::SubAck(SubAck {
                packet_id: pid(10),
                properties: AckProperties::default(),
                reason_codes: vec![R::Success, R::GrantedQoS2, R::UnspecifiedError],
            }),
        );
        assert_vector(
            v,
            &[0x90, 0x03, 0x00, 0x0A, 0x01],
            Packet::SubAck(SubAck {
                packet_id: pid(10),
                properties: AckProperties::default(),
                reason_codes: vec![R::GrantedQoS1],
            }),
        );
    }
    // MQTT 5 failure reasons are all written as 0x80 for 3.x.
    assert_encodes(
        V311,
        &Packet::SubAck(SubAck {
            packet_id: pid(10),
            properties: AckProperties::default(),
            reason_codes: vec![R::NotAuthorized, R::TopicFilterInvalid, R::GrantedQoS1],
        }),
        &[0x90, 0x05, 0x00, 0x0A, 0x80, 0x80, 0x01],
    );
}

#[test]
fn suback_v5_every_reason_code() {
    // Table 3-8: every SUBACK reason code.
    let codes = [
        R::Success,
        R::GrantedQoS1,
        R::GrantedQoS2,
        R::UnspecifiedError,
        R::ImplementationSpecificError,
        R::NotAuthorized,
        R::TopicFilterInvalid,
        R::PacketIdentifierInUse,
        R::QuotaExceeded,
        R::SharedSubscriptionsNotSupported,
        R::SubscriptionIdentifiersNotSupported,
        R::WildcardSubscriptionsNotSupported,
    ];
    assert_vector(
        V5,
        &cat(&[
            &[0x90, 0x14, 0x00, 0x0A, 0x05, 0x1F, 0x00, 0x02, b'o', b'k'],
            &[
                0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
            ],
        ]),
        Packet::SubAck(SubAck {
            packet_id: pid(10),
            properties: AckProperties {
                reason_string: Some(s("ok")),
                user_properties: vec![],
            },
            reason_codes: codes.to_vec(),
        }),
    );
    assert_vector(
        V5,
        &[0x90, 0x04, 0x00, 0x0A, 0x00, 0x01],
        Packet::SubAck(SubAck {
            packet_id: pid(10),
            properties: AckProperties::default(),
            reason_codes: vec![R::GrantedQoS1],
        }),
    );
}

// ---------------------------------------------------------------------------------------
// UNSUBSCRIBE (3.10) and UNSUBACK (3.11)
// ---------------------------------------------------------------------------------------

#[test]
fn unsubscribe_all_versions() {
    // MQTT 3.1.1 section 3.10.3 example: "a/b" and "c/d".
    let u = Unsubscribe {
        packet_id: pid(10),
        properties: UnsubscribeProperties::default(),
        filters: vec![filter("a/b"), filter("c/d")],
    };
    for v in V3X {
        assert_vector(
            v,
            &cat(&[
                &[0xA2, 0x0C, 0x00, 0x0A, 0x00, 0x03],
                b"a/b",
                &[0x00, 0x03],
                b"c/d",
            ]),
            Packet::Unsubscribe(u.clone()),
        );
    }
    assert_vector(
        V5,
        &cat(&[
            &[0xA2, 0x0D, 0x00, 0x0A, 0x00, 0x00, 0x03],
            b"a/b",
            &[0x00, 0x03],
            b"c/d",
        ]),
        Packet::Unsubscribe(u.clone()),
    );
    let mut with_props = u;
    with_props.properties.user_properties = vec![kv("k", "v")];
    assert_vector(
        V5,
        &cat(&[
            &[0xA2, 0x14, 0x00, 0x0A],
            &[0x07, 0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
            &[0x00, 0x03],
            b"a/b",
            &[0x00, 0x03],
            b"c/d",
        ]),
        Packet::Unsubscribe(with_props),
    );
}

#[test]
fn unsuback_all_versions() {
    for v in V3X {
        assert_vector(
            v,
            &[0xB0, 0x02, 0x00, 0x0A],
            Packet::UnsubAck(UnsubAck {
                packet_id: pid(10),
                properties: AckProperties::default(),
                reason_codes: vec![],
            }),
        );
    }
    // Table 3-9: every UNSUBACK reason code.
    assert_vector(
        V5,
        &cat(&[
            &[0xB0, 0x0F, 0x00, 0x0A, 0x05, 0x1F, 0x00, 0x02, b'o', b'k'],
            &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
        ]),
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(10),
            properties: AckProperties {
                reason_string: Some(s("ok")),
                user_properties: vec![],
            },
            reason_codes: vec![
                R::Success,
                R::NoSubscriptionExisted,
                R::UnspecifiedError,
                R::ImplementationSpecificError,
                R::NotAuthorized,
                R::TopicFilterInvalid,
                R::PacketIdentifierInUse,
            ],
        }),
    );
    assert_vector(
        V5,
        &[0xB0, 0x04, 0x00, 0x0A, 0x00, 0x00],
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(10),
            properties: AckProperties::default(),
            reason_codes: vec![R::Success],
        }),
    );
}

// ---------------------------------------------------------------------------------------
// PINGREQ (3.12), PINGRESP (3.13), DISCONNECT (3.14), AUTH (3.15)
// ---------------------------------------------------------------------------------------

#[test]
fn ping_all_versions() {
    for v in ProtocolVersion::ALL {
        assert_vector(v, &[0xC0, 0x00], Packet::PingReq);
        assert_vector(v, &[0xD0, 0x00], Packet::PingResp);
    }
}

#[test]
fn disconnect_all_versions() {
    for v in V3X {
        assert_vector(v, &[0xE0, 0x00], Packet::Disconnect(Disconnect::default()));
    }
    // MQTT 5 short form: remaining length 0 means Normal disconnection (3.14.2.1).
    assert_vector(V5, &[0xE0, 0x00], Packet::Disconnect(Disconnect::default()));
    assert_vector(
        V5,
        &[0xE0, 0x01, 0x04],
        Packet::Disconnect(Disconnect::new(R::DisconnectWithWillMessage)),
    );
    assert_vector(
        V5,
        &[0xE0, 0x01, 0x8E],
        Packet::Disconnect(Disconnect::new(R::SessionTakenOver)),
    );
    // Every DISCONNECT property.
    assert_vector(
        V5,
        &cat(&[
            &[0xE0, 0x1A, 0x8B, 0x18],
            &[0x11, 0x00, 0x00, 0x00, 0x00],
            &[0x1F, 0x00, 0x03],
            b"bye",
            &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
            &[0x1C, 0x00, 0x03],
            b"srv",
        ]),
        Packet::Disconnect(Disconnect {
            reason_code: R::ServerShuttingDown,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some(s("bye")),
                user_properties: vec![kv("k", "v")],
                server_reference: Some(s("srv")),
            },
        }),
    );
    // Success with properties.
    assert_vector(
        V5,
        &[0xE0, 0x07, 0x00, 0x05, 0x1F, 0x00, 0x02, b'o', b'k'],
        Packet::Disconnect(Disconnect {
            reason_code: R::Success,
            properties: DisconnectProperties {
                reason_string: Some(s("ok")),
                ..Default::default()
            },
        }),
    );
    // Long forms of the normal disconnection.
    assert_decodes(
        V5,
        &[0xE0, 0x01, 0x00],
        &Packet::Disconnect(Disconnect::default()),
    );
    assert_decodes(
        V5,
        &[0xE0, 0x02, 0x00, 0x00],
        &Packet::Disconnect(Disconnect::default()),
    );
    // 3.x has no reason codes: whatever the reason, the packet is two bytes.
    assert_encodes(
        V311,
        &Packet::Disconnect(Disconnect::new(R::ServerShuttingDown)),
        &[0xE0, 0x00],
    );
}

#[test]
fn auth_v5() {
    // Short form: Success, no properties (3.15.2.1).
    assert_vector(V5, &[0xF0, 0x00], Packet::Auth(Box::default()));
    // Every other AUTH carries the Authentication Method (3.15.2.2.2).
    assert_vector(
        V5,
        &cat(&[&[0xF0, 0x0A, 0x18, 0x08, 0x15, 0x00, 0x05], b"SCRAM"]),
        Packet::Auth(Box::new(Auth {
            reason_code: R::ContinueAuthentication,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM")),
                ..Default::default()
            },
        })),
    );
    // Every AUTH property.
    assert_vector(
        V5,
        &cat(&[
            &[0xF0, 0x1B, 0x19, 0x19],
            &[0x15, 0x00, 0x05],
            b"SCRAM",
            &[0x16, 0x00, 0x02, 0x01, 0x02],
            &[0x1F, 0x00, 0x02],
            b"go",
            &[0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v'],
        ]),
        Packet::Auth(Box::new(Auth {
            reason_code: R::ReAuthenticate,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM")),
                authentication_data: Some(b(&[1, 2])),
                reason_string: Some(s("go")),
                user_properties: vec![kv("k", "v")],
            },
        })),
    );
    // Success with the method (the end of a re-authentication, 4.12.1).
    assert_vector(
        V5,
        &cat(&[&[0xF0, 0x0A, 0x00, 0x08, 0x15, 0x00, 0x05], b"SCRAM"]),
        Packet::Auth(Box::new(Auth {
            reason_code: R::Success,
            properties: AuthProperties {
                authentication_method: Some(s("SCRAM")),
                ..Default::default()
            },
        })),
    );
}

#[test]
fn auth_does_not_exist_before_mqtt_5() {
    for v in V3X {
        let mut buf = BytesMut::new();
        assert_eq!(
            Packet::Auth(Box::default()).encode(v, &mut buf),
            Err(EncodeError::PacketNotInVersion("AUTH"))
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn packets_decode_back_to_back() {
    // Several packets in one buffer come out one by one, in order.
    let bytes = cat(&[
        &[0xC0, 0x00],
        &[0x40, 0x02, 0x00, 0x01],
        &cat(&[&[0x30, 0x05, 0x00, 0x03], b"a/b"]),
        &[0xE0, 0x00],
    ]);
    let mut buf = BytesMut::from(&bytes[..]);
    let l = limits(Some(V311));
    assert_eq!(decode(&mut buf, &l), Ok(Some(Packet::PingReq)));
    assert_eq!(
        decode(&mut buf, &l),
        Ok(Some(Packet::PubAck(shardmq::protocol::Ack::new(pid(1)))))
    );
    assert_eq!(
        decode(&mut buf, &l),
        Ok(Some(Packet::Publish(publish(
            QoS::AtMostOnce,
            None,
            "a/b",
            b""
        ))))
    );
    assert_eq!(
        decode(&mut buf, &l),
        Ok(Some(Packet::Disconnect(Disconnect::default())))
    );
    assert_eq!(decode(&mut buf, &l), Ok(None));
    assert!(buf.is_empty());
}

#[test]
fn packet_names_and_types() {
    let all: [(Packet, u8, &str); 4] = [
        (Packet::PingReq, 12, "PINGREQ"),
        (Packet::PingResp, 13, "PINGRESP"),
        (Packet::Auth(Box::default()), 15, "AUTH"),
        (Packet::Disconnect(Disconnect::default()), 14, "DISCONNECT"),
    ];
    for (p, t, n) in all {
        assert_eq!(p.packet_type(), t);
        assert_eq!(p.name(), n);
    }
}

// ---------------------------------------------------------------------------------------
// Debug must not leak secrets or payloads.
// ---------------------------------------------------------------------------------------

#[test]
fn debug_of_publish_omits_the_payload() {
    let secret: &'static [u8] = b"s3cr3t-payload-XYZZY";
    let mut p = publish(QoS::AtLeastOnce, Some(7), "a/b", secret);
    p.properties.user_properties = vec![kv("k", "v")];
    for text in [
        format!("{p:?}"),
        format!("{p:#?}"),
        format!("{:?}", Packet::Publish(p.clone())),
    ] {
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(!text.contains("XYZZY"), "{text}");
        // Nor as a list of byte values ('s' = 115, '3' = 51).
        assert!(!text.contains("115, 51"), "{text}");
        assert!(text.contains("a/b"), "{text}");
        assert!(text.contains(&secret.len().to_string()), "{text}");
    }
}

#[test]
fn debug_of_connect_omits_password_and_will_payload() {
    let mut c = connect(V5, "client-7");
    c.username = Some(s("alice"));
    c.password = Some(b(b"hunter2-PASSWORD"));
    c.will = Some(will("w/t", b"will-SECRET-body", QoS::AtLeastOnce, false));
    for text in [
        format!("{c:?}"),
        format!("{c:#?}"),
        format!("{:?}", Packet::Connect(Box::new(c.clone()))),
    ] {
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("PASSWORD"), "{text}");
        // 'h' 'u' = 104, 117
        assert!(!text.contains("104, 117"), "{text}");
        assert!(!text.contains("will-SECRET"), "{text}");
        assert!(text.contains("client-7"), "{text}");
        assert!(text.contains("alice"), "{text}");
        assert!(text.contains("redacted"), "{text}");
    }
}
