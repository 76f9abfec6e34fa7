//! The crash test's publisher and subscriber (`tests/durability.rs` on one node,
//! `tests/cluster_crash.rs` across nodes): a raw persistent publisher that knows exactly
//! which acknowledgements it received, and a drain that collects what a subscriber got.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shardmq::protocol::{Ack, Packet, Publish, QoS};

use super::raw::{publish_packet, ConnectOpts, RawClient, ReadEnd};
use super::TIMEOUT;

/// The crash test's seed: `SHARDMQ_CRASH_SEED`, or the clock; printed for a replay.
pub fn seed(test: &str) -> u64 {
    let seed: u64 = std::env::var("SHARDMQ_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test} seed: {seed} (replay with SHARDMQ_CRASH_SEED={seed})");
    seed
}

/// What the publisher crashes: the node it is connected to.
pub trait CrashTarget {
    /// Where the publisher connects now.
    fn addr(&self) -> SocketAddr;
    /// SIGKILL; returns once the process is gone.
    fn kill(&mut self);
    /// Starts it again on its data and waits until it is ready.
    fn restart(&mut self);
}

/// Publishes numbered QoS 1/2 messages through `kills` crashes of `node` (each after a
/// seeded number of acknowledgements and a seeded 0-3 ms jitter); after each, reconnects
/// with the session, resends what was not acknowledged and goes on; at the end finishes
/// every flight and publishes `END`. Returns a line per kill.
pub fn publish_through_crashes(
    publ: &mut CrashPublisher,
    rng: &mut Rng,
    kills: u64,
    node: &mut dyn CrashTarget,
) -> Vec<String> {
    let final_extra = 100u64;
    let mut acks = 0u64;
    let mut kill_log: Vec<String> = Vec::new();
    for segment in 0..=kills {
        let opts = ConnectOpts::v311(&publ.id, false);
        let (mut c, present) = RawClient::connect_served(node.addr(), &opts);
        assert_eq!(
            present,
            segment > 0,
            "the publisher's session after {segment} kills"
        );
        publ.resend(&mut c);
        let last = segment == kills;
        let target = acks + rng.range(40, 400);
        let stop_at = publ.next_n + final_extra;
        loop {
            while publ.flights.len() < WINDOW && (!last || publ.next_n < stop_at) {
                publ.send_new(&mut c, rng);
            }
            if last && publ.flights.is_empty() {
                break;
            }
            let (p, _) = c.recv_frame();
            if publ.on_packet(&mut c, p, true) {
                acks += 1;
            }
            if !last && acks >= target {
                // Crash now, or after topping up the window, after 0-3 ms.
                if rng.next().is_multiple_of(2) {
                    while publ.flights.len() < WINDOW {
                        publ.send_new(&mut c, rng);
                    }
                }
                let jitter = Duration::from_micros(rng.range(0, 3000));
                std::thread::sleep(jitter);
                let in_flight = publ.flights.len();
                node.kill();
                // Acknowledgements already on their way count as received.
                let deadline = Instant::now() + TIMEOUT;
                loop {
                    match c.read_frame_until(deadline) {
                        Ok((p, _)) => {
                            if publ.on_packet(&mut c, p, false) {
                                acks += 1;
                            }
                        }
                        Err(ReadEnd::Closed) => break,
                        Err(e) => panic!("after the kill: {e:?}"),
                    }
                }
                kill_log.push(format!(
                    "kill {} after {acks} acks (+{jitter:?}, {in_flight} in flight)",
                    segment + 1
                ));
                node.restart();
                break;
            }
        }
        if last {
            // The end marker, after everything else from this publisher.
            c.publish(CRASH_TOPIC, b"END", QoS::AtLeastOnce, false);
            c.disconnect();
        }
    }
    kill_log
}

/// Like [`publish_through_crashes`], but `node` is not the publisher's (it holds
/// subscribers' sessions): the MQTT 5 publisher stays at `at` (see [`publish_v5_while`]),
/// and `node` is killed and restarted after seeded numbers of acknowledgements.
pub fn publish_through_remote_crashes(
    publ: &mut CrashPublisher,
    rng: &mut Rng,
    kills: u64,
    at: SocketAddr,
    node: &mut dyn CrashTarget,
) -> Vec<String> {
    let mut kill_log: Vec<String> = Vec::new();
    let mut done = 0;
    let mut target = rng.range(40, 400);
    let mut jitters = Rng(rng.next());
    publish_v5_while(publ, rng, at, |acks, in_flight| {
        if done < kills && acks >= target {
            let jitter = Duration::from_micros(jitters.range(0, 3000));
            std::thread::sleep(jitter);
            node.kill();
            kill_log.push(format!(
                "kill {} after {acks} acks (+{jitter:?}, {in_flight} in flight)",
                done + 1
            ));
            node.restart();
            done += 1;
            target = acks + jitters.range(40, 400);
        }
        done < kills
    });
    kill_log
}

