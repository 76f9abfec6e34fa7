//! Property tests: generated packets of every type for every version round-trip exactly;
//! a stream of packets split at every position decodes to the same packets; arbitrary and
//! mutated bytes never panic the decoder, and whatever it accepts re-encodes to itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod codec_common;

use bytes::{Bytes, BytesMut};
use codec_common::{pid, V31, V311, V5};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::strategy::Union;
use shardmq::protocol::wire::VARINT_MAX;
use shardmq::protocol::{
    decode, Ack, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect,
    ConnectProperties, DecodeLimits, Disconnect, DisconnectProperties, LastWill, MqttStr, Packet,
    ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode, RetainHandling, SubAck,
    Subscribe, SubscribeProperties, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe, UnsubscribeProperties, UserProperties, WillProperties, MAX_PACKET_SIZE_PROTOCOL,
};
use std::num::NonZeroU16;

// ---------------------------------------------------------------------------------------
// Value strategies
// ---------------------------------------------------------------------------------------

/// Characters for free text: ASCII, multi-byte UTF-8, controls other than U+0000, and the
/// wildcard characters (legal in ordinary strings).
const TEXT: &[char] = &[
    'a',
    'b',
    'z',
    'A',
    '0',
    '9',
    ' ',
    '/',
    '+',
    '#',
    '$',
    '-',
    'é',
    '€',
    '🦀',
    '\u{1}',
    '\u{7F}',
    '\u{FEFF}',
    '\u{10FFFF}',
];
/// Characters of a topic level (no '/', '+' or '#').
const LEVEL: &[char] = &['a', 'b', 'x', '0', '$', ' ', 'é', '🦀', '-', '_'];

fn text(max: usize) -> impl Strategy<Value = String> {
    vec(select(TEXT), 0..=max).prop_map(|v| v.into_iter().collect())
}

fn mqtt_str() -> BoxedStrategy<MqttStr> {
    text(6).prop_map(|s| MqttStr::new(&s).unwrap()).boxed()
}

fn level() -> impl Strategy<Value = String> {
    vec(select(LEVEL), 0..=4).prop_map(|v| v.into_iter().collect())
}

fn topic_name() -> BoxedStrategy<TopicName> {
    vec(level(), 1..=4)
        .prop_map(|levels| {
            let mut t = levels.join("/");
            if t.is_empty() {
                t.push('t');
            }
            TopicName::new(&t).unwrap()
        })
        .boxed()
}

fn filter_level() -> impl Strategy<Value = String> {
    prop_oneof![1 => Just("+".to_string()), 3 => level()]
}

/// A filter of section 4.7, and, when `shared`, possibly `$share/{group}/{filter}`.
fn topic_filter(shared: bool) -> BoxedStrategy<TopicFilter> {
    let group = if shared {
        option::of(vec(select(LEVEL), 1..=4).prop_map(|v| v.into_iter().collect::<String>()))
            .boxed()
    } else {
        Just(None).boxed()
    };
    (vec(filter_level(), 0..=4), any::<bool>(), group)
        .prop_map(|(levels, hash, group)| {
            let mut f = levels.join("/");
            if levels.is_empty() {
                f.push('#');
            } else if hash {
                f.push_str("/#");
            } else if f.is_empty() {
                f.push('+');
            }
            if let Some(g) = group {
                f = format!("$share/{g}/{f}");
            }
            TopicFilter::new(&f).unwrap_or_else(|e| panic!("generated {f:?}: {e}"))
        })
        .boxed()
}

fn bytes(max: usize) -> BoxedStrategy<Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from).boxed()
}

fn qos() -> impl Strategy<Value = QoS> {
    select(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][..])
}

fn packet_id() -> impl Strategy<Value = shardmq::protocol::PacketId> {
    (1..=u16::MAX).prop_map(pid)
}

fn codes(table: &[u8]) -> impl Strategy<Value = ReasonCode> {
    let v: Vec<ReasonCode> = table
        .iter()
        .map(|&c| ReasonCode::from_u8(c).unwrap())
        .collect();
    select(v)
}

