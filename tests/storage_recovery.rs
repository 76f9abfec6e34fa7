//! Recovery scenarios of the per-shard store (`shardmq::storage`). Each test has its own
//! temporary directory: it writes, closes the store (cleanly, or by SIGKILL of a child
//! process that plays the writer) and checks what a new `Store` on the same directory finds.
//!
//! The timed measurement at the end is `#[ignore]`d; run it with
//! `cargo test --release --test storage_recovery -- --ignored --nocapture`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use shardmq::storage::{
    InflightRecord, MessageRecord, QueuedRecord, RecoveredSession, SessionRecord, Space,
    StorageError, Store, StoreOptions, SubscriptionRecord, WallClock, WillRecord, MARKER_FILE,
};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn opts() -> StoreOptions {
    StoreOptions {
        cache_bytes: 4 << 20,
        max_cached_files: 32,
        memtable_bytes: 4 << 20,
        max_journal_bytes: 64 << 20,
        worker_threads: 1,
    }
}

fn message(topic: &str, payload: &[u8]) -> MessageRecord {
    MessageRecord {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos: 1,
        retain: false,
        properties: Vec::new(),
        origin: Some("publisher".into()),
        created_unix_ms: 1_700_000_000_000,
    }
}

/// A queued message whose payload names its client and sequence number.
fn queued(client: &str, seq: u64) -> QueuedRecord {
    QueuedRecord {
        message: message("q/t", format!("{client}:{seq}").as_bytes()),
        qos: 1,
        retain: false,
        sub_ids: vec![1],
        via_share: None,
    }
}

fn session(expiry_s: u32) -> SessionRecord {
    SessionRecord {
        expiry_s,
        version: 4,
        will: None,
        disconnected_unix_ms: Some(1_700_000_000_000),
        next_packet_id: 1,
        owner: None,
    }
}

fn sub(options: u8, id: Option<u32>) -> SubscriptionRecord {
    SubscriptionRecord { options, id }
}

fn queue_seqs(store: &Store, client: &str) -> Vec<u64> {
    let q = store.queue_read(client, 0, usize::MAX).unwrap();
    for (seq, rec) in &q {
        assert_eq!(*rec, queued(client, *seq), "payload of {client} {seq}");
    }
    q.into_iter().map(|(s, _)| s).collect()
}

fn find<'a>(sessions: &'a [RecoveredSession], id: &str) -> &'a RecoveredSession {
    sessions
        .iter()
        .find(|s| s.client_id == id)
        .unwrap_or_else(|| panic!("session {id} not recovered"))
}

fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push((e.path(), m.len()));
        }
    }
    out
}

fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0xFF;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn reopen_after_clean_close_finds_everything() {
    let dir = tempfile::tempdir().unwrap();
    let clock = WallClock::now();
    let alice = SessionRecord {
        expiry_s: 3600,
        version: 5,
        will: Some(WillRecord {
            message: MessageRecord {
                properties: vec![0x05, 0x02, 0x00, 0x00, 0x00, 0x3C], // expiry 60 s
                retain: true,
                ..message("wills/alice", b"gone")
            },
            delay_s: 30,
        }),
        disconnected_unix_ms: Some(clock.unix_ms),
        next_packet_id: 42,
        owner: Some(Some("alice".into())),
    };
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        store.put_session("alice", &alice).unwrap();
        store
            .put_subscription("alice", "a/+", &sub(0x01, Some(5)))
            .unwrap();
        store
            .put_subscription("alice", "$share/g/b/#", &sub(0x02, None))
            .unwrap();
        store
            .put_subscription("alice", "gone/filter", &sub(0, None))
            .unwrap();
        store.delete_subscription("alice", "gone/filter").unwrap();
        for seq in 10..20 {
            store
                .queue_push("alice", seq, &queued("alice", seq))
                .unwrap();
        }
        store.queue_delete("alice", 15).unwrap();
        for (id, state) in [
            (7, InflightRecord::AWAIT_PUBACK),
            (8, InflightRecord::AWAIT_PUBCOMP),
            (9, InflightRecord::AWAIT_PUBREC),
        ] {
            let rec = InflightRecord {
                queued: queued("alice", 100 + id as u64),
                state,
            };
            store.inflight_put("alice", id, &rec).unwrap();
        }
        store.inflight_delete("alice", 9).unwrap();
        for id in [3, 65_535, 4] {
            store.incoming_put("alice", id).unwrap();
        }
        store.incoming_delete("alice", 4).unwrap();

        store.put_session("bob", &session(60)).unwrap();
        store.put_subscription("bob", "x", &sub(0, None)).unwrap();

        store.retained_put("r/1", &message("r/1", b"one")).unwrap();
        store.retained_put("r/2", &message("r/2", b"two")).unwrap();
        store.retained_delete("r/2").unwrap();
        // Dropped without persist: a clean close makes everything durable.
    }

    let store = Store::open(dir.path(), &opts()).unwrap();
    let rec = store.load().unwrap();
    assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
    assert_eq!(rec.orphans_removed, 0);
    assert_eq!(rec.sessions.len(), 2);

    let a = find(&rec.sessions, "alice");
    assert_eq!(a.record, alice);
    let mut subs = a.subscriptions.clone();
    subs.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        subs,
        vec![
            ("$share/g/b/#".to_owned(), sub(0x02, None)),
            ("a/+".to_owned(), sub(0x01, Some(5))),
        ]
    );
    let inflight: Vec<_> = a.inflight.iter().map(|(id, r)| (*id, r.state)).collect();
    assert_eq!(
        inflight,
        vec![
            (7, InflightRecord::AWAIT_PUBACK),
            (8, InflightRecord::AWAIT_PUBCOMP)
        ]
    );
    assert_eq!(a.inflight[1].1.queued, queued("alice", 108));
    assert_eq!(a.incoming, vec![3, 65_535]);
    assert_eq!((a.queue_first_seq, a.queue_next_seq), (10, 20));
    assert_eq!(a.queue_len, 9);
    let cost: usize = (10..20)
        .filter(|s| *s != 15)
        .map(|s| format!("alice:{s}").len() + "q/t".len())
        .sum();
    assert_eq!(a.queue_bytes, cost as u64);
    assert_eq!(
        queue_seqs(&store, "alice"),
        vec![10, 11, 12, 13, 14, 16, 17, 18, 19]
    );

    let b = find(&rec.sessions, "bob");
    assert_eq!(b.subscriptions, vec![("x".to_owned(), sub(0, None))]);
    assert_eq!((b.queue_len, b.queue_next_seq), (0, 0));

    assert_eq!(rec.retained, vec![message("r/1", b"one")]);

    // The records convert back to the runtime types.
    let will = a.record.will.as_ref().unwrap().to_will(&clock).unwrap();
    assert_eq!(will.delay_s, 30);
    assert_eq!(will.msg.properties.message_expiry_interval, Some(60));
    let opts = subs[1].1.to_subscription("a/+").unwrap();
    assert_eq!(opts.id, Some(5));
    let d = a.inflight[0].1.to_inflight(7, &clock).unwrap();
    assert_eq!(d.delivery.sub_ids, vec![1]);
}

/// The writer of `persisted_writes_survive_sigkill_of_the_writer`: runs only in the child
/// process that test spawns (it passes the directory in this variable).
const CHILD_DIR_ENV: &str = "SHARDMQ_STORAGE_TEST_WRITER_DIR";

