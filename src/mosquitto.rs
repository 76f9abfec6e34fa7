//! `shardmq convert-mosquitto-conf FILE`: reads a Mosquitto configuration (`key value` lines,
//! `listener` blocks) and gives the shardmq configuration that does the same, with every
//! line it cannot carry over named, and why. Pure text in, [`Converted`] out: the CLI prints
//! it. The mapping table is in the README ("Coming from Mosquitto").

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::config::{Config, Durability, ListenerConfig, Transport};

/// A line of the Mosquitto file that has no equivalent (or only an approximate one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// 1-based line number.
    pub line: usize,
    pub text: String,
    pub why: String,
}

#[derive(Debug)]
pub struct Converted {
    pub config: Config,
    /// Lines not carried over, and why.
    pub skipped: Vec<Note>,
    /// Lines carried over with a difference worth knowing.
    pub caveats: Vec<Note>,
}

/// A `listener` block being read.
struct Block {
    line: usize,
    port: u16,
    bind: Option<IpAddr>,
    websockets: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    require_certificate: bool,
    identity_as_username: bool,
    max_connections: Option<u32>,
}

/// Where a setting was read: its line number and its text, for the notes about it.
struct At<'a> {
    line: usize,
    text: &'a str,
}

impl At<'_> {
    /// A note about this line, saying why.
    fn note(&self, why: &str) -> Note {
        Note {
            line: self.line,
            text: self.text.to_string(),
            why: why.to_string(),
        }
    }
}

/// The conversion under way: what the lines read so far set, and the notes about them.
struct Converter {
    cfg: Config,
    skipped: Vec<Note>,
    caveats: Vec<Note>,
    blocks: Vec<Block>,
    persistence: bool,
    default_port: Option<(usize, u16)>,
}

/// A setting's value as a number, when it is one.
fn num(v: &str) -> Option<i64> {
    v.parse::<i64>().ok()
}

pub fn convert(text: &str) -> Converted {
    let mut c = Converter {
        cfg: Config::default(),
        skipped: Vec::new(),
        caveats: Vec::new(),
        blocks: Vec::new(),
        persistence: false,
        default_port: None,
    };
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (key, value) = match l.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => (l, ""),
        };
        c.setting(
            &At {
                line: i + 1,
                text: l,
            },
            key,
            value,
        );
    }
    c.finish()
}

impl Converter {
    /// Notes a line as not carried over, and why.
    fn skip(&mut self, at: &At<'_>, why: &str) {
        self.skipped.push(at.note(why));
    }

    /// Carries over one `key value` line, or notes why not.
    fn setting(&mut self, at: &At<'_>, key: &str, value: &str) {
        match key {
            "listener" => self.listener(at, value),
            "port" => {
                self.default_port = num(value)
                    .and_then(|p| u16::try_from(p).ok())
                    .map(|p| (at.line, p))
            }
            "protocol"
            | "certfile"
            | "keyfile"
            | "cafile"
            | "require_certificate"
            | "use_identity_as_username"
            | "bind_address"
            | "max_connections"
                if !self.blocks.is_empty() || key == "max_connections" =>
            {
                self.listener_setting(at, key, value)
            }
            "persistence" => self.persistence = value == "true",
            "persistence_location" => self.cfg.data_dir = value.into(),
            "max_queued_messages"
            | "max_queued_bytes"
            | "max_inflight_messages"
            | "max_packet_size"
            | "max_keepalive" => self.limit(at, key, value),
            "allow_anonymous" => self.cfg.auth.allow_anonymous = Some(value == "true"),
            "password_file" => self.cfg.auth.password_file = Some(value.into()),
            "acl_file" => self.cfg.auth.acl_file = Some(value.into()),
            "sys_interval" => match num(value) {
                Some(n) if n >= 0 => self.cfg.sys.interval_s = u32::try_from(n).unwrap_or(u32::MAX),
                _ => self.skip(at, "not a number"),
            },
            "queue_qos0_messages" => self.cfg.sessions.queue_qos0_offline = value == "true",
            _ => self.skip(at, why_skipped(key)),
        }
    }

