//! MQTT 5.0 behaviour of the real broker, end to end, with 2 shards. Client ids are chosen
//! (`id_on_shard`) so that publisher and subscriber, or a session and whoever observes it,
//! live on different shards; a few cases put them on the same shard where the local path
//! differs.
//!
//! Clients: the raw client of `support::raw` (the broker's own codec over a blocking socket)
//! for byte-level checks, rumqttc's v5 client, and Debian's mosquitto_pub.
//!
//! Nothing here sleeps to synchronise: a test waits for a packet, a message, or a socket
//! closing. To show that something does NOT arrive, a later marker travels the same path and
//! must come first. Only will delay and expiry are time-based by definition; those tests use
//! 1-2 s and one-sided assertions, and say so where they wait.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]
mod support;

use bytes::Bytes;
use shardmq::protocol::{
    Disconnect, MqttStr, Packet, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    SubscriptionOptions, TopicName, WillProperties,
};
use std::num::NonZeroU16;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::raw::{msg, opts, ConnectOpts, RawClient};
use support::{id_on_shard, owner, TestBroker, TIMEOUT};

const SHARDS: usize = 2;

/// A client id that the broker places on `shard`.
fn id(prefix: &str, shard: usize) -> String {
    id_on_shard(prefix, shard, SHARDS)
}

fn s(x: &str) -> MqttStr {
    MqttStr::new(x).unwrap()
}

fn qos1() -> SubscriptionOptions {
    opts(QoS::AtLeastOnce)
}

/// A clean MQTT 5 connection with no properties.
fn connect(b: &TestBroker, client_id: &str) -> RawClient {
    RawClient::connect_v5(b.addr, &ConnectOpts::v5(client_id, true)).0
}

/// A clean MQTT 5 connection subscribed to `filter` at QoS 1.
fn subscriber(b: &TestBroker, client_id: &str, filter: &str) -> RawClient {
    let mut c = connect(b, client_id);
    c.sub(&[(filter, QoS::AtLeastOnce)]);
    c
}

/// The next PUBLISH, acknowledged.
fn next(c: &mut RawClient) -> Publish {
    c.recv_publish_ack()
}

fn payload(p: &Publish) -> &[u8] {
    &p.payload[..]
}

/// Sends PINGREQ and returns every PUBLISH that arrives before the PINGRESP: everything the
/// broker wrote for this connection before it handled the ping (retained messages written
/// right after a SUBACK, say).
fn until_pingresp(c: &mut RawClient) -> Vec<Publish> {
    c.send(&Packet::PingReq);
    let mut got = Vec::new();
    loop {
        match c.recv() {
            Packet::PingResp => return got,
            Packet::Publish(p) => got.push(p),
            other => panic!("expected PUBLISH or PINGRESP, got {other:?}"),
        }
    }
}

fn will_props(f: impl FnOnce(&mut WillProperties)) -> impl FnOnce(&mut shardmq::protocol::Connect) {
    move |c| f(&mut c.will.as_mut().expect("a will").properties)
}

// ------------------------------------------------------------------------ CONNECT / CONNACK

#[test]
fn assigned_client_identifier_names_a_working_session() {
    let b = TestBroker::start(SHARDS);
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("", true).expiry(60));
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("CONNACK carries Assigned Client Identifier (MQTT-3.2.2-16)")
        .as_str()
        .to_string();
    assert!(!assigned.is_empty());
    assert!(!ack.session_present);

    // Another empty id gets another identifier.
    let (_other, ack2) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("", true));
    let other = ack2
        .properties
        .assigned_client_identifier
        .expect("assigned");
    assert_ne!(other.as_str(), assigned);

    // It works: subscribe with it and receive from a publisher on the other shard.
    let home = owner(&assigned, SHARDS);
    let mut p = connect(&b, &id("aci-pub", 1 - home));
    c.sub(&[("aci/t", QoS::AtLeastOnce)]);
    assert_eq!(
        p.publish_v5(msg("aci/t", b"one", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(payload(&next(&mut c)), b"one");

    // The session it names lives where the broker routes that id: reconnecting with the
    // assigned id resumes it.
    c.disconnect();
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&assigned, false).expiry(60));
    assert!(
        ack.session_present,
        "the session of the assigned id was kept"
    );
    assert_eq!(ack.properties.assigned_client_identifier, None);
    p.publish_v5(msg("aci/t", b"two", QoS::AtLeastOnce));
    assert_eq!(payload(&next(&mut c)), b"two");
}

#[test]
fn assigned_client_identifiers_are_unique() {
    let b = TestBroker::start(SHARDS);
    let mut clients = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5("", true));
        let id = ack.properties.assigned_client_identifier.expect("assigned");
        assert!(
            ids.insert(id.as_str().to_string()),
            "MQTT-3.1.3-6: {} was assigned twice",
            id.as_str()
        );
        clients.push(c);
    }
    // Each still has its own session: none was taken over by a later one.
    for c in &mut clients {
        c.ping();
    }
}

#[test]
fn connack_advertises_the_default_limits() {
    let b = TestBroker::start(SHARDS);
    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("cp", 1), true));
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, Some(1024), "{p:?}");
    assert_eq!(p.maximum_packet_size, Some(1024 * 1024), "{p:?}");
    assert_eq!(p.topic_alias_maximum, Some(64), "{p:?}");
    // Clean start without Session Expiry: 0 asked, 0 granted, nothing to say.
    assert_eq!(p.session_expiry_interval, None, "{p:?}");
    assert_eq!(p.server_keep_alive, None, "{p:?}");
    assert_eq!(p.assigned_client_identifier, None, "{p:?}");
}