// The reason code tables of MQTT 5 (3.2.2.2, 3.4.2.1, ...).
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
/// MQTT 3.x return codes 0-5, as the reasons they decode to.
const CONNACK_V3_CODES: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const SUBACK_V3_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

// ---------------------------------------------------------------------------------------
// MQTT 5 property strategies (3.x packets always carry the defaults)
// ---------------------------------------------------------------------------------------

fn user_props() -> BoxedStrategy<UserProperties> {
    vec((mqtt_str(), mqtt_str()), 0..=2).boxed()
}

fn nonzero_u16() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn nonzero_u32() -> impl Strategy<Value = u32> {
    1..=u32::MAX
}

fn connect_props() -> BoxedStrategy<ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(nonzero_u16()),
        option::of(nonzero_u32()),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        user_props(),
        option::of(mqtt_str()),
        option::of(bytes(6)),
    )
        .prop_map(|(sei, rm, mps, tam, rri, rpi, user, method, data)| {
            // Authentication Data only with an Authentication Method (3.1.2.11.10).
            let data = if method.is_some() { data } else { None };
            ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                user_properties: user,
                authentication_method: method,
                authentication_data: data,
            }
        })
        .boxed()
}

fn will_props() -> BoxedStrategy<WillProperties> {
    (
        option::of(any::<u32>()),
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(mqtt_str()),
        option::of(topic_name()),
        option::of(bytes(6)),
        user_props(),
    )
        .prop_map(|(delay, pfi, expiry, ct, rt, cd, user)| WillProperties {
            will_delay_interval: delay,
            payload_format_indicator: pfi,
            message_expiry_interval: expiry,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: user,
        })
        .boxed()
}

fn connack_props() -> BoxedStrategy<ConnAckProperties> {
    let a = (
        option::of(any::<u32>()),
        option::of(nonzero_u16()),
        option::of(select(&[QoS::AtMostOnce, QoS::AtLeastOnce][..])),
        option::of(any::<bool>()),
        option::of(nonzero_u32()),
        option::of(mqtt_str()),
        option::of(any::<u16>()),
        option::of(mqtt_str()),
        user_props(),
    );
    let b = (
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<u16>()),
        option::of(mqtt_str()),
        option::of(mqtt_str()),
        option::of(mqtt_str()),
        option::of(bytes(6)),
    );
    (a, b)
        .prop_map(
            |((sei, rm, mq, ra, mps, aci, tam, rs, user), (wsa, sia, ssa, ska, ri, sr, am, ad))| {
                ConnAckProperties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    maximum_qos: mq,
                    retain_available: ra,
                    maximum_packet_size: mps,
                    assigned_client_identifier: aci,
                    topic_alias_maximum: tam,
                    reason_string: rs,
                    user_properties: user,
                    wildcard_subscription_available: wsa,
                    subscription_identifiers_available: sia,
                    shared_subscription_available: ssa,
                    server_keep_alive: ska,
                    response_information: ri,
                    server_reference: sr,
                    authentication_method: am,
                    authentication_data: ad,
                }
            },
        )
        .boxed()
}

fn publish_props() -> BoxedStrategy<PublishProperties> {
    (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(nonzero_u16().prop_map(|a| NonZeroU16::new(a).unwrap())),
        option::of(topic_name()),
        option::of(bytes(6)),
        user_props(),
        vec(1..=VARINT_MAX, 0..=3),
        option::of(mqtt_str()),
    )
        .prop_map(
            |(pfi, expiry, alias, rt, cd, user, sids, ct)| PublishProperties {
                payload_format_indicator: pfi,
                message_expiry_interval: expiry,
                topic_alias: alias,
                response_topic: rt,
                correlation_data: cd,
                user_properties: user,
                subscription_identifiers: sids,
                content_type: ct,
            },
        )
        .boxed()
}

fn ack_props() -> BoxedStrategy<AckProperties> {
    (option::of(mqtt_str()), user_props())
        .prop_map(|(rs, user)| AckProperties {
            reason_string: rs,
            user_properties: user,
        })
        .boxed()
}

