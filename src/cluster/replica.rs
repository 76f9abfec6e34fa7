//! Replicated sessions: every group commit's changes (see `storage::replica`) go to a NATS
//! JetStream stream of this node's, with `cluster.jetstream_replicas` replicas, before the
//! acknowledgements that wait on them; a fail-over rebuilds a dead node's sessions from its
//! stream (its last snapshot, then the log after it).
//!
//! One stream per node, `SHARDMQ_<hash of prefix and node id>`, with four subjects under
//! `shardmq.<same hash>.`:
//!
//! | subject   | what                                                                    |
//! |-----------|-------------------------------------------------------------------------|
//! | `log`     | one *round* per message (or per run of messages, header `Shardmq-More`): the units of the group commits that reached the appender together, each `[len: u32 LE][unit]` |
//! | `snap`    | a snapshot's units, header `Shardmq-Snap: <id>`                          |
//! | `done`    | the last complete snapshot: `{id, start, first, messages, records}` (JSON) |
//! | `fence`   | written by a node that fails this one over                              |
//!
//! **Fencing.** This node is the only writer of its `log`, `snap` and `done`, and every
//! message it appends carries `Nats-Expected-Last-Sequence` (the stream's last sequence as
//! it knows it): once another node has written to `fence`, every append of this node
//! fails (`WrongLastSequence`) and so do the acknowledgements that wait on it. The fencing
//! node reads the stream only after its fence is in, so it sees everything this node ever
//! had acknowledged. Each append also carries a `Nats-Msg-Id`, so that one retried after a
//! lost answer is not stored twice.
//!
//! **Snapshots and trimming.** After `cluster.snapshot_log_bytes` appended (and after a
//! failed append, which may leave the stream without a change the store has), the appender
//! notes the stream's last sequence `start`, reads every shard's store (one engine
//! snapshot each, taken after `start`, so each holds every change up to it), appends the
//! records as `snap` messages and a `done` record, then purges `log` up to `start` and the
//! older snapshots. Ops are absolute (a key's value, or its deletion), so log entries after
//! `start` that a snapshot already holds apply again harmlessly.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::shard::api::{Append, AppendFailed};
use crate::storage::replica::Replay;
use crate::storage::{ClientEntry, Store};

const KIND: &str = "Shardmq-Kind";
const MORE: &str = "Shardmq-More";
const ROUND: &str = "Shardmq-Round";
const SNAP: &str = "Shardmq-Snap";
/// Room left in a message for its headers.
const HEADER_ROOM: usize = 4096;
/// Units of a snapshot message (well under NATS's 1 MiB default payload bound).
const SNAP_UNIT_BYTES: usize = 256 << 10;
/// Pause between tries of a failed append (within `cluster.replication_timeout_ms`).
const RETRY: Duration = Duration::from_millis(100);

/// Where a node's replication log lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Names {
    pub stream: String,
    pub log: String,
    pub snap: String,
    pub done: String,
    pub fence: String,
}

impl Names {
    pub fn of(prefix: &str, node: &str) -> Names {
        let mut key = prefix.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(node.as_bytes());
        let h = format!("{:016x}", crate::session::ownership::stable_hash(&key));
        let base = format!("shardmq.{h}");
        Names {
            stream: format!("SHARDMQ_{h}"),
            log: format!("{base}.log"),
            snap: format!("{base}.snap"),
            done: format!("{base}.done"),
            fence: format!("{base}.fence"),
        }
    }

    fn all(&self) -> String {
        self.log.trim_end_matches(".log").to_string() + ".>"
    }
}

/// The last complete snapshot (the `done` record).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDone {
    pub id: u64,
    /// The stream's last sequence when it began: the log after it applies on top.
    pub start: u64,
    /// Its first `snap` message.
    pub first: u64,
    pub messages: u64,
    pub records: u64,
    /// When it was finished (ms since the Unix epoch).
    pub at_ms: u64,
}

