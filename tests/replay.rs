//! Long replays (docs/architecture.md, "Replay"): a subscription catches up from
//! history a page at a time while publishers run, with every publication once,
//! in order, and no slow-consumer close for a client that reads; on both engines
//! and across nodes. And what ends a replay that cannot go on.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Publications stored before the subscriber arrives.
const BACKLOG: u64 = 20_000;
/// Publications per pipelined window of the backlog writer.
const WINDOW: u64 = 500;

/// Publishes `n` publications on `channel` through one connection, `WINDOW` in
/// flight at a time; returns the last seq.
async fn write_backlog(addr: SocketAddr, channel: &str, n: u64) -> u64 {
    write_padded(addr, channel, n, 0).await
}

/// As `write_backlog`, each publication carrying `pad` bytes: large enough that
/// socket buffers cannot hold a replay the client does not read.
async fn write_padded(addr: SocketAddr, channel: &str, n: u64, pad: usize) -> u64 {
    let pad = "x".repeat(pad);
    let mut c = connect_as(addr, "writer", &[]).await;
    let mut last = 0;
    for start in (0..n).step_by(WINDOW as usize) {
        let end = (start + WINDOW).min(n);
        for i in start..end {
            c.send(json!({"type": "publish", "channel": channel, "data": {"i": i, "pad": pad}}))
                .await;
        }
        for _ in start..end {
            last = c.recv_type("published").await["seq"].as_u64().unwrap();
        }
    }
    last
}

/// Publishes at about 500/s until `stop`; returns the last seq.
fn publish_live(
    addr: SocketAddr,
    channel: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut c = connect_as(addr, "live", &[]).await;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let mut last = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            last = c.publish(channel, json!({"live": i})).await;
            i += 1;
        }
        last
    })
}

