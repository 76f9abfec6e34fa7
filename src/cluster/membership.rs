//! The node's life in etcd: join (lease, live record, member record, slot table), keep the
//! lease, watch every key of the cluster from one revision on, rejoin after a lost lease,
//! leave gracefully.
//!
//! Keys under `cluster.prefix` (values are JSON, readable with `etcdctl get --prefix`):
//! - `nodes/<id>`: the live record ([`NodeRecord`]), tied to the node's lease, so it goes
//!   when the node stops renewing. Created only if absent: two live processes can never
//!   hold one node id.
//! - `members/<id>`: the permanent record of every node that joined (no lease), so that a
//!   node that is gone is listed as down, not forgotten. Written at start only if changed.
//! - `slots`: the [`SlotTable`], created by the first node, changed by compare-and-swap.
//!
//! In steady state etcd sees only the lease's keep-alives: no connect, subscribe or
//! publish touches it.

use std::sync::{mpsc, Arc, OnceLock};

use shards::Control;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::watch;

use super::plane::{self, PlaneLimits};
use super::{link, ClusterHandle, Joined, NodeRecord, SelfState, SlotTable, LEAVE_GRACE};
use crate::session::ownership::SLOTS;
use crate::shard::api::{Answer, FromCluster, LeaseClock, Query, SlotBits, ToCluster};
use crate::shard::service::BrokerShard;

mod failover;
mod lease;
mod moves;

use moves::*;

/// What the data plane starts with (see `plane.rs`).
pub(super) struct PlaneStart {
    pub data: tokio::sync::mpsc::Receiver<ToCluster>,
    pub ctl: tokio::sync::mpsc::UnboundedReceiver<ToCluster>,
    pub control: tokio::sync::oneshot::Receiver<shards::Control<BrokerShard>>,
    pub limits: PlaneLimits,
    pub frame_max: usize,
}

/// What the thread shares with the rest of the broker.
pub(super) struct Shared {
    pub plane: PlaneStart,
    /// To the data plane (moves of sessions).
    pub ctl: tokio::sync::mpsc::UnboundedSender<ToCluster>,
    /// The shards' control handle, once they run (to move slots).
    pub control: Arc<OnceLock<Control<BrokerShard>>>,
    /// Until when the lease surely holds, for the shards.
    pub lease: LeaseClock,
    /// The shards' appends to the replicated stream (used only with `cluster.jetstream`).
    pub replica: tokio::sync::mpsc::UnboundedReceiver<crate::shard::api::Append>,
    /// The data directory held no store at start.
    pub fresh_disk: bool,
    /// The shards' stores, once open (snapshots read them).
    pub stores: Arc<OnceLock<Vec<crate::storage::Store>>>,
    /// The clean-stop marker's path (see `replica/clean.rs`), and what it said at start
    /// (read and deleted before any store opened).
    pub clean_marker: std::path::PathBuf,
    pub clean_at_start: Option<super::replica::clean::Marker>,
    /// Read this node's stream back for the stores (see [`super::Disk::restore`]).
    pub restore: Option<super::replica::clean::Marker>,
    /// `replicated` mode: the data directory whose marker the appender keeps up to date.
    pub ahead: Option<std::path::PathBuf>,
    /// Set by an orderly stop once every shard has ended (their last appends answered).
    pub clean_stop: Arc<std::sync::atomic::AtomicBool>,
}

/// The data plane's control channel.
type Ctl = tokio::sync::mpsc::UnboundedSender<ToCluster>;

/// Slots with sessions moved to a member in one step while the shares even out (each
/// step's sessions are refused new messages until they are in).
const MOVE_BATCH_SLOTS: usize = 64;

/// Link events waiting for the plane; past it, inbound links wait.
const LINK_EVENTS_MAX: usize = 1024;
use crate::config::ClusterConfig;

/// How often a node looks at whether it holds more than its share of the slots.
const BALANCE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the members' replicated streams are looked at (for `GET /api/cluster`).
const STREAMS_EVERY: Duration = Duration::from_secs(5);
/// After a try that moved nothing, how long before the next.
const BALANCE_BACKOFF: Duration = Duration::from_secs(10);

