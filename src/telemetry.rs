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
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

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

/// The provider: with a batch exporter when OTLP is configured, else without any
/// (spans still carry trace context across nodes, at the cost of creating them).
/// gRPC needs the runtime (tonic's channel runs on it); http/protobuf must be built
/// outside it (its blocking client has a runtime of its own).
fn provider(node_id: &str, runtime: Option<&tokio::runtime::Handle>) -> SdkTracerProvider {
    let builder = SdkTracerProvider::builder().with_resource(resource(node_id));
    let exporter = match wanted() {
        Ok(None) => return builder.build(),
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
                return builder.build();
            }
        },
        Err(why) => {
            eprintln!("switchyard: {why}; traces are not exported");
            return builder.build();
        }
    };
    match exporter {
        Ok(e) => builder.with_batch_exporter(e).build(),
        Err(e) => {
            eprintln!("switchyard: cannot build the OTLP exporter ({e}); traces are not exported");
            builder.build()
        }
    }
}

/// Installs the global subscriber, the W3C propagator and the tracer provider; a
/// second call is ignored. `node_id` becomes `service.instance.id`; `runtime` is
/// where a gRPC exporter runs (the process's runtime, not entered by the caller).
pub fn init(cfg: &LogConfig, node_id: &str, runtime: Option<&tokio::runtime::Handle>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // Spans are created whatever the log level, so trace context propagates even when
    // logs are quiet.
    let provider = PROVIDER.get_or_init(|| provider(node_id, runtime));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_filter(LevelFilter::INFO);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}

/// Exports what is still batched and stops the exporter. Blocks: call it outside
/// the runtime (or from `spawn_blocking`).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
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