#[test]
fn connack_advertises_configured_limits_and_server_keep_alive() {
    let b = TestBroker::start_with(
        SHARDS,
        "[limits]\nkeep_alive_max_s = 60\nreceive_maximum = 7\npacket_bytes_max = 4096\ntopic_alias_max = 5\n",
    );
    let (_c, ack) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id("ska", 0), true).keep_alive(120),
    );
    let p = &ack.properties;
    assert_eq!(
        p.server_keep_alive,
        Some(60),
        "asked 120, the maximum is 60: {p:?}"
    );
    assert_eq!(p.receive_maximum, Some(7), "{p:?}");
    assert_eq!(p.maximum_packet_size, Some(4096), "{p:?}");
    assert_eq!(p.topic_alias_maximum, Some(5), "{p:?}");

    // Within the maximum, the client's keep alive stands and no Server Keep Alive is sent.
    for ka in [30, 60] {
        let (_c, ack) = RawClient::connect_v5(
            b.addr,
            &ConnectOpts::v5(&id("ska2", 1), true).keep_alive(ka),
        );
        assert_eq!(ack.properties.server_keep_alive, None, "keep alive {ka}");
    }
}

// ------------------------------------------------------------------------ session expiry

#[test]
fn session_expiry_zero_ends_the_session_at_disconnect() {
    let b = TestBroker::start(SHARDS);
    let sid = id("se0", 1);
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true).expiry(0));
    assert!(!ack.session_present);
    c.sub(&[("se0/t", QoS::AtLeastOnce)]);
    c.disconnect(); // returns once the broker closed: it has processed the DISCONNECT

    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false).expiry(0));
    assert!(
        !ack.session_present,
        "Session Expiry 0: the session ended with the connection"
    );

    // Its subscription left with it: a publisher on the other shard finds no subscriber.
    let mut p = connect(&b, &id("se0-pub", 0));
    assert_eq!(
        p.publish_v5(msg("se0/t", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NoMatchingSubscribers)
    );
}

#[test]
fn session_with_expiry_is_resumed_then_expires() {
    let b = TestBroker::start(SHARDS);
    let sid = id("se2", 1);
    let mut watcher = subscriber(&b, &id("se2-watch", 0), "se2/will");
    let mut p = connect(&b, &id("se2-pub", 0));

    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true).expiry(2));
    c.sub(&[("se2/t", QoS::AtLeastOnce)]);
    c.disconnect();
    assert_eq!(
        p.publish_v5(msg("se2/t", b"queued", QoS::AtLeastOnce)),
        Some(ReasonCode::Success),
        "the offline session still subscribes"
    );

    // Back well within the 2 s: the session and the message queued for it are there. This
    // time the connection carries a will whose delay is longer than the session's life, so
    // the broker publishes it when the session ends: an observable expiry.
    let connect = ConnectOpts::v5(&sid, false)
        .expiry(2)
        .will("se2/will", b"session ended", QoS::AtLeastOnce, false)
        .packet_with(will_props(|w| w.will_delay_interval = Some(3600)));
    let (mut c, ack) = RawClient::connect_packet(b.addr, &connect);
    assert_eq!(ack.reason_code, ReasonCode::Success);
    assert!(ack.session_present, "resumed within the expiry");
    assert_eq!(payload(&next(&mut c)), b"queued");

    // DISCONNECT 0x04 keeps the will; the session expires 2 s later and the will goes then.
    let t0 = Instant::now();
    let sent = c.disconnect_with(Disconnect::new(ReasonCode::DisconnectWithWillMessage));
    assert!(
        sent.is_empty(),
        "the broker accepts DISCONNECT 0x04: {sent:?}"
    );
    let will = next(&mut watcher);
    assert_eq!(payload(&will), b"session ended");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "the session (and its will) ended after {:?}, before its 2 s expiry",
        t0.elapsed()
    );

    // The session is gone: a resume finds nothing and its subscription no longer routes.
    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false).expiry(2));
    assert!(!ack.session_present, "expired");
    assert_eq!(
        p.publish_v5(msg("se2/t", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NoMatchingSubscribers)
    );
}

#[test]
fn disconnect_cannot_give_a_life_to_a_session_created_with_expiry_zero() {
    let b = TestBroker::start(SHARDS);
    let sid = id("sez", 0);
    let (c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true));
    let mut d = Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(10);
    let got = c.disconnect_with(d);
    assert!(
        matches!(&got[..], [Packet::Disconnect(d)] if d.reason_code == ReasonCode::ProtocolError),
        "MQTT-3.14.2-2: expected DISCONNECT 0x82, got {got:?}"
    );
    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false));
    assert!(!ack.session_present);
}

#[test]
fn disconnect_can_shorten_session_expiry_to_zero() {
    let b = TestBroker::start(SHARDS);
    let sid = id("ses", 1);
    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true).expiry(60));
    c.sub(&[("ses/t", QoS::AtLeastOnce)]);
    let mut d = Disconnect::new(ReasonCode::Success);
    d.properties.session_expiry_interval = Some(0);
    let got = c.disconnect_with(d);
    assert!(got.is_empty(), "accepted: {got:?}");
    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false).expiry(60));
    assert!(!ack.session_present, "DISCONNECT set the expiry to 0");
}

#[test]
fn clean_start_false_without_expiry_gets_the_configured_default() {
    let b = TestBroker::start_with(SHARDS, "[sessions]\nsession_expiry_default_s = 321\n");
    let sid = id("sed", 1);
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false));
    assert_eq!(
        ack.properties.session_expiry_interval,
        Some(321),
        "CONNACK tells the client the expiry it got"
    );
    c.sub(&[("sed/t", QoS::AtLeastOnce)]);
    c.disconnect();

    let mut p = connect(&b, &id("sed-pub", 0));
    assert_eq!(
        p.publish_v5(msg("sed/t", b"kept", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false));
    assert!(ack.session_present);
    assert_eq!(payload(&next(&mut c)), b"kept");

    // Clean Start = true without the property keeps the specification's 0.
    let (_c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("sed2", 0), true));
    assert_eq!(ack.properties.session_expiry_interval, None);
}

// ------------------------------------------------------------------------ wills

