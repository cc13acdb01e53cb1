//! The price feed (docs/feed.md): connectors turn exchange ticks into publications
//! on `<namespace>.<SYMBOL>` and keep the latest price per symbol.
//!
//! Each tick is published with `msg_id = <source>:<SYMBOL>:<exchange sequence>`,
//! so feed replicas running side by side yield one publication per tick (the
//! broker's dedupe). Connectors run in `switchyard feed`, or inside `serve` with
//! `feed.embedded = true`.

pub mod cache;
mod http;
pub mod kucoin;
pub mod simulator;
pub mod standalone;
pub mod synthetic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::FeedConfig;
use crate::engine::{Broker, EngineError, PublishRequest};
use crate::shutdown::Shutdown;
use cache::PriceCache;

/// One tick as published (the `data` of a price publication). Prices and sizes
/// are decimal strings exactly as the exchange sent them: never floats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    pub symbol: String,
    pub price: String,
    pub size: String,
    pub best_bid: String,
    pub best_ask: String,
    /// Exchange time, Unix milliseconds.
    pub time: u64,
    /// The exchange's sequence for this symbol, a decimal string.
    pub sequence: String,
    /// The connector that produced it (`kucoin`, `synthetic`, …).
    pub source: String,
}

impl Tick {
    /// The idempotency key: the same tick from two replicas is one publication.
    pub fn msg_id(&self) -> String {
        format!("{}:{}:{}", self.source, self.symbol, self.sequence)
    }
}

/// Whether decimal string `a` is a larger number than `b` (both without sign or
/// leading zeros, as exchange sequences are): exact for any length.
pub fn seq_greater(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

/// One connector's link state, for readiness and the stale warning.
#[derive(Default)]
pub struct LinkHealth {
    pub connected: AtomicBool,
    /// Unix ms of the last tick; 0 before the first.
    pub last_tick_ms: AtomicU64,
    pub ticks: AtomicU64,
    pub reconnects: AtomicU64,
    /// Messages from the exchange that could not be parsed (skipped).
    pub malformed: AtomicU64,
}

/// The state of every connector of this process.
#[derive(Default)]
pub struct Health {
    links: Mutex<HashMap<String, Arc<LinkHealth>>>,
}

/// One connector's state as `/readyz` shows it.
#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub source: String,
    pub connected: bool,
    pub last_tick_age_ms: Option<u64>,
    pub ticks: u64,
    pub reconnects: u64,
    pub malformed: u64,
}

impl Health {
    /// The health of connector `source`, created on first use.
    pub fn link(&self, source: &str) -> Arc<LinkHealth> {
        Arc::clone(self.links.lock().entry(source.to_string()).or_default())
    }

    /// Every connector's state.
    pub fn status(&self) -> Vec<LinkStatus> {
        let now = unix_ms();
        let mut list: Vec<LinkStatus> = self
            .links
            .lock()
            .iter()
            .map(|(source, l)| {
                let last = l.last_tick_ms.load(Ordering::Relaxed);
                LinkStatus {
                    source: source.clone(),
                    connected: l.connected.load(Ordering::Relaxed),
                    last_tick_age_ms: (last > 0).then(|| now.saturating_sub(last)),
                    ticks: l.ticks.load(Ordering::Relaxed),
                    reconnects: l.reconnects.load(Ordering::Relaxed),
                    malformed: l.malformed.load(Ordering::Relaxed),
                }
            })
            .collect();
        list.sort_by(|a, b| a.source.cmp(&b.source));
        list
    }

    /// Ready: every connector is connected and ticked within `stale_after`.
    pub fn is_ready(&self, stale_after: Duration) -> bool {
        let fresh = stale_after.as_millis() as u64;
        let status = self.status();
        !status.is_empty()
            && status
                .iter()
                .all(|s| s.connected && s.last_tick_age_ms.is_some_and(|age| age <= fresh))
    }
}

