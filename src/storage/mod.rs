//! Durable per-shard storage: sessions, subscriptions, offline queues, messages in flight,
//! incoming QoS 2 ids, QoS 2 dedup keys and retained messages, in one fjall `Database` per
//! shard. This is the only module that names fjall.
//!
//! The API is synchronous and thread-safe ([`Store`] is `Clone + Send + Sync`). Writes go to
//! the engine's journal buffer and are durable only after a persist (group commit: many
//! writes, one fsync). The shards collect their writes in one [`StoreBatch`] per group
//! commit, apply it with [`StoreBatch::commit`] on the executor, then persist in two
//! halves: [`Store::persist_prepare`] (the journal buffer flushed into its file; cheap) and
//! an `fdatasync` of the journal it names through the shard's io_uring, closed by
//! [`Store::persist_finish`]. [`Store::persist`] does the same, blocking.
//!
//! **Blocking note.** Every write takes the engine's journal mutex for as long as it takes
//! to append to an in-memory buffer (or, when the 8 KiB buffer fills, one `write(2)`).
//! fjall's own `persist(SyncData)` holds that mutex across the fsync, which would make a
//! write on the executor wait for a fsync; the persist halves therefore fsync outside the
//! mutex (see [`Store::persist_prepare`]). The engine may still stall a write when
//! memtables or level-0 tables pile up faster than its worker flushes them (it sleeps or
//! spins on the calling thread), or while its worker holds the journal mutex to seal a
//! journal.
//!
//! # Key layout (the one place it is written down)
//!
//! One `Database` in `<data_dir>/shard-<n>/`, marked by the file `SHARDMQ_STORE` (format
//! line `shardmq-store 1`), with nine keyspaces. `C` stands for a client id encoded as
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
//! | `meta`     | `replica-batch`                      | `[shard: u16][batch number: u64]` (big-endian): the last batch sent to the replicated stream |
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
//!
//! Parts: this file opens the store and holds the single writes; `batch` the atomic batch
//! of a shard tick; `persist` the fsync behind acknowledgements; `load` reading back and
//! copying between stores; `failure` failure episodes and recovery; `keys` and `records`
//! the encodings.

mod error;
mod keys;
mod records;

mod batch;
mod failure;
mod load;
mod persist;
pub mod replica;
mod transfer;

pub use batch::StoreBatch;
pub use persist::SyncTarget;
pub use transfer::{decode_client, dedup_entry_of, ClientEntry};

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

/// The keyspaces a client's records live in, the session record's first (the others are
/// read per client at start, and moved with a session).
pub(crate) const CLIENT_SPACES: [Space; 7] = [
    Space::Sessions,
    Space::Subscriptions,
    Space::Queue,
    Space::Inflight,
    Space::Incoming,
    Space::Dedup,
    Space::Counters,
];

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
    /// The store's own bookkeeping (not a client's, never snapshotted): the number of the
    /// last batch this shard sent to the replicated stream ([`REPLICA_BATCH_KEY`]).
    Meta,
}

/// The `meta` key holding `[shard: u16 BE][batch number: u64 BE]`: the last batch of this
/// store whose changes went to the replicated stream. Written in that batch, so it also
/// travels in the batch's unit: a restore applies only the units a store lacks.
pub const REPLICA_BATCH_KEY: &[u8] = b"replica-batch";

impl Space {
    pub const ALL: [Space; 9] = [
        Space::Sessions,
        Space::Subscriptions,
        Space::Queue,
        Space::Inflight,
        Space::Incoming,
        Space::Retained,
        Space::Dedup,
        Space::Counters,
        Space::Meta,
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
            Space::Meta => "meta",
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
    pub(super) fn new(client_id: String, record: SessionRecord) -> RecoveredSession {
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
    spaces: [Keyspace; Space::ALL.len()],
    /// The number of the newest journal seen by [`Store::persist_prepare`] (`u64::MAX`: none
    /// yet), so that a persist checks one path instead of listing the directory.
    newest_journal: std::sync::atomic::AtomicU64,
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
    let spaces: [Keyspace; Space::ALL.len()] = spaces
        .try_into()
        .unwrap_or_else(|_| unreachable!("one keyspace per Space"));
    Ok(Engine {
        db,
        spaces,
        newest_journal: std::sync::atomic::AtomicU64::new(u64::MAX),
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
        StoreBatch::new(self.clone())
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

#[cfg(test)]
mod tests;
