//! MQTT 5 properties (section 2.2.2, table 2-4): which packet may carry which property,
//! which may repeat, and which values are refused, each with its exact error and reason code.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod codec_common;

use codec_common::*;
use shardmq::protocol::{property_id as id, DecodeError, Packet};

use DecodeError as E;

const MALFORMED: u8 = 0x81;
const PROTOCOL: u8 = 0x82;
const ALIAS_INVALID: u8 = 0x94;

/// Every property identifier of table 2-4 with a valid value of its type.
fn sample(pid: u8) -> Vec<u8> {
    let value: Vec<u8> = match pid {
        // Byte
        id::PAYLOAD_FORMAT_INDICATOR
        | id::REQUEST_PROBLEM_INFORMATION
        | id::REQUEST_RESPONSE_INFORMATION
        | id::MAXIMUM_QOS
        | id::RETAIN_AVAILABLE
        | id::WILDCARD_SUBSCRIPTION_AVAILABLE
        | id::SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | id::SHARED_SUBSCRIPTION_AVAILABLE => vec![0x01],
        // Two Byte Integer
        id::SERVER_KEEP_ALIVE | id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM | id::TOPIC_ALIAS => {
            vec![0x00, 0x07]
        }
        // Four Byte Integer
        id::MESSAGE_EXPIRY_INTERVAL
        | id::SESSION_EXPIRY_INTERVAL
        | id::WILL_DELAY_INTERVAL
        | id::MAXIMUM_PACKET_SIZE => vec![0x00, 0x00, 0x01, 0x00],
        // Variable Byte Integer
        id::SUBSCRIPTION_IDENTIFIER => vec![0x81, 0x01],
        // UTF-8 Encoded String
        id::CONTENT_TYPE
        | id::RESPONSE_TOPIC
        | id::ASSIGNED_CLIENT_IDENTIFIER
        | id::AUTHENTICATION_METHOD
        | id::RESPONSE_INFORMATION
        | id::SERVER_REFERENCE
        | id::REASON_STRING => lp(b"x/y"),
        // Binary Data
        id::CORRELATION_DATA | id::AUTHENTICATION_DATA => lp(&[0xDE, 0xAD]),
        // UTF-8 String Pair
        id::USER_PROPERTY => cat(&[&lp(b"k"), &lp(b"v")]),
        other => panic!("no such property {other:#04x}"),
    };
    cat(&[&[pid], &value])
}

const ALL_IDS: [u8; 27] = [
    0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C,
    0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A,
];

/// One place a property block can be, with the identifiers table 2-4 allows there.
struct Site {
    name: &'static str,
    allowed: &'static [u8],
    /// The whole packet around a property block with this content.
    build: fn(&[u8]) -> Vec<u8>,
    /// The identifiers that may appear more than once.
    repeatable: &'static [u8],
}

fn connect_with(p: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[
            &lp(b"MQTT"),
            &[0x05, 0x02, 0x00, 0x3C],
            &props(p),
            &lp(b"c"),
        ]),
    )
}

fn will_with(p: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[
            &lp(b"MQTT"),
            &[0x05, 0x06, 0x00, 0x3C, 0x00],
            &lp(b"c"),
            &props(p),
            &lp(b"w/t"),
            &lp(b"bye"),
        ]),
    )
}

fn connack_with(p: &[u8]) -> Vec<u8> {
    frame(0x20, &cat(&[&[0x00, 0x00], &props(p)]))
}

fn publish_with(p: &[u8]) -> Vec<u8> {
    frame(
        0x32,
        &cat(&[&lp(b"a/b"), &[0x00, 0x0A], &props(p), b"payload"]),
    )
}

fn puback_with(p: &[u8]) -> Vec<u8> {
    frame(0x40, &cat(&[&[0x00, 0x0A, 0x00], &props(p)]))
}

fn pubrec_with(p: &[u8]) -> Vec<u8> {
    frame(0x50, &cat(&[&[0x00, 0x0A, 0x00], &props(p)]))
}

fn pubrel_with(p: &[u8]) -> Vec<u8> {
    frame(0x62, &cat(&[&[0x00, 0x0A, 0x00], &props(p)]))
}

fn pubcomp_with(p: &[u8]) -> Vec<u8> {
    frame(0x70, &cat(&[&[0x00, 0x0A, 0x00], &props(p)]))
}

fn subscribe_with(p: &[u8]) -> Vec<u8> {
    frame(
        0x82,
        &cat(&[&[0x00, 0x0A], &props(p), &lp(b"a/+"), &[0x01]]),
    )
}

