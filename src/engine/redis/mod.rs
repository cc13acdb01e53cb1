//! The Redis side of the cluster engine (DESIGN §5): presence, acked cursors,
//! the control bus and the node registry, shared by every node.
//!
//! [`Store`] owns the connection (one multiplexed RESP3 connection, reconnected
//! by the redis crate's `ConnectionManager`), the key names, the Lua scripts,
//! Redis health, and the node's heartbeat: once per `heartbeat_interval` one
//! pipeline refreshes every presence entry this node owns and its registry
//! entry. Redis 7.0 has no per-field expiry, so each set of entries is a hash
//! (`id → JSON`) beside a sorted set (`id → expiry ms`); readers drop expired
//! entries inside the same script, so a crashed node's entries vanish within
//! `presence_ttl` without anyone cleaning up after it.
//!
//! Every key is documented in docs/architecture.md.

mod control;
mod cursors;
mod presence;
pub mod primary;

pub use control::RedisControl;
pub use cursors::RedisCursors;
pub use presence::RedisPresence;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Pipeline, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::{Deliveries, EngineError, LocalConnections};
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::{Config, ConfigError, RedisConfig};
use primary::Primary;

/// Pushed messages (pub/sub) waiting for the control task; beyond this they are
/// dropped and the next heartbeat reloads what matters (revocations).
const PUSH_QUEUE: usize = 4096;

/// Most commands per pipeline; a heartbeat of a big node is several pipelines.
const PIPELINE_CHUNK: usize = 1000;

/// Key and pub/sub channel names, all under the configured prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

/// Escapes `%` and `:` so a user or device id cannot reach into another key's name.
fn escape(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains(['%', ':']) {
        part.replace('%', "%25").replace(':', "%3A").into()
    } else {
        part.into()
    }
}

/// The keys of one set of expiring entries: data hash and expiry zset; for
/// channels also per-user counts and the ids in lexicographic order (for pages).
#[derive(Debug, Clone)]
pub struct EntrySet {
    data: String,
    exp: String,
    counted: Option<(String, String)>,
}

impl EntrySet {
    fn keys(&self) -> Vec<&str> {
        let mut k = vec![self.data.as_str(), self.exp.as_str()];
        if let Some((users, ids)) = &self.counted {
            k.push(users);
            k.push(ids);
        }
        k
    }
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Members of a channel: `presence:{channel}` (+ `:exp`, `:users`, `:ids`).
    pub fn channel_presence(&self, channel: &str) -> EntrySet {
        let data = format!("{}presence:{channel}", self.prefix);
        EntrySet {
            exp: format!("{data}:exp"),
            counted: Some((format!("{data}:users"), format!("{data}:ids"))),
            data,
        }
    }

    /// Connections of a user: `user:{user}` (+ `:exp`).
    pub fn user_connections(&self, user: &str) -> EntrySet {
        let data = format!("{}user:{}", self.prefix, escape(user));
        EntrySet {
            exp: format!("{data}:exp"),
            counted: None,
            data,
        }
    }

    /// The node registry: `nodes` (+ `:exp`).
    pub fn nodes(&self) -> EntrySet {
        let data = format!("{}nodes", self.prefix);
        EntrySet {
            exp: format!("{data}:exp"),
            counted: None,
            data,
        }
    }

    /// `cursor:{user}:{device}`: channel → highest acked seq, `<channel> epoch` → its epoch.
    pub fn cursor(&self, user: &str, device: &str) -> String {
        format!("{}cursor:{}:{}", self.prefix, escape(user), escape(device))
    }

    /// `cursor-generation`: the cursor store's generation (detects lost data).
    pub fn cursor_generation(&self) -> String {
        format!("{}cursor-generation", self.prefix)
    }

    /// `cursor-devices:{user}`: the devices that have cursors.
    pub fn cursor_devices(&self, user: &str) -> String {
        format!("{}cursor-devices:{}", self.prefix, escape(user))
    }

    /// `revoked`: token id → Unix ms until which it is refused.
    pub fn revoked(&self) -> String {
        format!("{}revoked", self.prefix)
    }

    /// Pub/sub channel of cluster commands.
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// Pub/sub channel of join/leave events.
    pub fn join_leave(&self) -> String {
        format!("{}joinleave", self.prefix)
    }
}

/// Shared by the scripts that read expiring entries: drops up to 1000 expired
/// entries (bounded, so a crashed node's many entries never block Redis long)
/// and keeps the per-user counts and the id index in step.
/// KEYS: data, exp, [users, ids]; ARGV[1]: now.
const FORGET: &str = r#"
local function forget(id)
  local v = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if KEYS[4] then redis.call('ZREM', KEYS[4], id) end
  if not v then return 0 end
  redis.call('HDEL', KEYS[1], id)
  if KEYS[3] then
    local u = cjson.decode(v)['user']
    if redis.call('HINCRBY', KEYS[3], u, -1) <= 0 then redis.call('HDEL', KEYS[3], u) end
  end
  return 1
