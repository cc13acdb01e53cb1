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
//! BENCH_TARGET=cluster runs the fan-out on a 3-node cluster (nats-server with
//! JetStream, all four processes on CPU 0): subscribers round-robin over the nodes,
//! the publisher on node 1, so most deliveries cross nodes (`make bench-cluster`).
//!
//! BENCH_TARGET=nats runs the same load against nats-server's own WebSocket
//! listener (NATS_SERVER names the binary; `make bench-nats` installs it), the
//! comparison our targets are phrased against. Subscribers speak NATS over
//! WebSocket; the publisher uses NATS over TCP.
//!
//! BENCH_TARGET=replay measures replay on the NATS engine (`make bench-replay`):
//! nats-server and two nodes on CPU 0; publications written through node A,
//! replayed to a subscriber on node B that resumes with `since`: 1,000 missed
//! publications (time from the `subscribe` frame to the last replayed `msg`,
//! BENCH_REPLAY_ROUNDS rounds), and a 100,000-publication catch-up (rate), with
//! the CPU of the servers and of this load generator.
//!
//! Latency is measured on this process's clock from just before the publish frame is
//! written to when a subscriber task has read the frame, so it includes the load
//! generator's own scheduling delay: an upper bound for the server's share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use switchyard::config::Config;
use tokio_tungstenite::tungstenite::Message;

mod ingest;
mod latency;
mod personal;
mod raw_ws;

use latency::Latency;
use raw_ws::RawWs;

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
    /// Where WebSocket clients connect.
    addr: SocketAddr,
    /// A store the process needs while it runs (JetStream).
    _dir: Option<tempfile::TempDir>,
    /// nats-server's monitoring endpoint (`/subsz`), when it has one.
    monitor: Option<SocketAddr>,
}

