//! A session's subscriptions by filter, in as little memory as the common case allows: most
//! sessions hold a handful, kept in a vector sized to fit (no hash table of at least four
//! slots for one entry, no second copy of each filter as its key); a session holding more
//! than [`SMALL_MAX`] gets a hash table.

use hashbrown::HashMap;

use crate::state::Subscription;

/// Subscriptions kept in the vector, searched linearly; beyond it, a hash table.
pub const SMALL_MAX: usize = 8;

/// A session's subscriptions, by filter.
#[derive(Clone, Debug, Default)]
pub struct Subscriptions {
    small: Vec<Subscription>,
    /// Every subscription, once there are more than [`SMALL_MAX`] (then `small` is empty).
    large: Option<Box<HashMap<Box<str>, Subscription>>>,
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.large.as_ref().map_or(self.small.len(), |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, filter: &str) -> Option<&Subscription> {
        match &self.large {
            Some(m) => m.get(filter),
            None => self.small.iter().find(|s| s.filter.as_str() == filter),
        }
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.get(filter).is_some()
    }

    /// Adds `sub` under its filter, returning the subscription it replaced.
    pub fn insert(&mut self, sub: Subscription) -> Option<Subscription> {
        if let Some(m) = &mut self.large {
            return m.insert(sub.filter.as_str().into(), sub);
        }
        if let Some(old) = self
            .small
            .iter_mut()
            .find(|s| s.filter.as_str() == sub.filter.as_str())
        {
            return Some(std::mem::replace(old, sub));
        }
        if self.small.len() < SMALL_MAX {
            // Grown one at a time: a session's few subscriptions take no spare slots.
            self.small.reserve_exact(1);
            self.small.push(sub);
            return None;
        }
        let mut m: HashMap<Box<str>, Subscription> = HashMap::with_capacity(SMALL_MAX * 2);
        for s in self.small.drain(..).chain(std::iter::once(sub)) {
            m.insert(s.filter.as_str().into(), s);
        }
        self.small = Vec::new();
        self.large = Some(Box::new(m));
        None
    }

    pub fn remove(&mut self, filter: &str) -> Option<Subscription> {
        match &mut self.large {
            Some(m) => m.remove(filter),
            None => {
                let i = self
                    .small
                    .iter()
                    .position(|s| s.filter.as_str() == filter)?;
                let sub = self.small.swap_remove(i);
                self.small.shrink_to_fit();
                Some(sub)
            }
        }
    }

    pub fn values(&self) -> Values<'_> {
        match &self.large {
            Some(m) => Values::Large(m.values()),
            None => Values::Small(self.small.iter()),
        }
    }
}

/// The subscriptions of a [`Subscriptions`], in no particular order.
#[derive(Debug)]
pub enum Values<'a> {
    Small(std::slice::Iter<'a, Subscription>),
    Large(hashbrown::hash_map::Values<'a, Box<str>, Subscription>),
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a Subscription;

    fn next(&mut self) -> Option<&'a Subscription> {
        match self {
            Values::Small(i) => i.next(),
            Values::Large(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_protocol::{QoS, SubscriptionOptions, TopicFilter};

    fn sub(f: &str, qos: QoS) -> Subscription {
        Subscription {
            filter: TopicFilter::new(f).unwrap(),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
            id: None,
        }
    }

    #[test]
    fn insert_replace_remove_across_the_switch_to_a_hash_table() {
        let mut s = Subscriptions::default();
        for n in 0..SMALL_MAX + 4 {
            assert!(s.insert(sub(&format!("t/{n}"), QoS::AtMostOnce)).is_none());
            assert_eq!(s.len(), n + 1);
            // Replacing keeps one entry per filter, on either side of the switch.
            let old = s.insert(sub(&format!("t/{n}"), QoS::AtLeastOnce)).unwrap();
            assert_eq!(old.options.qos, QoS::AtMostOnce);
            assert_eq!(s.len(), n + 1);
        }
        assert!(s.large.is_some() && s.small.is_empty());
        for n in 0..SMALL_MAX + 4 {
            let f = format!("t/{n}");
            assert_eq!(s.get(&f).unwrap().options.qos, QoS::AtLeastOnce);
            assert!(s.contains_key(&f));
        }
        assert_eq!(s.values().count(), SMALL_MAX + 4);
        assert!(s.remove("t/3").is_some());
        assert!(s.remove("t/3").is_none());
        assert!(!s.contains_key("t/3"));
        assert_eq!(s.len(), SMALL_MAX + 3);
    }

    #[test]
    fn a_few_subscriptions_take_exactly_their_room() {
        let mut s = Subscriptions::default();
        s.insert(sub("a", QoS::AtMostOnce));
        s.insert(sub("b/+", QoS::AtMostOnce));
        assert_eq!(s.small.capacity(), 2);
        assert_eq!(s.remove("a").unwrap().filter.as_str(), "a");
        assert_eq!(s.small.capacity(), 1);
        let mut f: Vec<_> = s.values().map(|x| x.filter.as_str().to_string()).collect();
        f.sort();
        assert_eq!(f, ["b/+"]);
        assert!(s.remove("zz").is_none());
        assert!(s.remove("b/+").is_some());
        assert!(s.is_empty());
    }
}
