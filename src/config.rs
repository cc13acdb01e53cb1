//! Configuration: the TOML file, `SWITCHYARD_SECTION__KEY` environment overrides,
//! defaults for every option, and validation that names the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::auth::Permission;

/// The whole configuration of one node.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub session: SessionConfig,
    pub api: ApiConfig,
    pub engine: EngineConfig,
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub feed: FeedConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    /// Options per channel namespace (the first token of a channel name).
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

/// Listener, identity and lifecycle of the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Node id shown to clients and in presence; a random id when empty.
    pub node_id: String,
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
    /// Clients are told to reconnect after a random delay up to this, so a
    /// draining node does not move all its clients to its neighbours at once.
    #[serde(with = "duration")]
    pub reconnect_jitter: Duration,
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    /// A client that has not sent its request headers by then is dropped (slowloris).
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Address other nodes and operators reach this node at (node registry); `listen` when empty.
    pub advertise: String,
    /// Free-form region label shown in the node registry.
    pub region: String,
    /// Most presence members one page returns (client frame and API).
    pub presence_page_max: usize,
    /// A request body not fully received by then is answered 408 and the connection closed.
    #[serde(with = "duration")]
    pub body_read_timeout: Duration,
    /// Origins allowed to open WebSockets: exact (`https://app.example.com`) or with a
    /// leading wildcard label (`https://*.example.com`); empty allows every origin.
    pub allowed_origins: Vec<String>,
    /// The demo page at `/demo/` and `POST /demo/token`, which mints tokens for anyone:
    /// development only.
    pub demo: bool,
}

impl ServerConfig {
    /// The address this node is reached at, as the registry shows it.
    pub fn advertised(&self) -> String {
        if self.advertise.is_empty() {
            self.listen.to_string()
        } else {
            self.advertise.clone()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            node_id: String::new(),
            drain_timeout: Duration::from_secs(10),
            reconnect_jitter: Duration::from_secs(5),
            max_connections: 200_000,
            max_connections_per_user: 64,
            header_read_timeout: Duration::from_secs(10),
            advertise: String::new(),
            region: String::new(),
            presence_page_max: 1000,
            body_read_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            demo: false,
        }
    }
}

/// How tokens are verified (and, for development, minted).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret for HS256; also what `switchyard token` signs with.
    pub hmac_secret: String,
    /// PEM file with an RSA public key (RS256).
    pub rsa_public_key: Option<PathBuf>,
    /// PEM file with an EC P-256 public key (ES256).
    pub ec_public_key: Option<PathBuf>,
    /// A JWKS file; keys are chosen by the token's `kid`.
    pub jwks_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// How long before expiry the client is sent `expiring`.
    #[serde(with = "duration")]
    pub expiring_notice: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hmac_secret: String::new(),
            rsa_public_key: None,
            ec_public_key: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
            expiring_notice: Duration::from_secs(60),
        }
    }
}

/// Limits and timers of one client connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Outbox bound in frames; past it a non-conflated connection is closed with 4008.
    pub outbox_messages: usize,
    /// Outbox bound in bytes.
    pub outbox_bytes: usize,
    /// Queued frames, per conflated channel of the connection, beyond which a
    /// `conflate` channel sends only its latest publication.
    pub conflate_backlog: usize,
    /// Largest inbound frame; a larger one closes the connection with 4010.
    pub max_frame_bytes: usize,
    pub max_subscriptions: usize,
    /// Inbound frames per second (token bucket refill rate).
    pub rate_frames_per_sec: u32,
    /// Token bucket size for frames.
    pub rate_frames_burst: u32,
    /// Inbound bytes per second.
    pub rate_bytes_per_sec: u32,
    /// Limited frames tolerated (each answered with an error) before closing with 4009.
    pub rate_violations_before_close: u32,
    /// A socket write that makes no progress for this long drops the connection.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// How long a replay retries a backbone that does not answer before it closes
    /// the connection with 1013 (resubscribe with `since` later).
    #[serde(with = "duration")]
    pub replay_retry_for: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            outbox_messages: 1024,
            outbox_bytes: 1 << 20,
            conflate_backlog: 16,
            max_frame_bytes: 64 << 10,
            max_subscriptions: 512,
            rate_frames_per_sec: 100,
            rate_frames_burst: 200,
            rate_bytes_per_sec: 1 << 20,
            rate_violations_before_close: 20,
            write_timeout: Duration::from_secs(10),
            replay_retry_for: Duration::from_secs(30),
        }
    }
}

