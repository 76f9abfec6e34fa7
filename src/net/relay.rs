//! TLS and WebSocket connections on the accepting shard: the TLS handshake, the WebSocket
//! upgrade, CONNECT, and then either serving the connection here or relaying it to the
//! owner shard through a socket pair (see the module doc of [`crate::net`]).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::server::TlsStream;
use glommio::net::{TcpStream, UnixStream};
use std::os::fd::{FromRawFd, OwnedFd};

use super::conn::{serve, Client, CLOSE_DRAIN};
use super::connect::{handshake_limits, place, refuse, Placed};
use super::handoff::hand_off;
use super::{tls, ws, Listener};
use crate::config::Transport;
use crate::protocol::{ProtocolVersion, ReasonCode};
use crate::shard::event::{ConnGuard, Handoff, HandoffSocket};
use crate::shard::service::BrokerShard;
use shards::Shard;

/// Bytes a relay moves per read, in each direction (its whole buffer).
const RELAY_CHUNK_BYTES: usize = 16 * 1024;

type DynReader = Box<dyn AsyncRead + Unpin>;
type DynWriter = Box<dyn AsyncWrite + Unpin>;

/// Runs `f` until `deadline`; `None` when it passed.
async fn before<T>(deadline: Instant, f: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(left).await;
        None
    })
    .await
}

/// The WebSocket upgrade of a `ws` or `wss` connection (within `deadline`), as byte-stream
/// halves; `None` when it failed (logged) or took too long.
async fn upgrade<S>(
    stream: S,
    listener: &Listener,
    ws_max: usize,
    deadline: Instant,
) -> Option<(DynReader, DynWriter)>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    match before(deadline, ws::accept(stream, &listener.ws_path, ws_max)).await? {
        Ok(w) => {
            let (r, w) = ws::split(w);
            Some((Box::new(r), Box::new(w)))
        }
        Err(e) => {
            tracing::debug!(listener = %listener.name, error = %e, "WebSocket upgrade failed");
            None
        }
    }
}

/// On the accepting shard, for a `tls`, `ws` or `wss` listener: the TLS handshake and/or
/// WebSocket upgrade (within the connect timeout, like CONNECT itself), then CONNECT, then
/// the connection is served here or relayed to its owner.
pub(super) async fn handshake(
    shard: Shard<BrokerShard>,
    stream: TcpStream,
    listener: &Listener,
    guard: Option<ConnGuard>,
) {
    let _ = stream.set_nodelay(true);
    let mut client = Client {
        addr: stream.peer_addr().ok(),
        cert_identity: None,
    };
    let (packet_bytes_max, timeout) = handshake_limits(&shard);
    let deadline = Instant::now() + timeout;
    let ws_max = ws::message_bytes_max(packet_bytes_max);
    let (reader, writer): (DynReader, DynWriter) = match listener.transport {
        Transport::Tcp => unreachable!("plain TCP is handed off as a socket"),
        Transport::Ws => match upgrade(stream, listener, ws_max, deadline).await {
            Some(halves) => halves,
            None => return,
        },
        Transport::Tls | Transport::Wss => {
            let Some(acceptor) = listener.tls.as_ref() else {
                tracing::error!(listener = %listener.name, "a TLS listener without its certificate; connection closed");
                return;
            };
            let accepted = before(deadline, acceptor.accept(stream)).await;
            let Some(tls) = tls_accepted(accepted, listener) else {
                return;
            };
            if listener.identity_as_username {
                client.cert_identity = cert_identity_of(&tls);
            }
            if listener.transport == Transport::Tls {
                tls_halves(tls)
            } else {
                match upgrade(tls, listener, ws_max, deadline).await {
                    Some(halves) => halves,
                    None => return,
                }
            }
        }
    };
    let (mut reader, mut writer) = (reader, writer);
    let left = deadline.saturating_duration_since(Instant::now());
    match place(&shard, &mut reader, &mut writer, left, false).await {
        Placed::Done => {
            let _ = writer.close().await;
        }
        Placed::Here {
            connect,
            rest,
            assigned,
        } => {
            tracing::debug!(listener = %listener.name, client = %connect.client_id, "serving on the accepting shard");
            serve(shard, reader, writer, connect, rest, assigned, client).await
        }
        Placed::Owner { owner, bytes } => {
            tracing::debug!(listener = %listener.name, owner, "relaying to the owner shard");
            relay(&shard, owner, reader, writer, bytes, client).await
        }
        Placed::Node {
            addr,
            bytes,
            version,
        } => relay_to_node(reader, writer, addr, bytes, version).await,
    }
    drop(guard);
}

