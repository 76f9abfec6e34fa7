//! Starting and stopping pools: orderly stop, startup errors, pinning, panics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the test's failure"
)]

mod common;

use std::sync::{Arc, Mutex};

use common::{all_ok, config, join_within, Recorder, JOIN_LIMIT};
use shards::{Placement, Pool, Shard, ShardId, StartError};

#[test]
fn orderly_stop_from_an_outside_thread_delivers_the_last_messages() {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let build = {
        let sink = sink.clone();
        move |_| Recorder {
            sink: Some(sink),
            ..Recorder::<u64>::new()
        }
    };
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        build,
        |shard: Shard<Recorder<u64>>| async move {
            shard.stopped().await;
            assert!(shard.is_stopping());
            // Sent on the way out: the peer, whose own main may already have returned,
            // must still handle it.
            let peer = ShardId::new(1 - shard.id().index());
            shard
                .send_to(peer, shard.id().index() as u64)
                .await
                .unwrap();
            shard.id()
        },
    )
    .unwrap();
    let control = pool.control();
    assert!(!control.is_stop_requested());
    std::thread::spawn(move || control.stop()).join().unwrap();
    let stopped = all_ok(join_within(pool, JOIN_LIMIT));
    assert_eq!(stopped, vec![ShardId::new(0), ShardId::new(1)]);
    let mut delivered = sink.lock().unwrap().clone();
    delivered.sort();
    assert_eq!(
        delivered,
        vec![
            (ShardId::new(0), ShardId::new(1), 1),
            (ShardId::new(1), ShardId::new(0), 0)
        ]
    );
}

#[test]
fn invalid_core_id_is_a_start_error() {
    let result = Pool::start(
        &config(Placement::Pinned(vec![0, 4096])),
        |_| Recorder::<u64>::new(),
        |_shard: Shard<Recorder<u64>>| async move {},
    );
    let error = result.unwrap_err();
    assert!(
        matches!(error, StartError::CoreUnavailable { shard, core: 4096, .. } if shard == ShardId::new(1)),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.starts_with("shard 1: core 4096 is not available"),
        "{message}"
    );
}

#[test]
fn bad_limits_are_start_errors() {
    let mut bad = config(Placement::Unpinned(2));
    bad.ring_depth = 16384;
    let error = Pool::start(
        &bad,
        |_| Recorder::<u64>::new(),
        |_shard: Shard<Recorder<u64>>| async move {},
    )
    .unwrap_err();
    assert_eq!(error.to_string(), "ring depth 16384 is outside 1..=8192");
}

#[test]
fn pinned_shards_run_on_their_cores() {
    let pool = Pool::start(
        &config(Placement::Pinned(vec![0, 1])),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            // A round trip over the mesh between the pinned executors.
            shard
                .broadcast_peers(shard.id().index() as u64)
                .await
                .unwrap();
            shard.service().wait_for(1).await;
            // SAFETY: sched_getcpu has no preconditions.
            unsafe { libc::sched_getcpu() }
        },
    )
    .unwrap();
    assert_eq!(all_ok(join_within(pool, JOIN_LIMIT)), vec![0, 1]);
}

#[test]
fn panic_in_a_handler_names_the_shard_and_stops_the_pool() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder {
            poison: Some(666),
            ..Recorder::<u64>::new()
        },
        |shard: Shard<Recorder<u64>>| async move {
            if shard.id() == ShardId::new(0) {
                shard.send_to(ShardId::new(1), 666).await.unwrap();
            }
            // Shard 0 only gets past this because shard 1's panic requests a stop.
            shard.stopped().await;
            "stopped"
        },
    )
    .unwrap();
    let results = join_within(pool, JOIN_LIMIT);
    assert_eq!(results[0], Ok("stopped"));
    let error = results[1].clone().unwrap_err();
    assert_eq!(error.shard, ShardId::new(1));
    assert!(error.message.contains("boom"), "{error}");
    assert!(
        error.to_string().starts_with("shard 1 panicked: boom"),
        "{error}"
    );
}

#[test]
fn panic_in_main_names_the_shard_and_stops_the_pool() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |_| Recorder::<u64>::new(),
        |shard: Shard<Recorder<u64>>| async move {
            if shard.id() == ShardId::new(0) {
                panic!("main of {} gave up", shard.id());
            }
            shard.stopped().await;
            "stopped"
        },
    )
    .unwrap();
    let results = join_within(pool, JOIN_LIMIT);
    assert_eq!(results[0].clone().unwrap_err().shard, ShardId::new(0));
    assert_eq!(results[1], Ok("stopped"));
}

#[test]
fn dropping_a_pool_stops_and_joins_it() {
    let sink = Arc::new(Mutex::new(Vec::new()));
    let build = {
        let sink = sink.clone();
        move |_| Recorder {
            sink: Some(sink),
            ..Recorder::<u64>::new()
        }
    };
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        build,
        |shard: Shard<Recorder<u64>>| async move {
            shard.stopped().await;
            shard.send_to(shard.id(), 1).await.unwrap();
        },
    )
    .unwrap();
    drop(pool);
    // Both mains ran to the end before drop returned.
    assert_eq!(sink.lock().unwrap().len(), 2);
}

#[test]
fn panic_while_building_a_service_names_the_shard() {
    let pool = Pool::start(
        &config(Placement::Unpinned(2)),
        |id: ShardId| {
            assert!(id != ShardId::new(1), "cannot build the service of {id}");
            Recorder::<u64>::new()
        },
        |shard: Shard<Recorder<u64>>| async move {
            shard.stopped().await;
            "stopped"
        },
    )
    .unwrap();
    let results = join_within(pool, JOIN_LIMIT);
    assert_eq!(results[0], Ok("stopped"));
    let error = results[1].clone().unwrap_err();
    assert_eq!(error.shard, ShardId::new(1));
    assert!(error.message.contains("cannot build"), "{error}");
}
