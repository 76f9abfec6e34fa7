//! Retained messages: topic name -> last retained message, in a tree of levels so that a
//! wildcard subscription finds its matches without scanning every topic.

use hashbrown::HashMap;

use super::message::SharedMessage;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<SharedMessage>,
}

/// The retained messages one shard holds.
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: Node,
    len: usize,
}

impl RetainedStore {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the retained message of its topic (returns the one replaced).
    pub fn set(&mut self, msg: SharedMessage) -> Option<SharedMessage> {
        let mut node = &mut self.root;
        for level in msg.topic.as_str().split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let old = node.message.replace(msg);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Deletes the retained message of `topic` (a publish with an empty payload).
    pub fn remove(&mut self, topic: &str) -> Option<SharedMessage> {
        let levels: Vec<&str> = topic.split('/').collect();
        let old = remove_rec(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn get(&self, topic: &str) -> Option<&SharedMessage> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Every retained message whose topic matches `filter` (the matching part of a filter).
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&SharedMessage)) {
        let levels: Vec<&str> = filter.split('/').collect();
        match_rec(&self.root, &levels, 0, &mut f);
    }

    /// Every retained message but the `$` topics (what `#` matches).
    pub fn for_each(&self, mut f: impl FnMut(&SharedMessage)) {
        all_rec(&self.root, 0, true, &mut f);
    }

    /// Every retained message, `$` topics included.
    pub fn for_each_any(&self, mut f: impl FnMut(&SharedMessage)) {
        fn walk(node: &Node, f: &mut impl FnMut(&SharedMessage)) {
            if let Some(m) = &node.message {
                f(m);
            }
            for child in node.children.values() {
                walk(child, f);
            }
        }
        walk(&self.root, &mut f);
    }
}

fn remove_rec(node: &mut Node, levels: &[&str]) -> Option<SharedMessage> {
    match levels.split_first() {
        None => node.message.take(),
        Some((first, rest)) => {
            let child = node.children.get_mut(*first)?;
            let v = remove_rec(child, rest);
            if child.message.is_none() && child.children.is_empty() {
                node.children.remove(*first);
            }
            v
        }
    }
}

fn match_rec(node: &Node, filter: &[&str], depth: usize, f: &mut impl FnMut(&SharedMessage)) {
    let Some((level, rest)) = filter.split_first() else {
        if let Some(m) = &node.message {
            f(m);
        }
        return;
    };
    match *level {
        "#" => all_rec(node, depth, true, f),
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                match_rec(child, rest, depth + 1, f);
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                match_rec(child, rest, depth + 1, f);
            }
        }
    }
}

/// `node` itself and everything below it; `#` also matches its parent level.
fn all_rec(node: &Node, depth: usize, include_self: bool, f: &mut impl FnMut(&SharedMessage)) {
    if include_self {
        if let Some(m) = &node.message {
            // A `#` at the first level does not match `$` topics; the root has no message.
            f(m);
        }
    }
    for (name, child) in &node.children {
        if depth == 0 && name.starts_with('$') {
            continue;
        }
        all_rec(child, depth + 1, true, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use shardmq_protocol::{topic_matches, PublishProperties, QoS, TopicName};
    use std::sync::Arc;
    use std::time::Instant;

    fn msg(topic: &str) -> SharedMessage {
        Arc::new(Message {
            topic: TopicName::new(topic).unwrap(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            origin: None,
            qos2_id: None,
            created: Instant::now(),
            groups: None,
        })
    }

    #[test]
    fn wildcard_lookups_agree_with_the_matcher() {
        let topics = ["a", "a/b", "a/b/c", "/x", "$SYS/x", "b/b", "a//b", "/"];
        let mut s = RetainedStore::default();
        for t in topics {
            s.set(msg(t));
        }
        assert_eq!(s.len(), topics.len());
        for filter in [
            "#", "+", "a/#", "+/b", "$SYS/#", "+/+", "/+", "a/+/c", "a//b", "a",
        ] {
            let mut got: Vec<String> = Vec::new();
            s.for_each_match(filter, |m| got.push(m.topic.to_string()));
            got.sort();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| topic_matches(filter, t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "filter {filter}");
        }
        assert!(s.remove("a/b").is_some());
        assert!(s.get("a/b/c").is_some());
        assert_eq!(s.len(), topics.len() - 1);
    }
}