/// The TLS stream of a finished handshake; `None` when it failed (logged) or took too long
/// (`accepted` is `None`).
fn tls_accepted<T>(accepted: Option<std::io::Result<T>>, listener: &Listener) -> Option<T> {
    match accepted? {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::debug!(listener = %listener.name, error = %e, "TLS handshake failed");
            None
        }
    }
}

/// The identity (for the username) of the client's certificate, if it sent one.
fn cert_identity_of(tls: &TlsStream<TcpStream>) -> Option<String> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::identity)
}

/// A `tls` connection's halves as byte streams.
fn tls_halves(tls: TlsStream<TcpStream>) -> (DynReader, DynWriter) {
    let (r, w) = futures_lite::io::split(tls);
    (Box::new(r), Box::new(w))
}

/// Hands the owner one end of a new socket pair and relays between the client and the
/// other end until both directions end.
async fn relay(
    shard: &Shard<BrokerShard>,
    owner: usize,
    reader: DynReader,
    writer: DynWriter,
    bytes: BytesMut,
    client: Client,
) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills `fds` with two new descriptors on success; checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "socketpair for a relayed connection failed");
        return;
    }
    // SAFETY: socketpair made both descriptors for us alone: fds[0] stays here, fds[1]
    // goes to the owner (closed by whoever drops it).
    let (local, theirs) = unsafe {
        (
            UnixStream::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let handoff = Handoff {
        fd: theirs,
        socket: HandoffSocket::Unix,
        bytes: bytes.freeze(),
        peer: client.addr,
        cert_identity: client.cert_identity,
        guard: None,
    };
    hand_off(shard, owner, handoff).await;
    pump_both(reader, writer, local).await;
}

/// Relays between a client and its owner (a shard's socket pair end, another node's relay
/// listener) until both directions end. Client to owner runs as its own task so that it
/// can be dropped (cancelled) once the owner has closed and the client did not follow
/// within CLOSE_DRAIN.
async fn pump_both<R, W, O>(reader: R, writer: W, owner: O)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin,
    O: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (from_owner, to_owner) = futures_lite::io::split(owner);
    let upstream = glommio::spawn_local(pump(reader, to_owner));
    pump(from_owner, writer).await;
    future::or(
        async {
            upstream.await;
        },
        glommio::timer::sleep(CLOSE_DRAIN),
    )
    .await;
}

/// How long dialling another node's relay listener may take.
const NODE_DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Relays a client to the cluster node that owns it: a TCP connection to that node's
/// relay listener, the bytes read so far (its CONNECT) first, then both directions until
/// they end. The owner sees the connection as coming from this node. A node that cannot
/// be reached: "server unavailable", and the client tries again.
pub(super) async fn relay_to_node<R, W>(
    reader: R,
    mut writer: W,
    addr: std::net::SocketAddr,
    bytes: BytesMut,
    version: ProtocolVersion,
) where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin,
{
    let dial = future::or(async { Some(TcpStream::connect(addr).await) }, async {
        glommio::timer::sleep(NODE_DIAL_TIMEOUT).await;
        None
    })
    .await;
    let mut upstream = match dial {
        Some(Ok(s)) => s,
        other => {
            tracing::debug!(%addr, error = ?other.map(|r| r.err()), "cannot reach the owner node");
            refuse(&mut writer, version, ReasonCode::ServerUnavailable).await;
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if upstream.write_all(&bytes).await.is_err() {
        refuse(&mut writer, version, ReasonCode::ServerUnavailable).await;
        return;
    }
    pump_both(reader, writer, upstream).await;
}

/// Copies `from` to `to` through one fixed buffer, flushing after each write, until `from`
/// ends or either side fails; then closes `to` (end of stream for its reader).
async fn pump<R, W>(mut from: R, mut to: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_CHUNK_BYTES];
    let mut open = true;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Once `to` is gone, what still comes from `from` is read and dropped until it
        // ends (the caller bounds that): a peer that writes after the other side closed
        // (a client's PUBREL after the broker's DISCONNECT) must not get a reset before it
        // has read what was sent to it.
        if open && (to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err()) {
            open = false;
        }
        glommio::yield_if_needed().await;
    }
    let _ = to.close().await;
}
