//! This shard's side of a cluster (`src/cluster/` is the other side, on its own thread).
//!
//! The shard tells the cluster thread ([`ToCluster`]) which topic filters it has
//! subscribers of, hands it the messages that other nodes want, and answers for the
//! messages other nodes sent here once they are durable. The cluster thread tells the shard
//! ([`FromCluster`], posted through `shards::Control::post`) which filters each other node
//! wants, which nodes are members, the answers to what it forwarded, and the messages other
//! nodes forwarded.
//!
//! Other nodes are numbered by the cluster thread (`NodeIx`, below [`NODES_MAX`]), so that
//! the filter -> nodes index is the same structure as the filter -> shards one
//! ([`RoutingIndex`]). A message from another node is routed inside this node only, never
//! forwarded again.

use super::*;

/// The most nodes a cluster has (their indices share the shard bitmap).
pub const NODES_MAX: usize = crate::config::MAX_SHARDS;

/// Another node, as numbered by the cluster thread for this run.
pub type NodeIx = u16;

/// A shard (by index) and one of its round trips.
pub type Reply = (u16, Token);

/// What a shard hands to the cluster thread.
#[derive(Debug)]
pub enum ToCluster {
    /// Send `msg` to `nodes`; with `ack`, answer that round trip once per node, when the
    /// node has stored it (or could not be reached).
    Publish {
        msg: SharedMessage,
        nodes: ShardSet,
        ack: Option<Reply>,
    },
    /// This shard has (`add`) or no longer has subscribers of `filter`; with `ack`, answer
    /// once every live node applied it (a SUBACK waits for that).
    Route {
        filter: Arc<str>,
        add: bool,
        ack: Option<Reply>,
    },
    /// The message `id` that `node` sent here is handled: stored (`ok`) or not.
    Done {
        node: NodeIx,
        id: u64,
        ok: bool,
        fate: Fate,
    },
}

/// What the cluster thread posts to a shard.
#[derive(Clone, Debug)]
pub enum FromCluster {
    /// A message another node routed here; with `id`, answer it ([`ToCluster::Done`]).
    Publish {
        node: NodeIx,
        id: Option<u64>,
        msg: SharedMessage,
    },
    /// An answer to one of this shard's round trips.
    Ack { token: Token, ok: bool, fate: Fate },
    /// `node` has (`add`) or no longer has subscribers of `filter`.
    Route {
        node: NodeIx,
        filter: Arc<str>,
        add: bool,
    },
    /// Forget every filter of `node` (its full set follows when its link is back).
    ClearRoutes { node: NodeIx },
    /// The nodes that are members now (retained messages go to each of them).
    Members(ShardSet),
}

/// The channels to the cluster thread: `data` (bounded: publishes) and `control`
/// (routes and answers, which must not be lost; as many as filters and messages under way).
#[derive(Clone, Debug)]
pub struct ClusterLink {
    pub data: tokio::sync::mpsc::Sender<ToCluster>,
    pub control: tokio::sync::mpsc::UnboundedSender<ToCluster>,
}

/// The shard's cluster state.
#[derive(Debug)]
pub(super) struct ClusterPort {
    link: ClusterLink,
    /// Filter -> the other nodes with subscribers of it.
    routes: RoutingIndex,
    /// Per node, its filters (to forget them all at once).
    by_node: HashMap<NodeIx, hashbrown::HashSet<Arc<str>>>,
    members: ShardSet,
}

impl ClusterPort {
    pub(super) fn new(link: ClusterLink) -> ClusterPort {
        ClusterPort {
            link,
            routes: RoutingIndex::default(),
            by_node: HashMap::new(),
            members: ShardSet::default(),
        }
    }

    fn set_route(&mut self, node: NodeIx, filter: Arc<str>, add: bool) {
        if (node as usize) >= NODES_MAX {
            return;
        }
        let filters = self.by_node.entry(node).or_default();
        let changed = if add {
            filters.insert(filter.clone())
        } else {
            filters.remove(&filter)
        };
        if changed {
            self.routes.set(&filter, node as usize, add);
        }
    }

    fn clear_routes(&mut self, node: NodeIx) {
        if let Some(filters) = self.by_node.remove(&node) {
            for f in filters {
                self.routes.set(&f, node as usize, false);
            }
        }
    }
}

/// What routing a message did (see [`Core::route`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Routed {
    /// Some subscriber (here or on another node) matched.
    pub matched: bool,
    /// Answers to expect (other shards, other nodes).
    pub remote: usize,
    /// What this shard's sessions did with it.
    pub fate: Fate,
    /// A node it had to reach could not be handed the message (the cluster thread's queue
    /// is full): the acknowledgement must say it was not stored.
    pub failed: bool,
}

impl Core {
    /// Makes this shard a cluster node's shard.
    pub fn attach_cluster(&mut self, link: ClusterLink) {
        self.cluster = Some(ClusterPort::new(link));
    }

