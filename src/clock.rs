//! Wall-clock time as the protocol and the stores speak it: Unix seconds (token
//! expiry) and Unix milliseconds (publication `ts`, presence, heartbeats).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Current Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Current Unix time in milliseconds, with the fraction (for latencies measured
/// against a publication's whole-millisecond `ts`).
pub fn unix_ms_fraction() -> f64 {
    since_epoch().as_secs_f64() * 1000.0
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// A Unix time in seconds as an `Instant` deadline (past times map to `now`).
pub fn unix_deadline(unix_secs: u64, now: Instant) -> Instant {
    now + Duration::from_secs(unix_secs.saturating_sub(unix_now()))
}

fn since_epoch() -> Duration {
    // A clock before 1970 reads as the epoch rather than failing every caller.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
