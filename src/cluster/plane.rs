//! The data plane between nodes, on the cluster thread: routes (which topic filters each
//! node has subscribers of), forwarded messages and their durable answers.
//!
//! One task owns all of it. Inputs: the shards' [`ToCluster`] channels, and [`LinkEvent`]s
//! from the link tasks (a dialled link up or down, a frame received on an accepted link).
//! Outputs: frames for each peer's dialled link (batched per pass of the loop) and
//! [`FromCluster`] work posted to the shards (batched per shard per pass).
//!
//! Each node sends on the link it dialled and receives on the links it accepted, so the
//! frames from one node to another travel in one ordered stream; a node's messages for one
//! publisher are posted to one shard (by the hash of the publisher's client id), so they
//! stay in order end to end.
//!
//! Every acknowledged message forwarded to another node waits for that node's answer, at
//! most `cluster.forward_timeout_ms`; a link that goes down fails what it carried, and a
//! message for a node with no link fails at once. A failure reaches the publisher as
//! "not stored" (MQTT 5: 0x80; 3.x: the connection is closed), never as a success.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hashbrown::HashMap;
use shards::{Control, ShardId};
use tokio::sync::mpsc;

use super::wire::{self, Frame};
use super::ClusterHandle;
use crate::protocol::MqttStr;
use crate::session::ownership::stable_hash;
use crate::shard::api::{
    FromCluster, NodeIx, Query, Reply, SlotMap, ToCluster, NODES_MAX, REBUILD_NODE,
    ROUTES_PER_NODE_MAX, SLOT_HERE, SLOT_NOWHERE,
};
use crate::shard::event::Fate;
use crate::shard::service::BrokerShard;
use crate::shard::shardset::ShardSet;

mod forgets;
mod retained;
mod routes;
mod sessions;

/// How often timeouts and membership are looked at.
const TICK: Duration = Duration::from_millis(100);
/// How long a starting node waits for the other live nodes' routes before it serves
/// clients anyway (a node that is live in etcd but cannot be reached).
pub(super) const ROUTE_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SUBACK waits for the other nodes to apply a new filter before it goes
/// anyway (a node that does not answer gets the whole set when its link is back).
const ROUTE_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link tasks tell the plane.
#[derive(Debug)]
pub(super) enum LinkEvent {
    /// This node's link to `node` is up: frames for it go to `tx`; `queued` counts the
    /// bytes handed over and not yet written.
    Up {
        node: String,
        tx: mpsc::UnboundedSender<Bytes>,
        queued: Arc<AtomicUsize>,
        dead: Arc<std::sync::atomic::AtomicBool>,
    },
    /// That link is down.
    Down { node: String },
    /// A frame `node` sent on the link it dialled to this node.
    Frame { node: String, kind: u8, body: Bytes },
    /// The routes nodes asked answers for (node, ack id) are applied on every shard here
    /// (`applied`), or the barrier failed (a shard stopping: no answer; the asker goes on
    /// after its own timeout).
    RouteApplied {
        acks: Vec<(String, u64)>,
        applied: bool,
    },
}

/// Limits of the plane.
#[derive(Clone, Copy, Debug)]
pub(super) struct PlaneLimits {
    pub forward_timeout: Duration,
    /// Acknowledged messages waiting for another node's answer, all nodes together.
    pub inflight_max: usize,
    /// Bytes queued for one link and not yet written; past it the link is reset.
    pub link_buffer_bytes_max: usize,
    /// One move of sessions, all of them together.
    pub move_timeout: Duration,
    /// Bytes of moved sessions sent and not yet answered.
    pub move_window_bytes: usize,
    /// Sessions arriving at once, all nodes together.
    pub moves_in_max: usize,
    /// QoS 2 key releases kept for one node that is away.
    pub missed_releases_max: usize,
    /// Bytes of a moved session's records in one frame (within the frame bound).
    pub session_part_bytes: usize,
}

