//! Starting and stopping the whole broker: placement of shards on cores, the listening
//! sockets every shard shares, one [`BrokerShard`] per shard on the `shards` runtime, the
//! readiness report, and the orderly stop.
//!
//! Start order: validate the config; bind every listener once per shard (so a taken port
//! fails before any thread starts); start the pool; each shard starts its flusher, timers
//! and accept loops, then reports ready. Stop order (on [`Broker::stop`]): each shard stops
//! accepting, closes its connections (MQTT 5 clients get DISCONNECT 0x8B; no will is
//! published, see [`crate::shard::core::Core::close_all`]), flushes its cross-shard outbox,
//! makes its last writes durable, and returns; the pool joins.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use shards::{Control, Placement, Pool, Shard};

use crate::admin::{AdminServer, BrokerInfo};
use crate::auth::Auth;
use crate::cluster::{Cluster, NodeAddrs};
use crate::config::{parse_core_list, Config, Durability, Transport};
use crate::net;
use crate::session::owner_shard;
use crate::shard::budget::QueuedBudget;
use crate::shard::service::{BrokerShard, Query};
use crate::storage::{Store, StoreOptions};

/// How long a stopping shard waits for its connections to close.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a reload waits for every shard to take the new rules.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long start-up (recovery included) may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// A running broker.
pub struct Broker {
    pool: Pool<BrokerShard, ()>,
    admin: Option<AdminServer>,
    /// This node's membership of a cluster, when `cluster.node` is set.
    pub cluster: Option<Cluster>,
    /// Where the admin endpoint listens (port 0 resolved), if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The listeners actually bound (port 0 resolved): `listen` first, then `[[listeners]]`,
    /// in config order.
    pub listeners: Vec<BoundListener>,
    /// Shard index -> core it is pinned to (`None` when unpinned).
    pub cores: Vec<Option<usize>>,
    /// Why a shard stopped the broker, if one did (see [`Broker::join`]).
    fatal: crate::shard::service::Fatal,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("listeners", &self.listeners)
            .field("cores", &self.cores)
            .finish()
    }
}

/// A listening address and what it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundListener {
    pub addr: SocketAddr,
    pub transport: Transport,
}

