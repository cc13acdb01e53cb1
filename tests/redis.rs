//! Cluster-wide presence, acked cursors, the control bus and the node registry,
//! against a real `redis-server` and a real `nats-server -js`.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::auth::Claims;
use switchyard::channel::Channel;
use switchyard::engine::ClientInfo;

fn members(reply: &Value) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = reply["clients"]
        .as_array()
        .expect("a clients list")
        .iter()
        .map(|c| {
            (
                c["user"].as_str().unwrap().to_string(),
                c["node"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    m.sort();
    m
}

fn pair(user: &str, node: &str) -> (String, String) {
    (user.to_string(), node.to_string())
}

/// A gateway as a separate process, so it can be killed without any cleanup.
struct NodeProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    async fn start(nats: &NatsServer, redis: &RedisServer, id: &str) -> NodeProcess {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("node.toml");
        std::fs::write(
            &conf,
            format!(
                r#"
[server]
listen = "127.0.0.1:{port}"
node_id = "{id}"
[auth]
hmac_secret = "{SECRET}"
[api]
key = "{API_KEY}"
[engine]
kind = "nats"
[nats]
url = "{}"
[redis]
url = "{}"
heartbeat_interval = "250ms"
presence_ttl = "1s"
[log]
level = "warn"
[namespaces.chat]
history_size = 10000
max_replay = 10000
client_publish = true
presence = true
join_leave = true
acked = true
"#,
                nats.url, redis.url
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("serve")
            .arg("--config")
            .arg(&conf)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        eventually(WAIT, "the node process is ready", || async move {
            let ok = tokio::net::TcpStream::connect(addr).await.is_ok()
                && http(addr, "GET", "/readyz", &[], None).await.0 == 200;
            ok.then_some(())
        })
        .await;
        NodeProcess {
            child,
            addr,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn presence_of(addr: std::net::SocketAddr, channel: &str) -> Vec<(String, String)> {
    let (status, body) = api(addr, "GET", &format!("/api/v1/presence/{channel}"), None).await;
    assert_eq!(status, 200, "{body}");
    members(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_nodes_and_a_killed_node_drops_out_within_the_ttl() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let mut d = NodeProcess::start(&nats, &redis, "d").await;

    let mut u1 = connect_as(a.addr, "u1", CHAT_CAPS).await;
    let mut u2 = connect_as(b.addr, "u2", CHAT_CAPS).await;
    let mut u3 = connect_as(d.addr, "u3", CHAT_CAPS).await;
    for c in [&mut u1, &mut u2, &mut u3] {
        c.subscribe("chat.room.1").await;
    }
    let everyone = vec![pair("u1", "a"), pair("u2", "b"), pair("u3", "d")];
    // A member is written to Redis just after its `subscribed` reply.
    eventually(WAIT, "every member in presence", || async {
        (presence_of(b.addr, "chat.room.1").await == everyone).then_some(())
    })
    .await;
    let r = u1
        .call(
            json!({"type": "presence", "channel": "chat.room.1"}),
            "presence",
        )
        .await;
    assert_eq!(members(&r), everyone, "the client frame sees every node");
    assert_eq!(presence_of(b.addr, "chat.room.1").await, everyone);
    let (_, stats) = api(a.addr, "GET", "/api/v1/presence/chat.room.1/stats", None).await;
    assert_eq!((&stats["clients"], &stats["users"]), (&json!(3), &json!(3)));

    let (_, user) = api(a.addr, "GET", "/api/v1/users/u3", None).await;
    assert_eq!(user["online"], true, "{user}");
    assert_eq!(user["connections"][0]["node"], "d");
    let (_, nodes) = api(a.addr, "GET", "/api/v1/nodes", None).await;
    let ids: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "d"], "{nodes}");
    eventually(WAIT, "d's heartbeat reports its connection", || async {
        let (_, nodes) = api(a.addr, "GET", "/api/v1/nodes", None).await;
        (nodes["nodes"][2]["connections"] == 1).then_some(())
    })
    .await;

    // Leaving removes at once.
    u2.call(
        json!({"type": "unsubscribe", "channel": "chat.room.1"}),
        "unsubscribed",
    )
    .await;
    assert_eq!(
        presence_of(a.addr, "chat.room.1").await,
        vec![pair("u1", "a"), pair("u3", "d")]
    );

    // A node that dies without a word: its entries go within presence_ttl (1 s).
    d.kill();
    let killed = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), "d's member expires", || async {
        (presence_of(a.addr, "chat.room.1").await == vec![pair("u1", "a")]).then_some(())
    })
    .await;
    assert!(
        killed.elapsed() <= Duration::from_millis(2500),
        "gone within the ttl plus a heartbeat: {:?}",
        killed.elapsed()
    );
    let (_, user) = api(b.addr, "GET", "/api/v1/users/u3", None).await;
    assert_eq!(
        (&user["online"], &user["connections"]),
        (&json!(false), &json!([]))
    );
    let (_, nodes) = api(b.addr, "GET", "/api/v1/nodes", None).await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 2, "{nodes}");
    let (_, stats) = api(b.addr, "GET", "/api/v1/presence/chat.room.1/stats", None).await;
    assert_eq!((&stats["clients"], &stats["users"]), (&json!(1), &json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_reach_subscribers_on_other_nodes() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let mut watcher = connect_as(a.addr, "watcher", CHAT_CAPS).await;
    watcher.subscribe("chat.room.2").await;
    let mut joiner = try_connect_with(
        b.addr,
        "?device=phone",
        &[(
            "authorization",
            &format!(
                "Bearer {}",
                token("joiner", CHAT_CAPS, Duration::from_secs(60))
            ),
        )],
    )
    .await
    .unwrap();
    joiner.subscribe("chat.room.2").await;
    let mut j = watcher.recv_type("join").await;
    if j["user"] == "watcher" {
        // Its own join, delivered locally.
        j = watcher.recv_type("join").await;
    }
    assert_eq!(
        j,
        json!({"type": "join", "channel": "chat.room.2", "user": "joiner", "device": "phone"})
    );
    drop(joiner);
    let l = watcher.recv_type("leave").await;
    assert_eq!(
        (&l["user"], &l["device"]),
        (&json!("joiner"), &json!("phone"))
    );
}

async fn cursors_of(addr: std::net::SocketAddr, user: &str) -> Vec<(String, String, u64)> {
    let (status, body) = api(addr, "GET", &format!("/api/v1/users/{user}/cursors"), None).await;
    assert_eq!(status, 200, "{body}");
    body["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["device"].as_str().unwrap().to_string(),
                c["channel"].as_str().unwrap().to_string(),
                c["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_resumes_from_its_cursor_on_another_node() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let c = start(redis_config(&nats, &redis, "c")).await;
    let ch = "chat.dm.u";
    let mut d1 = connect_device(a.addr, "u", "d1").await;
    let mut d2 = connect_device(b.addr, "u", "d2").await;
    d1.subscribe(ch).await;
    d2.subscribe(ch).await;
    let mut sender = connect_as(c.addr, "friend", CHAT_CAPS).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(sender.publish(ch, json!({"i": i})).await);
    }
    for want in &seqs {
        assert_eq!(&d1.recv_type("msg").await["seq"], want);
    }
    let s = seqs[2];
    d1.send(json!({"type": "ack", "channel": ch, "seq": s}))
        .await;
    d1.ping().await;
    drop(d1);
    // The disconnect writes the cursor; any node reads it from Redis.
    eventually(WAIT, "d1's cursor is stored", || async {
        cursors_of(c.addr, "u")
            .await
            .contains(&("d1".to_string(), ch.to_string(), s))
            .then_some(())
    })
    .await;

    for i in 5..10 {
        seqs.push(sender.publish(ch, json!({"i": i})).await);
    }
    for want in &seqs {
        assert_eq!(&d2.recv_type("msg").await["seq"], want, "d2 got all live");
    }

    // d1 comes back on another node, without `since`.
    let mut d1 = connect_device(c.addr, "u", "d1").await;
    let r = d1.subscribe(ch).await;
    assert_eq!(
        (&r["recovered"], &r["replayed"]),
        (&json!(true), &json!(7)),
        "{r}"
    );
    for (i, want) in seqs[3..].iter().enumerate() {
        let m = d1.recv_type("msg").await;
        assert_eq!((&m["seq"], &m["data"]["i"]), (&json!(want), &json!(i + 3)));
    }
    let later = sender.publish(ch, json!({"i": 10})).await;
    assert_eq!(d1.recv_type("msg").await["seq"], later, "then live");

    // d2's cursor is its own.
    d2.send(json!({"type": "ack", "channel": ch, "seq": seqs[8]}))
        .await;
    d2.ping().await;
    drop(d2);
    eventually(WAIT, "both cursors, independent", || async {
        let mut got = cursors_of(a.addr, "u").await;
        got.sort();
        (got == vec![
            ("d1".to_string(), ch.to_string(), s),
            ("d2".to_string(), ch.to_string(), seqs[8]),
        ])
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_move_forward_only_even_with_racing_connections() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let ch = "chat.room.race";
    // Two connections of the same device on two nodes ack out of order.
    let mut x = connect_device(a.addr, "r", "tab").await;
    let mut y = connect_device(b.addr, "r", "tab").await;
    let mut xs: Vec<u64> = (1..=400).filter(|n| n % 2 == 0).collect();
    let mut ys: Vec<u64> = (1..=399).filter(|n| n % 2 == 1).collect();
    fastrand::shuffle(&mut xs);
    fastrand::shuffle(&mut ys);
    let tx = tokio::spawn(async move {
        for seq in xs {
            x.send(json!({"type": "ack", "channel": ch, "seq": seq}))
                .await;
        }
        x.ping().await;
        x
    });
    let ty = tokio::spawn(async move {
        for seq in ys {
            y.send(json!({"type": "ack", "channel": ch, "seq": seq}))
                .await;
        }
        y.ping().await;
        y
    });
    let (mut x, mut y) = (tx.await.unwrap(), ty.await.unwrap());
    let mut conn = redis.client().await;
    let stored = |conn: &redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("HGET")
                .arg("sy:cursor:r:tab")
                .arg(ch)
                .query_async::<Option<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    eventually(WAIT, "the highest ack is in Redis", || async {
        (stored(&conn).await.as_deref() == Some("400")).then_some(())
    })
    .await;
    // Older acks afterwards, from both nodes, change nothing.
    y.send(json!({"type": "ack", "channel": ch, "seq": 399}))
        .await;
    x.send(json!({"type": "ack", "channel": ch, "seq": 3}))
        .await;
    x.ping().await;
    y.ping().await;
    drop((x, y));
    // A closing connection writes its acks before it leaves the user's presence.
    eventually(WAIT, "both connections closed", || async {
        let (_, user) = api(a.addr, "GET", "/api/v1/users/r", None).await;
        (user["online"] == false).then_some(())
    })
    .await;
    assert_eq!(stored(&conn).await.as_deref(), Some("400"));
    assert_eq!(
        cursors_of(b.addr, "r").await,
        vec![("tab".to_string(), ch.to_string(), 400)]
    );
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    // Huge seqs compare exactly (Lua numbers are doubles).
    let mut z = connect_device(a.addr, "r", "big").await;
    for seq in [u64::MAX - 1, u64::MAX - 2, u64::MAX] {
        z.send(json!({"type": "ack", "channel": ch, "seq": seq}))
            .await;
    }
    z.ping().await;
    drop(z);
    eventually(WAIT, "the huge cursor", || async {
        cursors_of(b.addr, "r")
            .await
            .contains(&("big".to_string(), ch.to_string(), u64::MAX))
            .then_some(())
    })
    .await;
}

fn token_with_id(user: &str, jti: &str) -> String {
    let claims = Claims {
        sub: user.into(),
        exp: now() + 600,
        nbf: None,
        iat: None,
        jti: Some(jti.into()),
        iss: None,
        aud: None,
        caps: vec![switchyard::auth::parse_cap("chat.>=sub").unwrap()],
    };
    sign(&claims, SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_revoke_from_one_node_act_on_all() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let c = start(redis_config(&nats, &redis, "c")).await;

    // One device only.
    let mut phone = connect_device(b.addr, "v", "phone").await;
    let mut laptop = connect_device(c.addr, "v", "laptop").await;
    let (status, body) = api(
        a.addr,
        "POST",
        "/api/v1/users/v/disconnect",
        Some(json!({"device": "phone"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(phone.expect_close().await.0, 4003);
    // A later command on the bus closes a marker on c: c has handled the
    // disconnect by then, and the laptop must still be up.
    let mut marker = connect(c.addr, &token_with_id("m", "marker")).await;
    let (status, _) = api(a.addr, "POST", "/api/v1/tokens/marker/revoke", None).await;
    assert_eq!(status, 200);
    assert_eq!(marker.expect_close().await.0, 4003);
    laptop.ping().await;

    // Every device.
    let mut phone = connect_device(b.addr, "v", "phone").await;
    let (status, _) = api(a.addr, "POST", "/api/v1/users/v/disconnect", None).await;
    assert_eq!(status, 200);
    assert_eq!(phone.expect_close().await.0, 4003);
    assert_eq!(laptop.expect_close().await.0, 4003);

    // Revoking a token id closes its connections everywhere and refuses it.
    let t = token_with_id("w", "tok-42");
    let mut on_b = connect(b.addr, &t).await;
    let mut on_c = connect(c.addr, &t).await;
    let other = token_with_id("w", "tok-43");
    let mut unrelated = connect(c.addr, &other).await;
    let expires_at = now() + 600;
    let (status, body) = api(
        a.addr,
        "POST",
        "/api/v1/tokens/tok-42/revoke",
        Some(json!({ "expires_at": expires_at })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(on_b.expect_close().await.0, 4003);
    assert_eq!(on_c.expect_close().await.0, 4003);
    unrelated.ping().await;
    for addr in [a.addr, b.addr, c.addr] {
        let refused = try_connect_with(addr, "", &[("authorization", &format!("Bearer {t}"))])
            .await
            .err()
            .expect("a revoked token is refused");
        assert_eq!((refused.status, &refused.body["code"]), (401, &json!(206)));
    }
    // A node that starts later loads the revocation from Redis.
    let late = start(redis_config(&nats, &redis, "late")).await;
    let refused = try_connect_with(late.addr, "", &[("authorization", &format!("Bearer {t}"))])
        .await
        .err()
        .expect("refused on a new node too");
    assert_eq!(refused.body["code"], 206);
    let mut conn = redis.client().await;
    let until: Option<f64> = redis::cmd("ZSCORE")
        .arg("sy:revoked")
        .arg("tok-42")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        until.map(|ms| ms as u64),
        Some(expires_at * 1000),
        "kept until the token expires"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_presence_but_not_delivery_and_recovers() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let b = start(redis_config(&nats, &redis, "b")).await;
    let ch = "chat.room.out";
    let mut on_a = connect_device(a.addr, "p", "pa").await;
    let mut on_b = connect_device(b.addr, "q", "qb").await;
    on_a.subscribe(ch).await;
    on_b.subscribe(ch).await;
    // A member is written to Redis just after its `subscribed` reply.
    eventually(WAIT, "both members in presence", || async {
        (presence_of(a.addr, ch).await.len() == 2).then_some(())
    })
    .await;

    redis.stop();
    // Delivery between nodes goes on.
    let seq = on_a.publish(ch, json!("during the outage")).await;
    assert_eq!(on_b.recv_type("msg").await["seq"], seq);
    assert_eq!(on_a.recv_type("msg").await["seq"], seq);
    // Presence reports the degraded code; the client frame and the API.
    let e = on_a
        .call(json!({"type": "presence", "channel": ch}), "error")
        .await;
    assert_eq!(e["code"], 117, "{e}");
    let (status, body) = api(b.addr, "GET", &format!("/api/v1/presence/{ch}"), None).await;
    assert_eq!((status, &body["code"]), (503, &json!(117)));
    // Readiness stays (delivery works) and says Redis is down.
    let (status, ready) = http(a.addr, "GET", "/readyz", &[], None).await;
    assert_eq!((status, &ready["redis"]), (200, &json!("down")), "{ready}");
    // Acks are accepted and buffered, also across a disconnect.
    on_b.send(json!({"type": "ack", "channel": ch, "seq": seq}))
        .await;
    on_b.ping().await;
    drop(on_b);

    redis.restart();
    // Redis came back empty: the nodes write their presence again, and the ack.
    eventually(WAIT, "presence is back", || async {
        let (status, body) = api(a.addr, "GET", &format!("/api/v1/presence/{ch}"), None).await;
        (status == 200 && members(&body) == vec![pair("p", "a")]).then_some(())
    })
    .await;
    let mut conn = redis.client().await;
    let stored: String = eventually(WAIT, "the buffered ack is written", || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("HGET")
                .arg("sy:cursor:q:qb")
                .arg(ch)
                .query_async::<Option<String>>(&mut conn)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    assert_eq!(stored, seq.to_string());
    let (_, ready) = http(a.addr, "GET", "/readyz", &[], None).await;
    assert_eq!(ready["redis"], "up");
    let (status, _) = api(b.addr, "GET", "/api/v1/nodes", None).await;
    assert_eq!(status, 200);
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    // The control bus resubscribed: a disconnect reaches the other node.
    let (status, _) = api(b.addr, "POST", "/api/v1/users/p/disconnect", None).await;
    assert_eq!(status, 200);
    assert_eq!(on_a.expect_close().await.0, 4003);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_of_twenty_thousand_members_skip_the_members_and_pages_cover_them() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let nodes = [
        start(redis_config(&nats, &redis, "a")).await,
        start(redis_config(&nats, &redis, "b")).await,
        start(redis_config(&nats, &redis, "c")).await,
    ];
    let channel = Channel::parse("chat.big").unwrap();
    // Members joined through each node's presence, as sessions do; 4 per user.
    // In bursts of 1000, as a wave of subscribes would come.
    for burst in 0..20u32 {
        let mut joins = Vec::new();
        for i in burst * 1000..(burst + 1) * 1000 {
            let node = &nodes[(i % 3) as usize].node;
            let presence = std::sync::Arc::clone(&node.engine.presence);
            let info = ClientInfo {
                conn_id: format!("{}-{i:05}", node.id),
                user: format!("user{}", i / 4),
                device: format!("dev{i}"),
                node: node.id.clone(),
                since: i as u64,
            };
            let channel = channel.clone();
            joins.push(tokio::spawn(async move {
                presence.join(&channel, info).await.unwrap()
            }));
        }
        for j in joins {
            j.await.unwrap();
        }
    }
    let mut conn = redis.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, stats) = api(
        nodes[0].addr,
        "GET",
        "/api/v1/presence/chat.big/stats",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (&stats["clients"], &stats["users"]),
        (&json!(20_000), &json!(5_000))
    );
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    for loads_members in [
        "cmdstat_hgetall",
        "cmdstat_hvals",
        "cmdstat_hscan",
        "cmdstat_hkeys",
        "cmdstat_zrange:",
        "cmdstat_hget:",
    ] {
        assert!(
            !info.contains(loads_members),
            "stats must not read members ({loads_members}):\n{info}"
        );
    }

    // Pages of at most 1000 (the default cap) cover everyone exactly once.
    let mut seen = HashSet::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/presence/chat.big?limit=5000&cursor={c}"),
            None => "/api/v1/presence/chat.big?limit=5000".to_string(),
        };
        let (status, page) = api(nodes[1].addr, "GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        let clients = page["clients"].as_array().unwrap();
        assert!(clients.len() <= 1000, "capped at presence_page_max");
        for c in clients {
            assert!(
                seen.insert(c["conn_id"].as_str().unwrap().to_string()),
                "no member twice"
            );
        }
        pages += 1;
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 20_000);
    assert!(pages >= 20, "{pages} pages");
    // The client frame pages the same way.
    let mut c = connect_as(nodes[2].addr, "looker", CHAT_CAPS).await;
    let r = c
        .call(
            json!({"type": "presence", "channel": "chat.big", "limit": 10}),
            "presence",
        )
        .await;
    assert_eq!(r["clients"].as_array().unwrap().len(), 10);
    let next = r["next"].as_str().unwrap().to_string();
    let r2 = c
        .call(
            json!({"type": "presence", "channel": "chat.big", "limit": 10, "cursor": next}),
            "presence",
        )
        .await;
    assert_eq!(r2["clients"].as_array().unwrap().len(), 10);
    assert!(r2["clients"][0]["conn_id"].as_str() > Some(next.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_catches_up_when_it_returns() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start();
    redis.stop();
    let a = start(redis_config(&nats, &redis, "a")).await;
    let (status, ready) = http(a.addr, "GET", "/readyz", &[], None).await;
    assert_eq!((status, &ready["redis"]), (200, &json!("down")), "{ready}");
    let mut c = connect_device(a.addr, "early", "e1").await;
    // Resuming from a stored cursor needs Redis: refused with the degraded code.
    let e = c
        .call(
            json!({"type": "subscribe", "channel": "chat.room.early"}),
            "error",
        )
        .await;
    assert_eq!(e["code"], 117, "{e}");
    c.subscribe("lobby.early").await;

    redis.restart();
    let b = start(redis_config(&nats, &redis, "b")).await;
    eventually(WAIT, "a's presence reaches Redis", || async {
        (presence_of(b.addr, "lobby.early").await == vec![pair("early", "a")]).then_some(())
    })
    .await;
    // a subscribed to the control bus once Redis was there.
    let (status, _) = api(b.addr, "POST", "/api/v1/users/early/disconnect", None).await;
    assert_eq!(status, 200);
    assert_eq!(c.expect_close().await.0, 4003);
}

/// Redis primary + replica + 3 sentinels: the primary is SIGKILLed, the sentinels
/// fail over, and presence, acks, disconnect and revoke work again through the new
/// primary, with what was written before intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_keeps_presence_cursors_and_control() {
    let nats = NatsServer::start();
    let mut set = RedisSentinels::start().await;
    let base = redis_config(&nats, &set.primary, "base");
    let sentinels = set.sentinel_addrs.clone();
    let node = |id: &str| {
        let mut c = base.clone();
        c.server.node_id = id.to_string();
        c.redis.url = String::new();
        c.redis.sentinels = sentinels.clone();
        c.redis.master_name = "sy".into();
        c
    };
    let a = start(node("a")).await;
    let b = start(node("b")).await;
    let ch = "chat.room.failover";
    let mut watcher = connect_as(b.addr, "w", CHAT_CAPS).await;
    watcher.subscribe(ch).await;
    let mut d = connect_device(a.addr, "u", "phone").await;
    d.subscribe(ch).await;
    let mut p = connect_as(b.addr, "sender", CHAT_CAPS).await;
    let first = p.publish(ch, json!("before")).await;
    assert_eq!(d.recv_type("msg").await["seq"], first);
    d.send(json!({"type": "ack", "channel": ch, "seq": first}))
        .await;
    close_cleanly(d).await;
    let (s, _) = api(a.addr, "POST", "/api/v1/tokens/old-token/revoke", None).await;
    assert_eq!(s, 200);
    // Everything so far is on the replica before the primary dies.
    let primary = set.primary.client().await;
    eventually(WAIT, "the replica acknowledged every write", || {
        let mut primary = primary.clone();
        async move {
            let synced: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(200)
                .query_async(&mut primary)
                .await
                .ok()?;
            (synced == 1).then_some(())
        }
    })
    .await;
    let old_port = set.primary.port;

    set.primary.stop();
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(20),
        "presence through the new primary",
        || async {
            let (s, stats) =
                api(a.addr, "GET", &format!("/api/v1/presence/{ch}/stats"), None).await;
            // The watcher (entries are rewritten by the heartbeat, as after any outage).
            (s == 200 && stats["clients"] == 1).then_some(())
        },
    )
    .await;
    let back = killed.elapsed();
    assert_ne!(
        set.primary_port().await,
        Some(old_port),
        "the sentinels failed over"
    );
    eprintln!(
        "presence served again {} ms after the primary was killed",
        back.as_millis()
    );

    // The cursor written before survived: the device resumes on the other node.
    let later = p.publish(ch, json!("after")).await;
    let mut d = connect_device(b.addr, "u", "phone").await;
    let r = d.subscribe(ch).await;
    assert_eq!(
        (&r["recovered"], &r["stored_cursor"], &r["replayed"]),
        (&json!(true), &json!(true), &json!(1)),
        "{r}"
    );
    assert_eq!(d.recv_type("msg").await["seq"], later);
    // Acks go to the new primary.
    d.send(json!({"type": "ack", "channel": ch, "seq": later}))
        .await;
    close_cleanly(d).await;
    let (_, cursors) = api(a.addr, "GET", "/api/v1/users/u/cursors", None).await;
    assert_eq!(cursors["cursors"][0]["seq"], later, "{cursors}");
    // The control bus works across nodes again.
    let (s, _) = api(a.addr, "POST", "/api/v1/users/w/disconnect", None).await;
    assert_eq!(s, 200);
    assert_eq!(watcher.expect_close().await.0, 4003);
    // A node started now loads the revocation written before the failover.
    let c = start(node("c")).await;
    let t = sign(
        &switchyard::auth::Claims {
            jti: Some("old-token".into()),
            ..claims("u", now() + 60)
        },
        SECRET,
    );
    let auth = format!("Bearer {t}");
    let refused = eventually(WAIT, "the revoked token is refused", || async {
        try_connect_with(c.addr, "", &[("authorization", &auth)])
            .await
            .err()
    })
    .await;
    assert_eq!(refused.body["code"], 206);
}