/// This node's replication, as `GET /api/cluster` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaView {
    pub stream: String,
    pub replicas: u32,
    /// The stream's last sequence this node appended (or found).
    pub last_seq: u64,
    /// Group commits waiting for the stream now, and how long the oldest has waited.
    pub lag_appends: u64,
    pub lag_ms: u64,
    /// Bytes appended since the last snapshot.
    pub log_bytes_since_snapshot: u64,
    pub last_snapshot: Option<SnapshotDone>,
    /// Another node failed this one over: nothing more is appended (every acknowledgement
    /// that needs the stream fails) until this node rejoins.
    pub fenced: bool,
    pub appends_total: u64,
    pub append_failures_total: u64,
    pub snapshots_total: u64,
    /// Sessions rebuilt here from other nodes' streams (fail-overs).
    pub sessions_rebuilt_total: u64,
}

/// A member's stream as JetStream holds it (`GET /api/cluster`, per member).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct StreamView {
    pub stream: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The last snapshot's start, if one is recorded (the log after it is what a
    /// fail-over replays).
    pub snapshot_start: Option<u64>,
}

/// The shared view, updated by the appender and read by the admin endpoint.
pub type ReplicaState = Arc<Mutex<ReplicaView>>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A connection to JetStream, shared by the appender and fail-overs.
#[derive(Clone, Debug)]
pub(super) struct Replica {
    js: jetstream::Context,
    prefix: String,
    replicas: u32,
    timeout: Duration,
    /// The largest message the servers take.
    payload_max: usize,
    rebuild_bytes_max: usize,
    pub state: ReplicaState,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Replica {
    /// Connects (bounded by `etcd_timeout_s`, as for etcd) and makes sure this node's
    /// stream exists.
    pub async fn connect(cfg: &ClusterConfig, me: &str) -> Result<Replica, String> {
        let urls = cfg.jetstream.join(",");
        let addrs = cfg
            .jetstream
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cluster.jetstream: {e}"))?;
        let bound = Duration::from_secs(cfg.etcd_timeout_s as u64);
        let client = tokio::time::timeout(
            bound,
            async_nats::ConnectOptions::new()
                .name(format!("shardmq {me}"))
                .retry_on_initial_connect()
                .connect(addrs),
        )
        .await
        .map_err(|_| format!("cannot reach NATS at {urls} (cluster.jetstream) within {bound:?}"))?
        .map_err(|e| format!("cannot reach NATS at {urls} (cluster.jetstream): {e}"))?;
        let payload_max = client.server_info().max_payload.max(64 << 10);
        let timeout = Duration::from_millis(cfg.replication_timeout_ms as u64);
        let mut js = jetstream::new(client);
        // JetStream's own requests (stream info, reads, purges) get the etcd bound: a
        // stream that has just been made elects its leader meanwhile. Appends are bounded
        // by `replication_timeout_ms` on top (`Appender::publish`).
        js.set_timeout(bound);
        let r = Replica {
            js,
            prefix: cfg.prefix.clone(),
            replicas: cfg.jetstream_replicas,
            timeout,
            payload_max,
            rebuild_bytes_max: cfg.rebuild_bytes_max as usize,
            state: Arc::default(),
        };
        let names = r.names(me);
        {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            st.stream = names.stream.clone();
            st.replicas = r.replicas;
        }
        let deadline = Instant::now() + bound.max(Duration::from_secs(30));
        loop {
            match r.ensure_stream(me, &names).await {
                Ok(_) => return Ok(r),
                // A JetStream cluster that is still electing its leader answers "no
                // responders" or times out for a while.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "JetStream not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(format!("JetStream stream {}: {e}", names.stream)),
            }
        }
    }

    pub fn names(&self, node: &str) -> Names {
        Names::of(&self.prefix, node)
    }

    async fn ensure_stream(&self, me: &str, names: &Names) -> Result<stream::Stream, String> {
        let config = stream::Config {
            name: names.stream.clone(),
            description: Some(format!(
                "shardmq node {me} (cluster prefix {})",
                self.prefix
            )),
            subjects: vec![names.all()],
            storage: stream::StorageType::File,
            num_replicas: self.replicas as usize,
            retention: stream::RetentionPolicy::Limits,
            // Never drop what was appended: a full stream refuses appends (and with them
            // the acknowledgements).
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| err("create", e))
    }

    async fn stream(&self, names: &Names) -> Result<Option<stream::Stream>, String> {
        match self.js.get_stream(&names.stream).await {
            Ok(s) => Ok(Some(s)),
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                // Not found (a node that never replicated): nothing to rebuild from.
                Ok(None)
            }
            Err(e) => Err(err("stream", e)),
        }
    }

