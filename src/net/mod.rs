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
//!
//! ## Transports and the hand-off
//!
//! A connection belongs to the shard its client id hashes to, but the kernel gives it to
//! whichever shard's socket it picks. The accepting shard reads CONNECT, then:
//! - **TCP** (`listen`, `transport = "tcp"`): if another shard owns the client, the socket
//!   itself moves: a duplicate of its fd and every byte read so far go to the owner
//!   ([`Event::Handoff`]), which serves it as if it had accepted it. Nothing stays behind.
//! - **TLS, WebSocket, WebSocket over TLS**: the session state (keys, sequence numbers,
//!   frame parser) lives in this shard's memory and cannot move with an fd. This shard
//!   terminates TLS and WebSocket ([`tls`], [`ws`]) and reads CONNECT from the plain byte
//!   stream. If it owns the client it serves that stream directly ([`serve`] is generic over
//!   the reader and writer). If not, it makes a `socketpair(AF_UNIX, SOCK_STREAM)`, hands
//!   one end to the owner exactly like a TCP socket (with the CONNECT bytes and the client
//!   certificate's identity), and relays between the client and its own end ([`relay`]):
//!   a fixed buffer per direction, each read written out (and flushed) before the next read,
//!   so a slow side pushes back on the other; an end of stream on one side shuts down the
//!   write side of the other, and when the owner has closed, the client gets
//!   [`CLOSE_DRAIN`] to close before the relay drops it.
//!
//! A relayed connection costs one extra copy through the kernel each way and holds a
//! connection slot on both shards (`limits.connections_max` counts it twice); plain TCP has
//! no extra step. Per-listener limits are in [`listener`].
//!
//! Flow control (see `README.md`, "Overload and slow clients"): the reader charges each
//! connection's [`rate::InboundLimiter`] and waits out its debt before it handles the next
//! packet; it also stops reading while the connection's own [`Outbound`] holds more than
//! twice the outbound cap (a client that does not read its answers cannot make them pile
//! up). The writer gives up on a connection whose writes make no progress for
//! `limits.write_stall_timeout_s`, and tells the shard when it made room for a session that
//! was waiting for it.

pub mod rate;

mod listener;
mod relay;
pub mod tls;
pub mod ws;

pub use listener::{Listener, ListenerLimits, ListenerPermit, Refusal};

use bytes::BytesMut;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream, UnixStream};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Transport;
use crate::protocol::{
    decode, fixed_header, packet_type, ConnAck, Connect, DecodeError, DecodeLimits, MqttStr,
    Packet, ProtocolVersion, ReasonCode,
};
use crate::session::{owner_shard, Outbound};
use crate::shard::core::{Ending, Flow, Login, LoginStep};
use crate::shard::event::{ConnGuard, Event, Handoff, HandoffSocket};
use crate::shard::service::{BrokerShard, IoCounters};
use shards::{Shard, ShardId};

/// Bytes read from a socket at a time: the size starts at the minimum (what an idle
/// connection holds, in the read buffer and in the runtime's receive operation), doubles
/// while reads fill it and halves while they use less than a quarter of it.
const READ_MIN_BYTES: usize = 128;
/// A read buffer bigger than this is replaced by one sized for the packet under way when it
/// is less than half used.
const READ_SHRINK_BYTES: usize = 64 * 1024;
/// Bytes read at a time while waiting for CONNECT.
const CONNECT_READ_BYTES: usize = 256;
/// The most one read of a CONNECT's body asks for (a big CONNECT, a will with a large
/// payload, is read in chunks of this size).
const CONNECT_CHUNK_BYTES: usize = 64 * 1024;
const READ_MAX_BYTES: usize = 16 * 1024;
/// Capacity of a connection's outgoing buffers kept while nothing is waiting to be written.
const OUTBOUND_IDLE_KEEP_BYTES: usize = 1024;
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
                        Transport::Tcp => handshake(shard2.clone(), stream, guard).await,
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

