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

mod parse;
mod validate;
pub(crate) use validate::pem_reason;
pub use validate::{check_node_id, NODE_ID_BYTES_MAX};

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
    pub cluster: ClusterConfig,
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
            cluster: ClusterConfig::default(),
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
    /// Retained messages held by the broker; also, per shard, the recent deletions kept to
    /// order late writes (the oldest forgotten first).
    pub retained_messages_max: u32,
    /// How long a retained message's deletion is remembered: a node that starts (back
    /// with an old disk, say) is told of the deletions its peers remember, and deletes its
    /// copies of those messages.
    pub retained_deletions_keep_s: u32,
    /// Bytes the remembered deletions may hold per shard (topic plus 96 each), the oldest
    /// forgotten first.
    pub retained_deletions_bytes_max: u64,
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
            retained_deletions_keep_s: 86_400,
            retained_deletions_bytes_max: 16 * 1024 * 1024,
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
    /// With replicated sessions (`cluster.jetstream`): acknowledge once the group commit's
    /// changes are in the replicated stream (a quorum of JetStream servers), and fsync the
    /// node's own store every `storage.batched_interval_ms` in the background. A node that
    /// did not stop in order brings its stores up to its stream before it serves.
    Replicated,
    /// Write to disk and fsync every `storage.batched_interval_ms`; acknowledge at once.
    Batched,
    /// Keep everything in memory; nothing survives a restart.
    Memory,
}

impl Durability {
    /// Whether acknowledgements for persistent sessions wait for the group commit (its
    /// fsync, or in `replicated` mode its append to the stream).
    pub fn acknowledges_committed(self) -> bool {
        matches!(self, Durability::Durable | Durability::Replicated)
    }
}

/// The NKey user seed in the file at `path` (its first non-empty line), or why it is not
/// one: a seed is 58 characters of base32 (`A-Z`, `2-7`) starting with `SU`. The seed is
/// a secret: it is never part of the reason.
pub fn nkey_seed(path: &std::path::Path) -> Result<String, String> {
    let text = read_secret_file(path)?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    let base32 = |c: char| c.is_ascii_uppercase() || ('2'..='7').contains(&c);
    if seed.len() == 58 && seed.starts_with("SU") && seed.chars().all(base32) {
        Ok(seed.to_string())
    } else {
        Err(format!(
            "{} does not hold an NKey user seed (58 characters, SU...)",
            path.display()
        ))
    }
}

/// Reads a NATS credentials file: its text if it holds a user JWT block and an NKey user
/// seed block (the connection parses them); the reason, which never holds the file's
/// contents, if not.
pub fn nats_creds(path: &std::path::Path) -> Result<String, String> {
    let text = read_secret_file(path)?;
    let not = || {
        format!(
            "{} is not a NATS credentials file (a user JWT and its NKey seed, as `nsc generate creds` writes it)",
            path.display()
        )
    };
    // The first non-empty line after a line that opens `what`'s block.
    let block = |what: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.starts_with("-----BEGIN") && l.contains(what))?;
        lines.find(|l| !l.is_empty())
    };
    let jwt = block("USER JWT").ok_or_else(not)?;
    let seed = block("NKEY SEED").ok_or_else(not)?;
    let b64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let jwt_ok = jwt.split('.').count() == 3
        && jwt
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(b64url));
    let base32 = |c: char| c.is_ascii_uppercase() || ('2'..='7').contains(&c);
    let seed_ok = seed.len() == 58 && seed.starts_with("SU") && seed.chars().all(base32);
    // And as the NATS client reads it (blocks in order, the seed's checksum); its own
    // reason is not repeated: it may quote the file.
    if jwt_ok && seed_ok && async_nats::ConnectOptions::with_credentials(&text).is_ok() {
        Ok(text)
    } else {
        Err(not())
    }
}

/// The most a credentials or seed file may hold.
const SECRET_FILE_BYTES_MAX: u64 = 64 << 10;

