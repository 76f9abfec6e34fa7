//! Unit tests of the store: records round-trip, batches are atomic, queues keep order and
//! bounds, re-homing copies everything, and the engine seals and flushes what was persisted.

use super::*;

fn opts() -> StoreOptions {
    StoreOptions {
        cache_bytes: 1 << 20,
        max_cached_files: 16,
        memtable_bytes: 1 << 20,
        max_journal_bytes: 64 << 20,
        worker_threads: 1,
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

fn msg(topic: &str, payload: &[u8]) -> MessageRecord {
    MessageRecord {
        topic: topic.into(),
        payload: payload.to_vec(),
        qos: 1,
        retain: false,
        properties: Vec::new(),
        origin: None,
        created_unix_ms: 1_700_000_000_000,
    }
}

fn queued(n: u64) -> QueuedRecord {
    QueuedRecord {
        message: msg("t", &n.to_be_bytes()),
        qos: 1,
        retain: false,
        sub_ids: vec![],
        via_share: None,
    }
}

/// The numbers of the journal files (`<n>.jnl`) in `dir`, in order.
fn journal_numbers(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".jnl").and_then(|n| n.parse().ok())
        })
        .collect();
    v.sort();
    v
}

/// `len` bytes that do not compress (the engine compresses large journal values).
fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn seqs(store: &Store, client: &str) -> Vec<u64> {
    store
        .queue_read(client, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[test]
fn queue_reads_in_sequence_order_from_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    for seq in [5u64, 1, 300, 256, 2, 70_000] {
        store.queue_push("c", seq, &queued(seq)).unwrap();
    }
    assert_eq!(seqs(&store, "c"), vec![1, 2, 5, 256, 300, 70_000]);
    let page = store.queue_read("c", 3, 2).unwrap();
    assert_eq!(page.iter().map(|p| p.0).collect::<Vec<_>>(), vec![5, 256]);
    assert_eq!(page[0].1, queued(5));
    assert!(store.queue_read("c", 0, 0).unwrap().is_empty());
    assert!(store.queue_read("other", 0, 10).unwrap().is_empty());
}

#[test]
fn queue_delete_range_trims_below_only_that_client() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    for seq in 0..10 {
        store.queue_push("a", seq, &queued(seq)).unwrap();
        store.queue_push("ab", seq, &queued(seq)).unwrap();
    }
    store.queue_delete_range("a", 7).unwrap();
    store.queue_delete("a", 8).unwrap();
    assert_eq!(seqs(&store, "a"), vec![7, 9]);
    assert_eq!(seqs(&store, "ab"), (0..10).collect::<Vec<_>>());
    store.queue_delete_range("a", 0).unwrap();
    assert_eq!(seqs(&store, "a"), vec![7, 9]);
    store.queue_delete_range("a", u64::MAX).unwrap();
    assert!(seqs(&store, "a").is_empty());
}

#[test]
fn delete_session_spares_a_client_whose_id_extends_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    for id in ["ab", "abc", "a"] {
        store.put_session(id, &session(60)).unwrap();
        let sub = SubscriptionRecord {
            options: 1,
            id: None,
        };
        store.put_subscription(id, "x/#", &sub).unwrap();
        store.queue_push(id, 1, &queued(1)).unwrap();
        let inflight = InflightRecord {
            queued: queued(2),
            state: InflightRecord::AWAIT_PUBREC,
        };
        store.inflight_put(id, 9, &inflight).unwrap();
        store.incoming_put(id, 10).unwrap();
    }
    store.delete_session("ab").unwrap();
    for space in Space::PER_CLIENT {
        for (k, _) in store.raw_entries(space).unwrap() {
            let (_, id, _) = split_client_key(&k).unwrap();
            assert_ne!(id, "ab", "{} key left behind", space.name());
        }
    }
    let rec = store.load().unwrap();
    let ids: Vec<_> = rec.sessions.iter().map(|s| s.client_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "abc"]);
    for s in &rec.sessions {
        assert_eq!(s.subscriptions.len(), 1);
        assert_eq!((s.queue_len, s.inflight.len(), s.incoming.len()), (1, 1, 1));
    }
    assert_eq!(rec.orphans_removed, 0);
}

