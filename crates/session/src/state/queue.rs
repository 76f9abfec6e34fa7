//! A session's queue: delivering or queueing a message (QoS 2 dedup keys, limits and policies,
//! the broker-wide budget), the part kept in memory and the part read back from disk.

use super::*;

impl Session {
    /// Hands a message to the session: sent now if online and the window allows, queued
    /// otherwise, or dropped per the queue policy. A persistent session skips a QoS 2 message
    /// resent (DUP) by its publisher when it holds the message's key, and records the key of
    /// one it takes.
    pub fn deliver(&mut self, d: Delivery, limits: &SessionLimits, now: Instant) -> DeliverOutcome {
        let Some(key) = self.dedup_key(&d) else {
            return self.deliver_now(d, limits, now);
        };
        let (origin, id) = key;
        let held = (origin, id.packet_id);
        if id.dup && self.qos2_keys.contains(&held) {
            return DeliverOutcome::Duplicate;
        }
        let outcome = self.deliver_now(d, limits, now);
        if matches!(outcome, DeliverOutcome::Sent | DeliverOutcome::Queued)
            && !self.qos2_keys.contains(&held)
        {
            // A DUP = 0 PUBLISH whose key is held already (a stale key left by a crash) is a
            // new message: delivered above, and the key stays.
            let (origin, packet_id) = held;
            self.record(StoreOp::DedupPut {
                origin: origin.clone(),
                packet_id,
            });
            self.qos2_keys.insert((origin, packet_id));
        }
        outcome
    }

    /// The dedup key of a delivery, for a persistent session: only a client's QoS 2 message
    /// as routed from its publisher (not through a shared subscription, whose member is
    /// picked anew on a resend, and not a retained copy).
    pub(super) fn dedup_key(&self, d: &Delivery) -> Option<(MqttStr, Qos2Id)> {
        if !self.persistent || d.via_share.is_some() {
            return None;
        }
        let id = d.msg.qos2_id?;
        Some((d.msg.origin.clone()?, id))
    }

    /// Whether the session holds the dedup key of publisher `origin`'s message `packet_id`.
    pub fn holds_qos2(&self, origin: &MqttStr, packet_id: u16) -> bool {
        self.qos2_keys.contains(&(origin.clone(), packet_id))
    }

    /// The dedup keys the session holds.
    pub fn qos2_keys(&self) -> impl Iterator<Item = &(MqttStr, u16)> {
        self.qos2_keys.iter()
    }

    /// Forgets a dedup key (its publisher released the message); records the deletion.
    pub fn forget_qos2(&mut self, origin: &MqttStr, packet_id: u16) -> bool {
        let removed = self.qos2_keys.remove(&(origin.clone(), packet_id));
        if removed {
            self.record(StoreOp::DedupDelete {
                origin: origin.clone(),
                packet_id,
            });
        }
        removed
    }

    /// Restores dedup keys read back from disk (nothing is recorded).
    pub fn restore_qos2_keys(&mut self, keys: impl IntoIterator<Item = (MqttStr, u16)>) {
        self.qos2_keys.extend(keys);
    }

    pub(super) fn deliver_now(
        &mut self,
        d: Delivery,
        limits: &SessionLimits,
        now: Instant,
    ) -> DeliverOutcome {
        if d.msg.remaining_expiry(now).is_err() {
            self.stats.dropped_expired += 1;
            return DeliverOutcome::Dropped(DropReason::Expired);
        }
        match &self.link {
            Some(link) => {
                let window_free =
                    self.inflight.len() < self.window(limits) && self.queue.is_empty();
                let buffer_free =
                    link.out.pending_bytes() < limits.outbound_buffer_bytes_max as usize;
                if d.qos == QoS::AtMostOnce {
                    if !buffer_free {
                        self.stats.dropped_qos0_slow += 1;
                        return DeliverOutcome::Dropped(DropReason::SlowConsumer);
                    }
                    return match self.send_publish(&d, None, false, now) {
                        Ok(()) => DeliverOutcome::Sent,
                        Err(r) => DeliverOutcome::Dropped(r),
                    };
                }
                if window_free && buffer_free {
                    return self.send_inflight(d, now);
                }
                if !buffer_free {
                    link.out.mark_starved();
                }
                self.enqueue(d, limits)
            }
            None => {
                if d.qos == QoS::AtMostOnce && !limits.queue_qos0_offline {
                    self.stats.dropped_qos0_offline += 1;
                    return DeliverOutcome::Dropped(DropReason::Offline);
                }
                self.enqueue(d, limits)
            }
        }
    }

    pub(super) fn window(&self, limits: &SessionLimits) -> usize {
        let client = self.link.as_ref().map_or(u16::MAX, |l| l.receive_maximum);
        limits.inflight_max.min(client) as usize
    }