impl Node {
    /// A switchyard node pinned to CPU 0, with extra `SWITCHYARD_*` settings.
    fn start(env: &[(&str, String)]) -> Node {
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
            // Last, so a bench's own settings win.
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
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
            _dir: None,
            monitor: None,
        }
    }

    /// nats-server with a WebSocket listener, pinned to CPU 0; returns the node and its TCP address.
    fn start_nats(bin: &str, jetstream: bool) -> (Node, SocketAddr) {
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (tcp, ws, http) = (free_port(), free_port(), free_port());
        let dir = tempfile::tempdir().expect("a temp dir");
        let conf = dir.path().join("nats.conf");
        let js = if jetstream {
            format!(
                "jetstream {{ store_dir: \"{}\", max_memory_store: 256MB, max_file_store: 1GB }}\n",
                dir.path().join("js").display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            &conf,
            format!("listen: \"127.0.0.1:{tcp}\"\nhttp: \"127.0.0.1:{http}\"\nmax_connections: 100000\nwebsocket {{ listen: \"127.0.0.1:{ws}\", no_tls: true }}\n{js}"),
        )
        .expect("write nats.conf");
        let mut child = Command::new("taskset")
            .args(["-c", "0", bin, "-c"])
            .arg(&conf)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server (make bench-nats installs it)");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("nats-server becomes ready");
        let node = Node {
            pid: child.id(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], ws)),
            _dir: Some(dir),
            monitor: Some(SocketAddr::from(([127, 0, 0, 1], http))),
        };
        (node, SocketAddr::from(([127, 0, 0, 1], tcp)))
    }

    /// redis-server pinned to CPU 0, without persistence; its URL.
    fn start_redis() -> (Node, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("a temp dir");
        let child = Command::new("taskset")
            .args(["-c", "0", "redis-server", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--save", "", "--appendonly", "no", "--maxclients", "20000"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server listens"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let node = Node {
            pid: child.id(),
            child: Some(child),
            addr,
            _dir: Some(dir),
            monitor: None,
        };
        (node, format!("redis://{addr}"))
    }

    fn attach(addr: SocketAddr, pid: u32) -> Node {
        Node {
            child: None,
            pid,
            addr,
            _dir: None,
            monitor: None,
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

/// What is measured.
enum Target {
    Switchyard {
        token: String,
    },
    /// nats-server: WebSocket subscribers, a TCP publisher.
    Nats {
        tcp: SocketAddr,
    },
}

/// A subscribed client, reading deliveries through the allocation-free [`RawWs`].
struct Subscriber {
    ws: RawWs,
    /// NATS protocol bytes not yet parsed (NATS only; the frames are a byte stream).
    nats: Option<NatsStream>,
}

impl Subscriber {
    async fn open(target: &Target, addr: SocketAddr, channel: impl AsRef<str>) -> Subscriber {
        let channel = channel.as_ref();
        match target {
            Target::Switchyard { token } => {
                let mut ws = RawWs::connect(addr, &format!("/ws?token={token}"))
                    .await
                    .expect("connect");
                let frame = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
                ws.send(raw_ws::TEXT, frame.as_bytes()).await.expect("send");
                while let Some((_, payload)) = ws.next().await {
                    if raw_ws::find(ws.payload(payload), b"\"subscribed\"").is_some() {
                        return Subscriber { ws, nats: None };
                    }
                }
                panic!("no subscribed reply");
            }
            Target::Nats { .. } => {
                let mut ws = RawWs::connect(addr, "/").await.expect("connect");
                let hello = format!("CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {channel} 1\r\nPING\r\n");
                ws.send(raw_ws::BINARY, hello.as_bytes())
                    .await
                    .expect("send");
                let mut sub = Subscriber {
                    ws,
                    nats: Some(NatsStream {
                        buf: Vec::with_capacity(64 << 10),
                        start: 0,
                    }),
                };
                // The PONG proves the subscription is registered.
                loop {
                    match sub.next_nats().await {
                        Some(NatsLine::Pong) => return sub,
                        Some(_) => {}
                        None => panic!("no PONG from nats-server"),
                    }
                }
            }
        }
    }

    /// The next delivery as (publish time in µs, order key), or None when the connection ends.
    async fn next(&mut self) -> Option<(u64, u64)> {
        if self.nats.is_some() {
            loop {
                if let NatsLine::Msg(sent) = self.next_nats().await? {
                    // NATS has no sequence: the publish time orders the stream.
                    return Some((sent, sent));
                }
            }
        }
        loop {
            let (_, range) = self.ws.next().await?;
            let text = self.ws.payload(range);
            if let (Some(sent), Some(seq)) = (
                raw_ws::number_after(text, b"\"t\":"),
                raw_ws::number_after(text, b"\"seq\":"),
            ) {
                return Some((sent, seq));
            }
        }
    }

    /// The next NATS protocol item: a message's publish time, a PONG, or another line.
    async fn next_nats(&mut self) -> Option<NatsLine> {
        loop {
            let stream = self.nats.as_mut()?;
            let buf = &stream.buf[stream.start..];
            if let Some(end) = raw_ws::find(buf, b"\r\n") {
                let line = &buf[..end];
                if let Some(args) = line.strip_prefix(b"MSG ") {
                    let len_at = args.iter().rposition(|b| *b == b' ')? + 1;
                    let len = raw_ws::number_after(&args[len_at..], b"")? as usize;
                    let start = end + 2;
                    if buf.len() >= start + len + 2 {
                        let sent = raw_ws::number_after(&buf[start..start + len], b"\"t\":")?;
                        stream.consume(start + len + 2);
                        return Some(NatsLine::Msg(sent));
                    }
                } else {
                    let item = match line {
                        b"PONG" => NatsLine::Pong,
                        b"PING" => NatsLine::Ping,
                        _ => NatsLine::Other,
                    };
                    stream.consume(end + 2);
                    match item {
                        NatsLine::Ping => self.ws.send(raw_ws::BINARY, b"PONG\r\n").await.ok()?,
                        item => return Some(item),
                    }
                    continue;
                }
            }
            let (_, range) = self.ws.next().await?;
            self.nats
                .as_mut()?
                .buf
                .extend_from_slice(self.ws.payload(range));
        }
    }
}

/// NATS protocol bytes read but not yet parsed.
struct NatsStream {
    buf: Vec<u8>,
    start: usize,
}

impl NatsStream {
    /// Marks `n` bytes parsed; the buffer is reused once all of it is.
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }
}

/// What a NATS subscriber reads.
enum NatsLine {
    Msg(u64),
    Ping,
    Pong,
    Other,
}

/// Publishes `{"t": <µs>}` payloads.
enum Publisher {
    Switchyard {
        tx: futures_util::stream::SplitSink<Ws, Message>,
        acks: tokio::task::JoinHandle<u64>,
    },
    Nats(tokio::net::TcpStream),
}

impl Publisher {
    async fn open(target: &Target, addr: SocketAddr, total: u64) -> Publisher {
        match target {
            Target::Switchyard { token } => {
                let url = format!("ws://{addr}/ws?token={token}");
                let (ws, _) = tokio_tungstenite::connect_async(url)
                    .await
                    .expect("connect");
                let (tx, mut rx) = ws.split();
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
                Publisher::Switchyard { tx, acks }
            }
            Target::Nats { tcp } => {
                use tokio::io::AsyncWriteExt;
                let mut s = tokio::net::TcpStream::connect(tcp)
                    .await
                    .expect("connect to nats");
                s.set_nodelay(true).expect("nodelay");
                s.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
                    .await
                    .expect("connect");
                Publisher::Nats(s)
            }
        }
    }

    async fn publish(&mut self, channel: &str) {
        let t = micros();
        match self {
            Publisher::Switchyard { tx, .. } => {
                let frame =
                    format!(r#"{{"type":"publish","channel":"{channel}","data":{{"t":{t}}}}}"#);
                tx.send(Message::text(frame)).await.expect("publish");
            }
            Publisher::Nats(s) => {
                use tokio::io::AsyncWriteExt;
                let payload = format!(r#"{{"t":{t}}}"#);
                let msg = format!("PUB {channel} {}\r\n{payload}\r\n", payload.len());
                s.write_all(msg.as_bytes()).await.expect("publish");
            }
        }
    }

    /// Publications the server confirmed (NATS confirms none: the count sent).
    async fn finish(self, sent: u64) -> u64 {
        match self {
            Publisher::Switchyard { acks, .. } => acks.await.expect("ack reader"),
            Publisher::Nats(_) => sent,
        }
    }
}

async fn idle_memory(node: &Node, target: &Target, conns: usize) {
    let addr = node.addr;
    // One connection first, so runtime start-up allocations are not counted.
    let warm = Subscriber::open(target, addr, "bench.warm").await;
    let rss0 = node.rss_kib();
    let started = Instant::now();
    let mut all = Vec::with_capacity(conns);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in 0..conns {
        pending.push(Subscriber::open(
            target,
            addr,
            format!("bench.idle{}", i % 100),
        ));
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

/// One fan-out run's figures.
struct FanOut {
    rate: u64,
    subs: usize,
    published: u64,
    deliveries: u64,
    expected: u64,
    complete: usize,
    ordered: bool,
    /// CPU seconds of every server process (all on CPU 0).
    server_cpu: f64,
    /// CPU seconds of this load generator (on CPU 1).
    generator_cpu: f64,
    wall: f64,
    latency: Latency,
}

impl FanOut {
    /// The server processes share one core: at 90 % of it they are saturated.
    fn server_saturated(&self) -> bool {
        self.server_cpu / self.wall >= 0.9
    }

    /// A generator above 80 % of its core is (or is about to be) what limits the run.
    fn generator_bound(&self) -> bool {
        self.generator_cpu / self.wall >= 0.8
    }

    /// What limited the run, and what its figures are good for.
    fn verdict(&self) -> (&'static str, &'static str) {
        match (self.generator_bound(), self.server_saturated()) {
            (true, _) => (
                "generator-bound",
                "these figures are the load generator's, not the server's",
            ),
            (false, true) => (
                "server saturated",
                "compare latency at equal load, not per-CPU figures",
            ),
            (false, false) => (
                "below saturation",
                "deliveries per CPU-second is the cost figure",
            ),
        }
    }

    fn print(&self) {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "fan-out:                    {} publications x {} subscribers at {}/s",
            self.published, self.subs, self.rate
        );
        println!(
            "deliveries:                 {} of {} ({}/{} subscribers complete, in order: {})",
            self.deliveries, self.expected, self.complete, self.subs, self.ordered
        );
        println!(
            "server CPU:                 {:.2} s over {:.2} s wall ({:.0} % of CPU 0)",
            self.server_cpu,
            self.wall,
            100.0 * self.server_cpu / self.wall
        );
        println!(
            "load generator CPU:         {:.2} s ({:.0} % of CPU 1)",
            self.generator_cpu,
            100.0 * self.generator_cpu / self.wall
        );
        println!(
            "deliveries per second:      {:.0} (wall)",
            self.deliveries as f64 / self.wall
        );
        println!(
            "deliveries per CPU-second:  {:.0}",
            self.deliveries as f64 / self.server_cpu.max(0.01)
        );
        println!(
            "publish->deliver latency:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.latency.quantile_us(0.50)),
            ms(self.latency.quantile_us(0.99)),
            ms(self.latency.max_us())
        );
        let (limit, meaning) = self.verdict();
        println!("verdict:                    {limit}: {meaning}");
    }
}

/// The rates to sweep: BENCH_RATES (a comma list), else BENCH_RATE alone, else a
/// sweep from well below to past one core's saturation.
fn rates() -> Vec<u64> {
    if let Ok(list) = std::env::var("BENCH_RATES") {
        return list
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .expect("BENCH_RATES is a comma list of rates")
            })
            .collect();
    }
    match std::env::var("BENCH_RATE") {
        Ok(r) => vec![r.parse().expect("BENCH_RATE is a number")],
        Err(_) => vec![200, 500, 1000, 2000],
    }
}

/// Runs the fan-out at every rate, then prints the sweep as one table.
async fn sweep(nodes: &[&Node], procs: &[&Node], target: &Target, subs: usize, secs: u64) {
    let mut runs = Vec::new();
    for rate in rates() {
        let run = fan_out(nodes, procs, target, subs, rate, secs).await;
        run.print();
        runs.push(run);
    }
    if runs.len() < 2 {
        return;
    }
    println!("\nsweep ({subs} subscribers, {secs} s per rate):");
    println!("| pub/s | deliveries/s | server CPU | generator CPU | deliveries per CPU-s | p50 | p99 | max | complete | verdict |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "| {} | {:.0} | {:.0} % | {:.0} % | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} |",
            r.rate,
            r.deliveries as f64 / r.wall,
            100.0 * r.server_cpu / r.wall,
            100.0 * r.generator_cpu / r.wall,
            r.deliveries as f64 / r.server_cpu.max(0.01),
            ms(r.latency.quantile_us(0.5)),
            ms(r.latency.quantile_us(0.99)),
            ms(r.latency.max_us()),
            r.deliveries == r.expected && r.ordered,
            r.verdict().0
        );
    }
}

/// `nodes` serve the clients (subscribers round-robin, the publisher on the first);
/// `procs` are every server process whose CPU time counts.
async fn fan_out(
    nodes: &[&Node],
    procs: &[&Node],
    target: &Target,
    subs: usize,
    rate: u64,
    secs: u64,
) -> FanOut {
    let cpu_secs = || procs.iter().map(|p| p.cpu_secs()).sum::<f64>();
    let total = rate * secs;
    let channel = format!("bench.fanout{rate}");
    let mut readers = Vec::new();
    for i in 0..subs {
        let addr = nodes[i % nodes.len()].addr;
        let mut sub = Subscriber::open(target, addr, &channel).await;
        readers.push(tokio::spawn(async move {
            let mut latency = Latency::new();
            let mut last = 0;
            let mut in_order = true;
            while latency.count() < total {
                let Some((sent, key)) = sub.next().await else {
                    break;
                };
                latency.record(micros().saturating_sub(sent));
                in_order &= key > last;
                last = key;
            }
            (latency, in_order)
        }));
    }

    let mut publisher = Publisher::open(target, nodes[0].addr, total).await;
    let cpu0 = cpu_secs();
    let own0 = own_cpu_secs();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for i in 0..total {
        // Paced on absolute time, so a late tick is caught up rather than lost.
        let due = started + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        publisher.publish(&channel).await;
    }
    let published = publisher.finish(total).await;
    let mut latency = Latency::new();
    let mut complete = 0;
    let mut ordered = true;
    for r in readers {
        let (lat, in_order) = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("subscribers finish")
            .expect("subscriber task");
        if lat.count() == total {
            complete += 1;
        }
        ordered &= in_order;
        latency.merge(&lat);
    }
    FanOut {
        rate,
        subs,
        published,
        deliveries: latency.count(),
        expected: total * subs as u64,
        complete,
        ordered,
        server_cpu: cpu_secs() - cpu0,
        generator_cpu: own_cpu_secs() - own0,
        wall: started.elapsed().as_secs_f64(),
        latency,
    }
}

/// Writes `n` publications on `channel` through `writers` pipelined connections to `addr`.
async fn write_publications(
    target: &Target,
    addr: SocketAddr,
    channel: &str,
    n: u64,
    writers: u64,
) {
    let per = n / writers;
    let tasks = (0..writers).map(|_| async move {
        let mut p = Publisher::open(target, addr, per).await;
        for _ in 0..per {
            p.publish(channel).await;
        }
        assert_eq!(p.finish(per).await, per, "every publication acknowledged");
    });
    futures_util::future::join_all(tasks).await;
}

/// This process's user + system CPU seconds.
fn own_cpu_secs() -> f64 {
    Node::attach(SocketAddr::from(([127, 0, 0, 1], 0)), std::process::id()).cpu_secs()
}

/// Subscribes on `addr` from `since` and reads until `n` publications arrived, in
/// order; returns the time from the `subscribe` frame to the last one.
async fn replay(
    token: &str,
    addr: SocketAddr,
    channel: &str,
    since: u64,
    epoch: &str,
    n: u64,
) -> Duration {
    let url = format!("ws://{addr}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let frame = format!(
        r#"{{"type":"subscribe","channel":"{channel}","since":{{"seq":{since},"epoch":"{epoch}"}}}}"#
    );
    let started = Instant::now();
    ws.send(Message::text(frame)).await.expect("send");
    let mut got = 0u64;
    let mut last = since;
    while got < n {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("the replay ended after {got} of {n}");
        };
        // Only the seq is read: no JSON parse per publication on the generator.
        if t.starts_with(r#"{"type":"msg""#) {
            let seq = raw_ws::number_after(t.as_bytes(), b"\"seq\":").expect("a seq");
            assert!(seq > last, "in order: {seq} after {last}");
            last = seq;
            got += 1;
        } else if t.contains("\"subscribed\"") {
            if std::env::var("BENCH_DEBUG").is_ok() {
                eprintln!("subscribed after {:?}", started.elapsed());
            }
        } else if !t.contains("\"welcome\"") {
            panic!("unexpected frame: {t}");
        }
    }
    started.elapsed()
}

/// nats-server with JetStream and three nodes on it (`extra` settings each), all
/// on CPU 0, once every node is ready.
async fn start_cluster(nats_bin: &str, extra: &[(&str, String)]) -> (Node, Vec<Node>) {
    let (nats, tcp) = Node::start_nats(nats_bin, true);
    let url = format!("nats://{tcp}");
    let nodes: Vec<Node> = (1..=3)
        .map(|i| {
            let mut env = vec![
                ("SWITCHYARD_ENGINE__KIND", "nats".to_string()),
                ("SWITCHYARD_NATS__URL", url.clone()),
                ("SWITCHYARD_SERVER__NODE_ID", format!("node{i}")),
            ];
            env.extend(extra.iter().cloned());
            Node::start(&env)
        })
        .collect();
    for n in &nodes {
        wait_ready(n.addr).await;
    }
    (nats, nodes)
}

/// Waits until the node's `/readyz` answers 200 (its streams are looked up).
async fn wait_ready(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let req = "GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
            let mut head = [0u8; 12];
            if s.write_all(req.as_bytes()).await.is_ok()
                && s.read_exact(&mut head).await.is_ok()
                && head.ends_with(b"200")
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("node {addr} not ready within 30 s");
}

/// The stream epoch of `channel`, from a `history` reply on `addr`.
async fn epoch_of(token: &str, addr: SocketAddr, channel: &str) -> String {
    let url = format!("ws://{addr}/ws?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let frame = format!(r#"{{"type":"history","channel":"{channel}","limit":1}}"#);
    ws.send(Message::text(frame)).await.expect("send");
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if t.contains("\"history\"") {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                return v["position"]["epoch"]
                    .as_str()
                    .expect("an epoch")
                    .to_string();
            }
        }
    }
    panic!("no history reply");
}