/// `strategy` in MQTT 5, the default (no properties) otherwise.
fn v5_only<T: Default + Clone + std::fmt::Debug + 'static>(
    v: ProtocolVersion,
    strategy: BoxedStrategy<T>,
) -> BoxedStrategy<T> {
    if v.is_v5() {
        strategy
    } else {
        Just(T::default()).boxed()
    }
}

// ---------------------------------------------------------------------------------------
// Packet strategies, per version
// ---------------------------------------------------------------------------------------

fn will(v: ProtocolVersion) -> BoxedStrategy<LastWill> {
    (
        topic_name(),
        bytes(12),
        qos(),
        any::<bool>(),
        v5_only(v, will_props()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
        .boxed()
}

fn connect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (
        any::<bool>(),
        any::<u16>(),
        v5_only(v, connect_props()),
        mqtt_str(),
        option::of(will(v)),
        option::of(mqtt_str()),
        option::of(bytes(8)),
    )
        .prop_map(
            move |(clean_start, keep_alive, properties, client_id, will, username, password)| {
                // MQTT-3.1.2-22: 3.x has no password without a user name.
                let password = if v.is_v5() || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    properties,
                    client_id,
                    will,
                    username,
                    password,
                }))
            },
        )
        .boxed()
}

fn connack(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let table = if v.is_v5() {
        CONNACK_CODES
    } else {
        CONNACK_V3_CODES
    };
    (any::<bool>(), codes(table), v5_only(v, connack_props()))
        .prop_map(|(session_present, reason_code, properties)| {
            Packet::ConnAck(Box::new(ConnAck {
                session_present,
                reason_code,
                properties,
            }))
        })
        .boxed()
}

fn publish(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic_name(),
        any::<bool>(),
        packet_id(),
        v5_only(v, publish_props()),
        bytes(24),
    )
        .prop_map(
            move |(dup, qos, retain, topic, use_alias, id, properties, payload)| {
                // MQTT 5: a Topic Alias may replace the topic name.
                let topic = if use_alias && properties.topic_alias.is_some() {
                    TopicName::empty()
                } else {
                    topic
                };
                let at_most_once = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    // MQTT-3.3.1-2 (3.1.1, 5.0): no DUP on QoS 0.
                    dup: dup && (!at_most_once || v == V31),
                    qos,
                    retain,
                    topic,
                    packet_id: (!at_most_once).then_some(id),
                    properties,
                    payload,
                })
            },
        )
        .boxed()
}

fn ack(v: ProtocolVersion, table: &'static [u8], ctor: fn(Ack) -> Packet) -> BoxedStrategy<Packet> {
    let code = if v.is_v5() {
        codes(table).boxed()
    } else {
        Just(ReasonCode::Success).boxed()
    };
    (packet_id(), code, v5_only(v, ack_props()))
        .prop_map(move |(packet_id, reason_code, properties)| {
            ctor(Ack {
                packet_id,
                reason_code,
                properties,
            })
        })
        .boxed()
}

fn subscription(v: ProtocolVersion) -> BoxedStrategy<(TopicFilter, SubscriptionOptions)> {
    let retain_handling = select(
        &[
            RetainHandling::SendAtSubscribe,
            RetainHandling::SendAtSubscribeIfNew,
            RetainHandling::DoNotSend,
        ][..],
    );
    (
        topic_filter(true),
        qos(),
        any::<bool>(),
        any::<bool>(),
        retain_handling,
    )
        .prop_map(move |(f, qos, nl, rap, rh)| {
            let options = if v.is_v5() {
                SubscriptionOptions {
                    qos,
                    // MQTT-3.8.3-4: no No Local on a shared subscription.
                    no_local: nl && !f.is_shared(),
                    retain_as_published: rap,
                    retain_handling: rh,
                }
            } else {
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                }
            };
            (f, options)
        })
        .boxed()
}

