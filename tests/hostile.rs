//! Misbehaving clients over raw sockets: garbage, truncated and malformed packets, packets
//! before CONNECT, a second CONNECT, bad strings, topics and filters, QoS 3, packet id 0,
//! properties where they are not allowed, bad topic aliases, PUBREL for an unknown id,
//! sockets that go silent without a FIN. For each: the MQTT 5 reason code (DISCONNECT, or
//! the answer the specification asks for) or a plain close for 3.1.1, no effect on a
//! bystander on each shard, and no leak: over many repetitions the broker's file
//! descriptors return to their baseline and its memory does not grow.
//!
//! `tests/broker_core.rs` (`malformed_packet_closes_only_that_connection`,
//! `second_connect_closes_the_connection`, `connect_timeout_closes_a_silent_socket`,
//! `keep_alive_expiry_drops_the_client_and_publishes_its_will`) and `tests/broker_v5.rs`
//! (`client_topic_alias_zero_above_maximum_or_unknown_is_refused`,
//! `packet_above_the_broker_maximum_is_refused`, `malformed_packet_disconnects_only_its_sender`)
//! check single cases in detail (wills, exact bytes); this suite runs them all together,
//! repeatedly, and watches the broker's resources. Clients that never read are in
//! `tests/overload.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shardmq::protocol::{Packet, ProtocolVersion, QoS, ReasonCode};
use support::raw::{publish_packet, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const SHARDS: usize = 2;
/// The broker's packet limit in these tests (so that "oversized" is cheap to send).
const PACKET_MAX: u32 = 4096;

/// What the broker must do with a hostile input.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// MQTT 5: DISCONNECT with this reason, then close. MQTT 3.1.1: close, nothing sent.
    Disconnect(ReasonCode),
    /// The connection stays; the broker answers with this packet first.
    Answer(fn(&Packet) -> bool),
    /// The client closes first (after a truncated packet): the broker closes too.
    Closed,
}

struct Case {
    what: &'static str,
    /// Sent after a successful CONNECT.
    bytes: Vec<u8>,
    expect: Expect,
    /// Also run against MQTT 3.1.1 (v5-only syntax is not).
    v311: bool,
}

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A packet with `first` byte, the remaining length of `body`, and `body`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    varint(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

/// A v5 PUBLISH QoS 0 to the 1-byte topic "a" with the given property bytes and payload "x".
fn v5_publish_with_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01, b'a'];
    varint(props.len(), &mut body);
    body.extend_from_slice(props);
    body.push(b'x');
    packet(0x30, &body)
}