/// An MQTT 5 publisher with a persistent session at `at` publishes numbered QoS 1/2
/// messages while `go_on(acknowledgements so far, messages in flight)` says so, then 100
/// more, finishes every flight and publishes `END`. What the broker could not store is
/// refused: a QoS 1 message, or a QoS 2 message no session kept, gets PUBACK/PUBREC 0x80 and
/// is published again as a new message; a QoS 2 message that some sessions did keep is
/// never acknowledged, its connection closes (DISCONNECT 0x80), and the publisher
/// reconnects to its session and resends it with DUP and the same packet id.
pub fn publish_v5_while(
    publ: &mut CrashPublisher,
    rng: &mut Rng,
    at: SocketAddr,
    mut go_on: impl FnMut(u64, usize) -> bool,
) {
    let final_extra = 100u64;
    let mut acks = 0u64;
    let opts = ConnectOpts::v5(&publ.id, false).expiry(3600);
    let (mut c, present) = RawClient::connect_served(at, &opts);
    assert!(!present, "the publisher's session is new");
    let mut stop_at = None;
    let mut finish_by = None;
    loop {
        if stop_at.is_none() && !go_on(acks, publ.flights.len()) {
            stop_at = Some(publ.next_n + final_extra);
            finish_by = Some(Instant::now() + 3 * TIMEOUT);
        }
        assert!(
            finish_by.is_none_or(|t| Instant::now() < t),
            "the publisher could not finish: {} in flight, {} refused",
            publ.flights.len(),
            publ.republished
        );
        while publ.flights.len() < WINDOW && stop_at.is_none_or(|s| publ.next_n < s) {
            publ.send_new(&mut c, rng);
        }
        if stop_at.is_some() && publ.flights.is_empty() {
            break;
        }
        match c.read_frame_until(Instant::now() + TIMEOUT) {
            Ok((Packet::Disconnect(d), _)) => {
                assert_eq!(
                    d.reason_code,
                    shardmq::protocol::ReasonCode::UnspecifiedError,
                    "the publisher's connection closed"
                );
                c = publ.reconnect(at, &opts);
            }
            Ok((p, _)) => {
                if publ.on_packet(&mut c, p, true) {
                    acks += 1;
                }
            }
            Err(ReadEnd::Closed) => c = publ.reconnect(at, &opts),
            Err(e) => panic!("the publisher: {e:?}"),
        }
        if !publ.refused.is_empty() {
            // Not at full speed while a node is away.
            std::thread::sleep(Duration::from_millis(5));
            publ.republish_refused(&mut c);
        }
    }
    publish_end(publ, c, at, &opts);
}

