//! The cluster broker on NATS JetStream (docs/architecture.md): one stream per namespace
//! stores and orders publications, republishes them to a live subject, and every
//! node subscribes to the live subjects its local clients need.
//!
//! A channel's live task checks that each republished message chains to the
//! previous one of the same subject (`Nats-Last-Sequence`); when it does not, the
//! missing publications are fetched from the stream before anything later is
//! delivered, so a node's hub always sees a channel complete and in order.

mod acks;
mod dispatch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::header::{HeaderName, NATS_LAST_SEQUENCE, NATS_MESSAGE_ID, NATS_SEQUENCE};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::{
    AckFuture, BackboneState, BoxFuture, Broker, Deliveries, EngineError, HistoryFrom, HistoryPage,
    PageLimit, Position, Publication, PublishRequest, Published, ReplayPage, ReplayReader,
};
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::{Config, ConfigError, LiveSubscription, NatsConfig, StreamStorage};

// Header names as values: a `&str` name is validated and copied into a fresh
// allocation on every insert and every lookup.
/// Header with the publishing node's clock (Unix ms): the publication's `ts`.
const TS_HEADER: HeaderName = HeaderName::from_static("Sy-Ts");
/// Header with the publishing user.
const FROM_HEADER: HeaderName = HeaderName::from_static("Sy-From");
/// Header of a direct get's batch with what is stored after it.
const NUM_PENDING_HEADER: HeaderName = HeaderName::from_static("Nats-Num-Pending");

/// A namespace's stream: looked up (or provisioned) in the background, so a node
/// starts whatever the state of NATS, and one stream that cannot be had does not
/// hold up the others.
struct NamespaceStream {
    name: String,
    config: stream::Config,
    /// Shared: a `stream::Stream` with its info is ~1.5 KB, and every live channel
    /// and replay holds one.
    stream: OnceLock<Arc<stream::Stream>>,
    /// Why the stream is not available yet; `None` once it is.
    problem: Mutex<Option<String>>,
    /// The JetStream round trip of a publication, looked up once.
    publish_latency: metrics::Histogram,
    /// The namespace-wide live subscription (`live_subscription = "namespace"`);
    /// `None`: one per channel.
    live: Option<dispatch::NamespaceLive>,
}

impl NamespaceStream {
    fn stream(&self) -> Result<&Arc<stream::Stream>, EngineError> {
        self.stream.get().ok_or_else(|| {
            let why = self.problem.lock().clone().unwrap_or_default();
            EngineError::Unavailable(format!("stream {} is not available: {why}", self.name))
        })
    }
}

/// Publications left after the first page from which a replay continues through
/// an ordered consumer instead of batched direct gets.
const CONSUMER_FROM: u64 = 128;

/// Most messages asked of one batched direct get; a longer page takes several.
const MAX_BATCH: usize = 10_000;

/// What one batched direct get returned: `(seq, pending after it, message)` each,
/// and how many of the subject's messages follow the batch.
#[derive(Default)]
struct Batch {
    messages: Vec<(u64, u64, async_nats::Message)>,
    remaining: u64,
}

/// Names one incarnation of a stream: a recreated stream gets a new epoch.
fn epoch_of(name: &str, created: impl std::fmt::Display) -> String {
    format!("{name}@{created}").replace(' ', "_")
}

struct Live {
    refs: usize,
    /// `Some(Ok)` once the live subscription is registered, `Some(Err)` if it failed.
    ready: watch::Receiver<Option<Result<(), String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Broker of the NATS JetStream engine.
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    acks: acks::Acks,
    reconnects: watch::Sender<u64>,
    cfg: NatsConfig,
    namespaces: HashMap<String, NamespaceStream>,
    live: Mutex<HashMap<Channel, Live>>,
    deliveries: Arc<dyn Deliveries>,
    /// Every stream was looked up at least once since start.
    checked: AtomicBool,
    /// The last connection error NATS reported (authorization, TLS, …).
    last_error: Arc<Mutex<Option<String>>>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(format!("{what}: {e}"))
}

/// Writes the W3C trace context into NATS headers.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl opentelemetry::propagation::Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Reads the W3C trace context from NATS headers.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// What delivering one channel's publications on this node needs: the stream to
/// repair from and the hub to hand them to.
struct ChannelLink {
    stream: Arc<stream::Stream>,
    deliveries: Arc<dyn Deliveries>,
    channel: Channel,
    /// The channel's subject in the stream.
    subject: String,
}

/// Hands a publication to the hub inside a `deliver` span whose parent is the
/// publisher's span (from the message's `traceparent`).
fn deliver_traced(
    deliveries: &dyn Deliveries,
    headers: Option<&HeaderMap>,
    publication: Publication,
) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // One span per publication per node, with how many local subscribers it reached.
    let span = tracing::info_span!(
        "deliver",
        channel = %publication.channel,
        seq = crate::telemetry::int(publication.seq),
        recipients = tracing::field::Empty,
    );
    if let Some(h) = headers.filter(|_| !span.is_disabled()) {
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h)));
        let _ = span.set_parent(parent);
    }
    let _entered = span.enter();
    let recipients = deliveries.publication(&Arc::new(publication));
    span.record("recipients", crate::telemetry::int(recipients));
}