fn cases(version: ProtocolVersion) -> Vec<Case> {
    let v5 = version == ProtocolVersion::V5;
    // The property length byte that MQTT 5 puts after a PUBLISH topic / packet id.
    let props: &[u8] = if v5 { &[0x00] } else { &[] };
    let with_props = |head: &[u8], tail: &[u8]| -> Vec<u8> {
        let mut v = head.to_vec();
        v.extend_from_slice(props);
        v.extend_from_slice(tail);
        v
    };
    let mut second_connect = BytesMut::new();
    ConnectOpts::new(version, "again", true)
        .packet()
        .encode(version, &mut second_connect)
        .expect("encode");
    let mut oversized = vec![0x30];
    varint(PACKET_MAX as usize * 4, &mut oversized);
    oversized.extend_from_slice(&[0x00, 0x01, b'a']);
    let mut truncated = vec![0x30];
    varint(100, &mut truncated);
    truncated.extend_from_slice(&[0x00, 0x01, b'a', 0x00, 1, 2, 3]);
    use Expect::*;
    use ReasonCode as R;
    vec![
        Case {
            what: "garbage (packet type 0)",
            bytes: vec![0x00, 0x00, 0xde, 0xad, 0xbe, 0xef],
            expect: Disconnect(R::MalformedPacket),
            v311: true,
        },
        Case {
            what: "remaining length of 5 bytes",
            bytes: vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
            expect: Disconnect(R::MalformedPacket),
            v311: true,
        },
        Case {
            what: "oversized packet",
            bytes: oversized,
            expect: Disconnect(R::PacketTooLarge),
            v311: true,
        },
        Case {
            what: "second CONNECT",
            bytes: second_connect.to_vec(),
            expect: Disconnect(R::ProtocolError),
            v311: true,
        },
        Case {
            what: "invalid UTF-8 in a topic",
            bytes: packet(0x30, &with_props(&[0x00, 0x02, 0xc3, 0x28], b"x")),
            expect: Disconnect(R::MalformedPacket),
            v311: true,
        },
        Case {
            what: "U+0000 in a topic",
            bytes: packet(0x30, &with_props(&[0x00, 0x02, b'a', 0x00], b"x")),
            expect: Disconnect(R::MalformedPacket),
            v311: true,
        },
        Case {
            what: "wildcard in a topic name",
            bytes: packet(0x30, &with_props(&[0x00, 0x03, b'a', b'/', b'+'], b"x")),
            expect: Disconnect(R::TopicNameInvalid),
            v311: true,
        },
        Case {
            what: "invalid filter a/#/b",
            bytes: packet(
                0x82,
                &with_props(
                    &[0x00, 0x01],
                    &[0x00, 0x05, b'a', b'/', b'#', b'/', b'b', 0x01],
                ),
            ),
            expect: Disconnect(R::TopicFilterInvalid),
            v311: true,
        },
        Case {
            what: "QoS 3",
            bytes: packet(0x36, &with_props(&[0x00, 0x01, b'a', 0x00, 0x01], b"x")),
            expect: Disconnect(R::MalformedPacket),
            v311: true,
        },
        Case {
            what: "packet id 0",
            bytes: packet(0x32, &with_props(&[0x00, 0x01, b'a', 0x00, 0x00], b"x")),
            expect: Disconnect(R::ProtocolError),
            v311: true,
        },
        Case {
            what: "property not allowed in PUBLISH (Session Expiry Interval)",
            bytes: v5_publish_with_props(&[0x11, 0, 0, 0, 1]),
            expect: Disconnect(R::MalformedPacket),
            v311: false,
        },
        Case {
            what: "topic alias 0",
            bytes: v5_publish_with_props(&[0x23, 0x00, 0x00]),
            expect: Disconnect(R::TopicAliasInvalid),
            v311: false,
        },
        Case {
            what: "topic alias above the maximum",
            bytes: v5_publish_with_props(&[0x23, 0xff, 0xff]),
            expect: Disconnect(R::TopicAliasInvalid),
            v311: false,
        },
        Case {
            what: "PUBREL for an unknown packet id",
            bytes: vec![0x62, 0x02, 0x00, 0x07],
            expect: Answer(|p| matches!(p, Packet::PubComp(a) if a.packet_id.get() == 7)),
            v311: true,
        },
        Case {
            what: "truncated packet, then FIN",
            bytes: truncated,
            expect: Closed,
            v311: true,
        },
    ]
}

/// Runs one case on a fresh connection owned by `shard`; panics with the case's name when
/// the broker does not do what it must.
fn run_case(b: &TestBroker, version: ProtocolVersion, case: &Case, n: usize, shard: usize) {
    let id = id_on_shard(&format!("hostile{n}"), shard, SHARDS);
    let (mut c, ack) = RawClient::connect_raw(b.addr, &ConnectOpts::new(version, &id, true));
    assert_eq!(ack.reason_code, ReasonCode::Success);
    c.send_bytes(&case.bytes);
    let label = format!("{} ({version:?})", case.what);
    match case.expect {
        Expect::Disconnect(rc) if version == ProtocolVersion::V5 => {
            assert_eq!(c.expect_disconnect(), rc, "{label}");
        }
        Expect::Disconnect(_) => {
            let got = c.expect_closed();
            assert!(got.is_empty(), "{label}: 3.1.1 gets no answer, got {got:?}");
        }
        Expect::Answer(pick) => {
            let p = c.recv();
            assert!(pick(&p), "{label}: got {p:?}");
            if let Packet::PubComp(a) = &p {
                if version == ProtocolVersion::V5 {
                    assert_eq!(
                        a.reason_code,
                        ReasonCode::PacketIdentifierNotFound,
                        "{label}"
                    );
                }
            }
            c.ping();
            c.disconnect();
        }
        Expect::Closed => {
            let _ = c.stream().shutdown(Shutdown::Write);
            let got = c.expect_closed();
            assert!(got.is_empty(), "{label}: got {got:?}");
        }
    }
}

