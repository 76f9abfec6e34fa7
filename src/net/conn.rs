//! A served connection on its owning shard: the reader (decode, flow limits, keep alive,
//! packet timeout) that hands each packet to the shard, and the writer that drains the
//! connection's [`Outbound`] into the socket.

use bytes::BytesMut;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::protocol::{decode, fixed_header, Connect, DecodeLimits, MqttStr, Packet, ReasonCode};
use crate::session::Outbound;
use crate::shard::api::{ConnCtx, Ending, Flow, Login, LoginStep};
use crate::shard::service::{BrokerShard, IoCounters};
use shards::Shard;

/// Bytes read from a socket at a time: the size starts at the minimum (what an idle
/// connection holds, in the read buffer and in the runtime's receive operation), doubles
/// while reads fill it and halves while they use less than a quarter of it.
pub(super) const READ_MIN_BYTES: usize = 128;
/// A read buffer bigger than this is replaced by one sized for the packet under way when it
/// is less than half used.
pub(super) const READ_SHRINK_BYTES: usize = 64 * 1024;
pub(super) const READ_MAX_BYTES: usize = 16 * 1024;
/// Capacity of a connection's outgoing buffers kept while nothing is waiting to be written.
pub(super) const OUTBOUND_IDLE_KEEP_BYTES: usize = 1024;
/// The most a closing connection reads (and discards) before the socket is dropped.
pub(super) const CLOSE_DRAIN_BYTES_MAX: usize = 1 << 20;
/// How long a closing connection keeps reading (and discarding) before the socket is dropped.
pub(super) const CLOSE_DRAIN: Duration = Duration::from_secs(2);
pub(super) enum ReadEvent {
    Data(io::Result<usize>),
    KeepAliveExpired,
    /// A packet started `limits.packet_timeout_s` ago is still not complete.
    PacketTimeout,
    Closed,
}

/// The flow-control limits of a served connection.
#[derive(Clone, Copy)]
pub(super) struct FlowLimits {
    outbound_max: usize,
    write_stall: Duration,
    packet_timeout: Duration,
    messages_per_s: u32,
    bytes_per_s: u64,
}

/// A connection's inbound rate limiter; boxed, and only when a limit is set (idle
/// connections are the common case).
type Limiter = Option<Box<super::rate::InboundLimiter>>;

impl FlowLimits {
    /// The inbound rate limiter these limits ask for.
    fn limiter(&self) -> Limiter {
        Some(super::rate::InboundLimiter::new(
            self.messages_per_s,
            self.bytes_per_s,
            Instant::now(),
        ))
        .filter(super::rate::InboundLimiter::is_active)
        .map(Box::new)
    }

