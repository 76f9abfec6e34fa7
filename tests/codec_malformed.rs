//! Malformed input: one test per rule of the specification, each asserting the exact
//! `DecodeError` and the MQTT 5 reason code it maps to (0x81 Malformed Packet, 0x82 Protocol
//! Error, 0x84 Unsupported Protocol Version, 0x8F Topic Filter invalid, 0x90 Topic Name
//! invalid, 0x94 Topic Alias invalid, 0x95 Packet too large).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod codec_common;

use bytes::BytesMut;
use codec_common::*;
use shardmq::protocol::{
    decode, Ack, AckProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    DecodeError, DecodeLimits, Disconnect, Packet, ProtocolVersion, Publish, ReasonCode, SubAck,
    Subscribe, SubscribeProperties, SubscriptionOptions, UnsubAck, Unsubscribe,
    UnsubscribeProperties,
};

use DecodeError as E;

const MALFORMED: u8 = 0x81;
const PROTOCOL: u8 = 0x82;
const UNSUPPORTED_VERSION: u8 = 0x84;
const FILTER_INVALID: u8 = 0x8F;
const TOPIC_INVALID: u8 = 0x90;
const ALIAS_INVALID: u8 = 0x94;
const TOO_LARGE: u8 = 0x95;

fn all_versions() -> [Option<ProtocolVersion>; 3] {
    [Some(V31), Some(V311), Some(V5)]
}

/// A CONNECT in `version` with the given flags, properties (MQTT 5) and payload.
fn connect_bytes(
    version: ProtocolVersion,
    flags: u8,
    props_content: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = cat(&[
        &lp(version.protocol_name().as_bytes()),
        &[version.level(), flags, 0x00, 0x3C],
    ]);
    if version.is_v5() {
        body.extend(props(props_content));
    }
    body.extend_from_slice(payload);
    frame(0x10, &body)
}

/// A PUBLISH to `topic_bytes` (QoS from `first`), with a property block in MQTT 5.
fn publish_bytes(
    version: ProtocolVersion,
    first: u8,
    topic_bytes: &[u8],
    id: Option<u16>,
    props_content: &[u8],
) -> Vec<u8> {
    let mut body = lp(topic_bytes);
    if let Some(id) = id {
        body.extend(id.to_be_bytes());
    }
    if version.is_v5() {
        body.extend(props(props_content));
    }
    body.extend_from_slice(b"payload");
    frame(first, &body)
}

fn subscribe_bytes(version: ProtocolVersion, entries: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if version.is_v5() {
        body.push(0x00);
    }
    for (f, o) in entries {
        body.extend(lp(f));
        body.push(*o);
    }
    frame(0x82, &body)
}

fn unsubscribe_bytes(version: ProtocolVersion, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if version.is_v5() {
        body.push(0x00);
    }
    for f in filters {
        body.extend(lp(f));
    }
    frame(0xA2, &body)
}

// ---------------------------------------------------------------------------------------
// Fixed header
// ---------------------------------------------------------------------------------------

#[test]
fn remaining_length_of_five_bytes_is_malformed() {
    // MQTT-1.5.5 / 2.2.3: at most four bytes.
    for v in all_versions() {
        assert_error(
            v,
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            E::MalformedVarInt,
            MALFORMED,
        );
        assert_error(
            v,
            &[0x30, 0x80, 0x80, 0x80, 0x80, 0x01],
            E::MalformedVarInt,
            MALFORMED,
        );
        // Known from the fourth length byte already, without waiting for a fifth.
        assert_error(
            v,
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF],
            E::MalformedVarInt,
            MALFORMED,
        );
    }
    // Before CONNECT too.
    assert_error(
        None,
        &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        E::MalformedVarInt,
        MALFORMED,
    );
}

#[test]
fn non_minimal_remaining_length_is_malformed() {
    // MQTT-1.5.5-1: the minimum number of bytes.
    for v in all_versions() {
        assert_error(v, &[0xC0, 0x80, 0x00], E::MalformedVarInt, MALFORMED);
        let mut bytes = vec![0x30, 0x87, 0x80, 0x00, 0x00, 0x01, b't'];
        bytes.extend([0; 4]);
        assert_error(v, &bytes, E::MalformedVarInt, MALFORMED);
    }
    assert_error(
        None,
        &[0x10, 0x80, 0x80, 0x00],
        E::MalformedVarInt,
        MALFORMED,
    );
}

#[test]
fn malformed_variable_byte_integers_inside_properties() {
    // Subscription Identifier of five bytes.
    assert_error(
        Some(V5),
        &[
            0x30, 0x0A, 0x00, 0x01, b't', 0x06, 0x0B, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F,
        ],
        E::MalformedVarInt,
        MALFORMED,
    );
    // Subscription Identifier 1 written in two bytes.
    assert_error(
        Some(V5),
        &[0x30, 0x07, 0x00, 0x01, b't', 0x03, 0x0B, 0x81, 0x00],
        E::MalformedVarInt,
        MALFORMED,
    );
    // Property length 0 written in two bytes.
    assert_error(
        Some(V5),
        &[0x30, 0x06, 0x00, 0x01, b't', 0x80, 0x00, b'x'],
        E::MalformedVarInt,
        MALFORMED,
    );
    // A property length of five bytes.
    assert_error(
        Some(V5),
        &[0x40, 0x08, 0x00, 0x01, 0x00, 0x80, 0x80, 0x80, 0x80, 0x01],
        E::MalformedVarInt,
        MALFORMED,
    );
    // A Subscription Identifier cut off by the end of the property block.
    assert_error(
        Some(V5),
        &[0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x0B, 0xFF],
        E::Truncated,
        MALFORMED,
    );
}

