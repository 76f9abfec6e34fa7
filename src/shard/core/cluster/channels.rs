//! What crosses between a shard and the cluster thread: the messages each way
//! ([`ToCluster`], [`FromCluster`]), the channels ([`ClusterLink`], [`ReplicaLink`] with its
//! [`Append`]s), the slot map the shards route clients by, and the lease clock.

use super::*;

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
        /// The shared groups each node delivers it to (no others).
        groups: Option<NodeGroups>,
    },
    /// This shard has (`add`) or no longer has subscribers of `filter` (a plain filter, or
    /// the key of a shared group homed here); with `ack`, answer once every live node
    /// applied it (a SUBACK waits for that).
    Route {
        filter: Arc<str>,
        shard: u16,
        add: bool,
        ack: Option<Reply>,
    },
    /// Forget the QoS 2 dedup key (`origin`, `packet_id`) (`None`: every key of `origin`)
    /// on every other node; with `ack`, answer once every linked node has, durably.
    Release {
        origin: MqttStr,
        packet_id: Option<u16>,
        ack: Option<Reply>,
    },
    /// From the membership thread: send these sessions (read on the shards) to the node
    /// `to`; `reply` gets how many it stored, or why the move failed.
    Move {
        to: String,
        sessions: Box<crate::shard::api::MovedSessions>,
        /// When the shards were asked to read them: a [`ToCluster::Forget`] since then
        /// may be about a key the read still holds.
        read_at: Instant,
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    },
    /// A session moving away forgot the QoS 2 key (`origin`, `packet_id`) (its publisher
    /// released it) at `at`, after it may have been read for the move: the node it moves to
    /// must forget it too (that node may have had the release before the session came).
    Forget {
        client_id: MqttStr,
        origin: MqttStr,
        packet_id: u16,
        at: Instant,
    },
    /// From the membership thread: store these sessions here (rebuilt from a failed
    /// node's replicated stream); `reply` gets how many were stored, or why not all.
    Rebuild {
        /// The failed node they come from, and when its stream was read.
        from: String,
        read_at: Instant,
        sessions: Vec<(String, Vec<crate::storage::ClientEntry>)>,
        reply: tokio::sync::oneshot::Sender<Result<usize, String>>,
    },
    /// Every retained message this node holds (but `$SYS`), with the version of its
    /// write, for `node` (which asked: it has just started).
    RetainedSet {
        node: NodeIx,
        items: Vec<(SharedMessage, RetainVersion)>,
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
    /// Another node's publisher released a QoS 2 key: forget it on every shard here; with
    /// `id`, answer it once durable.
    Release {
        node: NodeIx,
        id: Option<u64>,
        origin: MqttStr,
        packet_id: Option<u16>,
    },
    /// `node` has (`add`) or no longer has subscribers of `filter`.
    Route {
        node: NodeIx,
        filter: Arc<str>,
        add: bool,
    },
    /// Forget every filter of `node` (it has no session anywhere now).
    ClearRoutes { node: NodeIx },
    /// `node`'s whole set of filters now, replacing what this shard had of it.
    ReplaceRoutes {
        node: NodeIx,
        filters: Arc<Vec<Arc<str>>>,
    },
    /// The nodes that are members now (retained messages go to each of them).
    Members(ShardSet),
    /// Who owns which slot now, and whether this node may serve its own.
    Slots(Arc<SlotMap>),
    /// Serve no new session in these slots (`on`: they are about to move to another node)
    /// until they are not this node's any more; or serve them again (`!on`).
    Hold { bits: Arc<SlotBits>, on: bool },
    /// The sessions of these slots move to another node (`on`): disconnect their clients
    /// (MQTT 5: with `rc`) and store nothing new for them until the slots are not this
    /// node's any more; or the move was given up (`!on`).
    Moving {
        bits: Arc<SlotBits>,
        on: bool,
        rc: ReasonCode,
    },
    /// The node `client_id`'s session moved here from forgot the QoS 2 key (`origin`,
    /// `packet_id`) after reading it for the move ([`ToCluster::Forget`]).
    Forget {
        client_id: MqttStr,
        origin: MqttStr,
        packet_id: u16,
    },
    /// `node` asks for every retained message this node holds ([`ToCluster::RetainedSet`]).
    RetainedWanted { node: NodeIx },
    /// A retained message another node holds, with its write's version: kept on every
    /// shard (and stored at its home) if newer than the one here; delivered to nobody.
    Retained {
        msg: SharedMessage,
        version: RetainVersion,
    },
    /// A session moved here from `node` (its records, as stored there): store it, route
    /// its subscriptions here on every node, then answer `id`.
    Adopt {
        node: NodeIx,
        id: u64,
        client_id: String,
        entries: Arc<Vec<crate::storage::ClientEntry>>,
        /// For a session rebuilt from a failed node's stream: when the stream was read
        /// (the node was fenced before). A QoS 2 release since then is newer than every
        /// key the stream holds; one before it is in the stream already, if the node had it.
        read_at: Option<Instant>,
    },
}

