//! Durable per-shard storage: sessions, subscriptions, offline queues, messages in flight,
//! incoming QoS 2 ids, QoS 2 dedup keys and retained messages, in one fjall `Database` per
//! shard. This is the only module that names fjall.
//!
//! The API is synchronous and thread-safe ([`Store`] is `Clone + Send + Sync`). Writes go to
//! the engine's journal buffer and are durable only after [`Store::persist`] (group commit:
//! many writes, one fsync). The shard runs `persist` (or [`StoreBatch::commit`] followed by
//! `persist`) through its executor's `spawn_blocking`.
//!
//! **Blocking note.** Every write takes the engine's journal mutex for as long as it takes
//! to append to an in-memory buffer (or, when the 8 KiB buffer fills, one `write(2)`).
//! fjall's own `persist(SyncData)` holds that mutex across the fsync, which would make a
//! write on the executor wait for a fsync running on the blocking thread; [`Store::persist`]
//! therefore fsyncs outside the mutex (see its docs). The engine may still stall a write
//! when memtables or level-0 tables pile up faster than its worker flushes them (it sleeps
//! or spins on the calling thread). A [`StoreBatch`] is built without any lock and applied
//! by one [`StoreBatch::commit`]; committing it on the blocking thread right before
//! `persist` keeps even the journal mutex off the executor.
//!
//! # Key layout (the one place it is written down)
//!
//! One `Database` in `<data_dir>/shard-<n>/`, marked by the file `SHARDMQ_STORE` (format
//! line `shardmq-store 1`), with eight keyspaces. `C` stands for a client id encoded as
//! `[len: u16 big-endian][UTF-8 bytes]`: the length prefix makes the keys of client `ab`
//! and client `abc` disjoint, so a prefix scan over `C` finds exactly one client's keys.
//!
//! | keyspace   | key                                  | value                 |
//! |------------|--------------------------------------|-----------------------|
//! | `sessions` | `C`                                  | [`SessionRecord`]     |
//! | `subs`     | `C` + topic filter bytes (as written, `$share/..` included) | [`SubscriptionRecord`] |
//! | `queue`    | `C` + seq: u64 big-endian            | [`QueuedRecord`]      |
//! | `inflight` | `C` + packet id: u16 big-endian      | [`InflightRecord`]    |
//! | `incoming` | `C` + packet id: u16 big-endian      | header only (no body) |
//! | `dedup`    | `C` + `O` + packet id: u16 big-endian | header only (no body) |
//! | `counters` | `C`                                  | [`CountersRecord`]    |
//! | `retained` | topic name bytes                     | [`MessageRecord`]     |
//!
//! `dedup` holds, per persistent session `C`, the QoS 2 messages it has stored and whose
//! publisher has not yet released them (PUBREL): `O` is the publisher's client id, encoded
//! like `C`, and the packet id is the publisher's. A resend of such a message after a crash
//! is routed again and skipped by the sessions that hold its key (exactly once). The key is
//! written in the same batch as the session's copy of the message.
//!
//! Big-endian numbers make the engine's byte order the numeric order, so a prefix scan of
//! `queue` yields a session's queue oldest first. Every value is framed as
//! `[b"SQ"][kind][format][crc32 LE][rkyv bytes]` (see `records.rs`); the checksum is
//! verified on every read and a damaged record is reported with its key and skipped.
//!
//! A client's `subs`/`queue`/`inflight`/`incoming`/`dedup` keys without a `sessions` key are
//! orphans (a crash between writes of a batch, or a session deleted by a foreign writer):
//! [`Store::load`] deletes them. Keys of a client whose session record is *damaged* are
//! kept, so nothing is destroyed on the strength of a bad checksum.

mod error;
mod keys;
mod records;

pub use error::{RecordError, StorageError};
pub use records::{
    CountersRecord, InflightRecord, MessageRecord, QueuedRecord, SessionRecord, SubscriptionRecord,
    WallClock, WillRecord,
};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use keys::{
    client_prefix, dedup_key, dedup_of, hex, packet_id_of, packet_key, queue_key, seq_of,
    split_client_key,
};
use records::{dedup_value, incoming_value, queued_cost, unframe, Kind, Record};

/// The marker file that tells a store directory from any other directory.
pub const MARKER_FILE: &str = "SHARDMQ_STORE";
const MARKER_CONTENT: &str = "shardmq-store 1";
/// fjall panics below this many cached file descriptors.
const MIN_CACHED_FILES: usize = 10;
/// fjall panics below this journal size limit.
const MIN_JOURNAL_BYTES: u64 = 64 << 20;
/// Smaller memtables would flush a table file every few writes.
const MIN_MEMTABLE_BYTES: u64 = 1 << 20;

/// A raw key and value (test hooks).
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// The keyspaces of a store.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    Sessions,
    Subscriptions,
    Queue,
    Inflight,
    Incoming,
    Retained,
    Dedup,
    Counters,
}

impl Space {
    pub const ALL: [Space; 8] = [
        Space::Sessions,
        Space::Subscriptions,
        Space::Queue,
        Space::Inflight,
        Space::Incoming,
        Space::Retained,
        Space::Dedup,
        Space::Counters,
    ];

    /// The keyspace name on disk.
    pub const fn name(self) -> &'static str {
        match self {
            Space::Sessions => "sessions",
            Space::Subscriptions => "subs",
            Space::Queue => "queue",
            Space::Inflight => "inflight",
            Space::Incoming => "incoming",
            Space::Retained => "retained",
            Space::Dedup => "dedup",
            Space::Counters => "counters",
        }
    }

    /// The keyspaces keyed by client (everything but `retained`).
    const PER_CLIENT: [Space; 7] = [
        Space::Sessions,
        Space::Subscriptions,
        Space::Queue,
        Space::Inflight,
        Space::Incoming,
        Space::Dedup,
        Space::Counters,
    ];
}

