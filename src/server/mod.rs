//! The HTTP side of a node: the listener and accept loop, routing, the ops
//! endpoints (`/healthz`, `/readyz`), and the drain on shutdown.

pub mod api;
pub mod demo;
pub mod origin;
pub mod parse_errors;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};
use crate::node::Node;
use parse_errors::JsonParseErrors;

/// Every response body is a full buffer.
pub type Body = Full<Bytes>;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: u16,
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON error response `{"error": ..., "code": ...}`.
pub fn error(status: StatusCode, code: u16, message: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message,
            code,
        },
    )
}

/// Answers one request; a panic below answers 500 instead of dropping the connection.
async fn route(node: Arc<Node>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let resp = AssertUnwindSafe(dispatch(node, req))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!("request handler panicked; answered 500");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                crate::protocol::code::INTERNAL,
                "internal error",
            )
        });
    Ok(resp)
}

async fn dispatch(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path.starts_with("/api/") {
        return api::handle(node, req).await;
    }
    if path == "/demo" || path.starts_with("/demo/") {
        return demo::handle(node, req).await;
    }
    #[cfg(feature = "test-hooks")]
    if path == "/test/panic" {
        panic!("test hook: request handler panic");
    }
    // With `metrics.listen` set, `/metrics` is served there and not here.
    let metrics_here = node.config.metrics.listen.is_empty();
    let known =
        matches!(path, "/ws" | "/healthz" | "/readyz") || metrics_here && path == "/metrics";
    if !known {
        return error(StatusCode::NOT_FOUND, 404, "not found");
    }
    if req.method() != Method::GET {
        return api::wrong_method(&Method::GET);
    }
    match path {
        "/ws" => ws::upgrade(node, req),
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => readyz(&node),
        _ => metrics(&node),
    }
}

/// Ready means: not draining, the broker's backbone is connected and its streams
/// were looked up once. A namespace whose stream is not available does not make
/// the node unready (the others serve; its requests answer 113): the body lists it.
/// Redis being down does not either (delivery goes on, only presence, cursors and
/// control are degraded, and every node shares the same Redis: pulling them all
/// out of the load balancer would turn a degradation into an outage); the body
/// says how Redis is.
fn readyz(node: &Node) -> Response<Body> {
    let redis = match node.engine.registry.store_up() {
        None => "none",
        Some(true) => "up",
        Some(false) => "down",
    };
    let backbone = node.engine.broker.backbone();
    let (status, word) = if node.shutdown.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !backbone.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "backbone unreachable")
    } else {
        (StatusCode::OK, "ready")
    };
    let mut body = serde_json::json!({"status": word, "redis": redis});
    if !backbone.blocking.is_empty() {
        body["reasons"] = serde_json::json!(backbone.blocking);
    }
    if !backbone.namespaces.is_empty() {
        body["unavailable_namespaces"] = serde_json::json!(backbone.namespaces);
    }
    json(status, &body)
}

/// Every series in the Prometheus text format; the gauges of node state are read now.
fn metrics(node: &Node) -> Response<Body> {
    let m = crate::metrics::get();
    m.gauge("switchyard_connections", vec![])
        .set(node.connection_count() as f64);
    m.gauge("switchyard_draining", vec![])
        .set(f64::from(u8::from(node.shutdown.is_draining())));
    m.counter("switchyard_conflated_total", vec![])
        .absolute(node.hub.conflated());
    let (max_frames, bytes) = node.connections.backlog();
    m.gauge("switchyard_outbox_backlog_max_frames", vec![])
        .set(max_frames as f64);
    m.gauge("switchyard_outbox_backlog_bytes", vec![])
        .set(bytes as f64);
    m.gauge("switchyard_jetstream_acks_waiting", vec![])
        .set(node.engine.broker.acks_waiting() as f64);
    m.gauge("switchyard_tasks", vec![]).set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as f64,
    );
    if let Some(up) = node.engine.registry.store_up() {
        m.gauge("switchyard_redis_up", vec![])
            .set(f64::from(u8::from(up)));
    }
    crate::feed::export_metrics(&node.feed);
    let mut resp = Response::new(Full::new(Bytes::from(m.render())));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Serves `GET /metrics` alone on `metrics.listen` for the life of the process
/// (a draining node is still scraped).
async fn serve_metrics(node: Arc<Node>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = Arc::clone(&node);
        let timeout = node.config.server.header_read_timeout;
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let resp = match (req.method(), req.uri().path()) {
                    (&Method::GET, "/metrics") => metrics(&node),
                    (_, "/metrics") => api::wrong_method(&Method::GET),
                    _ => error(StatusCode::NOT_FOUND, 404, "not found"),
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A node serving on a bound listener.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `config.server.listen`, builds the node and serves in a background task.
pub async fn start(config: Config) -> Result<RunningServer, ConfigError> {
    let listener = TcpListener::bind(config.server.listen).await.map_err(|e| {
        ConfigError(format!(
            "`server.listen`: cannot bind {}: {e}",
            config.server.listen
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ConfigError(format!("`server.listen`: {e}")))?;
    let metrics_listener = match config.metrics.listener()? {
        Some(at) => Some(
            TcpListener::bind(at)
                .await
                .map_err(|e| ConfigError(format!("`metrics.listen`: cannot bind {at}: {e}")))?,
        ),
        None => None,
    };
    let node = Node::new(config).await?;
    crate::metrics::started(&node.config, "gateway", node.shutdown.clone());
    if let Some(listener) = metrics_listener {
        tokio::spawn(serve_metrics(Arc::clone(&node), listener));
    }
    if node.config.feed.embedded {
        let sink = crate::feed::TickSink::new(
            Arc::clone(&node.engine.broker),
            Arc::clone(&node.prices),
            &node.config.feed.namespace,
            node.config.feed.stale_after,
        );
        crate::feed::start(
            &node.config.feed,
            Arc::new(sink),
            Arc::clone(&node.feed),
            node.shutdown.clone(),
        );
    }
    let task = tokio::spawn(run(Arc::clone(&node), listener));
    Ok(RunningServer { addr, node, task })
}

/// Accepts connections until the node has drained (or the drain timeout passed).
pub async fn run(node: Arc<Node>, listener: TcpListener) {
    let drained = {
        let node = Arc::clone(&node);
        async move {
            node.shutdown.wait().await;
            tracing::info!(connections = node.connection_count(), "draining");
            let timeout = node.config.server.drain_timeout;
            if tokio::time::timeout(timeout, node.connections_at_most(0))
                .await
                .is_err()
            {
                tracing::warn!(
                    connections = node.connection_count(),
                    "drain timeout reached with connections still open"
                );
            }
        }
    };
    tokio::pin!(drained);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let header_timeout = node.config.server.header_read_timeout;
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            let service = service_fn(move |req| route(Arc::clone(&node), req));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(JsonParseErrors::new(stream)), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "http connection ended with error");
            }
        });
    }
    // Sessions removed their presence as they closed; what is left is the node's own.
    if let Err(e) = node.engine.cursors.flush().await {
        tracing::warn!(error = %e, "buffered acks could not be written before exit");
    }
    if let Err(e) = node.prices.flush().await {
        tracing::warn!(error = %e, "the latest prices could not be written before exit");
    }
    node.engine.registry.leave_cluster().await;
    tracing::info!("stopped");
}