#[test]
fn sigkill_child_writer() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return; // not the child
    };
    let store = Store::open(Path::new(&dir), &opts()).unwrap();
    let rec = store.load().unwrap();
    assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
    let mut seq = rec.sessions.first().map_or(0, |s| s.queue_next_seq);
    store.put_session("c", &session(u32::MAX)).unwrap();
    let mut out = std::io::stdout().lock();
    loop {
        // 100 direct writes and a batch of 100, then one fsync; report what is durable.
        for _ in 0..100 {
            store.queue_push("c", seq, &queued("c", seq)).unwrap();
            seq += 1;
        }
        let mut batch = store.batch();
        for _ in 0..100 {
            batch.queue_push("c", seq, &queued("c", seq)).unwrap();
            seq += 1;
        }
        batch.incoming_put("c", (seq % 65_535) as u16 + 1).unwrap();
        batch.commit().unwrap();
        store.persist().unwrap();
        writeln!(out, "durable {seq}").unwrap();
        out.flush().unwrap();
        // Unpersisted writes follow at once: the kill lands among them.
    }
}

#[test]
fn persisted_writes_survive_sigkill_of_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut durable = 0u64;
    for round in 0..3u64 {
        let mut child = Command::new(&exe)
            .args(["sigkill_child_writer", "--exact", "--nocapture"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a varying number of group commits.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let wanted = 3 + (nanos as u64 + round * 7) % 10;
        let mut seen = 0;
        while seen < wanted {
            let line = lines
                .next()
                .expect("writer exited early")
                .expect("writer output");
            if let Some(n) = line.strip_prefix("durable ") {
                durable = n.parse().unwrap();
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let store = Store::open(dir.path(), &opts()).unwrap();
        let rec = store.load().unwrap();
        assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
        let s = find(&rec.sessions, "c");
        // Everything acknowledged as durable is back, and what survived beyond it is a
        // gap-free prefix of what was written.
        assert!(
            s.queue_next_seq >= durable,
            "round {round}: {} < {durable}",
            s.queue_next_seq
        );
        assert_eq!(s.queue_first_seq, 0);
        assert_eq!(s.queue_len, s.queue_next_seq);
        let seqs = queue_seqs(&store, "c");
        assert_eq!(seqs.len() as u64, s.queue_next_seq);
        assert!(seqs.iter().enumerate().all(|(i, s)| i as u64 == *s));
    }
}

#[test]
fn a_forgotten_store_keeps_its_directory_locked() {
    // fjall locks with flock(2), which belongs to the open file description: a store that
    // was never dropped keeps the lock even within the same process, so a crash cannot be
    // simulated with mem::forget (hence the child process above).
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(1)).unwrap();
    store.persist().unwrap();
    std::mem::forget(store);
    let err = Store::open(dir.path(), &opts()).unwrap_err();
    assert!(matches!(err, StorageError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("already open"), "{err}");
}

#[test]
fn delete_session_removes_all_keys_of_that_client_and_spares_prefix_sharing_ids() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        for id in ["a", "ab", "abc", "b"] {
            store.put_session(id, &session(60)).unwrap();
            store.put_subscription(id, "t/#", &sub(1, None)).unwrap();
            for seq in 0..3 {
                store.queue_push(id, seq, &queued(id, seq)).unwrap();
            }
            let inflight = InflightRecord {
                queued: queued(id, 9),
                state: InflightRecord::AWAIT_PUBACK,
            };
            store.inflight_put(id, 1, &inflight).unwrap();
            store.incoming_put(id, 2).unwrap();
        }
        store.persist().unwrap();
    }
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        store.delete_session("ab").unwrap();
        store.persist().unwrap();
    }
    let store = Store::open(dir.path(), &opts()).unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.orphans_removed, 0);
    let mut ids: Vec<_> = rec.sessions.iter().map(|s| s.client_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, vec!["a", "abc", "b"]);
    for s in &rec.sessions {
        assert_eq!(s.subscriptions.len(), 1, "{}", s.client_id);
        assert_eq!(s.queue_len, 3, "{}", s.client_id);
        assert_eq!((s.inflight.len(), s.incoming.len()), (1, 1));
    }
    assert!(queue_seqs(&store, "ab").is_empty());
    // No key of "ab" is left in any keyspace.
    let ab_prefix = [0u8, 2, b'a', b'b'];
    for space in Space::ALL {
        for (k, _) in store.raw_entries(space).unwrap() {
            assert!(!k.starts_with(&ab_prefix), "{space:?} key {k:?} left");
        }
    }
}

