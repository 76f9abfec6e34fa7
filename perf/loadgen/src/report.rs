//! What a run reports: one JSON object (`--json`) or a short table.

use crate::stats::{BrokerStats, Latency};
use serde::Serialize;
use std::fmt::Write as _;

/// One measured part of a run (backlog has several).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    pub name: String,
    /// Wall time of the phase, seconds.
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// Open loop: messages that were due by the end but not sent (the generator or the
    /// windows fell behind the schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsent_due: Option<u64>,
    /// Open loop: messages sent late because the QoS window or the socket was full (the
    /// broker's flow control); their delay counts in the latency but not in `send_lag`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_back: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
    /// expected - received when positive (QoS 0 may legitimately lose).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    /// received - expected when positive (redeliveries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_rate: Option<f64>,
    /// End to end: from the timestamp in the payload (the scheduled send time in open loop)
    /// to its arrival at a subscriber.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// From the scheduled send time to PUBACK (QoS 1) or PUBCOMP (QoS 2) at the publisher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_latency: Option<Latency>,
    /// Open loop: how late the generator wrote each message after its scheduled time (not
    /// counting messages held back by the broker's flow control).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_rate: Option<f64>,
    /// TCP connect start to CONNACK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_latency: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions_present: Option<u64>,
    /// Idle: the broker's VmRSS before opening and after opening the connections, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_per_connection: Option<f64>,
    pub errors: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub protocol: String,
    pub qos: u8,
    pub payload_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// "max-rate" or "open-loop".
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight: Option<u16>,
    pub threads: usize,
    pub phases: Vec<PhaseReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerStats>,
    /// The generator's own CPU seconds over the run.
    pub generator_cpu_s: f64,
}

fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.1}/s")
    }
}

fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2}ms", v / 1e3)
    } else {
        format!("{v:.0}µs")
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn lat_line(out: &mut String, label: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "  {label:<16} p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
        us(l.p50_us),
        us(l.p99_us),
        us(l.p999_us),
        us(l.max_us),
        l.count
    );
}

impl Report {
    pub fn table(&self) -> String {
        let mut o = String::new();
        self.header(&mut o);
        for p in &self.phases {
            p.table(&mut o);
        }
        if let Some(b) = &self.broker {
            broker_line(&mut o, b);
        }
        let _ = writeln!(o, "generator cpu {:.2} s", self.generator_cpu_s);
        o
    }

    /// The first line: scenario, target, protocol, QoS, payload, mode and connections.
    fn header(&self, o: &mut String) {
        let _ = write!(
            o,
            "{} → {}  MQTT {}  QoS {}  payload {} B  {}",
            self.scenario, self.target, self.protocol, self.qos, self.payload_bytes, self.mode
        );
        if let Some(r) = self.offered_rate {
            let _ = write!(o, " {}", rate(r));
        }
        if let Some(p) = self.publishers {
            let _ = write!(o, "  pubs {p}");
        }
        if let Some(s) = self.subscribers {
            let _ = write!(o, "  subs {s}");
        }
        if let Some(c) = self.connections {
            let _ = write!(o, "  conns {c}");
        }
        if let Some(i) = self.inflight {
            let _ = write!(o, "  inflight {i}");
        }
        o.push('\n');
    }
}

/// The broker's line: CPU, RSS and CPU per million messages.
fn broker_line(o: &mut String, b: &BrokerStats) {
    let _ = write!(
        o,
        "broker pid {}: cpu {:.2} s  peak RSS {}  RSS {} → {}",
        b.pid,
        b.cpu_s,
        mib(b.peak_rss_bytes),
        mib(b.before.rss_bytes),
        mib(b.after.rss_bytes)
    );
    if let Some(c) = b.cpu_s_per_million_msgs {
        let _ = write!(o, "  {c:.2} cpu-s per M msgs");
    }
    o.push('\n');
}

impl PhaseReport {
    /// The phase's lines of the table: counts, rates, latencies, broker RSS, errors, notes.
    fn table(&self, o: &mut String) {
        let _ = writeln!(o, "[{}] {:.2} s", self.name, self.elapsed_s);
        let counts = self.counts();
        if !counts.is_empty() {
            let _ = writeln!(o, "  {}", counts.join("  "));
        }
        let rates = self.rates();
        if !rates.is_empty() {
            let _ = writeln!(o, "  {}", rates.join("  "));
        }
        if let Some(l) = &self.latency {
            lat_line(o, "latency", l);
        }
        if let Some(l) = &self.ack_latency {
            lat_line(o, "ack latency", l);
        }
        if let Some(l) = &self.send_lag {
            lat_line(o, "send lag", l);
        }
        if let Some(l) = &self.connect_latency {
            lat_line(o, "connect latency", l);
        }
        if let (Some(b), Some(a)) = (self.broker_rss_before, self.broker_rss_after) {
            let _ = write!(o, "  broker RSS {} → {}", mib(b), mib(a));
            if let Some(per) = self.broker_rss_per_connection {
                let _ = write!(o, "  = {per:.0} B per connection");
            }
            o.push('\n');
        }
        let _ = writeln!(o, "  errors {}", self.errors);
        for e in &self.error_samples {
            let _ = writeln!(o, "    {e}");
        }
        for n in &self.notes {
            let _ = writeln!(o, "  note: {n}");
        }
    }

    /// The message and connection counts the phase has, as `name value`.
    fn counts(&self) -> Vec<String> {
        let mut counts = Vec::new();
        let mut push = |k: &str, v: Option<u64>| {
            if let Some(v) = v {
                counts.push(format!("{k} {v}"));
            }
        };
        push("sent", self.sent);
        push("unsent-due", self.unsent_due.filter(|&n| n > 0));
        push("held-back", self.held_back.filter(|&n| n > 0));
        push("acked", self.acked);
        push("expected", self.expected);
        push("received", self.received);
        push("lost", self.lost);
        push("extra", self.extra.filter(|&n| n > 0));
        push("connects", self.connects);
        push("sessions-present", self.sessions_present);
        counts
    }

    /// The rates (and loss) the phase has.
    fn rates(&self) -> Vec<String> {
        let mut rates = Vec::new();
        if let Some(r) = self.send_rate {
            rates.push(format!("sent {}", rate(r)));
        }
        if let Some(r) = self.ack_rate {
            rates.push(format!("acked {}", rate(r)));
        }
        if let Some(r) = self.delivered_rate {
            rates.push(format!("delivered {}", rate(r)));
        }
        if let Some(r) = self.connect_rate {
            rates.push(format!("connect rate {}", rate(r)));
        }
        if let Some(l) = self.loss_pct {
            rates.push(format!("loss {l:.3}%"));
        }
        rates
    }
}
