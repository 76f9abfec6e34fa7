//! A store's changes as the replication log carries them (replicated sessions, see
//! `cluster/replica.rs`): one *unit* per applied batch, the last word of the batch on each
//! key, in key order:
//!
//! ```text
//! unit := op*
//! op   := space: u8 | kind: u8 (0 delete, 1 put) | key_len: u32 LE | key
//!         [ value_len: u32 LE | value ]            (puts only)
//! ```
//!
//! Keys and values are exactly as stored (see the key layout in `mod.rs`; every value is a
//! framed, checksummed record), so applying a unit is idempotent: each op says what the key
//! holds after it, never how it changed. A snapshot is the same encoding with puts only.
//! Read back on another node ([`Replay`]), a unit is checked op by op before anything of it
//! is kept, and the result is handed over per client as a moved session is
//! ([`ClientEntry`], checked again by `decode_client` before it is stored).

use super::*;

/// The longest key the log carries (fjall's own bound on a key).
const KEY_BYTES_MAX: usize = u16::MAX as usize;

/// Appends one op to `out`.
pub fn encode_op(out: &mut Vec<u8>, space: Space, key: &[u8], value: Option<&[u8]>) {
    out.push(space as u8);
    out.push(u8::from(value.is_some()));
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    if let Some(v) = value {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
}

/// One op of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op<'a> {
    pub space: Space,
    pub key: &'a [u8],
    /// `None`: the key is deleted.
    pub value: Option<&'a [u8]>,
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!("truncated: {n} bytes wanted, {} left", buf.len()));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn take_len(buf: &mut &[u8]) -> Result<usize, String> {
    let b = take(buf, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Every op of `unit`, or what is wrong with it (nothing of a damaged unit is used).
pub fn decode(unit: &[u8]) -> Result<Vec<Op<'_>>, String> {
    let mut buf = unit;
    let mut out = Vec::new();
    while !buf.is_empty() {
        let head = take(&mut buf, 2)?;
        let space = *Space::ALL
            .get(head[0] as usize)
            .ok_or_else(|| format!("unknown keyspace {}", head[0]))?;
        let put = match head[1] {
            0 => false,
            1 => true,
            k => return Err(format!("unknown op {k}")),
        };
        let klen = take_len(&mut buf)?;
        if klen == 0 || klen > KEY_BYTES_MAX {
            return Err(format!("key of {klen} bytes"));
        }
        let key = take(&mut buf, klen)?;
        let value = if put {
            let vlen = take_len(&mut buf)?;
            Some(take(&mut buf, vlen)?)
        } else {
            None
        };
        out.push(Op { space, key, value });
    }
    Ok(out)
}

/// A unit's ops, counted in `units`, or `None` when it is damaged: counted in `damaged`
/// and logged (nothing of it is used).
fn decode_counted<'a>(
    unit: &'a [u8],
    (units, damaged): (&mut u64, &mut u64),
) -> Option<Vec<Op<'a>>> {
    match decode(unit) {
        Ok(ops) => {
            *units += 1;
            Some(ops)
        }
        Err(e) => {
            *damaged += 1;
            tracing::warn!(error = %e, "damaged replication unit skipped");
            None
        }
    }
}

/// The client a per-client key belongs to (`None`: a retained message, or a malformed key).
pub fn client_of(space: Space, key: &[u8]) -> Option<&str> {
    if !CLIENT_SPACES.contains(&space) {
        return None;
    }
    split_client_key(key).map(|(_, id, _)| id)
}

/// A node's sessions rebuilt from its replication log: a snapshot's units, then the units
/// logged after it, applied in order; only the clients `keep` says yes to are kept.
#[derive(Debug, Default)]
pub struct Replay {
    state: BTreeMap<(Space, Vec<u8>), Vec<u8>>,
    /// Key and value bytes held.
    bytes: usize,
    /// Units applied and units refused as damaged.
    pub units: u64,
    pub damaged: u64,
}

