//! The scenarios: fan-in, fan-out, p2p and durable share one publish/subscribe driver;
//! backlog, idle and storm have their own.

use crate::cli::{Args, Phase, Scenario};
use crate::clock::{self, secs};
use crate::engine::{self, buf_size, Ctx, PubPlan, PubResult, SubPlan, SubResult};
use crate::mqtt::{self, Conn, PublishTemplate};
use crate::report::{PhaseReport, Report};
use crate::stats::{self, BrokerStats, Latency, ProcSample};
use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use shardmq::protocol::{ProtocolVersion, QoS};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

fn digits(n: usize) -> usize {
    n.max(1).to_string().len()
}

fn rate(n: u64, from_ns: u64, to_ns: u64) -> Option<f64> {
    (n > 0 && to_ns > from_ns).then(|| n as f64 / secs(to_ns - from_ns))
}

/// Splits `total` over `n` parts as evenly as possible.
fn share(total: u64, n: usize, i: usize) -> u64 {
    if total == u64::MAX {
        return u64::MAX;
    }
    total / n as u64 + u64::from((i as u64) < total % n as u64)
}

/// The target as reported: the address, and the publishers' and subscribers' where
/// `--pub-port`/`--sub-port` move them.
fn target(ctx: &Ctx) -> String {
    let mut t = ctx.addr.to_string();
    if ctx.pub_addr != ctx.addr {
        t.push_str(&format!(" publishers={}", ctx.pub_addr));
    }
    if ctx.sub_addr != ctx.addr {
        t.push_str(&format!(" subscribers={}", ctx.sub_addr));
    }
    t
}

fn report(ctx: &Ctx) -> Report {
    let a = &ctx.args;
    Report {
        scenario: format!("{:?}", a.scenario).to_lowercase(),
        target: target(ctx),
        protocol: if a.protocol.is_v5() { "5" } else { "3.1.1" }.to_string(),
        qos: a.qos(),
        payload_bytes: a.payload,
        publishers: None,
        subscribers: None,
        connections: None,
        mode: if a.rate.is_some() {
            "open-loop"
        } else {
            "max-rate"
        }
        .to_string(),
        offered_rate: a.rate,
        inflight: None,
        threads: a.threads,
        phases: Vec::new(),
        broker: None,
        generator_cpu_s: 0.0,
    }
}

/// Fills the broker and generator figures in at the end.
fn finish(
    ctx: &Ctx,
    rep: &mut Report,
    before: Option<ProcSample>,
    self_before: ProcSample,
    messages: u64,
) -> Result<()> {
    if let (Some(pid), Some(b), Some(a)) = (ctx.probe.0, before, ctx.probe.sample()?) {
        let mut s = BrokerStats::between(pid, b, a);
        if messages > 0 {
            s.cpu_s_per_million_msgs = Some(s.cpu_s / messages as f64 * 1e6);
        }
        rep.broker = Some(s);
    }
    rep.generator_cpu_s = stats::self_sample().cpu_s - self_before.cpu_s;
    Ok(())
}

fn take_errors(ctx: &Ctx, p: &mut PhaseReport, since: u64) {
    p.errors = ctx.errors.count() - since;
    if p.errors > 0 {
        p.error_samples = ctx.errors.samples();
    }
}

/// A connection with its index and client ID.
type Owned = (usize, Conn, String);

/// Ends (or just closes) connections, `--connect-concurrency` at once; a 3.1.1 persistent
/// session is ended by a clean connection to `addr`.
async fn close_all(ctx: &Arc<Ctx>, addr: SocketAddr, conns: Vec<Owned>, persistent: bool) {
    let end = persistent && !ctx.args.keep_sessions;
    let slots: Arc<Mutex<Vec<Option<Owned>>>> =
        Arc::new(Mutex::new(conns.into_iter().map(Some).collect()));
    let n = slots.lock().expect("slots").len();
    ctx.many(n, move |ctx, k| {
        let item = slots.lock().expect("slots")[k].take();
        async move {
            let Some((i, conn, id)) = item else {
                return Ok(());
            };
            if end {
                ctx.end_session(addr, i, conn, id, true).await
            } else {
                conn.disconnect(false).await
            }
        }
    })
    .await;
}

#[derive(Default)]
struct PubTotals {
    sent: u64,
    acked: u64,
    refused: u64,
    unacked: u64,
    unsent_due: u64,
    held_back: u64,
    last_send_ns: u64,
    last_ack_ns: u64,
    ack_latency: Option<Histogram<u64>>,
    send_lag: Option<Histogram<u64>>,
}