/// Counters for `GET /api/cluster` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PlaneCounters {
    pub messages_forwarded_total: u64,
    pub messages_received_total: u64,
    pub forward_failed_total: u64,
    pub forward_timeouts_total: u64,
    pub bad_frames_total: u64,
    pub link_resets_total: u64,
    pub inflight: u64,
    /// QoS 2 key releases kept for a node that was away and forgotten past
    /// `cluster.missed_releases_max` (that node may keep stale keys).
    pub releases_forgotten_total: u64,
    /// QoS 2 keys forgotten by sessions moving away that could not follow them (the link
    /// to where they went was down, or past `cluster.missed_releases_max`): a moved copy
    /// may keep such a key, stale.
    pub moved_forgets_lost_total: u64,
    /// Retained messages received from another node at this node's start.
    pub retained_synced_total: u64,
    /// Sets of retained messages sent to a starting node that were cut short (past half
    /// of `cluster.link_buffer_bytes_max`).
    pub retained_sync_cut_short_total: u64,
    /// Nodes that did not say, before a rebuild here went on, which QoS 2 releases the
    /// failed node missed (no answer in time, or their link went down): the rebuilt
    /// sessions may keep those keys, stale.
    pub rebuild_releases_unknown_total: u64,
}

/// The inputs of a slot map: the table's epoch, the live nodes with their relay
/// addresses, whether this node serves.
#[derive(Debug, PartialEq, Eq)]
struct SlotsSeen {
    epoch: u64,
    live: Vec<(String, Option<std::net::SocketAddr>)>,
    serving: bool,
}

struct LinkOut {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    /// Set when the plane gives the link up: its writer stops at once (what it still
    /// holds has been failed back to the publishers and must not arrive after all).
    dead: Arc<std::sync::atomic::AtomicBool>,
}

struct Plane {
    me: String,
    control: Control<BrokerShard>,
    shards: usize,
    handle: ClusterHandle,
    limits: PlaneLimits,
    ix: HashMap<String, NodeIx>,
    names: Vec<String>,
    links: HashMap<NodeIx, LinkOut>,
    /// Filter (or shared group key) -> the shards of this node that have subscribers of
    /// it (a set: a shard that announces a filter twice withdraws it once).
    local_routes: HashMap<Arc<str>, ShardSet>,
    next_id: u64,
    /// Forwarded messages waiting for their node's answer, by id.
    pending: HashMap<u64, (NodeIx, Reply)>,
    deadlines: VecDeque<(Instant, u64)>,
    /// Route announcements waiting for answers: the shard's round trip and how many.
    route_waits: HashMap<u64, (Reply, usize, Vec<NodeIx>)>,
    route_deadlines: VecDeque<(Instant, u64)>,
    members: ShardSet,
    /// What the shards' slot map was built from (rebuilt when it changes).
    slots_seen: Option<SlotsSeen>,
    /// The nodes whose whole route set has arrived (since their link last came up).
    synced: hashbrown::HashSet<NodeIx>,
    /// Routes applied (posted) whose answers wait for the next barrier, and whether one is
    /// under way.
    route_acks: Vec<(String, u64)>,
    barrier_busy: bool,
    /// Sets under way (between a node's ROUTES_RESET and ROUTES_END), with the answers
    /// asked for meanwhile.
    incoming_sets: HashMap<NodeIx, (hashbrown::HashSet<Arc<str>>, Vec<u64>)>,
    /// Until every live node's routes have arrived (or `ROUTE_SYNC_TIMEOUT` passed), the
    /// shards get no slot map, so they serve nobody: a publish taken before would miss
    /// the other nodes' persistent sessions (a node restarted after a crash knows no
    /// routes at all).
    gate: Option<Instant>,
    /// This pass's output.
    out: HashMap<NodeIx, BytesMut>,
    posts: Vec<Vec<FromCluster>>,
    counters: PlaneCounters,
    events: mpsc::Sender<LinkEvent>,
    /// Sessions this node is sending to another (one move at a time).
    move_out: Option<MoveOut>,
    /// QoS 2 keys forgotten by sessions moving away, and where they go.
    forgets: forgets::MovedForgets,
    /// The QoS 2 key releases waiting for answers, by wait id (see `missed_releases`).
    releases: HashMap<u64, (MqttStr, Option<u16>)>,
    /// Per node, the QoS 2 key releases it missed (it was down, or did not answer): sent
    /// first when its link is back, before any message, so that a stale key there never
    /// takes a new message resent with DUP (after a close) for the old one.
    missed_releases: HashMap<NodeIx, VecDeque<(MqttStr, Option<u16>)>>,
    /// Sessions other nodes are sending here, by (node, id), until their last part.
    moves_in: HashMap<(NodeIx, u64), MoveIn>,
    /// Rebuilds from a replicated stream under way: per session id, its rebuild; per
    /// rebuild, the answers still missing, the sessions stored and who waits.
    rebuild_ids: HashMap<u64, u64>,
    rebuilds: HashMap<u64, Rebuild>,
    /// Rebuilds waiting for the linked nodes to say which QoS 2 releases the failed node
    /// missed (see [`Plane::start_rebuild`]).
    missed_asks: HashMap<u64, MissedAsk>,
    /// Per asking node, the latest `MISSED_WANTED` not answered yet for want of room on
    /// its link.
    missed_waiting: HashMap<NodeIx, (u64, String)>,
    /// Retained messages asked for at start (see `plane/retained.rs`).
    retained: retained::RetainedSync,
}

