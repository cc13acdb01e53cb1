//! The latest price per symbol: in process, or in Redis (`price:{symbol}`) so
//! every node serves it and it survives restarts. Served by
//! `GET /api/v1/prices[/{symbol}]`, also while the feed is down, with its age.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use serde::Serialize;

use super::{seq_greater, Tick};
use crate::clock::unix_ms;
use crate::config::{ConfigError, RedisConfig};
use crate::engine::redis::primary::Primary;
use crate::engine::{BoxFuture, EngineError};

/// A cached tick and when this process (or the feed that wrote it) received it.
#[derive(Debug, Clone, Serialize)]
pub struct CachedTick {
    pub tick: Tick,
    /// Unix ms.
    pub received_at: u64,
}

/// The latest tick per symbol.
pub trait PriceCache: Send + Sync {
    /// Records a tick unless a newer one (by exchange sequence) is cached.
    fn put(&self, tick: &Tick);
    fn get<'a>(&'a self, symbol: &'a str)
        -> BoxFuture<'a, Result<Option<CachedTick>, EngineError>>;
    fn all(&self) -> BoxFuture<'_, Result<Vec<CachedTick>, EngineError>>;
    /// Writes what is not stored yet (before the process exits).
    fn flush(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Keeps `tick` in `map` if it is newer than what is there.
fn keep_newest(map: &mut HashMap<String, CachedTick>, tick: &Tick, received_at: u64) -> bool {
    match map.get_mut(&tick.symbol) {
        Some(cur)
            if cur.tick.source == tick.source
                && !seq_greater(&tick.sequence, &cur.tick.sequence) =>
        {
            false
        }
        // In place: a symbol's entry keeps its strings' allocations from tick to tick.
        Some(cur) => {
            cur.tick.assign(tick);
            cur.received_at = received_at;
            true
        }
        None => {
            map.insert(
                tick.symbol.clone(),
                CachedTick {
                    tick: tick.clone(),
                    received_at,
                },
            );
            true
        }
    }
}

fn sorted(map: &HashMap<String, CachedTick>) -> Vec<CachedTick> {
    let mut list: Vec<CachedTick> = map.values().cloned().collect();
    list.sort_by(|a, b| a.tick.symbol.cmp(&b.tick.symbol));
    list
}

/// The in-process cache (memory engine, single node).
#[derive(Default)]
pub struct MemoryPrices {
    latest: Mutex<HashMap<String, CachedTick>>,
}

impl PriceCache for MemoryPrices {
    fn put(&self, tick: &Tick) {
        keep_newest(&mut self.latest.lock(), tick, unix_ms());
    }

    fn get<'a>(
        &'a self,
        symbol: &'a str,
    ) -> BoxFuture<'a, Result<Option<CachedTick>, EngineError>> {
        let hit = self.latest.lock().get(symbol).cloned();
        Box::pin(async move { Ok(hit) })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<CachedTick>, EngineError>> {
        let list = sorted(&self.latest.lock());
        Box::pin(async move { Ok(list) })
    }
}

/// Writes a tick unless the stored one has a higher sequence from the same source.
/// KEYS: price hash, symbols set. ARGV: sequence, source, tick JSON, received_at.
const PUT: &str = r#"
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local cur = redis.call('HMGET', KEYS[1], 'sequence', 'source')
if cur[1] and cur[2] == ARGV[2] and not greater(ARGV[1], cur[1]) then return 0 end
redis.call('HSET', KEYS[1], 'sequence', ARGV[1], 'source', ARGV[2], 'tick', ARGV[3], 'received_at', ARGV[4])
redis.call('SADD', KEYS[2], string.sub(KEYS[1], #ARGV[5] + 1))
return 1
"#;

/// The Redis cache: `price:{symbol}` hashes and the `prices` set of symbols.
/// Writes are coalesced (the newest per symbol, every 100 ms); reads fall back to
/// what this process last saw while Redis is unreachable.
pub struct RedisPrices {
    primary: Arc<Primary>,
    prefix: String,
    local: Mutex<HashMap<String, CachedTick>>,
    pending: Mutex<HashMap<String, CachedTick>>,
}

const WRITE_EVERY: Duration = Duration::from_millis(100);

impl RedisPrices {
    /// Connects lazily (the cache works from memory while Redis is down) and loads
    /// what Redis holds: a process without the Redis engine (`switchyard feed`).
    pub async fn connect(cfg: &RedisConfig) -> Result<Arc<Self>, ConfigError> {
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.response_timeout))
            .set_number_of_retries(0);
        let primary = Arc::new(Primary::new(cfg, manager)?);
        Ok(Self::start(primary, &cfg.key_prefix).await)
    }

    /// The cache on a connection the engine already holds (a node: one connection
    /// to the primary for both).
    pub async fn start(primary: Arc<Primary>, key_prefix: &str) -> Arc<Self> {
        let prices = Arc::new(RedisPrices {
            primary,
            prefix: key_prefix.to_string(),
            local: Mutex::default(),
            pending: Mutex::default(),
        });
        if let Err(e) = prices.all().await {
            tracing::warn!(error = %e, "latest prices not loaded from redis; serving what arrives");
        }
        tokio::spawn(writer(Arc::downgrade(&prices)));
        prices
    }

    /// A connection to the primary (found through the sentinels when needed).
    async fn conn(&self) -> Result<ConnectionManager, EngineError> {
        if let Ok(conn) = self.primary.conn() {
            return Ok(conn);
        }
        self.primary.rediscover().await;
        self.primary.conn()
    }

    fn key(&self, symbol: &str) -> String {
        format!("{}price:{symbol}", self.prefix)
    }

    fn symbols_key(&self) -> String {
        format!("{}prices", self.prefix)
    }

    async fn write(&self) -> Result<(), EngineError> {
        let batch = std::mem::take(&mut *self.pending.lock());
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let prefix = format!("{}price:", self.prefix);
        for c in batch.values() {
            let json = serde_json::to_string(&c.tick).unwrap_or_default();
            pipe.cmd("EVAL")
                .arg(PUT)
                .arg(2)
                .arg(self.key(&c.tick.symbol))
                .arg(self.symbols_key())
                .arg(&c.tick.sequence)
                .arg(&c.tick.source)
                .arg(json)
                .arg(c.received_at)
                .arg(&prefix)
                .ignore();
        }
        let written = match self.conn().await {
            Ok(mut conn) => pipe
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}")),
            Err(e) => Err(e.to_string()),
        };
        match written {
            Ok(()) => Ok(()),
            Err(e) => {
                self.primary.rediscover().await;
                // Keep them for the next round, unless something newer came meanwhile.
                let mut pending = self.pending.lock();
                for c in batch.into_values() {
                    keep_newest(&mut pending, &c.tick, c.received_at);
                }
                Err(EngineError::Degraded(e))
            }
        }
    }

