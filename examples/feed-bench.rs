//! `make bench-feed`: how many ticks/s the KuCoin connector and the gateway sustain.
//!
//! The exchange simulator runs in this process (pin it to CPU 1); one release node
//! (memory engine, the connector embedded) runs on CPU 0. BENCH_SYMBOLS symbols
//! (default 20) each tick BENCH_RATE times a second (default 500) for BENCH_SECS
//! seconds (default 10); one client subscribes to every price channel. Reported:
//! ticks the simulator sent, ticks the connector published (the node's
//! `switchyard_feed_ticks_total`), ticks the client received, and the node's CPU.
//!
//! BENCH_TARGET=nats measures `switchyard feed` instead: the connector as its own
//! process publishing through JetStream (nats-server from NATS_SERVER) to a node
//! (NATS engine) that delivers to the client; nats-server, feed and node share
//! CPU 0. It reports each one's CPU per tick, whether CPU 0 was saturated, and this
//! process's own CPU (the simulator and the client), flagged when it is the limit.
//! With BENCH_CALLGRIND=1 the feed runs under callgrind and the bench prints its
//! instructions per tick over the window (`make bench-feed-instructions`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use switchyard::feed::simulator::{Simulator, SimulatorOptions};
use tokio_tungstenite::tungstenite::Message;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/switchyard");

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Set once the figures are printed: the node going away after that is the bench's doing.
static DONE: AtomicBool = AtomicBool::new(false);

