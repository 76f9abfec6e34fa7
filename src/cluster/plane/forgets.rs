//! QoS 2 keys that sessions moving away from this node forget after they were read for the
//! move (their publishers released them), and where each must follow its session
//! (ARCHITECTURE.md, "Moving sessions", step 3): out of the records of a session not sent
//! yet; to the node a session went to, as a `FORGET` frame; or, before the move has reached
//! the plane, out of every session the move read before the key went.

use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};

use super::NodeIx;
use crate::protocol::MqttStr;

/// How long the plane remembers where a moved session went: its old owner lets it go once
/// the slot table says so, within seconds of the move.
pub(super) const MOVED_TO_TTL: Duration = Duration::from_secs(120);

/// A move reaches the plane within its read's bound (10 s) of the read: an early forget
/// older than this has no move left to apply to.
const EARLY_TTL: Duration = Duration::from_secs(60);

/// Where one forgotten key goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// To the node the session went to (a `FORGET` after the session, on the same link).
    Send(NodeIx),
    /// Kept, to come out of the session's records when they are sent.
    Held,
    /// Over the bound: the moved copy may keep it, stale.
    Lost,
}

/// The plane's record of keys forgotten by moving sessions (see the module docs). Each of
/// its maps holds at most `max` entries (`cluster.missed_releases_max`).
#[derive(Debug)]
pub(super) struct MovedForgets {
    max: usize,
    /// Where the sessions of recent moves went, and when they were sent.
    moved_to: HashMap<String, (NodeIx, Instant)>,
    /// The move under way: keys forgotten by its sessions not sent yet (or by sessions of
    /// no move), by client.
    unsent: HashMap<String, Vec<(MqttStr, u16)>>,
    unsent_count: usize,
    /// No move under way: keys forgotten since, with the latest time each was.
    early: HashMap<(MqttStr, u16), Instant>,
}

impl MovedForgets {
    pub fn new(max: usize) -> MovedForgets {
        MovedForgets {
            max,
            moved_to: HashMap::new(),
            unsent: HashMap::new(),
            unsent_count: 0,
            early: HashMap::new(),
        }
    }

    /// `client_id`'s session forgot (`origin`, `packet_id`) at `at`; `moving`: a move is
    /// under way on the plane.
    pub fn forget(
        &mut self,
        client_id: &str,
        origin: MqttStr,
        packet_id: u16,
        at: Instant,
        moving: bool,
    ) -> Route {
        if let Some((n, _)) = self.moved_to.get(client_id) {
            return Route::Send(*n);
        }
        if moving {
            if self.unsent_count >= self.max {
                return Route::Lost;
            }
            self.unsent_count += 1;
            self.unsent
                .entry(client_id.to_owned())
                .or_default()
                .push((origin, packet_id));
            return Route::Held;
        }
        let key = (origin, packet_id);
        if self.early.len() >= self.max && !self.early.contains_key(&key) {
            self.early.retain(|_, t| t.elapsed() < EARLY_TTL);
            if self.early.len() >= self.max {
                return Route::Lost;
            }
        }
        let t = self.early.entry(key).or_insert(at);
        *t = (*t).max(at);
        Route::Held
    }

    /// A move whose sessions were read at `read_at` reaches the plane: the keys forgotten
    /// since, to take out of every one of its sessions (a release takes a key from all its
    /// holders, and a moving session takes no new key).
    pub fn begin(&mut self, read_at: Instant) -> HashSet<(MqttStr, u16)> {
        self.end();
        std::mem::take(&mut self.early)
            .into_iter()
            .filter(|(_, t)| *t >= read_at)
            .map(|(k, _)| k)
            .collect()
    }

    /// The move under way is over (done or failed).
    pub fn end(&mut self) {
        self.unsent.clear();
        self.unsent_count = 0;
    }

    /// `client_id`'s session is sent to `node` now: the keys it forgot meanwhile, to take
    /// out of its records first.
    pub fn sent(&mut self, client_id: &str, node: NodeIx, now: Instant) -> Vec<(MqttStr, u16)> {
        if self.moved_to.len() >= self.max {
            self.prune(now);
        }
        // Past the bound (a move of more sessions than it within MOVED_TO_TTL), the oldest
        // entries would be the ones to go; the newest are the ones forgets still reach.
        if self.moved_to.len() < self.max {
            self.moved_to.insert(client_id.to_owned(), (node, now));
        }
        match self.unsent.remove(client_id) {
            Some(keys) => {
                self.unsent_count -= keys.len();
                keys
            }
            None => Vec::new(),
        }
    }

