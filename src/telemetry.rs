//! Logging and trace context: human-readable or JSON log lines filtered by
//! `RUST_LOG` or `log.level`, and OpenTelemetry spans whose W3C trace context
//! travels in NATS headers (`traceparent`), so one trace can follow a publication
//! from the publishing node to every delivering node. Tokens and message bodies
//! are never logged.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogConfig;

/// Kept for the life of the process: spans need their provider.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber and the W3C propagator; a second call is ignored.
pub fn init(cfg: &LogConfig) {
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
    // logs are quiet. Exporting them (OTLP) is configured separately (issue #11).
    let provider = PROVIDER.get_or_init(|| SdkTracerProvider::builder().build());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_filter(LevelFilter::INFO);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
}
