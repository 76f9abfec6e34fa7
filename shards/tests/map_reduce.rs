//! Map-reduce over all shards, from inside a shard and from an outside thread.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod common;

use std::time::Duration;

use common::{all_ok, config, join_within, Recorder, JOIN_LIMIT};
use shards::{Placement, Pool, QueryError, Shard, ShardId};

/// Generous bound for one outside query; only a hang should reach it.
const QUERY_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn map_reduce_from_inside_a_shard_sums_every_answer() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            if shard.id() != ShardId::new(0) {
                // Returns at once: a shard keeps answering until every main has returned.
                return None;
            }
            let sum = shard.map_reduce(10, 0, |acc, _, answer| acc + answer).await;
            let answers = shard
                .map_reduce(10, Vec::new(), |mut acc, from, answer| {
                    acc.push((from, answer));
                    acc
                })
                .await;
            Some((sum.unwrap(), answers.unwrap()))
        },
    )
    .unwrap();
    let results = all_ok(join_within(pool, JOIN_LIMIT));
    let (sum, answers) = results[0].clone().unwrap();
    assert_eq!(sum, 10 + 20);
    assert_eq!(answers, vec![(ShardId::new(0), 10), (ShardId::new(1), 20)]);
}

#[test]
fn map_reduce_from_an_outside_thread_sums_every_answer() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            shard.stopped().await;
        },
    )
    .unwrap();
    let control = pool.control();
    let outside = std::thread::spawn(move || {
        let sum = control.map_reduce(7, QUERY_LIMIT, 0, |acc, _, answer| acc + answer);
        let answers = control.map_reduce(7, QUERY_LIMIT, Vec::new(), |mut acc, from, answer| {
            acc.push((from, answer));
            acc
        });
        control.stop();
        (sum, answers)
    });
    let (sum, answers) = outside.join().unwrap();
    assert_eq!(sum, Ok(7 + 14));
    assert_eq!(
        answers,
        Ok(vec![(ShardId::new(0), 7), (ShardId::new(1), 14)])
    );
    all_ok(join_within(pool, JOIN_LIMIT));
}

#[test]
fn map_reduce_after_the_pool_stopped_reports_the_shard() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            shard.stopped().await;
        },
    )
    .unwrap();
    let control = pool.control();
    control.stop();
    all_ok(join_within(pool, JOIN_LIMIT));
    let result = control.map_reduce(1, QUERY_LIMIT, 0, |acc, _, answer| acc + answer);
    assert_eq!(result, Err(QueryError::ShardStopped(ShardId::new(0))));
}