#[test]
fn batch_applies_in_call_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(1)).unwrap();
    for seq in 0..5 {
        store.queue_push("c", seq, &queued(seq)).unwrap();
    }
    // A clean start: the old session goes, a new one starts in the same batch.
    let mut b = store.batch();
    b.queue_push("c", 5, &queued(5)).unwrap();
    b.delete_session("c").unwrap();
    b.put_session("c", &session(2)).unwrap();
    b.queue_push("c", 0, &queued(100)).unwrap();
    b.incoming_put("c", 3).unwrap();
    b.incoming_delete("c", 3).unwrap();
    assert_eq!(b.len(), 6);
    b.commit().unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.sessions.len(), 1);
    assert_eq!(rec.sessions[0].record.expiry_s, 2);
    assert!(rec.sessions[0].incoming.is_empty());
    let q = store.queue_read("c", 0, 10).unwrap();
    assert_eq!(q, vec![(0, queued(100))]);

    // A trim covers pushes of the same batch; a later push survives it.
    let mut b = store.batch();
    b.queue_push("c", 1, &queued(1)).unwrap();
    b.queue_push("c", 2, &queued(2)).unwrap();
    b.queue_delete_range("c", 2).unwrap();
    b.queue_push("c", 1, &queued(11)).unwrap();
    b.commit().unwrap();
    assert_eq!(
        store.queue_read("c", 0, 10).unwrap(),
        vec![(1, queued(11)), (2, queued(2))]
    );
    store.batch().commit().unwrap();
}

#[test]
fn damaged_values_are_reported_with_their_key_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    for seq in 0..3 {
        store.queue_push("c", seq, &queued(seq)).unwrap();
    }
    let key = queue_key("c", 1).unwrap();
    let (_, mut value) = store
        .raw_entries(Space::Queue)
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    store.raw_put(Space::Queue, &key, &value).unwrap();
    store.raw_put(Space::Retained, b"r", b"garbage").unwrap();

    let rec = store.load().unwrap();
    assert_eq!(rec.damaged.len(), 2, "{:?}", rec.damaged);
    assert!(rec.damaged[0].starts_with(&format!("queue/{}: checksum", hex(&key))));
    assert!(
        rec.damaged[1].starts_with("retained/72: "),
        "{}",
        rec.damaged[1]
    );
    let s = &rec.sessions[0];
    assert_eq!(
        (s.queue_first_seq, s.queue_next_seq, s.queue_len),
        (0, 3, 2)
    );
    assert_eq!(seqs(&store, "c"), vec![0, 2]);
    assert_eq!(store.queue_read("c", 0, 1).unwrap()[0].0, 0);
    assert_eq!(store.queue_read("c", 1, 1).unwrap()[0].0, 2);
}

#[test]
fn a_damaged_session_keeps_its_other_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    store.queue_push("c", 0, &queued(0)).unwrap();
    store
        .raw_put(
            Space::Sessions,
            &client_prefix("c").unwrap(),
            b"SQs\x01xxxx",
        )
        .unwrap();
    // Orphans (no session record at all) are deleted.
    store.queue_push("gone", 0, &queued(0)).unwrap();
    store.incoming_put("gone", 4).unwrap();
    let rec = store.load().unwrap();
    assert!(rec.sessions.is_empty());
    assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
    assert_eq!(rec.orphans_removed, 2);
    assert_eq!(seqs(&store, "c"), vec![0]);
    assert!(seqs(&store, "gone").is_empty());
}

#[test]
fn malformed_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    store.raw_put(Space::Queue, &[0, 9, b'x'], b"v").unwrap();
    let mut k = client_prefix("c").unwrap();
    k.extend_from_slice(&[1, 2, 3]); // not a u16 packet id
    store.raw_put(Space::Inflight, &k, b"v").unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.damaged.len(), 2, "{:?}", rec.damaged);
    assert!(rec.damaged.iter().all(|d| d.contains("malformed key")));
    assert_eq!(rec.sessions.len(), 1);
}

#[test]
fn oversized_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let id = "i".repeat(40_000);
    let filter = "f".repeat(30_000);
    let sub = SubscriptionRecord {
        options: 0,
        id: None,
    };
    let err = store.put_subscription(&id, &filter, &sub).unwrap_err();
    assert!(matches!(err, StorageError::KeyTooLong { .. }), "{err}");
    let mut b = store.batch();
    assert!(b.put_subscription(&id, &filter, &sub).is_err());
}

