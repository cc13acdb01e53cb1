//! The process's metrics: the Prometheus registry behind `/metrics`, every
//! series' name and help, and the handles hot paths keep so that counting is an
//! atomic add, not a registry lookup (docs/observability.md, "Metrics").
//!
//! One registry per process: a gateway and `switchyard feed` each render their
//! own. Label values are bounded: namespaces (from the config), sources, close
//! and refusal codes, feed connector names; never a channel, user or connection.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use parking_lot::RwLock;

use crate::config::{Config, EngineKind};
use crate::shutdown::Shutdown;

/// Upper bounds of latency buckets, seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the replay-size buckets, publications.
const REPLAY_BUCKETS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

/// How often recorded histogram samples are folded into their buckets: between
/// scrapes they would otherwise accumulate.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Where a publication came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's `publish` frame.
    Client,
    /// `POST /api/v1/publish` or `/broadcast`.
    Api,
    /// A price feed's tick.
    Feed,
}

impl Source {
    const ALL: [Source; 3] = [Source::Client, Source::Api, Source::Feed];

    fn label(self) -> &'static str {
        match self {
            Source::Client => "client",
            Source::Api => "api",
            Source::Feed => "feed",
        }
    }
}

/// One namespace's publishing side: what enters the backbone.
pub struct Publishing {
    published: [Counter; 3],
    deduplicated: [Counter; 3],
    failed: [Counter; 3],
    /// From the JetStream publish to its ack.
    pub jetstream_publish: Histogram,
}

impl Publishing {
    /// Counts one publish's outcome.
    pub fn outcome<E>(&self, source: Source, result: &Result<crate::engine::Published, E>) {
        let i = source as usize;
        match result {
            Ok(p) if p.duplicate => self.deduplicated[i].increment(1),
            Ok(_) => self.published[i].increment(1),
            Err(_) => self.failed[i].increment(1),
        }
    }
}

/// One namespace's delivering side: what this node hands to its connections.
pub struct Delivering {
    /// Local subscriptions.
    pub subscriptions: Gauge,
    /// Live publications queued to a connection.
    pub deliveries: Counter,
    /// Their bytes (the text frames' payloads).
    pub delivered_bytes: Counter,
    /// From the publication's `ts` to the socket write of one sampled recipient.
    pub delivery_latency: Histogram,
    /// Publications replayed per subscribe.
    pub replay_size: Histogram,
    /// Subscribes answered `recovered: false`.
    pub unrecovered: Counter,
    /// Live gaps repaired from the stream.
    pub gap_repairs: Counter,
}

/// The process's registry and its unlabelled series.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    publishing: RwLock<HashMap<Box<str>, Arc<Publishing>>>,
    delivering: RwLock<HashMap<Box<str>, Arc<Delivering>>>,
    /// Labelled by a bounded code or name, registered on first use.
    labelled: RwLock<HashMap<(&'static str, Box<str>), Counter>>,
    /// WebSocket connections accepted.
    pub connections_opened: Counter,
    /// Inbound frames refused by the connection's rate limit (error 110).
    pub rate_limited: Counter,
    /// One Redis pipeline round trip.
    pub redis_roundtrip: Histogram,
    /// One presence heartbeat (refresh of every owned entry).
    pub heartbeat: Histogram,
}

/// The process's metrics, created on first use.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Publishes the build info of a process in `role` ("gateway", "feed") and keeps
/// the registry's upkeep running until `shutdown`.
pub fn started(config: &Config, role: &'static str, shutdown: Shutdown) {
    let engine = match config.engine.kind {
        EngineKind::Memory => "memory",
        EngineKind::Nats => "nats",
    };
    get()
        .gauge(
            "switchyard_build_info",
            vec![
                Label::from_static_parts("version", env!("CARGO_PKG_VERSION")),
                Label::from_static_parts("engine", engine),
                Label::from_static_parts("role", role),
            ],
        )
        .set(1.0);
    // Every namespace's series exist from the start, at zero: dashboards and
    // alerts see a rate of 0, not an absent series.
    let m = get();
    // Registered (at zero) without counting: the counters exist before the first outage.
    if config.engine.kind == EngineKind::Nats {
        let _ = m.counter("switchyard_nats_disconnects_total", vec![]);
    }
    if role == "gateway" && config.redis.enabled() {
        let _ = m.counter("switchyard_redis_disconnects_total", vec![]);
    }
    for name in config.namespaces.keys() {
        m.publishing(name);
        if role == "gateway" {
            m.delivering(name);
        }
    }
    spawn_upkeep(shutdown);
}

/// Folds histogram samples into buckets every second until shutdown.
fn spawn_upkeep(shutdown: Shutdown) {
    let handle = get().handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                _ = shutdown.wait() => return,
            }
        }
    });
}

