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

use futures_util::stream::{FuturesOrdered, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::FeedConfig;
use crate::engine::{BoxFuture, Broker, EngineError, PublishRequest, Published};
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
        // Sized once: `format!` grows it piece by piece, on every tick.
        let mut id =
            String::with_capacity(self.source.len() + self.symbol.len() + self.sequence.len() + 2);
        id.push_str(&self.source);
        id.push(':');
        id.push_str(&self.symbol);
        id.push(':');
        id.push_str(&self.sequence);
        id
    }

    /// Makes `self` a copy of `other`, reusing its strings' allocations.
    pub fn assign(&mut self, other: &Tick) {
        self.symbol.clone_from(&other.symbol);
        self.price.clone_from(&other.price);
        self.size.clone_from(&other.size);
        self.best_bid.clone_from(&other.best_bid);
        self.best_ask.clone_from(&other.best_ask);
        self.time = other.time;
        self.sequence.clone_from(&other.sequence);
        self.source.clone_from(&other.source);
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
    /// Each symbol's channel, validated once.
    channels: Mutex<HashMap<String, Channel>>,
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
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Sends one tick and returns the future of its outcome without waiting for it:
    /// ticks sent by successive calls are stored in call order. Records the tick as
    /// the symbol's latest price. Every attempt counts in the metrics: a retried 113
    /// is a failure, then a publication.
    async fn send(&self, tick: &Tick) -> BoxFuture<'static, Result<Published, EngineError>> {
        let channel = match self.channel(&tick.symbol) {
            Ok(c) => c,
            Err(e) => return rejected(format!("symbol {:?}: {e}", tick.symbol)),
        };
        let data = match serde_json::value::to_raw_value(tick) {
            Ok(d) => d,
            Err(e) => return rejected(format!("tick: {e}")),
        };
        self.prices.put(tick);
        let span = tracing::info_span!("feed.tick", symbol = %tick.symbol, source = %tick.source);
        let sent = tracing::Instrument::instrument(
            self.broker.publish_ordered(PublishRequest {
                channel,
                data,
                from: None,
                msg_id: Some(tick.msg_id()),
                caller_trace: None,
            }),
            span.clone(),
        )
        .await;
        let metrics = Arc::clone(&self.metrics);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let outcome = match sent {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                metrics.outcome(crate::metrics::Source::Feed, &outcome);
                outcome
            },
            span,
        ))
    }

    /// `<namespace>.<symbol>`, parsed on a symbol's first tick. Connectors tick a
    /// configured list of symbols; an exchange sending others is not cached past
    /// [`CACHED_CHANNELS`].
    fn channel(&self, symbol: &str) -> Result<Channel, crate::channel::InvalidChannel> {
        if let Some(c) = self.channels.lock().get(symbol) {
            return Ok(c.clone());
        }
        let channel = Channel::parse(&format!("{}.{symbol}", self.namespace))?;
        let mut channels = self.channels.lock();
        if channels.len() < CACHED_CHANNELS {
            channels.insert(symbol.to_string(), channel.clone());
        }
        Ok(channel)
    }
}

/// Most symbols whose channel a sink keeps parsed.
const CACHED_CHANNELS: usize = 4096;

fn rejected(why: String) -> BoxFuture<'static, Result<Published, EngineError>> {
    Box::pin(std::future::ready(Err(EngineError::Rejected(why))))
}

/// Ticks a connector may have sent and not yet seen acknowledged.
const IN_FLIGHT: usize = 1024;

/// Ticks waiting to be sent before a connector waits for the broker.
const QUEUE: usize = 1024;

/// Publishes a connector's ticks in the order it read them, up to [`IN_FLIGHT`] at
/// a time, so a cluster broker's round trip does not cap the feed at one tick (or
/// one per symbol) per round trip (docs/feed.md, "Publishing").
pub struct Dispatcher {
    ticks: tokio::sync::mpsc::Sender<Tick>,
}

impl Dispatcher {
    /// A dispatcher counting published ticks in `link`; its task ends when it is dropped.
    pub fn new(sink: Arc<TickSink>, link: Arc<LinkHealth>, source: &str) -> Self {
        let (ticks, rx) = tokio::sync::mpsc::channel(QUEUE);
        tokio::spawn(publish_in_order(sink, link, source.to_string(), rx));
        Dispatcher { ticks }
    }

    /// Queues a tick; waits only while the queue is full (bounded memory).
    pub async fn submit(&mut self, tick: Tick) {
        let _ = self.ticks.send(tick).await;
    }
}

/// A tick sent, when it was first sent, and its outcome.
type Settled = (Tick, Instant, Result<Published, EngineError>);

