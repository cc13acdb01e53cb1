//! The KuCoin public WebSocket connector: token from `POST /api/v1/bullet-public`,
//! connect to an instance server, wait for `welcome`, subscribe to
//! `/market/ticker:SYM1,SYM2,…` (at most `symbols_per_subscribe` per request),
//! publish each ticker `message`, `ping` every `pingInterval` and treat a missing
//! `pong` within `pingTimeout` as a dead link. Any failure reconnects with a fresh
//! token after an exponential backoff with jitter.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{seq_greater, Dispatcher, LinkHealth, Tick, TickSink};
use crate::config::KucoinConfig;
use crate::shutdown::Shutdown;

#[derive(Deserialize)]
struct Bullet {
    code: String,
    data: Option<BulletData>,
    msg: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BulletData {
    token: String,
    instance_servers: Vec<InstanceServer>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct InstanceServer {
    endpoint: String,
    ping_interval: u64,
    ping_timeout: u64,
}

/// A frame from the exchange.
/// A frame from the exchange, borrowing from its text: a ticker's `data` is read
/// once, straight into [`Ticker`], with no JSON tree in between.
#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ticker {
    sequence: String,
    price: String,
    size: String,
    best_bid: String,
    best_ask: String,
    time: u64,
}

/// Why a session ended.
#[derive(Debug)]
enum LinkError {
    /// The token request was refused or failed.
    Token(String),
    /// Connecting, the welcome, or the link itself failed.
    Link(String),
    Stopped,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Token(m) => write!(f, "token request: {m}"),
            LinkError::Link(m) => write!(f, "link: {m}"),
            LinkError::Stopped => f.write_str("stopped"),
        }
    }
}

