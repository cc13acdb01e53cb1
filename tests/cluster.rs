//! The NATS JetStream engine across nodes, against a real `nats-server -js`.

mod common;

use common::scenarios::{limits_check, seam_check, snapshot_check};
use common::*;
use serde_json::json;
use switchyard::config::{Config, LiveSubscription};

/// A node whose `open` namespace is received through `live` (one NATS subscription
/// per channel, or one per namespace).
fn live_config(nats: &NatsServer, node: &str, live: LiveSubscription) -> Config {
    let mut c = cluster_config(nats, node);
    if let Some(open) = c.namespaces.get_mut("open") {
        open.live_subscription = live;
    }
    c
}

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
    seam_across_nodes(LiveSubscription::Channel).await;
}

/// The same with one live subscription per namespace on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seam_across_nodes_with_a_namespace_wide_subscription() {
    seam_across_nodes(LiveSubscription::Namespace).await;
}

async fn seam_across_nodes(live: LiveSubscription) {
    let nats = NatsServer::start();
    let a = start(live_config(&nats, "a", live)).await;
    let b = start(live_config(&nats, "b", live)).await;
    let c = start(live_config(&nats, "c", live)).await;
    seam_check(vec![a.addr, b.addr, c.addr], "open.seam").await;
}

/// NATS goes away mid-stream: readiness drops, publishes fail fast with the
/// retryable code, subscriptions survive; after NATS returns the stream continues
/// with nothing lost and nothing repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_fails_fast_then_resumes_without_loss() {
    nats_outage(LiveSubscription::Channel).await;
}

/// The same with one live subscription per namespace: after the reconnection every
/// channel the node holds reads what it missed from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_with_a_namespace_wide_subscription() {
    nats_outage(LiveSubscription::Namespace).await;
}

