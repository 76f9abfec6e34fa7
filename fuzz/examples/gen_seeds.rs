//! Writes the seed inputs of the `decode` fuzz target: each file is one selector byte (see
//! fuzz_targets/decode.rs) followed by a stream of valid packets, written by the codec
//! itself so that the seeds follow the codec as it changes.
//!
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds -- fuzz/seeds/decode

use std::num::NonZeroU16;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use shardmq::protocol::{
    decode, Ack, AckProperties, Auth, ConnAck, Connect, ConnectProperties, DecodeLimits,
    Disconnect, LastWill, MqttStr, Packet, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, SubscriptionOptions, TopicFilter, TopicName, UnsubAck,
    Unsubscribe, WillProperties, MAX_PACKET_SIZE_PROTOCOL,
};

/// Selector bits 2-7 = 63: the protocol's maximum packet size.
const MAX_SIZE: u8 = 63 << 2;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero packet id")
}

fn s(v: &str) -> MqttStr {
    MqttStr::new(v).expect("valid MQTT string")
}

fn topic(v: &str) -> TopicName {
    TopicName::new(v).expect("valid topic name")
}

fn filter(v: &str) -> TopicFilter {
    TopicFilter::new(v).expect("valid topic filter")
}

fn connect(protocol: ProtocolVersion, full: bool) -> Packet {
    let v5 = protocol.is_v5();
    let mut properties = ConnectProperties::default();
    let mut will_properties = WillProperties::default();
    if v5 && full {
        properties.session_expiry_interval = Some(3600);
        properties.receive_maximum = Some(32);
        properties.maximum_packet_size = Some(1 << 20);
        properties.topic_alias_maximum = Some(10);
        properties.request_problem_information = Some(true);
        properties.user_properties = vec![(s("region"), s("eu-west"))];
        will_properties.will_delay_interval = Some(30);
        will_properties.payload_format_indicator = Some(true);
        will_properties.content_type = Some(s("text/plain"));
    }
    Packet::Connect(Box::new(Connect {
        protocol,
        clean_start: !full,
        keep_alive: 60,
        properties,
        client_id: s("sensor-0042"),
        will: full.then(|| LastWill {
            topic: topic("devices/sensor-0042/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: will_properties,
        }),
        username: full.then(|| s("sensor")),
        password: full.then(|| Bytes::from_static(b"s3cret")),
    }))
}

fn publish(qos: QoS, id: u16, payload: &'static [u8], v5_props: bool) -> Packet {
    let mut p = Publish::new(
        topic("devices/sensor-0042/temp"),
        Bytes::from_static(payload),
    );
    p.qos = qos;
    p.packet_id = (qos != QoS::AtMostOnce).then(|| pid(id));
    if v5_props {
        p.properties.payload_format_indicator = Some(true);
        p.properties.message_expiry_interval = Some(120);
        p.properties.topic_alias = Some(pid(3));
        p.properties.response_topic = Some(topic("replies/sensor-0042"));
        p.properties.correlation_data = Some(Bytes::from_static(b"\x01\x02\x03\x04"));
        p.properties.user_properties = vec![(s("unit"), s("celsius"))];
        p.properties.content_type = Some(s("application/json"));
    }
    Packet::Publish(p)
}

fn subscribe(v5: bool) -> Packet {
    let mut sub = Subscribe {
        packet_id: pid(7),
        properties: Default::default(),
        filters: vec![
            (filter("devices/+/temp"), SubscriptionOptions::default()),
            (
                filter("alerts/#"),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..Default::default()
                },
            ),
        ],
    };
    if v5 {
        sub.properties.subscription_identifier = Some(9);
        sub.filters.push((
            filter("$share/workers/jobs/#"),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        ));
        sub.filters.push((
            filter("chat/room-1"),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: RetainHandling::DoNotSend,
            },
        ));
    }
    Packet::Subscribe(sub)
}