/// Hands a republished message of `channel` to the hub.
fn deliver_message(
    deliveries: &dyn Deliveries,
    channel: &Channel,
    seq: u64,
    msg: &async_nats::Message,
) {
    if let Some(p) = publication(channel, seq, msg.headers.as_ref(), &msg.payload) {
        deliver_traced(deliveries, msg.headers.as_ref(), p);
    }
}

/// A republished message's own seq and the seq of the channel's previous one.
fn live_position(msg: &async_nats::Message) -> Option<(u64, u64)> {
    let headers = msg.headers.as_ref()?;
    Some((
        header_u64(headers, NATS_SEQUENCE)?,
        header_u64(headers, NATS_LAST_SEQUENCE)?,
    ))
}

fn header_u64(h: &HeaderMap, name: HeaderName) -> Option<u64> {
    h.get(name)?.as_str().parse().ok()
}

/// Rebuilds a publication from a stored or republished message.
fn publication(
    channel: &Channel,
    seq: u64,
    headers: Option<&HeaderMap>,
    payload: &Bytes,
) -> Option<Publication> {
    let data: Box<RawValue> = serde_json::from_slice(payload).ok()?;
    let ts = headers.and_then(|h| header_u64(h, TS_HEADER)).unwrap_or(0);
    let from = headers
        .and_then(|h| h.get(FROM_HEADER))
        .map(|v| Arc::from(v.as_str()));
    Some(Publication::new(channel.clone(), seq, ts, data, from))
}

/// Authentication and TLS from `[nats]`.
async fn connect_options(cfg: &NatsConfig) -> Result<async_nats::ConnectOptions, ConfigError> {
    let mut opts = async_nats::ConnectOptions::new();
    if let Some(path) = &cfg.credentials_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            ConfigError(format!("`nats.credentials_file`: {}: {e}", path.display()))
        })?;
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts)
}