/// Runs the connector until shutdown, reconnecting forever.
pub async fn run(
    cfg: KucoinConfig,
    sink: Arc<TickSink>,
    link: Arc<LinkHealth>,
    shutdown: Shutdown,
) {
    let mut attempt: u32 = 0;
    // The last sequence queued per symbol: nothing older is ever published after it.
    let mut last: HashMap<String, String> = HashMap::new();
    let mut out = Dispatcher::new(sink, Arc::clone(&link), &cfg.source);
    loop {
        let started = Instant::now();
        let ticks_before = link.ticks.load(Ordering::Relaxed);
        let result = session(&cfg, &mut out, &link, &shutdown, &mut last).await;
        link.connected.store(false, Ordering::Relaxed);
        match result {
            Err(LinkError::Stopped) => return,
            Err(e) => tracing::warn!(source = %cfg.source, error = %e, "exchange link lost"),
            Ok(()) => {}
        }
        // A session that delivered ticks for a while starts the backoff over.
        if link.ticks.load(Ordering::Relaxed) > ticks_before
            && started.elapsed() >= cfg.backoff_min * 4
        {
            attempt = 0;
        }
        let delay = backoff(&cfg, attempt);
        attempt = attempt.saturating_add(1);
        link.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(source = %cfg.source, ?delay, attempt, "reconnecting to the exchange");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// `backoff_min · 2^attempt`, capped at `backoff_max`, times a random 50–100 %.
fn backoff(cfg: &KucoinConfig, attempt: u32) -> Duration {
    let exp = cfg
        .backoff_min
        .saturating_mul(1u32 << attempt.min(20))
        .min(cfg.backoff_max);
    exp.mul_f64(0.5 + fastrand::f64() * 0.5)
}

async fn bullet(cfg: &KucoinConfig) -> Result<(String, InstanceServer), LinkError> {
    let url = format!(
        "{}/api/v1/bullet-public",
        cfg.rest_url.trim_end_matches('/')
    );
    let v = super::http::post_json(&url, cfg.connect_timeout)
        .await
        .map_err(LinkError::Token)?;
    let b: Bullet = serde_json::from_value(v)
        .map_err(|e| LinkError::Token(format!("unexpected answer: {e}")))?;
    if b.code != "200000" {
        return Err(LinkError::Token(format!(
            "refused: code {} {}",
            b.code,
            b.msg.unwrap_or_default()
        )));
    }
    let data = b
        .data
        .ok_or_else(|| LinkError::Token("no data in the answer".into()))?;
    let server = data
        .instance_servers
        .first()
        .cloned()
        .ok_or_else(|| LinkError::Token("no instance server".into()))?;
    Ok((data.token, server))
}

async fn session(
    cfg: &KucoinConfig,
    out: &mut Dispatcher,
    link: &LinkHealth,
    shutdown: &Shutdown,
    last: &mut HashMap<String, String>,
) -> Result<(), LinkError> {
    let (token, server) = tokio::select! {
        r = bullet(cfg) => r?,
        _ = shutdown.wait() => return Err(LinkError::Stopped),
    };
    let connect_id = format!("{:016x}", fastrand::u64(..));
    let sep = if server.endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!(
        "{}{sep}token={token}&connectId={connect_id}",
        server.endpoint
    );
    let (ws, _) = tokio::time::timeout(cfg.connect_timeout, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| LinkError::Link("connect timed out".into()))?
        .map_err(|e| LinkError::Link(format!("connect: {e}")))?;
    let (mut tx, mut rx) = ws.split();

    // The exchange speaks first.
    let welcome = tokio::time::timeout(cfg.connect_timeout, async {
        while let Some(m) = rx.next().await {
            if let Ok(Message::Text(t)) = m {
                if let Ok(f) = serde_json::from_str::<Inbound>(&t) {
                    if f.kind == "welcome" {
                        return true;
                    }
                }
            }
        }
        false
    })
    .await;
    if welcome != Ok(true) {
        return Err(LinkError::Link("no welcome".into()));
    }

    for (i, chunk) in cfg.symbols.chunks(cfg.symbols_per_subscribe).enumerate() {
        let frame = json!({
            "id": format!("{connect_id}-sub-{i}"),
            "type": "subscribe",
            "topic": format!("/market/ticker:{}", chunk.join(",")),
            "privateChannel": false,
            "response": true,
        });
        tx.send(Message::text(frame.to_string()))
            .await
            .map_err(|e| LinkError::Link(format!("subscribe: {e}")))?;
    }
    link.connected.store(true, Ordering::Relaxed);
    tracing::info!(source = %cfg.source, symbols = cfg.symbols.len(), "exchange link up");

    let ping_every = Duration::from_millis(server.ping_interval.max(100));
    let pong_within = Duration::from_millis(server.ping_timeout.max(100));
    let mut next_ping = Instant::now() + ping_every;
    let mut pong_due: Option<Instant> = None;
    let mut pings: u64 = 0;
    loop {
        let deadline = pong_due.map_or(next_ping, |d| d.min(next_ping));
        let msg = tokio::select! {
            m = rx.next() => m,
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if pong_due.is_some_and(|d| now >= d) {
                    return Err(LinkError::Link(format!("no pong within {pong_within:?}")));
                }
                if now >= next_ping {
                    pings += 1;
                    let ping = json!({"id": format!("{connect_id}-ping-{pings}"), "type": "ping"});
                    tx.send(Message::text(ping.to_string()))
                        .await
                        .map_err(|e| LinkError::Link(format!("ping: {e}")))?;
                    next_ping = now + ping_every;
                    pong_due.get_or_insert(now + pong_within);
                }
                continue;
            }
            _ = shutdown.wait() => {
                let _ = tx.send(Message::Close(None)).await;
                return Err(LinkError::Stopped);
            }
        };
        let text = match msg {
            None => return Err(LinkError::Link("closed by the exchange".into())),
            Some(Err(e)) => return Err(LinkError::Link(format!("read: {e}"))),
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) => {
                return Err(LinkError::Link("closed by the exchange".into()))
            }
            Some(Ok(Message::Binary(_))) => {
                malformed(cfg, link, "binary frame");
                continue;
            }
            Some(Ok(_)) => continue,
        };
        let frame: Inbound = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                malformed(cfg, link, &format!("not a frame: {e}"));
                continue;
            }
        };
        match &*frame.kind {
            "pong" => pong_due = None,
            "message" => match ticker(cfg, &frame) {
                Ok(tick) => {
                    // In place: a symbol's entry keeps its allocation from tick to tick.
                    match last.get_mut(&tick.symbol) {
                        Some(prev) if !seq_greater(&tick.sequence, prev) => continue,
                        Some(prev) => prev.clone_from(&tick.sequence),
                        None => {
                            last.insert(tick.symbol.clone(), tick.sequence.clone());
                        }
                    }
                    out.submit(tick).await;
                }
                Err(why) => malformed(cfg, link, &why),
            },
            "ack" | "welcome" => {}
            "error" => {
                tracing::warn!(source = %cfg.source, id = ?frame.id, data = ?frame.data, "exchange reported an error");
            }
            other => tracing::debug!(source = %cfg.source, kind = other, "ignored exchange frame"),
        }
    }
}

