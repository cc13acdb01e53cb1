//! The server HTTP API (docs/openapi.yaml): key required, publish, broadcast, history, errors.

mod common;

use common::*;
use serde_json::json;

fn auth() -> String {
    format!("apikey {API_KEY}")
}

#[tokio::test]
async fn api_is_closed_without_a_configured_key() {
    let mut cfg = config();
    cfg.api.key = String::new();
    let gw = start(cfg).await;
    for path in ["/api/v1/publish", "/api/v1/history/open.x"] {
        let (status, body) = http(
            gw.addr,
            "POST",
            path,
            &[("authorization", "apikey anything")],
            Some("{}"),
        )
        .await;
        assert_eq!(status, 403, "{path}: {body}");
    }
    // Ops endpoints stay open.
    assert_eq!(http(gw.addr, "GET", "/healthz", &[], None).await.0, 200);
    assert_eq!(http(gw.addr, "GET", "/readyz", &[], None).await.0, 200);
}

#[tokio::test]
async fn wrong_or_missing_key_is_401() {
    let gw = start(config()).await;
    let body = json!({"channel": "open.x", "data": 1}).to_string();
    let (s, _) = http(gw.addr, "POST", "/api/v1/publish", &[], Some(&body)).await;
    assert_eq!(s, 401);
    let (s, _) = http(
        gw.addr,
        "POST",
        "/api/v1/publish",
        &[("authorization", "apikey wrong")],
        Some(&body),
    )
    .await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn publish_broadcast_and_history() {
    let gw = start(config()).await;
    let mut c = connect_as(gw.addr, "reader", &[]).await;
    c.subscribe("open.a").await;
    c.subscribe("open.b").await;

    let seq = api_publish(gw.addr, "open.a", json!({"text": "from backend"})).await;
    let m = c.recv_type("msg").await;
    assert_eq!(
        (m["seq"].as_u64(), &m["data"]["text"]),
        (Some(seq), &json!("from backend"))
    );
    assert!(m.get("from").is_none(), "API publications have no user");

    let body =
        json!({"channels": ["open.a", "open.b", "bad channel"], "data": {"n": 2}, "msg_id": "b-1"})
            .to_string();
    let (s, r) = http(
        gw.addr,
        "POST",
        "/api/v1/broadcast",
        &[("authorization", &auth())],
        Some(&body),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let results = r["results"].as_array().unwrap();
    assert!(results[0]["seq"].is_u64() && results[1]["seq"].is_u64());
    assert_eq!(results[2]["code"], 104);
    // The same broadcast again is deduplicated per channel.
    let (_, again) = http(
        gw.addr,
        "POST",
        "/api/v1/broadcast",
        &[("authorization", &auth())],
        Some(&body),
    )
    .await;
    assert_eq!(again["results"][0]["seq"], results[0]["seq"]);
    assert_eq!(again["results"][0]["duplicate"], true);
    assert_eq!(c.recv_type("msg").await["channel"], "open.a");
    assert_eq!(c.recv_type("msg").await["channel"], "open.b");

    let (s, h) = http(
        gw.addr,
        "GET",
        "/api/v1/history/open.a?limit=10",
        &[("authorization", &auth())],
        None,
    )
    .await;
    assert_eq!(s, 200);
    let seqs = publication_seqs(&h);
    assert_eq!(seqs, vec![seq, results[0]["seq"].as_u64().unwrap()]);
    let epoch = h["position"]["epoch"].as_str().unwrap();
    let (s, h) = http(
        gw.addr,
        "GET",
        &format!("/api/v1/history/open.a?since={seq}&epoch={epoch}"),
        &[("authorization", &auth())],
        None,
    )
    .await;
    assert_eq!(
        (
            s,
            h["publications"].as_array().unwrap().len(),
            &h["complete"]
        ),
        (200, 1, &json!(true))
    );
    let (s, h) = http(
        gw.addr,
        "GET",
        &format!("/api/v1/history/open.a?since={seq}"),
        &[("authorization", &auth())],
        None,
    )
    .await;
    assert_eq!((s, &h["code"]), (400, &json!(103)));
}

#[tokio::test]
async fn api_errors_are_json_with_codes() {
    let gw = start(config()).await;
    let a = auth();
    let h = [("authorization", a.as_str())];
    let cases = [
        ("POST", "/api/v1/publish", Some("{oops"), 400, 101),
        (
            "POST",
            "/api/v1/publish",
            Some(r#"{"channel":"nope","data":1}"#),
            400,
            104,
        ),
        (
            "POST",
            "/api/v1/publish",
            Some(r#"{"channel":"nosuch.x","data":1}"#),
            400,
            105,
        ),
        ("GET", "/api/v1/history/bad..name", None, 400, 104),
        ("GET", "/api/v1/nothing", None, 404, 404),
    ];
    for (method, path, body, status, code) in cases {
        let (s, b) = http(gw.addr, method, path, &h, body).await;
        assert_eq!(
            (s, b["code"].as_u64()),
            (status, Some(code)),
            "{method} {path}: {b}"
        );
        assert!(b["error"].is_string());
    }
    let big = json!({"channel": "trim.x", "data": "z".repeat(20 << 10)}).to_string();
    let (s, b) = http(gw.addr, "POST", "/api/v1/publish", &h, Some(&big)).await;
    assert_eq!((s, b["code"].as_u64()), (413, Some(111)));
    // A body over 1 MiB is refused from its headers, before the client sends it.
    let len = (2 << 20).to_string();
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (status, b) = http_on(
        &mut s,
        "POST",
        "/api/v1/publish",
        &[
            ("authorization", &a),
            ("content-length", &len),
            ("expect", "100-continue"),
        ],
        None,
        true,
    )
    .await;
    assert_eq!((status, b["code"].as_u64()), (413, Some(111)));
}

#[tokio::test]
async fn users_presence_nodes_and_control_on_a_single_node() {
    let mut cfg = config();
    cfg.server.node_id = "solo".into();
    cfg.server.region = "eu-west".into();
    let gw = start(cfg).await;
    let caps = ["chat.>=sub+presence"];
    let mut a = connect_as(gw.addr, "ann", &caps).await;
    let mut b = connect_as(gw.addr, "bob", &caps).await;
    a.subscribe("chat.room.api").await;
    b.subscribe("chat.room.api").await;

    let (s, user) = api(gw.addr, "GET", "/api/v1/users/ann", None).await;
    assert_eq!((s, &user["online"]), (200, &json!(true)), "{user}");
    assert_eq!(user["connections"][0]["node"], "solo");
    let (_, nobody) = api(gw.addr, "GET", "/api/v1/users/nobody", None).await;
    assert_eq!(nobody["online"], false);

    let (_, stats) = api(gw.addr, "GET", "/api/v1/presence/chat.room.api/stats", None).await;
    assert_eq!((&stats["clients"], &stats["users"]), (&json!(2), &json!(2)));
    let (_, page) = api(
        gw.addr,
        "GET",
        "/api/v1/presence/chat.room.api?limit=1",
        None,
    )
    .await;
    assert_eq!(page["clients"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().expect("a next page").to_string();
    let (_, page2) = api(
        gw.addr,
        "GET",
        &format!("/api/v1/presence/chat.room.api?limit=1&cursor={next}"),
        None,
    )
    .await;
    assert_eq!(page2["clients"].as_array().unwrap().len(), 1);
    assert_ne!(page["clients"][0], page2["clients"][0]);
    assert!(page2["next"].is_null(), "{page2}");
    let (s, body) = api(gw.addr, "GET", "/api/v1/presence/open.x", None).await;
    assert_eq!(
        (s, &body["code"]),
        (400, &json!(115)),
        "no presence in open"
    );

    let (_, nodes) = api(gw.addr, "GET", "/api/v1/nodes", None).await;
    assert_eq!(nodes["nodes"][0]["id"], "solo");
    assert_eq!(nodes["nodes"][0]["region"], "eu-west");
    assert_eq!(nodes["nodes"][0]["connections"], 2);

    let (s, _) = api(gw.addr, "POST", "/api/v1/users/bob/disconnect", None).await;
    assert_eq!(s, 200);
    assert_eq!(b.expect_close().await.0, 4003);
    a.ping().await;

    // A revoked token id is refused and its connection closed.
    let claims = switchyard::auth::Claims {
        sub: "ann".into(),
        exp: now() + 60,
        nbf: None,
        iat: None,
        jti: Some("cat-token".into()),
        iss: None,
        aud: None,
        caps: vec![],
    };
    let t = sign(&claims, SECRET);
    let mut cat = connect(gw.addr, &t).await;
    let (s, r) = api(gw.addr, "POST", "/api/v1/tokens/cat-token/revoke", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(cat.expect_close().await.0, 4003);
    let refused = try_connect_with(gw.addr, "", &[("authorization", &format!("Bearer {t}"))])
        .await
        .err()
        .expect("refused");
    assert_eq!((refused.status, &refused.body["code"]), (401, &json!(206)));
    // `refresh` to a revoked token is refused as well.
    let (r, _) = a.request(json!({"type": "refresh", "token": t})).await;
    assert_eq!((&r["type"], &r["code"]), (&json!("error"), &json!(114)));
    assert!(r["reason"].as_str().unwrap().contains("revoked"), "{r}");
}

#[tokio::test]
async fn control_api_rejects_bad_input() {
    let gw = start(config()).await;
    let (s, b) = api(
        gw.addr,
        "POST",
        "/api/v1/tokens/x/revoke",
        Some(json!({"expires": 5})),
    )
    .await;
    assert_eq!((s, &b["code"]), (400, &json!(101)), "unknown field: {b}");
    let (s, _) = api(gw.addr, "POST", "/api/v1/users/%FF/disconnect", None).await;
    assert_eq!(s, 400, "not UTF-8");
    // A user id is matched by path segment, so an encoded slash is part of it.
    let (s, b) = api(gw.addr, "GET", "/api/v1/users/a%2Fb", None).await;
    assert_eq!(
        (s, &b["user"]),
        (200, &json!("a/b")),
        "a slash in a user id"
    );
    let (s, _) = api(gw.addr, "GET", "/api/v1/users/a%0Ab", None).await;
    assert_eq!(s, 400, "a control character in a user id");
    let (s, _) = api(gw.addr, "GET", "/api/v1/presence/bad..channel/stats", None).await;
    assert_eq!(s, 400);
    let (s, b) = api(gw.addr, "DELETE", "/api/v1/nodes", None).await;
    assert_eq!(
        (s, &b["code"]),
        (405, &json!(405)),
        "a known path, another method"
    );
}
