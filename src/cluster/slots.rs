//! The slot table: which node owns the sessions of each of the 4,096 slots a client id
//! hashes to (`slot_of`), kept in etcd under `<prefix>/slots` and changed only by
//! compare-and-swap. Each range carries the epoch at which it got its owner, so a message
//! stamped with an older epoch can be told apart from one of the current owner.

use serde::{Deserialize, Serialize};

pub use crate::session::ownership::{slot_of, SLOTS};

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
        if t.epoch >= u64::MAX / 2 {
            return Err(format!("epoch {} out of range", t.epoch));
        }
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

impl SlotTable {
    /// The owner of each slot, with its epoch.
    fn expand(&self) -> Vec<(&str, u64)> {
        let mut v = Vec::with_capacity(SLOTS as usize);
        for r in &self.ranges {
            for _ in r.first..=r.last {
                v.push((r.node.as_str(), r.epoch));
            }
        }
        v
    }

    /// What `me` gives away to even the shares out: its own slots, highest first, to the
    /// live member with the fewest, while `me` holds more than its fair share (the
    /// ceiling of an even split among `live`) and that member less than the floor.
    pub fn plan_give(&self, me: &str, live: &[String]) -> Option<(String, Vec<u16>)> {
        if live.len() < 2 || !live.iter().any(|l| l == me) {
            return None;
        }
        let counts = self.counts();
        let n = live.len() as u32;
        let (floor, ceil) = (SLOTS as u32 / n, (SLOTS as u32).div_ceil(n));
        let mine = counts.get(me).copied().unwrap_or(0);
        let (to, theirs) = live
            .iter()
            .filter(|l| *l != me)
            .map(|l| (l, counts.get(l.as_str()).copied().unwrap_or(0)))
            .min_by_key(|(l, c)| (*c, (*l).clone()))?;
        if mine <= ceil || theirs >= floor {
            return None;
        }
        let k = (mine - ceil).min(floor - theirs) as usize;
        let give: Vec<u16> = self
            .expand()
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, (o, _))| *o == me)
            .take(k)
            .map(|(i, _)| i as u16)
            .collect();
        (!give.is_empty()).then(|| (to.clone(), give))
    }

    /// This table with every slot of `gone` spread evenly over `to` (in turn, the member
    /// with the fewest first), at a new epoch; `None` when `gone` owns nothing or `to` is
    /// empty.
    pub fn without(&self, gone: &str, to: &[String]) -> Option<SlotTable> {
        if to.is_empty() || to.iter().any(|t| t == gone) {
            return None;
        }
        let owners = self.expand();
        let theirs: Vec<u16> = owners
            .iter()
            .enumerate()
            .filter(|(_, (o, _))| *o == gone)
            .map(|(i, _)| i as u16)
            .collect();
        if theirs.is_empty() {
            return None;
        }
        let mut counts: Vec<(u32, &String)> = to
            .iter()
            .map(|t| (self.counts().get(t.as_str()).copied().unwrap_or(0), t))
            .collect();
        let mut table = self.clone();
        for chunk in theirs.chunks(theirs.len().div_ceil(to.len())) {
            counts.sort();
            let (c, t) = counts[0];
            table = table.with_owner(chunk, t);
            counts[0] = (c + chunk.len() as u32, t);
        }
        // One change of owner: every moved range at the same new epoch.
        let epoch = self.epoch + 1;
        for r in &mut table.ranges {
            if r.epoch > self.epoch {
                r.epoch = epoch;
            }
        }
        table.epoch = epoch;
        Some(table.merged())
    }

    /// Adjacent ranges with one owner and epoch joined.
    fn merged(mut self) -> SlotTable {
        let mut out: Vec<SlotRange> = Vec::with_capacity(self.ranges.len());
        for r in self.ranges.drain(..) {
            match out.last_mut() {
                Some(l) if l.node == r.node && l.epoch == r.epoch && l.last + 1 == r.first => {
                    l.last = r.last
                }
                _ => out.push(r),
            }
        }
        self.ranges = out;
        self
    }

    /// This table with `slots` owned by `node` at a new epoch (one above the table's).
    pub fn with_owner(&self, slots: &[u16], node: &str) -> SlotTable {
        let epoch = self.epoch + 1;
        let mut owners: Vec<(String, u64)> = self
            .expand()
            .into_iter()
            .map(|(o, e)| (o.to_string(), e))
            .collect();
        for &s in slots {
            if let Some(x) = owners.get_mut(s as usize) {
                *x = (node.to_string(), epoch);
            }
        }
        let mut ranges: Vec<SlotRange> = Vec::new();
        for (i, (node, e)) in owners.into_iter().enumerate() {
            match ranges.last_mut() {
                Some(r) if r.node == node && r.epoch == e && r.last as usize + 1 == i => {
                    r.last = i as u16
                }
                _ => ranges.push(SlotRange {
                    first: i as u16,
                    last: i as u16,
                    node,
                    epoch: e,
                }),
            }
        }
        SlotTable { epoch, ranges }
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
        let huge = r#"{"epoch":18446744073709551615,"ranges":[{"first":0,"last":4095,"node":"a","epoch":18446744073709551615}]}"#;
        assert!(SlotTable::decode(huge.as_bytes()).is_err());
    }

    #[test]
    fn shares_even_out_one_step_at_a_time() {
        let live = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = SlotTable::initial("a");
        assert_eq!(t.plan_give("a", &live(&["a"])), None);
        // b joins: a gives it half, its highest slots.
        let (to, give) = t.plan_give("a", &live(&["a", "b"])).unwrap();
        assert_eq!(to, "b");
        assert_eq!(give.len(), 2048);
        assert!(give.iter().all(|&s| s >= 2048));
        let t2 = t.with_owner(&give, "b");
        assert_eq!(SlotTable::decode(t2.encode().as_bytes()).as_ref(), Ok(&t2));
        assert_eq!(t2.epoch, 2);
        assert_eq!(t2.ranges.len(), 2);
        assert_eq!(t2.owner(4095), Some(("b", 2)));
        assert_eq!(t2.owner(0), Some(("a", 1)));
        // Balanced: nothing more; b gives nothing to a.
        assert_eq!(t2.plan_give("a", &live(&["a", "b"])), None);
        assert_eq!(t2.plan_give("b", &live(&["a", "b"])), None);
        // c joins: a and b each give it a share, and then all three are within two slots.
        let (to, give) = t2.plan_give("a", &live(&["a", "b", "c"])).unwrap();
        assert_eq!(to, "c");
        let t3 = t2.with_owner(&give, "c");
        let (to, give) = t3.plan_give("b", &live(&["a", "b", "c"])).unwrap();
        assert_eq!(to, "c");
        let t4 = t3.with_owner(&give, "c");
        assert_eq!(SlotTable::decode(t4.encode().as_bytes()).as_ref(), Ok(&t4));
        let c = t4.counts();
        let (a, b, cc) = (c["a"], c["b"], c["c"]);
        assert_eq!(a + b + cc, 4096);
        assert!(a.abs_diff(cc) <= 2 && b.abs_diff(cc) <= 2, "{a} {b} {cc}");
        for me in ["a", "b", "c"] {
            assert_eq!(t4.plan_give(me, &live(&["a", "b", "c"])), None);
        }
        // A node that is not live gets nothing; a node not in the live list gives nothing.
        assert_eq!(t.plan_give("z", &live(&["a", "b"])), None);
    }

    #[test]
    fn a_dead_nodes_slots_are_spread_over_the_survivors() {
        let live = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = SlotTable::initial("a");
        let (_, give) = t.plan_give("a", &live(&["a", "b"])).unwrap();
        let t = t.with_owner(&give, "b");
        let (_, give) = t.plan_give("a", &live(&["a", "b", "c"])).unwrap();
        let t = t.with_owner(&give, "c");
        let (_, give) = t.plan_give("b", &live(&["a", "b", "c"])).unwrap();
        let t = t.with_owner(&give, "c");
        let c_had = t.counts()["c"];
        let after = t.without("c", &live(&["a", "b"])).unwrap();
        assert_eq!(
            SlotTable::decode(after.encode().as_bytes()).as_ref(),
            Ok(&after)
        );
        assert_eq!(after.epoch, t.epoch + 1);
        let n = after.counts();
        assert!(!n.contains_key("c"));
        assert_eq!(n["a"] + n["b"], 4096);
        assert!(n["a"].abs_diff(n["b"]) <= 2, "{n:?}");
        assert!(n["a"] > t.counts()["a"] && n["b"] > t.counts()["b"]);
        assert!(c_had > 0);
        // Every moved slot carries the new epoch; the others keep theirs.
        for s in 0..SLOTS {
            let (o_before, e_before) = t.owner(s).unwrap();
            let (_, e_after) = after.owner(s).unwrap();
            if o_before == "c" {
                assert_eq!(e_after, after.epoch);
            } else {
                assert_eq!(e_after, e_before);
            }
        }
        // Nothing to do, or nobody to take it.
        assert_eq!(after.without("c", &live(&["a", "b"])), None);
        assert_eq!(t.without("c", &live(&[])), None);
        assert_eq!(t.without("c", &live(&["a", "c"])), None);
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
