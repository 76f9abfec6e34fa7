//! Retained messages for a node that has just started: it asks one linked node for every
//! retained message that node holds (with the version of each write) and keeps those
//! newer than its own. A node that starts alone has nothing to ask; a node never sends
//! its own set unasked (one that comes back with an old disk would spread what the others
//! deleted meanwhile).

use super::*;
use crate::session::SharedMessage;
use crate::shard::event::RetainVersion;

/// Where the start's retained sync stands.
#[derive(Debug, Default)]
pub(super) struct RetainedSync {
    /// The node asked, until its `RETAINED_END` (or its link goes down: another is asked).
    asked: Option<NodeIx>,
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
        if self.retained.done || self.retained.asked.is_some() || self.gate.is_some() {
            return;
        }
        match self.links.keys().min().copied() {
            Some(n) => {
                wire::retained_wanted(self.buf(n));
                self.retained.asked = Some(n);
            }
            None if self.live_others().is_empty() => self.retained.done = true,
            None => {}
        }
    }

    /// The link to `n` went down: if it was asked, the next pass asks another.
    pub(super) fn retained_link_down(&mut self, n: NodeIx) {
        if self.retained.asked == Some(n) {
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

    /// The set a shard read for `n`: sent, at most half the link's buffer bound of it
    /// (past it the rest is left out, said in `RETAINED_END` and counted).
    pub(super) fn send_retained(&mut self, n: NodeIx, items: Vec<(SharedMessage, RetainVersion)>) {
        self.retained.serving.remove(&n);
        if !self.links.contains_key(&n) {
            return;
        }
        let budget = self.limits.link_buffer_bytes_max / 2;
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
        if self.retained.asked != Some(n) {
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
        if self.retained.asked != Some(n) {
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
