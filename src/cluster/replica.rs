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
use crate::storage::replica::{LastWords, Replay};
use crate::storage::{ClientEntry, Store};

mod appender;
pub(super) mod clean;
pub(super) use appender::Appender;

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
    /// Whether the connection to NATS is up, and the last error it reported (a refused
    /// login, a certificate that did not verify, a server gone).
    pub nats_connected: bool,
    pub nats_error: Option<String>,
    /// Connections made to NATS (the first, then every reconnection).
    pub nats_connects_total: u64,
    /// The stream's last sequence when the last round left it holding everything the
    /// stores hold (whole, no gap, not fenced, the round a success); `None` otherwise.
    /// Written as the clean-stop marker when the node stops in order.
    #[serde(skip)]
    pub clean_seq: Option<u64>,
    /// When this node's stream was made (for the clean-stop marker).
    #[serde(skip)]
    pub stream_created: Option<i128>,
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

/// What a fail-over read from a node's stream.
#[derive(Debug, Default)]
pub(super) struct Rebuilt {
    /// The sessions, with their records.
    pub sessions: Vec<(String, Vec<ClientEntry>)>,
    /// Units skipped as damaged (the stream is then kept, not trimmed, for an operator).
    pub damaged: u64,
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
    /// The connection (its server's `max_payload`, known once the server has said it).
    client: async_nats::Client,
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
        let state: ReplicaState = Arc::default();
        // Servers that are still starting are waited for (within the bound); a refused
        // login or a certificate that does not verify is not: one line, at once.
        let deadline = Instant::now() + bound.max(Duration::from_secs(30));
        if cfg.jetstream_user.is_some() && !cfg.jetstream_tls_on() {
            tracing::warn!("cluster.jetstream_password goes to NATS in the clear: set cluster.jetstream_tls or jetstream_ca_file");
        }
        let seed = match &cfg.jetstream_nkey_file {
            Some(p) => Some(
                crate::config::nkey_seed(p)
                    .map_err(|r| format!("cluster.jetstream_nkey_file: {r}"))?,
            ),
            None => None,
        };
        let creds = match &cfg.jetstream_creds_file {
            Some(p) => Some(
                crate::config::nats_creds(p)
                    .map_err(|r| format!("cluster.jetstream_creds_file: {r}"))?,
            ),
            None => None,
        };
        let client = loop {
            // Each try may take what is left: the client gives each server its own
            // connect timeout, and one that drops packets must not use up the whole try.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            let tried = tokio::time::timeout(
                left,
                connect_options(cfg, me, &state, seed.clone(), creds.as_deref())?
                    .connect(addrs.clone()),
            )
            .await;
            let e = match tried {
                Ok(Ok(client)) => break client,
                Ok(Err(e)) => {
                    use async_nats::ConnectErrorKind as K;
                    let tls = matches!(e.kind(), K::Tls) || tls_failure(&e);
                    let fatal = tls
                        || matches!(
                            e.kind(),
                            K::AuthorizationViolation | K::Authentication | K::ServerParse
                        );
                    let e = if tls {
                        format!(
                            "cannot reach NATS at {urls} (cluster.jetstream): TLS: {e} \
                             (see cluster.jetstream_ca_file, jetstream_cert_file, jetstream_key_file)"
                        )
                    } else {
                        format!("cannot reach NATS at {urls} (cluster.jetstream): {e}")
                    };
                    if fatal {
                        return Err(e);
                    }
                    e
                }
                Err(_) => {
                    format!("cannot reach NATS at {urls} (cluster.jetstream) within {left:?}")
                }
            };
            if Instant::now() >= deadline {
                return Err(e);
            }
            tracing::debug!(error = %e, "NATS not reachable yet");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let timeout = Duration::from_millis(cfg.replication_timeout_ms as u64);
        let mut js = jetstream::new(client.clone());
        // JetStream's own requests (stream info, reads, purges) get the etcd bound: a
        // stream that has just been made elects its leader meanwhile. Appends are bounded
        // by `replication_timeout_ms` on top (`Appender::publish`).
        js.set_timeout(bound);
        let r = Replica {
            js,
            prefix: cfg.prefix.clone(),
            replicas: cfg.jetstream_replicas,
            timeout,
            client,
            rebuild_bytes_max: cfg.rebuild_bytes_max as usize,
            state,
        };
        let names = r.names(me);
        {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            st.stream = names.stream.clone();
            st.replicas = r.replicas;
        }
        loop {
            match r.ensure_stream(me, &names).await {
                Ok(_) => return Ok(r),
                // A JetStream cluster that is still electing its leader answers "no
                // responders" or times out for a while.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "JetStream not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    let last = r.state.lock().ok().and_then(|v| v.nats_error.clone());
                    return Err(match last {
                        Some(why) => format!(
                            "JetStream stream {}: {e} (the last NATS error: {why})",
                            names.stream
                        ),
                        None => format!("JetStream stream {}: {e}", names.stream),
                    });
                }
            }
        }
    }

    /// The most bytes of body one message may carry: the server's `max_payload` less room
    /// for the headers (64 KiB until the server has said: a connection still being made).
    fn part_max(&self) -> usize {
        let max = match self.client.server_info().max_payload {
            0 => 64 << 10,
            n => n,
        };
        max.saturating_sub(HEADER_ROOM).max(1024)
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

    /// Fences `node`: from now on none of its appends succeeds. Returns the fence's
    /// sequence in the stream.
    pub async fn fence(&self, node: &str, by: &str) -> Result<u64, String> {
        let names = self.names(node);
        let mut h = HeaderMap::new();
        h.insert(KIND, "fence");
        let body = Bytes::from(format!("fenced by {by} at {}", now_ms()));
        let ack = self
            .js
            .publish_with_headers(names.fence.clone(), h, body)
            .await
            .map_err(|e| err("fence", e))?;
        let ack = tokio::time::timeout(self.timeout, ack)
            .await
            .map_err(|_| "fence: no answer".to_string())?
            .map_err(|e| err("fence", e))?;
        Ok(ack.sequence)
    }

    /// Rebuilds the sessions of `node`'s stream that `keep` wants: its last snapshot,
    /// then its log after the snapshot's start.
    pub async fn read(
        &self,
        node: &str,
        keep: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Rebuilt, String> {
        let names = self.names(node);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(Rebuilt::default());
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
        self.each_logged_unit(&stream, &names, from, &mut |unit| {
            replay.apply(unit, keep);
            if replay.bytes() > bound {
                return Err(format!(
                    "the sessions to rebuild hold more than cluster.rebuild_bytes_max ({bound} bytes)"
                ));
            }
            Ok(())
        })
        .await?;
        tracing::info!(
            node,
            units = replay.units,
            damaged = replay.damaged,
            bytes = replay.bytes(),
            "read a node's replicated sessions"
        );
        let damaged = replay.damaged;
        Ok(Rebuilt {
            sessions: replay.into_clients(),
            damaged,
        })
    }

    /// The last word on each per-client key in `node`'s log after sequence `after` (the
    /// stores of a node that restarts in `replicated` mode hold everything up to there),
    /// bounded by `cluster.rebuild_bytes_max`. `None`: the log was trimmed past `after`
    /// (the last snapshot starts later), so it cannot bring the stores up to the stream.
    pub async fn read_log_after(
        &self,
        node: &str,
        after: u64,
    ) -> Result<Option<LastWords>, String> {
        let names = self.names(node);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(Some(LastWords::default()));
        };
        if let Some(m) = last_of(&stream, &names.done).await? {
            let done: SnapshotDone =
                serde_json::from_slice(&m.payload).map_err(|e| err("snapshot record", e))?;
            if done.start > after {
                return Ok(None);
            }
        }
        let bound = self.rebuild_bytes_max;
        let mut words = LastWords::default();
        self.each_logged_unit(&stream, &names, after + 1, &mut |unit| {
            words.apply(unit);
            if words.bytes() > bound {
                return Err(format!(
                    "the log to bring the stores up to the stream holds more than cluster.rebuild_bytes_max ({bound} bytes): \
                     raise it for this start (the log is held in memory while it is applied)"
                ));
            }
            Ok(())
        })
        .await?;
        Ok(Some(words))
    }

    /// Calls `f` with every unit of the log rounds from sequence `from` on, each round
    /// whole (a round cut short by a failure is left out: none of its acknowledgements was
    /// sent).
    async fn each_logged_unit(
        &self,
        stream: &stream::Stream,
        names: &Names,
        from: u64,
        f: &mut (dyn FnMut(&[u8]) -> Result<(), String> + Send),
    ) -> Result<(), String> {
        let mut round: Option<(String, Vec<u8>)> = None;
        self.each(stream, &names.log, from, &mut |msg| {
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
                    f(unit)?;
                }
            }
            Ok(true)
        })
        .await
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

    /// Trims the stream of `node`, failed over: its sessions are stored (and replicated) by
    /// the node that rebuilt them, so its `log`, `snap` and `done` below `fence_seq` (the
    /// fence this fail-over wrote: everything before it was read) go; the fence stays, and
    /// with it the stream's last sequence, so that `node`, should it still be running,
    /// stays fenced. Whatever came after the fence (the node back, its stream emptied,
    /// sessions moved to it since) is left alone. Returns the messages left.
    pub async fn trim_failed_over(&self, node: &str, fence_seq: u64) -> Result<u64, String> {
        let names = self.names(node);
        let Some(stream) = self.stream(&names).await? else {
            return Ok(0);
        };
        for subject in [&names.log, &names.snap, &names.done] {
            stream
                .purge()
                .filter(subject.clone())
                .sequence(fence_seq)
                .await
                .map_err(|e| err("purge", e))?;
        }
        let mut stream = stream;
        Ok(stream
            .info()
            .await
            .map_err(|e| err("info", e))?
            .state
            .messages)
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
        Ok(self.stream_end(me, false).await?.0)
    }

    /// This node's stream's last sequence, after emptying it when `purge` (it owns nothing:
    /// whatever it holds was rebuilt elsewhere), and when the
    /// stream was made (JetStream's `created`, Unix nanoseconds: a stream deleted and made
    /// again under the same name is told apart by it), from one answer.
    pub async fn stream_end(&self, me: &str, purge: bool) -> Result<(u64, i128), String> {
        let names = self.names(me);
        let stream = self.ensure_stream(me, &names).await?;
        if purge {
            stream.purge().await.map_err(|e| err("purge", e))?;
        }
        let info = stream.get_info().await.map_err(|e| err("info", e))?;
        Ok((
            info.state.last_sequence,
            info.created.unix_timestamp_nanos(),
        ))
    }
}

