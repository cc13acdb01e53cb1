//! Delivery guarantees of docs/protocol.md ("Subscribing and recovery") on the memory engine.

mod common;

use std::time::Duration;

use common::scenarios::{seam_check, snapshot_check};
use common::*;
use serde_json::{json, Value};

/// Publishers race on one channel while subscribers join at random positions
/// and reconnect from where they stopped: each sees exactly the channel's
/// publications after its first `since`, in order, no gap, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seam_has_no_gap_and_no_duplicate_under_concurrent_publishers() {
    let gw = start(config()).await;
    seam_check(vec![gw.addr], "open.seam").await;
}

async fn subscribe_since(
    c: &mut Client,
    channel: &str,
    seq: u64,
    epoch: &str,
) -> (Value, Vec<u64>) {
    let r = c
        .call(
            json!({"type": "subscribe", "channel": channel, "since": {"seq": seq, "epoch": epoch}}),
            "subscribed",
        )
        .await;
    let n = r["replayed"].as_u64().unwrap();
    let mut seqs = Vec::new();
    for _ in 0..n {
        seqs.push(c.recv_type("msg").await["seq"].as_u64().unwrap());
    }
    (r, seqs)
}

#[tokio::test]
async fn trimmed_history_and_wrong_epoch_are_not_recovered() {
    let gw = start(config()).await;
    let mut p = connect_as(gw.addr, "p", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(p.publish("trim.a", json!(i)).await);
    }
    let epoch = p.subscribe("trim.a").await["position"]["epoch"]
        .as_str()
        .unwrap()
        .to_string();

    // History keeps 5: a position before them cannot be proven complete.
    let mut c = connect_as(gw.addr, "c", &[]).await;
    let (r, got) = subscribe_since(&mut c, "trim.a", seqs[0], &epoch).await;
    assert_eq!(r["recovered"], false);
    assert_eq!(got, seqs[15..].to_vec(), "replays what exists");
    assert_eq!(r["position"]["seq"], seqs[19]);

    // A position inside the retained window is recovered exactly.
    let mut c = connect_as(gw.addr, "c", &[]).await;
    let (r, got) = subscribe_since(&mut c, "trim.a", seqs[16], &epoch).await;
    assert_eq!(r["recovered"], true);
    assert_eq!(got, seqs[17..].to_vec());

    // A position from another stream incarnation is never trusted.
    let mut c = connect_as(gw.addr, "c", &[]).await;
    let (r, got) = subscribe_since(&mut c, "trim.a", seqs[16], "another-epoch").await;
    assert_eq!(r["recovered"], false);
    assert_eq!(got, seqs[15..].to_vec());

    // And it continues live.
    let next = p.publish("trim.a", json!("live")).await;
    assert_eq!(c.recv_type("msg").await["seq"], next);
}

#[tokio::test]
async fn repeated_msg_id_is_one_publication() {
    let gw = start(config()).await;
    let mut sub = connect_as(gw.addr, "s", &[]).await;
    sub.subscribe("open.idem").await;
    let mut p = connect_as(gw.addr, "p", &[]).await;
    let req =
        json!({"type": "publish", "channel": "open.idem", "data": {"n": 1}, "msg_id": "order-42"});
    let first = p.call(req.clone(), "published").await;
    let again = p.call(req, "published").await;
    assert_eq!(first["seq"], again["seq"]);
    assert_eq!(
        (first["duplicate"].as_bool(), again["duplicate"].as_bool()),
        (Some(false), Some(true))
    );

    // The API with the same msg_id in the same namespace folds into it too.
    let auth = format!("apikey {API_KEY}");
    let body = json!({"channel": "open.idem", "data": {"n": 1}, "msg_id": "order-42"}).to_string();
    let (status, r) = http(
        gw.addr,
        "POST",
        "/api/v1/publish",
        &[("authorization", &auth)],
        Some(&body),
    )
    .await;
    assert_eq!(
        (status, &r["seq"], r["duplicate"].as_bool()),
        (200, &first["seq"], Some(true))
    );

    let next = p.publish("open.idem", json!({"n": 2})).await;
    assert_eq!(sub.recv_type("msg").await["seq"], first["seq"]);
    assert_eq!(
        sub.recv_type("msg").await["seq"],
        next,
        "no second copy in between"
    );
}

#[tokio::test]
async fn snapshot_sends_latest_first() {
    let gw = start(config()).await;
    snapshot_check(gw.addr, gw.addr).await;
}