    /// Opens a `listener PORT [ADDRESS]` block.
    fn listener(&mut self, at: &At<'_>, value: &str) {
        let mut parts = value.split_whitespace();
        let port = parts.next().and_then(|p| p.parse::<u16>().ok());
        let bind = parts.next().map(|b| b.parse::<IpAddr>());
        match (port, bind) {
            (Some(port), None) => self.blocks.push(Block::new(at.line, port, None)),
            (Some(port), Some(Ok(ip))) => self.blocks.push(Block::new(at.line, port, Some(ip))),
            (Some(_), Some(Err(_))) => self.skip(
                at,
                "a host name or a unix socket path: shardmq listens on IP addresses",
            ),
            (None, _) => self.skip(at, "no port number"),
        }
    }

    /// A setting of the open `listener` block (or `max_connections` outside one).
    fn listener_setting(&mut self, at: &At<'_>, key: &str, value: &str) {
        let skipped = &mut self.skipped;
        let mut skip = |why: &str| skipped.push(at.note(why));
        match (key, self.blocks.last_mut()) {
            ("protocol", Some(b)) => match value {
                "websockets" => b.websockets = true,
                "mqtt" => {}
                _ => skip("unknown protocol"),
            },
            ("certfile", Some(b)) => b.cert = Some(value.into()),
            ("keyfile", Some(b)) => b.key = Some(value.into()),
            ("cafile", Some(b)) => b.ca = Some(value.into()),
            ("require_certificate", Some(b)) => b.require_certificate = value == "true",
            ("use_identity_as_username", Some(b)) => {
                b.identity_as_username = value == "true"
            }
            ("bind_address", Some(b)) => match value.parse() {
                Ok(ip) => b.bind = Some(ip),
                Err(_) => skip("not an IP address"),
            },
            ("max_connections", b) => match (num(value), b) {
                (Some(n), Some(b)) if n > 0 => b.max_connections = u32::try_from(n).ok(),
                (Some(n), None) if n > 0 => {
                    self.cfg.limits.connections_max = u32::try_from(n).unwrap_or(u32::MAX)
                }
                (Some(_), _) => {
                    self.caveats.push(at.note("-1 (no limit) has no equivalent: limits.connections_max keeps its default, 100000"))
                }
                (None, _) => skip("not a number"),
            },
            _ => skip("outside a listener block"),
        }
    }

    /// One of the `limits`: queue, in-flight, packet size, keep-alive.
    fn limit(&mut self, at: &At<'_>, key: &str, value: &str) {
        let limits = &mut self.cfg.limits;
        let caveats = &mut self.caveats;
        let mut caveat = |why: &str| caveats.push(at.note(why));
        let n = num(value);
        match (key, n) {
            (_, None) => self.skipped.push(at.note("not a number")),
            ("max_queued_messages", Some(n)) if n > 0 => {
                limits.queue_messages_max = u32::try_from(n).unwrap_or(u32::MAX)
            }
            ("max_queued_messages", Some(_)) => caveat(
                "0 (no limit) has no equivalent: limits.queue_messages_max keeps its default (1000000; the queue is on disk)",
            ),
            ("max_queued_bytes", Some(n)) if n > 0 => limits.queue_bytes_max = n as u64,
            ("max_queued_bytes", Some(_)) => caveat(
                "0 (no limit) has no equivalent: limits.queue_bytes_max keeps its default (1 GiB)",
            ),
            ("max_inflight_messages", Some(n)) if n > 0 => limits.inflight_max = u16::try_from(n).unwrap_or(u16::MAX),
            ("max_inflight_messages", Some(_)) => caveat("0 (no limit) has no equivalent: limits.inflight_max keeps its default (1024)"),
            ("max_packet_size", Some(n)) if n > 0 => {
                limits.packet_bytes_max = u32::try_from(n).unwrap_or(u32::MAX);
                let p = limits.packet_bytes_max;
                limits.outbound_buffer_bytes_max = limits.outbound_buffer_bytes_max.max(p);
                limits.incomplete_packet_bytes_max =
                    limits.incomplete_packet_bytes_max.max(p as u64);
            }
            ("max_keepalive", Some(n)) if n > 0 => {
                limits.keep_alive_max_s = u16::try_from(n).unwrap_or(u16::MAX)
            }
            _ => {}
        }
    }

    /// The configuration the lines read give, with the notes about them.
    fn finish(mut self) -> Converted {
        if self.persistence {
            self.cfg.storage.durability = Durability::Durable;
            self.caveats.push(Note {
                line: 0,
                text: "persistence true".into(),
                why: "shardmq writes each acknowledged message to disk before acknowledging it (storage.durability = \"durable\"), where Mosquitto saves snapshots".into(),
            });
        } else {
            self.cfg.storage.durability = Durability::Memory;
        }
        self.listeners();
        self.move_admin_port();
        Converted {
            config: self.cfg,
            skipped: self.skipped,
            caveats: self.caveats,
        }
    }

