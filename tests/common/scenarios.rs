//! Scenarios both engines must pass, run by `delivery.rs` (memory engine) and
//! `cluster.rs` (NATS, across nodes): the replay→live seam under racing
//! publishers, and snapshots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use super::{api_publish, connect_as, publication_seqs, Client};

const SEAM_PUBLISHERS: usize = 4;
const SEAM_PER_PUBLISHER: usize = 600;
const SEAM_SUBSCRIBERS: usize = 10;
const SEAM_ROUNDS: usize = 3;

/// The seam check (docs/architecture.md, "The seam"): SEAM_PUBLISHERS race on `channel` through the
/// nodes at `addrs` while subscribers join any node at random `since` positions
/// and reconnect to random nodes from where they stopped. Each must see exactly
/// the channel's publications after its first `since`, in order, with the data a
/// probe subscribed from the start saw. The channel must be alone in a fresh
/// namespace stream, so its seqs are 1..=total.
pub async fn seam_check(addrs: Vec<SocketAddr>, channel: &'static str) {
    let addr = addrs[0];
    let total = (SEAM_PUBLISHERS * SEAM_PER_PUBLISHER) as u64;

    // The probe is subscribed before anything is published: it sees the whole channel.
    let mut probe = connect_as(addr, "probe", &[]).await;
    let sub = probe.subscribe(channel).await;
    let epoch = sub["position"]["epoch"].as_str().unwrap().to_string();
    let probe_task = tokio::spawn(async move {
        let mut seen: Vec<(u64, Value)> = Vec::new();
        while seen.len() < total as usize {
            let m = probe.recv_type("msg").await;
            seen.push((m["seq"].as_u64().unwrap(), m["data"].clone()));
        }
        seen
    });

    let mut publishers = Vec::new();
    for p in 0..SEAM_PUBLISHERS {
        let addr = addrs[p % addrs.len()];
        publishers.push(tokio::spawn(async move {
            let mut c = connect_as(addr, &format!("pub{p}"), &[]).await;
            for i in 0..SEAM_PER_PUBLISHER {
                c.publish(channel, json!({"p": p, "i": i})).await;
            }
        }));
    }

    let mut subscribers = Vec::new();
    for s in 0..SEAM_SUBSCRIBERS {
        let epoch = epoch.clone();
        let addrs = addrs.clone();
        subscribers.push(tokio::spawn(async move {
            let first_since = fastrand::u64(0..total / 2);
            let mut since = first_since;
            let mut got: Vec<(u64, Value)> = Vec::new();
            for round in 0..SEAM_ROUNDS {
                // Spread the joins over the publishing period.
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..40))).await;
                // Each round on any node.
                let addr = addrs[fastrand::usize(..addrs.len())];
                let mut c = connect_as(addr, &format!("sub{s}"), &[]).await;
                let r = c
                    .call(json!({"type": "subscribe", "channel": channel, "since": {"seq": since, "epoch": epoch}}), "subscribed")
                    .await;
                assert_eq!(r["recovered"], true, "history covers the whole test: {r}");
                let quota = if round + 1 == SEAM_ROUNDS { usize::MAX } else { fastrand::usize(1..400) };
                let mut n = 0;
                while n < quota && since < total {
                    let m = c.recv_type("msg").await;
                    let seq = m["seq"].as_u64().unwrap();
                    assert!(seq > since, "sub{s} round {round}: seq {seq} after {since}");
                    since = seq;
                    got.push((seq, m["data"].clone()));
                    n += 1;
                }
            }
            (first_since, got)
        }));
    }

    for p in publishers {
        p.await.unwrap();
    }
    let seen = probe_task.await.unwrap();
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "probe sees every seq in order"
    );
    let data: HashMap<u64, Value> = seen.into_iter().collect();

    for (i, s) in subscribers.into_iter().enumerate() {
        let (first_since, got) = s.await.unwrap();
        let expected: Vec<u64> = (first_since + 1..=total).collect();
        let got_seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        if let Some(at) =
            (0..expected.len().max(got_seqs.len())).find(|&k| expected.get(k) != got_seqs.get(k))
        {
            panic!(
                "subscriber {i} from {first_since}: first difference at index {at}: expected {:?}, got {:?} ({} expected, {} got)",
                expected.get(at),
                got_seqs.get(at),
                expected.len(),
                got_seqs.len()
            );
        }
        for (seq, d) in &got {
            assert_eq!(&data[seq], d, "subscriber {i}: data of seq {seq}");
        }
    }
}

/// Snapshots (both engines): prices send their latest publication on subscribe
/// (`default_snapshot = 1`), and `snapshot: N` sends the newest N, then live.
/// Publishes through `publish_on`, subscribes through `subscribe_on`.
pub async fn snapshot_check(publish_on: SocketAddr, subscribe_on: SocketAddr) {
    let mut last = 0;
    for px in ["100.1", "100.2", "100.3"] {
        last = api_publish(publish_on, "prices.BTC-USDT", json!({"price": px})).await;
    }
    let mut c = connect_as(subscribe_on, "t", &[]).await;
    let r = c.subscribe("prices.BTC-USDT").await;
    assert_eq!(r["replayed"], 1, "prices send the latest on subscribe");
    let m = c.recv_type("msg").await;
    assert_eq!(
        (&m["seq"], &m["data"]["price"]),
        (&json!(last), &json!("100.3"))
    );

    let mut w = connect_as(publish_on, "w", &[]).await;
    let mut seqs = Vec::new();
    for i in 0..6 {
        seqs.push(w.publish("open.snap", json!(i)).await);
    }
    let r = c
        .call(
            json!({"type": "subscribe", "channel": "open.snap", "snapshot": 3}),
            "subscribed",
        )
        .await;
    assert_eq!(r["replayed"], 3);
    for want in &seqs[3..] {
        assert_eq!(&c.recv_type("msg").await["seq"], want);
    }
}

/// The largest `limit` and `snapshot` are honoured as "all there is", capped by
/// the namespace (`max_replay`, `history_size`), not refused and not overflowed;
/// a small `limit` gives the newest. Publishes three on `channel` through `c`.
pub async fn limits_check(c: &mut Client, channel: &str) {
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(c.publish(channel, json!(i)).await);
    }
    let h = c
        .call(
            json!({"type": "history", "channel": channel, "limit": u64::MAX}),
            "history",
        )
        .await;
    assert_eq!(publication_seqs(&h), seqs);
    let h = c
        .call(
            json!({"type": "history", "channel": channel, "limit": 2}),
            "history",
        )
        .await;
    assert_eq!(publication_seqs(&h), seqs[1..], "limit 2: the newest two");
    let r = c
        .call(
            json!({"type": "subscribe", "channel": channel, "snapshot": u64::MAX}),
            "subscribed",
        )
        .await;
    assert_eq!(r["replayed"], 3);
    for want in &seqs {
        assert_eq!(c.recv_type("msg").await["seq"], *want);
    }
}