#[test]
fn store_is_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<Store>();
    fn send<T: Send + 'static>() {}
    send::<StoreBatch>();
    send::<StorageError>();
}

#[test]
fn tiny_options_are_clamped_not_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let o = StoreOptions {
        max_cached_files: 0,
        worker_threads: 0,
        ..opts()
    };
    let store = Store::open(dir.path(), &o).unwrap();
    store.incoming_put("c", 1).unwrap();
    store.persist().unwrap();
    assert!(store.disk_bytes() > 0);
}

#[test]
fn persist_follows_journal_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let journals = || journal_numbers(dir.path());
    // The engine seals its journal at the first flush after it passed 64 MB: its own
    // (memtables of 1 MiB flush in the background, when the worker gets to it) or the one
    // asked for here once 64 MB are written. Written until it has, at most 3 journals' worth.
    let mut big = queued(0);
    big.message.payload = incompressible(1 << 20);
    let before = journals();
    let mut seq = 0;
    while journals() == before {
        assert!(seq < 200, "no journal rotation after {seq} MiB");
        if seq >= 64 {
            store.flush_to_tables().unwrap();
        }
        store.queue_push("c", seq, &big).unwrap();
        store.persist().unwrap();
        seq += 1;
    }
    // One more write, persisted after the rotation.
    store.queue_push("c", seq, &big).unwrap();
    store.persist().unwrap();
    seq += 1;
    let after = journals();
    let cached = store
        .engine()
        .unwrap()
        .newest_journal
        .load(Ordering::Relaxed);
    let newest = after.iter().copied().max();
    assert_eq!(Some(cached), newest);
    store.persist_locked().unwrap();
    drop(store);
    let store = Store::open(dir.path(), &opts()).unwrap();
    assert_eq!(seqs(&store, "c"), (0..seq).collect::<Vec<_>>());
}

/// A store's sessions (each with its queue) and retained messages.
type Contents = (
    Vec<(RecoveredSession, Vec<(u64, QueuedRecord)>)>,
    Vec<MessageRecord>,
);

/// Everything of a store, as `load` and `queue_read` see it (queue included), for equality.
fn contents(store: &Store) -> Contents {
    let rec = store.load().unwrap();
    assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
    let mut sessions: Vec<_> = rec
        .sessions
        .into_iter()
        .map(|s| {
            let q = store.queue_read(&s.client_id, 0, usize::MAX).unwrap();
            (s, q)
        })
        .collect();
    sessions.sort_by(|a, b| a.0.client_id.cmp(&b.0.client_id));
    let mut retained = rec.retained;
    retained.sort_by(|a, b| a.topic.cmp(&b.topic));
    (sessions, retained)
}