    /// `node`'s stream as JetStream holds it now (`None`: it has none).
    pub async fn stream_view(&self, node: &str) -> Result<Option<StreamView>, String> {
        let names = self.names(node);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(None);
        };
        let state = &stream.cached_info().state;
        let snapshot_start = stream
            .get_last_raw_message_by_subject(&names.done)
            .await
            .ok()
            .and_then(|m| serde_json::from_slice::<SnapshotDone>(&m.payload).ok())
            .map(|d| d.start);
        Ok(Some(StreamView {
            stream: names.stream.clone(),
            messages: state.messages,
            bytes: state.bytes,
            first_seq: state.first_sequence,
            last_seq: state.last_sequence,
            snapshot_start,
        }))
    }

    /// Fences `node`: from now on none of its appends succeeds.
    pub async fn fence(&self, node: &str, by: &str) -> Result<(), String> {
        let names = self.names(node);
        let mut h = HeaderMap::new();
        h.insert(KIND, "fence");
        let body = Bytes::from(format!("fenced by {by} at {}", now_ms()));
        let ack = self
            .js
            .publish_with_headers(names.fence.clone(), h, body)
            .await
            .map_err(|e| err("fence", e))?;
        tokio::time::timeout(self.timeout, ack)
            .await
            .map_err(|_| "fence: no answer".to_string())?
            .map_err(|e| err("fence", e))?;
        Ok(())
    }

    /// Rebuilds the sessions of `node`'s stream that `keep` wants: its last snapshot,
    /// then its log after the snapshot's start.
    pub async fn read(
        &self,
        node: &str,
        keep: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<(String, Vec<ClientEntry>)>, String> {
        let names = self.names(node);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(Vec::new());
        };
        let mut replay = Replay::default();
        let bound = self.rebuild_bytes_max;
        let mut from = 1;
        if let Some(m) = last_of(&stream, &names.done).await? {
            let done: SnapshotDone =
                serde_json::from_slice(&m.payload).map_err(|e| err("snapshot record", e))?;
            let mut seen = 0;
            let mut part: Vec<u8> = Vec::new();
            self.each(&stream, &names.snap, done.first, &mut |msg| {
                if header(msg, SNAP) != Some(done.id.to_string().as_str()) {
                    return Ok(true);
                }
                seen += 1;
                // A body in parts (one record near the packet limit) is joined first.
                part.extend_from_slice(&msg.payload);
                if header(msg, MORE).is_some() {
                    if part.len() > bound {
                        return Err(format!(
                            "the sessions to rebuild hold more than cluster.rebuild_bytes_max ({bound} bytes)"
                        ));
                    }
                    return Ok(seen < done.messages);
                }
                let whole = std::mem::take(&mut part);
                for unit in frames(&whole)? {
                    replay.apply(unit, keep);
                }
                if replay.bytes() > bound {
                    return Err(format!(
                        "the sessions to rebuild hold more than cluster.rebuild_bytes_max ({bound} bytes)"
                    ));
                }
                Ok(seen < done.messages)
            })
            .await?;
            if seen < done.messages {
                return Err(format!(
                    "snapshot {} of {node}: {seen} of {} messages found",
                    done.id, done.messages
                ));
            }
            from = done.start + 1;
        }
        // The log: rounds, each whole (a round cut short by a failure is left out: none
        // of its acknowledgements was sent).
        let mut round: Option<(String, Vec<u8>)> = None;
        self.each(&stream, &names.log, from, &mut |msg| {
            let id = header(msg, ROUND).unwrap_or_default().to_string();
            let more = header(msg, MORE).is_some();
            let buf = match round.take() {
                Some((rid, mut buf)) if rid == id => {
                    buf.extend_from_slice(&msg.payload);
                    buf
                }
                _ => msg.payload.to_vec(),
            };
            if more {
                round = Some((id, buf));
            } else {
                for unit in frames(&buf)? {
                    replay.apply(unit, keep);
                }
            }
            if replay.bytes() > bound {
                return Err(format!(
                    "the sessions to rebuild hold more than cluster.rebuild_bytes_max ({bound} bytes)"
                ));
            }
            Ok(true)
        })
        .await?;
        tracing::info!(
            node,
            units = replay.units,
            damaged = replay.damaged,
            bytes = replay.bytes(),
            "read a node's replicated sessions"
        );
        Ok(replay.into_clients())
    }

    /// Calls `f` with every message of `subject` from sequence `from` on, as the stream
    /// holds them now, until `f` says stop.
    async fn each(
        &self,
        stream: &stream::Stream,
        subject: &str,
        from: u64,
        f: &mut (dyn FnMut(&jetstream::Message) -> Result<bool, String> + Send),
    ) -> Result<(), String> {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| err("read", e))?;
        let pending = consumer.cached_info().num_pending;
        if pending == 0 {
            return Ok(());
        }
        let mut messages = consumer.messages().await.map_err(|e| err("read", e))?;
        loop {
            let next = tokio::time::timeout(self.timeout, messages.next())
                .await
                .map_err(|_| format!("read {subject}: no message within {:?}", self.timeout))?;
            let Some(msg) = next else {
                return Ok(());
            };
            let msg = msg.map_err(|e| err("read", e))?;
            let left = msg.info().map(|i| i.pending).unwrap_or(0);
            if !f(&msg)? || left == 0 {
                return Ok(());
            }
        }
    }

    /// Empties this node's stream (it owns nothing: whatever it holds was rebuilt
    /// elsewhere) and returns the last sequence.
    pub async fn purge(&self, me: &str) -> Result<u64, String> {
        self.last_seq_after(me, true).await
    }

    /// Whether this node's stream holds sessions (a log or a snapshot).
    pub async fn holds_sessions(&self, me: &str) -> Result<bool, String> {
        let names = self.names(me);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(false);
        };
        if last_of(&stream, &names.snap).await?.is_some() {
            return Ok(true);
        }
        Ok(last_of(&stream, &names.log)
            .await?
            .is_some_and(|m| m.headers.get(KIND).is_some_and(|k| k.as_str() != "init")))
    }

    async fn last_seq(&self, me: &str) -> Result<u64, String> {
        self.last_seq_after(me, false).await
    }

    /// This node's stream's last sequence, after emptying it when `purge`.
    async fn last_seq_after(&self, me: &str, purge: bool) -> Result<u64, String> {
        let names = self.names(me);
        let stream = self.ensure_stream(me, &names).await?;
        if purge {
            stream.purge().await.map_err(|e| err("purge", e))?;
        }
        Ok(stream
            .get_info()
            .await
            .map_err(|e| err("info", e))?
            .state
            .last_sequence)
    }
}

