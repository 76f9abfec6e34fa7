//! The frames' round trips and hostile bytes.

use super::*;

fn split(buf: &BytesMut) -> (u8, Bytes) {
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    assert_eq!(len + 4, buf.len());
    (buf[4], Bytes::copy_from_slice(&buf[5..]))
}

#[test]
fn a_message_round_trips_with_its_properties_and_age() {
    let now = Instant::now();
    let properties = PublishProperties {
        message_expiry_interval: Some(60),
        content_type: Some(MqttStr::new("text/plain").unwrap()),
        topic_alias: std::num::NonZeroU16::new(3),
        ..PublishProperties::default()
    };
    let msg = Message {
        topic: TopicName::new("a/b").unwrap(),
        payload: Bytes::from_static(b"hello"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties,
        origin: Some(MqttStr::new("pub-1").unwrap()),
        qos2_id: None,
        created: now - Duration::from_millis(1500),
        groups: None,
    };
    let mut buf = BytesMut::new();
    publish(
        &mut buf,
        7,
        &msg,
        ["$share/g/a/+", "$share/h/#"].iter(),
        now,
    );
    let (kind, body) = split(&buf);
    let Frame::Publish { id, msg: back } = decode(kind, body.clone(), now).unwrap() else {
        panic!("not a publish");
    };
    assert_eq!(id, 7);
    // The receiving node delivers it to the groups named, and to no other.
    assert!(back.serves_group("$share/g/a/+") && back.serves_group("$share/h/#"));
    assert!(!back.serves_group("$share/x/a/+"));
    // A key that is not a shared subscription is refused.
    let mut bad = BytesMut::new();
    publish(&mut bad, 7, &msg, ["a/+"].iter(), now);
    let (kind, body) = split(&bad);
    assert!(decode(kind, body, now).is_err());
    assert_eq!(back.topic, msg.topic);
    assert_eq!(back.payload, msg.payload);
    assert_eq!(back.qos, QoS::AtLeastOnce);
    assert!(back.retain);
    assert_eq!(back.origin, msg.origin);
    assert_eq!(back.properties.message_expiry_interval, Some(60));
    assert_eq!(back.properties.content_type, msg.properties.content_type);
    // The alias belongs to one hop.
    assert_eq!(back.properties.topic_alias, None);
    assert_eq!(
        now.duration_since(back.created),
        Duration::from_millis(1500)
    );
}

#[test]
fn the_releases_a_node_missed_are_asked_for_and_come_in_parts() {
    let now = Instant::now();
    let mut buf = BytesMut::new();
    missed_wanted(&mut buf, 9, "c");
    let (k, b) = split(&buf);
    assert!(matches!(decode(k, b, now), Ok(Frame::MissedWanted { id: 9, node }) if node == "c"));
    let kept: Vec<(MqttStr, Option<u16>)> = (0..MISSED_PER_FRAME + 3)
        .map(|i| {
            let o = MqttStr::new(&format!("p{}", i % 7)).unwrap();
            (o, (i % 5 != 0).then_some(i as u16 + 1))
        })
        .collect();
    // Long origins: parts are cut by bytes before they reach the count.
    let long: Vec<(MqttStr, Option<u16>)> = (0..100)
        .map(|i| {
            (
                MqttStr::new(&format!("{i}{}", "o".repeat(1000))).unwrap(),
                Some(1),
            )
        })
        .collect();
    for want in [&kept[..0], &kept[..], &long[..]] {
        let mut buf = BytesMut::new();
        missed(&mut buf, 4, want);
        let mut rest = &buf[..];
        let mut got = Vec::new();
        let mut lasts = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let body = Bytes::copy_from_slice(&rest[5..4 + len]);
            let Ok(Frame::Missed { id, last, releases }) = decode(rest[4], body, now) else {
                panic!("not a MISSED frame");
            };
            assert_eq!(id, 4);
            assert!(len <= MISSED_PART_BYTES + 64, "a part of {len} bytes");
            lasts.push(last);
            got.extend(releases);
            rest = &rest[4 + len..];
        }
        assert_eq!(got, want, "every release, in order");
        let parts = lasts.len();
        assert!(parts >= want.len().div_ceil(MISSED_PER_FRAME).max(1));
        assert!(lasts[..parts - 1].iter().all(|l| !l) && lasts[parts - 1]);
    }
    // A part claiming more than a frame may hold, or a packet id 0, is refused.
    let mut body = BytesMut::new();
    body.put_u64(1);
    body.put_u8(1);
    body.put_u16(MISSED_PER_FRAME as u16 + 1);
    assert!(decode(MISSED, body.freeze(), now).is_err());
    let mut body = BytesMut::new();
    body.put_u64(1);
    body.put_u8(1);
    body.put_u16(1);
    body.put_u8(1);
    body.put_u16(0);
    put_str(&mut body, "p");
    assert!(decode(MISSED, body.freeze(), now).is_err());
}

