//! Cross-shard round trips, typed. An operation that needs other shards (or this shard's
//! group commit) before it can finish starts a [`RoundTrip`]: how many answers it expects,
//! and its [`Completion`], a value of the operation's own type holding what it needs to
//! finish. Answers ([`Event::Ack`], and the local waiters of the durable log) are counted
//! here, whatever the operation; when the last one is in, [`Core::complete`] hands the
//! completion, with what the answers said (any failure; what the sessions did with a
//! message), to the operation's own finishing step.
//!
//! The operations: a SUBACK waiting for index updates and group joins ([`SubAckDone`]); a
//! group join or shared message relayed for another shard (`Relay`); a held PUBACK, PUBREC
//! or PUBCOMP ([`PubAckDone`]); a session re-homed to its new owner (`Rehome`).

use super::*;

/// A round trip under way.
#[derive(Debug)]
pub(super) struct RoundTrip {
    /// Answers still expected.
    remaining: usize,
    /// Whether an answer said its shard could not store what was asked.
    failed: bool,
    /// What the sessions reached so far did with the message (routed messages).
    fate: Fate,
    done: Completion,
}

/// What a round trip finishes with: one variant per operation.
#[derive(Debug)]
pub(super) enum Completion {
    SubAck(SubAckDone),
    /// Answer `token` to shard `to` with what the answers said.
    Relay {
        to: usize,
        token: Token,
    },
    PubAck(PubAckDone),
    /// Delete the local copy of a session once its new owner has stored it.
    Rehome {
        client_id: String,
    },
    /// Answer message `id` of another node (see `cluster.rs`).
    Node {
        node: cluster::NodeIx,
        id: u64,
    },
}

/// A SUBACK held until the index additions and group joins it depends on are applied on
/// every shard (and the subscription is durable).
#[derive(Debug)]
pub(super) struct SubAckDone {
    pub client_id: MqttStr,
    pub conn_id: u64,
    pub suback: SubAck,
    /// Retained messages to send after the SUBACK.
    pub retained: Vec<Delivery>,
    /// Filters whose index additions this SUBACK waits for (see `RoutingIndex::begin_adding`).
    pub adding: Vec<Arc<str>>,
}

/// A PUBACK/PUBREC/PUBCOMP held on the publisher's link until every shard that stored the
/// message for a persistent session (or forgot its dedup key) and this shard's own writes
/// are durable; then `then`.
#[derive(Debug)]
pub(super) struct PubAckDone {
    pub client_id: MqttStr,
    pub conn_id: u64,
    pub then: Then,
}

/// What a [`PubAckDone`] does once its round trips are done, before the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Then {
    /// Send it.
    Ack,
    /// PUBREC: every copy of the QoS 2 message `pid` is durable. With `store`, store the
    /// packet id (the publisher's session is persistent) and send PUBREC once that is
    /// durable too. On failure, forget the id, so that a resend is routed again. `dup`:
    /// the PUBLISH was a resend (an earlier try may be held where this one failed).
    Qos2Received { pid: u16, store: bool, dup: bool },
    /// PUBCOMP: every shard forgot the message's dedup key; delete the stored packet id and
    /// send PUBCOMP once that is durable.
    DeleteIncoming(u16),
}

impl RoundTrip {
    /// A round trip that waits for `answers` answers.
    pub(super) fn new(answers: usize, done: Completion) -> RoundTrip {
        debug_assert!(answers > 0, "a round trip with nothing to wait for");
        RoundTrip {
            remaining: answers,
            failed: false,
            fate: Fate::default(),
            done,
        }
    }

    /// Starts from what this shard's own sessions already did with the message.
    pub(super) fn with_fate(mut self, fate: Fate) -> RoundTrip {
        self.fate = fate;
        self
    }

    /// Starts failed when `failed` (a part of the operation already failed).
    pub(super) fn with_failure(mut self, failed: bool) -> RoundTrip {
        self.failed |= failed;
        self
    }

    /// Counts one answer; `true` when it was the last.
    fn answer(&mut self, ok: bool, fate: Fate) -> bool {
        debug_assert!(self.remaining > 0, "more answers than asked for");
        self.remaining = self.remaining.saturating_sub(1);
        self.failed |= !ok;
        self.fate.merge(fate);
        self.remaining == 0
    }
}

impl Core {
    /// Registers a round trip under `token` (fresh from [`Core::token`]).
    pub(super) fn begin(&mut self, token: Token, trip: RoundTrip) {
        let old = self.pending.insert(token, trip);
        debug_assert!(old.is_none(), "token {token} in use twice");
    }

    /// One answer to the round trip of `token` (from another shard, or the local waiter of
    /// the durable log); the last one completes it.
    pub(super) fn on_ack(&mut self, token: Token, ok: bool, fate: Fate, now: Instant) {
        let Some(trip) = self.pending.get_mut(&token) else {
            return;
        };
        if !trip.answer(ok, fate) {
            return;
        }
        if let Some(trip) = self.pending.remove(&token) {
            self.complete(token, trip, now);
        }
    }

    /// The round trip of the first routing of `client_id`'s QoS 2 message `pid` while it is
    /// still under way (whether every copy is stored is not known yet, and the PUBREC
    /// waits for it), with the acknowledgement it holds.
    pub(super) fn qos2_routing(
        &mut self,
        client_id: &MqttStr,
        pid: u16,
    ) -> Option<(Token, &mut PubAckDone)> {
        self.pending
            .iter_mut()
            .find_map(|(token, trip)| match &mut trip.done {
                Completion::PubAck(p)
                    if p.client_id == *client_id
                        && matches!(p.then, Then::Qos2Received { pid: x, .. } if x == pid) =>
                {
                    Some((*token, p))
                }
                _ => None,
            })
    }

    /// Hands a finished round trip to its operation's last step.
    fn complete(&mut self, token: Token, trip: RoundTrip, now: Instant) {
        let RoundTrip {
            failed, fate, done, ..
        } = trip;
        match done {
            Completion::SubAck(s) => {
                for f in &s.adding {
                    self.index.end_adding(f);
                }
                self.finish_suback(&s.client_id, s.conn_id, s.suback, s.retained, now)
            }
            Completion::Relay { to, token } => self.send(
                to,
                Event::Ack {
                    token,
                    ok: !failed,
                    fate,
                },
            ),
            Completion::PubAck(p) => self.finish_pub_ack(token, p, failed, fate, now),
            Completion::Node { node, id } => self.answer_node(node, id, !failed, fate),
            Completion::Rehome { client_id } => {
                if failed {
                    tracing::error!(client = %client_id, "re-homing failed; the session stays here until the next start");
                } else {
                    self.write(|b| b.delete_session(&client_id));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_failures_kept_and_fates_merged() {
        let mut t = RoundTrip::new(3, Completion::Relay { to: 1, token: 9 }).with_fate(Fate {
            kept: true,
            ..Fate::default()
        });
        assert!(!t.answer(true, Fate::default()));
        assert!(!t.answer(
            false,
            Fate {
                queue_full: true,
                ..Fate::default()
            }
        ));
        assert!(t.answer(true, Fate::default()));
        assert!(t.failed);
        assert_eq!(
            (t.fate.kept, t.fate.queue_full, t.fate.budget_spent),
            (true, true, false)
        );
    }
}
