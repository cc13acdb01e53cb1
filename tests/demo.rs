//! The demo: absent unless `server.demo` is on; with it, the page and its files are
//! served and `POST /demo/token` mints short-lived tokens limited to the demo's rooms.

mod common;

use common::*;
use serde_json::json;

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn demo_is_absent_by_default() {
    let gw = start(config()).await;
    for path in ["/demo", "/demo/", "/demo/app.js"] {
        let (status, body) = http(gw.addr, "GET", path, &[], None).await;
        assert_eq!((status, &body["code"]), (404, &json!(404)), "{path}");
    }
    let (status, _) = http(gw.addr, "POST", "/demo/token", &[], Some("{}")).await;
    assert_eq!(status, 404, "no token minting without server.demo");
}

#[tokio::test]
async fn demo_serves_its_page_and_mints_tokens_for_its_rooms_only() {
    let mut cfg = config();
    cfg.server.demo = true;
    let gw = start(cfg).await;

    let page = raw_get(gw.addr, "/demo/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("content-type: text/html"));
    assert!(page.contains("<script type=\"module\" src=\"app.js\">"));
    for (path, needle) in [
        ("/demo/app.js", "./switchyard.min.js"),
        ("/demo/switchyard.min.js", "switchyard"),
    ] {
        let file = raw_get(gw.addr, path).await;
        assert!(file.starts_with("HTTP/1.1 200"), "{path}");
        assert!(file.contains("content-type: text/javascript"), "{path}");
        assert!(file.contains(needle), "{path}");
    }
    let redirect = raw_get(gw.addr, "/demo").await;
    assert!(redirect.starts_with("HTTP/1.1 308") && redirect.contains("location: /demo/"));
    let (status, _) = http(gw.addr, "GET", "/demo/nothing-here", &[], None).await;
    assert_eq!(status, 404);

    // A named user; the token is short-lived and lets it into the demo room.
    let (status, reply) = http(
        gw.addr,
        "POST",
        "/demo/token",
        &[],
        Some(r#"{"user":"alice"}"#),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["user"], "alice");
    assert_eq!(reply["room"], "chat.demo.lobby");
    assert_eq!(reply["expires_in_s"], 600);
    let mut c = connect(gw.addr, reply["token"].as_str().unwrap()).await;
    let welcome = c.welcome.clone();
    assert_eq!(welcome["user"], "alice");
    let expires = welcome["expires_at"].as_u64().unwrap();
    assert!(expires <= now() + 600 && expires + 5 >= now() + 600);
    assert_eq!(c.subscribe("chat.demo.lobby").await["type"], "subscribed");
    c.publish("chat.demo.lobby", json!({"text": "hi"})).await;
    // Nothing outside the demo's rooms.
    let (refused, _) = c
        .request(json!({"type": "publish", "channel": "chat.room.1", "data": {}}))
        .await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_u64()),
        (Some("error"), Some(106))
    );

    // No user: a guest name; a bad one: refused, naming the field.
    let (status, guest) = http(gw.addr, "POST", "/demo/token", &[], None).await;
    assert_eq!(status, 200);
    assert!(guest["user"].as_str().unwrap().starts_with("guest-"));
    for bad in [
        r#"{"user":"two words"}"#,
        r#"{"user":""}"#,
        r#"{"user":"a\u0000b"}"#,
        r#"{"user":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#,
        r#"{"who":"x"}"#,
        "not json",
    ] {
        let (status, body) = http(gw.addr, "POST", "/demo/token", &[], Some(bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = http(gw.addr, "GET", "/demo/token", &[], None).await;
    assert_eq!(status, 405);
}