async fn replay_bench(nats_bin: &str, token: String) {
    let (nats, tcp) = Node::start_nats(nats_bin, true);
    let url = format!("nats://{tcp}");
    let node = |id: &str| {
        Node::start(&[
            ("SWITCHYARD_ENGINE__KIND", "nats".into()),
            ("SWITCHYARD_NATS__URL", url.clone()),
            ("SWITCHYARD_SERVER__NODE_ID", id.into()),
            (
                "SWITCHYARD_NAMESPACES__BENCH__HISTORY_SIZE",
                "200000".into(),
            ),
            ("SWITCHYARD_NAMESPACES__BENCH__MAX_REPLAY", "200000".into()),
            ("SWITCHYARD_NAMESPACES__BENCH__HISTORY_TTL", "1h".into()),
            // The default outbox, as a client gets it.
            ("SWITCHYARD_SESSION__OUTBOX_MESSAGES", "1024".into()),
            ("SWITCHYARD_SESSION__OUTBOX_BYTES", "1048576".into()),
        ])
    };
    let (a, b) = (node("a"), node("b"));
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    let target = Target::Switchyard {
        token: token.clone(),
    };
    println!(
        "bench: replay on the nats engine: nats-server (pid {}) and nodes a (pid {}), b (pid {}) on CPU 0; written through a, replayed on b",
        nats.pid(),
        a.pid(),
        b.pid()
    );

    // 1,000 missed publications, resumed on the other node.
    let rounds = env_num("BENCH_REPLAY_ROUNDS", 20);
    let channel = "bench.missed";
    write_publications(&target, a.addr, channel, 1, 1).await;
    let epoch = epoch_of(&token, b.addr, channel).await;
    let mut since = 1u64;
    let mut times = Vec::new();
    for _ in 0..rounds {
        write_publications(&target, a.addr, channel, 1000, 1).await;
        times.push(replay(&token, b.addr, channel, since, &epoch, 1000).await);
        since += 1000;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "replay: 1000 missed publications on another node, {rounds} rounds: p50 {:.1} ms, max {:.1} ms (subscribe frame to the last msg)",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );

    // A 100,000-publication catch-up.
    let n = env_num("BENCH_CATCH_UP", 100_000);
    let channel = "bench.backlog";
    write_publications(&target, a.addr, channel, n, 10).await;
    let epoch = epoch_of(&token, b.addr, channel).await;
    let (b0, nats0) = (b.cpu_secs(), nats.cpu_secs());
    let own0 = own_cpu_secs();
    let took = replay(&token, b.addr, channel, 0, &epoch, n).await;
    let (node_cpu, nats_cpu) = (b.cpu_secs() - b0, nats.cpu_secs() - nats0);
    let own = own_cpu_secs() - own0;
    let secs = took.as_secs_f64();
    println!(
        "replay: {n}-publication catch-up on another node: {:.0} publications/s ({:.2} s); CPU: node b {:.2} s, nats-server {:.2} s, load generator {:.2} s ({:.0} % of one core){}",
        n as f64 / secs,
        secs,
        node_cpu,
        nats_cpu,
        own,
        100.0 * own / secs,
        if own / secs > 0.8 { " — the generator was the bottleneck" } else { "" }
    );
    drop(a);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    epoch();
    let config =
        Config::load(Some(std::path::Path::new(CONFIG))).expect("the shipped config loads");
    let caps =
        vec![switchyard::auth::parse_cap("bench.>=sub+pub+history").expect("a valid capability")];
    let token =
        switchyard::auth::mint(&config, "bench", Duration::from_secs(3600), caps).expect("a token");

    let nats_bin = std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let subs = env_num("BENCH_SUBS", 1000) as usize;
    let secs = env_num("BENCH_SECS", 6);
    match std::env::var("BENCH_TARGET").as_deref() {
        Ok("replay") => replay_bench(&nats_bin, token).await,
        Ok("ingest") => ingest::run(&nats_bin, &token, "bench-api-key").await,
        Ok("personal") => personal::run(&nats_bin, &token).await,
        Ok("nats") => {
            let (node, tcp) = Node::start_nats(&nats_bin, false);
            let target = Target::Nats { tcp };
            println!(
                "bench: nats-server (WebSocket listener), pid {} on {} (CPU 0)",
                node.pid(),
                node.addr
            );
            idle_memory(&node, &target, env_num("BENCH_IDLE_CONNS", 10_000) as usize).await;
            sweep(&[&node], &[&node], &target, subs, secs).await;
        }
        Ok("cluster") => {
            let (nats, nodes) = start_cluster(&nats_bin, &[]).await;
            let target = Target::Switchyard { token };
            println!(
                "bench: 3-node switchyard cluster on nats-server (JetStream), 4 processes on CPU 0; subscribers round-robin, publisher on node 1"
            );
            let refs: Vec<&Node> = nodes.iter().collect();
            let mut procs = refs.clone();
            procs.push(&nats);
            sweep(&refs, &procs, &target, subs, secs).await;
        }
        _ => {
            let node = match std::env::var("BENCH_NODE") {
                // An already running node (e.g. under a profiler): BENCH_NODE=ADDR, BENCH_NODE_PID=PID.
                Ok(addr) => Node::attach(
                    addr.parse().expect("BENCH_NODE is host:port"),
                    env_num("BENCH_NODE_PID", 0) as u32,
                ),
                Err(_) => Node::start(&[]),
            };
            let target = Target::Switchyard { token };
            println!(
                "bench: switchyard, pid {} on {} (CPU 0), load generator on this process",
                node.pid(),
                node.addr
            );
            idle_memory(&node, &target, env_num("BENCH_IDLE_CONNS", 10_000) as usize).await;
            sweep(&[&node], &[&node], &target, subs, secs).await;
        }
    }
}
