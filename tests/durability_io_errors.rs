//! Durability under I/O failure, on a real full disk: the broker's data directory is a small
//! tmpfs mounted for the test (this needs root, as CI runs; a test that cannot mount fails
//! with a clear message instead of passing), filled with a filler file.
//!
//! While the disk is full, no QoS 1 publish into a persistent session is acknowledged as
//! stored: an MQTT 5 publisher gets PUBACK 0x80, a 3.1.1 publisher no PUBACK and a closed
//! connection (it resends when it reconnects). Other clients are served meanwhile. Once
//! the filler is deleted the broker persists again without a restart, and every message
//! acknowledged before, during and after the episode is delivered, after a reconnect and
//! again after a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shardmq::protocol::{Packet, Publish, QoS, ReasonCode};
use support::raw::{msg, opts, publish_packet, ConnectOpts, RawClient};
use support::{id_on_shard, TestBroker, TIMEOUT};

/// Big enough for two shards' stores to open and take a few messages; small enough to fill
/// at once.
const TMPFS_MIB: u64 = 48;

/// A tmpfs mounted on `<temp dir>/data` (the directory `TestBroker` uses as data dir),
/// unmounted on drop, failure or not.
struct Tmpfs {
    /// Keeps the temp dir; handed to the broker (which does not remove it while mounted).
    dir: Option<tempfile::TempDir>,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let mnt = dir.path().join("data");
        std::fs::create_dir(&mnt).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(&mnt)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "cannot mount a tmpfs on {} (this test needs root and mount(8), as CI has): {}",
                mnt.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run mount(8) to mount a tmpfs for this test: {e}"),
        }
        Tmpfs {
            dir: Some(dir),
            mnt,
        }
    }

    fn take_dir(&mut self) -> tempfile::TempDir {
        self.dir.take().expect("dir handed over once")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a broker process still holding files cannot keep the mount alive.
        let unmounted = Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        // The broker's handle of the temp dir could not remove the mount point.
        if let (true, Some(parent)) = (unmounted, self.mnt.parent()) {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// Fills the file system of `dir` with one file until the disk says ENOSPC.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create filler");
    for chunk in [1 << 20, 4 << 10, 512, 1] {
        let buf = vec![0xA5u8; chunk];
        loop {
            match f.write(&buf) {
                Ok(n) if n == buf.len() => {}
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    f.sync_all().ok();
    path
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// The payloads `c` receives until it has every one of `want` (acknowledging each when
/// `ack`); any other payload it receives must be one of `sent` (a message whose storing
/// was refused may have reached the disk all the same). Asserts the order of `want`.
fn receive_all(c: &mut RawClient, want: &[String], sent: &BTreeSet<String>, ack: bool) {
    let mut missing: BTreeSet<&String> = want.iter().collect();
    let mut order = Vec::new();
    while !missing.is_empty() {
        let p = c.recv_publish();
        if ack {
            c.ack(&p);
        }
        let t = text(&p);
        assert!(sent.contains(&t), "unexpected message {t:?}");
        missing.remove(&t);
        if want.contains(&t) {
            order.push(t);
        }
    }
    assert_eq!(order, want, "acknowledged messages in publish order");
}

#[test]
fn a_full_disk_refuses_acknowledgements_and_recovers_without_a_restart() {
    let mut disk = Tmpfs::mount(TMPFS_MIB);
    let shards = 2;
    let logs = tempfile::tempdir().expect("temp dir");
    let log_file = logs.path().join("broker.log");
    let b = TestBroker::start_env(shards, "", disk.take_dir(), &[], Some(&log_file));
    let sub_id = id_on_shard("io-sub", 0, shards);
    let topic = "io/q";
    let mut sent = BTreeSet::new();
    let mut acked: Vec<String> = Vec::new();

    // A persistent subscriber goes offline: its queue lives on the disk.
    let (mut s, _) = RawClient::connect_v5(b.addr, &ConnectOpts::v5(&sub_id, true).expiry(3600));
    s.subscribe_v5(&[(topic, opts(QoS::AtLeastOnce))], None);
    s.disconnect();

    // Publishers with clean sessions, on the other shard: they write nothing themselves.
    let (mut p5, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id_on_shard("io-pub5", 1, shards), true),
    );
    for i in 0..3 {
        let m = format!("before-{i}");
        assert_eq!(
            p5.publish_v5(msg(topic, m.as_bytes(), QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
        sent.insert(m.clone());
        acked.push(m);
    }

    let filler = fill(&disk.mnt);

    // MQTT 5: publish until the broker refuses (the journal's last page may take a message
    // or two first, which is then stored and acknowledged for real).
    let payload = vec![b'x'; 2048];
    let mut refused = None;
    for i in 0..200 {
        let m = format!("full-{i}");
        let mut body = m.clone().into_bytes();
        body.push(b'|');
        body.extend_from_slice(&payload);
        let mut p = msg(topic, &body, QoS::AtLeastOnce);
        p.payload = body.into();
        let rc = p5.publish_v5(p);
        sent.insert(format!("{m}|{}", String::from_utf8_lossy(&payload)));
        match rc {
            Some(ReasonCode::Success) => {
                acked.push(format!("{m}|{}", String::from_utf8_lossy(&payload)))
            }
            Some(rc) => {
                refused = Some(rc);
                break;
            }
            None => unreachable!("QoS 1"),
        }
    }
    let refused = refused.expect("the broker acknowledged 200 publishes on a full disk");
    assert_eq!(
        refused,
        ReasonCode::UnspecifiedError,
        "PUBACK reason on a full disk"
    );
    // Still refused: the disk is still full.
    sent.insert("full-again".into());
    assert_eq!(
        p5.publish_v5(msg(topic, b"full-again", QoS::AtLeastOnce)),
        Some(ReasonCode::UnspecifiedError)
    );

    // MQTT 3.1.1: no PUBACK; the connection is closed so that the client resends.
    let p3_id = id_on_shard("io-pub3", 1, shards);
    let mut p3 = RawClient::connect_v311(b.addr, &p3_id);
    sent.insert("v311-full".into());
    p3.send(&publish_packet(
        topic,
        b"v311-full",
        QoS::AtLeastOnce,
        false,
        Some(1),
        false,
    ));
    let got = p3.expect_closed();
    assert!(
        !got.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "no PUBACK for a message not stored: {got:?}"
    );

    // Everyone else is served: a clean subscriber gets QoS 0 and QoS 1 messages.
    let (mut c, _) = RawClient::connect_v5(
        b.addr,
        &ConnectOpts::v5(&id_on_shard("io-clean", 0, shards), true),
    );
    c.subscribe_v5(&[("io/clean", opts(QoS::AtLeastOnce))], None);
    p5.publish_v5(msg("io/clean", b"q0", QoS::AtMostOnce));
    assert_eq!(
        p5.publish_v5(msg("io/clean", b"q1", QoS::AtLeastOnce)),
        Some(ReasonCode::Success),
        "a message for a clean session needs no disk"
    );
    assert_eq!(text(&c.recv_publish_ack()), "q0");
    assert_eq!(text(&c.recv_publish_ack()), "q1");
    // The disk is still full: the broker does not call it recovered for the little space
    // its own failure freed.
    sent.insert("full-still".into());
    assert_eq!(
        p5.publish_v5(msg(topic, b"full-still", QoS::AtLeastOnce)),
        Some(ReasonCode::UnspecifiedError)
    );

    // Space comes back: persistence resumes without a restart (on the broker's backoff).
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = Instant::now() + TIMEOUT;
    let mut n = 0;
    loop {
        let m = format!("after-{n}");
        n += 1;
        sent.insert(m.clone());
        match p5.publish_v5(msg(topic, m.as_bytes(), QoS::AtLeastOnce)) {
            Some(ReasonCode::Success) => {
                acked.push(m);
                break;
            }
            Some(rc) => assert_eq!(rc, ReasonCode::UnspecifiedError),
            None => unreachable!(),
        }
        assert!(
            Instant::now() < deadline,
            "persistence did not resume within {TIMEOUT:?} of freeing the disk"
        );
        // Polls the broker's retry; not a synchronisation point.
        std::thread::sleep(Duration::from_millis(50));
    }
    // The 3.1.1 publisher comes back and resends; now it is stored.
    let mut p3 = RawClient::connect_v311(b.addr, &p3_id);
    p3.publish(topic, b"v311-full", QoS::AtLeastOnce, false);
    acked.push("v311-full".into());
    p3.disconnect();
    for i in 1..3 {
        let m = format!("after-ok-{i}");
        assert_eq!(
            p5.publish_v5(msg(topic, m.as_bytes(), QoS::AtLeastOnce)),
            Some(ReasonCode::Success)
        );
        sent.insert(m.clone());
        acked.push(m);
    }
    p5.disconnect();
    c.disconnect();

    // Every acknowledged message is there, in order (not acknowledged by the subscriber
    // yet, so that the restart below must keep them too).
    let (mut s, present) =
        RawClient::connect(b.addr, &ConnectOpts::v5(&sub_id, false).expiry(3600));
    assert!(present, "the subscriber's session survived");
    receive_all(&mut s, &acked, &sent, false);
    s.disconnect();

    // And after a restart.
    let mut b = b;
    let dir = std::mem::replace(&mut b.data_dir, tempfile::tempdir().expect("temp dir"));
    let status = b.stop();
    assert!(status.success(), "exit status {status}");
    // The log says why, once for the episode, and when it ended.
    let log = std::fs::read_to_string(&log_file).expect("broker log");
    let failing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("storage failing"))
        .collect();
    assert_eq!(failing.len(), 1, "one line per failure episode:\n{log}");
    assert!(
        failing[0].contains("No space left on device"),
        "the reason: {}",
        failing[0]
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("storage recovered"))
            .count(),
        1,
        "{log}"
    );
    let b = TestBroker::start_in(shards, "", dir);
    let (mut s, present) =
        RawClient::connect(b.addr, &ConnectOpts::v5(&sub_id, false).expiry(3600));
    assert!(present);
    receive_all(&mut s, &acked, &sent, true);
    s.disconnect();
    drop(b);
}
