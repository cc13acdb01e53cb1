//! Test harness: a real gateway on a free loopback port and real WebSocket
//! clients (tokio-tungstenite, an independent implementation of RFC 6455).
#![allow(dead_code)]

pub mod scenarios;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchyard::auth::{self, Capability, Claims};
use switchyard::config::{Config, NamespaceConfig};
use switchyard::server::{self, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound for any single wait in tests.
pub const WAIT: Duration = Duration::from_secs(10);
pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";

fn ns(f: impl FnOnce(&mut NamespaceConfig)) -> NamespaceConfig {
    let mut n = NamespaceConfig::default();
    f(&mut n);
    n
}

/// A config with the namespaces the tests use; generous rate limits.
pub fn config() -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.reconnect_jitter = Duration::from_millis(500);
    c.auth.hmac_secret = SECRET.into();
    c.api.key = API_KEY.into();
    c.session.rate_frames_per_sec = 100_000;
    c.session.rate_frames_burst = 100_000;
    c.session.rate_bytes_per_sec = 100 << 20;
    use switchyard::auth::Permission::*;
    c.namespaces.insert(
        "chat".into(),
        ns(|n| {
            n.history_size = 10_000;
            n.max_replay = 10_000;
            n.client_publish = true;
            n.presence = true;
            n.join_leave = true;
            n.acked = true;
        }),
    );
    c.namespaces.insert(
        "open".into(),
        ns(|n| {
            n.history_size = 20_000;
            n.max_replay = 20_000;
            n.client_publish = true;
            n.allow = vec![Sub, Pub, History, Presence];
            n.max_data_bytes = 64 << 10;
        }),
    );
    c.namespaces.insert(
        "prices".into(),
        ns(|n| {
            n.history_size = 1;
            n.conflate = true;
            n.allow = vec![Sub, History];
            n.default_snapshot = 1;
            n.max_data_bytes = 64 << 10;
        }),
    );
    c.namespaces.insert(
        "ticks".into(),
        ns(|n| {
            n.history_size = 1;
            n.conflate = true;
            n.client_publish = true;
            n.allow = vec![Sub, Pub];
            n.max_data_bytes = 64 << 10;
        }),
    );
    c.namespaces.insert(
        "feedtest".into(),
        ns(|n| {
            n.history_size = 100_000;
            n.max_replay = 100_000;
            n.allow = vec![Sub, History];
        }),
    );
    c.namespaces.insert(
        "backlog".into(),
        ns(|n| {
            n.history_size = 100_000;
            n.max_replay = 100_000;
            n.client_publish = true;
            n.allow = vec![Sub, Pub, History];
        }),
    );
    c.namespaces.insert(
        "trim".into(),
        ns(|n| {
            n.history_size = 5;
            n.client_publish = true;
            n.allow = vec![Sub, Pub, History];
        }),
    );
    c
}

/// Starts a gateway with `config`.
pub async fn start(config: Config) -> RunningServer {
    // Quiet unless RUST_LOG asks for more.
    switchyard::telemetry::init(
        &switchyard::config::LogConfig {
            level: "warn".into(),
            json: false,
        },
        "test",
        None,
    );
    let gw = server::start(config).await.expect("gateway starts");
    // The engine connects and looks up its streams in the background.
    let broker = std::sync::Arc::clone(&gw.node.engine.broker);
    eventually(WAIT, "the node is ready with every stream", || {
        let state = broker.backbone();
        async move { (state.is_ready() && state.namespaces.is_empty()).then_some(()) }
    })
    .await;
    gw
}

/// A token for `user` with `caps`, valid for `ttl`.
pub fn token(user: &str, caps: &[&str], ttl: Duration) -> String {
    let caps: Vec<Capability> = caps.iter().map(|c| auth::parse_cap(c).unwrap()).collect();
    let mut c = config();
    c.auth.hmac_secret = SECRET.into();
    auth::mint(&c, user, ttl, caps).unwrap()
}

/// Signs arbitrary claims with `secret` (for malformed/expired/foreign tokens).
pub fn sign(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now() -> u64 {
    switchyard::clock::unix_now()
}

/// Claims for `user` expiring at `exp`, nothing else set.
pub fn claims(user: &str, exp: u64) -> Claims {
    Claims {
        sub: user.into(),
        exp,
        nbf: None,
        iat: None,
        jti: None,
        iss: None,
        aud: None,
        caps: vec![],
    }
}

/// Closes from the client side and waits for the server's close frame: the
/// closing handshake is complete when this returns.
pub async fn close_cleanly(mut c: Client) {
    c.ws.close(None).await.expect("close frame sent");
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 1000);
}