/// Engine settings of one shard's store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Block cache size in bytes.
    pub cache_bytes: u64,
    /// Open file descriptors the engine may cache (at least 10). Mind the shard count and
    /// `ulimit -n`.
    pub max_cached_files: usize,
    /// Memtable size per keyspace (at least 1 MiB) before it is flushed to a table file.
    /// Applies when a keyspace is created: the engine stores it with the keyspace, and an
    /// existing store keeps the value it was created with.
    pub memtable_bytes: u64,
    /// Journal bytes kept on disk (at least 64 MiB) before the engine flushes the keyspaces
    /// that hold the oldest journal back. The engine seals a journal once it passes 64 MB,
    /// and a restart replays every journal left: this bounds recovery time and disk use.
    pub max_journal_bytes: u64,
    /// Background flush/compaction threads of this store (at least 1). They inherit the CPU
    /// affinity of the thread that opens the store.
    pub worker_threads: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            cache_bytes: 32 << 20,
            max_cached_files: 256,
            memtable_bytes: 16 << 20,
            max_journal_bytes: 128 << 20,
            worker_threads: 1,
        }
    }
}

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub sessions: Vec<RecoveredSession>,
    pub retained: Vec<MessageRecord>,
    /// Damaged records, skipped: `"<keyspace>/<key as hex>: <reason>"`.
    pub damaged: Vec<String>,
    /// Keys of clients without a session record, deleted (see the module docs).
    pub orphans_removed: u64,
}

/// What [`Store::copy_into`] copied, and what it left out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Sessions copied, each with its subscriptions, messages in flight, incoming QoS 2
    /// ids, dedup keys and queue.
    pub sessions: u64,
    /// Queued messages copied with them.
    pub queued: u64,
    /// Sessions not copied because the target already holds the client id (its copy wins).
    pub sessions_kept: u64,
    /// Retained messages copied.
    pub retained: u64,
    /// Retained messages not copied because the target holds a copy of the topic that is
    /// at least as new (by `created_unix_ms`).
    pub retained_kept: u64,
    /// Damaged records of the source, skipped (as in [`Recovered::damaged`]).
    pub damaged: Vec<String>,
}

/// One stored session with everything but its queued messages (read those with
/// [`Store::queue_read`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredSession {
    pub client_id: String,
    pub record: SessionRecord,
    /// By topic filter as written.
    pub subscriptions: Vec<(String, SubscriptionRecord)>,
    /// By packet id, ascending.
    pub inflight: Vec<(u16, InflightRecord)>,
    pub incoming: Vec<u16>,
    /// QoS 2 dedup keys: (publisher client id, publisher packet id) of the QoS 2 messages
    /// the session stored and their publisher has not released yet, in key order.
    pub dedup: Vec<(String, u16)>,
    /// The lowest stored sequence number (0 when the queue is empty).
    pub queue_first_seq: u64,
    /// One past the highest stored sequence number (0 when the queue is empty).
    pub queue_next_seq: u64,
    /// Intact queued messages.
    pub queue_len: u64,
    /// Their cost in bytes (payload plus topic, as `Message::cost_bytes`).
    pub queue_bytes: u64,
    /// The session's drop counters, when any were stored.
    pub counters: Option<CountersRecord>,
}

impl RecoveredSession {
    fn new(client_id: String, record: SessionRecord) -> RecoveredSession {
        RecoveredSession {
            client_id,
            record,
            subscriptions: Vec::new(),
            inflight: Vec::new(),
            incoming: Vec::new(),
            dedup: Vec::new(),
            queue_first_seq: 0,
            queue_next_seq: 0,
            queue_len: 0,
            queue_bytes: 0,
            counters: None,
        }
    }
}

/// One shard's store. Cheap to clone; all clones share the engine. The directory is locked
/// while any clone lives.
///
/// **Failure and recovery.** After a failed write or fsync (a full disk, an I/O error) the
/// engine refuses every further write. The owner reports such errors
/// ([`Store::report_failure`]: logged once per failure episode) and calls
/// [`Store::try_recover`] on a backoff, off the executor thread: it reopens the engine on
/// the same directory and proves that a write reaches the disk again. Whatever was durable
/// before the failure is read back by the reopened engine (its journal is replayed); writes
/// that had not reached the disk are gone, and their acknowledgements failed with them.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    opts: StoreOptions,
    /// The open engine; `None` only while [`Store::try_recover`] reopens it.
    engine: RwLock<Option<Arc<Engine>>>,
    /// Since when writes fail (a failure episode), or `None`.
    failing_since: Mutex<Option<Instant>>,
}

/// One open engine: the database and its keyspaces.
struct Engine {
    db: Database,
    /// In the order of [`Space::ALL`].
    spaces: [Keyspace; 8],
    /// The active journal file as last seen by `persist`: its number and a handle to fsync.
    journal: Mutex<Option<(u64, Arc<File>)>>,
    /// Set when an fsync of ours failed: the page cache may have dropped the data, so no
    /// later fsync can vouch for it (the engine poisons itself the same way).
    poisoned: AtomicBool,
}

impl Engine {
    fn ks(&self, space: Space) -> &Keyspace {
        &self.spaces[space as usize]
    }
}