end
local function clean(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
    forget(id)
  end
end
"#;

/// Adds or refreshes an entry. ARGV: id, json, expiry ms, key ttl ms, user.
const JOIN: &str = r#"
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if KEYS[3] and new == 1 then redis.call('HINCRBY', KEYS[3], ARGV[5], 1) end
if KEYS[4] then redis.call('ZADD', KEYS[4], 0, ARGV[1]) end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return new
"#;

/// Removes an entry. ARGV: id.
const LEAVE: &str = "return forget(ARGV[1])";

/// Up to `count` ids after `after` in id order, with the live ones' entries.
/// ARGV: now, after ('' for the start), count. Returns {last id examined or '', json...}.
const PAGE: &str = r#"
clean(ARGV[1])
local from = '-'
if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
local ids = redis.call('ZRANGE', KEYS[4], from, '+', 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {''}
if #ids == tonumber(ARGV[3]) then out[1] = ids[#ids] end
for _, id in ipairs(ids) do
  local s = redis.call('ZSCORE', KEYS[2], id)
  if s and tonumber(s) > tonumber(ARGV[1]) then
    local v = redis.call('HGET', KEYS[1], id)
    if v then table.insert(out, v) end
  end
end
return out
"#;

/// Counts without reading members. ARGV: now. Returns {clients, users}.
const STATS: &str = r#"
clean(ARGV[1])
local users = 0
if KEYS[3] then users = redis.call('HLEN', KEYS[3]) end
return {redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf'), users}
"#;

/// Every live entry of a small set (a user's connections, the nodes). ARGV: now.
const ALL: &str = r#"
clean(ARGV[1])
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then table.insert(out, v) end
end
return out
"#;

/// Moves cursors forward only. KEYS: cursor hash, devices set. ARGV: ttl ms,
/// device, then channel/seq/epoch triples (epoch `""` when unknown). Seqs compare
/// as decimal strings, so every u64 is exact (Lua numbers are doubles). A seq of
/// another stream incarnation than the stored one replaces it (seqs restart).
/// The epoch is kept in the field `<channel> epoch` (no channel has a space).
const CURSOR: &str = r#"
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
for i = 3, #ARGV, 3 do
  local ch, seq, ep = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local efield = ch .. ' epoch'
  local cur = redis.call('HGET', KEYS[1], ch)
  local cur_ep = redis.call('HGET', KEYS[1], efield)
  if ep ~= '' and cur_ep and cur_ep ~= ep then
    redis.call('HSET', KEYS[1], ch, seq, efield, ep)
  elseif not cur or greater(seq, cur) then
    redis.call('HSET', KEYS[1], ch, seq)
    if ep ~= '' then redis.call('HSET', KEYS[1], efield, ep) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"#;

/// The cursor store's generation: `"<id> <created_ms> <lost>"`. KEYS: the
/// generation key. ARGV: a new id, now (ms), the id this node knew (`""` if none).
/// Creates the generation when it is missing (lost = 1 when the node knew one,
/// i.e. Redis lost its data), and marks a generation lost when a node that knew
/// another one meets it. Returns the generation.
const GENERATION: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then
  local lost = '0'
  if ARGV[3] ~= '' then lost = '1' end
  g = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. lost
  redis.call('SET', KEYS[1], g)
  return g
end
local id = string.match(g, '^(%S+)')
if ARGV[3] ~= '' and id ~= ARGV[3] and string.sub(g, -1) == '0' then
  g = string.sub(g, 1, -2) .. '1'
  redis.call('SET', KEYS[1], g)
end
return g
"#;

/// The Lua scripts, loaded once per connection and called by SHA.
pub struct Scripts {
    join: redis::Script,
    leave: redis::Script,
    page: redis::Script,
    stats: redis::Script,
    all: redis::Script,
    cursor: redis::Script,
    generation: redis::Script,
    /// The sources, for `SCRIPT LOAD` after Redis lost them.
    sources: Vec<String>,
}

impl Scripts {
    fn new() -> Self {
        let sources: Vec<String> = vec![
            JOIN.to_string(),
            format!("{FORGET}\n{LEAVE}"),
            format!("{FORGET}\n{PAGE}"),
            format!("{FORGET}\n{STATS}"),
            format!("{FORGET}\n{ALL}"),
            CURSOR.to_string(),
            GENERATION.to_string(),
        ];
        let s = |i: usize| redis::Script::new(&sources[i]);
        Scripts {
            join: s(0),
            leave: s(1),
            page: s(2),
            stats: s(3),
            all: s(4),
            cursor: s(5),
            generation: s(6),
            sources,
        }
    }
}

/// Adds an `EVALSHA` of `script` to a pipeline.
fn eval<'p>(
    pipe: &'p mut Pipeline,
    script: &redis::Script,
    keys: &[&str],
) -> &'p mut redis::Pipeline {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
}

/// One entry this node owns.
struct Member {
    id: Arc<str>,
    user: Arc<str>,
    json: MemberJson,
}

/// What a member's entry holds: channel members keep their JSON; a user's
/// connections are encoded only when they must be written in full (most
/// heartbeats only refresh expiries).
enum MemberJson {
    Encoded(Arc<str>),
    Connection { device: Arc<str>, since: u64 },
}

impl Member {
    fn json(&self, node: &str) -> std::borrow::Cow<'_, str> {
        match &self.json {
            MemberJson::Encoded(j) => std::borrow::Cow::Borrowed(j),
            MemberJson::Connection { device, since } => {
                let info = super::ClientInfo {
                    conn_id: self.id.to_string(),
                    user: self.user.to_string(),
                    device: device.to_string(),
                    node: node.to_string(),
                    since: *since,
                };
                serde_json::to_string(&info).unwrap_or_default().into()
            }
        }
    }
}