/// Capabilities of a chat user.
pub const CHAT_CAPS: &[&str] = &["chat.>=sub+pub+history+presence"];

/// Connects as `user` on `device`, with [`CHAT_CAPS`].
pub async fn connect_device(addr: SocketAddr, user: &str, device: &str) -> Client {
    let t = token(user, CHAT_CAPS, Duration::from_secs(600));
    try_connect_with(
        addr,
        &format!("?device={device}"),
        &[("authorization", &format!("Bearer {t}"))],
    )
    .await
    .expect("connection accepted")
}

/// A connected WebSocket client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    next_id: u64,
    /// Frames read while waiting for a reply; `recv` returns these first.
    stash: std::collections::VecDeque<Value>,
}

/// How a connection attempt was refused.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

pub async fn try_connect_with(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Client, Refused> {
    let mut req = format!("ws://{addr}/ws{query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
        Err(_) => panic!("connect timed out"),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            Err(Refused { status, body })
        }
        Ok(Err(e)) => panic!("connect failed: {e}"),
        Ok(Ok((ws, _))) => {
            let mut c = Client {
                ws,
                welcome: Value::Null,
                next_id: 1,
                stash: Default::default(),
            };
            let w = c.recv().await;
            assert_eq!(w["type"], "welcome", "first frame is welcome: {w}");
            c.welcome = w;
            Ok(c)
        }
    }
}

/// Connects through a socket with a small receive buffer, so a client that stops
/// reading backs up the server quickly instead of filling megabytes of kernel buffers.
pub async fn connect_slow(addr: SocketAddr, user: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    let t = token(user, &[], Duration::from_secs(3600));
    req.headers_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    let mut c = Client {
        ws,
        welcome: Value::Null,
        next_id: 1,
        stash: Default::default(),
    };
    c.welcome = c.recv().await;
    c
}

/// Connects with the token in the `Authorization` header.
pub async fn connect(addr: SocketAddr, token: &str) -> Client {
    try_connect_with(addr, "", &[("authorization", &format!("Bearer {token}"))])
        .await
        .expect("connection accepted")
}

/// Connects as `user` with `caps`, valid for an hour.
pub async fn connect_as(addr: SocketAddr, user: &str, caps: &[&str]) -> Client {
    connect(addr, &token(user, caps, Duration::from_secs(3600))).await
}