    /// Turns the listener blocks (and `port`) into `listen` addresses and `listeners`.
    fn listeners(&mut self) {
        let mut listen = Vec::new();
        let mut listeners = Vec::new();
        if let Some((line, port)) = self.default_port {
            if self.blocks.iter().all(|b| b.port != port) {
                self.blocks.insert(0, Block::new(line, port, None));
            }
        }
        for b in std::mem::take(&mut self.blocks) {
            let ip = b.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let addr = SocketAddr::new(ip, b.port);
            let tls = b.cert.is_some() || b.key.is_some();
            let transport = match (b.websockets, tls) {
                (false, false) => Transport::Tcp,
                (false, true) => Transport::Tls,
                (true, false) => Transport::Ws,
                (true, true) => Transport::Wss,
            };
            if b.bind.is_none() {
                self.caveats.push(Note {
                    line: b.line,
                    text: format!("listener {}", b.port),
                    why: format!(
                        "no address: listens on {addr} (IPv4; add [::]:{} for IPv6)",
                        b.port
                    ),
                });
            }
            if transport == Transport::Tcp && b.max_connections.is_none() {
                listen.push(addr);
                continue;
            }
            let mut l = ListenerConfig::new(addr, transport);
            l.cert_file = b.cert;
            l.key_file = b.key;
            l.client_ca_file = b.ca;
            l.require_client_cert = b.require_certificate;
            l.use_identity_as_username = b.identity_as_username;
            l.connections_max = b.max_connections;
            listeners.push(l);
        }
        if !listen.is_empty() || !listeners.is_empty() {
            self.cfg.listen = listen;
            self.cfg.listeners = listeners;
        }
    }

    /// Moves the admin endpoint off a port a listener took (8080 is a common WebSocket port).
    fn move_admin_port(&mut self) {
        let cfg = &mut self.cfg;
        let used: Vec<u16> = cfg
            .listen
            .iter()
            .chain(cfg.listeners.iter().map(|l| &l.address))
            .map(SocketAddr::port)
            .collect();
        if used.contains(&cfg.admin.listen.port()) {
            let from = cfg.admin.listen.port();
            if let Some(free) = (from..u16::MAX).find(|p| !used.contains(p)) {
                cfg.admin.listen.set_port(free);
                self.caveats.push(Note {
                    line: 0,
                    text: format!("a listener on port {from}"),
                    why: format!(
                        "the admin endpoint's default port: admin.listen moves to {}",
                        cfg.admin.listen
                    ),
                });
            }
        }
    }
}

/// Why a key with no equivalent (or one this converter does not know) is not carried over.
fn why_skipped(key: &str) -> &'static str {
    match key {
        "persistence_file" | "autosave_interval" | "autosave_on_changes" => {
            "shardmq's store is one database per shard under data_dir, written as messages are acknowledged (no snapshot file, no autosave)"
        }
        "log_dest" | "log_type" | "log_timestamp" | "log_timestamp_format" | "connection_messages" => {
            "logs go to stderr (journald under systemd); the level is log.level, connection lines log.connection_lines_per_s"
        }
        "pid_file" | "user" => "run under systemd (config/shardmq.service) as the user it names",
        "include_dir" => "one file: fold the included files in and convert them too",
        "per_listener_settings" => "shardmq has one set of authentication rules for all listeners",
        "connection" | "address" | "topic" | "bridge_protocol_version" | "remote_username"
        | "remote_password" | "cleansession" | "try_private" => {
            "bridges are not supported (several shardmq nodes form a cluster instead)"
        }
        "retain_available" | "message_size_limit" | "upgrade_outgoing_qos" | "set_tcp_nodelay" => {
            "no equivalent setting"
        }
        _ => "not known to this converter",
    }
}

impl Block {
    fn new(line: usize, port: u16, bind: Option<IpAddr>) -> Block {
        Block {
            line,
            port,
            bind,
            websockets: false,
            cert: None,
            key: None,
            ca: None,
            require_certificate: false,
            identity_as_username: false,
            max_connections: None,
        }
    }
}