/// Inputs before any CONNECT: the broker closes without answering (and frees the socket).
fn before_connect(b: &TestBroker) {
    let mut publish = BytesMut::new();
    publish_packet("a", b"x", QoS::AtMostOnce, false, None, false)
        .encode(ProtocolVersion::V3_1_1, &mut publish)
        .expect("encode");
    for (what, bytes) in [
        (
            "garbage before CONNECT",
            vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0x01],
        ),
        ("PUBLISH before CONNECT", publish.to_vec()),
        (
            "5-byte length before CONNECT",
            vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
    ] {
        let mut c = RawClient::tcp(b.addr);
        c.send_bytes(&bytes);
        let got = c.expect_closed();
        assert!(
            !got.iter()
                .any(|p| matches!(p, Packet::ConnAck(a) if a.reason_code == ReasonCode::Success)),
            "{what}: {got:?}"
        );
    }
}

/// One bystander per shard; each round trip goes from one shard to the other.
struct Bystanders {
    clients: Vec<RawClient>,
    n: u64,
}

impl Bystanders {
    fn new(b: &TestBroker) -> Bystanders {
        let clients = (0..SHARDS)
            .map(|s| {
                let mut c = RawClient::connect_v311(b.addr, &id_on_shard("bystander", s, SHARDS));
                c.sub(&[(&format!("by/{s}"), QoS::AtLeastOnce)]);
                c
            })
            .collect();
        Bystanders { clients, n: 0 }
    }

    /// Each bystander publishes to the next one, which must receive it (bounded).
    fn round_trip(&mut self) {
        for s in 0..SHARDS {
            let to = (s + 1) % SHARDS;
            self.n += 1;
            let body = self.n.to_be_bytes();
            let t = Instant::now();
            self.clients[s].publish(&format!("by/{to}"), &body, QoS::AtLeastOnce, false);
            let p = self.clients[to].recv_publish_ack();
            assert_eq!(&p.payload[..], &body, "bystander on shard {to}");
            assert!(t.elapsed() < TIMEOUT);
        }
    }
}

/// Every case, MQTT 5 and 3.1.1, on both shards, many times; bystanders keep working after
/// each case; descriptors return to their baseline and memory stays flat.
#[test]
fn hostile_clients_get_the_right_answer_and_leave_nothing_behind() {
    let b = TestBroker::start_with(
        SHARDS,
        &format!("[limits]\npacket_bytes_max = {PACKET_MAX}\n"),
    );
    let mut by = Bystanders::new(&b);
    by.round_trip();
    let base_fds = b.fd_count();
    let mut n = 0;
    let mut rss_warm = 0;
    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        for version in [ProtocolVersion::V5, ProtocolVersion::V3_1_1] {
            for case in cases(version) {
                if version != ProtocolVersion::V5 && !case.v311 {
                    continue;
                }
                n += 1;
                run_case(&b, version, &case, n, n % SHARDS);
                by.round_trip();
            }
        }
        before_connect(&b);
        by.round_trip();
        if round == 1 {
            rss_warm = b.rss_kib();
        }
    }
    let fds = b.wait_fds_at_most(base_fds);
    assert!(
        fds <= base_fds,
        "the broker holds {fds} descriptors after {n} hostile clients, {base_fds} before"
    );
    let grown = b.rss_kib().saturating_sub(rss_warm);
    assert!(
        grown < 16 * 1024,
        "broker memory grew by {grown} KiB over {} rounds of hostile clients",
        ROUNDS - 2
    );
}

/// Clients that vanish without a FIN (a silent socket with keep alive 1 s, never closed by
/// the client): the broker closes them when keep alive expires, and their descriptors are
/// released, while a bystander keeps working.
#[test]
fn half_open_sockets_are_closed_by_keep_alive_and_their_descriptors_released() {
    let b = TestBroker::start(SHARDS);
    let mut by = Bystanders::new(&b);
    by.round_trip();
    let base_fds = b.fd_count();
    // Raw sockets we keep open (no FIN from our side) but never write to again.
    let mut silent: Vec<TcpStream> = Vec::new();
    for i in 0..20 {
        let id = id_on_shard(&format!("halfopen{i}"), i % SHARDS, SHARDS);
        let (c, _) = RawClient::connect(b.addr, &ConnectOpts::v311(&id, true).keep_alive(1));
        silent.push(c.stream().try_clone().expect("clone"));
    }
    // Half a packet from some of them, then silence.
    for s in silent.iter_mut().step_by(3) {
        s.write_all(&[0x30, 0x10, 0x00]).expect("write");
    }
    assert!(b.fd_count() >= base_fds + 20);
    by.round_trip();
    let fds = b.wait_fds_at_most(base_fds);
    assert!(
        fds <= base_fds,
        "{fds} descriptors remain after keep alive expired, {base_fds} before"
    );
    // Our ends see the close.
    for s in &silent {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut &*s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the broker did not close a silent socket");
    }
    by.round_trip();
}

