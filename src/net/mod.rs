//! Sockets: the listeners every shard shares with SO_REUSEPORT, the CONNECT handshake on the
//! accepting shard, the hand-off of a connection to the shard that owns its client, and the
//! reader and writer of a served connection.
//!
//! A connection's life on its owning shard: [`serve`] asks the core to accept the CONNECT
//! (which writes CONNACK into the connection's [`Outbound`]); a writer task writes whatever
//! the core appends, in batches; the reader decodes packets and hands each to the core. When
//! the broker closes a connection (error, takeover, shutdown) the writer flushes, shuts down
//! its half, and the reader drains what the client still sends (bounded), so that the client
//! reads our DISCONNECT instead of a reset.

use bytes::{Bytes, BytesMut};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::protocol::{
    decode, ConnAck, Connect, DecodeError, DecodeLimits, MqttStr, Packet, ProtocolVersion,
    ReasonCode,
};
use crate::session::{owner_shard, Outbound};
use crate::shard::core::{Ending, Flow, Login, LoginStep};
use crate::shard::event::Event;
use crate::shard::service::BrokerShard;
use shards::{Shard, ShardId};

/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 4096;
/// How long a closing connection keeps reading (and discarding) before the socket is dropped.
const CLOSE_DRAIN: Duration = Duration::from_secs(2);
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
pub async fn accept_loop(shard: Shard<BrokerShard>, fd: RawFd) {
    // SAFETY: the fd is a listening TCP socket made by `bind_listeners`, owned by this shard.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let stopped = shard.stopped();
    futures_lite::pin!(stopped);
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            (&mut stopped).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
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
                glommio::spawn_local(async move {
                    handshake(shard2.clone(), stream).await;
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

/// Reads until CONNECT decodes, bounded by the connect timeout and the packet limit.
async fn read_connect(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_packet: usize,
    timeout: Duration,
) -> Result<Box<Connect>, ConnectFailure> {
    let limits = DecodeLimits::new(max_packet, None);
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 1024];
    loop {
        let mut probe = buf.clone();
        match decode(&mut probe, &limits) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(ConnectFailure::Decode(DecodeError::ExpectedConnect)),
            Ok(None) => {}
            Err(e) => return Err(ConnectFailure::Decode(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = future::or(async { Some(stream.read(&mut chunk).await) }, async {
            glommio::timer::sleep(left).await;
            None
        })
        .await;
        match n {
            None => return Err(ConnectFailure::Timeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(ConnectFailure::Closed),
            Some(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Debug)]
enum ConnectFailure {
    Timeout,
    Closed,
    Decode(DecodeError),
}

/// The protocol level a CONNECT claims, read straight from its bytes (for answering a
/// CONNECT that does not decode in the client's own version).
fn sniff_level(buf: &[u8]) -> Option<u8> {
    let mut i = 1;
    while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
        i += 1;
    }
    let start = i + 1;
    let name_len = u16::from_be_bytes([*buf.get(start)?, *buf.get(start + 1)?]) as usize;
    buf.get(start + 2 + name_len).copied()
}

/// On the accepting shard: reads CONNECT, then serves the connection here or hands it to
/// the shard that owns the client.
async fn handshake(shard: Shard<BrokerShard>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (max_packet, timeout) = {
        let core = shard.service().core.borrow();
        let l = &core.config().limits;
        (
            l.packet_bytes_max as usize,
            Duration::from_secs(l.connect_timeout_s as u64),
        )
    };
    let mut buf = BytesMut::with_capacity(512);
    let connect = match read_connect(&mut stream, &mut buf, max_packet, timeout).await {
        Ok(c) => c,
        Err(ConnectFailure::Decode(e)) => {
            refuse_undecodable(&mut stream, &buf, &e).await;
            return;
        }
        Err(_) => return,
    };
    let version = connect.protocol;
    let mut assigned = None;
    if connect.client_id.is_empty() {
        let allowed = match version {
            ProtocolVersion::V5 => true,
            ProtocolVersion::V3_1_1 => connect.clean_start,
            ProtocolVersion::V3_1 => false,
        };
        if !allowed {
            refuse(&mut stream, version, ReasonCode::ClientIdentifierNotValid).await;
            return;
        }
        let seed = shard.service().next_seed();
        assigned = Some(shard.service().core.borrow_mut().assign_client_id(seed));
    }
    let owner = match &assigned {
        Some(_) => shard.id().index(),
        None => owner_shard(connect.client_id.as_bytes(), shard.count()),
    };
    if owner == shard.id().index() {
        let mut rest = buf;
        let _ = decode(&mut rest, &DecodeLimits::new(max_packet, None));
        serve(shard, stream, connect, rest, assigned, None).await;
        return;
    }
    // Hand the socket to its owner: duplicate the fd (dropping the stream closes its own),
    // then send the copy with every byte read so far.
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd we own; the result is checked.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    drop(stream);
    if fd < 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "hand-off dup failed");
        return;
    }
    let event = Event::Handoff {
        fd,
        bytes: buf.freeze(),
    };
    shard.service().note_handoff();
    if let Err(e) = shard.send_to(ShardId::new(owner), vec![event]).await {
        // The owner is gone (shutdown): close the socket we kept.
        if let Some(Event::Handoff { fd, .. }) = e.msg.and_then(|mut v| v.pop()) {
            // SAFETY: the fd came back unused.
            unsafe { libc::close(fd) };
        }
    }
}

/// On the owning shard: takes over a socket handed over by another shard.
pub async fn serve_handoff(shard: Shard<BrokerShard>, fd: RawFd, bytes: Bytes) {
    // SAFETY: the accepting shard duplicated this fd for us and no longer uses it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let max_packet = shard
        .service()
        .core
        .borrow()
        .config()
        .limits
        .packet_bytes_max as usize;
    let mut buf = BytesMut::from(&bytes[..]);
    match decode(&mut buf, &DecodeLimits::new(max_packet, None)) {
        Ok(Some(Packet::Connect(c))) => serve(shard, stream, c, buf, None, None).await,
        _ => tracing::warn!("hand-off without a CONNECT; closing"),
    }
}

/// Answers a CONNECT that did not decode: a CONNACK in the version the client claims when
/// the specification asks for one, then close.
async fn refuse_undecodable(stream: &mut TcpStream, buf: &[u8], e: &DecodeError) {
    tracing::debug!(error = %e, "bad CONNECT");
    match (e, sniff_level(buf)) {
        (DecodeError::UnsupportedProtocolVersion(_), _) => {
            // 3.1.1 3.1.2.2: return code 0x01, in the 3.1.1 format any client can read.
            refuse(
                stream,
                ProtocolVersion::V3_1_1,
                ReasonCode::UnsupportedProtocolVersion,
            )
            .await
        }
        (_, Some(5)) => refuse(stream, ProtocolVersion::V5, e.reason_code()).await,
        _ => {}
    }
}

async fn refuse(stream: &mut TcpStream, version: ProtocolVersion, rc: ReasonCode) {
    let mut out = BytesMut::new();
    let ack = Packet::ConnAck(Box::new(ConnAck {
        session_present: false,
        reason_code: rc,
        properties: Default::default(),
    }));
    if ack.encode(version, &mut out).is_ok() {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
}

enum ReadEvent {
    Data(io::Result<usize>),
    KeepAliveExpired,
    Closed,
}

/// Serves a connection whose CONNECT this shard owns, until it ends.
async fn serve(
    shard: Shard<BrokerShard>,
    stream: TcpStream,
    connect: Box<Connect>,
    mut buf: BytesMut,
    assigned: Option<MqttStr>,
    cert_identity: Option<String>,
) {
    let version = connect.protocol;
    let out = Rc::new(Outbound::new(version));
    let peer = stream.peer_addr().ok();
    let login = authenticate(&shard, &connect, cert_identity.as_deref(), peer).await;
    let accepted = shard.service().core.borrow_mut().connect_as(
        &connect,
        assigned,
        login,
        out.clone(),
        Instant::now(),
    );
    drop(connect);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let writer_task = glommio::spawn_local(write_loop(out.clone(), writer));
    let Ok(accepted) = accepted else {
        writer_task.await;
        return;
    };
    let mut ctx = accepted.ctx;
    let keep_alive = match accepted.keep_alive_s {
        0 => None,
        s => Some(Duration::from_millis(s as u64 * 1500)),
    };
    let max_packet = shard
        .service()
        .core
        .borrow()
        .config()
        .limits
        .packet_bytes_max as usize;
    let limits = DecodeLimits::new(max_packet, Some(version));
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut ending = Ending::Lost;
    let mut broker_closed = false;
    'conn: loop {
        loop {
            match decode(&mut buf, &limits) {
                Ok(Some(packet)) => {
                    let now = Instant::now();
                    let flow = shard
                        .service()
                        .core
                        .borrow_mut()
                        .on_packet(&mut ctx, packet, now);
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Disconnect(e)) => {
                            ending = e;
                            break 'conn;
                        }
                        Err(rc) => {
                            out.close(Some(rc));
                            broker_closed = true;
                            break 'conn;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(client = %ctx.client_id, error = %e, "malformed packet");
                    out.close(Some(e.reason_code()));
                    broker_closed = true;
                    break 'conn;
                }
            }
        }
        let event = future::or(
            async { ReadEvent::Data(reader.read(&mut chunk).await) },
            future::or(
                async {
                    out.closed().await;
                    ReadEvent::Closed
                },
                async {
                    match keep_alive {
                        Some(d) => glommio::timer::sleep(d).await,
                        None => future::pending::<()>().await,
                    }
                    ReadEvent::KeepAliveExpired
                },
            ),
        )
        .await;
        match event {
            ReadEvent::Data(Ok(0)) | ReadEvent::Data(Err(_)) => break,
            ReadEvent::Data(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                // A socket that always has bytes waiting would otherwise keep this task
                // running and starve every writer of the shard.
                glommio::yield_if_needed().await;
            }
            ReadEvent::Closed => {
                broker_closed = true;
                break;
            }
            ReadEvent::KeepAliveExpired => {
                out.close(Some(ReasonCode::KeepAliveTimeout));
                broker_closed = true;
                break;
            }
        }
    }
    shard
        .service()
        .core
        .borrow_mut()
        .disconnected(&ctx, ending, Instant::now());
    out.close(None);
    writer_task.await;
    if broker_closed {
        // Let the client read our DISCONNECT: keep reading (and discarding) until it closes.
        let drain = async {
            while let Ok(n) = reader.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
        };
        future::or(drain, glommio::timer::sleep(CLOSE_DRAIN)).await;
    }
}

/// Checks a CONNECT's credentials; a slow password hash is verified on the shard's password
/// thread, so that the executor keeps serving everyone else meanwhile. `cert_identity` is
/// the client certificate's identity when the listener takes it as the user name.
async fn authenticate(
    shard: &Shard<BrokerShard>,
    connect: &Connect,
    cert_identity: Option<&str>,
    peer: Option<SocketAddr>,
) -> Login {
    let step = shard
        .service()
        .core
        .borrow_mut()
        .check_login(connect, cert_identity, peer);
    match step {
        LoginStep::Done(login) => login,
        LoginStep::Verify(v) => shard.service().verify(v).await,
    }
}

/// Writes what the connection's [`Outbound`] collects, one batch per wake-up; on close,
/// flushes and shuts down the write half.
async fn write_loop(out: Rc<Outbound>, mut writer: futures_lite::io::WriteHalf<TcpStream>) {
    let mut spare = BytesMut::new();
    loop {
        let (batch, close) = out.next_batch(spare).await;
        if !batch.is_empty() && writer.write_all(&batch).await.is_err() {
            break;
        }
        spare = batch;
        if close {
            break;
        }
    }
    let _ = writer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_protocol_level() {
        let v5 = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02];
        assert_eq!(sniff_level(&v5), Some(5));
        assert_eq!(sniff_level(&v5[..5]), None);
    }
}