#[test]
fn will_is_published_after_its_delay() {
    let b = TestBroker::start(SHARDS);
    let mut watcher = subscriber(&b, &id("wd-watch", 0), "wd/w");
    let connect = ConnectOpts::v5(&id("wd", 1), true)
        .expiry(10)
        .will("wd/w", b"late", QoS::AtLeastOnce, false)
        .packet_with(will_props(|w| w.will_delay_interval = Some(1)));
    let (c, _) = RawClient::connect_packet(b.addr, &connect);
    let t0 = Instant::now();
    c.drop_abruptly();
    let will = next(&mut watcher);
    assert_eq!(payload(&will), b"late");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "will sent after {:?}, before its 1 s delay (MQTT-3.1.3-9)",
        t0.elapsed()
    );
}

#[test]
fn will_is_not_published_when_the_client_returns_within_the_delay() {
    let b = TestBroker::start(SHARDS);
    let mut watcher = subscriber(&b, &id("wr-watch", 0), "wr/w");
    let with_will = |cid: &str, body: &[u8]| {
        ConnectOpts::v5(cid, false)
            .expiry(10)
            .will("wr/w", body, QoS::AtLeastOnce, false)
            .packet_with(will_props(|w| w.will_delay_interval = Some(1)))
    };
    let a = id("wr-a", 1);
    let (c, _) = RawClient::connect_packet(b.addr, &with_will(&a, b"A"));
    c.drop_abruptly();
    // Back before the delay (whether the broker saw the close first or takes the session
    // over from the dead connection, the will must not go).
    let (_a, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&a, false).expiry(10));
    assert!(ack.session_present);

    // The marker: a client on the same shard with the same 1 s will delay, gone after A
    // came back. Its will timer is due after A's would have been, and both wills would
    // travel the same way to the watcher, so A's will would arrive first.
    let (m, _) = RawClient::connect_packet(b.addr, &with_will(&id("wr-m", 1), b"M"));
    m.drop_abruptly();
    let first = next(&mut watcher);
    assert_eq!(
        payload(&first),
        b"M",
        "A's will was published although A returned in time"
    );
}

#[test]
fn will_is_published_at_once_when_the_session_ends_before_the_delay() {
    let b = TestBroker::start(SHARDS);
    let mut watcher = subscriber(&b, &id("wz-watch", 0), "wz/w");
    let connect = ConnectOpts::v5(&id("wz", 1), true)
        .expiry(0)
        .will("wz/w", b"now", QoS::AtLeastOnce, false)
        .packet_with(will_props(|w| w.will_delay_interval = Some(5)));
    let (c, _) = RawClient::connect_packet(b.addr, &connect);
    let t0 = Instant::now();
    c.drop_abruptly();
    assert_eq!(payload(&next(&mut watcher)), b"now");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "Session Expiry 0 ends the session at the close, and the will goes with it; it came \
         after {:?}",
        t0.elapsed()
    );
}

#[test]
fn will_properties_are_forwarded() {
    let b = TestBroker::start(SHARDS);
    let mut watcher = subscriber(&b, &id("wp-watch", 0), "wp/w");
    let users = vec![(s("a"), s("2")), (s("c"), s("3")), (s("a"), s("1"))];
    let users2 = users.clone();
    let connect = ConnectOpts::v5(&id("wp", 1), true)
        .will("wp/w", b"bye", QoS::AtLeastOnce, false)
        .packet_with(will_props(move |w| {
            w.will_delay_interval = Some(0);
            w.payload_format_indicator = Some(true);
            w.message_expiry_interval = Some(100);
            w.content_type = Some(s("text/plain"));
            w.response_topic = Some(TopicName::new("wp/reply").unwrap());
            w.correlation_data = Some(Bytes::from_static(b"\x00\x01id"));
            w.user_properties = users2;
        }));
    let (c, _) = RawClient::connect_packet(b.addr, &connect);
    c.drop_abruptly();
    // The raw client decodes with the broker's codec, which refuses any property a PUBLISH
    // may not carry: a Will Delay Interval (0x18) on the forwarded will would fail here.
    let (packet, bytes) = watcher.recv_frame();
    let Packet::Publish(will) = packet else {
        panic!("expected the will, got {packet:?}")
    };
    watcher.ack(&will);
    assert_eq!(payload(&will), b"bye");
    let p = &will.properties;
    assert_eq!(p.user_properties, users, "user properties, in order");
    assert_eq!(p.payload_format_indicator, Some(true));
    assert_eq!(p.content_type, Some(s("text/plain")));
    assert_eq!(p.response_topic.as_deref(), Some("wp/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x01id"[..]));
    let mei = p
        .message_expiry_interval
        .expect("Message Expiry Interval forwarded");
    assert!((90..=100).contains(&mei), "{mei}");
    assert_eq!(p.topic_alias, None);
    assert!(p.subscription_identifiers.is_empty());
    assert!(!bytes.is_empty());
}

// ------------------------------------------------------------------------ message expiry