/// The key a recovery probe writes (and deletes in the same batch) in `retained`: no topic
/// name starts with a NUL byte.
const PROBE_KEY: &[u8] = b"\0shardmq-probe";
/// The size of the probe value: enough that a disk with a few free bytes in the journal's
/// last page does not pass for a disk with room again.
const PROBE_BYTES: usize = 64 << 10;
/// A failing store is tried again only once its file system has this much free space, or
/// twice the memtable size if that is more (room for the next memtable flush): a disk
/// that has just enough for the probe would fail again at once.
const RECOVERY_FREE_BYTES_MIN: u64 = 4 << 20;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn open_engine(dir: &Path, opts: &StoreOptions) -> Result<Engine, StorageError> {
    let db = Database::builder(dir)
        .cache_size(opts.cache_bytes)
        .max_cached_files(Some(opts.max_cached_files.max(MIN_CACHED_FILES)))
        .worker_threads(opts.worker_threads.max(1))
        .max_journaling_size(opts.max_journal_bytes.max(MIN_JOURNAL_BYTES))
        .manual_journal_persist(true)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => StorageError::Locked {
                path: dir.to_owned(),
            },
            fjall::Error::JournalRecovery(e) => StorageError::JournalDamaged {
                path: dir.to_owned(),
                detail: format!("{e:?}"),
            },
            fjall::Error::InvalidVersion(v) => StorageError::UnsupportedFormat {
                path: dir.to_owned(),
                found: format!("engine format {v:?}"),
            },
            source => StorageError::Engine { op: "open", source },
        })?;
    let mut spaces = Vec::with_capacity(Space::ALL.len());
    for space in Space::ALL {
        // manual_journal_persist is a per-keyspace option too: without it every single
        // write flushes the journal buffer to the OS (a write(2) per insert).
        let ks = db
            .keyspace(space.name(), || {
                KeyspaceCreateOptions::default()
                    .manual_journal_persist(true)
                    .max_memtable_size(opts.memtable_bytes.max(MIN_MEMTABLE_BYTES))
            })
            .map_err(StorageError::engine("open keyspace"))?;
        spaces.push(ks);
    }
    let spaces: [Keyspace; 8] = spaces
        .try_into()
        .unwrap_or_else(|_| unreachable!("one keyspace per Space"));
    Ok(Engine {
        db,
        spaces,
        journal: Mutex::new(None),
        poisoned: AtomicBool::new(false),
    })
}

