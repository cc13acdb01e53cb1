//! Acked cursors under churn and loss (issue 15), on real redis-server and
//! nats-server: exact after a clean close, honest when the store lost them.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

const RESUMES: usize = 1000;

/// A device acks what it receives, closes cleanly and resubscribes at once without
/// `since`, alternating between two nodes, while a publisher runs: no acked
/// publication is ever delivered again, and none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_makes_every_ack_visible_to_the_next_resume() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut cfg_a = redis_config(&nats, &redis, "a");
    // The periodic flush alone would hide nothing within this test's timing.
    cfg_a.redis.ack_flush_interval = Duration::from_secs(60);
    let mut cfg_b = redis_config(&nats, &redis, "b");
    cfg_b.redis.ack_flush_interval = Duration::from_secs(60);
    let nodes = [start(cfg_a).await.addr, start(cfg_b).await.addr];
    let ch = "chat.room.churn";

    // The device's first connection creates its cursor before anything is published.
    let mut first = connect_device(nodes[0], "u", "phone").await;
    first.subscribe(ch).await;
    first
        .send(json!({"type": "ack", "channel": ch, "seq": 0}))
        .await;
    first.ping().await;
    close_cleanly(first).await;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = Arc::clone(&stop);
        let addr = nodes[1];
        tokio::spawn(async move {
            let mut p = connect_as(addr, "sender", CHAT_CAPS).await;
            let mut seqs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seqs.push(p.publish(ch, json!({"n": seqs.len()})).await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seqs
        })
    };

    let mut acked = 0u64;
    let mut received = BTreeSet::new();
    let mut redelivered = 0usize;
    for i in 0..RESUMES {
        let mut c = connect_device(nodes[i % 2], "u", "phone").await;
        let r = c.subscribe(ch).await;
        // Read the replay (or one live publication), ack the last, then close.
        let want = r["replayed"].as_u64().unwrap().max(1);
        for _ in 0..want {
            let seq = c.recv_type("msg").await["seq"].as_u64().unwrap();
            if seq <= acked {
                redelivered += 1;
            }
            received.insert(seq);
            acked = acked.max(seq);
        }
        c.send(json!({"type": "ack", "channel": ch, "seq": acked}))
            .await;
        close_cleanly(c).await;
    }
    stop.store(true, Ordering::Relaxed);
    let published = publisher.await.unwrap();
    // A last resume collects the rest.
    let mut c = connect_device(nodes[0], "u", "phone").await;
    let r = c.subscribe(ch).await;
    assert_eq!(r["recovered"], true, "{r}");
    let last = *published.last().unwrap();
    while acked < last {
        let seq = c.recv_type("msg").await["seq"].as_u64().unwrap();
        if seq <= acked {
            redelivered += 1;
        }
        received.insert(seq);
        acked = acked.max(seq);
    }
    eprintln!("{RESUMES} clean resumes: {redelivered} acked publications delivered again");
    assert_eq!(redelivered, 0, "acked publications came back");
    let want: BTreeSet<u64> = published.into_iter().collect();
    assert_eq!(
        received, want,
        "every publication exactly once, none skipped"
    );
}

/// A drain's close is as exact as the client's: acks received before the
/// `reconnect` + 4012 are visible to the resume on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_connection_acks_before_its_close() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut cfg = redis_config(&nats, &redis, "a");
    cfg.redis.ack_flush_interval = Duration::from_secs(60);
    cfg.server.reconnect_jitter = Duration::ZERO;
    let a = start(cfg).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let ch = "chat.room.drain";
    let mut c = connect_device(a.addr, "u", "tablet").await;
    c.subscribe(ch).await;
    let mut p = connect_as(b.addr, "sender", CHAT_CAPS).await;
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(p.publish(ch, json!(i)).await);
    }
    for want in &published {
        assert_eq!(&c.recv_type("msg").await["seq"], want);
    }
    c.send(json!({"type": "ack", "channel": ch, "seq": published[3]}))
        .await;
    c.ping().await;
    a.node.shutdown.trigger();
    let (code, _) = c.expect_close().await;
    assert_eq!(code, 4012);
    let mut again = connect_device(b.addr, "u", "tablet").await;
    let r = again.subscribe(ch).await;
    assert_eq!(
        (&r["recovered"], &r["replayed"]),
        (&json!(true), &json!(1)),
        "{r}"
    );
    assert_eq!(again.recv_type("msg").await["seq"], published[4]);
}

