//! Several shardmq nodes acting as one broker: membership and slot ownership in etcd, and
//! the links between nodes.
//!
//! Everything here runs on one thread of its own (`shardmq-cluster`, a current-thread tokio
//! runtime, as the etcd client needs tokio); no shard waits on it and nothing on the
//! per-message path touches etcd. The parts:
//!
//! - `membership.rs`: the node's etcd lease (renewed every third of `cluster.lease_ttl_s`),
//!   its live record (`<prefix>/nodes/<id>`, tied to the lease), its permanent member record
//!   (`<prefix>/members/<id>`, so that a node that is gone is still listed as down) and the
//!   slot table (`<prefix>/slots`), all watched from one revision on.
//! - `slots.rs`: the slot table: which node owns each of the 4,096 slots a client id hashes
//!   to, with an epoch per range that rises on every change of owner.
//! - `link.rs`: one TCP link to every other live node, with a handshake and a heartbeat that
//!   measures its round trip.
//!
//! [`Cluster`] is the handle the broker keeps; [`ClusterHandle::view`] is what the admin
//! endpoint shows (`GET /api/cluster`, the `shardmq_cluster_*` metrics).

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::ClusterConfig;

mod link;
mod membership;
mod plane;
mod replica;
pub mod slots;
pub mod wire;

use crate::shard::api::{Append, ClusterLink, LeaseClock, ReplicaLink, ToCluster};
use crate::shard::service::BrokerShard;
pub use plane::PlaneCounters;
pub use replica::{ReplicaView, SnapshotDone, StreamView};

pub use slots::{slot_of, SlotTable, SLOTS};

/// What this node tells the others about itself (its live record in etcd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// The node-to-node address the others dial.
    pub cluster: SocketAddr,
    /// The client listeners (every transport).
    pub mqtt: Vec<SocketAddr>,
    /// The relay listener other nodes relay this node's clients to.
    #[serde(default)]
    pub relay: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// `up` or `leaving` (a node that stops gracefully says so before it goes).
    pub state: String,
    /// The lease's time to live, seconds: how long a stale record may outlive its node.
    pub lease_ttl_s: u32,
    /// When this incarnation started (ms since the Unix epoch).
    pub started_ms: u64,
}

/// Where this node can be reached, known once its sockets are bound.
#[derive(Clone, Debug)]
pub struct NodeAddrs {
    pub mqtt: Vec<SocketAddr>,
    /// The relay listener (see `broker::bind_relay_listener`).
    pub relay: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// This node's own standing in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SelfState {
    /// Registering with etcd.
    Joining,
    /// Holding its lease.
    Up,
    /// Could not renew its lease for longer than its time to live: it no longer counts as
    /// a member and must not serve what it owned until it has joined again.
    Fenced,
    /// Stopping gracefully.
    Leaving,
}

/// Another node as this one sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Up,
    Down,
    Leaving,
}

/// One link's health, as its dialling side measures it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkView {
    /// `up`, `connecting` or `down`.
    pub state: &'static str,
    /// The last heartbeat's round trip, microseconds.
    pub rtt_us: Option<u64>,
    /// Milliseconds since the link came up (or went down).
    pub since_ms: u64,
    /// Times the link was (re)established.
    pub connects_total: u64,
    /// The last reason it went down.
    pub last_error: Option<String>,
}

/// One member in `GET /api/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct MemberView {
    pub id: String,
    pub this_node: bool,
    pub state: MemberState,
    pub cluster: SocketAddr,
    pub mqtt: Vec<SocketAddr>,
    /// Where other nodes relay this node's clients.
    pub relay: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Slots of the 4,096 this node owns, and that as a share of sessions.
    pub slots: u32,
    pub share: f64,
    /// `None` for this node itself.
    pub link: Option<LinkView>,
    /// Its replicated stream (with `cluster.jetstream`), as last read (every few seconds).
    pub stream: Option<StreamView>,
}