/// How long an etcd member that refused a connection is left out of the rotation.
const ENDPOINT_REST: Duration = Duration::from_secs(10);

/// How soon a failed keep-alive is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(200);

/// How long to wait between two tries of a failed etcd request.
const RETRY: Duration = Duration::from_millis(500);

/// The cluster's keys.
struct Keys {
    root: String,
}

impl Keys {
    fn node(&self, id: &str) -> String {
        format!("{}/nodes/{id}", self.root)
    }
    fn member(&self, id: &str) -> String {
        format!("{}/members/{id}", self.root)
    }
    fn slots(&self) -> String {
        format!("{}/slots", self.root)
    }
    fn all(&self) -> String {
        format!("{}/", self.root)
    }
}

/// The thread's whole life: join, then keep the lease and the watch until `stop`.
pub(super) async fn run(
    cfg: ClusterConfig,
    record: NodeRecord,
    handle: ClusterHandle,
    listener: std::net::TcpListener,
    joined: mpsc::Sender<Result<Joined, String>>,
    mut stop: watch::Receiver<bool>,
    shared: Shared,
) {
    let Shared {
        plane: start,
        ctl,
        control,
        lease,
        replica: appends,
        fresh_disk,
        stores,
        clean_marker,
        clean_at_start,
        restore,
        ahead,
        clean_stop,
    } = shared;
    let keys = Keys {
        root: cfg.prefix.clone(),
    };
    let mut node = match Node::join(&cfg, &keys, record, &handle, lease).await {
        Ok(n) => n,
        Err(e) => {
            let _ = joined.send(Err(e));
            return;
        }
    };
    let mut revision = match node.load(&keys, &handle).await {
        Ok(r) => r,
        Err(e) => {
            let _ = joined.send(Err(e));
            return;
        }
    };
    let (mut restored, mut stream_at_start) = (None, None);
    if cfg.replicated() {
        // Renewing meanwhile: JetStream may take a while (a new stream elects its leader).
        let me = node.record.id.clone();
        let started = start_replica(
            &cfg,
            &me,
            &handle,
            fresh_disk,
            stores.clone(),
            clean_at_start.clone(),
            (restore, ahead),
        );
        match node.renewing(&keys, &handle, started).await {
            Ok((r, appender, read_back)) => {
                stream_at_start = Some((appender.stream_name(), appender.last_seq()));
                restored = read_back;
                handle.lock().replica = Some(r.state.clone());
                // Off the membership loop: a NATS server that does not answer must not
                // hold up the lease's renewals.
                tokio::spawn(read_streams(
                    r.clone(),
                    handle.clone(),
                    node.timeout,
                    stop.clone(),
                ));
                node.replica = Some(r);
                tokio::spawn(appender.run(appends));
            }
            Err(e) => {
                node.leave(&keys, &handle).await;
                let _ = joined.send(Err(e));
                return;
            }
        }
    }
    let members = {
        let st = handle.lock();
        let mut m: Vec<String> = st.live.keys().cloned().collect();
        m.sort();
        m
    };
    tracing::info!(node = %node.record.id, members = %members.join(","), "joined the cluster");
    let _ = joined.send(Ok(Joined {
        node: node.record.id.clone(),
        etcd: cfg.etcd.clone(),
        members,
        restored,
        stream_at_start,
    }));

    let (events_tx, events_rx) = tokio::sync::mpsc::channel(LINK_EVENTS_MAX);
    let links = link::start(
        listener,
        handle.clone(),
        cfg.clone(),
        stop.clone(),
        events_tx.clone(),
        start.frame_max,
    );
    let plane_handle = handle.clone();
    let plane_stop = stop.clone();
    let plane = tokio::spawn(async move {
        // The shards run once the broker has started them.
        let Ok(control) = start.control.await else {
            return;
        };
        let inputs = plane::Inputs {
            data: start.data,
            ctl: start.ctl,
            links: events_rx,
            events: events_tx,
        };
        plane::run(control, plane_handle, start.limits, inputs, plane_stop).await;
    });
    let mut watch = node.watch(&keys, revision).await;
    let mut renew = tokio::time::interval(renew_interval(&cfg));
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut balance = tokio::time::interval(BALANCE_INTERVAL);
    balance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut balance_after = Instant::now();
    let (req_tx, mut requests) = tokio::sync::mpsc::unbounded_channel();
    handle.lock().requests = Some(req_tx);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(req) = requests.recv() => match req {
                super::Request::Failover { node: gone, reply } => {
                    let r = node.failover(&keys, &handle, &ctl, &gone, "an operator's request").await;
                    let _ = reply.send(r);
                }
                super::Request::HandOver { reply } => {
                    let r = match control.get() {
                        Some(c) => node.hand_over(&keys, &handle, c, &ctl).await,
                        None => Err("the shards are not running".into()),
                    };
                    let _ = reply.send(r);
                }
            },
            _ = renew.tick() => node.renew(&keys, &handle, &cfg).await,
            _ = balance.tick() => {
                node.automatic_failover(&keys, &handle, &ctl, cfg.failover_after_s).await;
                if let Some(c) = control.get() {
                    if Instant::now() >= balance_after && !node.rebalance(&keys, &handle, c, &ctl).await {
                        // Nothing could move (every slot offered holds a session): not
                        // again for a while, as each try asks every shard.
                        balance_after = Instant::now() + BALANCE_BACKOFF;
                    }
                }
            }
            msg = next_event(&mut watch) => {
                match msg {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            // Compacted past our revision: read everything again.
                            handle.lock().counters.watch_restarts_total += 1;
                            revision = node.load(&keys, &handle).await.unwrap_or(revision);
                            watch = node.watch(&keys, revision).await;
                            continue;
                        }
                        if let Some(h) = resp.header() {
                            revision = revision.max(h.revision());
                        }
                        node.apply(&keys, &handle, resp.events());
                    }
                    Ok(None) | Err(_) => {
                        handle.lock().counters.watch_restarts_total += 1;
                        tokio::time::sleep(RETRY).await;
                        watch = node.watch(&keys, revision).await;
                    }
                }
            }
        }
    }
    // An orderly stop, every shard ended: if the stream holds what the stores do, say so
    // for the next start (no start snapshot then).
    if clean_stop.load(std::sync::atomic::Ordering::Acquire) {
        let shards = stores.get().map_or(0, Vec::len);
        let marker = node.replica.as_ref().and_then(|r| {
            let v = r.state.lock().ok()?;
            Some(super::replica::clean::Marker {
                stream: v.stream.clone(),
                last_seq: v.clean_seq?,
                shards,
                created: v.stream_created,
            })
        });
        if let Some(m) = marker.filter(|m| m.shards > 0) {
            match super::replica::clean::write(&clean_marker, &m) {
                Ok(()) => tracing::info!(
                    last_seq = m.last_seq,
                    "stopped with the replicated stream holding what the stores do"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the clean-stop marker: the next start writes a snapshot first")
                }
            }
        }
    }
    node.leave(&keys, &handle).await;
    links.abort();
    plane.abort();
}

