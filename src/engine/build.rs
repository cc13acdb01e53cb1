//! Builds what a config names: the engine (broker, presence, cursors, control)
//! and the price cache beside it. The one place that chooses, used by a node
//! (`serve`) and by `switchyard feed`.

use std::sync::Arc;
use std::time::Duration;

use super::memory::{MemoryBroker, MemoryControl, MemoryCursors, MemoryPresence};
use super::nats::NatsBroker;
use super::{redis, Broker, Deliveries, Engine, LocalConnections, NoDeliveries, NodeInfo};
use crate::clock::unix_ms;
use crate::config::{Config, ConfigError, EngineKind};
use crate::feed::cache::{MemoryPrices, PriceCache, RedisPrices};

/// How often the memory broker drops channel logs whose history expired.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The engine of a gateway node delivering to `deliveries`, acting on `connections`,
/// and its price cache (sharing the engine's Redis connection when there is one).
pub async fn node(
    config: &Config,
    node_id: &str,
    deliveries: Arc<dyn Deliveries>,
    connections: Arc<dyn LocalConnections>,
) -> Result<(Engine, Arc<dyn PriceCache>), ConfigError> {
    let broker = broker(config, Arc::clone(&deliveries)).await?;
    if config.redis.enabled() {
        let parts = redis::connect(config, node_id, deliveries, connections).await?;
        let prices = RedisPrices::start(parts.primary, &config.redis.key_prefix).await;
        let engine = Engine {
            broker,
            presence: parts.presence,
            cursors: parts.cursors,
            registry: parts.control.clone(),
            control: parts.control,
        };
        return Ok((engine, prices));
    }
    if config.engine.kind == EngineKind::Nats {
        tracing::warn!("no redis.url: presence, cursors and control stay node-local");
    }
    let me = NodeInfo {
        id: node_id.to_string(),
        address: config.server.advertised(),
        region: config.server.region.clone(),
        connections: 0,
        started_at: unix_ms(),
        heartbeat_at: 0,
    };
    let control = Arc::new(MemoryControl::new(Arc::clone(&connections), deliveries, me));
    let engine = Engine {
        broker,
        presence: Arc::new(MemoryPresence::new(Arc::clone(&connections), node_id)),
        cursors: Arc::new(MemoryCursors::default()),
        control: Arc::clone(&control) as Arc<dyn super::Control>,
        registry: control,
    };
    Ok((engine, Arc::new(MemoryPrices::default())))
}

/// The broker and price cache of `switchyard feed`: it publishes and never
/// subscribes, so nothing is delivered to it.
pub async fn feed(config: &Config) -> Result<(Arc<dyn Broker>, Arc<dyn PriceCache>), ConfigError> {
    let broker = broker(config, Arc::new(NoDeliveries)).await?;
    let prices: Arc<dyn PriceCache> = if config.redis.enabled() {
        RedisPrices::connect(&config.redis).await?
    } else {
        Arc::new(MemoryPrices::default())
    };
    Ok((broker, prices))
}

async fn broker(
    config: &Config,
    deliveries: Arc<dyn Deliveries>,
) -> Result<Arc<dyn Broker>, ConfigError> {
    Ok(match config.engine.kind {
        EngineKind::Memory => {
            let broker = MemoryBroker::new(&config.namespaces, deliveries);
            broker.spawn_sweeper(SWEEP_EVERY);
            broker
        }
        EngineKind::Nats => NatsBroker::connect(config, deliveries).await?,
    })
}