/// `GET /api/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterView {
    pub node: String,
    pub state: SelfState,
    pub etcd: Vec<String>,
    pub prefix: String,
    pub lease_ttl_s: u32,
    /// Milliseconds since the lease was last renewed.
    pub lease_renewed_ms_ago: Option<u64>,
    /// The slot table's version (rises with every change of owner).
    pub slots_epoch: u64,
    pub members: Vec<MemberView>,
    pub counters: ClusterCounters,
    /// The data plane: messages forwarded to and received from other nodes.
    pub plane: PlaneCounters,
    /// This node's replication (`null`: sessions are not replicated): its stream, what
    /// waits for it (lag), the last snapshot.
    pub replication: Option<ReplicaView>,
}

/// Events worth counting (the `shardmq_cluster_*_total` series).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ClusterCounters {
    /// Times the lease was lost (fenced).
    pub lease_lost_total: u64,
    /// Times the node joined (registered with a fresh lease).
    pub joins_total: u64,
    /// etcd requests that failed (each retried).
    pub etcd_errors_total: u64,
    /// Times the watch was re-created (an etcd member went away, a compaction).
    pub watch_restarts_total: u64,
    /// Fail-overs this node made (a dead node's slots given to the live ones).
    pub failovers_total: u64,
}

/// The state shared between the cluster thread and its readers (the admin endpoint). Not
/// on any shard's path.
#[derive(Debug)]
struct State {
    me: String,
    cfg: ClusterConfig,
    state: SelfState,
    renewed: Option<Instant>,
    /// Live records by node id.
    live: hashbrown::HashMap<String, NodeRecord>,
    /// Every node that ever joined, by id (permanent records).
    members: std::collections::BTreeMap<String, NodeRecord>,
    slots: SlotTable,
    /// The etcd revision the slot table was last written at (for compare-and-swap).
    slots_rev: i64,
    links: hashbrown::HashMap<String, LinkView>,
    link_since: hashbrown::HashMap<String, Instant>,
    counters: ClusterCounters,
    plane: PlaneCounters,
    /// Since when each member that is not live has been silent (for fail-over): for a
    /// lease that expired, its last possible renewal (the expiry less its time to live);
    /// for one that left or was never seen live, when this node saw it down.
    down_since: hashbrown::HashMap<String, Instant>,
    /// Operator requests for the membership task.
    requests: Option<tokio::sync::mpsc::UnboundedSender<Request>>,
    /// This node's replication, when sessions are replicated.
    replica: Option<replica::ReplicaState>,
    /// Every member's stream, as last read.
    streams: hashbrown::HashMap<String, StreamView>,
}

/// What the admin endpoint asks of the membership task.
#[derive(Debug)]
pub(crate) enum Request {
    /// Give every slot of a node that is down to the live nodes.
    Failover {
        node: String,
        reply: tokio::sync::oneshot::Sender<Result<String, FailoverError>>,
    },
    /// A graceful leave: hand every slot of this node, with its sessions, to the others.
    HandOver {
        reply: std::sync::mpsc::Sender<Result<String, String>>,
    },
}

/// Why a fail-over was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailoverError {
    /// No such member.
    Unknown(String),
    /// The node holds its lease: it is serving.
    Live(String),
    /// This node cannot change the table now (not holding its lease, etcd away).
    Unavailable(String),
}

impl std::fmt::Display for FailoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailoverError::Unknown(m) | FailoverError::Live(m) | FailoverError::Unavailable(m) => {
                write!(f, "{m}")
            }
        }
    }
}

