//! `BENCH_TARGET=ingest` (`make bench-ingest`): publications/s into JetStream
//! through one node, beside the ceiling — the same nats-server's own JetStream
//! ingest, measured in the same run by a plain async-nats publisher keeping
//! `WINDOW` acks in flight. nats-server and the node share CPU 0; this generator
//! runs on CPU 1 and reports its own CPU.
//!
//! Through the node: 1, 10 and 1,000 WebSocket connections each sending publishes
//! without waiting (at most `WINDOW` unanswered per connection, 4,000 in all), and
//! `POST /api/v1/publish` from `API_CLIENTS` keep-alive HTTP connections. Latency
//! is send → reply (`published`, or the HTTP response) on this process's clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};

use crate::latency::Latency;
use crate::raw_ws::{self, RawWs};
use crate::{own_cpu_secs, wait_ready, Node};

/// Unanswered publishes per publisher (the gateway allows 256 per connection).
const WINDOW: usize = 256;
/// Concurrent HTTP connections for the API measurement.
const API_CLIENTS: usize = 32;
const PAYLOAD: &str =
    r#"{"v":"0123456789012345678901234567890123456789012345678901234567890123456789"}"#;

/// One measurement's figures.
struct Ingest {
    what: String,
    published: u64,
    wall: f64,
    server_cpu: f64,
    /// The node's share of `server_cpu` (none for the ceiling).
    node_cpu: f64,
    generator_cpu: f64,
    latency: Latency,
}

impl Ingest {
    fn rate(&self) -> f64 {
        self.published as f64 / self.wall
    }
}

pub async fn run(nats_bin: &str, token: &str, api_key: &str) {
    let (nats, tcp) = Node::start_nats(nats_bin, true);
    let node = Node::start(&[
        ("SWITCHYARD_ENGINE__KIND", "nats".into()),
        ("SWITCHYARD_NATS__URL", format!("nats://{tcp}")),
        ("SWITCHYARD_API__KEY", api_key.into()),
        (
            "SWITCHYARD_SESSION__RATE_BYTES_PER_SEC",
            "1000000000".into(),
        ),
        ("SWITCHYARD_NAMESPACES__BENCH__HISTORY_SIZE", "16".into()),
    ]);
    wait_ready(node.addr).await;
    let n = crate::env_num("BENCH_INGEST", 100_000);
    println!(
        "bench: ingest into JetStream (file store): nats-server (pid {}) and one node (pid {}) on CPU 0, this generator on CPU 1; {n} publications of {} bytes per measurement",
        nats.pid(),
        node.pid(),
        PAYLOAD.len()
    );
    let procs = [&nats, &node];
    // Unreported: a cold nats-server (a fresh file store, its first blocks, Go's
    // heap growing) measured up to 40 % slower in the first run than in the next.
    ceiling(&procs, tcp, n, Shape::Plain).await;
    through_node(&procs, node.addr, token, 1, n / 2).await;
    println!("ingest: (the runs above warmed nats-server and the node up; not reported)");
    let mut runs = vec![
        ceiling(&procs, tcp, n, Shape::Plain).await,
        ceiling(&procs, tcp, n, Shape::Node).await,
    ];
    for conns in [1usize, 10, 1000] {
        runs.push(through_node(&procs, node.addr, token, conns, n).await);
    }
    runs.push(through_api(&procs, node.addr, api_key, n / 2).await);
    // The ceiling once more: how far it drifted while the node's runs went.
    let mut again = ceiling(&procs, tcp, n, Shape::Plain).await;
    again.what = "nats-server alone, again (drift over the run)".into();
    runs.push(again);
    let (top, same) = (runs[0].rate(), runs[1].rate());
    println!("| path | publications/s | of the ceiling | of the node's message alone | p50 | p99 | server CPU | µs of CPU per publication: nats-server / node | generator CPU |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "| {} | {:.0} | {:.0} % | {:.0} % | {:.2} ms | {:.2} ms | {:.0} % | {:.1} / {:.1} | {:.0} %{} |",
            r.what,
            r.rate(),
            100.0 * r.rate() / top,
            100.0 * r.rate() / same,
            ms(r.latency.quantile_us(0.5)),
            ms(r.latency.quantile_us(0.99)),
            100.0 * r.server_cpu / r.wall,
            1e6 * (r.server_cpu - r.node_cpu) / r.published.max(1) as f64,
            1e6 * r.node_cpu / r.published.max(1) as f64,
            100.0 * r.generator_cpu / r.wall,
            if r.generator_cpu / r.wall >= 0.8 {
                " (generator-bound)"
            } else {
                ""
            }
        );
    }
}