impl Store {
    /// Opens the store in `dir` (`<data_dir>/shard-<n>`), creating the directory and an empty
    /// store when it does not exist or is empty. A non-empty directory without the marker
    /// file is refused ([`StorageError::NotAStore`]), as is a store already open
    /// ([`StorageError::Locked`]).
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Store, StorageError> {
        prepare_dir(dir)?;
        let engine = open_engine(dir, opts)?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                opts: opts.clone(),
                engine: RwLock::new(Some(Arc::new(engine))),
                failing_since: Mutex::new(None),
            }),
        })
    }

    /// The open engine, or [`StorageError::Unavailable`] while it is being reopened.
    fn engine(&self) -> Result<Arc<Engine>, StorageError> {
        self.inner
            .engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| StorageError::Unavailable {
                path: self.inner.dir.clone(),
            })
    }

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

    fn probe(&self) -> Result<(), StorageError> {
        let e = self.engine()?;
        let mut batch = e.db.batch();
        batch.insert(e.ks(Space::Retained), PROBE_KEY, vec![0u8; PROBE_BYTES]);
        batch.remove(e.ks(Space::Retained), PROBE_KEY);
        batch.commit().map_err(StorageError::engine("probe"))?;
        self.persist()
    }

    /// Closes the engine and opens it again on the same directory. Writes meanwhile fail
    /// with [`StorageError::Unavailable`].
    fn reopen(&self) -> Result<(), StorageError> {
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

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// A handle to a keyspace of the open engine.
    fn ks(&self, space: Space) -> Result<Keyspace, StorageError> {
        Ok(self.engine()?.ks(space).clone())
    }

    fn insert(&self, space: Space, key: Vec<u8>, value: Vec<u8>) -> Result<(), StorageError> {
        self.ks(space)?
            .insert(key, value)
            .map_err(StorageError::engine("write"))
    }

    fn remove(&self, space: Space, key: Vec<u8>) -> Result<(), StorageError> {
        self.ks(space)?
            .remove(key)
            .map_err(StorageError::engine("delete"))
    }

    /// An empty batch of writes applied together by [`StoreBatch::commit`].
    pub fn batch(&self) -> StoreBatch {
        StoreBatch {
            store: self.clone(),
            ops: Vec::new(),
        }
    }

    pub fn put_session(&self, client_id: &str, rec: &SessionRecord) -> Result<(), StorageError> {
        self.insert(Space::Sessions, client_prefix(client_id)?, rec.to_value()?)
    }

    /// Deletes the session and every subscription, queued message, message in flight,
    /// incoming packet id and dedup key of the client, atomically.
    pub fn delete_session(&self, client_id: &str) -> Result<(), StorageError> {
        let mut b = self.batch();
        b.delete_session(client_id)?;
        b.commit()
    }

    pub fn put_subscription(
        &self,
        client_id: &str,
        filter: &str,
        rec: &SubscriptionRecord,
    ) -> Result<(), StorageError> {
        let key = keys::subscription_key(client_id, filter)?;
        self.insert(Space::Subscriptions, key, rec.to_value()?)
    }

    pub fn delete_subscription(&self, client_id: &str, filter: &str) -> Result<(), StorageError> {
        let key = keys::subscription_key(client_id, filter)?;
        self.remove(Space::Subscriptions, key)
    }

    pub fn queue_push(
        &self,
        client_id: &str,
        seq: u64,
        rec: &QueuedRecord,
    ) -> Result<(), StorageError> {
        self.insert(Space::Queue, queue_key(client_id, seq)?, rec.to_value()?)
    }

    pub fn queue_delete(&self, client_id: &str, seq: u64) -> Result<(), StorageError> {
        self.remove(Space::Queue, queue_key(client_id, seq)?)
    }

    /// Deletes every queued message of the client with a sequence number below `below_seq`.
    pub fn queue_delete_range(&self, client_id: &str, below_seq: u64) -> Result<(), StorageError> {
        let mut b = self.batch();
        b.queue_delete_range(client_id, below_seq)?;
        b.commit()
    }

    /// Up to `max` intact queued messages of the client from `from_seq` on, in order.
    /// Damaged records are skipped and logged with their key.
    pub fn queue_read(
        &self,
        client_id: &str,
        from_seq: u64,
        max: usize,
    ) -> Result<Vec<(u64, QueuedRecord)>, StorageError> {
        let start = queue_key(client_id, from_seq)?;
        let end = queue_key(client_id, u64::MAX)?;
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        for item in self.ks(Space::Queue)?.range(start..=end) {
            let (k, v) = item
                .into_inner()
                .map_err(StorageError::engine("read queue"))?;
            let seq = split_client_key(&k).and_then(|(_, _, rest)| seq_of(rest));
            let Some(seq) = seq else {
                report_damaged(Space::Queue, &k, "malformed key");
                continue;
            };
            match QueuedRecord::from_value(&v) {
                Ok(rec) => {
                    out.push((seq, rec));
                    if out.len() == max {
                        break;
                    }
                }
                Err(reason) => {
                    report_damaged(Space::Queue, &k, &reason);
                }
            }
        }
        Ok(out)
    }

    pub fn inflight_put(
        &self,
        client_id: &str,
        packet_id: u16,
        rec: &InflightRecord,
    ) -> Result<(), StorageError> {
        self.insert(
            Space::Inflight,
            packet_key(client_id, packet_id)?,
            rec.to_value()?,
        )
    }

    pub fn inflight_delete(&self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.remove(Space::Inflight, packet_key(client_id, packet_id)?)
    }

    pub fn incoming_put(&self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.insert(
            Space::Incoming,
            packet_key(client_id, packet_id)?,
            incoming_value(),
        )
    }

    pub fn incoming_delete(&self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.remove(Space::Incoming, packet_key(client_id, packet_id)?)
    }

    /// Records that `client_id` stored the QoS 2 message `packet_id` of publisher `origin`.
    pub fn dedup_put(
        &self,
        client_id: &str,
        origin: &str,
        packet_id: u16,
    ) -> Result<(), StorageError> {
        self.insert(
            Space::Dedup,
            dedup_key(client_id, origin, packet_id)?,
            dedup_value(),
        )
    }

    pub fn dedup_delete(
        &self,
        client_id: &str,
        origin: &str,
        packet_id: u16,
    ) -> Result<(), StorageError> {
        self.remove(Space::Dedup, dedup_key(client_id, origin, packet_id)?)
    }

    pub fn retained_put(&self, topic: &str, rec: &MessageRecord) -> Result<(), StorageError> {
        self.insert(Space::Retained, keys::retained_key(topic)?, rec.to_value()?)
    }

    pub fn retained_delete(&self, topic: &str) -> Result<(), StorageError> {
        self.remove(Space::Retained, keys::retained_key(topic)?)
    }

    /// Makes every write made before the call durable: flushes the engine's journal buffer
    /// and `fdatasync`s the journal file. Blocks for the fsync; run it off the executor
    /// thread.
    ///
    /// The fsync runs *outside* the engine's journal mutex, so that writes from other
    /// threads proceed meanwhile (fjall's own `persist(SyncData)` holds the mutex across
    /// the fsync). Why that is as durable: the buffer flush happens under the mutex and puts
    /// every earlier write into the page cache of the active journal file `<n>.jnl`; fsync
    /// acts on the file, whatever descriptor it comes through; and when the engine seals a
    /// journal (rotation) it fsyncs it before it creates `<n+1>.jnl`, so if a newer journal
    /// is seen here, the one holding our writes is already on disk. Should the directory
    /// show no journal (a layout this code does not know), it falls back to the engine's
    /// locked fsync.
    pub fn persist(&self) -> Result<(), StorageError> {
        self.persist_journal()?;
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
    fn rotate_memtables(&self) {
        let Ok(engine) = self.engine() else {
            return;
        };
        let rotate_at_bytes = self.inner.opts.memtable_bytes.max(MIN_MEMTABLE_BYTES) / 2;
        if engine.db.write_buffer_size() < rotate_at_bytes {
            return;
        }
        for ks in &engine.spaces {
            if ks.sealed_memtable_count() > 0 {
                continue;
            }
            if let Err(e) = ks.rotate_memtable() {
                tracing::warn!(store = %self.inner.dir.display(), error = %e, "memtable rotation failed");
            }
        }
    }

    fn persist_journal(&self) -> Result<(), StorageError> {
        let poisoned = || StorageError::Engine {
            op: "persist",
            source: fjall::Error::Poisoned,
        };
        let engine = self.engine()?;
        if engine.poisoned.load(Ordering::Acquire) {
            return Err(poisoned());
        }
        engine
            .db
            .persist(PersistMode::Buffer)
            .map_err(StorageError::engine("persist"))?;
        let Some(journal) = self.active_journal(&engine)? else {
            return self.persist_locked();
        };
        journal.sync_data().map_err(|source| {
            engine.poisoned.store(true, Ordering::Release);
            tracing::error!(store = %self.inner.dir.display(), error = %source, "journal fsync failed");
            StorageError::Io {
                path: self.inner.dir.clone(),
                op: "fsync the journal of",
                source,
            }
        })
    }

    /// The engine's own persist: `fdatasync` of the journal under its mutex.
    pub fn persist_locked(&self) -> Result<(), StorageError> {
        self.engine()?
            .db
            .persist(PersistMode::SyncData)
            .map_err(StorageError::engine("persist"))
    }

    /// The highest-numbered `<n>.jnl` in the store directory, opened (cached while it stays
    /// the highest).
    fn active_journal(&self, engine: &Engine) -> Result<Option<Arc<File>>, StorageError> {
        let dir = &self.inner.dir;
        let io = |op| {
            move |source| StorageError::Io {
                path: dir.clone(),
                op,
                source,
            }
        };
        let mut newest: Option<u64> = None;
        for entry in std::fs::read_dir(dir).map_err(io("list"))? {
            let name = entry.map_err(io("list"))?.file_name();
            let n = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jnl"))
                .and_then(|n| n.parse::<u64>().ok());
            if n > newest {
                newest = n;
            }
        }
        let Some(n) = newest else {
            return Ok(None);
        };
        let mut cached = engine.journal.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((m, f)) = cached.as_ref() {
            if *m == n {
                return Ok(Some(f.clone()));
            }
        }
        let file = match File::open(dir.join(format!("{n}.jnl"))) {
            Ok(f) => Arc::new(f),
            // Sealed and deleted since the listing: it was fsynced when sealed, and what it
            // held is in table files now; the newer journal is fsynced next time.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return self.persist_locked().map(|()| None)
            }
            Err(e) => return Err(io("open journal")(e)),
        };
        *cached = Some((n, file.clone()));
        Ok(Some(file))
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

    /// Everything but the queued messages themselves, to rebuild the sessions at start.
    /// Damaged records are reported (in [`Recovered::damaged`] and the log) and skipped;
    /// orphaned keys are deleted (durable at the next `persist`). Reads every queued value
    /// once to verify it and count its bytes.
    pub fn load(&self) -> Result<Recovered, StorageError> {
        let mut rec = Recovered::default();
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut damaged_clients: HashSet<Vec<u8>> = HashSet::new();

        for item in self.scan(Space::Sessions) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(line) => {
                    rec.damaged.push(line);
                    break;
                }
            };
            let Some((_, id, _)) = split_client_key(&k).filter(|(_, _, r)| r.is_empty()) else {
                damage(&mut rec.damaged, Space::Sessions, &k, "malformed key");
                continue;
            };
            match SessionRecord::from_value(&v) {
                Ok(r) => {
                    index.insert(k.to_vec(), rec.sessions.len());
                    rec.sessions.push(RecoveredSession::new(id.to_owned(), r));
                }
                Err(reason) => {
                    damage(&mut rec.damaged, Space::Sessions, &k, &reason);
                    damaged_clients.insert(k.to_vec());
                }
            }
        }

        // Every known client prefix, in key order: where a per-client scan resumes after a
        // read error.
        let mut known: Vec<Vec<u8>> = index.keys().chain(&damaged_clients).cloned().collect();
        known.sort_unstable();
        let mut orphans: Vec<(Space, Vec<u8>)> = Vec::new();
        for space in [
            Space::Subscriptions,
            Space::Queue,
            Space::Inflight,
            Space::Incoming,
            Space::Dedup,
            Space::Counters,
        ] {
            let sessions = &mut rec.sessions;
            let damaged = &mut rec.damaged;
            let read_errors = self.scan_per_client(space, &known, |k, v| {
                let Some((prefix, _, rest)) = split_client_key(k) else {
                    damage(damaged, space, k, "malformed key");
                    return;
                };
                let Some(&i) = index.get(prefix) else {
                    if !damaged_clients.contains(prefix) {
                        orphans.push((space, k.to_vec()));
                    }
                    return;
                };
                let s = &mut sessions[i];
                let result = match space {
                    Space::Subscriptions => match std::str::from_utf8(rest) {
                        Ok(filter) => SubscriptionRecord::from_value(v)
                            .map(|r| s.subscriptions.push((filter.to_owned(), r))),
                        Err(_) => Err("malformed key".to_owned()),
                    },
                    Space::Queue => match seq_of(rest) {
                        Some(seq) => {
                            // The bounds cover damaged entries too, so that new sequence
                            // numbers never land below a stored key.
                            if s.queue_next_seq == 0 {
                                s.queue_first_seq = seq;
                            }
                            s.queue_next_seq = seq.saturating_add(1);
                            queued_cost(v).map(|cost| {
                                s.queue_len += 1;
                                s.queue_bytes += cost;
                            })
                        }
                        None => Err("malformed key".to_owned()),
                    },
                    Space::Inflight => match packet_id_of(rest) {
                        Some(id) => InflightRecord::from_value(v).map(|r| s.inflight.push((id, r))),
                        None => Err("malformed key".to_owned()),
                    },
                    Space::Counters if rest.is_empty() => {
                        CountersRecord::from_value(v).map(|r| s.counters = Some(r))
                    }
                    Space::Counters => Err("malformed key".to_owned()),
                    Space::Dedup => match dedup_of(rest) {
                        Some((origin, id)) => {
                            unframe(Kind::Dedup, v).map(|_| s.dedup.push((origin.to_owned(), id)))
                        }
                        None => Err("malformed key".to_owned()),
                    },
                    _ => match packet_id_of(rest) {
                        Some(id) => unframe(Kind::Incoming, v).map(|_| s.incoming.push(id)),
                        None => Err("malformed key".to_owned()),
                    },
                };
                if let Err(reason) = result {
                    damage(damaged, space, k, &reason);
                }
            });
            rec.damaged.extend(read_errors);
        }

        for item in self.scan(Space::Retained) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(line) => {
                    rec.damaged.push(line);
                    break;
                }
            };
            match MessageRecord::from_value(&v) {
                Ok(m) if m.topic.as_bytes() == &*k => rec.retained.push(m),
                Ok(m) => damage(
                    &mut rec.damaged,
                    Space::Retained,
                    &k,
                    &format!("record of topic {:?} under another key", m.topic),
                ),
                Err(reason) => damage(&mut rec.damaged, Space::Retained, &k, &reason),
            }
        }

        if !orphans.is_empty() {
            rec.orphans_removed = orphans.len() as u64;
            tracing::info!(
                store = %self.inner.dir.display(),
                keys = orphans.len(),
                "deleting keys of clients without a session record"
            );
            let engine = self.engine()?;
            let mut batch = engine.db.batch();
            for (space, key) in orphans {
                batch.remove(engine.ks(space), key);
            }
            batch
                .commit()
                .map_err(StorageError::engine("delete orphans"))?;
        }
        Ok(rec)
    }

    /// Copies everything this store holds into `targets` (the stores of the shards that
    /// now own it), for a store left behind when the shard count shrank: every session with
    /// its subscriptions, messages in flight, incoming QoS 2 ids, dedup keys and whole queue
    /// (sequence numbers kept) into `targets[session_home(client_id)]`, every retained
    /// message into `targets[retained_home(topic)]`. Both functions must return an index
    /// into `targets`.
    ///
    /// A target that already holds the client id keeps its own session (logged); a target
    /// that holds a retained message of the topic keeps it unless this store's copy is
    /// newer. Each session is written as one atomic batch, session record included, so a
    /// target holds either all of a copied session or none of it; copying again after a
    /// crash is harmless. Every target written to is persisted (fsync) before this returns
    /// `Ok`. This store is only read, apart from [`Store::load`] deleting its orphaned keys.
    pub fn copy_into(
        &self,
        targets: &[Store],
        session_home: impl Fn(&str) -> usize,
        retained_home: impl Fn(&str) -> usize,
    ) -> Result<Copied, StorageError> {
        let recovered = self.load()?;
        let mut out = Copied {
            damaged: recovered.damaged,
            ..Copied::default()
        };
        let mut written = vec![false; targets.len()];
        for rs in recovered.sessions {
            let cid = rs.client_id.as_str();
            let home = session_home(cid);
            let target = &targets[home];
            let key = client_prefix(cid)?;
            if target
                .ks(Space::Sessions)?
                .contains_key(&key)
                .map_err(StorageError::engine("read session"))?
            {
                tracing::info!(
                    from = %self.inner.dir.display(),
                    to = %target.inner.dir.display(),
                    client = %cid,
                    "the target store already holds this client's session; its copy wins"
                );
                out.sessions_kept += 1;
                continue;
            }
            let queue = self.queue_read(cid, rs.queue_first_seq, usize::MAX)?;
            let mut b = target.batch();
            // The target holds no session of this client, so any key of it there is an
            // orphan: clear them, so that the copy is exact.
            b.delete_session(cid)?;
            for (filter, sr) in &rs.subscriptions {
                b.put_subscription(cid, filter, sr)?;
            }
            for (pid, ir) in &rs.inflight {
                b.inflight_put(cid, *pid, ir)?;
            }
            for pid in &rs.incoming {
                b.incoming_put(cid, *pid)?;
            }
            for (origin, pid) in &rs.dedup {
                b.dedup_put(cid, origin, *pid)?;
            }
            for (seq, q) in &queue {
                b.queue_push(cid, *seq, q)?;
            }
            if let Some(c) = &rs.counters {
                b.counters_put(cid, c)?;
            }
            b.put_session(cid, &rs.record)?;
            b.commit()?;
            written[home] = true;
            out.sessions += 1;
            out.queued += queue.len() as u64;
        }
        let mut retained: Vec<StoreBatch> = targets.iter().map(Store::batch).collect();
        for m in recovered.retained {
            let home = retained_home(&m.topic);
            let target = &targets[home];
            let held = target
                .ks(Space::Retained)?
                .get(keys::retained_key(&m.topic)?)
                .map_err(StorageError::engine("read retained"))?;
            // A damaged record in the target counts as older than an intact copy.
            let newer = held.is_none_or(|v| {
                MessageRecord::from_value(&v)
                    .map_or(true, |t| m.created_unix_ms > t.created_unix_ms)
            });
            if newer {
                retained[home].retained_put(&m.topic, &m)?;
                out.retained += 1;
            } else {
                tracing::info!(
                    from = %self.inner.dir.display(),
                    to = %target.inner.dir.display(),
                    topic = %m.topic,
                    "the target store holds a retained message of this topic at least as new; it wins"
                );
                out.retained_kept += 1;
            }
        }
        for (i, b) in retained.into_iter().enumerate() {
            if !b.is_empty() {
                b.commit()?;
                written[i] = true;
            }
        }
        for (target, _) in targets.iter().zip(&written).filter(|(_, w)| **w) {
            target.persist()?;
        }
        Ok(out)
    }

    /// Every key and value of a keyspace. An engine read error (a table block failing the
    /// engine's own checksum) is logged and ends the scan of that keyspace: it comes out as
    /// one `Err` with the line for [`Recovered::damaged`].
    fn scan(
        &self,
        space: Space,
    ) -> impl Iterator<Item = Result<(fjall::UserKey, fjall::UserValue), String>> + '_ {
        let mut iter = self.ks(space).map(|ks| ks.iter());
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let next = match &mut iter {
                Ok(iter) => iter.next()?.into_inner(),
                Err(e) => {
                    failed = true;
                    let msg = format!("{}: cannot read: {e}", space.name());
                    tracing::warn!(store = %self.inner.dir.display(), "{msg}");
                    return Some(Err(msg));
                }
            };
            Some(next.map_err(|e| {
                failed = true;
                let msg = format!(
                    "{}: read error, rest of keyspace skipped: {e}",
                    space.name()
                );
                tracing::warn!(store = %self.inner.dir.display(), "{msg}");
                msg
            }))
        })
    }

    /// Every key and value of a per-client keyspace, given to `f` in key order. When the
    /// engine cannot read a part of the keyspace (a table block failing its own checksum),
    /// the scan resumes at the next known client prefix past the failure, so one bad block
    /// costs the clients whose keys it holds, not the rest of the keyspace. Returns one
    /// line per read error.
    fn scan_per_client(
        &self,
        space: Space,
        known_prefixes: &[Vec<u8>],
        mut f: impl FnMut(&[u8], &[u8]),
    ) -> Vec<String> {
        let mut errors = Vec::new();
        let mut start: Vec<u8> = Vec::new();
        loop {
            let mut last: Option<fjall::UserKey> = None;
            let mut failure = None;
            let ks = match self.ks(space) {
                Ok(ks) => ks,
                Err(e) => {
                    let line = format!("{}: cannot read: {e}", space.name());
                    tracing::warn!(store = %self.inner.dir.display(), "{line}");
                    errors.push(line);
                    return errors;
                }
            };
            for item in ks.range(start.as_slice()..) {
                match item.into_inner() {
                    Ok((k, v)) => {
                        f(&k, &v);
                        last = Some(k);
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let Some(e) = failure else {
                return errors;
            };
            let pos: &[u8] = last.as_deref().unwrap_or(&start);
            let next = known_prefixes
                .iter()
                .find(|p| p.as_slice() > pos && !pos.starts_with(p));
            let line = format!(
                "{}/{}: read error after this key, skipped to {}: {e}",
                space.name(),
                hex(pos),
                next.map_or_else(|| "the end".to_owned(), |p| hex(p))
            );
            tracing::warn!(store = %self.inner.dir.display(), "{line}");
            errors.push(line);
            match next {
                Some(p) => start = p.clone(),
                None => return errors,
            }
        }
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

    /// Test hook: writes raw bytes under a raw key (to plant damaged records).
    #[doc(hidden)]
    pub fn raw_put(&self, space: Space, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.insert(space, key.to_vec(), value.to_vec())
    }

    /// Test hook: every raw key and value of a keyspace.
    #[doc(hidden)]
    pub fn raw_entries(&self, space: Space) -> Result<Vec<RawEntry>, StorageError> {
        self.ks(space)?
            .iter()
            .map(|g| {
                g.into_inner()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StorageError::engine("read"))
            })
            .collect()
    }
}

/// Bytes available to unprivileged writers on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    use std::os::unix::ffi::OsStrExt;
    let io = |source| StorageError::Io {
        path: dir.to_owned(),
        op: "statvfs",
        source,
    };
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io(std::io::Error::new(ErrorKind::InvalidInput, e)))?;
    // SAFETY: a zeroed statvfs is valid; statvfs fills it from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is valid for writing.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn report_damaged(space: Space, key: &[u8], reason: &str) -> String {
    let line = format!("{}/{}: {reason}", space.name(), hex(key));
    tracing::warn!(record = %line, "damaged record skipped");
    line
}