/// A valid packet of each type that has fixed flags, for `version`.
fn fixed_flag_samples(version: ProtocolVersion) -> Vec<Packet> {
    let mut v = vec![
        Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: true,
            keep_alive: 0,
            properties: ConnectProperties::default(),
            client_id: s("c"),
            will: None,
            username: None,
            password: None,
        })),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            reason_code: ReasonCode::Success,
            properties: ConnAckProperties::default(),
        })),
        Packet::PubAck(Ack::new(pid(1))),
        Packet::PubRec(Ack::new(pid(1))),
        Packet::PubRel(Ack::new(pid(1))),
        Packet::PubComp(Ack::new(pid(1))),
        Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            properties: SubscribeProperties::default(),
            filters: vec![(filter("a"), SubscriptionOptions::default())],
        }),
        Packet::SubAck(SubAck {
            packet_id: pid(1),
            properties: AckProperties::default(),
            reason_codes: vec![ReasonCode::Success],
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(1),
            properties: UnsubscribeProperties::default(),
            filters: vec![filter("a")],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(1),
            properties: AckProperties::default(),
            reason_codes: if version.is_v5() {
                vec![ReasonCode::Success]
            } else {
                vec![]
            },
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
    ];
    if version.is_v5() {
        v.push(Packet::Auth(Box::default()));
    }
    v
}

#[test]
fn reserved_fixed_header_flags_of_every_packet_type() {
    // Table 2.2 (3.1.1) / table 2-2 (5.0): the flags are 0010 for PUBREL, SUBSCRIBE and
    // UNSUBSCRIBE and 0000 for every other packet type but PUBLISH; anything else is
    // malformed (MQTT-2.2.2-2 / MQTT-2.1.3-1).
    for version in ProtocolVersion::ALL {
        for packet in fixed_flag_samples(version) {
            let ptype = packet.packet_type();
            let required = match ptype {
                6 | 8 | 10 => 0b0010,
                _ => 0,
            };
            let good = encode(&packet, version);
            assert_eq!(good[0], ptype << 4 | required);
            let (r, _) = decode_all(Some(version), &good);
            assert_eq!(r, Ok(Some(packet.clone())));
            for flags in 0u8..16 {
                if flags == required {
                    continue;
                }
                let mut bad = good.clone();
                bad[0] = ptype << 4 | flags;
                assert_error(
                    Some(version),
                    &bad,
                    E::InvalidFlags {
                        packet_type: ptype,
                        flags,
                    },
                    MALFORMED,
                );
                if ptype == 1 {
                    assert_error(
                        None,
                        &bad,
                        E::InvalidFlags {
                            packet_type: 1,
                            flags,
                        },
                        MALFORMED,
                    );
                }
            }
        }
    }
}

#[test]
fn packet_type_0_is_malformed() {
    for v in [None, Some(V31), Some(V311), Some(V5)] {
        assert_error(v, &[0x00, 0x00], E::InvalidPacketType(0), MALFORMED);
        assert_error(v, &[0x0F, 0x00], E::InvalidPacketType(0), MALFORMED);
    }
}

#[test]
fn auth_is_not_a_packet_before_mqtt_5() {
    // 3.1.1 table 2.1: type 15 is reserved.
    for v in V3X {
        assert_error(Some(v), &[0xF0, 0x00], E::InvalidPacketType(15), MALFORMED);
        assert_error(
            Some(v),
            &[0xF0, 0x01, 0x18],
            E::InvalidPacketType(15),
            MALFORMED,
        );
    }
}

#[test]
fn publish_qos_3_is_malformed() {
    // MQTT-3.3.1-4.
    for v in all_versions() {
        let vv = v.unwrap();
        for first in [0x36, 0x37, 0x3E, 0x3F] {
            let bytes = publish_bytes(vv, first, b"a/b", Some(10), &[]);
            assert_error(v, &bytes, E::InvalidQoS(3), MALFORMED);
        }
    }
}

#[test]
fn publish_dup_with_qos_0() {
    // MQTT-3.3.1-2 (3.1.1 and 5.0): DUP must be 0 for QoS 0.
    for v in [V311, V5] {
        for first in [0x38, 0x39] {
            let bytes = publish_bytes(v, first, b"a/b", None, &[]);
            assert_error(
                Some(v),
                &bytes,
                E::InvalidFlags {
                    packet_type: 3,
                    flags: first & 0x0F,
                },
                MALFORMED,
            );
        }
    }
    // MQTT 3.1 did not forbid it.
    let bytes = publish_bytes(V31, 0x38, b"a/b", None, &[]);
    let (r, _) = decode_all(Some(V31), &bytes);
    assert!(matches!(
        r,
        Ok(Some(Packet::Publish(Publish { dup: true, .. })))
    ));
}

