//! A tree of topic filters, one node per level, for matching a topic name against many
//! filters in time proportional to the topic's depth rather than the number of filters.
//! Used for the shard's own subscriptions and for the cross-shard routing index.

use hashbrown::HashMap;

#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

/// Topic filter -> `V`. Filters are the matching part (no `$share/` prefix) and valid.
#[derive(Debug)]
pub struct TopicTrie<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for TopicTrie<V> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: Default> TopicTrie<V> {
    /// The value of `filter`, created empty if absent.
    pub fn entry(&mut self, filter: &str) -> &mut V {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.value.is_none() {
            self.len += 1;
        }
        node.value.get_or_insert_with(V::default)
    }
}

impl<V> TopicTrie<V> {
    /// Number of filters with a value.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, filter: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    pub fn get_mut(&mut self, filter: &str) -> Option<&mut V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.get_mut(level)?;
        }
        node.value.as_mut()
    }

    /// Removes the value of `filter` and prunes nodes left without values or children.
    pub fn remove(&mut self, filter: &str) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_rec(&mut self.root, &levels);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with the value of every filter that matches `topic` (section 4.7, the `$`
    /// rule included). Each matching filter is visited once.
    pub fn for_each_match<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a V)) {
        // The levels as a cloneable iterator, not a collected Vec: no allocation per publish.
        let system = topic.starts_with('$');
        match_rec(&self.root, topic.split('/'), 0, system, &mut f);
    }

    /// Every (filter, value), for admin listings.
    pub fn for_each(&self, mut f: impl FnMut(&str, &V)) {
        let mut path = String::new();
        walk_rec(&self.root, &mut path, true, &mut f);
    }
}

fn remove_rec<V>(node: &mut Node<V>, levels: &[&str]) -> Option<V> {
    match levels.split_first() {
        None => node.value.take(),
        Some((first, rest)) => {
            let child = node.children.get_mut(*first)?;
            let v = remove_rec(child, rest);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(*first);
            }
            v
        }
    }
}

fn match_rec<'a, V>(
    node: &'a Node<V>,
    mut levels: std::str::Split<'_, char>,
    depth: usize,
    system: bool,
    f: &mut impl FnMut(&'a V),
) {
    // Wildcards at the first level do not match `$` topics (MQTT-4.7.2-1).
    let wild_ok = !(depth == 0 && system);
    if wild_ok {
        if let Some(v) = node.children.get("#").and_then(|n| n.value.as_ref()) {
            f(v);
        }
    }
    let Some(level) = levels.next() else {
        if let Some(v) = &node.value {
            f(v);
        }
        return;
    };
    if wild_ok {
        if let Some(plus) = node.children.get("+") {
            match_rec(plus, levels.clone(), depth + 1, system, f);
        }
    }
    if let Some(child) = node.children.get(level) {
        match_rec(child, levels, depth + 1, system, f);
    }
}

fn walk_rec<V>(node: &Node<V>, path: &mut String, root: bool, f: &mut impl FnMut(&str, &V)) {
    if let Some(v) = &node.value {
        f(path, v);
    }
    for (level, child) in &node.children {
        let len = path.len();
        if !root {
            path.push('/');
        }
        path.push_str(level);
        walk_rec(child, path, false, f);
        path.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmq_protocol::topic_matches;

    fn matches(t: &TopicTrie<Vec<&'static str>>, topic: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        t.for_each_match(topic, |v| out.extend(v.iter().copied()));
        out.sort();
        out
    }

    #[test]
    fn agrees_with_the_reference_matcher() {
        let filters = [
            "#", "+", "+/+", "a/#", "a/+", "a/b", "a/b/#", "a/+/c", "/+", "$SYS/#", "+/b", "a//b",
            "a/b/c",
        ];
        let mut t: TopicTrie<Vec<&'static str>> = TopicTrie::default();
        for f in filters {
            t.entry(f).push(f);
        }
        for topic in [
            "a", "a/b", "a/b/c", "/x", "$SYS/x", "$SYS", "a//b", "b", "x/b", "a/x/c", "/", "",
        ] {
            let mut want: Vec<&str> = filters
                .iter()
                .copied()
                .filter(|f| topic_matches(f, topic))
                .collect();
            want.sort();
            assert_eq!(matches(&t, topic), want, "topic {topic:?}");
        }
    }

    /// MQTT-4.7.2-1: `#` and `+` at the first level do not match topics starting with `$`.
    #[test]
    fn wildcards_at_the_first_level_skip_sys_topics() {
        let mut t: TopicTrie<Vec<&'static str>> = TopicTrie::default();
        for f in ["#", "+/broker/uptime", "+/+/+", "$SYS/#", "$SYS/+/uptime"] {
            t.entry(f).push(f);
        }
        assert_eq!(
            matches(&t, "$SYS/broker/uptime"),
            vec!["$SYS/#", "$SYS/+/uptime"]
        );
        assert_eq!(
            matches(&t, "SYS/broker/uptime"),
            vec!["#", "+/+/+", "+/broker/uptime"]
        );
    }

    #[test]
    fn remove_prunes() {
        let mut t: TopicTrie<u32> = TopicTrie::default();
        *t.entry("a/b/c") += 1;
        *t.entry("a/b") += 1;
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove("a/b/c"), Some(1));
        assert_eq!(t.get("a/b"), Some(&1));
        assert_eq!(t.remove("a/b"), Some(1));
        assert!(t.root.children.is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn for_each_lists_filters() {
        let mut t: TopicTrie<u32> = TopicTrie::default();
        for f in ["a/b", "#", "/x"] {
            *t.entry(f) = 1;
        }
        let mut seen = Vec::new();
        t.for_each(|f, _| seen.push(f.to_string()));
        seen.sort();
        assert_eq!(seen, vec!["#", "/x", "a/b"]);
    }
}