/// The server HTTP API for backends.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// API key; when empty every `/api/` call is refused.
    pub key: String,
}

/// Which engine carries publications and presence.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub kind: EngineKind,
}

/// The available engines.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// In-process broker and presence: one node.
    #[default]
    Memory,
    /// NATS JetStream carries publications between nodes; presence stays node-local.
    Nats,
}

/// The NATS JetStream backbone (`engine.kind = "nats"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// The servers of one NATS cluster: a list, or one string with commas
    /// (`nats://a:4222,nats://b:4222`), kept as that comma form.
    #[serde(deserialize_with = "server_list")]
    pub url: String,
    /// Create or update the streams at start; when false, only check they exist.
    pub provision: bool,
    /// Stream names are `<stream_prefix><NAMESPACE>`.
    pub stream_prefix: String,
    /// Publications are stored on `<subject_prefix>.<channel>`.
    pub subject_prefix: String,
    /// Streams republish to `<live_prefix>.<channel>`, which nodes subscribe to.
    pub live_prefix: String,
    /// A publish or history request that takes longer fails with a retryable error.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// Authentication: a token, a user and password, or a `.creds` file (JWT + NKey).
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub credentials_file: Option<PathBuf>,
    /// TLS: required, with extra root certificates and an optional client certificate.
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            provision: true,
            stream_prefix: "SY_".into(),
            subject_prefix: "sy".into(),
            live_prefix: "live".into(),
            request_timeout: Duration::from_secs(2),
            token: None,
            user: None,
            password: None,
            credentials_file: None,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// Redis: cluster-wide presence, acked cursors, the control bus and the node registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS); empty keeps
    /// presence, cursors and control in this process.
    pub url: String,
    /// Redis Sentinel instead of `url`: the sentinels (`host:port`), asked for the
    /// primary of `master_name` at start and after a failover.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under.
    pub master_name: String,
    /// ACL user and password; override what the URL says (keep secrets out of URLs).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Every key and pub/sub channel starts with this.
    pub key_prefix: String,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// A command that takes longer fails; presence and cursor calls then report degraded.
    #[serde(with = "duration")]
    pub response_timeout: Duration,
    /// How often a node refreshes its presence entries and its registry entry (one pipeline).
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// Presence and registry entries not refreshed for this long are gone (a crashed node's).
    #[serde(with = "duration")]
    pub presence_ttl: Duration,
    /// Acks are coalesced per user+device+channel and written once per interval.
    #[serde(with = "duration")]
    pub ack_flush_interval: Duration,
    /// Most cursor updates held while Redis is slow or down; past it acks are refused (117).
    pub ack_buffer: usize,
    /// A device's cursors are dropped after this long without an ack.
    #[serde(with = "duration")]
    pub cursor_ttl: Duration,
    /// How long a revoked token id is kept when the revoke call gives no `expires_at`.
    #[serde(with = "duration")]
    pub revocation_ttl: Duration,
}