impl State {
    fn view(&self) -> ClusterView {
        let owned = self.slots.counts();
        let members = self
            .members
            .values()
            .map(|m| {
                let live = self.live.get(&m.id);
                let state = match live {
                    Some(r) if r.state == "leaving" => MemberState::Leaving,
                    Some(_) => MemberState::Up,
                    None => MemberState::Down,
                };
                let rec = live.unwrap_or(m);
                let slots = owned.get(m.id.as_str()).copied().unwrap_or(0);
                let link = (m.id != self.me).then(|| {
                    let mut l = self.links.get(&m.id).cloned().unwrap_or(LinkView {
                        state: "down",
                        ..LinkView::default()
                    });
                    if let Some(t) = self.link_since.get(&m.id) {
                        l.since_ms = t.elapsed().as_millis() as u64;
                    }
                    l
                });
                MemberView {
                    id: m.id.clone(),
                    this_node: m.id == self.me,
                    state,
                    cluster: rec.cluster,
                    mqtt: rec.mqtt.clone(),
                    relay: rec.relay,
                    admin: rec.admin,
                    slots,
                    share: slots as f64 / SLOTS as f64,
                    link,
                    stream: self.streams.get(&m.id).cloned(),
                }
            })
            .collect();
        ClusterView {
            node: self.me.clone(),
            state: self.state,
            etcd: self.cfg.etcd.clone(),
            prefix: self.cfg.prefix.clone(),
            lease_ttl_s: self.cfg.lease_ttl_s,
            lease_renewed_ms_ago: self.renewed.map(|t| t.elapsed().as_millis() as u64),
            slots_epoch: self.slots.epoch,
            members,
            counters: self.counters,
            plane: self.plane,
            replication: self
                .replica
                .as_ref()
                .map(|r| r.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        }
    }
}

/// A cheap, cloneable reader of the cluster's state.
#[derive(Clone, Debug)]
pub struct ClusterHandle(Arc<Mutex<State>>);

impl ClusterHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic on the cluster thread while it held the lock leaves a state that is
        // still readable: every update is a field assignment.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `GET /api/cluster` shows.
    pub fn view(&self) -> ClusterView {
        self.lock().view()
    }

    /// Before a graceful stop: hands every slot of this node, with its sessions, to the
    /// other live nodes; waits at most `bound`.
    pub fn hand_over(&self, bound: Duration) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self
            .lock()
            .requests
            .as_ref()
            .is_some_and(|r| r.send(Request::HandOver { reply: tx }).is_ok());
        if !sent {
            return Err("the cluster thread is not running".into());
        }
        rx.recv_timeout(bound)
            .unwrap_or_else(|_| Err(format!("not done within {bound:?}")))
    }

    /// Gives every slot of `node`, which must be down, to the live nodes (its sessions
    /// start over, empty, there); returns what moved.
    pub async fn failover(&self, node: &str) -> Result<String, FailoverError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.lock().requests.as_ref().is_some_and(|r| {
            r.send(Request::Failover {
                node: node.to_string(),
                reply: tx,
            })
            .is_ok()
        });
        if !sent {
            return Err(FailoverError::Unavailable(
                "the cluster thread is not running".into(),
            ));
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(r)) => r,
            _ => Err(FailoverError::Unavailable(
                "no answer from the cluster thread".into(),
            )),
        }
    }
}

/// What the ready line says about the cluster.
#[derive(Clone, Debug)]
pub struct Joined {
    pub node: String,
    pub etcd: Vec<String>,
    /// The live members seen at start, this node included, sorted.
    pub members: Vec<String>,
    /// The log this node's stores lack, read back from its own stream when the start asked
    /// for a restore ([`Disk::restore`]) and the node owns slots.
    pub restored: Option<crate::storage::replica::LastWords>,
    /// With replicated sessions: this node's stream and where it ended once the start
    /// (and its restore) read it; the stores hold everything up to there.
    pub stream_at_start: Option<(String, u64)>,
}

