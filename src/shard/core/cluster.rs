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
use crate::storage::ClientEntry;

mod channels;
mod moving;

pub use channels::*;

/// The most nodes a cluster has (their indices share the shard bitmap).
pub const NODES_MAX: usize = crate::config::MAX_SHARDS;
/// The node number of sessions rebuilt here from a replicated stream (their answers go to
/// the rebuild, not to a node).
pub const REBUILD_NODE: NodeIx = NodeIx::MAX;

/// The most topic filters one node may announce (more are not listened to): every shard
/// keeps a copy of every node's set.
pub const ROUTES_PER_NODE_MAX: usize = 1_000_000;

/// Another node, as numbered by the cluster thread for this run.
pub type NodeIx = u16;

/// For one message, the node each shared group that matched gets it on (see
/// [`Message::groups`]).
pub type NodeGroups = Arc<[(NodeIx, Arc<str>)]>;

/// For one message: the shared groups it goes to on this node, and those it goes to on
/// another node, with the node.
pub type GroupPicks = (Vec<Arc<str>>, Vec<(NodeIx, Arc<str>)>);

/// A set of slots, one bit each.
pub type SlotBits = [u64; crate::session::ownership::SLOTS as usize / 64];

fn has_bit(bits: &SlotBits, slot: u16) -> bool {
    bits[slot as usize / 64] & (1 << (slot % 64)) != 0
}

/// Whether the slot of `client_id` is in `bits`.
pub(super) fn in_bits(bits: &SlotBits, client_id: &MqttStr) -> bool {
    has_bit(
        bits,
        crate::session::ownership::slot_of(client_id.as_bytes()),
    )
}

/// Adds `bits` to `set` (`on`) or takes them out; an empty set is `None` (the common case
/// costs one check).
fn update_bits(set: &mut Option<Box<SlotBits>>, bits: &SlotBits, on: bool) {
    let s =
        set.get_or_insert_with(|| Box::new([0; crate::session::ownership::SLOTS as usize / 64]));
    for (x, y) in s.iter_mut().zip(bits.iter()) {
        if on {
            *x |= *y;
        } else {
            *x &= !*y;
        }
    }
    if s.iter().all(|w| *w == 0) {
        *set = None;
    }
}

/// The shard's cluster state.
#[derive(Debug)]
pub(super) struct ClusterPort {
    link: ClusterLink,
    /// Filter -> the other nodes with subscribers of it.
    routes: RoutingIndex,
    /// Per node, its filters and group keys (to forget them all at once).
    by_node: HashMap<NodeIx, hashbrown::HashSet<Arc<str>>>,
    /// Shared groups by their filter: the nodes with members of each, this one included.
    groups: TopicTrie<Vec<GroupRoute>>,
    /// Turns the round robin over the nodes of a group.
    group_turn: u64,
    members: ShardSet,
    /// `None` until the cluster thread has sent the table.
    slots: Option<Arc<SlotMap>>,
    /// Slots about to move away: no new session in them, until they are not this node's.
    held: Option<Box<SlotBits>>,
    /// The lease lapsed and the clients were closed (until it holds again).
    lapsed: bool,
    /// Slots whose sessions are moving to another node: their clients are disconnected
    /// and nothing new is stored for them here (see [`Core::set_moving`]).
    moving: Option<Box<SlotBits>>,
    /// Slots whose sessions are moving here (adopted before the slot is ours), with when
    /// the last came: not discarded as orphans meanwhile (see [`INCOMING_TTL`]).
    incoming: HashMap<u16, Instant>,
    /// QoS 2 keys released lately (origin, packet id or every one of origin, when): a
    /// session rebuilt here from a failed node's stream read before them holds stale
    /// copies of them, dropped when it is adopted (see [`Core::adopt_from_node`]).
    released: std::collections::VecDeque<(MqttStr, Option<u16>, Instant)>,
    /// The QoS 2 keys of sessions moved here from a live node, as they came (client,
    /// origin, packet id -> when): a `FORGET` from that node applies only to a key still as
    /// it came, not to one this node released itself or that a new message (DUP = 0) with
    /// the same packet id holds now (see [`Core::forget_moved_key`]). At most
    /// [`RELEASED_MAX`], each for [`INCOMING_TTL`].
    pub(super) adopted_keys: HashMap<(MqttStr, MqttStr, u16), Instant>,
}

