//! The memory engine's control: commands act on this node's connections, the
//! registry is this node alone, and join/leave goes straight to this node's hub.

use std::sync::Arc;

use crate::clock::unix_ms;
use crate::engine::revocations::Revocations;
use crate::engine::{
    BoxFuture, Control, Deliveries, EngineError, JoinLeave, LocalConnections, NodeInfo, Registry,
};

/// Control of the memory engine: commands act on this node's connections, and
/// the registry is this node alone.
pub struct MemoryControl {
    connections: Arc<dyn LocalConnections>,
    deliveries: Arc<dyn Deliveries>,
    revoked: Revocations,
    me: NodeInfo,
}

impl MemoryControl {
    /// Control for the node described by `me`.
    pub fn new(
        connections: Arc<dyn LocalConnections>,
        deliveries: Arc<dyn Deliveries>,
        me: NodeInfo,
    ) -> Self {
        MemoryControl {
            connections,
            deliveries,
            revoked: Revocations::default(),
            me,
        }
    }
}

impl Control for MemoryControl {
    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        device: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.connections
            .kick_user(user, device, "disconnected by the server");
        Box::pin(async { Ok(()) })
    }

    fn revoke<'a>(&'a self, jti: &'a str, until_ms: u64) -> BoxFuture<'a, Result<(), EngineError>> {
        self.revoked.add(jti, until_ms);
        self.connections.kick_token(jti, "token revoked");
        Box::pin(async { Ok(()) })
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains(jti)
    }

    fn announce(&self, event: JoinLeave) {
        self.deliveries.join_leave(&event);
    }
}

impl Registry for MemoryControl {
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, EngineError>> {
        let mut me = self.me.clone();
        me.connections = self.connections.count() as u64;
        me.heartbeat_at = unix_ms();
        Box::pin(async move { Ok(vec![me]) })
    }
}
