//! Failure episodes: a failed write poisons the engine; the store reports it once, then tries
//! to reopen on a backoff once the disk has room, and checks a real write before it serves
//! again.

use super::*;

impl Store {
    /// Records that a storage operation failed. The first failure of an episode is logged
    /// (once, with its reason); the episode lasts until [`Store::try_recover`] succeeds.
    /// Errors that say nothing about the disk (a key too long, a record that does not
    /// serialize) are not failures of the store.
    pub fn report_failure(&self, e: &StorageError) {
        if !e.is_io_failure() {
            return;
        }
        let mut since = self
            .inner
            .failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if since.is_none() {
            *since = Some(Instant::now());
            tracing::error!(
                store = %self.inner.dir.display(),
                error = %e,
                "storage failing: acknowledgements that need the disk are refused until it recovers; retrying"
            );
        }
    }

    /// Whether a failure episode is under way (see [`Store::report_failure`]).
    pub fn is_failing(&self) -> bool {
        self.inner
            .failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Ends a failure episode if the disk takes writes again: tries a probe write (a value
    /// of [`PROBE_BYTES`] written and deleted, then fsynced) on the open engine and, if
    /// that fails, closes the engine, opens it again on the same directory (replaying its
    /// journal) and tries again. Blocks for the I/O: run it off the executor thread. `Ok`
    /// when the episode is over (logged); otherwise the reason, for a retry later.
    pub fn try_recover(&self) -> Result<(), StorageError> {
        if !self.is_failing() {
            return Ok(());
        }
        let need = (2 * self.inner.opts.memtable_bytes).max(RECOVERY_FREE_BYTES_MIN);
        let free = free_bytes(&self.inner.dir)?;
        if free < need {
            return Err(StorageError::Io {
                path: self.inner.dir.clone(),
                op: "wait for free space on",
                source: std::io::Error::new(
                    ErrorKind::StorageFull,
                    format!("{free} bytes free, {need} needed to resume"),
                ),
            });
        }
        if self.probe().is_err() {
            self.reopen()?;
            self.probe()?;
        }
        let since = self
            .inner
            .failing_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        tracing::warn!(
            store = %self.inner.dir.display(),
            failing_s = since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            "storage recovered: writes reach the disk again"
        );
        Ok(())
    }

    pub(super) fn probe(&self) -> Result<(), StorageError> {
        let e = self.engine()?;
        let mut batch = e.db.batch();
        batch.insert(e.ks(Space::Retained), PROBE_KEY, vec![0u8; PROBE_BYTES]);
        batch.remove(e.ks(Space::Retained), PROBE_KEY);
        batch.commit().map_err(StorageError::engine("probe"))?;
        self.persist()
    }

    /// Closes the engine and opens it again on the same directory. Writes meanwhile fail
    /// with [`StorageError::Unavailable`].
    pub(super) fn reopen(&self) -> Result<(), StorageError> {
        let old = self
            .inner
            .engine
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        // Closing waits for the engine's worker threads; a clone held by an operation on
        // another thread closes it when that ends, and the open below waits for the lock.
        drop(old);
        let mut attempt = 0;
        let engine = loop {
            match open_engine(&self.inner.dir, &self.inner.opts) {
                Err(StorageError::Locked { .. }) if attempt < 100 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => break r?,
            }
        };
        *self.inner.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(engine));
        Ok(())
    }
}