/// QoS 2 releases remembered for sessions arriving from other nodes.
const RELEASED_MAX: usize = 65_536;

/// How long sessions moved here wait for their slot to become this node's before they are
/// taken for leftovers of a move that was given up, and discarded.
const INCOMING_TTL: Duration = Duration::from_secs(120);

impl ClusterPort {
    pub(super) fn new(link: ClusterLink) -> ClusterPort {
        ClusterPort {
            link,
            routes: RoutingIndex::default(),
            by_node: HashMap::new(),
            groups: TopicTrie::default(),
            group_turn: 0,
            members: ShardSet::default(),
            slots: None,
            held: None,
            lapsed: false,
            moving: None,
            incoming: HashMap::new(),
            released: std::collections::VecDeque::new(),
            adopted_keys: HashMap::new(),
        }
    }

    fn set_route(&mut self, node: NodeIx, filter: Arc<str>, add: bool) {
        if (node as usize) >= NODES_MAX {
            return;
        }
        let filters = self.by_node.entry(node).or_default();
        if add && filters.len() >= ROUTES_PER_NODE_MAX {
            return;
        }
        let changed = if add {
            filters.insert(filter.clone())
        } else {
            filters.remove(&filter)
        };
        if changed {
            self.set_any(&filter, node as usize, add);
        }
    }

    /// A node's plain filter, or (`$share/...`) a key of a group with members there.
    fn set_any(&mut self, filter: &Arc<str>, node: usize, add: bool) {
        if filter.starts_with(SHARE_PREFIX) {
            self.set_group(filter, Some(node), add);
        } else {
            self.routes.set(filter, node, add);
        }
    }

    /// The group `key` has (`add`) or no longer has members on `node` (`None`: here).
    fn set_group(&mut self, key: &Arc<str>, node: Option<usize>, add: bool) {
        let Ok(tf) = TopicFilter::new(key) else {
            return;
        };
        if !tf.is_shared() {
            return;
        }
        let mark = |g: &mut GroupRoute| match node {
            Some(n) if add => g.nodes.insert(n),
            Some(n) => g.nodes.remove(n),
            None => g.here = add,
        };
        if add {
            let v = self.groups.entry(tf.filter());
            match v.iter_mut().find(|g| g.key == *key) {
                Some(g) => mark(g),
                None => {
                    let mut g = GroupRoute {
                        key: key.clone(),
                        nodes: ShardSet::default(),
                        here: false,
                    };
                    mark(&mut g);
                    v.push(g);
                }
            }
        } else if let Some(v) = self.groups.get_mut(tf.filter()) {
            for g in v.iter_mut().filter(|g| g.key == *key) {
                mark(g);
            }
            v.retain(|g| g.here || !g.nodes.is_empty());
            if v.is_empty() {
                self.groups.remove(tf.filter());
            }
        }
    }

