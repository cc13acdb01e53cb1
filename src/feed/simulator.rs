//! An exchange simulator speaking the KuCoin public protocol (REST token +
//! WebSocket), for tests and local demos (`switchyard simulate-exchange`).
//!
//! It emits ticker messages with increasing sequences at a fixed rate per symbol
//! and can be told to drop every connection, stall its pongs, send malformed
//! messages, or refuse the next token requests: in process through
//! [`Simulator`]'s methods, or over HTTP (`POST /sim/drop`, `/sim/stall?on=true`,
//! `/sim/malformed`, `/sim/refuse?n=3`, `GET /sim/stats`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::clock::unix_ms;

/// What the simulator emits.
#[derive(Debug, Clone)]
pub struct SimulatorOptions {
    pub symbols: Vec<String>,
    /// Ticks per second per symbol.
    pub rate: f64,
    /// Told to clients in the token answer.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Default for SimulatorOptions {
    fn default() -> Self {
        SimulatorOptions {
            symbols: vec!["BTC-USDT".into(), "ETH-USDT".into()],
            rate: 10.0,
            ping_interval: Duration::from_secs(18),
            ping_timeout: Duration::from_secs(10),
        }
    }
}

/// A tick as emitted.
#[derive(Debug, Clone)]
struct SimTick {
    symbol: String,
    seq: u64,
    frame: Utf8Bytes,
}

enum Order {
    Drop,
    Malformed,
}

struct Conn {
    orders: mpsc::Sender<Order>,
    /// `(symbol, sequence)` of every ticker message sent on this connection.
    sent: Arc<Mutex<Vec<(String, u64)>>>,
}

#[derive(Default)]
struct State {
    tokens: Mutex<HashSet<String>>,
    token_requests: AtomicU64,
    refuse_next: AtomicU64,
    stall_pongs: AtomicBool,
    pings: AtomicU64,
    conns: Mutex<Vec<Conn>>,
}

/// A running simulator.
pub struct Simulator {
    /// Base URL for `rest_url` (the token endpoint and the controls).
    pub rest_url: String,
    /// Where clients connect (told in the token answer).
    pub ws_addr: SocketAddr,
    state: Arc<State>,
}

impl Simulator {
    /// Starts on `rest` and `ws` (port 0 for any free port).
    pub async fn start(
        opts: SimulatorOptions,
        rest: SocketAddr,
        ws: SocketAddr,
    ) -> std::io::Result<Simulator> {
        let rest_listener = TcpListener::bind(rest).await?;
        let ws_listener = TcpListener::bind(ws).await?;
        let rest_addr = rest_listener.local_addr()?;
        let ws_addr = ws_listener.local_addr()?;
        let state = Arc::new(State::default());
        let (ticks, _) = broadcast::channel::<SimTick>(4096);
        tokio::spawn(emit(opts.clone(), ticks.clone()));
        let endpoint = format!("ws://{ws_addr}/endpoint");
        tokio::spawn(serve_rest(
            rest_listener,
            Arc::clone(&state),
            opts,
            endpoint,
        ));
        tokio::spawn(serve_ws(ws_listener, Arc::clone(&state), ticks));
        Ok(Simulator {
            rest_url: format!("http://{rest_addr}"),
            ws_addr,
            state,
        })
    }

    /// Drops every WebSocket connection without a close frame.
    pub fn drop_connections(&self) {
        for c in self.state.conns.lock().iter() {
            let _ = c.orders.try_send(Order::Drop);
        }
    }

    /// Stops (or resumes) answering pings.
    pub fn stall_pongs(&self, on: bool) {
        self.state.stall_pongs.store(on, Ordering::Relaxed);
    }

    /// Sends a burst of malformed messages on every connection.
    pub fn send_malformed(&self) {
        for c in self.state.conns.lock().iter() {
            let _ = c.orders.try_send(Order::Malformed);
        }
    }

    /// Refuses the next `n` token requests.
    pub fn refuse_tokens(&self, n: u64) {
        self.state.refuse_next.store(n, Ordering::Relaxed);
    }

    /// Token requests received so far (refused ones included).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }

    /// WebSocket connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.conns.lock().len()
    }

    /// Pings received so far.
    pub fn pings(&self) -> u64 {
        self.state.pings.load(Ordering::Relaxed)
    }

    /// The `(symbol, sequence)`s sent on connection `i` (in accept order), in order.
    pub fn sent_on(&self, i: usize) -> Vec<(String, u64)> {
        self.state
            .conns
            .lock()
            .get(i)
            .map(|c| c.sent.lock().clone())
            .unwrap_or_default()
    }
}

