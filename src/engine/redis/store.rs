//! The connection to Redis and what every Redis-backed part shares: the key
//! names, the scripts, Redis health (up, and whether Redis may have lost writes),
//! the channel memberships this node owns, and command execution with the
//! rediscovery of a moved primary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{Pipeline, Value};

use super::heartbeat::Member;
use super::primary::Primary;
use super::scripts::{eval, Scripts};
use super::{EntrySet, Keys};
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::RedisConfig;
use crate::engine::{EngineError, LocalConnections};

/// A presence entry this node owns, as written to Redis.
pub(super) struct Owned {
    pub(super) user: Arc<str>,
    pub(super) json: Arc<str>,
}

/// The connection to Redis and what every Redis-backed part shares.
pub struct Store {
    pub(super) primary: Arc<Primary>,
    pub(super) keys: Keys,
    pub(super) scripts: Scripts,
    pub(super) cfg: RedisConfig,
    pub(super) node_id: String,
    pub(super) up: AtomicBool,
    /// Redis may have lost or missed writes (an error, a reconnect, a restart):
    /// the next heartbeat rewrites every entry this node owns and reloads revocations.
    pub(super) dirty: AtomicBool,
    /// Set on a clean shutdown: the heartbeat must not register the node again.
    pub(super) left: AtomicBool,
    /// Channel memberships of this node's connections, rewritten by the heartbeat.
    pub(super) members: Mutex<HashMap<Channel, HashMap<Arc<str>, Owned>>>,
    pub(super) connections: Arc<dyn LocalConnections>,
}

impl Store {
    /// A connection to the primary; looks for it when none is known yet.
    pub(super) async fn conn(&self) -> Result<ConnectionManager, EngineError> {
        if let Ok(conn) = self.primary.conn() {
            return Ok(conn);
        }
        self.primary.rediscover().await;
        self.primary.conn().inspect_err(|_| self.failed_silently())
    }

    /// Whether the last exchange with Redis succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(super) fn presence_ttl_ms(&self) -> u64 {
        self.cfg.presence_ttl.as_millis() as u64
    }

    pub(super) fn expiry(&self) -> u64 {
        unix_ms() + self.presence_ttl_ms()
    }

    /// Marks Redis as down and this node's entries as needing a rewrite.
    pub(super) fn failed_silently(&self) {
        if self.up.swap(false, Ordering::Relaxed) {
            crate::metrics::get().redis_disconnected();
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub(super) fn failed(&self, e: &redis::RedisError) -> EngineError {
        self.failed_silently();
        EngineError::Degraded(format!("redis: {e}"))
    }

    /// Runs a pipeline; loads the scripts and retries once when Redis lost them
    /// (a restart), and maps failures to [`EngineError::Degraded`].
    pub(super) async fn exec(&self, pipe: &Pipeline) -> Result<Vec<Value>, EngineError> {
        // Traced as a step of whatever asked (a subscribe, a presence page); the
        // background heartbeat and ack flushes run outside any span and stay silent.
        let parent = tracing::Span::current();
        if parent.is_none() {
            return self.exec_untraced(pipe).await;
        }
        let span = tracing::info_span!(
            "redis",
            commands = crate::telemetry::int(pipe.cmd_iter().count())
        );
        tracing::Instrument::instrument(self.exec_untraced(pipe), span).await
    }

    async fn exec_untraced(&self, pipe: &Pipeline) -> Result<Vec<Value>, EngineError> {
        for attempt in 0..2 {
            let mut conn = self.conn().await?;
            let started = std::time::Instant::now();
            let reply = pipe.query_async(&mut conn).await;
            crate::metrics::get()
                .redis_roundtrip
                .record(crate::metrics::since(started));
            let values: Vec<Value> = match reply {
                Ok(v) => v,
                Err(e) => {
                    let failure = self.failed(&e);
                    self.primary.rediscover().await;
                    return Err(failure);
                }
            };
            let noscript = values
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
            if noscript && attempt == 0 {
                self.load_scripts().await?;
                continue;
            }
            if let Some(Value::ServerError(e)) =
                values.iter().find(|v| matches!(v, Value::ServerError(_)))
            {
                if e.code() == "READONLY" {
                    // A former primary, now a replica: the primary moved.
                    self.failed_silently();
                    self.primary.rediscover().await;
                }
                return Err(EngineError::Degraded(format!(
                    "redis refused a command: {} {}",
                    e.code(),
                    e.details().unwrap_or("")
                )));
            }
            self.up.store(true, Ordering::Relaxed);
            return Ok(values);
        }
        Err(EngineError::Degraded(
            "redis keeps losing its scripts".into(),
        ))
    }

    /// Runs one script invocation.
    pub(super) async fn eval(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Value, EngineError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        eval(&mut pipe, script, keys).arg(args);
        self.exec(&pipe)
            .await?
            .pop()
            .ok_or_else(|| EngineError::Degraded("redis sent no reply".into()))
    }

    pub(super) async fn load_scripts(&self) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        for source in &self.scripts.sources {
            pipe.cmd("SCRIPT").arg("LOAD").arg(source);
        }
        let mut conn = self.conn().await?;
        pipe.query_async::<Vec<Value>>(&mut conn)
            .await
            .map(drop)
            .map_err(|e| self.failed(&e))
    }

    /// Adds or refreshes one entry of `set` now.
    pub(super) async fn join(
        &self,
        set: &EntrySet,
        id: &str,
        json: &str,
        user: &str,
    ) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        self.join_into(&mut pipe, set, id, json, user);
        self.exec(&pipe).await.map(drop)
    }

    /// JOINs of every member of `set`, for `pipe`.
    pub(super) fn join_all(&self, pipe: &mut Pipeline, set: &EntrySet, members: &[Member]) {
        for m in members {
            self.join_into(pipe, set, &m.id, &m.json(&self.node_id), &m.user);
        }
    }

    /// Removes one entry of `set` now.
    pub(super) async fn leave(&self, set: &EntrySet, id: &str) -> Result<(), EngineError> {
        self.eval(&self.scripts.leave, &set.keys(), &[id.as_bytes()])
            .await
            .map(drop)
    }

    /// A JOIN of one entry, for `pipe`.
    pub(super) fn join_into(
        &self,
        pipe: &mut Pipeline,
        set: &EntrySet,
        id: &str,
        json: &str,
        user: &str,
    ) {
        eval(pipe, &self.scripts.join, &set.keys())
            .arg(id)
            .arg(json)
            .arg(self.expiry())
            .arg(self.presence_ttl_ms())
            .arg(user);
    }
}
