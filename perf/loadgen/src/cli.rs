//! Flags.

use clap::{Parser, ValueEnum};
use shardmq::protocol::ProtocolVersion;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Many publishers, one subscriber (on `<prefix>/in/+`).
    FanIn,
    /// One publisher, many subscribers of one topic.
    FanOut,
    /// N publisher/subscriber pairs, one topic each.
    P2p,
    /// QoS 1/2 into persistent sessions that stay online: acknowledged and delivered msgs/s.
    Durable,
    /// Queue messages for offline persistent sessions, then reconnect them and time the drain.
    Backlog,
    /// N connections kept open; the broker's RSS per connection (with --broker-pid).
    Idle,
    /// Connect, CONNACK, DISCONNECT, as fast as possible: connects/s.
    Storm,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    /// Create the sessions, queue the messages, then reconnect and drain.
    All,
    /// Create the sessions and queue the messages, then exit (the sessions stay).
    Fill,
    /// Reconnect sessions made by an earlier `--phase fill` and drain them.
    Drain,
}

fn parse_protocol(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "311" | "3.1.1" | "4" => Ok(ProtocolVersion::V3_1_1),
        "5" | "50" | "5.0" => Ok(ProtocolVersion::V5),
        _ => Err(format!("unknown protocol {s:?}: use 311 or 5")),
    }
}

/// A load generator for MQTT brokers. Loopback only unless --allow-remote.
///
/// Every run is bounded: by --duration (and --drain-timeout for what is in flight) and, where
/// given, by --messages or --connections.
#[derive(Parser, Debug, Clone)]
#[command(name = "shardmq-loadgen", version, about, long_about = None)]
pub struct Args {
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Broker host (name or address).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Publishers connect to this port of --host instead of --port (fan-in, fan-out, p2p,
    /// durable, backlog): e.g. one node of a cluster for the publishers, another for the
    /// subscribers.
    #[arg(long, value_name = "PORT")]
    pub pub_port: Option<u16>,
    /// Subscribers connect to this port of --host instead of --port (fan-in, fan-out, p2p,
    /// durable).
    #[arg(long, value_name = "PORT")]
    pub sub_port: Option<u16>,
    /// The publishers' client IDs, in order, instead of `<prefix><tag>p<i>` (fan-in,
    /// fan-out, p2p, durable, backlog): to place sessions on chosen shards or cluster nodes.
    /// Sets --publishers when that is absent, and must match it when given.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    pub pub_ids: Option<Vec<String>>,
    /// The subscribers' client IDs, in order, instead of `<prefix><tag>s<j>` (fan-in,
    /// fan-out, p2p, durable), or the backlog's session IDs instead of `<prefix>-bl<i>`.
    /// Sets --subscribers when that is absent, and must match it.
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    pub sub_ids: Option<Vec<String>>,

    /// MQTT version: 311 or 5.
    #[arg(long, default_value = "5", value_parser = parse_protocol)]
    pub protocol: ProtocolVersion,
    /// QoS of publishes and subscriptions (default 0; 1 for durable and backlog).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: Option<u8>,
    /// Payload size in bytes (at least 8: the first 8 carry the send timestamp).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(8..=16_777_216))]
    pub payload: u64,

    /// Publisher connections (default: fan-in 10, fan-out 1, p2p 10, durable 4, backlog 4).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Subscriber connections, or sessions for backlog (default: fan-in 1, fan-out 10,
    /// p2p = publishers, durable 4, backlog 1000).
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Connections for idle (default 1000) and the most connects for storm (default 100000).
    #[arg(long)]
    pub connections: Option<u64>,

    /// Open loop: offered rate in msgs/s over all publishers, each sending on a fixed
    /// schedule; latency is measured from the scheduled send time.
    #[arg(long, conflicts_with = "max_rate")]
    pub rate: Option<f64>,
    /// Closed loop: send as fast as the windows and sockets allow (the default).
    #[arg(long)]
    pub max_rate: bool,
    /// Seconds of publishing (idle: seconds to hold the connections; storm: seconds of
    /// connecting; backlog: the cap on each phase). Default 10, backlog 600; at most 3600.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Messages to publish over all publishers (backlog: messages to queue, default 100 per
    /// session). Publishing stops at --duration or --messages, whichever comes first.
    #[arg(long)]
    pub messages: Option<u64>,
    /// QoS 1/2 messages a publisher may have unacknowledged (also capped by the broker's
    /// Receive Maximum).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Seconds to wait, after publishing stops, for deliveries and acknowledgements.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,

    /// The broker's PID: report its CPU seconds (utime+stime) and peak RSS (VmHWM) over the
    /// run, and for idle its RSS per connection.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Progress lines on stderr once a second.
    #[arg(long)]
    pub progress: bool,
    /// tokio worker threads (pin the process with taskset; default 1).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Connection handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Spread client sockets over 127.0.0.1..127.0.0.N (loopback IPv4 targets only), for
    /// more than ~28k client ports.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_ips: u8,
    /// Keep Alive sent in CONNECT (seconds; 0 = off). Idle connections ping at half of it.
    #[arg(long, default_value_t = 0)]
    pub keep_alive: u16,

    /// Subscribers of fan-in, fan-out and p2p use persistent sessions too (durable and
    /// backlog always do).
    #[arg(long)]
    pub persistent: bool,
    /// MQTT 5 Session Expiry Interval of persistent sessions (seconds).
    #[arg(long, default_value_t = 3600)]
    pub session_expiry: u32,
    /// Leave persistent sessions on the broker at the end (by default they are ended).
    #[arg(long)]
    pub keep_sessions: bool,
    /// Backlog: which part to run.
    #[arg(long, value_enum, default_value = "all")]
    pub phase: Phase,
    /// Idle: give each connection one subscription.
    #[arg(long)]
    pub subscribe: bool,
    /// Idle: disconnect the (persistent) sessions after creating them, and measure the
    /// broker's memory per offline session instead.
    #[arg(long)]
    pub offline: bool,

    /// Client ID and topic prefix. Backlog uses `<prefix>-bl<i>` and `<prefix>/bl/<i>`, the
    /// same in both phases; other scenarios add a per-run tag.
    #[arg(long, default_value = "lg")]
    pub prefix: String,
}

impl Args {
    pub fn duration_s(&self) -> f64 {
        self.duration.unwrap_or(match self.scenario {
            Scenario::Backlog => 600.0,
            _ => 10.0,
        })
    }

    pub fn qos(&self) -> u8 {
        self.qos.unwrap_or(match self.scenario {
            Scenario::Durable | Scenario::Backlog => 1,
            _ => 0,
        })
    }
}