#[test]
fn queue_comes_back_in_sequence_order() {
    let dir = tempfile::tempdir().unwrap();
    let seqs = [258u64, 3, 1 << 40, 0, 255, 256, 65_536, 1, u64::MAX - 1];
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        store.put_session("c", &session(60)).unwrap();
        for &s in &seqs {
            store.queue_push("c", s, &queued("c", s)).unwrap();
        }
    }
    let store = Store::open(dir.path(), &opts()).unwrap();
    let mut sorted = seqs.to_vec();
    sorted.sort();
    assert_eq!(queue_seqs(&store, "c"), sorted);
    // Paging: from a sequence number, a bounded count.
    let mut from = 0;
    let mut paged = Vec::new();
    loop {
        let page = store.queue_read("c", from, 4).unwrap();
        let Some(&(last, _)) = page.last() else { break };
        paged.extend(page.iter().map(|p| p.0));
        from = last + 1;
    }
    assert_eq!(paged, sorted);
    let s = &store.load().unwrap().sessions[0];
    assert_eq!((s.queue_first_seq, s.queue_next_seq), (0, u64::MAX));
}

#[test]
fn queue_trim_deletes_below_the_sequence_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        for id in ["c", "cc"] {
            store.put_session(id, &session(60)).unwrap();
            for seq in 0..1000 {
                store.queue_push(id, seq, &queued(id, seq)).unwrap();
            }
        }
        store.queue_delete_range("c", 990).unwrap();
        store.persist().unwrap();
    }
    let store = Store::open(dir.path(), &opts()).unwrap();
    assert_eq!(queue_seqs(&store, "c"), (990..1000).collect::<Vec<_>>());
    assert_eq!(queue_seqs(&store, "cc").len(), 1000);
    let rec = store.load().unwrap();
    let c = find(&rec.sessions, "c");
    assert_eq!(
        (c.queue_first_seq, c.queue_next_seq, c.queue_len),
        (990, 1000, 10)
    );
}

#[test]
fn damaged_value_is_reported_with_its_key_and_skipped_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let bad_key_hex;
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        store.put_session("c", &session(60)).unwrap();
        for seq in 0..5 {
            store.queue_push("c", seq, &queued("c", seq)).unwrap();
        }
        store.retained_put("r", &message("r", b"retained")).unwrap();
        // Flip one payload bit of queue entry 2 and one of the retained message, writing
        // the damaged bytes back under the same keys.
        let mut entries = store.raw_entries(Space::Queue).unwrap();
        let (key, mut value) = entries.remove(2);
        let n = value.len();
        value[n - 20] ^= 0x04;
        store.raw_put(Space::Queue, &key, &value).unwrap();
        bad_key_hex = key.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let (rkey, mut rvalue) = store.raw_entries(Space::Retained).unwrap().remove(0);
        rvalue[12] ^= 0x80;
        store.raw_put(Space::Retained, &rkey, &rvalue).unwrap();
        store.persist().unwrap();
    }
    let store = Store::open(dir.path(), &opts()).unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.damaged.len(), 2, "{:?}", rec.damaged);
    assert_eq!(
        rec.damaged[0],
        format!(
            "queue/{bad_key_hex}: {}",
            rec.damaged[0].split(": ").nth(1).unwrap()
        )
    );
    assert!(rec.damaged[0].contains("checksum mismatch"));
    assert!(rec.damaged[1].starts_with("retained/72: checksum mismatch"));
    assert!(rec.retained.is_empty());
    let s = find(&rec.sessions, "c");
    assert_eq!(
        (s.queue_len, s.queue_first_seq, s.queue_next_seq),
        (4, 0, 5)
    );
    assert_eq!(queue_seqs(&store, "c"), vec![0, 1, 3, 4]);
    // Overwriting or deleting a damaged entry repairs it.
    store.queue_push("c", 2, &queued("c", 2)).unwrap();
    store.retained_delete("r").unwrap();
    assert!(store.load().unwrap().damaged.is_empty());
}