/// Publishes `END` (QoS 1) until the broker takes it. A refusal (0x80: a subscriber's
/// session was moving between nodes, say, so nothing was stored) or a closed connection
/// means it was not taken: it is sent again, as every other message is.
fn publish_end(publ: &mut CrashPublisher, mut c: RawClient, at: SocketAddr, opts: &ConnectOpts) {
    let deadline = Instant::now() + 3 * TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "the broker never took END");
        let id = c.next_pid();
        let end = publish_packet(
            CRASH_TOPIC,
            b"END",
            QoS::AtLeastOnce,
            false,
            Some(id),
            false,
        );
        c.send(&end);
        let taken = loop {
            match c.read_frame_until(Instant::now() + TIMEOUT) {
                Ok((Packet::PubAck(a), _)) if a.packet_id.get() == id => {
                    break (a.reason_code as u8) < 0x80;
                }
                Ok((Packet::Disconnect(_), _)) | Err(ReadEnd::Closed) => {
                    c = publ.reconnect(at, opts);
                    break false;
                }
                Ok(_) => {}
                Err(e) => panic!("the publisher's END: {e:?}"),
            }
        };
        if taken {
            c.disconnect();
            return;
        }
        eprintln!("END not taken: sent again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks what the two subscribers of the crash test got (`got1` at QoS 1, `got2` at QoS
/// 2): every acknowledged message delivered (QoS 1 at least once), every QoS 2 message
/// whose PUBREC came exactly once at QoS 2; prints the run's figures.
#[allow(clippy::too_many_arguments)]
pub fn verify_crash(
    publ: &CrashPublisher,
    seed: u64,
    kills: u64,
    kill_log: &[String],
    got1: &[(u64, QoS)],
    got2: &[(u64, QoS)],
    published_at: Duration,
    started: Instant,
) {
    let mut count1: BTreeMap<u64, usize> = BTreeMap::new();
    for (n, _) in got1 {
        *count1.entry(*n).or_default() += 1;
    }
    let mut count2: BTreeMap<u64, usize> = BTreeMap::new();
    let mut count2_q2: BTreeMap<u64, usize> = BTreeMap::new();
    for (n, q) in got2 {
        assert!(*n < publ.next_n, "message {n} was never published");
        *count2.entry(*n).or_default() += 1;
        let want = publ.qos_of[n];
        assert_eq!(
            *q, want,
            "message {n} delivered to the QoS 2 subscriber at {q:?}"
        );
        if *q == QoS::ExactlyOnce {
            *count2_q2.entry(*n).or_default() += 1;
        }
    }
    for (n, q) in got1 {
        assert!(*n < publ.next_n, "message {n} was never published");
        assert_eq!(*q, QoS::AtLeastOnce, "the QoS 1 subscriber gets QoS 1");
    }
    let dup1 = got1.len() - count1.len();
    let dup2 = got2.len() - count2.len();
    let q2_dups: Vec<(u64, usize)> = count2_q2
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (*n, *c))
        .collect();
    eprintln!(
        "crash test (seed {seed}): {kills} kills, {} messages published ({} QoS 1, {} QoS 2), \
         {} sends + {} resends; acknowledged: {} PUBACK, {} PUBREC, {} PUBCOMP; delivered: \
         {} to the QoS 1 subscriber ({} duplicates), {} to the QoS 2 subscriber ({} duplicates, \
         {} QoS 2 duplicates); publishing took {:?}, all {:?}",
        publ.next_n,
        publ.qos_of
            .values()
            .filter(|q| **q == QoS::AtLeastOnce)
            .count(),
        publ.qos_of
            .values()
            .filter(|q| **q == QoS::ExactlyOnce)
            .count(),
        publ.sends,
        publ.resends,
        publ.acked_q1.len(),
        publ.recd_q2.len(),
        publ.completed_q2.len(),
        got1.len(),
        dup1,
        got2.len(),
        dup2,
        q2_dups.len(),
        published_at,
        started.elapsed()
    );
    for k in kill_log {
        eprintln!("  {k}");
    }

    // Every message was acknowledged in the end (the last segment finishes all flights).
    assert_eq!(
        publ.acked_q1.len() + publ.recd_q2.len(),
        publ.next_n as usize,
        "every message acknowledged by the end"
    );
    let describe = |ns: &[u64]| -> Vec<String> {
        ns.iter()
            .map(|n| {
                format!(
                    "{n} (QoS {}{})",
                    publ.qos_of[n] as u8,
                    if publ.resent.contains(n) {
                        ", resent with DUP after a kill"
                    } else {
                        ""
                    }
                )
            })
            .collect()
    };
    // Acknowledged (PUBACK or PUBREC) and not in `got`.
    let lost = |got: &BTreeMap<u64, usize>| -> Vec<u64> {
        publ.acked_q1
            .iter()
            .chain(&publ.recd_q2)
            .filter(|n| !got.contains_key(n))
            .copied()
            .collect()
    };
    let lost1 = lost(&count1);
    assert!(
        lost1.is_empty(),
        "seed {seed}: acknowledged messages never delivered to the QoS 1 subscriber: {:?}",
        describe(&lost1)
    );
    let lost2 = lost(&count2);
    assert!(
        lost2.is_empty(),
        "seed {seed}: acknowledged messages never delivered to the QoS 2 subscriber: {:?}",
        describe(&lost2)
    );
    assert!(
        q2_dups.is_empty(),
        "seed {seed}: QoS 2 messages delivered more than once at QoS 2 (number, times): \
         {q2_dups:?}: {:?}",
        describe(&q2_dups.iter().map(|(n, _)| *n).collect::<Vec<_>>())
    );
    for n in &publ.recd_q2 {
        assert_eq!(count2_q2.get(n), Some(&1), "seed {seed}: QoS 2 message {n}");
    }
}

