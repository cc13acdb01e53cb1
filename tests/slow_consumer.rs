//! Slow consumers (docs/protocol.md, "Slow consumers"): a bounded outbox closes a stalled client with
//! 4008 on ordinary channels, conflates on `conflate` channels, and never
//! delays the fast clients on the same channel.

mod common;

use common::*;
use serde_json::json;

const MESSAGES: u64 = 3000;

fn small_outbox() -> switchyard::config::Config {
    let mut c = config();
    c.session.outbox_messages = 64;
    c.session.outbox_bytes = 256 << 10;
    c
}

/// Publishes `MESSAGES` 4 KiB publications and returns their seqs.
async fn publish_burst(addr: std::net::SocketAddr, channel: &'static str) -> Vec<u64> {
    let mut p = connect_as(addr, "publisher", &[]).await;
    let filler = "x".repeat(4096);
    let mut seqs = Vec::new();
    for i in 0..MESSAGES {
        seqs.push(p.publish(channel, json!({"i": i, "pad": filler})).await);
    }
    seqs
}

async fn read_all(mut c: Client, n: usize) -> Vec<u64> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        got.push(c.recv_type("msg").await["seq"].as_u64().unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_is_closed_4008_while_fast_client_gets_everything() {
    let gw = start(small_outbox()).await;
    let mut slow = connect_slow(gw.addr, "slow").await;
    slow.subscribe("open.firehose").await;
    let mut fast = connect_as(gw.addr, "fast", &[]).await;
    fast.subscribe("open.firehose").await;
    let fast_task = tokio::spawn(read_all(fast, MESSAGES as usize));

    // The slow client reads nothing while everything is published.
    let seqs = publish_burst(gw.addr, "open.firehose").await;
    assert_eq!(
        fast_task.await.unwrap(),
        seqs,
        "the fast client misses nothing"
    );

    // Now the slow client reads what reached it: an in-order prefix, then 4008.
    let (code, frames) = slow.expect_close().await;
    assert_eq!(code, 4008);
    let got: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "msg")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert!(got.len() < seqs.len(), "the stalled client was cut off");
    assert_eq!(
        got,
        seqs[..got.len()].to_vec(),
        "what it got is an in-order prefix"
    );

    // It can reconnect from its last seq and lose nothing.
    let epoch = fast_epoch(gw.addr, "open.firehose").await;
    let mut again = connect_as(gw.addr, "slow", &[]).await;
    let since = got.last().copied().unwrap_or(0);
    let r = again
        .call(json!({"type": "subscribe", "channel": "open.firehose", "since": {"seq": since, "epoch": epoch}}), "subscribed")
        .await;
    assert_eq!(r["recovered"], true);
    let rest = read_all(again, seqs.len() - got.len()).await;
    assert_eq!([got, rest].concat(), seqs);
}

async fn fast_epoch(addr: std::net::SocketAddr, channel: &str) -> String {
    let mut c = connect_as(addr, "epoch", &[]).await;
    let r = c
        .call(
            json!({"type": "history", "channel": channel, "limit": 1}),
            "history",
        )
        .await;
    r["position"]["epoch"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_on_conflated_channel_gets_latest_and_stays() {
    let gw = start(small_outbox()).await;
    let mut slow = connect_slow(gw.addr, "slow").await;
    slow.subscribe("ticks.BTC-USDT").await;
    let mut fast = connect_as(gw.addr, "fast", &[]).await;
    fast.subscribe("ticks.BTC-USDT").await;
    let fast_task = tokio::spawn(read_all(fast, MESSAGES as usize));

    let seqs = publish_burst(gw.addr, "ticks.BTC-USDT").await;
    assert_eq!(
        fast_task.await.unwrap(),
        seqs,
        "a fast client on a conflated channel still gets every tick"
    );

    // The slow client reads until the newest tick: increasing, ends with the last, fewer than all.
    let last = *seqs.last().unwrap();
    let mut got = Vec::new();
    loop {
        let seq = slow.recv_type("msg").await["seq"].as_u64().unwrap();
        assert!(got.last().is_none_or(|&prev| seq > prev), "in order");
        got.push(seq);
        if seq == last {
            break;
        }
    }
    assert!(
        got.len() < seqs.len(),
        "ticks were conflated ({} of {})",
        got.len(),
        seqs.len()
    );
    // Not disconnected, and nothing older arrives afterwards.
    let later = slow.ping().await;
    assert!(later.iter().all(|f| f["type"] != "msg"), "{later:?}");
    // Every tick the slow client did not get was counted as conflated.
    let skipped = (seqs.len() - got.len()) as u64;
    assert_eq!(gw.node.hub.conflated(), skipped);
    let (status, _) = http(gw.addr, "GET", "/healthz", &[], None).await;
    assert_eq!(status, 200);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut metrics = String::new();
    s.read_to_string(&mut metrics).await.unwrap();
    assert!(
        metrics.contains(&format!("switchyard_conflated_total {skipped}\n")),
        "{metrics}"
    );
}

/// A client joining a fast conflated channel whose history keeps one publication
/// (a price) switches to live with the newest one instead of being closed 4008:
/// live moved on while its snapshot was read, and what went by is superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_a_fast_conflated_channel_goes_live_with_the_newest_not_4008() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let nats = NatsServer::start();
    let mut c = cluster_config(&nats, "n1");
    c.namespaces.get_mut("ticks").unwrap().default_snapshot = 1;
    let gw = start(c).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for i in 0..4 {
        let mut p = connect_as(gw.addr, &format!("publisher{i}"), &[]).await;
        let stop = Arc::clone(&stop);
        publishers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                p.publish("ticks.FAST-USDT", json!({"p": i, "n": n})).await;
                n += 1;
            }
        }));
    }
    for i in 0..30 {
        let mut c = connect_as(gw.addr, &format!("joiner{i}"), &[]).await;
        c.subscribe("ticks.FAST-USDT").await;
        // The snapshot, then live ticks in order; a close would fail `recv_type`.
        let mut last = 0;
        for _ in 0..3 {
            let seq = c.recv_type("msg").await["seq"].as_u64().unwrap();
            assert!(seq > last, "in order: {seq} after {last}");
            last = seq;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await.unwrap();
    }
}
