//! The NATS JetStream engine across nodes, against a real `nats-server -js`.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_on_one_node_reaches_the_others_in_order_with_its_seq() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    let c = start(cluster_config(&nats, "c")).await;
    let mut on_b = connect_as(b.addr, "bob", &[]).await;
    let mut on_c = connect_as(c.addr, "carol", &[]).await;
    on_b.subscribe("open.room").await;
    on_c.subscribe("open.room").await;
    let mut publisher = connect_as(a.addr, "alice", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..50 {
        seqs.push(publisher.publish("open.room", json!({"i": i})).await);
    }
    for client in [&mut on_b, &mut on_c] {
        for (i, want) in seqs.iter().enumerate() {
            let m = client.recv_type("msg").await;
            assert_eq!(
                (&m["seq"], &m["data"]["i"], m["from"].as_str()),
                (&json!(want), &json!(i), Some("alice"))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_msg_id_through_two_nodes_is_one_publication() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    let mut on_a = connect_as(a.addr, "p1", &[]).await;
    let mut on_b = connect_as(b.addr, "p2", &[]).await;
    let req =
        json!({"type": "publish", "channel": "open.orders", "data": {"n": 1}, "msg_id": "order-7"});
    let first = on_a.call(req.clone(), "published").await;
    let again = on_b.call(req, "published").await;
    assert_eq!(first["seq"], again["seq"]);
    assert_eq!(
        (first["duplicate"].as_bool(), again["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_another_node_and_honest_recovery() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    let mut p = connect_as(a.addr, "p", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(p.publish("open.log", json!(i)).await);
    }
    let h = p
        .call(
            json!({"type": "history", "channel": "open.log", "limit": 1}),
            "history",
        )
        .await;
    let epoch = h["position"]["epoch"].as_str().unwrap().to_string();
    assert_eq!(h["position"]["seq"], seqs[19]);

    let mut c = connect_as(b.addr, "c", &[]).await;
    let r = c
        .call(json!({"type": "subscribe", "channel": "open.log", "since": {"seq": seqs[4], "epoch": epoch}}), "subscribed")
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["replayed"].as_u64()),
        (Some(true), Some(15))
    );
    for want in &seqs[5..] {
        assert_eq!(&c.recv_type("msg").await["seq"], want);
    }
    // Live continues after the replay, from the other node.
    let next = p.publish("open.log", json!("live")).await;
    assert_eq!(c.recv_type("msg").await["seq"], next);

    // A position from another stream incarnation is not trusted.
    let mut d = connect_as(b.addr, "d", &[]).await;
    let r = d
        .call(json!({"type": "subscribe", "channel": "open.log", "since": {"seq": seqs[4], "epoch": "SY_OPEN@other"}}), "subscribed")
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["replayed"].as_u64()),
        (Some(false), Some(21))
    );

    // Trimmed history (trim keeps 5 per channel) is not recovered.
    for i in 0..10 {
        p.publish("trim.t", json!(i)).await;
    }
    let h = p
        .call(
            json!({"type": "history", "channel": "trim.t", "limit": 10}),
            "history",
        )
        .await;
    let kept = publication_seqs(&h);
    assert_eq!(kept.len(), 5);
    let trim_epoch = h["position"]["epoch"].as_str().unwrap().to_string();
    let r = d
        .call(json!({"type": "subscribe", "channel": "trim.t", "since": {"seq": 1, "epoch": trim_epoch}}), "subscribed")
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["replayed"].as_u64()),
        (Some(false), Some(5))
    );
}

/// The seam check across three nodes: publishers on different nodes, subscribers
/// joining and reconnecting on random nodes at random positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seam_across_nodes_has_no_gap_and_no_duplicate() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    let c = start(cluster_config(&nats, "c")).await;
    seam_check(vec![a.addr, b.addr, c.addr], "open.seam").await;
}
