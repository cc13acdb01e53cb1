//! Logging and traces: human-readable or JSON log lines filtered by `RUST_LOG` or
//! `log.level`, and OpenTelemetry spans whose W3C trace context travels in NATS
//! headers (`traceparent`), so one trace follows a publication from the publishing
//! node to every delivering node. Spans leave the process over OTLP only when the
//! standard `OTEL_EXPORTER_OTLP_*` variables ask for it (docs/observability.md);
//! otherwise nothing is exported and no exporter thread runs. Tokens and message
//! bodies are never logged.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogConfig;

/// Kept for the life of the process: spans need their provider, and `shutdown` flushes it.
static PROVIDER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// How spans leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The OTLP protocol the standard variables ask for, or `None` when export is off
/// (no endpoint, or `OTEL_TRACES_EXPORTER=none`).
fn wanted() -> Result<Option<Protocol>, String> {
    if env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none") {
        return Ok(None);
    }
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref() {
        None | Some("http/protobuf") => Ok(Some(Protocol::HttpProtobuf)),
        Some("grpc") => Ok(Some(Protocol::Grpc)),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported: use http/protobuf or grpc"
        )),
    }
}

/// `service.name` (`OTEL_SERVICE_NAME`, else "switchyard"), `service.instance.id`
/// (the node id), `service.version`, and `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(node_id: &str) -> Resource {
    let mut builder = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name("switchyard");
    }
    builder
        .with_attributes([
            KeyValue::new("service.instance.id", node_id.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build()
}

/// The provider with its batch exporter when OTLP is configured and can be built;
/// `None` otherwise (then no span is made at all). gRPC needs the runtime (tonic's
/// channel runs on it); http/protobuf must be built outside it (its blocking client
/// has a runtime of its own).
fn provider(node_id: &str, runtime: Option<&tokio::runtime::Handle>) -> Option<SdkTracerProvider> {
    let exporter = match wanted() {
        Ok(None) => return None,
        Ok(Some(Protocol::HttpProtobuf)) => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build(),
        Ok(Some(Protocol::Grpc)) => match runtime {
            Some(rt) => {
                let _entered = rt.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_timeout(std::time::Duration::from_secs(10))
                    .build()
            }
            None => {
                eprintln!("switchyard: OTLP over grpc needs the runtime; traces are not exported");
                return None;
            }
        },
        Err(why) => {
            eprintln!("switchyard: {why}; traces are not exported");
            return None;
        }
    };
    match exporter {
        Ok(e) => Some(
            SdkTracerProvider::builder()
                .with_resource(resource(node_id))
                .with_batch_exporter(e)
                .build(),
        ),
        Err(e) => {
            eprintln!("switchyard: cannot build the OTLP exporter ({e}); traces are not exported");
            None
        }
    }
}

/// Whether this process makes and exports spans (`init` found OTLP configured).
/// When it does not, a caller's trace context is still forwarded to the delivering
/// nodes as it came (`PublishRequest::caller_trace`).
pub fn exporting() -> bool {
    PROVIDER.get().is_some_and(Option::is_some)
}

/// Installs the global subscriber, the W3C propagator and the tracer provider; a
/// second call is ignored. `node_id` becomes `service.instance.id`; `runtime` is
/// where a gRPC exporter runs (the process's runtime, not entered by the caller).
pub fn init(cfg: &LogConfig, node_id: &str, runtime: Option<&tokio::runtime::Handle>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = JsonLine::default();
    let fmt = log_layer(cfg.json.then(|| json.clone()), filter, std::io::stderr);
    // Spans exist only to be exported: without a provider no layer wants them, and a
    // span costs a disabled callsite's check (half of a publication's CPU otherwise).
    // With one, they are made whatever the log level. No busy/idle time and no thread
    // attributes: they cost a clock read on every poll of an instrumented future and
    // tell an SRE nothing the span's duration does not.
    let otel = PROVIDER
        .get_or_init(|| provider(node_id, runtime))
        .as_ref()
        .map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("switchyard"))
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(LevelFilter::INFO)
        });
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // `try_init` also routes the `log` records of libraries into tracing.
    // Not `.with(otel)` with an `Option`: a `None` layer enables every callsite.
    let logs = tracing_subscriber::registry().with(fmt);
    let installed = match otel {
        Some(otel) => logs.with(otel).try_init(),
        None => logs.try_init(),
    };
    if installed.is_ok() {
        tracing::dispatcher::get_default(|d| json.dispatch.set(d.downgrade()).ok());
    }
}