#[test]
fn damaged_table_file_costs_only_the_clients_in_the_bad_block() {
    let dir = tempfile::tempdir().unwrap();
    let clients: Vec<String> = (0..20).map(|i| format!("client-{i:02}")).collect();
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        for c in &clients {
            store.put_session(c, &session(60)).unwrap();
            for seq in 0..500 {
                let mut q = queued(c, seq);
                q.message.payload.resize(200, b'.');
                store.queue_push(c, seq, &q).unwrap();
            }
        }
        store.flush_to_tables().unwrap();
    }
    // The largest table file is the queue's; damage a byte in its data blocks.
    let (table, len) = files_under(dir.path())
        .into_iter()
        .filter(|(p, _)| p.components().any(|c| c.as_os_str() == "tables"))
        .max_by_key(|(_, len)| *len)
        .unwrap();
    flip_byte(&table, len as usize / 3);

    let store = Store::open(dir.path(), &opts()).unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.sessions.len(), clients.len());
    assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
    assert!(rec.damaged[0].starts_with("queue/"), "{}", rec.damaged[0]);
    assert!(rec.damaged[0].contains("read error"), "{}", rec.damaged[0]);
    let full = rec.sessions.iter().filter(|s| s.queue_len == 500).count();
    assert!(full >= clients.len() - 2, "only {full} queues intact");
    assert!(rec.sessions.iter().any(|s| s.queue_len < 500));
    // A read that avoids the bad block works; one that crosses it is an error, not a panic.
    let results: Vec<_> = clients
        .iter()
        .map(|c| store.queue_read(c, 0, usize::MAX).is_ok())
        .collect();
    assert!(results.iter().filter(|ok| **ok).count() >= clients.len() - 2);
}

#[test]
fn damaged_journal_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), &opts()).unwrap();
        store.put_session("c", &session(60)).unwrap();
        for seq in 0..50 {
            store.queue_push("c", seq, &queued("c", seq)).unwrap();
        }
        store.persist().unwrap();
    }
    let journal = files_under(dir.path())
        .into_iter()
        .find(|(p, _)| p.extension().is_some_and(|e| e == "jnl"))
        .unwrap()
        .0;
    flip_byte(&journal, 200);
    let err = Store::open(dir.path(), &opts()).unwrap_err();
    assert!(matches!(err, StorageError::JournalDamaged { .. }), "{err}");
    assert!(err.to_string().contains("journal"), "{err}");
}

