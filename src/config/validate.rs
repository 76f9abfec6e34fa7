//! Checking a config: every limit in range, listeners and the admin endpoint on distinct
//! addresses, files that must exist; one line naming the key at fault.

use super::*;

impl Config {
    /// Checks each value and how the limits relate.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() && self.listeners.is_empty() {
            return Err(bad("listen", "at least one listener is needed"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(i)?;
        }
        self.check_limits()?;
        check_log_filter(&self.log.level).map_err(|e| bad("log.level", e))?;
        if self.sessions.session_expiry_default_s > self.sessions.session_expiry_max_s {
            return Err(bad(
                "sessions.session_expiry_default_s",
                "must not exceed sessions.session_expiry_max_s",
            ));
        }
        if let Some(n) = self.shards.count {
            if n == 0 || n > MAX_SHARDS {
                return Err(bad(
                    "shards.count",
                    format!("must be between 1 and {MAX_SHARDS}"),
                ));
            }
        }
        if let Some(cores) = &self.shards.cores {
            parse_core_list(cores).map_err(|r| bad("shards.cores", r))?;
        }
        self.check_addresses()?;
        self.check_admin()?;
        self.cluster.validate()?;
        let replicated = self.storage.durability == Durability::Replicated;
        if !self.cluster.jetstream.is_empty() && !self.storage.durability.acknowledges_committed() {
            return Err(bad(
                "cluster.jetstream",
                "replicated sessions need storage.durability = \"durable\" or \"replicated\"",
            ));
        }
        if replicated && self.cluster.jetstream.is_empty() {
            return Err(bad(
                "storage.durability",
                "\"replicated\" acknowledges from the replicated stream: it needs cluster.jetstream",
            ));
        }
        if replicated && self.cluster.jetstream_replicas < 2 {
            return Err(bad(
                "storage.durability",
                "\"replicated\" acknowledges once a quorum of JetStream servers holds a change: it needs cluster.jetstream_replicas of at least 2 (3 to survive the loss of one)",
            ));
        }
        for f in &self.access.subscribe_deny {
            crate::protocol::TopicFilter::new(f)
                .map_err(|e| bad("access.subscribe_deny", format!("{f:?}: {e}")))?;
        }
        Ok(())
    }

