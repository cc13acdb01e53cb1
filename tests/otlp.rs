//! Traces across nodes, with real parts: nats-server, two switchyard processes
//! exporting over OTLP to a real collector (rotel), which forwards to
//! tests/tools/otlp_sink.py; and a node without the OTEL variables exports nothing
//! and runs no exporter thread. `make test` installs rotel and the sink's Python
//! packages into .venv/ and names them in ROTEL and OTLP_PYTHON.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const FRAME_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const QUIET_TRACE_ID: &str = "5c0ffee0000000000000000000000042";

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tool(var: &str, fallback: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/").to_string() + fallback;
        assert!(
            std::path::Path::new(&path).exists(),
            "{var} is not set and {path} is missing: run `make test` (it installs rotel and the sink)"
        );
        path
    })
}

/// The collector binary: `ROTEL`, else the one in .venv's rotel package.
fn rotel() -> String {
    if let Ok(path) = std::env::var("ROTEL") {
        return path;
    }
    let out = Command::new(tool("OTLP_PYTHON", "python"))
        .args([
            "-c",
            "import rotel, os; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "rotel is not installed in .venv: run `make test`"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A switchyard node process on the nats engine with `otel` variables.
async fn node(nats: &NatsServer, id: &str, otel: &[(&str, String)]) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args([
        "-c",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml"),
        "serve",
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("SWITCHYARD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
    .env("SWITCHYARD_SERVER__NODE_ID", id)
    .env("SWITCHYARD_ENGINE__KIND", "nats")
    .env("SWITCHYARD_NATS__URL", &nats.url)
    .env("SWITCHYARD_FEED__EMBEDDED", "false")
    .env("SWITCHYARD_AUTH__HMAC_SECRET", SECRET)
    .env("SWITCHYARD_API__KEY", API_KEY)
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    for (k, v) in otel {
        cmd.env(k, v);
    }
    let child = Proc(cmd.spawn().expect("the switchyard binary starts"));
    wait_http(format!("127.0.0.1:{port}").parse().unwrap(), "/readyz").await;
    (child, port)
}

fn threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        if let Ok(name) = std::fs::read_to_string(t.path().join("comm")) {
            names.push(name.trim().to_string());
        }
    }
    names
}

async fn spans_of(sink_port: u16, trace_id: &str) -> Vec<Value> {
    let addr = format!("127.0.0.1:{sink_port}").parse().unwrap();
    let path = format!("/spans?trace_id={trace_id}");
    match http(addr, "GET", &path, &[], None).await {
        (200, Value::Array(spans)) => spans,
        _ => Vec::new(),
    }
}

/// `{"n": n}` published on chat.room.traced through a node's API, with the caller's
/// span `CALLER_SPAN` of trace `trace_id` as `traceparent`; the reply.
async fn publish_traced(port: u16, trace_id: &str, n: u64) -> Value {
    let traceparent = format!("00-{trace_id}-{CALLER_SPAN}-01");
    let (status, reply) = http(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "POST",
        "/api/v1/publish",
        &[
            ("authorization", &format!("apikey {API_KEY}")),
            ("traceparent", &traceparent),
        ],
        Some(&json!({"channel": "chat.room.traced", "data": {"n": n}}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    reply
}

fn instance(span: &Value) -> &str {
    span["resource"]["service.instance.id"]["stringValue"]
        .as_str()
        .unwrap_or("")
}

#[tokio::test]
async fn a_publication_is_one_trace_across_nodes_through_a_real_collector() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (sink_grpc, sink_http) = (free_port(), free_port());
    let _sink = Proc(
        Command::new(tool("OTLP_PYTHON", "python"))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/otlp_sink.py"
            ))
            .args(["--grpc", &format!("127.0.0.1:{sink_grpc}")])
            .args(["--http", &format!("127.0.0.1:{sink_http}")])
            .args(["--out", dir.path().join("spans.jsonl").to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .expect("the sink starts"),
    );
    wait_http(
        format!("127.0.0.1:{sink_http}").parse().unwrap(),
        "/healthz",
    )
    .await;
    let (rotel_grpc, rotel_http) = (free_port(), free_port());
    let _rotel = Proc(
        Command::new(rotel())
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{rotel_grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{rotel_http}")])
            .args(["--exporter", "otlp"])
            .args([
                "--otlp-exporter-endpoint",
                &format!("http://127.0.0.1:{sink_grpc}"),
            ])
            .args([
                "--otlp-exporter-protocol",
                "grpc",
                "--batch-timeout",
                "200ms",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rotel starts"),
    );
    eventually(WAIT, "rotel's OTLP/HTTP port", || async move {
        std::net::TcpStream::connect(("127.0.0.1", rotel_http))
            .ok()
            .map(|_| ())
    })
    .await;
    eventually(WAIT, "rotel's OTLP/gRPC port", || async move {
        std::net::TcpStream::connect(("127.0.0.1", rotel_grpc))
            .ok()
            .map(|_| ())
    })
    .await;
    // Node A exports over http/protobuf (the default), node B over gRPC.
    let batch = ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string());
    let (a, a_port) = node(
        &nats,
        "node-a",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{rotel_http}"),
            ),
            batch.clone(),
        ],
    )
    .await;
    let (_b, b_port) = node(
        &nats,
        "node-b",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{rotel_grpc}"),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
            batch,
        ],
    )
    .await;
    assert!(
        threads(a.0.id())
            .iter()
            .any(|t| t.starts_with("OpenTelemetry")),
        "an exporter thread runs on A"
    );

    let b_addr = format!("127.0.0.1:{b_port}").parse().unwrap();
    let mut subscriber = connect_as(b_addr, "watcher", &["chat.>=sub"]).await;
    subscriber.subscribe("chat.room.traced").await;
    let a_addr = format!("127.0.0.1:{a_port}").parse().unwrap();
    let reply = publish_traced(a_port, TRACE_ID, 1).await;
    let msg = subscriber.recv_type("msg").await;
    assert_eq!(msg["seq"], reply["seq"]);
    // A client's publish frame carries its own traceparent.
    let mut publisher = connect_as(a_addr, "writer", &["chat.>=pub"]).await;
    let frame_trace = format!("00-{FRAME_TRACE_ID}-{CALLER_SPAN}-01");
    publisher
        .call(
            json!({"type": "publish", "channel": "chat.room.traced", "data": {"n": 2}, "traceparent": frame_trace}),
            "published",
        )
        .await;

    let started = Instant::now();
    let spans = eventually(
        Duration::from_secs(20),
        "spans from both nodes in the sink",
        || async move {
            let spans = spans_of(sink_http, TRACE_ID).await;
            let has = |node: &str, name: &str| {
                spans
                    .iter()
                    .any(|s| instance(s) == node && s["name"] == name)
            };
            (has("node-a", "api_publish")
                && has("node-a", "jetstream.publish")
                && has("node-b", "deliver"))
            .then_some(spans)
        },
    )
    .await;
    let find = |node: &str, name: &str| {
        spans
            .iter()
            .find(|s| instance(s) == node && s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span from {node} in {spans:#?}"))
    };
    let publish = find("node-a", "api_publish");
    assert_eq!(
        publish["parent_span_id"], CALLER_SPAN,
        "the caller's traceparent is the parent"
    );
    assert_eq!(
        publish["attributes"]["seq"]["intValue"],
        reply["seq"].to_string(),
        "{publish:#}"
    );
    assert_eq!(publish["attributes"]["namespace"]["stringValue"], "chat");
    let jetstream = find("node-a", "jetstream.publish");
    assert_eq!(jetstream["parent_span_id"], publish["span_id"]);
    let deliver = find("node-b", "deliver");
    assert_eq!(
        deliver["attributes"]["recipients"]["intValue"], "1",
        "{deliver:#}"
    );
    // B's delivery descends from A's publish span.
    let mut at = deliver;
    let mut chain = vec![at["name"].as_str().unwrap_or("")];
    while at["span_id"] != publish["span_id"] {
        at = spans
            .iter()
            .find(|s| s["span_id"] == at["parent_span_id"])
            .unwrap_or_else(|| {
                panic!("B's deliver span does not descend from A's publish: {chain:?}")
            });
        chain.push(at["name"].as_str().unwrap_or(""));
    }
    let frame_spans = eventually(WAIT, "the client publish's spans", || async move {
        let spans = spans_of(sink_http, FRAME_TRACE_ID).await;
        // The nodes export in their own batches: wait for both ends.
        let has = |name: &str| spans.iter().any(|s| s["name"] == name);
        (has("publish") && has("deliver")).then_some(spans)
    })
    .await;
    let client_publish = frame_spans
        .iter()
        .find(|s| s["name"] == "publish")
        .unwrap_or_else(|| panic!("no publish span: {frame_spans:#?}"));
    assert_eq!(client_publish["parent_span_id"], CALLER_SPAN);
    assert_eq!(
        client_publish["attributes"]["user"]["stringValue"],
        "writer"
    );
    // Node C makes no spans (no OTEL variables) but forwards the caller's context:
    // B's delivery continues the caller's trace, as the child of the caller's span.
    let (_c, c_port) = node(&nats, "node-c", &[]).await;
    publish_traced(c_port, QUIET_TRACE_ID, 3).await;
    assert_eq!(subscriber.recv_type("msg").await["data"]["n"], 2);
    assert_eq!(subscriber.recv_type("msg").await["data"]["n"], 3);
    let quiet = eventually(WAIT, "B's delivery of C's publication", || async move {
        let spans = spans_of(sink_http, QUIET_TRACE_ID).await;
        spans
            .iter()
            .any(|s| s["name"] == "deliver")
            .then_some(spans)
    })
    .await;
    assert!(
        quiet.iter().all(|s| instance(s) == "node-b"),
        "only B exports: {quiet:#?}"
    );
    let deliver = quiet
        .iter()
        .find(|s| s["name"] == "deliver")
        .expect("a deliver span");
    assert_eq!(deliver["parent_span_id"], CALLER_SPAN, "{deliver:#}");
    for s in &spans {
        assert_eq!(s["trace_id"], TRACE_ID);
        assert_eq!(s["resource"]["service.name"]["stringValue"], "switchyard");
    }
    eprintln!(
        "trace {TRACE_ID}: {} spans in {:?}: {}",
        spans.len(),
        started.elapsed(),
        spans
            .iter()
            .map(|s| format!(
                "{}@{} {:.2} ms",
                s["name"].as_str().unwrap_or(""),
                instance(s),
                (s["end_ns"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(s["start_ns"].as_u64().unwrap_or(0))) as f64
                    / 1e6
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[tokio::test]
async fn without_the_otel_variables_nothing_is_exported_and_no_exporter_thread_runs() {
    let nats = NatsServer::start();
    let (quiet, port) = node(&nats, "node-quiet", &[]).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, _) = http(
        addr,
        "POST",
        "/api/v1/publish",
        &[("authorization", &format!("apikey {API_KEY}"))],
        Some(&json!({"channel": "chat.room.quiet", "data": {}}).to_string()),
    )
    .await;
    assert_eq!(status, 200);
    let names = threads(quiet.0.id());
    assert!(!names.is_empty());
    assert!(
        !names.iter().any(|t| t.starts_with("OpenTelemetry")),
        "no exporter thread without OTEL_EXPORTER_OTLP_*: {names:?}"
    );
}