#[test]
fn message_expiry_applies_while_queued() {
    let b = TestBroker::start(SHARDS);
    let sid = id("me", 1);
    let (mut c, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true).expiry(60));
    c.sub(&[("me/t", QoS::AtLeastOnce), ("me/sync", QoS::AtLeastOnce)]);
    c.disconnect();

    let mut p = connect(&b, &id("me-pub", 0));
    let expiring = |body: &[u8], mei: u32| {
        let mut m = msg("me/t", body, QoS::AtLeastOnce);
        m.properties.message_expiry_interval = Some(mei);
        m
    };
    p.publish_v5(expiring(b"stale", 1));
    p.publish_v5(expiring(b"fresh", 10));
    let mut r = msg("me/r", b"retained stale", QoS::AtLeastOnce);
    r.retain = true;
    r.properties.message_expiry_interval = Some(1);
    p.publish_v5(r);
    let mut r2 = msg("me/r2", b"retained", QoS::AtLeastOnce);
    r2.retain = true;
    p.publish_v5(r2);

    // Expiry is defined in time: let the 1 s messages age past their interval.
    std::thread::sleep(Duration::from_millis(2100));
    p.publish_v5(msg("me/t", b"marker", QoS::AtLeastOnce));
    p.publish_v5(msg("me/sync", b"sync", QoS::AtLeastOnce));

    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false).expiry(60));
    assert!(ack.session_present);
    let first = next(&mut c);
    assert_eq!(
        payload(&first),
        b"fresh",
        "the expired message must not be delivered"
    );
    let mei = first
        .properties
        .message_expiry_interval
        .expect("remaining expiry");
    assert!((1..10).contains(&mei), "MEI is the time left: {mei}");
    let marker = next(&mut c);
    assert_eq!(payload(&marker), b"marker");
    assert_eq!(marker.properties.message_expiry_interval, None);
    // "sync" came through the same shards after the retained messages: both are stored on
    // this shard by now. The expired one is not sent on subscribe.
    assert_eq!(payload(&next(&mut c)), b"sync");
    let got = c.subscribe_v5(&[("me/r", qos1()), ("me/r2", qos1())], None);
    assert_eq!(got.reason_codes, [ReasonCode::GrantedQoS1; 2]);
    let retained: Vec<_> = until_pingresp(&mut c);
    let topics: Vec<&str> = retained.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(
        topics,
        ["me/r2"],
        "an expired retained message is not delivered"
    );
}

// ------------------------------------------------------------------------ topic aliases

#[test]
fn client_topic_aliases_register_and_resolve() {
    let b = TestBroker::start(SHARDS);
    let mut sub = subscriber(&b, &id("tac-sub", 0), "tac/#");
    let (mut p, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("tac-pub", 1), true));
    assert_eq!(ack.properties.topic_alias_maximum, Some(64));
    let aliased = |t: &str, body: &[u8], alias: u16| {
        let mut m = Publish {
            topic: if t.is_empty() {
                TopicName::empty()
            } else {
                TopicName::new(t).unwrap()
            },
            ..msg("x", body, QoS::AtLeastOnce)
        };
        m.properties.topic_alias = NonZeroU16::new(alias);
        m
    };
    for (t, body, alias, want) in [
        ("tac/one", "1", 1, "tac/one"),
        ("", "2", 1, "tac/one"),
        ("tac/two", "3", 1, "tac/two"), // the alias is mapped again
        ("", "4", 1, "tac/two"),
        ("tac/three", "5", 2, "tac/three"),
        ("", "6", 2, "tac/three"),
        ("", "7", 1, "tac/two"),
    ] {
        assert_eq!(
            p.publish_v5(aliased(t, body.as_bytes(), alias)),
            Some(ReasonCode::Success)
        );
        let got = next(&mut sub);
        assert_eq!((got.topic.as_str(), payload(&got)), (want, body.as_bytes()));
        assert_eq!(
            got.properties.topic_alias, None,
            "the subscriber set no alias maximum"
        );
    }
}

#[test]
fn client_topic_alias_zero_above_maximum_or_unknown_is_refused() {
    let b = TestBroker::start_with(SHARDS, "[limits]\ntopic_alias_max = 2\n");
    // Topic Alias 0 cannot be built with the codec: raw bytes. PUBLISH QoS 0, topic "t/a",
    // properties: Topic Alias (0x23) = 0, payload "x".
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("tz", 0), true));
    assert_eq!(ack.properties.topic_alias_maximum, Some(2));
    c.send_bytes(&[0x30, 10, 0, 3, b't', b'/', b'a', 3, 0x23, 0, 0, b'x']);
    assert_eq!(
        c.expect_disconnect(),
        ReasonCode::TopicAliasInvalid,
        "MQTT-3.3.2-8"
    );

    let mut c = connect(&b, &id("tz2", 1));
    let mut m = msg("t/a", b"x", QoS::AtLeastOnce);
    m.properties.topic_alias = NonZeroU16::new(3);
    m.packet_id = Some(support::raw::pid(1));
    c.send(&Packet::Publish(m));
    assert_eq!(
        c.expect_disconnect(),
        ReasonCode::TopicAliasInvalid,
        "MQTT-3.3.2-9"
    );

    // An alias-only PUBLISH with an alias this connection never set.
    let mut c = connect(&b, &id("tz3", 0));
    let mut m = msg("t/a", b"x", QoS::AtMostOnce);
    m.topic = TopicName::empty();
    m.properties.topic_alias = NonZeroU16::new(1);
    c.send(&Packet::Publish(m));
    assert_eq!(c.expect_disconnect(), ReasonCode::ProtocolError);
}

