//! The slot table: which node owns the sessions of each of the 4,096 slots a client id
//! hashes to (`slot_of`), kept in etcd under `<prefix>/slots` and changed only by
//! compare-and-swap. Each range carries the epoch at which it got its owner, so a message
//! stamped with an older epoch can be told apart from one of the current owner.

use serde::{Deserialize, Serialize};

use crate::session::ownership::stable_hash;

/// How many slots the client ids hash to.
pub const SLOTS: u16 = 4096;

/// The slot of a client id: the same stable hash the shards use, modulo [`SLOTS`].
pub fn slot_of(client_id: &[u8]) -> u16 {
    (stable_hash(client_id) % SLOTS as u64) as u16
}

/// A run of slots `first..=last` owned by `node` since `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub node: String,
    pub epoch: u64,
}

/// The whole table: ranges sorted by `first`, together covering every slot exactly once.
/// `epoch` is the table's version, the highest epoch of its ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTable {
    pub epoch: u64,
    pub ranges: Vec<SlotRange>,
}

impl SlotTable {
    /// The table of a new cluster: every slot owned by its first node, at epoch 1.
    pub fn initial(node: &str) -> SlotTable {
        SlotTable {
            epoch: 1,
            ranges: vec![SlotRange {
                first: 0,
                last: SLOTS - 1,
                node: node.to_string(),
                epoch: 1,
            }],
        }
    }

    /// Decodes and checks a table read from etcd (anyone with write access to etcd can
    /// put anything there): sorted, no gap, no overlap, every slot covered, epochs within
    /// the table's.
    pub fn decode(bytes: &[u8]) -> Result<SlotTable, String> {
        let t: SlotTable =
            serde_json::from_slice(bytes).map_err(|e| format!("not a slot table: {e}"))?;
        let mut next: u32 = 0;
        for r in &t.ranges {
            if r.first as u32 != next || r.last < r.first || r.last >= SLOTS {
                return Err(format!(
                    "slot range {}..={} does not follow slot {next}",
                    r.first, r.last
                ));
            }
            if r.epoch > t.epoch || r.epoch == 0 {
                return Err(format!(
                    "slot range {}..={} has epoch {} outside 1..={}",
                    r.first, r.last, r.epoch, t.epoch
                ));
            }
            crate::config::check_node_id(&r.node)?;
            next = r.last as u32 + 1;
        }
        if next != SLOTS as u32 {
            return Err(format!("slots {next}..{SLOTS} have no owner"));
        }
        Ok(t)
    }

    /// The table as stored.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The owner of `slot` and the epoch it has owned it since.
    pub fn owner(&self, slot: u16) -> Option<(&str, u64)> {
        let i = self.ranges.partition_point(|r| r.last < slot);
        self.ranges
            .get(i)
            .filter(|r| r.first <= slot)
            .map(|r| (r.node.as_str(), r.epoch))
    }

    /// Slots owned per node.
    pub fn counts(&self) -> hashbrown::HashMap<&str, u32> {
        let mut m = hashbrown::HashMap::new();
        for r in &self.ranges {
            *m.entry(r.node.as_str()).or_insert(0) += (r.last - r.first) as u32 + 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_table_gives_every_slot_to_the_first_node() {
        let t = SlotTable::initial("a");
        assert_eq!(t.owner(0), Some(("a", 1)));
        assert_eq!(t.owner(SLOTS - 1), Some(("a", 1)));
        assert_eq!(t.counts().get("a"), Some(&4096));
        assert_eq!(SlotTable::decode(t.encode().as_bytes()), Ok(t));
    }

    #[test]
    fn owners_are_found_by_range() {
        let t = SlotTable {
            epoch: 3,
            ranges: vec![
                SlotRange {
                    first: 0,
                    last: 9,
                    node: "a".into(),
                    epoch: 1,
                },
                SlotRange {
                    first: 10,
                    last: 10,
                    node: "b".into(),
                    epoch: 3,
                },
                SlotRange {
                    first: 11,
                    last: SLOTS - 1,
                    node: "a".into(),
                    epoch: 2,
                },
            ],
        };
        assert_eq!(SlotTable::decode(t.encode().as_bytes()).as_ref(), Ok(&t));
        assert_eq!(t.owner(9), Some(("a", 1)));
        assert_eq!(t.owner(10), Some(("b", 3)));
        assert_eq!(t.owner(11), Some(("a", 2)));
        assert_eq!(t.counts().get("a"), Some(&4095));
        assert_eq!(t.counts().get("b"), Some(&1));
    }

    #[test]
    fn a_damaged_table_is_refused() {
        let gap = r#"{"epoch":1,"ranges":[{"first":0,"last":9,"node":"a","epoch":1},{"first":11,"last":4095,"node":"a","epoch":1}]}"#;
        assert!(SlotTable::decode(gap.as_bytes()).is_err());
        let short = r#"{"epoch":1,"ranges":[{"first":0,"last":9,"node":"a","epoch":1}]}"#;
        assert!(SlotTable::decode(short.as_bytes()).is_err());
        let future = r#"{"epoch":1,"ranges":[{"first":0,"last":4095,"node":"a","epoch":2}]}"#;
        assert!(SlotTable::decode(future.as_bytes()).is_err());
        let bad_node = r#"{"epoch":1,"ranges":[{"first":0,"last":4095,"node":"a/b","epoch":1}]}"#;
        assert!(SlotTable::decode(bad_node.as_bytes()).is_err());
        let past_end = r#"{"epoch":1,"ranges":[{"first":0,"last":4096,"node":"a","epoch":1}]}"#;
        assert!(SlotTable::decode(past_end.as_bytes()).is_err());
        assert!(SlotTable::decode(b"[]").is_err());
    }

    #[test]
    fn slots_spread_client_ids() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            seen.insert(slot_of(format!("client-{i}").as_bytes()));
        }
        assert!(seen.len() > 1500, "{} distinct slots", seen.len());
        assert_eq!(slot_of(b"a"), (0xaf63dc4c8601ec8c_u64 % 4096) as u16);
    }
}