/// Every series' help (name, help): `promtool check metrics` wants one for each.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("switchyard_build_info", "Always 1; the labels name the version, engine and role."),
    ("switchyard_connections", "Open client connections."),
    ("switchyard_connections_opened_total", "WebSocket connections accepted."),
    ("switchyard_connections_closed_total", "Connections ended, by close code (1000 closed by the client or the socket, 4002 token expired, 4003 kicked, 4005 idle, 4008 slow consumer, 4009 rate limit, 4012 node draining)."),
    ("switchyard_auth_refusals_total", "WebSocket upgrades refused for their token, by error code (201 missing, 202 invalid, 203 expired, 204 not yet valid, 205 wrong audience, 206 revoked, 207 bad subject)."),
    ("switchyard_connections_refused_total", "WebSocket upgrades refused, by HTTP status (400 bad request, 401 token, 403 origin, 429 user limit, 503 draining, not ready or node full)."),
    ("switchyard_subscriptions", "Local subscriptions, by namespace."),
    ("switchyard_publications_total", "New publications accepted, by namespace and source (client, api, feed)."),
    ("switchyard_publications_deduplicated_total", "Publishes whose msg_id matched an earlier publication (nothing stored), by namespace and source."),
    ("switchyard_publish_failures_total", "Publishes that failed in the engine (backbone unavailable, refused), by namespace and source."),
    ("switchyard_deliveries_total", "Live publications queued to a local connection, by namespace."),
    ("switchyard_delivered_bytes_total", "Payload bytes of those deliveries, by namespace."),
    ("switchyard_delivery_latency_seconds", "From a publication's ts (the publishing node's clock, ms) to the socket write, one sampled recipient per publication per node, by namespace."),
    ("switchyard_jetstream_publish_seconds", "From a JetStream publish to its ack, by namespace."),
    ("switchyard_replay_publications", "Publications replayed per subscribe (its count is the number of subscribes), by namespace."),
    ("switchyard_replays_unrecovered_total", "Subscribes answered recovered: false (the client's position was older than the retained history), by namespace."),
    ("switchyard_gap_repairs_total", "Live gaps on this node repaired from the stream, by namespace."),
    ("switchyard_conflated_total", "Publications replaced unsent by a newer one on a conflated channel, or skipped by a subscriber joining it."),
    ("switchyard_rate_limited_total", "Inbound frames refused by a connection's rate limit (error 110)."),
    ("switchyard_outbox_backlog_max_frames", "The largest number of frames queued for one connection, at scrape time."),
    ("switchyard_outbox_backlog_bytes", "Bytes queued for all connections, at scrape time."),
    ("switchyard_nats_up", "1 while the NATS connection is up."),
    ("switchyard_nats_disconnects_total", "Times the NATS connection was lost."),
    ("switchyard_jetstream_acks_waiting", "JetStream publishes of this node awaiting their ack, at scrape time (at most 5,000; past it a publish waits)."),
    ("switchyard_tasks", "Tasks alive in the process's runtime, at scrape time: two per connection, plus one per channel held with live_subscription = \"channel\"."),
    ("switchyard_redis_up", "1 while the last exchange with Redis succeeded."),
    ("switchyard_redis_disconnects_total", "Times Redis went from up to down."),
    ("switchyard_redis_roundtrip_seconds", "One Redis pipeline round trip (presence, cursors, control, heartbeat)."),
    ("switchyard_presence_heartbeat_seconds", "One presence heartbeat: refreshing every entry this node owns."),
    ("switchyard_draining", "1 once the node is draining (shutdown started)."),
    ("switchyard_feed_connected", "1 while a feed connector is connected, by source."),
    ("switchyard_feed_ticks_total", "Ticks received from a feed connector, by source."),
    ("switchyard_feed_reconnects_total", "Reconnections of a feed connector, by source."),
    ("switchyard_feed_malformed_total", "Messages from a feed connector that could not be read, by source."),
    ("switchyard_feed_last_tick_age_seconds", "Time since a feed connector's last tick, by source (stale when above feed.stale_after)."),
];

