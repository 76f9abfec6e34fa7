//! A set of shard indexes as a fixed bitmap: the value of the routing index, copied on every
//! match, so it must be small and allocation-free.

use crate::config::MAX_SHARDS;

const WORDS: usize = MAX_SHARDS / 64;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardSet([u64; WORDS]);

impl ShardSet {
    pub fn insert(&mut self, shard: usize) {
        debug_assert!(shard < MAX_SHARDS);
        self.0[shard / 64] |= 1 << (shard % 64);
    }

    pub fn remove(&mut self, shard: usize) {
        self.0[shard / 64] &= !(1 << (shard % 64));
    }

    pub fn contains(&self, shard: usize) -> bool {
        self.0[shard / 64] & (1 << (shard % 64)) != 0
    }

    pub fn union_with(&mut self, other: &ShardSet) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a |= b;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The members, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let mut a = ShardSet::default();
        assert!(a.is_empty());
        for s in [0, 5, 63, 64, 200, 255] {
            a.insert(s);
        }
        assert!(a.contains(200) && !a.contains(1));
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 5, 63, 64, 200, 255]);
        a.remove(64);
        let mut b = ShardSet::default();
        b.insert(1);
        b.union_with(&a);
        assert_eq!(b.iter().count(), 6);
    }
}