/// Connects to JetStream and starts this node's appender. A node whose data directory is
/// new while it still owns slots and its stream holds sessions would serve them empty:
/// refused with one line saying what to do. `restore`: the stores may lack acknowledged
/// changes of the stream after the marker's sequence (see [`super::Disk::restore`]): when
/// the node owns slots, the log after it is read back (the third value), before any
/// append. `ahead`: the data directory whose `replicated`-mode marker the appender keeps.
async fn start_replica(
    cfg: &ClusterConfig,
    me: &str,
    handle: &ClusterHandle,
    fresh_disk: bool,
    stores: Arc<OnceLock<Vec<crate::storage::Store>>>,
    clean: Option<super::replica::clean::Marker>,
    (restore, ahead): (
        Option<super::replica::clean::Marker>,
        Option<std::path::PathBuf>,
    ),
) -> Result<ReplicaStarted, String> {
    let r = super::replica::Replica::connect(cfg, me).await?;
    let owned = handle.lock().slots.counts().get(me).copied().unwrap_or(0);
    // A stream that has just been made (or a JetStream cluster electing its leaders)
    // answers with timeouts for a while: tried again within a bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            if fresh_disk && owned > 0 && r.holds_sessions(me).await? {
                return Ok::<_, String>(Err(format!(
                    "the data directory is new, but node {me} still owns {owned} slots and its replicated stream holds their sessions: \
                     fail it over from another node first (POST /api/cluster/nodes/{me}/failover) or restore the directory"
                )));
            }
            let appender = super::replica::Appender::start(
                r.clone(),
                me,
                owned > 0,
                clean.clone(),
                cfg.snapshot_log_bytes,
                stores.clone(),
                handle.clone(),
                ahead.clone(),
            )
            .await?;
            let Some(at) = restore.as_ref().filter(|_| owned > 0) else {
                return Ok(Ok((r.clone(), appender, None)));
            };
            match restore_from_stream(&r, me, at, &appender).await? {
                Ok(read) => Ok(Ok((r.clone(), appender, read))),
                Err(refused) => Ok(Err(refused)),
            }
        };
        match attempt.await {
            Ok(Ok(started)) => return Ok(started),
            Ok(Err(refused)) => return Err(refused),
            // Beyond the rebuild bound it will not fit the next time either.
            Err(e) if e.contains("rebuild_bytes_max") => return Err(e),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "JetStream not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The log this node's stores lack after a stop that may have lost writes it acknowledged
/// from its stream (`at`: its `replicated`-mode marker, where the stores durably are).
/// `Ok(Ok(None))`: nothing to apply, the stores are kept (the stream ends before them: it
/// lost what they hold, and the start snapshot puts it back). `Ok(Err(line))`: the start
/// must stop (the marker names another stream; the log after it was trimmed; damaged
/// units).
async fn restore_from_stream(
    r: &super::replica::Replica,
    me: &str,
    at: &super::replica::clean::Marker,
    appender: &super::replica::Appender,
) -> Result<Result<Option<crate::storage::replica::LastWords>, String>, String> {
    let stream = appender.stream_name();
    if at.stream != stream {
        return Ok(Err(format!(
            "the stores must be brought up to node {me}'s replicated stream (the last run acknowledged from it and did not stop in order), \
             but its marker names stream {} and this configuration's is {stream}: start it with the configuration of that run",
            at.stream
        )));
    }
    let last = appender.last_seq();
    if last < at.last_seq {
        tracing::warn!(
            stream_ends = last,
            stores_at = at.last_seq,
            "the replicated stream ends before what the stores hold (it lost messages): the stores are kept, and the start snapshot writes them to it"
        );
        return Ok(Ok(None));
    }
    let started = Instant::now();
    let Some(words) = r.read_log_after(me, at.last_seq).await? else {
        return Ok(Err(format!(
            "the stores must be brought up to node {me}'s replicated stream from sequence {}, but its log was trimmed past that point: \
             restore the data directory, or fail the node over from another node and start it with an empty one",
            at.last_seq
        )));
    };
    if words.damaged > 0 {
        return Ok(Err(format!(
            "the stores must be brought up to node {me}'s replicated stream, but {} of its units after sequence {} are damaged: \
             restore the data directory, or fail the node over from another node and start it with an empty one",
            words.damaged, at.last_seq
        )));
    }
    tracing::info!(
        from = at.last_seq + 1,
        to = last,
        units = words.units,
        keys = words.len(),
        ms = started.elapsed().as_millis() as u64,
        "read this node's replicated log after what its stores durably hold, to apply to them"
    );
    Ok(Ok(Some(words)))
}

/// What [`start_replica`] gives: the connection, the appender, and the log read back for a
/// restore.
type ReplicaStarted = (
    super::replica::Replica,
    super::replica::Appender,
    Option<crate::storage::replica::LastWords>,
);

/// Reads every member's stream state (with replicated sessions) for the admin view, every
/// `STREAMS_EVERY`, until the node stops.
async fn read_streams(
    r: super::replica::Replica,
    handle: ClusterHandle,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(STREAMS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = every.tick() => {}
        }
        let members: Vec<String> = handle.lock().members.keys().cloned().collect();
        let mut views = hashbrown::HashMap::new();
        for m in members {
            let read = tokio::time::timeout(timeout, r.stream_view(&m)).await;
            if let Ok(Ok(Some(v))) = read {
                views.insert(m, v);
            }
        }
        handle.lock().streams = views;
    }
}