/// Why the client's connection ended, unless the bench is over.
fn ended(why: String) {
    if !DONE.load(Ordering::Relaxed) {
        eprintln!("{why}");
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

async fn published(addr: SocketAddr) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.lines()
        .find_map(|l| l.strip_prefix("switchyard_feed_ticks_total{source=\"kucoin\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A client (on this process's CPU) subscribed to every price channel through the
/// node at `addr`; counts the publications it receives, and says why its connection
/// ended if that happens before the bench stops the node.
async fn subscriber(addr: SocketAddr, symbols: &[String]) -> Arc<AtomicU64> {
    let token = {
        let cfg =
            switchyard::config::Config::load(Some(std::path::Path::new(CONFIG))).expect("config");
        switchyard::auth::mint(&cfg, "bench", Duration::from_secs(3600), vec![]).expect("token")
    };
    let ws = loop {
        let url = format!("ws://{addr}/ws?token={token}");
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(url).await {
            break ws;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (mut tx, mut rx) = ws.split();
    for s in symbols {
        let f = format!(r#"{{"type":"subscribe","channel":"prices.{s}"}}"#);
        tx.send(Message::text(f)).await.expect("subscribe");
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        let _tx = tx;
        loop {
            match rx.next().await {
                Some(Ok(Message::Text(t))) => {
                    if t.starts_with(r#"{"type":"msg""#) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(why))) => {
                    ended(format!("the client was closed by the node: {why:?}"));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    ended(format!("the client's connection failed: {e}"));
                    return;
                }
                None => {
                    ended("the client's connection ended".into());
                    return;
                }
            }
        }
    });
    received
}

#[tokio::main]
async fn main() {
    let n: usize = env("BENCH_SYMBOLS", 20);
    let rate: f64 = env("BENCH_RATE", 500.0);
    let secs: u64 = env("BENCH_SECS", 10);
    let symbols: Vec<String> = (0..n).map(|i| format!("SYM{i}-USDT")).collect();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let opts = SimulatorOptions {
        symbols: symbols.clone(),
        rate,
        ..SimulatorOptions::default()
    };
    let sim = Simulator::start(opts, any, any).await.expect("simulator");
    let port = std::net::TcpListener::bind(any)
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let list = format!("[{}]", symbols.join(","));
    if std::env::var("BENCH_TARGET").as_deref() == Ok("nats") {
        return nats(&sim, &symbols, &list, rate, secs).await;
    }
    let node = Kill(
        Command::new("taskset")
            .args(["-c", "0", BIN, "-c", CONFIG, "serve"])
            .env("SWITCHYARD_SERVER__LISTEN", addr.to_string())
            .env("SWITCHYARD_FEED__EMBEDDED", "true")
            .env("SWITCHYARD_FEED__SYNTHETIC__ENABLED", "false")
            .env("SWITCHYARD_FEED__KUCOIN__ENABLED", "true")
            .env("SWITCHYARD_FEED__KUCOIN__REST_URL", &sim.rest_url)
            .env("SWITCHYARD_FEED__KUCOIN__SYMBOLS", &list)
            .env("SWITCHYARD_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the release binary (make build)"),
    );
    let pid = node.0.id();
    let received = subscriber(addr, &symbols).await;
    // Warm up: the link is up and ticking.
    while published(addr).await == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = || sim.sent_on(0).len() as u64;
    let (sent0, pub0, recv0, cpu0, own0) = (
        sent(),
        published(addr).await,
        received.load(Ordering::Relaxed),
        cpu_secs(pid),
        cpu_secs(std::process::id()),
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (sent1, pub1, recv1, cpu1, own1) = (
        sent(),
        published(addr).await,
        received.load(Ordering::Relaxed),
        cpu_secs(pid),
        cpu_secs(std::process::id()),
    );
    println!("feed bench: {n} symbols x {rate}/s for {wall:.1} s; node on CPU 0 (memory engine, connector embedded)");
    println!(
        "exchange sent:        {:>9.0} ticks/s",
        (sent1 - sent0) as f64 / wall
    );
    println!(
        "connector published:  {:>9.0} ticks/s",
        (pub1 - pub0) as f64 / wall
    );
    println!(
        "client received:      {:>9.0} ticks/s",
        (recv1 - recv0) as f64 / wall
    );
    println!(
        "node CPU:             {:>9.2} s in {wall:.1} s ({:.0} ticks per CPU-second)",
        cpu1 - cpu0,
        (pub1 - pub0) as f64 / (cpu1 - cpu0).max(0.001)
    );
    generator(own1 - own0, wall);
    println!(
        "simulator connections: {} (1 = the link never dropped)",
        sim.connections()
    );
    DONE.store(true, Ordering::Relaxed);
}

/// This process's CPU (the simulator and the client, on CPU 1), flagged when it is the limit.
fn generator(secs: f64, wall: f64) {
    println!(
        "generator (simulator + client, CPU 1): {:.0} %{}",
        100.0 * secs / wall,
        if secs / wall > 0.8 {
            ": generator-bound, the figures are a lower bound"
        } else {
            ""
        }
    );
}

/// `switchyard feed` publishing through JetStream, and a node delivering to one
/// client: nats-server, the feed and the node share CPU 0.
async fn nats(sim: &Simulator, symbols: &[String], list: &str, rate: f64, secs: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    };
    let (nats_port, health_port, node_port) = (free(), free(), free());
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{nats_port}\"\njetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 1GB }}\n",
            dir.path().join("js").display()
        ),
    )
    .expect("nats config");
    let bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| ".venv/bin/nats-server".into());
    let nats_server = Kill(
        Command::new("taskset")
            .args(["-c", "0", &bin, "-c"])
            .arg(&conf)
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (make bench-feed-nats installs it)"),
    );
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node_addr = SocketAddr::from(([127, 0, 0, 1], node_port));
    let node = Kill(
        Command::new("taskset")
            .args(["-c", "0", BIN, "-c", CONFIG, "serve"])
            .env("SWITCHYARD_SERVER__LISTEN", node_addr.to_string())
            .env("SWITCHYARD_ENGINE__KIND", "nats")
            .env("SWITCHYARD_NATS__URL", &nats_url)
            .env("SWITCHYARD_FEED__EMBEDDED", "false")
            .env("SWITCHYARD_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("the release binary (make build)"),
    );
    let health = SocketAddr::from(([127, 0, 0, 1], health_port));
    // BENCH_CALLGRIND=1: the feed under callgrind, its instructions counted over the
    // measured window (instructions are repeatable on this VM where seconds are not).
    let callgrind = std::env::var("BENCH_CALLGRIND").as_deref() == Ok("1");
    let cg_out = dir.path().join("feed.cg");
    let mut feed_cmd = Command::new("taskset");
    feed_cmd.args(["-c", "0"]);
    if callgrind {
        feed_cmd
            .args(["valgrind", "--tool=callgrind"])
            .arg(format!("--callgrind-out-file={}", cg_out.display()));
    }
    let feed = Kill(
        feed_cmd
            .args([BIN, "-c", CONFIG, "feed"])
            .env("SWITCHYARD_ENGINE__KIND", "nats")
            .env("SWITCHYARD_NATS__URL", &nats_url)
            .env("SWITCHYARD_FEED__LISTEN", health.to_string())
            .env("SWITCHYARD_FEED__SYNTHETIC__ENABLED", "false")
            .env("SWITCHYARD_FEED__KUCOIN__ENABLED", "true")
            .env("SWITCHYARD_FEED__KUCOIN__REST_URL", &sim.rest_url)
            .env("SWITCHYARD_FEED__KUCOIN__SYMBOLS", list)
            .env("SWITCHYARD_LOG__LEVEL", "warn")
            .spawn()
            .expect("the release binary (make build)"),
    );
    let received = subscriber(node_addr, symbols).await;
    while published(health).await == 0 || received.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pids = [nats_server.0.id(), feed.0.id(), node.0.id()];
    let sent = || sim.sent_on(0).len() as u64;
    let cpu = || pids.map(cpu_secs);
    let dump = || {
        if callgrind {
            let _ = Command::new("callgrind_control")
                .args(["-d", &feed.0.id().to_string()])
                .stdout(Stdio::null())
                .status();
        }
    };
    // Zeroes the counters: the next dump holds the window only.
    dump();
    let (sent0, pub0, recv0, cpu0, own0) = (
        sent(),
        published(health).await,
        received.load(Ordering::Relaxed),
        cpu(),
        cpu_secs(std::process::id()),
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (sent1, pub1, recv1, cpu1, own1) = (
        sent(),
        published(health).await,
        received.load(Ordering::Relaxed),
        cpu(),
        cpu_secs(std::process::id()),
    );
    dump();
    let used: Vec<f64> = (0..3).map(|i| cpu1[i] - cpu0[i]).collect();
    let server: f64 = used.iter().sum();
    let ticks = (pub1 - pub0) as f64;
    println!(
        "feed bench (switchyard feed -> JetStream -> a node): {} symbols x {rate}/s for {wall:.1} s; nats-server, feed and node on CPU 0",
        symbols.len()
    );
    println!(
        "exchange sent:        {:>9.0} ticks/s",
        (sent1 - sent0) as f64 / wall
    );
    println!("connector published:  {:>9.0} ticks/s", ticks / wall);
    println!(
        "client received:      {:>9.0} ticks/s (the rest conflated: the node sends a client that falls behind the latest price)",
        (recv1 - recv0) as f64 / wall
    );
    for (name, secs) in ["nats-server", "feed", "node"].iter().zip(&used) {
        println!(
            "{:<21} {secs:>9.2} s CPU ({:.1} µs per tick)",
            format!("{name}:"),
            secs * 1e6 / ticks.max(1.0)
        );
    }
    println!(
        "CPU 0:                {:>8.0} % busy ({server:.2} s in {wall:.1} s){}",
        100.0 * server / wall,
        if server / wall > 0.9 {
            ": saturated"
        } else {
            ""
        }
    );
    generator(own1 - own0, wall);
    if callgrind {
        // The newest dump is the window's: `feed.cg.<n>`.
        let window = std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("feed.cg."))
            .max_by_key(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.rsplit('.').next().and_then(|n| n.parse::<u32>().ok())
            });
        let instructions: Option<u64> = window.and_then(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("summary: "))
                .and_then(|v| v.trim().parse().ok())
        });
        match instructions {
            Some(n) => println!(
                "feed instructions:    {n} for {} ticks (callgrind): {} per tick",
                pub1 - pub0,
                n / (pub1 - pub0).max(1)
            ),
            None => println!("feed instructions:    no callgrind dump found"),
        }
    }
    println!(
        "simulator connections: {} (1 = the link never dropped)",
        sim.connections()
    );
    DONE.store(true, Ordering::Relaxed);
}
