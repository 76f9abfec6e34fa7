//! The shard's group commit and what keeps its store durable: the commit loop (fsync or,
//! in `replicated` mode, write-through and the stream), the background fsync, the storage
//! recovery, and the stop's last commit.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shards::Shard;

use super::{stopped_first, BrokerShard, Notify};
use crate::config::Durability;
use crate::shard::core::cluster::AppendFailed;
use crate::storage::{StorageError, Store, SyncTarget};

/// First wait before a failing store is tried again; doubled after each failed attempt up
/// to [`STORAGE_RETRY_MAX`].
const STORAGE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(5);

impl BrokerShard {
    /// Group commit: whenever there are writes, persists them off the executor thread
    /// (`spawn_blocking`) and releases the acknowledgements that waited on them. In `batched`
    /// mode it waits the batch interval first, so that one fsync covers the interval. In
    /// `replicated` mode a commit whose changes went to the replicated stream is
    /// acknowledged once the stream has them, with the store written through to the page
    /// cache; [`BrokerShard::sync_loop`] fsyncs it. (A commit with nothing for the stream,
    /// or that wrote a retained message, is fsynced as in `durable` mode.)
    pub async fn commit_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let (interval, from_stream) = {
            let core = svc.core.borrow();
            match core.durability() {
                Durability::Memory => return,
                Durability::Durable => (None, false),
                Durability::Replicated => (None, true),
                Durability::Batched => (
                    Some(Duration::from_millis(
                        core.config().storage.batched_interval_ms as u64,
                    )),
                    false,
                ),
            }
        };
        let mut journal: OpenJournal = None;
        loop {
            let stopping = stopped_first(shard.stopped(), svc.sink.commit.wait()).await;
            if let (Some(d), false) = (interval, stopping) {
                glommio::timer::sleep(d).await;
            }
            let (target, retained) = {
                let mut core = svc.core.borrow_mut();
                (core.commit_target(), core.take_fsync_due())
            };
            if let Some((store, seq)) = target {
                let started = Instant::now();
                // With replicated sessions, the batches' changes go to the replicated
                // stream while the fsync runs; acknowledgements wait for both (in
                // `replicated` mode for the stream only, unless a retained message was
                // written: those are not restored from the stream).
                let replica = replicate(&shard);
                let fsync = !(from_stream && replica.is_some()) || retained;
                let written = if fsync {
                    persist(&store, &mut journal).await
                } else {
                    write_through(&store, &svc.unsynced).await
                };
                let ok = match written {
                    Ok(()) => true,
                    Err(e) => {
                        // Logged once per failure episode by the store.
                        store.report_failure(&e);
                        false
                    }
                };
                let persisted = Instant::now();
                let replicating = replica.is_some();
                let ok = replicated(&shard, replica).await && ok;
                let mut core = svc.core.borrow_mut();
                if fsync {
                    core.stats.fsync_latency.observe(persisted - started);
                }
                if replicating {
                    core.stats.replica_wait.observe(persisted.elapsed());
                }
                core.committed(seq, ok, Instant::now());
                drop(core);
                if store.is_failing() {
                    svc.storage_failed.notify();
                }
            }
            if stopping && svc.core.borrow_mut().commit_target().is_none() {
                break;
            }
        }
        if let Some((_, f)) = journal {
            let _ = f.close().await;
        }
    }

    /// `replicated` mode: fsyncs the store at most every `storage.batched_interval_ms`
    /// while group commits write it through without one, until the pool stops (the stop's
    /// last commit fsyncs what is left, [`BrokerShard::final_commit`]). A failed fsync
    /// starts a failure episode: writes, and so acknowledgements, fail until the store is
    /// recovered. Other modes: returns at once.
    pub async fn sync_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let every = {
            let core = svc.core.borrow();
            if core.durability() != Durability::Replicated {
                return;
            }
            Duration::from_millis(core.config().storage.batched_interval_ms as u64)
        };
        let Some(store) = svc.store.clone() else {
            return;
        };
        let stopped = shard.stopped();
        futures_lite::pin!(stopped);
        let mut journal: OpenJournal = None;
        loop {
            if stopped_first(&mut stopped, svc.unsynced.written.wait()).await {
                break;
            }
            if stopped_first(&mut stopped, glommio::timer::sleep(every)).await {
                break;
            }
            svc.unsynced.dirty.set(false);
            let started = Instant::now();
            let synced = sync_written(&store, &svc.unsynced, &mut journal).await;
            svc.core
                .borrow_mut()
                .stats
                .fsync_latency
                .observe(started.elapsed());
            if let Err(e) = synced {
                // The pages that fsync covered may be gone, and with them changes that
                // were acknowledged from the stream: `recovery_loop` stops the broker.
                store.report_failure(&e);
                svc.storage_failed.notify();
                break;
            }
        }
        if let Some((_, f)) = journal {
            let _ = f.close().await;
        }
    }

    /// Storage recovery: while the store is in a failure episode (a full disk, an I/O
    /// error), tries to recover it ([`Store::try_recover`], off the executor thread) after
    /// a wait that doubles from [`STORAGE_RETRY_MIN`] to [`STORAGE_RETRY_MAX`], until it
    /// works or the pool stops. Meanwhile the shard serves on: writes fail at once, and so
    /// do the acknowledgements that need them.
    pub async fn recovery_loop(shard: Shard<BrokerShard>) {
        let svc = shard.service();
        let Some(store) = svc.store.clone() else {
            return;
        };
        let stopped = shard.stopped();
        futures_lite::pin!(stopped);
        if svc.core.borrow().durability() == Durability::Replicated {
            // A store reopened after a failure may lack changes that were acknowledged
            // from the stream (pages a failed fsync covered), and a snapshot would carry
            // that to the stream: the broker stops with an error instead; the next start
            // brings the store up to the stream from its marker (and meanwhile the other
            // nodes may fail this one over).
            if !stopped_first(&mut stopped, svc.storage_failed.wait()).await {
                let why = format!(
                    "shard {}: its store failed in replicated mode; the next start brings it up to the replicated stream",
                    shard.id().index()
                );
                tracing::error!("{why}; stopping");
                svc.fatal.set(why);
                shard.request_stop();
            }
            return;
        }
        loop {
            let stop = stopped_first(&mut stopped, svc.storage_failed.wait()).await;
            if stop {
                return;
            }
            let mut wait = STORAGE_RETRY_MIN;
            while store.is_failing() {
                let stop = stopped_first(&mut stopped, glommio::timer::sleep(wait)).await;
                if stop {
                    return;
                }
                let s = store.clone();
                match glommio::executor()
                    .spawn_blocking(move || s.try_recover())
                    .await
                {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(shard = shard.id().index(), error = %e, "storage still failing");
                        wait = (wait * 2).min(STORAGE_RETRY_MAX);
                    }
                }
            }
        }
    }

    /// The stop's last step, after the connections closed and the committer ended: makes
    /// durable what closing them wrote (session records with their offline time and will).
    pub async fn final_commit(shard: &Shard<BrokerShard>) {
        let svc = shard.service();
        svc.core.borrow_mut().flush_counters();
        let mut journal: OpenJournal = None;
        let mut commits_ok = svc.store.as_ref().is_none_or(|s| !s.is_failing());
        loop {
            let target = svc.core.borrow_mut().commit_target();
            let Some((store, seq)) = target else {
                break;
            };
            let replica = replicate(shard);
            let ok = match persist(&store, &mut journal).await {
                Ok(()) => true,
                Err(e) => {
                    store.report_failure(&e);
                    false
                }
            };
            let ok = replicated(shard, replica).await && ok;
            svc.core.borrow_mut().committed(seq, ok, Instant::now());
            if !ok {
                commits_ok = false;
                tracing::error!(
                    shard = shard.id().index(),
                    "the last writes before the stop could not be made durable"
                );
                break;
            }
        }
        // `replicated` mode: what commits wrote through since the sync task's last fsync
        // (the clean-stop marker, written after this, says the stores need no restore).
        if commits_ok && svc.unsynced.dirty.replace(false) {
            if let Some(store) = &svc.store {
                if let Err(e) = sync_written(store, &svc.unsynced, &mut journal).await {
                    store.report_failure(&e);
                    commits_ok = false;
                    tracing::error!(
                        shard = shard.id().index(),
                        "the last writes before the stop could not be fsynced"
                    );
                }
            }
        }
        svc.core.borrow_mut().end_replication(commits_ok);
        if let Some((_, f)) = journal {
            let _ = f.close().await;
        }
    }
}

