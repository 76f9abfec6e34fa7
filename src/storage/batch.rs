//! A batch of writes to one store, applied atomically by [`StoreBatch::commit`]: what a
//! session changed in one shard tick goes to disk as one unit.

use super::*;

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
    pub(super) fn new(store: Store) -> StoreBatch {
        StoreBatch {
            store,
            ops: Vec::new(),
        }
    }

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