impl NatsBroker {
    /// Starts connecting and provisioning (or checking) one stream per namespace,
    /// in the background: the node starts, and `/readyz` says what it waits for.
    pub async fn connect(
        config: &Config,
        deliveries: Arc<dyn Deliveries>,
    ) -> Result<Arc<NatsBroker>, ConfigError> {
        let cfg = config.nats.clone();
        let servers = cfg
            .servers()
            .map_err(|why| ConfigError(format!("`nats.url`: {why}")))?;
        // Every reconnection bumps this counter; live tasks then repair what they missed.
        let (reconnects, _) = watch::channel(0u64);
        let on_event = reconnects.clone();
        let last_error = Arc::new(Mutex::new(None));
        let errors = Arc::clone(&last_error);
        let client = connect_options(&cfg)
            .await?
            .name(&config.server.node_id)
            .request_timeout(Some(cfg.request_timeout))
            // Its check of every publish subject was 2 % of a publication's cost; the
            // node's subjects are validated config prefixes and channels (config.rs).
            .skip_subject_validation(true)
            .retry_on_initial_connect()
            // Short: a node should be ready within a second of NATS coming up.
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((attempt as u64 * 100).min(500))
            })
            .event_callback(move |event| {
                match &event {
                    async_nats::Event::Connected => {
                        *errors.lock() = None;
                        on_event.send_modify(|n| *n += 1);
                        crate::metrics::get().nats_connected();
                    }
                    async_nats::Event::Disconnected => crate::metrics::get().nats_disconnected(),
                    async_nats::Event::ServerError(e) => *errors.lock() = Some(e.to_string()),
                    async_nats::Event::ClientError(e) => *errors.lock() = Some(e.to_string()),
                    _ => {}
                }
                std::future::ready(())
            })
            .connect(servers)
            .await
            .map_err(|e| ConfigError(format!("`nats.url`: cannot connect to {}: {e}", cfg.url)))?;
        let js = jetstream::new(client.clone());
        let acks = acks::Acks::start(&client)
            .await
            .map_err(|e| ConfigError(format!("`nats.url`: cannot subscribe to acks: {e}")))?;
        let namespaces = config
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let stream_name = format!("{}{}", cfg.stream_prefix, name.to_uppercase());
                let subjects = format!("{}.{name}.>", cfg.subject_prefix);
                let config = stream::Config {
                    name: stream_name.clone(),
                    subjects: vec![subjects.clone()],
                    max_messages_per_subject: ns.history_size as i64,
                    max_age: ns.history_ttl,
                    // JetStream refuses a dedupe window longer than the retention.
                    duplicate_window: ns.dedupe_window.min(ns.history_ttl),
                    allow_direct: true,
                    storage: match ns.stream_storage {
                        StreamStorage::File => stream::StorageType::File,
                        StreamStorage::Memory => stream::StorageType::Memory,
                    },
                    num_replicas: ns.stream_replicas,
                    republish: Some(stream::Republish {
                        source: subjects,
                        destination: format!("{}.{name}.>", cfg.live_prefix),
                        headers_only: false,
                    }),
                    ..Default::default()
                };
                let slot = NamespaceStream {
                    name: stream_name,
                    config,
                    stream: OnceLock::new(),
                    problem: Mutex::new(Some("not looked up yet".into())),
                    publish_latency: crate::metrics::get()
                        .publishing(name)
                        .jetstream_publish
                        .clone(),
                    live: (ns.live_subscription == LiveSubscription::Namespace).then(|| {
                        dispatch::NamespaceLive::new(
                            client.clone(),
                            Arc::clone(&deliveries),
                            reconnects.subscribe(),
                            &cfg,
                            name,
                        )
                    }),
                };
                (name.clone(), slot)
            })
            .collect();
        let broker = Arc::new(NatsBroker {
            client,
            js,
            acks,
            reconnects,
            cfg,
            namespaces,
            live: Mutex::new(HashMap::new()),
            deliveries,
            checked: AtomicBool::new(false),
            last_error,
        });
        tokio::spawn(provision(Arc::downgrade(&broker)));
        Ok(broker)
    }

    /// Creates or updates (or, with `provision = false`, only finds) one stream.
    async fn ensure(&self, ns: &NamespaceStream) -> Result<stream::Stream, String> {
        let attempt = async {
            if self.cfg.provision {
                // Identical configs make concurrent creates from many nodes idempotent.
                self.js
                    .create_or_update_stream(ns.config.clone())
                    .await
                    .map_err(|e| format!("cannot provision: {e}"))?;
            }
            self.js.get_stream(&ns.name).await.map_err(|e| {
                format!(
                    "missing or unreadable (nats.provision = {}): {e}",
                    self.cfg.provision
                )
            })
        };
        tokio::time::timeout(self.cfg.request_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err("no answer within nats.request_timeout".into()))
    }

    fn namespace(&self, channel: &Channel) -> Result<&NamespaceStream, EngineError> {
        self.namespaces.get(channel.namespace()).ok_or_else(|| {
            EngineError::Rejected(format!("unknown namespace {:?}", channel.namespace()))
        })
    }

    fn subject(&self, channel: &Channel) -> String {
        // Sized once: `format!` would grow it twice for every publication.
        let prefix = &self.cfg.subject_prefix;
        let mut subject = String::with_capacity(prefix.len() + 1 + channel.as_str().len());
        subject.push_str(prefix);
        subject.push('.');
        subject.push_str(channel.as_str());
        subject
    }

    /// Fails fast while disconnected: a client gets a retryable error, not a hang.
    fn connected(&self) -> Result<(), EngineError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(EngineError::Unavailable("not connected to NATS".into())),
        }
    }

    async fn publish_inner(&self, req: PublishRequest) -> Result<Published, EngineError> {
        self.send(req).await?.await
    }

    /// Sends one publication to JetStream; the returned future waits for its ack.
    /// Sends are ordered (one client connection), so successive sends are stored in
    /// the order they were made while their acks are awaited together.
    async fn send(&self, req: PublishRequest) -> Result<AckFuture, EngineError> {
        self.connected()?;
        let ns = self.namespace(&req.channel)?;
        ns.stream()?;
        let mut headers = HeaderMap::new();
        if let Some(id) = &req.msg_id {
            // JetStream dedupes per stream (a namespace): scope the key to the channel.
            // A channel name has no `/`, so the first one separates the two.
            let channel = req.channel.as_str();
            let mut key = String::with_capacity(channel.len() + 1 + id.len());
            key.push_str(channel);
            key.push('/');
            key.push_str(id);
            headers.insert(NATS_MESSAGE_ID, key);
        }
        headers.insert(TS_HEADER, itoa::Buffer::new().format(unix_ms()));
        if let Some(from) = &req.from {
            headers.insert(FROM_HEADER, &**from);
        }
        // The W3C context delivering nodes continue: the publishing span's, or without
        // spans (export off) the caller's own, so a trace started upstream goes on.
        let cx = if crate::telemetry::exporting() {
            Some(tracing_opentelemetry::OpenTelemetrySpanExt::context(
                &tracing::Span::current(),
            ))
        } else {
            req.caller_trace
        };
        if let Some(cx) = cx {
            use opentelemetry::trace::TraceContextExt;
            if cx.span().span_context().is_valid() {
                opentelemetry::global::get_text_map_propagator(|p| {
                    p.inject_context(&cx, &mut HeaderInjector(&mut headers))
                });
            }
        }
        // The request's buffer becomes the payload: no copy.
        let payload = Bytes::from(Box::<[u8]>::from(Box::<str>::from(req.data)));
        let subject = self.subject(&req.channel);
        // Its duration is the JetStream round trip: the publish and the stream's ack.
        let span = tracing::info_span!("jetstream.publish", subject = %subject, stream_seq = tracing::field::Empty);
        let started = std::time::Instant::now();
        // One deadline bounds the send and then the ack, as one round trip did before.
        let deadline = tokio::time::Instant::from_std(started) + self.cfg.request_timeout;
        let sent = async {
            let (reply, waiting) = self.acks.wait_turn().await;
            self.client
                .publish_with_reply_and_headers(subject, reply, headers, payload)
                .await
                .map(|()| waiting)
        };
        let waiting =
            tracing::Instrument::instrument(tokio::time::timeout_at(deadline, sent), span.clone())
                .await
                .map_err(|_| unavailable("publish", "not sent within nats.request_timeout"))?
                .map_err(|e| unavailable("publish", e))?;
        let latency = ns.publish_latency.clone();
        Ok(Box::pin(tracing::Instrument::instrument(
            async move {
                let answer = tokio::time::timeout_at(deadline, waiting.answer())
                    .await
                    .map_err(|_| {
                        unavailable("publish", "no acknowledgement within nats.request_timeout")
                    })?;
                let (seq, duplicate) = match answer {
                    Some(acks::Answer::Stored { seq, duplicate }) => (seq, duplicate),
                    Some(acks::Answer::NoStream) => {
                        return Err(unavailable("publish", "no stream found for the subject"))
                    }
                    Some(acks::Answer::Refused(why)) => return Err(unavailable("publish", why)),
                    None => return Err(unavailable("publish", "disconnected before the ack")),
                };
                tracing::Span::current().record("stream_seq", crate::telemetry::int(seq));
                latency.record(crate::metrics::since(started));
                Ok(Published { seq, duplicate })
            },
            span,
        )))
    }

    /// One batched direct get (ADR-31): up to `page` messages of `subject` from
    /// `start` on, in one request served by any replica, and how many more follow.
    async fn direct_batch(
        &self,
        ns: &NamespaceStream,
        subject: &str,
        start: u64,
        page: PageLimit,
    ) -> Result<Batch, EngineError> {
        #[derive(serde::Serialize)]
        struct BatchRequest<'a> {
            seq: u64,
            next_by_subj: &'a str,
            batch: usize,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_bytes: Option<usize>,
        }
        let body = serde_json::to_vec(&BatchRequest {
            seq: start.max(1),
            next_by_subj: subject,
            batch: page.messages.clamp(1, MAX_BATCH),
            max_bytes: (page.bytes != usize::MAX).then_some(page.bytes),
        })
        .map_err(|e| unavailable("history", e))?;
        let inbox = self.client.new_inbox();
        let read = async {
            let mut replies = self
                .client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| unavailable("history", e))?;
            self.client
                .publish_with_reply(
                    format!("$JS.API.DIRECT.GET.{}", ns.name),
                    inbox,
                    body.into(),
                )
                .await
                .map_err(|e| unavailable("history", e))?;
            let mut batch = Batch::default();
            while let Some(m) = replies.next().await {
                match m.status.map(|s| s.as_u16()) {
                    None => {
                        let headers = m.headers.as_ref();
                        let seq = headers.and_then(|h| header_u64(h, NATS_SEQUENCE));
                        let Some(seq) = seq else { continue };
                        batch.remaining = headers
                            .and_then(|h| header_u64(h, NUM_PENDING_HEADER))
                            .unwrap_or(0);
                        batch.messages.push((seq, batch.remaining, m));
                    }
                    // End of batch: what is left after it.
                    Some(204) => {
                        if let Some(h) = m.headers.as_ref() {
                            batch.remaining = header_u64(h, NUM_PENDING_HEADER).unwrap_or(0);
                        }
                        return Ok(batch);
                    }
                    Some(404) => return Ok(batch),
                    Some(code) => {
                        let why = m.description.unwrap_or_default();
                        return Err(unavailable("history", format!("status {code} {why}")));
                    }
                }
            }
            Err(unavailable("history", "reply subscription ended"))
        };
        tokio::time::timeout(self.cfg.request_timeout, read)
            .await
            .map_err(|_| unavailable("history", "timed out"))?
    }

    async fn history_inner(
        &self,
        channel: &Channel,
        from: HistoryFrom,
        limit: usize,
        page: PageLimit,
    ) -> Result<HistoryPage, EngineError> {
        let ns = self.namespace(channel)?;
        self.connected()?;
        let stream = ns.stream()?;
        let subject = self.subject(channel);
        let deadline = self.cfg.request_timeout;
        let timed = |what| move |_| unavailable(what, "timed out");
        let found = |r: Result<
            async_nats::jetstream::message::StreamMessage,
            stream::DirectGetError,
        >| match r {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable("history", e)),
        };
        // Independent reads, in parallel: the top, the incarnation (asked each time: a
        // stream recreated under a running node must not be mistaken for the one that
        // positions refer to), and the oldest retained publication.
        let (top, info, oldest) = tokio::join!(
            tokio::time::timeout(
                deadline,
                stream.direct_get_last_for_subject(subject.clone())
            ),
            tokio::time::timeout(deadline, self.js.get_stream(&ns.name)),
            tokio::time::timeout(
                deadline,
                stream.direct_get_first_for_subject(subject.clone())
            ),
        );
        let top = found(top.map_err(timed("history"))?)?;
        let info = info
            .map_err(timed("history"))?
            .map_err(|e| unavailable("history", e))?;
        let oldest = found(oldest.map_err(timed("history"))?)?;
        let info = info.cached_info();
        let epoch = epoch_of(&ns.name, info.created);
        let stream_first = info.state.first_sequence;
        let top_seq = top.as_ref().map_or(0, |m| m.sequence);
        let (after, resume, n) = match &from {
            HistoryFrom::After(p) if p.epoch == epoch => (p.seq, Some(p.seq), limit),
            HistoryFrom::After(_) => (0, None, limit),
            HistoryFrom::Cursor(seq) => (*seq, Some(*seq), limit),
            HistoryFrom::Latest(n) => (0, None, (*n).min(limit)),
        };
        let covered = match resume {
            None => matches!(from, HistoryFrom::Latest(_)),
            Some(after) => !dropped_after(after, oldest.as_ref().map(|m| m.sequence), stream_first),
        };
        let position = |seq: u64| Position {
            seq: seq.max(top_seq),
            epoch: epoch.clone(),
        };
        // The newest one alone (a price snapshot) is the top just read.
        if n == 1 && after < top_seq {
            if let Some(m) = top.filter(|_| matches!(from, HistoryFrom::Latest(_))) {
                let publications = publication(channel, m.sequence, Some(&m.headers), &m.payload)
                    .map(|p| vec![Arc::new(p)])
                    .unwrap_or_default();
                return Ok(HistoryPage {
                    publications,
                    position: position(top_seq),
                    complete: true,
                    remaining: 0,
                });
            }
        }
        if n == 0 || after >= top_seq {
            return Ok(HistoryPage {
                publications: Vec::new(),
                position: position(top_seq),
                complete: covered,
                remaining: 0,
            });
        }
        // Read pages; while more than `n` remain after a message, it is older than the
        // newest `n` and skipped (retention bounds this walk).
        let mut publications = Vec::new();
        let mut bytes = 0usize;
        let mut next = after.saturating_add(1);
        let mut truncated = false;
        let mut remaining;
        let mut first_read = None;
        loop {
            let batch = self.direct_batch(ns, &subject, next, page).await?;
            remaining = batch.remaining;
            first_read = first_read.or(batch.messages.first().map(|(seq, _, _)| *seq));
            let Some(last) = batch.messages.last().map(|(seq, _, _)| *seq) else {
                break;
            };
            let mut full = false;
            for (seq, left, m) in batch.messages {
                if left >= n as u64 {
                    truncated = true;
                    continue;
                }
                let Some(p) = publication(channel, seq, m.headers.as_ref(), &m.payload) else {
                    continue;
                };
                if !page.admits(publications.len(), bytes, p.msg.len()) {
                    // Counted back: this one and those after it are still to read.
                    remaining = left + 1;
                    full = true;
                    break;
                }
                bytes += p.msg.len();
                publications.push(Arc::new(p));
            }
            // Skipped messages took part of the batch: read on until the page is
            // full or nothing is left.
            if full || remaining == 0 || publications.len() >= page.messages {
                break;
            }
            next = last.saturating_add(1);
        }
        let mut covered = covered;
        if let Some(after) = resume.filter(|&a| covered && gap_possible(a, first_read)) {
            covered = !check_dropped(stream, &subject, after, self.cfg.request_timeout).await?;
        }
        let last_read = publications.last().map_or(0, |p| p.seq);
        Ok(HistoryPage {
            publications,
            position: position(last_read),
            complete: covered && !(truncated && resume.is_some()),
            remaining,
        })
    }

    async fn history_after_inner(
        &self,
        channel: &Channel,
        after: u64,
        page: PageLimit,
    ) -> Result<ReplayPage, EngineError> {
        let ns = self.namespace(channel)?;
        self.connected()?;
        let stream = ns.stream()?;
        let subject = self.subject(channel);
        let batch = self
            .direct_batch(ns, &subject, after.saturating_add(1), page)
            .await?;
        let first = batch.messages.first().map(|(seq, _, _)| *seq);
        let lost = gap_possible(after, first)
            && check_dropped(stream, &subject, after, self.cfg.request_timeout).await?;
        let publications = batch
            .messages
            .into_iter()
            .filter_map(|(seq, _, m)| publication(channel, seq, m.headers.as_ref(), &m.payload))
            .map(Arc::new)
            .collect();
        Ok(ReplayPage {
            publications,
            remaining: batch.remaining,
            lost,
        })
    }

    async fn watch_inner(&self, channel: &Channel) -> Result<(), EngineError> {
        let ns = self.namespace(channel)?;
        self.connected()?;
        let stream = ns.stream()?;
        if let Some(live) = &ns.live {
            return live.watch(channel, stream).await;
        }
        let ready = {
            let mut live = self.live.lock();
            match live.get_mut(channel) {
                Some(l) => {
                    l.refs += 1;
                    l.ready.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    let task = tokio::spawn(run_live(LiveTask {
                        link: ChannelLink {
                            stream: stream.clone(),
                            deliveries: Arc::clone(&self.deliveries),
                            channel: channel.clone(),
                            subject: self.subject(channel),
                        },
                        client: self.client.clone(),
                        live_subject: format!("{}.{channel}", self.cfg.live_prefix),
                        ready: tx,
                        reconnects: self.reconnects.subscribe(),
                    }));
                    live.insert(
                        channel.clone(),
                        Live {
                            refs: 1,
                            ready: rx.clone(),
                            task,
                        },
                    );
                    rx
                }
            }
        };
        let result = ready_within(ready, self.cfg.request_timeout).await;
        if result.is_err() {
            self.unwatch(channel);
        }
        result
    }
}