/// The running cluster thread.
#[derive(Debug)]
pub struct Cluster {
    handle: ClusterHandle,
    /// What each shard gets to reach the cluster thread.
    shard_link: ClusterLink,
    /// Hands the shards' control handle to the thread once the shards run.
    control: Option<tokio::sync::oneshot::Sender<shards::Control<BrokerShard>>>,
    /// The same, for the membership task (which moves slots between nodes).
    control_cell: Arc<std::sync::OnceLock<shards::Control<BrokerShard>>>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    /// Set by [`Cluster::stop`] when every shard ended in order (see `replica/clean.rs`).
    clean_stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub joined: Joined,
    /// The bound node-to-node address (port 0 resolved).
    pub link_addr: SocketAddr,
    /// The shards' stores, once open (snapshots of the replicated sessions read them).
    stores: Arc<std::sync::OnceLock<Vec<crate::storage::Store>>>,
}

/// The data directory as a starting node found it.
#[derive(Debug)]
pub struct Disk {
    /// It held no store yet (a new node, or one whose disk was lost).
    pub fresh: bool,
    pub data_dir: std::path::PathBuf,
    /// The clean-stop marker it held (read and deleted before any store opened).
    pub clean_at_start: Option<replica::clean::Marker>,
    /// The stores may lack acknowledged changes the node's stream holds (the last run was
    /// in `replicated` mode and did not stop in order): its marker, which says where in the
    /// stream the stores are; the log after that is read back ([`Joined::restored`]).
    pub restore: Option<CleanMarker>,
    /// `storage.durability = "replicated"`: the appender keeps the marker up to date.
    pub ahead: bool,
}

pub use replica::clean::Marker as CleanMarker;

/// Reads and deletes the clean-stop marker of `data_dir` (see `replica/clean.rs`): every
/// start does, clustered or not, before a store opens, so that a marker never outlives
/// the stop it speaks for. `shards`: this run's shard count (a marker of another count is
/// not trusted to skip the start snapshot: `None`, but the stop was still orderly, the
/// second value). `Err`: it could not be deleted (the start must not go on).
pub fn take_clean_marker(
    data_dir: &std::path::Path,
    shards: usize,
) -> Result<(Option<CleanMarker>, bool), String> {
    let path = replica::clean::path(data_dir);
    match replica::clean::take(&path) {
        Ok(m) => {
            let in_order = m.is_some();
            Ok((m.filter(|m| m.shards == shards), in_order))
        }
        Err(e) => Err(format!("cannot read and delete {}: {e}", path.display())),
    }
}

/// The `replicated`-mode marker's name in the data directory (see `replica/clean.rs`).
pub const STREAM_AHEAD_FILE: &str = replica::clean::AHEAD_FILE;

/// The `replicated`-mode marker of `data_dir` (see `replica/clean.rs`), if any. One line
/// naming the file when it cannot be read or parsed.
pub fn read_stream_ahead(data_dir: &std::path::Path) -> Result<Option<CleanMarker>, String> {
    replica::clean::read_ahead(data_dir).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            data_dir.join(STREAM_AHEAD_FILE).display()
        )
    })
}

/// Writes (`Some`) or deletes the `replicated`-mode marker of `data_dir`, durably.
pub fn write_stream_ahead(
    data_dir: &std::path::Path,
    marker: Option<&CleanMarker>,
) -> Result<(), String> {
    let done = match marker {
        Some(m) => replica::clean::write_ahead(data_dir, m),
        None => replica::clean::clear_ahead(data_dir),
    };
    done.map_err(|e| {
        format!(
            "cannot {} {}: {e}",
            if marker.is_some() { "write" } else { "delete" },
            data_dir.join(STREAM_AHEAD_FILE).display()
        )
    })
}

/// How long a graceful stop may spend telling etcd (marking itself leaving, revoking).
const LEAVE_GRACE: Duration = Duration::from_secs(3);