impl RedisConfig {
    /// Whether Redis is configured (a URL or sentinels).
    pub fn enabled(&self) -> bool {
        !self.url.is_empty() || !self.sentinels.is_empty()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            username: None,
            password: None,
            key_prefix: "sy:".into(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(15),
            ack_flush_interval: Duration::from_millis(500),
            ack_buffer: 100_000,
            cursor_ttl: Duration::from_secs(30 * 24 * 3600),
            revocation_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The price feed: connectors that publish exchange ticks to `<namespace>.<SYMBOL>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Run the enabled connectors inside `serve` too (one node; `switchyard feed` otherwise).
    pub embedded: bool,
    /// Ticks are published to `<namespace>.<SYMBOL>`.
    pub namespace: String,
    /// A connector without a tick for this long is stale: a warning, and `feed` not ready.
    #[serde(with = "duration")]
    pub stale_after: Duration,
    /// Health endpoints of `switchyard feed` (`/healthz`, `/readyz`).
    pub listen: SocketAddr,
    pub kucoin: KucoinConfig,
    pub synthetic: SyntheticConfig,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            embedded: false,
            namespace: "prices".into(),
            stale_after: Duration::from_secs(30),
            listen: SocketAddr::from(([127, 0, 0, 1], 8100)),
            kucoin: KucoinConfig::default(),
            synthetic: SyntheticConfig::default(),
        }
    }
}

/// The KuCoin public WebSocket protocol (also spoken by `switchyard simulate-exchange`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KucoinConfig {
    pub enabled: bool,
    /// Names the source in ticks and in `msg_id`s (`<source>:<SYMBOL>:<sequence>`).
    pub source: String,
    /// Base of `POST /api/v1/bullet-public`.
    pub rest_url: String,
    pub symbols: Vec<String>,
    /// Most symbols in one `subscribe` (the exchange's limit per topic).
    pub symbols_per_subscribe: usize,
    /// Bounds of the reconnect backoff (exponential, with jitter).
    #[serde(with = "duration")]
    pub backoff_min: Duration,
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    /// Limit for the token request, the WebSocket connect and the `welcome`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for KucoinConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            source: "kucoin".into(),
            rest_url: "https://api.kucoin.com".into(),
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
            symbols_per_subscribe: 100,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Random-walk ticks for demos and benchmarks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    pub enabled: bool,
    pub source: String,
    pub symbols: Vec<String>,
    /// Ticks per second per symbol.
    pub rate: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            source: "synthetic".into(),
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into(), "SOL-USDT".into()],
            rate: 2.0,
        }
    }
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A listener of its own for `/metrics` (then not served on `server.listen`);
    /// empty: `/metrics` is on `server.listen`.
    pub listen: String,
}

impl MetricsConfig {
    /// The separate metrics listener, if one is configured.
    pub fn listener(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|e| {
            ConfigError(format!(
                "`metrics.listen`: {:?} is not an address (host:port): {e}",
                self.listen
            ))
        })
    }
}

/// Logging output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            json: false,
        }
    }
}

/// Options of one namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Publications kept per channel.
    pub history_size: usize,
    #[serde(with = "duration")]
    pub history_ttl: Duration,
    /// Most publications one replay or history call returns.
    pub max_replay: usize,
    /// Whether clients may publish (with the `pub` permission); the API always may.
    pub client_publish: bool,
    pub presence: bool,
    pub join_leave: bool,
    /// A newer publication replaces an unsent older one on the same channel.
    pub conflate: bool,
    /// Per user+device cursors moved by `ack`; subscribe without `since` resumes from them.
    pub acked: bool,
    /// Window in which a repeated `msg_id` returns the original publication.
    #[serde(with = "duration")]
    pub dedupe_window: Duration,
    /// Permissions every authenticated user has in this namespace.
    pub allow: Vec<Permission>,
    /// Publications sent on subscribe when the client does not ask for `snapshot`.
    pub default_snapshot: usize,
    /// Largest `data` of one publication, in bytes.
    pub max_data_bytes: usize,
    /// Deepest nesting of arrays and objects in one publication's `data`.
    pub max_data_depth: usize,
    /// NATS engine: replicas of the namespace's stream (1, 3 or 5 on a NATS cluster).
    pub stream_replicas: usize,
    /// NATS engine: where the namespace's stream is stored.
    pub stream_storage: StreamStorage,
    /// NATS engine: how a node receives the namespace's live publications.
    pub live_subscription: LiveSubscription,
}

/// How a node of the NATS engine subscribes to a namespace's live publications
/// (docs/architecture.md, "Live delivery").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LiveSubscription {
    /// One NATS subscription per channel the node holds: a node receives only its
    /// channels' publications, and each channel costs ~8 KB of memory on it.
    #[default]
    Channel,
    /// One NATS subscription per namespace: every node receives every publication of
    /// the namespace and keeps its channels' (~0.1 KB per channel); for many small
    /// channels (personal inboxes) on a few nodes.
    Namespace,
}

/// JetStream storage of a namespace's stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamStorage {
    /// Survives restarts of nats-server.
    #[default]
    File,
    /// Faster, lost when nats-server restarts (e.g. for prices).
    Memory,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            max_replay: 1000,
            client_publish: false,
            presence: false,
            join_leave: false,
            conflate: false,
            acked: false,
            dedupe_window: Duration::from_secs(120),
            allow: Vec::new(),
            default_snapshot: 0,
            max_data_bytes: 16 << 10,
            max_data_depth: 64,
            stream_replicas: 1,
            stream_storage: StreamStorage::File,
            live_subscription: LiveSubscription::Channel,
        }
    }
}

/// A configuration that could not be loaded or is inconsistent.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads defaults, then the TOML file (if given), then `SWITCHYARD_*` variables, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        // `SWITCHYARD_CONFIG` names the file (see `--config`); it is not a key.
        figment = figment.merge(Env::prefixed("SWITCHYARD_").ignore(&["config"]).split("__"));
        let config: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            if key.is_empty() {
                ConfigError(format!("invalid configuration: {e}"))
            } else {
                ConfigError(format!("invalid configuration at `{key}`: {}", e.kind))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, why: &str| Err(ConfigError(format!("`{key}`: {why}")));
        if let Some(addr) = self.metrics.listener()? {
            if addr == self.server.listen {
                return err("metrics.listen", "must differ from server.listen");
            }
        }
        let s = &self.session;
        if s.ping_interval.is_zero() {
            return err("session.ping_interval", "must be greater than zero");
        }
        if s.idle_timeout.is_zero() {
            return err("session.idle_timeout", "must be greater than zero");
        }
        if s.outbox_messages == 0 {
            return err("session.outbox_messages", "must be at least 1");
        }
        if s.outbox_bytes < 1024 {
            return err("session.outbox_bytes", "must be at least 1024");
        }
        if s.max_frame_bytes < 256 {
            return err("session.max_frame_bytes", "must be at least 256");
        }
        if s.rate_frames_per_sec == 0 || s.rate_frames_burst == 0 || s.rate_bytes_per_sec == 0 {
            return err(
                "session.rate_*",
                "rates and bursts must be greater than zero",
            );
        }
        if self.server.body_read_timeout.is_zero() {
            return err("server.body_read_timeout", "must be greater than zero");
        }
        if let Err(why) = crate::server::origin::AllowedOrigins::parse(&self.server.allowed_origins)
        {
            return err("server.allowed_origins", &why);
        }
        if self.auth.hmac_secret.is_empty()
            && self.auth.rsa_public_key.is_none()
            && self.auth.ec_public_key.is_none()
            && self.auth.jwks_file.is_none()
        {
            return err(
                "auth",
                "no key configured: set auth.hmac_secret, auth.rsa_public_key, auth.ec_public_key or auth.jwks_file",
            );
        }
        if !self.auth.hmac_secret.is_empty() && self.auth.hmac_secret.len() < 16 {
            return err("auth.hmac_secret", "must be at least 16 bytes long");
        }
        let n = &self.nats;
        if self.engine.kind == EngineKind::Nats {
            if let Err(why) = n.servers() {
                return err("nats.url", &why);
            }
        }
        // Deadlines are `now + request_timeout`: bounded so that the sum cannot overflow.
        if n.request_timeout.is_zero() || n.request_timeout > Duration::from_secs(3600) {
            return err("nats.request_timeout", "must be in (0, 1h]");
        }
        if n.user.is_some() != n.password.is_some() {
            return err("nats.user", "user and password go together");
        }
        // The node skips async-nats's per-publish subject check: every subject it
        // builds is these prefixes, a validated channel and node-made tokens.
        for (key, prefix) in [
            ("nats.subject_prefix", &n.subject_prefix),
            ("nats.live_prefix", &n.live_prefix),
        ] {
            if !prefix.split('.').all(crate::channel::is_valid_token) {
                return err(key, "must be dot-separated tokens of A-Z a-z 0-9 _ -");
            }
        }
        let overlap = |a: &str, b: &str| a == b || b.starts_with(&format!("{a}."));
        if overlap(&n.subject_prefix, &n.live_prefix) || overlap(&n.live_prefix, &n.subject_prefix)
        {
            return err(
                "nats.live_prefix",
                "must not equal or extend nats.subject_prefix (the stream would store its own republished copies)",
            );
        }
        if !crate::channel::is_valid_token(&n.stream_prefix) {
            return err("nats.stream_prefix", "must be A-Z a-z 0-9 _ - only");
        }
        if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
            return err(
                "nats.tls_cert_file",
                "a client certificate needs tls_key_file too",
            );
        }
        let r = &self.redis;
        if !r.url.is_empty() && !r.sentinels.is_empty() {
            return err(
                "redis.sentinels",
                "set either redis.url or redis.sentinels, not both",
            );
        }
        if !r.sentinels.is_empty() && r.master_name.is_empty() {
            return err("redis.master_name", "redis.sentinels need the master name");
        }
        if r.enabled() {
            let scheme_ok = r.url.starts_with("redis://") || r.url.starts_with("rediss://");
            if !r.url.is_empty() && !scheme_ok {
                return err("redis.url", "must start with redis:// or rediss://");
            }
            if r.heartbeat_interval.is_zero() || r.ack_flush_interval.is_zero() {
                return err(
                    "redis.heartbeat_interval",
                    "heartbeat_interval and ack_flush_interval must be greater than zero",
                );
            }
            if r.presence_ttl < r.heartbeat_interval * 2 {
                return err(
                    "redis.presence_ttl",
                    "must be at least twice heartbeat_interval, or live entries expire between refreshes",
                );
            }
            if r.ack_buffer == 0 {
                return err("redis.ack_buffer", "must be at least 1");
            }
            if r.key_prefix.is_empty() {
                return err("redis.key_prefix", "must not be empty");
            }
        }
        let f = &self.feed;
        if f.kucoin.enabled || f.synthetic.enabled {
            let Some(ns) = self.namespaces.get(&f.namespace) else {
                return err("feed.namespace", "names no configured namespace");
            };
            // A tick is retried with its msg_id for up to stale_after, and the last
            // retry may take request_timeout to arrive: a shorter window stores it twice.
            if ns.dedupe_window.min(ns.history_ttl)
                < f.stale_after.saturating_add(self.nats.request_timeout)
            {
                return err(
                    &format!("namespaces.{}.dedupe_window", f.namespace),
                    "must be at least feed.stale_after + nats.request_timeout (and so must history_ttl): \
                     the feed retries a tick with its msg_id that long",
                );
            }
            let symbols = f.kucoin.symbols.iter().chain(&f.synthetic.symbols);
            if let Some(bad) = symbols.clone().find(|s| !crate::channel::is_valid_token(s)) {
                return err(
                    "feed.*.symbols",
                    &format!("{bad:?} is not a channel token ([A-Za-z0-9_-])"),
                );
            }
        }
        if f.kucoin.enabled {
            if f.kucoin.symbols.is_empty() || f.kucoin.symbols_per_subscribe == 0 {
                return err(
                    "feed.kucoin.symbols",
                    "needs symbols and symbols_per_subscribe >= 1",
                );
            }
            if !(f.kucoin.rest_url.starts_with("http://")
                || f.kucoin.rest_url.starts_with("https://"))
            {
                return err("feed.kucoin.rest_url", "must be an http:// or https:// URL");
            }
            if f.kucoin.backoff_min.is_zero() || f.kucoin.backoff_max < f.kucoin.backoff_min {
                return err(
                    "feed.kucoin.backoff_min",
                    "backoff_min must be > 0 and at most backoff_max",
                );
            }
        }
        if f.synthetic.enabled && !(f.synthetic.rate > 0.0 && f.synthetic.rate <= 100_000.0) {
            return err("feed.synthetic.rate", "must be in (0, 100000] ticks/s");
        }
        if f.stale_after.is_zero() {
            return err("feed.stale_after", "must be greater than zero");
        }
        if self.namespaces.is_empty() {
            return err("namespaces", "at least one namespace must be configured");
        }
        for (name, ns) in &self.namespaces {
            if !crate::channel::is_valid_token(name) {
                return err(&format!("namespaces.{name}"), "invalid namespace name");
            }
            if ns.history_size == 0 && (ns.acked || ns.default_snapshot > 0) {
                return err(
                    &format!("namespaces.{name}.history_size"),
                    "must be > 0 when acked or default_snapshot is set",
                );
            }
            if ns.default_snapshot > ns.history_size {
                return err(
                    &format!("namespaces.{name}.default_snapshot"),
                    "cannot exceed history_size",
                );
            }
            if ns.stream_replicas == 0 || ns.stream_replicas > 5 {
                return err(
                    &format!("namespaces.{name}.stream_replicas"),
                    "must be 1 to 5",
                );
            }
            if ns.max_data_depth == 0 {
                return err(
                    &format!("namespaces.{name}.max_data_depth"),
                    "must be at least 1",
                );
            }
            if ns.max_replay == 0 {
                return err(
                    &format!("namespaces.{name}.max_replay"),
                    "must be at least 1",
                );
            }
        }
        Ok(())
    }

    /// Most presence members one page returns.
    pub fn presence_page_max(&self) -> usize {
        self.server.presence_page_max.max(1)
    }

    /// Options for a namespace, if configured.
    pub fn namespace(&self, name: &str) -> Option<&NamespaceConfig> {
        self.namespaces.get(name)
    }
}

/// Durations as human strings ("25s", "1h 30m") or integer milliseconds.
impl NatsConfig {
    /// The servers `url` names, checked: for the initial connect and reconnects.
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        let servers: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err("names no server".into());
        }
        servers
            .into_iter()
            .map(|s| {
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| format!("{s:?} is not a NATS server address: {e}"))
            })
            .collect()
    }
}

/// `nats.url` as one string (commas allowed) or a list of strings.
fn server_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => s,
        Raw::Many(list) => list.join(","),
    })
}

mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(text) => humantime::parse_duration(&text).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?}: {e} (use e.g. \"30s\")"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");

    fn with_file(extra: &str) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("sy-config-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        let base = std::fs::read_to_string(SHIPPED).unwrap();
        std::fs::write(&path, format!("{base}\n{extra}")).unwrap();
        let r = Config::load(Some(&path));
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn shipped_config_is_valid_and_documents_the_defaults() {
        let c = Config::load(Some(Path::new(SHIPPED))).unwrap();
        let d = Config::default();
        assert_eq!(c.session.ping_interval, d.session.ping_interval);
        assert_eq!(c.session.outbox_messages, d.session.outbox_messages);
        assert_eq!(c.server.drain_timeout, d.server.drain_timeout);
        assert_eq!(c.namespaces["prices"].default_snapshot, 1);
        assert_eq!(c.redis.presence_ttl, d.redis.presence_ttl);
        assert_eq!(c.redis.cursor_ttl, d.redis.cursor_ttl);
        assert_eq!(c.redis.ack_buffer, d.redis.ack_buffer);
        assert_eq!(c.server.presence_page_max, d.server.presence_page_max);
        assert_eq!(c.server.body_read_timeout, d.server.body_read_timeout);
        assert_eq!(c.server.allowed_origins, d.server.allowed_origins);
        assert_eq!(c.feed.kucoin.backoff_max, d.feed.kucoin.backoff_max);
        assert_eq!(c.feed.stale_after, d.feed.stale_after);
        // `make run` shows live prices: the shipped file turns the demo feed on.
        assert!(c.feed.embedded && c.feed.synthetic.enabled);
    }

    #[test]
    fn nats_url_takes_a_list_or_commas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let file = "[auth]\nhmac_secret = \"0123456789abcdef\"\n[namespaces.chat]\n\
                    [engine]\nkind = \"nats\"\n[nats]\nurl = [\"nats://a:4222\", \"nats://b:4223\"]\n";
        std::fs::write(&path, file).unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.nats.servers().unwrap().len(), 2);
        let mut c = c;
        c.nats.url = "nats://a:4222, tls://b:4223".into();
        assert_eq!(c.nats.servers().unwrap().len(), 2);
        c.nats.url = " , ".into();
        assert!(c.validate().unwrap_err().0.contains("nats.url"));
    }

    #[test]
    fn nats_prefixes_are_subject_tokens_that_do_not_overlap() {
        let shipped = Config::load(Some(Path::new(SHIPPED))).unwrap();
        for (subject, live, stream, key) in [
            ("sy pub", "live", "SY_", Some("nats.subject_prefix")),
            ("sy", "live.*", "SY_", Some("nats.live_prefix")),
            ("sy", "", "SY_", Some("nats.live_prefix")),
            ("sy", "sy", "SY_", Some("nats.live_prefix")),
            ("sy", "sy.live", "SY_", Some("nats.live_prefix")),
            ("sy.live", "sy", "SY_", Some("nats.live_prefix")),
            ("sy", "live", "SY.", Some("nats.stream_prefix")),
            ("org.sy", "org.live", "ORG_SY_", None),
        ] {
            let mut c = shipped.clone();
            c.nats.subject_prefix = subject.into();
            c.nats.live_prefix = live.into();
            c.nats.stream_prefix = stream.into();
            match (c.validate(), key) {
                (Ok(()), None) => {}
                (Err(e), Some(key)) => {
                    assert!(e.0.contains(key), "{subject} {live} {stream}: {e:?}")
                }
                (got, _) => panic!("{subject} {live} {stream}: {got:?}"),
            }
        }
    }

    #[test]
    fn redis_sentinels_need_a_master_name_and_exclude_a_url() {
        let mut c = Config::load(Some(Path::new(SHIPPED))).unwrap();
        c.redis.sentinels = vec!["127.0.0.1:26379".into()];
        assert!(c.validate().unwrap_err().0.contains("redis.master_name"));
        c.redis.master_name = "sy".into();
        assert!(c.redis.enabled());
        c.validate().unwrap();
        c.redis.url = "redis://127.0.0.1:6379".into();
        assert!(c.validate().unwrap_err().0.contains("redis.sentinels"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = with_file("[namespaces.x]\nhistory_ttl = \"soon\"")
            .unwrap_err()
            .0;
        assert!(e.contains("namespaces.x.history_ttl"), "{e}");
        let e = with_file("[namespaces.y]\nhistroy_size = 5").unwrap_err().0;
        assert!(e.contains("histroy_size"), "{e}");
        let e = with_file("[namespaces.z]\nmax_replay = 0").unwrap_err().0;
        assert!(e.contains("namespaces.z.max_replay"), "{e}");
        let e = with_file("[namespaces.w]\nlive_subscription = \"node\"")
            .unwrap_err()
            .0;
        assert!(
            e.contains("namespaces.w.live_subscription") && e.contains("namespace"),
            "{e}"
        );
        let shipped = Config::load(Some(Path::new(SHIPPED))).unwrap();
        let mut c = shipped.clone();
        if let Some(prices) = c.namespaces.get_mut("prices") {
            prices.dedupe_window = c.feed.stale_after;
        }
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("namespaces.prices.dedupe_window"), "{e}");
        let mut c = shipped.clone();
        c.nats.request_timeout = Duration::from_secs(u64::MAX);
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("nats.request_timeout"), "{e}");
        let mut c = shipped.clone();
        c.redis.url = "http://localhost".into();
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("redis.url"), "{e}");
        let mut c = shipped.clone();
        c.redis.url = "rediss://h:6380".into();
        c.redis.presence_ttl = Duration::from_secs(6);
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("redis.presence_ttl"), "{e}");
        let e = Config::load(Some(Path::new("/nonexistent/switchyard.toml")))
            .unwrap_err()
            .0;
        assert!(e.contains("does not exist"), "{e}");
        let mut c = Config::default();
        c.namespaces.insert("a".into(), NamespaceConfig::default());
        assert!(c.validate().unwrap_err().0.starts_with("`auth`"));
    }
}