fn malformed(cfg: &KucoinConfig, link: &LinkHealth, why: &str) {
    link.malformed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(source = %cfg.source, why, "skipped a malformed exchange message");
}

/// A ticker `message` as a tick: the symbol comes from the topic.
fn ticker(cfg: &KucoinConfig, frame: &Inbound) -> Result<Tick, String> {
    let topic = frame.topic.as_deref().ok_or("message without topic")?;
    let symbol = topic
        .strip_prefix("/market/ticker:")
        .filter(|s| !s.is_empty() && !s.contains(','))
        .ok_or_else(|| format!("unexpected topic {topic:?}"))?;
    if !crate::channel::is_valid_token(symbol) {
        return Err(format!("unexpected symbol {symbol:?}"));
    }
    let data = frame.data.ok_or("message without data")?;
    let t: Ticker = serde_json::from_str(data.get()).map_err(|e| format!("ticker: {e}"))?;
    let decimal = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && s.bytes().filter(|&b| b == b'.').count() <= 1
    };
    if ![&t.price, &t.size, &t.best_bid, &t.best_ask]
        .iter()
        .all(|s| decimal(s))
    {
        return Err("ticker with a non-decimal number".into());
    }
    if t.sequence.is_empty() || !t.sequence.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("ticker with sequence {:?}", t.sequence));
    }
    Ok(Tick {
        symbol: symbol.to_string(),
        price: t.price,
        size: t.size,
        best_bid: t.best_bid,
        best_ask: t.best_ask,
        time: t.time,
        sequence: t.sequence,
        source: cfg.source.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let cfg = KucoinConfig {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..KucoinConfig::default()
        };
        for attempt in 0..40 {
            let d = backoff(&cfg, attempt);
            let full = (Duration::from_millis(100) * 2u32.pow(attempt.min(20)))
                .min(Duration::from_secs(2));
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn ticker_messages_parse_and_bad_ones_are_refused() {
        let cfg = KucoinConfig::default();
        let good: Inbound = serde_json::from_str(
            r#"{"type":"message","topic":"/market/ticker:BTC-USDT","subject":"trade.ticker","data":{"sequence":"1545896668986","price":"0.08","size":"0.011","bestAsk":"0.08","bestAskSize":"0.18","bestBid":"0.049","bestBidSize":"0.036","time":1545896668986}}"#,
        )
        .unwrap();
        let t = ticker(&cfg, &good).unwrap();
        assert_eq!(
            (
                t.symbol.as_str(),
                t.price.as_str(),
                t.sequence.as_str(),
                t.best_bid.as_str()
            ),
            ("BTC-USDT", "0.08", "1545896668986", "0.049")
        );
        assert_eq!(t.msg_id(), "kucoin:BTC-USDT:1545896668986");
        for bad in [
            r#"{"type":"message","topic":"/market/ticker:BTC-USDT","data":{"price":"1"}}"#,
            r#"{"type":"message","topic":"/market/level2:BTC-USDT","data":{}}"#,
            r#"{"type":"message","topic":"/market/ticker:BTC-USDT","data":{"sequence":"x","price":"1","size":"1","bestBid":"1","bestAsk":"1","time":1}}"#,
            r#"{"type":"message","topic":"/market/ticker:BTC-USDT","data":{"sequence":"1","price":"1e5","size":"1","bestBid":"1","bestAsk":"1","time":1}}"#,
        ] {
            let f: Inbound = serde_json::from_str(bad).unwrap();
            assert!(ticker(&cfg, &f).is_err(), "{bad}");
        }
    }
}