#[test]
fn connack_reserved_acknowledge_flags() {
    // MQTT-3.2.2-1: bits 7-1 of the acknowledge flags are reserved.
    for v in ProtocolVersion::ALL {
        for flags in [0x02, 0x80, 0xFE, 0xFF] {
            let mut bytes = vec![0x20, 0x02, flags, 0x00];
            if v.is_v5() {
                bytes[1] = 3;
                bytes.push(0);
            }
            assert_error(
                Some(v),
                &bytes,
                E::InvalidFlags {
                    packet_type: 2,
                    flags,
                },
                MALFORMED,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Strings, topic names and topic filters
// ---------------------------------------------------------------------------------------

#[test]
fn ill_formed_utf8_is_malformed() {
    // MQTT-1.5.4-1 (5.0) / MQTT-1.5.3-1 (3.1.1): well-formed UTF-8, no surrogates.
    let bad: [&[u8]; 6] = [
        &[0xC3, 0x28],             // invalid continuation
        &[0xC0, 0xAF],             // overlong '/'
        &[0xED, 0xA0, 0x80],       // U+D800
        &[0xE2, 0x82],             // truncated sequence
        &[0xFF],                   // never valid
        &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
    ];
    for v in ProtocolVersion::ALL {
        for s in bad {
            // Topic name.
            let bytes = publish_bytes(v, 0x30, s, None, &[]);
            assert_error(Some(v), &bytes, E::InvalidUtf8, MALFORMED);
            // Topic filter.
            assert_error(
                Some(v),
                &subscribe_bytes(v, &[(s, 0)]),
                E::InvalidUtf8,
                MALFORMED,
            );
            assert_error(
                Some(v),
                &unsubscribe_bytes(v, &[s]),
                E::InvalidUtf8,
                MALFORMED,
            );
            // Client identifier and user name.
            let bytes = connect_bytes(v, 0x02, &[], &lp(s));
            assert_error(Some(v), &bytes, E::InvalidUtf8, MALFORMED);
            let bytes = connect_bytes(v, 0x82, &[], &cat(&[&lp(b"c"), &lp(s)]));
            assert_error(None, &bytes, E::InvalidUtf8, MALFORMED);
        }
    }
    // A property string (reason string) and a user property name.
    assert_error(
        Some(V5),
        &frame(
            0x40,
            &cat(&[
                &[0x00, 0x01, 0x00],
                &props(&cat(&[&[0x1F], &lp(&[0xC3, 0x28])])),
            ]),
        ),
        E::InvalidUtf8,
        MALFORMED,
    );
    assert_error(
        Some(V5),
        &frame(
            0x40,
            &cat(&[
                &[0x00, 0x01, 0x00],
                &props(&cat(&[&[0x26], &lp(&[0xFF]), &lp(b"v")])),
            ]),
        ),
        E::InvalidUtf8,
        MALFORMED,
    );
}

#[test]
fn null_character_in_strings_is_malformed() {
    // MQTT-1.5.4-2 (5.0) / MQTT-1.5.3-2 (3.1.1) and MQTT-4.7.3-2.
    for v in ProtocolVersion::ALL {
        let bytes = publish_bytes(v, 0x30, b"a\0b", None, &[]);
        assert_error(Some(v), &bytes, E::NullCharacter, MALFORMED);
        assert_error(
            Some(v),
            &subscribe_bytes(v, &[(b"a/\0", 0)]),
            E::NullCharacter,
            MALFORMED,
        );
        assert_error(
            Some(v),
            &unsubscribe_bytes(v, &[b"\0"]),
            E::NullCharacter,
            MALFORMED,
        );
        assert_error(
            None,
            &connect_bytes(v, 0x02, &[], &lp(b"c\0")),
            E::NullCharacter,
            MALFORMED,
        );
    }
    assert_error(
        Some(V5),
        &frame(
            0xE0,
            &cat(&[&[0x80], &props(&cat(&[&[0x26], &lp(b"k"), &lp(b"v\0")]))]),
        ),
        E::NullCharacter,
        MALFORMED,
    );
}

#[test]
fn topic_name_with_wildcards() {
    // MQTT-3.3.2-2 / MQTT-4.7.0-1: no wildcard characters in a topic name.
    for v in ProtocolVersion::ALL {
        for t in [&b"a/+"[..], b"a/#", b"#", b"+", b"a+b", b"sport/tennis#"] {
            for (first, id) in [(0x30, None), (0x32, Some(1))] {
                let bytes = publish_bytes(v, first, t, id, &[]);
                assert_error(Some(v), &bytes, E::TopicNameInvalid, TOPIC_INVALID);
            }
            // The will topic too.
            let mut payload = lp(b"c");
            if v.is_v5() {
                payload.push(0);
            }
            payload.extend(cat(&[&lp(t), &lp(b"bye")]));
            assert_error(
                None,
                &connect_bytes(v, 0x06, &[], &payload),
                E::TopicNameInvalid,
                TOPIC_INVALID,
            );
        }
    }
}

#[test]
fn empty_topic_name_without_alias() {
    // MQTT-4.7.3-1; in MQTT 5 only a Topic Alias may stand in (3.3.2.1).
    for v in ProtocolVersion::ALL {
        let bytes = publish_bytes(v, 0x30, b"", None, &[]);
        assert_error(Some(v), &bytes, E::TopicNameInvalid, TOPIC_INVALID);
        let bytes = publish_bytes(v, 0x32, b"", Some(3), &[]);
        assert_error(Some(v), &bytes, E::TopicNameInvalid, TOPIC_INVALID);
        // An empty will topic.
        let mut payload = lp(b"c");
        if v.is_v5() {
            payload.push(0);
        }
        payload.extend(cat(&[&lp(b""), &lp(b"bye")]));
        assert_error(
            None,
            &connect_bytes(v, 0x06, &[], &payload),
            E::TopicNameInvalid,
            TOPIC_INVALID,
        );
    }
    // Other properties, but no alias.
    let bytes = publish_bytes(V5, 0x30, b"", None, &[0x01, 0x01, 0x02, 0, 0, 0, 9]);
    assert_error(Some(V5), &bytes, E::TopicNameInvalid, TOPIC_INVALID);
}

#[test]
fn invalid_topic_filters() {
    // Section 4.7.1: '#' last and alone in its level, '+' alone in its level; 4.7.3: not empty.
    for v in ProtocolVersion::ALL {
        for f in [
            &b"a/#/b"[..],
            b"a#",
            b"+a",
            b"",
            b"#/a",
            b"a/b+",
            b"a/+b/c",
            b"##",
            b"++",
        ] {
            assert_error(
                Some(v),
                &subscribe_bytes(v, &[(f, 1)]),
                E::TopicFilterInvalid,
                FILTER_INVALID,
            );
            assert_error(
                Some(v),
                &unsubscribe_bytes(v, &[f]),
                E::TopicFilterInvalid,
                FILTER_INVALID,
            );
            // After a valid one.
            assert_error(
                Some(v),
                &subscribe_bytes(v, &[(b"ok/+", 1), (f, 1)]),
                E::TopicFilterInvalid,
                FILTER_INVALID,
            );
            assert_error(
                Some(v),
                &unsubscribe_bytes(v, &[b"ok", f]),
                E::TopicFilterInvalid,
                FILTER_INVALID,
            );
        }
    }
}

#[test]
fn invalid_shared_subscription_syntax() {
    // MQTT 5 section 4.8.2: "$share/" ShareName "/" TopicFilter, the ShareName at least one
    // character without "/", "+" or "#" (MQTT-4.8.2-1, MQTT-4.8.2-2).
    for f in [
        &b"$share/"[..],
        b"$share/g",
        b"$share//a",
        b"$share/g+/a",
        b"$share/g#/a",
        b"$share/#/a",
        b"$share/+/a",
        b"$share/g/",
        b"$share/g/a/#/b",
    ] {
        assert_error(
            Some(V5),
            &subscribe_bytes(V5, &[(f, 1)]),
            E::TopicFilterInvalid,
            FILTER_INVALID,
        );
        assert_error(
            Some(V5),
            &unsubscribe_bytes(V5, &[f]),
            E::TopicFilterInvalid,
            FILTER_INVALID,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Packet identifiers
// ---------------------------------------------------------------------------------------

#[test]
fn packet_identifier_zero() {
    // MQTT-2.2.1-3 (both versions): a non-zero packet identifier.
    for v in ProtocolVersion::ALL {
        for first in [0x32, 0x34] {
            let bytes = publish_bytes(v, first, b"a/b", Some(0), &[]);
            assert_error(Some(v), &bytes, E::PacketIdZero, PROTOCOL);
        }
        let mut bytes = subscribe_bytes(v, &[(b"a", 0)]);
        bytes[2..4].copy_from_slice(&[0, 0]);
        assert_error(Some(v), &bytes, E::PacketIdZero, PROTOCOL);
        let mut bytes = unsubscribe_bytes(v, &[b"a"]);
        bytes[2..4].copy_from_slice(&[0, 0]);
        assert_error(Some(v), &bytes, E::PacketIdZero, PROTOCOL);
        for first in [0x40, 0x50, 0x62, 0x70, 0xB0] {
            assert_error(
                Some(v),
                &[first, 0x02, 0x00, 0x00],
                E::PacketIdZero,
                PROTOCOL,
            );
        }
        let suback: &[u8] = if v.is_v5() {
            &[0x90, 0x04, 0, 0, 0, 0]
        } else {
            &[0x90, 0x03, 0, 0, 0]
        };
        assert_error(Some(v), suback, E::PacketIdZero, PROTOCOL);
    }
    assert_error(
        Some(V5),
        &[0x40, 0x03, 0x00, 0x00, 0x10],
        E::PacketIdZero,
        PROTOCOL,
    );
}

// ---------------------------------------------------------------------------------------
// CONNECT
// ---------------------------------------------------------------------------------------

fn minimal_connect_payload() -> Vec<u8> {
    lp(b"c")
}

#[test]
fn connect_reserved_flag() {
    // MQTT-3.1.2-3.
    for v in ProtocolVersion::ALL {
        for flags in [0x01, 0x03] {
            let bytes = connect_bytes(v, flags, &[], &minimal_connect_payload());
            assert_error(None, &bytes, E::ReservedConnectFlag, MALFORMED);
            assert_error(Some(v), &bytes, E::ReservedConnectFlag, MALFORMED);
        }
    }
}

#[test]
fn connect_will_qos_or_retain_without_will_flag() {
    // MQTT-3.1.2-11 and MQTT-3.1.2-13 (5.0) / MQTT-3.1.2-11, -15 (3.1.1).
    for v in ProtocolVersion::ALL {
        for flags in [0x0A, 0x12, 0x1A, 0x22, 0x2A] {
            let bytes = connect_bytes(v, flags, &[], &minimal_connect_payload());
            assert_error(None, &bytes, E::InvalidWillFlags, MALFORMED);
        }
    }
}

#[test]
fn connect_will_qos_3() {
    // MQTT-3.1.2-12 (5.0) / MQTT-3.1.2-14 (3.1.1): Will QoS must not be 3.
    for v in ProtocolVersion::ALL {
        let mut payload = lp(b"c");
        if v.is_v5() {
            payload.push(0);
        }
        payload.extend(cat(&[&lp(b"w"), &lp(b"bye")]));
        for flags in [0x1E, 0x3E] {
            let bytes = connect_bytes(v, flags, &[], &payload);
            assert_error(None, &bytes, E::InvalidWillFlags, MALFORMED);
        }
        // The same payload with Will QoS 2 is fine.
        let bytes = connect_bytes(v, 0x16, &[], &payload);
        assert!(decode_all(None, &bytes).0.unwrap().is_some());
    }
}

#[test]
fn connect_password_without_user_name() {
    // MQTT-3.1.2-22 (3.1.1); MQTT 5 dropped the rule (3.1.2.9).
    let payload = cat(&[&lp(b"c"), &lp(b"pw")]);
    for v in V3X {
        let bytes = connect_bytes(v, 0x42, &[], &payload);
        assert_error(None, &bytes, E::PasswordWithoutUsername, MALFORMED);
    }
    let bytes = connect_bytes(V5, 0x42, &[], &payload);
    let (r, _) = decode_all(None, &bytes);
    match r {
        Ok(Some(Packet::Connect(c))) => {
            assert_eq!(c.username, None);
            assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn connect_wrong_protocol_name() {
    // 3.1.2.1: "MQTT" (or "MQIsdp" for 3.1); MQTT 5 answers 0x84 (MQTT-3.1.2-1).
    for name in [
        &b"MQTX"[..],
        b"mqtt",
        b"MQT",
        b"MQTTT",
        b"",
        b"MQIsdP",
        b"HTTP/1.1",
    ] {
        let bytes = frame(
            0x10,
            &cat(&[&lp(name), &[0x04, 0x02, 0x00, 0x3C], &lp(b"c")]),
        );
        assert_error(None, &bytes, E::InvalidProtocolName, UNSUPPORTED_VERSION);
    }
}

#[test]
fn connect_unsupported_protocol_level() {
    // 3.1.2.2: MQTT-3.1.2-2 (3.1.1: return code 0x01) / 0x84 in MQTT 5.
    for (name, level) in [
        (&b"MQTT"[..], 6u8),
        (b"MQTT", 0),
        (b"MQTT", 255),
        (b"MQTT", 3), // level 3 is MQTT 3.1, named "MQIsdp"
        (b"MQIsdp", 4),
        (b"MQIsdp", 5),
        (b"MQIsdp", 2),
    ] {
        let bytes = frame(
            0x10,
            &cat(&[&lp(name), &[level, 0x02, 0x00, 0x3C, 0x00], &lp(b"c")]),
        );
        assert_error(
            None,
            &bytes,
            E::UnsupportedProtocolVersion(level),
            UNSUPPORTED_VERSION,
        );
    }
}

#[test]
fn connect_truncated_fields() {
    // Cut inside the protocol name, before the level, before the flags, inside keep alive.
    for cut in [0usize, 1, 3, 6, 7, 8, 9] {
        let body = &cat(&[&lp(b"MQTT"), &[0x04, 0x02, 0x00, 0x3C]])[..cut];
        assert_error(None, &frame(0x10, body), E::Truncated, MALFORMED);
    }
    // A client identifier longer than the packet.
    let bytes = frame(
        0x10,
        &cat(&[&lp(b"MQTT"), &[0x04, 0x02, 0x00, 0x3C, 0x00, 0x05], b"abc"]),
    );
    assert_error(None, &bytes, E::Truncated, MALFORMED);
    // Will flag set but no will fields; user name flag but no user name; password flag but
    // no password.
    for (flags, payload) in [
        (0x06u8, lp(b"c")),
        (0x06, cat(&[&lp(b"c"), &lp(b"w")])),
        (0x82, lp(b"c")),
        (0xC2, cat(&[&lp(b"c"), &lp(b"u")])),
    ] {
        let bytes = connect_bytes(V311, flags, &[], &payload);
        assert_error(None, &bytes, E::Truncated, MALFORMED);
    }
    // MQTT 5: the property length is missing; the will property block is missing.
    let bytes = frame(0x10, &cat(&[&lp(b"MQTT"), &[0x05, 0x02, 0x00, 0x3C]]));
    assert_error(None, &bytes, E::Truncated, MALFORMED);
    let bytes = connect_bytes(V5, 0x06, &[], &lp(b"c"));
    assert_error(None, &bytes, E::Truncated, MALFORMED);
    // A property block longer than the packet.
    let bytes = frame(
        0x10,
        &cat(&[&lp(b"MQTT"), &[0x05, 0x02, 0x00, 0x3C, 0x09, 0x11, 0, 0]]),
    );
    assert_error(None, &bytes, E::Truncated, MALFORMED);
}

#[test]
fn connect_trailing_bytes() {
    for v in ProtocolVersion::ALL {
        let bytes = connect_bytes(v, 0x02, &[], &cat(&[&lp(b"c"), &[0x00]]));
        assert_error(None, &bytes, E::TrailingBytes, MALFORMED);
        // Fields the flags do not announce.
        let bytes = connect_bytes(v, 0x02, &[], &cat(&[&lp(b"c"), &lp(b"user")]));
        assert_error(None, &bytes, E::TrailingBytes, MALFORMED);
    }
}

#[test]
fn first_packet_must_be_connect() {
    // MQTT-3.1.0-1: before CONNECT, the version is unknown and nothing else decodes.
    let samples: [&[u8]; 14] = [
        &[0x20, 0x02, 0x00, 0x00],
        &[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'b'],
        &[0x40, 0x02, 0x00, 0x01],
        &[0x50, 0x02, 0x00, 0x01],
        &[0x62, 0x02, 0x00, 0x01],
        &[0x70, 0x02, 0x00, 0x01],
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        &[0x90, 0x03, 0x00, 0x01, 0x00],
        &[0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
        &[0xB0, 0x02, 0x00, 0x01],
        &[0xC0, 0x00],
        &[0xD0, 0x00],
        &[0xE0, 0x00],
        &[0xF0, 0x00],
    ];
    for bytes in samples {
        assert_error(None, bytes, E::ExpectedConnect, PROTOCOL);
        // Decided from the first byte alone.
        assert_error(None, &bytes[..1], E::ExpectedConnect, PROTOCOL);
    }
}

// ---------------------------------------------------------------------------------------
// SUBSCRIBE / UNSUBSCRIBE
// ---------------------------------------------------------------------------------------

#[test]
fn subscription_options_reserved_bits_v5() {
    // MQTT-3.8.3-5: bits 7 and 6 are reserved; malformed.
    for o in [0x40, 0x80, 0xC0, 0x41, 0x6D] {
        assert_error(
            Some(V5),
            &subscribe_bytes(V5, &[(b"a", o)]),
            E::InvalidSubscriptionOptions(o),
            MALFORMED,
        );
    }
}

#[test]
fn subscription_options_retain_handling_3_v5() {
    // 3.8.3.1: "It is a Protocol Error to send a Retain Handling value of 3."
    for o in [0x30, 0x31, 0x3E] {
        assert_error(
            Some(V5),
            &subscribe_bytes(V5, &[(b"a", o)]),
            E::InvalidSubscriptionOptionValue(o),
            PROTOCOL,
        );
    }
}

#[test]
fn subscription_options_maximum_qos_3_v5() {
    // 3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the value 3."
    for o in [0x03, 0x0F, 0x23] {
        assert_error(
            Some(V5),
            &subscribe_bytes(V5, &[(b"a", o)]),
            E::InvalidSubscriptionOptionValue(o),
            PROTOCOL,
        );
    }
}

#[test]
fn subscription_options_v3() {
    // MQTT-3-8.3-4 (3.1.1): reserved bits set or QoS 3 is malformed.
    for v in V3X {
        for o in [0x04, 0x08, 0x10, 0x20, 0x30, 0x40, 0x80, 0xFC] {
            assert_error(
                Some(v),
                &subscribe_bytes(v, &[(b"a", o)]),
                E::InvalidSubscriptionOptions(o),
                MALFORMED,
            );
        }
        assert_error(
            Some(v),
            &subscribe_bytes(v, &[(b"a", 0x03)]),
            E::InvalidQoS(3),
            MALFORMED,
        );
    }
}

#[test]
fn no_local_on_shared_subscription() {
    // MQTT-3.8.3-4 (5.0).
    for o in [0x04, 0x05, 0x2E] {
        assert_error(
            Some(V5),
            &subscribe_bytes(V5, &[(b"$share/g/a", o)]),
            E::NoLocalOnSharedSubscription,
            PROTOCOL,
        );
    }
    // Without No Local it is fine, and No Local on a non-shared filter is fine.
    assert!(
        decode_all(Some(V5), &subscribe_bytes(V5, &[(b"$share/g/a", 0x2A)]))
            .0
            .is_ok()
    );
    assert!(
        decode_all(Some(V5), &subscribe_bytes(V5, &[(b"$sharex/g/a", 0x04)]))
            .0
            .is_ok()
    );
}

#[test]
fn subscribe_and_unsubscribe_without_filters() {
    // MQTT-3.8.3-3 / MQTT-3.10.3-2 (3.1.1), MQTT-3.8.3-2 / MQTT-3.10.3-2 (5.0): a Protocol
    // Error.
    for v in ProtocolVersion::ALL {
        assert_error(
            Some(v),
            &subscribe_bytes(v, &[]),
            E::NoTopicFilters,
            PROTOCOL,
        );
        assert_error(
            Some(v),
            &unsubscribe_bytes(v, &[]),
            E::NoTopicFilters,
            PROTOCOL,
        );
    }
    // With properties but no payload.
    assert_error(
        Some(V5),
        &[0x82, 0x05, 0x00, 0x01, 0x02, 0x0B, 0x01],
        E::NoTopicFilters,
        PROTOCOL,
    );
    assert_error(
        Some(V5),
        &frame(
            0xA2,
            &cat(&[
                &[0x00, 0x01],
                &props(&cat(&[&[0x26], &lp(b"k"), &lp(b"v")])),
            ]),
        ),
        E::NoTopicFilters,
        PROTOCOL,
    );
}

#[test]
fn subscribe_truncated_entries() {
    for v in ProtocolVersion::ALL {
        // A filter without its options byte.
        let mut bytes = subscribe_bytes(v, &[(b"a/b", 1)]);
        bytes.pop();
        bytes[1] -= 1;
        assert_error(Some(v), &bytes, E::Truncated, MALFORMED);
        // A filter whose length runs past the packet.
        let mut bytes = unsubscribe_bytes(v, &[b"a/b"]);
        bytes.pop();
        bytes[1] -= 1;
        assert_error(Some(v), &bytes, E::Truncated, MALFORMED);
        // One stray byte after the last filter.
        let mut bytes = unsubscribe_bytes(v, &[b"a/b"]);
        bytes.push(0x00);
        bytes[1] += 1;
        assert_error(Some(v), &bytes, E::Truncated, MALFORMED);
    }
    // MQTT 5: no property length.
    assert_error(Some(V5), &[0x82, 0x02, 0x00, 0x01], E::Truncated, MALFORMED);
    assert_error(Some(V5), &[0xA2, 0x02, 0x00, 0x01], E::Truncated, MALFORMED);
}

// ---------------------------------------------------------------------------------------
// Truncation and trailing bytes in the other packets
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_fields() {
    for v in ProtocolVersion::ALL {
        let vv = Some(v);
        // PUBLISH: topic length past the packet; QoS 1 without its packet identifier.
        assert_error(vv, &[0x30, 0x03, 0x00, 0x05, b'a'], E::Truncated, MALFORMED);
        assert_error(vv, &[0x30, 0x01, 0x00], E::Truncated, MALFORMED);
        assert_error(vv, &[0x30, 0x00], E::Truncated, MALFORMED);
        assert_error(
            vv,
            &[0x32, 0x05, 0x00, 0x03, b'a', b'/', b'b'],
            E::Truncated,
            MALFORMED,
        );
        assert_error(
            vv,
            &[0x32, 0x06, 0x00, 0x03, b'a', b'/', b'b', 0x00],
            E::Truncated,
            MALFORMED,
        );
        // Acknowledgements shorter than a packet identifier.
        for first in [0x40, 0x50, 0x62, 0x70, 0x90, 0xB0, 0x82, 0xA2] {
            assert_error(vv, &[first, 0x00], E::Truncated, MALFORMED);
            assert_error(vv, &[first, 0x01, 0x00], E::Truncated, MALFORMED);
        }
        // CONNACK shorter than two bytes.
        assert_error(vv, &[0x20, 0x00], E::Truncated, MALFORMED);
        assert_error(vv, &[0x20, 0x01, 0x00], E::Truncated, MALFORMED);
    }
    // MQTT 5 PUBLISH without its property length.
    assert_error(
        Some(V5),
        &[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'b'],
        E::Truncated,
        MALFORMED,
    );
    // MQTT 5 CONNACK, SUBACK, UNSUBACK without their property length (no short form).
    assert_error(Some(V5), &[0x20, 0x02, 0x00, 0x00], E::Truncated, MALFORMED);
    assert_error(Some(V5), &[0x90, 0x02, 0x00, 0x01], E::Truncated, MALFORMED);
    assert_error(Some(V5), &[0xB0, 0x02, 0x00, 0x01], E::Truncated, MALFORMED);
    // A property block longer than the packet.
    assert_error(
        Some(V5),
        &[0x40, 0x05, 0x00, 0x0A, 0x00, 0x05, 0x1F],
        E::Truncated,
        MALFORMED,
    );
    assert_error(Some(V5), &[0xE0, 0x02, 0x00, 0x01], E::Truncated, MALFORMED);
    // A property value cut by the end of its block (reason string of 2 bytes, one present).
    assert_error(
        Some(V5),
        &[0x40, 0x08, 0x00, 0x0A, 0x00, 0x04, 0x1F, 0x00, 0x02, b'o'],
        E::Truncated,
        MALFORMED,
    );
    // A four-byte property with two bytes.
    assert_error(
        Some(V5),
        &[0xE0, 0x04, 0x00, 0x02, 0x11, 0x00],
        E::Truncated,
        MALFORMED,
    );
    // A user property without its value.
    assert_error(
        Some(V5),
        &frame(0xF0, &cat(&[&[0x18], &props(&cat(&[&[0x26], &lp(b"k")]))])),
        E::Truncated,
        MALFORMED,
    );
}

#[test]
fn trailing_bytes() {
    for v in ProtocolVersion::ALL {
        let vv = Some(v);
        assert_error(vv, &[0xC0, 0x01, 0x00], E::TrailingBytes, MALFORMED);
        assert_error(vv, &[0xD0, 0x01, 0x00], E::TrailingBytes, MALFORMED);
    }
    for v in V3X {
        let vv = Some(v);
        assert_error(
            vv,
            &[0x20, 0x03, 0x00, 0x00, 0x00],
            E::TrailingBytes,
            MALFORMED,
        );
        for first in [0x40, 0x50, 0x62, 0x70, 0xB0] {
            assert_error(
                vv,
                &[first, 0x03, 0x00, 0x0A, 0x00],
                E::TrailingBytes,
                MALFORMED,
            );
        }
        assert_error(vv, &[0xE0, 0x01, 0x00], E::TrailingBytes, MALFORMED);
    }
    let vv = Some(V5);
    assert_error(
        vv,
        &[0x20, 0x04, 0x00, 0x00, 0x00, 0x00],
        E::TrailingBytes,
        MALFORMED,
    );
    for first in [0x40, 0x50, 0x62, 0x70] {
        assert_error(
            vv,
            &[first, 0x05, 0x00, 0x0A, 0x00, 0x00, 0x00],
            E::TrailingBytes,
            MALFORMED,
        );
    }
    assert_error(
        vv,
        &[0xE0, 0x03, 0x00, 0x00, 0x00],
        E::TrailingBytes,
        MALFORMED,
    );
    assert_error(
        vv,
        &[0xF0, 0x03, 0x00, 0x00, 0x00],
        E::TrailingBytes,
        MALFORMED,
    );
}

// ---------------------------------------------------------------------------------------
// Reason codes: each packet accepts exactly the codes of its table
// ---------------------------------------------------------------------------------------

/// The tables of the MQTT 5 specification.
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
]; // table 3-1
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]; // 3-4, 3-5
const PUBREL_CODES: &[u8] = &[0x00, 0x92]; // tables 3-6, 3-7
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
]; // table 3-8
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]; // table 3-9
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
]; // table 3-10
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19]; // table 3-11

#[track_caller]
fn check_codes(
    version: ProtocolVersion,
    packet: &'static str,
    allowed: &[u8],
    bytes: impl Fn(u8) -> Vec<u8>,
) {
    for code in 0..=255u8 {
        let bytes = bytes(code);
        let (r, rest) = decode_all(Some(version), &bytes);
        if allowed.contains(&code) {
            let p = r
                .unwrap_or_else(|e| panic!("{packet} {code:#04x}: {e}"))
                .unwrap();
            assert!(rest.is_empty());
            // And the decoded code is the one on the wire.
            let got = match &p {
                Packet::ConnAck(c) => c.reason_code,
                Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
                    a.reason_code
                }
                Packet::SubAck(s) => s.reason_codes[0],
                Packet::UnsubAck(u) => u.reason_codes[0],
                Packet::Disconnect(d) => d.reason_code,
                Packet::Auth(a) => a.reason_code,
                other => panic!("{other:?}"),
            };
            if version.is_v5() {
                assert_eq!(got.as_u8(), code, "{packet}");
            }
        } else {
            assert_error(
                Some(version),
                &bytes,
                E::InvalidReasonCode { code, packet },
                MALFORMED,
            );
        }
    }
}

#[test]
fn reason_codes_per_packet_v5() {
    check_codes(V5, "CONNACK", CONNACK_CODES, |c| {
        vec![0x20, 0x03, 0x00, c, 0x00]
    });
    check_codes(V5, "PUBACK", PUBACK_CODES, |c| {
        vec![0x40, 0x03, 0x00, 0x0A, c]
    });
    check_codes(V5, "PUBREC", PUBACK_CODES, |c| {
        vec![0x50, 0x03, 0x00, 0x0A, c]
    });
    check_codes(V5, "PUBREL", PUBREL_CODES, |c| {
        vec![0x62, 0x03, 0x00, 0x0A, c]
    });
    check_codes(V5, "PUBCOMP", PUBREL_CODES, |c| {
        vec![0x70, 0x03, 0x00, 0x0A, c]
    });
    check_codes(V5, "SUBACK", SUBACK_CODES, |c| {
        vec![0x90, 0x04, 0x00, 0x0A, 0x00, c]
    });
    check_codes(V5, "UNSUBACK", UNSUBACK_CODES, |c| {
        vec![0xB0, 0x04, 0x00, 0x0A, 0x00, c]
    });
    check_codes(V5, "DISCONNECT", DISCONNECT_CODES, |c| vec![0xE0, 0x01, c]);
    // AUTH carries an Authentication Method (3.15.2.2.2).
    check_codes(V5, "AUTH", AUTH_CODES, |c| {
        vec![0xF0, 0x06, c, 0x04, 0x15, 0x00, 0x01, b'm']
    });
    // With properties after the code, too.
    check_codes(V5, "PUBACK", PUBACK_CODES, |c| {
        vec![0x40, 0x04, 0x00, 0x0A, c, 0x00]
    });
    check_codes(V5, "DISCONNECT", DISCONNECT_CODES, |c| {
        vec![0xE0, 0x02, c, 0x00]
    });
    // A bad code after good ones.
    assert_error(
        Some(V5),
        &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x01, 0x11],
        E::InvalidReasonCode {
            code: 0x11,
            packet: "SUBACK",
        },
        MALFORMED,
    );
}

#[test]
fn reason_codes_per_packet_v3() {
    for v in V3X {
        // 3.1.1 table 3.1: CONNACK return codes 0-5; 6-255 are reserved.
        check_codes(v, "CONNACK", &[0, 1, 2, 3, 4, 5], |c| {
            vec![0x20, 0x02, 0x00, c]
        });
        // MQTT-3.9.3-2: SUBACK return codes 0x00, 0x01, 0x02 and 0x80 only.
        check_codes(v, "SUBACK", &[0x00, 0x01, 0x02, 0x80], |c| {
            vec![0x90, 0x03, 0x00, 0x0A, c]
        });
    }
}

// ---------------------------------------------------------------------------------------
// Packet size
// ---------------------------------------------------------------------------------------

#[test]
fn packet_too_large_from_the_fixed_header_alone() {
    // Only the first five bytes of a PUBLISH of 268,435,460 bytes: refused before the body
    // is buffered (MQTT 5 3.1.2.11.4 / 3.2.2.3.6: 0x95 Packet too large).
    for v in [None, Some(V31), Some(V311), Some(V5)] {
        let first = if v.is_none() { 0x10 } else { 0x30 };
        let bytes = [first, 0xFF, 0xFF, 0xFF, 0x7F];
        let mut buf = BytesMut::from(&bytes[..]);
        let err = decode(&mut buf, &DecodeLimits::new(1 << 20, v)).unwrap_err();
        assert_eq!(
            err,
            E::PacketTooLarge {
                size: 268_435_460,
                max: 1 << 20
            }
        );
        assert_eq!(err.reason_code().as_u8(), TOO_LARGE);
    }
    // Two bytes of a 200-byte packet against a limit of 100.
    let mut buf = BytesMut::from(&[0x30, 0xC5, 0x01][..]);
    assert_eq!(
        decode(&mut buf, &DecodeLimits::new(100, Some(V311))),
        Err(E::PacketTooLarge {
            size: 200,
            max: 100
        })
    );
}

#[test]
fn packet_size_limit_is_inclusive() {
    // The limit counts the whole packet, fixed header included.
    let bytes = publish_bytes(V311, 0x30, b"a/b", None, &[]);
    let n = bytes.len();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(decode(&mut buf, &DecodeLimits::new(n, Some(V311)))
        .unwrap()
        .is_some());
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode(&mut buf, &DecodeLimits::new(n - 1, Some(V311))),
        Err(E::PacketTooLarge {
            size: n,
            max: n - 1
        })
    );
    // Even a PINGREQ is refused under a limit of one byte.
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert_eq!(
        decode(&mut buf, &DecodeLimits::new(1, Some(V5))),
        Err(E::PacketTooLarge { size: 2, max: 1 })
    );
}

// ---------------------------------------------------------------------------------------
// Reason codes of every error variant
// ---------------------------------------------------------------------------------------

#[test]
fn reason_code_of_every_error() {
    let table: Vec<(DecodeError, u8)> = vec![
        (E::PacketTooLarge { size: 2, max: 1 }, TOO_LARGE),
        (E::MalformedVarInt, MALFORMED),
        (E::InvalidPacketType(0), MALFORMED),
        (
            E::InvalidFlags {
                packet_type: 1,
                flags: 1,
            },
            MALFORMED,
        ),
        (E::InvalidQoS(3), MALFORMED),
        (E::Truncated, MALFORMED),
        (E::TrailingBytes, MALFORMED),
        (E::InvalidUtf8, MALFORMED),
        (E::NullCharacter, MALFORMED),
        (E::StringTooLong(70_000), MALFORMED),
        (E::InvalidProtocolName, UNSUPPORTED_VERSION),
        (E::UnsupportedProtocolVersion(6), UNSUPPORTED_VERSION),
        (E::ReservedConnectFlag, MALFORMED),
        (E::InvalidWillFlags, MALFORMED),
        (E::PasswordWithoutUsername, MALFORMED),
        (E::TopicNameInvalid, TOPIC_INVALID),
        (E::TopicFilterInvalid, FILTER_INVALID),
        (E::PacketIdZero, PROTOCOL),
        (
            E::PropertyNotAllowed {
                id: 0x23,
                packet: "CONNECT",
            },
            MALFORMED,
        ),
        (E::DuplicateProperty(0x11), PROTOCOL),
        (E::InvalidPropertyValue(0x21), PROTOCOL),
        (E::TopicAliasZero, ALIAS_INVALID),
        (
            E::InvalidReasonCode {
                code: 3,
                packet: "CONNACK",
            },
            MALFORMED,
        ),
        (E::NoTopicFilters, PROTOCOL),
        (E::InvalidSubscriptionOptions(0x40), MALFORMED),
        (E::InvalidSubscriptionOptionValue(0x30), PROTOCOL),
        (E::NoLocalOnSharedSubscription, PROTOCOL),
        (E::PacketNotInVersion("AUTH"), PROTOCOL),
        (E::ExpectedConnect, PROTOCOL),
    ];
    for (err, code) in table {
        assert_eq!(err.reason_code().as_u8(), code, "{err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn errors_leave_following_packets_alone_when_the_frame_is_complete() {
    // A bad packet's bytes are consumed as a whole frame; the caller closes the connection
    // anyway, but a complete frame never eats into the next packet.
    let mut buf = BytesMut::from(&[0xC0, 0x01, 0x00, 0xD0, 0x00][..]);
    assert_eq!(decode(&mut buf, &limits(Some(V311))), Err(E::TrailingBytes));
    assert_eq!(&buf[..], &[0xD0, 0x00]);
    // An empty buffer asks for more.
    let mut buf = BytesMut::new();
    assert_eq!(decode(&mut buf, &limits(None)), Ok(None));
}

// ---------------------------------------------------------------------------------------
// AUTH
// ---------------------------------------------------------------------------------------

#[test]
fn auth_without_authentication_method() {
    // MQTT 5 3.15.2.2.2: "It is a Protocol Error to omit the Authentication Method". The
    // only form without it is the short one: Success, Remaining Length 0 (3.15.2.1).
    let no_method: [&[u8]; 6] = [
        &[0xF0, 0x01, 0x18],
        &[0xF0, 0x01, 0x19],
        &[0xF0, 0x02, 0x18, 0x00],
        &[0xF0, 0x02, 0x19, 0x00],
        &[0xF0, 0x02, 0x00, 0x00],
        &[0xF0, 0x07, 0x18, 0x05, 0x16, 0x00, 0x02, 0x01, 0x02],
    ];
    for bytes in no_method {
        assert_error(Some(V5), bytes, E::InvalidPropertyValue(0x15), PROTOCOL);
    }
    // With the method, and the short form, decode.
    assert!(decode_all(Some(V5), &[0xF0, 0x00]).0.unwrap().is_some());
    let bytes = [0xF0, 0x06, 0x18, 0x04, 0x15, 0x00, 0x01, b'm'];
    assert!(decode_all(Some(V5), &bytes).0.unwrap().is_some());
}
