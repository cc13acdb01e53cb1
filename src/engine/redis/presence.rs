//! Cluster-wide presence in Redis: channel members and users' connections as
//! expiring entries (see the module doc of `engine::redis`).

use std::sync::Arc;

use redis::Value;

use super::store::Owned;
use super::{json_list, Store};
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::engine::{BoxFuture, ClientInfo, EngineError, Presence, PresencePage, PresenceStats};

/// Presence of the Redis engine.
pub struct RedisPresence {
    store: Arc<Store>,
}

impl RedisPresence {
    pub(super) fn new(store: Arc<Store>) -> Self {
        RedisPresence { store }
    }
}

fn to_json(info: &ClientInfo) -> Arc<str> {
    serde_json::to_string(info).unwrap_or_default().into()
}

impl Presence for RedisPresence {
    fn join(&self, channel: &Channel, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        let json = to_json(&info);
        let user: Arc<str> = info.user.as_str().into();
        let conn_id: Arc<str> = info.conn_id.as_str().into();
        // Owned first: should the write fail, the heartbeat writes it once Redis is back.
        self.store
            .members
            .lock()
            .entry(channel.clone())
            .or_default()
            .insert(
                conn_id,
                Owned {
                    user: Arc::clone(&user),
                    json: Arc::clone(&json),
                },
            );
        let set = self.store.keys.channel_presence(channel.as_str());
        Box::pin(async move { self.store.join(&set, &info.conn_id, &json, &user).await })
    }

    fn leave<'a>(
        &'a self,
        channel: &'a Channel,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        {
            let mut members = self.store.members.lock();
            if let Some(m) = members.get_mut(channel) {
                m.remove(conn_id);
                if m.is_empty() {
                    members.remove(channel);
                }
            }
        }
        let set = self.store.keys.channel_presence(channel.as_str());
        Box::pin(async move { self.store.leave(&set, conn_id).await })
    }

    fn page<'a>(
        &'a self,
        channel: &'a Channel,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<PresencePage, EngineError>> {
        let set = self.store.keys.channel_presence(channel.as_str());
        Box::pin(async move {
            let mut after = cursor.unwrap_or("").to_string();
            let mut clients: Vec<ClientInfo> = Vec::new();
            // Expired entries are skipped, so one call may fill less than a page.
            loop {
                let want = limit.saturating_sub(clients.len()).max(1).to_string();
                let now = unix_ms().to_string();
                let reply = self
                    .store
                    .eval(
                        &self.store.scripts.page,
                        &set.keys(),
                        &[now.as_bytes(), after.as_bytes(), want.as_bytes()],
                    )
                    .await?;
                let Value::Array(mut items) = reply else {
                    return Err(EngineError::Degraded("unexpected presence reply".into()));
                };
                if items.is_empty() {
                    return Err(EngineError::Degraded("unexpected presence reply".into()));
                }
                let rest = items.split_off(1);
                after = match items.pop() {
                    Some(Value::BulkString(b)) => String::from_utf8(b).unwrap_or_default(),
                    _ => String::new(),
                };
                clients.extend(json_list::<ClientInfo>(Value::Array(rest)));
                if after.is_empty() || clients.len() >= limit {
                    break;
                }
            }
            Ok(PresencePage {
                clients,
                next: (!after.is_empty()).then_some(after),
            })
        })
    }

    fn stats<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let set = self.store.keys.channel_presence(channel.as_str());
        Box::pin(async move {
            let now = unix_ms().to_string();
            let reply = self
                .store
                .eval(&self.store.scripts.stats, &set.keys(), &[now.as_bytes()])
                .await?;
            match reply {
                Value::Array(v) => match v.as_slice() {
                    [Value::Int(clients), Value::Int(users)] => Ok(PresenceStats {
                        clients: *clients as u64,
                        users: *users as u64,
                    }),
                    _ => Err(EngineError::Degraded("unexpected stats reply".into())),
                },
                _ => Err(EngineError::Degraded("unexpected stats reply".into())),
            }
        })
    }

    fn connect(&self, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        // The node's connection index owns the entry; this writes it at once
        // rather than at the next heartbeat.
        let set = self.store.keys.user_connections(&info.user);
        Box::pin(async move {
            let json = to_json(&info);
            self.store
                .join(&set, &info.conn_id, &json, &info.user)
                .await
        })
    }

    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let set = self.store.keys.user_connections(user);
        Box::pin(async move { self.store.leave(&set, conn_id).await })
    }

    fn user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<ClientInfo>, EngineError>> {
        let set = self.store.keys.user_connections(user);
        Box::pin(async move {
            let now = unix_ms().to_string();
            let reply = self
                .store
                .eval(&self.store.scripts.all, &set.keys(), &[now.as_bytes()])
                .await?;
            let mut list: Vec<ClientInfo> = json_list(reply);
            list.sort_by(|a, b| (a.since, &a.conn_id).cmp(&(b.since, &b.conn_id)));
            Ok(list)
        })
    }
}