fn subscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let props = (option::of(1..=VARINT_MAX), user_props())
        .prop_map(|(sid, user)| SubscribeProperties {
            subscription_identifier: sid,
            user_properties: user,
        })
        .boxed();
    (packet_id(), v5_only(v, props), vec(subscription(v), 1..=4))
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn suback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let table = if v.is_v5() {
        SUBACK_CODES
    } else {
        SUBACK_V3_CODES
    };
    (
        packet_id(),
        v5_only(v, ack_props()),
        vec(codes(table), 1..=5),
    )
        .prop_map(|(packet_id, properties, reason_codes)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reason_codes,
            })
        })
        .boxed()
}

fn unsubscribe(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let props = user_props()
        .prop_map(|user| UnsubscribeProperties {
            user_properties: user,
        })
        .boxed();
    (
        packet_id(),
        v5_only(v, props),
        vec(topic_filter(true), 1..=4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn unsuback(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let reasons = if v.is_v5() {
        vec(codes(UNSUBACK_CODES), 1..=5).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (packet_id(), v5_only(v, ack_props()), reasons)
        .prop_map(|(packet_id, properties, reason_codes)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reason_codes,
            })
        })
        .boxed()
}

fn disconnect(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    if !v.is_v5() {
        return Just(Packet::Disconnect(Disconnect::default())).boxed();
    }
    let props = (
        option::of(any::<u32>()),
        option::of(mqtt_str()),
        user_props(),
        option::of(mqtt_str()),
    )
        .prop_map(|(sei, rs, user, sr)| DisconnectProperties {
            session_expiry_interval: sei,
            reason_string: rs,
            user_properties: user,
            server_reference: sr,
        });
    (codes(DISCONNECT_CODES), props)
        .prop_map(|(reason_code, properties)| {
            Packet::Disconnect(Disconnect {
                reason_code,
                properties,
            })
        })
        .boxed()
}

fn auth() -> BoxedStrategy<Packet> {
    // The short form (Success, no properties), or any reason with an Authentication Method,
    // which every other AUTH carries (3.15.2.2.2).
    let props = (
        mqtt_str().prop_map(Some),
        option::of(bytes(8)),
        option::of(mqtt_str()),
        user_props(),
    )
        .prop_map(|(am, ad, rs, user)| AuthProperties {
            authentication_method: am,
            authentication_data: ad,
            reason_string: rs,
            user_properties: user,
        });
    let full = (codes(AUTH_CODES), props).prop_map(|(reason_code, properties)| {
        Packet::Auth(Box::new(Auth {
            reason_code,
            properties,
        }))
    });
    prop_oneof![1 => Just(Packet::Auth(Box::default())), 4 => full].boxed()
}

/// Any packet that `v` can express, every type equally likely.
fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut arms = vec![
        connect(v),
        connack(v),
        publish(v),
        ack(v, PUBACK_CODES, Packet::PubAck),
        ack(v, PUBACK_CODES, Packet::PubRec),
        ack(v, PUBREL_CODES, Packet::PubRel),
        ack(v, PUBREL_CODES, Packet::PubComp),
        subscribe(v),
        suback(v),
        unsubscribe(v),
        unsuback(v),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v),
    ];
    if v.is_v5() {
        arms.push(auth());
    }
    Union::new(arms).boxed()
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

fn big(version: Option<ProtocolVersion>) -> DecodeLimits {
    DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, version)
}

fn encode(p: &Packet, v: ProtocolVersion) -> Result<Vec<u8>, TestCaseError> {
    let mut buf = BytesMut::new();
    let n = p
        .encode(v, &mut buf)
        .map_err(|e| TestCaseError::fail(format!("encode {p:?}: {e}")))?;
    prop_assert_eq!(n, buf.len());
    prop_assert_eq!(p.encoded_len(v), n);
    Ok(buf.to_vec())
}

