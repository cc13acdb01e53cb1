//! The control bus over Redis pub/sub: disconnect a user or device and revoke a
//! token id on every node, carry join/leave events between nodes, and list the
//! node registry.
//!
//! Revoked token ids are also kept in the `revoked` sorted set until they would
//! expire; every node holds them in memory (loaded at start and after any Redis
//! trouble), so checking a token on connect costs no round trip.

use std::sync::{Arc, Weak};

use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{json_list, push_message, Store};
use crate::clock::unix_ms;
use crate::engine::revocations::Revocations;
use crate::engine::{
    BoxFuture, Control, Deliveries, EngineError, JoinLeave, LocalConnections, NodeInfo, Registry,
};

/// A command on the control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Command {
    Disconnect {
        user: String,
        device: Option<String>,
    },
    Revoke {
        jti: String,
        until: u64,
    },
}

/// A join/leave event with the node it happened on (which delivered it already).
#[derive(Debug, Serialize, Deserialize)]
struct Event {
    origin: String,
    #[serde(flatten)]
    event: JoinLeave,
}

/// Control of the Redis engine.
pub struct RedisControl {
    store: Arc<Store>,
    deliveries: Arc<dyn Deliveries>,
    connections: Arc<dyn LocalConnections>,
    revoked: Revocations,
    /// Join/leave events for the other nodes, published in batches by one task.
    events: mpsc::Sender<String>,
}

/// Join/leave events waiting to be published; beyond, they are dropped (logged):
/// presence itself is unaffected, only the notification to other nodes.
const EVENT_QUEUE: usize = 4096;

/// Publishes queued join/leave events, everything pending in one pipeline.
async fn publish_events(store: Arc<Store>, mut events: mpsc::Receiver<String>) {
    let channel = store.keys.join_leave();
    let mut batch = Vec::new();
    while events.recv_many(&mut batch, 512).await > 0 {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for payload in batch.drain(..) {
            pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
        }
        if let Err(e) = store.exec(&pipe).await {
            tracing::debug!(error = %e, "join/leave events not sent to other nodes");
        }
    }
}

impl RedisControl {
    pub(super) fn new(
        store: Arc<Store>,
        deliveries: Arc<dyn Deliveries>,
        connections: Arc<dyn LocalConnections>,
    ) -> Self {
        let (events, queued) = mpsc::channel(EVENT_QUEUE);
        tokio::spawn(publish_events(Arc::clone(&store), queued));
        RedisControl {
            store,
            deliveries,
            connections,
            revoked: Revocations::default(),
            events,
        }
    }

    /// Subscribes to the control and event channels (the connection manager
    /// subscribes again after every reconnect).
    pub(super) async fn subscribe(&self) -> Result<(), EngineError> {
        let mut conn = self.store.conn().await?;
        for channel in [self.store.keys.control(), self.store.keys.join_leave()] {
            conn.subscribe(&channel)
                .await
                .map_err(|e| self.store.failed(&e))?;
        }
        Ok(())
    }