/// The publishing loop. A tick that fails retryably (113: unavailable, the outcome
/// unknown) is sent again with the same `msg_id` once every tick sent before the
/// failure has settled and before any new tick, so the stream keeps each symbol's
/// ticks in exchange order; it is dropped instead when a later tick of its symbol
/// was stored meanwhile (that tick supersedes it) or after `retry_for`.
async fn publish_in_order(
    sink: Arc<TickSink>,
    link: Arc<LinkHealth>,
    source: String,
    mut ticks: tokio::sync::mpsc::Receiver<Tick>,
) {
    let mut in_flight: FuturesOrdered<BoxFuture<'static, Settled>> = FuturesOrdered::new();
    let mut failed: Vec<(Tick, Instant)> = Vec::new();
    let mut backoff = RETRY_FIRST;
    let mut open = true;
    loop {
        if in_flight.is_empty() && !failed.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETRY_LAST);
            for (tick, first) in std::mem::take(&mut failed) {
                in_flight.push_back(send(&sink, tick, first).await);
            }
            continue;
        }
        if in_flight.is_empty() && !open {
            return;
        }
        tokio::select! {
            biased;
            Some((tick, first, outcome)) = in_flight.next() => match outcome {
                Ok(_) => {
                    link.ticks.fetch_add(1, Ordering::Relaxed);
                    link.last_tick_ms.store(unix_ms(), Ordering::Relaxed);
                    if failed.is_empty() {
                        backoff = RETRY_FIRST;
                    } else {
                        // Sent after every failed tick: it supersedes those of its symbol.
                        failed.retain(|(t, _)| t.symbol != tick.symbol);
                    }
                }
                Err(EngineError::Unavailable(_))
                    if Instant::now() + backoff < first + sink.retry_for =>
                {
                    failed.push((tick, first));
                }
                // A replica covers it (the same msg_id), or the next tick supersedes it.
                Err(e) => tracing::warn!(%source, symbol = %tick.symbol, error = %e, "tick not published"),
            },
            t = ticks.recv(), if open && failed.is_empty() && in_flight.len() < IN_FLIGHT => match t {
                Some(t) => in_flight.push_back(send(&sink, t, Instant::now()).await),
                None => open = false,
            },
        }
    }
}

/// First and longest wait before ticks that failed are sent again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_LAST: Duration = Duration::from_secs(1);