/// Waits for the watch's next response; pending forever while there is no watch (the loop
/// re-creates it on the next failure path).
async fn next_event(
    watch: &mut Option<WatchStream>,
) -> Result<Option<etcd_client::WatchResponse>, etcd_client::Error> {
    match watch {
        Some(w) => w.message().await,
        None => {
            tokio::time::sleep(RETRY).await;
            Ok(None)
        }
    }
}

/// A third of the lease's time to live, at least a second.
fn renew_interval(cfg: &ClusterConfig) -> Duration {
    Duration::from_millis((cfg.lease_ttl_s as u64 * 1000 / 3).max(1000))
}

/// This node's etcd client, lease and record.
struct Node {
    client: Client,
    /// The etcd endpoints configured, and those left out for a while (unreachable).
    urls: Vec<String>,
    rested: Vec<(String, Instant)>,
    lease: i64,
    /// When the lease was last granted or renewed (asked for: etcd counts from a moment
    /// after it), and the shards' copy of its deadline.
    lease_at: Instant,
    /// The etcd revision at which this node's record was last put back (`claim`): the
    /// watch may still deliver the deletion of the record before it (a lagging watch after
    /// a freeze), which must not fence the node that has just joined again.
    claimed_rev: i64,
    clock: LeaseClock,
    record: NodeRecord,
    timeout: Duration,
    /// `cluster.move_timeout_s`.
    move_timeout_s: u32,
    /// The settings (the lease is renewed while a move waits).
    cfg: ClusterConfig,
    /// JetStream, when sessions are replicated (fail-overs rebuild from it).
    replica: Option<super::replica::Replica>,
    /// Automatic fail-overs that failed, by member: tries so far, and when the next may
    /// be made.
    failover_tries: hashbrown::HashMap<String, (u32, Instant)>,
    /// The node's state (a keep-alive made while an etcd call waits is recorded in it).
    handle: ClusterHandle,
}

