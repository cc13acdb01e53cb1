//! `BENCH_TARGET=personal` (`make bench-personal`): the shape of Centrifugo's
//! million-connection benchmark on a 3-node cluster (nats-server with JetStream,
//! redis-server for presence and three nodes, all on CPU 0; this generator on
//! CPU 1). Every connection
//! subscribes to its own channel (`bench.u<i>`) and to one 10-member group
//! channel (`bench.g<i/10>`, whose members sit on all three nodes); publications
//! go half to random personal channels (one delivery each), half to random groups
//! (ten each). Reported: deliveries per server CPU-second and latency (p50/p99),
//! every delivery checked for count and per-channel order, the nodes' memory per
//! connection, and per 10,000 channels a node holds: its memory, its tasks (the
//! nodes' `switchyard_tasks`) and the NATS subscriptions (from nats-server's
//! `/subsz`). `BENCH_LIVE_SUBSCRIPTION` (`namespace`, the default, or `channel`)
//! sets the namespace's `live_subscription`.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::latency::Latency;
use crate::raw_ws::{self, RawWs};
use crate::{micros, own_cpu_secs, Node};

/// Group channels have this many members.
const GROUP: usize = 10;
/// Publishing connections (on node 1), each pipelining its publishes.
const PUBLISHERS: usize = 4;

