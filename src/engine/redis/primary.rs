//! The connection to the Redis primary, for everything Redis-backed on a node
//! (presence, cursors, control, the price cache): a `ConnectionManager`, which
//! reconnects and resubscribes by itself. With `redis.sentinels` the primary is
//! found through Redis Sentinel, and after a failover the connection moves to
//! the new primary: a failed command asks the sentinels where it is now.

use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    ConnectionAddr, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisConnectionInfo,
};

use crate::config::{ConfigError, RedisConfig};
use crate::engine::EngineError;

/// How often the sentinels are asked at most while commands keep failing.
const ASK_EVERY: Duration = Duration::from_millis(250);

enum Target {
    /// `redis.url`: always this server.
    Fixed,
    /// `redis.sentinels` + `redis.master_name`.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
    },
}

/// The primary this node talks to, and how to find it again.
pub struct Primary {
    current: RwLock<Option<(ConnectionAddr, ConnectionManager)>>,
    target: Target,
    /// Database, credentials and protocol for connections to the primary.
    settings: RedisConnectionInfo,
    manager: ConnectionManagerConfig,
    connect_timeout: Duration,
    asked: Mutex<Option<Instant>>,
}

fn bad(key: &str) -> impl Fn(redis::RedisError) -> ConfigError + '_ {
    move |e| ConfigError(format!("`{key}`: {e}"))
}

impl Primary {
    /// Prepares the connection (lazily: a node starts, degraded, while Redis is
    /// down). `manager` carries timeouts and, for the engine, the push sender.
    pub fn new(cfg: &RedisConfig, manager: ConnectionManagerConfig) -> Result<Self, ConfigError> {
        let credentials = |mut settings: RedisConnectionInfo| {
            settings = settings.set_protocol(ProtocolVersion::RESP3);
            if let Some(u) = &cfg.username {
                settings = settings.set_username(u);
            }
            if let Some(p) = &cfg.password {
                settings = settings.set_password(p);
            }
            settings
        };
        if cfg.sentinels.is_empty() {
            let info = cfg
                .url
                .as_str()
                .into_connection_info()
                .map_err(bad("redis.url"))?;
            let settings = credentials(info.redis_settings().clone());
            let addr = info.addr().clone();
            let primary = Primary {
                current: RwLock::new(None),
                target: Target::Fixed,
                settings,
                manager,
                connect_timeout: cfg.connect_timeout,
                asked: Mutex::new(None),
            };
            let conn = primary.manager_for(&addr).map_err(bad("redis.url"))?;
            *primary.current.write() = Some((addr, conn));
            return Ok(primary);
        }
        let sentinels = cfg
            .sentinels
            .iter()
            .map(|s| {
                let url = if s.contains("://") {
                    s.clone()
                } else {
                    format!("redis://{s}")
                };
                url.as_str()
                    .into_connection_info()
                    .map_err(bad("redis.sentinels"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Primary {
            current: RwLock::new(None),
            target: Target::Sentinel {
                sentinels,
                master: cfg.master_name.clone(),
            },
            settings: credentials(RedisConnectionInfo::default()),
            manager,
            connect_timeout: cfg.connect_timeout,
            asked: Mutex::new(None),
        })
    }

    fn manager_for(&self, addr: &ConnectionAddr) -> redis::RedisResult<ConnectionManager> {
        let info = addr
            .clone()
            .into_connection_info()?
            .set_redis_settings(self.settings.clone());
        let client = redis::Client::open(info)?;
        ConnectionManager::new_lazy_with_config(client, self.manager.clone())
    }

    /// A connection to the primary; with Sentinel, once one was found.
    pub fn conn(&self) -> Result<ConnectionManager, EngineError> {
        self.current
            .read()
            .as_ref()
            .map(|(_, conn)| conn.clone())
            .ok_or_else(|| {
                EngineError::Degraded("no redis primary found by the sentinels yet".into())
            })
    }

    /// After a failed command: with Sentinel, asks where the primary is now (at
    /// most every 250 ms) and moves there. The caller has marked its writes for a
    /// rewrite (a new primary may lack what the old one had not replicated).
    pub async fn rediscover(&self) {
        let Target::Sentinel { sentinels, master } = &self.target else {
            return;
        };
        {
            let mut asked = self.asked.lock();
            if asked.is_some_and(|t| t.elapsed() < ASK_EVERY) {
                return;
            }
            *asked = Some(Instant::now());
        }
        let Some(addr) = self.ask(sentinels, master).await else {
            return;
        };
        let first = match self.current.read().as_ref() {
            Some((current, _)) if *current == addr => return,
            Some(_) => false,
            None => true,
        };
        match self.manager_for(&addr) {
            Ok(conn) => {
                if first {
                    tracing::info!(primary = %addr, %master, "redis primary found by the sentinels");
                } else {
                    tracing::warn!(primary = %addr, %master, "redis primary moved (sentinel failover); reconnected");
                }
                *self.current.write() = Some((addr, conn));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to the primary the sentinels name")
            }
        }
    }

    /// The primary's address from the first sentinel that names a server which
    /// confirms it is a primary (a sentinel that has not seen the failover yet names
    /// the old one, which is down or now a replica).
    async fn ask(&self, sentinels: &[ConnectionInfo], master: &str) -> Option<ConnectionAddr> {
        for sentinel in sentinels {
            let query = async {
                let client = redis::Client::open(sentinel.clone()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let (host, port): (String, u16) = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(master)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let addr = ConnectionAddr::Tcp(host, port);
                let info = addr
                    .clone()
                    .into_connection_info()
                    .ok()?
                    .set_redis_settings(self.settings.clone());
                let mut server = redis::Client::open(info)
                    .ok()?
                    .get_multiplexed_async_connection()
                    .await
                    .ok()?;
                let role: Vec<redis::Value> =
                    redis::cmd("ROLE").query_async(&mut server).await.ok()?;
                let primary =
                    matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
                primary.then_some(addr)
            };
            if let Ok(Some(addr)) = tokio::time::timeout(self.connect_timeout, query).await {
                return Some(addr);
            }
        }
        None
    }
}
