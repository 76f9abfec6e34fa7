//! Timers: one will-delay and one session-expiry timer at most per offline session, in a
//! heap compacted as timers are replaced or cancelled.

use super::*;

impl Core {
    /// Sets a session's will or expiry timer, replacing the one it had of that kind: a
    /// client id holds at most one timer of each kind, however often it comes and goes.
    pub(super) fn schedule(&mut self, at: Instant, kind: TimerKind) {
        let id = self.next_timer;
        self.next_timer += 1;
        let (client_id, will) = match &kind {
            TimerKind::Will { client_id, .. } => (client_id, true),
            TimerKind::Expire { client_id, .. } => (client_id, false),
        };
        if let Some(s) = self.sessions.get_mut(client_id) {
            let slot = if will {
                &mut s.will_timer
            } else {
                &mut s.expiry_timer
            };
            if let Some(old) = slot.replace(id) {
                self.timer_kinds.remove(&old);
            }
        }
        self.timers.push(Reverse((at, id)));
        self.timer_kinds.insert(id, kind);
        self.compact_timers();
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
            self.timer_kinds.remove(&id);
        }
    }

    /// Drops the heap entries of cancelled timers once they are most of it, so that the
    /// heap holds at most about twice the live timers.
    pub(super) fn compact_timers(&mut self) {
        if self.timers.len() > 2 * self.timer_kinds.len() + 64 {
            let live = &self.timer_kinds;
            self.timers.retain(|Reverse((_, id))| live.contains_key(id));
        }
    }

    /// Timer entries held (live and cancelled ones not yet dropped).
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// Fires every timer due at `now`.
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
        if now.saturating_duration_since(self.last_prune) >= TOMBSTONE_KEEP {
            self.last_prune = now;
            self.prune_tombstones(now);
        }
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(kind) = self.timer_kinds.remove(&id) else {
                continue;
            };
            let (TimerKind::Will { client_id, .. } | TimerKind::Expire { client_id, .. }) = &kind;
            if let Some(s) = self.sessions.get_mut(client_id) {
                for slot in [&mut s.will_timer, &mut s.expiry_timer] {
                    if *slot == Some(id) {
                        *slot = None;
                    }
                }
            }
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

    // ---------------------------------------------------------------- packets
}