pub async fn run(nats_bin: &str, token: &str) {
    let conns = crate::env_num("BENCH_CONNS", 10_000) as usize;
    let rate = crate::env_num("BENCH_RATE", 2_000);
    let secs = crate::env_num("BENCH_SECS", 10);
    // How the nodes receive the namespace's live publications: one NATS subscription
    // per namespace (what a deployment of personal channels configures) or per channel.
    let live = std::env::var("BENCH_LIVE_SUBSCRIPTION").unwrap_or_else(|_| "namespace".into());
    // Presence in Redis, as a chat deployment runs: every connect registers the
    // connection, every subscribe joins the channel's presence.
    let (redis, redis_url) = Node::start_redis();
    let (nats, nodes) = crate::start_cluster(
        nats_bin,
        &[
            ("SWITCHYARD_NAMESPACES__BENCH__HISTORY_SIZE", "4".into()),
            ("SWITCHYARD_NAMESPACES__BENCH__PRESENCE", "true".into()),
            ("SWITCHYARD_REDIS__URL", redis_url),
            (
                "SWITCHYARD_NAMESPACES__BENCH__LIVE_SUBSCRIPTION",
                live.clone(),
            ),
        ],
    )
    .await;
    println!(
        "bench: personal and group channels: {conns} connections over 3 nodes, each on bench.u<i> and bench.g<i/{GROUP}>; nats-server, redis-server (presence) and the nodes on CPU 0, {rate} publications/s for {secs} s; live_subscription = \"{live}\""
    );
    let rss = || nodes.iter().map(|n| n.rss_kib()).sum::<u64>();
    let subs0 = nats_subscriptions(&nats).await;
    let tasks0 = tasks(&nodes).await;

    // Connect everyone first, then subscribe: memory per connection, then per channel.
    let rss0 = rss();
    let mut clients = Vec::with_capacity(conns);
    let mut pending = FuturesUnordered::new();
    let started = Instant::now();
    for i in 0..conns {
        let addr = nodes[i % 3].addr;
        let path = format!("/ws?token={token}");
        pending.push(async move { (i, RawWs::connect(addr, &path).await.expect("connect")) });
        if pending.len() >= 200 {
            clients.push(pending.next().await.expect("a connection"));
        }
    }
    while let Some(c) = pending.next().await {
        clients.push(c);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let rss1 = rss();
    let tasks1 = tasks(&nodes).await;
    // At most 200 connections subscribing at once (as the connects); a 113 (the
    // backbone did not confirm in time) is retried, and counted.
    let mut subscribers = Vec::with_capacity(conns);
    let mut retried = 0u64;
    let mut pending = FuturesUnordered::new();
    for (i, ws) in clients {
        pending.push(subscribe_both(i, ws));
        if pending.len() >= 200 {
            let (ws, r) = pending.next().await.expect("a subscriber");
            subscribers.push(ws);
            retried += r;
        }
    }
    while let Some((ws, r)) = pending.next().await {
        subscribers.push(ws);
        retried += r;
    }
    let subscribe_secs = started.elapsed().as_secs_f64() - connect_secs;
    let presence_keys = redis_keys(&redis).await;
    let rss2 = rss();
    let subs1 = nats_subscriptions(&nats).await;
    let tasks2 = tasks(&nodes).await;
    let channels = conns + conns.div_ceil(GROUP);
    // Every group has members on all three nodes; personal channels are on one.
    let channels_per_node = conns / 3 + conns.div_ceil(GROUP);

    // Readers: count, order per channel, latency; until 2 s pass without a frame
    // after the last publish was confirmed.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|ws| tokio::spawn(read(ws, std::sync::Arc::clone(&done))))
        .collect();

    // Publishers on node 1: paced, pipelined (replies read by their own task).
    let total = rate * secs;
    let each = || {
        let mut v = vec![nats.cpu_secs(), redis.cpu_secs()];
        v.extend(nodes.iter().map(|n| n.cpu_secs()));
        v
    };
    let cpu = || each().iter().sum::<f64>();
    let (each0, own0, t0) = (each(), own_cpu_secs(), Instant::now());
    let cpu0 = each0.iter().sum::<f64>();
    let mut expected = 0u64;
    let mut publishers = Vec::new();
    for _ in 0..PUBLISHERS {
        publishers.push(
            RawWs::connect(nodes[0].addr, &format!("/ws?token={token}"))
                .await
                .expect("connect"),
        );
    }
    let mut sent = [0u64; PUBLISHERS];
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    for k in 0..total {
        tokio::time::sleep_until((t0 + interval.mul_f64(k as f64)).into()).await;
        let (channel, deliveries) = if k % 2 == 0 {
            (format!("bench.u{}", fastrand::usize(..conns)), 1)
        } else {
            let g = fastrand::usize(..conns.div_ceil(GROUP));
            let members = (conns - g * GROUP).min(GROUP);
            (format!("bench.g{g}"), members as u64)
        };
        expected += deliveries;
        let frame = format!(
            r#"{{"type":"publish","channel":"{channel}","data":{{"t":{}}}}}"#,
            micros()
        );
        let j = k as usize % PUBLISHERS;
        publishers[j]
            .send(raw_ws::TEXT, frame.as_bytes())
            .await
            .expect("publish");
        sent[j] += 1;
    }
    let published_in = t0.elapsed().as_secs_f64();
    // The publishers' replies (queued by the node meanwhile): every publish confirmed.
    let mut confirmed = 0u64;
    for (p, n) in publishers.iter_mut().zip(sent) {
        let mut mine = 0;
        while mine < n {
            let (_, range) = tokio::time::timeout(Duration::from_secs(30), p.next())
                .await
                .expect("publish replies within 30 s")
                .expect("a reply");
            let reply = p.payload(range);
            assert!(
                raw_ws::find(reply, b"\"error\"").is_none(),
                "publish refused: {}",
                String::from_utf8_lossy(reply)
            );
            if raw_ws::find(reply, b"\"published\"").is_some() {
                mine += 1;
            }
        }
        confirmed += mine;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    // Deliveries: each reader stops after 2 s without a frame, once the publishing ended.
    let mut latency = Latency::new();
    let mut ordered = true;
    for r in readers {
        let (l, in_order) = r.await.expect("reader");
        latency.merge(&l);
        ordered &= in_order;
    }
    let wall = t0.elapsed().as_secs_f64() - 2.0;
    let server_cpu = cpu() - cpu0;
    let split: Vec<String> = each()
        .iter()
        .zip(&each0)
        .zip([
            "nats-server",
            "redis-server",
            "node 1 (publishing)",
            "node 2",
            "node 3",
        ])
        .map(|((now, then), name)| format!("{name} {:.2} s", now - then))
        .collect();
    let generator = own_cpu_secs() - own0;
    let delivered = latency.count();
    let ms = |us: u64| us as f64 / 1000.0;
    let kib_per = |kib: u64, n: usize| kib as f64 * 1024.0 / n as f64;
    println!("connections:                {conns} in {connect_secs:.2} s ({:.0}/s), nodes' RSS +{} KiB: {:.0} bytes per connection", conns as f64 / connect_secs, rss1 - rss0, kib_per(rss1 - rss0, conns));
    println!(
        "subscriptions:              {} in {subscribe_secs:.2} s, {retried} retried after 113 ({channels} channels, {channels_per_node} per node); nodes' RSS +{} KiB: {:.0} bytes per channel a node holds, {:.0} KiB per 10,000",
        2 * conns,
        rss2 - rss1,
        kib_per(rss2 - rss1, 3 * channels_per_node),
        (rss2 - rss1) as f64 / (3 * channels_per_node) as f64 * 10_000.0
    );
    println!(
        "per connection with both:   nodes' RSS +{} KiB over connecting and subscribing: {:.0} bytes per connection (its own share of the groups included)",
        rss2 - rss0,
        kib_per(rss2 - rss0, conns)
    );
    println!("Redis:                      {presence_keys} keys after the subscribes (presence and connection entries)");
    println!(
        "NATS subscriptions:         {subs0} -> {subs1} (+{} for {} channel-node pairs: {:.2} per channel a node holds, {:.0} per 10,000)",
        subs1.saturating_sub(subs0),
        3 * channels_per_node,
        subs1.saturating_sub(subs0) as f64 / (3 * channels_per_node) as f64,
        subs1.saturating_sub(subs0) as f64 / (3 * channels_per_node) as f64 * 10_000.0
    );
    println!(
        "tasks (nodes' runtimes):    {tasks0} -> {tasks1} connected ({:.2} per connection) -> {tasks2} subscribed (+{}: {:.2} per channel a node holds, {:.0} per 10,000)",
        tasks1.saturating_sub(tasks0) as f64 / conns as f64,
        tasks2.saturating_sub(tasks1),
        tasks2.saturating_sub(tasks1) as f64 / (3 * channels_per_node) as f64,
        tasks2.saturating_sub(tasks1) as f64 / (3 * channels_per_node) as f64 * 10_000.0
    );
    println!("published:                  {total} in {published_in:.2} s ({confirmed} confirmed)");
    println!(
        "deliveries:                 {delivered} of {expected} (in order per channel: {ordered})"
    );
    println!(
        "server CPU:                 {server_cpu:.2} s over {wall:.2} s ({:.0} % of CPU 0, 5 processes); generator {generator:.2} s ({:.0} % of CPU 1)",
        100.0 * server_cpu / wall,
        100.0 * generator / wall
    );
    println!("server CPU by process:      {}", split.join(", "));
    println!(
        "deliveries per CPU-second:  {:.0}; per second (wall): {:.0}",
        delivered as f64 / server_cpu.max(0.01),
        delivered as f64 / wall
    );
    println!(
        "publish->deliver latency:   p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(latency.quantile_us(0.5)),
        ms(latency.quantile_us(0.99)),
        ms(latency.max_us())
    );
    drop(nodes);
}

/// Subscribes connection `i` to its personal and its group channel; returns it and
/// how many subscribes were answered 113 and retried.
async fn subscribe_both(i: usize, mut ws: RawWs) -> (RawWs, u64) {
    let mut retried = 0;
    for channel in [format!("bench.u{i}"), format!("bench.g{}", i / GROUP)] {
        let frame = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
        'attempt: loop {
            ws.send(raw_ws::TEXT, frame.as_bytes()).await.expect("send");
            loop {
                let (_, range) = ws.next().await.expect("a reply");
                let reply = ws.payload(range);
                if raw_ws::find(reply, b"\"subscribed\"").is_some() {
                    break 'attempt;
                }
                if raw_ws::find(reply, b"\"code\":113").is_some() {
                    retried += 1;
                    continue 'attempt;
                }
                assert!(
                    raw_ws::find(reply, b"\"error\"").is_none(),
                    "subscribe refused: {}",
                    String::from_utf8_lossy(reply)
                );
            }
        }
    }
    (ws, retried)
}

/// Reads deliveries until `done` and then 2 s without one: latencies, and whether
/// each channel's seqs only grew.
async fn read(
    mut ws: RawWs,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Latency, bool) {
    let mut latency = Latency::new();
    let (mut last_user, mut last_group) = (0u64, 0u64);
    let mut ordered = true;
    loop {
        let range = match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some((_, range))) => range,
            Ok(None) => break,
            Err(_) if done.load(std::sync::atomic::Ordering::Relaxed) => break,
            Err(_) => continue,
        };
        let text = ws.payload(range);
        let (Some(sent), Some(seq)) = (
            raw_ws::number_after(text, b"\"t\":"),
            raw_ws::number_after(text, b"\"seq\":"),
        ) else {
            continue;
        };
        latency.record(micros().saturating_sub(sent));
        let last = if raw_ws::find(text, b"\"bench.u").is_some() {
            &mut last_user
        } else {
            &mut last_group
        };
        ordered &= seq > *last;
        *last = seq;
    }
    (latency, ordered)
}