struct LiveTask {
    link: ChannelLink,
    client: async_nats::Client,
    live_subject: String,
    ready: watch::Sender<Option<Result<(), String>>>,
    reconnects: watch::Receiver<u64>,
}

/// Receives a channel's republished messages and hands them to the hub in order,
/// repairing gaps from the stream first.
async fn run_live(mut t: LiveTask) {
    // Opening and repairing are boxed: they are rare, and their state would otherwise
    // size every live channel's task between messages (5.6 KB instead of 0.96).
    let Some((mut sub, mut last)) = Box::pin(open_live(&t)).await else {
        return;
    };
    t.reconnects.borrow_and_update();
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
            changed = t.reconnects.changed() => {
                if changed.is_err() {
                    return;
                }
                // While disconnected, republished messages were lost without a trace:
                // fetch everything stored after the last one delivered.
                last = Box::pin(repair(&t.link, last, u64::MAX)).await;
                continue;
            }
        };
        let Some((seq, prev)) = live_position(&msg) else {
            continue;
        };
        if seq <= last {
            continue;
        }
        if prev > last {
            Box::pin(repair(&t.link, last, seq)).await;
        }
        deliver_message(&*t.link.deliveries, &t.link.channel, seq, &msg);
        last = seq;
    }
}

/// Subscribes to the channel's live subject and finds where live starts; reports
/// the outcome to the watchers. `None` when it failed.
async fn open_live(t: &LiveTask) -> Option<(async_nats::Subscriber, u64)> {
    let fail = |e: String| {
        t.ready.send_replace(Some(Err(e)));
        None
    };
    let sub = match t.client.subscribe(t.live_subject.clone()).await {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    // A request on the same connection is answered only after the server processed
    // the SUB before it: the subscription is registered once this returns.
    if let Err(e) = t.client.request("$JS.API.INFO", Bytes::new()).await {
        return fail(e.to_string());
    }
    let last = live_start(&t.link).await;
    t.ready.send_replace(Some(Ok(())));
    Some((sub, last))
}

/// Where live delivery of a channel starts: everything stored up to now is its
/// subscribers' history. Read once the live subscription is registered.
async fn live_start(link: &ChannelLink) -> u64 {
    match link
        .stream
        .direct_get_last_for_subject(link.subject.clone())
        .await
    {
        Ok(m) => m.sequence,
        Err(_) => 0,
    }
}

/// Waits until a watched channel's live delivery is ready (or failed), at most
/// `nats.request_timeout`.
async fn ready_within(
    mut ready: watch::Receiver<Option<Result<(), String>>>,
    timeout: Duration,
) -> Result<(), EngineError> {
    match tokio::time::timeout(timeout, ready.wait_for(Option::is_some)).await {
        Ok(Ok(state)) => match &*state {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(unavailable("live subscription", e)),
            None => Err(unavailable("live subscription", "not ready")),
        },
        Ok(Err(_)) => Err(unavailable("live subscription", "ended")),
        Err(_) => Err(unavailable("live subscription", "timed out")),
    }
}

/// Delivers the stored publications of the channel between `last` and `until`
/// (exclusive) that the live subject did not bring; returns the last delivered.
async fn repair(link: &ChannelLink, last: u64, until: u64) -> u64 {
    tracing::debug!(channel = %link.channel, from = last, until, "repairing a live gap");
    let repaired = repair_from(link, last, until).await;
    if repaired > last {
        crate::metrics::get()
            .delivering(link.channel.namespace())
            .gap_repairs
            .increment(1);
    }
    repaired
}

/// The loop of [`repair`]: one direct get per missing publication.
async fn repair_from(link: &ChannelLink, mut last: u64, until: u64) -> u64 {
    loop {
        match link
            .stream
            .direct_get_next_for_subject(link.subject.clone(), Some(last.saturating_add(1)))
            .await
        {
            Ok(m) if m.sequence < until => {
                if let Some(p) =
                    publication(&link.channel, m.sequence, Some(&m.headers), &m.payload)
                {
                    deliver_traced(&*link.deliveries, Some(&m.headers), p);
                }
                last = m.sequence;
            }
            Ok(_) => return last,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => return last,
            Err(e) => {
                tracing::warn!(channel = %link.channel, error = %e, "gap repair failed");
                return last;
            }
        }
    }
}

impl Broker for NatsBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'_, Result<Published, EngineError>> {
        Box::pin(self.publish_inner(req))
    }

    fn publish_ordered(
        &self,
        req: PublishRequest,
    ) -> BoxFuture<'_, Result<AckFuture, EngineError>> {
        Box::pin(self.send(req))
    }

    fn history<'a>(
        &'a self,
        channel: &'a Channel,
        from: HistoryFrom,
        limit: usize,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<HistoryPage, EngineError>> {
        Box::pin(self.history_inner(channel, from, limit, page))
    }

    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: u64,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<ReplayPage, EngineError>> {
        Box::pin(self.history_after_inner(channel, after, page))
    }

    fn watch<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(self.watch_inner(channel))
    }

    fn replay_reader(&self, channel: &Channel, remaining: u64) -> Option<Box<dyn ReplayReader>> {
        // A consumer costs a round trip and state on the server: worth it only for
        // a long catch-up; a short rest is a batched direct get or two.
        if remaining < CONSUMER_FROM {
            return None;
        }
        let stream = self.namespace(channel).ok()?.stream().ok()?.clone();
        Some(Box::new(ConsumerReplay {
            stream,
            channel: channel.clone(),
            subject: self.subject(channel),
            timeout: self.cfg.request_timeout,
            reading: None,
        }))
    }

    fn acks_waiting(&self) -> usize {
        self.acks.waiting()
    }

    fn backbone(&self) -> BackboneState {
        let mut state = BackboneState::default();
        if self.connected().is_err() {
            let why = match self.last_error.lock().as_deref() {
                Some(e) => format!("nats: not connected to {} (last error: {e})", self.cfg.url),
                None => format!("nats: not connected to {}", self.cfg.url),
            };
            state.blocking.push(why);
        } else if !self.checked.load(Ordering::Acquire) {
            state.blocking.push("nats: streams not checked yet".into());
        }
        for (name, ns) in &self.namespaces {
            if let Some(why) = ns.problem.lock().as_deref() {
                state
                    .namespaces
                    .insert(name.clone(), format!("stream {}: {why}", ns.name));
            }
        }
        state
    }

    fn unwatch(&self, channel: &Channel) {
        if let Some(live) = self.namespace(channel).ok().and_then(|ns| ns.live.as_ref()) {
            live.unwatch(channel);
            return;
        }
        let mut live = self.live.lock();
        if let Some(l) = live.get_mut(channel) {
            l.refs -= 1;
            if l.refs == 0 {
                if let Some(l) = live.remove(channel) {
                    // Dropping the subscription unsubscribes from the live subject.
                    l.task.abort();
                }
            }
        }
    }
}

