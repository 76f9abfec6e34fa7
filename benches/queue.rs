//! A persistent session's offline queue in the store (`storage::Store`): append and read back,
//! as the shard does when it queues QoS 1 messages for an offline session and when the
//! session reconnects and drains (refill in pages).
//!
//! - `queue/append/batch100`: 100 `queue_push` in one `StoreBatch` + `commit` (the shard
//!   writes each tick's operations as one batch); throughput in messages. The journal is
//!   written but not fsynced (`Store::persist`, the group commit, is not part of it: its cost
//!   is the disk's).
//! - `queue/read/page100`: `queue_read` of 100 messages from a queue of 100,000 (the refill
//!   page), at a random position; throughput in messages.
//!
//! 64-byte payloads, a 24-byte topic, MQTT 5 with no properties. `cargo bench --bench queue`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardmq::storage::{MessageRecord, QueuedRecord, Store, StoreOptions};

const QUEUED: u64 = 100_000;
const PAGE: usize = 100;

fn record() -> QueuedRecord {
    QueuedRecord {
        message: MessageRecord {
            topic: "bench/queue/client-00042".into(),
            payload: vec![0x5a; 64],
            qos: 1,
            retain: false,
            properties: Vec::new(),
            origin: Some("publisher-7".into()),
            created_unix_ms: 1_764_000_000_000,
        },
        qos: 1,
        retain: false,
        sub_ids: Vec::new(),
        via_share: None,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), &StoreOptions::default()).expect("open store");
    let rec = record();
    let mut g = c.benchmark_group("queue");

    g.throughput(Throughput::Elements(PAGE as u64));
    let mut seq = 0u64;
    g.bench_function("append/batch100", |b| {
        b.iter(|| {
            let mut batch = store.batch();
            for _ in 0..PAGE {
                batch.queue_push("appender", seq, &rec).expect("push");
                seq += 1;
            }
            batch.commit().expect("commit")
        })
    });

    for chunk in 0..QUEUED / 1000 {
        let mut batch = store.batch();
        for i in 0..1000 {
            batch
                .queue_push("reader", chunk * 1000 + i, &rec)
                .expect("push");
        }
        batch.commit().expect("commit");
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    g.bench_function("read/page100", |b| {
        b.iter_batched(
            || {
                // xorshift: a position that is not the one just read (no cache luck).
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % (QUEUED - PAGE as u64)
            },
            |from| {
                let page = store
                    .queue_read("reader", black_box(from), PAGE)
                    .expect("read");
                assert_eq!(page.len(), PAGE);
                page
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
        .sample_size(50);
    targets = bench
}
criterion_main!(benches);