async fn nats_outage(live: LiveSubscription) {
    let mut nats = NatsServer::start();
    let a = start(live_config(&nats, "a", live)).await;
    let b = start(live_config(&nats, "b", live)).await;
    let mut sub = connect_as(b.addr, "reader", &[]).await;
    sub.subscribe("open.outage").await;
    let mut publisher = connect_as(a.addr, "writer", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..10 {
        seqs.push(publisher.publish("open.outage", json!(i)).await);
    }

    nats.stop();
    // The node notices the disconnection; until then publishes time out quickly anyway.
    let started = tokio::time::Instant::now();
    // A 113's outcome is unknown (docs/protocol.md): async-nats may still send this
    // publish once NATS is back. Like every publish below it carries a msg_id, so
    // the retries the protocol asks for cannot store it twice.
    let lost = json!({"type": "publish", "channel": "open.outage", "data": "lost?", "msg_id": "outage-lost"});
    let (r, _) = publisher.request(lost.clone()).await;
    assert_eq!(
        (r["type"].as_str(), r["code"].as_u64()),
        (Some("error"), Some(113)),
        "{r}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "fails fast, no hang"
    );
    let (status, _) = http(a.addr, "GET", "/readyz", &[], None).await;
    assert_eq!(status, 503, "not ready without NATS");

    nats.restart();
    // A client retries a retryable error; the first success proves the node reconnected.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut i = 10;
    while seqs.len() < 20 {
        let msg_id = format!("outage-{i}");
        let (r, _) = publisher
            .request(
                json!({"type": "publish", "channel": "open.outage", "data": i, "msg_id": msg_id}),
            )
            .await;
        match r["type"].as_str() {
            Some("published") => {
                seqs.push(r["seq"].as_u64().unwrap());
                i += 1;
            }
            _ => {
                assert_eq!(r["code"], 113, "{r}");
                assert!(tokio::time::Instant::now() < deadline, "NATS came back");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // Ready again (the client may still settle its reconnection for a moment).
    eventually(WAIT, "ready after NATS is back", || async {
        (http(a.addr, "GET", "/readyz", &[], None).await.0 == 200).then_some(())
    })
    .await;
    // The publish answered 113, retried: stored once, whether or not it was before.
    let (r, _) = publisher.request(lost).await;
    assert_eq!(r["type"], "published", "{r}");
    seqs.push(r["seq"].as_u64().unwrap());
    seqs.sort_unstable();
    let mut got = Vec::new();
    for _ in &seqs {
        got.push(sub.recv_type("msg").await["seq"].as_u64().unwrap());
    }
    assert_eq!(got, seqs, "every publication once, in order");
    let after = sub.ping().await;
    assert!(
        after.iter().all(|f| f["type"] != "msg"),
        "no duplicates: {after:?}"
    );
}

/// Live messages a node never received (here: stored while the stream's republish
/// was switched off) are fetched from the stream when the next live message does
/// not chain to the last one delivered, before that message is delivered; a burst
/// that arrives during the repair follows it, in order and once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_in_live_delivery_are_repaired_from_the_stream() {
    live_gap_repair(LiveSubscription::Channel).await;
}

/// The same with one live subscription per namespace. The burst (800) outgrows what
/// the node holds for a channel under repair (256), so its rest is read from the
/// stream as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_repaired_with_a_namespace_wide_subscription() {
    live_gap_repair(LiveSubscription::Namespace).await;
}

async fn live_gap_repair(live: LiveSubscription) {
    // A repair of 3,000 publications (one direct get each) outlasts the burst.
    const HIDDEN: usize = 3_000;
    const BURST: usize = 800;
    let nats = NatsServer::start();
    let a = start(live_config(&nats, "a", live)).await;
    let b = start(live_config(&nats, "b", live)).await;
    let mut reader = connect_as(b.addr, "reader", &[]).await;
    reader.subscribe("open.gap").await;
    let mut writer = connect_as(a.addr, "writer", &[]).await;
    let first = writer.publish("open.gap", json!("before")).await;
    assert_eq!(reader.recv_type("msg").await["seq"], first);

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    // Publishes `n` pipelined: every one is sent before the first ack is awaited.
    async fn publish_all(js: &async_nats::jetstream::Context, from: usize, n: usize) -> Vec<u64> {
        let mut acks = Vec::new();
        for i in from..from + n {
            let payload = format!("{{\"i\":{i}}}");
            acks.push(js.publish("sy.open.gap", payload.into()).await.unwrap());
        }
        let mut seqs = Vec::new();
        for ack in acks {
            seqs.push(ack.await.unwrap().sequence);
        }
        seqs
    }
    // The reader reads while this runs: the repair delivers faster than an outbox holds.
    let publishing = tokio::spawn(async move {
        let mut stream = js.get_stream("SY_OPEN").await.unwrap();
        let mut cfg = stream.info().await.unwrap().config.clone();
        let republish = cfg.republish.take();
        js.update_stream(cfg.clone()).await.unwrap();
        let mut expected = publish_all(&js, 0, HIDDEN).await;
        cfg.republish = republish;
        js.update_stream(cfg).await.unwrap();
        expected.extend(publish_all(&js, HIDDEN, BURST).await);
        expected
    });
    let mut got = Vec::new();
    while got.len() < HIDDEN + BURST {
        let m = reader.recv_type("msg").await;
        got.push((m["seq"].as_u64().unwrap(), m["data"]["i"].as_u64().unwrap()));
    }
    let expected: Vec<(u64, u64)> = publishing.await.unwrap().into_iter().zip(0..).collect();
    assert!(got == expected, "repaired, then the burst, in order");
    let after = reader.ping().await;
    assert!(
        after.iter().all(|f| f["type"] != "msg"),
        "nothing twice: {after:?}"
    );
}

/// Live subscriptions of one node's NATS connection, from the server's monitoring endpoint.
async fn live_subscriptions(nats: &NatsServer, node: &str) -> usize {
    let (status, connz) = http(nats.monitor, "GET", "/connz?subs=1&limit=100", &[], None).await;
    assert_eq!(status, 200);
    connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] == node)
        .flat_map(|c| {
            c["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|s| s.as_str().is_some_and(|s| s.starts_with("live.")))
        .count()
}

/// Interest-based fan-out: each node subscribes to the live subjects of the
/// channels its own clients use, and only those; releasing the last local
/// subscriber releases the live subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_hold_live_subscriptions_only_for_their_own_channels() {
    let nats = NatsServer::start();
    let nodes = [
        start(cluster_config(&nats, "a")).await,
        start(cluster_config(&nats, "b")).await,
        start(cluster_config(&nats, "c")).await,
    ];
    // 1,000 channels, channel i subscribed on node i % 3 (by two clients on node a's
    // share, to show one live subscription serves many local subscribers).
    let mut clients = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut c = connect_as(node.addr, &format!("user{n}"), &[]).await;
        for i in (n..1000).step_by(3) {
            c.send(json!({"type": "subscribe", "channel": format!("open.c{i}"), "id": i}))
                .await;
        }
        for _ in (n..1000).step_by(3) {
            assert_eq!(c.recv_type("subscribed").await["type"], "subscribed");
        }
        clients.push(c);
    }
    let mut second = connect_as(nodes[0].addr, "user0b", &[]).await;
    second.subscribe("open.c0").await;
    second.subscribe("open.c3").await;
    let expected = [334, 333, 333];
    for (n, name) in ["a", "b", "c"].iter().enumerate() {
        assert_eq!(
            live_subscriptions(&nats, name).await,
            expected[n],
            "node {name}"
        );
    }

    // A message on c1 goes to node b only; nodes a and c never see its subject.
    let seq = clients[0].publish("open.c1", json!("to b")).await;
    assert_eq!(clients[1].recv_type("msg").await["seq"], seq);

    // Unsubscribing c0 on node a leaves the second local subscriber, which still
    // gets the channel live through the node's one live subscription.
    clients[0]
        .call(
            json!({"type": "unsubscribe", "channel": "open.c0"}),
            "unsubscribed",
        )
        .await;
    let seq = clients[1].publish("open.c0", json!("still there")).await;
    assert_eq!(second.recv_type("msg").await["seq"], seq);
    // Dropping the second client releases c0 and c3 entirely: c3 is still held by client 0.
    drop(second);
    let deadline = tokio::time::Instant::now() + WAIT;
    while live_subscriptions(&nats, "a").await != 333 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the live subscription of open.c0 is released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// With `live_subscription = "namespace"` a node holds one live subscription for
/// the namespace however many of its channels it serves, delivers each of them in
/// order, nothing of the channels it does not hold, and a channel released and
/// taken again is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_wide_subscription_serves_every_channel_of_a_node() {
    let nats = NatsServer::start();
    let live = LiveSubscription::Namespace;
    let a = start(live_config(&nats, "a", live)).await;
    let b = start(live_config(&nats, "b", live)).await;
    let mut on_b = connect_as(b.addr, "bob", &[]).await;
    for i in 0..100 {
        on_b.send(json!({"type": "subscribe", "channel": format!("open.p{i}"), "id": i}))
            .await;
    }
    for _ in 0..100 {
        on_b.recv_type("subscribed").await;
    }
    assert_eq!(
        live_subscriptions(&nats, "b").await,
        1,
        "one for 100 channels"
    );
    assert_eq!(
        live_subscriptions(&nats, "a").await,
        0,
        "none before a watch"
    );

    // Interleaved over three channels, plus one that node b does not hold.
    let mut writer = connect_as(a.addr, "writer", &[]).await;
    let mut want: Vec<Vec<u64>> = vec![Vec::new(); 3];
    for k in 0..30 {
        writer.publish("open.elsewhere", json!(k)).await;
        want[k % 3].push(writer.publish(&format!("open.p{}", k % 3), json!(k)).await);
    }
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); 3];
    for _ in 0..30 {
        let m = on_b.recv_type("msg").await;
        let channel = m["channel"].as_str().unwrap();
        let i: usize = channel.strip_prefix("open.p").unwrap().parse().unwrap();
        got[i].push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(
        got, want,
        "each channel in order, nothing of open.elsewhere"
    );

    // Released and taken again: delivered once, from the new subscription on.
    on_b.call(
        json!({"type": "unsubscribe", "channel": "open.p0"}),
        "unsubscribed",
    )
    .await;
    writer.publish("open.p0", json!("while away")).await;
    on_b.subscribe("open.p0").await;
    let seq = writer.publish("open.p0", json!("back")).await;
    assert_eq!(on_b.recv_type("msg").await["seq"], seq);
    let after = on_b.ping().await;
    assert!(
        after.iter().all(|f| f["type"] != "msg"),
        "nothing twice: {after:?}"
    );
}

