//! Attacker and strict-client input (issue 9): idempotency scoped to a channel,
//! header-safe identifiers, bounded nesting, a strict HTTP API and handshake.
//! Engine-dependent cases run on the memory engine and on a real nats-server.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::server::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A node on each engine: the memory engine, and NATS (with the server kept alive).
async fn each_engine() -> Vec<(&'static str, RunningServer, Option<NatsServer>)> {
    let nats = NatsServer::start();
    let on_nats = start(cluster_config(&nats, "n1")).await;
    vec![
        ("memory", start(config()).await, None),
        ("nats", on_nats, Some(nats)),
    ]
}

async fn api_publish_raw(addr: SocketAddr, body: Value) -> (u16, Value) {
    api(addr, "POST", "/api/v1/publish", Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_id_deduplicates_per_channel_not_per_namespace() {
    for (engine, gw, _nats) in each_engine().await {
        let mut c = connect_as(gw.addr, "pub", &[]).await;
        let frame = |channel: &str| json!({"type": "publish", "channel": channel, "data": {"on": channel}, "msg_id": "X"});
        let one = c.call(frame("open.room-one"), "published").await;
        let two = c.call(frame("open.room-two"), "published").await;
        assert_eq!(two["duplicate"], false, "{engine}: another channel: {two}");
        assert_ne!(two["seq"], one["seq"], "{engine}");
        let again = c.call(frame("open.room-two"), "published").await;
        assert_eq!(
            (&again["seq"], &again["duplicate"]),
            (&two["seq"], &json!(true)),
            "{engine}: a repeat on the same channel"
        );
        // The API shares the scope: "X" on a third channel is new, on the first a repeat.
        let (s, three) = api_publish_raw(
            gw.addr,
            json!({"channel": "open.room-three", "data": 3, "msg_id": "X"}),
        )
        .await;
        assert_eq!((s, &three["duplicate"]), (200, &json!(false)), "{engine}");
        let (_, first) = api_publish_raw(
            gw.addr,
            json!({"channel": "open.room-one", "data": 1, "msg_id": "X"}),
        )
        .await;
        assert_eq!(
            (&first["seq"], &first["duplicate"]),
            (&one["seq"], &json!(true)),
            "{engine}"
        );
        // Broadcast with one msg_id: new on a fresh channel, a repeat where it was used.
        let (s, b) = api(
            gw.addr,
            "POST",
            "/api/v1/broadcast",
            Some(
                json!({"channels": ["open.room-one", "open.room-four"], "data": 4, "msg_id": "X"}),
            ),
        )
        .await;
        assert_eq!(s, 200, "{engine}: {b}");
        assert_eq!(b["results"][0]["duplicate"], true, "{engine}: {b}");
        assert_eq!(b["results"][0]["seq"], one["seq"], "{engine}");
        assert_eq!(b["results"][1]["duplicate"], false, "{engine}: {b}");
        // The subscriber of room-two received its publication: nothing was suppressed.
        let mut reader = connect_as(gw.addr, "reader", &[]).await;
        let (h, _) = reader
            .request(json!({"type": "history", "channel": "open.room-two"}))
            .await;
        assert_eq!(
            publication_seqs(&h),
            vec![two["seq"].as_u64().unwrap()],
            "{engine}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_identifiers_are_refused_and_nothing_breaks() {
    for (engine, gw, _nats) in each_engine().await {
        let mut c = connect_as(gw.addr, "pub", &[]).await;
        for bad in [
            "a\r\nb",
            "a\nb",
            "a\rb",
            "",
            "a b",
            "é",
            &"x".repeat(10_000),
        ] {
            let (r, _) = c
                .request(
                    json!({"type": "publish", "channel": "open.crlf", "data": 1, "msg_id": bad}),
                )
                .await;
            assert_eq!(
                (&r["type"], &r["code"]),
                (&json!("error"), &json!(103)),
                "{engine}: frame msg_id {bad:?}: {r}"
            );
            let (s, b) = api_publish_raw(
                gw.addr,
                json!({"channel": "open.crlf", "data": 1, "msg_id": bad}),
            )
            .await;
            assert_eq!(
                (s, &b["code"]),
                (400, &json!(103)),
                "{engine}: API msg_id {bad:?}: {b}"
            );
            let (s, b) = api(
                gw.addr,
                "POST",
                "/api/v1/broadcast",
                Some(json!({"channels": ["open.crlf"], "data": 1, "msg_id": bad})),
            )
            .await;
            assert_eq!(
                (s, &b["code"]),
                (400, &json!(103)),
                "{engine}: broadcast {bad:?}"
            );
        }
        // The reader is alive: it answers pings and publishes.
        c.ping().await;
        c.subscribe("open.crlf").await;
        let seq = c.publish("open.crlf", json!("after")).await;
        assert_eq!(c.recv_type("msg").await["seq"], seq, "{engine}");
        // Nothing of the refused publishes was stored.
        let (h, _) = c
            .request(json!({"type": "history", "channel": "open.crlf"}))
            .await;
        assert_eq!(publication_seqs(&h), vec![seq], "{engine}");

        // A token whose `sub` has a CR or LF is refused before the upgrade.
        for sub in ["eve\r\nSy-From: admin", "eve\n", "", "e v e"] {
            let t = sign(&claims(sub, now() + 60), SECRET);
            let refused =
                try_connect_with(gw.addr, "", &[("authorization", &format!("Bearer {t}"))])
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{engine}: sub {sub:?} accepted"));
            assert_eq!(
                (refused.status, &refused.body["code"]),
                (401, &json!(207)),
                "{engine}: sub {sub:?}"
            );
        }
        // A device id with a control character is refused with 400, not ignored.
        let t = token("dev", &[], Duration::from_secs(60));
        let refused = try_connect_with(
            gw.addr,
            "?device=phone%0D%0A1",
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await
        .err()
        .expect("a CR/LF device is refused");
        assert_eq!((refused.status, &refused.body["code"]), (400, &json!(103)));
        let long = "d".repeat(129);
        let refused = try_connect_with(
            gw.addr,
            &format!("?device={long}"),
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await
        .err()
        .expect("a 129-byte device is refused");
        assert_eq!(refused.status, 400);
        // The API refuses a bad device for disconnect as well.
        let (s, b) = api(
            gw.addr,
            "POST",
            "/api/v1/users/dev/disconnect",
            Some(json!({"device": "a\nb"})),
        )
        .await;
        assert_eq!((s, &b["code"]), (400, &json!(103)), "{engine}");
    }
}

#[tokio::test]
async fn deeply_nested_data_is_refused_with_118() {
    let gw = start(config()).await;
    let mut c = connect_as(gw.addr, "deep", &[]).await;
    c.subscribe("open.deep").await;
    let nested =
        |depth: usize| -> String { format!("{}1{}", "[".repeat(depth), "]".repeat(depth)) };
    let frame = |depth: usize| {
        format!(
            r#"{{"type":"publish","channel":"open.deep","id":7,"data":{}}}"#,
            nested(depth)
        )
    };
    for depth in [65, 5_000] {
        c.send_raw(tokio_tungstenite::tungstenite::Message::text(frame(depth)))
            .await;
        let e = c.recv().await;
        assert_eq!(
            (&e["type"], &e["code"], &e["id"]),
            (&json!("error"), &json!(118), &json!(7)),
            "depth {depth}"
        );
        let body = format!(r#"{{"channel":"open.deep","data":{}}}"#, nested(depth));
        let (s, b) = api_raw(gw.addr, "POST", "/api/v1/publish", Some(&body)).await;
        assert_eq!((s, &b["code"]), (400, &json!(118)), "API depth {depth}");
    }
    // 64 levels (the default `max_data_depth`) pass, and brackets in strings do not count.
    c.send_raw(tokio_tungstenite::tungstenite::Message::text(frame(64)))
        .await;
    let m = c.recv_type("msg").await;
    assert_eq!(m["data"].to_string(), nested(64));
    let seq = c
        .publish("open.deep", json!({"text": "[[[[[[[[[[".repeat(100)}))
        .await;
    assert_eq!(c.recv_type("msg").await["seq"], seq);
}

/// Sends raw bytes and reads the whole response until the server closes.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn json_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body: {response:?}"))
}

#[tokio::test]
async fn the_http_api_is_strict() {
    let gw = start(config()).await;
    // A wrong method on a known path: 405 with Allow.
    let key = format!("apikey {API_KEY}");
    for (method, path, allow) in [
        ("DELETE", "/api/v1/nodes", "GET"),
        ("GET", "/api/v1/publish", "POST"),
        ("PUT", "/api/v1/history/open.x", "GET"),
        ("POST", "/healthz", "GET"),
        ("TRACE", "/readyz", "GET"),
        ("POST", "/api/v1/openapi.yaml", "GET"),
    ] {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: t\r\nauthorization: {key}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let resp = raw_exchange(gw.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 405"), "{method} {path}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains(&format!("\r\nallow: {}\r\n", allow.to_ascii_lowercase())),
            "{method} {path}: {resp}"
        );
        assert_eq!(json_body(&resp)["code"], 405);
    }
    // Invalid query values: 400 with a code, never ignored.
    for query in [
        "limit=abc",
        "limit=0",
        "limit=-1",
        "since=abc",
        "since=5",
        "epoch=e1",
        "since=1&epoch=e&since=2",
    ] {
        let (s, b) = api(
            gw.addr,
            "GET",
            &format!("/api/v1/history/open.x?{query}"),
            None,
        )
        .await;
        assert_eq!((s, &b["code"]), (400, &json!(103)), "history?{query}: {b}");
        assert!(b["error"].is_string());
    }
    let (s, b) = api(gw.addr, "GET", "/api/v1/presence/chat.x?limit=x", None).await;
    assert_eq!((s, &b["code"]), (400, &json!(103)), "{b}");
    // A limit above max_replay is served as max_replay (the contract says so).
    let mut p = connect_as(gw.addr, "p", &[]).await;
    for i in 0..7 {
        p.publish("trim.clamp", json!(i)).await;
    }
    let (s, h) = api(
        gw.addr,
        "GET",
        "/api/v1/history/trim.clamp?limit=999999999",
        None,
    )
    .await;
    assert_eq!(
        (s, publication_seqs(&h).len()),
        (200, 5),
        "history_size 5: {h}"
    );
    // An invalid URI is refused below the router: still 400 with a JSON body.
    let resp = raw_exchange(
        gw.addr,
        b"GET /api/v1/history/open.a>b HTTP/1.1\r\nhost: t\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("content-type: application/json"), "{resp}");
    assert_eq!(json_body(&resp)["code"], 400);
    // The node still serves after it.
    assert_eq!(http(gw.addr, "GET", "/healthz", &[], None).await.0, 200);
    // The contract is served, without a key.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /api/v1/openapi.yaml HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("openapi: 3.1"), "the document itself");
}

#[tokio::test]
async fn a_slow_request_body_times_out_with_408() {
    let mut cfg = config();
    cfg.server.body_read_timeout = Duration::from_millis(300);
    let gw = start(cfg).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/publish HTTP/1.1\r\nhost: t\r\nauthorization: apikey {API_KEY}\r\ncontent-length: 100\r\n\r\n{{\"chan"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // One byte per 100 ms afterwards, as a slowloris would, until the server gives up.
    let started = tokio::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            n = s.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if s.write_all(b" ").await.is_err() {
                    break;
                }
            }
        }
        assert!(started.elapsed() < WAIT, "the server never answered");
    }
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert_eq!(json_body(&resp)["code"], 408);
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
}

#[tokio::test]
async fn websocket_handshake_checks_key_and_origin() {
    let mut cfg = config();
    cfg.server.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.trading.example".into(),
    ];
    let gw = start(cfg).await;
    let t = token("web", &[], Duration::from_secs(60));
    let auth = format!("Bearer {t}");
    let long_key = "A".repeat(1024);
    for key in [
        "abc",
        long_key.as_str(),
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25j!Q==",
    ] {
        let refused = try_connect_with(
            gw.addr,
            "",
            &[("authorization", &auth), ("sec-websocket-key", key)],
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("key {key:?} accepted"));
        assert_eq!(
            (refused.status, &refused.body["code"]),
            (400, &json!(400)),
            "key {key:?}"
        );
    }
    let refused = try_connect_with(
        gw.addr,
        "",
        &[("authorization", &auth), ("sec-websocket-version", "12")],
    )
    .await
    .err()
    .expect("version 12 is refused");
    assert_eq!((refused.status, &refused.body["code"]), (400, &json!(400)));
    // The RFC's own example key is valid.
    try_connect_with(
        gw.addr,
        "",
        &[
            ("authorization", &auth),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await
    .expect("a valid key is accepted");
    // Origins.
    for origin in ["https://app.example.com", "https://eu.trading.example"] {
        let c =
            try_connect_with(gw.addr, "", &[("authorization", &auth), ("origin", origin)]).await;
        assert!(c.is_ok(), "{origin} is allowed");
    }
    for origin in [
        "https://evil.example",
        "http://app.example.com",
        "https://trading.example",
        "null",
    ] {
        let refused =
            try_connect_with(gw.addr, "", &[("authorization", &auth), ("origin", origin)])
                .await
                .err()
                .unwrap_or_else(|| panic!("{origin} accepted"));
        assert_eq!(
            (refused.status, &refused.body["code"]),
            (403, &json!(403)),
            "{origin}"
        );
        assert!(refused.body["error"].as_str().unwrap().contains("origin"));
    }
    // Clients that are not browsers send no Origin and are not affected.
    connect(gw.addr, &t).await;
}

#[tokio::test]
async fn switchyard_config_names_the_config_file() {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let out = std::process::Command::new(bin)
        .arg("check-config")
        .env("SWITCHYARD_CONFIG", cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It really is the file that was read: a missing one is an error naming it.
    let out = std::process::Command::new(bin)
        .arg("check-config")
        .env("SWITCHYARD_CONFIG", "/nonexistent/switchyard.toml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchyard.toml"));
}

#[test]
fn check_config_refuses_a_key_file_it_cannot_use() {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("rsa.pub.pem");
    std::fs::write(&not_pem, "not a PEM key").unwrap();
    for (path, why) in [
        (dir.path().join("missing.pem"), "missing.pem"),
        (not_pem.clone(), "rsa.pub.pem"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["-c", cfg, "check-config"])
            .env("SWITCHYARD_AUTH__RSA_PUBLIC_KEY", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    }
}

#[tokio::test]
async fn ws_client_example_exits_when_the_server_closes() {
    // `make test` builds it first (`cargo build --examples`): `cargo test` alone
    // builds examples only as test harnesses.
    let client = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples/ws-client"))
        .unwrap();
    assert!(
        client.exists(),
        "{} is missing: run `cargo build --examples` (make test does)",
        client.display()
    );
    let gw = start(config()).await;
    let t = token("cli", &[], Duration::from_secs(60));
    let mut child = tokio::process::Command::new(&client)
        .arg(format!("ws://{}/ws?token={t}", gw.addr))
        // Stdin stays open, as a terminal's would.
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // Held until the end: `Child::wait` closes a stdin it still owns, and the client
    // would then exit on end of input instead of on the server's close.
    let _stdin = child.stdin.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("welcome") {
        let n = tokio::time::timeout(WAIT, stdout.read(&mut buf))
            .await
            .expect("the welcome frame")
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let (s, _) = api(gw.addr, "POST", "/api/v1/users/cli/disconnect", None).await;
    assert_eq!(s, 200);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("ws-client exits once the server closed the connection")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // It says why: the close frame, or the error if the socket ended first.
    let (mut rest, mut errors) = (String::new(), String::new());
    stdout.read_to_string(&mut rest).await.unwrap();
    let mut stderr = child.stderr.take().unwrap();
    stderr.read_to_string(&mut errors).await.unwrap();
    assert!(
        rest.contains("closed") || errors.contains("error"),
        "{rest} / {errors}"
    );
}
