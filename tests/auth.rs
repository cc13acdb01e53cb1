//! Authentication before the upgrade, the three token transports, refresh and expiry.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::auth::Claims;

async fn refused(addr: std::net::SocketAddr, token: Option<&str>) -> Refused {
    let header;
    let headers: Vec<(&str, &str)> = match token {
        Some(t) => {
            header = format!("Bearer {t}");
            vec![("authorization", header.as_str())]
        }
        None => vec![],
    };
    match try_connect_with(addr, "", &headers).await {
        Ok(_) => panic!("connection should have been refused"),
        Err(r) => r,
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_before_upgrade_with_json_401() {
    let mut cfg = config();
    cfg.auth.audience = Some("switchyard".into());
    let gw = start(cfg).await;
    let t = now();

    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("missing", None, 201),
        ("malformed", Some("not.a.jwt".into()), 202),
        (
            "wrong signature",
            Some(sign(
                &Claims {
                    aud: Some("switchyard".into()),
                    ..claims("u", t + 60)
                },
                "another-secret-0123456789",
            )),
            202,
        ),
        (
            "expired",
            Some(sign(
                &Claims {
                    aud: Some("switchyard".into()),
                    ..claims("u", t - 120)
                },
                SECRET,
            )),
            203,
        ),
        (
            "not yet valid",
            Some(sign(
                &Claims {
                    nbf: Some(t + 600),
                    aud: Some("switchyard".into()),
                    ..claims("u", t + 3600)
                },
                SECRET,
            )),
            204,
        ),
        (
            "wrong audience",
            Some(sign(
                &Claims {
                    aud: Some("other".into()),
                    ..claims("u", t + 60)
                },
                SECRET,
            )),
            205,
        ),
        (
            "missing audience",
            Some(sign(&claims("u", t + 60), SECRET)),
            202,
        ),
    ];
    for (name, token, code) in cases {
        let r = refused(gw.addr, token.as_deref()).await;
        assert_eq!(r.status, 401, "{name}");
        assert_eq!(r.body["code"], code, "{name}: {}", r.body);
        assert!(r.body["error"].is_string(), "{name}: {}", r.body);
    }
    // The good token with the audience is accepted.
    let good = sign(
        &Claims {
            aud: Some("switchyard".into()),
            ..claims("u", t + 60)
        },
        SECRET,
    );
    let c = connect(gw.addr, &good).await;
    assert_eq!(c.welcome["user"], "u");
}

#[tokio::test]
async fn token_in_query_and_subprotocol_work() {
    let gw = start(config()).await;
    let t = token("alice", &[], Duration::from_secs(60));

    let c = try_connect_with(gw.addr, &format!("?token={t}&device=phone"), &[])
        .await
        .unwrap();
    assert_eq!(c.welcome["user"], "alice");
    assert!(c.welcome["conn_id"].is_string());
    assert!(c.welcome["node"].is_string());
    assert!(c.welcome["expires_at"].as_u64().unwrap() > now());
    assert!(c.welcome["ping_interval_ms"].as_u64().unwrap() > 0);

    // Browsers: token as a subprotocol next to switchyard.v1, which the server selects.
    let protocols = format!("switchyard.v1, bearer.{t}");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws", gw.addr),
    )
    .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "switchyard.v1");
    drop(ws);

    // Subprotocol alone: the bearer protocol itself is echoed so the handshake completes.
    let c = try_connect_with(
        gw.addr,
        "",
        &[("sec-websocket-protocol", &format!("bearer.{t}"))],
    )
    .await
    .unwrap();
    assert_eq!(c.welcome["user"], "alice");

    let r = try_connect_with(gw.addr, "?token=garbage", &[])
        .await
        .err()
        .unwrap();
    assert_eq!((r.status, r.body["code"].as_u64()), (401, Some(202)));
}

#[tokio::test]
async fn expiry_sends_expiring_then_closes_4002() {
    let mut cfg = config();
    cfg.auth.leeway = Duration::ZERO;
    let gw = start(cfg).await;
    let t = sign(&claims("bob", now() + 2), SECRET);
    let mut c = connect(gw.addr, &t).await;
    let (code, frames) = c.expect_close().await;
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "expiring" && f["in_ms"].as_u64().unwrap() <= 2000),
        "{frames:?}"
    );
    assert_eq!(code, 4002);
}

