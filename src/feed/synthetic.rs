//! The synthetic connector: a random walk per symbol at a configured rate, for
//! demos (`make run`) and benchmarks. Prices are integers of 1/100 units
//! formatted as decimal strings, so no float ever reaches a tick.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Dispatcher, LinkHealth, Tick, TickSink};
use crate::clock::unix_ms;
use crate::config::SyntheticConfig;
use crate::shutdown::Shutdown;

/// `cents` as a decimal string with two places.
fn decimal(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

struct Walk {
    symbol: String,
    cents: u64,
    seq: u64,
}

impl Walk {
    fn step(&mut self, source: &str) -> Tick {
        // ±0.05 % per tick, never below one cent.
        let spread = (self.cents / 2000).max(1);
        let up = fastrand::bool();
        let by = fastrand::u64(0..=spread);
        self.cents = if up {
            self.cents.saturating_add(by)
        } else {
            self.cents.saturating_sub(by).max(1)
        };
        self.seq += 1;
        Tick {
            symbol: self.symbol.clone(),
            price: decimal(self.cents),
            size: format!("0.{:04}", fastrand::u32(1..10_000)),
            best_bid: decimal(self.cents.saturating_sub(spread).max(1)),
            best_ask: decimal(self.cents + spread),
            time: unix_ms(),
            sequence: self.seq.to_string(),
            source: source.to_string(),
        }
    }
}

/// Emits ticks until shutdown. Sequences start at the current time in
/// milliseconds, so a restarted generator never reuses a `msg_id`.
pub async fn run(
    cfg: SyntheticConfig,
    sink: Arc<TickSink>,
    link: Arc<LinkHealth>,
    shutdown: Shutdown,
) {
    let start_seq = unix_ms() * 1000;
    let mut walks: Vec<Walk> = cfg
        .symbols
        .iter()
        .enumerate()
        .map(|(i, s)| Walk {
            symbol: s.clone(),
            cents: 10_000 * (1 + (i as u64 * 37) % 50),
            seq: start_seq,
        })
        .collect();
    link.connected.store(true, Ordering::Relaxed);
    let mut out = Dispatcher::new(sink, Arc::clone(&link), &cfg.source);
    let period = Duration::from_secs_f64(1.0 / cfg.rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => break,
        }
        for w in &mut walks {
            out.submit(w.step(&cfg.source)).await;
        }
    }
    link.connected.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_produces_decimal_strings_and_increasing_sequences() {
        let mut w = Walk {
            symbol: "X-Y".into(),
            cents: 1,
            seq: 7,
        };
        let mut last = 7;
        for _ in 0..1000 {
            let t = w.step("synthetic");
            let seq: u64 = t.sequence.parse().unwrap();
            assert_eq!(seq, last + 1);
            last = seq;
            for d in [&t.price, &t.best_bid, &t.best_ask] {
                let (int, frac) = d.split_once('.').unwrap();
                assert!(int.parse::<u64>().is_ok() && frac.len() == 2, "{d}");
            }
            assert_ne!(t.price, "0.00", "never below one cent");
        }
        assert_eq!(decimal(123_456), "1234.56");
        assert_eq!(decimal(5), "0.05");
    }
}