/// A client that connects and disconnects over and over with the same persistent client id
/// (a will with a delay, an expiry) leaves at most one will and one expiry timer behind, not
/// one per visit: the shard's timer entries stay bounded (`/api/shards` `timers`).
#[test]
fn reconnecting_over_and_over_leaves_one_timer_of_each_kind() {
    const VISITS: usize = 300;
    let b = TestBroker::start(SHARDS);
    let id = id_on_shard("revisit", 1, SHARDS);
    let opts = ConnectOpts::v5(&id, false).expiry(86_400).will(
        "revisit/gone",
        b"bye",
        QoS::AtLeastOnce,
        false,
    );
    let with_delay = |opts: &ConnectOpts| {
        opts.packet_with(|c| {
            if let Some(w) = &mut c.will {
                w.properties.will_delay_interval = Some(3600);
            }
        })
    };
    for _ in 0..VISITS {
        let (c, ack) = RawClient::connect_packet(b.addr, &with_delay(&opts));
        assert_eq!(ack.reason_code, ReasonCode::Success);
        // Gone without DISCONNECT (the will waits for its delay, the session for its
        // expiry), once the broker has seen the connection end.
        c.close_and_wait();
    }
    let shards = b.admin_json("/api/shards");
    let timers = shards["shards"][1]["timers"].as_u64().expect("timers");
    eprintln!("{VISITS} visits of one client id: {timers} timer entries");
    // One will and one expiry timer, plus cancelled entries not yet compacted (at most 64
    // beyond twice the live ones): far below one pair per visit.
    assert!(
        (2..=2 * 2 + 64).contains(&timers),
        "{timers} timer entries after {VISITS} visits of one client id"
    );
}

/// Reading a CONNECT costs time linear in its size, whatever pieces it comes in: 20 sockets
/// each sending all but the last byte of a 1 MiB CONNECT (that never completes) cost the
/// broker under 1.5 CPU seconds, a debug build on a loaded machine included (measured:
/// 0.02 s; before, when the buffer was copied and decoded again from the start on every read
/// of at most 256 bytes, 3.7 s), and a connected bystander keeps getting answers meanwhile.
#[test]
fn a_big_connect_in_many_pieces_costs_linear_time_and_stalls_no_one() {
    const SOCKETS: usize = 20;
    let b = TestBroker::start_with(1, "[limits]\nconnect_timeout_s = 60\n");
    let mut bystander = RawClient::connect_v311(b.addr, "bystander");
    let cpu_before = b.cpu();
    // A CONNECT announcing 1 MiB - 5 bytes of body (the whole packet 1 MiB).
    let body = (1 << 20) - 5;
    let mut head = vec![0x10];
    varint(body, &mut head);
    let addr = b.addr;
    let writers: Vec<_> = (0..SOCKETS)
        .map(|_| {
            let head = head.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_nodelay(true).unwrap();
                s.write_all(&head).unwrap();
                let chunk = vec![0u8; 4096];
                let mut left = body - 1;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).unwrap();
                    left -= n;
                }
                s
            })
        })
        .collect();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let sockets: Vec<TcpStream> = loop {
        let t = Instant::now();
        bystander.ping();
        worst = worst.max(t.elapsed());
        if writers.iter().all(|w| w.is_finished()) {
            break writers.into_iter().map(|w| w.join().unwrap()).collect();
        }
        assert!(
            started.elapsed() < TIMEOUT * 3,
            "the writers did not finish"
        );
    };
    // Everything sent is read (the writers' last bytes fit the socket buffers): one more
    // round trip after the broker caught up.
    bystander.ping();
    let cpu = b.cpu() - cpu_before;
    eprintln!("{SOCKETS} x 1 MiB CONNECT: broker CPU {cpu:?}, bystander worst {worst:?}");
    assert!(
        cpu < Duration::from_millis(1500),
        "{SOCKETS} unfinished 1 MiB CONNECTs cost {cpu:?} of broker CPU"
    );
    assert!(
        worst < Duration::from_secs(2),
        "a bystander waited {worst:?}"
    );
    drop(sockets);
}

