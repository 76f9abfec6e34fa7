//! The pieces every scenario is made of: the run context, session set-up and tear-down, a
//! publisher task (open or closed loop, with a QoS 1/2 window) and a subscriber task.

use crate::cli::Args;
use crate::clock::{self, instant_at};
use crate::mqtt::{
    self, put_ack, put_pingreq, Accepted, Conn, ConnectOpts, Frame, PublishTemplate,
};
use crate::stats::{self, BrokerProbe, Errors};
use anyhow::{bail, Result};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use shardmq::protocol::{packet_type, DecodeLimits, Packet, ProtocolVersion};
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Counters the progress line and the waits read while the run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub received: AtomicU64,
    pub connects: AtomicU64,
}

/// Everything a task needs to know about the run.
#[derive(Debug)]
pub struct Ctx {
    pub args: Args,
    pub addr: SocketAddr,
    /// Where publishers connect (`--pub-port`, else `addr`).
    pub pub_addr: SocketAddr,
    /// Where subscribers connect (`--sub-port`, else `addr`).
    pub sub_addr: SocketAddr,
    /// A short tag unique to this run, so that runs do not see each other's topics.
    pub tag: String,
    pub errors: Errors,
    pub progress: Progress,
    pub probe: BrokerProbe,
}

impl Ctx {
    pub fn version(&self) -> ProtocolVersion {
        self.args.protocol
    }

    /// The source address for the `i`th connection (see `--source-ips`).
    pub fn local_ip(&self, i: usize) -> Option<IpAddr> {
        let k = self.args.source_ips as usize;
        match self.addr.ip() {
            IpAddr::V4(v4) if k > 1 && v4.is_loopback() => {
                Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % k) as u8)))
            }
            _ => None,
        }
    }

    pub fn opts(
        &self,
        client_id: String,
        clean_start: bool,
        persistent: bool,
        buf_size: usize,
    ) -> ConnectOpts {
        ConnectOpts {
            version: self.version(),
            client_id,
            clean_start,
            session_expiry: persistent.then_some(self.args.session_expiry),
            keep_alive: self.args.keep_alive,
            receive_maximum: Some(u16::MAX),
            buf_size,
        }
    }

    /// Connects as a new session: persistent ones start empty (MQTT 5: Clean Start with a
    /// Session Expiry Interval; 3.1.1: a clean connection first, then Clean Session = 0).
    pub async fn open_session(
        &self,
        i: usize,
        client_id: String,
        persistent: bool,
        buf_size: usize,
    ) -> Result<(Conn, Accepted)> {
        self.open_session_at(self.addr, i, client_id, persistent, buf_size)
            .await
    }

    /// [`Ctx::open_session`] to `addr` (the publishers' or subscribers' port).
    pub async fn open_session_at(
        &self,
        addr: SocketAddr,
        i: usize,
        client_id: String,
        persistent: bool,
        buf_size: usize,
    ) -> Result<(Conn, Accepted)> {
        let local = self.local_ip(i);
        if persistent && !self.version().is_v5() {
            let (c, _) =
                mqtt::connect(addr, local, &self.opts(client_id.clone(), true, false, 512)).await?;
            c.disconnect(false).await?;
            return mqtt::connect(addr, local, &self.opts(client_id, false, true, buf_size)).await;
        }
        mqtt::connect(
            addr,
            local,
            &self.opts(client_id, true, persistent, buf_size),
        )
        .await
    }

    /// Resumes a persistent session.
    pub async fn resume_session(
        &self,
        i: usize,
        client_id: String,
        buf_size: usize,
    ) -> Result<(Conn, Accepted)> {
        mqtt::connect(
            self.addr,
            self.local_ip(i),
            &self.opts(client_id, false, true, buf_size),
        )
        .await
    }

    /// Disconnects, ending the session on the broker when it is persistent (MQTT 5: Session
    /// Expiry 0 on DISCONNECT; 3.1.1: a clean connection after it, to `addr`).
    pub async fn end_session(
        &self,
        addr: SocketAddr,
        i: usize,
        conn: Conn,
        client_id: String,
        persistent: bool,
    ) -> Result<()> {
        if !persistent || self.version().is_v5() {
            return conn.disconnect(persistent).await;
        }
        conn.disconnect(false).await?;
        let (c, _) = mqtt::connect(
            addr,
            self.local_ip(i),
            &self.opts(client_id, true, false, 512),
        )
        .await?;
        c.disconnect(false).await
    }

    /// Runs `f(i)` for `i` in `0..n`, at most `--connect-concurrency` at once, and returns
    /// the answers in order. Failures are counted in the run's errors.
    pub async fn many<T, F, Fut>(self: &Arc<Self>, n: usize, f: F) -> Vec<Option<T>>
    where
        T: Send + 'static,
        F: Fn(Arc<Ctx>, usize) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let mut set = JoinSet::new();
        let limit = self.args.connect_concurrency.max(1);
        let mut next = 0;
        while next < n || !set.is_empty() {
            while next < n && set.len() < limit {
                let fut = f(self.clone(), next);
                let i = next;
                set.spawn(async move { (i, fut.await) });
                next += 1;
            }
            if let Some(joined) = set.join_next().await {
                match joined {
                    Ok((i, Ok(v))) => out[i] = Some(v),
                    Ok((_, Err(e))) => self.errors.add(format!("{e:#}")),
                    Err(e) => self.errors.add(format!("task: {e}")),
                }
            }
        }
        out
    }
}