/// Reads until CONNECT decodes, bounded by the connect timeout and the packet limit; returns
/// it with its size. Every byte read stays in `buf` (a hand-off passes them on). Linear in
/// the packet's size: the fixed header is checked as soon as it is in (type, flags,
/// announced length against the limit), the body is read in chunks that grow with what has
/// arrived (so that memory follows what the client really sent, not what it announced) up
/// to [`CONNECT_CHUNK_BYTES`], and the CONNECT is decoded once, when all of it is in; the
/// task yields between reads.
async fn read_connect<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    max_packet: usize,
    timeout: Duration,
) -> Result<(Box<Connect>, usize), ConnectFailure> {
    let limits = DecodeLimits::new(max_packet, None);
    let deadline = Instant::now() + timeout;
    let mut total = None;
    loop {
        if total.is_none() {
            // The fixed header (at most 5 bytes): refused at once if wrong or too large.
            match fixed_header(buf, &limits) {
                Ok(Some(h)) if h.ptype != packet_type::CONNECT => {
                    return Err(ConnectFailure::Decode(DecodeError::ExpectedConnect))
                }
                Ok(h) => total = h.map(|h| h.total),
                Err(e) => return Err(ConnectFailure::Decode(e)),
            }
        }
        if let Some(t) = total.filter(|&t| buf.len() >= t) {
            return match decode(&mut BytesMut::from(&buf[..t]), &limits) {
                Ok(Some(Packet::Connect(c))) => Ok((c, t)),
                Ok(_) => Err(ConnectFailure::Decode(DecodeError::ExpectedConnect)),
                Err(e) => Err(ConnectFailure::Decode(e)),
            };
        }
        let want = total.map_or(CONNECT_READ_BYTES, |t| {
            (t - buf.len())
                .min(buf.len().max(CONNECT_READ_BYTES))
                .min(CONNECT_CHUNK_BYTES)
        });
        let left = deadline.saturating_duration_since(Instant::now());
        // Read straight into the buffer: no array in this future, which lives as long as
        // the connection's task.
        let start = buf.len();
        buf.resize(start + want, 0);
        let n = future::or(
            async { Some(stream.read(&mut buf[start..]).await) },
            async {
                glommio::timer::sleep(left).await;
                None
            },
        )
        .await;
        let got = match n {
            Some(Ok(n)) => n,
            _ => 0,
        };
        buf.truncate(start + got);
        match n {
            None => return Err(ConnectFailure::Timeout),
            Some(Ok(0)) | Some(Err(_)) => return Err(ConnectFailure::Closed),
            Some(Ok(_)) => {}
        }
        glommio::yield_if_needed().await;
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

/// The connect timeout and packet limit of this shard's configuration.
fn handshake_limits(shard: &Shard<BrokerShard>) -> (usize, Duration) {
    let core = shard.service().core.borrow();
    let l = &core.config().limits;
    (
        l.packet_bytes_max as usize,
        Duration::from_secs(l.connect_timeout_s as u64),
    )
}

/// What the accepting shard does with a CONNECT it read.
enum Placed {
    /// Serve it here; the bytes after the CONNECT.
    Here {
        connect: Box<Connect>,
        rest: BytesMut,
        assigned: Option<MqttStr>,
    },
    /// Hand it to the owner shard, with every byte read.
    Owner { owner: usize, bytes: BytesMut },
    /// Refused (answered already) or lost.
    Done,
}

/// Reads CONNECT from `reader` and decides where the connection is served; refusals are
/// written to `writer`.
async fn place<R, W>(
    shard: &Shard<BrokerShard>,
    reader: &mut R,
    writer: &mut W,
    timeout: Duration,
) -> Placed
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (max_packet, _) = handshake_limits(shard);
    let mut buf = BytesMut::new();
    let read = read_connect(reader, &mut buf, max_packet, timeout).await;
    shard.service().io.add_in(buf.len());
    let (connect, connect_len) = match read {
        Ok(c) => c,
        Err(ConnectFailure::Decode(e)) => {
            refuse_undecodable(writer, &buf, &e).await;
            return Placed::Done;
        }
        Err(_) => return Placed::Done,
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
            refuse(writer, version, ReasonCode::ClientIdentifierNotValid).await;
            return Placed::Done;
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
        bytes::Buf::advance(&mut rest, connect_len);
        Placed::Here {
            connect,
            rest,
            assigned,
        }
    } else {
        Placed::Owner { owner, bytes: buf }
    }
}

/// Sends a connection to its owner shard; on failure (the owner is stopping) closes the fd.
async fn hand_off(shard: &Shard<BrokerShard>, owner: usize, handoff: Handoff) {
    shard.service().note_handoff();
    if let Err(e) = shard
        .send_to(ShardId::new(owner), vec![Event::Handoff(Box::new(handoff))])
        .await
    {
        if let Some(Event::Handoff(h)) = e.msg.and_then(|mut v| v.pop()) {
            // SAFETY: the fd came back unused.
            unsafe { libc::close(h.fd) };
        }
    }
}

/// On the accepting shard, for a plain TCP connection: reads CONNECT, then serves the
/// connection here or hands the socket to the shard that owns the client.
async fn handshake(shard: Shard<BrokerShard>, stream: TcpStream, guard: Option<ConnGuard>) {
    let _ = stream.set_nodelay(true);
    let (_, timeout) = handshake_limits(&shard);
    let raw_fd = stream.as_raw_fd();
    let peer = stream.peer_addr().ok();
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    // The three steps are boxed: awaited inline, their futures (`serve`'s, the connection's,
    // in practice more than once) would be stored in this task for the connection's life.
    let placed = Box::pin(place(&shard, &mut reader, &mut writer, timeout)).await;
    let (owner, bytes) = match placed {
        Placed::Done => return,
        Placed::Here {
            connect,
            rest,
            assigned,
        } => {
            let client = Client {
                addr: peer,
                cert_identity: None,
            };
            Box::pin(serve(
                shard, reader, writer, connect, rest, assigned, client,
            ))
            .await;
            drop(guard);
            return;
        }
        Placed::Owner { owner, bytes } => (owner, bytes),
    };
    // Hand the socket to its owner: duplicate the fd (dropping the stream closes its own),
    // then send the copy with every byte read so far.
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd we own (the halves still hold the stream); the
    // result is checked.
    let fd = unsafe { libc::fcntl(raw_fd, libc::F_DUPFD_CLOEXEC, 0) };
    drop((reader, writer));
    if fd < 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "hand-off dup failed");
        return;
    }
    let handoff = Handoff {
        fd,
        socket: HandoffSocket::Tcp,
        bytes: bytes.freeze(),
        peer,
        cert_identity: None,
        guard,
    };
    Box::pin(hand_off(&shard, owner, handoff)).await;
}