/// A PUBLISH of `body` bytes of remaining length (topic `t`, QoS 0): its fixed header and
/// variable header, without the payload.
fn publish_head(body: usize) -> Vec<u8> {
    let mut head = vec![0x30];
    varint(body, &mut head);
    head.extend_from_slice(&[0, 1, b't']);
    head
}

/// A packet that has started must complete within `limits.packet_timeout_s`, whatever the
/// keep alive (here none): a client that sends half a PUBLISH and stops is disconnected
/// (MQTT 5: DISCONNECT 0x8D; 3.1.1: closed); a bystander on the same shard is not.
#[test]
fn a_packet_that_never_completes_is_cut_off_after_the_packet_timeout() {
    let b = TestBroker::start_with(1, "[limits]\npacket_timeout_s = 1\n");
    let mut bystander = RawClient::connect_v311(b.addr, "patient");
    for version in [ProtocolVersion::V5, ProtocolVersion::V3_1_1] {
        let opts = ConnectOpts::new(version, &format!("stalled-{}", version.level()), true);
        let (mut c, ack) = RawClient::connect_raw(b.addr, &opts);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        let mut half = publish_head(1000);
        half.extend_from_slice(&[b'x'; 400]);
        c.send_bytes(&half);
        let started = Instant::now();
        let got = c.expect_closed();
        match version {
            ProtocolVersion::V5 => assert!(
                matches!(got.last(), Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::KeepAliveTimeout),
                "{got:?}"
            ),
            _ => assert!(got.is_empty(), "{got:?}"),
        }
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "not before the limit"
        );
    }
    bystander.ping();
    assert_eq!(b.metric("shardmq_packet_timeouts_total{shard=\"0\"}"), 2.0);
}

/// The bytes held in incomplete packets have a budget: 100 clients each sending all but
/// the last byte of a 1 MiB PUBLISH (100 MiB held before; Mosquitto holds them too) cost
/// the broker at most its 8 MiB budget: the largest holders are closed first (MQTT 5:
/// DISCONNECT 0x97), and its memory grows by far less than what the clients sent.
#[test]
fn incomplete_packets_have_a_broker_wide_budget() {
    const CLIENTS: usize = 100;
    let b = TestBroker::start_with(
        1,
        "[limits]\nincomplete_packet_bytes_max = 8388608\npacket_timeout_s = 600\n",
    );
    let mut bystander = RawClient::connect_v311(b.addr, "bystander");
    let rss_before = b.rss_kib();
    let body = (1 << 20) - 8;
    let mut clients: Vec<RawClient> = (0..CLIENTS)
        .map(|i| {
            let opts = ConnectOpts::new(ProtocolVersion::V5, &format!("hoarder-{i}"), true);
            let (c, ack) = RawClient::connect_raw(b.addr, &opts);
            assert_eq!(ack.reason_code, ReasonCode::Success);
            c
        })
        .collect();
    let mut head = publish_head(body);
    head.resize(head.len() + body - 3 - 1, b'x');
    for c in &mut clients {
        // A client the broker closed meanwhile may refuse the rest of its bytes.
        let _ = c.try_send_bytes(&head);
    }
    // The broker reads the sockets at its own pace: the budget holds at every moment, and
    // once it has read what the clients sent, at most 8 of them (each holding 1 MiB or
    // more) are left.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let shards = b.admin_json("/api/shards");
        let held = shards["shards"][0]["incomplete_packet_bytes"]
            .as_u64()
            .unwrap();
        assert!(held <= 8 << 20, "{held} bytes held in incomplete packets");
        let closed = b.metric("shardmq_incomplete_packet_closes_total{shard=\"0\"}") as usize;
        if closed >= CLIENTS - 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{closed} closed, {held} bytes held"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Those closed heard why; the others are still waiting to finish their packet.
    let mut told = 0;
    for c in &mut clients {
        let soon = Instant::now() + Duration::from_millis(300);
        if let Ok((p, _)) = c.read_frame_until(soon) {
            assert!(
                matches!(&p, Packet::Disconnect(d) if d.reason_code == ReasonCode::QuotaExceeded),
                "{p:?}"
            );
            told += 1;
        }
    }
    assert!(told >= CLIENTS - 8, "{told} told");
    let grown_mib = b.rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!("{CLIENTS} hoarders: RSS grew by {grown_mib} MiB");
    assert!(grown_mib < 64, "RSS grew by {grown_mib} MiB");
    bystander.ping();
}