fn damage(out: &mut Vec<String>, space: Space, key: &[u8], reason: &str) {
    out.push(report_damaged(space, key, reason));
}

/// Checks that `dir` is a store, an empty directory or nothing, and marks it as a store.
fn prepare_dir(dir: &Path) -> Result<(), StorageError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| StorageError::Io { path, op, source }
    };
    let marker = dir.join(MARKER_FILE);
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(StorageError::NotAStore {
                path: dir.to_owned(),
                reason: "not a directory".into(),
            })
        }
        Ok(_) => match std::fs::read(&marker) {
            Ok(content) => {
                let content = String::from_utf8_lossy(&content);
                if content.trim_end() != MARKER_CONTENT {
                    return Err(StorageError::UnsupportedFormat {
                        path: dir.to_owned(),
                        found: content.trim_end().to_owned(),
                    });
                }
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
                    let entry = entry.map_err(io("list", dir))?;
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                if !names.is_empty() {
                    names.sort();
                    let more = names.len().saturating_sub(5);
                    names.truncate(5);
                    let mut listing = names.join(", ");
                    if more > 0 {
                        listing.push_str(&format!(" and {more} more"));
                    }
                    return Err(StorageError::NotAStore {
                        path: dir.to_owned(),
                        reason: format!(
                            "the directory is not empty ({listing}) and has no {MARKER_FILE} \
                             file; point the data directory elsewhere or empty it"
                        ),
                    });
                }
            }
            Err(e) => return Err(io("read", &marker)(e)),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        }
        Err(e) => return Err(io("inspect", dir)(e)),
    }
    // An empty or new directory: mark it, durably, before the engine creates its files.
    let mut f = std::fs::File::create(&marker).map_err(io("create", &marker))?;
    f.write_all(format!("{MARKER_CONTENT}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io("write", &marker))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))?;
    Ok(())
}

/// Writes collected in memory and applied to the store at once by [`StoreBatch::commit`],
/// atomically (one journal entry) and in call order: a later write to a key wins, and
/// [`StoreBatch::delete_session`] / [`StoreBatch::queue_delete_range`] also cover the
/// keys written earlier in the same batch. Building a batch takes no lock and does no I/O;
/// `commit` (which runs the scans of the range deletes) belongs on the blocking thread,
/// followed by [`Store::persist`]. Batches of one store must be committed in the order they
/// were built.
pub struct StoreBatch {
    store: Store,
    ops: Vec<Op>,
}

enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
    /// Every per-client key with this client prefix.
    DeleteClient(Vec<u8>),
    /// Queue keys of this client prefix below this sequence number.
    QueueTrim(Vec<u8>, u64),
}

