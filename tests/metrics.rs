//! `/metrics` (docs/observability.md, "Metrics"), with real parts: nats-server,
//! redis-server, two gateway processes and a `switchyard feed` process, each with
//! its own registry. Traffic moves the counters and the publish→deliver histogram
//! by what was sent; refusals, slow consumers and rate limits are counted by code;
//! every exposition passes `promtool check metrics` (PROMTOOL, installed by
//! `make test`); and every series the Grafana dashboard and docs/alerts.yaml
//! query is exported.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sample of an exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition, with its text for promtool.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split("\",")
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("a number"),
            };
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        Scrape { text, samples }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Metric names as a query names them (a histogram's `_bucket`, `_sum`, `_count` too).
    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The family names declared by `# TYPE`.
    fn families(&self) -> BTreeSet<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(str::to_string)
            .collect()
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (status, text) = raw_get(stream, addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics on {addr}: {text}");
    Scrape::parse(text)
}

/// One HTTP/1.1 GET, the body as text (the exposition is not JSON).
async fn raw_get(mut stream: tokio::net::TcpStream, addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the response within WAIT")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    // hyper answers a known length here; a chunked body would need decoding.
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    (status, body.to_string())
}

/// `PROMTOOL`, else the one `make test` unpacks into .tools/.
fn promtool() -> String {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/prom/usr/bin/promtool").to_string()
    });
    assert!(
        std::path::Path::new(&bin).exists(),
        "promtool not found at {bin}: run `make test` (it installs it)"
    );
    bin
}