/// nats-server's subscription count (`/subsz` on its monitoring port).
async fn nats_subscriptions(nats: &Node) -> u64 {
    let Some(monitor) = nats.monitor else {
        return 0;
    };
    let body = http_get(monitor, "/subsz").await;
    raw_ws::number_after(&body, b"\"num_subscriptions\": ").expect("num_subscriptions")
}

/// Tasks alive in the nodes' runtimes (`switchyard_tasks` on each `/metrics`).
async fn tasks(nodes: &[Node]) -> u64 {
    let mut sum = 0;
    for node in nodes {
        let body = http_get(node.addr, "/metrics").await;
        sum += raw_ws::number_after(&body, b"\nswitchyard_tasks ").expect("switchyard_tasks");
    }
    sum
}

/// The whole response (head and body) to a `GET` of `path`.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("request");
    let mut response = Vec::new();
    s.read_to_end(&mut response).await.expect("response");
    response
}

/// How many keys redis-server holds (`DBSIZE`).
async fn redis_keys(redis: &Node) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(redis.addr)
        .await
        .expect("redis-server");
    s.write_all(b"DBSIZE\r\n").await.expect("DBSIZE");
    let mut reply = [0u8; 64];
    let n = s.read(&mut reply).await.expect("a reply");
    std::str::from_utf8(&reply[..n])
        .ok()
        .and_then(|r| r.trim().strip_prefix(':')?.parse().ok())
        .expect("DBSIZE answers :N")
}
