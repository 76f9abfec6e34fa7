//! The `$SYS/broker/...` topics, with the names Mosquitto uses. Shard 0 gathers every
//! shard's counters (map-reduce over the mesh) every `sys.interval_s` and publishes these
//! as retained QoS 0 messages through normal routing ([`super::service::BrokerShard::sys_loop`]).
//! Clients cannot publish there (the core drops it), and `#` does not match them.

use std::time::Duration;

use super::api::ShardStats;

/// The broker-wide sums of what the shards answered.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SysTotals {
    pub clients_connected: u64,
    pub sessions: u64,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub subscriptions: u64,
    /// Every shard holds all retained messages: the largest count, not the sum.
    pub retained: u64,
}

impl SysTotals {
    pub fn add(&mut self, s: &ShardStats) {
        self.clients_connected += s.core.connections;
        self.sessions += s.sessions as u64;
        self.messages_received += s.core.messages_received;
        self.messages_sent += s.delivery.delivered;
        self.bytes_received += s.bytes_received;
        self.bytes_sent += s.bytes_sent;
        self.subscriptions += s.subscriptions as u64;
        self.retained = self.retained.max(s.retained as u64);
    }
}

/// The moving averages of `$SYS/broker/load/...`: per-minute rates, decayed over 1, 5 and
/// 15 minutes (as Mosquitto computes them).
#[derive(Clone, Debug, Default)]
pub struct SysLoad {
    last: Option<SysTotals>,
    /// [messages received, messages sent, bytes received, bytes sent] x [1, 5, 15 min].
    load: [[f64; 3]; 4],
}

const WINDOWS_MIN: [u32; 3] = [1, 5, 15];

impl SysLoad {
    /// The topics and payloads to publish for `t`, `elapsed` after the previous call
    /// (`uptime` since the broker started).
    pub fn publish(
        &mut self,
        t: &SysTotals,
        elapsed: Duration,
        uptime: Duration,
    ) -> Vec<(String, String)> {
        let counters = [
            t.messages_received,
            t.messages_sent,
            t.bytes_received,
            t.bytes_sent,
        ];
        if let Some(last) = &self.last {
            let before = [
                last.messages_received,
                last.messages_sent,
                last.bytes_received,
                last.bytes_sent,
            ];
            let secs = elapsed.as_secs_f64().max(1e-3);
            for (k, load) in self.load.iter_mut().enumerate() {
                let per_min = counters[k].saturating_sub(before[k]) as f64 * 60.0 / secs;
                for (w, v) in load.iter_mut().enumerate() {
                    let decay = (-secs / (60.0 * WINDOWS_MIN[w] as f64)).exp();
                    *v = per_min + decay * (*v - per_min);
                }
            }
        }
        self.last = Some(*t);
        let b = "$SYS/broker";
        let mut out = vec![
            (
                format!("{b}/version"),
                format!("shardmq {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                format!("{b}/uptime"),
                format!("{} seconds", uptime.as_secs()),
            ),
            (
                format!("{b}/clients/connected"),
                t.clients_connected.to_string(),
            ),
            (
                format!("{b}/clients/disconnected"),
                t.sessions.saturating_sub(t.clients_connected).to_string(),
            ),
            (format!("{b}/clients/total"), t.sessions.to_string()),
            (
                format!("{b}/messages/received"),
                t.messages_received.to_string(),
            ),
            (format!("{b}/messages/sent"), t.messages_sent.to_string()),
            (format!("{b}/bytes/received"), t.bytes_received.to_string()),
            (format!("{b}/bytes/sent"), t.bytes_sent.to_string()),
            (
                format!("{b}/subscriptions/count"),
                t.subscriptions.to_string(),
            ),
            (
                format!("{b}/retained messages/count"),
                t.retained.to_string(),
            ),
        ];
        let names = [
            "messages/received",
            "messages/sent",
            "bytes/received",
            "bytes/sent",
        ];
        for (k, name) in names.iter().enumerate() {
            for (w, minutes) in WINDOWS_MIN.iter().enumerate() {
                out.push((
                    format!("{b}/load/{name}/{minutes}min"),
                    format!("{:.2}", self.load[k][w]),
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_values_and_load_follow_mosquitto() {
        let mut load = SysLoad::default();
        let mut t = SysTotals {
            clients_connected: 2,
            sessions: 5,
            retained: 3,
            ..SysTotals::default()
        };
        let first = load.publish(&t, Duration::ZERO, Duration::from_secs(7));
        let get = |v: &[(String, String)], k: &str| {
            v.iter()
                .find(|(t, _)| t == k)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get(&first, "$SYS/broker/uptime"), "7 seconds");
        assert_eq!(get(&first, "$SYS/broker/clients/disconnected"), "3");
        assert_eq!(get(&first, "$SYS/broker/retained messages/count"), "3");
        assert_eq!(
            get(&first, "$SYS/broker/load/messages/received/1min"),
            "0.00"
        );
        // 600 messages in 60 s: 600 per minute; the 1-minute average moves most.
        t.messages_received = 600;
        let second = load.publish(&t, Duration::from_secs(60), Duration::from_secs(67));
        let l1: f64 = get(&second, "$SYS/broker/load/messages/received/1min")
            .parse()
            .unwrap();
        let l15: f64 = get(&second, "$SYS/broker/load/messages/received/15min")
            .parse()
            .unwrap();
        assert!((l1 - 600.0 * (1.0 - (-1.0f64).exp())).abs() < 0.01, "{l1}");
        assert!(l15 > 0.0 && l15 < l1, "{l15}");
        assert_eq!(first.len(), second.len());
    }
}