impl PubTotals {
    fn add(&mut self, r: &PubResult, ctx: &Ctx) {
        self.sent += r.sent;
        self.acked += r.acked;
        self.refused += r.refused;
        self.unacked += r.unacked;
        self.unsent_due += r.unsent_due;
        self.held_back += r.held_back;
        self.last_send_ns = self.last_send_ns.max(r.last_send_ns);
        self.last_ack_ns = self.last_ack_ns.max(r.last_ack_ns);
        let merge = |h: &mut Option<Histogram<u64>>, x: &Histogram<u64>| match h {
            Some(h) => h.add(x).expect("same bounds"),
            None => *h = Some(x.clone()),
        };
        merge(&mut self.ack_latency, &r.ack_latency);
        merge(&mut self.send_lag, &r.send_lag);
        if let Some(e) = &r.error {
            ctx.errors.add(format!("publisher: {e}"));
        }
    }

    fn fill(&self, p: &mut PhaseReport, start_ns: u64, qos: u8, open_loop: bool) {
        p.sent = Some(self.sent);
        p.send_rate = rate(self.sent, start_ns, self.last_send_ns);
        if open_loop {
            p.unsent_due = Some(self.unsent_due);
            p.held_back = Some(self.held_back);
            p.send_lag = self.send_lag.as_ref().and_then(Latency::of);
        }
        if qos > 0 {
            p.acked = Some(self.acked);
            p.ack_rate = rate(self.acked, start_ns, self.last_ack_ns);
            p.ack_latency = self.ack_latency.as_ref().and_then(Latency::of);
            if self.unacked > 0 {
                p.notes.push(format!(
                    "{} messages still unacknowledged at the end",
                    self.unacked
                ));
            }
            if self.refused > 0 {
                p.notes
                    .push(format!("{} publishes refused by the broker", self.refused));
            }
        }
    }
}

#[derive(Default)]
struct SubTotals {
    received: u64,
    last_rx_ns: u64,
    latency: Option<Histogram<u64>>,
}

impl SubTotals {
    fn add(&mut self, r: &SubResult, ctx: &Ctx) {
        self.received += r.received;
        self.last_rx_ns = self.last_rx_ns.max(r.last_rx_ns);
        match &mut self.latency {
            Some(h) => h.add(&r.latency).expect("same bounds"),
            None => self.latency = Some(r.latency.clone()),
        }
        if let Some(e) = &r.error {
            ctx.errors.add(format!("subscriber: {e}"));
        }
    }

    fn fill(&self, p: &mut PhaseReport, start_ns: u64, expected: u64) {
        p.expected = Some(expected);
        p.received = Some(self.received);
        let lost = expected.saturating_sub(self.received);
        p.lost = Some(lost);
        p.extra = Some(self.received.saturating_sub(expected));
        if expected > 0 {
            p.loss_pct = Some(lost as f64 * 100.0 / expected as f64);
        }
        p.delivered_rate = rate(self.received, start_ns, self.last_rx_ns);
        p.latency = self.latency.as_ref().and_then(Latency::of);
    }
}

/// A publisher's template and, in the durable and backlog scenarios, its numbering
/// (publisher index, publishers, topics).
type Template = (PublishTemplate, Option<(u64, u64, u64)>);

/// Connects `n` publishers and builds their plans; `topic(i)` gives each one's template.
async fn publishers(
    ctx: &Arc<Ctx>,
    n: usize,
    first_index: usize,
    start_ns: u64,
    total: u64,
    template: impl Fn(usize) -> Result<Template>,
) -> Result<Vec<(Conn, PubPlan)>> {
    let a = &ctx.args;
    let tag = ctx.tag.clone();
    let prefix = a.prefix.clone();
    let ids = a.pub_ids.clone();
    let conns = ctx
        .many(n, move |ctx, i| {
            let id = match &ids {
                Some(ids) => ids[i].clone(),
                None => format!("{prefix}{tag}p{i}"),
            };
            async move {
                ctx.open_session_at(ctx.pub_addr, first_index + i, id, false, 64 * 1024)
                    .await
            }
        })
        .await;
    let interval = a.rate.map(|r| ((n as f64 / r) * 1e9).max(1.0) as u64);
    let deadline_ns = start_ns + (a.duration_s() * 1e9) as u64;
    let ack_deadline_ns = deadline_ns + (a.drain_timeout * 1e9) as u64;
    let mut out = Vec::with_capacity(n);
    for (i, c) in conns.into_iter().enumerate() {
        let Some((conn, accepted)) = c else {
            bail!("publisher {i} could not connect");
        };
        let (template, number) = template(i)?;
        let offset = interval.map_or(0, |iv| iv * i as u64 / n as u64);
        out.push((
            conn,
            PubPlan {
                template,
                qos: a.qos(),
                window: usize::from(a.inflight.min(accepted.receive_maximum)),
                count: share(total, n, i),
                interval_ns: interval,
                start_ns: start_ns + offset,
                deadline_ns,
                ack_deadline_ns,
                number,
            },
        ));
    }
    Ok(out)
}