/// What a read produced.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Closed(Option<u16>, String),
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// Sends without failing when the server has already closed (floods).
    pub async fn try_send(&mut self, v: Value) -> bool {
        self.ws.send(Message::text(v.to_string())).await.is_ok()
    }

    /// Sends a request with a fresh `id` and returns the reply carrying that id.
    /// Other frames read meanwhile are returned too, and kept for `recv`.
    pub async fn request(&mut self, mut v: Value) -> (Value, Vec<Value>) {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.send(v).await;
        let mut others = Vec::new();
        loop {
            let f = match self.next_socket_event(WAIT).await {
                Some(Event::Frame(f)) => f,
                Some(Event::Closed(code, reason)) => {
                    panic!("closed ({code:?}, {reason}) while waiting for reply {id}")
                }
                None => panic!("no reply to request {id} within the wait"),
            };
            if f["id"] == json!(id) {
                self.stash.extend(others.iter().cloned());
                return (f, others);
            }
            others.push(f);
        }
    }

    /// Like `request`, expecting the reply type `kind`.
    pub async fn call(&mut self, v: Value, kind: &str) -> Value {
        let (reply, _) = self.request(v).await;
        assert_eq!(reply["type"], kind, "reply: {reply}");
        reply
    }

    /// The next event, within `WAIT`.
    pub async fn next_event(&mut self) -> Event {
        self.next_event_within(WAIT)
            .await
            .expect("an event within the wait")
    }

    /// The next event within `d`, or None on timeout.
    pub async fn next_event_within(&mut self, d: Duration) -> Option<Event> {
        if let Some(f) = self.stash.pop_front() {
            return Some(Event::Frame(f));
        }
        self.next_socket_event(d).await
    }

    async fn next_socket_event(&mut self, d: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(m) => m,
            };
            match m {
                None => return Some(Event::Closed(None, "stream ended".into())),
                Some(Err(e)) => return Some(Event::Closed(None, format!("error: {e}"))),
                Some(Ok(Message::Text(t))) => {
                    return Some(Event::Frame(
                        serde_json::from_str(&t).expect("server sends JSON"),
                    ))
                }
                Some(Ok(Message::Close(frame))) => {
                    // Complete the closing handshake, as a real client does.
                    let _ = self.ws.flush().await;
                    return Some(match frame {
                        Some(CloseFrame { code, reason }) => {
                            Event::Closed(Some(u16::from(code)), reason.to_string())
                        }
                        None => Event::Closed(None, String::new()),
                    });
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next JSON frame; panics on close.
    pub async fn recv(&mut self) -> Value {
        match self.next_event().await {
            Event::Frame(v) => v,
            Event::Closed(code, reason) => {
                panic!("closed ({code:?}, {reason}) while expecting a frame")
            }
        }
    }

    /// Reads until a frame of `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let f = self.recv().await;
            if f["type"] == kind {
                return f;
            }
        }
    }

    /// Reads until the close frame and returns its code; frames before it are returned too.
    pub async fn expect_close(&mut self) -> (u16, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match self.next_event().await {
                Event::Frame(v) => frames.push(v),
                Event::Closed(Some(code), _) => return (code, frames),
                Event::Closed(None, why) => panic!("connection ended without a close code: {why}"),
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.call(
            json!({"type": "subscribe", "channel": channel}),
            "subscribed",
        )
        .await
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> u64 {
        let r = self
            .call(
                json!({"type": "publish", "channel": channel, "data": data}),
                "published",
            )
            .await;
        r["seq"].as_u64().unwrap()
    }

    /// Proves the connection is alive and that everything before it was read.
    pub async fn ping(&mut self) -> Vec<Value> {
        let (reply, others) = self.request(json!({"type": "ping"})).await;
        assert_eq!(reply["type"], "pong");
        others
    }
}

/// A minimal HTTP/1.1 client: returns status and JSON body (Null when not JSON).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    http_on(&mut s, method, path, headers, body, true).await
}

/// Sends one request on an existing connection.
pub async fn http_on(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    close: bool,
) -> (u16, Value) {
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: test\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    if close {
        req.push_str("connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then exactly content-length bytes.
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("http reply")
            .unwrap();
        assert!(n > 0, "connection closed before the reply head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = buf[head_end..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") {
        // Go's net/http (nats-server monitoring) sends larger bodies chunked.
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                read_more(s, &mut rest).await;
            };
            let size = std::str::from_utf8(&rest[..line_end]).unwrap().trim();
            let size = usize::from_str_radix(size, 16).unwrap();
            while rest.len() < line_end + 2 + size + 2 {
                read_more(s, &mut rest).await;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest.drain(..line_end + 2 + size + 2);
            if size == 0 {
                break body;
            }
        }
    } else {
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while rest.len() < len {
            read_more(s, &mut rest).await;
        }
        rest.truncate(len);
        rest
    };
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, body)
}

/// The `seq`s of a `history` reply's publications (frame or API body).
pub fn publication_seqs(reply: &Value) -> Vec<u64> {
    reply["publications"]
        .as_array()
        .expect("a publications list")
        .iter()
        .map(|p| p["seq"].as_u64().expect("a seq"))
        .collect()
}

async fn read_more(s: &mut TcpStream, into: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
        .await
        .expect("http body")
        .unwrap();
    assert!(n > 0, "connection closed mid-body");
    into.extend_from_slice(&chunk[..n]);
}