impl Replay {
    /// Applies one unit (all of it, or nothing when it is damaged: counted and logged).
    pub fn apply(&mut self, unit: &[u8], keep: &dyn Fn(&str) -> bool) {
        let Some(ops) = decode_counted(unit, (&mut self.units, &mut self.damaged)) else {
            return;
        };
        for op in ops {
            if !client_of(op.space, op.key).is_some_and(keep) {
                continue;
            }
            let k = (op.space, op.key.to_vec());
            match op.value {
                Some(v) => {
                    self.bytes += v.len();
                    if let Some(old) = self.state.insert(k, v.to_vec()) {
                        self.bytes -= old.len();
                    } else {
                        self.bytes += op.key.len();
                    }
                }
                None => {
                    if let Some(old) = self.state.remove(&k) {
                        self.bytes -= old.len() + op.key.len();
                    }
                }
            }
        }
    }

    /// Key and value bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The sessions rebuilt, each as the records a moved session carries (its session
    /// record first). Records of a client without a session record are left out (orphans,
    /// as a load at start deletes them).
    pub fn into_clients(self) -> Vec<(String, Vec<ClientEntry>)> {
        let mut by_client: std::collections::HashMap<String, Vec<ClientEntry>> =
            std::collections::HashMap::new();
        // `Space::Sessions` sorts first: every client's session record comes first.
        for ((space, key), value) in self.state {
            let Some((prefix, id, _)) = split_client_key(&key) else {
                continue;
            };
            let rest = key[prefix.len()..].to_vec();
            if space == Space::Sessions {
                by_client
                    .entry(id.to_owned())
                    .or_default()
                    .push(ClientEntry { space, rest, value });
            } else if let Some(entries) = by_client.get_mut(id) {
                entries.push(ClientEntry { space, rest, value });
            }
        }
        let mut out: Vec<_> = by_client.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// A key's last word (its value, or `None`: deleted) and the batch that said it.
type Word = (Option<Vec<u8>>, Option<(u16, u64)>);

/// The last word on each per-client key of a run of units (the log after the point a store
/// is known to hold), with the batch that said it (`(shard, number)` from the unit's
/// [`REPLICA_BATCH_KEY`] op; `None` for a unit without one): puts and deletes, to apply to
/// a store that may lack some of them ([`Store::apply_ops`]), only where the store's own
/// batch number is lower. A damaged unit is counted, not applied.
#[derive(Clone, Debug, Default)]
pub struct LastWords {
    state: BTreeMap<(Space, Vec<u8>), Word>,
    /// The highest batch number seen per shard, and its value as stored.
    batches: BTreeMap<u16, (u64, Vec<u8>)>,
    bytes: usize,
    pub units: u64,
    pub damaged: u64,
}

impl LastWords {
    /// Takes one unit's ops on per-client keys (all of it, or nothing when it is damaged).
    pub fn apply(&mut self, unit: &[u8]) {
        let Some(ops) = decode_counted(unit, (&mut self.units, &mut self.damaged)) else {
            return;
        };
        let batch = ops
            .iter()
            .find(|op| op.space == Space::Meta && op.key == REPLICA_BATCH_KEY)
            .and_then(|op| op.value.and_then(super::batch::replica_batch_of));
        if let Some((shard, n)) = batch {
            if self.batches.get(&shard).is_none_or(|(top, _)| n > *top) {
                let value = super::batch::replica_batch_value((shard, n));
                self.batches.insert(shard, (n, value));
            }
        }
        for op in ops {
            if client_of(op.space, op.key).is_none() {
                continue;
            }
            let value = op.value.map(<[u8]>::to_vec);
            self.bytes += value.as_ref().map_or(0, Vec::len);
            match self
                .state
                .insert((op.space, op.key.to_vec()), (value, batch))
            {
                Some((old, _)) => self.bytes -= old.map_or(0, |v| v.len()),
                None => self.bytes += op.key.len(),
            }
        }
    }

    /// Key and value bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keys named.
    pub fn len(&self) -> usize {
        self.state.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// The ops a store that holds `shard`'s batches up to `held` lacks, with the client each
    /// key belongs to, in key order: every key whose last word came from a later batch of
    /// that shard (or from a unit without a number), then the store's batch number moved to
    /// the highest the log holds for `shard`. Only `owns(client)` keys are given.
    pub fn ops_after<'a>(
        &'a self,
        shard: u16,
        held: u64,
        owns: impl Fn(&str) -> bool + 'a,
    ) -> impl Iterator<Item = (Space, &'a [u8], Option<&'a [u8]>)> + 'a {
        let words = self
            .state
            .iter()
            .filter_map(move |((space, key), (value, batch))| {
                let client = client_of(*space, key)?;
                let lacked = match batch {
                    Some((s, n)) => *s != shard || *n > held,
                    None => true,
                };
                (lacked && owns(client)).then_some((*space, key.as_slice(), value.as_deref()))
            });
        let top = self
            .batches
            .get(&shard)
            .filter(|(n, _)| *n > held)
            .map(|(_, v)| (Space::Meta, REPLICA_BATCH_KEY, Some(v.as_slice())));
        words.chain(top)
    }
}

impl Store {
    /// Reads every per-client record as of now (one consistent snapshot of the engine) and
    /// hands them to `emit` in units of about `unit_bytes` (puts only). Blocking: call it
    /// off the executor. Returns the records read.
    pub fn snapshot_units(
        &self,
        unit_bytes: usize,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<(), String>,
    ) -> Result<u64, String> {
        let engine = self.engine().map_err(|e| e.to_string())?;
        let snap = engine.db.snapshot();
        let mut unit = Vec::new();
        let mut records = 0u64;
        for space in CLIENT_SPACES {
            for item in fjall::Readable::iter(&snap, engine.ks(space)) {
                let (k, v) = item.into_inner().map_err(|e| e.to_string())?;
                encode_op(&mut unit, space, &k, Some(&v));
                records += 1;
                if unit.len() >= unit_bytes {
                    emit(std::mem::take(&mut unit))?;
                }
            }
        }
        if !unit.is_empty() {
            emit(unit)?;
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_trip_and_damage_is_refused_whole() {
        let mut unit = Vec::new();
        let key = client_prefix("c1").unwrap();
        encode_op(&mut unit, Space::Sessions, &key, Some(b"rec"));
        let mut qkey = key.clone();
        qkey.extend_from_slice(&7u64.to_be_bytes());
        encode_op(&mut unit, Space::Queue, &qkey, None);
        let ops = decode(&unit).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].value, Some(&b"rec"[..]));
        assert_eq!(client_of(ops[1].space, ops[1].key), Some("c1"));
        // Cut anywhere but between two ops: refused (a unit travels with its length, so a
        // cut between ops is caught by the framing around it).
        let first_op = 2 + 4 + key.len() + 4 + 3;
        for cut in (1..unit.len()).filter(|c| *c != first_op) {
            assert!(decode(&unit[..cut]).is_err(), "cut at {cut} accepted");
        }
        assert_eq!(decode(&unit[..first_op]).unwrap().len(), 1);
        let mut bad = unit.clone();
        bad[0] = 200;
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn a_replay_keeps_the_last_word_per_key_and_only_kept_clients_with_a_session() {
        let mut r = Replay::default();
        let (a, b) = (client_prefix("a").unwrap(), client_prefix("b").unwrap());
        let q = |p: &[u8], seq: u64| {
            let mut k = p.to_vec();
            k.extend_from_slice(&seq.to_be_bytes());
            k
        };
        let mut u1 = Vec::new();
        encode_op(&mut u1, Space::Sessions, &a, Some(b"s-a"));
        encode_op(&mut u1, Space::Queue, &q(&a, 1), Some(b"m1"));
        encode_op(&mut u1, Space::Queue, &q(&a, 2), Some(b"m2"));
        encode_op(&mut u1, Space::Sessions, &b, Some(b"s-b"));
        // A queue record of a client with no session record: an orphan.
        encode_op(
            &mut u1,
            Space::Queue,
            &q(&client_prefix("z").unwrap(), 1),
            Some(b"x"),
        );
        let mut u2 = Vec::new();
        encode_op(&mut u2, Space::Queue, &q(&a, 1), None);
        let keep = |c: &str| c != "b";
        r.apply(&u1, &keep);
        r.apply(&u2, &keep);
        r.apply(b"\x09junk", &keep);
        assert_eq!((r.units, r.damaged), (2, 1));
        let clients = r.into_clients();
        assert_eq!(clients.len(), 1);
        let (id, entries) = &clients[0];
        assert_eq!(id, "a");
        assert_eq!(entries[0].space, Space::Sessions);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].value, b"m2");
    }
}
