//! Making writes durable: the journal flush and fsync behind every acknowledgement (outside the
//! engine's lock), memtable rotation, and the size of the store on disk.

use super::*;

/// What the second half of a persist must fsync (see [`Store::persist_prepare`]).
#[derive(Debug)]
pub enum SyncTarget {
    /// The active journal file, at this path: an `fdatasync` of it (through any
    /// descriptor) makes every write before [`Store::persist_prepare`] durable.
    Journal(PathBuf),
    /// No journal the store knows how to sync by itself: [`Store::persist_locked`] instead.
    Locked,
}

impl Store {
    /// The first half of [`Store::persist`], cheap enough for the executor thread: flushes
    /// the engine's journal buffer into the active journal file (the page cache, no fsync)
    /// and names the file whose `fdatasync` makes every write so far durable. The caller
    /// runs that fsync as it likes (the shards use io_uring), then calls
    /// [`Store::persist_finish`] with its outcome.
    ///
    /// The fsync runs *outside* the engine's journal mutex, so that writes proceed
    /// meanwhile (fjall's own `persist(SyncData)` holds the mutex across the fsync). Why
    /// that is as durable: the buffer flush happens under the mutex and puts every earlier
    /// write into the page cache of the active journal file `<n>.jnl`; fsync acts on the
    /// file, whatever descriptor it comes through; and when the engine seals a journal
    /// (rotation) it fsyncs it before it creates `<n+1>.jnl`. Should the directory show no
    /// journal (a layout this code does not know), or one not seen before, the engine's
    /// locked fsync is asked for instead ([`SyncTarget::Locked`]).
    pub fn persist_prepare(&self) -> Result<SyncTarget, StorageError> {
        let engine = self.engine()?;
        if engine.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Engine {
                op: "persist",
                source: fjall::Error::Poisoned,
            });
        }
        engine
            .db
            .persist(PersistMode::Buffer)
            .map_err(StorageError::engine("persist"))?;
        // The engine only ever rotates journal n to n + 1 (fsyncing n first), and deletes
        // sealed journals oldest first: while n exists and n + 1 does not, n is the active
        // one and holds every write flushed above. (n gone too means it was sealed, flushed
        // and deleted, with newer journals after it: list them.)
        let known = engine.newest_journal.load(Ordering::Relaxed);
        if known != u64::MAX {
            let path = |n: u64| self.inner.dir.join(format!("{n}.jnl"));
            let next_absent = !path(known + 1).try_exists().unwrap_or(true);
            if next_absent && path(known).try_exists().unwrap_or(false) {
                return Ok(SyncTarget::Journal(path(known)));
            }
        }
        Ok(match self.newest_journal()? {
            // A journal not seen before: the engine's own persist syncs its writer this once
            // (should a rotation have half failed, the newest file is not the one written).
            Some(n) if n != known => {
                engine.newest_journal.store(n, Ordering::Relaxed);
                SyncTarget::Locked
            }
            Some(n) => SyncTarget::Journal(self.inner.dir.join(format!("{n}.jnl"))),
            None => SyncTarget::Locked,
        })
    }

    /// The second half of a persist: `synced` is the outcome of the fsync of the
    /// [`SyncTarget`]. A failed fsync poisons the store (the pages it covered may be lost;
    /// nothing is acknowledged from it again until the store is reopened), as in
    /// [`Store::persist`]. After a good one, the caller rotates full memtables
    /// ([`Store::memtables_full`], [`Store::rotate_memtables`]) off the executor.
    pub fn persist_finish(&self, synced: std::io::Result<()>) -> Result<(), StorageError> {
        match synced {
            Ok(()) => Ok(()),
            Err(source) => {
                if let Ok(engine) = self.engine() {
                    engine.poisoned.store(true, Ordering::Release);
                }
                tracing::error!(store = %self.inner.dir.display(), error = %source, "journal fsync failed");
                Err(StorageError::Io {
                    path: self.inner.dir.clone(),
                    op: "fsync the journal of",
                    source,
                })
            }
        }
    }

    /// Makes every write made before the call durable, blocking for the fsync (run it off
    /// the executor thread): the same two halves as the shards' group commit
    /// ([`Store::persist_prepare`], an `fdatasync` of the journal it names, through a
    /// descriptor of our own, [`Store::persist_finish`]), then full memtables rotated.
    pub fn persist(&self) -> Result<(), StorageError> {
        match self.persist_prepare()? {
            SyncTarget::Journal(path) => match File::open(&path) {
                Ok(f) => self.persist_finish(f.sync_data())?,
                Err(_) => self.persist_locked()?,
            },
            SyncTarget::Locked => self.persist_locked()?,
        }
        self.rotate_memtables();
        Ok(())
    }

    /// Seals the memtables for flushing once the unflushed bytes of the whole store reach
    /// half of `StoreOptions::memtable_bytes` (skipping keyspaces with a flush pending).
    ///
    /// Why the store does what the engine does by itself: fjall 3.1 asks its background
    /// worker to rotate a full memtable from every write that finds it full, on the bounded
    /// channel on which that worker also sends itself the flush request that follows. Under
    /// write load those requests fill the channel, the worker blocks sending to itself, no
    /// memtable is flushed again and memory grows with everything written
    /// (fjall-rs/fjall#323; seen here as ~25 MiB more per minute of durable QoS 1 traffic).
    /// Rotating here, off the executor, after each group commit keeps every memtable under
    /// the engine's own limit, so the engine never sends those requests.
    /// Whether the unflushed bytes of the whole store reached the point where
    /// [`Store::rotate_memtables`] seals them (a cheap check, fit for the executor).
    pub fn memtables_full(&self) -> bool {
        let Ok(engine) = self.engine() else {
            return false;
        };
        let rotate_at_bytes = self.inner.opts.memtable_bytes.max(MIN_MEMTABLE_BYTES) / 2;
        engine.db.write_buffer_size() >= rotate_at_bytes
    }

    pub fn rotate_memtables(&self) {
        if !self.memtables_full() {
            return;
        }
        let Ok(engine) = self.engine() else {
            return;
        };
        for ks in &engine.spaces {
            if ks.sealed_memtable_count() > 0 {
                continue;
            }
            if let Err(e) = ks.rotate_memtable() {
                tracing::warn!(store = %self.inner.dir.display(), error = %e, "memtable rotation failed");
            }
        }
    }

    /// The engine's own persist: `fdatasync` of the journal under its mutex.
    pub fn persist_locked(&self) -> Result<(), StorageError> {
        self.engine()?
            .db
            .persist(PersistMode::SyncData)
            .map_err(StorageError::engine("persist"))
    }

    /// The number of the highest-numbered `<n>.jnl` in the store directory.
    fn newest_journal(&self) -> Result<Option<u64>, StorageError> {
        let dir = &self.inner.dir;
        let io = |source| StorageError::Io {
            path: dir.clone(),
            op: "list",
            source,
        };
        let mut newest: Option<u64> = None;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let name = entry.map_err(io)?.file_name();
            let n = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jnl"))
                .and_then(|n| n.parse::<u64>().ok());
            if n > newest {
                newest = n;
            }
        }
        Ok(newest)
    }

    /// Bytes the store's files really take on disk (allocated blocks, as `du` counts them):
    /// the engine's own figure counts its journal at its preallocated size (64 MiB for a
    /// store holding a few KiB).
    pub fn disk_bytes(&self) -> u64 {
        fn walk(dir: &Path, depth: u8) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            let mut total = 0;
            for e in entries.flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() && depth < 8 {
                    total += walk(&e.path(), depth + 1);
                } else if m.is_file() {
                    total += m.blocks() * 512;
                }
            }
            total
        }
        walk(&self.inner.dir, 0)
    }

    /// Test hook: flushes every keyspace's memtable into a table file and waits for it (to
    /// build fixtures of damaged table files).
    #[doc(hidden)]
    pub fn flush_to_tables(&self) -> Result<(), StorageError> {
        let engine = self.engine()?;
        for ks in &engine.spaces {
            ks.rotate_memtable_and_wait()
                .map_err(StorageError::engine("flush memtable"))?;
        }
        Ok(())
    }
}
