//! Pipelined publishes (docs/protocol.md, "Publishing"), on a real nats-server:
//! a client that sends many publishes without waiting gets every reply in request
//! order, the publications are stored in that order, a refused publish is answered
//! in its place, and a request after them is answered after them — past the bound
//! of publishes in flight too; and a session keeps reading while acks are pending.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_sent_without_waiting_are_stored_and_answered_in_request_order() {
    let nats = NatsServer::start();
    let gw = start(cluster_config(&nats, "pipeline")).await;
    let mut c = connect_as(gw.addr, "writer", &[]).await;

    // 600 publishes (more than the 256 in flight a connection may have), one of
    // them refused, then a ping: nothing is read until all are sent.
    const N: u64 = 600;
    const REFUSED: u64 = 300;
    for i in 1..=N {
        let channel = if i == REFUSED {
            "nope.x"
        } else {
            "open.pipeline"
        };
        c.send(json!({"type": "publish", "id": i, "channel": channel, "data": {"i": i}}))
            .await;
    }
    // A malformed request (an unknown type) and a ping: answered after all of them.
    c.send(json!({"type": "nonsense", "id": "bad"})).await;
    c.send(json!({"type": "ping", "id": "last"})).await;

    let mut seqs = Vec::new();
    for i in 1..=N {
        let reply = c.recv().await;
        assert_eq!(reply["id"], i, "replies in request order: {reply}");
        if i == REFUSED {
            assert_eq!(reply["type"], "error", "{reply}");
            assert_eq!(reply["code"], 105, "unknown namespace: {reply}");
            continue;
        }
        assert_eq!(reply["type"], "published", "{reply}");
        seqs.push(reply["seq"].as_u64().unwrap());
    }
    let bad = c.recv().await;
    assert_eq!(
        (bad["type"].as_str(), bad["id"].as_str()),
        (Some("error"), Some("bad")),
        "{bad}"
    );
    let pong = c.recv().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_str()),
        (Some("pong"), Some("last"))
    );
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs follow the sends: {seqs:?}"
    );

    // The stream holds them in the order they were sent.
    let mut reader = connect_as(gw.addr, "reader", &[]).await;
    let history = reader
        .call(
            json!({"type": "history", "channel": "open.pipeline", "limit": 1000}),
            "history",
        )
        .await;
    let data: Vec<u64> = history["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"]["i"].as_u64().unwrap())
        .collect();
    let sent: Vec<u64> = (1..=N).filter(|i| *i != REFUSED).collect();
    assert_eq!(data, sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_on_while_its_publishes_wait_for_their_acks() {
    let nats = NatsServer::start();
    let gw = start(cluster_config(&nats, "pipeline-stall")).await;
    let mut c = connect_as(gw.addr, "writer", &[]).await;
    c.publish("open.stall", json!("warm")).await;

    // JetStream stops answering: each ack would take nats.request_timeout (2 s) to
    // fail. A session that waited for each ack before reading on would answer 113
    // ten times before it read the oversized frame; a pipelined one reads all ten
    // publishes at once, then the oversized frame, and closes with 4010 first.
    nats.pause();
    for i in 0..10 {
        c.send(json!({"type": "publish", "id": i, "channel": "open.stall", "data": i}))
            .await;
    }
    let oversized = "x".repeat(70_000);
    c.send_raw(tokio_tungstenite::tungstenite::Message::text(oversized))
        .await;
    let (code, frames) = c.expect_close().await;
    nats.resume();
    assert_eq!(code, 4010, "{frames:?}");
    assert!(
        frames
            .iter()
            .all(|f| f["type"] != "error" && f["type"] != "published"),
        "the close came before any publish was answered: {frames:?}"
    );
}
