//! Links between nodes: every node dials every other live node (its advertised
//! `cluster.listen` address) and keeps one TCP connection to it, opened with a handshake
//! naming both ends and the cluster. A node sends its frames (routes, messages, answers) on
//! the link it dialled and receives on the links it accepted, so each direction is one
//! ordered stream. A heartbeat on the dialled link measures its round trip (the link's
//! health in `GET /api/cluster`, `shardmq_cluster_link_*`).
//!
//! Frames: a 4-byte big-endian length, then a kind byte and its payload (`wire.rs`); at
//! most `frame_max` bytes (the largest MQTT packet plus room for the frame's own fields). A
//! peer that sends anything malformed, or nothing for [`IDLE_LIMIT`], is dropped. Accepted
//! links are bounded by [`INBOUND_LINKS_MAX`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::plane::LinkEvent;
use super::wire::{HELLO, PING, PONG};
use super::{ClusterHandle, LinkView};
use crate::config::ClusterConfig;

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
/// The largest handshake.
const HELLO_BYTES_MAX: usize = 4096;

/// The handshake's payload.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    /// The dialling node.
    node: String,
    /// The cluster's etcd prefix: links between different clusters are refused.
    cluster: String,
}

/// What the link tasks share.
#[derive(Clone)]
struct Ctx {
    handle: ClusterHandle,
    events: mpsc::Sender<LinkEvent>,
    frame_max: usize,
}

/// Starts the accept loop and the dialler; the returned task supervises both.
pub(super) fn start(
    listener: std::net::TcpListener,
    handle: ClusterHandle,
    cfg: ClusterConfig,
    stop: watch::Receiver<bool>,
    events: mpsc::Sender<LinkEvent>,
    frame_max: usize,
) -> tokio::task::JoinHandle<()> {
    let ctx = Ctx {
        handle,
        events,
        frame_max,
    };
    tokio::spawn(async move {
        let accept = tokio::spawn(accept_loop(
            listener,
            cfg.prefix.clone(),
            stop.clone(),
            ctx.clone(),
        ));
        dial_loop(ctx, cfg, stop).await;
        accept.abort();
    })
}

/// Serves the links other nodes open.
async fn accept_loop(
    listener: std::net::TcpListener,
    cluster: String,
    stop: watch::Receiver<bool>,
    ctx: Ctx,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cluster link listener unusable");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(INBOUND_LINKS_MAX));
    // The accepted link of each node: a new one from the same node ends the older, so that
    // frames of two links never interleave (an old route removal after the new full set).
    let current: Current = Arc::new(std::sync::Mutex::new(hashbrown::HashMap::new()));
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
        let ctx = ctx.clone();
        let current = current.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_inbound(sock, &cluster, &ctx, &current).await {
                tracing::debug!(%peer, error = %e, "cluster link closed");
            }
            drop(permit);
        });
    }
}

/// One accepted link: the handshake, then every frame to the plane and an answer to every
/// heartbeat.
/// Per node, a number for its current accepted link and the signal that ends it.
type Current = Arc<std::sync::Mutex<hashbrown::HashMap<String, (u64, watch::Sender<bool>)>>>;

