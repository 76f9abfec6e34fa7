//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 section 4.8.2) on the real
//! broker with 3 shards: group members on two shards, the publisher on the third, so that
//! every message crosses shards on its way through the group's home shard.
//!
//! Clients: rumqttc's v5 client for the bulk count, the raw client of `support::raw` where
//! a test must know exactly when the broker has seen something (a DISCONNECT processed, an
//! acknowledgement withheld), and Debian's mosquitto_sub -V 5 for the `$share` syntax as a
//! third-party client writes it.
//!
//! No sleeps: tests wait for messages, acknowledgements and closes. "Nothing more arrived"
//! is shown with markers sent through the group after the messages counted: each member's
//! messages come to it from the group's home shard in the order the home dispatched them,
//! so once every member has a marker, every message dispatched before the markers is in.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]
mod support;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet as RPacket, Publish as RPublish};
use rumqttc::v5::mqttbytes::QoS as RQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use shardmq::protocol::{QoS, ReasonCode};
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use support::raw::{msg, opts, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

const SHARDS: usize = 3;

fn id(prefix: &str, shard: usize) -> String {
    id_on_shard(prefix, shard, SHARDS)
}

/// rumqttc v5 clients whose event loops run on a tokio runtime; every incoming packet goes to
/// one channel, tagged with its client's index, so that a test can wait on all at once.
struct Rumq {
    rt: tokio::runtime::Runtime,
    tx: mpsc::Sender<(usize, RPacket)>,
    rx: mpsc::Receiver<(usize, RPacket)>,
    clients: Vec<AsyncClient>,
}

impl Rumq {
    fn new() -> Rumq {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        Rumq {
            rt,
            tx,
            rx,
            clients: Vec::new(),
        }
    }

    /// Connects a clean client; returns its index once the CONNACK is in.
    fn connect(&mut self, b: &TestBroker, client_id: String) -> usize {
        let k = self.clients.len();
        let mut o = MqttOptions::new(client_id, "127.0.0.1", b.port());
        o.set_request_channel_capacity(512);
        let (client, mut el) = AsyncClient::new(o, 512);
        let tx = self.tx.clone();
        self.rt.spawn(async move {
            while let Ok(ev) = el.poll().await {
                if let Event::Incoming(p) = ev {
                    if tx.send((k, p)).is_err() {
                        break;
                    }
                }
            }
        });
        self.clients.push(client);
        self.wait(|from, p| (from == k && matches!(p, RPacket::ConnAck(_))).then_some(()));
        k
    }

    /// The first packet `pick` accepts; packets before it are dropped.
    fn wait<T>(&self, mut pick: impl FnMut(usize, RPacket) -> Option<T>) -> T {
        loop {
            let (k, p) = self.rx.recv_timeout(TIMEOUT).expect("rumqttc packet");
            if let Some(t) = pick(k, p) {
                return t;
            }
        }
    }

    fn subscribe(&self, k: usize, filter: &str) {
        self.clients[k]
            .try_subscribe_many([Filter::new(filter, RQoS::AtLeastOnce)])
            .unwrap();
        let codes = self.wait(|from, p| match p {
            RPacket::SubAck(a) if from == k => Some(a.return_codes),
            _ => None,
        });
        assert_eq!(codes.len(), 1);
        assert!(
            format!("{:?}", codes[0]).contains("Success"),
            "{filter}: {codes:?}"
        );
    }

    fn publish(&self, k: usize, topic: &str, payload: String) {
        self.clients[k]
            .try_publish(topic, RQoS::AtLeastOnce, false, payload)
            .unwrap();
    }

    /// The next PUBLISH to any client: (client index, payload).
    fn next_publish(&self) -> (usize, String) {
        self.wait(|k, p| match p {
            RPacket::Publish(p) => Some((k, body(&p))),
            _ => None,
        })
    }
}

fn body(p: &RPublish) -> String {
    String::from_utf8(p.payload.to_vec()).unwrap()
}

#[test]
fn each_message_reaches_exactly_one_member_and_every_plain_subscriber() {
    let b = TestBroker::start(SHARDS);
    const N: usize = 100;
    let mut rq = Rumq::new();
    let members = [rq.connect(&b, id("sh-m", 0)), rq.connect(&b, id("sh-m", 1))];
    for &m in &members {
        rq.subscribe(m, "$share/g/sh/t");
    }
    let plain = rq.connect(&b, id("sh-plain", 1));
    rq.subscribe(plain, "sh/t");
    let publisher = rq.connect(&b, id("sh-pub", 2));
    for i in 0..N {
        rq.publish(publisher, "sh/t", format!("m{i}"));
    }

    // Collect until the members hold all N and the plain subscriber too; a second copy at
    // a member fails at once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_member = [0usize; 2];
    let mut plain_got = Vec::new();
    while seen.len() < N || plain_got.len() < N {
        let (k, text) = rq.next_publish();
        if k == plain {
            plain_got.push(text);
            continue;
        }
        if let Some(first) = seen.insert(text.clone(), k) {
            panic!("{text} delivered twice (clients {first} and {k})");
        }
        per_member[k] += 1;
    }
    assert!(
        per_member.iter().all(|&n| n > 0),
        "both members take messages: {per_member:?}"
    );
    let in_order: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        plain_got, in_order,
        "the plain subscriber gets every message, in order"
    );

    // Markers through the group until each member has one: whatever the home shard
    // dispatched before them has reached its member, and none was a second copy.
    let mut marked = [false; 2];
    let mut sent = 0;
    let mut plain_markers = Vec::new();
    while !marked.iter().all(|&m| m) {
        assert!(sent < 20, "markers do not reach both members: {marked:?}");
        rq.publish(publisher, "sh/t", format!("end{sent}"));
        sent += 1;
        loop {
            let (k, text) = rq.next_publish();
            if k == plain {
                plain_markers.push(text);
                continue;
            }
            assert!(
                text.starts_with("end"),
                "{text} arrived again after all {N}"
            );
            marked[k] = true;
            break;
        }
    }
    while plain_markers.len() < sent {
        let (k, text) = rq.next_publish();
        assert_eq!(k, plain, "{text}: a member got a second copy");
        plain_markers.push(text);
    }
    let want: Vec<String> = (0..sent).map(|i| format!("end{i}")).collect();
    assert_eq!(plain_markers, want);
}