    /// `client_id`'s session is back here (moved or rebuilt): its forgets stay here.
    pub fn back(&mut self, client_id: &str) {
        self.moved_to.remove(client_id);
    }

    /// Forgets where sessions went longer than [`MOVED_TO_TTL`] ago.
    pub fn prune(&mut self, now: Instant) {
        if !self.moved_to.is_empty() {
            self.moved_to
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < MOVED_TO_TTL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(s: &str) -> MqttStr {
        MqttStr::new(s).unwrap()
    }

    #[test]
    fn a_key_forgotten_before_the_move_comes_is_taken_out_only_if_after_the_read() {
        let mut f = MovedForgets::new(16);
        let read_at = Instant::now();
        let before = read_at - Duration::from_millis(5);
        let after = read_at + Duration::from_millis(5);
        assert_eq!(f.forget("s", o("p"), 1, before, false), Route::Held);
        assert_eq!(f.forget("t", o("p"), 2, after, false), Route::Held);
        // The same key again, later: its latest time counts.
        assert_eq!(f.forget("s", o("q"), 3, before, false), Route::Held);
        assert_eq!(f.forget("t", o("q"), 3, after, false), Route::Held);
        let keys = f.begin(read_at);
        let want: HashSet<(MqttStr, u16)> = [(o("p"), 2), (o("q"), 3)].into_iter().collect();
        assert_eq!(keys, want);
        // Taken: the next move starts empty.
        assert!(f.begin(before).is_empty());
    }

    #[test]
    fn a_key_forgotten_during_the_move_follows_its_session_whether_sent_or_not() {
        let mut f = MovedForgets::new(16);
        let now = Instant::now();
        assert!(f.begin(now).is_empty());
        // Not sent yet: kept for its session.
        assert_eq!(f.forget("s", o("p"), 1, now, true), Route::Held);
        assert_eq!(f.forget("s", o("p"), 2, now, true), Route::Held);
        assert!(f.sent("other", 4, now).is_empty());
        assert_eq!(f.sent("s", 4, now), vec![(o("p"), 1), (o("p"), 2)]);
        // Sent: to the node it went to, during the move and after it.
        assert_eq!(f.forget("s", o("p"), 3, now, true), Route::Send(4));
        f.end();
        assert_eq!(f.forget("other", o("p"), 3, now, false), Route::Send(4));
        // Back here (moved back, or rebuilt): no longer sent anywhere.
        f.back("s");
        assert_eq!(f.forget("s", o("p"), 4, now, false), Route::Held);
        // Where it went is forgotten after MOVED_TO_TTL.
        f.prune(now + MOVED_TO_TTL);
        assert_eq!(f.forget("other", o("p"), 5, now, true), Route::Held);
    }

    #[test]
    fn forgets_past_the_bound_are_lost_not_kept() {
        let mut f = MovedForgets::new(2);
        let now = Instant::now();
        assert_eq!(f.forget("s", o("p"), 1, now, true), Route::Held);
        assert_eq!(f.forget("s", o("p"), 2, now, true), Route::Held);
        assert_eq!(f.forget("s", o("p"), 3, now, true), Route::Lost);
        assert_eq!(f.sent("s", 1, now).len(), 2);
        // Room again once its session went.
        assert_eq!(f.forget("u", o("p"), 3, now, true), Route::Held);
        f.end();
        // Early ones: distinct keys bounded too (the same key again takes no room).
        assert_eq!(f.forget("a", o("p"), 1, now, false), Route::Held);
        assert_eq!(f.forget("b", o("p"), 2, now, false), Route::Held);
        assert_eq!(f.forget("c", o("p"), 2, now, false), Route::Held);
        assert_eq!(f.forget("d", o("p"), 3, now, false), Route::Lost);
        // Where sessions went: bounded as well (the newest past the bound are not kept).
        let mut g = MovedForgets::new(1);
        g.sent("s", 1, now);
        g.sent("t", 2, now);
        assert_eq!(g.forget("s", o("p"), 1, now, false), Route::Send(1));
        assert_eq!(g.forget("t", o("p"), 1, now, false), Route::Held);
    }
}
