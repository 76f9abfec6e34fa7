//! The broker's configuration: every limit, with its default and unit, in one place.
//!
//! Read from TOML (`--config FILE`, see `config/shardmq.toml` for the annotated default);
//! command-line flags override the file. Unknown keys and bad values are refused with a
//! one-line message naming the key. [`Config::validate`] checks the relations between limits.

use serde::{Deserialize, Serialize};

pub use crate::session::state::QueuePolicy;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Plain MQTT-over-TCP listeners. Like Mosquitto 2, the default is reachable only from
    /// this machine.
    pub listen: Vec<SocketAddr>,
    /// Where each shard keeps its database (`<data_dir>/shard-<n>/`).
    pub data_dir: PathBuf,
    /// Further listeners of any transport (TLS, WebSocket, ...), each with its own limits.
    pub listeners: Vec<ListenerConfig>,
    pub shards: ShardsConfig,
    pub limits: Limits,
    pub sessions: SessionsConfig,
    pub storage: StorageConfig,
    pub access: AccessConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub sys: SysConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            data_dir: PathBuf::from("./data"),
            listeners: Vec::new(),
            shards: ShardsConfig::default(),
            limits: Limits::default(),
            sessions: SessionsConfig::default(),
            storage: StorageConfig::default(),
            access: AccessConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            sys: SysConfig::default(),
        }
    }
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT over TCP.
    #[default]
    Tcp,
    /// MQTT over TLS (1.2 and 1.3).
    Tls,
    /// MQTT over WebSocket (subprotocol `mqtt`, binary frames).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    /// Whether the transport runs over TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether the transport is a WebSocket.
    pub fn is_ws(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

/// One `[[listeners]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// ADDR:PORT to listen on.
    pub address: SocketAddr,
    #[serde(default)]
    pub transport: Transport,
    /// PEM certificate chain (server certificate first); `tls` and `wss` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against. Without it no
    /// client certificate is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Refuse a TLS handshake without a valid client certificate (else one is optional,
    /// but verified when given).
    #[serde(default)]
    pub require_client_cert: bool,
    /// A client certificate's subject Common Name (else its whole subject) becomes the
    /// client's username.
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// HTTP path of the WebSocket endpoint (`ws` and `wss`).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// Connections open at once on this listener (over all shards). Absent: only
    /// `limits.connections_max` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<u32>,
    /// New connections per second on this listener (over all shards, bursts of up to one
    /// second's worth); beyond it a new connection is closed at accept. Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_rate_per_s: Option<u32>,
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

impl ListenerConfig {
    /// A listener of `transport` on `address` with every other key at its default.
    pub fn new(address: SocketAddr, transport: Transport) -> ListenerConfig {
        ListenerConfig {
            address,
            transport,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: false,
            use_identity_as_username: false,
            ws_path: default_ws_path(),
            connections_max: None,
            connect_rate_per_s: None,
        }
    }

    /// Checks the keys against each other (files are read when the broker starts).
    fn validate(&self, i: usize) -> Result<(), ConfigError> {
        let key = |k: &str| format!("listeners[{i}].{k}");
        let t = self.transport;
        if t.is_tls() {
            if self.cert_file.is_none() {
                return Err(bad(
                    &key("cert_file"),
                    format!("needed by a {} listener", t.name()),
                ));
            }
            if self.key_file.is_none() {
                return Err(bad(
                    &key("key_file"),
                    format!("needed by a {} listener", t.name()),
                ));
            }
        } else {
            for (k, set) in [
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                ("client_ca_file", self.client_ca_file.is_some()),
                ("require_client_cert", self.require_client_cert),
                ("use_identity_as_username", self.use_identity_as_username),
            ] {
                if set {
                    return Err(bad(
                        &key(k),
                        format!("only for tls and wss listeners, not {}", t.name()),
                    ));
                }
            }
        }
        if self.client_ca_file.is_none() {
            if self.require_client_cert {
                return Err(bad(&key("require_client_cert"), "needs client_ca_file"));
            }
            if self.use_identity_as_username {
                return Err(bad(
                    &key("use_identity_as_username"),
                    "needs client_ca_file",
                ));
            }
        }
        if !self.ws_path.starts_with('/') || self.ws_path.contains(char::is_whitespace) {
            return Err(bad(
                &key("ws_path"),
                "must start with '/' and have no spaces",
            ));
        }
        if !t.is_ws() && self.ws_path != default_ws_path() {
            return Err(bad(&key("ws_path"), "only for ws and wss listeners"));
        }
        if self.connections_max == Some(0) {
            return Err(bad(&key("connections_max"), "must be greater than 0"));
        }
        if self.connect_rate_per_s == Some(0) {
            return Err(bad(&key("connect_rate_per_s"), "must be greater than 0"));
        }
        Ok(())
    }
}

/// How many shards run and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardsConfig {
    /// Cores to pin one shard each to, as a list like "0-3,6". Absent: the first `count`
    /// online cores.
    pub cores: Option<String>,
    /// Number of shards. Absent: one per online core (or one per listed core).
    pub count: Option<usize>,
    /// Pin each shard's thread to its core.
    pub pin: bool,
    /// Longest a task runs before the executor checks timers and sockets (glommio's
    /// default of 100 ms would stall every connection of a busy shard).
    pub preempt_timer_ms: u64,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        ShardsConfig {
            cores: None,
            count: None,
            pin: true,
            preempt_timer_ms: 2,
        }
    }
}