/// The log layer: JSON lines (`json`) or human-readable ones, of events only. Spans
/// are the trace layer's: formatting their fields at every span's creation, for a
/// line seldom written, cost more than the publish they described. A JSON line still
/// names its span and carries its trace context (`JsonLine`).
fn log_layer<S, W>(
    json: Option<JsonLine>,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    // A `filter_fn` has no level hint, and `and` with one that has none has none: the
    // process's max level would then be TRACE, and every `log` record of a library
    // (tungstenite logs each frame it parses) would be built and offered to the
    // subscriber. With the filter's own hint the `log` macros stop at the call site.
    let hint = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let events = filter
        .and(tracing_subscriber::filter::filter_fn(|m| m.is_event()).with_max_level_hint(hint));
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match json {
        Some(json) => fmt.event_format(json).with_filter(events).boxed(),
        None => fmt.with_filter(events).boxed(),
    }
}

/// Exports what is still batched and stops the exporter. Blocks: call it outside
/// the runtime (or from `spawn_blocking`).
pub fn shutdown() {
    if let Some(Some(p)) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) a caller sent, as the parent
/// for the span of what it asked for. Anything malformed is ignored (a new trace).
pub fn remote_parent(
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> opentelemetry::Context {
    let mut fields = std::collections::HashMap::new();
    if let Some(v) = traceparent {
        fields.insert("traceparent".to_string(), v.to_string());
    }
    if let Some(v) = tracestate {
        fields.insert("tracestate".to_string(), v.to_string());
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&fields))
}

/// A count or seq as a span attribute: OpenTelemetry integers are signed (a u64
/// would be exported as a string).
pub fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// JSON log lines — `{"timestamp", "level", "target", "fields": {...}}`, the shape of
/// tracing-subscriber's — with the `trace_id` and `span_id` of the span they were
/// emitted in, so a log line leads to its trace.
#[derive(Clone, Default)]
struct JsonLine {
    /// The dispatcher this formatter runs in, set once it is built: the trace
    /// context of a span is read through it.
    dispatch: std::sync::Arc<OnceLock<tracing::dispatcher::WeakDispatch>>,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt;
        use serde_json::{Map, Value};
        let mut fields = Map::new();
        event.record(&mut JsonFields(&mut fields));
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("fields".into(), Value::Object(fields));
        line.insert("target".into(), meta.target().into());
        // Not `ctx.lookup_current()`: the log layer does not see spans (`log_layer`).
        // Not `dispatcher::get_default` either: inside an event it is the no-op one.
        let dispatch = self.dispatch.get().and_then(|w| w.upgrade());
        let current = dispatch.as_ref().and_then(|d| {
            let registry = d.downcast_ref::<tracing_subscriber::Registry>()?;
            let current = tracing::Subscriber::current_span(registry);
            Some((current.id()?.clone(), current.metadata()?.name()))
        });
        if let (Some(d), Some((id, name))) = (&dispatch, current) {
            line.insert("span".into(), name.into());
            let cx = tracing_opentelemetry::get_otel_context(&id, d);
            let sc = cx.map(|cx| cx.span().span_context().clone());
            if let Some(sc) = sc.filter(|sc| sc.is_valid()) {
                line.insert("trace_id".into(), sc.trace_id().to_string().into());
                line.insert("span_id".into(), sc.span_id().to_string().into());
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    use super::JsonLine;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_log_layer_tells_the_level_it_keeps_so_lower_records_stop_at_the_call_site() {
        use tracing_subscriber::filter::LevelFilter;
        use tracing_subscriber::Layer;
        for (level, hint) in [("warn", LevelFilter::WARN), ("info", LevelFilter::INFO)] {
            let layer = super::log_layer::<tracing_subscriber::Registry, _>(
                None,
                tracing_subscriber::EnvFilter::new(level),
                std::io::sink,
            );
            assert_eq!(layer.max_level_hint(), Some(hint), "{level}");
        }
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_their_span() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let json = JsonLine::default();
        let subscriber = tracing_subscriber::registry()
            .with(super::log_layer(
                Some(json.clone()),
                tracing_subscriber::EnvFilter::new("info"),
                move || out.clone(),
            ))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let dispatch = tracing::Dispatch::new(subscriber);
        json.dispatch.set(dispatch.downgrade()).unwrap();
        let (trace_id, span_id) = tracing::dispatcher::with_default(&dispatch, || {
            tracing::warn!(n = 1u64, "outside");
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::warn!(answer = 42, who = %"me", "inside");
            let cx = span.context();
            let sc = cx.span().span_context().clone();
            (sc.trace_id().to_string(), sc.span_id().to_string())
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["fields"]["message"], "outside");
        assert_eq!(lines[0]["fields"]["n"], 1);
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["fields"]["message"], "inside");
        assert_eq!(lines[1]["fields"]["answer"], 42);
        assert_eq!(lines[1]["fields"]["who"], "me");
        assert_eq!(lines[1]["span"], "work");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str());
        assert_eq!(lines[1]["span_id"], span_id.as_str());
        assert_eq!(trace_id.len(), 32);
    }
}