/// Publishes through the server API.
pub async fn api_publish(addr: SocketAddr, channel: &str, data: Value) -> u64 {
    let body = json!({"channel": channel, "data": data}).to_string();
    let auth = format!("apikey {API_KEY}");
    let (status, v) = http(
        addr,
        "POST",
        "/api/v1/publish",
        &[("authorization", &auth)],
        Some(&body),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["seq"].as_u64().unwrap()
}

/// Waits until `GET path` on `addr` answers 200 (a process started in the background).
pub async fn wait_http(addr: SocketAddr, path: &str) {
    eventually(WAIT, &format!("{addr}{path}"), || async move {
        match tokio::time::timeout(Duration::from_secs(1), async {
            tokio::net::TcpStream::connect(addr).await.ok()?;
            Some(http(addr, "GET", path, &[], None).await.0)
        })
        .await
        {
            Ok(Some(200)) => Some(()),
            _ => None,
        }
    })
    .await;
}

/// A loopback port nothing listens on right now, and never handed out before in this
/// test process: a test that reserves a port for a server it starts later (Redis
/// coming back) must not find another test's server on it meanwhile.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A real `nats-server -js` on free loopback ports with a temporary store, stopped by PID.
pub struct NatsServer {
    child: Option<std::process::Child>,
    bin: String,
    conf: std::path::PathBuf,
    pub url: String,
    /// The monitoring endpoint (`/connz`, `/healthz`).
    pub monitor: SocketAddr,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts the binary named by `NATS_SERVER`, else `.venv/bin/nats-server` (installed
    /// by `make test`), else `nats-server` on the PATH.
    pub fn start() -> NatsServer {
        Self::start_with("")
    }

    /// Starts with extra lines in the server config (e.g. `authorization { ... }`).
    pub fn start_with(extra: &str) -> NatsServer {
        let server = Self::start_unready(extra);
        server.wait_jetstream();
        server
    }

    /// Blocks until JetStream answers on the monitoring port (a cluster needs its
    /// meta leader for that).
    pub fn wait_jetstream(&self) {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let healthy = std::net::TcpStream::connect(self.monitor).is_ok_and(|mut s| {
                let req = "GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
                let mut out = String::new();
                s.write_all(req.as_bytes()).is_ok()
                    && s.read_to_string(&mut out).is_ok()
                    && out.starts_with("HTTP/1.1 200")
            });
            if healthy {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "JetStream becomes available"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process and waits for "Server is ready", not for JetStream.
    pub fn start_unready(extra: &str) -> NatsServer {
        let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| {
            let local = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/nats-server");
            if std::path::Path::new(local).exists() {
                local.to_string()
            } else {
                "nats-server".to_string()
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let (port, http_port) = (free_port(), free_port());
        let conf = dir.path().join("nats.conf");
        let store = dir.path().join("js");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{http_port}\"\njetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 512MB }}\n{extra}\n",
                store.display()
            ),
        )
        .unwrap();
        let mut server = NatsServer {
            child: None,
            bin,
            conf,
            url: format!("nats://127.0.0.1:{port}"),
            monitor: SocketAddr::from(([127, 0, 0, 1], http_port)),
            _dir: dir,
        };
        server.restart();
        server
    }

    /// (Re)starts the server on the same port and store, and waits until it is ready.
    pub fn restart(&mut self) {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (make test installs it): {e}", self.bin));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        rx.recv_timeout(WAIT).expect("nats-server becomes ready");
        self.child = Some(child);
    }

    /// Stops the server (SIGTERM) and waits for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGCONT too: a test that failed while the server was paused must not
            // wait forever for a stopped process to take its SIGTERM.
            for sig in ["-TERM", "-CONT"] {
                let _ = std::process::Command::new("kill")
                    .args([sig, &child.id().to_string()])
                    .status();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl NatsServer {
    /// Kills the server (SIGKILL: a crash, not a goodbye) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    /// Returns once every thread of it is stopped (the signal is asynchronous).
    pub fn pause(&self) {
        self.signal("-STOP");
        let pid = self.child.as_ref().expect("the server runs").id();
        let stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().all(|t| {
                        std::fs::read_to_string(t.path().join("stat"))
                            .ok()
                            .and_then(|s| {
                                s.rsplit_once(')')
                                    .map(|(_, r)| r.trim_start().starts_with('T'))
                            })
                            .unwrap_or(false)
                    })
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + WAIT;
        while !stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server {pid} did not stop"
            );
            std::thread::yield_now();
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} {pid}");
    }
}

/// A real 3-server JetStream cluster on loopback (`server_name` n1..n3).
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three routed servers and waits until JetStream has a meta leader.
    pub fn start() -> NatsCluster {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let servers = (0..3)
            .map(|i| {
                NatsServer::start_unready(&format!(
                    "server_name: n{}\ncluster {{ name: sy, listen: \"127.0.0.1:{}\", routes: [{route_list}] }}",
                    i + 1,
                    routes[i]
                ))
            })
            .collect::<Vec<_>>();
        let cluster = NatsCluster { servers };
        for s in &cluster.servers {
            s.wait_jetstream();
        }
        cluster
    }

    /// Every server's client URL, comma-separated (the form `nats.url` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A node config on the NATS engine.
pub fn cluster_config(nats: &NatsServer, node: &str) -> Config {
    let mut c = config();
    c.engine.kind = switchyard::config::EngineKind::Nats;
    c.nats.url = nats.url.clone();
    c.server.node_id = node.to_string();
    c
}

/// A real `redis-server` on a free loopback port, without persistence unless asked,
/// stopped by PID.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` from the PATH (`.ci/run` installs Debian's package).
    pub fn start() -> RedisServer {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts with these arguments after the port, bind and directory.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            child: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart();
        server
    }

    /// (Re)starts on the same port, empty, and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (.ci/run installs it): {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if self.ping() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server becomes ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// Stops the server (SIGKILL: an outage, not a goodbye) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection for checking what the gateway wrote.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis primary and replica (both with AOF) watched by three real sentinels
/// (`redis-server --sentinel`) under the name `sy`.
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<std::process::Child>,
    pub sentinel_addrs: Vec<String>,
    _dir: tempfile::TempDir,
}

impl RedisSentinels {
    /// Starts them and waits until every sentinel knows the replica.
    pub async fn start() -> RedisSentinels {
        let primary = RedisServer::start_with(&["--appendonly", "yes", "--save", ""]);
        let primary_port = primary.port.to_string();
        let replica = RedisServer::start_with(&[
            "--appendonly",
            "yes",
            "--save",
            "",
            "--replicaof",
            "127.0.0.1",
            &primary_port,
        ]);
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_addrs = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor sy 127.0.0.1 {primary_port} 2\n\
                     sentinel down-after-milliseconds sy 500\nsentinel failover-timeout sy 3000\n\
                     sentinel parallel-syncs sy 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let child = std::process::Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server --sentinel starts");
            sentinels.push(child);
            sentinel_addrs.push(format!("127.0.0.1:{port}"));
        }
        let set = RedisSentinels {
            primary,
            replica,
            sentinels,
            sentinel_addrs,
            _dir: dir,
        };
        for addr in set.sentinel_addrs.clone() {
            eventually(WAIT, "a sentinel knows the replica", || {
                let addr = addr.clone();
                async move {
                    let client = redis::Client::open(format!("redis://{addr}")).ok()?;
                    let mut c = client.get_multiplexed_async_connection().await.ok()?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg("sy")
                        .query_async(&mut c)
                        .await
                        .ok()?;
                    (!replicas.is_empty()).then_some(())
                }
            })
            .await;
        }
        set
    }

    /// The primary the sentinels name now.
    pub async fn primary_port(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://{}", self.sentinel_addrs[0])).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("sy")
            .query_async(&mut c)
            .await
            .ok()?;
        Some(port)
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node config on NATS and Redis, with short presence timers.
pub fn redis_config(nats: &NatsServer, redis: &RedisServer, node: &str) -> Config {
    let mut c = cluster_config(nats, node);
    c.redis.url = redis.url.clone();
    c.redis.heartbeat_interval = Duration::from_millis(250);
    c.redis.presence_ttl = Duration::from_millis(1000);
    c.redis.ack_flush_interval = Duration::from_millis(100);
    c.redis.response_timeout = Duration::from_millis(500);
    c.redis.connect_timeout = Duration::from_millis(500);
    // Presence without acked cursors.
    c.namespaces.insert(
        "lobby".into(),
        ns(|n| {
            n.presence = true;
            n.allow = vec![
                switchyard::auth::Permission::Sub,
                switchyard::auth::Permission::Presence,
            ];
        }),
    );
    c
}

/// Calls the server API with the key; returns status and body.
pub async fn api(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    api_raw(addr, method, path, body.as_deref()).await
}

/// Calls the server API with the key and a body as given (not necessarily JSON).
pub async fn api_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let auth = format!("apikey {API_KEY}");
    http(addr, method, path, &[("authorization", &auth)], body).await
}

/// Polls `check` until it returns `Some`, failing after `within`. For state that
/// changes without an event the test can await (expiry, a restarted server).
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
