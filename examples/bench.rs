//! `make bench`: load benchmark of one switchyard node (release binary, memory engine).
//!
//! The node runs as a child process pinned to CPU 0; this load generator should run
//! pinned to another CPU (`make bench` uses `taskset -c 1`). Measured from /proc:
//!
//! 1. idle memory: RSS growth per subscribed, idle connection (BENCH_IDLE_CONNS, default 10000),
//!    and the connection setup rate;
//! 2. fan-out: one publisher, BENCH_SUBS subscribers (default 1000) on one channel,
//!    BENCH_RATE publications/s (default 500) for BENCH_SECS seconds (default 6):
//!    deliveries per server CPU-second and publish→deliver latency (p50/p99/max),
//!    with a check that every subscriber received every publication in order.
//!
//! BENCH_NODE=host:port (with BENCH_NODE_PID) measures a node started elsewhere,
//! e.g. under a heap profiler, instead of starting one.
//!
//! Latency is measured on this process's clock from just before the publish frame is
//! written to when a subscriber task has read the frame, so it includes the load
//! generator's own scheduling delay: an upper bound for the server's share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use switchyard::config::Config;
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/switchyard");

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn micros() -> u64 {
    epoch().elapsed().as_micros() as u64
}

struct Node {
    /// None when attached to a node started elsewhere.
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
}

impl Node {
    fn start() -> Node {
        let mut child = Command::new("taskset")
            .args(["-c", "0", BIN, "--config", CONFIG, "serve"])
            .env("SWITCHYARD_SERVER__LISTEN", "127.0.0.1:0")
            .env("SWITCHYARD_SERVER__MAX_CONNECTIONS_PER_USER", "1000000")
            .env("SWITCHYARD_SESSION__OUTBOX_MESSAGES", "8192")
            .env("SWITCHYARD_SESSION__OUTBOX_BYTES", "8388608")
            .env("SWITCHYARD_SESSION__RATE_FRAMES_PER_SEC", "1000000")
            .env("SWITCHYARD_SESSION__RATE_FRAMES_BURST", "1000000")
            .env("SWITCHYARD_SESSION__IDLE_TIMEOUT", "600s")
            .env("SWITCHYARD_NAMESPACES__BENCH__CLIENT_PUBLISH", "true")
            .env("SWITCHYARD_NAMESPACES__BENCH__HISTORY_SIZE", "16")
            .env("SWITCHYARD_LOG__JSON", "true")
            .env("SWITCHYARD_LOG__LEVEL", "info")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the release binary (run `cargo build --release` first)");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "listening" {
                        let _ =
                            tx.send(v["fields"]["addr"].as_str().unwrap_or_default().to_string());
                    } else if v["level"] == "WARN" || v["level"] == "ERROR" {
                        eprintln!("node: {line}");
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("node reports its address")
            .parse()
            .expect("a socket address");
        Node {
            pid: child.id(),
            child: Some(child),
            addr,
        }
    }

    fn attach(addr: SocketAddr, pid: u32) -> Node {
        Node {
            child: None,
            pid,
            addr,
        }
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident set size in KiB.
    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU seconds so far.
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        // CLK_TCK is 100 on Linux.
        ticks as f64 / 100.0
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let url = format!("ws://{addr}/ws?token={token}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws
}

/// Reads until a frame containing `needle` arrives.
async fn read_until(ws: &mut Ws, needle: &str) {
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if t.contains(needle) {
                return;
            }
        }
    }
    panic!("connection ended while waiting for {needle}");
}

async fn subscribe(ws: &mut Ws, channel: &str) {
    let frame = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
    ws.send(Message::text(frame)).await.expect("send");
    read_until(ws, "\"subscribed\"").await;
}

/// The number after `key` in a frame, without parsing the JSON.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn idle_memory(node: &Node, token: &str, conns: usize) {
    let addr = node.addr;
    // One connection first, so runtime start-up allocations are not counted.
    let mut warm = connect(addr, token).await;
    subscribe(&mut warm, "bench.warm").await;
    let rss0 = node.rss_kib();
    let started = Instant::now();
    let mut all = Vec::with_capacity(conns);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in 0..conns {
        let token = token.to_string();
        pending.push(async move {
            let mut ws = connect(addr, &token).await;
            subscribe(&mut ws, &format!("bench.idle{}", i % 100)).await;
            ws
        });
        // At most 200 handshakes in flight.
        if pending.len() >= 200 {
            all.push(pending.next().await.expect("a connection"));
        }
    }
    while let Some(ws) = pending.next().await {
        all.push(ws);
    }
    let elapsed = started.elapsed();
    let rss1 = node.rss_kib();
    let per_conn = (rss1.saturating_sub(rss0) as f64 * 1024.0) / conns as f64;
    println!("idle connections:           {conns} subscribed (100 channels)");
    println!("connection setup:           {:.0} connections/s (connect + auth + welcome + subscribe, 200 in flight)", conns as f64 / elapsed.as_secs_f64());
    println!("node RSS:                   {rss0} KiB -> {rss1} KiB");
    println!(
        "RSS per idle connection:    {per_conn:.0} bytes ({:.2} KiB)",
        per_conn / 1024.0
    );
    drop(all);
    drop(warm);
}