/// A stream deleted and recreated under a running node is a new incarnation:
/// positions from the old one are not recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreated_stream_is_a_new_epoch() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "c", &[]).await;
    for i in 0..5 {
        c.publish("open.x", json!(i)).await;
    }
    let h = c
        .call(
            json!({"type": "history", "channel": "open.x", "limit": 1}),
            "history",
        )
        .await;
    let old_epoch = h["position"]["epoch"].as_str().unwrap().to_string();

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    js.delete_stream("SY_OPEN").await.unwrap();
    // Another node starting provisions the stream afresh.
    let _b = start(cluster_config(&nats, "b")).await;

    let r = c
        .call(json!({"type": "subscribe", "channel": "open.x", "since": {"seq": 3, "epoch": old_epoch}}), "subscribed")
        .await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_ne!(r["position"]["epoch"].as_str(), Some(old_epoch.as_str()));
    assert_eq!(r["replayed"], 0, "the new stream is empty");
}

/// A stream deleted under a running node: its publishes are refused (NATS has no
/// responder for the subject), and stored again once the stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_to_a_deleted_stream_are_refused_until_it_is_back() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "c", &[]).await;
    c.publish("open.gone", json!(1)).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    js.delete_stream("SY_OPEN").await.unwrap();

    let r = refused_113(&mut c, "open.gone", json!(2)).await;
    assert!(r.contains("no stream"), "{r}");

    // Another node starting provisions the stream afresh; the same connection goes on.
    let _b = start(cluster_config(&nats, "b")).await;
    assert_eq!(c.publish("open.gone", json!(3)).await, 1);
}