fn check_roundtrip(v: ProtocolVersion, p: &Packet) -> Result<(), TestCaseError> {
    let bytes = encode(p, v)?;
    let mut buf = BytesMut::from(&bytes[..]);
    prop_assert_eq!(decode(&mut buf, &big(Some(v))), Ok(Some(p.clone())));
    prop_assert!(buf.is_empty(), "{} bytes left", buf.len());
    // A limit of exactly the packet's size accepts it.
    let mut buf = BytesMut::from(&bytes[..]);
    let exact = DecodeLimits::new(bytes.len(), Some(v));
    prop_assert_eq!(decode(&mut buf, &exact), Ok(Some(p.clone())));
    // The first packet of a connection.
    if let Packet::Connect(_) = p {
        let mut buf = BytesMut::from(&bytes[..]);
        prop_assert_eq!(decode(&mut buf, &big(None)), Ok(Some(p.clone())));
    }
    if let Packet::Publish(publish) = p {
        let mut head = BytesMut::new();
        let total = publish.encode_header(v, &mut head);
        prop_assert_eq!(total, bytes.len());
        head.extend_from_slice(&publish.payload);
        prop_assert_eq!(&head[..], &bytes[..]);
    }
    Ok(())
}

/// Decodes what `buf` holds until it asks for more, updating the version on CONNECT.
fn drain(
    buf: &mut BytesMut,
    limits: &mut DecodeLimits,
    out: &mut Vec<Packet>,
) -> Result<(), TestCaseError> {
    loop {
        let before = buf.len();
        match decode(buf, limits) {
            Ok(Some(p)) => {
                if let (Packet::Connect(c), None) = (&p, limits.version) {
                    limits.version = Some(c.protocol);
                }
                out.push(p);
            }
            Ok(None) => {
                prop_assert_eq!(buf.len(), before, "Ok(None) consumed bytes");
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("decode error {e}"))),
        }
    }
}

fn check_split_everywhere(v: ProtocolVersion, packets: &[Packet]) -> Result<(), TestCaseError> {
    let mut bytes = Vec::new();
    for p in packets {
        bytes.extend(encode(p, v)?);
    }
    // The stream starts with a CONNECT, decoded before the version is known.
    let starts_with_connect = matches!(packets[0], Packet::Connect(_));
    for cut in 0..=bytes.len() {
        let mut limits = big(if starts_with_connect { None } else { Some(v) });
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        buf.extend_from_slice(&bytes[..cut]);
        drain(&mut buf, &mut limits, &mut out)?;
        buf.extend_from_slice(&bytes[cut..]);
        drain(&mut buf, &mut limits, &mut out)?;
        prop_assert!(buf.is_empty(), "cut {}: {} bytes left", cut, buf.len());
        prop_assert_eq!(&out[..], packets, "cut at {}", cut);
    }
    Ok(())
}

/// Decodes `bytes` until the decoder stops; must not panic. Whatever decodes must re-encode
/// (in the version it was decoded in) to bytes that decode to the same packet.
fn check_never_panics(bytes: &[u8], mut limits: DecodeLimits) -> Result<usize, TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    let mut decoded = 0;
    loop {
        let before = buf.len();
        match decode(&mut buf, &limits) {
            Ok(Some(p)) => {
                decoded += 1;
                prop_assert!(buf.len() < before);
                let v = match (&p, limits.version) {
                    (Packet::Connect(c), None) => {
                        limits.version = Some(c.protocol);
                        c.protocol
                    }
                    (Packet::Connect(c), Some(_)) => c.protocol,
                    (_, Some(v)) => v,
                    (_, None) => return Err(TestCaseError::fail("non-CONNECT before CONNECT")),
                };
                let again = encode(&p, v)?;
                prop_assert!(again.len() <= before - buf.len(), "re-encoding grew");
                let mut rb = BytesMut::from(&again[..]);
                prop_assert_eq!(decode(&mut rb, &big(Some(v))), Ok(Some(p)));
                prop_assert!(rb.is_empty());
            }
            Ok(None) => {
                prop_assert_eq!(buf.len(), before);
                return Ok(decoded);
            }
            Err(e) => {
                // Every error names a reason code of 0x80 or above and can be displayed.
                prop_assert!(e.reason_code().as_u8() >= 0x80);
                prop_assert!(!e.to_string().is_empty());
                return Ok(decoded);
            }
        }
    }
}