/// A rebuild waiting for the answers to its `MISSED_WANTED`.
struct MissedAsk {
    from: String,
    read_at: Instant,
    sessions: Vec<(String, Vec<crate::storage::ClientEntry>)>,
    reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    /// The nodes whose answer has not ended yet.
    asked: hashbrown::HashSet<NodeIx>,
    /// The releases they kept for the failed node.
    releases: Vec<(MqttStr, Option<u16>)>,
    /// How many each sent that are kept (at most `cluster.missed_releases_max`).
    per_node: HashMap<NodeIx, usize>,
    deadline: Instant,
}

/// How long a rebuild waits for the linked nodes to say which QoS 2 releases the failed
/// node missed.
const MISSED_WAIT: Duration = Duration::from_secs(5);

/// Sessions rebuilt here from a failed node's stream, waiting for the shards' answers.
struct Rebuild {
    left: usize,
    stored: usize,
    failed: usize,
    reply: Option<tokio::sync::oneshot::Sender<Result<usize, String>>>,
}

/// Bytes of shared-group keys one forwarded message may name for a node (a frame has
/// 64 KiB of room beside the largest MQTT packet).
const GROUP_KEY_BYTES_MAX: usize = 32 << 10;

/// Sessions on their way to another node (see [`Plane::start_move`]).
struct MoveOut {
    node: NodeIx,
    todo: VecDeque<(String, Vec<crate::storage::ClientEntry>)>,
    /// Sent and not answered yet: id -> bytes.
    sent: HashMap<u64, usize>,
    sent_bytes: usize,
    moved: usize,
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
}

/// A session arriving from another node, part by part.
struct MoveIn {
    client_id: String,
    entries: Vec<crate::storage::ClientEntry>,
    bytes: usize,
    /// Given up (dropped) past this: its sender went away.
    deadline: Instant,
}

/// The answer to a message sent to a node that went away or did not answer in time: it
/// may have been stored there (the answer was lost), so it counts as kept. A QoS 2
/// publisher is then not told "refused" (which would end the flow and make its next try a
/// new message, stored twice), but closed, to resend it with DUP, which the sessions that
/// stored it skip.
const MAYBE_KEPT: Fate = Fate {
    kept: true,
    queue_full: false,
    budget_spent: false,
    moving: false,
};

/// The plane's channels.
pub(super) struct Inputs {
    /// The shards' messages for other nodes (bounded).
    pub data: mpsc::Receiver<ToCluster>,
    /// The shards' routes and answers.
    pub ctl: mpsc::UnboundedReceiver<ToCluster>,
    /// The link tasks' events...
    pub links: mpsc::Receiver<LinkEvent>,
    /// ...and a sender of them, for the plane's own helpers.
    pub events: mpsc::Sender<LinkEvent>,
}