impl fmt::Debug for StoreBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreBatch")
            .field("dir", &self.store.inner.dir)
            .field("ops", &self.ops.len())
            .finish()
    }
}

impl StoreBatch {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn put_session(
        &mut self,
        client_id: &str,
        rec: &SessionRecord,
    ) -> Result<(), StorageError> {
        let op = Op::Put(Space::Sessions, client_prefix(client_id)?, rec.to_value()?);
        self.ops.push(op);
        Ok(())
    }

    pub fn delete_session(&mut self, client_id: &str) -> Result<(), StorageError> {
        self.ops.push(Op::DeleteClient(client_prefix(client_id)?));
        Ok(())
    }

    /// Replaces the session's drop counters.
    pub fn counters_put(
        &mut self,
        client_id: &str,
        rec: &CountersRecord,
    ) -> Result<(), StorageError> {
        self.ops.push(Op::Put(
            Space::Counters,
            client_prefix(client_id)?,
            rec.to_value()?,
        ));
        Ok(())
    }

    pub fn put_subscription(
        &mut self,
        client_id: &str,
        filter: &str,
        rec: &SubscriptionRecord,
    ) -> Result<(), StorageError> {
        let key = keys::subscription_key(client_id, filter)?;
        self.ops
            .push(Op::Put(Space::Subscriptions, key, rec.to_value()?));
        Ok(())
    }