/// The store's active journal, opened for fsyncs through the shard's io_uring (kept while it
/// stays the active one).
type OpenJournal = Option<(std::path::PathBuf, glommio::io::BufferedFile)>;

/// Hands what the batches since the last group commit changed to the replication log
/// (`None`: sessions are not replicated, or nothing changed).
fn replicate(
    shard: &Shard<BrokerShard>,
) -> Option<futures_channel::oneshot::Receiver<Result<(), AppendFailed>>> {
    let (link, units, gap, barrier) = shard.service().core.borrow_mut().take_replica_units()?;
    if units.is_empty() && !gap && !barrier {
        return None;
    }
    Some(link.append(shard.id().index(), units, gap))
}

/// Whether the append [`replicate`] started is in the replicated stream.
async fn replicated(
    shard: &Shard<BrokerShard>,
    append: Option<futures_channel::oneshot::Receiver<Result<(), AppendFailed>>>,
) -> bool {
    let Some(rx) = append else {
        return true;
    };
    match rx.await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(shard = shard.id().index(), error = %e.why, "replication failed: the acknowledgements that waited on it fail");
            shard.service().core.borrow_mut().replica_failed(e);
            false
        }
        Err(_) => false,
    }
}

/// One group commit's persist: the journal buffer flushed into the file here (the page
/// cache: cheap), then its `fdatasync` issued on the shard's own io_uring, so that no thread
/// is woken and none waits; the executor serves on meanwhile. When the store names no
/// journal, or the one it names cannot be opened (sealed and deleted since: it was fsynced
/// when sealed), the engine's locked persist runs on the blocking thread instead.
async fn persist(store: &Store, journal: &mut OpenJournal) -> Result<(), StorageError> {
    let path = match store.persist_prepare()? {
        SyncTarget::Journal(path) => path,
        SyncTarget::Locked => return persist_locked(store).await,
    };
    if journal.as_ref().is_none_or(|(open, _)| *open != path) {
        if let Some((_, old)) = journal.take() {
            let _ = old.close().await;
        }
        match glommio::io::BufferedFile::open(&path).await {
            Ok(f) => *journal = Some((path, f)),
            Err(_) => return persist_locked(store).await,
        }
    }
    let synced = match journal.as_ref() {
        Some((_, f)) => f.fdatasync().await.map_err(std::io::Error::from),
        None => return persist_locked(store).await,
    };
    store.persist_finish(synced)?;
    rotate_if_full(store).await;
    Ok(())
}