    /// For a message on `topic`, the node each shared group that matches gets it on: a
    /// round robin over the live nodes with members and this one (over every node with
    /// members when none of them is live: the message is then refused, as for any node
    /// that is down). `None`: no group matches anywhere. Returns (the groups served here,
    /// the groups served elsewhere with their node).
    fn pick_groups(&mut self, topic: &str) -> Option<GroupPicks> {
        let mut here = Vec::new();
        let mut there = Vec::new();
        let mut any = false;
        let mut turn = self.group_turn;
        let members = &self.members;
        self.groups.for_each_match(topic, |v| {
            for g in v {
                any = true;
                let live: Vec<usize> = g.nodes.iter().filter(|n| members.contains(*n)).collect();
                let nodes: Vec<usize> = if live.is_empty() && !g.here {
                    g.nodes.iter().collect()
                } else {
                    live
                };
                let n = nodes.len() + usize::from(g.here);
                if n == 0 {
                    continue;
                }
                let k = (turn % n as u64) as usize;
                turn = turn.wrapping_add(1);
                match k.checked_sub(usize::from(g.here)) {
                    None => here.push(g.key.clone()),
                    Some(i) => there.push((nodes[i] as NodeIx, g.key.clone())),
                }
            }
        });
        self.group_turn = turn;
        any.then_some((here, there))
    }

    fn replace_routes(&mut self, node: NodeIx, filters: &[Arc<str>]) {
        let new: hashbrown::HashSet<&Arc<str>> = filters.iter().collect();
        let old: Vec<Arc<str>> = self
            .by_node
            .get(&node)
            .map(|s| s.iter().filter(|f| !new.contains(f)).cloned().collect())
            .unwrap_or_default();
        for f in old {
            self.set_route(node, f, false);
        }
        for f in filters {
            self.set_route(node, f.clone(), true);
        }
    }

    fn clear_routes(&mut self, node: NodeIx) {
        if let Some(filters) = self.by_node.remove(&node) {
            for f in filters {
                self.set_any(&f, node as usize, false);
            }
        }
    }
}

/// How a shared subscription's key starts (`$share/<group>/<filter>`).
const SHARE_PREFIX: &str = "$share/";

