//! No panic leaves a connection half alive (issue 9): a panic in a session's reader
//! or writer closes the socket with 1011 and runs the normal cleanup; a panic in a
//! request handler answers 500 with a JSON error. Provoked through the test-only
//! hooks of the `test-hooks` feature, which `make test` enables.
#![cfg(feature = "test-hooks")]

mod common;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn panics_in(target: &str) {
    let gw = start(config()).await;
    let mut victim = connect_as(gw.addr, "victim", &["chat.>=sub+presence"]).await;
    victim.subscribe("chat.room.panic").await;
    let mut watcher = connect_as(gw.addr, "watcher", &["chat.>=sub+presence"]).await;
    watcher.subscribe("chat.room.panic").await;
    let (s, stats) = api(
        gw.addr,
        "GET",
        "/api/v1/presence/chat.room.panic/stats",
        None,
    )
    .await;
    assert_eq!((s, &stats["clients"]), (200, &json!(2)));

    victim
        .send_raw(Message::text(format!("test-panic:{target}")))
        .await;
    let (code, _) = victim.expect_close().await;
    assert_eq!(code, 1011, "{target}");

    // Cleanup ran: the victim left presence and the user index, and its slot is free.
    let leave = watcher.recv_type("leave").await;
    assert_eq!(leave["user"], "victim", "{target}");
    let (_, stats) = api(
        gw.addr,
        "GET",
        "/api/v1/presence/chat.room.panic/stats",
        None,
    )
    .await;
    assert_eq!(stats["clients"], 1, "{target}");
    let (_, user) = api(gw.addr, "GET", "/api/v1/users/victim", None).await;
    assert_eq!(user["online"], false, "{target}: {user}");
    eventually(WAIT, "the connection slot is released", || {
        let n = gw.node.connection_count();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // Everyone else is served as before.
    watcher.ping().await;
    let mut again = connect_as(gw.addr, "victim", &[]).await;
    again.ping().await;
}

#[tokio::test]
async fn a_reader_panic_closes_1011_and_cleans_up() {
    panics_in("reader").await;
}

#[tokio::test]
async fn a_writer_panic_closes_1011_and_cleans_up() {
    panics_in("writer").await;
}

#[tokio::test]
async fn a_handler_panic_answers_500_json() {
    let gw = start(config()).await;
    let (s, b) = http(gw.addr, "GET", "/test/panic", &[], None).await;
    assert_eq!((s, &b["code"]), (500, &json!(100)), "{b}");
    assert!(b["error"].is_string());
    // The node goes on serving, on a new connection and on the same one.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (st, _) = http_on(&mut s, "GET", "/test/panic", &[], None, false).await;
    assert_eq!(st, 500);
    let (st, _) = http_on(&mut s, "GET", "/healthz", &[], None, true).await;
    assert_eq!(st, 200, "keep-alive connection survives the panic");
}
