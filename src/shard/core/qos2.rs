//! QoS 2 dedup keys across shards: which sessions hold a key, and forgetting keys when the
//! publisher releases the message (see the module doc of `core`).

use super::*;

impl Core {
    /// Records that `client_id` (a session of this shard) holds the key (`origin`, `pid`).
    pub(super) fn note_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let holders = self
            .qos2_holders
            .entry(origin.clone())
            .or_default()
            .entry(pid)
            .or_default();
        if !holders.contains(client_id) {
            holders.push(client_id.clone());
        }
    }

    /// `client_id` no longer holds the key (`origin`, `pid`) (its session ended).
    pub(super) fn drop_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let Some(by_pid) = self.qos2_holders.get_mut(origin) else {
            return;
        };
        if let Some(holders) = by_pid.get_mut(&pid) {
            holders.retain(|c| c != client_id);
            if holders.is_empty() {
                by_pid.remove(&pid);
            }
        }
        if by_pid.is_empty() {
            self.qos2_holders.remove(origin);
        }
    }

    /// Makes every shard forget the key (`origin`, `pid`) (`None`: every key of `origin`):
    /// here at once, on the peers by [`Event::Qos2Release`]. With `reply`, each peer answers
    /// once its deletions are durable; returns how many answers to expect.
    pub(super) fn release_qos2(
        &mut self,
        origin: &MqttStr,
        pid: Option<u16>,
        reply: Option<Token>,
        now: Instant,
    ) -> usize {
        let mut remote = 0;
        for p in self.peers() {
            self.sink.push(
                p,
                Event::Qos2Release {
                    origin: origin.clone(),
                    packet_id: pid,
                    reply,
                },
            );
            remote += usize::from(reply.is_some());
        }
        self.forget_qos2(origin, pid, now);
        remote
    }

    /// Removes the key (`origin`, `pid`) (`None`: every key of `origin`) from the sessions of
    /// this shard that hold it, and writes the deletions.
    pub(super) fn forget_qos2(&mut self, origin: &MqttStr, pid: Option<u16>, now: Instant) {
        let held: Vec<(u16, Vec<MqttStr>)> = match pid {
            Some(pid) => {
                let Some(by_pid) = self.qos2_holders.get_mut(origin) else {
                    return;
                };
                let held = by_pid.remove(&pid);
                if by_pid.is_empty() {
                    self.qos2_holders.remove(origin);
                }
                held.map(|h| vec![(pid, h)]).unwrap_or_default()
            }
            None => self
                .qos2_holders
                .remove(origin)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        };
        let mut touched: Vec<MqttStr> = Vec::new();
        for (pid, clients) in held {
            for c in clients {
                if let Some(s) = self.sessions.get_mut(&c) {
                    if s.forget_qos2(origin, pid) && !touched.contains(&c) {
                        touched.push(c);
                    }
                }
            }
        }
        for c in touched {
            self.sync_session(&c, now);
        }
    }
}