#[test]
fn server_assigns_topic_aliases_only_when_the_client_allows() {
    let b = TestBroker::start(SHARDS);
    let aliasing = id("tas", 0);
    let with_max = |cid: &str, clean: bool, max: Option<u16>| {
        ConnectOpts::v5(cid, clean)
            .expiry(60)
            .props(|p| p.topic_alias_maximum = max)
    };
    let (mut a, _) = RawClient::connect_v5(b.addr, &with_max(&aliasing, true, Some(1)));
    a.sub(&[("tas/#", QoS::AtLeastOnce)]);
    let (mut none, _) = RawClient::connect_v5(b.addr, &with_max(&id("tas-none", 1), true, None));
    none.sub(&[("tas/#", QoS::AtLeastOnce)]);
    let (mut zero, _) = RawClient::connect_v5(b.addr, &with_max(&id("tas-zero", 0), true, Some(0)));
    zero.sub(&[("tas/#", QoS::AtLeastOnce)]);

    let mut p = connect(&b, &id("tas-pub", 1));
    let sends = [
        ("tas/x", QoS::AtMostOnce),
        ("tas/x", QoS::AtLeastOnce),
        ("tas/y", QoS::AtLeastOnce),
        ("tas/x", QoS::ExactlyOnce),
    ];
    for (i, (t, q)) in sends.iter().enumerate() {
        p.publish_v5(msg(t, format!("{i}").as_bytes(), *q));
    }
    // Topic Alias Maximum 1: the first PUBLISH on a topic carries topic and alias, later ones
    // the alias and an empty topic; with the one alias taken, another topic goes in full.
    let got: Vec<(String, Option<u16>)> = (0..4)
        .map(|_| {
            let m = next(&mut a);
            (
                m.topic.to_string(),
                m.properties.topic_alias.map(|x| x.get()),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("tas/x".to_string(), Some(1)),
            (String::new(), Some(1)),
            ("tas/y".to_string(), None),
            (String::new(), Some(1)),
        ]
    );
    for c in [&mut none, &mut zero] {
        for (t, _) in sends {
            let m = next(c);
            assert_eq!(m.topic.as_str(), t);
            assert_eq!(
                m.properties.topic_alias, None,
                "the client allowed no aliases"
            );
        }
    }

    // Aliases belong to one connection: after a reconnect the topic is sent again.
    a.disconnect();
    let (mut a, ack) = RawClient::connect_v5(b.addr, &with_max(&aliasing, false, Some(1)));
    assert!(ack.session_present);
    p.publish_v5(msg("tas/x", b"again", QoS::AtLeastOnce));
    let m = next(&mut a);
    assert_eq!(m.topic.as_str(), "tas/x");
    assert_eq!(m.properties.topic_alias.map(|x| x.get()), Some(1));
}

// ------------------------------------------------------------------------ packet size

#[test]
fn client_maximum_packet_size_is_respected() {
    let b = TestBroker::start(SHARDS);
    let (mut sub, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id("mps-sub", 0), true).props(|p| p.maximum_packet_size = Some(64)),
    );
    sub.sub(&[("mps/t", QoS::AtLeastOnce)]);
    let mut p = connect(&b, &id("mps-pub", 1));
    assert_eq!(
        p.publish_v5(msg("mps/t", &[b'x'; 100], QoS::AtLeastOnce)),
        Some(ReasonCode::Success),
        "the publisher's message is acknowledged though one receiver cannot take it"
    );
    p.publish_v5(msg("mps/t", b"fits", QoS::AtLeastOnce));
    let first = next(&mut sub);
    assert_eq!(
        payload(&first),
        b"fits",
        "MQTT-3.1.2-24: nothing above 64 bytes is sent"
    );
}

#[test]
fn packet_above_the_broker_maximum_is_refused() {
    let b = TestBroker::start_with(SHARDS, "[limits]\npacket_bytes_max = 1024\n");
    let mut sub = subscriber(&b, &id("pmax-sub", 0), "pmax/t");
    let (mut p, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("pmax", 1), true));
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    // Exactly at the limit: accepted.
    let v5 = shardmq::protocol::ProtocolVersion::V5;
    let sized = |total: usize, fill: u8, packet_id: u16| {
        let mut m = msg("pmax/t", b"", QoS::AtLeastOnce);
        m.packet_id = Some(support::raw::pid(packet_id));
        // The remaining length's own size grows with the payload: settle it by iterating.
        let mut len = total - Packet::Publish(m.clone()).encoded_len(v5);
        loop {
            m.payload = Bytes::from(vec![fill; len]);
            let now = Packet::Publish(m.clone()).encoded_len(v5);
            if now == total {
                return m;
            }
            len = len + total - now;
        }
    };
    let m = sized(1024, b'a', 1);
    let len = m.payload.len();
    assert_eq!(p.publish_v5(m), Some(ReasonCode::Success));
    assert_eq!(next(&mut sub).payload.len(), len);
    // One byte more: DISCONNECT 0x95, and the message goes nowhere.
    p.send(&Packet::Publish(sized(1025, b'b', 2)));
    assert_eq!(p.expect_disconnect(), ReasonCode::PacketTooLarge);
    let mut other = connect(&b, &id("pmax-2", 1));
    other.publish_v5(msg("pmax/t", b"marker", QoS::AtLeastOnce));
    assert_eq!(payload(&next(&mut sub)), b"marker");
}

// ------------------------------------------------------------------------ subscribe options

#[test]
fn subscription_identifiers_one_publish_per_client_with_every_matching_id() {
    let b = TestBroker::start(SHARDS);
    let mut remote = connect(&b, &id("si-b", 1));
    remote.subscribe_v5(&[("si/a", qos1())], Some(2));
    remote.subscribe_v5(&[("si/#", opts(QoS::ExactlyOnce))], Some(3));
    remote.subscribe_v5(&[("si/+", opts(QoS::AtMostOnce))], None);
    // On the publisher's shard: the local path.
    let mut local = connect(&b, &id("si-a", 0));
    local.subscribe_v5(&[("si/a", qos1())], Some(456_789));
    let mut p = connect(&b, &id("si-pub", 0));

    p.publish_v5(msg("si/a", b"1", QoS::AtLeastOnce));
    p.publish_v5(msg("si/a", b"2", QoS::AtLeastOnce));
    p.publish_v5(msg("si/b", b"3", QoS::AtLeastOnce));
    let ids = |m: &Publish| {
        let mut v = m.properties.subscription_identifiers.clone();
        v.sort_unstable();
        v
    };
    // One PUBLISH per message, never one per matching subscription.
    for body in [b"1", b"2"] {
        let m = next(&mut remote);
        assert_eq!(payload(&m), body);
        assert_eq!(ids(&m), [2, 3]);
        assert_eq!(
            m.qos,
            QoS::AtLeastOnce,
            "the highest QoS of the matching subscriptions"
        );
        let m = next(&mut local);
        assert_eq!(payload(&m), body);
        assert_eq!(ids(&m), [456_789]);
    }
    let m = next(&mut remote);
    assert_eq!(payload(&m), b"3");
    assert_eq!(ids(&m), [3], "si/b matches si/# (id 3) and si/+ (no id)");

    // A new SUBSCRIBE to the same filter replaces its identifier.
    remote.subscribe_v5(&[("si/a", qos1())], Some(7));
    p.publish_v5(msg("si/a", b"4", QoS::AtLeastOnce));
    assert_eq!(ids(&next(&mut remote)), [3, 7]);
}