/// JetStream's own refusal (here: a message over the stream's size limit) reaches
/// the client with JetStream's reason; the connection's next publish is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_refusals_reach_the_client_with_the_reason() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "c", &[]).await;
    let first = c.publish("open.sized", json!(1)).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let mut config = js
        .get_stream("SY_OPEN")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_message_size = 512;
    js.update_stream(config).await.unwrap();

    let big = "x".repeat(1_000);
    let r = refused_113(&mut c, "open.sized", json!(big)).await;
    assert!(r.contains("message size exceeds maximum allowed"), "{r}");
    assert!(r.contains("err_code 10054"), "{r}");
    assert_eq!(c.publish("open.sized", json!(2)).await, first + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_false_checks_and_names_the_missing_stream() {
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats, "a");
    cfg.nats.provision = false;
    let a = switchyard::server::start(cfg).await.unwrap();
    let body = eventually(WAIT, "the missing streams are named", || async {
        let (_, body) = http(a.addr, "GET", "/readyz", &[], None).await;
        let why = body["unavailable_namespaces"]["open"]
            .as_str()
            .unwrap_or("");
        why.contains("missing").then_some(body)
    })
    .await;
    let why = body["unavailable_namespaces"]["open"].as_str().unwrap();
    assert!(why.contains("SY_OPEN") && why.contains("missing"), "{body}");

    // Once the streams exist (provisioned by another node), it serves them.
    let _provisioner = start(cluster_config(&nats, "p")).await;
    eventually(WAIT, "every stream found", || async {
        let (s, body) = http(a.addr, "GET", "/readyz", &[], None).await;
        (s == 200 && body.get("unavailable_namespaces").is_none()).then_some(())
    })
    .await;
    let mut c = connect_as(a.addr, "u", &[]).await;
    c.publish("open.found", json!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_provision_idempotently() {
    let nats = NatsServer::start();
    let (a, b, c) = tokio::join!(
        start(cluster_config(&nats, "a")),
        start(cluster_config(&nats, "b")),
        start(cluster_config(&nats, "c")),
    );
    let mut on_c = connect_as(c.addr, "r", &[]).await;
    on_c.subscribe("open.boot").await;
    let mut on_a = connect_as(a.addr, "w", &[]).await;
    let seq = on_a.publish("open.boot", json!(1)).await;
    assert_eq!(on_c.recv_type("msg").await["seq"], seq);
    drop(b);
}

/// A node starts while NATS is down (as gateway pods beside NATS pods do): not
/// ready, with the reason, upgrades refused with 503; ready once NATS is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_nats_is_down_becomes_ready_when_it_comes_up() {
    let mut nats = NatsServer::start();
    nats.stop();
    let gw = switchyard::server::start(cluster_config(&nats, "early"))
        .await
        .expect("starts without NATS");
    let (s, body) = http(gw.addr, "GET", "/readyz", &[], None).await;
    assert_eq!(
        (s, &body["status"]),
        (503, &json!("backbone unreachable")),
        "{body}"
    );
    let reasons = body["reasons"].to_string();
    assert!(
        reasons.contains("not connected") && reasons.contains(&nats.url),
        "{body}"
    );
    let t = token("u", &[], std::time::Duration::from_secs(60));
    let refused = try_connect_with(gw.addr, "", &[("authorization", &format!("Bearer {t}"))])
        .await
        .err()
        .expect("upgrades are refused while not ready");
    assert_eq!((refused.status, &refused.body["code"]), (503, &json!(503)));
    assert!(refused.body["error"]
        .as_str()
        .unwrap()
        .contains("not ready"));

    nats.restart();
    let up = std::time::Instant::now();
    eventually(WAIT, "ready once NATS is up", || async {
        (http(gw.addr, "GET", "/readyz", &[], None).await.0 == 200).then_some(())
    })
    .await;
    eprintln!(
        "ready {} ms after nats-server was",
        up.elapsed().as_millis()
    );
    let mut c = connect_as(gw.addr, "u", &[]).await;
    c.subscribe("open.late").await;
    let seq = c.publish("open.late", json!(1)).await;
    assert_eq!(c.recv_type("msg").await["seq"], seq);
}

/// A stream that cannot be had (three replicas on a single server) leaves the
/// other namespaces, and readiness, alone; `/readyz` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_be_provisioned_does_not_block_the_others() {
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats, "a");
    if let Some(trim) = cfg.namespaces.get_mut("trim") {
        trim.stream_replicas = 3;
    }
    let gw = switchyard::server::start(cfg).await.unwrap();
    let body = eventually(WAIT, "ready, with the trim namespace named", || async {
        let (s, body) = http(gw.addr, "GET", "/readyz", &[], None).await;
        (s == 200 && body["unavailable_namespaces"]["trim"].is_string()).then_some(body)
    })
    .await;
    assert!(
        body["unavailable_namespaces"]["trim"]
            .as_str()
            .unwrap()
            .contains("SY_TRIM"),
        "{body}"
    );
    assert!(
        body["unavailable_namespaces"].get("open").is_none(),
        "{body}"
    );
    let mut c = connect_as(gw.addr, "u", &[]).await;
    let seq = c.publish("open.fine", json!(1)).await;
    assert!(seq > 0);
    let r = refused_113(&mut c, "trim.x", json!(1)).await;
    assert!(r.contains("SY_TRIM"), "{r}");
}

