//! Durable per-shard storage: sessions, subscriptions, offline queues, messages in flight,
//! incoming QoS 2 ids and retained messages, in one fjall `Database` per shard. This is the
//! only module that names fjall.
//!
//! The API is synchronous and thread-safe ([`Store`] is `Clone + Send + Sync`). Writes go to
//! the engine's journal buffer and are durable only after [`Store::persist`] (group commit:
//! many writes, one fsync). The shard runs `persist` (or [`StoreBatch::commit`] followed by
//! `persist`) through its executor's `spawn_blocking`.
//!
//! **Blocking note.** fjall holds its journal mutex during the fsync of `persist`, so a
//! direct write ([`Store::put_session`], [`Store::queue_push`]...) issued while a `persist`
//! runs on another thread waits for that fsync. A shard that must never block its executor
//! collects its writes in a [`StoreBatch`] (plain memory, no lock) and commits it on the
//! blocking thread right before `persist`.
//!
//! # Key layout (the one place it is written down)
//!
//! One `Database` in `<data_dir>/shard-<n>/`, marked by the file `SHARDMQ_STORE` (format
//! line `shardmq-store 1`), with six keyspaces. `C` stands for a client id encoded as
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
//! | `retained` | topic name bytes                     | [`MessageRecord`]     |
//!
//! Big-endian numbers make the engine's byte order the numeric order, so a prefix scan of
//! `queue` yields a session's queue oldest first. Every value is framed as
//! `[b"SQ"][kind][format][crc32 LE][rkyv bytes]` (see `records.rs`); the checksum is
//! verified on every read and a damaged record is reported with its key and skipped.
//!
//! A client's `subs`/`queue`/`inflight`/`incoming` keys without a `sessions` key are
//! orphans (a crash between writes of a batch, or a session deleted by a foreign writer):
//! [`Store::load`] deletes them. Keys of a client whose session record is *damaged* are
//! kept, so nothing is destroyed on the strength of a bad checksum.

mod error;
mod keys;
mod records;

pub use error::{RecordError, StorageError};
pub use records::{
    InflightRecord, MessageRecord, QueuedRecord, SessionRecord, SubscriptionRecord, WallClock,
    WillRecord,
};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keys::{client_prefix, hex, packet_id_of, packet_key, queue_key, seq_of, split_client_key};
use records::{incoming_value, queued_cost, unframe, Kind, Record};

/// The marker file that tells a store directory from any other directory.
pub const MARKER_FILE: &str = "SHARDMQ_STORE";
const MARKER_CONTENT: &str = "shardmq-store 1";
/// fjall panics below this many cached file descriptors.
const MIN_CACHED_FILES: usize = 10;

/// The keyspaces of a store.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    Sessions,
    Subscriptions,
    Queue,
    Inflight,
    Incoming,
    Retained,
}

impl Space {
    pub const ALL: [Space; 6] = [
        Space::Sessions,
        Space::Subscriptions,
        Space::Queue,
        Space::Inflight,
        Space::Incoming,
        Space::Retained,
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
        }
    }

    /// The keyspaces keyed by client (everything but `retained`).
    const PER_CLIENT: [Space; 5] = [
        Space::Sessions,
        Space::Subscriptions,
        Space::Queue,
        Space::Inflight,
        Space::Incoming,
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
    /// Memtable size per keyspace before it is flushed to a table file. Applies when a
    /// keyspace is created; existing keyspaces keep the value they were created with.
    pub memtable_bytes: u64,
    /// Background flush/compaction threads of this store (at least 1).
    pub worker_threads: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            cache_bytes: 32 << 20,
            max_cached_files: 256,
            memtable_bytes: 16 << 20,
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
    /// The lowest stored sequence number (0 when the queue is empty).
    pub queue_first_seq: u64,
    /// One past the highest stored sequence number (0 when the queue is empty).
    pub queue_next_seq: u64,
    /// Intact queued messages.
    pub queue_len: u64,
    /// Their cost in bytes (payload plus topic, as `Message::cost_bytes`).
    pub queue_bytes: u64,
}

impl RecoveredSession {
    fn new(client_id: String, record: SessionRecord) -> RecoveredSession {
        RecoveredSession {
            client_id,
            record,
            subscriptions: Vec::new(),
            inflight: Vec::new(),
            incoming: Vec::new(),
            queue_first_seq: 0,
            queue_next_seq: 0,
            queue_len: 0,
            queue_bytes: 0,
        }
    }
}