#[test]
fn no_local_keeps_own_messages_away() {
    let b = TestBroker::start(SHARDS);
    let no_local = SubscriptionOptions {
        no_local: true,
        ..qos1()
    };
    let mut a = connect(&b, &id("nl-a", 0));
    a.subscribe_v5(&[("nl/t", no_local), ("nl/marker", qos1())], None);
    let mut other = connect(&b, &id("nl-b", 1));
    other.subscribe_v5(&[("nl/t", no_local)], None);

    a.publish_v5(msg("nl/t", b"own", QoS::AtLeastOnce));
    assert_eq!(
        payload(&next(&mut other)),
        b"own",
        "No Local is about the publisher only"
    );
    a.publish_v5(msg("nl/marker", b"marker", QoS::AtLeastOnce));
    assert_eq!(
        payload(&next(&mut a)),
        b"marker",
        "MQTT-3.8.3-3: own message sent back"
    );

    other.publish_v5(msg("nl/t", b"theirs", QoS::AtLeastOnce));
    assert_eq!(payload(&next(&mut a)), b"theirs");
}

#[test]
fn retain_as_published_keeps_the_flag_on_forwarded_messages() {
    let b = TestBroker::start(SHARDS);
    let rap = SubscriptionOptions {
        retain_as_published: true,
        ..qos1()
    };
    let mut keeps = connect(&b, &id("rap-1", 1));
    keeps.subscribe_v5(&[("rap/t", rap)], None);
    let mut clears = connect(&b, &id("rap-0", 1));
    clears.subscribe_v5(&[("rap/t", qos1())], None);
    let mut p = connect(&b, &id("rap-pub", 0));
    let mut r = msg("rap/t", b"retained", QoS::AtLeastOnce);
    r.retain = true;
    p.publish_v5(r);
    p.publish_v5(msg("rap/t", b"plain", QoS::AtLeastOnce));

    let flags = |c: &mut RawClient| [next(c).retain, next(c).retain];
    assert_eq!(flags(&mut keeps), [true, false], "Retain As Published");
    assert_eq!(flags(&mut clears), [false, false], "MQTT-3.3.1-12");

    // A retained message sent because of a new subscription always has RETAIN = 1. (The
    // live messages above came after it from the same shard: it is stored here already.)
    let mut late = connect(&b, &id("rap-late", 1));
    late.subscribe_v5(&[("rap/t", qos1())], None);
    let got = until_pingresp(&mut late);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
    assert_eq!(payload(&got[0]), b"retained");
}

#[test]
fn retain_handling_0_1_2() {
    let b = TestBroker::start(SHARDS);
    let mut c = connect(&b, &id("rh", 1));
    c.sub(&[("rh-sync", QoS::AtLeastOnce)]);
    let mut p = connect(&b, &id("rh-pub", 0));
    for (t, q) in [("rh/a", QoS::AtLeastOnce), ("rh/b", QoS::AtMostOnce)] {
        let mut r = msg(t, t.as_bytes(), q);
        r.retain = true;
        p.publish_v5(r);
    }
    // Sent after the retained messages from the same shard: once it is here, so are they.
    p.publish_v5(msg("rh-sync", b"sync", QoS::AtLeastOnce));
    assert_eq!(payload(&next(&mut c)), b"sync");

    let subscribe = |c: &mut RawClient, f: &str, rh: RetainHandling| {
        let o = SubscriptionOptions {
            retain_handling: rh,
            ..qos1()
        };
        assert_eq!(
            c.subscribe_v5(&[(f, o)], None).reason_codes,
            [ReasonCode::GrantedQoS1]
        );
        let mut got: Vec<(String, QoS, bool)> = until_pingresp(c)
            .into_iter()
            .map(|m| {
                c.ack(&m);
                (m.topic.to_string(), m.qos, m.retain)
            })
            .collect();
        got.sort();
        got
    };
    let none: Vec<(String, QoS, bool)> = Vec::new();
    let both = vec![
        ("rh/a".to_string(), QoS::AtLeastOnce, true),
        ("rh/b".to_string(), QoS::AtMostOnce, true),
    ];
    assert_eq!(
        subscribe(&mut c, "rh/+", RetainHandling::SendAtSubscribe),
        both
    );
    assert_eq!(
        subscribe(&mut c, "rh/+", RetainHandling::SendAtSubscribe),
        both,
        "0: sent again on every SUBSCRIBE"
    );
    assert_eq!(
        subscribe(&mut c, "rh/+", RetainHandling::SendAtSubscribeIfNew),
        none,
        "1: the subscription exists"
    );
    assert_eq!(
        subscribe(&mut c, "rh/#", RetainHandling::SendAtSubscribeIfNew),
        both,
        "1: a new subscription"
    );
    assert_eq!(
        subscribe(&mut c, "rh/a", RetainHandling::DoNotSend),
        [],
        "2: never"
    );
}

#[test]
fn retained_message_is_there_for_a_subscribe_after_its_puback() {
    // Retained messages live on the topic's home shard, with a copy on every shard. A
    // SUBSCRIBE sent after the PUBACK, by the publisher or by a client on the other shard,
    // finds the message: topics whose home is not the publisher's shard.
    let b = TestBroker::start(SHARDS);
    let mut publisher = connect(&b, &id("rv", 0));
    let mut other = connect(&b, &id("rv-other", 1));
    let topics = (0..)
        .map(|i| format!("rv/{i}"))
        .filter(|t| owner(t, SHARDS) == 1)
        .take(10);
    for t in topics {
        let mut m = msg(&t, b"kept", QoS::AtLeastOnce);
        m.retain = true;
        assert_eq!(
            publisher.publish_v5(m),
            Some(ReasonCode::NoMatchingSubscribers)
        );
        for c in [&mut publisher, &mut other] {
            c.sub(&[(t.as_str(), QoS::AtLeastOnce)]);
            let got = until_pingresp(c);
            assert_eq!(got.len(), 1, "{t}: the retained message after its PUBACK");
            assert!(got[0].retain);
            c.ack(&got[0]);
        }
    }
}