async fn fan_out(node: &Node, token: &str, subs: usize, rate: u64, secs: u64) {
    let addr = node.addr;
    let total = rate * secs;
    let channel = "bench.fanout";
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..subs {
        let mut ws = connect(addr, token).await;
        subscribe(&mut ws, channel).await;
        let received = Arc::clone(&received);
        readers.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(total as usize);
            let mut last_seq = 0;
            let mut in_order = true;
            while (latencies.len() as u64) < total {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let (Some(sent), Some(seq)) =
                            (number_after(&t, "\"t\":"), number_after(&t, "\"seq\":"))
                        else {
                            continue;
                        };
                        latencies.push(micros().saturating_sub(sent) as u32);
                        in_order &= seq > last_seq;
                        last_seq = seq;
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
            (latencies, in_order)
        }));
    }

    let publisher = connect(addr, token).await;
    let (mut tx, mut rx) = publisher.split();
    let acks = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            match rx.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"published\"") => n += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        n
    });

    let cpu0 = node.cpu_secs();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for i in 0..total {
        // Paced on absolute time, so a late tick is caught up rather than lost.
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let frame = format!(
            r#"{{"type":"publish","channel":"{channel}","data":{{"t":{}}}}}"#,
            micros()
        );
        tx.send(Message::text(frame)).await.expect("publish");
    }
    let published = acks.await.expect("ack reader");
    let mut all: Vec<u32> = Vec::with_capacity((total as usize) * subs);
    let mut complete = 0;
    let mut ordered = true;
    for r in readers {
        let (lat, in_order) = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("subscribers finish")
            .expect("subscriber task");
        if lat.len() as u64 == total {
            complete += 1;
        }
        ordered &= in_order;
        all.extend(lat);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = node.cpu_secs() - cpu0;
    let deliveries = received.load(Ordering::Relaxed);
    all.sort_unstable();
    println!("fan-out:                    {published} publications x {subs} subscribers at {rate}/s for {secs}s");
    println!("deliveries:                 {deliveries} of {} ({complete}/{subs} subscribers complete, in order: {ordered})", total * subs as u64);
    println!("node CPU:                   {cpu:.2} s over {wall:.2} s wall");
    println!(
        "deliveries per CPU-second:  {:.0}",
        deliveries as f64 / cpu.max(0.01)
    );
    println!(
        "publish->deliver latency:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&all, 0.50) as f64 / 1000.0,
        percentile(&all, 0.99) as f64 / 1000.0,
        all.last().copied().unwrap_or(0) as f64 / 1000.0
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    epoch();
    let config =
        Config::load(Some(std::path::Path::new(CONFIG))).expect("the shipped config loads");
    let caps = vec![switchyard::auth::parse_cap("bench.>=sub+pub").expect("a valid capability")];
    let token =
        switchyard::auth::mint(&config, "bench", Duration::from_secs(3600), caps).expect("a token");

    let node = match std::env::var("BENCH_NODE") {
        // An already running node (e.g. under a profiler): BENCH_NODE=ADDR, BENCH_NODE_PID=PID.
        Ok(addr) => Node::attach(
            addr.parse().expect("BENCH_NODE is host:port"),
            env_num("BENCH_NODE_PID", 0) as u32,
        ),
        Err(_) => Node::start(),
    };
    println!(
        "switchyard bench: node pid {} on {} (CPU 0), load generator on this process",
        node.pid(),
        node.addr
    );
    idle_memory(&node, &token, env_num("BENCH_IDLE_CONNS", 10_000) as usize).await;
    fan_out(
        &node,
        &token,
        env_num("BENCH_SUBS", 1000) as usize,
        env_num("BENCH_RATE", 500),
        env_num("BENCH_SECS", 6),
    )
    .await;
}