/// `nats.url` names a cluster: several servers, in the comma form or as a list;
/// a node connects while the first one listed is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_nats_servers_and_the_first_is_down() {
    let nats = NatsServer::start();
    let dead = free_port();
    let mut cfg = cluster_config(&nats, "a");
    cfg.nats.url = format!("nats://127.0.0.1:{dead}, {}", nats.url);
    let a = start(cfg).await;
    let mut c = connect_as(a.addr, "u", &[]).await;
    c.subscribe("open.multi").await;
    let seq = c.publish("open.multi", json!(1)).await;
    assert_eq!(c.recv_type("msg").await["seq"], seq);
    // A malformed entry is refused at start, naming the key and the entry.
    let mut cfg = cluster_config(&nats, "b");
    cfg.nats.url = format!("{},nats://[broken", nats.url);
    let err = cfg.validate().expect_err("refused");
    assert!(
        err.0.contains("nats.url") && err.0.contains("broken"),
        "{}",
        err.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_authentication() {
    let nats = NatsServer::start_with("authorization { token: \"s3cret-token\" }");
    // Without the token the node starts, and is not ready for the reason NATS gave.
    let anon = switchyard::server::start(cluster_config(&nats, "anon"))
        .await
        .unwrap();
    let body = eventually(WAIT, "the authorization error is reported", || async {
        let (s, body) = http(anon.addr, "GET", "/readyz", &[], None).await;
        let reasons = body["reasons"].to_string().to_lowercase();
        (s == 503 && reasons.contains("last error")).then_some(body)
    })
    .await;
    assert_eq!(body["status"], "backbone unreachable");
    // Only the server's refusal of the connection says this (a NATS that is down or
    // unreachable leaves "not connected" without it).
    let reasons = body["reasons"].to_string().to_lowercase();
    assert!(reasons.contains("authorization violation"), "{reasons}");
    let refused = connect_refusal(anon.addr).await;
    assert_eq!(refused, 503, "a node refused by NATS takes no clients");

    let mut cfg = cluster_config(&nats, "a");
    cfg.nats.token = Some("s3cret-token".into());
    let a = start(cfg).await;
    let mut c = connect_as(a.addr, "u", &[]).await;
    c.subscribe("open.auth").await;
    let seq = c.publish("open.auth", json!("ok")).await;
    assert_eq!(c.recv_type("msg").await["seq"], seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_options_shape_the_streams() {
    let nats = NatsServer::start();
    let mut cfg = cluster_config(&nats, "a");
    if let Some(prices) = cfg.namespaces.get_mut("prices") {
        prices.stream_storage = switchyard::config::StreamStorage::Memory;
    }
    let _a = start(cfg).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let info = js
        .get_stream("SY_PRICES")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    assert_eq!(info.config.max_messages_per_subject, 1, "history_size");
    assert_eq!(info.config.subjects, vec!["sy.prices.>".to_string()]);
    let republish = info
        .config
        .republish
        .expect("republish to the live subjects");
    assert_eq!(
        (republish.source.as_str(), republish.destination.as_str()),
        ("sy.prices.>", "live.prices.>")
    );
    assert!(info.config.allow_direct);
    let chat = js
        .get_stream("SY_CHAT")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        chat.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(chat.config.max_messages_per_subject, 10_000);
}

/// Without trace export a node makes no spans, but a caller's W3C trace context (the
/// `publish` frame's `traceparent`, the API's header) travels into NATS as it came,
/// and a publication without one carries none. (With export, tests/otlp.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_forward_the_callers_w3c_traceparent() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "u", &[]).await;
    let from_frame = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let frame_seq = c
        .call(
            json!({"type": "publish", "channel": "open.traced", "data": 1, "traceparent": from_frame}),
            "published",
        )
        .await["seq"]
        .as_u64()
        .unwrap();
    let from_header = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, reply) = http(
        a.addr,
        "POST",
        "/api/v1/publish",
        &[
            ("authorization", &format!("apikey {API_KEY}")),
            ("traceparent", from_header),
        ],
        Some(&json!({"channel": "open.traced", "data": 2}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let api_seq = reply["seq"].as_u64().unwrap();
    let untraced_seq = c.publish("open.traced", json!(3)).await;

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    let stream = js.get_stream("SY_OPEN").await.unwrap();
    let traceparent = |m: &async_nats::jetstream::message::StreamMessage| {
        m.headers.get("traceparent").map(|v| v.as_str().to_string())
    };
    let m = stream.direct_get(frame_seq).await.unwrap();
    assert_eq!(traceparent(&m).as_deref(), Some(from_frame));
    let m = stream.direct_get(api_seq).await.unwrap();
    assert_eq!(traceparent(&m).as_deref(), Some(from_header));
    let m = stream.direct_get(untraced_seq).await.unwrap();
    assert_eq!(traceparent(&m), None, "no caller context, no header");
}

/// Snapshots come from the stream: the latest price first, on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_the_latest_publications_from_the_stream() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let b = start(cluster_config(&nats, "b")).await;
    snapshot_check(a.addr, b.addr).await;
}

/// When nothing of a channel is left in the stream (expired, or purged as here),
/// a position before what was removed is not recovered: nothing is silently skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_with_everything_removed_is_not_recovered() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "c", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(c.publish("open.gone", json!(i)).await);
    }
    let h = c
        .call(
            json!({"type": "history", "channel": "open.gone", "limit": 1}),
            "history",
        )
        .await;
    let epoch = h["position"]["epoch"].as_str().unwrap().to_string();

    let js = async_nats::jetstream::new(async_nats::connect(&nats.url).await.unwrap());
    js.get_stream("SY_OPEN")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    let r = c
        .call(json!({"type": "subscribe", "channel": "open.gone", "since": {"seq": seqs[1], "epoch": epoch}}), "subscribed")
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["replayed"].as_u64()),
        (Some(false), Some(0)),
        "{r}"
    );
    // A client that had everything is still recovered.
    let mut d = connect_as(a.addr, "d", &[]).await;
    let r = d
        .call(json!({"type": "subscribe", "channel": "open.gone", "since": {"seq": seqs[4], "epoch": epoch}}), "subscribed")
        .await;
    assert_eq!(r["recovered"], true, "{r}");
}