/// Redis restarted empty (no persistence) lost the cursors: a device that resumes
/// without `since` is told it could not be recovered, not sent live-only as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_lost_with_redis_is_not_reported_recovered() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let ch = "chat.room.lost";
    let mut c = connect_device(a.addr, "u", "laptop").await;
    let r = c.subscribe(ch).await;
    assert_eq!(r["stored_cursor"], false, "a new device: {r}");
    let mut p = connect_as(b.addr, "sender", CHAT_CAPS).await;
    let first = p.publish(ch, json!("before")).await;
    assert_eq!(c.recv_type("msg").await["seq"], first);
    c.send(json!({"type": "ack", "channel": ch, "seq": first}))
        .await;
    close_cleanly(c).await;
    // With the cursor stored, a resume says so.
    let mut c = connect_device(b.addr, "u", "laptop").await;
    let r = c.subscribe(ch).await;
    assert_eq!(
        (&r["recovered"], &r["stored_cursor"]),
        (&json!(true), &json!(true)),
        "{r}"
    );
    close_cleanly(c).await;

    redis.stop();
    redis.restart();
    // Published while the device was away: it must not be silently skipped.
    let missed = p.publish(ch, json!("while away")).await;
    let mut c = eventually(WAIT, "a resume after Redis is back", || async {
        let mut c = connect_device(b.addr, "u", "laptop").await;
        let (r, _) = c.request(json!({"type": "subscribe", "channel": ch})).await;
        (r["type"] == "subscribed").then_some((c, r))
    })
    .await;
    assert_eq!(
        (&c.1["recovered"], &c.1["stored_cursor"]),
        (&json!(false), &json!(false)),
        "the lost cursor is reported: {}",
        c.1
    );
    // A device that resumes with its own position is unaffected.
    let epoch = c.1["position"]["epoch"].as_str().unwrap().to_string();
    let mut own = connect_device(a.addr, "u", "tablet").await;
    let r = own
        .call(
            json!({"type": "subscribe", "channel": ch, "since": {"seq": first, "epoch": epoch}}),
            "subscribed",
        )
        .await;
    assert_eq!(
        (&r["recovered"], &r["replayed"]),
        (&json!(true), &json!(1)),
        "{r}"
    );
    assert_eq!(own.recv_type("msg").await["seq"], missed);
    // Once the device acks again, its new cursor is trusted.
    let next = p.publish(ch, json!("after")).await;
    assert_eq!(c.0.recv_type("msg").await["seq"], next);
    c.0.send(json!({"type": "ack", "channel": ch, "seq": next}))
        .await;
    close_cleanly(c.0).await;
    let mut c = connect_device(a.addr, "u", "laptop").await;
    let r = c.subscribe(ch).await;
    assert_eq!(
        (&r["recovered"], &r["stored_cursor"], &r["replayed"]),
        (&json!(true), &json!(true), &json!(0)),
        "{r}"
    );
}

/// A cursor from a stream that was since deleted and recreated is treated like a
/// `since` with a wrong epoch, not applied to the new stream's seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_another_stream_incarnation_is_not_recovered() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let ch = "chat.room.epoch";
    let mut c = connect_device(a.addr, "u", "watch").await;
    c.subscribe(ch).await;
    let mut p = connect_as(a.addr, "sender", CHAT_CAPS).await;
    let mut last = 0;
    for i in 0..5 {
        last = p.publish(ch, json!(i)).await;
    }
    while c.recv_type("msg").await["seq"] != last {}
    c.send(json!({"type": "ack", "channel": ch, "seq": last}))
        .await;
    close_cleanly(c).await;
    let (_, cursors) = api(a.addr, "GET", "/api/v1/users/u/cursors", None).await;
    let old_epoch = cursors["cursors"][0]["epoch"]
        .as_str()
        .expect("the epoch is stored")
        .to_string();

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    js.delete_stream("SY_CHAT").await.unwrap();
    // Another node starting provisions the stream afresh; its seqs start at 1.
    let _b = start(redis_config(&nats, &redis, "b")).await;
    let mut fresh = Vec::new();
    for i in 0..3 {
        fresh.push(p.publish(ch, json!(i)).await);
    }
    assert!(
        fresh[2] <= last,
        "the new incarnation reuses seqs: {fresh:?}"
    );

    let mut c = connect_device(a.addr, "u", "watch").await;
    let r = c.subscribe(ch).await;
    assert_ne!(r["position"]["epoch"].as_str(), Some(old_epoch.as_str()));
    assert_eq!(
        (&r["recovered"], &r["stored_cursor"], &r["replayed"]),
        (&json!(false), &json!(true), &json!(3)),
        "the old cursor is not applied to the new stream: {r}"
    );
    for want in &fresh {
        assert_eq!(&c.recv_type("msg").await["seq"], want);
    }
}