#[test]
fn a_qos2_key_and_a_release_round_trip() {
    let now = Instant::now();
    let msg = Message {
        topic: TopicName::new("q").unwrap(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::ExactlyOnce,
        retain: false,
        properties: PublishProperties::default(),
        origin: Some(MqttStr::new("p").unwrap()),
        qos2_id: Some(Qos2Id {
            packet_id: 9,
            dup: true,
        }),
        created: now,
        groups: None,
    };
    let mut buf = BytesMut::new();
    publish(&mut buf, 1, &msg, std::iter::empty::<&str>(), now);
    let (k, b) = split(&buf);
    let Ok(Frame::Publish { msg: back, .. }) = decode(k, b, now) else {
        panic!("not a publish");
    };
    assert_eq!(back.qos2_id, msg.qos2_id);
    assert!(
        !back.serves_group("$share/g/q"),
        "no group named, none served"
    );
    let mut buf = BytesMut::new();
    release(&mut buf, 4, "p", Some(9));
    let (k, b) = split(&buf);
    let Ok(Frame::Release {
        id: 4,
        origin,
        packet_id: Some(9),
    }) = decode(k, b, now)
    else {
        panic!("not a release");
    };
    assert_eq!(origin.as_str(), "p");
    let mut buf = BytesMut::new();
    release(&mut buf, 0, "p", None);
    let (k, b) = split(&buf);
    assert!(matches!(
        decode(k, b, now),
        Ok(Frame::Release {
            packet_id: None,
            ..
        })
    ));
    let mut buf = BytesMut::new();
    forget(&mut buf, "sub", "p", 9);
    let (k, b) = split(&buf);
    let Ok(Frame::Forget {
        client_id,
        origin,
        packet_id: 9,
    }) = decode(k, b, now)
    else {
        panic!("not a forget");
    };
    assert_eq!((client_id.as_str(), origin.as_str()), ("sub", "p"));
}

#[test]
fn control_frames_round_trip() {
    let now = Instant::now();
    let mut buf = BytesMut::new();
    route(&mut buf, true, 9, "a/+/#");
    let (k, b) = split(&buf);
    assert!(
        matches!(decode(k, b, now), Ok(Frame::Route { add: true, ack: 9, filter }) if filter == "a/+/#")
    );
    let mut buf = BytesMut::new();
    pub_ack(
        &mut buf,
        5,
        true,
        Fate {
            kept: true,
            queue_full: false,
            budget_spent: true,
            moving: true,
        },
    );
    let (k, b) = split(&buf);
    let Ok(Frame::PubAck {
        id: 5,
        ok: true,
        fate,
    }) = decode(k, b, now)
    else {
        panic!("not a pub ack");
    };
    assert!(fate.kept && !fate.queue_full && fate.budget_spent && fate.moving);
}

#[test]
fn a_moved_session_goes_in_parts_and_comes_back_whole() {
    let now = Instant::now();
    let entry = |space, n: usize| ClientEntry {
        space,
        rest: vec![n as u8; 8],
        value: vec![7; 100 << 10],
    };
    let entries: Vec<ClientEntry> = std::iter::once(entry(Space::Sessions, 0))
        .chain((1..8).map(|n| entry(Space::Queue, n)))
        .collect();
    let mut buf = BytesMut::new();
    session(&mut buf, 3, "c-1", &entries, SESSION_PART_BYTES);
    let mut back = Vec::new();
    let mut parts = 0;
    let mut rest = buf.freeze();
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let f = rest.split_to(4 + len);
        let Ok(Frame::Session {
            id: 3,
            client_id,
            last,
            entries,
        }) = decode(f[4], f.slice(5..), now)
        else {
            panic!("not a session part");
        };
        assert!(len <= SESSION_PART_BYTES + 1024, "a part of {len} bytes");
        assert_eq!(client_id, "c-1");
        back.extend(entries);
        parts += 1;
        assert_eq!(last, rest.is_empty());
    }
    assert!(parts > 1);
    assert_eq!(back, entries);
    // A keyspace that is not a client's, and a count past the frame, are errors.
    let mut one = BytesMut::new();
    session(
        &mut one,
        4,
        "c",
        &[ClientEntry {
            space: Space::Retained,
            rest: vec![],
            value: vec![],
        }],
        SESSION_PART_BYTES,
    );
    let (k, b) = split(&one);
    assert!(decode(k, b, now).is_err());
    let mut lie = BytesMut::new();
    session(
        &mut lie,
        4,
        "c",
        &[entry(Space::Sessions, 0)],
        SESSION_PART_BYTES,
    );
    let n = lie.len();
    lie.truncate(n - 10);
    let len = (lie.len() - 4) as u32;
    lie[..4].copy_from_slice(&len.to_be_bytes());
    let (k, b) = split(&lie);
    assert!(decode(k, b, now).is_err());
}