/// Whether a failed connect failed in the TLS handshake (a certificate that does not
/// verify, on either side): waiting does not mend that. The client reports it as an I/O
/// error wrapping the TLS library's.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The connection's options: its name, TLS and credentials as configured, and the last error the client reported kept in `state` (`GET
/// /api/cluster`, and the start's one line when the stream cannot be reached).
fn connect_options(
    cfg: &ClusterConfig,
    me: &str,
    state: &ReplicaState,
    nkey_seed: Option<String>,
    creds: Option<&str>,
) -> Result<async_nats::ConnectOptions, String> {
    let mut opts = async_nats::ConnectOptions::new().name(format!("shardmq {me}"));
    if cfg.jetstream_tls_on() {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.jetstream_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.jetstream_cert_file, &cfg.jetstream_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if let (Some(user), Some(password)) = (&cfg.jetstream_user, &cfg.jetstream_password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(seed) = nkey_seed {
        opts = opts.nkey(seed);
    }
    if let Some(creds) = creds {
        // The client's own reason may quote the file: not repeated.
        opts = opts.credentials(creds).map_err(|_| {
            "cluster.jetstream_creds_file: the NATS client cannot read its JWT and seed".to_string()
        })?;
    }
    let state = state.clone();
    Ok(opts.event_callback(move |event| {
        let state = state.clone();
        async move {
            let Ok(mut v) = state.lock() else {
                return;
            };
            // Before the first connection the start reports what failed (one line);
            // afterwards each change is logged once (the client retries every few
            // hundred milliseconds while a server is away).
            let up_once = v.nats_connects_total > 0;
            match event {
                async_nats::Event::Connected => {
                    v.nats_connected = true;
                    v.nats_connects_total += 1;
                    // What the view shows is the trouble now, not a mended one.
                    v.nats_error = None;
                    if up_once {
                        tracing::info!("connected to NATS again");
                    }
                }
                async_nats::Event::Disconnected => {
                    if v.nats_connected && up_once {
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    v.nats_connected = false;
                }
                async_nats::Event::ServerError(e) => {
                    note_nats_error(&mut v, e.to_string(), up_once)
                }
                async_nats::Event::ClientError(e) => {
                    note_nats_error(&mut v, e.to_string(), up_once)
                }
                async_nats::Event::LameDuckMode => {
                    tracing::warn!("a NATS server is going away (lame duck mode)")
                }
                async_nats::Event::SlowConsumer(_) => {
                    tracing::warn!("NATS: this client is a slow consumer (messages dropped)")
                }
                _ => {}
            }
        }
    }))
}

/// Keeps the client's last error for the view; logs it when it is new.
fn note_nats_error(v: &mut ReplicaView, why: String, log: bool) {
    if v.nats_error.as_deref() == Some(why.as_str()) {
        return;
    }
    if log {
        tracing::warn!(error = %why, "NATS");
    } else {
        tracing::debug!(error = %why, "NATS");
    }
    v.nats_error = Some(why);
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