/// Whether retention may have dropped publications of a channel after `after`,
/// from its oldest retained message and the stream's first sequence. Retention
/// drops the oldest first: if the oldest retained publication of the channel is
/// at most one past `after`, nothing after it was dropped. When nothing of the
/// channel is left (expired or purged), only a stream that dropped nothing after
/// `after` proves there was nothing to miss.
fn dropped_after(after: u64, oldest: Option<u64>, stream_first: u64) -> bool {
    let next = after.saturating_add(1);
    match oldest {
        Some(oldest) => oldest > next,
        None => stream_first > next,
    }
}

/// Whether a page read from `after` on may have a gap retention made: unless it
/// starts right after `after`, [`check_dropped`] decides, and only once the page is
/// read — a check made before or beside the read can predate a drop the read then
/// skipped (drops are final, so a check after the read is proof).
fn gap_possible(after: u64, first: Option<u64>) -> bool {
    first.is_none_or(|f| f > after.saturating_add(1))
}

/// Reads what [`dropped_after`] needs, after a replay's page: a replay that
/// retention overtook must not go on with a gap.
async fn check_dropped(
    stream: &stream::Stream,
    subject: &str,
    after: u64,
    timeout: Duration,
) -> Result<bool, EngineError> {
    let timed_out = |_| unavailable("replay", "timed out");
    let oldest = match tokio::time::timeout(timeout, stream.direct_get_first_for_subject(subject))
        .await
        .map_err(timed_out)?
    {
        Ok(m) => Some(m.sequence),
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => None,
        Err(e) => return Err(unavailable("replay", e)),
    };
    let stream_first = match oldest {
        Some(_) => 0,
        None => {
            let info = tokio::time::timeout(timeout, stream.get_info())
                .await
                .map_err(timed_out)?
                .map_err(|e| unavailable("replay", e))?;
            info.state.first_sequence
        }
    };
    Ok(dropped_after(after, oldest, stream_first))
}