    fn of(shard: &Shard<BrokerShard>) -> FlowLimits {
        let cfg = shard.service().config();
        let l = &cfg.limits;
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
pub(super) struct Client {
    /// The client's address (none for a relayed connection's socket pair, unless carried).
    pub(super) addr: Option<SocketAddr>,
    /// A verified client certificate's identity, when the listener uses it as the username.
    pub(super) cert_identity: Option<String>,
}

/// Serves a connection whose CONNECT this shard owns, until it ends. `reader` and `writer`
/// are the two halves of the client's byte stream (a socket, or a TLS or WebSocket session).
///
/// The work is in plain functions ([`handle_buffered`], [`track_incomplete`],
/// [`after_read`]); the waits stay here, because every connection keeps this future for its
/// whole life and a helper future awaited in the loop widens it (see `perf/README.md`,
/// "Memory per connection, exactly").
pub(super) async fn serve<R, W>(
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
    // Boxed: the set-up's state would otherwise widen this future, which every connection
    // keeps for its whole life (measured with `-Zprint-type-sizes`, see `perf/README.md`).
    let opening = Box::pin(open(&shard, connect, assigned, client, writer, &out, &flow));
    let (accepted, writer_task) = opening.await;
    let Some((mut ctx, keep_alive)) = accepted else {
        writer_task.await;
        return;
    };
    let max_packet = shard.service().config().limits.packet_bytes_max as usize;
    let limits = DecodeLimits::new(max_packet, Some(version));
    let mut read = ReadSize::default();
    let mut ending = Ending::Lost;
    let broker_closed;
    let mut rate = flow.limiter();
    let outbound_max = flow.outbound_max;
    // When the packet at the front of `buf` started to arrive (while it is incomplete).
    let mut packet_started: Option<Instant> = None;
    'conn: loop {
        let mut decoded_any = false;
        loop {
            match handle_buffered(&shard, &mut ctx, &out, &mut buf, &limits, &mut rate) {
                Handled::NeedMore { decoded } => {
                    decoded_any |= decoded;
                    break;
                }
                // A client over its rate waits out its debt before its next packet is
                // handled (and before more is read from it). This does not count against
                // keep alive, nor against the packet's time.
                Handled::Throttle { wait, decoded } => {
                    decoded_any |= decoded;
                    let throttle = future::or(glommio::timer::sleep(wait), async {
                        out.closed().await;
                    });
                    not_counted(throttle, &mut packet_started).await;
                }
                Handled::End {
                    ending: e,
                    broker_closed: closed,
                } => {
                    ending = e.unwrap_or(ending);
                    broker_closed = closed;
                    break 'conn;
                }
            }
        }
        track_incomplete(
            &shard,
            ctx.conn_id,
            &out,
            &mut buf,
            &limits,
            decoded_any,
            &mut packet_started,
        );
        // Back-pressure before reading more: the client's own answers must drain (this does
        // not count against keep alive either). Sessions keep messages below the cap plus
        // one packet, so only answers the client left unread take the buffer past twice the
        // cap.
        if out.pending_bytes() >= outbound_max.saturating_mul(2) {
            not_counted(out.room(outbound_max), &mut packet_started).await;
        }
        let start = read.prepare(&mut buf);
        // Inline, not a function of its own: an async fn's future here made every idle
        // connection 260 bytes bigger (measured with `shardmq-loadgen idle`).
        // The close is polled first: a socket that always has bytes waiting must not hide it.
        let event = future::or(
            async {
                out.closed().await;
                ReadEvent::Closed
            },
            future::or(
                async { ReadEvent::Data(reader.read(&mut buf[start..]).await) },
                async {
                    match first_deadline(keep_alive, packet_started, flow.packet_timeout) {
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
        match after_read(&shard, &ctx, &out, &mut rate, buf.len(), event) {
            // A socket that always has bytes waiting would otherwise keep this task running
            // and starve every writer of the shard.
            None => glommio::yield_if_needed().await,
            Some(closed) => {
                broker_closed = closed;
                break;
            }
        }
    }
    shard.service().incomplete.update(ctx.conn_id, 0, &out);
    // What the client had half sent is of no use now; the buffer goes before the drain
    // below, which can last a while.
    drop(buf);
    shard.service().disconnected(&ctx, ending);
    out.close(None);
    writer_task.await;
    if broker_closed {
        drain_after_close(&mut reader).await;
    }
}

/// Waits for `pause` (the broker's own throttling or back-pressure), which does not count
/// against the time the packet under way has to be completed.
async fn not_counted(pause: impl std::future::Future, packet_started: &mut Option<Instant>) {
    let waited = Instant::now();
    pause.await;
    if let Some(t) = packet_started {
        *t += waited.elapsed();
    }
}

/// The session a connection was accepted into: its context and keep-alive bound.
type Opened = Option<(ConnCtx, Option<Duration>)>;

/// Logs the client in, connects its session (which writes CONNACK into `out`) and starts
/// the connection's writer task. A function of its own so that what the set-up holds across
/// an await (the CONNECT, the client's details) is not kept for the connection's life.
async fn open<W>(
    shard: &Shard<BrokerShard>,
    connect: Box<Connect>,
    assigned: Option<MqttStr>,
    client: Client,
    writer: W,
    out: &Rc<Outbound>,
    flow: &FlowLimits,
) -> (Opened, glommio::Task<()>)
where
    W: AsyncWrite + Unpin + 'static,
{
    // Boxed: its state (a password check on another thread) would otherwise be part of
    // this future (freed once the set-up is done, but as big while it runs).
    let login = Box::pin(authenticate(
        shard,
        &connect,
        client.cert_identity.as_deref(),
        client.addr,
    ))
    .await;
    let accepted = shard
        .service()
        .connect(&connect, assigned, login, out.clone());
    let on_room = accepted.as_ref().ok().map(|a| {
        let (shard, client_id, conn_id) = (shard.clone(), a.ctx.client_id.clone(), a.ctx.conn_id);
        move || shard.service().on_writable(&client_id, conn_id)
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
}

/// What handling the packets buffered so far came to.
enum Handled {
    /// Every complete packet was handled: read more.
    NeedMore { decoded: bool },
    /// The client is over its rate: wait before handling the next packet.
    Throttle { wait: Duration, decoded: bool },
    /// The connection ends: how (when the client said so) and whether the broker closed it.
    End {
        ending: Option<Ending>,
        broker_closed: bool,
    },
}

/// Decodes and handles the complete packets in `buf`, in order, until it needs more bytes,
/// the client must wait for its rate, or the connection ends. Bad input closes the
/// connection with its reason code.
fn handle_buffered(
    shard: &Shard<BrokerShard>,
    ctx: &mut ConnCtx,
    out: &Outbound,
    buf: &mut BytesMut,
    limits: &DecodeLimits,
    rate: &mut Limiter,
) -> Handled {
    let mut decoded = false;
    loop {
        if let Some(wait) = rate.as_mut().and_then(|r| r.delay(Instant::now())) {
            return Handled::Throttle { wait, decoded };
        }
        // The broker closed this connection (a takeover, an operator's kick, the stop):
        // nothing more the client sent is handled, however much of it is waiting, except a
        // DISCONNECT it already sent (which decides its will).
        if out.is_closed() {
            let ending = buffered_disconnect(shard, ctx, buf, limits);
            return Handled::End {
                ending,
                broker_closed: true,
            };
        }
        match decode(buf, limits) {
            Ok(Some(packet)) => {
                decoded = true;
                let now = Instant::now();
                if let Some(r) = rate.as_mut() {
                    r.packet(now);
                }
                match shard.service().on_packet(ctx, packet, now) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Disconnect(e)) => {
                        return Handled::End {
                            ending: Some(e),
                            broker_closed: false,
                        }
                    }
                    Err(rc) => {
                        out.close(Some(rc));
                        return Handled::End {
                            ending: None,
                            broker_closed: true,
                        };
                    }
                }
            }
            Ok(None) => return Handled::NeedMore { decoded },
            Err(e) => {
                tracing::debug!(client = %ctx.client_id, error = %e, "malformed packet");
                out.close(Some(e.reason_code()));
                return Handled::End {
                    ending: None,
                    broker_closed: true,
                };
            }
        }
    }
}

/// Whichever comes first, and in how long: the keep-alive bound, or the time the packet
/// started at `packet_started` has to be completed.
fn first_deadline(
    keep_alive: Option<Duration>,
    packet_started: Option<Instant>,
    packet_timeout: Duration,
) -> Option<(Duration, ReadEvent)> {
    let ka = keep_alive.map(|d| (d, ReadEvent::KeepAliveExpired));
    let pk = packet_started.map(|t| {
        let left = (t + packet_timeout).saturating_duration_since(Instant::now());
        (left, ReadEvent::PacketTimeout)
    });
    match (ka, pk) {
        (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// What a read event means: `None`, data came in (counted) and the connection goes on;
/// `Some(broker_closed)`, the connection ends (the client left, the broker closed it, or
/// it timed out, closed here with its reason).
fn after_read(
    shard: &Shard<BrokerShard>,
    ctx: &ConnCtx,
    out: &Outbound,
    rate: &mut Limiter,
    buffered: usize,
    event: ReadEvent,
) -> Option<bool> {
    match event {
        ReadEvent::Data(Ok(0)) | ReadEvent::Data(Err(_)) => Some(false),
        ReadEvent::Data(Ok(n)) => {
            if let Some(r) = rate.as_mut() {
                r.bytes(n, Instant::now());
            }
            shard.service().io.add_in(n);
            None
        }
        ReadEvent::Closed => Some(true),
        ReadEvent::KeepAliveExpired => {
            out.close(Some(ReasonCode::KeepAliveTimeout));
            Some(true)
        }
        ReadEvent::PacketTimeout => {
            let inc = &shard.service().incomplete;
            inc.timed_out.set(inc.timed_out.get() + 1);
            tracing::debug!(client = %ctx.client_id, bytes = buffered, "packet not completed in time (limits.packet_timeout_s)");
            out.close(Some(ReasonCode::KeepAliveTimeout));
            Some(true)
        }
    }
}

/// An incomplete packet: timed from its first byte, and its buffer (sized for the packet
/// the client announced: what it will hold once the packet is in) counted against the
/// shard's share of the budget for incomplete packets. A buffer that grew for a big packet
/// is not kept for a small one.
fn track_incomplete(
    shard: &Shard<BrokerShard>,
    conn_id: u64,
    out: &Rc<Outbound>,
    buf: &mut BytesMut,
    limits: &DecodeLimits,
    decoded_any: bool,
    packet_started: &mut Option<Instant>,
) {
    let incomplete = &shard.service().incomplete;
    if buf.is_empty() {
        if packet_started.take().is_some() {
            incomplete.update(conn_id, 0, out);
        }
        return;
    }
    if decoded_any || packet_started.is_none() {
        *packet_started = Some(Instant::now());
        let announced = fixed_header(buf, limits).ok().flatten().map(|h| h.total);
        let need = announced.unwrap_or(buf.len()).max(buf.len());
        if buf.capacity() > READ_SHRINK_BYTES && need.saturating_mul(2) < buf.capacity() {
            let mut small = BytesMut::with_capacity(need);
            small.extend_from_slice(buf);
            *buf = small;
        }
    }
    incomplete.update(conn_id, buf.capacity() as u64, out);
}

/// The DISCONNECT among the packets a closed connection had already sent, handled as
/// usual (it discards the will, or asks for it; MQTT 5 may change the session expiry); the
/// rest is dropped.
fn buffered_disconnect(
    shard: &Shard<BrokerShard>,
    ctx: &mut ConnCtx,
    buf: &mut BytesMut,
    limits: &DecodeLimits,
) -> Option<Ending> {
    while let Ok(Some(packet)) = decode(buf, limits) {
        if matches!(packet, Packet::Disconnect(_)) {
            return match shard.service().on_packet(ctx, packet, Instant::now()) {
                Ok(Flow::Disconnect(e)) => Some(e),
                _ => None,
            };
        }
    }
    None
}

/// Lets the client read our DISCONNECT: keeps reading (and discarding) until it closes. A
/// client that keeps sending would make every read complete at once: without a yield the
/// drain would hold the shard (and never let the timer fire). Bounded in time and in bytes:
/// a client still sending after [`CLOSE_DRAIN_BYTES_MAX`] has its socket closed with data
/// unread (the kernel may answer with a reset, and it may miss our DISCONNECT).
async fn drain_after_close<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut chunk = vec![0u8; READ_MIN_BYTES];
    let drain = async {
        let mut left = CLOSE_DRAIN_BYTES_MAX;
        while let Ok(n) = reader.read(&mut chunk).await {
            if n == 0 || n >= left {
                break;
            }
            left -= n;
            glommio::yield_if_needed().await;
        }
    };
    future::or(drain, glommio::timer::sleep(CLOSE_DRAIN)).await;
}

/// Checks a CONNECT's credentials; a slow password hash is verified on the shard's password
/// thread, so that the executor keeps serving everyone else meanwhile. `cert_identity` is
/// the client certificate's identity when the listener takes it as the user name.
pub(super) async fn authenticate(
    shard: &Shard<BrokerShard>,
    connect: &Connect,
    cert_identity: Option<&str>,
    peer: Option<SocketAddr>,
) -> Login {
    let step = shard.service().check_login(connect, cert_identity, peer);
    match step {
        LoginStep::Done(login) => login,
        LoginStep::Verify(v) => shard.service().verify(v).await,
    }
}

/// The size of a connection's next read, adapted to its traffic (see [`READ_MIN_BYTES`]).
pub(super) struct ReadSize {
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

/// Runs `f` for at most `stall`; `None` when that passed first.
#[inline]
fn within<T>(
    stall: Duration,
    f: impl std::future::Future<Output = T>,
) -> impl std::future::Future<Output = Option<T>> {
    future::or(async move { Some(f.await) }, async move {
        glommio::timer::sleep(stall).await;
        None
    })
}

/// Counts `n` bytes written and, when that made room a session was waiting for, calls
/// `on_room`.
#[inline]
fn after_write<F: Fn()>(out: &Outbound, n: usize, on_room: Option<&F>) {
    out.wrote(n);
    if out.take_starved() {
        if let Some(f) = on_room {
            f();
        }
    }
}

/// The buffer for the next batch: the one just written unless a burst grew it, and only a
/// small one while the connection is idle (then the outbound queue shrinks too).
#[inline]
fn keep_spare(out: &Outbound, batch: BytesMut) -> BytesMut {
    let mut spare = if batch.capacity() > SPARE_KEEP_BYTES {
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
    spare
}

/// Largest spare batch buffer kept between writes; a bigger one (after a burst) is freed.
pub(super) const SPARE_KEEP_BYTES: usize = 64 * 1024;

/// Writes what the connection's [`Outbound`] collects, one batch per wake-up; on close,
/// flushes and shuts down the write half. A write that makes no progress for `stall` ends
/// the connection (the client stopped reading). After each write that made room for a
/// session that was waiting for it, calls `on_room`.
pub(super) async fn write_loop<W, F>(
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
            match within(stall, writer.write(&batch[written..])).await {
                Some(Ok(n)) if n > 0 => {
                    written += n;
                    after_write(&out, n, on_room.as_ref());
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
            match within(stall, writer.flush()).await {
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
        spare = keep_spare(&out, batch);
    }
    let _ = future::or(
        async {
            let _ = writer.close().await;
        },
        glommio::timer::sleep(stall),
    )
    .await;
}