#[test]
fn copy_into_moves_everything_and_the_target_wins() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let [src, t0, t1] = [0, 1, 2].map(|i| Store::open(dirs[i].path(), &opts()).unwrap());
    // Client "a" goes to target 0, "b" and "kept" to target 1; topics by their first byte.
    let session_home = |id: &str| usize::from(id != "a");
    let retained_home = |t: &str| usize::from(t.starts_with('y'));
    let sub = SubscriptionRecord {
        options: 1,
        id: Some(7),
    };
    for (id, expiry) in [("a", 10), ("b", 20), ("kept", 30)] {
        src.put_session(id, &session(expiry)).unwrap();
        src.put_subscription(id, "x/#", &sub).unwrap();
        for seq in 40..45 {
            src.queue_push(id, seq, &queued(seq)).unwrap();
        }
    }
    let mut b = src.batch();
    b.inflight_put(
        "a",
        9,
        &InflightRecord {
            queued: queued(1),
            state: InflightRecord::AWAIT_PUBREC,
        },
        false,
    )
    .unwrap();
    b.incoming_put("b", 12).unwrap();
    let mut old = msg("x/old", b"src");
    old.created_unix_ms += 1;
    b.retained_put("x/old", &old).unwrap();
    b.retained_put("y/new", &msg("y/new", b"src")).unwrap();
    b.retained_put("y/plain", &msg("y/plain", b"src")).unwrap();
    b.commit().unwrap();
    // Target 0: an orphan key of "a" and an older retained message of "x/old". Target 1:
    // its own session of "kept" and a newer "y/new".
    t0.put_subscription("a", "orphan", &sub).unwrap();
    t0.retained_put("x/old", &msg("x/old", b"t0")).unwrap();
    t1.put_session("kept", &session(99)).unwrap();
    t1.queue_push("kept", 1, &queued(1)).unwrap();
    let mut newer = msg("y/new", b"t1");
    newer.created_unix_ms += 1;
    t1.retained_put("y/new", &newer).unwrap();

    let before = contents(&src);
    let targets = [t0.clone(), t1.clone()];
    let copied = src
        .copy_into(&targets, session_home, retained_home)
        .unwrap();
    assert_eq!(
        copied,
        Copied {
            sessions: 2,
            queued: 10,
            sessions_kept: 1,
            retained: 2,
            retained_kept: 1,
            damaged: vec![],
        }
    );
    assert_eq!(contents(&src), before, "the source is left as it was");

    let (s0, r0) = contents(&t0);
    assert_eq!(s0.len(), 1);
    assert_eq!(s0[0], before.0[0], "a, exactly (the orphan is gone)");
    assert_eq!(r0, vec![old.clone()]);
    let (s1, r1) = contents(&t1);
    assert_eq!(s1.len(), 2);
    assert_eq!(s1[0], before.0[1], "b, exactly");
    assert_eq!(s1[1].0.record, session(99), "the target's kept wins");
    assert_eq!(s1[1].1, vec![(1, queued(1))]);
    assert_eq!(r1, vec![newer.clone(), msg("y/plain", b"src")]);

    // Again, as after a crash before the source was removed: nothing changes.
    let after = (contents(&t0), contents(&t1));
    let again = src
        .copy_into(&targets, session_home, retained_home)
        .unwrap();
    assert_eq!((again.sessions, again.retained), (0, 0));
    assert_eq!((again.sessions_kept, again.retained_kept), (3, 3));
    assert_eq!((contents(&t0), contents(&t1)), after);

    // The targets come back after a reopen.
    drop((targets, t0, t1));
    let t0 = Store::open(dirs[1].path(), &opts()).unwrap();
    let t1 = Store::open(dirs[2].path(), &opts()).unwrap();
    assert_eq!((contents(&t0), contents(&t1)), after);
}

#[test]
fn dedup_keys_load_per_session_go_with_the_session_and_are_copied() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s"), &opts()).unwrap();
    for id in ["a", "ab"] {
        store.put_session(id, &session(60)).unwrap();
    }
    let mut b = store.batch();
    b.queue_push("a", 0, &queued(0)).unwrap();
    b.dedup_put("a", "pub", 7).unwrap();
    b.dedup_put("a", "pub-2", 7).unwrap();
    b.dedup_put("a", "pub", 8).unwrap();
    b.dedup_put("ab", "pub", 7).unwrap();
    b.commit().unwrap();
    store.dedup_delete("a", "pub", 8).unwrap();
    let rec = store.load().unwrap();
    let a = rec.sessions.iter().find(|s| s.client_id == "a").unwrap();
    assert_eq!(
        a.dedup,
        vec![("pub".to_owned(), 7), ("pub-2".to_owned(), 7)]
    );
    assert_eq!(rec.damaged, Vec::<String>::new());

    // Copied with the session into the store that now owns it.
    let target = Store::open(&dir.path().join("t"), &opts()).unwrap();
    store
        .copy_into(std::slice::from_ref(&target), |_| 0, |_| 0)
        .unwrap();
    let copied = target.load().unwrap();
    let ca = copied.sessions.iter().find(|s| s.client_id == "a").unwrap();
    assert_eq!(ca.dedup, a.dedup);

    // Deleted with the session; a key without a session is an orphan.
    store.delete_session("a").unwrap();
    store.dedup_put("gone", "pub", 1).unwrap();
    let rec = store.load().unwrap();
    assert_eq!(rec.orphans_removed, 1);
    let ab = rec.sessions.iter().find(|s| s.client_id == "ab").unwrap();
    assert_eq!(ab.dedup, vec![("pub".to_owned(), 7)]);
    assert!(store
        .raw_entries(Space::Dedup)
        .unwrap()
        .iter()
        .all(|(k, _)| split_client_key(k).unwrap().1 == "ab"));
}