/// The converted configuration as TOML, headed by the lines not carried over and the
/// differences, as comments.
pub fn render(c: &Converted, source: &str) -> String {
    let mut out = format!("# Converted from the Mosquitto configuration {source}.\n");
    let line_of = |n: &Note| {
        if n.line == 0 {
            String::new()
        } else {
            format!("line {}: ", n.line)
        }
    };
    if !c.skipped.is_empty() {
        out.push_str("#\n# Not carried over:\n");
        for n in &c.skipped {
            out.push_str(&format!("#   {}`{}`: {}\n", line_of(n), n.text, n.why));
        }
    }
    if !c.caveats.is_empty() {
        out.push_str("#\n# Carried over with a difference:\n");
        for n in &c.caveats {
            out.push_str(&format!("#   {}`{}`: {}\n", line_of(n), n.text, n.why));
        }
    }
    out.push('\n');
    out.push_str(&toml::to_string_pretty(&c.config).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configuration Debian's mosquitto package installs, and a typical TLS +
    /// WebSocket setup.
    #[test]
    fn the_debian_example_and_a_tls_websocket_setup_convert() {
        let debian = "# Place your local configuration in /etc/mosquitto/conf.d/\n\
            #\n# A full description of the configuration file is at\n\
            # /usr/share/doc/mosquitto/examples/mosquitto.conf.example\n\n\
            pid_file /run/mosquitto/mosquitto.pid\n\n\
            persistence true\npersistence_location /var/lib/mosquitto/\n\n\
            log_dest file /var/log/mosquitto/mosquitto.log\n\n\
            include_dir /etc/mosquitto/conf.d\n";
        let c = convert(debian);
        assert_eq!(c.config.data_dir, PathBuf::from("/var/lib/mosquitto/"));
        assert_eq!(c.config.storage.durability, Durability::Durable);
        let skipped: Vec<usize> = c.skipped.iter().map(|n| n.line).collect();
        assert_eq!(skipped, [6, 11, 13], "{:?}", c.skipped);
        c.config.validate().expect("valid");

        let tls = "per_listener_settings false\nallow_anonymous false\n\
            password_file /etc/mosquitto/passwd\nacl_file /etc/mosquitto/acl\n\
            max_queued_messages 5000\nmax_inflight_messages 40\nmax_packet_size 262144\n\
            max_keepalive 300\nsys_interval 30\n\
            listener 1883 127.0.0.1\n\
            listener 8883\ncertfile /etc/mosquitto/certs/server.crt\n\
            keyfile /etc/mosquitto/certs/server.key\ncafile /etc/mosquitto/ca.crt\n\
            require_certificate true\nuse_identity_as_username true\n\
            listener 9001\nprotocol websockets\n\
            connection bridge-01\naddress 10.0.0.1:1883\n";
        let c = convert(tls);
        let cfg = &c.config;
        assert_eq!(
            cfg.listen,
            ["127.0.0.1:1883".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(cfg.listeners.len(), 2);
        let t = &cfg.listeners[0];
        assert_eq!((t.address.port(), t.transport), (8883, Transport::Tls));
        assert!(t.require_client_cert && t.use_identity_as_username);
        assert_eq!(
            t.client_ca_file,
            Some(PathBuf::from("/etc/mosquitto/ca.crt"))
        );
        assert_eq!(
            (cfg.listeners[1].address.port(), cfg.listeners[1].transport),
            (9001, Transport::Ws)
        );
        assert_eq!(cfg.auth.allow_anonymous, Some(false));
        assert_eq!(cfg.auth.acl_file, Some(PathBuf::from("/etc/mosquitto/acl")));
        assert_eq!(cfg.limits.queue_messages_max, 5000);
        assert_eq!(cfg.limits.inflight_max, 40);
        assert_eq!(cfg.limits.packet_bytes_max, 262_144);
        assert_eq!(cfg.limits.keep_alive_max_s, 300);
        assert_eq!(cfg.sys.interval_s, 30);
        assert_eq!(
            cfg.storage.durability,
            Durability::Memory,
            "no persistence line"
        );
        let why: Vec<(usize, &str)> = c.skipped.iter().map(|n| (n.line, n.why.as_str())).collect();
        assert!(
            why.iter().any(|(l, w)| *l == 1 && w.contains("one set")),
            "{why:?}"
        );
        assert!(
            why.iter().any(|(l, w)| *l == 19 && w.contains("bridges")),
            "{why:?}"
        );
        // The output is a configuration shardmq reads back as it is.
        let text = render(&c, "test.conf");
        let back = Config::from_toml(&text).expect("reads back");
        assert_eq!(back.listeners, cfg.listeners);
    }
}
