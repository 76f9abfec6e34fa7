//! The cross-shard hop: shard 0 sends to shard 1 through the mesh ring
//! ([`shards::Shard::send_to`], received by [`shards::Service::on_message`]).
//!
//! - `hop/single`: one `u64` per send (one ring slot, and a wake-up of the receiver when it
//!   sleeps, per message).
//! - `hop/batch64`: a `Vec` of 64 events per send, the way the broker batches per tick
//!   ([`shards::Outbox`]). Time is per send; throughput counts events, so the two compare
//!   per event.
//!
//! Each measurement starts a pool of two unpinned shards and times, from shard 0's first send
//! to shard 1's last receive, the number of messages criterion asks for. On a machine with
//! fewer than two free cores the figure includes the threads' competition for one core.
//! `cargo bench -p shards --bench ring`; see perf/README.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::sync::Semaphore;
use shards::{Config, Placement, Pool, Service, Shard, ShardId};

const BATCH: usize = 64;

/// Counts the events it receives; `arrived` lets shard 1's main wait for all of them.
struct Sink {
    arrived: Semaphore,
}

impl Service for Sink {
    type Msg = Vec<u64>;
    type Query = ();
    type Answer = ();

    fn on_message(&self, _shard: &Shard<Self>, _from: ShardId, msg: Vec<u64>) {
        self.arrived.signal(msg.len() as u64);
    }

    async fn answer(&self, _shard: &Shard<Self>, _query: ()) {}
}

/// Sends `events` events from shard 0 to shard 1, `per_send` at a time; the time from the
/// first send to the last receive.
fn hop(events: u64, per_send: usize) -> Duration {
    let mut config = Config::new(Placement::Unpinned(2));
    config.io_memory_bytes = 256 << 10;
    config.thread_name_prefix = String::from("bench");
    let pool = Pool::start(
        &config,
        |_| Sink {
            arrived: Semaphore::new(0),
        },
        move |shard: Shard<Sink>| async move {
            if shard.id() == ShardId::new(0) {
                let start = Instant::now();
                let mut left = events;
                while left > 0 {
                    let n = left.min(per_send as u64);
                    let batch: Vec<u64> = (0..n).collect();
                    shard.send_to(ShardId::new(1), batch).await.expect("send");
                    left -= n;
                }
                start
            } else {
                shard
                    .service()
                    .arrived
                    .acquire(events)
                    .await
                    .expect("semaphore");
                Instant::now()
            }
        },
    )
    .expect("pool");
    let times: Vec<Instant> = pool.join().into_iter().map(|r| r.expect("shard")).collect();
    // Shard 0 returns when it started sending, shard 1 when the last event arrived.
    times[1].saturating_duration_since(times[0])
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hop");
    g.sample_size(20);
    for (name, per_send) in [("single", 1usize), ("batch64", BATCH)] {
        // One iteration is one send of `per_send` events.
        g.throughput(Throughput::Elements(per_send as u64));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| hop(iters * per_send as u64, per_send))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