/// Reads a small secret file (a seed, a credentials file): at most
/// [`SECRET_FILE_BYTES_MAX`], UTF-8. The reason never holds the file's contents.
fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let cannot = |e: &dyn std::fmt::Display| format!("cannot read {}: {e}", path.display());
    let f = std::fs::File::open(path).map_err(|e| cannot(&e))?;
    if !f.metadata().map_err(|e| cannot(&e))?.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    f.take(SECRET_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot(&e))?;
    if bytes.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(format!(
            "{} holds more than {SECRET_FILE_BYTES_MAX} bytes",
            path.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// The shortest `admin.token` accepted.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 16;

/// Storage of persistent sessions (one database per shard under `data_dir`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub durability: Durability,
    /// fsync interval in `batched` mode, and of the background fsync in `replicated` mode.
    pub batched_interval_ms: u32,
    /// Bytes (keys and values) a shard collects in its open write batch before applying it
    /// to the store ahead of the next group commit.
    pub write_batch_bytes_max: u64,
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
            write_batch_bytes_max: 4 * 1024 * 1024,
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

/// Several shardmq nodes acting as one broker. Off unless `node` is set; then `listen` and
/// `etcd` are required too. Membership and ownership live in etcd (see `ARCHITECTURE.md`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's id: unique in the cluster and the same across restarts (1-64 of
    /// `A-Z a-z 0-9 . _ -`).
    pub node: Option<String>,
    /// The node-to-node address this node listens on.
    pub listen: Option<SocketAddr>,
    /// The node-to-node address the other nodes dial, where it differs from `listen`
    /// (a wildcard `listen`, NAT). Default: `listen`.
    pub advertise: Option<SocketAddr>,
    /// etcd client URLs (`http://HOST:PORT`), every member of the etcd cluster.
    pub etcd: Vec<String>,
    /// The etcd key prefix under which this cluster keeps its state; several clusters may
    /// share one etcd under different prefixes.
    pub prefix: String,
    /// Seconds of the node's etcd lease. A node that could not renew it for this long
    /// stops serving what it owns; the others see it down after this long. Renewed every
    /// third of it. 3-60.
    pub lease_ttl_s: u32,
    /// Seconds one etcd request may take (start-up waits at most this long per attempt).
    pub etcd_timeout_s: u32,
    /// Seconds a node may be silent (counted from its last lease renewal) before its
    /// sessions are reassigned to the survivors; 0 (the default) means never automatically
    /// (an operator decides).
    pub failover_after_s: u32,
    /// Milliseconds a forwarded QoS 1/2 message may wait for the other node's answer; then
    /// its publisher is told it was not stored (MQTT 5: 0x80; 3.x: the connection closes).
    pub forward_timeout_ms: u32,
    /// Forwarded QoS 1/2 messages waiting for answers, all nodes together; more are
    /// refused as not stored.
    pub forward_inflight_max: u32,
    /// Messages the shards may hand to the cluster thread before it takes them; past it
    /// QoS 0 messages for other nodes are dropped (counted) and QoS 1/2 refused.
    pub forward_queue_max: u32,
    /// Bytes queued for one node's link and not yet written; past it the link is reset
    /// (what it carried fails, and it starts over).
    pub link_buffer_bytes_max: u64,
    /// Seconds one move of sessions to another node may take (all its sessions together);
    /// then it is given up and the sessions stay.
    pub move_timeout_s: u32,
    /// Seconds a node stopping gracefully may spend handing its sessions to the others
    /// before it stops anyway (they then wait for its return or a fail-over).
    pub hand_over_timeout_s: u32,
    /// Bytes of sessions sent to another node and not yet answered; the next goes when an
    /// answer comes.
    pub move_window_bytes: u64,
    /// Sessions arriving from other nodes at once (their parts kept until the last);
    /// more are refused (the move fails and is tried again).
    pub moves_in_max: u32,
    /// QoS 2 key releases kept for one node that is away, sent when its link is back; past
    /// it the oldest are forgotten (counted).
    pub missed_releases_max: u32,
    /// NATS URLs (`nats://HOST:PORT`) of a JetStream cluster: with them, sessions are
    /// replicated (every change an acknowledgement depends on is in a replicated stream
    /// before it is sent) and a fail-over rebuilds a dead node's sessions from it.
    /// Requires `storage.durability = "durable"` or `"replicated"`.
    pub jetstream: Vec<String>,
    /// Replicas of each node's stream (1-5; 3 survives the loss of one NATS server).
    pub jetstream_replicas: u32,
    /// TLS to the JetStream servers, their certificates verified against the system's CA
    /// certificates (or `jetstream_ca_file`). Also on with `jetstream_ca_file`,
    /// `jetstream_cert_file` or a `tls://` URL. Off (the default): in the clear.
    pub jetstream_tls: bool,
    /// PEM CA certificates that the JetStream servers' certificates must chain to (TLS on).
    pub jetstream_ca_file: Option<PathBuf>,
    /// PEM client certificate chain and its private key, for servers that verify clients
    /// (both or neither; TLS on).
    pub jetstream_cert_file: Option<PathBuf>,
    pub jetstream_key_file: Option<PathBuf>,
    /// User name and password for the JetStream servers (both or neither).
    pub jetstream_user: Option<String>,
    pub jetstream_password: Option<String>,
    /// A file holding an NKey user seed (`SU...`, as `nk -gen user` writes it): the node
    /// logs in by signing the server's challenge with it (servers with `nkey:` users).
    /// Not with `jetstream_user` or `jetstream_creds_file`.
    pub jetstream_nkey_file: Option<PathBuf>,
    /// A NATS credentials file (a user JWT and its NKey seed, as `nsc generate creds`
    /// writes it), for servers in operator mode (decentralised JWT authentication): the
    /// node presents the JWT and signs the server's challenge with the seed. Not with
    /// `jetstream_user` or `jetstream_nkey_file`.
    pub jetstream_creds_file: Option<PathBuf>,
    /// Milliseconds one append to the stream may take (retried within it); then the
    /// acknowledgements waiting on it fail (MQTT 5: 0x80; 3.x: the connection closes).
    pub replication_timeout_ms: u32,
    /// Bytes appended to the stream since the last snapshot after which the next
    /// snapshot is written (then the log before it is trimmed).
    pub snapshot_log_bytes: u64,
    /// Bytes of session data a fail-over may hold while it rebuilds a dead node's
    /// sessions; past it the fail-over is refused (the sessions stay with their node).
    pub rebuild_bytes_max: u64,
    /// Bytes of changes a shard keeps for its stream (after failed appends, to send again;
    /// while an append is slow to come back); past it they are dropped and the stream is
    /// made whole by a snapshot before anything more is acknowledged.
    pub replication_pending_bytes_max: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: None,
            listen: None,
            advertise: None,
            etcd: Vec::new(),
            prefix: "/shardmq".into(),
            lease_ttl_s: 6,
            etcd_timeout_s: 5,
            failover_after_s: 0,
            forward_timeout_ms: 5000,
            forward_inflight_max: 100_000,
            forward_queue_max: 65_536,
            link_buffer_bytes_max: 64 << 20,
            move_timeout_s: 60,
            hand_over_timeout_s: 70,
            move_window_bytes: 4 << 20,
            moves_in_max: 1024,
            missed_releases_max: 65_536,
            jetstream: Vec::new(),
            jetstream_replicas: 3,
            jetstream_tls: false,
            jetstream_ca_file: None,
            jetstream_cert_file: None,
            jetstream_key_file: None,
            jetstream_user: None,
            jetstream_password: None,
            jetstream_nkey_file: None,
            jetstream_creds_file: None,
            replication_timeout_ms: 10_000,
            snapshot_log_bytes: 64 << 20,
            rebuild_bytes_max: 2 << 30,
            replication_pending_bytes_max: 64 << 20,
        }
    }
}

impl ClusterConfig {
    /// Whether this broker is a cluster node.
    pub fn enabled(&self) -> bool {
        self.node.is_some()
    }

    /// Whether sessions are replicated (JetStream configured).
    pub fn replicated(&self) -> bool {
        self.enabled() && !self.jetstream.is_empty()
    }

    /// Whether the JetStream servers are reached over TLS only.
    pub fn jetstream_tls_on(&self) -> bool {
        self.jetstream_tls
            || self.jetstream_ca_file.is_some()
            || self.jetstream_cert_file.is_some()
            || self.jetstream.iter().any(|u| u.starts_with("tls://"))
    }

    /// The address the other nodes dial.
    pub fn advertised(&self) -> Option<SocketAddr> {
        self.advertise.or(self.listen)
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

impl Config {}

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
mod tests;
