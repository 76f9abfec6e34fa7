//! `/metrics`: the shards' counters in the Prometheus text exposition format (0.0.4).
//! Every series carries `shard="N"`; counters end in `_total`, histograms in seconds.

use std::fmt::Write;

use super::BrokerInfo;
use crate::config::QueuePolicy;
use crate::shard::api::ShardStats;
use crate::shard::metrics::LatencyHistogram;

/// Writes one metric family: its HELP and TYPE, then one sample per shard and label set.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, shard: usize, labels: &[(&str, &str)], v: impl Into<f64>) {
        let _ = write!(self.out, "{name}{{shard=\"{shard}\"");
        for (k, val) in labels {
            let _ = write!(self.out, ",{k}=\"{val}\"");
        }
        let _ = writeln!(self.out, "}} {}", fmt_value(v.into()));
    }

    fn histogram(&mut self, name: &str, shard: usize, h: &LatencyHistogram) {
        for (le, n) in h.cumulative() {
            let le = le.map_or_else(|| "+Inf".to_string(), fmt_value);
            let _ = writeln!(
                self.out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            self.out,
            "{name}_sum{{shard=\"{shard}\"}} {}",
            fmt_value(h.sum_us as f64 / 1e6)
        );
        let _ = writeln!(self.out, "{name}_count{{shard=\"{shard}\"}} {}", h.count);
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Reads one per-shard value out of a shard's stats.
type Gauge = fn(&ShardStats) -> f64;

/// The families with one unlabelled sample per shard: name, type, help, and how to read it.
const SIMPLE: [(&str, &str, &str, Gauge); 33] = [
    ("shardmq_connections", "gauge", "Sockets open.", |s| {
        s.sockets as f64
    }),
    (
        "shardmq_clients_connected",
        "gauge",
        "MQTT sessions with a connection.",
        |s| s.core.connections as f64,
    ),
    (
        "shardmq_connects_total",
        "counter",
        "CONNECTs accepted.",
        |s| s.core.connects_total as f64,
    ),
    (
        "shardmq_sessions",
        "gauge",
        "Sessions, online and offline.",
        |s| s.sessions as f64,
    ),
    (
        "shardmq_subscriptions",
        "gauge",
        "Subscriptions held by the shard's sessions.",
        |s| s.subscriptions as f64,
    ),
    (
        "shardmq_retained_messages",
        "gauge",
        "Retained messages held (every shard holds a copy of all of them).",
        |s| s.retained as f64,
    ),
    (
        "shardmq_queued_messages",
        "gauge",
        "Messages queued for the shard's sessions.",
        |s| s.queued_messages as f64,
    ),
    (
        "shardmq_queued_bytes",
        "gauge",
        "Payload bytes queued for the shard's sessions.",
        |s| s.queued_bytes as f64,
    ),
    (
        "shardmq_bytes_received_total",
        "counter",
        "Bytes read from client sockets.",
        |s| s.bytes_received as f64,
    ),
    (
        "shardmq_bytes_sent_total",
        "counter",
        "Bytes written to client sockets.",
        |s| s.bytes_sent as f64,
    ),
    (
        "shardmq_storage_bytes",
        "gauge",
        "Bytes the shard's store takes on disk.",
        |s| s.storage_bytes as f64,
    ),
    (
        "shardmq_cross_shard_messages_sent_total",
        "counter",
        "Messages routed to another shard (one per target shard).",
        |s| s.core.messages_routed_remote as f64,
    ),
    (
        "shardmq_cross_shard_messages_received_total",
        "counter",
        "Messages another shard routed here.",
        |s| s.core.messages_from_remote as f64,
    ),
    (
        "shardmq_handoffs_total",
        "counter",
        "Connections handed to their session's shard.",
        |s| s.handoffs as f64,
    ),
    (
        "shardmq_wills_published_total",
        "counter",
        "Will messages published.",
        |s| s.core.wills_published as f64,
    ),
    (
        "shardmq_sessions_expired_total",
        "counter",
        "Sessions ended by their expiry.",
        |s| s.core.sessions_expired as f64,
    ),
    (
        "shardmq_logins_failed_total",
        "counter",
        "CONNECTs refused for their credentials.",
        |s| s.core.logins_failed as f64,
    ),
    (
        "shardmq_logins_busy_total",
        "counter",
        "CONNECTs refused because too many password checks were in flight.",
        |s| s.core.logins_busy as f64,
    ),
    (
        "shardmq_sessions_deleted_total",
        "counter",
        "Sessions discarded through the admin API.",
        |s| s.core.sessions_deleted as f64,
    ),
    (
        "shardmq_clients_kicked_total",
        "counter",
        "Clients disconnected through the admin API.",
        |s| s.core.sessions_kicked as f64,
    ),
    (
        "shardmq_incomplete_packet_bytes",
        "gauge",
        "Read buffer bytes held by packets that have started to arrive and are not complete.",
        |s| s.incomplete_packet_bytes as f64,
    ),
    (
        "shardmq_incomplete_packet_closes_total",
        "counter",
        "Connections closed as the largest holders of incomplete packets over limits.incomplete_packet_bytes_max.",
        |s| s.closed_incomplete_budget as f64,
    ),
    (
        "shardmq_packet_timeouts_total",
        "counter",
        "Connections closed because a started packet was not complete within limits.packet_timeout_s.",
        |s| s.closed_packet_timeout as f64,
    ),
    (
        "shardmq_takeovers_refused_total",
        "counter",
        "CONNECTs refused because the client id's session belongs to another user.",
        |s| s.core.takeovers_refused as f64,
    ),
    (
        "shardmq_cluster_sessions_moved_in_total",
        "counter",
        "Sessions moved here from another cluster node (a node joined, or one left).",
        |s| s.core.sessions_moved_in as f64,
    ),
    (
        "shardmq_cluster_sessions_rebuild_damaged_total",
        "counter",
        "Sessions of a failed node's replicated stream skipped in a fail-over because their records are damaged.",
        |s| s.core.sessions_rebuild_damaged as f64,
    ),
    (
        "shardmq_cluster_moved_keys_forwarded_total",
        "counter",
        "QoS 2 dedup keys a session moving to another node forgot (its publisher released them) after it may have been read for the move, forwarded to that node.",
        |s| s.core.moved_keys_forwarded as f64,
    ),
    (
        "shardmq_cluster_adopted_keys_untracked_total",
        "counter",
        "QoS 2 keys of sessions moved here past the bound on those kept for a late forget from the old owner (such a key may stay stale).",
        |s| s.core.adopted_keys_untracked as f64,
    ),
    (
        "shardmq_retained_deletions_forgotten_total",
        "counter",
        "Retained deletions forgotten before limits.retained_deletions_keep_s, past limits.retained_deletions_bytes_max or retained_messages_max (a node back with an old disk may keep its copy of such a message).",
        |s| s.core.retained_deletions_forgotten as f64,
    ),
    (
        "shardmq_cluster_replica_changes_dropped_total",
        "counter",
        "Changes waiting for the replicated stream (after failed appends, or behind an append slow to come back) dropped past cluster.replication_pending_bytes_max (a snapshot puts them in the stream).",
        |s| s.core.replica_changes_dropped as f64,
    ),
    (
        "shardmq_cluster_sessions_moved_out_total",
        "counter",
        "Sessions moved from here to another cluster node, deleted here once it had them.",
        |s| s.core.sessions_moved_out as f64,
    ),
    (
        "shardmq_cluster_sessions_discarded_total",
        "counter",
        "Sessions discarded because another node owns their slot after a fail-over.",
        |s| s.core.sessions_orphaned as f64,
    ),
    (
        "shardmq_cluster_moving_refused_total",
        "counter",
        "QoS 1/2 messages refused (the publisher sends them again) for sessions moving to another node.",
        |s| s.core.moving_refused as f64,
    ),
];

/// Renders every shard's stats (index = shard).
pub fn render(stats: &[ShardStats], info: &BrokerInfo) -> String {
    let mut out = String::with_capacity(8192);
    let mut f = Family { out: &mut out };
    render_simple(&mut f, stats);
    render_by_qos(&mut f, stats);
    render_dropped(&mut f, stats, info.queue_policy);
    render_latencies(&mut f, stats);
    process_metrics(&mut out, info);
    if let Some(c) = &info.cluster {
        cluster_metrics(&mut out, &c.view());
    }
    out
}

/// The `shardmq_cluster_*` families: this node's lease, and per member and per link.
fn cluster_metrics(out: &mut String, v: &crate::cluster::ClusterView) {
    use crate::cluster::{MemberState, SelfState};
    let mut one = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", v.node, fmt_value(value));
    };
    one(
        "shardmq_cluster_lease_held",
        "gauge",
        "1 while this node holds its etcd lease (0: joining, fenced or leaving).",
        f64::from(u8::from(v.state == SelfState::Up)),
    );
    one(
        "shardmq_cluster_lease_lost_total",
        "counter",
        "Times this node lost its etcd lease and stopped serving what it owns.",
        v.counters.lease_lost_total as f64,
    );
    one(
        "shardmq_cluster_joins_total",
        "counter",
        "Times this node registered with a fresh lease.",
        v.counters.joins_total as f64,
    );
    one(
        "shardmq_cluster_etcd_errors_total",
        "counter",
        "etcd requests that failed (each is retried).",
        v.counters.etcd_errors_total as f64,
    );
    one(
        "shardmq_cluster_failovers_total",
        "counter",
        "Fail-overs this node made (a dead node's slots given to the live ones).",
        v.counters.failovers_total as f64,
    );
    one(
        "shardmq_cluster_watch_restarts_total",
        "counter",
        "Times the etcd watch was re-created.",
        v.counters.watch_restarts_total as f64,
    );
    if let Some(r) = &v.replication {
        one(
            "shardmq_cluster_replica_appends_total",
            "counter",
            "Group commits appended to this node's replicated stream (JetStream).",
            r.appends_total as f64,
        );
        one(
            "shardmq_cluster_replica_append_failures_total",
            "counter",
            "Group commits whose append failed (their acknowledgements failed).",
            r.append_failures_total as f64,
        );
        one(
            "shardmq_cluster_replica_lag_appends",
            "gauge",
            "Group commits waiting for the replicated stream now.",
            r.lag_appends as f64,
        );
        one(
            "shardmq_cluster_replica_last_append_seconds",
            "gauge",
            "How long the last round of appends took.",
            r.lag_ms as f64 / 1e3,
        );
        one(
            "shardmq_cluster_replica_log_bytes",
            "gauge",
            "Bytes appended since the last snapshot.",
            r.log_bytes_since_snapshot as f64,
        );
        one(
            "shardmq_cluster_replica_snapshots_total",
            "counter",
            "Snapshots of this node's sessions written to its stream.",
            r.snapshots_total as f64,
        );
        one(
            "shardmq_cluster_replica_fenced",
            "gauge",
            "1 while this node's stream is fenced (another node failed it over).",
            f64::from(u8::from(r.fenced)),
        );
        one(
            "shardmq_cluster_replica_sessions_rebuilt_total",
            "counter",
            "Sessions this node rebuilt from failed nodes' streams.",
            r.sessions_rebuilt_total as f64,
        );
    }
    let families: [(&str, &str, &str); 5] = [
        (
            "shardmq_cluster_member_up",
            "gauge",
            "1 while a member holds its lease, as this node sees it.",
        ),
        (
            "shardmq_cluster_member_slots",
            "gauge",
            "Slots (of 4096) a member owns.",
        ),
        (
            "shardmq_cluster_link_up",
            "gauge",
            "1 while the link from this node to a member answers its heartbeats.",
        ),
        (
            "shardmq_cluster_link_rtt_seconds",
            "gauge",
            "The last heartbeat's round trip on the link to a member.",
        ),
        (
            "shardmq_cluster_link_connects_total",
            "counter",
            "Times the link to a member was established.",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in &v.members {
            let link = m.link.as_ref();
            let value = match i {
                0 => Some(f64::from(u8::from(m.state == MemberState::Up))),
                1 => Some(m.slots as f64),
                2 => link.map(|l| f64::from(u8::from(l.state == "up"))),
                3 => link.and_then(|l| l.rtt_us).map(|us| us as f64 / 1e6),
                _ => link.map(|l| l.connects_total as f64),
            };
            if let Some(x) = value {
                let _ = writeln!(
                    out,
                    "{name}{{node=\"{}\",member=\"{}\"}} {}",
                    v.node,
                    m.id,
                    fmt_value(x)
                );
            }
        }
    }
}

/// Writes the [`SIMPLE`] families, one unlabelled sample per shard.
fn render_simple(f: &mut Family<'_>, stats: &[ShardStats]) {
    for (name, kind, help, get) in SIMPLE {
        f.head(name, kind, help);
        for (i, s) in stats.iter().enumerate() {
            f.sample(name, i, &[], get(s));
        }
    }
}

/// Writes the PUBLISH counters received and sent, labelled by QoS.
fn render_by_qos(f: &mut Family<'_>, stats: &[ShardStats]) {
    let qos = ["0", "1", "2"];
    let name = "shardmq_messages_received_total";
    f.head(
        name,
        "counter",
        "PUBLISH packets received from clients, by QoS.",
    );
    for (i, s) in stats.iter().enumerate() {
        for (q, n) in qos.iter().zip(s.core.received_qos) {
            f.sample(name, i, &[("qos", q)], n as f64);
        }
    }
    let name = "shardmq_messages_sent_total";
    f.head(name, "counter", "PUBLISH packets sent to clients, by QoS.");
    for (i, s) in stats.iter().enumerate() {
        for (q, n) in qos.iter().zip(s.delivery.delivered_qos) {
            f.sample(name, i, &[("qos", q)], n as f64);
        }
    }
}

/// Writes the dropped-message counter, one sample per shard and reason.
fn render_dropped(f: &mut Family<'_>, stats: &[ShardStats], policy: QueuePolicy) {
    let name = "shardmq_messages_dropped_total";
    f.head(
        name,
        "counter",
        "Messages not delivered or not kept, by reason (queue_full_* per sessions.queue_policy).",
    );
    let (full_now, full_other) = match policy {
        QueuePolicy::RejectNewest => ("queue_full_reject_newest", "queue_full_drop_oldest"),
        QueuePolicy::DropOldest => ("queue_full_drop_oldest", "queue_full_reject_newest"),
    };
    for (i, s) in stats.iter().enumerate() {
        let d = &s.delivery;
        for (reason, n) in [
            (full_now, d.dropped_queue_full),
            (full_other, 0),
            ("storage_budget_full", d.dropped_storage_budget),
            ("message_expired", d.dropped_expired),
            ("qos0_offline_disabled", d.dropped_qos0_offline),
            ("outbound_buffer_full", d.dropped_qos0_slow),
            ("too_large_for_client", d.dropped_too_large),
            ("retained_store_full", s.core.retained_dropped_full),
            (
                "shared_group_without_member",
                s.core.shared_dropped_no_member,
            ),
            ("sys_topic_from_client", s.core.sys_publish_dropped),
            ("acl_denied_publish", s.core.acl_denied_publish),
            ("acl_denied_delivery", s.core.acl_denied_delivery),
        ] {
            f.sample(name, i, &[("reason", reason)], n as f64);
        }
    }
}

/// Writes the storage write and fsync latency histograms.
fn render_latencies(f: &mut Family<'_>, stats: &[ShardStats]) {
    for (name, help, get) in [
        (
            "shardmq_storage_write_seconds",
            "Duration of a storage batch write (before fsync).",
            (|s: &ShardStats| s.core.write_latency) as fn(&ShardStats) -> LatencyHistogram,
        ),
        (
            "shardmq_storage_fsync_seconds",
            "Duration of a persist (fsync) of the shard's store (in replicated mode, of the background fsync).",
            |s: &ShardStats| s.core.fsync_latency,
        ),
        (
            "shardmq_cluster_replication_wait_seconds",
            "With replicated sessions: how much longer a group commit waited for the replicated stream after its fsync (in replicated mode, after its write to the page cache).",
            |s: &ShardStats| s.core.replica_wait,
        ),
    ] {
        f.head(name, "histogram", help);
        for (i, s) in stats.iter().enumerate() {
            f.histogram(name, i, &get(s));
        }
    }
}

/// The process-wide series every Prometheus client library exports (`process_*`, read from
/// /proc, without a shard label), and the build's version.
fn process_metrics(out: &mut String, info: &BrokerInfo) {
    proc_stat_metrics(out);
    fd_metrics(out);
    let start = info
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64());
    process_series(
        out,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        start,
    );
    let _ = writeln!(
        out,
        "# HELP shardmq_build_info The running build (value 1)."
    );
    let _ = writeln!(out, "# TYPE shardmq_build_info gauge");
    let _ = writeln!(
        out,
        "shardmq_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
}

/// Writes one unlabelled process-wide series (HELP, TYPE, value), or nothing without a value.
fn process_series(out: &mut String, name: &str, kind: &str, help: &str, v: Option<f64>) {
    if let Some(v) = v {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {}", fmt_value(v));
    }
}

/// Writes the CPU time and memory series read from /proc/self/stat.
fn proc_stat_metrics(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let cpu = field(11)
        .zip(field(12))
        .map(|(u, s)| (u + s) / ticks.max(1) as f64);
    process_series(
        out,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu,
    );
    process_series(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        field(21).map(|p| p * page.max(1) as f64),
    );
    process_series(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        field(20),
    );
}

/// Writes the open and maximum file descriptor series.
fn fd_metrics(out: &mut String) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    process_series(
        out,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        fds,
    );
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some(limit.rlim_cur as f64);
    process_series(
        out,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn every_sample_is_labelled_and_every_family_typed() {
        let mut a = ShardStats::default();
        a.core.received_qos = [3, 2, 1];
        a.core.fsync_latency.observe(Duration::from_millis(2));
        let info = BrokerInfo {
            cores: vec![None, None],
            queue_policy: QueuePolicy::RejectNewest,
            started: SystemTime::now(),
            concurrent_requests_max: 1,
            allowed_hosts: Vec::new(),
            token: None,
            cluster: None,
        };
        let text = render(&[a, ShardStats::default()], &info);
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            // Per shard, but for the process-wide series.
            let process_wide =
                series.starts_with("process_") || series.starts_with("shardmq_build_info");
            assert!(process_wide || series.contains("{shard=\""), "{line}");
            let name = series.split('{').next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| typed.iter().any(|t| t == b))
                .unwrap_or(name);
            assert!(typed.iter().any(|t| t == base), "untyped {line}");
        }
        assert!(text.contains("shardmq_messages_received_total{shard=\"0\",qos=\"2\"} 1\n"));
        assert!(
            text.contains("shardmq_storage_fsync_seconds_bucket{shard=\"0\",le=\"0.0025\"} 1\n")
        );
        assert!(text.contains("shardmq_storage_fsync_seconds_bucket{shard=\"0\",le=\"0.001\"} 0\n"));
        assert!(text.contains("shardmq_storage_fsync_seconds_count{shard=\"1\"} 0\n"));
    }
}