async fn run_publishers(ctx: &Arc<Ctx>, plans: Vec<(Conn, PubPlan)>) -> (PubTotals, Vec<Conn>) {
    let mut set = JoinSet::new();
    for (conn, plan) in plans {
        set.spawn(engine::publisher(conn, plan, ctx.clone()));
    }
    let mut totals = PubTotals::default();
    let mut conns = Vec::new();
    while let Some(j) = set.join_next().await {
        match j {
            Ok((conn, r)) => {
                totals.add(&r, ctx);
                conns.push(conn);
            }
            Err(e) => ctx.errors.add(format!("publisher task: {e}")),
        }
    }
    (totals, conns)
}

/// fan-in, fan-out, p2p and durable.
pub async fn pubsub(ctx: Arc<Ctx>) -> Result<Report> {
    let a = &ctx.args;
    let sc = a.scenario;
    let (np, ns) = pubsub_counts(a)?;
    let qos = a.qos();
    if sc == Scenario::Durable && qos == 0 {
        bail!("durable: --qos must be 1 or 2");
    }
    let persistent = sc == Scenario::Durable || a.persistent;
    let topics = Topics {
        sc,
        base: format!("{}/{}", a.prefix, ctx.tag),
        width: digits(ns - 1),
    };
    let bs = buf_size(np + ns);
    let mut rep = pubsub_report(&ctx, np, ns);

    // Subscribers first, so that nothing published is missed.
    let subs = connect_subscribers(&ctx, ns, &topics, persistent, bs).await?;
    let start_ns = clock::now_ns() + 100_000_000;
    let version = a.protocol;
    let payload = a.payload as usize;
    let total = a.messages.unwrap_or(u64::MAX);
    let plans = publishers(&ctx, np, ns, start_ns, total, |i| {
        topics.template(version, mqtt::qos(qos), payload, i, np, ns)
    })
    .await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_set, ids) = spawn_subscribers(&ctx, subs, &stop_rx);
    let progress = engine::spawn_progress(&ctx);
    let broker_before = ctx.probe.sample()?;
    let self_before = stats::self_sample();
    let errors_before = ctx.errors.count();

    let (pt, pub_conns) = run_publishers(&ctx, plans).await;
    let expected = (pt.sent - pt.refused) * topics.fan(ns);
    let drained = engine::wait_for(Duration::from_secs_f64(a.drain_timeout), || {
        ctx.progress.received.load(Ordering::Relaxed) >= expected
    })
    .await;
    let _ = stop_tx.send(true);
    let (st, sub_conns) = collect_subscribers(&ctx, sub_set, &ids).await;
    if let Some(p) = progress {
        p.abort();
    }
    let mut phase = pubsub_phase(a, &pt, &st, start_ns, expected, drained);
    take_errors(&ctx, &mut phase, errors_before);
    let msgs = if st.received > 0 {
        st.received
    } else {
        pt.acked
    };
    finish(&ctx, &mut rep, broker_before, self_before, msgs)?;
    rep.phases.push(phase);

    let pubs: Vec<_> = pub_conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| (ns + i, c, String::new()))
        .collect();
    close_all(&ctx, ctx.pub_addr, pubs, false).await;
    close_all(&ctx, ctx.sub_addr, sub_conns, persistent).await;
    Ok(rep)
}

/// How many publishers and subscribers a fan-in, fan-out, p2p or durable run has.
fn pubsub_counts(a: &Args) -> Result<(usize, usize)> {
    let publishers = a.publishers.or(a.pub_ids.as_ref().map(Vec::len));
    let subscribers = a.subscribers.or(a.sub_ids.as_ref().map(Vec::len));
    let (np, ns) = match a.scenario {
        Scenario::FanIn => (publishers.unwrap_or(10), subscribers.unwrap_or(1)),
        Scenario::FanOut => (publishers.unwrap_or(1), subscribers.unwrap_or(10)),
        Scenario::P2p => {
            let n = publishers.or(subscribers).unwrap_or(10);
            if subscribers.unwrap_or(n) != n {
                bail!("p2p: --publishers and --subscribers must be equal (pairs)");
            }
            (n, n)
        }
        _ => (publishers.unwrap_or(4), subscribers.unwrap_or(4)),
    };
    if np == 0 || ns == 0 {
        bail!("need at least one publisher and one subscriber");
    }
    Ok((np, ns))
}

/// The report of a fan-in, fan-out, p2p or durable run, before it runs.
fn pubsub_report(ctx: &Ctx, np: usize, ns: usize) -> Report {
    let mut rep = report(ctx);
    rep.publishers = Some(np);
    rep.subscribers = Some(ns);
    if ctx.args.qos() > 0 {
        rep.inflight = Some(ctx.args.inflight);
    }
    rep
}