/// On the owning shard: takes over a socket handed over by another shard.
pub async fn serve_handoff(shard: Shard<BrokerShard>, handoff: Handoff) {
    let Handoff {
        fd,
        socket,
        bytes,
        peer,
        cert_identity,
        guard,
    } = handoff;
    let client = Client {
        addr: peer,
        cert_identity,
    };
    let max_packet = shard
        .service()
        .core
        .borrow()
        .config()
        .limits
        .packet_bytes_max as usize;
    let mut buf = BytesMut::from(&bytes[..]);
    let connect = match decode(&mut buf, &DecodeLimits::new(max_packet, None)) {
        Ok(Some(Packet::Connect(c))) => Some(c),
        _ => {
            tracing::warn!("hand-off without a CONNECT; closing");
            None
        }
    };
    // `serve` is boxed for the same reason as in `handshake`.
    match socket {
        HandoffSocket::Tcp => {
            // SAFETY: the accepting shard duplicated this fd for us and no longer uses it.
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            if let Some(c) = connect {
                let (r, w) = futures_lite::io::split(stream);
                Box::pin(serve(shard, r, w, c, buf, None, client)).await;
            }
        }
        HandoffSocket::Unix => {
            // SAFETY: our end of a socket pair the accepting shard made for us.
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            if let Some(c) = connect {
                let (r, w) = futures_lite::io::split(stream);
                Box::pin(serve(shard, r, w, c, buf, None, client)).await;
            }
        }
    }
    drop(guard);
}