/// Emits one tick per symbol every 1/rate seconds, sequences from 1,000,000.
async fn emit(opts: SimulatorOptions, ticks: broadcast::Sender<SimTick>) {
    let mut seq: u64 = 1_000_000;
    let mut cents: Vec<u64> = (0..opts.symbols.len() as u64)
        .map(|i| 100_000 + i * 7_000)
        .collect();
    // Each symbol's topic as a JSON string, escaped once: symbols come from the
    // command line too (`simulate-exchange`).
    let topics: Vec<String> = opts
        .symbols
        .iter()
        .map(|s| serde_json::Value::from(format!("/market/ticker:{s}")).to_string())
        .collect();
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate.max(0.001)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        every.tick().await;
        for (i, symbol) in opts.symbols.iter().enumerate() {
            seq += 1;
            let c = &mut cents[i];
            *c = if fastrand::bool() {
                *c + fastrand::u64(0..50)
            } else {
                c.saturating_sub(fastrand::u64(0..50)).max(1)
            };
            let px = |v: u64| format!("{}.{:02}", v / 100, v % 100);
            // The frame KuCoin sends, written out rather than built as a JSON tree:
            // at bench rates the simulator must cost far less than what it feeds.
            let frame = format!(
                concat!(
                    r#"{{"type":"message","topic":{topic},"subject":"trade.ticker","#,
                    r#""data":{{"sequence":"{seq}","price":"{price}","size":"0.0100","bestAsk":"{ask}","#,
                    r#""bestAskSize":"1.5","bestBid":"{bid}","bestBidSize":"2.5","time":{time}}}}}"#
                ),
                topic = topics[i],
                seq = seq,
                price = px(*c),
                ask = px(*c + 1),
                bid = px(c.saturating_sub(1)),
                time = unix_ms(),
            );
            let _ = ticks.send(SimTick {
                symbol: symbol.clone(),
                seq,
                frame: Utf8Bytes::from(frame),
            });
        }
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

async fn serve_rest(
    listener: TcpListener,
    state: Arc<State>,
    opts: SimulatorOptions,
    endpoint: String,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        let opts = opts.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = rest(&state, &opts, &endpoint, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn rest(
    state: &State,
    opts: &SimulatorOptions,
    endpoint: &str,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/v1/bullet-public") => {
            state.token_requests.fetch_add(1, Ordering::Relaxed);
            let refuse = state
                .refuse_next
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if refuse {
                return reply(
                    StatusCode::OK,
                    json!({"code": "429000", "msg": "Too Many Requests"}),
                );
            }
            let token = format!("sim-{:016x}", fastrand::u64(..));
            state.tokens.lock().insert(token.clone());
            reply(
                StatusCode::OK,
                json!({"code": "200000", "data": {"token": token, "instanceServers": [{
                    "endpoint": endpoint,
                    "encrypt": false,
                    "protocol": "websocket",
                    "pingInterval": opts.ping_interval.as_millis() as u64,
                    "pingTimeout": opts.ping_timeout.as_millis() as u64,
                }]}}),
            )
        }
        (&Method::POST, "/sim/drop") => {
            for c in state.conns.lock().iter() {
                let _ = c.orders.try_send(Order::Drop);
            }
            reply(StatusCode::OK, json!({"ok": true}))
        }
        (&Method::POST, "/sim/malformed") => {
            for c in state.conns.lock().iter() {
                let _ = c.orders.try_send(Order::Malformed);
            }
            reply(StatusCode::OK, json!({"ok": true}))
        }
        (&Method::POST, "/sim/stall") => {
            let on = param("on").as_deref() != Some("false");
            state.stall_pongs.store(on, Ordering::Relaxed);
            reply(StatusCode::OK, json!({"stall_pongs": on}))
        }
        (&Method::POST, "/sim/refuse") => {
            let n = param("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            state.refuse_next.store(n, Ordering::Relaxed);
            reply(StatusCode::OK, json!({"refuse_next": n}))
        }
        (&Method::GET, "/sim/stats") => reply(
            StatusCode::OK,
            json!({
                "token_requests": state.token_requests.load(Ordering::Relaxed),
                "connections": state.conns.lock().len(),
                "pings": state.pings.load(Ordering::Relaxed),
            }),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({"code": "404000", "msg": "not found"}),
        ),
    }
}

async fn serve_ws(listener: TcpListener, state: Arc<State>, ticks: broadcast::Sender<SimTick>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(connection(stream, Arc::clone(&state), ticks.subscribe()));
    }
}

/// Most ticks one write carries.
const BURST: usize = 256;

#[derive(Deserialize)]
struct ClientFrame {
    #[serde(rename = "type")]
    kind: String,
    id: Option<serde_json::Value>,
    topic: Option<String>,
}

async fn connection(
    stream: tokio::net::TcpStream,
    state: Arc<State>,
    mut ticks: broadcast::Receiver<SimTick>,
) {
    let mut query = String::new();
    // The callback's signature (and its large error type) is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback =
        |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
         resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
            query = req.uri().query().unwrap_or("").to_string();
            Ok(resp)
        };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let token = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let connect_id = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "connectId")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if !state.tokens.lock().remove(&token) {
        let err =
            json!({"id": connect_id, "type": "error", "code": 401, "data": "token is invalid"});
        let _ = tx.send(Message::text(err.to_string())).await;
        return;
    }
    let (orders_tx, mut orders) = mpsc::channel(16);
    let sent = Arc::new(Mutex::new(Vec::new()));
    state.conns.lock().push(Conn {
        orders: orders_tx,
        sent: Arc::clone(&sent),
    });
    let welcome = json!({"id": connect_id, "type": "welcome"});
    if tx.send(Message::text(welcome.to_string())).await.is_err() {
        return;
    }
    let mut subscribed: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(Message::Text(t))) = m else {
                    match m {
                        Some(Ok(_)) => continue,
                        _ => return,
                    }
                };
                let Ok(f) = serde_json::from_str::<ClientFrame>(&t) else { continue };
                match f.kind.as_str() {
                    "ping" => {
                        state.pings.fetch_add(1, Ordering::Relaxed);
                        if !state.stall_pongs.load(Ordering::Relaxed) {
                            let pong = json!({"id": f.id, "type": "pong"});
                            if tx.send(Message::text(pong.to_string())).await.is_err() { return; }
                        }
                    }
                    "subscribe" => {
                        if let Some(list) = f.topic.as_deref().and_then(|t| t.strip_prefix("/market/ticker:")) {
                            subscribed.extend(list.split(',').map(str::to_string));
                        }
                        let ack = json!({"id": f.id, "type": "ack"});
                        if tx.send(Message::text(ack.to_string())).await.is_err() { return; }
                    }
                    _ => {}
                }
            }
            t = ticks.recv() => {
                // What has been emitted goes out in one write, as an exchange's
                // socket sends a burst: a write per tick would cost the simulator
                // more than the connector it feeds.
                let mut next = match t {
                    Ok(t) => Some(t),
                    // A slow reader misses ticks here, as on a real exchange; `sent` says which.
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let mut queued = 0;
                loop {
                    if let Some(t) = next.take().filter(|t| subscribed.contains(&t.symbol)) {
                        if tx.feed(Message::Text(t.frame.clone())).await.is_err() { return; }
                        sent.lock().push((t.symbol, t.seq));
                        queued += 1;
                    }
                    if queued == BURST {
                        break;
                    }
                    next = match ticks.try_recv() {
                        Ok(t) => Some(t),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => None,
                        Err(broadcast::error::TryRecvError::Empty) => break,
                        Err(broadcast::error::TryRecvError::Closed) => return,
                    };
                }
                if queued > 0 && tx.flush().await.is_err() { return; }
            }
            o = orders.recv() => match o {
                // Dropping the stream without a close frame, as a failing link does.
                Some(Order::Drop) | None => return,
                Some(Order::Malformed) => {
                    for bad in [
                        "not json at all".to_string(),
                        json!({"type": "message", "topic": "/market/ticker:BTC-USDT", "data": {"price": 1}}).to_string(),
                        json!({"type": "message", "topic": "/market/ticker:BTC-USDT", "data": {"sequence": "oops", "price": "1", "size": "1", "bestBid": "1", "bestAsk": "1", "time": 1}}).to_string(),
                    ] {
                        if tx.send(Message::text(bad)).await.is_err() { return; }
                    }
                    if tx.send(Message::Binary(Bytes::from_static(b"\x00\x01"))).await.is_err() { return; }
                }
            },
        }
    }
}