    /// Every limit in range, and the limits that depend on each other consistent.
    fn check_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if l.packet_bytes_max < PACKET_BYTES_MIN
            || l.packet_bytes_max as usize > crate::protocol::MAX_PACKET_SIZE_PROTOCOL
        {
            return Err(bad(
                "limits.packet_bytes_max",
                format!("must be between {PACKET_BYTES_MIN} and 268435460"),
            ));
        }
        for (key, v) in self.positive_settings() {
            if v == 0 {
                return Err(bad(key, "must be greater than 0"));
            }
        }
        if l.topic_bytes_max > u16::MAX as u32 {
            return Err(bad("limits.topic_bytes_max", "must be at most 65535"));
        }
        if l.client_id_bytes_max > u16::MAX as u32 {
            return Err(bad("limits.client_id_bytes_max", "must be at most 65535"));
        }
        if l.incomplete_packet_bytes_max < l.packet_bytes_max as u64 {
            return Err(bad(
                "limits.incomplete_packet_bytes_max",
                "must be at least limits.packet_bytes_max (one packet must fit)",
            ));
        }
        if (l.outbound_buffer_bytes_max) < l.packet_bytes_max {
            return Err(bad(
                "limits.outbound_buffer_bytes_max",
                "must be at least limits.packet_bytes_max (one packet must fit)",
            ));
        }
        if l.retained_deletions_bytes_max < l.topic_bytes_max as u64 + 96 {
            return Err(bad(
                "limits.retained_deletions_bytes_max",
                "must be at least limits.topic_bytes_max + 96 (one deletion must fit)",
            ));
        }
        Ok(())
    }

    /// The settings that must be greater than 0, by key, in the order they are checked.
    fn positive_settings(&self) -> [(&'static str, u64); 24] {
        let l = &self.limits;
        [
            ("limits.connections_max", l.connections_max as u64),
            ("limits.connect_timeout_s", l.connect_timeout_s as u64),
            ("limits.keep_alive_max_s", l.keep_alive_max_s as u64),
            ("limits.receive_maximum", l.receive_maximum as u64),
            ("limits.inflight_max", l.inflight_max as u64),
            ("limits.topic_bytes_max", l.topic_bytes_max as u64),
            ("limits.topic_levels_max", l.topic_levels_max as u64),
            ("limits.client_id_bytes_max", l.client_id_bytes_max as u64),
            (
                "limits.subscriptions_per_session_max",
                l.subscriptions_per_session_max as u64,
            ),
            (
                "limits.outbound_buffer_bytes_max",
                l.outbound_buffer_bytes_max as u64,
            ),
            (
                "limits.write_stall_timeout_s",
                l.write_stall_timeout_s as u64,
            ),
            ("limits.queue_messages_max", l.queue_messages_max as u64),
            ("limits.packet_timeout_s", l.packet_timeout_s as u64),
            (
                "limits.incomplete_packet_bytes_max",
                l.incomplete_packet_bytes_max,
            ),
            ("limits.queue_bytes_max", l.queue_bytes_max),
            (
                "limits.retained_deletions_keep_s",
                l.retained_deletions_keep_s as u64,
            ),
            (
                "limits.retained_deletions_bytes_max",
                l.retained_deletions_bytes_max,
            ),
            ("shards.preempt_timer_ms", self.shards.preempt_timer_ms),
            (
                "storage.batched_interval_ms",
                self.storage.batched_interval_ms as u64,
            ),
            (
                "storage.write_batch_bytes_max",
                self.storage.write_batch_bytes_max,
            ),
            (
                "storage.max_cached_files",
                self.storage.max_cached_files as u64,
            ),
            ("storage.queued_bytes_max", self.storage.queued_bytes_max),
            (
                "auth.verifications_inflight_max",
                self.auth.verifications_inflight_max as u64,
            ),
            (
                "admin.concurrent_requests_max",
                self.admin.concurrent_requests_max as u64,
            ),
        ]
    }

    /// Two listeners (or a listener and the admin endpoint) on one port: the second could
    /// not bind, or (with SO_REUSEPORT) would share the port with the first.
    fn check_addresses(&self) -> Result<(), ConfigError> {
        let mut bound: Vec<(SocketAddr, String)> = Vec::new();
        let named = self
            .listen
            .iter()
            .map(|a| (*a, "listen".to_string()))
            .chain(
                self.listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (l.address, format!("listeners[{i}].address"))),
            )
            .chain(
                self.admin
                    .enabled
                    .then(|| (self.admin.listen, "admin.listen".to_string())),
            )
            .chain(
                self.cluster
                    .listen
                    .map(|a| (a, "cluster.listen".to_string())),
            );
        for (addr, key) in named {
            if addr.port() == 0 {
                continue;
            }
            let clash = bound.iter().find(|(a, _)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((other, other_key)) = clash {
                return Err(bad(
                    &key,
                    format!("{addr} takes the port of {other_key} ({other})"),
                ));
            }
            bound.push((addr, key));
        }
        Ok(())
    }

    /// The admin token's strength and the allowed host names' form.
    fn check_admin(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.admin.token {
            if t.chars().count() < ADMIN_TOKEN_MIN_CHARS || t.chars().any(|c| c.is_whitespace()) {
                return Err(bad(
                    "admin.token",
                    format!("must be at least {ADMIN_TOKEN_MIN_CHARS} characters, without spaces"),
                ));
            }
        }
        for h in &self.admin.allowed_hosts {
            if h.is_empty() || h.contains(|c: char| c.is_whitespace() || c == '/' || c == ':') {
                return Err(bad(
                    "admin.allowed_hosts",
                    format!("{h:?} is not a host name (no port, no scheme)"),
                ));
            }
        }
        Ok(())
    }
}

/// The longest node id.
pub const NODE_ID_BYTES_MAX: usize = 64;

/// Checks a node id: 1-64 of `A-Z a-z 0-9 . _ -` (it is part of etcd keys and topic names).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > NODE_ID_BYTES_MAX {
        return Err(format!(
            "{id:?} must be 1 to {NODE_ID_BYTES_MAX} characters"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{id:?} may not contain {c:?} (only A-Z a-z 0-9 . _ -)"
        ));
    }
    Ok(())
}

