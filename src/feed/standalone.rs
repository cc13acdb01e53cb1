//! `switchyard feed`: the connectors as their own process, publishing into the
//! cluster through JetStream, with `/healthz`, `/readyz` (the exchange links) and
//! `/metrics` on `feed.listen`. Run two or more for redundancy: `msg_id` dedupe
//! keeps one publication per tick.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Health, TickSink};
use crate::config::{Config, ConfigError, EngineKind};
use crate::engine::Broker;
use crate::shutdown::Shutdown;

/// A running feed process.
pub struct RunningFeed {
    /// Where the health endpoints listen.
    pub addr: SocketAddr,
    pub health: Arc<Health>,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<()>,
}

/// Connects to NATS (and Redis for the price cache), starts the connectors and
/// the health endpoints.
pub async fn start(config: Config) -> Result<RunningFeed, ConfigError> {
    if config.engine.kind != EngineKind::Nats {
        return Err(ConfigError(
            "`engine.kind`: `switchyard feed` publishes into a cluster and needs \"nats\"; on a single node use `feed.embedded = true`".into(),
        ));
    }
    if !config.feed.kucoin.enabled && !config.feed.synthetic.enabled {
        return Err(ConfigError(
            "`feed`: no connector enabled (feed.kucoin.enabled or feed.synthetic.enabled)".into(),
        ));
    }
    let listener = TcpListener::bind(config.feed.listen).await.map_err(|e| {
        ConfigError(format!(
            "`feed.listen`: cannot bind {}: {e}",
            config.feed.listen
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ConfigError(format!("`feed.listen`: {e}")))?;
    let (broker, prices) = crate::engine::build::feed(&config).await?;
    let health = Arc::new(Health::default());
    let shutdown = Shutdown::default();
    let sink = Arc::new(TickSink::new(
        Arc::clone(&broker),
        Arc::clone(&prices),
        &config.feed.namespace,
        config.feed.stale_after,
    ));
    super::start(&config.feed, sink, Arc::clone(&health), shutdown.clone());
    crate::metrics::started(&config, "feed", shutdown.clone());
    let served = serve(
        listener,
        Arc::clone(&health),
        broker,
        config.feed.stale_after,
        shutdown.clone(),
    );
    let task = tokio::spawn(async move {
        served.await;
        if let Err(e) = prices.flush().await {
            tracing::warn!(error = %e, "the latest prices could not be written before exit");
        }
    });
    Ok(RunningFeed {
        addr,
        health,
        shutdown,
        task,
    })
}

async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    broker: Arc<dyn Broker>,
    stale_after: std::time::Duration,
    shutdown: Shutdown,
) {
    loop {
        let stream = tokio::select! {
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = shutdown.wait() => return,
        };
        let health = Arc::clone(&health);
        let broker = Arc::clone(&broker);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(&req, &health, &*broker, stale_after);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route<B>(
    req: &Request<B>,
    health: &Health,
    broker: &dyn Broker,
    stale_after: std::time::Duration,
) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            serde_json::json!({"status": "ok"}).to_string(),
            "application/json",
        ),
        (&Method::GET, "/readyz") => {
            let links = health.is_ready(stale_after);
            let nats = broker.backbone().is_ready();
            let status = if links && nats {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "status": if links && nats { "ready" } else if !nats { "backbone unreachable" } else { "exchange link down or stale" },
                "links": health.status(),
            });
            (status, body.to_string(), "application/json")
        }
        (&Method::GET, "/metrics") => {
            super::export_metrics(health);
            let body = crate::metrics::get().render();
            (StatusCode::OK, body, "text/plain; version=0.0.4")
        }
        _ => (
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "code": 404}).to_string(),
            "application/json",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    resp
}