/// Reads PUBLISHes (acknowledging them) until `want` distinct payloads are in; returns them.
fn take_all(c: &mut RawClient, want: usize) -> BTreeSet<Vec<u8>> {
    let mut got = BTreeSet::new();
    while got.len() < want {
        let p = c.recv_publish_ack();
        assert!(
            got.insert(p.payload.to_vec()),
            "{:?} delivered twice",
            String::from_utf8_lossy(&p.payload)
        );
    }
    got
}

fn bodies(prefix: &str, n: usize) -> BTreeSet<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect()
}

#[test]
fn member_that_leaves_cleanly_strands_nothing() {
    let b = TestBroker::start(SHARDS);
    let mut leaving = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("lv-a", 0), true)).0;
    leaving.sub(&[("$share/g/lv/t", QoS::AtLeastOnce)]);
    let mut staying = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("lv-b", 1), true)).0;
    staying.sub(&[("$share/g/lv/t", QoS::AtLeastOnce)]);
    leaving.disconnect(); // returns once the broker has processed the DISCONNECT

    let mut p = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("lv-pub", 2), true)).0;
    for i in 0..20 {
        let rc = p.publish_v5(msg("lv/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce));
        assert_eq!(rc, Some(ReasonCode::Success));
    }
    assert_eq!(take_all(&mut staying, 20), bodies("m", 20));
    p.publish_v5(msg("lv/t", b"marker", QoS::AtLeastOnce));
    assert_eq!(&staying.recv_publish_ack().payload[..], b"marker");
}

#[test]
fn messages_held_by_a_member_whose_session_ends_go_to_the_others() {
    let b = TestBroker::start(SHARDS);
    // Receive Maximum 1 and no acknowledgements: whatever the group gives this member stays
    // with it (one in flight, the rest queued) until its session ends with the connection.
    let (mut holder, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id("ho-a", 0), true).props(|p| p.receive_maximum = Some(1)),
    );
    holder.sub(&[("$share/g/ho/t", QoS::AtLeastOnce)]);
    let mut other = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("ho-b", 1), true)).0;
    other.sub(&[("$share/g/ho/t", QoS::AtLeastOnce)]);

    let mut p = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("ho-pub", 2), true)).0;
    for i in 0..10 {
        p.publish_v5(msg("ho/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce));
    }
    let held = holder.recv_publish(); // the group did give it one; not acknowledged
    assert!(held.payload.starts_with(b"m"));
    holder.close_and_wait(); // no DISCONNECT; Session Expiry 0: the session ends here

    // MQTT 4.8.2: the session ended before acknowledging, so the messages it held go to
    // another member (QoS 1: at least once). All 10 reach the remaining member.
    assert_eq!(take_all(&mut other, 10), bodies("m", 10));
    p.publish_v5(msg("ho/t", b"marker", QoS::AtLeastOnce));
    assert_eq!(&other.recv_publish_ack().payload[..], b"marker");
}

#[test]
fn messages_queue_for_the_offline_persistent_member() {
    let b = TestBroker::start(SHARDS);
    let persistent = id("q-b", 1);
    let mut a = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("q-a", 0), true)).0;
    a.sub(&[("$share/g/q/t", QoS::AtLeastOnce)]);
    let (mut pm, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&persistent, true).expiry(60));
    let ack = pm.subscribe_v5(&[("$share/g/q/t", opts(QoS::AtLeastOnce))], Some(9));
    assert_eq!(ack.reason_codes, [ReasonCode::GrantedQoS1]);
    a.disconnect();
    pm.disconnect();

    let mut p = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("q-pub", 2), true)).0;
    for i in 0..10 {
        let rc = p.publish_v5(msg("q/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce));
        assert_eq!(
            rc,
            Some(ReasonCode::Success),
            "the group still has a member"
        );
    }
    let (mut pm, ack) =
        RawClient::connect_v5(b.addr, &ConnectOpts::v5(&persistent, false).expiry(60));
    assert!(ack.session_present);
    let first = pm.recv_publish_ack();
    assert_eq!(
        first.properties.subscription_identifiers,
        [9],
        "the member's Subscription Identifier"
    );
    let mut got = take_all(&mut pm, 9);
    assert!(got.insert(first.payload.to_vec()), "delivered twice");
    assert_eq!(got, bodies("m", 10));
    p.publish_v5(msg("q/t", b"marker", QoS::AtLeastOnce));
    assert_eq!(&pm.recv_publish_ack().payload[..], b"marker");
}

/// mosquitto_sub -V 5 with debug output (-d), so that its SUBACK is visible; run under
/// `stdbuf -oL`, since on a pipe it flushes stdout only after a message. Each line goes to
/// `tx` tagged with `tag`; payload lines are those starting "m" or "end" (debug lines start
/// "Client" or "Subscribed").
struct MosquittoSub(Child);

impl MosquittoSub {
    fn start(
        b: &TestBroker,
        client_id: &str,
        filter: &str,
        tag: usize,
        tx: mpsc::Sender<(usize, String)>,
    ) -> MosquittoSub {
        let mut child = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-V",
                "5",
                "-h",
                "127.0.0.1",
                "-p",
                &b.port().to_string(),
            ])
            .args(["-i", client_id, "-t", filter, "-q", "1", "-d"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mosquitto_sub");
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((tag, line)).is_err() {
                    break;
                }
            }
        });
        MosquittoSub(child)
    }
}