/// The last message of `subject`: `Ok(None)` only when there is none (any other failure,
/// a leader election say, is an error: absence must never be guessed).
async fn last_of(
    stream: &stream::Stream,
    subject: &str,
) -> Result<Option<jetstream::message::StreamMessage>, String> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(format!("read the last {subject}: {e}")),
    }
}

fn header<'a>(msg: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// The units of a round or snapshot message: `[len: u32 LE][unit]` each.
fn frames(mut buf: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < 4 {
            return Err("a replication message cut short".into());
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + len {
            return Err("a replication message cut short".into());
        }
        out.push(&buf[4..4 + len]);
        buf = &buf[4 + len..];
    }
    Ok(out)
}

/// Why an append failed.
#[derive(Debug)]
enum AppendError {
    /// Another node fenced this one (or wrote to its stream).
    Fenced,
    Failed(String),
}

/// The appender: the only writer of this node's stream.
pub(super) struct Appender {
    r: Replica,
    me: String,
    names: Names,
    last_seq: u64,
    fenced: bool,
    incarnation: u64,
    counter: u64,
    since_snapshot: u64,
    snapshot_log_bytes: u64,
    /// A snapshot is due (a failed append, or the log grew past its bound).
    snapshot_due: bool,
    /// A shard dropped changes the stream lacks (`Append::gap`): every append fails
    /// until a snapshot has put them in (their own changes are in the store: the
    /// snapshot takes them too).
    gap: bool,
    /// Whether the stream holds everything the stores do: not before the first snapshot
    /// after a start or an unfence (a group commit may have reached only the store), nor
    /// with a gap. An append without units (a barrier) succeeds only when it does.
    whole: bool,
    stores: Arc<OnceLock<Vec<Store>>>,
    handle: super::ClusterHandle,
    /// When it found itself fenced: it appends again only once its lease has been renewed
    /// since (a fence means its lease had expired: that renewal is a new lease's, and
    /// the slot table it holds then is etcd's, not the one it had before a freeze).
    fenced_since: Instant,
}