/// Measures `work` (which returns how many it published and their latencies).
async fn measure<F: std::future::Future<Output = (u64, Latency)>>(
    what: String,
    procs: &[&Node],
    work: F,
) -> Ingest {
    let cpu = || procs.iter().map(|p| p.cpu_secs()).sum::<f64>();
    let (cpu0, node0, own0, started) = (cpu(), procs[1].cpu_secs(), own_cpu_secs(), Instant::now());
    let (published, latency) = work.await;
    println!(
        "ingest: {what}: {published} in {:.2} s ({:.0}/s), p99 {:.2} ms",
        started.elapsed().as_secs_f64(),
        published as f64 / started.elapsed().as_secs_f64(),
        latency.quantile_us(0.99) as f64 / 1000.0
    );
    Ingest {
        what,
        published,
        wall: started.elapsed().as_secs_f64(),
        server_cpu: cpu() - cpu0,
        node_cpu: procs[1].cpu_secs() - node0,
        generator_cpu: own_cpu_secs() - own0,
        latency,
    }
}

/// What the ceiling's publisher sends.
#[derive(Clone, Copy)]
enum Shape {
    /// The payload alone, no headers: the ceiling the targets are measured against.
    Plain,
    /// The message a node sends for one of these publishes: the same subject depth,
    /// `Sy-Ts` and `Sy-From` headers and the payload (engine/nats.rs `send`), so the
    /// difference from the node's rows is the gateway's own cost.
    Node,
}

/// nats-server alone: one async-nats connection, `WINDOW` acks in flight.
async fn ceiling(procs: &[&Node], tcp: SocketAddr, n: u64, shape: Shape) -> Ingest {
    let client = async_nats::connect(format!("nats://{tcp}"))
        .await
        .expect("connect to nats-server");
    let js = async_nats::jetstream::new(client);
    // The node provisioned SY_BENCH on `sy.bench.>`: the same stream, its own subject.
    let (what, subject) = match shape {
        Shape::Plain => (
            "nats-server alone (async-nats, 256 acks in flight)",
            "sy.bench.ceiling",
        ),
        Shape::Node => (
            "nats-server alone, the node's message (headers Sy-Ts, Sy-From)",
            "sy.bench.ceiling-headers",
        ),
    };
    measure(what.into(), procs, async {
        let mut latency = Latency::new();
        let mut inflight = FuturesOrdered::new();
        for _ in 0..n {
            if inflight.len() >= WINDOW {
                let us: u64 = inflight.next().await.expect("an ack in flight");
                latency.record(us);
            }
            let sent = Instant::now();
            let payload = bytes::Bytes::from_static(PAYLOAD.as_bytes());
            let ack = match shape {
                Shape::Plain => js.publish(subject, payload).await,
                Shape::Node => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(
                        "Sy-Ts",
                        itoa::Buffer::new().format(switchyard::clock::unix_ms()),
                    );
                    headers.insert("Sy-From", "bench");
                    js.publish_with_headers(subject, headers, payload).await
                }
            }
            .expect("publish");
            inflight.push_back(async move {
                ack.await.expect("an ack");
                sent.elapsed().as_micros() as u64
            });
        }
        while let Some(us) = inflight.next().await {
            latency.record(us);
        }
        (n, latency)
    })
    .await
}