/// Copies the connectors' state into the process's metrics (at scrape time).
pub fn export_metrics(health: &Health) {
    let m = crate::metrics::get();
    for s in health.status() {
        let source = || vec![metrics::Label::new("source", s.source.clone())];
        m.gauge("switchyard_feed_connected", source())
            .set(f64::from(u8::from(s.connected)));
        m.counter("switchyard_feed_ticks_total", source())
            .absolute(s.ticks);
        m.counter("switchyard_feed_reconnects_total", source())
            .absolute(s.reconnects);
        m.counter("switchyard_feed_malformed_total", source())
            .absolute(s.malformed);
        if let Some(age) = s.last_tick_age_ms {
            m.gauge("switchyard_feed_last_tick_age_seconds", source())
                .set(age as f64 / 1000.0);
        }
    }
}

/// Where connectors send ticks: publishes each one and keeps the latest price.
pub struct TickSink {
    broker: Arc<dyn Broker>,
    prices: Arc<dyn PriceCache>,
    namespace: String,
    /// How long a tick is retried while the broker is unavailable (`feed.stale_after`).
    retry_for: Duration,
    metrics: Arc<crate::metrics::Publishing>,
}

impl TickSink {
    /// A sink publishing to `<namespace>.<SYMBOL>` through `broker`, retrying a tick
    /// for at most `retry_for`.
    pub fn new(
        broker: Arc<dyn Broker>,
        prices: Arc<dyn PriceCache>,
        namespace: &str,
        retry_for: Duration,
    ) -> Self {
        TickSink {
            broker,
            prices,
            namespace: namespace.to_string(),
            retry_for,
            metrics: crate::metrics::get().publishing(namespace),
        }
    }

    /// Publishes one tick (a repeat of the same `msg_id` is not published twice)
    /// and records it as the symbol's latest price.
    pub async fn publish(&self, tick: &Tick) -> Result<(), EngineError> {
        let channel = Channel::parse(&format!("{}.{}", self.namespace, tick.symbol))
            .map_err(|e| EngineError::Rejected(format!("symbol {:?}: {e}", tick.symbol)))?;
        let data = serde_json::value::to_raw_value(tick)
            .map_err(|e| EngineError::Rejected(format!("tick: {e}")))?;
        self.prices.put(tick);
        let published = self
            .broker
            .publish(PublishRequest {
                channel,
                data,
                from: None,
                msg_id: Some(tick.msg_id()),
                caller_trace: None,
            })
            .await;
        // Every attempt counts: a retried 113 is a failure, then a publication.
        self.metrics
            .outcome(crate::metrics::Source::Feed, &published);
        published.map(drop)
    }
}

impl TickSink {
    /// Publishes a tick, retrying a retryable failure (113: the outcome is unknown,
    /// the tick may even be stored) with the same `msg_id`, so a retry is never a
    /// second publication, and before any later tick of the symbol, so order holds.
    /// Gives up after `retry_for`: a price that old is of no use.
    pub async fn publish_retrying(&self, tick: &Tick) -> Result<(), EngineError> {
        let span = tracing::info_span!("feed.tick", symbol = %tick.symbol, source = %tick.source);
        tracing::Instrument::instrument(self.publish_until_done(tick), span).await
    }

    async fn publish_until_done(&self, tick: &Tick) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.publish(tick).await {
                Err(EngineError::Unavailable(_))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                done => return done,
            }
        }
    }
}

/// Ticks waiting per symbol before a connector waits for the broker.
const PER_SYMBOL_QUEUE: usize = 256;

/// Publishes each symbol's ticks in order and different symbols in parallel: a
/// tick waits only for the acks of earlier ticks of its own symbol, so a cluster
/// broker's round trip does not cap the feed at one tick per round trip.
pub struct Dispatcher {
    sink: Arc<TickSink>,
    link: Arc<LinkHealth>,
    source: String,
    workers: HashMap<String, tokio::sync::mpsc::Sender<Tick>>,
}

impl Dispatcher {
    /// A dispatcher counting published ticks in `link`.
    pub fn new(sink: Arc<TickSink>, link: Arc<LinkHealth>, source: &str) -> Self {
        Dispatcher {
            sink,
            link,
            source: source.to_string(),
            workers: HashMap::new(),
        }
    }

