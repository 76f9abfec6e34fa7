//! Codec micro-benchmarks: PUBLISH decode / encode / `encode_header` at three payload sizes
//! in MQTT 3.1.1 and 5.0, and decode / encode of a typical MQTT 5 CONNECT.
//!
//! `cargo bench --bench codec` (about 50 s once built, on the 2-core machine); a filter narrows
//! it, e.g. `cargo bench --bench codec -- publish/decode`. See perf/README.md.
//!
//! Every packet under test is itself decoded from its wire bytes first, so that its topic
//! and payload are slices of one shared receive buffer, as they are in the broker.
//! Decoding consumes its input, so each decode iteration gets a fresh copy of the packet's
//! bytes made outside the timed section; encodes write into one reused buffer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use std::hint::black_box;
use std::num::NonZeroU16;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardmq::protocol::{
    decode, Connect, ConnectProperties, DecodeLimits, LastWill, MqttStr, Packet, ProtocolVersion,
    Publish, QoS, TopicName, WillProperties, MAX_PACKET_SIZE_PROTOCOL,
};

const VERSIONS: [(ProtocolVersion, &str); 2] = [
    (ProtocolVersion::V3_1_1, "v3.1.1"),
    (ProtocolVersion::V5, "v5"),
];

const PAYLOADS: [(usize, &str); 3] = [(16, "16B"), (1024, "1KiB"), (64 * 1024, "64KiB")];

/// A topic of typical length (46 bytes) and depth.
const TOPIC: &str = "sensors/building-7/floor-3/room-42/temperature";

fn limits(version: ProtocolVersion) -> DecodeLimits {
    DecodeLimits::new(MAX_PACKET_SIZE_PROTOCOL, Some(version))
}

fn encode(packet: &Packet, version: ProtocolVersion) -> Bytes {
    let mut buf = BytesMut::new();
    packet.encode(version, &mut buf).expect("encode");
    buf.freeze()
}

/// Decodes `wire` as the broker would receive it: the result shares one buffer.
fn decode_one(wire: &[u8], version: ProtocolVersion) -> Packet {
    let mut buf = BytesMut::from(wire);
    let packet = decode(&mut buf, &limits(version))
        .expect("decode")
        .expect("a whole packet");
    assert!(buf.is_empty());
    packet
}

/// A QoS 1 PUBLISH without properties, and its bytes on the wire for `version`.
fn publish(version: ProtocolVersion, payload_len: usize) -> (Publish, Bytes) {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
    let mut p = Publish::new(TopicName::new(TOPIC).expect("topic"), Bytes::from(payload));
    p.qos = QoS::AtLeastOnce;
    p.packet_id = NonZeroU16::new(4242);
    let wire = encode(&Packet::Publish(p), version);
    match decode_one(&wire, version) {
        Packet::Publish(p) => (p, wire),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

fn s(v: &str) -> MqttStr {
    MqttStr::new(v).expect("string")
}

/// A typical MQTT 5 CONNECT: persistent session, flow-control properties, one user
/// property, a retained QoS 1 will with a delay and content type, username and password.
fn connect_v5() -> (Packet, Bytes) {
    let properties = ConnectProperties {
        session_expiry_interval: Some(3600),
        receive_maximum: Some(64),
        maximum_packet_size: Some(256 * 1024),
        topic_alias_maximum: Some(16),
        user_properties: vec![(s("fleet"), s("eu-west-1"))],
        ..Default::default()
    };
    let will = LastWill {
        topic: TopicName::new("devices/sensor-0042/status").expect("topic"),
        payload: Bytes::from_static(b"{\"online\":false}"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: WillProperties {
            will_delay_interval: Some(30),
            content_type: Some(s("application/json")),
            ..Default::default()
        },
    };
    let connect = Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive: 60,
        properties,
        client_id: s("sensor-0042"),
        will: Some(will),
        username: Some(s("sensor-0042")),
        password: Some(Bytes::from_static(b"correct horse battery staple")),
    }));
    let wire = encode(&connect, ProtocolVersion::V5);
    (decode_one(&wire, ProtocolVersion::V5), wire)
}

/// How many decode inputs to prepare per timed batch: about 256 KiB of them, so that they
/// are still in cache when decoded, as a packet just read from a socket is.
fn batch(wire_len: usize) -> BatchSize {
    BatchSize::NumIterations(((256 << 10) / wire_len).clamp(8, 1024) as u64)
}

fn publish_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish/decode");
    for (version, vname) in VERSIONS {
        for (size, sname) in PAYLOADS {
            let (_, wire) = publish(version, size);
            let limits = limits(version);
            group.throughput(Throughput::Bytes(wire.len() as u64));
            group.bench_function(format!("{vname}/{sname}"), |b| {
                b.iter_batched(
                    || BytesMut::from(&wire[..]),
                    |mut buf| decode(&mut buf, &limits),
                    batch(wire.len()),
                )
            });
        }
    }
    group.finish();
}

fn publish_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish/encode");
    for (version, vname) in VERSIONS {
        for (size, sname) in PAYLOADS {
            let (p, wire) = publish(version, size);
            let packet = Packet::Publish(p);
            let mut buf = BytesMut::with_capacity(wire.len());
            group.throughput(Throughput::Bytes(wire.len() as u64));
            group.bench_function(format!("{vname}/{sname}"), |b| {
                b.iter(|| {
                    buf.clear();
                    let n = packet.encode(version, &mut buf).expect("encode");
                    black_box(&buf);
                    n
                })
            });
        }
    }
    group.finish();
}

/// The fan-out path: per receiver, the header into the connection's buffer and a new
/// reference to the shared payload (no copy of the payload).
fn publish_encode_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish/encode_header");
    group.throughput(Throughput::Elements(1));
    for (version, vname) in VERSIONS {
        for (size, sname) in PAYLOADS {
            let (p, _) = publish(version, size);
            let mut buf = BytesMut::with_capacity(128);
            group.bench_function(format!("{vname}/{sname}"), |b| {
                b.iter(|| {
                    buf.clear();
                    let total = p.encode_header(version, &mut buf);
                    black_box(&buf);
                    (total, p.payload.clone())
                })
            });
        }
    }
    group.finish();
}

fn connect(c: &mut Criterion) {
    let (packet, wire) = connect_v5();
    let limits = limits(ProtocolVersion::V5);
    let mut group = c.benchmark_group("connect");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode/v5", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| decode(&mut buf, &limits),
            batch(wire.len()),
        )
    });
    let mut buf = BytesMut::with_capacity(wire.len());
    group.bench_function("encode/v5", |b| {
        b.iter(|| {
            buf.clear();
            let n = packet
                .encode(ProtocolVersion::V5, &mut buf)
                .expect("encode");
            black_box(&buf);
            n
        })
    });
    group.finish();
}

const WARM_UP: Duration = Duration::from_millis(500);
const MEASUREMENT: Duration = Duration::from_millis(1500);

criterion_group! {
    name = codec;
    config = Criterion::default()
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT)
        .sample_size(50)
        .nresamples(20_000);
    targets = publish_decode, publish_encode, publish_encode_header, connect
}
criterion_main!(codec);