/// A shared group some node has members of (see [`ClusterPort::pick_groups`]).
#[derive(Debug)]
struct GroupRoute {
    key: Arc<str>,
    /// The other nodes with members.
    nodes: ShardSet,
    /// This node has members.
    here: bool,
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

impl ClusterPort {
    /// The replication log's way in, when sessions are replicated.
    pub(super) fn replica(&self) -> Option<&ReplicaLink> {
        self.link.replica.as_ref()
    }
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
        groups: Option<NodeGroups>,
        reply: Option<Token>,
        r: &mut Routed,
    ) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        // `$SYS` is per node: every node publishes its own under the same names.
        if msg.topic.as_str().starts_with("$SYS/") {
            return;
        }
        let mut nodes = c.routes.targets(&msg.topic);
        for (n, _) in groups.iter().flat_map(|g| g.iter()) {
            nodes.insert(*n as usize);
        }
        r.matched |= !nodes.is_empty();
        if msg.retain {
            nodes.union_with(&c.members);
        }
        if nodes.is_empty() {
            return;
        }
        let n = nodes.iter().count();
        let ack = reply.map(|t| (self.id as u16, t));
        // A QoS 2 message travels with its dedup key: the other node's persistent sessions
        // keep it, and its release follows the publisher's PUBREL (`release_in_nodes`).
        let msg = msg.clone();
        match c.link.data.try_send(ToCluster::Publish {
            msg,
            nodes,
            ack,
            groups,
        }) {
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

    /// In a cluster, the shared groups a message goes to on this node and on the others
    /// (see [`ClusterPort::pick_groups`]): `None` when none matches anywhere, or for
    /// `$SYS`, which stays on its node.
    pub(super) fn pick_groups(&mut self, msg: &SharedMessage) -> Option<GroupPicks> {
        let c = self.cluster.as_mut()?;
        if msg.topic.as_str().starts_with("$SYS/") {
            return None;
        }
        c.pick_groups(msg.topic.as_str())
    }

    /// The shared group `key` homed on this node's shard `home`'s has (`add`) or no longer
    /// has members: every shard of the node learns it (the home tells the others, then
    /// the other nodes, by the group's key as a route).
    pub(super) fn set_group_here(&mut self, key: Arc<str>, add: bool) {
        if let Some(c) = &mut self.cluster {
            c.set_group(&key, None, add);
        }
    }

    /// At a group's home, in a cluster: tells this node's other shards that the group
    /// `key` has (`add`) or no longer has members here, before anything else the home
    /// sends them about it.
    pub(super) fn announce_group_here(&mut self, key: &Arc<str>, add: bool) {
        if !self.clustered() {
            return;
        }
        self.set_group_here(key.clone(), add);
        for p in self.peers() {
            self.sink.push(
                p,
                Event::GroupHere {
                    key: key.clone(),
                    add,
                },
            );
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
        let shard = self.id as u16;
        self.tell_cluster(reply, |ack| ToCluster::Route {
            filter: filter.clone(),
            shard,
            add,
            ack,
        })
    }

    /// Tells the other nodes to forget a QoS 2 key; returns the answers to expect (0 or 1:
    /// the cluster thread answers once for every linked node).
    pub(super) fn release_in_nodes(
        &mut self,
        origin: &MqttStr,
        packet_id: Option<u16>,
        reply: Option<Token>,
    ) -> usize {
        self.tell_cluster(reply, |ack| ToCluster::Release {
            origin: origin.clone(),
            packet_id,
            ack,
        })
    }

    /// Hands the cluster thread a message that must not be lost (its control channel);
    /// with `reply`, it answers that round trip once: returns the answers to expect.
    fn tell_cluster(
        &mut self,
        reply: Option<Token>,
        msg: impl FnOnce(Option<Reply>) -> ToCluster,
    ) -> usize {
        let Some(c) = &self.cluster else {
            return 0;
        };
        let ack = reply.map(|t| (self.id as u16, t));
        let sent = c.link.control.send(msg(ack)).is_ok();
        usize::from(sent && ack.is_some())
    }

    /// What the cluster thread posted.
    pub fn on_cluster(&mut self, m: FromCluster, now: Instant) {
        match m {
            FromCluster::Publish { node, id, msg } => self.on_node_publish(node, id, msg, now),
            FromCluster::Ack { token, ok, fate } => self.on_ack(token, ok, fate, now),
            FromCluster::Release {
                node,
                id,
                origin,
                packet_id,
            } => {
                let token = id.map(|_| self.token());
                let remote = self.release_qos2_in_node(&origin, packet_id, token, now);
                if let (Some(token), Some(id)) = (token, id) {
                    self.begin(
                        token,
                        RoundTrip::new(remote + 1, Completion::Node { node, id }),
                    );
                    self.wait_durable(Waiter::Local(token), now);
                }
            }
            FromCluster::Route { node, filter, add } => {
                if let Some(c) = &mut self.cluster {
                    c.set_route(node, filter, add);
                }
            }
            FromCluster::ReplaceRoutes { node, filters } => {
                if let Some(c) = &mut self.cluster {
                    c.replace_routes(node, &filters);
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
            FromCluster::Moving { bits, on, rc } => self.set_moving(&bits, on, rc, now),
            FromCluster::Adopt {
                node,
                id,
                client_id,
                entries,
                read_at,
            } => self.adopt_from_node(node, id, &client_id, &entries, read_at, now),
            FromCluster::Forget {
                client_id,
                origin,
                packet_id,
            } => self.forget_moved_key(&client_id, &origin, packet_id, now),
            FromCluster::RetainedWanted { node } => {
                let mut items = Vec::with_capacity(self.retained.len());
                // The deletions remembered first (as empty retained messages: the asking
                // node deletes a copy it kept from before them); small, they are not the
                // ones a set cut short at the link's bound leaves out.
                for (topic, v) in self.retained_versions.deletions() {
                    if !is_sys_topic(topic) {
                        items.push((deletion_of(topic, now), v));
                    }
                }
                self.retained.for_each_any(|m| {
                    if !is_sys_topic(&m.topic) && m.remaining_expiry(now).is_ok() {
                        if let Some(v) = self.retained_versions.version_of(&m.topic) {
                            items.push((m.clone(), v));
                        }
                    }
                });
                if let Some(c) = &self.cluster {
                    let _ = c.link.control.send(ToCluster::RetainedSet { node, items });
                }
            }
            FromCluster::Retained { msg, version } => {
                // Versioned by the sending node's clock: this node's later writes to the
                // topic must still win, even if its clock is behind. An empty one is a
                // deletion the sender remembers: applied as one here if newer.
                self.retained_versions.observe(version);
                // A deletion of what this node does not hold changes nothing here (and is
                // not remembered again, which would restart its time).
                let moot = msg.payload.is_empty() && self.retained.get(&msg.topic).is_none();
                if !moot && !self.retained_versions.is_stale(&msg.topic, version) {
                    self.apply_retained_everywhere(msg, version, true);
                }
            }
            FromCluster::Hold { bits, on } => {
                if let Some(c) = &mut self.cluster {
                    update_bits(&mut c.held, &bits, on);
                }
            }
            FromCluster::Slots(map) => {
                let fenced = !map.serving;
                if let Some(c) = &mut self.cluster {
                    // Slots that are not this node's any more are not held here.
                    let mut gone: SlotBits = [0; crate::session::ownership::SLOTS as usize / 64];
                    for (slot, owner) in map.owner.iter().enumerate() {
                        if *owner != SLOT_HERE {
                            gone[slot / 64] |= 1 << (slot % 64);
                        }
                    }
                    update_bits(&mut c.held, &gone, false);
                    c.incoming
                        .retain(|slot, _| map.owner.get(*slot as usize) != Some(&SLOT_HERE));
                    c.slots = Some(map);
                }
                if fenced {
                    // Nothing this node owns may be served while another might: its clients
                    // are told to go elsewhere (they reconnect, and are placed again).
                    self.disconnect_all(ReasonCode::UseAnotherServer);
                }
                self.discard_orphans(now);
                // A move is over once its slots are not this node's any more (its sessions
                // were just discarded here: the other node has them).
                if let Some(c) = &mut self.cluster {
                    if let Some(m) = &c.slots {
                        let mut gone: SlotBits =
                            [0; crate::session::ownership::SLOTS as usize / 64];
                        for (slot, owner) in m.owner.iter().enumerate() {
                            if *owner != SLOT_HERE {
                                gone[slot / 64] |= 1 << (slot % 64);
                            }
                        }
                        update_bits(&mut c.moving, &gone, false);
                    }
                }
            }
        }
    }

    /// Remembers a QoS 2 release (for sessions that arrive from other nodes meanwhile).
    pub(super) fn note_release(&mut self, origin: &MqttStr, pid: Option<u16>, now: Instant) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        while c
            .released
            .front()
            .is_some_and(|(_, _, t)| now.saturating_duration_since(*t) > INCOMING_TTL)
            || c.released.len() >= RELEASED_MAX
        {
            c.released.pop_front();
        }
        c.released.push_back((origin.clone(), pid, now));
    }

    /// Where the client `client_id` is served (always here for a broker that runs alone).
    pub fn placement(&self, client_id: &[u8]) -> Placement {
        let Some(c) = &self.cluster else {
            return Placement::Here;
        };
        let Some(map) = &c.slots else {
            return Placement::Unavailable;
        };
        if !map.serving || !c.link.lease.holds(Instant::now()) {
            return Placement::Unavailable;
        }
        let slot = crate::session::ownership::slot_of(client_id);
        if c.held.as_ref().is_some_and(|h| has_bit(h, slot)) {
            return Placement::Unavailable;
        }
        match map.owner.get(slot as usize).copied() {
            Some(SLOT_HERE) => Placement::Here,
            Some(n) => match map.relay.get(n as usize).copied().flatten() {
                Some(addr) => Placement::Node(addr),
                None => Placement::Unavailable,
            },
            None => Placement::Unavailable,
        }
    }

    /// A lease that lapsed by this node's clock (the cluster thread stalled, or has not
    /// heard from etcd for a whole time to live) ends every client connection here within
    /// a timer tick, before another node may be given this node's slots: a connection
    /// must not outlive the lease that let it be served.
    pub fn check_lease(&mut self, now: Instant) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        // Sessions of a move that was given up (their slot never became ours) go.
        let before = c.incoming.len();
        c.incoming
            .retain(|_, t| now.saturating_duration_since(*t) < INCOMING_TTL);
        if c.incoming.len() < before {
            self.discard_orphans(now);
        }
        let Some(c) = &mut self.cluster else {
            return;
        };
        let serving = c.slots.as_ref().is_some_and(|m| m.serving);
        let holds = c.link.lease.holds(now);
        if serving && !holds && !c.lapsed {
            c.lapsed = true;
            tracing::warn!("the cluster lease lapsed by this node's clock: closing its clients");
            self.disconnect_all(ReasonCode::UseAnotherServer);
        } else if holds {
            c.lapsed = false;
        }
    }

    /// The slots this shard holds sessions in.
    pub fn slots_in_use(&self) -> SlotBits {
        let mut bits = [0u64; crate::session::ownership::SLOTS as usize / 64];
        for id in self.sessions.keys() {
            let s = crate::session::ownership::slot_of(id.as_bytes());
            bits[s as usize / 64] |= 1 << (s % 64);
        }
        bits
    }

    /// Whether this shard has the slot table and may serve (a cluster node's shard serves
    /// nobody before: the first map, sent before the other nodes' routes are in, says
    /// "not serving").
    pub fn has_slot_map(&self) -> bool {
        self.cluster
            .as_ref()
            .is_none_or(|c| c.slots.as_ref().is_some_and(|m| m.serving))
    }

    /// A CONNECT reaching the core for a client this node does not serve now (its slot
    /// moved, or this node was fenced, since the connection was placed): refused as
    /// "server unavailable"; the client retries and is placed again.
    pub(super) fn check_placement(&self, client_id: &MqttStr) -> Result<(), ReasonCode> {
        match self.placement(client_id.as_bytes()) {
            Placement::Here => Ok(()),
            _ => Err(ReasonCode::ServerUnavailable),
        }
    }

    /// Whether this node owns any slot (a client id assigned here must be in one).
    pub fn owns_slots(&self) -> bool {
        match &self.cluster {
            None => true,
            Some(c) => c
                .slots
                .as_ref()
                .is_some_and(|m| m.serving && m.owner.contains(&SLOT_HERE)),
        }
    }

    /// Any node that owns slots (where a client with no id is relayed when this node owns
    /// none).
    pub fn any_owner(&self) -> Placement {
        let Some(map) = self.cluster.as_ref().and_then(|c| c.slots.as_ref()) else {
            return Placement::Unavailable;
        };
        map.owner
            .iter()
            .find_map(|&n| map.relay.get(n as usize).copied().flatten())
            .map_or(Placement::Unavailable, Placement::Node)
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

    /// Closes every client connection of this shard with `rc` (MQTT 5 hears it in a
    /// DISCONNECT).
    fn disconnect_all(&mut self, rc: ReasonCode) {
        for s in self.sessions.values() {
            if let Some(l) = &s.link {
                l.out.close(Some(rc));
            }
        }
    }

    /// Whether this shard belongs to a cluster node.
    pub(super) fn clustered(&self) -> bool {
        self.cluster.is_some()
    }
}

#[cfg(test)]
mod tests;

/// A retained deletion of `topic` as a message (an empty retained PUBLISH), for the
/// retained sync.
fn deletion_of(topic: &TopicName, now: Instant) -> SharedMessage {
    Arc::new(Message::by_broker_retained(
        topic.clone(),
        bytes::Bytes::new(),
        now,
    ))
}
