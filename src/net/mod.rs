//! Sockets: the listeners every shard shares with SO_REUSEPORT, the CONNECT handshake on the
//! accepting shard, the hand-off of a connection to the shard that owns its client, and the
//! reader and writer of a served connection.
//!
//! A connection's life on its owning shard: `conn::serve` asks the core to accept the CONNECT
//! (which writes CONNACK into the connection's `Outbound`); a writer task writes whatever
//! the core appends, in batches; the reader decodes packets and hands each to the core. When
//! the broker closes a connection (error, takeover, shutdown) the writer flushes, shuts down
//! its half, and the reader drains what the client still sends (bounded), so that the client
//! reads our DISCONNECT instead of a reset.
//!
//! ## Transports and the hand-off
//!
//! A connection belongs to the shard its client id hashes to, but the kernel gives it to
//! whichever shard's socket it picks. The accepting shard reads CONNECT, then:
//! - **TCP** (`listen`, `transport = "tcp"`): if another shard owns the client, the socket
//!   itself moves: a duplicate of its fd and every byte read so far go to the owner
//!   (`Mail::Handoff`, served by `handoff::handoff_loop`), which serves it as if it had accepted it. Nothing stays behind.
//! - **TLS, WebSocket, WebSocket over TLS**: the session state (keys, sequence numbers,
//!   frame parser) lives in this shard's memory and cannot move with an fd. This shard
//!   terminates TLS and WebSocket ([`tls`], [`ws`]) and reads CONNECT from the plain byte
//!   stream. If it owns the client it serves that stream directly (`conn::serve` is generic over
//!   the reader and writer). If not, it makes a `socketpair(AF_UNIX, SOCK_STREAM)`, hands
//!   one end to the owner exactly like a TCP socket (with the CONNECT bytes and the client
//!   certificate's identity), and relays between the client and its own end ((`relay`)):
//!   a fixed buffer per direction, each read written out (and flushed) before the next read,
//!   so a slow side pushes back on the other; an end of stream on one side shuts down the
//!   write side of the other, and when the owner has closed, the client gets
//!   `conn::CLOSE_DRAIN` to close before the relay drops it.
//!
//! A relayed connection costs one extra copy through the kernel each way and holds a
//! connection slot on both shards (`limits.connections_max` counts it twice); plain TCP has
//! no extra step. Per-listener limits are in [`listener`].
//!
//! Flow control (see `README.md`, "Overload and slow clients"): the reader charges each
//! connection's [`rate::InboundLimiter`] and waits out its debt before it handles the next
//! packet; it also stops reading while the connection's own `Outbound` holds more than
//! twice the outbound cap (a client that does not read its answers cannot make them pile
//! up). The writer gives up on a connection whose writes make no progress for
//! `limits.write_stall_timeout_s`, and tells the shard when it made room for a session that
//! was waiting for it.

pub mod rate;

mod conn;
mod connect;
mod handoff;
mod listener;
mod relay;
pub mod tls;
pub mod ws;

pub use handoff::{handoff_loop, serve_handoff};
pub use listener::{Listener, ListenerLimits, ListenerPermit, Refusal};

use handoff::handshake;

use futures_lite::future;
use glommio::net::TcpListener;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Transport;
use crate::shard::event::ConnGuard;
use crate::shard::service::BrokerShard;
use shards::Shard;

/// Listen backlog of each shard's socket.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds `shards` sockets to `addr` with SO_REUSEPORT (the kernel spreads connections over
/// them). Port 0 is resolved by the first bind and reused by the others. Returns the fds and
/// the address actually bound.
pub fn bind_listeners(addr: SocketAddr, shards: usize) -> io::Result<(Vec<RawFd>, SocketAddr)> {
    if addr.port() != 0 {
        probe_port(addr)?;
    }
    let mut fds = Vec::with_capacity(shards);
    let mut bound = addr;
    for _ in 0..shards {
        let domain = socket2::Domain::for_address(bound);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if bound.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if let Err(e) = s
            .bind(&bound.into())
            .and_then(|()| s.listen(LISTEN_BACKLOG))
        {
            for fd in fds {
                // SAFETY: these fds were made above and are not shared.
                drop(unsafe { socket2::Socket::from_raw_fd(fd) });
            }
            return Err(e);
        }
        if let Some(a) = s.local_addr()?.as_socket() {
            bound = a;
        }
        fds.push(s.into_raw_fd());
    }
    Ok((fds, bound))
}

/// SO_REUSEPORT would let this broker silently share a port with another listener (another
/// shardmq, say) and split the clients between them. A plain bind fails while anything
/// listens there: a taken port is an error, not a merge. A broker killed a moment ago can
/// still hold its sockets while the kernel tears down its io_uring, so the probe retries for
/// [`PORT_PROBE_PATIENCE`] before it gives up.
fn probe_port(addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + PORT_PROBE_PATIENCE;
    loop {
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        probe.set_reuse_address(true)?;
        if addr.is_ipv6() {
            probe.set_only_v6(true)?;
        }
        match probe.bind(&addr.into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a taken port is retried at start (see [`probe_port`]).
const PORT_PROBE_PATIENCE: Duration = Duration::from_secs(2);

/// Accepts connections on one of this shard's listening sockets until the pool stops.
pub async fn accept_loop(shard: Shard<BrokerShard>, fd: RawFd, listener: Arc<Listener>) {
    // SAFETY: the fd is a listening TCP socket made by `bind_listeners`, owned by this shard.
    let tcp = unsafe { TcpListener::from_raw_fd(fd) };
    let stopped = shard.stopped();
    futures_lite::pin!(stopped);
    loop {
        let accepted = future::or(async { Some(tcp.accept().await) }, async {
            (&mut stopped).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let permit = match listener.limits.admit() {
                    Ok(p) => p,
                    Err(why) => {
                        tracing::warn!(
                            listener = %listener.name,
                            limit = match why {
                                Refusal::ConnectionsMax => "connections_max",
                                Refusal::Rate => "connect_rate_per_s",
                            },
                            "listener limit reached; closing a new connection"
                        );
                        drop(stream);
                        continue;
                    }
                };
                let svc = shard.service();
                if !svc.admit_connection() {
                    tracing::warn!(
                        shard = shard.id().index(),
                        "connection limit reached; refusing"
                    );
                    drop(stream);
                    continue;
                }
                let shard2 = shard.clone();
                let guard = permit.map(|p| Box::new(p) as ConnGuard);
                let listener = listener.clone();
                glommio::spawn_local(async move {
                    match listener.transport {
                        Transport::Tcp => {
                            handshake(shard2.clone(), stream, guard, listener.relayed).await
                        }
                        // Boxed: the TLS and WebSocket state would otherwise make every
                        // plain TCP connection's task as large as theirs (tens of KiB).
                        _ => {
                            Box::pin(relay::handshake(shard2.clone(), stream, &listener, guard))
                                .await
                        }
                    }
                    shard2.service().release_connection();
                })
                .detach();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