/// Seals full memtables after a group commit (it takes the engine's locks: not on the
/// executor).
async fn rotate_if_full(store: &Store) {
    if store.memtables_full() {
        let rotating = store.clone();
        glommio::executor()
            .spawn_blocking(move || rotating.rotate_memtables())
            .await;
    }
}

/// Why the broker must stop with an error, set by any shard (the first reason kept).
#[derive(Clone, Debug, Default)]
pub struct Fatal(Arc<std::sync::Mutex<Option<String>>>);

impl Fatal {
    fn set(&self, why: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(why);
    }

    /// The reason, if a shard gave one.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What [`BrokerShard::sync_loop`] is to fsync: whether a commit wrote through since its
/// last fsync began, and whether the store asked for the engine's own fsync once.
#[derive(Default)]
pub(super) struct Unsynced {
    dirty: Cell<bool>,
    locked_due: Cell<bool>,
    written: Notify,
}

/// A `replicated`-mode group commit's write: the journal buffer flushed into the page cache
/// (a `kill -9` loses nothing of it), full memtables rotated, no fsync; the sync task is
/// told.
async fn write_through(store: &Store, unsynced: &Unsynced) -> Result<(), StorageError> {
    if let SyncTarget::Locked = store.persist_prepare()? {
        unsynced.locked_due.set(true);
    }
    if !unsynced.dirty.replace(true) {
        unsynced.written.notify();
    }
    rotate_if_full(store).await;
    Ok(())
}

/// The fsync of what commits wrote through: the engine's own once the store asked for it
/// ([`SyncTarget::Locked`]), else the journal's through `journal`.
async fn sync_written(
    store: &Store,
    unsynced: &Unsynced,
    journal: &mut OpenJournal,
) -> Result<(), StorageError> {
    if unsynced.locked_due.replace(false) {
        persist_locked(store).await
    } else {
        persist(store, journal).await
    }
}

/// The engine's own persist (its journal mutex held across the fsync) and the memtable
/// rotation that follows a persist, off the executor.
async fn persist_locked(store: &Store) -> Result<(), StorageError> {
    let persisting = store.clone();
    glommio::executor()
        .spawn_blocking(move || {
            persisting.persist_locked()?;
            persisting.rotate_memtables();
            Ok(())
        })
        .await
}
