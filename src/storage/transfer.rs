//! One session's records as raw entries, to move the session to another cluster node: read
//! here by the client's key prefix in every keyspace (what is committed), checked there
//! record by record before anything is written (a peer is trusted to be a shardmq node,
//! not to be bug-free).

use super::load::load_client_value;
use super::*;

/// One stored record of a client: its keyspace, the key after the client's prefix, and
/// the framed value as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    pub space: Space,
    pub rest: Vec<u8>,
    pub value: Vec<u8>,
}

impl Space {
    /// A keyspace's number on the node-to-node wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The keyspace of a client's record numbered `code` (`None`: not one of a client's).
    pub fn of_client_code(code: u8) -> Option<Space> {
        CLIENT_SPACES.iter().copied().find(|s| *s as u8 == code)
    }
}

/// The publisher and packet id of a client's `dedup` record, from the key after the
/// client's prefix ([`ClientEntry::rest`]).
pub fn dedup_entry_of(rest: &[u8]) -> Option<(&str, u16)> {
    dedup_of(rest)
}

impl Store {
    /// Every committed record of `client_id`, its session record first; `None` when it has
    /// no session record.
    pub fn client_entries(
        &self,
        client_id: &str,
    ) -> Result<Option<Vec<ClientEntry>>, StorageError> {
        let prefix = client_prefix(client_id)?;
        let mut out = Vec::new();
        for space in CLIENT_SPACES {
            for item in self.ks(space)?.prefix(&prefix) {
                let (k, v) = item
                    .into_inner()
                    .map_err(StorageError::engine("read a client's records"))?;
                out.push(ClientEntry {
                    space,
                    rest: k[prefix.len()..].to_vec(),
                    value: v.to_vec(),
                });
            }
            if space == Space::Sessions && out.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(out))
    }
}

/// Checks a moved session's entries (a session record first and only once, every value a
/// sound record of its keyspace, every key well formed) and gives the session as a load at
/// start would, with its queue in sequence order.
pub fn decode_client(
    client_id: &str,
    entries: &[ClientEntry],
) -> Result<(RecoveredSession, Vec<(u64, QueuedRecord)>), String> {
    let Some((first, rest)) = entries.split_first() else {
        return Err("no records".into());
    };
    if first.space != Space::Sessions || !first.rest.is_empty() {
        return Err("the session record does not come first".into());
    }
    let record = SessionRecord::from_value(&first.value)?;
    let mut s = RecoveredSession::new(client_id.to_owned(), record);
    let mut queue = Vec::new();
    for e in rest {
        if e.space == Space::Sessions || !CLIENT_SPACES.contains(&e.space) {
            return Err(format!("a record of {} in a session's", e.space.name()));
        }
        load_client_value(&mut s, e.space, &e.rest, &e.value)
            .map_err(|why| format!("{}: {why}", e.space.name()))?;
        if e.space == Space::Queue {
            let seq = seq_of(&e.rest).ok_or("malformed queue key")?;
            queue.push((seq, QueuedRecord::from_value(&e.value)?));
        }
    }
    queue.sort_by_key(|(seq, _)| *seq);
    if queue.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err("a queue sequence number twice".into());
    }
    Ok((s, queue))
}

/// Keys and values written per engine batch by [`Store::apply_ops`].
const RESTORE_BATCH_BYTES: usize = 4 << 20;

impl Store {
    /// Applies the last word on each key from a node's replication log (a node restoring
    /// its stores after a stop that may have lost writes it acknowledged, see
    /// `cluster/replica.rs`): puts and deletes, in engine batches of about
    /// [`RESTORE_BATCH_BYTES`], then persisted. Ops are absolute, so the store ends as the
    /// log says for every key it names, whatever it held of them before. Blocking: call it
    /// before the shards run. Returns the ops applied.
    pub fn apply_ops<'a>(
        &self,
        ops: impl Iterator<Item = (Space, &'a [u8], Option<&'a [u8]>)>,
    ) -> Result<u64, StorageError> {
        let engine = self.engine()?;
        let mut batch = engine.db.batch();
        let (mut bytes, mut applied) = (0, 0u64);
        for (space, key, value) in ops {
            bytes += key.len() + value.map_or(0, <[u8]>::len);
            match value {
                Some(v) => batch.insert(engine.ks(space), key.to_vec(), v.to_vec()),
                None => batch.remove(engine.ks(space), key.to_vec()),
            }
            applied += 1;
            if bytes >= RESTORE_BATCH_BYTES {
                std::mem::replace(&mut batch, engine.db.batch())
                    .commit()
                    .map_err(StorageError::engine("restore"))?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            batch.commit().map_err(StorageError::engine("restore"))?;
        }
        drop(engine);
        self.persist()?;
        Ok(applied)
    }
}
