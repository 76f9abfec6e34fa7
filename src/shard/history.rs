//! The shard's recent traffic, for the dashboard's rate charts: its counters sampled once
//! per [`RATE_STEP_MS`] of wall-clock time, the last [`RATE_POINTS`] samples kept (ten
//! minutes). Samples are keyed by their step number (unix time / step), so that the admin
//! endpoint can add up the shards' samples of the same step.

use std::collections::VecDeque;

use serde::Serialize;

/// Milliseconds between two samples.
pub const RATE_STEP_MS: u64 = 2_000;
/// Samples kept (ten minutes' worth).
pub const RATE_POINTS: usize = 300;

/// The shard's counters at the start of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RatePoint {
    /// Unix time / [`RATE_STEP_MS`].
    pub step: u64,
    /// PUBLISH packets received from clients, since the start.
    pub received: u64,
    /// Messages delivered to clients, since the start.
    pub sent: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A ring of at most [`RATE_POINTS`] samples, one per step.
#[derive(Debug, Default)]
pub struct RateHistory {
    points: VecDeque<RatePoint>,
}

impl RateHistory {
    /// Whether a sample is due at `unix_ms` (the step changed since the last one).
    pub fn due(&self, unix_ms: u64) -> bool {
        self.points
            .back()
            .is_none_or(|p| p.step != unix_ms / RATE_STEP_MS)
    }

    /// Records the counters of the step `unix_ms` falls in (the first sample of a step
    /// stands; a clock that went back starts the history again).
    pub fn note(&mut self, unix_ms: u64, mut point: RatePoint) {
        point.step = unix_ms / RATE_STEP_MS;
        match self.points.back_mut() {
            Some(last) if last.step == point.step => {}
            Some(last) if last.step > point.step => {
                self.points.clear();
                self.points.push_back(point);
            }
            _ => {
                if self.points.len() == RATE_POINTS {
                    self.points.pop_front();
                }
                self.points.push_back(point);
            }
        }
    }

    pub fn points(&self) -> Vec<RatePoint> {
        self.points.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(received: u64) -> RatePoint {
        RatePoint {
            received,
            ..RatePoint::default()
        }
    }

    #[test]
    fn one_sample_per_step_and_a_bounded_ring() {
        let mut h = RateHistory::default();
        assert!(h.due(0));
        h.note(100, at(1));
        assert!(!h.due(RATE_STEP_MS - 1));
        h.note(RATE_STEP_MS - 1, at(2));
        assert_eq!(
            h.points(),
            vec![at(1)],
            "the counters at the start of the step"
        );
        for i in 1..(RATE_POINTS as u64 + 10) {
            assert!(h.due(i * RATE_STEP_MS));
            h.note(i * RATE_STEP_MS, at(i));
        }
        let p = h.points();
        assert_eq!(p.len(), RATE_POINTS);
        assert_eq!(p.last().unwrap().step, RATE_POINTS as u64 + 9);
        assert!(p.windows(2).all(|w| w[1].step == w[0].step + 1));
        // The wall clock went back: the history starts again.
        h.note(5, at(7));
        assert_eq!(h.points().len(), 1);
    }
}