/// Canary for the `#[doc(hidden)]` fjall APIs the store relies on (pinned in Cargo.toml):
/// `write_buffer_size` counts what was written and not flushed, and `persist` seals the
/// memtables once it reaches half of `memtable_bytes`, after which the engine flushes them
/// and the count goes down. If an upgrade changes either, this fails instead of memory
/// growing in production.
#[test]
fn persist_seals_full_memtables_and_the_engine_flushes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let engine = store.engine().unwrap();
    let half = MIN_MEMTABLE_BYTES / 2;
    let payload = vec![7u8; 4096];
    let mut n = 0;
    while engine.db.write_buffer_size() < half {
        store
            .retained_put(&format!("canary/{n}"), &msg("canary", &payload))
            .unwrap();
        n += 1;
        assert!(n < 10_000, "write_buffer_size does not count writes");
    }
    store.persist().unwrap();
    assert!(
        engine
            .spaces
            .iter()
            .any(|ks| ks.sealed_memtable_count() > 0)
            || engine.db.write_buffer_size() < half,
        "persist sealed no memtable"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while engine.db.write_buffer_size() >= half {
        assert!(
            std::time::Instant::now() < deadline,
            "the sealed memtables were never flushed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_fresh_put_deleted_in_the_same_batch_is_not_written_and_other_deletes_are() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    store.queue_push("c", 1, &queued(1)).unwrap();
    let rec = InflightRecord {
        queued: queued(2),
        state: InflightRecord::AWAIT_PUBACK,
    };
    let mut b = store.batch();
    // Queue 1 is stored: its delete must be written even though 2 and 3 come and go here.
    b.queue_delete("c", 1).unwrap();
    b.queue_push("c", 2, &queued(2)).unwrap();
    b.queue_delete("c", 2).unwrap();
    b.queue_push("c", 3, &queued(3)).unwrap();
    // Packet id 5 taken and completed within the batch; 6 taken and still in flight.
    b.inflight_put("c", 5, &rec, true).unwrap();
    b.inflight_delete("c", 5).unwrap();
    b.inflight_put("c", 6, &rec, true).unwrap();
    assert!(b.bytes() > 0);
    b.commit().unwrap();
    assert_eq!(seqs(&store, "c"), vec![3]);
    let loaded = store.load().unwrap();
    let s = &loaded.sessions[0];
    assert_eq!(
        s.inflight.iter().map(|(pid, _)| *pid).collect::<Vec<_>>(),
        vec![6]
    );
    let raw: Vec<_> = store.raw_entries(Space::Queue).unwrap();
    assert_eq!(raw.len(), 1);
}

#[test]
fn a_session_deleted_in_the_batch_that_put_fresh_keys_leaves_nothing_and_stored_keys_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    store.queue_push("c", 1, &queued(1)).unwrap();
    let mut b = store.batch();
    b.queue_push("c", 2, &queued(2)).unwrap();
    b.delete_session("c").unwrap();
    b.commit().unwrap();
    assert!(
        seqs(&store, "c").is_empty(),
        "the stored entry is deleted too"
    );
    assert!(store.load().unwrap().sessions.is_empty());
}

/// Elision trusts the caller that a fresh key is absent; a caller that cannot be sure (after
/// a lost write, or records skipped at start) turns it off and the delete is written.
#[test]
fn without_elision_a_fresh_put_deleted_again_still_deletes_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    store.put_session("c", &session(60)).unwrap();
    let rec = InflightRecord {
        queued: queued(1),
        state: InflightRecord::AWAIT_PUBACK,
    };
    store.inflight_put("c", 5, &rec).unwrap(); // a record the session does not know of
    let mut b = store.batch().eliding(false);
    b.inflight_put("c", 5, &rec, true).unwrap();
    b.inflight_delete("c", 5).unwrap();
    b.commit().unwrap();
    assert!(store.load().unwrap().sessions[0].inflight.is_empty());
}

#[test]
fn a_rolled_back_batch_forgets_what_was_added_after_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let mut b = store.batch();
    b.put_session("a", &session(60)).unwrap();
    let mark = b.mark();
    let bytes = b.bytes();
    b.put_session("b", &session(60)).unwrap();
    b.rollback(mark);
    assert_eq!((b.len(), b.bytes()), (1, bytes));
    b.commit().unwrap();
    let ids: Vec<_> = store
        .load()
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.client_id)
        .collect();
    assert_eq!(ids, vec!["a".to_string()]);
}