/// The replay check: a 20,000-publication backlog on a channel alone in its
/// namespace (so its seqs are 1..), live publishing at 500/s, `max_replay`
/// 100,000 and the default outbox; a subscriber on `subscribe_on` resumes from
/// the start and must get every seq once, in order, past the live head, with no
/// close.
async fn long_replay_check(publish_on: SocketAddr, subscribe_on: SocketAddr) {
    let channel = "backlog.room";
    let stored = write_backlog(publish_on, channel, BACKLOG).await;
    assert_eq!(stored, BACKLOG, "the channel is alone in its namespace");
    let stop = Arc::new(AtomicBool::new(false));
    let mut live = Some(publish_live(publish_on, channel, Arc::clone(&stop)));

    let mut c = connect_as(subscribe_on, "reader", &[]).await;
    let (_, r) = resume_from_start(&mut c, channel).await;
    assert_eq!(r["recovered"], true, "{r}");
    assert!(r["replayed"].as_u64().unwrap() >= BACKLOG, "{r}");

    let mut expected = 1u64;
    let mut last_live = None;
    loop {
        match c.next_event().await {
            Event::Frame(f) if f["type"] == "msg" => {
                assert_eq!(
                    f["seq"].as_u64(),
                    Some(expected),
                    "every seq once, in order"
                );
                expected += 1;
            }
            Event::Frame(f) => panic!("unexpected frame during the replay: {f}"),
            Event::Closed(code, why) => panic!("closed during the replay: {code:?} {why}"),
        }
        // Well past the backlog, and so live: stop the publisher and read to its last.
        if expected == BACKLOG + 1000 {
            if let Some(live) = live.take() {
                stop.store(true, Ordering::Relaxed);
                last_live = Some(live.await.unwrap());
            }
        }
        if last_live.is_some_and(|last| expected > last) {
            break;
        }
    }
    // Nothing after the last one, and the connection is still alive.
    let after = c.ping().await;
    assert!(
        after.is_empty(),
        "frames after the last publication: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_replay_under_live_publishing_is_exact_on_the_memory_engine() {
    let gw = start(config()).await;
    long_replay_check(gw.addr, gw.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_replay_under_live_publishing_is_exact_across_nodes() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    long_replay_check(a.addr, b.addr).await;
}

/// Padding of the publications of the tests that stall a replay: 1,000 of them
/// are more than the socket buffers hold.
const PAD: usize = 8 << 10;

/// Subscribes from before the first publication (the epoch from a `history`
/// call); returns the epoch and the `subscribed` reply.
async fn resume_from_start(
    c: &mut Client,
    channel: &str,
) -> (serde_json::Value, serde_json::Value) {
    let epoch = c
        .call(
            json!({"type": "history", "channel": channel, "limit": 1}),
            "history",
        )
        .await["position"]["epoch"]
        .clone();
    let since = json!({"seq": 0, "epoch": epoch});
    let r = c
        .call(
            json!({"type": "subscribe", "channel": channel, "since": since}),
            "subscribed",
        )
        .await;
    (epoch, r)
}

/// Reads `msg` seqs until the close; returns them and the close code.
async fn read_to_close(c: &mut Client) -> (Vec<u64>, u16) {
    let (code, frames) = c.expect_close().await;
    let seqs = frames
        .iter()
        .filter(|f| f["type"] == "msg")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    (seqs, code)
}

/// Publications retained by the channel of the retention check: more than a
/// NATS node continues through batched direct gets, so its consumer is tested.
const RETAINED: u64 = 3_000;

/// A replay stalled while the channel is written past its retention: 4008 after
/// an in-order prefix.
async fn overtaken_by_retention_check(mut cfg: switchyard::config::Config) {
    cfg.session.outbox_messages = 64;
    if let Some(ns) = cfg.namespaces.get_mut("backlog") {
        ns.history_size = RETAINED as usize;
    }
    let gw = start(cfg).await;
    let channel = "backlog.trimmed";
    write_padded(gw.addr, channel, RETAINED, PAD).await;
    let mut slow = connect_slow(gw.addr, "slow").await;
    let (_, r) = resume_from_start(&mut slow, channel).await;
    assert_eq!(r["recovered"], true, "{r}");
    // While it does not read, 2,000 more push the ones it has not reached out of history.
    write_padded(gw.addr, channel, RETAINED, PAD).await;
    let (seqs, code) = read_to_close(&mut slow).await;
    assert_eq!(code, 4008);
    assert!(
        !seqs.is_empty() && seqs.len() < RETAINED as usize,
        "{} replayed",
        seqs.len()
    );
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "what was replayed is an in-order prefix, delivered before the close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_overtaken_by_retention_closes_4008_after_what_it_replayed() {
    overtaken_by_retention_check(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_overtaken_by_stream_retention_closes_4008_after_what_it_replayed() {
    let nats = NatsServer::start();
    overtaken_by_retention_check(cluster_config(&nats, "a")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_backbone_stays_away_closes_1013_and_resumes_later() {
    let mut nats = NatsServer::start();
    let mut cfg = cluster_config(&nats, "a");
    cfg.session.outbox_messages = 64;
    cfg.session.replay_retry_for = Duration::from_secs(1);
    let gw = start(cfg).await;
    let channel = "backlog.away";
    let total = write_padded(gw.addr, channel, RETAINED, PAD).await;
    let mut slow = connect_slow(gw.addr, "slow").await;
    let (epoch, r) = resume_from_start(&mut slow, channel).await;
    assert_eq!(r["replayed"], total);
    nats.stop();
    let (seqs, code) = read_to_close(&mut slow).await;
    assert_eq!(code, 1013);
    assert!(seqs.len() < total as usize, "the replay stopped early");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // Back again: the client resumes from where the replay stopped, and gets the rest.
    nats.restart();
    let since = seqs.last().copied().unwrap_or(0);
    let mut again = eventually(WAIT, "a subscribe succeeds once NATS is back", || {
        let epoch = epoch.clone();
        async move {
            let t = token("slow", &[], Duration::from_secs(3600));
            let auth = format!("Bearer {t}");
            // Refused (503) until the node is ready again.
            let mut c = try_connect_with(gw.addr, "", &[("authorization", &auth)])
                .await
                .ok()?;
            let (r, _) = c
                .request(json!({"type": "subscribe", "channel": channel, "since": {"seq": since, "epoch": epoch}}))
                .await;
            (r["type"] == "subscribed").then_some(c)
        }
    })
    .await;
    for want in since + 1..=total {
        assert_eq!(again.recv_type("msg").await["seq"].as_u64(), Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_replay_goes_on_when_no_consumer_can_be_created() {
    // The account may have one consumer, and something else holds it: a long
    // catch-up falls back to direct gets.
    let nats = NatsServer::start_with(
        "accounts { APP: { jetstream: { max_mem: 64MB, max_file: 512MB, max_consumers: 1 }, users: [{ user: \"app\", password: \"pw\" }] } }",
    );
    let mut cfg = cluster_config(&nats, "a");
    cfg.nats.user = Some("app".into());
    cfg.nats.password = Some("pw".into());
    let gw = start(cfg).await;
    let channel = "backlog.noconsumer";
    let total = write_backlog(gw.addr, channel, 3_000).await;
    let app = async_nats::ConnectOptions::with_user_and_password("app".into(), "pw".into())
        .connect(&nats.url)
        .await
        .unwrap();
    let stream = async_nats::jetstream::new(app)
        .get_stream("SY_BACKLOG")
        .await
        .unwrap();
    let other = async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("other".into()),
        ..Default::default()
    };
    stream.create_consumer(other).await.unwrap();
    let mut c = connect_as(gw.addr, "reader", &[]).await;
    let (_, r) = resume_from_start(&mut c, channel).await;
    assert_eq!(
        (&r["recovered"], &r["replayed"]),
        (&json!(true), &json!(total))
    );
    for want in 1..=total {
        assert_eq!(c.recv_type("msg").await["seq"].as_u64(), Some(want));
    }
}
