//! `make bench-redis`: what one connection costs Redis. Starts redis-server and
//! one release node (memory broker, Redis presence/cursors/control) on free ports,
//! then runs N clients (BENCH_CLIENTS, default 200) through four phases and prints
//! Redis `INFO commandstats` per phase, divided by the number of operations:
//!
//! 1. connect (and a ping, which proves the connection is registered);
//! 2. subscribe to a chat channel (presence, join/leave, acked cursors);
//! 3. BENCH_ACKS acks per client (default 50), until Redis holds the last;
//! 4. disconnect, until Redis holds no connection.
//!
//! Redis counts the commands scripts run inside it too (e.g. a presence join is one
//! EVALSHA round trip running HSET, ZADD, PEXPIRE inside); docs/architecture.md
//! says which are round trips.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/switchyard");

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

async fn reset(conn: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .expect("RESETSTAT");
}

fn report(phase: &str, ops: usize, stats: &BTreeMap<String, u64>) {
    let per: Vec<String> = stats
        .iter()
        .filter(|(name, _)| !name.starts_with("config") && !name.starts_with("hlen"))
        .map(|(name, calls)| format!("{name} {:.2}", *calls as f64 / ops as f64))
        .collect();
    println!("{phase:<11} commands per op: {}", per.join(", "));
}

async fn ping(ws: &mut Ws) {
    ws.send(Message::text(r#"{"type":"ping"}"#))
        .await
        .expect("send");
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if t.contains("\"pong\"") {
                return;
            }
        }
    }
    panic!("connection ended before pong");
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let acks: u64 = std::env::var("BENCH_ACKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().expect("temp dir");
    let redis_port = free_port();
    let _redis = Kill(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)"),
    );
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let mut conn = loop {
        if let Ok(c) = redis::Client::open(redis_url.as_str()) {
            if let Ok(conn) = c.get_multiplexed_async_connection().await {
                break conn;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _node = Kill(
        Command::new(BIN)
            .args(["-c", CONFIG, "serve"])
            .env("SWITCHYARD_SERVER__LISTEN", addr.to_string())
            .env("SWITCHYARD_REDIS__URL", &redis_url)
            // One heartbeat a minute keeps the node's refresh out of the phases.
            .env("SWITCHYARD_REDIS__HEARTBEAT_INTERVAL", "60s")
            .env("SWITCHYARD_REDIS__PRESENCE_TTL", "180s")
            .env("SWITCHYARD_SERVER__MAX_CONNECTIONS_PER_USER", "100000")
            .env("SWITCHYARD_LOG__LEVEL", "warn")
            .spawn()
            .expect("the release binary (make build)"),
    );
    wait_for("the node", async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let token = {
        let cfg =
            switchyard::config::Config::load(Some(std::path::Path::new(CONFIG))).expect("config");
        let caps = vec![switchyard::auth::parse_cap("chat.>=sub+pub+presence").expect("caps")];
        switchyard::auth::mint(&cfg, "bench", Duration::from_secs(3600), caps).expect("token")
    };
    println!("{clients} clients, {acks} acks each, redis-server {redis_port}, node {addr}");

    reset(&mut conn).await;
    let mut socks = Vec::with_capacity(clients);
    for i in 0..clients {
        let url = format!("ws://{addr}/ws?token={token}&device=d{i}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        ping(&mut ws).await;
        socks.push(ws);
    }
    report("connect", clients, &commandstats(&mut conn).await);

    reset(&mut conn).await;
    for (i, ws) in socks.iter_mut().enumerate() {
        let f = format!(r#"{{"type":"subscribe","channel":"chat.room.{}"}}"#, i % 10);
        ws.send(Message::text(f)).await.expect("send");
        ping(ws).await;
    }
    report("subscribe", clients, &commandstats(&mut conn).await);

    reset(&mut conn).await;
    for (i, ws) in socks.iter_mut().enumerate() {
        for seq in 1..=acks {
            let f = format!(
                r#"{{"type":"ack","channel":"chat.room.{}","seq":{seq}}}"#,
                i % 10
            );
            ws.send(Message::text(f)).await.expect("send");
        }
        ping(ws).await;
    }
    let last = format!("sy:cursor:bench:d{}", clients - 1);
    let channel = format!("chat.room.{}", (clients - 1) % 10);
    wait_for("the last cursor", async || {
        let v: Option<u64> = redis::cmd("HGET")
            .arg(&last)
            .arg(&channel)
            .query_async(&mut conn.clone())
            .await
            .unwrap_or(None);
        v == Some(acks)
    })
    .await;
    report(
        "ack",
        clients * acks as usize,
        &commandstats(&mut conn).await,
    );

    reset(&mut conn).await;
    for ws in &mut socks {
        let _ = ws.close(None).await;
    }
    drop(socks);
    wait_for("every connection gone from Redis", async || {
        let n: u64 = redis::cmd("HLEN")
            .arg("sy:user:bench")
            .query_async(&mut conn.clone())
            .await
            .unwrap_or(1);
        n == 0
    })
    .await;
    report("disconnect", clients, &commandstats(&mut conn).await);
}
