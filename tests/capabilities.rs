//! Channel capabilities: token `caps`, `{user}` inboxes, wildcards, namespace defaults.

mod common;

use common::*;
use serde_json::json;

async fn sub_code(c: &mut Client, channel: &str) -> Option<u64> {
    let (r, _) = c
        .request(json!({"type": "subscribe", "channel": channel}))
        .await;
    match r["type"].as_str() {
        Some("subscribed") => None,
        Some("error") => r["code"].as_u64(),
        _ => panic!("unexpected reply {r}"),
    }
}

async fn pub_code(c: &mut Client, channel: &str) -> Option<u64> {
    let (r, _) = c
        .request(json!({"type": "publish", "channel": channel, "data": {"x": 1}}))
        .await;
    match r["type"].as_str() {
        Some("published") => None,
        Some("error") => r["code"].as_u64(),
        _ => panic!("unexpected reply {r}"),
    }
}

#[tokio::test]
async fn wildcard_caps_allow_and_forbid() {
    let gw = start(config()).await;
    let mut c = connect_as(
        gw.addr,
        "alice",
        &["chat.room.*=sub", "chat.team.>=sub+pub"],
    )
    .await;
    assert_eq!(sub_code(&mut c, "chat.room.1").await, None);
    assert_eq!(
        sub_code(&mut c, "chat.room.1.thread").await,
        Some(106),
        "* is one token"
    );
    assert_eq!(sub_code(&mut c, "chat.lobby.1").await, Some(106));
    assert_eq!(
        pub_code(&mut c, "chat.room.1").await,
        Some(106),
        "sub does not imply pub"
    );
    assert_eq!(
        pub_code(&mut c, "chat.team.a.b").await,
        None,
        "> matches the tail"
    );
    assert_eq!(
        sub_code(&mut c, "chat.team").await,
        Some(106),
        "> needs at least one token"
    );
    // The connection survived every refusal.
    c.ping().await;
}

#[tokio::test]
async fn user_inbox_rule() {
    let gw = start(config()).await;
    let caps = ["chat.dm.{user}=sub", "chat.dm.*=pub"];
    let mut alice = connect_as(gw.addr, "alice", &caps).await;
    let mut bob = connect_as(gw.addr, "bob", &caps).await;
    assert_eq!(sub_code(&mut alice, "chat.dm.alice").await, None);
    assert_eq!(sub_code(&mut alice, "chat.dm.bob").await, Some(106));
    assert_eq!(sub_code(&mut bob, "chat.dm.bob").await, None);
    // Bob can write to Alice's inbox; only Alice reads it.
    let seq = bob.publish("chat.dm.alice", json!({"text": "hi"})).await;
    let m = alice.recv_type("msg").await;
    assert_eq!(
        (m["seq"].as_u64(), m["from"].as_str()),
        (Some(seq), Some("bob"))
    );
}

#[tokio::test]
async fn namespace_defaults_and_publish_switch() {
    let gw = start(config()).await;
    // No caps at all: the prices namespace lets everyone subscribe, nobody publish.
    let mut c = connect_as(gw.addr, "anyone", &[]).await;
    assert_eq!(sub_code(&mut c, "prices.BTC-USDT").await, None);
    assert_eq!(pub_code(&mut c, "prices.BTC-USDT").await, Some(106));
    // Even a pub capability cannot publish where client_publish = false.
    let mut c = connect_as(gw.addr, "trader", &["prices.>=pub"]).await;
    assert_eq!(pub_code(&mut c, "prices.BTC-USDT").await, Some(112));
    // chat has no defaults: nothing without caps.
    let mut c = connect_as(gw.addr, "nobody", &[]).await;
    assert_eq!(sub_code(&mut c, "chat.room.1").await, Some(106));
    assert_eq!(sub_code(&mut c, "nosuch.room.1").await, Some(105));
    let (r, _) = c
        .request(json!({"type": "history", "channel": "chat.room.1"}))
        .await;
    assert_eq!(r["code"], 106);
    let (r, _) = c
        .request(json!({"type": "presence", "channel": "chat.room.1"}))
        .await;
    assert_eq!(r["code"], 106);
}