fn session(version: ProtocolVersion) -> Vec<Packet> {
    let v5 = version.is_v5();
    let mut packets = vec![
        connect(version, true),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            ..Default::default()
        })),
        publish(QoS::AtMostOnce, 0, b"21.5", false),
        publish(QoS::AtLeastOnce, 1, b"{\"t\":21.5}", v5),
        Packet::PubAck(Ack::new(pid(1))),
        publish(QoS::ExactlyOnce, 2, b"", false),
        Packet::PubRec(Ack::new(pid(2))),
        Packet::PubRel(Ack::new(pid(2))),
        Packet::PubComp(Ack::new(pid(2))),
        subscribe(v5),
        Packet::SubAck(SubAck {
            packet_id: pid(7),
            properties: AckProperties::default(),
            reason_codes: vec![ReasonCode::Success, ReasonCode::GrantedQoS2],
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(8),
            properties: Default::default(),
            filters: vec![filter("devices/+/temp")],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(8),
            properties: AckProperties::default(),
            reason_codes: if v5 {
                vec![ReasonCode::Success]
            } else {
                vec![]
            },
        }),
        Packet::PingReq,
        Packet::PingResp,
    ];
    if v5 {
        let mut ack = Ack::with_reason(pid(3), ReasonCode::NoMatchingSubscribers);
        ack.properties.reason_string = Some(s("nobody listens"));
        packets.push(Packet::PubAck(ack));
        let mut auth = Auth {
            reason_code: ReasonCode::ContinueAuthentication,
            ..Default::default()
        };
        auth.properties.authentication_method = Some(s("SCRAM-SHA-256"));
        auth.properties.authentication_data = Some(Bytes::from_static(b"client-first"));
        packets.push(Packet::Auth(Box::new(auth)));
        let mut disconnect = Disconnect::new(ReasonCode::DisconnectWithWillMessage);
        disconnect.properties.session_expiry_interval = Some(0);
        disconnect.properties.reason_string = Some(s("bye"));
        packets.push(Packet::Disconnect(disconnect));
    } else {
        packets.push(Packet::Disconnect(Disconnect::default()));
    }
    packets
}

fn stream(selector: u8, version: ProtocolVersion, packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[selector]);
    for p in packets {
        p.encode(version, &mut buf).expect("encode");
    }
    buf.to_vec()
}

/// Checks that a seed decodes whole, so a seed never silently stops early.
fn check(seed: &[u8], version: Option<ProtocolVersion>, count: usize) {
    let mut buf = BytesMut::from(&seed[1..]);
    let mut limits = DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, version);
    for i in 0..count {
        match decode(&mut buf, &limits) {
            Ok(Some(Packet::Connect(c))) if limits.version.is_none() => {
                limits.version = Some(c.protocol)
            }
            Ok(Some(_)) => {}
            other => panic!("seed packet {i}: {other:?}"),
        }
    }
    assert!(buf.is_empty(), "seed has trailing bytes");
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "seeds/decode".to_string()),
    );
    std::fs::create_dir_all(&dir).expect("create seed dir");
    use ProtocolVersion::{V3_1, V3_1_1, V5};
    // (file name, the version negotiated before the stream starts, the version the
    // packets are written in, the packets). CONNECT decodes in any state; before CONNECT
    // (None) nothing else does, and the first CONNECT switches the stream to its version.
    let seeds: Vec<(&str, Option<ProtocolVersion>, ProtocolVersion, Vec<Packet>)> = vec![
        ("session-v3.1", Some(V3_1), V3_1, session(V3_1)),
        ("session-v3.1.1", Some(V3_1_1), V3_1_1, session(V3_1_1)),
        ("session-v5", Some(V5), V5, session(V5)),
        ("connect-then-session-v5", None, V5, session(V5)),
        (
            "connect-minimal-v3.1.1",
            None,
            V3_1_1,
            vec![connect(V3_1_1, false), Packet::PingReq],
        ),
        (
            "publish-props-v5",
            Some(V5),
            V5,
            vec![publish(QoS::AtLeastOnce, 42, b"hello", true)],
        ),
    ];
    for (name, version, wire_version, packets) in &seeds {
        let selector = MAX_SIZE
            | match version {
                None => 0,
                Some(ProtocolVersion::V3_1) => 1,
                Some(ProtocolVersion::V3_1_1) => 2,
                Some(ProtocolVersion::V5) => 3,
            };
        let bytes = stream(selector, *wire_version, packets);
        check(&bytes, *version, packets.len());
        let path = dir.join(name);
        std::fs::write(&path, &bytes).expect("write seed");
        eprintln!(
            "{} ({} bytes, {} packets)",
            path.display(),
            bytes.len(),
            packets.len()
        );
    }
}