fn suback_with(p: &[u8]) -> Vec<u8> {
    frame(0x90, &cat(&[&[0x00, 0x0A], &props(p), &[0x01]]))
}

fn unsubscribe_with(p: &[u8]) -> Vec<u8> {
    frame(0xA2, &cat(&[&[0x00, 0x0A], &props(p), &lp(b"a/+")]))
}

fn unsuback_with(p: &[u8]) -> Vec<u8> {
    frame(0xB0, &cat(&[&[0x00, 0x0A], &props(p), &[0x00]]))
}

fn disconnect_with(p: &[u8]) -> Vec<u8> {
    frame(0xE0, &cat(&[&[0x00], &props(p)]))
}

fn auth_with(p: &[u8]) -> Vec<u8> {
    frame(0xF0, &cat(&[&[0x18], &props(p)]))
}

const ACK: &[u8] = &[0x1F, 0x26];
const USER: &[u8] = &[0x26];

fn sites() -> Vec<Site> {
    vec![
        Site {
            name: "CONNECT",
            allowed: &[0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16],
            build: connect_with,
            repeatable: USER,
        },
        Site {
            name: "will properties",
            allowed: &[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26],
            build: will_with,
            repeatable: USER,
        },
        Site {
            name: "CONNACK",
            allowed: &[
                0x11, 0x21, 0x24, 0x25, 0x27, 0x12, 0x22, 0x1F, 0x26, 0x28, 0x29, 0x2A, 0x13, 0x1A,
                0x1C, 0x15, 0x16,
            ],
            build: connack_with,
            repeatable: USER,
        },
        Site {
            name: "PUBLISH",
            allowed: &[0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x0B, 0x03],
            build: publish_with,
            repeatable: &[0x26, 0x0B],
        },
        Site {
            name: "PUBACK",
            allowed: ACK,
            build: puback_with,
            repeatable: USER,
        },
        Site {
            name: "PUBREC",
            allowed: ACK,
            build: pubrec_with,
            repeatable: USER,
        },
        Site {
            name: "PUBREL",
            allowed: ACK,
            build: pubrel_with,
            repeatable: USER,
        },
        Site {
            name: "PUBCOMP",
            allowed: ACK,
            build: pubcomp_with,
            repeatable: USER,
        },
        Site {
            name: "SUBSCRIBE",
            allowed: &[0x0B, 0x26],
            build: subscribe_with,
            repeatable: USER,
        },
        Site {
            name: "SUBACK",
            allowed: ACK,
            build: suback_with,
            repeatable: USER,
        },
        Site {
            name: "UNSUBSCRIBE",
            allowed: USER,
            build: unsubscribe_with,
            repeatable: USER,
        },
        Site {
            name: "UNSUBACK",
            allowed: ACK,
            build: unsuback_with,
            repeatable: USER,
        },
        Site {
            name: "DISCONNECT",
            allowed: &[0x11, 0x1F, 0x26, 0x1C],
            build: disconnect_with,
            repeatable: USER,
        },
        Site {
            name: "AUTH",
            allowed: &[0x15, 0x16, 0x1F, 0x26],
            build: auth_with,
            repeatable: USER,
        },
    ]
}

/// CONNECT's Authentication Data needs an Authentication Method (3.1.2.11.10), and every
/// AUTH but the short form carries one (3.15.2.2.2).
fn with_prerequisites(site: &Site, content: Vec<u8>) -> Vec<u8> {
    let needs_method = match site.name {
        "CONNECT" => content.first() == Some(&id::AUTHENTICATION_DATA),
        "AUTH" => content.first() != Some(&id::AUTHENTICATION_METHOD),
        _ => false,
    };
    if needs_method {
        cat(&[&sample(id::AUTHENTICATION_METHOD), &content])
    } else {
        content
    }
}

#[test]
fn every_property_in_every_packet() {
    // 2.2.2.2: an identifier not valid for the packet type is a Malformed Packet.
    for site in sites() {
        for pid in ALL_IDS {
            let bytes = (site.build)(&with_prerequisites(&site, sample(pid)));
            if site.allowed.contains(&pid) {
                let (r, rest) = decode_all(Some(V5), &bytes);
                assert!(
                    matches!(r, Ok(Some(_))),
                    "{} with {pid:#04x}: {r:?}",
                    site.name
                );
                assert!(rest.is_empty());
            } else {
                assert_error(
                    Some(V5),
                    &bytes,
                    E::PropertyNotAllowed {
                        id: pid,
                        packet: site.name,
                    },
                    MALFORMED,
                );
            }
        }
    }
}

