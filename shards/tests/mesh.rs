//! Cross-shard messaging on real executors: order, broadcast, the local fast path, batching.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod common;

use common::{all_ok, config, join_within, Recorder, JOIN_LIMIT};
use shards::{Outbox, Placement, Pool, Shard, ShardId};

const MESSAGES: u64 = 10_000;

#[test]
fn cross_shard_send_preserves_order_of_10000_messages() {
    // The ring holds 64 slots: the sender waits for room many times on the way.
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            if shard.id() == ShardId::new(0) {
                for n in 0..MESSAGES {
                    shard.send_to(ShardId::new(1), n).await.unwrap();
                }
                Vec::new()
            } else {
                shard.service().wait_for(MESSAGES).await;
                shard.service().received.take()
            }
        },
    )
    .unwrap();
    let results = all_ok(join_within(pool, JOIN_LIMIT));
    let received = &results[1];
    assert_eq!(received.len(), MESSAGES as usize);
    for (expected, (from, n)) in received.iter().enumerate() {
        assert_eq!(*from, ShardId::new(0));
        assert_eq!(*n, expected as u64, "message out of order");
    }
}

#[test]
fn broadcast_reaches_every_shard_including_the_sender() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            let me = shard.id().index() as u64;
            shard.broadcast(100 + me).await.unwrap();
            shard.service().wait_for(2).await;
            let mut received = shard.service().received.take();
            received.sort();
            received
        },
    )
    .unwrap();
    for received in all_ok(join_within(pool, JOIN_LIMIT)) {
        assert_eq!(
            received,
            vec![(ShardId::new(0), 100), (ShardId::new(1), 101)]
        );
    }
}

#[test]
fn broadcast_peers_skips_the_sender() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            let me = shard.id().index() as u64;
            shard.broadcast_peers(100 + me).await.unwrap();
            shard.service().wait_for(1).await;
            shard.service().received.take()
        },
    )
    .unwrap();
    let results = all_ok(join_within(pool, JOIN_LIMIT));
    assert_eq!(results[0], vec![(ShardId::new(1), 101)]);
    assert_eq!(results[1], vec![(ShardId::new(0), 100)]);
}

#[test]
fn send_to_self_calls_the_handler_directly() {
    for shard_count in [1, 2] {
        let pool = Pool::start(
            &config(Placement::Unpinned(shard_count)),
            |_| Recorder::<u64>::new(),
            |shard: Shard<Recorder<u64>>| async move {
                shard.send_to(shard.id(), 7).await.unwrap();
                // Handled before send_to returned, with no yield in between: a ring would
                // only have been drained later by a receive loop task.
                let seen = shard.service().received.take();
                assert_eq!(seen, vec![(shard.id(), 7)]);
                seen.len()
            },
        )
        .unwrap();
        assert!(all_ok(join_within(pool, JOIN_LIMIT))
            .iter()
            .all(|n| *n == 1));
    }
}

#[test]
fn outbox_sends_one_batch_per_destination() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<Vec<u64>>::new(),
        |shard: Shard<Recorder<Vec<u64>>>| async move {
            if shard.id() == ShardId::new(0) {
                let outbox = Outbox::new(shard.count());
                assert_eq!(outbox.push(ShardId::new(1), 1), 1);
                assert_eq!(outbox.push(ShardId::new(0), 10), 1);
                assert_eq!(outbox.push(ShardId::new(1), 2), 2);
                assert_eq!(outbox.push(ShardId::new(1), 3), 3);
                assert_eq!(outbox.len(), 4);
                outbox.flush(&shard).await.unwrap();
                assert!(outbox.is_empty());
                // The local batch was handled during the flush.
                shard.service().received.take()
            } else {
                shard.service().wait_for(1).await;
                shard.service().received.take()
            }
        },
    )
    .unwrap();
    let results = all_ok(join_within(pool, JOIN_LIMIT));
    assert_eq!(results[0], vec![(ShardId::new(0), vec![10])]);
    assert_eq!(results[1], vec![(ShardId::new(0), vec![1, 2, 3])]);
}