const META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Metrics {
    fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("switchyard_replay_publications".into()),
                    REPLAY_BUCKETS,
                )
            });
        // Both bucket lists are constant and non-empty: the builder cannot refuse them.
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        for (name, help) in DESCRIPTIONS {
            // The TYPE comes from the registration; a description is kind-agnostic.
            recorder.describe_counter(KeyName::from_const_str(name), None, (*help).into());
        }
        let handle = recorder.handle();
        Metrics {
            connections_opened: counter(&recorder, "switchyard_connections_opened_total", vec![]),
            rate_limited: counter(&recorder, "switchyard_rate_limited_total", vec![]),
            redis_roundtrip: recorder.register_histogram(
                &Key::from_static_name("switchyard_redis_roundtrip_seconds"),
                &META,
            ),
            heartbeat: recorder.register_histogram(
                &Key::from_static_name("switchyard_presence_heartbeat_seconds"),
                &META,
            ),
            recorder,
            handle,
            publishing: RwLock::default(),
            delivering: RwLock::default(),
            labelled: RwLock::default(),
        }
    }

    /// Renders every series in the Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The publishing side of `namespace`.
    pub fn publishing(&self, namespace: &str) -> Arc<Publishing> {
        if let Some(p) = self.publishing.read().get(namespace) {
            return Arc::clone(p);
        }
        let r = &self.recorder;
        let by_source = |name: &'static str| {
            Source::ALL.map(|s| {
                counter(
                    r,
                    name,
                    vec![
                        Label::new("namespace", namespace.to_string()),
                        Label::from_static_parts("source", s.label()),
                    ],
                )
            })
        };
        let p = Arc::new(Publishing {
            published: by_source("switchyard_publications_total"),
            deduplicated: by_source("switchyard_publications_deduplicated_total"),
            failed: by_source("switchyard_publish_failures_total"),
            jetstream_publish: r.register_histogram(
                &Key::from_parts(
                    "switchyard_jetstream_publish_seconds",
                    vec![Label::new("namespace", namespace.to_string())],
                ),
                &META,
            ),
        });
        let mut map = self.publishing.write();
        Arc::clone(map.entry(namespace.into()).or_insert(p))
    }

    /// The delivering side of `namespace`.
    pub fn delivering(&self, namespace: &str) -> Arc<Delivering> {
        if let Some(d) = self.delivering.read().get(namespace) {
            return Arc::clone(d);
        }
        let r = &self.recorder;
        let key = |name: &'static str| {
            Key::from_parts(name, vec![Label::new("namespace", namespace.to_string())])
        };
        let d = Arc::new(Delivering {
            subscriptions: r.register_gauge(&key("switchyard_subscriptions"), &META),
            deliveries: r.register_counter(&key("switchyard_deliveries_total"), &META),
            delivered_bytes: r.register_counter(&key("switchyard_delivered_bytes_total"), &META),
            delivery_latency: r
                .register_histogram(&key("switchyard_delivery_latency_seconds"), &META),
            replay_size: r.register_histogram(&key("switchyard_replay_publications"), &META),
            unrecovered: r.register_counter(&key("switchyard_replays_unrecovered_total"), &META),
            gap_repairs: r.register_counter(&key("switchyard_gap_repairs_total"), &META),
        });
        let mut map = self.delivering.write();
        Arc::clone(map.entry(namespace.into()).or_insert(d))
    }

    /// A counter with one label of a bounded set (a close code, a refusal code).
    fn labelled(&self, name: &'static str, label: &'static str, value: &str) -> Counter {
        if let Some(c) = self.labelled.read().get(&(name, value.into())) {
            return c.clone();
        }
        let c = counter(
            &self.recorder,
            name,
            vec![Label::new(label, value.to_string())],
        );
        self.labelled
            .write()
            .entry((name, value.into()))
            .or_insert(c)
            .clone()
    }

    /// Counts a connection that ended with close `code`.
    pub fn connection_closed(&self, code: u16) {
        self.labelled(
            "switchyard_connections_closed_total",
            "code",
            &code.to_string(),
        )
        .increment(1);
    }

    /// Counts a WebSocket upgrade refused for its token with error `code`.
    pub fn auth_refused(&self, code: u16) {
        self.labelled("switchyard_auth_refusals_total", "code", &code.to_string())
            .increment(1);
    }

    /// Counts a WebSocket upgrade refused with HTTP `status`.
    pub fn connection_refused(&self, status: u16) {
        self.labelled(
            "switchyard_connections_refused_total",
            "status",
            &status.to_string(),
        )
        .increment(1);
    }

    /// Counts the NATS connection being lost.
    pub fn nats_disconnected(&self) {
        self.counter("switchyard_nats_disconnects_total", vec![])
            .increment(1);
        self.gauge("switchyard_nats_up", vec![]).set(0.0);
    }

    /// Records the NATS connection as up.
    pub fn nats_connected(&self) {
        self.gauge("switchyard_nats_up", vec![]).set(1.0);
    }

    /// Counts Redis going from up to down.
    pub fn redis_disconnected(&self) {
        self.counter("switchyard_redis_disconnects_total", vec![])
            .increment(1);
    }

    /// A gauge, registered on first use.
    pub fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &META)
    }

    /// A counter, registered on first use (for values copied in at scrape time).
    pub fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        counter(&self.recorder, name, labels)
    }
}

fn counter(r: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    r.register_counter(&Key::from_parts(name, labels), &META)
}

/// Seconds since `start`, for a histogram.
pub fn since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}
