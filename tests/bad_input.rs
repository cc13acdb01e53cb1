//! Bad input gets a clear error and loses nothing: each case has its documented
//! error frame or close code, and the node keeps serving everyone else.

mod common;

use std::net::SocketAddr;

use common::scenarios::limits_check;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// Another client can still subscribe, publish and receive.
async fn node_still_serves(addr: SocketAddr) {
    let mut c = connect_as(addr, "bystander", &[]).await;
    let channel = format!("open.health{}", fastrand::u32(..));
    c.subscribe(&channel).await;
    let seq = c.publish(&channel, json!("ok")).await;
    assert_eq!(c.recv_type("msg").await["seq"], seq);
}

#[tokio::test]
async fn malformed_frames_get_error_messages_and_the_connection_stays() {
    let gw = start(config()).await;
    let mut c = connect_as(gw.addr, "u", &[]).await;

    c.send_raw(Message::text("{not json")).await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(101))
    );

    c.send_raw(Message::text("[1,2,3]")).await;
    assert_eq!(c.recv().await["code"], 101, "not an object");

    let e = c.call(json!({"type": "teleport"}), "error").await;
    assert_eq!(e["code"], 102);

    // Missing fields name the field and echo the id.
    c.send(json!({"type": "subscribe", "id": "req-7"})).await;
    let e = c.recv().await;
    assert_eq!(
        (e["code"].as_u64(), e["id"].as_str()),
        (Some(103), Some("req-7"))
    );
    assert!(e["reason"].as_str().unwrap().contains("channel"));
    let e = c
        .call(json!({"type": "publish", "channel": "open.x"}), "error")
        .await;
    assert_eq!(e["code"], 103);
    let e = c
        .call(json!({"type": "ack", "channel": "open.x"}), "error")
        .await;
    assert_eq!(e["code"], 103);
    let e = c.call(json!({"id": 1}), "error").await;
    assert_eq!(e["code"], 103, "no type");
    let e = c
        .call(json!({"type": "subscribe", "channel": 42}), "error")
        .await;
    assert_eq!(e["code"], 103, "wrong field type");

    for bad in [
        "nodots",
        "open..x",
        "open.$$",
        "open.a b",
        "open.*",
        &format!("open.{}", "x".repeat(200)),
    ] {
        let e = c
            .call(json!({"type": "subscribe", "channel": bad}), "error")
            .await;
        assert_eq!(e["code"], 104, "{bad}");
    }

    // A traceparent reaches span attributes and a NATS header: bounded and printable,
    // and nothing is published when it is not.
    for bad in [
        json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX: y"),
        json!("0".repeat(129)),
        json!("has space"),
        json!(7),
    ] {
        let e = c
            .call(
                json!({"type": "publish", "channel": "open.tp", "data": 1, "traceparent": bad}),
                "error",
            )
            .await;
        assert_eq!(e["code"], 103, "{bad}");
    }
    let h = c
        .call(json!({"type": "history", "channel": "open.tp"}), "history")
        .await;
    assert_eq!(h["publications"], json!([]), "nothing was published");
    // One that is merely not a valid trace context starts a new trace: published.
    let p = c
        .call(
            json!({"type": "publish", "channel": "open.tp", "data": 1, "traceparent": "not-a-trace"}),
            "published",
        )
        .await;
    assert_eq!(p["duplicate"], false);

    // Binary frames are refused with an error, not a close.
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(c.recv().await["code"], 116);

    // Data over the namespace limit (16 KiB) but within the frame limit (64 KiB).
    let big = "x".repeat(20 << 10);
    let e = c
        .call(
            json!({"type": "publish", "channel": "trim.x", "data": big}),
            "error",
        )
        .await;
    assert!(e["code"] == 111, "{e}");

    c.ping().await;
    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn oversized_frame_closes_4010() {
    let mut cfg = config();
    cfg.session.max_frame_bytes = 1024;
    let gw = start(cfg).await;
    let mut c = connect_as(gw.addr, "u", &[]).await;
    c.send(json!({"type": "publish", "channel": "open.x", "data": "y".repeat(2000)}))
        .await;
    assert_eq!(c.expect_close().await.0, 4010);
    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn protocol_violations_close_4011() {
    let gw = start(config()).await;

    // A fragmented message (first fragment without FIN).
    let mut c = connect_as(gw.addr, "u", &[]).await;
    c.send_raw(Message::Frame(Frame::message(
        b"{\"type\":".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    assert_eq!(c.expect_close().await.0, 4011);

    // A text frame that is not UTF-8.
    let mut c = connect_as(gw.addr, "u", &[]).await;
    c.send_raw(Message::Frame(Frame::message(
        vec![0xffu8, 0xfe, 0xfd],
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    assert_eq!(c.expect_close().await.0, 4011);

    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn flood_gets_rate_limited_then_closed_4009() {
    let mut cfg = config();
    cfg.session.rate_frames_per_sec = 20;
    cfg.session.rate_frames_burst = 20;
    cfg.session.rate_violations_before_close = 10;
    let gw = start(cfg).await;
    let mut c = connect_as(gw.addr, "flooder", &[]).await;
    for _ in 0..500 {
        // The server may close mid-flood; that is the expected outcome.
        if !c.try_send(json!({"type": "ping"})).await {
            break;
        }
    }
    let (code, frames) = c.expect_close().await;
    assert_eq!(code, 4009);
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    let limited = frames.iter().filter(|f| f["code"] == 110).count();
    assert!((20..100).contains(&pongs), "the burst was served: {pongs}");
    assert!(limited >= 1, "an error comes before the close");

    // WebSocket ping frames count too: a ping flood ends the same way.
    let mut c = connect_as(gw.addr, "pinger", &[]).await;
    for _ in 0..500 {
        if c.ws.send(Message::Ping(vec![1u8].into())).await.is_err() {
            break;
        }
    }
    assert_eq!(c.expect_close().await.0, 4009);
    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn ten_thousand_subscriptions_hit_the_limit() {
    let mut cfg = config();
    cfg.session.max_subscriptions = 100;
    let gw = start(cfg).await;
    let mut c = connect_as(gw.addr, "greedy", &[]).await;
    for i in 0..10_000 {
        c.send(json!({"type": "subscribe", "channel": format!("open.c{i}"), "id": i}))
            .await;
    }
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..10_000 {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("subscribed") => ok += 1,
            Some("error") if f["code"] == 109 => refused += 1,
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!((ok, refused), (100, 9_900));
    c.ping().await;
    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn per_user_and_per_node_connection_limits() {
    let mut cfg = config();
    cfg.server.max_connections_per_user = 2;
    cfg.server.max_connections = 3;
    let gw = start(cfg).await;
    let t = token("alice", &[], std::time::Duration::from_secs(60));
    let a1 = connect(gw.addr, &t).await;
    let _a2 = connect(gw.addr, &t).await;
    let r = try_connect_with(gw.addr, &format!("?token={t}"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(r.status, 429);
    let _b = connect_as(gw.addr, "bob", &[]).await;
    let r = try_connect_with(
        gw.addr,
        &format!(
            "?token={}",
            token("carol", &[], std::time::Duration::from_secs(60))
        ),
        &[],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(r.status, 503);
    // A slot frees when a connection ends.
    drop(a1);
    tokio::time::timeout(WAIT, gw.node.connections_at_most(2))
        .await
        .expect("the slot is released");
    let _a3 = connect(gw.addr, &t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requesting_without_reading_ends_as_slow_consumer() {
    let mut cfg = config();
    cfg.session.outbox_bytes = 64 << 10;
    let gw = start(cfg).await;
    let mut p = connect_as(gw.addr, "p", &[]).await;
    let pad = "h".repeat(10_000);
    for i in 0..10 {
        p.publish("open.big", json!({"i": i, "pad": pad})).await;
    }
    // ~100 KB per history reply; the client asks for 200 of them and reads nothing.
    let mut greedy = connect_slow(gw.addr, "greedy").await;
    for _ in 0..200 {
        if !greedy
            .try_send(json!({"type": "history", "channel": "open.big", "limit": 10}))
            .await
        {
            break;
        }
    }
    let (code, _) = greedy.expect_close().await;
    assert_eq!(code, 4008);
    node_still_serves(gw.addr).await;
}

#[tokio::test]
async fn incomplete_request_headers_are_dropped() {
    let mut cfg = config();
    cfg.server.header_read_timeout = std::time::Duration::from_millis(500);
    let gw = start(cfg).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    // The server answers 408 or just closes; either way the connection ends.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow request was dropped");
    node_still_serves(gw.addr).await;
}

/// Positions are client input: the largest `seq`, `limit` and `snapshot` are
/// handled without overflow (and the connection stays).
#[tokio::test]
async fn extreme_positions_are_handled() {
    let gw = start(config()).await;
    let mut c = connect_as(gw.addr, "edge", &[]).await;
    c.publish("open.edge", json!(1)).await;
    let epoch = c
        .call(
            json!({"type": "history", "channel": "open.edge", "limit": 1}),
            "history",
        )
        .await["position"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let max = u64::MAX;
    let r = c
        .call(json!({"type": "subscribe", "channel": "open.edge", "since": {"seq": max, "epoch": epoch}}), "subscribed")
        .await;
    assert_eq!(r["replayed"], 0);
    let h = c
        .call(json!({"type": "history", "channel": "open.edge", "since": {"seq": max, "epoch": epoch}, "limit": max}), "history")
        .await;
    assert_eq!(
        h["publications"],
        json!([]),
        "nothing after the largest seq"
    );
    limits_check(&mut c, "open.edge2").await;
    let (r, _) = c
        .request(json!({"type": "ack", "channel": "open.edge", "seq": max}))
        .await;
    assert_eq!(r["code"], 115, "ack outside an acked namespace");
    c.ping().await;
}