/// Limits on everything a client can make the broker hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest packet accepted or sent, fixed header included (MQTT 5 Maximum Packet Size).
    pub packet_bytes_max: u32,
    /// Connections open at once, over all listeners and shards (each shard gets its share;
    /// a relayed TLS or WebSocket connection counts on the accepting and the owning shard).
    pub connections_max: u32,
    /// How long a new socket may take to send CONNECT.
    pub connect_timeout_s: u32,
    /// Highest keep alive granted; a client asking for more (or for 0) gets this as
    /// Server Keep Alive (MQTT 5).
    pub keep_alive_max_s: u16,
    /// Incoming QoS 1/2 publishes a client may have unacknowledged (our Receive Maximum).
    pub receive_maximum: u16,
    /// Outgoing QoS 1/2 messages in flight per session (also capped by the client's
    /// Receive Maximum).
    pub inflight_max: u16,
    /// Topic aliases a client may use towards us (our Topic Alias Maximum), and the most we
    /// assign towards a client.
    pub topic_alias_max: u16,
    /// Longest topic name or filter.
    pub topic_bytes_max: u32,
    /// Most levels in a topic name or filter.
    pub topic_levels_max: u32,
    /// Longest client identifier.
    pub client_id_bytes_max: u32,
    /// Subscriptions one session may hold.
    pub subscriptions_per_session_max: u32,
    /// Encoded bytes waiting to be written to one connection; QoS 0 beyond it is dropped,
    /// QoS 1/2 wait in the session queue.
    pub outbound_buffer_bytes_max: u32,
    /// A connection whose writes make no progress for this long (its client stopped reading)
    /// is closed; its session keeps what was not delivered.
    pub write_stall_timeout_s: u32,
    /// Packets one connection may send per second, averaged over a second; beyond it the
    /// broker reads that connection more slowly. 0: no limit.
    pub inbound_messages_per_s: u32,
    /// Bytes one connection may send per second, likewise. 0: no limit.
    pub inbound_bytes_per_s: u64,
    /// A packet that has started to arrive must be complete within this many seconds, or
    /// the connection is closed (MQTT 5: DISCONNECT 0x8D), whatever its keep alive.
    pub packet_timeout_s: u32,
    /// Bytes held by all connections together in packets that have started and are not
    /// complete (split evenly between the shards); beyond it the largest holders are closed
    /// first (MQTT 5: DISCONNECT 0x97).
    pub incomplete_packet_bytes_max: u64,
    /// Messages waiting for one session (offline, or beyond its inflight window). A
    /// persistent session's queue is on disk (at most 512 messages of it in memory while
    /// online, none while offline), so this bounds disk, not memory; the disk as a whole
    /// is guarded by `storage.queued_bytes_max`.
    pub queue_messages_max: u32,
    /// Bytes (payload plus topic) waiting for one session.
    pub queue_bytes_max: u64,
    /// Retained messages held by the broker.
    pub retained_messages_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            packet_bytes_max: 1024 * 1024,
            connections_max: 100_000,
            connect_timeout_s: 10,
            keep_alive_max_s: 65_535,
            receive_maximum: 1024,
            inflight_max: 1024,
            topic_alias_max: 64,
            topic_bytes_max: 4096,
            topic_levels_max: 64,
            client_id_bytes_max: 256,
            subscriptions_per_session_max: 1024,
            outbound_buffer_bytes_max: 4 * 1024 * 1024,
            write_stall_timeout_s: 30,
            inbound_messages_per_s: 0,
            inbound_bytes_per_s: 0,
            packet_timeout_s: 60,
            incomplete_packet_bytes_max: 256 * 1024 * 1024,
            queue_messages_max: 1_000_000,
            queue_bytes_max: 1024 * 1024 * 1024,
            retained_messages_max: 1_000_000,
        }
    }
}