/// `conns` WebSocket connections, each with `WINDOW` publishes unanswered at most.
async fn through_node(
    procs: &[&Node],
    addr: SocketAddr,
    token: &str,
    conns: usize,
    n: u64,
) -> Ingest {
    let per = (n / conns as u64).max(1);
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(
            RawWs::connect(addr, &format!("/ws?token={token}"))
                .await
                .expect("connect"),
        );
    }
    let what = format!(
        "node, {conns} connection(s), {} unanswered each",
        window(conns)
    );
    measure(what, procs, async {
        let tasks: FuturesUnordered<_> = clients
            .into_iter()
            .enumerate()
            .map(|(c, ws)| tokio::spawn(publish_frames(ws, c, per, window(conns))))
            .collect();
        let mut latency = Latency::new();
        let mut published = 0;
        for l in tasks.collect::<Vec<_>>().await {
            let l = l.expect("publisher task");
            published += l.count();
            latency.merge(&l);
        }
        (published, latency)
    })
    .await
}

/// Unanswered publishes per connection: `WINDOW`, but at most 4,000 over all of
/// them, below the 5,000 acks a node's NATS connection keeps in flight (past which
/// a publish waits, and after `nats.request_timeout` is answered 113).
fn window(conns: usize) -> usize {
    WINDOW.min(4000 / conns).max(1)
}

async fn publish_frames(mut ws: RawWs, c: usize, n: u64, window: usize) -> Latency {
    let channel = format!("bench.ingest{}", c % 100);
    let mut latency = Latency::new();
    let mut sent_at = std::collections::VecDeque::with_capacity(window);
    let mut sent = 0u64;
    while latency.count() < n {
        while sent < n && sent_at.len() < window {
            let frame = format!(r#"{{"type":"publish","channel":"{channel}","data":{PAYLOAD}}}"#);
            ws.send(raw_ws::TEXT, frame.as_bytes()).await.expect("send");
            sent_at.push_back(Instant::now());
            sent += 1;
        }
        let (_, range) = ws.next().await.expect("a reply");
        let reply = ws.payload(range);
        if raw_ws::find(reply, b"\"published\"").is_some() {
            let at = sent_at.pop_front().expect("a publish in flight");
            latency.record(at.elapsed().as_micros() as u64);
        } else if raw_ws::find(reply, b"\"error\"").is_some() {
            panic!("publish refused: {}", String::from_utf8_lossy(reply));
        }
    }
    latency
}

/// `POST /api/v1/publish` from `API_CLIENTS` keep-alive connections, one request at a time each.
async fn through_api(procs: &[&Node], addr: SocketAddr, key: &str, n: u64) -> Ingest {
    let per = n / API_CLIENTS as u64;
    let what = format!("node, POST /api/v1/publish, {API_CLIENTS} keep-alive connections");
    measure(what, procs, async {
        let tasks: FuturesUnordered<_> = (0..API_CLIENTS)
            .map(|c| tokio::spawn(api_client(addr, key.to_string(), c, per)))
            .collect();
        let mut latency = Latency::new();
        for l in tasks.collect::<Vec<_>>().await {
            latency.merge(&l.expect("api task"));
        }
        (latency.count(), latency)
    })
    .await
}

async fn api_client(addr: SocketAddr, key: String, c: usize, n: u64) -> Latency {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let body = format!(r#"{{"channel":"bench.api{c}","data":{PAYLOAD}}}"#);
    let req = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: apikey {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut latency = Latency::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..n {
        let sent = Instant::now();
        s.write_all(req.as_bytes()).await.expect("request");
        // One response per request: read until its body (a JSON object) is complete.
        let mut have = 0;
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[have..]))
                .await
                .expect("a response within 10 s")
                .expect("read");
            assert!(got > 0, "the node closed the API connection");
            have += got;
            if let Some(head) = raw_ws::find(&buf[..have], b"\r\n\r\n") {
                assert!(
                    buf.starts_with(b"HTTP/1.1 200"),
                    "{}",
                    String::from_utf8_lossy(&buf[..have])
                );
                let len =
                    raw_ws::number_after(&buf[..head], b"content-length: ").expect("a length");
                if have >= head + 4 + len as usize {
                    break;
                }
            }
        }
        latency.record(sent.elapsed().as_micros() as u64);
    }
    latency
}