/// One shard's store. Cheap to clone; all clones share the engine. The directory is locked
/// while any clone lives.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// In the order of [`Space::ALL`].
    spaces: [Keyspace; 6],
    dir: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store in `dir` (`<data_dir>/shard-<n>`), creating the directory and an empty
    /// store when it does not exist or is empty. A non-empty directory without the marker
    /// file is refused ([`StorageError::NotAStore`]), as is a store already open
    /// ([`StorageError::Locked`]).
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Store, StorageError> {
        prepare_dir(dir)?;
        let db = Database::builder(dir)
            .cache_size(opts.cache_bytes)
            .max_cached_files(Some(opts.max_cached_files.max(MIN_CACHED_FILES)))
            .worker_threads(opts.worker_threads.max(1))
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
                        .max_memtable_size(opts.memtable_bytes)
                })
                .map_err(StorageError::engine("open keyspace"))?;
            spaces.push(ks);
        }
        let spaces: [Keyspace; 6] = spaces
            .try_into()
            .unwrap_or_else(|_| unreachable!("one keyspace per Space"));
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                spaces,
                dir: dir.to_owned(),
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn ks(&self, space: Space) -> &Keyspace {
        &self.inner.spaces[space as usize]
    }

    fn insert(&self, space: Space, key: Vec<u8>, value: Vec<u8>) -> Result<(), StorageError> {
        self.ks(space)
            .insert(key, value)
            .map_err(StorageError::engine("write"))
    }

    fn remove(&self, space: Space, key: Vec<u8>) -> Result<(), StorageError> {
        self.ks(space)
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

    /// Deletes the session and every subscription, queued message, message in flight and
    /// incoming packet id of the client, atomically.
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
        for item in self.ks(Space::Queue).range(start..=end) {
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

    pub fn retained_put(&self, topic: &str, rec: &MessageRecord) -> Result<(), StorageError> {
        self.insert(Space::Retained, keys::retained_key(topic)?, rec.to_value()?)
    }

    pub fn retained_delete(&self, topic: &str) -> Result<(), StorageError> {
        self.remove(Space::Retained, keys::retained_key(topic)?)
    }

    /// Makes every write so far durable: fsyncs the journal (`fdatasync`). Blocks for the
    /// fsync; run it off the executor thread.
    pub fn persist(&self) -> Result<(), StorageError> {
        self.inner
            .db
            .persist(PersistMode::SyncData)
            .map_err(StorageError::engine("persist"))
    }

    /// Bytes on disk: journal plus table files.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.db.disk_space().unwrap_or(0)
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
            let mut batch = self.inner.db.batch();
            for (space, key) in orphans {
                batch.remove(self.ks(space), key);
            }
            batch
                .commit()
                .map_err(StorageError::engine("delete orphans"))?;
        }
        Ok(rec)
    }

    /// Every key and value of a keyspace. An engine read error (a table block failing the
    /// engine's own checksum) is logged and ends the scan of that keyspace: it comes out as
    /// one `Err` with the line for [`Recovered::damaged`].
    fn scan(
        &self,
        space: Space,
    ) -> impl Iterator<Item = Result<(fjall::UserKey, fjall::UserValue), String>> + '_ {
        let mut iter = self.ks(space).iter();
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            Some(iter.next()?.into_inner().map_err(|e| {
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
            for item in self.ks(space).range(start.as_slice()..) {
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
        for ks in &self.inner.spaces {
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
    pub fn raw_entries(&self, space: Space) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        self.ks(space)
            .iter()
            .map(|g| {
                g.into_inner()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StorageError::engine("read"))
            })
            .collect()
    }
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
        let store = self.store;
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
                        for item in store.ks(space).prefix(&prefix) {
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
                    for item in store
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
        let mut batch = store.inner.db.batch();
        for ((space, key), value) in last {
            match value {
                Some(value) => batch.insert(store.ks(space), key, value),
                None => batch.remove(store.ks(space), key),
            }
        }
        batch.commit().map_err(StorageError::engine("commit batch"))
    }
}

#[cfg(test)]
mod tests;