const VERSIONS: [Option<ProtocolVersion>; 4] = [None, Some(V31), Some(V311), Some(V5)];
const MAX_SIZES: [usize; 3] = [4, 64, MAX_PACKET_SIZE_PROTOCOL];

fn version_strategy() -> impl Strategy<Value = ProtocolVersion> {
    select(&ProtocolVersion::ALL[..])
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip_v3_1(p in packet(V31)) {
        check_roundtrip(V31, &p)?;
    }

    #[test]
    fn roundtrip_v3_1_1(p in packet(V311)) {
        check_roundtrip(V311, &p)?;
    }

    #[test]
    fn roundtrip_v5(p in packet(V5)) {
        check_roundtrip(V5, &p)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn split_everywhere_v3_1(c in connect(V31), rest in vec(packet(V31), 0..=4), lead in any::<bool>()) {
        let mut packets = if lead { vec![c] } else { vec![] };
        packets.extend(rest);
        prop_assume!(!packets.is_empty());
        check_split_everywhere(V31, &packets)?;
    }

    #[test]
    fn split_everywhere_v3_1_1(c in connect(V311), rest in vec(packet(V311), 0..=4), lead in any::<bool>()) {
        let mut packets = if lead { vec![c] } else { vec![] };
        packets.extend(rest);
        prop_assume!(!packets.is_empty());
        check_split_everywhere(V311, &packets)?;
    }

    #[test]
    fn split_everywhere_v5(c in connect(V5), rest in vec(packet(V5), 0..=4), lead in any::<bool>()) {
        let mut packets = if lead { vec![c] } else { vec![] };
        packets.extend(rest);
        prop_assume!(!packets.is_empty());
        check_split_everywhere(V5, &packets)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Arbitrary bytes.
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..=96)) {
        for version in VERSIONS {
            for max in MAX_SIZES {
                check_never_panics(&bytes, DecodeLimits::new(max, version))?;
            }
        }
    }

    /// Arbitrary bodies behind a valid-looking fixed header, so every body decoder sees
    /// garbage.
    #[test]
    fn random_bodies_never_panic(first in any::<u8>(), body in vec(any::<u8>(), 0..=96)) {
        let mut bytes = vec![first];
        bytes.extend(codec_common::varint(body.len() as u32));
        bytes.extend(&body);
        for version in VERSIONS {
            for max in MAX_SIZES {
                check_never_panics(&bytes, DecodeLimits::new(max, version))?;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Valid packets with a few bytes changed, inserted or cut off: deep paths, no panics.
    #[test]
    fn mutated_packets_never_panic(
        v in version_strategy(),
        seed in any::<u64>(),
        edits in vec((any::<Index>(), any::<u8>(), 0u8..3), 1..=3),
    ) {
        // A packet for `v`, picked deterministically from the seed.
        let mut runner = proptest::test_runner::TestRunner::new_with_rng(
            ProptestConfig::default(),
            proptest::test_runner::TestRng::from_seed(
                proptest::test_runner::RngAlgorithm::ChaCha,
                &{
                    let mut s = [0u8; 32];
                    s[..8].copy_from_slice(&seed.to_le_bytes());
                    s
                },
            ),
        );
        let p = packet(v).new_tree(&mut runner).unwrap().current();
        let mut bytes = encode(&p, v)?;
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        for version in [None, Some(v)] {
            for max in MAX_SIZES {
                check_never_panics(&bytes, DecodeLimits::new(max, version))?;
            }
        }
    }
}

#[test]
fn generators_cover_every_packet_type() {
    // A sanity check on the strategies: each version yields every type it can express.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for v in ProtocolVersion::ALL {
        let mut seen = [false; 16];
        let strategy = packet(v);
        for _ in 0..600 {
            let p = strategy.new_tree(&mut runner).unwrap().current();
            seen[p.packet_type() as usize] = true;
        }
        let expected: Vec<usize> = if v.is_v5() {
            (1..=15).collect()
        } else {
            (1..=14).collect()
        };
        for t in expected {
            assert!(seen[t], "{v:?} never generated packet type {t}");
        }
        assert!(!seen[0]);
        assert_eq!(seen[15], v.is_v5());
    }
}