/// The topics of a fan-in, fan-out, p2p or durable run.
#[derive(Clone)]
struct Topics {
    sc: Scenario,
    /// `PREFIX/TAG`.
    base: String,
    /// Digits of the durable scenario's subscriber numbers.
    width: usize,
}

impl Topics {
    /// How many subscribers each message published goes to.
    fn fan(&self, ns: usize) -> u64 {
        match self.sc {
            Scenario::FanIn | Scenario::FanOut => ns as u64,
            _ => 1,
        }
    }

    /// Subscriber `j`'s filter.
    fn filter(&self, j: usize) -> String {
        let (base, width) = (&self.base, self.width);
        match self.sc {
            Scenario::FanIn => format!("{base}/in/+"),
            Scenario::FanOut => format!("{base}/out"),
            Scenario::P2p => format!("{base}/p2p/{j}"),
            _ => format!("{base}/d/{j:0width$}"),
        }
    }

    /// Publisher `i`'s template (of `np`, for `ns` subscribers), with the numbering the
    /// durable scenario spreads its messages over the subscribers' topics by.
    fn template(
        &self,
        version: ProtocolVersion,
        q: QoS,
        payload: usize,
        i: usize,
        np: usize,
        ns: usize,
    ) -> Result<Template> {
        let base = &self.base;
        Ok(match self.sc {
            Scenario::FanIn => (
                PublishTemplate::new(version, q, &format!("{base}/in/{i}"), payload, None)?,
                None,
            ),
            Scenario::FanOut => (
                PublishTemplate::new(version, q, &format!("{base}/out"), payload, None)?,
                None,
            ),
            Scenario::P2p => (
                PublishTemplate::new(version, q, &format!("{base}/p2p/{i}"), payload, None)?,
                None,
            ),
            _ => (
                PublishTemplate::new(version, q, &self.filter(0), payload, Some(self.width))?,
                Some((i as u64, np as u64, ns as u64)),
            ),
        })
    }
}

/// Connects the `ns` subscribers and subscribes each to its filter; every one must make it.
async fn connect_subscribers(
    ctx: &Arc<Ctx>,
    ns: usize,
    topics: &Topics,
    persistent: bool,
    bs: usize,
) -> Result<Vec<(Conn, String)>> {
    let qos = ctx.args.qos();
    let prefix = ctx.args.prefix.clone();
    let tag = ctx.tag.clone();
    let topics = topics.clone();
    let ids = ctx.args.sub_ids.clone();
    let subs = ctx
        .many(ns, move |ctx, j| {
            let id = match &ids {
                Some(ids) => ids[j].clone(),
                None => format!("{prefix}{tag}s{j}"),
            };
            let f = topics.filter(j);
            let q = mqtt::qos(qos);
            async move {
                let (mut c, _) = ctx
                    .open_session_at(ctx.sub_addr, j, id.clone(), persistent, bs)
                    .await?;
                c.subscribe(&[f], q).await?;
                Ok((c, id))
            }
        })
        .await;
    if subs.iter().any(Option::is_none) {
        bail!(
            "subscribers could not connect: {}",
            ctx.errors.samples().join("; ")
        );
    }
    Ok(subs.into_iter().flatten().collect())
}

/// Starts a subscriber task per connection, until `stop`; gives the tasks and the client
/// IDs by subscriber index.
fn spawn_subscribers(
    ctx: &Arc<Ctx>,
    subs: Vec<(Conn, String)>,
    stop_rx: &watch::Receiver<bool>,
) -> (JoinSet<(usize, Conn, SubResult)>, Vec<String>) {
    let mut sub_set = JoinSet::new();
    let mut ids = Vec::with_capacity(subs.len());
    for (j, (conn, id)) in subs.into_iter().enumerate() {
        ids.push(id);
        let plan = SubPlan {
            expected: None,
            keep_alive: ctx.args.keep_alive,
        };
        let ctx2 = ctx.clone();
        let stop = stop_rx.clone();
        sub_set.spawn(async move {
            let (c, r) = engine::subscriber(conn, plan, stop, ctx2).await;
            (j, c, r)
        });
    }
    (sub_set, ids)
}

/// Waits for the subscriber tasks: their totals, and their connections with index and
/// client ID.
async fn collect_subscribers(
    ctx: &Ctx,
    mut sub_set: JoinSet<(usize, Conn, SubResult)>,
    ids: &[String],
) -> (SubTotals, Vec<Owned>) {
    let mut st = SubTotals::default();
    let mut sub_conns = Vec::with_capacity(ids.len());
    while let Some(j) = sub_set.join_next().await {
        match j {
            Ok((j, c, r)) => {
                st.add(&r, ctx);
                sub_conns.push((j, c, ids[j].clone()));
            }
            Err(e) => ctx.errors.add(format!("subscriber task: {e}")),
        }
    }
    (st, sub_conns)
}