    pub(super) fn enqueue(&mut self, d: Delivery, limits: &SessionLimits) -> DeliverOutcome {
        if self.persistent && limits.storage_budget_spent {
            self.stats.dropped_storage_budget += 1;
            return DeliverOutcome::Dropped(DropReason::StorageBudget);
        }
        let cost = d.msg.cost_bytes();
        if cost > limits.queue_bytes_max {
            self.note_queue_full();
            return DeliverOutcome::Dropped(DropReason::QueueFull);
        }
        while self.queued_messages() >= limits.queue_messages_max as u64
            || self.queued_bytes() + cost > limits.queue_bytes_max
        {
            self.note_queue_full();
            match limits.queue_policy {
                QueuePolicy::RejectNewest => {
                    return DeliverOutcome::Dropped(DropReason::QueueFull);
                }
                QueuePolicy::DropOldest => self.drop_oldest(),
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.record(StoreOp::QueuePush {
            seq,
            delivery: d.clone(),
        });
        let on_disk_only = self.persistent
            && (self.spilled_from.is_some()
                || self.link.is_none()
                || self.queue.len() >= QUEUE_MEMORY_WINDOW);
        if on_disk_only {
            self.spilled_from.get_or_insert(seq);
            self.spilled_len += 1;
            self.spilled_bytes += cost;
        } else {
            self.queue_bytes += cost;
            debug_assert!(
                self.queue.back().is_none_or(|q| q.seq < seq),
                "queue sequence numbers go up"
            );
            self.queue.push_back(Queued { seq, delivery: d });
        }
        DeliverOutcome::Queued
    }

    /// Ends a full period once the queue is back under 90% of both limits (so that a queue
    /// hovering at its limit, a slow consumer taking one message at a time, does not log
    /// twice per message), leaving a [`QueueNote::Room`]. The shard calls it after every
    /// change of the session.
    pub fn check_queue_room(&mut self, limits: &SessionLimits) {
        let Some(since) = self.full_since_drops else {
            return;
        };
        let below = |used: u64, max: u64| used.saturating_mul(10) <= max.saturating_mul(9);
        if below(self.queued_messages(), limits.queue_messages_max as u64)
            && below(self.queued_bytes(), limits.queue_bytes_max)
        {
            self.full_since_drops = None;
            self.queue_notes.push(QueueNote::Room {
                dropped: self.stats.dropped_queue_full - since,
            });
        }
    }

    /// Counts one message refused or pushed out by the queue limits; the first of a full
    /// period leaves a [`QueueNote::Full`].
    pub(super) fn note_queue_full(&mut self) {
        if self.full_since_drops.is_none() {
            self.full_since_drops = Some(self.stats.dropped_queue_full);
            self.queue_notes.push(QueueNote::Full);
        }
        self.stats.dropped_queue_full += 1;
    }

    /// Removes the oldest queued message (memory first; on disk, its size is taken as the
    /// average of what is there, so the byte count stays an estimate until refilled).
    pub(super) fn drop_oldest(&mut self) {
        if let Some(q) = self.queue.pop_front() {
            self.queue_bytes = take_bytes(self.queue_bytes, q.delivery.msg.cost_bytes());
            self.record(StoreOp::QueueDelete { seq: q.seq });
        } else if let Some(from) = self.spilled_from {
            let avg = self.spilled_bytes / self.spilled_len.max(1);
            self.spilled_len -= 1;
            self.spilled_bytes = if self.spilled_len == 0 {
                0
            } else {
                self.spilled_bytes.saturating_sub(avg)
            };
            self.spilled_from = (self.spilled_len > 0).then_some(from + 1);
            self.record(StoreOp::QueueDelete { seq: from });
        }
    }

    /// Where to read the queue back from disk, and how many, when the memory window runs
    /// low while the client is online.
    pub fn needs_refill(&self) -> Option<(u64, usize)> {
        let from = self.spilled_from?;
        (self.link.is_some() && self.queue.len() < QUEUE_MEMORY_WINDOW / 2)
            .then_some((from, QUEUE_MEMORY_WINDOW - self.queue.len()))
    }

    /// Takes queue entries read back from disk (in order, starting at the `needs_refill`
    /// position). Entries the store could not read are skipped: fewer than asked, or none,
    /// ends the spill at what was read.
    pub fn refill(&mut self, entries: Vec<(u64, Delivery)>, asked: usize) {
        let got = entries.len();
        let mut last = None;
        for (seq, delivery) in entries {
            let cost = delivery.msg.cost_bytes();
            self.spilled_len = self.spilled_len.saturating_sub(1);
            self.spilled_bytes = self.spilled_bytes.saturating_sub(cost);
            self.queue_bytes += cost;
            debug_assert!(
                self.queue.back().is_none_or(|q| q.seq < seq),
                "queue read back in sequence order"
            );
            self.queue.push_back(Queued { seq, delivery });
            last = Some(seq);
        }
        match last {
            Some(l) if got == asked && l + 1 < self.next_seq => self.spilled_from = Some(l + 1),
            _ => {
                self.spilled_from = None;
                self.spilled_len = 0;
                self.spilled_bytes = 0;
            }
        }
    }

    /// Restores the durable state of a session read back at start: the queue's extent on
    /// disk and the messages in flight.
    pub fn restore(
        &mut self,
        queue_first_seq: u64,
        queue_next_seq: u64,
        queue_len: u64,
        queue_bytes: u64,
        inflight: Vec<Inflight>,
    ) {
        self.next_seq = queue_next_seq;
        if queue_len > 0 {
            self.spilled_from = Some(queue_first_seq);
            self.spilled_len = queue_len;
            self.spilled_bytes = queue_bytes;
        }
        self.inflight = inflight.into();
        self.ids_in_flight = None;
    }
}