impl Cluster {
    /// Binds the node-to-node listener, registers with etcd (waiting, within a bound, for
    /// a previous incarnation's record to expire) and starts the thread that keeps the
    /// lease, watches the cluster and keeps the links. One line naming the problem when it
    /// cannot.
    /// `fresh_disk`: this node's data directory holds no store yet (a new node, or one
    /// whose disk was lost): with replicated sessions, a node that still owns slots and
    /// whose stream holds sessions refuses to start that way. `disk`: the data directory
    /// as it was found (see [`Disk`]).
    pub fn start(
        cfg: &ClusterConfig,
        addrs: NodeAddrs,
        packet_bytes_max: u32,
        disk: Disk,
    ) -> Result<Cluster, String> {
        let Disk {
            fresh: fresh_disk,
            data_dir,
            clean_at_start,
            restore,
            ahead,
        } = disk;
        let clean_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (Some(me), Some(listen)) = (cfg.node.clone(), cfg.listen) else {
            return Err("cluster.node and cluster.listen are required".into());
        };
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|e| format!("cannot listen on {listen} (cluster.listen): {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cluster.listen: {e}"))?;
        let link_addr = listener
            .local_addr()
            .map_err(|e| format!("cluster.listen: {e}"))?;
        let advertised = match cfg.advertise {
            Some(a) => a,
            None => link_addr,
        };
        let record = NodeRecord {
            id: me.clone(),
            cluster: advertised,
            mqtt: addrs.mqtt,
            // A wildcard listener is reached at the node's advertised address.
            relay: addrs.relay.map(|a| {
                if a.ip().is_unspecified() {
                    SocketAddr::new(advertised.ip(), a.port())
                } else {
                    a
                }
            }),
            admin: addrs.admin,
            state: "up".into(),
            lease_ttl_s: cfg.lease_ttl_s,
            started_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let state = Arc::new(Mutex::new(State {
            me: me.clone(),
            cfg: cfg.clone(),
            state: SelfState::Joining,
            renewed: None,
            live: hashbrown::HashMap::new(),
            members: std::collections::BTreeMap::new(),
            slots: SlotTable::default(),
            slots_rev: 0,
            links: hashbrown::HashMap::new(),
            link_since: hashbrown::HashMap::new(),
            counters: ClusterCounters::default(),
            plane: PlaneCounters::default(),
            down_since: hashbrown::HashMap::new(),
            requests: None,
            replica: None,
            streams: hashbrown::HashMap::new(),
        }));
        let handle = ClusterHandle(state);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (joined_tx, joined_rx) = mpsc::channel::<Result<Joined, String>>();
        let (data_tx, data_rx) =
            tokio::sync::mpsc::channel::<ToCluster>(cfg.forward_queue_max as usize);
        let (ctl_tx, ctl_rx) = tokio::sync::mpsc::unbounded_channel::<ToCluster>();
        let (replica_tx, replica_rx) = tokio::sync::mpsc::unbounded_channel::<Append>();
        let stores = Arc::new(std::sync::OnceLock::new());
        let (control_tx, control_rx) = tokio::sync::oneshot::channel();
        let lease = LeaseClock::default();
        let control_cell = Arc::new(std::sync::OnceLock::new());
        let thread_cell = control_cell.clone();
        let plane = membership::PlaneStart {
            data: data_rx,
            ctl: ctl_rx,
            control: control_rx,
            limits: plane::PlaneLimits {
                forward_timeout: Duration::from_millis(cfg.forward_timeout_ms as u64),
                inflight_max: cfg.forward_inflight_max as usize,
                link_buffer_bytes_max: cfg.link_buffer_bytes_max as usize,
                move_timeout: Duration::from_secs(cfg.move_timeout_s as u64),
                move_window_bytes: cfg.move_window_bytes as usize,
                moves_in_max: cfg.moves_in_max as usize,
                missed_releases_max: cfg.missed_releases_max as usize,
                // Records of up to the largest packet, parts within the frame bound.
                session_part_bytes: wire::SESSION_PART_BYTES.min(packet_bytes_max as usize),
            },
            // The largest MQTT packet, and room for the frame's own fields.
            frame_max: packet_bytes_max as usize + 64 * 1024,
        };
        let thread_handle = handle.clone();
        let thread_cfg = cfg.clone();
        let thread_lease = lease.clone();
        let thread_ctl = ctl_tx.clone();
        let thread_stores = stores.clone();
        let thread_clean_stop = clean_stop.clone();
        let thread = std::thread::Builder::new()
            .name("shardmq-cluster".into())
            .spawn(move || {
                rt.block_on(membership::run(
                    thread_cfg,
                    record,
                    thread_handle,
                    listener,
                    joined_tx,
                    stop_rx,
                    membership::Shared {
                        plane,
                        ctl: thread_ctl,
                        control: thread_cell,
                        lease: thread_lease,
                        replica: replica_rx,
                        fresh_disk,
                        stores: thread_stores,
                        clean_marker: replica::clean::path(&data_dir),
                        clean_at_start,
                        restore,
                        ahead: ahead.then(|| data_dir.clone()),
                        clean_stop: thread_clean_stop,
                    },
                ))
            })
            .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
        let mut cluster = Cluster {
            handle,
            shard_link: ClusterLink {
                data: data_tx,
                control: ctl_tx,
                lease,
                replica: cfg
                    .replicated()
                    .then(|| ReplicaLink(replica_tx, Arc::default())),
            },
            stores,
            control: Some(control_tx),
            control_cell,
            stop: Some(stop_tx),
            clean_stop,
            thread: Some(thread),
            joined: Joined {
                node: me,
                etcd: cfg.etcd.clone(),
                members: Vec::new(),
                restored: None,
                stream_at_start: None,
            },
            link_addr,
        };
        match joined_rx.recv() {
            Ok(Ok(j)) => {
                cluster.joined = j;
                Ok(cluster)
            }
            Ok(Err(e)) => {
                cluster.halt();
                Err(e)
            }
            Err(_) => {
                cluster.halt();
                Err("the cluster thread ended before joining".into())
            }
        }
    }