#[test]
fn topic_alias_in_connect_is_malformed() {
    assert_error(
        Some(V5),
        &connect_with(&[0x23, 0x00, 0x01]),
        E::PropertyNotAllowed {
            id: 0x23,
            packet: "CONNECT",
        },
        MALFORMED,
    );
    assert_error(
        None,
        &connect_with(&[0x23, 0x00, 0x01]),
        E::PropertyNotAllowed {
            id: 0x23,
            packet: "CONNECT",
        },
        MALFORMED,
    );
}

#[test]
fn unknown_property_identifiers() {
    let unknown: Vec<u8> = (0u8..=0x7F).filter(|p| !ALL_IDS.contains(p)).collect();
    assert_eq!(unknown.len(), 128 - 27);
    for site in sites() {
        for &pid in &unknown {
            // The identifier alone, and followed by a byte that could be a value.
            for content in [vec![pid], vec![pid, 0x00, 0x00]] {
                assert_error(
                    Some(V5),
                    &(site.build)(&content),
                    E::PropertyNotAllowed {
                        id: pid,
                        packet: site.name,
                    },
                    MALFORMED,
                );
            }
        }
        // A two-byte identifier (128): no such property exists.
        let (r, _) = decode_all(Some(V5), &(site.build)(&[0x80, 0x01, 0x00]));
        match r {
            Err(e @ E::PropertyNotAllowed { packet, .. }) => {
                assert_eq!(packet, site.name);
                assert_eq!(e.reason_code().as_u8(), MALFORMED);
            }
            other => panic!("{}: {other:?}", site.name),
        }
    }
}

#[test]
fn duplicate_properties_are_a_protocol_error() {
    // "It is a Protocol Error to include the <property> more than once" (3.x.2.x), for every
    // property but User Property and PUBLISH's Subscription Identifier.
    for site in sites() {
        for &pid in site.allowed {
            let content = with_prerequisites(&site, cat(&[&sample(pid), &sample(pid)]));
            let bytes = (site.build)(&content);
            if site.repeatable.contains(&pid) {
                let (r, rest) = decode_all(Some(V5), &bytes);
                assert!(
                    matches!(r, Ok(Some(_))),
                    "{} with {pid:#04x} twice: {r:?}",
                    site.name
                );
                assert!(rest.is_empty());
            } else {
                assert_error(Some(V5), &bytes, E::DuplicateProperty(pid), PROTOCOL);
            }
        }
    }
}

#[test]
fn duplicates_are_caught_when_not_adjacent() {
    let content = cat(&[
        &sample(id::SESSION_EXPIRY_INTERVAL),
        &sample(id::USER_PROPERTY),
        &sample(id::RECEIVE_MAXIMUM),
        &sample(id::SESSION_EXPIRY_INTERVAL),
    ]);
    assert_error(
        Some(V5),
        &connect_with(&content),
        E::DuplicateProperty(0x11),
        PROTOCOL,
    );
}

#[test]
fn user_properties_repeat_in_order() {
    // 3.1.2.11.8 and others: "The User Property is allowed to appear multiple times to
    // represent multiple name, value pairs. The same name is allowed to appear more than
    // once." MQTT-3.3.2-18: their order is kept.
    let content = cat(&[
        &[0x26],
        &lp(b"b"),
        &lp(b"1"),
        &[0x26],
        &lp(b"a"),
        &lp(b"2"),
        &[0x26],
        &lp(b"b"),
        &lp(b"3"),
    ]);
    let expected = vec![(s("b"), s("1")), (s("a"), s("2")), (s("b"), s("3"))];
    let (r, _) = decode_all(Some(V5), &publish_with(&content));
    match r {
        Ok(Some(Packet::Publish(p))) => assert_eq!(p.properties.user_properties, expected),
        other => panic!("{other:?}"),
    }
    let (r, _) = decode_all(Some(V5), &connect_with(&content));
    match r {
        Ok(Some(Packet::Connect(c))) => assert_eq!(c.properties.user_properties, expected),
        other => panic!("{other:?}"),
    }
    let (r, _) = decode_all(Some(V5), &will_with(&content));
    match r {
        Ok(Some(Packet::Connect(c))) => {
            assert_eq!(c.will.unwrap().properties.user_properties, expected)
        }
        other => panic!("{other:?}"),
    }
    let (r, _) = decode_all(Some(V5), &disconnect_with(&content));
    match r {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.properties.user_properties, expected),
        other => panic!("{other:?}"),
    }
}

