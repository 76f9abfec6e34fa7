//! Starting and stopping the whole broker: placement of shards on cores, the listening
//! sockets every shard shares, one [`BrokerShard`] per shard on the `shards` runtime, the
//! readiness report, and the orderly stop.
//!
//! Start order: validate the config; bind every listener once per shard (so a taken port
//! fails before any thread starts); start the pool; each shard starts its flusher, timers
//! and accept loops, then reports ready. Stop order (on [`Broker::stop`]): each shard stops
//! accepting, closes its connections (MQTT 5 clients get DISCONNECT 0x8B), flushes its
//! cross-shard outbox, and returns; the pool joins.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use shards::{Control, Placement, Pool, Shard};

use crate::config::{parse_core_list, Config, Durability};
use crate::net;
use crate::shard::service::BrokerShard;
use crate::storage::{Store, StoreOptions};

/// How long a stopping shard waits for its connections to close.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long start-up (recovery included) may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(600);

/// A running broker.
pub struct Broker {
    pool: Pool<BrokerShard, ()>,
    /// The addresses actually bound (port 0 resolved), in config order.
    pub listeners: Vec<SocketAddr>,
    /// Shard index -> core it is pinned to (`None` when unpinned).
    pub cores: Vec<Option<usize>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("listeners", &self.listeners)
            .field("cores", &self.cores)
            .finish()
    }
}

/// Why the broker did not start; one line each.
#[derive(Debug)]
pub enum StartError {
    Config(String),
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    Runtime(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(m) => write!(f, "{m}"),
            StartError::Listen { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            StartError::Runtime(m) => write!(f, "cannot start the shards: {m}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The cores this process may run on.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
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
        cfg.validate()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let placement = placement(&cfg).map_err(StartError::Config)?;
        let count = placement.shard_count();
        let cores: Vec<Option<usize>> = (0..count).map(|i| placement.core_of(i)).collect();

        let mut listeners = Vec::new();
        let mut fds: Vec<Vec<RawFd>> = vec![Vec::new(); count];
        for &addr in &cfg.listen {
            let (socks, bound) = net::bind_listeners(addr, count)
                .map_err(|error| StartError::Listen { addr, error })?;
            listeners.push(bound);
            for (shard, fd) in socks.into_iter().enumerate() {
                fds[shard].push(fd);
            }
        }
        let fds = Arc::new(fds);

        // One database per shard, opened here so that a bad data directory fails the start
        // with one line, before any shard runs.
        let stores: Vec<Option<Store>> = if cfg.storage.durability == Durability::Memory {
            vec![None; count]
        } else {
            let opts = StoreOptions {
                cache_bytes: cfg.storage.cache_bytes,
                max_cached_files: cfg.storage.max_cached_files as usize,
                ..StoreOptions::default()
            };
            let mut v = Vec::with_capacity(count);
            for shard in 0..count {
                let dir = cfg.data_dir.join(format!("shard-{shard}"));
                let store = Store::open(&dir, &opts).map_err(|e| {
                    StartError::Config(format!("cannot open {}: {e}", dir.display()))
                })?;
                v.push(Some(store));
            }
            v
        };
        let stores = Arc::new(stores);

        let mut rt = shards::Config::new(placement);
        rt.preempt_timer = Duration::from_millis(cfg.shards.preempt_timer_ms);
        rt.thread_name_prefix = "shardmq".into();
        let cfg = Arc::new(cfg);
        let (ready_tx, ready_rx) = mpsc::channel::<usize>();
        let build_cfg = cfg.clone();
        let pool = Pool::start(
            &rt,
            move |id| {
                BrokerShard::new(
                    id,
                    count,
                    Rc::new((*build_cfg).clone()),
                    stores[id.index()].clone(),
                )
            },
            move |shard: Shard<BrokerShard>| {
                let fds = fds.clone();
                let ready = ready_tx.clone();
                async move { shard_main(shard, fds, ready).await }
            },
        )
        .map_err(|e| StartError::Runtime(e.to_string()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        for _ in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready_rx.recv_timeout(left).is_err() {
                pool.control().stop();
                return Err(StartError::Runtime("a shard did not become ready".into()));
            }
        }
        Ok(Broker {
            pool,
            listeners,
            cores,
        })
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
        let failed: Vec<String> = self
            .pool
            .join()
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }
}

async fn shard_main(
    shard: Shard<BrokerShard>,
    fds: Arc<Vec<Vec<RawFd>>>,
    ready: mpsc::Sender<usize>,
) {
    let id = shard.id().index();
    let flusher = glommio::spawn_local(BrokerShard::flush_loop(shard.clone()));
    let committer = glommio::spawn_local(BrokerShard::commit_loop(shard.clone()));
    // Recovery, then a barrier: no shard accepts a connection (or fires a will) before
    // every shard's part of the routing tables is rebuilt here.
    BrokerShard::recover(&shard).await;
    let timers = glommio::spawn_local(BrokerShard::timer_loop(shard.clone()));
    let mut accepts = Vec::new();
    for &fd in &fds[id] {
        accepts.push(glommio::spawn_local(net::accept_loop(shard.clone(), fd)));
    }
    tracing::info!(shard = id, "shard ready");
    let _ = ready.send(id);
    shard.stopped().await;
    for a in accepts {
        a.await;
    }
    shard.service().core.borrow_mut().close_all();
    let deadline = Instant::now() + STOP_GRACE;
    while shard.service().open_connections() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    timers.await;
    flusher.await;
    committer.await;
}