/// The entries of one set this node owns.
type Group = (EntrySet, Vec<Member>);

/// A presence entry this node owns, as written to Redis.
struct Owned {
    user: Arc<str>,
    json: Arc<str>,
}

/// The connection to Redis and what every Redis-backed part shares.
pub struct Store {
    primary: Arc<Primary>,
    keys: Keys,
    scripts: Scripts,
    cfg: RedisConfig,
    node_id: String,
    up: AtomicBool,
    /// Redis may have lost or missed writes (an error, a reconnect, a restart):
    /// the next heartbeat rewrites every entry this node owns and reloads revocations.
    dirty: AtomicBool,
    /// Set on a clean shutdown: the heartbeat must not register the node again.
    left: AtomicBool,
    /// Channel memberships of this node's connections, rewritten by the heartbeat.
    members: Mutex<HashMap<Channel, HashMap<Arc<str>, Owned>>>,
    connections: Arc<dyn LocalConnections>,
}

/// The Redis-backed parts of an engine.
pub struct RedisParts {
    /// The connection to the primary, for the price cache to share.
    pub primary: Arc<Primary>,
    pub presence: Arc<RedisPresence>,
    pub cursors: Arc<RedisCursors>,
    pub control: Arc<RedisControl>,
}

impl Store {
    /// A connection to the primary; looks for it when none is known yet.
    async fn conn(&self) -> Result<ConnectionManager, EngineError> {
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

    fn presence_ttl_ms(&self) -> u64 {
        self.cfg.presence_ttl.as_millis() as u64
    }

    fn expiry(&self) -> u64 {
        unix_ms() + self.presence_ttl_ms()
    }

    /// Marks Redis as down and this node's entries as needing a rewrite.
    fn failed_silently(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
    }

    fn failed(&self, e: &redis::RedisError) -> EngineError {
        self.up.store(false, Ordering::Relaxed);
        self.dirty.store(true, Ordering::Relaxed);
        EngineError::Degraded(format!("redis: {e}"))
    }

    /// Runs a pipeline; loads the scripts and retries once when Redis lost them
    /// (a restart), and maps failures to [`EngineError::Degraded`].
    async fn exec(&self, pipe: &Pipeline) -> Result<Vec<Value>, EngineError> {
        for attempt in 0..2 {
            let mut conn = self.conn().await?;
            let values: Vec<Value> = match pipe.query_async(&mut conn).await {
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
    async fn eval(
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

    async fn load_scripts(&self) -> Result<(), EngineError> {
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
    async fn join(
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
    fn join_all(&self, pipe: &mut Pipeline, set: &EntrySet, members: &[Member]) {
        for m in members {
            self.join_into(pipe, set, &m.id, &m.json(&self.node_id), &m.user);
        }
    }

    /// Removes one entry of `set` now.
    async fn leave(&self, set: &EntrySet, id: &str) -> Result<(), EngineError> {
        self.eval(&self.scripts.leave, &set.keys(), &[id.as_bytes()])
            .await
            .map(drop)
    }

    /// A JOIN of one entry, for `pipe`.
    fn join_into(&self, pipe: &mut Pipeline, set: &EntrySet, id: &str, json: &str, user: &str) {
        eval(pipe, &self.scripts.join, &set.keys())
            .arg(id)
            .arg(json)
            .arg(self.expiry())
            .arg(self.presence_ttl_ms())
            .arg(user);
    }

    /// One heartbeat: the registry entry, then every presence entry this node owns.
    /// Normally expiries only (`ZADD XX`); entries Redis no longer has, and all of
    /// them after trouble, are written again in full.
    async fn heartbeat(&self, me: &NodeEntry, control: &RedisControl) -> Result<(), EngineError> {
        if self.left.load(Ordering::Relaxed) {
            return Ok(());
        }
        let rewrite = self.dirty.swap(false, Ordering::Relaxed);
        let result = self.refresh(me, rewrite).await;
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

    async fn refresh(&self, me: &NodeEntry, rewrite: bool) -> Result<(), EngineError> {
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
    async fn rejoin_missing(
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
struct NodeEntry {
    id: String,
    address: String,
    region: String,
    started_at: u64,
}

impl NodeEntry {
    fn json(&self, connections: u64) -> String {
        serde_json::to_string(&super::NodeInfo {
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

/// Runs the heartbeat every interval until the node is gone.
async fn heartbeats(store: Weak<Store>, control: Weak<RedisControl>, me: NodeEntry) {
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
