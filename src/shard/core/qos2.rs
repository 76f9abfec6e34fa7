//! QoS 2 dedup keys across shards: which sessions hold a key, and forgetting keys when the
//! publisher releases the message (see the module doc of `core`).

use super::*;

/// QoS 2 dedup keys held by this shard's persistent sessions: publisher client id ->
/// publisher packet id -> the sessions holding the key. Each holder is listed once; an
/// emptied packet id or publisher is removed, so the map holds only live keys.
#[derive(Debug, Default)]
pub(super) struct Qos2Keys {
    by_origin: HashMap<MqttStr, HashMap<u16, Vec<MqttStr>>>,
}

impl Qos2Keys {
    /// `client_id` holds the key (`origin`, `pid`) (listed once however often it is told).
    pub fn hold(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let holders = self
            .by_origin
            .entry(origin.clone())
            .or_default()
            .entry(pid)
            .or_default();
        if !holders.contains(client_id) {
            holders.push(client_id.clone());
        }
    }

    /// `client_id` no longer holds the key (`origin`, `pid`) (its session ended).
    pub fn let_go(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        let Some(by_pid) = self.by_origin.get_mut(origin) else {
            return;
        };
        if let Some(holders) = by_pid.get_mut(&pid) {
            holders.retain(|c| c != client_id);
            if holders.is_empty() {
                by_pid.remove(&pid);
            }
        }
        if by_pid.is_empty() {
            self.by_origin.remove(origin);
        }
    }

    /// Removes the key (`origin`, `pid`) (`None`: every key of `origin`) and returns who
    /// held it, by packet id.
    pub fn take(&mut self, origin: &MqttStr, pid: Option<u16>) -> Vec<(u16, Vec<MqttStr>)> {
        match pid {
            Some(pid) => {
                let Some(by_pid) = self.by_origin.get_mut(origin) else {
                    return Vec::new();
                };
                let held = by_pid.remove(&pid);
                if by_pid.is_empty() {
                    self.by_origin.remove(origin);
                }
                held.map(|h| vec![(pid, h)]).unwrap_or_default()
            }
            None => self
                .by_origin
                .remove(origin)
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
        }
    }

    /// The sessions holding the key (`origin`, `pid`).
    #[cfg(test)]
    pub fn holders(&self, origin: &MqttStr, pid: u16) -> &[MqttStr] {
        self.by_origin
            .get(origin)
            .and_then(|m| m.get(&pid))
            .map_or(&[], |h| h.as_slice())
    }

    /// Whether no key is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_origin.is_empty()
    }
}

impl Core {
    /// Records that `client_id` (a session of this shard) holds the key (`origin`, `pid`).
    pub(super) fn note_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        self.qos2.hold(origin, pid, client_id);
    }

    /// `client_id` no longer holds the key (`origin`, `pid`) (its session ended).
    pub(super) fn drop_qos2_holder(&mut self, origin: &MqttStr, pid: u16, client_id: &MqttStr) {
        self.qos2.let_go(origin, pid, client_id);
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
        let nodes = self.release_in_nodes(origin, pid, reply);
        nodes + self.release_qos2_in_node(origin, pid, reply, now)
    }

    /// [`Core::release_qos2`] on this node's shards only (a release another node sent).
    pub(super) fn release_qos2_in_node(
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
        self.note_release(origin, pid, now);
        let held = self.qos2.take(origin, pid);
        let mut touched: Vec<MqttStr> = Vec::new();
        for (pid, clients) in held {
            for c in clients {
                if let Some(s) = self.sessions.get_mut(&c) {
                    if s.forget_qos2(origin, pid) && !touched.contains(&c) {
                        touched.push(c.clone());
                    }
                }
                self.drop_adopted_key(&c, origin, pid);
                self.forget_on_move(&c, origin, pid);
            }
        }
        for c in touched {
            self.sync_session(&c, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> MqttStr {
        MqttStr::new(v).unwrap()
    }

    #[test]
    fn a_holder_is_listed_once_and_emptied_keys_disappear() {
        let mut k = Qos2Keys::default();
        let (p, a, b) = (s("pub"), s("a"), s("b"));
        k.hold(&p, 7, &a);
        k.hold(&p, 7, &a);
        k.hold(&p, 7, &b);
        assert_eq!(k.holders(&p, 7), &[a.clone(), b.clone()]);
        k.let_go(&p, 7, &a);
        assert_eq!(k.holders(&p, 7), std::slice::from_ref(&b));
        k.let_go(&p, 7, &b);
        assert!(k.holders(&p, 7).is_empty());
        assert!(
            k.is_empty(),
            "no empty packet id or publisher is left behind"
        );
        // Letting go of what is not held changes nothing.
        k.let_go(&p, 9, &a);
        assert!(k.is_empty());
    }

    #[test]
    fn take_removes_one_key_or_every_key_of_a_publisher() {
        let mut k = Qos2Keys::default();
        let (p, q, a) = (s("pub"), s("other"), s("a"));
        k.hold(&p, 1, &a);
        k.hold(&p, 2, &a);
        k.hold(&q, 1, &a);
        assert_eq!(k.take(&p, Some(1)), vec![(1, vec![a.clone()])]);
        assert!(k.take(&p, Some(1)).is_empty(), "taken once");
        assert_eq!(k.holders(&p, 2), std::slice::from_ref(&a));
        let mut all = k.take(&p, None);
        all.sort();
        assert_eq!(all, vec![(2, vec![a.clone()])]);
        assert_eq!(
            k.holders(&q, 1),
            std::slice::from_ref(&a),
            "another publisher's keys stay"
        );
        assert_eq!(k.take(&q, None).len(), 1);
        assert!(k.is_empty());
    }
}