/// `promtool check metrics` of an exposition: no problem reported.
fn promtool_clean(scrape: &Scrape, what: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics of {what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn command(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args([
        "-c",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml"),
    ])
    .args(args)
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("SWITCHYARD_AUTH__HMAC_SECRET", SECRET)
    .env("SWITCHYARD_API__KEY", API_KEY)
    .env("SWITCHYARD_ENGINE__KIND", "nats")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A gateway process on nats + redis; `extra` adds variables.
async fn gateway(
    nats: &NatsServer,
    redis: &RedisServer,
    id: &str,
    extra: &[(&str, String)],
) -> (Proc, SocketAddr) {
    let port = free_port();
    let mut env = vec![
        ("SWITCHYARD_SERVER__LISTEN", format!("127.0.0.1:{port}")),
        ("SWITCHYARD_SERVER__NODE_ID", id.to_string()),
        ("SWITCHYARD_NATS__URL", nats.url.clone()),
        ("SWITCHYARD_REDIS__URL", redis.url.clone()),
        ("SWITCHYARD_FEED__EMBEDDED", "false".to_string()),
    ];
    env.extend(extra.iter().cloned());
    let child = Proc(
        command(&["serve"], &env)
            .spawn()
            .expect("switchyard starts"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_http(addr, "/readyz").await;
    (child, addr)
}

/// Every metric name a dashboard expression queries.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/switchyard/dashboards/switchyard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard's queries: {exprs:?}");
    exprs.iter().flat_map(|e| metric_names(e)).collect()
}

/// The `switchyard_*` names in a query text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchyard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// docs/alerts.yaml: `promtool check rules` passes; the series its rules query.
fn alert_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/alerts.yaml");
    let out = Command::new(promtool())
        .args(["check", "rules", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules docs/alerts.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Alert names are capitalised (`Switchyard…`): only series match.
    metric_names(&std::fs::read_to_string(path).unwrap())
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(list) => list.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_the_latency_histogram_follow_traffic_across_nodes() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let metrics_port = free_port();
    let (_a, a) = gateway(&nats, &redis, "metrics-a", &[]).await;
    let b_metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let (_b, b) = gateway(
        &nats,
        &redis,
        "metrics-b",
        &[("SWITCHYARD_METRICS__LISTEN", b_metrics.to_string())],
    )
    .await;

    // Before any traffic: every namespace's series exist at zero.
    let idle = scrape(a).await;
    promtool_clean(&idle, "an idle node");
    assert_eq!(
        idle.get("switchyard_publications_total", &[("namespace", "chat")]),
        0.0
    );
    assert_eq!(
        idle.get(
            "switchyard_build_info",
            &[
                ("engine", "nats"),
                ("role", "gateway"),
                ("version", env!("CARGO_PKG_VERSION"))
            ]
        ),
        1.0
    );
    // With metrics.listen, /metrics moves off the client port.
    assert_eq!(http(b, "GET", "/metrics", &[], None).await.0, 404);

    // Two subscribers on B; a resume from seq 0 with nothing stored replays nothing.
    let caps = CHAT_CAPS;
    let mut s1 = connect_as(b, "reader-1", caps).await;
    let mut s2 = connect_as(b, "reader-2", caps).await;
    s1.subscribe("chat.metrics").await;
    s2.subscribe("chat.metrics").await;

    // 20 from a client on A, 5 through A's API.
    let mut writer = connect_as(a, "writer", caps).await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(writer.publish("chat.metrics", json!({"i": i})).await);
    }
    for i in 20..25 {
        sent.push(api_publish(a, "chat.metrics", json!({"i": i})).await);
    }
    let mut frame_bytes = 0usize;
    for s in [&mut s1, &mut s2] {
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let m = s.recv_type("msg").await;
            frame_bytes += m.to_string().len();
            got.push(m["seq"].as_u64().unwrap());
        }
        assert_eq!(got, sent);
    }

    // A refused upgrade: counted by its auth code and its HTTP status.
    let refused = try_connect_with(a, "?token=not-a-jwt", &[]).await;
    assert_eq!(refused.err().map(|r| r.status), Some(401));

    let on_a = scrape(a).await;
    promtool_clean(&on_a, "the publishing node");
    assert_eq!(
        on_a.get("switchyard_auth_refusals_total", &[("code", "202")]),
        1.0
    );
    assert_eq!(
        on_a.get("switchyard_connections_refused_total", &[("status", "401")]),
        1.0
    );
    let chat = [("namespace", "chat")];
    assert_eq!(
        on_a.get(
            "switchyard_publications_total",
            &[("namespace", "chat"), ("source", "client")]
        ),
        20.0
    );
    assert_eq!(
        on_a.get(
            "switchyard_publications_total",
            &[("namespace", "chat"), ("source", "api")]
        ),
        5.0
    );
    assert_eq!(on_a.get("switchyard_publish_failures_total", &chat), 0.0);
    assert_eq!(
        on_a.get("switchyard_jetstream_publish_seconds_count", &chat),
        25.0,
        "one JetStream round trip per publication"
    );
    assert_eq!(
        on_a.get("switchyard_deliveries_total", &chat),
        0.0,
        "nobody reads on A"
    );
    assert_eq!(on_a.get("switchyard_connections", &[]), 1.0);
    assert_eq!(on_a.get("switchyard_connections_opened_total", &[]), 1.0);
    assert_eq!(on_a.get("switchyard_nats_up", &[]), 1.0);
    assert_eq!(on_a.get("switchyard_redis_up", &[]), 1.0);
    assert!(on_a.get("switchyard_redis_roundtrip_seconds_count", &[]) > 0.0);

    // B's sampled latencies are recorded after the socket write the clients read:
    // wait for the 25th (one per publication on this node, not one per recipient).
    let on_b = eventually(WAIT, "B's 25 latency samples", || async {
        let s = scrape(b_metrics).await;
        (s.get("switchyard_delivery_latency_seconds_count", &chat) == 25.0).then_some(s)
    })
    .await;
    promtool_clean(&on_b, "the delivering node");
    assert_eq!(on_b.get("switchyard_deliveries_total", &chat), 50.0);
    // The clients' frames re-serialised: compact JSON of the same length.
    assert_eq!(
        on_b.get("switchyard_delivered_bytes_total", &chat),
        frame_bytes as f64,
        "payload bytes of the 50 text frames"
    );
    assert_eq!(on_b.get("switchyard_subscriptions", &chat), 2.0);
    assert_eq!(on_b.get("switchyard_connections", &[]), 2.0);
    assert_eq!(
        on_b.get("switchyard_replay_publications_count", &chat),
        2.0,
        "two subscribes"
    );
    assert_eq!(on_b.get("switchyard_replay_publications_sum", &chat), 0.0);
    let le = |bound: &str| {
        on_b.get(
            "switchyard_delivery_latency_seconds_bucket",
            &[("namespace", "chat"), ("le", bound)],
        )
    };
    assert_eq!(le("+Inf"), 25.0);
    assert_eq!(le("10"), 25.0, "every delivery on loopback within 10 s");
    assert!(
        le("0.0005") <= le("0.001") && le("0.001") <= le("0.01"),
        "cumulative buckets"
    );
    assert_eq!(
        on_b.get("switchyard_publications_total", &chat),
        0.0,
        "B published nothing"
    );

    // A resume from seq 0 replays the 25; one from another stream incarnation
    // replays them too but is not recovered.
    let epoch = writer
        .call(
            json!({"type": "history", "channel": "chat.metrics", "limit": 1}),
            "history",
        )
        .await["position"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let mut late = connect_as(b, "late", caps).await;
    let since = |epoch: &str| json!({"type": "subscribe", "channel": "chat.metrics", "since": {"seq": 0, "epoch": epoch}});
    let reply = late.call(since(&epoch), "subscribed").await;
    assert_eq!(
        (reply["replayed"].as_u64(), reply["recovered"].as_bool()),
        (Some(25), Some(true)),
        "{reply}"
    );
    let mut other = connect_as(b, "other", caps).await;
    let reply = other.call(since("SY_CHAT@other"), "subscribed").await;
    assert_eq!(
        (reply["replayed"].as_u64(), reply["recovered"].as_bool()),
        (Some(25), Some(false)),
        "{reply}"
    );
    let on_b = scrape(b_metrics).await;
    assert_eq!(on_b.get("switchyard_replay_publications_count", &chat), 4.0);
    assert_eq!(on_b.get("switchyard_replay_publications_sum", &chat), 50.0);
    assert_eq!(on_b.get("switchyard_replays_unrecovered_total", &chat), 1.0);

    // A closed connection is counted by its code.
    close_cleanly(late).await;
    let on_b = eventually(WAIT, "the close on B", || async {
        let s = scrape(b_metrics).await;
        (s.get("switchyard_connections_closed_total", &[("code", "1000")]) == 1.0).then_some(s)
    })
    .await;

    // The feed process: its own registry, its ticks into JetStream.
    let feed_port = free_port();
    let feed_addr: SocketAddr = format!("127.0.0.1:{feed_port}").parse().unwrap();
    let _feed = Proc(
        command(
            &["feed"],
            &[
                ("SWITCHYARD_NATS__URL", nats.url.clone()),
                ("SWITCHYARD_FEED__LISTEN", feed_addr.to_string()),
                ("SWITCHYARD_FEED__SYNTHETIC__RATE", "50".to_string()),
            ],
        )
        .spawn()
        .expect("switchyard feed starts"),
    );
    wait_http(feed_addr, "/readyz").await;
    let feed = eventually(WAIT, "feed ticks published", || async {
        let s = scrape(feed_addr).await;
        (s.get(
            "switchyard_publications_total",
            &[("namespace", "prices"), ("source", "feed")],
        ) >= 10.0)
            .then_some(s)
    })
    .await;
    promtool_clean(&feed, "switchyard feed");
    let synthetic = [("source", "synthetic")];
    assert_eq!(feed.get("switchyard_feed_connected", &synthetic), 1.0);
    assert!(feed.get("switchyard_feed_ticks_total", &synthetic) >= 10.0);
    assert!(feed.get("switchyard_feed_last_tick_age_seconds", &synthetic) < 30.0);
    assert!(
        feed.get(
            "switchyard_jetstream_publish_seconds_count",
            &[("namespace", "prices")]
        ) >= 10.0
    );
    assert_eq!(feed.get("switchyard_build_info", &[("role", "feed")]), 1.0);
    assert!(
        !feed.families().contains("switchyard_deliveries_total"),
        "the feed delivers nothing and exports no delivery series"
    );

    // Every series the dashboard queries is exported by a gateway or the feed.
    let mut exported = on_a.names();
    exported.extend(on_b.names());
    exported.extend(feed.names());
    exported.extend(on_a.families());
    for (what, queried) in [
        ("the dashboard", dashboard_metrics()),
        ("docs/alerts.yaml", alert_metrics()),
    ] {
        let missing: Vec<_> = queried.iter().filter(|m| !exported.contains(*m)).collect();
        assert!(
            missing.is_empty(),
            "{what} queries unexported series: {missing:?}"
        );
    }
}

/// Acks JetStream never sends (it is frozen) are given up after
/// `nats.request_timeout`, answered 113, and leave the count of acks waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_given_up_leave_the_count_of_acks_waiting() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let timeout = [("SWITCHYARD_NATS__REQUEST_TIMEOUT", "500ms".to_string())];
    let (_gw, gw) = gateway(&nats, &redis, "acks", &timeout).await;
    let mut c = connect_as(gw, "writer", CHAT_CAPS).await;
    c.publish("chat.acks", json!("warm")).await;
    let waiting = |s: Scrape| s.get("switchyard_jetstream_acks_waiting", &[]);
    assert_eq!(waiting(scrape(gw).await), 0.0);

    nats.pause();
    for i in 0..10 {
        c.send(json!({"type": "publish", "id": i, "channel": "chat.acks", "data": i}))
            .await;
    }
    eventually(WAIT, "ten acks waiting", || async {
        (waiting(scrape(gw).await) == 10.0).then_some(())
    })
    .await;
    for i in 0..10 {
        let r = c.recv_type("error").await;
        assert_eq!((&r["id"], &r["code"]), (&json!(i), &json!(113)), "{r}");
    }
    assert_eq!(waiting(scrape(gw).await), 0.0, "given up, they left");

    // The acks JetStream sends once it runs again find nobody waiting; the next
    // publish is stored after them.
    nats.resume();
    c.publish("chat.acks", json!("after")).await;
    assert_eq!(waiting(scrape(gw).await), 0.0);
}

/// `switchyard_tasks` counts a live task per channel a node holds with the default
/// live subscription, and none with one subscription per namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_gauge_shows_what_a_held_channel_costs() {
    const CHANNELS: usize = 50;
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let namespace = [(
        "SWITCHYARD_NAMESPACES__CHAT__LIVE_SUBSCRIPTION",
        "namespace".to_string(),
    )];
    let mut grew = Vec::new();
    for (id, extra) in [("per-channel", &[][..]), ("per-namespace", &namespace[..])] {
        let (_gw, gw) = gateway(&nats, &redis, id, extra).await;
        let tasks = |s: Scrape| s.get("switchyard_tasks", &[]);
        let before = tasks(scrape(gw).await);
        assert!(before > 0.0, "{id}: the gauge is exported");
        let mut c = connect_as(gw, "reader", CHAT_CAPS).await;
        for i in 0..CHANNELS {
            c.subscribe(&format!("chat.{id}.{i}")).await;
        }
        grew.push(tasks(scrape(gw).await) - before);
    }
    assert!(
        grew[0] >= CHANNELS as f64,
        "a task per channel held: {grew:?}"
    );
    assert!(
        grew[1] < (CHANNELS / 2) as f64,
        "no task per channel with one subscription per namespace: {grew:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_slow_consumers_and_rate_limits_are_counted_by_code() {
    // In process: this test binary's registry is this node's alone (the other
    // test's nodes are processes of their own).
    let mut cfg = config();
    cfg.session.outbox_messages = 16;
    cfg.session.outbox_bytes = 64 << 10;
    cfg.session.rate_frames_per_sec = 1;
    cfg.session.rate_frames_burst = 2;
    cfg.session.rate_violations_before_close = 3;
    cfg.server.allowed_origins = vec!["https://app.example".into()];
    let gw = start(cfg).await;

    let bad = try_connect_with(gw.addr, "", &[("authorization", "Bearer not-a-jwt")]).await;
    assert_eq!(bad.err().map(|r| r.status), Some(401));
    let missing = try_connect_with(gw.addr, "", &[]).await;
    assert_eq!(missing.err().map(|r| r.status), Some(401));
    let t = token("u", &[], Duration::from_secs(3600));
    let origin = try_connect_with(
        gw.addr,
        "",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("origin", "https://evil.example"),
        ],
    )
    .await;
    assert_eq!(origin.err().map(|r| r.status), Some(403));

    // A client that floods past its rate limit: 110s, then 4009.
    let mut flood = connect_as(gw.addr, "flood", &[]).await;
    for _ in 0..10 {
        if !flood.try_send(json!({"type": "ping"})).await {
            break;
        }
    }
    let (code, _) = flood.expect_close().await;
    assert_eq!(code, 4009);

    // A client that stops reading while a channel it follows is busy: 4008.
    let mut slow = connect_slow(gw.addr, "slow").await;
    slow.subscribe("open.metrics").await;
    // 4 MiB unread: far past the 64 KiB outbox and the kernel's buffers.
    let pad = "x".repeat(4096);
    for _ in 0..1000 {
        api_publish(gw.addr, "open.metrics", json!({"pad": pad})).await;
    }
    let (code, _) = slow.expect_close().await;
    assert_eq!(code, 4008);
    let s = eventually(WAIT, "both closes counted", || async {
        let s = scrape(gw.addr).await;
        let closed = |code| s.get("switchyard_connections_closed_total", &[("code", code)]);
        (closed("4008") == 1.0 && closed("4009") == 1.0).then_some(s)
    })
    .await;
    promtool_clean(&s, "a node after refusals and closes");
    assert_eq!(
        s.get("switchyard_auth_refusals_total", &[("code", "202")]),
        1.0
    );
    assert_eq!(
        s.get("switchyard_auth_refusals_total", &[("code", "201")]),
        1.0
    );
    assert_eq!(
        s.get("switchyard_connections_refused_total", &[("status", "401")]),
        2.0
    );
    assert_eq!(
        s.get("switchyard_connections_refused_total", &[("status", "403")]),
        1.0
    );
    assert!(s.get("switchyard_rate_limited_total", &[]) >= 3.0);
    assert!(s.get("switchyard_deliveries_total", &[("namespace", "open")]) > 0.0);
    assert!(
        !s.families().contains("switchyard_nats_up"),
        "no NATS series on the memory engine"
    );
}