/// Session persistence rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Session Expiry given to an MQTT 5 client that connects with Clean Start = false and
    /// no Session Expiry Interval (the specification says 0; common tools connect that way
    /// expecting their messages kept). 0 restores the strict reading.
    pub session_expiry_default_s: u32,
    /// Cap on every session's expiry, MQTT 3.x persistent sessions included.
    pub session_expiry_max_s: u32,
    /// Queue QoS 0 messages for offline persistent sessions too.
    pub queue_qos0_offline: bool,
    /// What a full session queue does: "reject-newest" or "drop-oldest".
    pub queue_policy: QueuePolicy,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            session_expiry_default_s: 7200,
            session_expiry_max_s: 7 * 24 * 3600,
            queue_qos0_offline: true,
            queue_policy: QueuePolicy::RejectNewest,
        }
    }
}

/// How sessions, queues and retained messages are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Acknowledge a QoS 1/2 message for a persistent session only once it is on disk
    /// (group commit: one fsync per batch).
    #[default]
    Durable,
    /// Write to disk and fsync every `storage.batched_interval_ms`; acknowledge at once.
    Batched,
    /// Keep everything in memory; nothing survives a restart.
    Memory,
}

/// The shortest `admin.token` accepted.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 16;

/// Storage of persistent sessions (one database per shard under `data_dir`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub durability: Durability,
    /// fsync interval in `batched` mode.
    pub batched_interval_ms: u32,
    /// Block cache of each shard's database.
    pub cache_bytes: u64,
    /// Files each shard's database keeps open (mind `ulimit -n` times the shard count).
    pub max_cached_files: u32,
    /// Bytes (payload plus topic) queued for persistent sessions on all shards together.
    /// Beyond it a persistent session refuses what it would queue, as on a full disk: the
    /// publisher is never told the message was stored (MQTT 5: 0x97; 3.x: disconnected,
    /// so that it resends).
    pub queued_bytes_max: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            durability: Durability::Durable,
            batched_interval_ms: 100,
            cache_bytes: 32 * 1024 * 1024,
            max_cached_files: 256,
            queued_bytes_max: 16 * 1024 * 1024 * 1024,
        }
    }
}

/// Filters closed to everyone (see also `[auth] acl_file`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Topic filters that no client may subscribe to (SUBACK 0x80 / 0x87); matched exactly.
    pub subscribe_deny: Vec<String>,
}

/// Who may connect and what they may touch (see `src/auth`). The files are read at start
/// (a bad one stops the broker, naming file and line) and again on SIGHUP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether clients without a user name may connect. Absent: yes, unless a
    /// `password_file` is set (configuring passwords means requiring them).
    pub allow_anonymous: Option<bool>,
    /// Users and password hashes, in Mosquitto's format (`mosquitto_passwd` or
    /// `shardmq passwd` make them).
    pub password_file: Option<PathBuf>,
    /// Topic access rules, in Mosquitto's `acl_file` format. Absent: every topic is open.
    pub acl_file: Option<PathBuf>,
    /// Slow password verifications (argon2, many-iteration PBKDF2) waiting or running on
    /// the shard's password thread at once; a login beyond it is refused as busy (CONNACK
    /// 0x89 / 0x03).
    pub verifications_inflight_max: u32,
    /// Logins remembered per shard as verified (user, digest of the password), so that a
    /// reconnect does not pay for a slow hash again. 0 turns the memory off.
    pub verified_cache_max: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            verifications_inflight_max: 8,
            verified_cache_max: 1024,
        }
    }
}