#[test]
fn a_retained_message_or_deletion_round_trips_with_its_version_and_a_live_one_is_refused() {
    let now = Instant::now();
    let msg = Message {
        topic: TopicName::new("r/t").unwrap(),
        payload: Bytes::from_static(b"state"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: PublishProperties {
            message_expiry_interval: Some(600),
            ..PublishProperties::default()
        },
        origin: Some(MqttStr::new("p").unwrap()),
        qos2_id: None,
        created: now - Duration::from_millis(250),
        groups: None,
    };
    let version = RetainVersion {
        at_ns: 1_700_000_000_000_000_123,
        shard: 3,
    };
    let mut buf = BytesMut::new();
    retained_wanted(&mut buf);
    let (k, b) = split(&buf);
    assert!(matches!(decode(k, b, now), Ok(Frame::RetainedWanted)));
    let mut buf = BytesMut::new();
    retained(&mut buf, version, &msg, now);
    let (k, b) = split(&buf);
    let Ok(Frame::Retained {
        version: v,
        msg: back,
    }) = decode(k, b, now)
    else {
        panic!("not a retained message");
    };
    assert_eq!(v, version);
    assert_eq!(
        (back.topic.as_str(), &back.payload[..]),
        ("r/t", &b"state"[..])
    );
    assert!(back.retain);
    assert_eq!(back.properties.message_expiry_interval, Some(600));
    assert_eq!(now.duration_since(back.created), Duration::from_millis(250));
    for cut_short in [false, true] {
        let mut buf = BytesMut::new();
        retained_end(&mut buf, cut_short);
        let (k, b) = split(&buf);
        assert!(
            matches!(decode(k, b, now), Ok(Frame::RetainedEnd { cut_short: c }) if c == cut_short)
        );
    }
    // A deletion (empty payload) goes with its version.
    let mut buf = BytesMut::new();
    let gone = Message {
        payload: Bytes::new(),
        ..msg.clone()
    };
    retained(&mut buf, version, &gone, now);
    let (k, b) = split(&buf);
    assert!(matches!(
        decode(k, b, now),
        Ok(Frame::Retained { version: v, msg }) if v == version && msg.payload.is_empty()
    ));
    // A message that is not retained, or one with a QoS 2 key, is not one.
    for m in [
        Message {
            retain: false,
            ..msg.clone()
        },
        Message {
            qos: QoS::ExactlyOnce,
            qos2_id: Some(Qos2Id {
                packet_id: 4,
                dup: false,
            }),
            ..msg.clone()
        },
    ] {
        let mut buf = BytesMut::new();
        retained(&mut buf, version, &m, now);
        let (k, b) = split(&buf);
        assert!(decode(k, b, now).is_err());
    }
}

#[test]
fn hostile_frames_are_errors_not_panics() {
    let now = Instant::now();
    let bad: &[(u8, &[u8])] = &[
        (ROUTE, b""),
        (ROUTE, &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, b'a']),
        (ROUTE, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, b'a']),
        (ROUTE, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, b'a', b'#', b'b']),
        (ROUTE_ACK, &[1, 2, 3]),
        (ROUTE_ACK, &[0, 0, 0, 0, 0, 0, 0, 1, 99]),
        (PUBLISH, &[0, 0, 0, 0, 0, 0, 0, 1]),
        (PUBLISH, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'a', 3]),
        (
            PUBLISH,
            &[
                0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0xff, 0xfe, 0, 0, 0, 0, 0, 0, 0,
            ],
        ),
        (
            PUBLISH,
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'+', 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            PUBLISH,
            &[
                0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0xff,
            ],
        ),
        (
            PUBLISH,
            &[
                0, 0, 0, 0, 0, 0, 0, 1, 0, 1, b'a', 1, 0, 0, 0, 0, 1, 0, 1, b'o', 1, 0, 7, 0,
            ],
        ),
        (MISSED_WANTED, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 5, b'c']),
        (MISSED, &[0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0]),
        (
            MISSED,
            &[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 2, 0, 0, 1, 0, 1, b'o'],
        ),
        (RELEASE, &[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, b'o']),
        (RELEASE, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]),
        // Packet id 0; a client id that is no MQTT string; cut short.
        (FORGET, &[0, 1, b's', 0, 0, 0, 1, b'o']),
        (FORGET, &[0, 1, 0, 0, 9, 0, 1, b'o']),
        (FORGET, &[0, 1, b's', 0, 9]),
        // Cut short; no retain flag; an end flag that is neither 0 nor 1; bytes after.
        (RETAINED, &[0, 0, 0, 0, 0, 0, 0, 1, 0]),
        (
            RETAINED,
            &[
                0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'x',
            ],
        ),
        (RETAINED_END, &[2]),
        (RETAINED_END, &[]),
        (RETAINED_WANTED, &[0]),
        (99, &[]),
    ];
    for (kind, body) in bad {
        assert!(
            decode(*kind, Bytes::copy_from_slice(body), now).is_err(),
            "kind {kind} body {body:?} accepted"
        );
    }
}