    /// The log read back from this node's stream for a restore ([`Disk::restore`]), once:
    /// `None` when no restore was asked for, the node owns no slot, or the stream ends
    /// before the stores (they are kept).
    pub fn take_restored(&mut self) -> Option<crate::storage::replica::LastWords> {
        self.joined.restored.take()
    }

    /// The shards' stores (for snapshots of the replicated sessions).
    pub fn set_stores(&self, stores: Vec<crate::storage::Store>) {
        let _ = self.stores.set(stores);
    }

    /// What each shard gets to reach the cluster thread.
    pub fn shard_link(&self) -> ClusterLink {
        self.shard_link.clone()
    }

    /// Starts the data plane once the shards run (until then, links come up and routes
    /// wait).
    pub fn attach(&mut self, control: shards::Control<BrokerShard>) {
        let _ = self.control_cell.set(control.clone());
        if let Some(tx) = self.control.take() {
            let _ = tx.send(control);
        }
    }

    /// A reader of the cluster's state.
    pub fn handle(&self) -> ClusterHandle {
        self.handle.clone()
    }

    /// Leaves the cluster gracefully (marks this node leaving, revokes its lease, so the
    /// others see it gone at once) and waits for the thread. Called once every shard has
    /// ended; `shards_ended_in_order`: none of them failed. Then, with replicated
    /// sessions, a stream that holds what the stores do is noted for the next start (the
    /// clean-stop marker).
    pub fn stop(mut self, shards_ended_in_order: bool) {
        // A shard that ended with changes not surely in the stream says so on the link.
        let left_behind = self
            .shard_link
            .replica
            .as_ref()
            .is_some_and(|r| r.1.load(std::sync::atomic::Ordering::Acquire));
        self.clean_stop.store(
            shards_ended_in_order && !left_behind,
            std::sync::atomic::Ordering::Release,
        );
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.halt();
    }
}