/// The same extreme positions on the NATS engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_positions_on_the_stream() {
    let nats = NatsServer::start();
    let a = start(cluster_config(&nats, "a")).await;
    let mut c = connect_as(a.addr, "edge", &[]).await;
    c.publish("open.edge", json!(1)).await;
    let h = c
        .call(
            json!({"type": "history", "channel": "open.edge", "limit": 1}),
            "history",
        )
        .await;
    let epoch = h["position"]["epoch"].as_str().unwrap().to_string();
    let since = json!({"seq": u64::MAX, "epoch": epoch});
    let r = c
        .call(
            json!({"type": "subscribe", "channel": "open.edge", "since": since}),
            "subscribed",
        )
        .await;
    assert_eq!(
        (r["recovered"].as_bool(), r["replayed"].as_u64()),
        (Some(true), Some(0))
    );
    let h = c
        .call(
            json!({"type": "history", "channel": "open.edge", "since": since, "limit": u64::MAX}),
            "history",
        )
        .await;
    assert_eq!(
        h["publications"],
        json!([]),
        "nothing after the largest seq"
    );
    limits_check(&mut c, "open.edge2").await;
    c.ping().await;
}

/// A 3-server JetStream cluster with R3 streams: the stream leader is SIGKILLed
/// mid-stream and restarted; a publisher that retries 113 with the same `msg_id`
/// and subscribers on two nodes all end with exactly the acked sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_streams_survive_a_stream_leader_kill() {
    let mut cluster = NatsCluster::start();
    let node = |id: &str| {
        let mut c = config();
        c.engine.kind = switchyard::config::EngineKind::Nats;
        c.nats.url = cluster.urls();
        c.server.node_id = id.to_string();
        if let Some(open) = c.namespaces.get_mut("open") {
            open.stream_replicas = 3;
        }
        c
    };
    let a = start(node("a")).await;
    let b = start(node("b")).await;
    let ch = "open.ha";
    let mut on_a = connect_as(a.addr, "sa", &[]).await;
    let mut on_b = connect_as(b.addr, "sb", &[]).await;
    on_a.subscribe(ch).await;
    on_b.subscribe(ch).await;
    let mut publisher = connect_as(a.addr, "p", &[]).await;
    let js = async_nats::jetstream::new(
        async_nats::connect(cluster.urls().split(',').collect::<Vec<_>>())
            .await
            .unwrap(),
    );
    let mut acked: Vec<u64> = Vec::new();
    let mut retries = 0;
    let mut killed = None;
    let mut stalled = std::time::Duration::ZERO;
    for i in 0..300 {
        if i == 100 {
            let mut stream = js.get_stream("SY_OPEN").await.unwrap();
            let info = stream.info().await.unwrap();
            let leader = info
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .expect("a leader");
            let n: usize = leader.trim_start_matches('n').parse().unwrap();
            cluster.servers[n - 1].kill();
            killed = Some(n - 1);
        }
        if i == 200 {
            if let Some(n) = killed {
                cluster.servers[n].restart();
            }
        }
        let started = std::time::Instant::now();
        loop {
            let (r, _) = publisher
                .request(
                    json!({"type": "publish", "channel": ch, "data": i, "msg_id": format!("m{i}")}),
                )
                .await;
            if r["type"] == "published" {
                let seq = r["seq"].as_u64().unwrap();
                if acked.last() != Some(&seq) {
                    acked.push(seq);
                }
                break;
            }
            assert_eq!(r["code"], 113, "only retryable errors: {r}");
            retries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        stalled = stalled.max(started.elapsed());
    }
    eprintln!(
        "leader kill: longest publish stall {} ms, {retries} retries of 113",
        stalled.as_millis()
    );
    assert_eq!(acked.len(), 300, "one publication per msg_id");
    for c in [&mut on_a, &mut on_b] {
        for want in &acked {
            assert_eq!(&c.recv_type("msg").await["seq"], want);
        }
        c.ping().await;
    }
}

/// The HTTP status of a WebSocket upgrade to `addr`.
async fn connect_refusal(addr: std::net::SocketAddr) -> u16 {
    let t = token("u", &[], std::time::Duration::from_secs(60));
    match try_connect_with(addr, "", &[("authorization", &format!("Bearer {t}"))]).await {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

/// Publishes `data` to `channel` and returns the reason of the 113 it must get.
async fn refused_113(c: &mut Client, channel: &str, data: serde_json::Value) -> String {
    let (r, _) = c
        .request(json!({"type": "publish", "channel": channel, "data": data}))
        .await;
    assert_eq!(
        (&r["type"], &r["code"]),
        (&json!("error"), &json!(113)),
        "{r}"
    );
    r["reason"].as_str().unwrap_or_default().to_string()
}