pub fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

impl CrashPublisher {
    /// A publisher with nothing sent yet.
    pub fn new(id: String) -> CrashPublisher {
        CrashPublisher {
            id,
            flights: BTreeMap::new(),
            next_n: 0,
            next_pid: 0,
            order: 0,
            sends: 0,
            resends: 0,
            acked_q1: BTreeSet::new(),
            recd_q2: BTreeSet::new(),
            completed_q2: BTreeSet::new(),
            qos_of: HashMap::new(),
            resent: BTreeSet::new(),
            refused: Vec::new(),
            republished: 0,
            reconnects: 0,
        }
    }
}

/// splitmix64: a small seeded generator (the test must replay from its printed seed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Clone, Copy, Debug)]
pub struct Flight {
    pub n: u64,
    pub qos: QoS,
    pub stage: Stage,
    /// Order of the first send, for resending in the original order.
    pub order: u64,
}

pub const CRASH_TOPIC: &str = "crash/t";
/// Messages in flight at once from the publisher.
pub const WINDOW: usize = 16;
/// Packet ids cycle through this range, so ids are reused while the test runs (a stale
/// incoming QoS 2 id after a crash would swallow a new message).
pub const PID_SPACE: u16 = 40;

/// The publisher: a raw persistent 3.1.1 client that knows exactly which acknowledgements it
/// received.
pub struct CrashPublisher {
    pub id: String,
    pub flights: BTreeMap<u16, Flight>,
    pub next_n: u64,
    pub next_pid: u16,
    pub order: u64,
    pub sends: u64,
    pub resends: u64,
    pub acked_q1: BTreeSet<u64>,
    pub recd_q2: BTreeSet<u64>,
    pub completed_q2: BTreeSet<u64>,
    pub qos_of: HashMap<u64, QoS>,
    /// Messages whose PUBLISH was sent again (DUP) after a kill.
    pub resent: BTreeSet<u64>,
    /// Packet ids whose message was refused as not stored, to publish again.
    pub refused: Vec<u16>,
    /// How many times a message was published again after a refusal.
    pub republished: u64,
    /// How many times the publisher connected again after the broker closed its connection.
    pub reconnects: u64,
}

impl CrashPublisher {
    pub fn payload(n: u64, qos: QoS) -> String {
        format!("{n}:{}", qos as u8)
    }

