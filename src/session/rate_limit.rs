//! Token buckets for one connection's inbound frames and bytes.

use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` stored.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens if there are that many.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The inbound limits of one connection: frames and bytes.
pub struct RateLimiter {
    frames: TokenBucket,
    bytes: TokenBucket,
}

impl RateLimiter {
    /// Limits from the session config; the byte bucket holds one second's worth.
    pub fn new(cfg: &crate::config::SessionConfig) -> Self {
        RateLimiter {
            frames: TokenBucket::new(cfg.rate_frames_per_sec, cfg.rate_frames_burst),
            bytes: TokenBucket::new(cfg.rate_bytes_per_sec, cfg.rate_bytes_per_sec),
        }
    }

    /// Whether a frame of `len` bytes is within the limits now.
    pub fn allow(&mut self, len: usize) -> bool {
        let now = Instant::now();
        // Check both so neither bucket is charged for a refused frame's other half.
        let frame_ok = self.frames.try_take(1.0, now);
        frame_ok && self.bytes.try_take(len as f64, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10, 2);
        b.last = start;
        assert!(b.try_take(1.0, start));
        assert!(b.try_take(1.0, start));
        assert!(!b.try_take(1.0, start));
        assert!(b.try_take(1.0, start + Duration::from_millis(100)));
        assert!(!b.try_take(1.0, start + Duration::from_millis(100)));
    }
}