#[tokio::test]
async fn refresh_extends_the_session() {
    let mut cfg = config();
    cfg.auth.leeway = Duration::ZERO;
    let gw = start(cfg).await;
    let short = sign(&claims("bob", now() + 2), SECRET);
    let mut c = connect(gw.addr, &short).await;

    // A token of another user or a bad token is refused and the connection stays.
    let other = token("mallory", &[], Duration::from_secs(3600));
    let r = c
        .call(json!({"type": "refresh", "token": other}), "error")
        .await;
    assert_eq!(r["code"], 114);
    let r = c
        .call(json!({"type": "refresh", "token": "x.y.z"}), "error")
        .await;
    assert_eq!(r["code"], 114);

    let long = token("bob", &[], Duration::from_secs(3600));
    let r = c
        .call(json!({"type": "refresh", "token": long}), "refreshed")
        .await;
    assert!(r["expires_at"].as_u64().unwrap() >= now() + 3500);

    // Past the first token's expiry the connection is still open: nothing but a
    // late `expiring` for the old token may arrive in this window.
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while let Some(e) = c
        .next_event_within(until - tokio::time::Instant::now())
        .await
    {
        match e {
            common::Event::Frame(f) if f["type"] == "expiring" => {}
            e => panic!("unexpected {e:?}"),
        }
    }
    c.ping().await;
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
}

fn sign_with(
    alg: jsonwebtoken::Algorithm,
    kid: Option<&str>,
    key: &jsonwebtoken::EncodingKey,
    claims: &Claims,
) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

#[tokio::test]
async fn rs256_and_es256_public_keys() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let mut cfg = config();
    cfg.auth.rsa_public_key = Some(format!("{FIXTURES}/rsa.pub.pem").into());
    cfg.auth.ec_public_key = Some(format!("{FIXTURES}/ec.pub.pem").into());
    let gw = start(cfg).await;
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa.key.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec.key.pem")).unwrap();
    let c = claims("rsa-user", now() + 60);

    let ok = connect(gw.addr, &sign_with(Algorithm::RS256, None, &rsa, &c)).await;
    assert_eq!(ok.welcome["user"], "rsa-user");
    let ok = connect(
        gw.addr,
        &sign_with(Algorithm::ES256, None, &ec, &claims("ec-user", now() + 60)),
    )
    .await;
    assert_eq!(ok.welcome["user"], "ec-user");

    // Algorithm confusion: HS256 "signed" with the RSA public key as the secret.
    let confused = sign_with(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&fixture("rsa.pub.pem")),
        &c,
    );
    assert_eq!(refused(gw.addr, Some(&confused)).await.body["code"], 202);
    // An expired RS256 token is expired, not merely invalid.
    let old = sign_with(
        Algorithm::RS256,
        None,
        &rsa,
        &claims("rsa-user", now() - 600),
    );
    assert_eq!(refused(gw.addr, Some(&old)).await.body["code"], 203);
}

#[tokio::test]
async fn jwks_keys_are_chosen_by_kid() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey};
    let rsa = EncodingKey::from_rsa_pem(&fixture("rsa.key.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("ec.key.pem")).unwrap();
    let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    rsa_jwk.common.key_id = Some("rsa-1".into());
    let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
    ec_jwk.common.key_id = Some("ec-1".into());
    let set = JwkSet {
        keys: vec![rsa_jwk, ec_jwk],
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();

    let mut cfg = config();
    cfg.auth.jwks_file = Some(path);
    let gw = start(cfg).await;
    let c = claims("jwks-user", now() + 60);
    let ok = connect(
        gw.addr,
        &sign_with(Algorithm::RS256, Some("rsa-1"), &rsa, &c),
    )
    .await;
    assert_eq!(ok.welcome["user"], "jwks-user");
    connect(gw.addr, &sign_with(Algorithm::ES256, Some("ec-1"), &ec, &c)).await;
    // A kid naming a key of another algorithm, and an unknown kid, are refused.
    assert_eq!(
        refused(
            gw.addr,
            Some(&sign_with(Algorithm::ES256, Some("rsa-1"), &ec, &c))
        )
        .await
        .body["code"],
        202
    );
    assert_eq!(
        refused(
            gw.addr,
            Some(&sign_with(Algorithm::RS256, Some("nope"), &rsa, &c))
        )
        .await
        .body["code"],
        202
    );
}