impl Drop for MosquittoSub {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next line from any tagged source that `pick` accepts.
fn line(rx: &mpsc::Receiver<(usize, String)>, pick: impl Fn(&str) -> bool) -> (usize, String) {
    loop {
        match rx.recv_timeout(TIMEOUT) {
            Ok((k, l)) if pick(&l) => return (k, l),
            Ok(_) => {}
            Err(e) => panic!("mosquitto_sub output: {e}"),
        }
    }
}

fn is_payload(l: &str) -> bool {
    l.starts_with('m') || l.starts_with("end")
}

#[test]
fn mosquitto_sub_v5_share_syntax() {
    let b = TestBroker::start(SHARDS);
    let (tx, rx) = mpsc::channel();
    let mut subs = Vec::new();
    for (k, (cid, filter)) in [
        (id("ms-a", 0), "$share/grp/ms/t"),
        (id("ms-b", 1), "$share/grp/ms/t"),
        (id("ms-plain", 0), "ms/t"),
    ]
    .into_iter()
    .enumerate()
    {
        subs.push(MosquittoSub::start(&b, &cid, filter, k, tx.clone()));
        line(&rx, |l| l.contains("received SUBACK"));
    }
    const PLAIN: usize = 2;
    let mut p = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id("ms-pub", 2), true)).0;
    const N: usize = 20;
    for i in 0..N {
        p.publish_v5(msg("ms/t", format!("m{i}").as_bytes(), QoS::AtLeastOnce));
    }

    // Every message exactly once between the members, every message to the plain
    // subscriber; then markers through the group until each member has one (module docs).
    let mut seen = BTreeSet::new();
    let mut plain = Vec::new();
    let mut marked = [false; 2];
    let mut sent = 0;
    loop {
        if seen.len() == N && plain.len() >= N {
            if marked.iter().all(|&m| m) {
                break;
            }
            assert!(sent < 20, "markers do not reach both members: {marked:?}");
            p.publish_v5(msg(
                "ms/t",
                format!("end{sent}").as_bytes(),
                QoS::AtLeastOnce,
            ));
            sent += 1;
            // Wait for this marker at whichever member it went to.
            loop {
                let (k, l) = line(&rx, is_payload);
                if k == PLAIN {
                    plain.push(l);
                    continue;
                }
                assert!(l.starts_with("end"), "{l} delivered again after all {N}");
                marked[k] = true;
                break;
            }
            continue;
        }
        let (k, l) = line(&rx, is_payload);
        if k == PLAIN {
            plain.push(l);
        } else {
            assert!(l.starts_with('m'), "unexpected {l}");
            assert!(seen.insert(l.clone()), "{l} delivered twice");
        }
    }
    let want: BTreeSet<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, want);
    let in_order: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(
        plain[..N],
        in_order[..],
        "the plain subscriber gets all, in order"
    );
    drop(subs);
}