#[test]
fn subscription_identifier_repeats_in_publish_only() {
    // 3.3.2.3.8: PUBLISH carries one Subscription Identifier per matching subscription.
    let content = cat(&[
        &[0x0B, 0x02],
        &[0x0B, 0x01],
        &[0x0B, 0xFF, 0xFF, 0xFF, 0x7F],
    ]);
    let (r, _) = decode_all(Some(V5), &publish_with(&content));
    match r {
        Ok(Some(Packet::Publish(p))) => {
            assert_eq!(
                p.properties.subscription_identifiers,
                vec![2, 1, 268_435_455]
            )
        }
        other => panic!("{other:?}"),
    }
    // 3.8.2.1.2: "It is a Protocol Error to include the Subscription Identifier more than
    // once" in SUBSCRIBE.
    assert_error(
        Some(V5),
        &subscribe_with(&[0x0B, 0x02, 0x0B, 0x03]),
        E::DuplicateProperty(0x0B),
        PROTOCOL,
    );
}

#[test]
fn subscription_identifier_zero() {
    // 3.3.2.3.8 / 3.8.2.1.2: "It is a Protocol Error if the Subscription Identifier has a
    // value of 0."
    assert_error(
        Some(V5),
        &publish_with(&[0x0B, 0x00]),
        E::InvalidPropertyValue(0x0B),
        PROTOCOL,
    );
    assert_error(
        Some(V5),
        &publish_with(&[0x0B, 0x05, 0x0B, 0x00]),
        E::InvalidPropertyValue(0x0B),
        PROTOCOL,
    );
    assert_error(
        Some(V5),
        &subscribe_with(&[0x0B, 0x00]),
        E::InvalidPropertyValue(0x0B),
        PROTOCOL,
    );
}

#[test]
fn receive_maximum_zero() {
    // 3.1.2.11.3 / 3.2.2.3.3: "a Protocol Error ... for it to have the value 0".
    assert_error(
        Some(V5),
        &connect_with(&[0x21, 0x00, 0x00]),
        E::InvalidPropertyValue(0x21),
        PROTOCOL,
    );
    assert_error(
        Some(V5),
        &connack_with(&[0x21, 0x00, 0x00]),
        E::InvalidPropertyValue(0x21),
        PROTOCOL,
    );
}

#[test]
fn maximum_packet_size_zero() {
    // 3.1.2.11.4 / 3.2.2.3.6: "a Protocol Error ... for the value to be set to zero".
    assert_error(
        Some(V5),
        &connect_with(&[0x27, 0, 0, 0, 0]),
        E::InvalidPropertyValue(0x27),
        PROTOCOL,
    );
    assert_error(
        Some(V5),
        &connack_with(&[0x27, 0, 0, 0, 0]),
        E::InvalidPropertyValue(0x27),
        PROTOCOL,
    );
}

#[test]
fn payload_format_indicator_other_than_0_or_1() {
    for v in [2u8, 3, 0x80, 0xFF] {
        assert_error(
            Some(V5),
            &publish_with(&[0x01, v]),
            E::InvalidPropertyValue(0x01),
            PROTOCOL,
        );
        assert_error(
            Some(V5),
            &will_with(&[0x01, v]),
            E::InvalidPropertyValue(0x01),
            PROTOCOL,
        );
    }
}

#[test]
fn topic_alias_zero() {
    // MQTT-3.3.2-8; 3.3.2.3.4: a Topic Alias of 0 is answered with 0x94 Topic Alias invalid.
    assert_error(
        Some(V5),
        &publish_with(&[0x23, 0x00, 0x00]),
        E::TopicAliasZero,
        ALIAS_INVALID,
    );
    // With an empty topic name as well.
    assert_error(
        Some(V5),
        &frame(0x30, &cat(&[&lp(b""), &props(&[0x23, 0x00, 0x00])])),
        E::TopicAliasZero,
        ALIAS_INVALID,
    );
}