/// The two halves of a persist name the active journal (the newest `<n>.jnl`), whether it
/// was listed or checked by its successor's absence; a journal not seen before is synced
/// by the engine itself once; a good fsync finishes the persist.
#[test]
fn persist_prepare_names_the_newest_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let newest = || *journal_numbers(dir.path()).last().unwrap();
    store.put_session("c", &session(1)).unwrap();
    assert!(matches!(
        store.persist_prepare().unwrap(),
        SyncTarget::Locked
    ));
    store.persist_locked().unwrap();
    for round in 0..3 {
        store.put_session("c", &session(round)).unwrap();
        let SyncTarget::Journal(path) = store.persist_prepare().unwrap() else {
            panic!("a journal seen before is synced by the caller");
        };
        assert_eq!(path, dir.path().join(format!("{}.jnl", newest())));
        let synced = std::fs::File::open(&path).and_then(|f| f.sync_data());
        store.persist_finish(synced).unwrap();
    }
    // A failed fsync poisons the store: nothing is vouched for again until it is reopened.
    let failed = Err(std::io::Error::other("injected"));
    assert!(store.persist_finish(failed).is_err());
    assert!(store.persist_prepare().is_err());
}

/// Journals rotated twice and the old ones deleted between two persists: the journal named
/// last time is gone (and its successor too), so the next persist must not name it again
/// (an fsync of a deleted file succeeds and vouches for nothing).
#[test]
fn persist_prepare_does_not_name_a_deleted_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &opts()).unwrap();
    let journals = || journal_numbers(dir.path());
    store.put_session("c", &session(1)).unwrap();
    let _ = store.persist_prepare().unwrap(); // the first journal, now known
    store.persist_locked().unwrap();
    let first = journals()[0];
    let big = incompressible(1 << 20);
    for round in 0..2u8 {
        // Past the 64 MiB journal limit, then flushed: the engine rotates and, once the
        // sealed journal's data is in tables, deletes it.
        for i in 0..70u32 {
            let key = [b"big/".as_slice(), &[round], &i.to_be_bytes()].concat();
            store.raw_put(Space::Retained, &key, &big).unwrap();
        }
        store.flush_to_tables().unwrap();
    }
    let now = journals();
    assert!(
        !now.contains(&first),
        "the first journal was deleted: {now:?}"
    );
    let newest = *now.last().unwrap();
    store.put_session("c", &session(2)).unwrap();
    match store.persist_prepare().unwrap() {
        SyncTarget::Locked => {}
        SyncTarget::Journal(path) => {
            assert_eq!(path, dir.path().join(format!("{newest}.jnl")), "{now:?}")
        }
    }
}

#[test]
fn a_clients_records_are_read_by_prefix_and_checked_before_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s"), &opts()).unwrap();
    for id in ["a", "ab"] {
        store.put_session(id, &session(60)).unwrap();
    }
    let mut b = store.batch();
    b.queue_push("a", 5, &queued(5)).unwrap();
    b.queue_push("a", 6, &queued(6)).unwrap();
    b.dedup_put("a", "pub", 7).unwrap();
    b.incoming_put("a", 9).unwrap();
    b.queue_push("ab", 0, &queued(0)).unwrap();
    b.commit().unwrap();
    assert_eq!(store.client_entries("nobody").unwrap(), None);
    let entries = store.client_entries("a").unwrap().unwrap();
    // Only a's: the session record first, then its queue, incoming id and dedup key.
    assert_eq!(entries[0].space, Space::Sessions);
    assert_eq!(entries.len(), 5, "{entries:?}");
    let (s, queue) = decode_client("a", &entries).unwrap();
    assert_eq!(
        (s.queue_first_seq, s.queue_next_seq, s.queue_len),
        (5, 7, 2)
    );
    assert_eq!(
        queue.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!(s.incoming, vec![9]);
    assert_eq!(s.dedup, vec![("pub".to_owned(), 7)]);
    // Damaged or misplaced entries are refused as a whole.
    let mut bad = entries.clone();
    bad[1].value[0] ^= 0xff;
    assert!(decode_client("a", &bad).is_err());
    assert!(
        decode_client("a", &entries[1..]).is_err(),
        "no session record first"
    );
    let mut twice = entries.clone();
    twice.push(entries[0].clone());
    assert!(decode_client("a", &twice).is_err());
    let mut retained = entries.clone();
    retained[1].space = Space::Retained;
    assert!(decode_client("a", &retained).is_err());
    assert!(decode_client("a", &[]).is_err());
    // Wire codes name a client's keyspaces only.
    for e in &entries {
        assert_eq!(Space::of_client_code(e.space.code()), Some(e.space));
    }
    assert_eq!(Space::of_client_code(Space::Retained.code()), None);
}