/// Read buffer size: small when there are many connections.
pub fn buf_size(connections: usize) -> usize {
    if connections > 1000 {
        4 * 1024
    } else {
        64 * 1024
    }
}

/// What one publisher sends.
#[derive(Debug, Clone)]
pub struct PubPlan {
    pub template: PublishTemplate,
    pub qos: u8,
    /// QoS 1/2 messages unacknowledged at most.
    pub window: usize,
    pub count: u64,
    /// Open loop: nanoseconds between this publisher's messages.
    pub interval_ns: Option<u64>,
    /// When the first message is due.
    pub start_ns: u64,
    /// No message is sent at or after this time.
    pub deadline_ns: u64,
    /// Acknowledgements are waited for until this time.
    pub ack_deadline_ns: u64,
    /// Topic suffix of message `k`: `(first + k * step) % modulo`.
    pub number: Option<(u64, u64, u64)>,
}

#[derive(Debug)]
pub struct PubResult {
    pub sent: u64,
    pub acked: u64,
    /// Acknowledgements with an error reason code.
    pub refused: u64,
    /// QoS 1/2 still unacknowledged when the publisher gave up waiting.
    pub unacked: u64,
    /// Open loop: due before the deadline but not sent.
    pub unsent_due: u64,
    /// Open loop: sent late because the QoS window or the socket was full.
    pub held_back: u64,
    pub last_send_ns: u64,
    pub last_ack_ns: u64,
    pub ack_latency: Histogram<u64>,
    pub send_lag: Histogram<u64>,
    pub error: Option<String>,
}

const WBUF_HIGH: usize = 64 * 1024;

/// Whether messages remain to be sent: closed loop until the deadline; open loop until the
/// schedule passes the deadline (messages due before it are sent even if late), within the
/// hard limit of the acknowledgement deadline.
fn still_sending(plan: &PubPlan, k: u64, next_due: u64, now: u64) -> bool {
    k < plan.count
        && match plan.interval_ns {
            None => now < plan.deadline_ns,
            Some(_) => next_due < plan.deadline_ns && now < plan.ack_deadline_ns,
        }
}

