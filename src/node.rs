//! The node: everything one gateway process shares between its connections
//! (config, token verifier, engine, hub, connection counts, drain signal).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::auth::Verifier;
use crate::config::{Config, ConfigError, NamespaceConfig};
use crate::connections::Connections;
use crate::engine::{Deliveries, Engine, LocalConnections};
use crate::feed::cache::PriceCache;
use crate::feed::Health;
use crate::hub::Hub;
use crate::server::origin::AllowedOrigins;
use crate::shutdown::Shutdown;

/// Shared state of one gateway process.
pub struct Node {
    pub id: String,
    pub config: Config,
    pub verifier: Verifier,
    pub engine: Engine,
    pub hub: Arc<Hub>,
    /// Open connections by user, for control commands.
    pub connections: Arc<Connections>,
    /// The latest price per symbol (`GET /api/v1/prices`).
    pub prices: Arc<dyn PriceCache>,
    /// State of the embedded feed's connectors, if any.
    pub feed: Arc<Health>,
    pub shutdown: Shutdown,
    /// `server.allowed_origins`, parsed.
    pub origins: AllowedOrigins,
    /// Stream epochs seen, shared by every subscription that follows one (a handful:
    /// one per namespace incarnation).
    epochs: parking_lot::Mutex<std::collections::HashSet<Arc<str>>>,
    /// Admitted connections (slots held).
    admitted: AtomicUsize,
    /// Notified whenever a connection slot is released.
    released: Notify,
}

/// Why a connection was refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    NodeFull,
    UserFull,
}

/// Holds one connection slot; releases it on drop.
pub struct ConnectionSlot {
    node: Arc<Node>,
    user: Arc<str>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.admitted.fetch_sub(1, Ordering::Relaxed);
        self.node.connections.release(&self.user);
        self.node.released.notify_waiters();
    }
}

impl Node {
    /// Builds a node and connects its engine, from a validated config.
    pub async fn new(config: Config) -> Result<Arc<Node>, ConfigError> {
        let verifier = Verifier::from_config(&config.auth)?;
        let origins = AllowedOrigins::parse(&config.server.allowed_origins)
            .map_err(|why| ConfigError(format!("`server.allowed_origins`: {why}")))?;
        let hub = Hub::new();
        let connections = Arc::new(Connections::default());
        let id = if config.server.node_id.is_empty() {
            crate::ids::random_node_id()
        } else {
            config.server.node_id.clone()
        };
        let (engine, prices) = crate::engine::build::node(
            &config,
            &id,
            Arc::clone(&hub) as Arc<dyn Deliveries>,
            Arc::clone(&connections) as Arc<dyn LocalConnections>,
        )
        .await?;
        Ok(Arc::new(Node {
            id,
            config,
            verifier,
            engine,
            hub,
            connections,
            prices,
            feed: Arc::new(Health::default()),
            shutdown: Shutdown::default(),
            origins,
            epochs: Default::default(),
            admitted: AtomicUsize::new(0),
            released: Notify::new(),
        }))
    }

    /// The shared copy of a stream epoch (a subscription keeps it for its acks).
    pub fn epoch(&self, epoch: &str) -> Arc<str> {
        let mut epochs = self.epochs.lock();
        if let Some(e) = epochs.get(epoch) {
            return Arc::clone(e);
        }
        let e: Arc<str> = Arc::from(epoch);
        epochs.insert(Arc::clone(&e));
        e
    }

    /// Options of the channel's namespace.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.config.namespace(name)
    }

    /// Takes a connection slot for `user`, within the node and per-user limits.
    pub fn admit(self: &Arc<Self>, user: &Arc<str>) -> Result<ConnectionSlot, Admission> {
        let max = self.config.server.max_connections;
        self.admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Admission::NodeFull)?;
        if !self
            .connections
            .admit(user, self.config.server.max_connections_per_user)
        {
            self.admitted.fetch_sub(1, Ordering::Relaxed);
            self.released.notify_waiters();
            return Err(Admission::UserFull);
        }
        Ok(ConnectionSlot {
            node: Arc::clone(self),
            user: Arc::clone(user),
        })
    }

    /// Open client connections.
    pub fn connection_count(&self) -> usize {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Ready for traffic: not draining, and the engine's backbone is reachable.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_draining() && self.engine.broker.backbone().is_ready()
    }

    /// Resolves once at most `n` client connections are open.
    pub async fn connections_at_most(&self, n: usize) {
        loop {
            let released = self.released.notified();
            if self.connection_count() <= n {
                return;
            }
            released.await;
        }
    }
}