impl Appender {
    /// `owns_slots`: whether this node owns slots now; without, its stream holds nothing
    /// it will serve (a fail-over rebuilt its sessions elsewhere) and is emptied.
    pub async fn start(
        r: Replica,
        me: &str,
        owns_slots: bool,
        snapshot_log_bytes: u64,
        stores: Arc<OnceLock<Vec<Store>>>,
        handle: super::ClusterHandle,
    ) -> Result<Appender, String> {
        let last_seq = if owns_slots {
            r.last_seq(me).await?
        } else {
            r.purge(me).await?
        };
        let names = r.names(me);
        let mut a = Appender {
            r,
            me: me.to_string(),
            names,
            last_seq,
            fenced: false,
            incarnation: now_ms(),
            counter: 0,
            since_snapshot: 0,
            snapshot_log_bytes,
            // The store and the stream may differ by a group commit that reached only one
            // of them before the last stop: a snapshot makes the stream whole again.
            snapshot_due: owns_slots,
            gap: false,
            whole: !owns_slots,
            stores,
            handle,
            fenced_since: Instant::now(),
        };
        if last_seq == 0 {
            // An empty stream takes any append whatever its expected sequence says (0
            // means "no check"): one marker first, so that a fence is always seen.
            let log = a.names.log.clone();
            a.publish(&log, "init", Vec::new(), &[])
                .await
                .map_err(|e| format!("JetStream stream {}: {e:?}", a.names.stream))?;
        }
        a.show(|v| v.last_seq = a.last_seq);
        Ok(a)
    }