// ------------------------------------------------------------------------ properties

fn rich_properties() -> PublishProperties {
    PublishProperties {
        payload_format_indicator: Some(true),
        response_topic: Some(TopicName::new("pf/reply").unwrap()),
        correlation_data: Some(Bytes::from_static(b"\x00\xffcorr")),
        user_properties: vec![(s("a"), s("2")), (s("c"), s("3")), (s("a"), s("1"))],
        content_type: Some(s("application/json")),
        ..Default::default()
    }
}

#[test]
fn publish_properties_are_forwarded_unchanged() {
    let b = TestBroker::start(SHARDS);
    let mut sub = connect(&b, &id("pf-sub", 1));
    sub.subscribe_v5(&[("pf/t", opts(QoS::ExactlyOnce))], None);
    let mut p = connect(&b, &id("pf-pub", 0));
    for q in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut m = msg("pf/t", b"{}", q);
        m.properties = rich_properties();
        p.publish_v5(m);
        let got = next(&mut sub);
        assert_eq!(got.qos, q);
        assert_eq!(got.properties, rich_properties(), "QoS {q:?}");
    }
}

#[test]
fn mosquitto_pub_v5_properties_reach_the_subscriber() {
    let b = TestBroker::start(SHARDS);
    let mut sub = subscriber(&b, &id("mq-sub", 1), "mq/t");
    let status = Command::new("mosquitto_pub")
        .args(["-V", "5", "-h", "127.0.0.1", "-p", &b.port().to_string()])
        .args([
            "-i",
            &id("mq-pub", 0),
            "-t",
            "mq/t",
            "-m",
            "hello",
            "-q",
            "1",
        ])
        .args(["-D", "publish", "user-property", "a", "2"])
        .args(["-D", "publish", "user-property", "c", "3"])
        .args(["-D", "publish", "content-type", "text/plain"])
        .args(["-D", "publish", "response-topic", "mq/reply"])
        .args(["-D", "publish", "correlation-data", "c0rr"])
        .args(["-D", "publish", "payload-format-indicator", "1"])
        .args(["-D", "publish", "message-expiry-interval", "60"])
        .stdout(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    let m = next(&mut sub);
    assert_eq!(payload(&m), b"hello");
    let p = &m.properties;
    assert_eq!(p.user_properties, [(s("a"), s("2")), (s("c"), s("3"))]);
    assert_eq!(p.content_type, Some(s("text/plain")));
    assert_eq!(p.response_topic.as_deref(), Some("mq/reply"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"c0rr"[..]));
    assert_eq!(p.payload_format_indicator, Some(true));
    assert!(matches!(p.message_expiry_interval, Some(50..=60)), "{p:?}");
}

#[test]
fn request_response_with_rumqttc() {
    use rumqttc::v5::mqttbytes::v5::{Packet as RPacket, PublishProperties as RProps};
    use rumqttc::v5::mqttbytes::QoS as RQoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    use std::sync::mpsc;

    let b = TestBroker::start(SHARDS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Each client's event loop runs on the runtime; its incoming packets go to a channel.
    let start = |cid: String| {
        let (client, mut el) = AsyncClient::new(MqttOptions::new(cid, "127.0.0.1", b.port()), 16);
        let (tx, rx) = mpsc::channel();
        rt.spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(p) = ev {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
            }
        });
        (client, rx)
    };
    fn wait_for<T>(rx: &mpsc::Receiver<RPacket>, mut pick: impl FnMut(RPacket) -> Option<T>) -> T {
        loop {
            if let Some(t) = pick(rx.recv_timeout(TIMEOUT).expect("rumqttc packet")) {
                return t;
            }
        }
    }
    let publish = |rx: &mpsc::Receiver<RPacket>| {
        wait_for(rx, |p| match p {
            RPacket::Publish(p) => Some(p),
            _ => None,
        })
    };
    let (requester, req_rx) = start(id("rr-req", 0));
    let (responder, resp_rx) = start(id("rr-resp", 1));
    for (c, rx, f) in [
        (&requester, &req_rx, "rr/reply/1"),
        (&responder, &resp_rx, "rr/service"),
    ] {
        c.try_subscribe(f, RQoS::AtLeastOnce).unwrap();
        wait_for(rx, |p| matches!(p, RPacket::SubAck(_)).then_some(()));
    }

    let props = RProps {
        response_topic: Some("rr/reply/1".into()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    requester
        .try_publish_with_properties("rr/service", RQoS::AtLeastOnce, false, "ping", props)
        .unwrap();
    let req = publish(&resp_rx);
    let rp = req.properties.expect("request properties");
    assert_eq!(rp.response_topic.as_deref(), Some("rr/reply/1"));
    assert_eq!(rp.correlation_data.as_deref(), Some(&b"req-42"[..]));
    assert_eq!(rp.user_properties, [("k".to_string(), "v".to_string())]);
    assert_eq!(rp.topic_alias, None, "no alias the client did not ask for");
    assert!(rp.subscription_identifiers.is_empty());

    // Reply the way a responder does: to the response topic, echoing the correlation data.
    let reply = RProps {
        correlation_data: rp.correlation_data.clone(),
        ..Default::default()
    };
    responder
        .try_publish_with_properties(
            rp.response_topic.unwrap(),
            RQoS::AtLeastOnce,
            false,
            "pong",
            reply,
        )
        .unwrap();
    let resp = publish(&req_rx);
    assert_eq!(&resp.topic[..], b"rr/reply/1");
    assert_eq!(&resp.payload[..], b"pong");
    assert_eq!(
        resp.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"req-42"[..])
    );
}

// ------------------------------------------------------------------------ flow control

#[test]
fn client_receive_maximum_is_honoured() {
    let b = TestBroker::start(SHARDS);
    let (mut sub, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id("rm-sub", 1), true).props(|p| p.receive_maximum = Some(2)),
    );
    sub.sub(&[("rm/t", QoS::AtLeastOnce)]);
    let mut p = connect(&b, &id("rm-pub", 0));
    for body in [b"1", b"2", b"3"] {
        p.publish_v5(msg("rm/t", body, QoS::AtLeastOnce));
    }
    // QoS 0 is not held by the window (and may overtake QoS 1, MQTT 4.6): sent after the
    // third QoS 1 message, it arrives before it exactly when the window holds that one.
    p.publish_v5(msg("rm/t", b"marker", QoS::AtMostOnce));
    let m1 = sub.recv_publish();
    let m2 = sub.recv_publish();
    let m = sub.recv_publish();
    assert_eq!([payload(&m1), payload(&m2)], [b"1", b"2"]);
    assert_eq!(
        (payload(&m), m.qos),
        (&b"marker"[..], QoS::AtMostOnce),
        "MQTT-3.3.4-9: a third QoS 1 PUBLISH while 2 are unacknowledged"
    );
    sub.ack(&m1);
    let m3 = sub.recv_publish();
    assert_eq!(
        payload(&m3),
        b"3",
        "sent once an acknowledgement frees the window"
    );
    sub.ack(&m2);
    sub.ack(&m3);
}