/// The run's phase report from the publishers' and subscribers' totals.
fn pubsub_phase(
    a: &Args,
    pt: &PubTotals,
    st: &SubTotals,
    start_ns: u64,
    expected: u64,
    drained: bool,
) -> PhaseReport {
    let qos = a.qos();
    let end_ns = st.last_rx_ns.max(pt.last_ack_ns).max(pt.last_send_ns);
    let mut phase = PhaseReport {
        name: "run".into(),
        elapsed_s: secs(end_ns.saturating_sub(start_ns)),
        ..PhaseReport::default()
    };
    pt.fill(&mut phase, start_ns, qos, a.rate.is_some());
    st.fill(&mut phase, start_ns, expected);
    if !drained && qos == 0 {
        phase
            .notes
            .push("QoS 0: the broker may drop messages for a subscriber that is behind".into());
    }
    if !drained && qos > 0 {
        phase.notes.push(format!(
            "not all deliveries arrived within --drain-timeout {} s",
            a.drain_timeout
        ));
    }
    phase
}

/// Queue messages for offline persistent sessions, then reconnect them and time the drain.
pub async fn backlog(ctx: Arc<Ctx>) -> Result<Report> {
    let a = &ctx.args;
    let n = a
        .subscribers
        .or(a.sub_ids.as_ref().map(Vec::len))
        .unwrap_or(1000);
    if n == 0 {
        bail!("backlog: --subscribers (sessions) must be at least 1");
    }
    let m = a.messages.unwrap_or(100 * n as u64);
    let np = a
        .publishers
        .or(a.pub_ids.as_ref().map(Vec::len))
        .unwrap_or(4)
        .max(1);
    let qos = a.qos();
    let width = digits(n - 1);
    let prefix = a.prefix.clone();
    // `--sub-ids` names the sessions (to place them on a chosen cluster node); the topics
    // stay `<prefix>/bl/<i>`.
    let ids = a.sub_ids.clone().map(Arc::new);
    let id = move |i: usize| match &ids {
        Some(ids) => ids[i].clone(),
        None => format!("{prefix}-bl{i}"),
    };
    let p2 = a.prefix.clone();
    let topic = move |i: usize| format!("{p2}/bl/{i:0width$}");
    let mut rep = report(&ctx);
    rep.publishers = Some(np);
    rep.subscribers = Some(n);
    rep.inflight = (qos > 0).then_some(a.inflight);
    let broker_before = ctx.probe.sample()?;
    let self_before = stats::self_sample();
    let progress = engine::spawn_progress(&ctx);

    if matches!(a.phase, Phase::All | Phase::Fill) {
        backlog_sessions(&ctx, &mut rep, n, qos, &id, &topic).await?;
        backlog_fill(&ctx, &mut rep, np, n, m, width, &topic).await?;
    }

    if matches!(a.phase, Phase::All | Phase::Drain) {
        let (phase, conns) = backlog_drain(&ctx, n, m, &id).await;
        let msgs = phase.received.unwrap_or(0);
        rep.phases.push(phase);
        finish(&ctx, &mut rep, broker_before, self_before, msgs)?;
        close_all(&ctx, ctx.addr, conns, true).await;
    } else {
        finish(&ctx, &mut rep, broker_before, self_before, 0)?;
    }
    if let Some(p) = progress {
        p.abort();
    }
    Ok(rep)
}