    fn parse(v: Vec<Option<String>>) -> Option<CachedTick> {
        match v.as_slice() {
            [Some(tick), Some(at)] => Some(CachedTick {
                tick: serde_json::from_str(tick).ok()?,
                received_at: at.parse().ok()?,
            }),
            _ => None,
        }
    }

    fn remember(&self, c: &CachedTick) {
        keep_newest(&mut self.local.lock(), &c.tick, c.received_at);
    }
}

async fn writer(prices: Weak<RedisPrices>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(WRITE_EVERY).await;
        let Some(prices) = prices.upgrade() else {
            return;
        };
        match prices.write().await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                tracing::warn!(error = %e, "latest prices not written to redis; retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

impl PriceCache for RedisPrices {
    fn flush(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(self.write())
    }

    fn put(&self, tick: &Tick) {
        let now = unix_ms();
        if keep_newest(&mut self.local.lock(), tick, now) {
            keep_newest(&mut self.pending.lock(), tick, now);
        }
    }

    fn get<'a>(
        &'a self,
        symbol: &'a str,
    ) -> BoxFuture<'a, Result<Option<CachedTick>, EngineError>> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else {
                return Ok(self.local.lock().get(symbol).cloned());
            };
            let read: redis::RedisResult<Vec<Option<String>>> = redis::cmd("HMGET")
                .arg(self.key(symbol))
                .arg("tick")
                .arg("received_at")
                .query_async(&mut conn)
                .await;
            match read {
                Ok(v) => {
                    let hit = Self::parse(v);
                    if let Some(c) = &hit {
                        self.remember(c);
                    }
                    // What this process holds may be newer than what is written yet.
                    Ok(self.local.lock().get(symbol).cloned().or(hit))
                }
                Err(_) => Ok(self.local.lock().get(symbol).cloned()),
            }
        })
    }

    fn all(&self) -> BoxFuture<'_, Result<Vec<CachedTick>, EngineError>> {
        Box::pin(async move {
            let Ok(mut conn) = self.conn().await else {
                return Ok(sorted(&self.local.lock()));
            };
            let symbols: redis::RedisResult<Vec<String>> = redis::cmd("SMEMBERS")
                .arg(self.symbols_key())
                .query_async(&mut conn)
                .await;
            let Ok(symbols) = symbols else {
                return Ok(sorted(&self.local.lock()));
            };
            let mut pipe = redis::pipe();
            for s in &symbols {
                pipe.cmd("HMGET")
                    .arg(self.key(s))
                    .arg("tick")
                    .arg("received_at");
            }
            if let Ok(rows) = pipe.query_async::<Vec<Value>>(&mut conn).await {
                for row in rows {
                    let fields: Vec<Option<String>> =
                        redis::from_redis_value(row).unwrap_or_default();
                    if let Some(c) = Self::parse(fields) {
                        self.remember(&c);
                    }
                }
            }
            Ok(sorted(&self.local.lock()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(source: &str, sequence: &str, price: &str) -> Tick {
        Tick {
            symbol: "BTC-USDT".into(),
            price: price.into(),
            size: format!("size-{price}"),
            best_bid: format!("bid-{price}"),
            best_ask: format!("ask-{price}"),
            time: price.len() as u64,
            sequence: sequence.into(),
            source: source.into(),
        }
    }

    #[tokio::test]
    async fn the_cache_keeps_the_newest_tick_whole_and_an_older_one_never_overwrites_it() {
        let prices = MemoryPrices::default();
        let latest = || async { prices.get("BTC-USDT").await.unwrap().unwrap().tick };
        prices.put(&tick("a", "5", "1.5"));
        let newer = tick("a", "10", "20.25");
        prices.put(&newer);
        assert_eq!(latest().await, newer, "every field replaced");
        prices.put(&tick("a", "9", "9.9"));
        assert_eq!(
            latest().await,
            newer,
            "a lower sequence from the same source"
        );
        // Another source's sequences are not comparable: its tick is the newest seen.
        let other = tick("b", "1", "3");
        prices.put(&other);
        assert_eq!(latest().await, other);
    }
}
