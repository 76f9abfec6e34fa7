//! Per-connection inbound rate limits: a token bucket the reader charges for what it read
//! and waits on before it reads more. A client over its rate is read more slowly (TCP flow
//! control pushes back on it); nothing it sent is dropped.

use std::time::{Duration, Instant};

/// Tokens refill at `rate` per second up to one second's worth. Charging may take the
/// balance below zero (a read is charged after the fact); the debt is what the reader waits
/// out.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate_per_s` units per second; `None` for 0 (no limit).
    pub fn new(rate_per_s: u64, now: Instant) -> Option<TokenBucket> {
        (rate_per_s > 0).then_some(TokenBucket {
            rate_per_s: rate_per_s as f64,
            tokens: rate_per_s as f64,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.rate_per_s);
    }

    /// Charges `n` units used at `now`.
    pub fn charge(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// How long to wait at `now` before the balance is back to zero (`None`: no debt).
    pub fn debt(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate_per_s))
    }
}

/// The limits of one connection: packets and bytes per second.
#[derive(Debug, Clone)]
pub struct InboundLimiter {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl InboundLimiter {
    pub fn new(messages_per_s: u32, bytes_per_s: u64, now: Instant) -> InboundLimiter {
        InboundLimiter {
            messages: TokenBucket::new(messages_per_s as u64, now),
            bytes: TokenBucket::new(bytes_per_s, now),
        }
    }

    /// Whether any limit is set.
    pub fn is_active(&self) -> bool {
        self.messages.is_some() || self.bytes.is_some()
    }

    pub fn packet(&mut self, now: Instant) {
        if let Some(b) = &mut self.messages {
            b.charge(1, now);
        }
    }

    pub fn bytes(&mut self, n: usize, now: Instant) {
        if let Some(b) = &mut self.bytes {
            b.charge(n as u64, now);
        }
    }

    /// How long the reader waits before reading again.
    pub fn delay(&mut self, now: Instant) -> Option<Duration> {
        let m = self.messages.as_mut().and_then(|b| b.debt(now));
        let b = self.bytes.as_mut().and_then(|b| b.debt(now));
        m.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_limit() {
        let now = Instant::now();
        assert!(TokenBucket::new(0, now).is_none());
        let mut l = InboundLimiter::new(0, 0, now);
        assert!(!l.is_active());
        l.packet(now);
        l.bytes(1 << 30, now);
        assert_eq!(l.delay(now), None);
    }

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0).unwrap();
        b.charge(100, t0);
        assert_eq!(b.debt(t0), None, "one second's worth is free");
        b.charge(50, t0);
        assert_eq!(b.debt(t0), Some(Duration::from_millis(500)));
        // Half a second later the debt is paid.
        assert_eq!(b.debt(t0 + Duration::from_millis(500)), None);
        // Idle time refills up to one second's worth, no more.
        let later = t0 + Duration::from_secs(60);
        b.charge(100, later);
        assert_eq!(b.debt(later), None);
        b.charge(1, later);
        assert_eq!(b.debt(later), Some(Duration::from_millis(10)));
    }

    #[test]
    fn the_longer_wait_of_the_two_limits_wins() {
        let t0 = Instant::now();
        let mut l = InboundLimiter::new(10, 1000, t0);
        for _ in 0..20 {
            l.packet(t0);
        }
        l.bytes(1500, t0);
        // 10 packets over: 1 s; 500 bytes over: 0.5 s.
        assert_eq!(l.delay(t0), Some(Duration::from_secs(1)));
    }
}