/// Every member gets its SUBACK, also when the group's home is the member's own shard: on a
/// one-shard broker (every 1-core host) and for a member placed on the home shard of a
/// three-shard broker, in MQTT 5 and 3.1.1, and for `mosquitto_sub` (which waits for it).
#[test]
fn a_member_on_the_groups_home_shard_gets_its_suback() {
    for shards in [1, SHARDS] {
        let b = TestBroker::start(shards);
        let filter = "$share/g/home/t";
        // The shard the group's home is (the hash of the whole filter).
        let home = support::owner(filter, shards);
        let id5 = id_on_shard("home-member-5", home, shards);
        let (mut m5, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&id5, true));
        let ack = m5.subscribe_v5(&[(filter, opts(QoS::AtLeastOnce))], None);
        assert_eq!(
            ack.reason_codes,
            [ReasonCode::GrantedQoS1],
            "{shards} shards, v5"
        );
        let id3 = id_on_shard("home-member-3", home, shards);
        let mut m3 = RawClient::connect_v311(b.addr, &id3);
        let ack = m3.subscribe(&[(filter, QoS::AtLeastOnce)]);
        assert_eq!(
            ack.reason_codes,
            [ReasonCode::GrantedQoS1],
            "{shards} shards, 3.1.1"
        );
        // mosquitto_sub says when it has its SUBACK (-d).
        // Line-buffered: its debug lines reach us as they are printed.
        let mut sub = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &b.port().to_string()])
            .args(["-V", "mqttv5", "-q", "1", "-C", "1", "-t", filter, "-d"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (apt-get install mosquitto-clients)");
        let lines = support::stdout_lines(&mut sub);
        // Stopped (by its PID) whatever happens below.
        struct Stop(Child);
        impl Drop for Stop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _stop = Stop(sub);
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains("SUBACK") => break,
                Ok(_) => {}
                Err(_) => panic!("mosquitto_sub got no SUBACK on {shards} shard(s)"),
            }
        }
    }
}