async fn serve_inbound(
    mut sock: TcpStream,
    cluster: &str,
    ctx: &Ctx,
    current: &Current,
) -> Result<(), String> {
    let _ = sock.set_nodelay(true);
    let (kind, body) = read_frame(&mut sock, HELLO_BYTES_MAX).await?;
    let hello: Hello = match kind {
        HELLO => serde_json::from_slice(&body).map_err(|e| format!("bad hello: {e}"))?,
        k => return Err(format!("expected a hello, got kind {k}")),
    };
    if hello.cluster != cluster {
        return Err(format!("hello from cluster {:?}, not ours", hello.cluster));
    }
    crate::config::check_node_id(&hello.node)?;
    {
        // Only a live member, from the address it advertises, is listened to.
        let st = ctx.handle.lock();
        if hello.node == st.me {
            return Err("a link from a node with this node's own id".into());
        }
        let peer = sock.peer_addr().map_err(|e| e.to_string())?;
        match st.live.get(&hello.node) {
            Some(r) if r.cluster.ip() == peer.ip() => {}
            Some(r) => {
                return Err(format!(
                    "hello as {} from {}, which advertises {}",
                    hello.node,
                    peer.ip(),
                    r.cluster.ip()
                ))
            }
            None => {
                return Err(format!(
                    "hello as {}, which is not a live member",
                    hello.node
                ))
            }
        }
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let me_n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (end_tx, mut ended) = watch::channel(false);
    if let Some((_, older)) = current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(hello.node.clone(), (me_n, end_tx))
    {
        let _ = older.send(true);
    }
    let result = serve_frames(&mut sock, &hello, ctx, &mut ended).await;
    let mut cur = current.lock().unwrap_or_else(|p| p.into_inner());
    if cur.get(&hello.node).is_some_and(|(n, _)| *n == me_n) {
        cur.remove(&hello.node);
    }
    result
}

/// The frames of one accepted link, until it fails or a newer link from the same node
/// ends it.
async fn serve_frames(
    sock: &mut TcpStream,
    hello: &Hello,
    ctx: &Ctx,
    ended: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    // Buffered: a frame's length, kind and body (and the frames behind it) come in one
    // read, not a system call each.
    let (rd, mut wr) = sock.split();
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    loop {
        let (kind, body) = tokio::select! {
            r = read_frame(&mut rd, ctx.frame_max) => r?,
            _ = ended.changed() => return Err("a newer link from the same node".into()),
        };
        match kind {
            PING => write_frame(&mut wr, PONG, &body).await?,
            HELLO | PONG => {
                return Err(format!("unexpected frame kind {kind} from {}", hello.node))
            }
            _ => {
                let ev = LinkEvent::Frame {
                    node: hello.node.clone(),
                    kind,
                    body,
                };
                // Waits when the plane is behind: the peer's writes slow down with it.
                ctx.events
                    .send(ev)
                    .await
                    .map_err(|_| "stopping".to_string())?;
            }
        }
    }
}

/// Keeps one dialling task per live peer.
async fn dial_loop(ctx: Ctx, cfg: ClusterConfig, mut stop: watch::Receiver<bool>) {
    let me = cfg.node.clone().unwrap_or_default();
    // By peer: the address dialled and the task. A peer that came back at another
    // address (a restart between two passes of this loop) gets a new task.
    type Tasks = hashbrown::HashMap<String, (std::net::SocketAddr, tokio::task::JoinHandle<()>)>;
    let mut tasks: Tasks = hashbrown::HashMap::new();
    loop {
        let peers: Vec<(String, std::net::SocketAddr)> = {
            let st = ctx.handle.lock();
            st.live
                .values()
                .filter(|r| r.id != me)
                .map(|r| (r.id.clone(), r.cluster))
                .collect()
        };
        let mut ended = Vec::new();
        tasks.retain(|id, (addr, t)| {
            let keep = !t.is_finished() && peers.iter().any(|(p, a)| p == id && a == addr);
            if !keep {
                t.abort();
                ended.push(id.clone());
            }
            keep
        });
        for id in ended {
            // An aborted task cannot say so itself.
            let _ = ctx.events.send(LinkEvent::Down { node: id }).await;
        }
        for (id, addr) in peers {
            if !tasks.contains_key(&id) {
                let hello = Hello {
                    node: me.clone(),
                    cluster: cfg.prefix.clone(),
                };
                let peer = id.clone();
                let c = ctx.clone();
                let task = tokio::spawn(async move { dial(c, peer, addr, hello).await });
                tasks.insert(id, (addr, task));
            }
        }
        {
            // Peers that are gone are shown as down.
            let mut st = ctx.handle.lock();
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
async fn dial(ctx: Ctx, peer: String, addr: std::net::SocketAddr, hello: Hello) {
    let hello = serde_json::to_vec(&hello).unwrap_or_default();
    loop {
        set_state(&mut ctx.handle.lock(), &peer, "connecting", None);
        let result = keep_link(&ctx, &peer, addr, &hello).await;
        let _ = ctx
            .events
            .send(LinkEvent::Down { node: peer.clone() })
            .await;
        let err = match result {
            Ok(()) => "closed".to_string(),
            Err(e) => e,
        };
        set_state(&mut ctx.handle.lock(), &peer, "down", Some(err));
        tokio::time::sleep(REDIAL).await;
    }
}

/// One dialled link's life: connect, handshake, then the plane's frames and a heartbeat,
/// until a write fails or a heartbeat goes unanswered.
async fn keep_link(
    ctx: &Ctx,
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
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    ctx.events
        .send(LinkEvent::Up {
            node: peer.to_string(),
            tx,
            queued: queued.clone(),
            dead: dead.clone(),
        })
        .await
        .map_err(|_| "stopping".to_string())?;
    {
        let mut st = ctx.handle.lock();
        set_state(&mut st, peer, "up", None);
        if let Some(l) = st.links.get_mut(peer) {
            l.connects_total += 1;
        }
    }
    let (mut rd, mut wr) = sock.into_split();
    let epoch = Instant::now();
    let handle = ctx.handle.clone();
    let owned_peer = peer.to_string();
    // The peer writes only heartbeat answers on this link.
    let mut pongs = tokio::spawn(async move {
        loop {
            let (kind, body) = read_frame(&mut rd, 64).await?;
            if kind != PONG || body.len() != 8 {
                return Err::<(), String>(format!("unexpected frame kind {kind}"));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&body);
            let rtt = (epoch.elapsed().as_micros() as u64).saturating_sub(u64::from_be_bytes(b));
            if let Some(l) = handle.lock().links.get_mut(&owned_peer) {
                l.rtt_us = Some(rtt);
            }
        }
    });
    let mut beat = tokio::time::interval(HEARTBEAT);
    let result = loop {
        tokio::select! {
            r = &mut pongs => break match r {
                Ok(Err(e)) => Err(e),
                _ => Err("heartbeat reader ended".to_string()),
            },
            _ = beat.tick() => {
                let sent = epoch.elapsed().as_micros() as u64;
                if let Err(e) = write_frame(&mut wr, PING, &sent.to_be_bytes()).await {
                    break Err(e);
                }
            }
            buf = rx.recv() => {
                let Some(buf) = buf else { break Ok(()) };
                if dead.load(Ordering::Acquire) {
                    break Err("given up by the plane".to_string());
                }
                let len = buf.len();
                let w = tokio::time::timeout(IDLE_LIMIT, wr.write_all(&buf)).await;
                queued.fetch_sub(len, Ordering::AcqRel);
                match w {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e.to_string()),
                    Err(_) => break Err("write timed out".to_string()),
                }
            }
        }
    };
    pongs.abort();
    result
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

/// The read buffer of an accepted link.
const READ_BUFFER_BYTES: usize = 64 << 10;

/// Reads one frame of at most `max` bytes within [`IDLE_LIMIT`].
async fn read_frame<R: AsyncRead + Unpin>(sock: &mut R, max: usize) -> Result<(u8, Bytes), String> {
    let read = async {
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).await.map_err(|e| e.to_string())?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > max {
            return Err(format!("frame of {len} bytes (limit {max})"));
        }
        let mut kind = [0u8; 1];
        sock.read_exact(&mut kind)
            .await
            .map_err(|e| e.to_string())?;
        // Memory follows what arrives, not what the length announced.
        let mut body = Vec::with_capacity((len - 1).min(64 * 1024));
        let got = (&mut *sock)
            .take(len as u64 - 1)
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        if got != len - 1 {
            return Err("frame cut short".into());
        }
        Ok((kind[0], Bytes::from(body)))
    };
    tokio::time::timeout(IDLE_LIMIT, read)
        .await
        .map_err(|_| format!("nothing for {}s", IDLE_LIMIT.as_secs()))?
}

/// Writes one frame within [`IDLE_LIMIT`].
async fn write_frame<W: AsyncWrite + Unpin>(
    sock: &mut W,
    kind: u8,
    body: &[u8],
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(5 + body.len());
    buf.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    buf.push(kind);
    buf.extend_from_slice(body);
    tokio::time::timeout(IDLE_LIMIT, sock.write_all(&buf))
        .await
        .map_err(|_| "write timed out".to_string())?
        .map_err(|e| e.to_string())
}
