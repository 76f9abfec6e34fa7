//! Fixed-bucket latency histograms for the per-shard counters. A shard runs on one thread,
//! so observing is a plain comparison loop and two integer adds: no atomics, no locks.

/// Upper bounds of the buckets, in microseconds (the last, `+Inf`, is implicit).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// Counts of observations per bucket (not cumulative; the exposition accumulates), their
/// sum and their number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `buckets[i]`: observations in `(LATENCY_BUCKETS_US[i-1], LATENCY_BUCKETS_US[i]]`; the
    /// last slot holds those above every bound.
    pub buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }

    /// `(upper bound in seconds or None for +Inf, cumulative count)` per bucket.
    pub fn cumulative(&self) -> impl Iterator<Item = (Option<f64>, u64)> + '_ {
        let mut acc = 0;
        self.buckets.iter().enumerate().map(move |(i, n)| {
            acc += n;
            let le = LATENCY_BUCKETS_US.get(i).map(|&us| us as f64 / 1e6);
            (le, acc)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn observations_land_in_their_bucket_and_accumulate() {
        let mut h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(5));
        assert_eq!(h.count, 3);
        assert_eq!(h.sum_us, 5_000_101);
        let c: Vec<(Option<f64>, u64)> = h.cumulative().collect();
        assert_eq!(c[0], (Some(0.00005), 1));
        assert_eq!(c[1], (Some(0.0001), 2));
        assert_eq!(c.last().copied(), Some((None, 3)));
        assert_eq!(c[c.len() - 2].1, 2);
    }
}
