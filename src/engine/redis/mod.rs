//! The Redis side of the cluster engine (docs/architecture.md, "Redis"):
//! presence, acked cursors, the control bus and the node registry, shared by
//! every node. This module wires them: `connect` builds the [`Store`], starts the
//! heartbeat, the cursor writer and the control bus listener, and hands the parts
//! to `engine::build`. Redis 7.0 has no per-field expiry, so each set of entries
//! is a hash (`id → JSON`) beside a sorted set (`id → expiry ms`); readers drop
//! expired entries inside the same script, so a crashed node's entries vanish
//! within `presence_ttl` without anyone cleaning up after it.

mod control;
mod cursors;
mod heartbeat;
mod keys;
mod presence;
pub mod primary;
mod scripts;
mod store;

use heartbeat::{heartbeats, NodeEntry};
pub use keys::{EntrySet, Keys};
use scripts::Scripts;
pub use store::Store;

pub use control::RedisControl;
pub use cursors::RedisCursors;
pub use presence::RedisPresence;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;
use redis::aio::ConnectionManagerConfig;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::{Deliveries, LocalConnections};
use crate::clock::unix_ms;
use crate::config::{Config, ConfigError};
use primary::Primary;

/// Pushed messages (pub/sub) waiting for the control task; beyond this they are
/// dropped and the next heartbeat reloads what matters (revocations).
const PUSH_QUEUE: usize = 4096;

/// The Redis-backed parts of an engine.
pub struct RedisParts {
    /// The connection to the primary, for the price cache to share.
    pub primary: Arc<Primary>,
    pub presence: Arc<RedisPresence>,
    pub cursors: Arc<RedisCursors>,
    pub control: Arc<RedisControl>,
}

/// Connects to Redis (lazily: a node starts, degraded, while Redis is down) and
/// starts the heartbeat, the cursor writer and the control bus listener.
pub async fn connect(
    config: &Config,
    node_id: &str,
    deliveries: Arc<dyn Deliveries>,
    connections: Arc<dyn LocalConnections>,
) -> Result<RedisParts, ConfigError> {
    let cfg = &config.redis;
    let (push_tx, push_rx) = mpsc::channel::<PushInfo>(PUSH_QUEUE);
    let manager_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(cfg.response_timeout))
        // Our heartbeat retries every interval; a command should fail fast meanwhile.
        .set_number_of_retries(0)
        .set_push_sender(move |info: PushInfo| push_tx.try_send(info))
        .set_automatic_resubscription();
    let primary = Arc::new(Primary::new(cfg, manager_cfg)?);

    let store = Arc::new(Store {
        primary: Arc::clone(&primary),
        keys: Keys::new(&cfg.key_prefix),
        scripts: Scripts::new(),
        cfg: cfg.clone(),
        node_id: node_id.to_string(),
        up: AtomicBool::new(false),
        dirty: AtomicBool::new(true),
        left: AtomicBool::new(false),
        members: Mutex::default(),
        connections: Arc::clone(&connections),
    });
    let me = NodeEntry {
        id: node_id.to_string(),
        address: config.server.advertised(),
        region: config.server.region.clone(),
        started_at: unix_ms(),
    };
    let control = Arc::new(RedisControl::new(
        Arc::clone(&store),
        deliveries,
        connections,
    ));
    let cursors = RedisCursors::start(Arc::clone(&store));
    let presence = Arc::new(RedisPresence::new(Arc::clone(&store)));

    if let Err(e) = control.subscribe().await {
        tracing::warn!(error = %e, "redis unreachable at start; presence, cursors and control are degraded until it is back");
    }
    // The first heartbeat registers the node and loads revocations before any client
    // connects; later ones run on the interval.
    if let Err(e) = store.heartbeat(&me, &control).await {
        tracing::warn!(error = %e, "redis heartbeat failed");
    }
    tokio::spawn(control::listen(Arc::downgrade(&control), push_rx));
    tokio::spawn(heartbeats(
        Arc::downgrade(&store),
        Arc::downgrade(&control),
        me,
    ));
    Ok(RedisParts {
        primary,
        presence,
        cursors,
        control,
    })
}

/// Parses a script reply that is a list of JSON strings.
fn json_list<T: serde::de::DeserializeOwned>(v: Value) -> Vec<T> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::BulkString(b) => serde_json::from_slice(&b).ok(),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Redis push messages this node reacts to.
fn push_message(info: PushInfo) -> Option<(String, Vec<u8>)> {
    if info.kind != PushKind::Message {
        return None;
    }
    let mut data = info.data.into_iter();
    let channel = match data.next()? {
        Value::BulkString(b) => String::from_utf8(b).ok()?,
        _ => return None,
    };
    match data.next()? {
        Value::BulkString(b) => Some((channel, b)),
        _ => None,
    }
}