impl AuthConfig {
    /// `allow_anonymous` with its default applied.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous.unwrap_or(self.password_file.is_none())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A log level such as "info", or a filter such as "info,shardmq=debug". RUST_LOG
    /// overrides it, and `--log-level` overrides both.
    pub level: String,
    /// Info lines per second and shard about clients connecting and disconnecting (client
    /// id, address, user, protocol, reason); beyond it they are counted and summed up in
    /// one line a second. 0 turns them off (busy brokers).
    pub connection_lines_per_s: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            connection_lines_per_s: 100,
        }
    }
}

/// The admin HTTP endpoint (JSON API, Prometheus metrics, dashboard), on a thread of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Reading needs no credentials: keep it on loopback or a trusted network.
    pub listen: SocketAddr,
    /// API requests that gather from the shards at once (each asks every shard, so this
    /// bounds the load the endpoint can put on them); more wait their turn.
    pub concurrent_requests_max: u32,
    /// Host names (besides `localhost` and IP addresses, always accepted) that requests
    /// may name in their Host header. Any other name is refused (403), so that a web page
    /// that rebinds its own name to this address cannot use the endpoint through a browser.
    pub allowed_hosts: Vec<String>,
    /// The bearer token that changing requests (`DELETE /api/sessions/{id}`) must carry
    /// (`Authorization: Bearer <token>`), at least 16 characters. Absent: they are off (403).
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            concurrent_requests_max: 16,
            allowed_hosts: Vec::new(),
            token: None,
        }
    }
}

/// The `$SYS/broker/...` topics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysConfig {
    /// Seconds between two publications; 0 turns them off.
    pub interval_s: u32,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_s: 10 }
    }
}

/// A configuration that cannot be used, naming the key and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The smallest packet limit that still lets every control packet through with room for a
/// short PUBLISH.
const PACKET_BYTES_MIN: u32 = 64;

impl Config {
    /// Parses TOML text; unknown keys and wrong types are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            if looks_like_mosquitto_conf(text) {
                return ConfigError {
                    key: "config".into(),
                    reason: "this is a Mosquitto configuration (mosquitto.conf), not shardmq's TOML; `shardmq convert-mosquitto-conf FILE` prints the equivalent".into(),
                };
            }
            let mut reason = e.message().trim().to_string();
            let key = e
                .span()
                .and_then(|s| key_at(text, s))
                .unwrap_or_else(|| "config".into());
            let unknown = reason
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
                .map(str::to_owned);
            if let Some(unknown) = unknown {
                // serde lists the keys of the section; the nearest key of any section is
                // what a typo or a misplaced key most likely meant.
                reason = format!("unknown key `{unknown}`");
                if let Some(near) = nearest_key(&unknown) {
                    reason.push_str(&format!(" (did you mean `{near}`?)"));
                }
            }
            if let Some(span) = e.span() {
                let (line, column) = line_column(text, span.start);
                reason.push_str(&format!(" (line {line}, column {column})"));
            }
            ConfigError { key, reason }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks each value and how the limits relate.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if self.listen.is_empty() && self.listeners.is_empty() {
            return Err(bad("listen", "at least one listener is needed"));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            l.validate(i)?;
        }
        if l.packet_bytes_max < PACKET_BYTES_MIN
            || l.packet_bytes_max as usize > crate::protocol::MAX_PACKET_SIZE_PROTOCOL
        {
            return Err(bad(
                "limits.packet_bytes_max",
                format!("must be between {PACKET_BYTES_MIN} and 268435460"),
            ));
        }
        for (key, v) in [
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
            ("shards.preempt_timer_ms", self.shards.preempt_timer_ms),
            (
                "storage.batched_interval_ms",
                self.storage.batched_interval_ms as u64,
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
        ] {
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
        // Two listeners (or a listener and the admin endpoint) on one port: the second
        // could not bind, or (with SO_REUSEPORT) would share the port with the first.
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
        for f in &self.access.subscribe_deny {
            crate::protocol::TopicFilter::new(f)
                .map_err(|e| bad("access.subscribe_deny", format!("{f:?}: {e}")))?;
        }
        Ok(())
    }
}

