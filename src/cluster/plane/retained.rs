//! Retained messages for a node that has just started: it asks one linked node for every
//! retained message that node holds (with the version of each write) and keeps those
//! newer than its own. A node that starts alone has nothing to ask; a node never sends
//! its own set unasked (one that comes back with an old disk would spread what the others
//! deleted meanwhile).

use super::*;
use crate::session::SharedMessage;
use crate::shard::event::RetainVersion;

/// How long a node asked for its retained messages may take to send them all.
const RETAINED_WAIT: Duration = Duration::from_secs(30);

/// Where the start's retained sync stands.
#[derive(Debug, Default)]
pub(super) struct RetainedSync {
    /// The node asked and until when it may take, until its `RETAINED_END` (or its link
    /// goes down, or the time is up: another is asked).
    asked: Option<(NodeIx, Instant)>,
    /// Nodes asked whose answer did not come in time (not asked again).
    gave_up: hashbrown::HashSet<NodeIx>,
    /// The sync is over (or there was no one to ask).
    done: bool,
    /// Retained messages received in the sync.
    received: u64,
    /// The nodes whose request is being read on a shard (one at a time each).
    serving: hashbrown::HashSet<NodeIx>,
}

impl Plane {
    /// On each pass once the start's route sync is over: ask one linked node, or, with no
    /// other live member, note that there is nothing to ask.
    pub(super) fn retained_sync_tick(&mut self) {
        if self.retained.done || self.gate.is_some() {
            return;
        }
        let now = Instant::now();
        if let Some((n, until)) = self.retained.asked {
            if now < until {
                return;
            }
            // A node that does not know the request (an older version), or is stuck.
            tracing::warn!(node = %self.names[n as usize], "no retained messages from a node within {RETAINED_WAIT:?}: asking another");
            self.retained.gave_up.insert(n);
            self.retained.asked = None;
        }
        let next = self
            .links
            .keys()
            .filter(|n| !self.retained.gave_up.contains(*n))
            .min()
            .copied();
        match next {
            Some(n) => {
                wire::retained_wanted(self.buf(n));
                self.retained.asked = Some((n, now + RETAINED_WAIT));
            }
            None if self.live_others().is_empty() => self.retained.done = true,
            None if !self.retained.gave_up.is_empty()
                && self.links.len() <= self.retained.gave_up.len() =>
            {
                tracing::warn!("no linked node sent its retained messages: going on without them");
                self.retained.done = true;
            }
            None => {}
        }
    }

    fn asked(&self, n: NodeIx) -> bool {
        self.retained.asked.is_some_and(|(a, _)| a == n)
    }

    /// The link to `n` went down: if it was asked, the next pass asks another.
    pub(super) fn retained_link_down(&mut self, n: NodeIx) {
        if self.asked(n) {
            self.retained.asked = None;
        }
        self.retained.serving.remove(&n);
    }

    /// `n` asks for this node's retained messages: read on shard 0 (every shard holds
    /// them all); one request per node at a time.
    pub(super) fn retained_wanted(&mut self, n: NodeIx) {
        if self.retained.serving.insert(n) {
            self.post(0, FromCluster::RetainedWanted { node: n });
        }
    }

    /// The set a shard read for `n`: sent, at most half the link's buffer bound of it, less
    /// what the link holds already (past it the rest is left out, said in `RETAINED_END`
    /// and counted).
    pub(super) fn send_retained(&mut self, n: NodeIx, items: Vec<(SharedMessage, RetainVersion)>) {
        self.retained.serving.remove(&n);
        if !self.links.contains_key(&n) {
            return;
        }
        let queued = self
            .links
            .get(&n)
            .map_or(0, |l| l.queued.load(Ordering::Acquire));
        let budget = (self.limits.link_buffer_bytes_max / 2).saturating_sub(queued);
        let now = Instant::now();
        let total = items.len();
        let mut sent = 0;
        let b = self.buf(n);
        for (msg, version) in items {
            if b.len() >= budget {
                break;
            }
            wire::retained(b, version, &msg, now);
            sent += 1;
        }
        let cut_short = sent < total;
        wire::retained_end(b, cut_short);
        if cut_short {
            self.counters.retained_sync_cut_short_total += 1;
            tracing::warn!(node = %self.names[n as usize], sent, total, "retained messages for a starting node cut short at half of cluster.link_buffer_bytes_max");
        }
    }

    /// One retained message from the node asked: kept on this node's shards if newer.
    pub(super) fn retained_from(&mut self, n: NodeIx, version: RetainVersion, msg: SharedMessage) {
        if !self.asked(n) {
            self.counters.bad_frames_total += 1;
            return;
        }
        self.retained.received += 1;
        self.counters.retained_synced_total += 1;
        let shard = (stable_hash(msg.topic.as_bytes()) % self.shards as u64) as usize;
        self.post(shard, FromCluster::Retained { msg, version });
    }

    /// The node asked has sent all it holds (or all that fit).
    pub(super) fn retained_end(&mut self, n: NodeIx, cut_short: bool) {
        if !self.asked(n) {
            self.counters.bad_frames_total += 1;
            return;
        }
        self.retained.asked = None;
        self.retained.done = true;
        let node = &self.names[n as usize];
        if cut_short {
            tracing::warn!(node = %node, received = self.retained.received, "retained messages from a node at start: not all of them (its link's buffer bound)");
        } else {
            tracing::info!(node = %node, received = self.retained.received, "retained messages from a node at start");
        }
    }
}
