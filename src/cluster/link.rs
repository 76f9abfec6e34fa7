//! Links between nodes: every node dials every other live node (its advertised
//! `cluster.listen` address) and keeps one TCP connection to it, opened with a handshake
//! naming both ends and the cluster, then kept honest by a heartbeat whose round trip is
//! the link's health (`GET /api/cluster`, `shardmq_cluster_link_*`).
//!
//! Frames: a 4-byte big-endian length, then a kind byte and its payload; at most
//! [`FRAME_BYTES_MAX`]. A peer that sends anything else, or nothing for
//! [`IDLE_LIMIT`], is dropped. Accepted links are bounded by [`INBOUND_LINKS_MAX`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{ClusterHandle, LinkView};
use crate::config::ClusterConfig;

/// The largest frame a link accepts.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// A link that carried nothing this long is dead (three heartbeats).
const IDLE_LIMIT: Duration = Duration::from_secs(3);
/// Between two heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Between two dials of a peer that is down.
const REDIAL: Duration = Duration::from_millis(500);
/// Links accepted at once (each live peer needs one).
pub const INBOUND_LINKS_MAX: usize = 64;

const HELLO: u8 = 1;
const PING: u8 = 2;
const PONG: u8 = 3;

/// The handshake's payload.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    /// The dialling node.
    node: String,
    /// The cluster's etcd prefix: links between different clusters are refused.
    cluster: String,
}

/// Starts the accept loop and the dialler; the returned task supervises both.
pub(super) fn start(
    listener: std::net::TcpListener,
    handle: ClusterHandle,
    cfg: ClusterConfig,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let accept = tokio::spawn(accept_loop(listener, cfg.prefix.clone(), stop.clone()));
        dial_loop(handle, cfg, stop).await;
        accept.abort();
    })
}

/// Serves the links other nodes open.
async fn accept_loop(
    listener: std::net::TcpListener,
    cluster: String,
    stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cluster link listener unusable");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(INBOUND_LINKS_MAX));
    let cluster: Arc<str> = cluster.into();
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cluster link accept failed");
                tokio::time::sleep(REDIAL).await;
                continue;
            }
        };
        if *stop.borrow() {
            return;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "refusing a cluster link: {INBOUND_LINKS_MAX} are open");
            continue;
        };
        let cluster = cluster.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_inbound(sock, &cluster).await {
                tracing::debug!(%peer, error = %e, "cluster link closed");
            }
            drop(permit);
        });
    }
}

/// One accepted link: the handshake, then an answer to every heartbeat.
async fn serve_inbound(mut sock: TcpStream, cluster: &str) -> Result<(), String> {
    let _ = sock.set_nodelay(true);
    let (kind, body) = read_frame(&mut sock).await?;
    let hello: Hello = match kind {
        HELLO => serde_json::from_slice(&body).map_err(|e| format!("bad hello: {e}"))?,
        k => return Err(format!("expected a hello, got kind {k}")),
    };
    if hello.cluster != cluster {
        return Err(format!("hello from cluster {:?}, not ours", hello.cluster));
    }
    crate::config::check_node_id(&hello.node)?;
    loop {
        let (kind, body) = read_frame(&mut sock).await?;
        match kind {
            PING => write_frame(&mut sock, PONG, &body).await?,
            k => return Err(format!("unexpected frame kind {k} from {}", hello.node)),
        }
    }
}