impl Node {
    /// Connects, takes a lease, claims the node id, records the member, makes sure the
    /// slot table exists.
    async fn join(
        cfg: &ClusterConfig,
        keys: &Keys,
        record: NodeRecord,
        handle: &ClusterHandle,
        clock: LeaseClock,
    ) -> Result<Node, String> {
        let timeout = Duration::from_secs(cfg.etcd_timeout_s as u64);
        let urls = cfg.etcd.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            // etcd drops clients that ping more often than every 5 s.
            .with_keep_alive(Duration::from_secs(10), timeout);
        let client = tokio::time::timeout(timeout, Client::connect(&cfg.etcd, Some(opts)))
            .await
            .map_err(|_| format!("cannot reach etcd at {urls} (cluster.etcd): timed out"))?
            .map_err(|e| format!("cannot reach etcd at {urls} (cluster.etcd): {e}"))?;
        let mut node = Node {
            client,
            urls: cfg.etcd.clone(),
            rested: Vec::new(),
            lease: 0,
            lease_at: Instant::now(),
            claimed_rev: 0,
            clock,
            record,
            timeout,
            move_timeout_s: cfg.move_timeout_s,
            cfg: cfg.clone(),
            replica: None,
            failover_tries: hashbrown::HashMap::new(),
            handle: handle.clone(),
        };
        // Every etcd member may still be electing a leader: retry within a bound.
        let deadline = Instant::now() + timeout * 3;
        loop {
            match node.claim(keys, handle).await {
                Ok(()) => break,
                Err(Claim::Fatal(e)) => return Err(e),
                Err(Claim::Etcd(e)) if Instant::now() >= deadline => {
                    return Err(format!("cannot register with etcd at {urls}: {e}"))
                }
                Err(Claim::Etcd(_)) => tokio::time::sleep(RETRY).await,
            }
        }
        node.record_member(keys).await?;
        node.ensure_slots(keys).await?;
        Ok(node)
    }