/// Backlog step 1: the `n` sessions, persistent, subscribed, then offline.
async fn backlog_sessions(
    ctx: &Arc<Ctx>,
    rep: &mut Report,
    n: usize,
    qos: u8,
    id: &(impl Fn(usize) -> String + Clone),
    topic: &(impl Fn(usize) -> String + Clone),
) -> Result<()> {
    let errors_before = ctx.errors.count();
    let t0 = clock::now_ns();
    let (id2, topic2) = (id.clone(), topic.clone());
    let made = ctx
        .many(n, move |ctx, i| {
            let (cid, t) = (id2(i), topic2(i));
            let q = mqtt::qos(qos);
            async move {
                let (mut c, _) = ctx.open_session(i, cid, true, 4096).await?;
                c.subscribe(&[t], q).await?;
                c.disconnect(false).await?;
                ctx.progress.connects.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await;
    let ok = made.iter().filter(|r| r.is_some()).count() as u64;
    let t1 = clock::now_ns();
    let mut phase = PhaseReport {
        name: "sessions".into(),
        elapsed_s: secs(t1 - t0),
        connects: Some(ok),
        connect_rate: rate(ok, t0, t1),
        ..PhaseReport::default()
    };
    take_errors(ctx, &mut phase, errors_before);
    rep.phases.push(phase);
    if ok < n as u64 {
        bail!(
            "{} of {n} sessions could not be made: {}",
            n as u64 - ok,
            ctx.errors.samples().join("; ")
        );
    }
    Ok(())
}

/// Backlog step 2: `m` messages from `np` publishers, spread round robin over the `n`
/// sessions.
async fn backlog_fill(
    ctx: &Arc<Ctx>,
    rep: &mut Report,
    np: usize,
    n: usize,
    m: u64,
    width: usize,
    topic: &impl Fn(usize) -> String,
) -> Result<()> {
    let a = &ctx.args;
    let qos = a.qos();
    let errors_before = ctx.errors.count();
    let start_ns = clock::now_ns() + 100_000_000;
    let version = a.protocol;
    let payload = a.payload as usize;
    let plans = publishers(ctx, np, n, start_ns, m, |i| {
        Ok((
            PublishTemplate::new(version, mqtt::qos(qos), &topic(0), payload, Some(width))?,
            Some((i as u64, np as u64, n as u64)),
        ))
    })
    .await?;
    let (pt, conns) = run_publishers(ctx, plans).await;
    let mut phase = PhaseReport {
        name: "fill".into(),
        elapsed_s: secs(pt.last_ack_ns.max(pt.last_send_ns).saturating_sub(start_ns)),
        ..PhaseReport::default()
    };
    pt.fill(&mut phase, start_ns, qos, a.rate.is_some());
    if pt.sent < m {
        phase.notes.push(format!(
            "only {} of {m} messages sent within --duration",
            pt.sent
        ));
    }
    take_errors(ctx, &mut phase, errors_before);
    rep.phases.push(phase);
    let pubs = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| (n + i, c, String::new()))
        .collect();
    close_all(ctx, ctx.pub_addr, pubs, false).await;
    Ok(())
}

/// What one backlog session's drain gives: its index, connection, client ID, what it
/// received, and how long its reconnect took (ns).
type Drained = (usize, Conn, String, SubResult, u64);

/// Backlog step 3: reconnect every session and receive its share, within `--duration`.
async fn backlog_drain(
    ctx: &Arc<Ctx>,
    n: usize,
    m: u64,
    id: &impl Fn(usize) -> String,
) -> (PhaseReport, Vec<Owned>) {
    let a = &ctx.args;
    let cap = Duration::from_secs_f64(a.duration_s());
    let errors_before = ctx.errors.count();
    let (stop_tx, stop_rx) = watch::channel(false);
    let sem = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let counts = Arc::new(DrainCounts::default());
    let received_before = ctx.progress.received.load(Ordering::Relaxed);
    let mut set = JoinSet::new();
    let t0 = clock::now_ns();
    for i in 0..n {
        set.spawn(drain_one(
            ctx.clone(),
            i,
            id(i),
            share(m, n, i),
            sem.clone(),
            counts.clone(),
            stop_rx.clone(),
        ));
    }
    let (st, conn_lat, conns, timed_out) = collect_drained(ctx, set, &stop_tx, cap).await;
    let ok = counts.connected.load(Ordering::Relaxed);
    let mut phase = PhaseReport {
        name: "drain".into(),
        elapsed_s: secs(st.last_rx_ns.max(t0) - t0),
        connects: Some(ok),
        sessions_present: Some(counts.present.load(Ordering::Relaxed)),
        connect_latency: Latency::of(&conn_lat),
        ..PhaseReport::default()
    };
    st.fill(&mut phase, t0, m);
    phase
        .notes
        .push("latency here is the age of each message: queued at fill, delivered at drain".into());
    if timed_out {
        phase.notes.push(format!(
            "stopped at --duration {} s before every message arrived",
            a.duration_s()
        ));
    }
    debug_assert!(ctx.progress.received.load(Ordering::Relaxed) >= received_before);
    take_errors(ctx, &mut phase, errors_before);
    (phase, conns)
}

/// Backlog sessions reconnected, and those of them the broker still had.
#[derive(Default)]
struct DrainCounts {
    connected: AtomicU64,
    present: AtomicU64,
}

/// One backlog session's drain: reconnects it (`sem` bounds how many at once), counts it
/// in `counts`, and receives until `expected` messages or `stop`.
async fn drain_one(
    ctx: Arc<Ctx>,
    i: usize,
    cid: String,
    expected: u64,
    sem: Arc<Semaphore>,
    counts: Arc<DrainCounts>,
    stop: watch::Receiver<bool>,
) -> Option<Drained> {
    let permit = sem.acquire_owned().await;
    let t = clock::now_ns();
    let r = ctx.resume_session(i, cid.clone(), 4096).await;
    let took = clock::now_ns() - t;
    drop(permit);
    let (conn, acc) = match r {
        Ok(x) => x,
        Err(e) => {
            ctx.errors.add(format!("{e:#}"));
            return None;
        }
    };
    counts.connected.fetch_add(1, Ordering::Relaxed);
    ctx.progress.connects.fetch_add(1, Ordering::Relaxed);
    if acc.session_present {
        counts.present.fetch_add(1, Ordering::Relaxed);
    }
    let plan = SubPlan {
        expected: Some(expected),
        keep_alive: ctx.args.keep_alive,
    };
    let (conn, res) = engine::subscriber(conn, plan, stop, ctx).await;
    Some((i, conn, cid, res, took))
}

/// Gathers the drains as they end, telling the rest to stop once `cap` passed: their
/// totals, reconnect latencies, connections, and whether `cap` passed.
async fn collect_drained(
    ctx: &Ctx,
    mut set: JoinSet<Option<Drained>>,
    stop_tx: &watch::Sender<bool>,
    cap: Duration,
) -> (SubTotals, Histogram<u64>, Vec<Owned>, bool) {
    let end = tokio::time::Instant::now() + cap;
    let mut st = SubTotals::default();
    let mut conn_lat = stats::histogram();
    let mut conns = Vec::with_capacity(set.len());
    let mut timed_out = false;
    loop {
        let next = tokio::select! {
            j = set.join_next() => j,
            _ = tokio::time::sleep_until(end), if !timed_out => {
                timed_out = true;
                let _ = stop_tx.send(true);
                continue;
            }
        };
        let Some(j) = next else { break };
        match j {
            Ok(Some((i, conn, cid, res, took))) => {
                st.add(&res, ctx);
                stats::record(&mut conn_lat, took);
                conns.push((i, conn, cid));
            }
            Ok(None) => {}
            Err(e) => ctx.errors.add(format!("drain task: {e}")),
        }
    }
    (st, conn_lat, conns, timed_out)
}

/// N connections held open; the broker's memory per connection.
pub async fn idle(ctx: Arc<Ctx>) -> Result<Report> {
    let a = &ctx.args;
    let n = a.connections.unwrap_or(1000) as usize;
    let persistent = a.persistent || a.offline;
    let mut rep = report(&ctx);
    rep.connections = Some(n as u64);
    let self_before = stats::self_sample();
    let broker_before = ctx.probe.sample()?;
    let errors_before = ctx.errors.count();
    let progress = engine::spawn_progress(&ctx);
    let t0 = clock::now_ns();
    let opened = open_idle(&ctx, n, persistent).await;
    let t1 = clock::now_ns();
    let Sorted {
        lat,
        conns,
        ids,
        ok,
    } = sort_opened(opened);
    // Let the broker settle, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker_after = ctx.probe.sample()?;
    let mut phase = PhaseReport {
        name: if a.offline {
            "offline-sessions"
        } else {
            "idle-connections"
        }
        .into(),
        elapsed_s: secs(t1 - t0),
        connects: Some(ok),
        connect_rate: rate(ok, t0, t1),
        connect_latency: Latency::of(&lat),
        ..PhaseReport::default()
    };
    if let (Some(b), Some(af)) = (broker_before, broker_after) {
        phase.broker_rss_before = Some(b.rss_bytes);
        phase.broker_rss_after = Some(af.rss_bytes);
        if ok > 0 {
            phase.broker_rss_per_connection =
                Some((af.rss_bytes as f64 - b.rss_bytes as f64) / ok as f64);
        }
    }
    // Hold them for the rest of --duration (pinging when Keep Alive is on).
    let hold = Duration::from_secs_f64(a.duration_s()).saturating_sub(Duration::from_secs(1));
    let conns = hold_idle(&ctx, conns, hold).await;
    if let Some(p) = progress {
        p.abort();
    }
    take_errors(&ctx, &mut phase, errors_before);
    rep.phases.push(phase);
    finish(&ctx, &mut rep, broker_before, self_before, 0)?;
    close_all(&ctx, ctx.addr, conns, persistent).await;
    if persistent && !a.keep_sessions && !ids.is_empty() {
        // Offline sessions: a clean connection ends each.
        let ids = Arc::new(ids);
        ctx.many(ids.len(), move |ctx, k| {
            let (i, id) = ids[k].clone();
            async move {
                let (c, _) = ctx.open_session(i, id, false, 512).await?;
                c.disconnect(false).await
            }
        })
        .await;
    }
    Ok(rep)
}

/// What opening one idle connection gives: the connection (`None` once disconnected for
/// `--offline`), its client ID, and how long the connect took (ns).
type Opened = (Option<Conn>, String, u64);

/// Opens the `n` idle connections (subscribed with `--subscribe`, disconnected again with
/// `--offline`).
async fn open_idle(ctx: &Arc<Ctx>, n: usize, persistent: bool) -> Vec<Option<Opened>> {
    let a = &ctx.args;
    let qos = a.qos();
    let (prefix, tag) = (a.prefix.clone(), ctx.tag.clone());
    let (subscribe, offline) = (a.subscribe, a.offline);
    ctx.many(n, move |ctx, i| {
        let id = format!("{prefix}{tag}i{i}");
        let topic = format!("{prefix}/{tag}/idle/{i}");
        async move {
            let t = clock::now_ns();
            let (mut c, _) = ctx.open_session(i, id.clone(), persistent, 512).await?;
            let took = clock::now_ns() - t;
            if subscribe {
                c.subscribe(&[topic], mqtt::qos(qos)).await?;
            }
            ctx.progress.connects.fetch_add(1, Ordering::Relaxed);
            if offline {
                c.disconnect(false).await?;
                return Ok((None, id, took));
            }
            Ok((Some(c), id, took))
        }
    })
    .await
}

/// The idle connections once opened.
struct Sorted {
    /// Connect latencies.
    lat: Histogram<u64>,
    /// The ones held open.
    conns: Vec<Owned>,
    /// The client IDs (with index) of the offline ones.
    ids: Vec<(usize, String)>,
    /// How many opened.
    ok: u64,
}

/// Sorts the opened connections into held open and offline, counting them.
fn sort_opened(opened: Vec<Option<Opened>>) -> Sorted {
    let mut lat = stats::histogram();
    let mut conns = Vec::new();
    let mut ids = Vec::new();
    let mut ok = 0u64;
    for (i, o) in opened.into_iter().enumerate() {
        if let Some((c, id, took)) = o {
            ok += 1;
            stats::record(&mut lat, took);
            if let Some(c) = c {
                conns.push((i, c, id));
            } else {
                ids.push((i, id));
            }
        }
    }
    Sorted {
        lat,
        conns,
        ids,
        ok,
    }
}

/// Holds the connections open for `hold` (pinging when Keep Alive is on), then gives them
/// back.
async fn hold_idle(ctx: &Arc<Ctx>, conns: Vec<Owned>, hold: Duration) -> Vec<Owned> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    for (i, c, id) in conns {
        let plan = SubPlan {
            expected: None,
            keep_alive: ctx.args.keep_alive,
        };
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        set.spawn(async move {
            let (c, r) = engine::subscriber(c, plan, stop, ctx).await;
            (i, c, id, r)
        });
    }
    tokio::time::sleep(hold).await;
    let _ = stop_tx.send(true);
    let mut conns = Vec::new();
    while let Some(j) = set.join_next().await {
        if let Ok((i, c, id, r)) = j {
            if let Some(e) = r.error {
                ctx.errors.add(format!("idle connection: {e}"));
            }
            conns.push((i, c, id));
        }
    }
    conns
}

/// Connect, CONNACK, DISCONNECT, close: as many as possible.
pub async fn storm(ctx: Arc<Ctx>) -> Result<Report> {
    let a = &ctx.args;
    let count = a.connections.unwrap_or(100_000);
    let workers = a.connect_concurrency.max(1);
    let mut rep = report(&ctx);
    rep.connections = Some(count);
    let self_before = stats::self_sample();
    let broker_before = ctx.probe.sample()?;
    let errors_before = ctx.errors.count();
    let progress = engine::spawn_progress(&ctx);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = clock::now_ns();
    let deadline = t0 + (a.duration_s() * 1e9) as u64;
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (ctx, next) = (ctx.clone(), next.clone());
        set.spawn(async move {
            let mut lat = stats::histogram();
            let mut done = 0u64;
            let mut last = 0u64;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= count || clock::now_ns() >= deadline {
                    break;
                }
                let id = format!("{}{}c{k}", ctx.args.prefix, ctx.tag);
                let t = clock::now_ns();
                let opts = ctx.opts(id, true, false, 512);
                match mqtt::connect(ctx.addr, ctx.local_ip(k as usize), &opts).await {
                    Ok((c, _)) => {
                        let now = clock::now_ns();
                        stats::record(&mut lat, now - t);
                        done += 1;
                        last = now;
                        ctx.progress.connects.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = c.disconnect(false).await {
                            ctx.errors.add(format!("disconnect: {e:#}"));
                        }
                    }
                    Err(e) => {
                        ctx.errors.add(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (lat, done, last)
        });
    }
    let mut lat = stats::histogram();
    let mut done = 0;
    let mut last = t0;
    while let Some(j) = set.join_next().await {
        if let Ok((h, d, l)) = j {
            lat.add(&h).expect("same bounds");
            done += d;
            last = last.max(l);
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let mut phase = PhaseReport {
        name: "storm".into(),
        elapsed_s: secs(last - t0),
        connects: Some(done),
        connect_rate: rate(done, t0, last),
        connect_latency: Latency::of(&lat),
        ..PhaseReport::default()
    };
    take_errors(&ctx, &mut phase, errors_before);
    rep.phases.push(phase);
    finish(&ctx, &mut rep, broker_before, self_before, 0)?;
    Ok(rep)
}