/// Keeps one dialling task per live peer.
async fn dial_loop(handle: ClusterHandle, cfg: ClusterConfig, mut stop: watch::Receiver<bool>) {
    let me = cfg.node.clone().unwrap_or_default();
    // By peer: the address dialled and the task. A peer that came back at another
    // address (a restart between two passes of this loop) gets a new task.
    let mut tasks: hashbrown::HashMap<String, (std::net::SocketAddr, tokio::task::JoinHandle<()>)> =
        hashbrown::HashMap::new();
    loop {
        let peers: Vec<(String, std::net::SocketAddr)> = {
            let st = handle.lock();
            st.live
                .values()
                .filter(|r| r.id != me)
                .map(|r| (r.id.clone(), r.cluster))
                .collect()
        };
        tasks.retain(|id, (addr, t)| {
            let keep = !t.is_finished() && peers.iter().any(|(p, a)| p == id && a == addr);
            if !keep {
                t.abort();
            }
            keep
        });
        for (id, addr) in peers {
            if !tasks.contains_key(&id) {
                let h = handle.clone();
                let hello = Hello {
                    node: me.clone(),
                    cluster: cfg.prefix.clone(),
                };
                let peer = id.clone();
                let task = tokio::spawn(async move { dial(h, peer, addr, hello).await });
                tasks.insert(id, (addr, task));
            }
        }
        {
            // Peers that are gone are shown as down.
            let mut st = handle.lock();
            let gone: Vec<String> = st
                .links
                .keys()
                .filter(|id| !tasks.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                set_state(&mut st, &id, "down", None);
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(REDIAL) => {}
        }
    }
    for (_, t) in tasks.values() {
        t.abort();
    }
}

/// Dials one peer and keeps the link up, until the peer is no longer live (the caller
/// aborts the task).
async fn dial(handle: ClusterHandle, peer: String, addr: std::net::SocketAddr, hello: Hello) {
    let hello = serde_json::to_vec(&hello).unwrap_or_default();
    loop {
        set_state(&mut handle.lock(), &peer, "connecting", None);
        let err = match keep_link(&handle, &peer, addr, &hello).await {
            Ok(()) => "closed".to_string(),
            Err(e) => e,
        };
        set_state(&mut handle.lock(), &peer, "down", Some(err));
        tokio::time::sleep(REDIAL).await;
    }
}

/// One link's life: connect, handshake, heartbeats until one goes unanswered.
async fn keep_link(
    handle: &ClusterHandle,
    peer: &str,
    addr: std::net::SocketAddr,
    hello: &[u8],
) -> Result<(), String> {
    let mut sock = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = sock.set_nodelay(true);
    write_frame(&mut sock, HELLO, hello).await?;
    {
        let mut st = handle.lock();
        set_state(&mut st, peer, "up", None);
        if let Some(l) = st.links.get_mut(peer) {
            l.connects_total += 1;
        }
    }
    let epoch = Instant::now();
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        beat.tick().await;
        let sent = epoch.elapsed().as_micros() as u64;
        write_frame(&mut sock, PING, &sent.to_be_bytes()).await?;
        let (kind, body) = read_frame(&mut sock).await?;
        if kind != PONG || body.len() != 8 {
            return Err(format!("unexpected frame kind {kind}"));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&body);
        let rtt = (epoch.elapsed().as_micros() as u64).saturating_sub(u64::from_be_bytes(b));
        if let Some(l) = handle.lock().links.get_mut(peer) {
            l.rtt_us = Some(rtt);
        }
    }
}

/// Records a link's state; `since` restarts when the state changes.
fn set_state(st: &mut super::State, peer: &str, state: &'static str, error: Option<String>) {
    let l = st
        .links
        .entry(peer.to_string())
        .or_insert_with(|| LinkView {
            state: "down",
            ..LinkView::default()
        });
    if l.state != state {
        l.state = state;
        st.link_since.insert(peer.to_string(), Instant::now());
    }
    if state != "up" {
        l.rtt_us = None;
    }
    if error.is_some() {
        l.last_error = error;
    }
}

/// Reads one frame within [`IDLE_LIMIT`].
async fn read_frame(sock: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let read = async {
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).await.map_err(|e| e.to_string())?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > FRAME_BYTES_MAX {
            return Err(format!("frame of {len} bytes (limit {FRAME_BYTES_MAX})"));
        }
        let mut buf = vec![0u8; len];
        sock.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        let kind = buf.remove(0);
        Ok((kind, buf))
    };
    tokio::time::timeout(IDLE_LIMIT, read)
        .await
        .map_err(|_| format!("nothing for {}s", IDLE_LIMIT.as_secs()))?
}

/// Writes one frame within [`IDLE_LIMIT`].
async fn write_frame(sock: &mut TcpStream, kind: u8, body: &[u8]) -> Result<(), String> {
    let mut buf = Vec::with_capacity(5 + body.len());
    buf.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(body);
    tokio::time::timeout(IDLE_LIMIT, sock.write_all(&buf))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())
}