#[test]
fn exceeding_the_broker_receive_maximum_is_disconnected() {
    let b = TestBroker::start_with(SHARDS, "[limits]\nreceive_maximum = 2\n");
    let (mut c, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("rmx", 1), true));
    assert_eq!(ack.properties.receive_maximum, Some(2));
    for n in 1..=3u16 {
        let mut m = msg("rmx/t", b"x", QoS::ExactlyOnce);
        m.packet_id = Some(support::raw::pid(n));
        c.send(&Packet::Publish(m));
    }
    let got = c.expect_closed();
    let kinds: Vec<String> = got
        .iter()
        .map(|p| match p {
            Packet::PubRec(a) => format!("PUBREC {}", a.packet_id.get()),
            Packet::Disconnect(d) => format!("DISCONNECT {:#04x}", d.reason_code.as_u8()),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["PUBREC 1", "PUBREC 2", "DISCONNECT 0x93"],
        "MQTT-3.3.4-8"
    );
}

// ------------------------------------------------------------------------ connection errors

#[test]
fn session_takeover_sends_disconnect_0x8e_to_the_old_connection() {
    let b = TestBroker::start(SHARDS);
    let sid = id("tk", 1);
    let (mut old, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, true).expiry(60));
    old.sub(&[("tk/t", QoS::AtLeastOnce)]);
    let (mut new, ack) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sid, false).expiry(60));
    assert!(ack.session_present);
    assert_eq!(
        old.expect_disconnect(),
        ReasonCode::SessionTakenOver,
        "MQTT-3.1.4-3"
    );
    let mut p = connect(&b, &id("tk-pub", 0));
    p.publish_v5(msg("tk/t", b"to the new one", QoS::AtLeastOnce));
    assert_eq!(payload(&next(&mut new)), b"to the new one");
}

#[test]
fn malformed_packet_disconnects_only_its_sender() {
    let b = TestBroker::start(SHARDS);
    let mut far = subscriber(&b, &id("mf-far", 0), "mf/#");
    let mut near = subscriber(&b, &id("mf-near", 1), "mf/#");

    // A PUBLISH whose topic is not UTF-8 (0xC3 0x28), from a client with a will.
    let (mut bad, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id("mf-bad", 1), true).will("mf/will", b"gone", QoS::AtLeastOnce, false),
    );
    bad.send_bytes(&[0x30, 6, 0, 2, 0xC3, 0x28, 0, b'x']);
    assert_eq!(bad.expect_disconnect(), ReasonCode::MalformedPacket);
    // The connection was not closed normally: its will goes out.
    for c in [&mut far, &mut near] {
        assert_eq!(payload(&next(c)), b"gone");
    }

    // A SUBSCRIBE with reserved option bits set (MQTT-3.8.3-5).
    let mut bad2 = connect(&b, &id("mf-bad2", 0));
    bad2.send_bytes(&[0x82, 9, 0, 1, 0, 0, 3, b'a', b'/', b'b', 0xC1]);
    assert_eq!(bad2.expect_disconnect(), ReasonCode::MalformedPacket);

    let mut good = connect(&b, &id("mf-good", 0));
    good.publish_v5(msg("mf/ok", b"still here", QoS::AtLeastOnce));
    for c in [&mut far, &mut near] {
        assert_eq!(payload(&next(c)), b"still here");
    }
}

#[test]
fn ack_says_no_matching_subscribers_when_nobody_subscribes() {
    let b = TestBroker::start(SHARDS);
    let mut p = connect(&b, &id("nm-pub", 0));
    assert_eq!(
        p.publish_v5(msg("nm/t", b"x", QoS::AtLeastOnce)),
        Some(ReasonCode::NoMatchingSubscribers)
    );
    assert_eq!(
        p.publish_v5(msg("nm/t", b"x", QoS::ExactlyOnce)),
        Some(ReasonCode::NoMatchingSubscribers)
    );
    let mut sub = subscriber(&b, &id("nm-sub", 1), "nm/#");
    assert_eq!(
        p.publish_v5(msg("nm/t", b"y", QoS::AtLeastOnce)),
        Some(ReasonCode::Success)
    );
    assert_eq!(payload(&next(&mut sub)), b"y");
}