impl ClusterConfig {
    /// All or nothing: a node needs an id, a node-to-node address and etcd; each in form.
    fn validate(&self) -> Result<(), ConfigError> {
        let Some(node) = &self.node else {
            if self.listen.is_some()
                || self.advertise.is_some()
                || !self.etcd.is_empty()
                || !self.jetstream.is_empty()
            {
                return Err(bad(
                    "cluster.node",
                    "is required when cluster.listen, cluster.advertise, cluster.etcd or cluster.jetstream is set",
                ));
            }
            return Ok(());
        };
        check_node_id(node).map_err(|r| bad("cluster.node", r))?;
        let Some(listen) = self.listen else {
            return Err(bad("cluster.listen", "is required for a cluster node"));
        };
        if let Some(a) = self.advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(bad(
                    "cluster.advertise",
                    format!("{a} is not an address another node can dial"),
                ));
            }
        } else if listen.ip().is_unspecified() {
            return Err(bad(
                "cluster.advertise",
                format!("is required when cluster.listen is a wildcard ({listen})"),
            ));
        }
        if self.etcd.is_empty() {
            return Err(bad("cluster.etcd", "at least one etcd URL is required"));
        }
        for u in &self.etcd {
            check_etcd_url(u).map_err(|r| bad("cluster.etcd", r))?;
        }
        if !self.prefix.starts_with('/')
            || self.prefix.len() < 2
            || self.prefix.ends_with('/')
            || self.prefix.len() > 128
            || self
                .prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad(
                "cluster.prefix",
                format!("{:?} must start with / and not end with one (at most 128 characters, no spaces)", self.prefix),
            ));
        }
        if !(3..=60).contains(&self.lease_ttl_s) {
            return Err(bad("cluster.lease_ttl_s", "must be between 3 and 60"));
        }
        if !(1..=60).contains(&self.etcd_timeout_s) {
            return Err(bad("cluster.etcd_timeout_s", "must be between 1 and 60"));
        }
        if !(100..=600_000).contains(&self.forward_timeout_ms) {
            return Err(bad(
                "cluster.forward_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        for (key, v) in [
            (
                "cluster.forward_inflight_max",
                self.forward_inflight_max as u64,
            ),
            ("cluster.forward_queue_max", self.forward_queue_max as u64),
            ("cluster.link_buffer_bytes_max", self.link_buffer_bytes_max),
            ("cluster.move_window_bytes", self.move_window_bytes),
            ("cluster.moves_in_max", self.moves_in_max as u64),
            (
                "cluster.missed_releases_max",
                self.missed_releases_max as u64,
            ),
        ] {
            if v == 0 {
                return Err(bad(key, "must be greater than 0"));
            }
        }
        if !(1..=3600).contains(&self.move_timeout_s) {
            return Err(bad("cluster.move_timeout_s", "must be between 1 and 3600"));
        }
        if self.hand_over_timeout_s > 3600 {
            return Err(bad(
                "cluster.hand_over_timeout_s",
                "must be at most 3600 (0: stop without handing over)",
            ));
        }
        for u in &self.jetstream {
            check_nats_url(u).map_err(|e| bad("cluster.jetstream", e))?;
        }
        self.validate_jetstream_access()?;
        if !(1..=5).contains(&self.jetstream_replicas) {
            return Err(bad("cluster.jetstream_replicas", "must be between 1 and 5"));
        }
        if !(100..=600_000).contains(&self.replication_timeout_ms) {
            return Err(bad(
                "cluster.replication_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if self.snapshot_log_bytes < 1 << 20 {
            return Err(bad(
                "cluster.snapshot_log_bytes",
                "must be at least 1048576",
            ));
        }
        if self.rebuild_bytes_max < 1 << 20 {
            return Err(bad("cluster.rebuild_bytes_max", "must be at least 1048576"));
        }
        if !(1 << 20..=1 << 40).contains(&self.replication_pending_bytes_max) {
            return Err(bad(
                "cluster.replication_pending_bytes_max",
                "must be between 1048576 and 1099511627776",
            ));
        }
        if self.failover_after_s != 0 && self.failover_after_s < self.lease_ttl_s {
            return Err(bad(
                "cluster.failover_after_s",
                "must be 0 (off) or at least cluster.lease_ttl_s",
            ));
        }
        Ok(())
    }
}

/// A NATS URL: `nats://HOST:PORT` (TLS to NATS is not built in yet).
/// `nats://HOST:PORT`, or `tls://HOST:PORT` (TLS required).
fn check_nats_url(u: &str) -> Result<(), String> {
    if u.starts_with("tls://") {
        return check_url(u, "tls://");
    }
    check_url(u, "nats://").map_err(|e| format!("{e} (or tls://HOST:PORT)"))
}

impl ClusterConfig {
    /// TLS and credentials for the JetStream servers: each only with `jetstream`, in pairs
    /// where they come in pairs, every file a readable PEM of the right kind.
    fn validate_jetstream_access(&self) -> Result<(), ConfigError> {
        let set = [
            ("cluster.jetstream_tls", self.jetstream_tls),
            (
                "cluster.jetstream_ca_file",
                self.jetstream_ca_file.is_some(),
            ),
            (
                "cluster.jetstream_cert_file",
                self.jetstream_cert_file.is_some(),
            ),
            (
                "cluster.jetstream_key_file",
                self.jetstream_key_file.is_some(),
            ),
            ("cluster.jetstream_user", self.jetstream_user.is_some()),
            (
                "cluster.jetstream_password",
                self.jetstream_password.is_some(),
            ),
            (
                "cluster.jetstream_nkey_file",
                self.jetstream_nkey_file.is_some(),
            ),
            (
                "cluster.jetstream_creds_file",
                self.jetstream_creds_file.is_some(),
            ),
        ];
        if self.jetstream.is_empty() {
            if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                return Err(bad(key, "is set but cluster.jetstream is empty"));
            }
            return Ok(());
        }
        // Both of a pair or neither: one line naming the one missing.
        let pair = |a: (&str, bool), b: (&str, bool)| match (a.1, b.1) {
            (true, false) => Err(bad(b.0, format!("is required with {}", a.0))),
            (false, true) => Err(bad(a.0, format!("is required with {}", b.0))),
            _ => Ok(()),
        };
        pair(
            (
                "cluster.jetstream_cert_file",
                self.jetstream_cert_file.is_some(),
            ),
            (
                "cluster.jetstream_key_file",
                self.jetstream_key_file.is_some(),
            ),
        )?;
        pair(
            ("cluster.jetstream_user", self.jetstream_user.is_some()),
            (
                "cluster.jetstream_password",
                self.jetstream_password.is_some(),
            ),
        )?;
        if let Some(path) = &self.jetstream_nkey_file {
            if self.jetstream_user.is_some() {
                return Err(bad(
                    "cluster.jetstream_nkey_file",
                    "and cluster.jetstream_user exclude each other (NATS takes one way to log in)",
                ));
            }
            crate::config::nkey_seed(path).map_err(|r| bad("cluster.jetstream_nkey_file", r))?;
        }
        if let Some(path) = &self.jetstream_creds_file {
            for (other, set) in [
                ("cluster.jetstream_user", self.jetstream_user.is_some()),
                (
                    "cluster.jetstream_nkey_file",
                    self.jetstream_nkey_file.is_some(),
                ),
            ] {
                if set {
                    return Err(bad(
                        "cluster.jetstream_creds_file",
                        format!("and {other} exclude each other (NATS takes one way to log in)"),
                    ));
                }
            }
            crate::config::nats_creds(path).map_err(|r| bad("cluster.jetstream_creds_file", r))?;
        }
        for (key, value) in [
            ("cluster.jetstream_user", &self.jetstream_user),
            ("cluster.jetstream_password", &self.jetstream_password),
        ] {
            if let Some(v) = value {
                if v.is_empty() || v.len() > 1024 || v.chars().any(char::is_control) {
                    return Err(bad(
                        key,
                        "must be 1-1024 characters, none a control character",
                    ));
                }
            }
        }
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |key: &str, path: &std::path::Path| -> Result<(), ConfigError> {
            let found = CertificateDer::pem_file_iter(path)
                .map_err(|e| pem_problem(key, path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_problem(key, path, e))?;
            if found.is_empty() {
                return Err(bad(
                    key,
                    format!("{}: no PEM certificate in it", path.display()),
                ));
            }
            Ok(())
        };
        if let Some(p) = &self.jetstream_ca_file {
            certs("cluster.jetstream_ca_file", p)?;
        }
        if let Some(p) = &self.jetstream_cert_file {
            certs("cluster.jetstream_cert_file", p)?;
        }
        if let Some(p) = &self.jetstream_key_file {
            PrivateKeyDer::from_pem_file(p)
                .map_err(|e| pem_problem("cluster.jetstream_key_file", p, e))?;
        }
        Ok(())
    }
}

fn pem_problem(key: &str, path: &std::path::Path, e: rustls_pki_types::pem::Error) -> ConfigError {
    bad(key, format!("{}: {}", path.display(), pem_reason(e)))
}

/// What is wrong with a PEM file, in words (the TLS listeners say it the same way).
pub(crate) fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the expected kind in it".into()
        }
        other => format!("not valid PEM: {other:?}"),
    }
}

/// An etcd client URL: `http://HOST:PORT` (TLS to etcd is not built in yet).
fn check_etcd_url(u: &str) -> Result<(), String> {
    check_url(u, "http://")
}

/// `SCHEME://HOST:PORT` (for `http://`, a trailing `/` is taken too).
fn check_url(u: &str, scheme: &str) -> Result<(), String> {
    let Some(rest) = u.strip_prefix(scheme) else {
        return Err(format!("{u:?} must be {scheme}HOST:PORT"));
    };
    let rest = match scheme {
        "http://" => rest.strip_suffix('/').unwrap_or(rest),
        _ => rest,
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{u:?} has no port"));
    };
    if host.is_empty() || host.contains(|c: char| c == '/' || c == '@' || c.is_whitespace()) {
        return Err(format!("{u:?} has no usable host"));
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{u:?} has no usable port"));
    }
    Ok(())
}