    pub fn delete_subscription(
        &mut self,
        client_id: &str,
        filter: &str,
    ) -> Result<(), StorageError> {
        let key = keys::subscription_key(client_id, filter)?;
        self.ops.push(Op::Delete(Space::Subscriptions, key));
        Ok(())
    }

    pub fn queue_push(
        &mut self,
        client_id: &str,
        seq: u64,
        rec: &QueuedRecord,
    ) -> Result<(), StorageError> {
        let op = Op::Put(Space::Queue, queue_key(client_id, seq)?, rec.to_value()?);
        self.ops.push(op);
        Ok(())
    }

    pub fn queue_delete(&mut self, client_id: &str, seq: u64) -> Result<(), StorageError> {
        self.ops
            .push(Op::Delete(Space::Queue, queue_key(client_id, seq)?));
        Ok(())
    }

    pub fn queue_delete_range(
        &mut self,
        client_id: &str,
        below_seq: u64,
    ) -> Result<(), StorageError> {
        self.ops
            .push(Op::QueueTrim(client_prefix(client_id)?, below_seq));
        Ok(())
    }

    pub fn inflight_put(
        &mut self,
        client_id: &str,
        packet_id: u16,
        rec: &InflightRecord,
    ) -> Result<(), StorageError> {
        let op = Op::Put(
            Space::Inflight,
            packet_key(client_id, packet_id)?,
            rec.to_value()?,
        );
        self.ops.push(op);
        Ok(())
    }