/// Runs the plane until `stop`.
pub(super) async fn run(
    control: Control<BrokerShard>,
    handle: ClusterHandle,
    limits: PlaneLimits,
    inputs: Inputs,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Inputs {
        mut data,
        mut ctl,
        mut links,
        events,
    } = inputs;
    let shards = control.shard_count();
    let me = handle.lock().me.clone();
    let mut p = Plane {
        me,
        control,
        shards,
        handle,
        limits,
        ix: HashMap::new(),
        names: Vec::new(),
        links: HashMap::new(),
        local_routes: HashMap::new(),
        // Ids of this run never meet a late answer to the previous run's (a restart).
        next_id: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        pending: HashMap::new(),
        deadlines: VecDeque::new(),
        route_waits: HashMap::new(),
        route_deadlines: VecDeque::new(),
        members: ShardSet::default(),
        slots_seen: None,
        synced: hashbrown::HashSet::new(),
        incoming_sets: HashMap::new(),
        route_acks: Vec::new(),
        barrier_busy: false,
        gate: Some(Instant::now() + ROUTE_SYNC_TIMEOUT),
        out: HashMap::new(),
        posts: (0..shards).map(|_| Vec::new()).collect(),
        counters: PlaneCounters::default(),
        events,
        move_out: None,
        forgets: forgets::MovedForgets::new(limits.missed_releases_max),
        moves_in: HashMap::new(),
        releases: HashMap::new(),
        missed_releases: HashMap::new(),
        rebuild_ids: HashMap::new(),
        missed_asks: HashMap::new(),
        missed_waiting: HashMap::new(),
        retained: retained::RetainedSync::default(),
        rebuilds: HashMap::new(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first slot map goes out before any link's frames are looked at.
    p.tick();
    p.flush();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(m) = ctl.recv() => {
                p.on_shard(m);
                while let Ok(m) = ctl.try_recv() {
                    p.on_shard(m);
                }
            }
            Some(e) = links.recv() => {
                p.link_event(e);
                while let Ok(e) = links.try_recv() {
                    p.link_event(e);
                }
            }
            Some(m) = data.recv() => {
                p.on_shard(m);
                // A pass takes what is there, up to a bound, then writes it out.
                for _ in 0..1024 {
                    match data.try_recv() {
                        Ok(m) => p.on_shard(m),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => p.tick(),
        }
        p.flush();
    }
}

impl Plane {
    /// The index of `node`, numbered on first sight (never reused in a run); `None` past
    /// [`NODES_MAX`].
    fn ix_of(&mut self, node: &str) -> Option<NodeIx> {
        if let Some(&i) = self.ix.get(node) {
            return Some(i);
        }
        if self.names.len() >= NODES_MAX {
            return None;
        }
        let i = self.names.len() as NodeIx;
        self.names.push(node.to_string());
        self.ix.insert(node.to_string(), i);
        Some(i)
    }

    /// The other nodes with a live record in etcd now.
    fn live_others(&self) -> Vec<String> {
        let st = self.handle.lock();
        st.live
            .keys()
            .filter(|id| **id != self.me)
            .cloned()
            .collect()
    }

    /// Whether `node` has a live record in etcd now.
    fn is_live(&self, node: &str) -> bool {
        self.handle.lock().live.contains_key(node)
    }

    fn post(&mut self, shard: usize, m: FromCluster) {
        if let Some(q) = self.posts.get_mut(shard) {
            q.push(m);
        }
    }

    fn post_all(&mut self, m: FromCluster) {
        for s in 0..self.shards {
            self.post(s, m.clone());
        }
    }

    fn answer(&mut self, reply: Reply, ok: bool, fate: Fate) {
        self.post(
            reply.0 as usize,
            FromCluster::Ack {
                token: reply.1,
                ok,
                fate,
            },
        );
    }

    fn buf(&mut self, node: NodeIx) -> &mut BytesMut {
        self.out.entry(node).or_default()
    }

    fn on_shard(&mut self, m: ToCluster) {
        match m {
            ToCluster::Publish {
                msg,
                nodes,
                ack,
                groups,
            } => {
                let now = Instant::now();
                for n in nodes.iter() {
                    let n = n as NodeIx;
                    if !self.links.contains_key(&n) {
                        self.counters.forward_failed_total += 1;
                        if let Some(r) = ack {
                            self.answer(r, false, Fate::default());
                        }
                        continue;
                    }
                    let id = match ack {
                        Some(r) if self.pending.len() >= self.limits.inflight_max => {
                            self.counters.forward_failed_total += 1;
                            self.answer(r, false, Fate::default());
                            continue;
                        }
                        Some(r) => {
                            self.next_id += 1;
                            let id = self.next_id;
                            self.pending.insert(id, (n, r));
                            if self.deadlines.len() > 2 * self.limits.inflight_max {
                                // Answered ones are dropped when they reach the front;
                                // under a high rate drop them sooner, so the queue stays
                                // within the in-flight bound.
                                let pending = &self.pending;
                                self.deadlines.retain(|(_, id)| pending.contains_key(id));
                            }
                            self.deadlines
                                .push_back((now + self.limits.forward_timeout, id));
                            id
                        }
                        None => 0,
                    };
                    self.counters.messages_forwarded_total += 1;
                    let keys: Vec<&Arc<str>> = groups
                        .iter()
                        .flat_map(|g| g.iter())
                        .filter(|(to, _)| *to == n)
                        .map(|(_, k)| k)
                        .collect();
                    let key_bytes: usize = keys.iter().map(|k| k.len() + 2).sum();
                    if key_bytes > GROUP_KEY_BYTES_MAX || keys.len() > wire::GROUPS_PER_MESSAGE_MAX
                    {
                        // Past the frame's room for them: this message fails for that node
                        // (never a frame the other side would close the link for).
                        self.counters.forward_failed_total += 1;
                        if let Some((_, r)) = self.pending.remove(&id) {
                            self.answer(r, false, Fate::default());
                        }
                        continue;
                    }
                    wire::publish(self.buf(n), id, &msg, keys.iter(), now);
                }
            }
            ToCluster::Route {
                filter,
                shard,
                add,
                ack,
            } => self.local_route(filter, shard, add, ack),
            ToCluster::Move {
                to,
                sessions,
                read_at,
                reply,
            } => self.start_move(&to, *sessions, read_at, reply),
            ToCluster::Forget {
                client_id,
                origin,
                packet_id,
                at,
            } => self.forget_moved(client_id, origin, packet_id, at),
            ToCluster::Release {
                origin,
                packet_id,
                ack,
            } => {
                let linked: Vec<NodeIx> = self.links.keys().copied().collect();
                // Every other member live or owning slots (up or down) and not linked now
                // gets it when it is (a member gone for good and failed over has nothing to
                // release, and gets no node number).
                let members: Vec<String> = {
                    let st = self.handle.lock();
                    let owners = st.slots.counts();
                    st.members
                        .keys()
                        .filter(|m| **m != self.me)
                        .filter(|m| st.live.contains_key(*m) || owners.contains_key(m.as_str()))
                        .cloned()
                        .collect()
                };
                for m in &members {
                    if let Some(n) = self.ix_of(m).filter(|n| !self.links.contains_key(n)) {
                        self.miss_release(n, &origin, packet_id);
                    }
                }
                let id = self.wait_for(ack, &linked);
                if id != 0 {
                    self.releases.insert(id, (origin.clone(), packet_id));
                }
                for n in linked {
                    wire::release(self.buf(n), id, origin.as_str(), packet_id);
                }
            }
            ToCluster::Rebuild {
                from,
                read_at,
                sessions,
                reply,
            } => self.start_rebuild(&from, read_at, sessions, reply),
            ToCluster::RetainedSet { node, items } => self.send_retained(node, items),
            ToCluster::Done { node, id, ok, .. } if node == REBUILD_NODE => {
                self.rebuild_answer(id, ok);
            }
            ToCluster::Done { node, id, ok, fate } => {
                if self.links.contains_key(&node) {
                    wire::pub_ack(self.buf(node), id, ok, fate);
                }
            }
        }
    }

    fn link_event(&mut self, e: LinkEvent) {
        match e {
            LinkEvent::Up {
                node,
                tx,
                queued,
                dead,
            } => {
                if !self.is_live(&node) {
                    return;
                }
                let Some(n) = self.ix_of(&node) else { return };
                self.links.insert(n, LinkOut { tx, queued, dead });
                // The whole set first: the peer forgets what it had of this node.
                let filters: Vec<Arc<str>> = self.local_routes.keys().cloned().collect();
                let b = self.buf(n);
                wire::routes_reset(b);
                for f in filters {
                    wire::route(b, true, 0, &f);
                }
                wire::routes_end(b);
                // The releases it missed, before any message.
                if let Some(missed) = self.missed_releases.remove(&n) {
                    let b = self.buf(n);
                    for (origin, pid) in missed {
                        wire::release(b, 0, origin.as_str(), pid);
                    }
                }
            }
            LinkEvent::Down { node } => {
                if let Some(&n) = self.ix.get(&node) {
                    self.link_down(n);
                }
            }
            LinkEvent::RouteApplied { acks, applied } => {
                self.barrier_busy = false;
                for (node, ack) in acks.into_iter().filter(|_| applied) {
                    if let Some(&n) = self.ix.get(&node) {
                        if self.links.contains_key(&n) {
                            wire::route_ack(self.buf(n), ack);
                        }
                    }
                }
            }
            LinkEvent::Frame { node, kind, body } => {
                // A name that is not a live member gets no number and is not listened
                // to (numbers are few, and kept for the run).
                if !self.is_live(&node) {
                    self.counters.bad_frames_total += 1;
                    return;
                }
                let Some(n) = self.ix_of(&node) else { return };
                match wire::decode(kind, body, Instant::now()) {
                    Ok(f) => self.frame(n, &node, f),
                    Err(e) => {
                        self.counters.bad_frames_total += 1;
                        tracing::warn!(node = %node, error = %e, "bad frame from a cluster node: dropped");
                    }
                }
            }
        }
    }

    fn frame(&mut self, n: NodeIx, node: &str, f: Frame) {
        match f {
            // A node's whole set replaces what the shards had of it in one step, at its
            // end: never a moment with part of it (a publish then would miss the rest).
            Frame::RoutesReset => {
                self.synced.remove(&n);
                self.incoming_sets
                    .insert(n, (hashbrown::HashSet::new(), Vec::new()));
            }
            Frame::RoutesEnd => {
                if let Some((set, acks)) = self.incoming_sets.remove(&n) {
                    let filters: Arc<Vec<Arc<str>>> = Arc::new(set.into_iter().collect());
                    self.post_all(FromCluster::ReplaceRoutes { node: n, filters });
                    for ack in acks {
                        self.answer_route_after_barrier(node, ack);
                    }
                }
                self.synced.insert(n);
            }
            Frame::Route { add, ack, filter } => {
                let filter: Arc<str> = filter.into();
                if let Some((set, acks)) = self.incoming_sets.get_mut(&n) {
                    if set.len() >= ROUTES_PER_NODE_MAX && add {
                        self.counters.bad_frames_total += 1;
                        return;
                    }
                    if add {
                        set.insert(filter);
                    } else {
                        set.remove(&filter);
                    }
                    if ack != 0 && acks.len() < ROUTES_PER_NODE_MAX {
                        acks.push(ack);
                    }
                    return;
                }
                self.post_all(FromCluster::Route {
                    node: n,
                    filter,
                    add,
                });
                if ack != 0 {
                    self.answer_route_after_barrier(node, ack);
                }
            }
            Frame::RouteAck(id) => self.route_ack_from(id, n),
            Frame::Release {
                id,
                origin,
                packet_id,
            } => {
                let shard = (stable_hash(origin.as_bytes()) % self.shards as u64) as usize;
                self.post(
                    shard,
                    FromCluster::Release {
                        node: n,
                        id: (id != 0).then_some(id),
                        origin,
                        packet_id,
                    },
                );
            }
            Frame::Publish { id, msg } => {
                self.counters.messages_received_total += 1;
                let key = msg
                    .origin
                    .as_ref()
                    .map_or(msg.topic.as_str(), |o| o.as_str());
                let shard = (stable_hash(key.as_bytes()) % self.shards as u64) as usize;
                self.post(
                    shard,
                    FromCluster::Publish {
                        node: n,
                        id: (id != 0).then_some(id),
                        msg,
                    },
                );
            }
            // The answer to a release (a failed one still counts: the key is stale at worst,
            // and a new message with DUP = 0 is never taken for it).
            Frame::PubAck { id, .. } if self.route_waits.contains_key(&id) => {
                self.route_ack_from(id, n);
            }
            Frame::PubAck { id, ok, .. }
                if self
                    .move_out
                    .as_ref()
                    .is_some_and(|m| m.node == n && m.sent.contains_key(&id)) =>
            {
                self.moved(id, ok);
            }
            Frame::Session {
                id,
                client_id,
                last,
                entries,
            } => self.session_part(n, id, client_id, last, entries),
            Frame::RetainedWanted => self.retained_wanted(n),
            Frame::Retained { version, msg } => self.retained_from(n, version, msg),
            Frame::RetainedEnd { cut_short } => self.retained_end(n, cut_short),
            Frame::MissedWanted { id, node } => self.missed_wanted(n, id, &node),
            Frame::Missed { id, last, releases } => self.missed_from(n, id, last, releases),
            // After the session's last part on this link: its shard has it (or refused it).
            Frame::Forget {
                client_id,
                origin,
                packet_id,
            } => {
                let shard = crate::session::owner_shard(client_id.as_bytes(), self.shards);
                self.post(
                    shard,
                    FromCluster::Forget {
                        client_id,
                        origin,
                        packet_id,
                    },
                );
            }
            Frame::PubAck { id, ok, fate } => {
                if let Some((from, r)) = self.pending.remove(&id) {
                    if from == n {
                        self.answer(r, ok, fate);
                    } else {
                        // Not the node it was sent to: keep waiting for the right one.
                        self.pending.insert(id, (from, r));
                        self.counters.bad_frames_total += 1;
                    }
                }
            }
        }
    }

    /// A link went down: what it carried fails now; routes waiting on it count it as done.
    fn link_down(&mut self, n: NodeIx) {
        self.retained_link_down(n);
        self.missed_link_down(n);
        self.moves_in.retain(|(from, _), _| *from != n);
        if self.move_out.as_ref().is_some_and(|m| m.node == n) {
            self.fail_move("the link went down");
        }
        let Some(link) = self.links.remove(&n) else {
            return;
        };
        link.dead.store(true, Ordering::Release);
        self.out.remove(&n);
        let failed: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (to, _))| *to == n)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            if let Some((_, r)) = self.pending.remove(&id) {
                self.counters.forward_failed_total += 1;
                self.answer(r, false, MAYBE_KEPT);
            }
        }
        let ids: Vec<u64> = self.route_waits.keys().copied().collect();
        for id in ids {
            self.wait_answered(id, n, false);
        }
    }

    /// `n` missed the release of (`origin`, `packet_id`): it gets it when its link is up.
    fn miss_release(&mut self, n: NodeIx, origin: &MqttStr, packet_id: Option<u16>) {
        let q = self.missed_releases.entry(n).or_default();
        if q.len() >= self.limits.missed_releases_max {
            q.pop_front();
            self.counters.releases_forgotten_total += 1;
        }
        q.push_back((origin.clone(), packet_id));
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.move_out.as_ref().is_some_and(|m| now >= m.deadline) {
            self.fail_move("timed out");
        }
        self.moves_in.retain(|_, m| now < m.deadline);
        self.forgets.prune(now);
        self.missed_tick(now);
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some((_, r)) = self.pending.remove(&id) {
                self.counters.forward_timeouts_total += 1;
                self.answer(r, false, MAYBE_KEPT);
            }
        }
        while let Some(&(at, id)) = self.route_deadlines.front() {
            if at > now {
                break;
            }
            self.route_deadlines.pop_front();
            // A node that is linked and late may still apply it: it is not replayed later
            // (that could delete a newer message's key with the same packet id).
            self.releases.remove(&id);
            if let Some((r, _, _)) = self.route_waits.remove(&id) {
                self.answer(r, true, Fate::default());
            }
        }
        // The member nodes (retained messages go to each of them).
        let live = self.live_others();
        let mut members = ShardSet::default();
        for id in live {
            if let Some(n) = self.ix_of(&id) {
                members.insert(n as usize);
            }
        }
        if members != self.members {
            self.members = members;
            self.post_all(FromCluster::Members(members));
        }
        self.update_slots();
        self.retained_sync_tick();
        self.counters.inflight = self.pending.len() as u64;
        self.handle.lock().plane = self.counters;
    }

    /// Whether every live node's routes have arrived (or the wait is over).
    fn gate_open(&mut self) -> bool {
        let Some(deadline) = self.gate else {
            return true;
        };
        let missing: Vec<String> = self
            .live_others()
            .into_iter()
            .filter(|id| !self.ix.get(id).is_some_and(|n| self.synced.contains(n)))
            .collect();
        if !missing.is_empty() {
            if Instant::now() < deadline {
                return false;
            }
            tracing::warn!(missing = %missing.join(","), "serving clients without these nodes' subscriptions (no link within 10 s)");
        }
        self.gate = None;
        true
    }

    /// Sends the shards a new slot map when the table, the live nodes or this node's
    /// standing changed.
    fn update_slots(&mut self) {
        let gate_open = self.gate_open();
        let (seen, table) = {
            let st = self.handle.lock();
            let mut live: Vec<(String, Option<std::net::SocketAddr>)> =
                st.live.values().map(|r| (r.id.clone(), r.relay)).collect();
            live.sort();
            let seen = SlotsSeen {
                epoch: st.slots.epoch,
                live,
                // Before the other nodes' routes are in, the shards get the map (so that
                // they drop sessions another node owns now) but serve nobody.
                serving: st.state == super::SelfState::Up && gate_open,
            };
            if self.slots_seen.as_ref() == Some(&seen) {
                return;
            }
            (seen, st.slots.clone())
        };
        let mut relay: Vec<Option<std::net::SocketAddr>> = Vec::new();
        for (id, addr) in &seen.live {
            if *id == self.me {
                continue;
            }
            if let Some(n) = self.ix_of(id) {
                if relay.len() <= n as usize {
                    relay.resize(n as usize + 1, None);
                }
                relay[n as usize] = *addr;
            }
        }
        let mut owner = vec![SLOT_NOWHERE; crate::session::ownership::SLOTS as usize];
        for r in &table.ranges {
            let o = if r.node == self.me {
                SLOT_HERE
            } else if seen.live.iter().any(|(id, _)| *id == r.node) {
                self.ix_of(&r.node).unwrap_or(SLOT_NOWHERE)
            } else {
                SLOT_NOWHERE
            };
            for slot in r.first..=r.last {
                if let Some(x) = owner.get_mut(slot as usize) {
                    *x = o;
                }
            }
        }
        let map = Arc::new(SlotMap {
            epoch: table.epoch,
            owner,
            relay,
            serving: seen.serving,
        });
        // A node that owns no slot and is down has no session anywhere (a fail-over gave
        // its slots away): its subscriptions are forgotten, or every message matching them
        // would fail for want of it. It sends its set again if it comes back.
        let owning = table.counts();
        let gone: Vec<NodeIx> = self
            .names
            .iter()
            .enumerate()
            .filter(|(_, id)| {
                !owning.contains_key(id.as_str()) && !seen.live.iter().any(|(l, _)| l == *id)
            })
            .map(|(i, _)| i as NodeIx)
            .collect();
        for node in gone {
            self.post_all(FromCluster::ClearRoutes { node });
        }
        tracing::debug!(
            epoch = map.epoch,
            serving = map.serving,
            live = seen.live.len(),
            "new slot map for the shards"
        );
        self.slots_seen = Some(seen);
        self.post_all(FromCluster::Slots(map));
    }

    /// Writes this pass's frames and posts.
    fn flush(&mut self) {
        let out = std::mem::take(&mut self.out);
        for (n, buf) in out {
            if buf.is_empty() {
                continue;
            }
            let Some(link) = self.links.get(&n) else {
                continue;
            };
            let len = buf.len();
            let queued = link.queued.fetch_add(len, Ordering::AcqRel) + len;
            if queued > self.limits.link_buffer_bytes_max || link.tx.send(buf.freeze()).is_err() {
                // The peer cannot keep up (or the link just went): start it again; it
                // resends its routes when it is back, and what it carried fails now.
                self.counters.link_resets_total += 1;
                tracing::warn!(node = %self.names[n as usize], queued, "cluster link over its buffer: reset");
                self.link_down(n);
            }
        }
        self.flush_posts();
        // After this pass's posts: the barrier queues behind them.
        self.start_barrier();
    }

    fn flush_posts(&mut self) {
        for s in 0..self.shards {
            if self.posts[s].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.posts[s]);
            if self
                .control
                .post(ShardId::new(s), Query::Cluster(batch))
                .is_err()
            {
                tracing::debug!(shard = s, "shard gone: cluster work dropped");
            }
        }
    }
}
