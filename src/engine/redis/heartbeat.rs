//! The node's heartbeat: once per `heartbeat_interval` it refreshes every
//! presence entry this node owns and its registry entry, and rewrites whatever
//! Redis lost (docs/architecture.md, "Heartbeat").

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::Value;

use super::control::RedisControl;
use super::store::Store;
use super::EntrySet;
use crate::clock::unix_ms;
use crate::engine::EngineError;

/// Most commands per pipeline; a heartbeat of a big node is several pipelines.
const PIPELINE_CHUNK: usize = 1000;

/// One entry this node owns.
pub(super) struct Member {
    pub(super) id: Arc<str>,
    pub(super) user: Arc<str>,
    pub(super) json: MemberJson,
}

/// What a member's entry holds: channel members keep their JSON; a user's
/// connections are encoded only when they must be written in full (most
/// heartbeats only refresh expiries).
pub(super) enum MemberJson {
    Encoded(Arc<str>),
    Connection { device: Arc<str>, since: u64 },
}

impl Member {
    pub(super) fn json(&self, node: &str) -> std::borrow::Cow<'_, str> {
        match &self.json {
            MemberJson::Encoded(j) => std::borrow::Cow::Borrowed(j),
            MemberJson::Connection { device, since } => {
                let info =
                    crate::engine::ClientInfo::new(&self.id, &self.user, device, node, *since);
                serde_json::to_string(&info).unwrap_or_default().into()
            }
        }
    }
}

/// The entries of one set this node owns.
type Group = (EntrySet, Vec<Member>);

impl Store {
    /// One heartbeat: the registry entry, then every presence entry this node owns.
    /// Normally expiries only (`ZADD XX`); entries Redis no longer has, and all of
    /// them after trouble, are written again in full.
    pub(super) async fn heartbeat(
        &self,
        me: &NodeEntry,
        control: &RedisControl,
    ) -> Result<(), EngineError> {
        if self.left.load(Ordering::Relaxed) {
            return Ok(());
        }
        let rewrite = self.dirty.swap(false, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = self.refresh(me, rewrite).await;
        crate::metrics::get()
            .heartbeat
            .record(crate::metrics::since(started));
        if result.is_ok() && rewrite {
            // Subscribing again is harmless, and needed when the first attempt
            // (Redis down at start) never registered the subscription.
            let caught_up = match control.subscribe().await {
                Ok(()) => control.reload_revoked().await,
                Err(e) => Err(e),
            };
            if let Err(e) = caught_up {
                self.dirty.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        if result.is_err() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        result
    }

    pub(super) async fn refresh(&self, me: &NodeEntry, rewrite: bool) -> Result<(), EngineError> {
        // Snapshot what this node owns; no lock is held across the round trips.
        let mut groups: Vec<Group> = Vec::new();
        {
            let members = self.members.lock();
            for (channel, entries) in members.iter() {
                let list = entries
                    .iter()
                    .map(|(id, o)| Member {
                        id: Arc::clone(id),
                        user: Arc::clone(&o.user),
                        json: MemberJson::Encoded(Arc::clone(&o.json)),
                    })
                    .collect();
                groups.push((self.keys.channel_presence(channel.as_str()), list));
            }
        }
        for (user, list) in self.connections.snapshot() {
            let set = self.keys.user_connections(&user);
            let list = list
                .into_iter()
                .map(|(id, device, since)| Member {
                    id,
                    user: Arc::clone(&user),
                    json: MemberJson::Connection { device, since },
                })
                .collect();
            groups.push((set, list));
        }

        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let node_json = me.json(self.connections.count() as u64);
        self.join_into(&mut pipe, &self.keys.nodes(), &me.id, &node_json, "");
        let mut checked: Vec<usize> = Vec::new();
        let mut first = true;
        for (i, (set, list)) in groups.iter().enumerate() {
            if pipe.len() >= PIPELINE_CHUNK {
                let values = self.exec(&pipe).await?;
                self.rejoin_missing(&groups, &checked, &values, first)
                    .await?;
                pipe = redis::pipe();
                pipe.ignore_errors();
                checked.clear();
                first = false;
            }
            if rewrite {
                self.join_all(&mut pipe, set, list);
            } else {
                let expiry = self.expiry();
                let zadd = pipe.cmd("ZADD").arg(&set.exp).arg("XX").arg("CH");
                for m in list {
                    zadd.arg(expiry).arg(&*m.id);
                }
                checked.push(i);
                for key in set.keys() {
                    pipe.cmd("PEXPIRE")
                        .arg(key)
                        .arg(self.presence_ttl_ms())
                        .ignore();
                }
            }
        }
        let values = self.exec(&pipe).await?;
        self.rejoin_missing(&groups, &checked, &values, first).await
    }

    /// After a `ZADD XX CH` refresh: sets where fewer entries were updated than this
    /// node owns lost some (expired while Redis was unreachable, or Redis restarted);
    /// they are written again.
    pub(super) async fn rejoin_missing(
        &self,
        groups: &[Group],
        checked: &[usize],
        values: &[Value],
        skip_registry: bool,
    ) -> Result<(), EngineError> {
        // Replies of `ignore()`d commands are dropped: one reply per ZADD, after the
        // registry JOIN at the start of the first pipeline.
        let zadds = values.iter().skip(usize::from(skip_registry));
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (&i, v) in checked.iter().zip(zadds) {
            let (set, list) = &groups[i];
            let updated = match v {
                Value::Int(n) => *n as usize,
                _ => 0,
            };
            if updated < list.len() {
                self.join_all(&mut pipe, set, list);
            }
        }
        if !pipe.is_empty() {
            self.exec(&pipe).await?;
        }
        Ok(())
    }
}

/// This node's registry entry.
pub(super) struct NodeEntry {
    pub(super) id: String,
    pub(super) address: String,
    pub(super) region: String,
    pub(super) started_at: u64,
}

impl NodeEntry {
    pub(super) fn json(&self, connections: u64) -> String {
        serde_json::to_string(&crate::engine::NodeInfo {
            id: self.id.clone(),
            address: self.address.clone(),
            region: self.region.clone(),
            connections,
            started_at: self.started_at,
            heartbeat_at: unix_ms(),
        })
        .unwrap_or_default()
    }
}

/// Runs the heartbeat every interval until the node is gone.
pub(super) async fn heartbeats(store: Weak<Store>, control: Weak<RedisControl>, me: NodeEntry) {
    let interval = match store.upgrade() {
        Some(s) => s.cfg.heartbeat_interval,
        None => return,
    };
    // After a failure, retry sooner than a long interval: until it succeeds the
    // node may not be subscribed to the control bus.
    let retry = interval.min(Duration::from_secs(1));
    let mut was_up = match store.upgrade() {
        Some(s) => s.is_up(),
        None => return,
    };
    loop {
        tokio::time::sleep(if was_up { interval } else { retry }).await;
        let (Some(store), Some(control)) = (store.upgrade(), control.upgrade()) else {
            return;
        };
        // Waking the connection is what makes the connection manager reconnect and
        // resubscribe after an outage.
        match store.heartbeat(&me, &control).await {
            Ok(()) => {
                if !was_up {
                    tracing::info!("redis is back; presence rewritten");
                }
                was_up = true;
            }
            Err(e) => {
                if was_up {
                    tracing::warn!(error = %e, "redis heartbeat failed; presence, cursors and control are degraded");
                }
                was_up = false;
            }
        }
    }
}