#[test]
fn boolean_properties_other_than_0_or_1() {
    // "It is a Protocol Error to ... have a value other than 0 or 1" (3.1.2.11.6,
    // 3.1.2.11.7, 3.2.2.3.5, 3.2.2.3.11, 3.2.2.3.12, 3.2.2.3.13).
    for (build, pid) in [
        (connect_with as fn(&[u8]) -> Vec<u8>, 0x17u8),
        (connect_with, 0x19),
        (connack_with, 0x25),
        (connack_with, 0x28),
        (connack_with, 0x29),
        (connack_with, 0x2A),
    ] {
        for v in [2u8, 0xFF] {
            assert_error(
                Some(V5),
                &build(&[pid, v]),
                E::InvalidPropertyValue(pid),
                PROTOCOL,
            );
        }
    }
}

#[test]
fn maximum_qos_other_than_0_or_1() {
    // 3.2.2.3.4: "It is a Protocol Error to ... have a value other than 0 or 1."
    for v in [2u8, 3, 0xFF] {
        assert_error(
            Some(V5),
            &connack_with(&[0x24, v]),
            E::InvalidPropertyValue(0x24),
            PROTOCOL,
        );
    }
}

#[test]
fn response_topic_must_be_a_topic_name() {
    // MQTT-3.3.2-14 / MQTT-3.1.3-... : no wildcards; a topic name is at least one character.
    for t in [&b"a/+"[..], b"#", b""] {
        let content = cat(&[&[0x08], &lp(t)]);
        assert_error(
            Some(V5),
            &publish_with(&content),
            E::InvalidPropertyValue(0x08),
            PROTOCOL,
        );
        assert_error(
            Some(V5),
            &will_with(&content),
            E::InvalidPropertyValue(0x08),
            PROTOCOL,
        );
    }
}

#[test]
fn authentication_data_without_method_in_connect() {
    // 3.1.2.11.10: "It is a Protocol Error to include Authentication Data if there is no
    // Authentication Method."
    assert_error(
        Some(V5),
        &connect_with(&sample(id::AUTHENTICATION_DATA)),
        E::InvalidPropertyValue(0x16),
        PROTOCOL,
    );
    // The method may come after the data.
    let content = cat(&[
        &sample(id::AUTHENTICATION_DATA),
        &sample(id::AUTHENTICATION_METHOD),
    ]);
    assert!(decode_all(Some(V5), &connect_with(&content)).0.is_ok());
}

#[test]
fn property_strings_are_validated() {
    for (content, err) in [
        (cat(&[&[0x1F], &lp(&[0xC3, 0x28])]), E::InvalidUtf8),
        (cat(&[&[0x1F], &lp(b"a\0")]), E::NullCharacter),
        (
            cat(&[&[0x26], &lp(b"k"), &lp(&[0xED, 0xA0, 0x80])]),
            E::InvalidUtf8,
        ),
        (cat(&[&[0x26], &lp(b"\0"), &lp(b"v")]), E::NullCharacter),
    ] {
        for build in [
            puback_with as fn(&[u8]) -> Vec<u8>,
            connack_with,
            disconnect_with,
            auth_with,
        ] {
            assert_error(Some(V5), &build(&content), err.clone(), MALFORMED);
        }
    }
    // Binary data is not validated as text.
    let content = cat(&[&[0x09], &lp(&[0x00, 0xFF, 0xC3])]);
    assert!(decode_all(Some(V5), &publish_with(&content)).0.is_ok());
}

#[test]
fn property_values_cut_by_the_block() {
    // The block length cuts each kind of value short.
    for content in [
        vec![0x01],
        vec![0x13, 0x00],
        vec![0x11, 0x00, 0x00, 0x00],
        vec![0x0B, 0x80],
        vec![0x1F, 0x00, 0x02, b'a'],
        vec![0x09, 0x00],
        vec![0x26, 0x00, 0x01, b'k', 0x00],
    ] {
        let pid = content[0];
        let site = sites()
            .into_iter()
            .find(|s| s.allowed.contains(&pid))
            .unwrap();
        assert_error(Some(V5), &(site.build)(&content), E::Truncated, MALFORMED);
    }
}

#[test]
fn properties_are_ignored_in_3x_because_they_do_not_exist() {
    // In 3.1.1 a PUBACK is two bytes; a would-be property block is trailing garbage.
    assert_error(Some(V311), &puback_with(&[]), E::TrailingBytes, MALFORMED);
    // And in a 3.1.1 PUBLISH the "property length" is simply payload.
    let (r, _) = decode_all(Some(V311), &publish_with(&[0x26]));
    match r {
        Ok(Some(Packet::Publish(p))) => {
            assert!(p.properties.is_empty());
            assert_eq!(&p.payload[..], &cat(&[&[0x01, 0x26], b"payload"])[..]);
        }
        other => panic!("{other:?}"),
    }
}