/// A long catch-up read through an ordered pull consumer from the replay's
/// position: the server pushes the pages (three headers a message instead of
/// the nine of a batched direct get), at a fraction of the CPU on both sides.
/// The consumer is ephemeral (memory, R1) and deleted when the replay ends.
struct ConsumerReplay {
    stream: Arc<stream::Stream>,
    channel: Channel,
    subject: String,
    timeout: Duration,
    /// The consumer's messages, its name, where it stands, and how many follow.
    reading: Option<Reading>,
}

struct Reading {
    messages: jetstream::consumer::pull::Ordered,
    name: String,
    at: u64,
    pending: u64,
}

impl ConsumerReplay {
    async fn open(&mut self, after: u64, page: PageLimit) -> Result<(), EngineError> {
        use jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        self.close();
        let name = format!("sy-replay-{:016x}", fastrand::u64(..));
        let config = OrderedConfig {
            name: Some(name.clone()),
            filter_subject: self.subject.clone(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after.saturating_add(1),
            },
            // The consumer's prefetch is bounded like a page.
            max_batch: page.messages.clamp(1, MAX_BATCH) as i64,
            ..Default::default()
        };
        let open = async {
            let consumer = self
                .stream
                .create_consumer(config)
                .await
                .map_err(|e| unavailable("replay", e))?;
            let pending = consumer.cached_info().num_pending;
            let messages = consumer
                .messages()
                .await
                .map_err(|e| unavailable("replay", e))?;
            Ok::<_, EngineError>(Reading {
                messages,
                name,
                at: after,
                pending,
            })
        };
        let reading = tokio::time::timeout(self.timeout, open)
            .await
            .map_err(|_| unavailable("replay", "timed out"))??;
        self.reading = Some(reading);
        Ok(())
    }

