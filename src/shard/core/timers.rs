//! Timers: one will-delay and one session-expiry timer at most per offline session.
//! [`Timers`] owns the heap and knows nothing of sessions; `Core::schedule`,
//! `Core::cancel_timers` and `Core::fire_timers` tie them to the sessions' slots.

use super::*;

/// What a timer does when it fires. `epoch` ties it to one offline period of the session:
/// a session that came back (or a new one with the same client id) is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TimerKind {
    Will { client_id: MqttStr, epoch: u64 },
    Expire { client_id: MqttStr, epoch: u64 },
}

impl TimerKind {
    fn client_id(&self) -> &MqttStr {
        match self {
            TimerKind::Will { client_id, .. } | TimerKind::Expire { client_id, .. } => client_id,
        }
    }
}

/// Timers by due time. Cancelling one forgets its kind at once; its heap entry is dropped
/// when it comes due or when cancelled entries are most of the heap, so that the heap holds
/// at most about twice the live timers (plus a small constant).
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    kinds: HashMap<u64, TimerKind>,
    next: u64,
}

impl Timers {
    /// Adds a timer due at `at`; returns its id.
    pub(super) fn add(&mut self, at: Instant, kind: TimerKind) -> u64 {
        let id = self.next;
        self.next += 1;
        self.heap.push(Reverse((at, id)));
        self.kinds.insert(id, kind);
        self.compact();
        id
    }

    pub(super) fn cancel(&mut self, id: u64) {
        self.kinds.remove(&id);
    }

    /// The next timer due at `now`, removed; cancelled ones are skipped.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(u64, TimerKind)> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if let Some(kind) = self.kinds.remove(&id) {
                return Some((id, kind));
            }
        }
        None
    }

    /// Heap entries held (live timers and cancelled ones not yet dropped).
    pub(super) fn held(&self) -> usize {
        self.heap.len()
    }

    fn compact(&mut self) {
        if self.heap.len() > 2 * self.kinds.len() + 64 {
            let live = &self.kinds;
            self.heap.retain(|Reverse((_, id))| live.contains_key(id));
        }
        debug_assert!(
            self.heap.len() >= self.kinds.len(),
            "a live timer left the heap"
        );
    }
}

impl Core {
    /// Sets a session's will or expiry timer, replacing the one it had of that kind: a
    /// client id holds at most one timer of each kind, however often it comes and goes.
    pub(super) fn schedule(&mut self, at: Instant, kind: TimerKind) {
        let will = matches!(kind, TimerKind::Will { .. });
        let client_id = kind.client_id().clone();
        let slot = self.sessions.get_mut(&client_id).map(|s| {
            if will {
                &mut s.will_timer
            } else {
                &mut s.expiry_timer
            }
        });
        let old = slot.and_then(|slot| slot.take());
        if let Some(old) = old {
            self.timers.cancel(old);
        }
        let id = self.timers.add(at, kind);
        if let Some(s) = self.sessions.get_mut(&client_id) {
            if will {
                s.will_timer = Some(id);
            } else {
                s.expiry_timer = Some(id);
            }
        }
    }

    /// Cancels a session's timers (it came back, or it ended).
    pub(super) fn cancel_timers(&mut self, client_id: &MqttStr) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        for id in [s.will_timer.take(), s.expiry_timer.take()]
            .into_iter()
            .flatten()
        {
            self.timers.cancel(id);
        }
    }

    /// Timer entries held (live and cancelled ones not yet dropped).
    pub fn timer_count(&self) -> usize {
        self.timers.held()
    }

    /// The shard's periodic work (every timer tick), then every timer due at `now`.
    pub fn fire_timers(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        // The other shards' shares of the budget change without telling this one.
        self.budget.refresh();
        self.check_budget();
        self.flush_counters();
        for client_id in std::mem::take(&mut self.refill_later) {
            self.sync_session(&client_id, now);
        }
        self.retained_versions.prune(now);
        while let Some((id, kind)) = self.timers.pop_due(now) {
            if let Some(s) = self.sessions.get_mut(kind.client_id()) {
                for slot in [&mut s.will_timer, &mut s.expiry_timer] {
                    if *slot == Some(id) {
                        *slot = None;
                    }
                }
            }
            self.fire(kind, now);
        }
    }

    fn fire(&mut self, kind: TimerKind, now: Instant) {
        match kind {
            TimerKind::Will { client_id, epoch } => {
                let will = match self.sessions.get_mut(&client_id) {
                    Some(s) if s.epoch == epoch && !s.is_online() => s.will.take(),
                    _ => None,
                };
                if let Some(w) = will {
                    // The stored record loses the will too, or a restart would publish it
                    // again. Its offline time stays (about) when the client went away.
                    let away_since = now
                        .checked_sub(Duration::from_secs(w.delay_s as u64))
                        .unwrap_or(now);
                    self.publish_will(w, now);
                    self.write_session_record(&client_id, away_since);
                }
            }
            TimerKind::Expire { client_id, epoch } => {
                let due = matches!(self.sessions.get(&client_id),
                    Some(s) if s.epoch == epoch && !s.is_online());
                if due {
                    self.stats.sessions_expired += 1;
                    self.end_session(&client_id, now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn will(id: &str) -> TimerKind {
        TimerKind::Will {
            client_id: MqttStr::new(id).unwrap(),
            epoch: 1,
        }
    }

    #[test]
    fn timers_fire_in_due_order_and_cancelled_ones_never() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut t = Timers::default();
        let b = t.add(t0 + s(2), will("b"));
        let _a = t.add(t0 + s(1), will("a"));
        let c = t.add(t0 + s(3), will("c"));
        t.cancel(c);
        assert_eq!(t.pop_due(t0), None, "nothing due yet");
        assert_eq!(t.pop_due(t0 + s(10)).map(|(_, k)| k), Some(will("a")));
        assert_eq!(t.pop_due(t0 + s(10)), Some((b, will("b"))));
        assert_eq!(t.pop_due(t0 + s(10)), None, "the cancelled one is skipped");
        assert_eq!(t.held(), 0);
    }

    #[test]
    fn cancelled_entries_do_not_pile_up() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let mut last = None;
        for i in 0..10_000u64 {
            // One live timer, replaced over and over (a client coming and going).
            if let Some(old) = last {
                t.cancel(old);
            }
            last = Some(t.add(t0 + Duration::from_secs(60 + i), will("x")));
        }
        assert!(t.held() <= 2 + 64 + 1, "heap of {}", t.held());
    }
}