/// Answers a CONNECT that did not decode: a CONNACK in the version the client claims when
/// the specification asks for one, then close.
async fn refuse_undecodable<W: AsyncWrite + Unpin>(stream: &mut W, buf: &[u8], e: &DecodeError) {
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

async fn refuse<W: AsyncWrite + Unpin>(stream: &mut W, version: ProtocolVersion, rc: ReasonCode) {
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
    /// A packet started `limits.packet_timeout_s` ago is still not complete.
    PacketTimeout,
    Closed,
}

/// The flow-control limits of a served connection.
#[derive(Clone, Copy)]
struct FlowLimits {
    outbound_max: usize,
    write_stall: Duration,
    packet_timeout: Duration,
    messages_per_s: u32,
    bytes_per_s: u64,
}

impl FlowLimits {
    fn of(shard: &Shard<BrokerShard>) -> FlowLimits {
        let core = shard.service().core.borrow();
        let l = &core.config().limits;
        FlowLimits {
            outbound_max: l.outbound_buffer_bytes_max as usize,
            write_stall: Duration::from_secs(l.write_stall_timeout_s as u64),
            packet_timeout: Duration::from_secs(l.packet_timeout_s as u64),
            messages_per_s: l.inbound_messages_per_s,
            bytes_per_s: l.inbound_bytes_per_s,
        }
    }
}

/// Who is connecting, as the accepting shard learned it.
#[derive(Debug, Default)]
struct Client {
    /// The client's address (none for a relayed connection's socket pair, unless carried).
    addr: Option<SocketAddr>,
    /// A verified client certificate's identity, when the listener uses it as the username.
    cert_identity: Option<String>,
}

/// Serves a connection whose CONNECT this shard owns, until it ends. `reader` and `writer`
/// are the two halves of the client's byte stream (a socket, or a TLS or WebSocket session).
async fn serve<R, W>(
    shard: Shard<BrokerShard>,
    mut reader: R,
    writer: W,
    connect: Box<Connect>,
    mut buf: BytesMut,
    assigned: Option<MqttStr>,
    client: Client,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let version = connect.protocol;
    let flow = FlowLimits::of(&shard);
    let out = Rc::new(Outbound::new(version));
    // The set-up runs in a block of its own so that what it borrowed across an await (the
    // CONNECT, the client's details, the connect result) is not kept in this future for the
    // connection's whole life.
    let (accepted, writer_task) = {
        let (connect, client) = (connect, client);
        // Boxed: its state (a password check on another thread) would otherwise be part of
        // this future, which every connection keeps for its whole life.
        let login = Box::pin(authenticate(
            &shard,
            &connect,
            client.cert_identity.as_deref(),
            client.addr,
        ))
        .await;
        let accepted = shard.service().core.borrow_mut().connect_as(
            &connect,
            assigned,
            login,
            out.clone(),
            Instant::now(),
        );
        let on_room = accepted.as_ref().ok().map(|a| {
            let (shard, client_id, conn_id) =
                (shard.clone(), a.ctx.client_id.clone(), a.ctx.conn_id);
            move || {
                shard
                    .service()
                    .core
                    .borrow_mut()
                    .on_writable(&client_id, conn_id, Instant::now())
            }
        });
        let writer_task = glommio::spawn_local(write_loop(
            out.clone(),
            writer,
            flow.write_stall,
            on_room,
            shard.service().io.clone(),
        ));
        let accepted = accepted.ok().map(|a| {
            let keep_alive = match a.keep_alive_s {
                0 => None,
                s => Some(Duration::from_millis(s as u64 * 1500)),
            };
            (a.ctx, keep_alive)
        });
        (accepted, writer_task)
    };
    let Some((mut ctx, keep_alive)) = accepted else {
        writer_task.await;
        return;
    };
    let max_packet = shard
        .service()
        .core
        .borrow()
        .config()
        .limits
        .packet_bytes_max as usize;
    let limits = DecodeLimits::new(max_packet, Some(version));
    let mut read = ReadSize::default();
    let mut ending = Ending::Lost;
    let mut broker_closed = false;
    // Idle connections are the common case: the limiter exists only when a limit is set.
    let mut rate = Some(rate::InboundLimiter::new(
        flow.messages_per_s,
        flow.bytes_per_s,
        Instant::now(),
    ))
    .filter(rate::InboundLimiter::is_active)
    .map(Box::new);
    let outbound_max = flow.outbound_max;
    // When the packet at the front of `buf` started to arrive (while it is incomplete).
    let mut packet_started: Option<Instant> = None;
    'conn: loop {
        let mut decoded_any = false;
        loop {
            // A client over its rate waits out its debt before its next packet is handled
            // (and before more is read from it). This does not count against keep alive.
            if let Some(wait) = rate.as_mut().and_then(|r| r.delay(Instant::now())) {
                let waited = Instant::now();
                future::or(glommio::timer::sleep(wait), async {
                    out.closed().await;
                })
                .await;
                // The broker's own throttling does not count against the packet's time.
                if let Some(t) = &mut packet_started {
                    *t += waited.elapsed();
                }
            }
            match decode(&mut buf, &limits) {
                Ok(Some(packet)) => {
                    decoded_any = true;
                    let now = Instant::now();
                    if let Some(r) = rate.as_mut() {
                        r.packet(now);
                    }
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
        // An incomplete packet: timed from its first byte, and its buffer (sized for the
        // packet the client announced: what it will hold once the packet is in) counted
        // against the shard's share of the budget for incomplete packets.
        if buf.is_empty() {
            if packet_started.take().is_some() {
                shard.service().incomplete.update(ctx.conn_id, 0, &out);
            }
        } else {
            if decoded_any || packet_started.is_none() {
                packet_started = Some(Instant::now());
                // A buffer that grew for a big packet is not kept for a small one.
                let announced = fixed_header(&buf, &limits).ok().flatten().map(|h| h.total);
                let need = announced.unwrap_or(buf.len()).max(buf.len());
                if buf.capacity() > READ_SHRINK_BYTES && need.saturating_mul(2) < buf.capacity() {
                    let mut small = BytesMut::with_capacity(need);
                    small.extend_from_slice(&buf);
                    buf = small;
                }
            }
            shard
                .service()
                .incomplete
                .update(ctx.conn_id, buf.capacity() as u64, &out);
        }
        // Back-pressure before reading more: the client's own answers must drain (this does
        // not count against keep alive either). Sessions keep messages below the cap plus
        // one packet, so only answers the client left unread take the buffer past twice the
        // cap.
        if out.pending_bytes() >= outbound_max.saturating_mul(2) {
            let waited = Instant::now();
            out.room(outbound_max).await;
            if let Some(t) = &mut packet_started {
                *t += waited.elapsed();
            }
        }
        let start = read.prepare(&mut buf);
        let event = future::or(
            async { ReadEvent::Data(reader.read(&mut buf[start..]).await) },
            future::or(
                async {
                    out.closed().await;
                    ReadEvent::Closed
                },
                async {
                    // Whichever comes first: keep alive, or the started packet's time.
                    let ka = keep_alive.map(|d| (d, ReadEvent::KeepAliveExpired));
                    let pk = packet_started.map(|t| {
                        let left =
                            (t + flow.packet_timeout).saturating_duration_since(Instant::now());
                        (left, ReadEvent::PacketTimeout)
                    });
                    let first = match (ka, pk) {
                        (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
                        (a, b) => a.or(b),
                    };
                    match first {
                        Some((d, event)) => {
                            glommio::timer::sleep(d).await;
                            event
                        }
                        None => future::pending().await,
                    }
                },
            ),
        )
        .await;
        read.finish(&mut buf, start, &event);
        match event {
            ReadEvent::Data(Ok(0)) | ReadEvent::Data(Err(_)) => break,
            ReadEvent::Data(Ok(n)) => {
                if let Some(r) = rate.as_mut() {
                    r.bytes(n, Instant::now());
                }
                shard.service().io.add_in(n);
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
            ReadEvent::PacketTimeout => {
                let inc = &shard.service().incomplete;
                inc.timed_out.set(inc.timed_out.get() + 1);
                tracing::debug!(client = %ctx.client_id, bytes = buf.len(), "packet not completed in time (limits.packet_timeout_s)");
                out.close(Some(ReasonCode::KeepAliveTimeout));
                broker_closed = true;
                break;
            }
        }
    }
    shard.service().incomplete.update(ctx.conn_id, 0, &out);
    // What the client had half sent is of no use now; the buffer goes before the drain
    // below, which can last a while.
    drop(buf);
    shard
        .service()
        .core
        .borrow_mut()
        .disconnected(&ctx, ending, Instant::now());
    out.close(None);
    writer_task.await;
    if broker_closed {
        // Let the client read our DISCONNECT: keep reading (and discarding) until it closes.
        let mut chunk = vec![0u8; READ_MIN_BYTES];
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

/// The size of a connection's next read, adapted to its traffic (see [`READ_MIN_BYTES`]).
struct ReadSize {
    bytes: usize,
    /// The size of the read under way (see [`ReadSize::prepare`]).
    window: usize,
}

impl Default for ReadSize {
    fn default() -> ReadSize {
        ReadSize {
            bytes: READ_MIN_BYTES,
            window: READ_MIN_BYTES,
        }
    }
}

impl ReadSize {
    /// Makes room for the next read at the end of `buf` (zero-filled, as a read takes an
    /// initialised slice) and returns where it starts. An empty buffer that grew large is
    /// given back first, so an idle connection keeps only a small one.
    /// While a packet is incomplete, the read stays within the room the decoder reserved
    /// for the rest of it, so that a big packet's buffer is not grown (doubled) past its
    /// size.
    fn prepare(&mut self, buf: &mut BytesMut) -> usize {
        if buf.is_empty() && buf.capacity() > 2 * self.bytes {
            *buf = BytesMut::new();
        }
        let start = buf.len();
        let spare = buf.capacity() - start;
        self.window = if start > 0 && spare >= READ_MIN_BYTES {
            self.bytes.min(spare)
        } else {
            self.bytes
        };
        buf.resize(start + self.window, 0);
        start
    }

    /// Keeps the bytes read (none unless the event is data) and adapts the next size.
    fn finish(&mut self, buf: &mut BytesMut, start: usize, event: &ReadEvent) {
        let n = match event {
            ReadEvent::Data(Ok(n)) => *n,
            _ => 0,
        };
        buf.truncate(start + n);
        if n == self.window && n == self.bytes {
            self.bytes = (self.bytes * 2).min(READ_MAX_BYTES);
        } else if n < self.window / 4 {
            self.bytes = (self.bytes / 2).max(READ_MIN_BYTES);
        }
    }
}

/// Largest spare batch buffer kept between writes; a bigger one (after a burst) is freed.
const SPARE_KEEP_BYTES: usize = 64 * 1024;

/// Writes what the connection's [`Outbound`] collects, one batch per wake-up; on close,
/// flushes and shuts down the write half. A write that makes no progress for `stall` ends
/// the connection (the client stopped reading). After each write that made room for a
/// session that was waiting for it, calls `on_room`.
async fn write_loop<W, F>(
    out: Rc<Outbound>,
    mut writer: W,
    stall: Duration,
    on_room: Option<F>,
    io: Rc<IoCounters>,
) where
    W: futures_lite::AsyncWrite + Unpin,
    F: Fn(),
{
    let mut spare = BytesMut::new();
    'batches: loop {
        let (batch, close) = out.next_batch(spare).await;
        let mut written = 0;
        while written < batch.len() {
            let step = future::or(
                async { Some(writer.write(&batch[written..]).await) },
                async {
                    glommio::timer::sleep(stall).await;
                    None
                },
            )
            .await;
            match step {
                Some(Ok(n)) if n > 0 => {
                    written += n;
                    out.wrote(n);
                    if out.take_starved() {
                        if let Some(f) = &on_room {
                            f();
                        }
                    }
                }
                Some(_) => break 'batches,
                None => {
                    tracing::info!(
                        stalled_s = stall.as_secs(),
                        pending = out.pending_bytes(),
                        "client stopped reading; closing the connection"
                    );
                    out.close(None);
                    return;
                }
            }
        }
        // The flush sends what a TLS or WebSocket layer buffered (a no-op on a socket).
        if !batch.is_empty() {
            let flushed = future::or(async { Some(writer.flush().await) }, async {
                glommio::timer::sleep(stall).await;
                None
            })
            .await;
            match flushed {
                Some(Ok(())) => {}
                Some(Err(_)) => break 'batches,
                None => {
                    tracing::info!(
                        stalled_s = stall.as_secs(),
                        "client stopped reading; closing the connection"
                    );
                    out.close(None);
                    return;
                }
            }
        }
        io.add_out(batch.len());
        if close {
            break;
        }
        spare = if batch.capacity() > SPARE_KEEP_BYTES {
            BytesMut::new()
        } else {
            batch
        };
        if out.is_empty() {
            // Idle for now: keep only small buffers (a burst grew them).
            if spare.capacity() > OUTBOUND_IDLE_KEEP_BYTES {
                spare = BytesMut::new();
            }
            out.shrink_if_empty(OUTBOUND_IDLE_KEEP_BYTES);
        }
    }
    let _ = future::or(
        async {
            let _ = writer.close().await;
        },
        glommio::timer::sleep(stall),
    )
    .await;
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