#[test]
fn the_last_words_of_a_log_bring_a_store_that_lacks_them_up_to_it_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let src = Store::open(&dir.path().join("src"), &opts()).unwrap();
    let store = Store::open(&dir.path().join("s"), &opts()).unwrap();
    let mut words = crate::storage::replica::LastWords::default();
    let mut n = 0;
    // Batch n of shard 0, applied to the source (the stream's truth) and, while `both`, to
    // the store too; its unit goes into the log read back.
    let mut batch = |both: bool, f: &dyn Fn(&mut StoreBatch)| {
        n += 1;
        for (s, log) in [(&src, true), (&store, false)] {
            if std::ptr::eq(s, &store) && !both {
                continue;
            }
            let mut b = s.batch();
            f(&mut b);
            let unit = b.commit_numbered(0, n).unwrap();
            if log {
                words.apply(&unit);
            }
        }
    };
    batch(true, &|b| {
        b.put_session("a", &session(60)).unwrap();
        b.put_session("b", &session(60)).unwrap();
        b.queue_push("a", 4, &queued(4)).unwrap();
        b.queue_push("b", 0, &queued(0)).unwrap();
        b.retained_put("r/t", &msg("r/t", b"kept")).unwrap();
    });
    // The store lost these (a power cut before its fsync): 4 delivered, 5 and 6 queued, b
    // gone, c new with a dedup key, and a retained message deleted (not the log's to say).
    batch(false, &|b| b.queue_delete("a", 4).unwrap());
    batch(false, &|b| {
        b.queue_push("a", 5, &queued(5)).unwrap();
        b.queue_push("a", 6, &queued(6)).unwrap();
    });
    batch(false, &|b| b.delete_session("b").unwrap());
    batch(false, &|b| {
        b.put_session("c", &session(30)).unwrap();
        b.dedup_put("c", "pub", 7).unwrap();
        b.retained_delete("r/t").unwrap();
    });
    words.apply(b"\x09junk");
    assert_eq!((words.units, words.damaged), (5, 1));
    assert_eq!(store.replica_batch().unwrap(), Some((0, 1)));
    let apply = |store: &Store| {
        let held = store.replica_batch().unwrap().map_or(0, |(_, n)| n);
        let ops: Vec<_> = words.ops_after(0, held, |_| true).collect();
        assert!(ops.iter().all(|(s, _, _)| *s != Space::Retained));
        store.apply_ops(ops.into_iter()).unwrap()
    };
    assert!(apply(&store) > 0);
    let (mut have, retained) = contents(&store);
    let (mut want, _) = contents(&src);
    have.iter_mut().for_each(|(s, _)| s.dedup.sort());
    want.iter_mut().for_each(|(s, _)| s.dedup.sort());
    assert_eq!(have, want, "the store is as the log says");
    assert_eq!(
        retained.len(),
        1,
        "retained messages are not the log's to restore"
    );
    assert_eq!(seqs(&store, "a"), vec![5, 6]);
    assert_eq!(store.client_entries("b").unwrap(), None);
    assert_eq!(
        store.replica_batch().unwrap(),
        Some((0, 5)),
        "its number moved on"
    );
    // A store ahead of the log (batch 6 applied, its append never made): nothing of the log
    // goes over it, not even on the keys both touched.
    let mut b = store.batch();
    b.queue_delete("a", 5).unwrap();
    b.dedup_delete("c", "pub", 7).unwrap();
    b.commit_numbered(0, 6).unwrap();
    assert_eq!(apply(&store), 0);
    assert_eq!(seqs(&store, "a"), vec![6]);
    // Durable.
    drop(store);
    let store = Store::open(&dir.path().join("s"), &opts()).unwrap();
    assert_eq!(seqs(&store, "a"), vec![6]);
    assert_eq!(store.replica_batch().unwrap(), Some((0, 6)));
}