/// Runs one publisher to the end of its plan; gives the connection back.
pub async fn publisher(mut conn: Conn, plan: PubPlan, ctx: Arc<Ctx>) -> (Conn, PubResult) {
    let mut r = PubResult {
        sent: 0,
        acked: 0,
        refused: 0,
        unacked: 0,
        unsent_due: 0,
        held_back: 0,
        last_send_ns: 0,
        last_ack_ns: 0,
        ack_latency: stats::histogram(),
        send_lag: stats::histogram(),
        error: None,
    };
    if let Err(e) = publish_loop(&mut conn, &plan, &ctx, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    if let Some(iv) = plan.interval_ns {
        let span = plan.deadline_ns.saturating_sub(plan.start_ns);
        let due = plan.count.min(span.div_ceil(iv));
        r.unsent_due = due.saturating_sub(r.sent);
    }
    (conn, r)
}

/// A publisher's progress through its plan.
struct PubState {
    /// Scheduled send time per packet id; 0 = free.
    pending: Vec<u64>,
    inflight: usize,
    cursor: u16,
    next_due: u64,
    /// Messages written into the write buffer so far.
    k: u64,
    /// Messages counted in the progress line so far.
    reported_sent: u64,
    /// Open loop: a due message is waiting for window or socket space (the broker's flow
    /// control); messages sent until the schedule is caught up count as held back, and their
    /// lateness is not the generator's (`send_lag`).
    held: bool,
}

impl PubState {
    /// Whether the plan lets another message into the write buffer now (window and buffer
    /// space).
    #[inline]
    fn has_room(&self, plan: &PubPlan, conn: &Conn) -> bool {
        (plan.qos == 0 || self.inflight < plan.window) && conn.wbuf.len() < WBUF_HIGH
    }

    /// Writes the messages due (open loop) or as many as fit (closed loop) into the write
    /// buffer.
    #[inline]
    fn produce(&mut self, plan: &PubPlan, conn: &mut Conn, r: &mut PubResult, now: u64) {
        while self.k < plan.count && self.has_room(plan, conn) {
            let ts = match plan.interval_ns {
                Some(iv) => {
                    if self.next_due > now || self.next_due >= plan.deadline_ns {
                        self.held = false;
                        break;
                    }
                    let t = self.next_due;
                    self.next_due += iv;
                    if self.held {
                        r.held_back += 1;
                    } else {
                        stats::record(&mut r.send_lag, now - t);
                    }
                    t
                }
                None => now,
            };
            let pid = if plan.qos > 0 { self.take_pid(ts) } else { 0 };
            let number = plan
                .number
                .map_or(0, |(first, step, m)| (first + self.k * step) % m);
            plan.template.write(&mut conn.wbuf, pid, ts, number);
            self.k += 1;
        }
        if plan.interval_ns.is_some()
            && self.k < plan.count
            && self.next_due <= now
            && self.next_due < plan.deadline_ns
        {
            self.held = true;
        }
    }

    /// Takes the next free packet id for a message scheduled at `ts`.
    #[inline]
    fn take_pid(&mut self, ts: u64) -> u16 {
        loop {
            self.cursor = self.cursor % 65535 + 1;
            if self.pending[self.cursor as usize] == 0 {
                break;
            }
        }
        self.pending[self.cursor as usize] = ts.max(1);
        self.inflight += 1;
        self.cursor
    }

    /// Once the write buffer is empty, counts what was written as sent.
    #[inline]
    fn count_sent(&mut self, conn: &Conn, r: &mut PubResult, ctx: &Ctx) {
        if conn.wbuf.is_empty() && self.k > r.sent {
            r.sent = self.k;
            r.last_send_ns = clock::now_ns();
            ctx.progress
                .sent
                .fetch_add(self.k - self.reported_sent, Ordering::Relaxed);
            self.reported_sent = self.k;
        }
    }

    /// Handles the frames read: acknowledgements settle their messages (a PUBREC is
    /// answered with PUBREL), a DISCONNECT ends the publisher.
    #[inline]
    fn read_acks(
        &mut self,
        conn: &mut Conn,
        limits: &DecodeLimits,
        qos: u8,
        r: &mut PubResult,
        ctx: &Ctx,
    ) -> Result<()> {
        let t = clock::now_ns();
        let before = r.acked;
        while let Some(f) = mqtt::next_frame(&mut conn.rbuf, limits)? {
            match f {
                Frame::Ack { kind, pid, reason } => {
                    let Some(ts) = self.settle(&mut conn.wbuf, qos, kind, pid, reason)? else {
                        continue;
                    };
                    if reason >= 0x80 {
                        r.refused += 1;
                        ctx.errors
                            .add(format!("publish refused: reason code 0x{reason:02x}"));
                    } else {
                        r.acked += 1;
                        stats::record(&mut r.ack_latency, t.saturating_sub(ts));
                    }
                }
                Frame::Other(p) => {
                    if let Packet::Disconnect(d) = *p {
                        bail!("DISCONNECT from the broker: {:?}", d.reason_code)
                    }
                }
                Frame::Publish { .. } => {}
            }
        }
        if r.acked > before {
            r.last_ack_ns = t;
            ctx.progress
                .acked
                .fetch_add(r.acked - before, Ordering::Relaxed);
        }
        Ok(())
    }

    /// One acknowledgement: the scheduled send time of the message it ends (its packet id
    /// freed), or `None` when a PUBREC was answered with PUBREL and the exchange goes on.
    #[inline]
    fn settle(
        &mut self,
        wbuf: &mut BytesMut,
        qos: u8,
        kind: u8,
        pid: u16,
        reason: u8,
    ) -> Result<Option<u64>> {
        let slot = pid as usize;
        let ts = self.pending.get(slot).copied().unwrap_or(0);
        if ts == 0 {
            bail!("acknowledgement for unknown packet id {pid}");
        }
        let done = match kind {
            packet_type::PUBACK if qos == 1 => true,
            packet_type::PUBREC if qos == 2 => {
                if reason < 0x80 {
                    put_ack(wbuf, packet_type::PUBREL, pid);
                    false
                } else {
                    true
                }
            }
            packet_type::PUBCOMP if qos == 2 => true,
            _ => bail!("unexpected acknowledgement type {kind}"),
        };
        if !done {
            return Ok(None);
        }
        self.pending[slot] = 0;
        self.inflight -= 1;
        Ok(Some(ts))
    }
}

/// Writes what the socket takes without waiting.
#[inline]
fn write_now(conn: &mut Conn) -> Result<()> {
    while !conn.wbuf.is_empty() {
        match conn.stream.try_write(&conn.wbuf) {
            Ok(n) => conn.wbuf.advance(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads what the socket has without waiting.
#[inline]
fn read_now(conn: &mut Conn) -> Result<()> {
    loop {
        if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
            conn.rbuf.reserve(16 * 1024);
        }
        match conn.stream.try_read_buf(&mut conn.rbuf) {
            Ok(0) => bail!("connection closed by the broker"),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends the plan's messages and settles their acknowledgements until both are done or
/// the acknowledgement deadline passed; an error ends the publisher.
async fn publish_loop(conn: &mut Conn, plan: &PubPlan, ctx: &Ctx, r: &mut PubResult) -> Result<()> {
    let limits = conn.limits();
    let qos = plan.qos;
    let mut st = PubState {
        pending: if qos > 0 { vec![0; 65536] } else { Vec::new() },
        inflight: 0,
        cursor: 0,
        next_due: plan.start_ns,
        k: 0,
        reported_sent: 0,
        held: false,
    };
    let timer = clock::PreciseTimer::new()?;
    // Closed loop starts on time too.
    timer.wait_until(plan.start_ns).await?;
    loop {
        let now = clock::now_ns();
        if still_sending(plan, st.k, st.next_due, now) {
            st.produce(plan, conn, r, now);
        }
        write_now(conn)?;
        st.count_sent(conn, r, ctx);
        read_now(conn)?;
        if !conn.rbuf.is_empty() {
            st.read_acks(conn, &limits, qos, r, ctx)?;
        }
        let now = clock::now_ns();
        let done_sending = !still_sending(plan, st.k, st.next_due, now);
        if done_sending && conn.wbuf.is_empty() && st.inflight == 0 {
            return Ok(());
        }
        if done_sending && now >= plan.ack_deadline_ns {
            r.unacked = st.inflight as u64;
            return Ok(());
        }
        let can_produce = !done_sending && st.has_room(plan, conn);
        if can_produce && plan.interval_ns.is_none() && conn.wbuf.is_empty() {
            // Closed loop with room to send: let the other tasks run, then go on.
            tokio::task::yield_now().await;
            continue;
        }
        let wake = if can_produce && plan.interval_ns.is_some() {
            Some(st.next_due)
        } else {
            None
        };
        let limit = instant_at(if done_sending {
            plan.ack_deadline_ns
        } else {
            plan.deadline_ns
        });
        tokio::select! {
            biased;
            _ = conn.stream.readable() => {}
            _ = conn.stream.writable(), if !conn.wbuf.is_empty() => {}
            r = timer.wait_until(wake.unwrap_or(0)), if wake.is_some() => r?,
            _ = tokio::time::sleep_until(limit) => {}
        }
    }
}

/// What one subscriber expects.
#[derive(Debug, Clone, Copy)]
pub struct SubPlan {
    /// Stop by itself after this many messages.
    pub expected: Option<u64>,
    pub keep_alive: u16,
}

#[derive(Debug)]
pub struct SubResult {
    pub received: u64,
    pub first_rx_ns: u64,
    pub last_rx_ns: u64,
    pub latency: Histogram<u64>,
    pub error: Option<String>,
}

/// Receives until stopped (or its expected count), acknowledging QoS 1/2; gives the
/// connection back.
pub async fn subscriber(
    mut conn: Conn,
    plan: SubPlan,
    stop: watch::Receiver<bool>,
    ctx: Arc<Ctx>,
) -> (Conn, SubResult) {
    let mut r = SubResult {
        received: 0,
        first_rx_ns: 0,
        last_rx_ns: 0,
        latency: stats::histogram(),
        error: None,
    };
    if let Err(e) = subscribe_loop(&mut conn, plan, stop, &ctx, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    (conn, r)
}

async fn subscribe_loop(
    conn: &mut Conn,
    plan: SubPlan,
    mut stop: watch::Receiver<bool>,
    ctx: &Ctx,
    r: &mut SubResult,
) -> Result<()> {
    let limits = conn.limits();
    let ping_every = Duration::from_millis(u64::from(plan.keep_alive) * 500);
    let mut ping = tokio::time::interval(ping_every.max(Duration::from_millis(1)));
    ping.tick().await;
    loop {
        // Bytes may already be buffered (a resumed session's queue can arrive with the
        // CONNACK): handle them before waiting for more.
        let now = clock::now_ns();
        let before = r.received;
        while let Some(f) = mqtt::next_frame(&mut conn.rbuf, &limits)? {
            match f {
                Frame::Publish { qos, pid, ts } => {
                    r.received += 1;
                    if let Some(ts) = ts {
                        stats::record(&mut r.latency, now.saturating_sub(ts));
                    }
                    match qos {
                        1 => put_ack(&mut conn.wbuf, packet_type::PUBACK, pid),
                        2 => put_ack(&mut conn.wbuf, packet_type::PUBREC, pid),
                        _ => {}
                    }
                }
                Frame::Ack {
                    kind: packet_type::PUBREL,
                    pid,
                    ..
                } => put_ack(&mut conn.wbuf, packet_type::PUBCOMP, pid),
                Frame::Other(p) => {
                    if let Packet::Disconnect(d) = *p {
                        bail!("DISCONNECT from the broker: {:?}", d.reason_code)
                    }
                }
                Frame::Ack { .. } => {}
            }
        }
        conn.flush().await?;
        if r.received > before {
            if r.first_rx_ns == 0 {
                r.first_rx_ns = now;
            }
            r.last_rx_ns = now;
            ctx.progress
                .received
                .fetch_add(r.received - before, Ordering::Relaxed);
        }
        if plan.expected.is_some_and(|e| r.received >= e) || *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            biased;
            res = conn.fill() => res?,
            _ = stop.changed() => return Ok(()),
            _ = ping.tick(), if plan.keep_alive > 0 => {
                put_pingreq(&mut conn.wbuf);
            }
        }
    }
}

/// Waits until `done()` or `timeout`, checking every 2 ms.
pub async fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Prints a progress line to stderr once a second until dropped.
pub fn spawn_progress(ctx: &Arc<Ctx>) -> Option<tokio::task::JoinHandle<()>> {
    if !ctx.args.progress {
        return None;
    }
    let ctx = ctx.clone();
    Some(tokio::spawn(async move {
        let p = &ctx.progress;
        let mut last = [0u64; 4];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut t = 0;
        loop {
            tick.tick().await;
            t += 1;
            let now = [
                p.sent.load(Ordering::Relaxed),
                p.acked.load(Ordering::Relaxed),
                p.received.load(Ordering::Relaxed),
                p.connects.load(Ordering::Relaxed),
            ];
            eprintln!(
                "[{t:>4}s] sent {:>9}/s  acked {:>9}/s  received {:>9}/s  connects {:>7}/s  errors {}",
                now[0] - last[0],
                now[1] - last[1],
                now[2] - last[2],
                now[3] - last[3],
                ctx.errors.count()
            );
            last = now;
        }
    }))
}