/// What outlives a packet holds that packet's bytes only, never the connection's read
/// buffer: 64 one-byte retained messages, each sent right behind a 1 MiB junk PUBLISH in
/// the same write (before: each pinned the ~1 MiB buffer it was read into, ~100 MiB for
/// 100 of them), and 64 offline sessions made by CONNECTs carrying ~1 MiB of user properties
/// (before: each session's client id pinned its whole CONNECT) leave the broker's memory
/// far below what was sent.
#[test]
fn kept_items_do_not_pin_the_buffers_they_were_read_from() {
    const N: usize = 64;
    // No $SYS topics: they are retained messages too.
    let b = TestBroker::start_with(1, "[sys]\ninterval_s = 0\n");
    let mut bystander = RawClient::connect_v311(b.addr, "bystander");
    let rss_before = b.rss_kib();

    let mut p = RawClient::connect_v311(b.addr, "junk-then-keep");
    let junk_body = (1 << 20) - 16;
    for i in 0..N {
        let mut bytes = publish_head(junk_body);
        bytes.resize(bytes.len() + junk_body - 3, b'j');
        let mut kept = BytesMut::new();
        publish_packet(
            &format!("keep/{i}"),
            b"k",
            QoS::AtMostOnce,
            true,
            None,
            false,
        )
        .encode(ProtocolVersion::V3_1_1, &mut kept)
        .unwrap();
        bytes.extend_from_slice(&kept);
        p.send_bytes(&bytes);
    }
    p.ping();
    let retained = b.admin_json("/api/shards")["shards"][0]["retained"]
        .as_u64()
        .unwrap();
    assert_eq!(retained, N as u64);

    // ~1 MiB of user properties in each CONNECT (16 pairs of 32 KiB strings).
    let big = "u".repeat(32 * 1024 - 64);
    for i in 0..N {
        let opts = ConnectOpts::v5(&format!("heavy-{i}"), false)
            .expiry(3600)
            .props(|p| {
                p.user_properties = (0..16)
                    .map(|_| {
                        let s = shardmq::protocol::MqttStr::new(&big).unwrap();
                        (s.clone(), s)
                    })
                    .collect()
            });
        let (c, ack) = RawClient::connect_v5(b.addr, &opts);
        assert_eq!(ack.reason_code, ReasonCode::Success);
        c.disconnect();
    }
    bystander.ping();
    assert_eq!(
        b.admin_json("/api/shards")["shards"][0]["sessions"]
            .as_u64()
            .unwrap(),
        N as u64 + 2
    );
    let grown_mib = b.rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!("kept items: RSS grew by {grown_mib} MiB");
    assert!(
        grown_mib < 32,
        "RSS grew by {grown_mib} MiB for {N} tiny retained messages and {N} sessions"
    );
}

/// A CONNECT's announced size reserves nothing: 400 sockets that send only a fixed header
/// announcing a 1 MiB CONNECT and stop cost the broker a few hundred bytes each (before a
/// fix found in review: a 64 KiB read buffer each), until the connect timeout closes them.
#[test]
fn an_announced_connect_size_reserves_no_memory() {
    // Few enough for a default descriptor limit of 1024, with the other tests running.
    const SOCKETS: usize = 400;
    let b = TestBroker::start_with(1, "[limits]\nconnect_timeout_s = 60\n");
    let rss_before = b.rss_kib();
    let mut head = vec![0x10];
    varint((1 << 20) - 5, &mut head);
    let sockets: Vec<TcpStream> = (0..SOCKETS)
        .map(|_| {
            let mut s = TcpStream::connect(b.addr).expect("connect");
            s.write_all(&head).unwrap();
            s
        })
        .collect();
    // Every header is read once a connection made after them all is served.
    RawClient::connect_v311(b.addr, "after-them").ping();
    let grown_kib = b.rss_kib().saturating_sub(rss_before);
    eprintln!("{SOCKETS} announced CONNECTs: RSS grew by {grown_kib} KiB");
    assert!(
        grown_kib < 12 * 1024,
        "{SOCKETS} announced 1 MiB CONNECTs grew RSS by {grown_kib} KiB"
    );
    drop(sockets);
}
