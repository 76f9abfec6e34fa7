//! A batch of writes to one store, applied atomically by [`StoreBatch::commit`]: what a
//! session changed in one shard tick goes to disk as one unit.

use super::*;

/// Writes collected in memory and applied to the store at once by [`StoreBatch::commit`],
/// atomically (one journal entry) and in call order: a later write to a key wins, and
/// [`StoreBatch::delete_session`] / [`StoreBatch::queue_delete_range`] also cover the
/// keys written earlier in the same batch. Building a batch takes no lock and does no I/O;
/// `commit` applies it (the scans of the range deletes, a journal append, the memtable
/// inserts; not durable until [`Store::persist`]). Batches of one store must be committed
/// in the order they were built.
pub struct StoreBatch {
    store: Store,
    ops: Vec<Op>,
    /// Bytes held by `ops`: keys, values and each operation's own size.
    bytes: usize,
    /// Whether a fresh put deleted again within the batch is dropped (see [`Op::PutFresh`]).
    elide: bool,
}

/// A point in a batch to go back to (see [`StoreBatch::rollback`]).
#[derive(Clone, Copy, Debug)]
pub struct BatchMark {
    ops: usize,
    bytes: usize,
}

/// What a batch leaves a key with: whether the key is known to be absent before the batch,
/// and its value after it (`None`: deleted).
type LastWord = (bool, Option<Vec<u8>>);

enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    /// A put of a key the caller knows is absent from the store before this batch (a new
    /// queue sequence number, a packet id just taken): if the same batch deletes it again,
    /// neither the put nor the delete is written.
    PutFresh(Space, Vec<u8>, Vec<u8>),
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
    pub(super) fn new(store: Store) -> StoreBatch {
        StoreBatch {
            store,
            ops: Vec::new(),
            bytes: 0,
            elide: true,
        }
    }

    /// With `false`, a fresh put is written as any put (for when the caller's idea of which
    /// keys are absent may be wrong).
    pub fn eliding(mut self, elide: bool) -> StoreBatch {
        self.elide = elide;
        self
    }

    /// Where the batch is now.
    pub fn mark(&self) -> BatchMark {
        BatchMark {
            ops: self.ops.len(),
            bytes: self.bytes,
        }
    }

    /// Forgets the operations added since `mark`.
    pub fn rollback(&mut self, mark: BatchMark) {
        self.ops.truncate(mark.ops);
        self.bytes = mark.bytes;
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Key and value bytes the batch holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds an operation, counting the bytes it holds.
    fn push(&mut self, op: Op) {
        self.bytes += std::mem::size_of::<Op>()
            + match &op {
                Op::Put(_, k, v) | Op::PutFresh(_, k, v) => k.len() + v.len(),
                Op::Delete(_, k) | Op::DeleteClient(k) | Op::QueueTrim(k, _) => k.len(),
            };
        self.ops.push(op);
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
        self.push(op);
        Ok(())
    }

    pub fn delete_session(&mut self, client_id: &str) -> Result<(), StorageError> {
        self.push(Op::DeleteClient(client_prefix(client_id)?));
        Ok(())
    }

    /// Replaces the session's drop counters.
    pub fn counters_put(
        &mut self,
        client_id: &str,
        rec: &CountersRecord,
    ) -> Result<(), StorageError> {
        self.push(Op::Put(
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
        self.push(Op::Put(Space::Subscriptions, key, rec.to_value()?));
        Ok(())
    }

    pub fn delete_subscription(
        &mut self,
        client_id: &str,
        filter: &str,
    ) -> Result<(), StorageError> {
        let key = keys::subscription_key(client_id, filter)?;
        self.push(Op::Delete(Space::Subscriptions, key));
        Ok(())
    }

    pub fn queue_push(
        &mut self,
        client_id: &str,
        seq: u64,
        rec: &QueuedRecord,
    ) -> Result<(), StorageError> {
        // A sequence number is used once per session: the key is new.
        let op = Op::PutFresh(Space::Queue, queue_key(client_id, seq)?, rec.to_value()?);
        self.push(op);
        Ok(())
    }

    pub fn queue_delete(&mut self, client_id: &str, seq: u64) -> Result<(), StorageError> {
        self.push(Op::Delete(Space::Queue, queue_key(client_id, seq)?));
        Ok(())
    }

    pub fn queue_delete_range(
        &mut self,
        client_id: &str,
        below_seq: u64,
    ) -> Result<(), StorageError> {
        self.push(Op::QueueTrim(client_prefix(client_id)?, below_seq));
        Ok(())
    }

    /// Stores a message in flight; `fresh`: its packet id was just taken (no record of it
    /// is stored), rather than a state change of a stored one.
    pub fn inflight_put(
        &mut self,
        client_id: &str,
        packet_id: u16,
        rec: &InflightRecord,
        fresh: bool,
    ) -> Result<(), StorageError> {
        let (key, value) = (packet_key(client_id, packet_id)?, rec.to_value()?);
        let op = if fresh {
            Op::PutFresh(Space::Inflight, key, value)
        } else {
            Op::Put(Space::Inflight, key, value)
        };
        self.push(op);
        Ok(())
    }

    pub fn inflight_delete(&mut self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.push(Op::Delete(
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
        self.push(op);
        Ok(())
    }

    pub fn incoming_delete(&mut self, client_id: &str, packet_id: u16) -> Result<(), StorageError> {
        self.push(Op::Delete(
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
        self.push(op);
        Ok(())
    }

    pub fn dedup_delete(
        &mut self,
        client_id: &str,
        origin: &str,
        packet_id: u16,
    ) -> Result<(), StorageError> {
        self.push(Op::Delete(
            Space::Dedup,
            dedup_key(client_id, origin, packet_id)?,
        ));
        Ok(())
    }

    pub fn retained_put(&mut self, topic: &str, rec: &MessageRecord) -> Result<(), StorageError> {
        let op = Op::Put(Space::Retained, keys::retained_key(topic)?, rec.to_value()?);
        self.push(op);
        Ok(())
    }

    pub fn retained_delete(&mut self, topic: &str) -> Result<(), StorageError> {
        self.push(Op::Delete(Space::Retained, keys::retained_key(topic)?));
        Ok(())
    }

    /// Applies the batch atomically (not yet durable: call [`Store::persist`]).
    pub fn commit(self) -> Result<(), StorageError> {
        self.apply(None, None)
    }

    /// [`StoreBatch::commit`], also returning what the batch changed as the replication
    /// log carries it (every key's last word: a put of its value or a delete; see
    /// `replica.rs`). Empty when the batch changed nothing.
    pub fn commit_logged(self) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        self.apply(Some(&mut out), None)?;
        Ok(out)
    }

    /// [`StoreBatch::commit_logged`], and when the batch changes anything, also puts
    /// `(shard, number)` under [`REPLICA_BATCH_KEY`] in the same engine batch and in the
    /// unit: the store and the replicated stream both say which batch this was.
    pub fn commit_numbered(self, shard: u16, number: u64) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::new();
        self.apply(Some(&mut out), Some((shard, number)))?;
        Ok(out)
    }

    fn apply(
        self,
        mut log: Option<&mut Vec<u8>>,
        number: Option<(u16, u64)>,
    ) -> Result<(), StorageError> {
        // One engine for the scans and the write, even if the store is reopened meanwhile.
        let engine = self.store.engine()?;
        // The last word on each key, in call order, and whether the key is known to be
        // absent before the batch (its first word was a fresh put).
        let mut last: BTreeMap<(Space, Vec<u8>), LastWord> = BTreeMap::new();
        for op in self.ops {
            match op {
                Op::Put(space, key, value) => {
                    last.entry((space, key)).or_insert((false, None)).1 = Some(value);
                }
                Op::PutFresh(space, key, value) => {
                    last.entry((space, key)).or_insert((self.elide, None)).1 = Some(value);
                }
                Op::Delete(space, key) => {
                    last.entry((space, key)).or_insert((false, None)).1 = None;
                }
                Op::DeleteClient(prefix) => {
                    for space in Space::PER_CLIENT {
                        for (_, v) in last
                            .range_mut((space, prefix.clone())..)
                            .take_while(|((s, k), _)| *s == space && k.starts_with(&prefix))
                        {
                            v.1 = None;
                        }
                        // Stored keys: not absent before the batch, whatever was claimed.
                        for item in engine.ks(space).prefix(&prefix) {
                            let key = item.key().map_err(StorageError::engine("scan"))?;
                            last.insert((space, key.to_vec()), (false, None));
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
                    for (_, v) in
                        last.range_mut((Space::Queue, start.clone())..(Space::Queue, end.clone()))
                    {
                        v.1 = None;
                    }
                    for item in engine
                        .ks(Space::Queue)
                        .range(start.as_slice()..end.as_slice())
                    {
                        let key = item.key().map_err(StorageError::engine("scan"))?;
                        last.insert((Space::Queue, key.to_vec()), (false, None));
                    }
                }
            }
        }
        let mut batch = engine.db.batch();
        for ((space, key), (absent_before, value)) in last {
            match value {
                Some(value) => {
                    if let Some(out) = log.as_deref_mut() {
                        super::replica::encode_op(out, space, &key, Some(&value));
                    }
                    batch.insert(engine.ks(space), key, value)
                }
                // Put and deleted again within the batch: nothing to write.
                None if absent_before => {}
                None => {
                    if let Some(out) = log.as_deref_mut() {
                        super::replica::encode_op(out, space, &key, None);
                    }
                    batch.remove(engine.ks(space), key)
                }
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        if let Some(value) = number.map(replica_batch_value) {
            if let Some(out) = log {
                super::replica::encode_op(out, Space::Meta, REPLICA_BATCH_KEY, Some(&value));
            }
            batch.insert(engine.ks(Space::Meta), REPLICA_BATCH_KEY, value);
        }
        batch.commit().map_err(StorageError::engine("commit batch"))
    }
}

/// `[shard: u16 BE][number: u64 BE]`, the value under [`REPLICA_BATCH_KEY`].
pub(crate) fn replica_batch_value((shard, number): (u16, u64)) -> Vec<u8> {
    let mut v = shard.to_be_bytes().to_vec();
    v.extend_from_slice(&number.to_be_bytes());
    v
}

/// The shard and batch number of a [`REPLICA_BATCH_KEY`] value (`None`: malformed).
pub(crate) fn replica_batch_of(value: &[u8]) -> Option<(u16, u64)> {
    let shard = u16::from_be_bytes(value.get(..2)?.try_into().ok()?);
    let number = u64::from_be_bytes(value.get(2..10)?.try_into().ok()?);
    (value.len() == 10).then_some((shard, number))
}

impl Store {
    /// The last batch of this store that went to the replicated stream, as
    /// `(shard, number)` (`None`: none yet).
    pub fn replica_batch(&self) -> Result<Option<(u16, u64)>, StorageError> {
        let value = self
            .ks(Space::Meta)?
            .get(REPLICA_BATCH_KEY)
            .map_err(StorageError::engine("read the replica batch"))?;
        Ok(value.and_then(|v| replica_batch_of(&v)))
    }
}