    pub fn inflight_delete(&mut self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.ops.push(Op::Delete(
            Space::Inflight,
            packet_key(client_id, packet_id)?,
        ));
        Ok(())
    }

    pub fn incoming_put(&mut self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        let op = Op::Put(
            Space::Incoming,
            packet_key(client_id, packet_id)?,
            incoming_value(),
        );
        self.ops.push(op);
        Ok(())
    }

    pub fn incoming_delete(&mut self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.ops.push(Op::Delete(
            Space::Incoming,
            packet_key(client_id, packet_id)?,
        ));
        Ok(())
    }

    pub fn dedup_put(
        &mut self,
        client_id: &str,
        origin: &str,
        packet_id: u16,
    ) -> Result<(), StorageError> {
        let op = Op::Put(
            Space::Dedup,
            dedup_key(client_id, origin, packet_id)?,
            dedup_value(),
        );
        self.ops.push(op);
        Ok(())
    }

    pub fn dedup_delete(
        &mut self,
        client_id: &str,
        origin: &str,
        packet_id: u16,
    ) -> Result<(), StorageError> {
        self.ops.push(Op::Delete(
            Space::Dedup,
            dedup_key(client_id, origin, packet_id)?,
        ));
        Ok(())
    }

    pub fn retained_put(&mut self, topic: &str, rec: &MessageRecord) -> Result<(), StorageError> {
        let op = Op::Put(Space::Retained, keys::retained_key(topic)?, rec.to_value()?);
        self.ops.push(op);
        Ok(())
    }

    pub fn retained_delete(&mut self, topic: &str) -> Result<(), StorageError> {
        self.ops
            .push(Op::Delete(Space::Retained, keys::retained_key(topic)?));
        Ok(())
    }

    /// Applies the batch atomically (not yet durable: call [`Store::persist`]).
    pub fn commit(self) -> Result<(), StorageError> {
        // One engine for the scans and the write, even if the store is reopened meanwhile.
        let engine = self.store.engine()?;
        // The last word on each key, in call order.
        let mut last: BTreeMap<(Space, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
        for op in self.ops {
            match op {
                Op::Put(space, key, value) => {
                    last.insert((space, key), Some(value));
                }
                Op::Delete(space, key) => {
                    last.insert((space, key), None);
                }
                Op::DeleteClient(prefix) => {
                    for space in Space::PER_CLIENT {
                        for item in engine.ks(space).prefix(&prefix) {
                            let key = item.key().map_err(StorageError::engine("scan"))?;
                            last.insert((space, key.to_vec()), None);
                        }
                        for (_, v) in last
                            .range_mut((space, prefix.clone())..)
                            .take_while(|((s, k), _)| *s == space && k.starts_with(&prefix))
                        {
                            *v = None;
                        }
                    }
                }
                Op::QueueTrim(prefix, below) => {
                    if below == 0 {
                        continue;
                    }
                    let mut start = prefix.clone();
                    start.extend_from_slice(&0u64.to_be_bytes());
                    let mut end = prefix;
                    end.extend_from_slice(&below.to_be_bytes());
                    for item in engine
                        .ks(Space::Queue)
                        .range(start.as_slice()..end.as_slice())
                    {
                        let key = item.key().map_err(StorageError::engine("scan"))?;
                        last.insert((Space::Queue, key.to_vec()), None);
                    }
                    for (_, v) in last.range_mut((Space::Queue, start)..(Space::Queue, end)) {
                        *v = None;
                    }
                }
            }
        }
        if last.is_empty() {
            return Ok(());
        }
        let mut batch = engine.db.batch();
        for ((space, key), value) in last {
            match value {
                Some(value) => batch.insert(engine.ks(space), key, value),
                None => batch.remove(engine.ks(space), key),
            }
        }
        batch.commit().map_err(StorageError::engine("commit batch"))
    }
}

#[cfg(test)]
mod tests;