/// The key an error span points into: the span itself when it is a key (an unknown
/// field), or, when it is a value, the `table.key` assigned on that line (a wrong type
/// names the key, not the value). Falls back to the spanned text.
/// The 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Every key of the configuration, as `section.key` (the defaults, written out as TOML).
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if matches!(v, toml::Value::Table(_)) {
                    walk(&path, v, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(Config::default()) {
        walk("", &v, &mut out);
    }
    // Keys that are absent from the defaults (optional ones).
    for k in [
        "shards.count",
        "shards.cores",
        "auth.allow_anonymous",
        "auth.password_file",
        "auth.acl_file",
        "admin.token",
        "listeners.address",
        "listeners.transport",
        "listeners.cert_file",
        "listeners.key_file",
        "listeners.client_ca_file",
        "listeners.require_client_cert",
        "listeners.use_identity_as_username",
        "listeners.connections_max",
        "listeners.connect_rate_per_s",
        "listeners.ws_path",
    ] {
        if !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
    }
    out
}

/// The known key nearest to `unknown` (a typo, or a key in the wrong section), if any is
/// near enough.
fn nearest_key(unknown: &str) -> Option<String> {
    known_keys()
        .into_iter()
        .map(|k| {
            let leaf = k.rsplit('.').next().unwrap_or(&k).to_string();
            (strsim::jaro_winkler(unknown, &leaf), k)
        })
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Whether a file that is not TOML reads as Mosquitto's `key value` configuration.
fn looks_like_mosquitto_conf(text: &str) -> bool {
    const MOSQUITTO_KEYS: [&str; 14] = [
        "listener",
        "port",
        "persistence",
        "persistence_location",
        "allow_anonymous",
        "password_file",
        "acl_file",
        "log_dest",
        "log_type",
        "max_queued_messages",
        "max_inflight_messages",
        "include_dir",
        "protocol",
        "per_listener_settings",
    ];
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    !lines.is_empty()
        && lines
            .iter()
            .all(|l| !l.contains('=') && !l.starts_with('['))
        && lines.iter().any(|l| {
            let word = l.split_whitespace().next().unwrap_or("");
            MOSQUITTO_KEYS.contains(&word)
        })
}

fn key_at(text: &str, span: std::ops::Range<usize>) -> Option<String> {
    let spanned = text.get(span.clone())?.trim();
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let table = text[..line_start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .map(|t| t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    });
    let Some((key, _)) = text[line_start..span.start].split_once('=') else {
        // The span is the key itself (an unknown key).
        return Some(match table {
            Some(t) => format!("{t}.{spanned}"),
            None => spanned.to_string(),
        });
    };
    let key = key.trim();
    Some(match table {
        Some(t) if !key.is_empty() => format!("{t}.{key}"),
        _ if !key.is_empty() => key.to_string(),
        _ => spanned.to_string(),
    })
}

/// The most shards one broker runs (the routing index keeps a bitmap of this many bits).
pub const MAX_SHARDS: usize = 256;

/// The log levels, least verbose first.
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter: comma-separated directives, each a level (`info`) or a target and
/// a level (`shardmq=debug`). A word that is not a level is refused (the tracing filter
/// syntax would take it for a target and log everything of it at `trace`).
pub fn check_log_filter(s: &str) -> Result<(), String> {
    let valid = |l: &str| LOG_LEVELS.iter().any(|v| v.eq_ignore_ascii_case(l.trim()));
    let mut any = false;
    for d in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        // Span filters (`target[span{field=value}]=level`) are left to the filter parser.
        let level = if d.contains('[') {
            continue;
        } else if let Some((_, level)) = d.rsplit_once('=') {
            level
        } else {
            d
        };
        if !valid(level) {
            return Err(format!(
                "{level:?} is not a log level (one of {}, or TARGET=LEVEL; comma-separated)",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    if !any {
        return Err("empty log filter (use \"off\" for no logs)".into());
    }
    Ok(())
}

/// Parses a core list such as "0-3,6" into core ids, in order, without duplicates.
pub fn parse_core_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty item in core list {s:?}"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: usize = lo
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        let hi: usize = hi
            .parse()
            .map_err(|_| format!("{part:?} is not a core number or range"))?;
        if lo > hi {
            return Err(format!("range {part:?} runs backwards"));
        }
        for c in lo..=hi {
            if cores.contains(&c) {
                return Err(format!("core {c} is listed twice"));
            }
            cores.push(c);
        }
    }
    if cores.len() > MAX_SHARDS {
        return Err(format!("more than {MAX_SHARDS} cores listed"));
    }
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filters() {
        for ok in [
            "info",
            "WARN",
            "off",
            "info,shardmq=debug",
            " debug , fjall=warn ",
        ] {
            assert_eq!(check_log_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["verbose", "shardmq", "info,shardmq=loud", "", " , "] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
        let mut c = Config::default();
        c.log.level = "chatty".into();
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "log.level");
        assert!(e.reason.contains("\"chatty\""), "{e}");
    }

    #[test]
    fn core_lists() {
        assert_eq!(parse_core_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_core_list("2").unwrap(), vec![2]);
        assert!(parse_core_list("3-1").is_err());
        assert!(parse_core_list("1,1").is_err());
        assert!(parse_core_list("a").is_err());
        assert!(parse_core_list("").is_err());
    }

    #[test]
    fn the_annotated_default_file_is_the_default() {
        let text = include_str!("../config/shardmq.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn listener_tables_are_read_and_checked() {
        let cfg = Config::from_toml(
            "[[listeners]]\naddress = \"127.0.0.1:8883\"\ntransport = \"tls\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nconnections_max = 5\n\n[[listeners]]\naddress = \"127.0.0.1:8083\"\ntransport = \"ws\"\n",
        )
        .unwrap();
        assert_eq!(cfg.listeners.len(), 2);
        assert_eq!(cfg.listeners[0].transport, Transport::Tls);
        assert_eq!(cfg.listeners[0].connections_max, Some(5));
        assert_eq!(cfg.listeners[1].ws_path, "/mqtt");
        // What check-config prints reads back the same.
        let text = toml::to_string_pretty(&cfg).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), cfg);

        for (toml, key) in [
            ("address = \"127.0.0.1:1\"\ntransport = \"tls\"\n", "listeners[0].cert_file"),
            ("address = \"127.0.0.1:1\"\ncert_file = \"c\"\n", "listeners[0].cert_file"),
            ("address = \"127.0.0.1:1\"\ntransport = \"tls\"\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_cert = true\n", "listeners[0].require_client_cert"),
            ("address = \"127.0.0.1:1\"\ntransport = \"ws\"\nws_path = \"mqtt\"\n", "listeners[0].ws_path"),
            ("address = \"127.0.0.1:1\"\nconnections_max = 0\n", "listeners[0].connections_max"),
            ("address = \"127.0.0.1:1\"\nconnect_rate_per_s = 0\n", "listeners[0].connect_rate_per_s"),
        ] {
            let e = Config::from_toml(&format!("[[listeners]]\n{toml}")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let e =
            Config::from_toml("[[listeners]]\naddress = \"127.0.0.1:1\"\ntransport = \"quic\"\n")
                .unwrap_err();
        assert_eq!(e.key, "listeners.transport", "{e}");
    }

    #[test]
    fn defaults_are_valid_and_unknown_keys_refused() {
        Config::default().validate().unwrap();
        let e = Config::from_toml("[limits]\nbogus = 1\n").unwrap_err();
        assert!(e.reason.contains("bogus"), "{e}");
        let e = Config::from_toml("[limits]\nqueue_messages_max = 0\n").unwrap_err();
        assert_eq!(e.key, "limits.queue_messages_max");
        let e = Config::from_toml("[limits]\nqueue_messages_max = \"many\"\n").unwrap_err();
        assert_eq!(e.key, "limits.queue_messages_max", "{e}");
        let e = Config::from_toml("log = 3\n").unwrap_err();
        assert_eq!(e.key, "log", "{e}");
    }
}