#[tokio::test]
async fn acked_cursor_resumes_offline_device_on_reconnect() {
    let gw = start(config()).await;
    let caps = ["chat.room.>=sub+pub+history+presence"];
    let alice = token("alice", &caps, Duration::from_secs(3600));
    let connect_device = |device: &'static str| {
        let alice = alice.clone();
        async move {
            try_connect_with(gw.addr, &format!("?token={alice}&device={device}"), &[])
                .await
                .unwrap()
        }
    };
    let mut d1 = connect_device("d1").await;
    let mut d2 = connect_device("d2").await;
    d1.subscribe("chat.room.9").await;
    d2.subscribe("chat.room.9").await;
    let mut bob = connect_as(gw.addr, "bob", &caps).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(bob.publish("chat.room.9", json!(i)).await);
    }
    for want in &seqs {
        assert_eq!(&d1.recv_type("msg").await["seq"], want);
    }
    d1.send(json!({"type": "ack", "channel": "chat.room.9", "seq": seqs[2]}))
        .await;
    // An older ack never moves the cursor back.
    d1.send(json!({"type": "ack", "channel": "chat.room.9", "seq": seqs[0]}))
        .await;
    d1.ping().await; // acks have no reply: the pong proves they were processed
    drop(d1);

    for i in 5..8 {
        seqs.push(bob.publish("chat.room.9", json!(i)).await);
    }
    // d2 was online and got everything live.
    for want in &seqs {
        assert_eq!(&d2.recv_type("msg").await["seq"], want);
    }
    // d1 comes back without `since` and gets exactly what it had not acked.
    let mut d1 = connect_device("d1").await;
    let r = d1.subscribe("chat.room.9").await;
    assert_eq!(r["recovered"], true);
    assert_eq!(r["replayed"], 5);
    for want in &seqs[3..] {
        assert_eq!(&d1.recv_type("msg").await["seq"], want);
    }
    // A new device has no cursor: live only.
    let mut d3 = connect_device("d3").await;
    assert_eq!(d3.subscribe("chat.room.9").await["replayed"], 0);

    // ack outside an acked namespace is an error frame.
    let (r, _) = d3
        .request(json!({"type": "ack", "channel": "open.x", "seq": 1}))
        .await;
    assert_eq!(r["code"], 115);
}

#[tokio::test]
async fn history_presence_join_leave_and_unsubscribe() {
    let gw = start(config()).await;
    let caps = ["chat.room.>=sub+pub+history+presence"];
    let mut a = connect_as(gw.addr, "alice", &caps).await;
    let mut b = connect_as(gw.addr, "bob", &caps).await;
    a.subscribe("chat.room.7").await;
    b.subscribe("chat.room.7").await;
    // A subscriber sees its own join first, then later ones.
    assert_eq!(a.recv_type("join").await["user"], "alice");
    let join = a.recv_type("join").await;
    assert_eq!(
        (join["user"].as_str(), join["channel"].as_str()),
        (Some("bob"), Some("chat.room.7"))
    );

    let mut observer = connect_as(gw.addr, "carol", &caps).await;
    observer.subscribe("chat.room.7").await;

    let p = a
        .call(
            json!({"type": "presence", "channel": "chat.room.7"}),
            "presence",
        )
        .await;
    let mut users: Vec<&str> = p["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["alice", "bob", "carol"]);
    assert!(p["clients"][0]["node"].is_string() && p["clients"][0]["device"].is_string());

    let mut seqs = Vec::new();
    for i in 0..4 {
        seqs.push(a.publish("chat.room.7", json!(i)).await);
    }
    let h = a
        .call(
            json!({"type": "history", "channel": "chat.room.7", "limit": 2}),
            "history",
        )
        .await;
    let hs = publication_seqs(&h);
    assert_eq!(hs, seqs[2..].to_vec());
    let epoch = h["position"]["epoch"].as_str().unwrap();
    let h = a
        .call(json!({"type": "history", "channel": "chat.room.7", "since": {"seq": seqs[0], "epoch": epoch}}), "history")
        .await;
    let hs = publication_seqs(&h);
    assert_eq!(hs, seqs[1..].to_vec());
    assert_eq!(h["publications"][0]["data"], 1);

    b.call(
        json!({"type": "unsubscribe", "channel": "chat.room.7"}),
        "unsubscribed",
    )
    .await;
    let leave = a.recv_type("leave").await;
    assert_eq!(leave["user"], "bob");
    let (r, _) = b
        .request(json!({"type": "unsubscribe", "channel": "chat.room.7"}))
        .await;
    assert_eq!(r["code"], 108);
    let (r, _) = a
        .request(json!({"type": "subscribe", "channel": "chat.room.7"}))
        .await;
    assert_eq!(r["code"], 107);

    // Bob no longer receives the channel.
    let after = a.publish("chat.room.7", json!("after")).await;
    let frames = b.ping().await;
    assert!(frames.iter().all(|f| f["type"] != "msg"), "{frames:?}");
    for want in seqs.iter().chain([&after]) {
        assert_eq!(&observer.recv_type("msg").await["seq"], want);
    }
}