    /// Takes a fresh lease and creates the live record if no other process holds the id;
    /// waits (within the other record's time to live) for a previous incarnation's record
    /// to expire, so that a restart right after `kill -9` succeeds and two live processes
    /// never share an id.
    async fn claim(&mut self, keys: &Keys, handle: &ClusterHandle) -> Result<(), Claim> {
        let ttl = self.record.lease_ttl_s as i64;
        self.lease_at = Instant::now();
        let lease = self
            .call(self.client.clone().lease_grant(ttl, None))
            .await?;
        self.lease = lease.id();
        let key = keys.node(&self.record.id);
        let mut waited_for: Option<Instant> = None;
        loop {
            if waited_for.is_some() {
                // The lease must outlive the wait: a record created with a lease that
                // expires a moment later would vanish under the new node.
                if !matches!(self.keep_alive().await, Ok(left) if left > 0) {
                    self.lease_at = Instant::now();
                    let lease = self
                        .call(self.client.clone().lease_grant(ttl, None))
                        .await?;
                    self.lease = lease.id();
                }
            }
            let value = serde_json::to_string(&self.record).unwrap_or_default();
            // The slot table is read in the same transaction: a node that rejoins after a
            // lost lease (frozen, cut off) serves by the table as etcd holds it when its
            // record is back, not by what its watch had delivered before (a fail-over may
            // have taken its slots meanwhile, and the watch may not have caught up yet).
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.clone(),
                        value,
                        Some(PutOptions::new().with_lease(self.lease)),
                    ),
                    TxnOp::get(keys.slots(), None),
                ])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.call(self.client.clone().txn(txn)).await?;
            if resp.succeeded() {
                self.claimed_rev = resp.header().map_or(0, |h| h.revision());
                self.clock.hold_until(
                    self.lease_at + Duration::from_secs(self.record.lease_ttl_s as u64),
                );
                let table = resp.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Get(g) => g
                        .kvs()
                        .first()
                        .map(|kv| (kv.mod_revision(), SlotTable::decode(kv.value()))),
                    _ => None,
                });
                let mut st = handle.lock();
                if let Some((rev, Ok(t))) = table {
                    if rev > st.slots_rev {
                        st.slots_rev = rev;
                        st.slots = t;
                    }
                }
                st.state = SelfState::Up;
                st.renewed = Some(Instant::now());
                st.counters.joins_total += 1;
                st.live.insert(self.record.id.clone(), self.record.clone());
                return Ok(());
            }
            let holder = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok()),
                _ => None,
            });
            let grace =
                Duration::from_secs(holder.as_ref().map_or(60, |h| h.lease_ttl_s) as u64 + 2);
            let since = *waited_for.get_or_insert_with(Instant::now);
            if since.elapsed() > grace {
                let at = holder.map_or_else(|| "?".to_string(), |h| h.cluster.to_string());
                return Err(Claim::Fatal(format!(
                    "node id {} is already live in the cluster (at {at}, etcd key {key}): stop that node or choose another cluster.node",
                    self.record.id
                )));
            }
            if since.elapsed() < RETRY {
                tracing::info!(
                    node = %self.record.id,
                    "waiting for a previous run's etcd record to expire"
                );
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// The permanent member record: written only when it is new or the node's addresses
    /// changed.
    async fn record_member(&mut self, keys: &Keys) -> Result<(), String> {
        let key = keys.member(&self.record.id);
        let got = self
            .call(self.client.clone().get(key.clone(), None))
            .await
            .map_err(|e| e.to_string())?;
        let mut member = self.record.clone();
        member.state = "member".into();
        let same = got
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<NodeRecord>(kv.value()).ok())
            .is_some_and(|m| {
                m.cluster == member.cluster && m.mqtt == member.mqtt && m.admin == member.admin
            });
        if !same {
            let value = serde_json::to_string(&member).unwrap_or_default();
            self.call(self.client.clone().put(key, value, None))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The first node of a cluster creates the slot table, owning every slot.
    async fn ensure_slots(&mut self, keys: &Keys) -> Result<(), String> {
        let key = keys.slots();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                SlotTable::initial(&self.record.id).encode(),
                None,
            )]);
        let created = self
            .call(self.client.clone().txn(txn))
            .await
            .map_err(|e| e.to_string())?
            .succeeded();
        if created {
            tracing::info!(node = %self.record.id, "created the slot table: this node owns every slot");
        }
        Ok(())
    }

    /// Reads every key of the cluster; returns the revision read at.
    async fn load(&mut self, keys: &Keys, handle: &ClusterHandle) -> Result<i64, String> {
        let resp = self
            .call(
                self.client
                    .clone()
                    .get(keys.all(), Some(GetOptions::new().with_prefix())),
            )
            .await
            .map_err(|e| format!("cannot read the cluster from etcd: {e}"))?;
        let mut st = handle.lock();
        st.live.clear();
        st.members.clear();
        drop(st);
        for kv in resp.kvs() {
            self.put(keys, handle, kv);
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Watches every key of the cluster from `revision + 1`; `None` when etcd cannot be
    /// reached now (the caller retries).
    async fn watch(&mut self, keys: &Keys, revision: i64) -> Option<WatchStream> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut client = self.client.clone();
        self.call(client.watch(keys.all(), Some(opts))).await.ok()
    }

    /// Applies watched changes.
    fn apply(&mut self, keys: &Keys, handle: &ClusterHandle, events: &[etcd_client::Event]) {
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => self.put(keys, handle, kv),
                EventType::Delete => self.delete(keys, handle, kv.key(), kv.mod_revision()),
            }
        }
    }

    /// One key's new value.
    fn put(&self, keys: &Keys, handle: &ClusterHandle, kv: &etcd_client::KeyValue) {
        let (key, value) = (kv.key(), kv.value());
        let Some(rest) = key.strip_prefix(keys.all().as_bytes()) else {
            return;
        };
        let mut st = handle.lock();
        if rest == b"slots" {
            if kv.mod_revision() < st.slots_rev {
                // This node's own change, already applied (`swap_table`).
                return;
            }
            // The revision even of a damaged value: the next change of owner replaces it
            // with the last good table, changed.
            st.slots_rev = kv.mod_revision();
            match SlotTable::decode(value) {
                Ok(t) => st.slots = t,
                Err(e) => tracing::error!(error = %e, "ignoring a damaged slot table in etcd"),
            }
            return;
        }
        let (kind, id) = match rest.iter().position(|&b| b == b'/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => return,
        };
        let rec = match serde_json::from_slice::<NodeRecord>(value) {
            Ok(r) if r.id.as_bytes() == id && crate::config::check_node_id(&r.id).is_ok() => r,
            _ => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a damaged cluster record in etcd");
                return;
            }
        };
        match kind {
            b"nodes" if kv.lease() == 0 => {
                // A live record is always tied to its node's lease: one without is not a
                // node's (someone wrote it by hand).
                tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a node record without a lease");
            }
            b"nodes" => {
                st.members
                    .entry(rec.id.clone())
                    .or_insert_with(|| rec.clone());
                st.live.insert(rec.id.clone(), rec);
            }
            b"members" => {
                st.members.insert(rec.id.clone(), rec);
            }
            _ => {}
        }
    }

    /// One key gone: a node's lease expired or it left; an operator removed a member.
    fn delete(&self, keys: &Keys, handle: &ClusterHandle, key: &[u8], rev: i64) {
        let Some(rest) = key.strip_prefix(keys.all().as_bytes()) else {
            return;
        };
        let rest = String::from_utf8_lossy(rest);
        let mut st = handle.lock();
        if let Some(id) = rest.strip_prefix("nodes/") {
            if id == self.record.id && rev < self.claimed_rev {
                // The deletion of a record this node has put back since (the watch lags).
                return;
            }
            if let Some(rec) = st.live.remove(id) {
                tracing::info!(node = %id, "cluster member down");
                // A lease that expired was last renewed a time to live ago at the latest
                // (etcd only ever extends a lease, on a change of leader): the node has
                // been silent since. One that said it was leaving went now.
                let now = Instant::now();
                let since = if rec.state == "leaving" {
                    now
                } else {
                    now.checked_sub(Duration::from_secs(rec.lease_ttl_s as u64))
                        .unwrap_or(now)
                };
                st.down_since.insert(id.to_string(), since);
            }
            if id == self.record.id && st.state == SelfState::Up {
                // Our own record went (an operator deleted it, or the lease expired while
                // our renewals could not get through): fenced until we join again.
                st.state = SelfState::Fenced;
                st.counters.lease_lost_total += 1;
                tracing::error!(
                    "this node's cluster record is gone: serving nothing it owns until it rejoins"
                );
            }
        } else if let Some(id) = rest.strip_prefix("members/") {
            st.members.remove(id);
        }
    }

    /// Replaces the slot table with `next` if it is still at revision `rev` (and `also`
    /// holds); `Ok(false)` when it changed meanwhile. On success this node's view has the
    /// new table at once (its next change must not wait for the watch).
    async fn swap_table(
        &mut self,
        keys: &Keys,
        handle: &ClusterHandle,
        rev: i64,
        next: &SlotTable,
        also: Option<Compare>,
    ) -> Result<bool, Claim> {
        let key = keys.slots();
        // Only while this node's live record is still tied to its lease: a node that has
        // lost its lease (and may not know yet) changes nothing.
        let mut when = vec![
            Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
            Compare::lease(keys.node(&self.record.id), CompareOp::Equal, self.lease),
        ];
        when.extend(also);
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key, next.encode(), None)]);
        let resp = self.call(self.client.clone().txn(txn)).await?;
        if !resp.succeeded() {
            return Ok(false);
        }
        if let Some(h) = resp.header() {
            let mut st = handle.lock();
            if h.revision() > st.slots_rev {
                st.slots_rev = h.revision();
                st.slots = next.clone();
            }
        }
        Ok(true)
    }

    /// Whether this node's live record exists under its current lease.
    async fn record_is_ours(&mut self, keys: &Keys) -> bool {
        let key = keys.node(&self.record.id);
        match self.call(self.client.clone().get(key, None)).await {
            Ok(r) => r.kvs().first().is_some_and(|kv| kv.lease() == self.lease),
            Err(_) => false,
        }
    }

    /// An etcd member that refuses connections is taken out of the client's rotation for
    /// [`ENDPOINT_REST`] (the client would keep sending a share of the requests to it).
    async fn rest_endpoint(&mut self, error: &str) {
        let Some(url) = self
            .urls
            .iter()
            .find(|u| {
                u.strip_prefix("http://")
                    .is_some_and(|hp| error.contains(hp.trim_end_matches('/')))
            })
            .cloned()
        else {
            return;
        };
        if self.rested.iter().any(|(u, _)| *u == url) || self.rested.len() + 1 >= self.urls.len() {
            return;
        }
        if self.client.remove_endpoint(&url).await.is_ok() {
            tracing::warn!(endpoint = %url, "etcd member unreachable: left out for {}s", ENDPOINT_REST.as_secs());
            self.rested.push((url, Instant::now()));
        }
    }

    /// Endpoints left out long enough are tried again.
    async fn restore_endpoints(&mut self) {
        let due: Vec<String> = self
            .rested
            .iter()
            .filter(|(_, t)| t.elapsed() >= ENDPOINT_REST)
            .map(|(u, _)| u.clone())
            .collect();
        for url in due {
            if self.client.add_endpoint(&url).await.is_ok() {
                self.rested.retain(|(u, _)| *u != url);
            }
        }
    }

    /// Says it is leaving, then revokes the lease so that the others see it gone at once.
    async fn leave(&mut self, keys: &Keys, handle: &ClusterHandle) {
        self.clock.drop_now();
        handle.lock().state = super::SelfState::Leaving;
        let mut rec = self.record.clone();
        rec.state = "leaving".into();
        let value = serde_json::to_string(&rec).unwrap_or_default();
        let key = keys.node(&self.record.id);
        let lease = self.lease;
        let mut client = self.client.clone();
        let bye = async move {
            let put = client.put(key, value, Some(PutOptions::new().with_lease(lease)));
            let _ = put.await;
            let _ = client.lease_revoke(lease).await;
        };
        if tokio::time::timeout(LEAVE_GRACE, bye).await.is_err() {
            tracing::warn!(
                "could not tell etcd this node is leaving; its record expires with its lease"
            );
        }
    }
}

/// Why a claim failed.
#[derive(Debug)]
enum Claim {
    /// etcd could not be asked (retry).
    Etcd(String),
    /// Retrying will not help.
    Fatal(String),
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Claim::Etcd(e) | Claim::Fatal(e) => write!(f, "{e}"),
        }
    }
}