    /// Replaces expired revocations with what Redis holds (it may have missed
    /// messages while it was unreachable). Local entries Redis lost (a restart
    /// without persistence) are kept until they expire.
    pub(super) async fn reload_revoked(&self) -> Result<(), EngineError> {
        let now = unix_ms();
        let key = self.store.keys.revoked();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now)
            .ignore();
        pipe.cmd("ZRANGE")
            .arg(&key)
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES");
        let reply = self.store.exec(&pipe).await?.pop().unwrap_or(Value::Nil);
        let pairs: Vec<(String, f64)> = redis::from_redis_value(reply).unwrap_or_default();
        self.revoked
            .merge(pairs.into_iter().map(|(jti, until)| (jti, until as u64)));
        Ok(())
    }

    fn apply_revoke(&self, jti: &str, until: u64) {
        // Recorded before the kick, so a reconnect racing the close is refused.
        self.revoked.add(jti, until);
        let n = self.connections.kick_token(jti, "token revoked");
        if n > 0 {
            tracing::info!(connections = n, "closed connections of a revoked token");
        }
    }

    fn on_message(&self, channel: &str, payload: &[u8]) {
        if channel == self.store.keys.control() {
            match serde_json::from_slice::<Command>(payload) {
                Ok(Command::Disconnect { user, device }) => {
                    self.connections.kick_user(
                        &user,
                        device.as_deref(),
                        "disconnected by the server",
                    );
                }
                Ok(Command::Revoke { jti, until }) => self.apply_revoke(&jti, until),
                Err(e) => tracing::warn!(error = %e, "ignored a malformed control message"),
            }
        } else if channel == self.store.keys.join_leave() {
            match serde_json::from_slice::<Event>(payload) {
                Ok(ev) if ev.origin == self.store.node_id => {}
                Ok(ev) => self.deliver(&ev.event),
                Err(e) => tracing::warn!(error = %e, "ignored a malformed join/leave event"),
            }
        }
    }

    fn deliver(&self, event: &JoinLeave) {
        self.deliveries.join_leave(event);
    }

    async fn publish(&self, channel: String, payload: String) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("PUBLISH").arg(channel).arg(payload);
        self.store.exec(&pipe).await.map(drop)
    }
}

/// Handles pushed messages until the node is gone.
pub(super) async fn listen(control: Weak<RedisControl>, mut pushes: mpsc::Receiver<PushInfo>) {
    while let Some(info) = pushes.recv().await {
        let Some(control) = control.upgrade() else {
            return;
        };
        if info.kind == PushKind::Disconnection {
            // Messages may have been missed: the next heartbeat rewrites and reloads.
            control.store.failed_silently();
            continue;
        }
        if let Some((channel, payload)) = push_message(info) {
            control.on_message(&channel, &payload);
        }
    }
}

impl Control for RedisControl {
    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        device: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let cmd = Command::Disconnect {
            user: user.to_string(),
            device: device.map(str::to_string),
        };
        Box::pin(async move {
            let payload = serde_json::to_string(&cmd).unwrap_or_default();
            self.publish(self.store.keys.control(), payload).await
        })
    }

    fn revoke<'a>(&'a self, jti: &'a str, until_ms: u64) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let payload = serde_json::to_string(&Command::Revoke {
                jti: jti.to_string(),
                until: until_ms,
            })
            .unwrap_or_default();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("ZADD")
                .arg(self.store.keys.revoked())
                .arg(until_ms)
                .arg(jti)
                .ignore();
            pipe.cmd("PUBLISH")
                .arg(self.store.keys.control())
                .arg(payload);
            self.store.exec(&pipe).await?;
            self.apply_revoke(jti, until_ms);
            Ok(())
        })
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains(jti)
    }

    fn announce(&self, event: JoinLeave) {
        self.deliver(&event);
        let payload = serde_json::to_string(&Event {
            origin: self.store.node_id.clone(),
            event,
        })
        .unwrap_or_default();
        if self.events.try_send(payload).is_err() {
            tracing::debug!("join/leave queue full; event not sent to other nodes");
        }
    }
}

impl Registry for RedisControl {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, EngineError>> {
        Box::pin(async move {
            let set = self.store.keys.nodes();
            let now = unix_ms().to_string();
            let reply = self
                .store
                .eval(&self.store.scripts.all, &set.keys(), &[now.as_bytes()])
                .await?;
            let mut list: Vec<NodeInfo> = json_list(reply);
            list.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(list)
        })
    }

    fn store_up(&self) -> Option<bool> {
        Some(self.store.is_up())
    }

    fn leave_cluster(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.store
                .left
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let set = self.store.keys.nodes();
            let id = self.store.node_id.clone();
            if let Err(e) = self.store.leave(&set, &id).await {
                tracing::warn!(error = %e, "could not remove this node from the registry");
            }
        })
    }
}