    fn show(&self, f: impl FnOnce(&mut ReplicaView)) {
        f(&mut self.r.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Appends one message after the last one this node knows of; retried within
    /// `cluster.replication_timeout_ms` (the same message id: stored once).
    async fn publish(
        &mut self,
        subject: &str,
        kind: &str,
        body: Vec<u8>,
        extra: &[(&'static str, String)],
    ) -> Result<u64, AppendError> {
        self.counter += 1;
        let mut h = HeaderMap::new();
        h.insert(KIND, kind);
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}-{}-{}", self.me, self.incarnation, self.counter).as_str(),
        );
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
            self.last_seq.to_string().as_str(),
        );
        for (k, v) in extra {
            h.insert(*k, v.as_str());
        }
        let body = Bytes::from(body);
        let deadline = Instant::now() + self.r.timeout;
        loop {
            let attempt = async {
                self.r
                    .js
                    .publish_with_headers(subject.to_string(), h.clone(), body.clone())
                    .await?
                    .await
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(ack)) => {
                    self.last_seq = ack.sequence;
                    return Ok(ack.sequence);
                }
                Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(AppendError::Fenced)
                }
                Ok(Err(e)) if Instant::now() + RETRY < deadline => {
                    tracing::debug!(error = %e, "append to the replicated stream failed; trying again");
                    tokio::time::sleep(RETRY).await;
                }
                Ok(Err(e)) => return Err(AppendError::Failed(e.to_string())),
                Err(_) => {
                    return Err(AppendError::Failed(format!(
                        "no answer within {:?}",
                        self.r.timeout
                    )))
                }
            }
        }
    }

    /// Appends one round: the units of the group commits that arrived together, in as
    /// few messages as the servers take (each part names the round; all but the last say
    /// there is more).
    async fn round(&mut self, units: &[&[u8]]) -> Result<(), AppendError> {
        let mut buf = Vec::with_capacity(units.iter().map(|u| u.len() + 4).sum());
        for u in units {
            buf.extend_from_slice(&(u.len() as u32).to_le_bytes());
            buf.extend_from_slice(u);
        }
        self.since_snapshot += buf.len() as u64;
        let round = format!("{}-{}", self.incarnation, self.counter + 1);
        let log = self.names.log.clone();
        self.publish_parts(&log, "log", &buf, (ROUND, round))
            .await
            .map(|_| ())
    }

    /// Appends `buf` in as few messages as the servers take, each naming `tag` (all but
    /// the last say there is more: a reader joins them). Returns the first message's
    /// sequence and the number of messages.
    async fn publish_parts(
        &mut self,
        subject: &str,
        kind: &str,
        buf: &[u8],
        tag: (&'static str, String),
    ) -> Result<(u64, u64), AppendError> {
        let part_max = self.r.payload_max.saturating_sub(HEADER_ROOM).max(1024);
        let parts: Vec<&[u8]> = buf.chunks(part_max).collect();
        let n = parts.len();
        let mut first = 0;
        for (i, part) in parts.into_iter().enumerate() {
            let mut extra = vec![tag.clone()];
            if i + 1 < n {
                extra.push((MORE, "1".to_string()));
            }
            let seq = self.publish(subject, kind, part.to_vec(), &extra).await?;
            if first == 0 {
                first = seq;
            }
        }
        Ok((first, n as u64))
    }

    /// Appends one round of `waiting` and answers each append (a failed one gets its
    /// units back, to be sent again).
    async fn serve(&mut self, waiting: &mut Vec<Append>) -> Result<(), AppendError> {
        if waiting.iter().any(|a| a.gap) {
            self.gap = true;
            self.snapshot_due = true;
        }
        if self.gap && !self.fenced {
            for a in waiting.drain(..) {
                let _ = a.reply.send(Err(AppendFailed {
                    why: "the replicated stream lacks changes dropped after failed appends; a snapshot is being written".into(),
                    fenced: false,
                    // In the store: the snapshot takes them.
                    units: Vec::new(),
                }));
            }
            return Err(AppendError::Failed("waiting for a snapshot".into()));
        }
        let units: Vec<&[u8]> = waiting
            .iter()
            .flat_map(|a| a.units.iter().map(Vec::as_slice))
            .collect();
        let r = if self.fenced {
            Err(AppendError::Fenced)
        } else if units.is_empty() {
            // Barriers only: nothing to write.
            Ok(())
        } else {
            match self.round(&units).await {
                // Another writer, or this node's own earlier append that was stored after
                // all: only a fence after its last append makes it fenced.
                Err(AppendError::Fenced) => match self.fenced_since_last().await {
                    Ok(false) => Err(AppendError::Failed(
                        "the stream moved on without this append (an earlier try stored late)"
                            .into(),
                    )),
                    Ok(true) => Err(AppendError::Fenced),
                    Err(e) => Err(AppendError::Failed(e)),
                },
                r => r,
            }
        };
        // The answers first: the checks after a failure below may wait for NATS.
        for a in waiting.drain(..) {
            let answer = match &r {
                Ok(()) if a.units.is_empty() && !self.whole => Err(AppendFailed {
                    why: "the replicated stream is being made whole (a snapshot)".into(),
                    fenced: false,
                    units: Vec::new(),
                }),
                Ok(()) => Ok(()),
                Err(e) => Err(AppendFailed {
                    why: match e {
                        AppendError::Fenced => "this node was failed over (fenced)".into(),
                        AppendError::Failed(e) => e.clone(),
                    },
                    fenced: matches!(e, AppendError::Fenced),
                    units: a.units,
                }),
            };
            let _ = a.reply.send(answer);
        }
        match &r {
            Ok(()) => {}
            Err(AppendError::Fenced) => {
                if !self.fenced {
                    tracing::error!(stream = %self.names.stream, "this node's replicated stream was fenced by another node: acknowledgements that need it fail until it rejoins");
                    self.fenced_since = Instant::now();
                }
                self.fenced = true;
            }
            Err(AppendError::Failed(e)) => {
                tracing::warn!(error = %e, "append to the replicated stream failed: its acknowledgements fail, and its changes go again with the next");
                // The next append must know where the stream ends now (the failed one may
                // have been stored after all: its changes then go twice, harmlessly), but
                // a fence written meanwhile must not be taken for a new starting point.
                // Bounded as an append is: NATS may be the reason it failed.
                let me = self.me.clone();
                let check = async {
                    match self.fenced_since_last().await {
                        Ok(false) => self.r.last_seq(&me).await.map(Some),
                        Ok(true) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match tokio::time::timeout(self.r.timeout, check)
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                {
                    Ok(Some(seq)) => self.last_seq = seq,
                    Ok(None) => {
                        tracing::error!(stream = %self.names.stream, "this node's replicated stream was fenced by another node: acknowledgements that need it fail until its lease is renewed");
                        self.fenced = true;
                        self.fenced_since = Instant::now();
                    }
                    // Not known now: the next append says (its expected sequence).
                    Err(_) => {}
                }
            }
        }
        r
    }

    /// Serves the shards' appends until they stop: whatever arrived while the last round
    /// was out goes in the next, and a snapshot is written when one is due.
    pub async fn run(mut self, mut rx: tokio::sync::mpsc::UnboundedReceiver<Append>) {
        let mut waiting: Vec<Append> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if waiting.is_empty() {
                tokio::select! {
                    a = rx.recv() => match a {
                        Some(a) => waiting.push(a),
                        None => return,
                    },
                    _ = tick.tick() => {}
                }
            }
            while let Ok(a) = rx.try_recv() {
                waiting.push(a);
            }
            if !waiting.is_empty() {
                let started = Instant::now();
                let n = waiting.len() as u64;
                self.show(|v| v.lag_appends = n);
                let failed = self.serve(&mut waiting).await.is_err();
                let (since, last) = (self.since_snapshot, self.last_seq);
                let fenced = self.fenced;
                self.show(|v| {
                    v.appends_total += n;
                    if failed {
                        v.append_failures_total += n;
                    }
                    v.lag_appends = 0;
                    v.lag_ms = started.elapsed().as_millis() as u64;
                    v.last_seq = last;
                    v.log_bytes_since_snapshot = since;
                    v.fenced = fenced;
                });
            }
            if self.fenced {
                self.unfence().await;
            }
            if !self.fenced && (self.snapshot_due || self.since_snapshot >= self.snapshot_log_bytes)
            {
                if let Err(e) = self.snapshot(&mut rx, &mut waiting).await {
                    tracing::warn!(error = %e, "snapshot of the replicated sessions failed; tried again later");
                }
            }
        }
    }

    /// Whether a fence was written into this node's stream after its last append.
    async fn fenced_since_last(&self) -> Result<bool, String> {
        let stream = self
            .r
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| err("stream", e))?;
        Ok(last_of(&stream, &self.names.fence)
            .await?
            .is_some_and(|m| m.sequence > self.last_seq))
    }

    /// A fenced node whose lease was renewed since: if it owns no slot, whatever its
    /// stream holds was rebuilt elsewhere and is emptied; if it still owns slots (the
    /// fail-over that fenced it did not take them), it goes on after the fence, with a
    /// snapshot first (appends failed meanwhile: the stream lacks changes its store has).
    async fn unfence(&mut self) {
        let (renewed, owned) = {
            let st = self.handle.lock();
            let owned = st
                .slots
                .counts()
                .get(self.me.as_str())
                .copied()
                .unwrap_or(0);
            let renewed = st.state == super::SelfState::Up
                && st.renewed.is_some_and(|t| t > self.fenced_since);
            (renewed, owned)
        };
        if !renewed {
            return;
        }
        let me = self.me.clone();
        let r = if owned == 0 {
            self.r.purge(&me).await
        } else {
            self.r.last_seq(&me).await
        };
        match r {
            Ok(seq) => {
                self.last_seq = seq;
                self.fenced = false;
                self.snapshot_due = owned > 0;
                // An emptied stream lacks nothing this node will serve.
                self.gap &= owned > 0;
                self.whole = owned == 0;
                self.since_snapshot = 0;
                tracing::warn!(
                    owned,
                    "replicating again after this node rejoined (its stream was fenced)"
                );
                self.show(|v| v.fenced = false);
            }
            Err(e) => tracing::warn!(error = %e, "cannot resume replicating yet"),
        }
    }

    /// Writes a snapshot of every shard's store, then trims what it makes unneeded.
    /// Appends that arrive meanwhile wait in `waiting` (they go in the next round).
    async fn snapshot(
        &mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Append>,
        waiting: &mut Vec<Append>,
    ) -> Result<(), String> {
        let Some(stores) = self.stores.get().cloned() else {
            return Ok(());
        };
        let start = self.last_seq;
        let id = now_ms();
        // The stores are read on a blocking thread, a message's worth at a time.
        let (tx, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reader = tokio::task::spawn_blocking(move || {
            let mut records = 0;
            let mut msg = Vec::new();
            for store in &stores {
                let mut emit = |unit: Vec<u8>| {
                    msg.extend_from_slice(&(unit.len() as u32).to_le_bytes());
                    msg.extend_from_slice(&unit);
                    if msg.len() >= SNAP_UNIT_BYTES {
                        tx.blocking_send(std::mem::take(&mut msg))
                            .map_err(|_| "snapshot abandoned".to_string())?;
                    }
                    Ok(())
                };
                records += store.snapshot_units(SNAP_UNIT_BYTES / 2, &mut emit)?;
            }
            if !msg.is_empty() {
                tx.blocking_send(msg)
                    .map_err(|_| "snapshot abandoned".to_string())?;
            }
            Ok::<u64, String>(records)
        });
        let mut first = 0;
        let mut messages = 0;
        let snap = self.names.snap.clone();
        while let Some(body) = chunks.recv().await {
            // A body past the servers' max_payload (a record near the packet limit) goes
            // in parts.
            let (seq, n) = self
                .publish_parts(&snap, "snap", &body, (SNAP, id.to_string()))
                .await
                .map_err(|e| format!("{e:?}"))?;
            if first == 0 {
                first = seq;
            }
            messages += n;
            // Group commits that arrived meanwhile go out between the snapshot's messages
            // (after its start: a rebuild replays them after it), unless the snapshot
            // fills a gap: then nothing is acknowledged before its end.
            while let Ok(a) = rx.try_recv() {
                waiting.push(a);
            }
            if !waiting.is_empty() && !self.gap {
                self.serve(waiting).await.map_err(|e| format!("{e:?}"))?;
            }
        }
        let records = reader
            .await
            .map_err(|e| format!("snapshot reader: {e}"))??;
        let done = SnapshotDone {
            id,
            start,
            first,
            messages,
            records,
            at_ms: now_ms(),
        };
        let body = serde_json::to_vec(&done).map_err(|e| e.to_string())?;
        let done_subject = self.names.done.clone();
        self.publish(&done_subject, "done", body, &[])
            .await
            .map_err(|e| format!("{e:?}"))?;
        // Trim: the log up to the snapshot's start, the older snapshots and records.
        let stream = self
            .r
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| err("stream", e))?;
        let purge =
            |subject: &str, below: u64| stream.purge().filter(subject.to_string()).sequence(below);
        purge(&self.names.log, start + 1)
            .await
            .map_err(|e| err("trim the log", e))?;
        if first > 0 {
            purge(&self.names.snap, first)
                .await
                .map_err(|e| err("trim old snapshots", e))?;
        }
        stream
            .purge()
            .filter(self.names.done.clone())
            .keep(1)
            .await
            .map_err(|e| err("trim old snapshot records", e))?;
        self.since_snapshot = 0;
        self.snapshot_due = false;
        self.whole = true;
        if self.gap {
            self.gap = false;
            tracing::warn!(
                "the replicated stream is whole again (a snapshot took the dropped changes)"
            );
        }
        tracing::info!(
            records,
            messages,
            start,
            "wrote a snapshot of the replicated sessions and trimmed the log before it"
        );
        self.show(|v| {
            v.snapshots_total += 1;
            v.last_snapshot = Some(done);
            v.log_bytes_since_snapshot = 0;
        });
        Ok(())
    }
}