/// A slot owned by this node (in [`SlotMap::owner`]).
pub const SLOT_HERE: u16 = u16::MAX;
/// A slot whose owner cannot be reached now (no live record, no relay address).
pub const SLOT_NOWHERE: u16 = u16::MAX - 1;

/// The slot table as the shards use it: per slot, this node, another node's index, or
/// nowhere; per node index, the address its client connections are relayed to.
#[derive(Debug, Default)]
pub struct SlotMap {
    /// The slot table's epoch this map was made from.
    pub epoch: u64,
    /// Indexed by slot (`cluster::slot_of`), [`SLOTS`](crate::cluster::SLOTS) entries.
    pub owner: Vec<u16>,
    /// Indexed by node index: the plain TCP listener of that node.
    pub relay: Vec<Option<std::net::SocketAddr>>,
    /// This node holds its lease: it may serve the slots it owns. A fenced node refuses
    /// every CONNECT and has closed its clients.
    pub serving: bool,
}

/// Where a client is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On this node.
    Here,
    /// Relayed to another node's client listener.
    Node(std::net::SocketAddr),
    /// Nowhere now: answered "server unavailable" (the client retries).
    Unavailable,
}

/// The channels to the cluster thread: `data` (bounded: publishes) and `control`
/// (routes and answers, which must not be lost; as many as filters and messages under way).
#[derive(Clone, Debug)]
pub struct ClusterLink {
    pub data: tokio::sync::mpsc::Sender<ToCluster>,
    pub control: tokio::sync::mpsc::UnboundedSender<ToCluster>,
    /// Until when this node's lease surely holds, by this node's clock (see [`LeaseClock`]):
    /// past it, no CONNECT is served here, whatever the cluster thread has said so far (a
    /// node resumed after a freeze must not serve before it has heard from etcd).
    pub lease: LeaseClock,
    /// With replicated sessions: where each group commit's changes go before its
    /// acknowledgements (see `cluster/replica.rs`).
    pub replica: Option<ReplicaLink>,
}

/// One group commit's changes for the replication log, answered once they are in the
/// replicated stream (`Err`: not there, or not known to be: the acknowledgements fail).
#[derive(Debug)]
pub struct Append {
    pub shard: usize,
    pub units: Vec<Vec<u8>>,
    /// The shard dropped changes that failed to go (past
    /// `cluster.replication_pending_bytes_max`): the stream lacks them until a snapshot.
    pub gap: bool,
    pub reply: futures_channel::oneshot::Sender<Result<(), AppendFailed>>,
}

/// Why an append failed, with its units back: they are in the store and not (surely) in
/// the stream, so they go again with the next group commit (unless the node was fenced:
/// its stream is not its own any more).
#[derive(Debug)]
pub struct AppendFailed {
    pub why: String,
    pub fenced: bool,
    pub units: Vec<Vec<u8>>,
}

/// The shards' way into the replication log (one append in flight per shard: its group
/// commit waits for the answer), and the flag a shard sets when it ends with changes its
/// store holds and the stream may not (then no clean-stop marker is written).
#[derive(Clone, Debug)]
pub struct ReplicaLink(
    pub tokio::sync::mpsc::UnboundedSender<Append>,
    pub Arc<std::sync::atomic::AtomicBool>,
);

impl ReplicaLink {
    /// Hands `units` to the replication log; the answer says whether they are in it.
    pub fn append(
        &self,
        shard: usize,
        units: Vec<Vec<u8>>,
        gap: bool,
    ) -> futures_channel::oneshot::Receiver<Result<(), AppendFailed>> {
        let (reply, rx) = futures_channel::oneshot::channel();
        // A closed channel drops `reply`: the receiver sees the append fail.
        let _ = self.0.send(Append {
            shard,
            units,
            gap,
            reply,
        });
        rx
    }
}

/// A lease deadline shared by the cluster thread (which moves it on every renewal) and
/// the shards (which read it for every CONNECT): one atomic, milliseconds since `origin`.
#[derive(Clone, Debug)]
pub struct LeaseClock {
    origin: Instant,
    until_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for LeaseClock {
    fn default() -> Self {
        LeaseClock {
            origin: Instant::now(),
            until_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }
}

impl LeaseClock {
    /// The lease holds until `t`.
    pub fn hold_until(&self, t: Instant) {
        let ms = t.saturating_duration_since(self.origin).as_millis() as u64;
        self.until_ms
            .store(ms, std::sync::atomic::Ordering::Release);
    }

    /// The lease is gone (fenced, leaving).
    pub fn drop_now(&self) {
        self.until_ms.store(0, std::sync::atomic::Ordering::Release);
    }

    /// Whether the lease surely holds at `now`.
    pub fn holds(&self, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        ms < self.until_ms.load(std::sync::atomic::Ordering::Acquire)
    }
}