    /// Queues a tick; waits only while its symbol's queue is full (bounded memory).
    pub async fn submit(&mut self, tick: Tick) {
        let tx = self.workers.entry(tick.symbol.clone()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(PER_SYMBOL_QUEUE);
            tokio::spawn(publish_in_order(
                Arc::clone(&self.sink),
                Arc::clone(&self.link),
                self.source.clone(),
                rx,
            ));
            tx
        });
        let _ = tx.send(tick).await;
    }
}

async fn publish_in_order(
    sink: Arc<TickSink>,
    link: Arc<LinkHealth>,
    source: String,
    mut ticks: tokio::sync::mpsc::Receiver<Tick>,
) {
    while let Some(t) = ticks.recv().await {
        match sink.publish_retrying(&t).await {
            Ok(()) => {
                link.ticks.fetch_add(1, Ordering::Relaxed);
                link.last_tick_ms.store(unix_ms(), Ordering::Relaxed);
            }
            // A replica covers it (the same msg_id), or the next tick supersedes it.
            Err(e) => tracing::warn!(%source, symbol = %t.symbol, error = %e, "tick not published"),
        }
    }
}

/// Starts the enabled connectors and the stale-feed watch; they stop with `shutdown`.
pub fn start(cfg: &FeedConfig, sink: Arc<TickSink>, health: Arc<Health>, shutdown: Shutdown) {
    if cfg.kucoin.enabled {
        let link = health.link(&cfg.kucoin.source);
        tokio::spawn(kucoin::run(
            cfg.kucoin.clone(),
            Arc::clone(&sink),
            link,
            shutdown.clone(),
        ));
    }
    if cfg.synthetic.enabled {
        let link = health.link(&cfg.synthetic.source);
        tokio::spawn(synthetic::run(
            cfg.synthetic.clone(),
            Arc::clone(&sink),
            link,
            shutdown.clone(),
        ));
    }
    tokio::spawn(watch_staleness(health, cfg.stale_after, shutdown));
}

/// Warns once when a connector goes stale, and once when it recovers.
async fn watch_staleness(health: Arc<Health>, stale_after: Duration, shutdown: Shutdown) {
    let mut stale: HashMap<String, bool> = HashMap::new();
    let period = (stale_after / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.wait() => return,
        }
        for s in health.status() {
            let age = s.last_tick_age_ms.unwrap_or(u64::MAX);
            let is_stale = age > stale_after.as_millis() as u64;
            let was = stale.insert(s.source.clone(), is_stale).unwrap_or(false);
            if is_stale && !was {
                tracing::warn!(source = %s.source, connected = s.connected, "price feed is stale: no tick for {stale_after:?}");
            } else if !is_stale && was {
                tracing::info!(source = %s.source, "price feed is ticking again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_every_link_is_up_and_fresh() {
        let health = Health::default();
        let stale_after = Duration::from_secs(5);
        assert!(!health.is_ready(stale_after), "no connector yet");
        let a = health.link("a");
        a.connected.store(true, Ordering::Relaxed);
        assert!(!health.is_ready(stale_after), "connected but no tick yet");
        a.last_tick_ms.store(unix_ms(), Ordering::Relaxed);
        assert!(health.is_ready(stale_after));
        // Connected, but silent for longer than stale_after.
        a.last_tick_ms.store(unix_ms() - 6_000, Ordering::Relaxed);
        assert!(!health.is_ready(stale_after));
        a.last_tick_ms.store(unix_ms(), Ordering::Relaxed);
        let b = health.link("b");
        b.last_tick_ms.store(unix_ms(), Ordering::Relaxed);
        assert!(!health.is_ready(stale_after), "b is not connected");
    }

    #[test]
    fn sequences_compare_as_numbers_of_any_length() {
        assert!(seq_greater("10", "9"));
        assert!(seq_greater("18446744073709551616", "18446744073709551615"));
        assert!(!seq_greater("5", "5"));
        assert!(!seq_greater("99", "100"));
    }
}
