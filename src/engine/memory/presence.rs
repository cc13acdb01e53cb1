//! The memory engine's presence: channel members in this process; a user's
//! connections are the node's own, so the connection index answers for them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::channel::Channel;
use crate::engine::{
    BoxFuture, ClientInfo, EngineError, LocalConnections, Presence, PresencePage, PresenceStats,
};

/// Presence of the memory engine.
pub struct MemoryPresence {
    channels: Mutex<HashMap<Channel, BTreeMap<String, ClientInfo>>>,
    /// A user's connections are the node's own: the index answers for them.
    connections: Arc<dyn LocalConnections>,
    node: String,
}

impl MemoryPresence {
    /// Presence of one node, answering user queries from its connection index.
    pub fn new(connections: Arc<dyn LocalConnections>, node: &str) -> Self {
        MemoryPresence {
            channels: Mutex::default(),
            connections,
            node: node.to_string(),
        }
    }
}

impl Presence for MemoryPresence {
    fn join(&self, channel: &Channel, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        self.channels
            .lock()
            .entry(channel.clone())
            .or_default()
            .insert(info.conn_id.clone(), info);
        Box::pin(async { Ok(()) })
    }

    fn leave<'a>(
        &'a self,
        channel: &'a Channel,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let mut channels = self.channels.lock();
        if let Some(members) = channels.get_mut(channel) {
            members.remove(conn_id);
            if members.is_empty() {
                channels.remove(channel);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn page<'a>(
        &'a self,
        channel: &'a Channel,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<PresencePage, EngineError>> {
        let mut page = PresencePage::default();
        if let Some(members) = self.channels.lock().get(channel) {
            // Pages in conn_id order: the cursor is the last conn_id returned.
            let from = match cursor {
                Some(c) => Bound::Excluded(c.to_string()),
                None => Bound::Unbounded,
            };
            let mut rest = members.range((from, Bound::Unbounded));
            page.clients = rest.by_ref().take(limit).map(|(_, i)| i.clone()).collect();
            if rest.next().is_some() {
                page.next = page.clients.last().map(|i| i.conn_id.clone());
            }
        }
        Box::pin(async move { Ok(page) })
    }

    fn stats<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let stats = match self.channels.lock().get(channel) {
            Some(members) => {
                let users: HashSet<&str> = members.values().map(|i| i.user.as_str()).collect();
                PresenceStats {
                    clients: members.len() as u64,
                    users: users.len() as u64,
                }
            }
            None => PresenceStats {
                clients: 0,
                users: 0,
            },
        };
        Box::pin(async move { Ok(stats) })
    }

    fn connect(&self, _info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn disconnect<'a>(
        &'a self,
        _user: &'a str,
        _conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<ClientInfo>, EngineError>> {
        let list = self.connections.of_user(user, &self.node);
        Box::pin(async move { Ok(list) })
    }
}