/// Why the broker did not start; one line each.
#[derive(Debug)]
pub enum StartError {
    Config(String),
    /// A listener's TLS files cannot be used (a configuration error: exit status 2).
    Listener(String),
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    AdminListen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    Runtime(String),
    /// Could not join the cluster (etcd unreachable, the node id live elsewhere, ...).
    Cluster(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(m) | StartError::Listener(m) => write!(f, "{m}"),
            StartError::Listen { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            StartError::AdminListen { addr, error } => write!(
                f,
                "cannot listen on {addr} for the admin endpoint (admin.listen): {error}"
            ),
            StartError::Runtime(m) => write!(f, "cannot start the shards: {m}"),
            StartError::Cluster(m) => write!(f, "cannot join the cluster: {m}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; the call writes only into it.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: i is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Where the shards run, from `[shards]`: listed cores, the first `count` allowed cores, or
/// one shard per allowed core.
pub fn placement(cfg: &Config) -> Result<Placement, String> {
    let s = &cfg.shards;
    let cores = match (&s.cores, s.count) {
        (Some(list), _) => {
            let cores = parse_core_list(list).map_err(|e| format!("shards.cores: {e}"))?;
            if let Some(n) = s.count {
                if n != cores.len() {
                    return Err(format!(
                        "shards.count ({n}) does not match the {} cores listed",
                        cores.len()
                    ));
                }
            }
            cores
        }
        (None, Some(n)) => {
            let allowed = allowed_cores();
            if s.pin && n > allowed.len() {
                return Err(format!(
                    "shards.count: {n} shards but only {} cores are available (use --no-pin to run more shards than cores)",
                    allowed.len()
                ));
            }
            allowed.into_iter().take(n).collect()
        }
        (None, None) => allowed_cores(),
    };
    let count = match s.count {
        Some(n) if !s.pin => n,
        _ => cores.len(),
    };
    Ok(if s.pin {
        Placement::Pinned(cores)
    } else {
        Placement::Unpinned(count)
    })
}

impl Broker {
    /// Starts the broker and waits until every shard is accepting connections.
    pub fn start(cfg: Config) -> Result<Broker, StartError> {
        let auth = Auth::load(&cfg).map_err(|e| StartError::Config(e.to_string()))?;
        Broker::start_with_auth(cfg, Arc::new(auth))
    }

    /// [`Broker::start`] with password and ACL rules loaded by the caller.
    pub fn start_with_auth(cfg: Config, auth: Arc<Auth>) -> Result<Broker, StartError> {
        cfg.validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let placement = placement(&cfg).map_err(StartError::Config)?;
        let count = placement.shard_count();
        let cores: Vec<Option<usize>> = (0..count).map(|i| placement.core_of(i)).collect();

        let (listeners, mut fds) = bind_client_listeners(&cfg, count)?;
        let relay = bind_relay_listener(&cfg, &mut fds)?;
        let fds = Arc::new(fds);
        let admin_listener = bind_admin(&cfg)?;
        // Before any store opens, clustered or not (it speaks only for the last stop).
        let (clean_at_start, stopped_in_order) =
            crate::cluster::take_clean_marker(&cfg.data_dir, count).map_err(StartError::Config)?;
        // The last run acknowledged from its stream (`replicated` mode) and did not stop in
        // order: its stores may lack what it acknowledged after the marker's sequence.
        let mut ahead =
            crate::cluster::read_stream_ahead(&cfg.data_dir).map_err(StartError::Config)?;
        if ahead.is_some() && stopped_in_order {
            // Stopped in order: the stores hold what the stream does; the marker speaks for
            // nothing any more (a `replicated` start writes a new one).
            crate::cluster::write_stream_ahead(&cfg.data_dir, None).map_err(StartError::Config)?;
            ahead = None;
        }
        let restore = ahead.clone();
        if let Some(at) = &restore {
            let marker = cfg.data_dir.join(crate::cluster::STREAM_AHEAD_FILE);
            if cfg.cluster.jetstream.is_empty() {
                return Err(StartError::Config(format!(
                    "the last run on {} acknowledged messages from its replicated stream (storage.durability = \"replicated\") and did not stop in order, so its stores may lack some: \
                     start it with cluster.jetstream to bring them up to the stream (or delete {} to keep the stores as they are)",
                    cfg.data_dir.display(),
                    marker.display()
                )));
            }
            if at.shards != count {
                return Err(StartError::Config(format!(
                    "the last run on {} had {} shards, acknowledged from its replicated stream and did not stop in order: \
                     start it once more with {} shards (it brings the stores up to the stream), stop it, then change the count",
                    cfg.data_dir.display(),
                    at.shards,
                    at.shards
                )));
            }
        }
        let mut cluster = join_cluster(
            &cfg,
            &listeners,
            relay,
            admin_listener.as_ref(),
            (clean_at_start, restore),
        )?;
        let shard_link = cluster.as_ref().map(Cluster::shard_link);
        let admin_info = BrokerInfo {
            cluster: cluster.as_ref().map(|c| c.handle()),
            cores: cores.clone(),
            queue_policy: cfg.sessions.queue_policy,
            started: std::time::SystemTime::now(),
            concurrent_requests_max: cfg.admin.concurrent_requests_max,
            allowed_hosts: cfg.admin.allowed_hosts.clone(),
            token: cfg.admin.token.clone(),
        };
        let stores = Arc::new(open_stores(&cfg, count)?);
        if let Some(c) = &mut cluster {
            if let Some(words) = c.take_restored() {
                restore_stores(&stores, &words)?;
            }
            // Before the first acknowledgement (and before the appender may snapshot): a
            // `replicated` run's marker says where in the stream the stores are now; a run
            // in another mode clears a marker it found, its stores now up to the stream.
            let marker = match (&c.joined.stream_at_start, cfg.storage.durability) {
                (Some((stream, seq)), Durability::Replicated) => {
                    // No creation time: the restore must not skip what a stream reports
                    // differently (see `Marker::created`).
                    Some(crate::cluster::CleanMarker {
                        stream: stream.clone(),
                        last_seq: *seq,
                        shards: count,
                        created: None,
                    })
                }
                _ => None,
            };
            if marker.is_some() || ahead.is_some() {
                crate::cluster::write_stream_ahead(&cfg.data_dir, marker.as_ref())
                    .map_err(StartError::Config)?;
            }
            c.set_stores(stores.iter().flatten().cloned().collect());
        }

        let rt = runtime_config(&cfg, placement);
        let cfg = Arc::new(cfg);
        let (ready_tx, ready_rx) = mpsc::channel::<usize>();
        let build_cfg = cfg.clone();
        let fatal = crate::shard::service::Fatal::default();
        let shard_fatal = fatal.clone();
        let budget = Arc::new(QueuedBudget::new(count, cfg.storage.queued_bytes_max));
        let pool = Pool::start(
            &rt,
            move |id| {
                BrokerShard::new(
                    id,
                    count,
                    Rc::new((*build_cfg).clone()),
                    auth.clone(),
                    stores[id.index()].clone(),
                    budget.clone(),
                )
                .with_cluster(shard_link.clone())
                .with_fatal(shard_fatal.clone())
            },
            move |shard: Shard<BrokerShard>| {
                let fds = fds.clone();
                let ready = ready_tx.clone();
                async move { shard_main(shard, fds, ready).await }
            },
        )
        .map_err(|e| StartError::Runtime(e.to_string()))?;
        wait_ready(&pool, &ready_rx, count)?;
        if let Some(c) = &mut cluster {
            c.attach(pool.control());
            wait_slot_map(&pool)?;
        }
        let admin = match admin_listener {
            Some(l) => Some(start_admin(l, &pool, admin_info)?),
            None => None,
        };
        Ok(Broker {
            admin_addr: admin.as_ref().map(|a| a.addr),
            admin,
            cluster,
            pool,
            listeners,
            cores,
            fatal,
        })
    }

    /// Reads the password and ACL files again and puts them in force on every shard;
    /// connections stay. On a bad file the old rules stay and the error names file and line.
    pub fn reload_auth(control: &Control<BrokerShard>, cfg: &Config) -> Result<(), String> {
        let auth = Arc::new(Auth::load(cfg).map_err(|e| e.to_string())?);
        control
            .map_reduce(Query::SetAuth(auth), RELOAD_TIMEOUT, (), |(), _, _| ())
            .map_err(|e| e.to_string())
    }

    /// A handle to stop or query the broker from any thread.
    pub fn control(&self) -> Control<BrokerShard> {
        self.pool.control()
    }

    /// Requests an orderly stop; [`Broker::join`] waits for it.
    pub fn stop(&self) {
        self.pool.control().stop();
    }

    /// Waits for every shard to finish. Returns the shards that failed.
    pub fn join(self) -> Result<(), String> {
        let Broker {
            pool,
            admin,
            cluster,
            fatal,
            ..
        } = self;
        let mut failed: Vec<String> = pool
            .join()
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        failed.extend(fatal.get());
        // The others see this node gone at once (its lease revoked), not after its TTL.
        if let Some(c) = cluster {
            c.stop(failed.is_empty());
        }
        // Last: until now it answered (requests made while the shards stop fail with 503).
        if let Some(a) = admin {
            a.stop();
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

/// The stores a run with more shards left behind: `(k, <data_dir>/shard-<k>)` for every
/// `shard-<k>` entry with `k >= count`, by `k`. Only names the broker writes count
/// (`shard-7`, not `shard-07`).
fn extra_store_dirs(data_dir: &Path, count: usize) -> Result<Vec<(usize, PathBuf)>, String> {
    let list_err = |e: std::io::Error| format!("cannot list {}: {e}", data_dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(data_dir).map_err(list_err)? {
        let name = entry.map_err(list_err)?.file_name();
        let Some(k) = name.to_str().and_then(|n| n.strip_prefix("shard-")) else {
            continue;
        };
        match k.parse::<usize>() {
            Ok(n) if n >= count && n.to_string() == k => {
                found.push((n, data_dir.join(format!("shard-{n}"))));
            }
            _ if k.contains(".migrated-") => tracing::warn!(
                dir = %data_dir.join(&name).display(),
                "a store renamed after a change of the shard count, once its data was merged into the other stores (only damaged records, if any, are left in it); it may be deleted"
            ),
            _ => {}
        }
    }
    found.sort();
    Ok(found)
}

/// After the shard count shrank: moves the sessions and retained messages of every store of
/// a shard that no longer exists into the stores of their owners under `stores.len()`
/// shards, then removes that store. (When the count grows, the shards re-home what they
/// find at run time instead.)
///
/// Crash-safe: a source directory is renamed (`shard-<k>.migrated-<unix time>`) and removed
/// only after every target store it was copied into is persisted. A crash before the rename
/// leaves it to be merged again at the next start, which is harmless: a target that holds
/// a client id already keeps its own session ([`Store::copy_into`]). A source with damaged
/// records is renamed but kept, for inspection.
fn merge_extra_stores(
    data_dir: &Path,
    stores: &[Store],
    opts: &StoreOptions,
) -> Result<(), StartError> {
    let count = stores.len();
    let extra = extra_store_dirs(data_dir, count).map_err(StartError::Config)?;
    for (k, dir) in extra {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            StartError::Config(format!(
                "cannot merge {} (the store of shard {k}, beyond the {count} shards configured) into the other stores: {what}: {e}; nothing was removed",
                dir.display()
            ))
        };
        let source = Store::open(&dir, opts).map_err(|e| fail("open", &e))?;
        let copied = source
            .copy_into(
                stores,
                |id| owner_shard(id.as_bytes(), count),
                |topic| owner_shard(topic.as_bytes(), count),
            )
            .map_err(|e| fail("copy", &e))?;
        // Closes the engine: waits for its worker threads and releases the directory.
        drop(source);

        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let moved = (0..)
            .map(|i| {
                let suffix = if i == 0 {
                    String::new()
                } else {
                    format!("-{i}")
                };
                data_dir.join(format!("shard-{k}.migrated-{unix_s}{suffix}"))
            })
            .take(1000)
            .find(|p| std::fs::symlink_metadata(p).is_err())
            .ok_or_else(|| {
                StartError::Config(format!(
                    "{}: no free name for the migrated copy of shard-{k}",
                    data_dir.display()
                ))
            })?;
        std::fs::rename(&dir, &moved).map_err(|e| fail("rename", &e))?;
        // The rename is durable before any file of the store goes away.
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("fsync the data directory", &e))?;
        let kept = if copied.damaged.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&moved) {
                tracing::warn!(dir = %moved.display(), error = %e, "cannot remove a merged store; its data is in the other stores, so it may be deleted");
            }
            None
        } else {
            tracing::warn!(
                dir = %moved.display(),
                damaged = copied.damaged.len(),
                "the merged store had damaged records (skipped, logged above); it is kept for inspection"
            );
            Some(moved.display().to_string())
        };
        tracing::info!(
            dir = %dir.display(),
            shards = count,
            sessions = copied.sessions,
            queued = copied.queued,
            sessions_kept = copied.sessions_kept,
            retained = copied.retained,
            retained_kept = copied.retained_kept,
            damaged = copied.damaged.len(),
            kept_as = kept.as_deref().unwrap_or("-"),
            "merged the store of a shard beyond the configured count into the others"
        );
    }
    Ok(())
}

/// Per shard: its listening sockets, each with the listener it belongs to.
type ShardSockets = Vec<Vec<(RawFd, Arc<net::Listener>)>>;

/// Binds every client listener of the configuration, one socket per shard each: the bound
/// addresses (port 0 resolved), and each shard's sockets.
fn bind_client_listeners(
    cfg: &Config,
    count: usize,
) -> Result<(Vec<BoundListener>, ShardSockets), StartError> {
    let specs = listeners_of(cfg).map_err(StartError::Listener)?;
    let mut listeners = Vec::new();
    let mut fds: ShardSockets = vec![Vec::new(); count];
    for spec in specs {
        let addr = spec.addr;
        let (socks, bound) =
            net::bind_listeners(addr, count).map_err(|error| StartError::Listen { addr, error })?;
        listeners.push(BoundListener {
            addr: bound,
            transport: spec.transport,
        });
        let spec = Arc::new(spec);
        for (shard, fd) in socks.into_iter().enumerate() {
            fds[shard].push((fd, spec.clone()));
        }
    }
    Ok((listeners, fds))
}

/// A cluster node's relay listener: plain TCP on the node-to-node address's IP, an
/// ephemeral port (published in the node's etcd record), every shard accepting on it. Other
/// nodes relay their clients of this node there; what arrives there is never relayed again.
/// Not in the ready line's `listeners=`.
fn bind_relay_listener(
    cfg: &Config,
    fds: &mut ShardSockets,
) -> Result<Option<SocketAddr>, StartError> {
    let Some(listen) = cfg.cluster.listen.filter(|_| cfg.cluster.enabled()) else {
        return Ok(None);
    };
    let addr = SocketAddr::new(listen.ip(), 0);
    let (socks, bound) =
        net::bind_listeners(addr, fds.len()).map_err(|error| StartError::Listen { addr, error })?;
    let spec = Arc::new(net::Listener::relay(bound));
    for (shard, fd) in socks.into_iter().enumerate() {
        fds[shard].push((fd, spec.clone()));
    }
    Ok(Some(bound))
}

/// Joins the cluster when `cluster.node` is set: before any shard accepts a client, so
/// that the node knows the cluster (and is known) before it serves.
fn join_cluster(
    cfg: &Config,
    listeners: &[BoundListener],
    relay: Option<SocketAddr>,
    admin: Option<&std::net::TcpListener>,
    (clean_at_start, restore): (
        Option<crate::cluster::CleanMarker>,
        Option<crate::cluster::CleanMarker>,
    ),
) -> Result<Option<Cluster>, StartError> {
    if !cfg.cluster.enabled() {
        return Ok(None);
    }
    let addrs = NodeAddrs {
        mqtt: listeners.iter().map(|l| l.addr).collect(),
        relay,
        admin: admin.and_then(|l| l.local_addr().ok()),
    };
    let fresh_disk = !cfg
        .data_dir
        .join("shard-0")
        .join(crate::storage::MARKER_FILE)
        .exists();
    let disk = crate::cluster::Disk {
        fresh: fresh_disk,
        data_dir: cfg.data_dir.clone(),
        clean_at_start,
        restore,
        ahead: cfg.storage.durability == Durability::Replicated,
    };
    Cluster::start(&cfg.cluster, addrs, cfg.limits.packet_bytes_max, disk)
        .map(Some)
        .map_err(StartError::Cluster)
}

/// Applies the log read back from the node's replicated stream (after the point its stores
/// durably held) to the stores of the shards that own each key (see
/// [`crate::cluster::Disk::restore`]); one line naming the store when it cannot.
fn restore_stores(
    stores: &[Option<Store>],
    words: &crate::storage::replica::LastWords,
) -> Result<(), StartError> {
    let count = stores.len();
    let started = Instant::now();
    let mut applied = 0;
    for (shard, store) in stores.iter().enumerate() {
        let Some(store) = store else { continue };
        let fail = |e: &dyn std::fmt::Display| {
            StartError::Config(format!(
                "cannot bring the store of shard {shard} up to the replicated stream: {e}"
            ))
        };
        // What the store holds already (it may even be ahead of the stream: a batch
        // applied whose append never happened) is left as it is: only the batches after
        // its own are applied.
        let held = match store.replica_batch().map_err(|e| fail(&e))? {
            Some((s, n)) if s as usize == shard => n,
            _ => 0,
        };
        let mine = words.ops_after(shard as u16, held, |client| {
            owner_shard(client.as_bytes(), count) == shard
        });
        applied += store.apply_ops(mine).map_err(|e| fail(&e))?;
    }
    tracing::info!(
        units = words.units,
        keys = applied,
        ms = started.elapsed().as_millis() as u64,
        "stores brought up to the replicated stream (the last run acknowledged from it and did not stop in order)"
    );
    Ok(())
}

/// Waits until every shard has the cluster's slot table: before it, a cluster node's
/// shards serve nobody (they cannot tell whose clients are theirs).
fn wait_slot_map(pool: &Pool<BrokerShard, ()>) -> Result<(), StartError> {
    // Beyond the plane's wait for the other nodes' routes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = pool
            .control()
            .map_reduce(Query::SlotMapReady, RELOAD_TIMEOUT, true, |all, _, a| {
                all && matches!(a, crate::shard::api::Answer::Ready(true))
            })
            .map_err(|e| StartError::Runtime(e.to_string()))?;
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            pool.control().stop();
            return Err(StartError::Cluster(
                "the shards did not get the slot table within 30 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds the admin endpoint's socket when `admin.enabled`.
fn bind_admin(cfg: &Config) -> Result<Option<std::net::TcpListener>, StartError> {
    if !cfg.admin.enabled {
        return Ok(None);
    }
    let addr = cfg.admin.listen;
    crate::admin::bind(addr)
        .map(Some)
        .map_err(|error| StartError::AdminListen { addr, error })
}

/// Starts the admin endpoint on its bound socket; on failure stops the pool.
fn start_admin(
    l: std::net::TcpListener,
    pool: &Pool<BrokerShard, ()>,
    info: BrokerInfo,
) -> Result<AdminServer, StartError> {
    AdminServer::start(l, pool.control(), info).map_err(|e| {
        pool.control().stop();
        StartError::Runtime(format!("cannot start the admin endpoint: {e}"))
    })
}

/// One database per shard (none for `durability = "memory"`), opened here so that a bad
/// data directory fails the start with one line, before any shard runs.
fn open_stores(cfg: &Config, count: usize) -> Result<Vec<Option<Store>>, StartError> {
    if cfg.storage.durability == Durability::Memory {
        return Ok(vec![None; count]);
    }
    let opts = StoreOptions {
        cache_bytes: cfg.storage.cache_bytes,
        max_cached_files: cfg.storage.max_cached_files as usize,
        ..StoreOptions::default()
    };
    let mut v = Vec::with_capacity(count);
    for shard in 0..count {
        let dir = cfg.data_dir.join(format!("shard-{shard}"));
        let store = Store::open(&dir, &opts)
            .map_err(|e| StartError::Config(format!("cannot open {}: {e}", dir.display())))?;
        v.push(store);
    }
    merge_extra_stores(&cfg.data_dir, &v, &opts)?;
    Ok(v.into_iter().map(Some).collect())
}

/// The shards runtime's settings for `placement`.
fn runtime_config(cfg: &Config, placement: Placement) -> shards::Config {
    let mut rt = shards::Config::new(placement);
    rt.preempt_timer = Duration::from_millis(cfg.shards.preempt_timer_ms);
    rt.thread_name_prefix = "shardmq".into();
    // glommio is patched against the lost wake-up the nudger guards against (see
    // vendor/README.md); a slow nudge stays as cheap insurance.
    rt.nudge_interval = Some(Duration::from_millis(100));
    rt
}

/// Waits until every shard reported ready, within [`START_TIMEOUT`]; else stops the pool.
fn wait_ready(
    pool: &Pool<BrokerShard, ()>,
    ready_rx: &mpsc::Receiver<usize>,
    count: usize,
) -> Result<(), StartError> {
    let deadline = Instant::now() + START_TIMEOUT;
    for _ in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        if ready_rx.recv_timeout(left).is_err() {
            pool.control().stop();
            return Err(StartError::Runtime("a shard did not become ready".into()));
        }
    }
    Ok(())
}

/// Every listener of the configuration, `listen` first, with its TLS files read and
/// checked. The error is one line naming the listener and the file.
pub fn listeners_of(cfg: &Config) -> Result<Vec<net::Listener>, String> {
    let mut v: Vec<net::Listener> = cfg
        .listen
        .iter()
        .map(|&a| net::Listener::plain(a))
        .collect();
    for (i, l) in cfg.listeners.iter().enumerate() {
        v.push(net::Listener::from_config(i, l)?);
    }
    Ok(v)
}

async fn shard_main(shard: Shard<BrokerShard>, fds: Arc<ShardSockets>, ready: mpsc::Sender<usize>) {
    let id = shard.id().index();
    let flusher = glommio::spawn_local(BrokerShard::flush_loop(shard.clone()));
    let committer = glommio::spawn_local(BrokerShard::commit_loop(shard.clone()));
    let syncer = glommio::spawn_local(BrokerShard::sync_loop(shard.clone()));
    let storage_recovery = glommio::spawn_local(BrokerShard::recovery_loop(shard.clone()));
    // Recovery, then a barrier: no shard accepts a connection (or fires a will) before
    // every shard's part of the routing tables is rebuilt here.
    BrokerShard::recover(&shard).await;
    let timers = glommio::spawn_local(BrokerShard::timer_loop(shard.clone()));
    let sys = glommio::spawn_local(BrokerShard::sys_loop(shard.clone()));
    let handoffs = glommio::spawn_local(net::handoff_loop(shard.clone()));
    let mut accepts = Vec::new();
    for (fd, listener) in &fds[id] {
        accepts.push(glommio::spawn_local(net::accept_loop(
            shard.clone(),
            *fd,
            listener.clone(),
        )));
    }
    tracing::info!(shard = id, "shard ready");
    let _ = ready.send(id);
    shard.stopped().await;
    for a in accepts {
        a.await;
    }
    handoffs.await;
    shard.service().close_all();
    futures_lite::future::or(
        shard.service().connections_closed(),
        glommio::timer::sleep(STOP_GRACE),
    )
    .await;
    timers.await;
    sys.await;
    flusher.await;
    committer.await;
    syncer.await;
    storage_recovery.await;
    BrokerShard::final_commit(&shard).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MessageRecord, SessionRecord};

    fn session() -> SessionRecord {
        SessionRecord {
            expiry_s: 60,
            version: 4,
            will: None,
            disconnected_unix_ms: Some(1_700_000_000_000),
            next_packet_id: 1,
            owner: None,
        }
    }

    fn retained(topic: &str) -> MessageRecord {
        MessageRecord {
            topic: topic.into(),
            payload: b"r".to_vec(),
            qos: 1,
            retain: true,
            properties: Vec::new(),
            origin: None,
            created_unix_ms: 1_700_000_000_000,
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn stores_beyond_the_shard_count_are_merged_and_removed() {
        let data = tempfile::tempdir().unwrap();
        let opts = StoreOptions::default();
        let ids: Vec<String> = (0..12).map(|i| format!("client-{i}")).collect();
        let topics: Vec<String> = (0..12).map(|i| format!("topic/{i}")).collect();
        {
            let three: Vec<Store> = (0..3)
                .map(|k| Store::open(&data.path().join(format!("shard-{k}")), &opts).unwrap())
                .collect();
            for (id, topic) in ids.iter().zip(&topics) {
                let s = &three[owner_shard(id.as_bytes(), 3)];
                s.put_session(id, &session()).unwrap();
                let mut b = three[owner_shard(topic.as_bytes(), 3)].batch();
                b.retained_put(topic, &retained(topic)).unwrap();
                b.commit().unwrap();
            }
            for s in &three {
                s.persist().unwrap();
            }
        }
        // Not ours: left alone.
        std::fs::create_dir(data.path().join("shard-07")).unwrap();
        std::fs::create_dir(data.path().join("shard-x")).unwrap();

        let stores: Vec<Store> = (0..2)
            .map(|k| Store::open(&data.path().join(format!("shard-{k}")), &opts).unwrap())
            .collect();
        merge_extra_stores(data.path(), &stores, &opts).unwrap();
        assert_eq!(
            names(data.path()),
            ["shard-0", "shard-07", "shard-1", "shard-x"]
        );
        // What shard 2 held is with its owner under 2 shards (the rest is re-homed by the
        // shards themselves, at run time).
        let on = |k: usize| -> (Vec<String>, Vec<String>) {
            let rec = stores[k].load().unwrap();
            let ids = rec.sessions.into_iter().map(|s| s.client_id).collect();
            let topics = rec.retained.into_iter().map(|m| m.topic).collect();
            (ids, topics)
        };
        let moved_ids: Vec<&String> = ids
            .iter()
            .filter(|i| owner_shard(i.as_bytes(), 3) == 2)
            .collect();
        let moved_topics: Vec<&String> = topics
            .iter()
            .filter(|t| owner_shard(t.as_bytes(), 3) == 2)
            .collect();
        assert!(!moved_ids.is_empty() && !moved_topics.is_empty());
        for id in moved_ids {
            assert!(on(owner_shard(id.as_bytes(), 2)).0.contains(id), "{id}");
        }
        for t in moved_topics {
            assert!(on(owner_shard(t.as_bytes(), 2)).1.contains(t), "{t}");
        }
        let mut all: Vec<String> = stores
            .iter()
            .flat_map(|s| s.load().unwrap().sessions)
            .map(|s| s.client_id)
            .collect();
        all.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(all, want);
        let retained_count: usize = stores
            .iter()
            .map(|s| s.load().unwrap().retained.len())
            .sum();
        assert_eq!(retained_count, topics.len());
    }

    #[test]
    fn a_store_that_cannot_be_merged_fails_the_start_and_stays() {
        let data = tempfile::tempdir().unwrap();
        let opts = StoreOptions::default();
        let stores = vec![Store::open(&data.path().join("shard-0"), &opts).unwrap()];
        std::fs::create_dir(data.path().join("shard-3")).unwrap();
        std::fs::write(data.path().join("shard-3").join("junk"), b"x").unwrap();
        let e = merge_extra_stores(data.path(), &stores, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shard-3") && e.contains("nothing was removed"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        assert_eq!(names(data.path()), ["shard-0", "shard-3"]);
    }
}