    async fn read(&mut self, after: u64, page: PageLimit) -> Result<ReplayPage, EngineError> {
        // Behind the consumer only by publications that could not be read: go on.
        if self.reading.as_ref().is_none_or(|r| r.at < after) {
            self.open(after, page).await?;
        }
        let Some(r) = self.reading.as_mut() else {
            return Err(unavailable("replay", "no consumer"));
        };
        let mut out = ReplayPage {
            remaining: r.pending,
            ..ReplayPage::default()
        };
        let mut bytes = 0usize;
        loop {
            // A message taken from the consumer cannot be put back: the page is
            // closed before the next one, and may pass the byte bound by one.
            if !page.admits(out.publications.len(), bytes, 0) {
                break;
            }
            // Past the end as last seen, wait only briefly: what live showed is stored
            // by now, and an empty page makes the replay try again shortly.
            let wait = if r.pending == 0 {
                Duration::from_millis(50)
            } else {
                self.timeout
            };
            let m = match tokio::time::timeout(wait, r.messages.next()).await {
                Err(_) if r.pending == 0 => break,
                Err(_) => return Err(unavailable("replay", "timed out")),
                Ok(None) => return Err(unavailable("replay", "consumer ended")),
                Ok(Some(Err(e))) => return Err(unavailable("replay", e)),
                Ok(Some(Ok(m))) => m,
            };
            let Ok(info) = m.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            r.at = seq;
            r.pending = pending;
            out.remaining = pending;
            if let Some(p) = publication(&self.channel, seq, m.headers.as_ref(), &m.payload) {
                bytes += p.msg.len();
                out.publications.push(Arc::new(p));
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes the consumer now instead of leaving it to the server's inactivity timer.
    fn close(&mut self) {
        if let Some(r) = self.reading.take() {
            let stream = self.stream.clone();
            tokio::spawn(async move {
                let _ = stream.delete_consumer(&r.name).await;
            });
        }
    }
}

impl ReplayReader for ConsumerReplay {
    fn next_page(
        &mut self,
        after: u64,
        page: PageLimit,
    ) -> BoxFuture<'_, Result<ReplayPage, EngineError>> {
        Box::pin(async move {
            let (stream, subject, timeout) =
                (self.stream.clone(), self.subject.clone(), self.timeout);
            let mut page = self.read(after, page).await?;
            let first = page.publications.first().map(|p| p.seq);
            page.lost = gap_possible(after, first)
                && check_dropped(&stream, &subject, after, timeout).await?;
            Ok(page)
        })
    }
}

impl Drop for ConsumerReplay {
    fn drop(&mut self) {
        self.close();
    }
}

/// Looks up (or provisions) every namespace's stream once connected, again with
/// backoff for those that failed, until all are there. A stream that cannot be had
/// (e.g. its replicas' servers are down) leaves the others, and readiness, alone.
async fn provision(broker: Weak<NatsBroker>) {
    let mut reconnects = match broker.upgrade() {
        Some(b) => b.reconnects.subscribe(),
        None => return,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        {
            let Some(b) = broker.upgrade() else {
                return;
            };
            if b.connected().is_ok() {
                let missing = b.namespaces.values().filter(|ns| ns.stream.get().is_none());
                let rounds = missing.map(|ns| async {
                    match b.ensure(ns).await {
                        Ok(stream) => {
                            let _ = ns.stream.set(Arc::new(stream));
                            *ns.problem.lock() = None;
                        }
                        Err(why) => {
                            tracing::warn!(stream = %ns.name, %why, "stream not available; retrying");
                            *ns.problem.lock() = Some(why);
                        }
                    }
                });
                futures_util::future::join_all(rounds).await;
                b.checked.store(true, Ordering::Release);
                if b.namespaces.values().all(|ns| ns.stream.get().is_some()) {
                    return;
                }
            }
        }
        // A new connection is the moment to try again; otherwise back off.
        let _ = tokio::time::timeout(backoff, reconnects.changed()).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Drop for NatsBroker {
    fn drop(&mut self) {
        for (_, l) in self.live.get_mut().drain() {
            l.task.abort();
        }
    }
}
