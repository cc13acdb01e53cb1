//! Heartbeats, idle timeout, graceful drain (in process and by SIGTERM on the binary).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn silent_client_is_closed_after_idle_timeout() {
    let mut cfg = config();
    cfg.session.idle_timeout = Duration::from_millis(800);
    cfg.session.ping_interval = Duration::from_secs(30);
    let gw = start(cfg).await;
    let mut c = connect_as(gw.addr, "quiet", &[]).await;
    let started = tokio::time::Instant::now();
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 4005);
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "not before the timeout"
    );
}

#[tokio::test]
async fn client_answering_pings_stays_connected() {
    let mut cfg = config();
    cfg.session.idle_timeout = Duration::from_millis(600);
    cfg.session.ping_interval = Duration::from_millis(150);
    let gw = start(cfg).await;
    let mut c = connect_as(gw.addr, "lively", &[]).await;
    // Reading lets the client answer the server's pings; nothing else may happen
    // for several idle timeouts.
    assert!(
        c.next_event_within(Duration::from_secs(2)).await.is_none(),
        "no frame and no close"
    );
    c.ping().await;
}

#[tokio::test]
async fn drain_sends_reconnect_closes_4012_and_stops() {
    let mut cfg = config();
    cfg.server.drain_timeout = Duration::from_secs(5);
    let gw = start(cfg).await;
    let mut a = connect_as(gw.addr, "a", &[]).await;
    let mut b = connect_as(gw.addr, "b", &[]).await;
    b.subscribe("open.news").await;
    // Two idle HTTP connections opened before the drain, to ask during it.
    let mut probe = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut upgrade = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (status, _) = http_on(&mut probe, "GET", "/readyz", &[], None, false).await;
    assert_eq!(status, 200);

    gw.node.shutdown.trigger();

    for c in [&mut a, &mut b] {
        let (code, frames) = c.expect_close().await;
        assert_eq!(code, 4012);
        let r = frames
            .iter()
            .find(|f| f["type"] == "reconnect")
            .expect("a reconnect frame first");
        assert!(r["after_ms"].as_u64().unwrap() <= 500, "{r}");
    }
    let (status, body) = http_on(&mut probe, "GET", "/readyz", &[], None, true).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
    let t = token("late", &[], Duration::from_secs(60));
    let (status, _) = http_on(
        &mut upgrade,
        "GET",
        &format!("/ws?token={t}"),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        None,
        true,
    )
    .await;
    assert_eq!(status, 503, "no new upgrades while draining");
    tokio::time::timeout(Duration::from_secs(6), gw.task)
        .await
        .expect("stops within the drain timeout")
        .unwrap();
    let _ = upgrade.shutdown().await;
}

/// The real binary: SIGTERM drains its clients and the process exits cleanly.
#[tokio::test]
async fn sigterm_drains_the_binary() {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let token = Command::new(bin)
        .args(["--config", cfg, "token", "--user", "ops", "--ttl", "10m"])
        .output()
        .unwrap();
    assert!(token.status.success());
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();

    let mut child = Command::new(bin)
        .args(["--config", cfg, "serve"])
        .env("SWITCHYARD_SERVER__LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_SERVER__DRAIN_TIMEOUT", "3s")
        .env("SWITCHYARD_SERVER__RECONNECT_JITTER", "100ms")
        .env("SWITCHYARD_LOG__JSON", "true")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The address comes from the "listening" log line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "listening" {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(v["fields"]["addr"].as_str().unwrap().to_string());
                }
            }
        }
    });
    let addr: std::net::SocketAddr = tokio::time::timeout(WAIT, rx)
        .await
        .expect("server starts")
        .unwrap()
        .parse()
        .unwrap();

    let mut c = connect(addr, &token).await;
    c.call(
        json!({"type": "subscribe", "channel": "prices.BTC-USDT"}),
        "subscribed",
    )
    .await;

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (code, frames) = c.expect_close().await;
    assert_eq!(code, 4012);
    assert!(frames.iter().any(|f| f["type"] == "reconnect"));

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
}