    /// Hands `msg` to the cluster thread for the other nodes that want it (and, retained,
    /// for every member); counts the answers to expect.
    pub(super) fn forward_to_nodes(
        &mut self,
        msg: &SharedMessage,
        reply: Option<Token>,
        r: &mut Routed,
    ) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let mut nodes = c.routes.targets(&msg.topic);
        r.matched |= !nodes.is_empty();
        if msg.retain {
            nodes.union_with(&c.members);
        }
        if nodes.is_empty() {
            return;
        }
        let n = nodes.iter().count();
        let ack = reply.map(|t| (self.id as u16, t));
        // The QoS 2 dedup key stays on this node: its release does not travel yet, and a
        // key that is never released would be held for ever over there.
        let msg = if msg.qos2_id.is_some() {
            Arc::new(Message {
                qos2_id: None,
                ..(**msg).clone()
            })
        } else {
            msg.clone()
        };
        match c.link.data.try_send(ToCluster::Publish { msg, nodes, ack }) {
            Ok(()) => {
                self.stats.cluster_forwarded += 1;
                if ack.is_some() {
                    r.remote += n;
                }
            }
            Err(_) => {
                self.stats.cluster_forward_dropped += 1;
                r.failed |= ack.is_some();
            }
        }
    }

    /// Tells the other nodes (through the cluster thread) that this shard has or no
    /// longer has subscribers of `filter`; returns the answers to expect (0 or 1).
    pub(super) fn announce_route(
        &mut self,
        filter: &Arc<str>,
        add: bool,
        reply: Option<Token>,
    ) -> usize {
        let Some(c) = &self.cluster else {
            return 0;
        };
        let ack = reply.map(|t| (self.id as u16, t));
        let sent = c
            .link
            .control
            .send(ToCluster::Route {
                filter: filter.clone(),
                add,
                ack,
            })
            .is_ok();
        usize::from(sent && ack.is_some())
    }

    /// What the cluster thread posted.
    pub fn on_cluster(&mut self, m: FromCluster, now: Instant) {
        match m {
            FromCluster::Publish { node, id, msg } => self.on_node_publish(node, id, msg, now),
            FromCluster::Ack { token, ok, fate } => self.on_ack(token, ok, fate, now),
            FromCluster::Route { node, filter, add } => {
                if let Some(c) = &mut self.cluster {
                    c.set_route(node, filter, add);
                }
            }
            FromCluster::ClearRoutes { node } => {
                if let Some(c) = &mut self.cluster {
                    c.clear_routes(node);
                }
            }
            FromCluster::Members(set) => {
                if let Some(c) = &mut self.cluster {
                    c.members = set;
                }
            }
        }
    }

    /// A message another node sent: routed inside this node; with `id`, answered once
    /// every copy is durable.
    fn on_node_publish(&mut self, node: NodeIx, id: Option<u64>, msg: SharedMessage, now: Instant) {
        self.stats.cluster_received += 1;
        let token = id.map(|_| self.token());
        let r = self.route_in_node(msg, now, token);
        if let (Some(token), Some(id)) = (token, id) {
            self.begin(
                token,
                RoundTrip::new(r.remote + 1, Completion::Node { node, id }).with_fate(r.fate),
            );
            self.wait_durable(Waiter::Local(token), now);
        }
    }

    /// The answer to a node's message (a finished [`Completion::Node`]).
    pub(super) fn answer_node(&mut self, node: NodeIx, id: u64, ok: bool, fate: Fate) {
        if let Some(c) = &self.cluster {
            let _ = c.link.control.send(ToCluster::Done { node, id, ok, fate });
        }
    }

    /// Whether this shard belongs to a cluster node.
    pub(super) fn clustered(&self) -> bool {
        self.cluster.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> (ClusterLink, tokio::sync::mpsc::UnboundedReceiver<ToCluster>) {
        let (data, _) = tokio::sync::mpsc::channel(4);
        let (control, rx) = tokio::sync::mpsc::unbounded_channel();
        (ClusterLink { data, control }, rx)
    }

    #[test]
    fn routes_are_kept_per_node_and_forgotten_together() {
        let (l, _rx) = link();
        let mut p = ClusterPort::new(l);
        let t = |s: &str| TopicName::new(s).unwrap();
        p.set_route(1, Arc::from("a/+"), true);
        p.set_route(1, Arc::from("b/#"), true);
        p.set_route(2, Arc::from("a/x"), true);
        assert_eq!(
            p.routes.targets(&t("a/x")).iter().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            p.routes.targets(&t("b/c/d")).iter().collect::<Vec<_>>(),
            vec![1]
        );
        // A second add and a remove of what is not there change nothing.
        p.set_route(1, Arc::from("a/+"), true);
        p.set_route(2, Arc::from("zzz"), false);
        p.clear_routes(1);
        assert_eq!(
            p.routes.targets(&t("a/x")).iter().collect::<Vec<_>>(),
            vec![2]
        );
        assert!(p.routes.targets(&t("b/c")).is_empty());
        p.set_route(2, Arc::from("a/x"), false);
        assert!(p.routes.targets(&t("a/x")).is_empty());
        // A node index past the bitmap is ignored, not a panic.
        p.set_route(NODES_MAX as NodeIx, Arc::from("a/x"), true);
        assert!(p.routes.targets(&t("a/x")).is_empty());
    }
}