async fn send(sink: &TickSink, tick: Tick, first: Instant) -> BoxFuture<'static, Settled> {
    let outcome = sink.send(&tick).await;
    Box::pin(async move { (tick, first, outcome.await) })
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
    use crate::engine::{HistoryFrom, HistoryPage, PageLimit, ReplayPage};

    /// What the scripted broker answers to one attempt: `(symbol, sequence, attempt)`.
    type Script = Box<dyn Fn(&str, &str, usize) -> Result<(), EngineError> + Send + Sync>;

    /// A broker whose acks wait for `gate` and whose outcomes follow a script: it
    /// tests the dispatcher's ordering and retries, not any backbone's behaviour.
    struct Scripted {
        sent: Mutex<Vec<(String, String)>>,
        sent_one: tokio::sync::Notify,
        gate: tokio::sync::watch::Receiver<bool>,
        script: Script,
    }

    impl Broker for Scripted {
        fn publish(&self, _: PublishRequest) -> BoxFuture<'_, Result<Published, EngineError>> {
            unreachable!("the dispatcher sends through publish_ordered")
        }
        fn publish_ordered(
            &self,
            req: PublishRequest,
        ) -> BoxFuture<'_, Result<crate::engine::AckFuture, EngineError>> {
            let tick: Tick = serde_json::from_str(req.data.get()).unwrap();
            let attempt = {
                let mut sent = self.sent.lock();
                sent.push((tick.symbol.clone(), tick.sequence.clone()));
                sent.iter()
                    .filter(|(s, q)| *s == tick.symbol && *q == tick.sequence)
                    .count()
            };
            self.sent_one.notify_one();
            let outcome = (self.script)(&tick.symbol, &tick.sequence, attempt);
            let mut gate = self.gate.clone();
            Box::pin(async move {
                let ack: crate::engine::AckFuture = Box::pin(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    outcome.map(|()| Published {
                        seq: 1,
                        duplicate: false,
                    })
                });
                Ok(ack)
            })
        }
        fn history<'a>(
            &'a self,
            _: &'a Channel,
            _: HistoryFrom,
            _: usize,
            _: PageLimit,
        ) -> BoxFuture<'a, Result<HistoryPage, EngineError>> {
            unreachable!()
        }
        fn history_after<'a>(
            &'a self,
            _: &'a Channel,
            _: u64,
            _: PageLimit,
        ) -> BoxFuture<'a, Result<ReplayPage, EngineError>> {
            unreachable!()
        }
        fn watch<'a>(&'a self, _: &'a Channel) -> BoxFuture<'a, Result<(), EngineError>> {
            unreachable!()
        }
        fn unwatch(&self, _: &Channel) {}
    }

    struct Rig {
        broker: Arc<Scripted>,
        open: tokio::sync::watch::Sender<bool>,
        link: Arc<LinkHealth>,
        out: Dispatcher,
    }

    fn rig(retry_for: Duration, script: Script) -> Rig {
        let (open, gate) = tokio::sync::watch::channel(false);
        let broker = Arc::new(Scripted {
            sent: Mutex::new(Vec::new()),
            sent_one: tokio::sync::Notify::new(),
            gate,
            script,
        });
        let sink = Arc::new(TickSink::new(
            Arc::clone(&broker) as Arc<dyn Broker>,
            Arc::new(cache::MemoryPrices::default()),
            "prices",
            retry_for,
        ));
        let link = Arc::new(LinkHealth::default());
        let out = Dispatcher::new(sink, Arc::clone(&link), "test");
        Rig {
            broker,
            open,
            link,
            out,
        }
    }

    fn tick(symbol: &str, sequence: u32) -> Tick {
        Tick {
            symbol: symbol.into(),
            price: "1.5".into(),
            size: "1".into(),
            best_bid: "1.4".into(),
            best_ask: "1.6".into(),
            time: 1,
            sequence: sequence.to_string(),
            source: "test".into(),
        }
    }

    impl Rig {
        async fn sent(&self, n: usize) -> Vec<(String, String)> {
            loop {
                let notified = self.broker.sent_one.notified();
                let sent = self.broker.sent.lock().clone();
                if sent.len() >= n {
                    return sent;
                }
                notified.await;
            }
        }

        async fn published(&self, n: u64) {
            while self.link.ticks.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    fn pairs(list: &[(&str, u32)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(s, q)| (s.to_string(), q.to_string()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn ticks_are_sent_without_waiting_for_earlier_acks_in_the_order_read() {
        let mut r = rig(Duration::from_secs(5), Box::new(|_, _, _| Ok(())));
        for i in 1..=100 {
            r.out.submit(tick("A", i)).await;
            r.out.submit(tick("B", i)).await;
        }
        // All 200 are sent while no ack has come back.
        let sent = r.sent(200).await;
        let expected: Vec<(String, String)> = (1..=100)
            .flat_map(|i| pairs(&[("A", i), ("B", i)]))
            .collect();
        assert_eq!(sent, expected);
        assert_eq!(r.link.ticks.load(Ordering::Relaxed), 0);
        r.open.send_replace(true);
        r.published(200).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_tick_is_sent_again_before_any_later_tick_of_its_symbol() {
        let mut r = rig(
            Duration::from_secs(5),
            Box::new(|s, q, attempt| match (s, q, attempt) {
                ("A", "2", 1) => Err(EngineError::Unavailable("down".into())),
                _ => Ok(()),
            }),
        );
        for t in [("A", 1), ("A", 2), ("B", 1)] {
            r.out.submit(tick(t.0, t.1)).await;
        }
        r.sent(3).await;
        r.open.send_replace(true);
        // Queued after the failure: it waits until A:2 is stored.
        r.out.submit(tick("A", 3)).await;
        r.published(4).await;
        let sent = r.sent(5).await;
        assert_eq!(
            sent,
            pairs(&[("A", 1), ("A", 2), ("B", 1), ("A", 2), ("A", 3)])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_tick_superseded_by_a_later_one_of_its_symbol_is_not_sent_again() {
        let mut r = rig(
            Duration::from_secs(5),
            Box::new(|s, q, attempt| match (s, q, attempt) {
                ("A", "2", 1) | ("B", "1", 1) => Err(EngineError::Unavailable("down".into())),
                _ => Ok(()),
            }),
        );
        for t in [("A", 1), ("A", 2), ("B", 1), ("A", 3)] {
            r.out.submit(tick(t.0, t.1)).await;
        }
        r.sent(4).await;
        r.open.send_replace(true);
        // A:3 was stored after A:2 failed: only B:1 is sent again.
        r.published(3).await;
        r.out.submit(tick("B", 2)).await;
        r.published(4).await;
        assert_eq!(
            r.sent(6).await,
            pairs(&[("A", 1), ("A", 2), ("B", 1), ("A", 3), ("B", 1), ("B", 2)])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_still_failing_after_retry_for_is_dropped_and_the_feed_goes_on() {
        let mut r = rig(
            Duration::from_secs(2),
            Box::new(|s, _, _| match s {
                "A" => Err(EngineError::Unavailable("down".into())),
                _ => Ok(()),
            }),
        );
        r.open.send_replace(true);
        let started = Instant::now();
        r.out.submit(tick("A", 1)).await;
        r.out.submit(tick("B", 1)).await;
        r.published(1).await;
        let sent = r.broker.sent.lock().clone();
        let attempts = sent.iter().filter(|(s, _)| s == "A").count();
        // 50, 100, 200, 400, 800 ms of backoff fit in 2 s; the next would not.
        assert_eq!(attempts, 6, "{sent:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(sent.last(), Some(&("B".to_string(), "1".to_string())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_tick_is_not_sent_again() {
        let mut r = rig(
            Duration::from_secs(5),
            Box::new(|s, _, _| match s {
                "A" => Err(EngineError::Rejected("no".into())),
                _ => Ok(()),
            }),
        );
        r.open.send_replace(true);
        r.out.submit(tick("A", 1)).await;
        r.out.submit(tick("B", 1)).await;
        r.published(1).await;
        assert_eq!(r.sent(2).await, pairs(&[("A", 1), ("B", 1)]));
    }

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