#[test]
fn a_directory_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();

    // A directory with other files in it: refused, left untouched.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let err = Store::open(&other, &opts()).unwrap_err();
    assert!(matches!(err, StorageError::NotAStore { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("is not a shardmq store"), "{msg}");
    assert!(
        msg.contains("notes.txt") && msg.contains(MARKER_FILE),
        "{msg}"
    );
    let names: Vec<_> = std::fs::read_dir(&other).unwrap().collect();
    assert_eq!(names.len(), 1);

    // A plain file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, &opts()).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");

    // A store of a format this build does not know.
    let future = dir.path().join("future");
    std::fs::create_dir(&future).unwrap();
    std::fs::write(future.join(MARKER_FILE), b"shardmq-store 99\n").unwrap();
    let err = Store::open(&future, &opts()).unwrap_err();
    assert!(
        matches!(err, StorageError::UnsupportedFormat { .. }),
        "{err}"
    );

    // A missing directory (parents included) and an empty one become stores.
    let fresh = dir.path().join("data").join("shard-0");
    Store::open(&fresh, &opts()).unwrap();
    assert!(fresh.join(MARKER_FILE).exists());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    drop(Store::open(&empty, &opts()).unwrap());
    Store::open(&empty, &opts()).unwrap();
}

/// Numbers for the report: `cargo test --release --test storage_recovery -- --ignored
/// --nocapture measure`.
#[test]
#[ignore]
fn measure_queue_push_throughput_and_persist_latency() {
    fn pct(v: &mut [Duration], p: f64) -> Duration {
        v.sort();
        v[((v.len() as f64 - 1.0) * p) as usize]
    }
    let rec = {
        let mut q = queued("client-0001", 0);
        q.message.topic = "sensors/building-7/floor-3/temp".into();
        q.message.payload = vec![0xAB; 200];
        q
    };
    const N: u64 = 200_000;

    // 1. Direct pushes, one persist per 100.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let mut persists = Vec::new();
    let t = Instant::now();
    for seq in 0..N {
        store.queue_push("client-0001", seq, &rec).unwrap();
        if seq % 100 == 99 {
            let p = Instant::now();
            store.persist().unwrap();
            persists.push(p.elapsed());
        }
    }
    let el = t.elapsed();
    eprintln!(
        "queue_push + persist/100: {:.0} inserts/s; persist p50 {:?} p99 {:?} max {:?}",
        N as f64 / el.as_secs_f64(),
        pct(&mut persists, 0.5),
        pct(&mut persists, 0.99),
        persists.iter().max().unwrap()
    );
    eprintln!("disk_bytes after {N}: {}", store.disk_bytes());
    drop(store);

    // 2. No persist at all.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let t = Instant::now();
    for seq in 0..N {
        store.queue_push("client-0001", seq, &rec).unwrap();
    }
    eprintln!(
        "queue_push unsynced: {:.0} inserts/s",
        N as f64 / t.elapsed().as_secs_f64()
    );
    drop(store);

    // 3. StoreBatch of 100, commit, persist.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let mut build = Duration::ZERO;
    let t = Instant::now();
    for chunk in 0..N / 100 {
        let b0 = Instant::now();
        let mut b = store.batch();
        for seq in chunk * 100..chunk * 100 + 100 {
            b.queue_push("client-0001", seq, &rec).unwrap();
        }
        build += b0.elapsed();
        b.commit().unwrap();
        store.persist().unwrap();
    }
    eprintln!(
        "StoreBatch(100) + commit + persist: {:.0} inserts/s (building the batches: {:.0} ns/op)",
        N as f64 / t.elapsed().as_secs_f64(),
        build.as_nanos() as f64 / N as f64
    );
    drop(store);

    // 4. Direct pushes while another thread persists in a loop: with the engine's own
    //    persist (journal mutex held across the fsync) and with `persist` (fsync outside).
    let mut last_dir = None;
    for locked in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let syncer = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    if locked {
                        store.persist_locked().unwrap();
                    } else {
                        store.persist().unwrap();
                    }
                    lat.push(t.elapsed());
                    std::thread::sleep(Duration::from_micros(200));
                }
                lat
            })
        };
        let mut lat = Vec::with_capacity(N as usize);
        let t = Instant::now();
        for seq in 0..N {
            let w = Instant::now();
            store.queue_push("client-0001", seq, &rec).unwrap();
            lat.push(w.elapsed());
        }
        let el = t.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut fsyncs = syncer.join().unwrap();
        eprintln!(
            "queue_push during a persist loop ({}, {} persists, p50 {:?}): {:.0} inserts/s, \
             write p50 {:?} p99 {:?} p99.9 {:?} max {:?}, {} writes over 10 ms",
            if locked { "persist_locked" } else { "persist" },
            fsyncs.len(),
            pct(&mut fsyncs, 0.5),
            N as f64 / el.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut lat, 0.999),
            lat.iter().max().unwrap(),
            lat.iter()
                .filter(|l| **l > Duration::from_millis(10))
                .count()
        );
        drop(store);
        last_dir = Some(dir);
    }
    let dir = last_dir.unwrap();

    // 5. Recovery scan of what was written in 4.
    let t = Instant::now();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let opened = t.elapsed();
    store.put_session("client-0001", &session(60)).unwrap();
    let t = Instant::now();
    let rec = store.load().unwrap();
    eprintln!(
        "reopen {:?}, load of {} queued: {:?}",
        opened,
        rec.sessions[0].queue_len,
        t.elapsed()
    );
}