    pub fn free_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid % PID_SPACE + 1;
            if !self.flights.contains_key(&self.next_pid) {
                return self.next_pid;
            }
        }
    }

    /// Publishes the next numbered message (QoS chosen by `rng`).
    pub fn send_new(&mut self, c: &mut RawClient, rng: &mut Rng) {
        let n = self.next_n;
        self.next_n += 1;
        let qos = if rng.next().is_multiple_of(2) {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        self.qos_of.insert(n, qos);
        let pid = self.free_pid();
        self.order += 1;
        self.flights.insert(
            pid,
            Flight {
                n,
                qos,
                stage: Stage::Sent,
                order: self.order,
            },
        );
        self.sends += 1;
        c.try_send(&publish_packet(
            CRASH_TOPIC,
            Self::payload(n, qos).as_bytes(),
            qos,
            false,
            Some(pid),
            false,
        ));
    }

    /// After the broker closed the connection: connects again to the session at `at`
    /// (after 5 ms, not at full speed while a node is away) and resends what is in flight.
    pub fn reconnect(&mut self, at: SocketAddr, opts: &ConnectOpts) -> RawClient {
        std::thread::sleep(Duration::from_millis(5));
        let (mut c, present) = RawClient::connect_served(at, opts);
        assert!(present, "the publisher's session after a close");
        self.reconnects += 1;
        // Refused messages ended their flow; they go again with the rest, as new ones.
        self.refused.clear();
        self.resend(&mut c);
        c
    }

    /// Publishes the refused messages again (same packet ids, now free; DUP = 0).
    pub fn republish_refused(&mut self, c: &mut RawClient) {
        for pid in std::mem::take(&mut self.refused) {
            if let Some(f) = self.flights.get(&pid) {
                self.republished += 1;
                c.try_send(&publish_packet(
                    CRASH_TOPIC,
                    Self::payload(f.n, f.qos).as_bytes(),
                    f.qos,
                    false,
                    Some(pid),
                    false,
                ));
            }
        }
    }

    /// After a reconnect with the stored session: unacknowledged PUBLISHes again with DUP and
    /// the same packet ids, and PUBREL for those whose PUBREC came (MQTT-4.4.0-1).
    pub fn resend(&mut self, c: &mut RawClient) {
        let mut v: Vec<(u16, Flight)> = self.flights.iter().map(|(p, f)| (*p, *f)).collect();
        v.sort_by_key(|(_, f)| f.order);
        for (pid, f) in v {
            self.resends += 1;
            if f.stage == Stage::Sent {
                self.resent.insert(f.n);
            }
            match f.stage {
                Stage::Sent => c.try_send(&publish_packet(
                    CRASH_TOPIC,
                    Self::payload(f.n, f.qos).as_bytes(),
                    f.qos,
                    false,
                    Some(pid),
                    true,
                )),
                Stage::Released => c.try_send(&Packet::PubRel(Ack::new(super::raw::pid(pid)))),
            };
        }
    }

    /// Handles one packet from the broker; returns whether it was an acknowledgement that
    /// counts (PUBACK or PUBREC). `alive` = the broker can still be written to.
    pub fn on_packet(&mut self, c: &mut RawClient, p: Packet, alive: bool) -> bool {
        match p {
            // MQTT 5: "not stored" (a cluster node that holds a copy is gone). The packet id
            // is free again and the message must be published anew.
            Packet::PubAck(a) | Packet::PubRec(a) if a.reason_code.is_error() => {
                let pid = a.packet_id.get();
                assert!(
                    self.flights
                        .get(&pid)
                        .is_some_and(|f| f.stage == Stage::Sent),
                    "a refusal for packet id {pid}, which is {:?}",
                    self.flights.get(&pid)
                );
                self.refused.push(pid);
                false
            }
            Packet::PubAck(a) => {
                let pid = a.packet_id.get();
                match self.flights.get(&pid) {
                    Some(f) if f.qos == QoS::AtLeastOnce => {
                        self.acked_q1.insert(f.n);
                        self.flights.remove(&pid);
                        true
                    }
                    other => panic!("PUBACK for packet id {pid}, which is {other:?}"),
                }
            }
            Packet::PubRec(a) => {
                let pid = a.packet_id.get();
                match self.flights.get_mut(&pid) {
                    Some(f) if f.qos == QoS::ExactlyOnce && f.stage == Stage::Sent => {
                        f.stage = Stage::Released;
                        self.recd_q2.insert(f.n);
                        if alive {
                            c.try_send(&Packet::PubRel(Ack::new(a.packet_id)));
                        }
                        true
                    }
                    other => panic!("PUBREC for packet id {pid}, which is {other:?}"),
                }
            }
            Packet::PubComp(a) => {
                let pid = a.packet_id.get();
                match self.flights.get(&pid) {
                    Some(f) if f.stage == Stage::Released => {
                        self.completed_q2.insert(f.n);
                        self.flights.remove(&pid);
                        false
                    }
                    other => panic!("PUBCOMP for packet id {pid}, which is {other:?}"),
                }
            }
            other => panic!("the publisher got {other:?}"),
        }
    }
}

/// A persistent subscriber of the crash test connects and drains its queue up to the final
/// marker, acknowledging everything. Returns the message numbers delivered, with the QoS
/// each was delivered at.
pub fn crash_drain(addr: SocketAddr, opts: &ConnectOpts, end: &str) -> Vec<(u64, QoS)> {
    let (mut c, present) = RawClient::connect_served(addr, opts);
    assert!(
        present,
        "{}: session present after the crashes",
        opts.client_id
    );
    let mut got: Vec<(u64, QoS)> = Vec::new();
    loop {
        // A drain that stalls says how far it got (the last numbers, and whether the
        // connection stayed open), not only that nothing came.
        let p = match c.read_frame_until(Instant::now() + TIMEOUT) {
            Ok((Packet::Publish(p), _)) => p,
            Ok((other, _)) => panic!(
                "{}: expected PUBLISH while draining, got {other:?} after {} messages",
                opts.client_id,
                got.len()
            ),
            Err(e) => panic!(
                "{}: the drain stopped ({e:?}) after {} messages, the last {:?}, before {end:?}",
                opts.client_id,
                got.len(),
                &got[got.len().saturating_sub(5)..]
            ),
        };
        c.ack(&p);
        let s = text(&p);
        if s == end {
            break;
        }
        let n: u64 = s
            .split(':')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("unexpected payload {s:?}"));
        got.push((n, p.qos));
    }
    c.disconnect();
    got
}
