//! The demo (`server.demo = true`; off by default, on in the shipped config for
//! `make run`): the page at `/demo/` with its files embedded in the binary, and
//! `POST /demo/token`, which mints short-lived tokens with the demo's capabilities
//! for anyone who asks — which is why it must never be on in production.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{api, error, json, Body};
use crate::auth;
use crate::node::Node;
use crate::protocol::code;

const INDEX: &str = include_str!("../../demo/index.html");
const APP: &str = include_str!("../../demo/app.js");
/// The SDK's browser bundle (clients/js, `npm run bundle`).
const SDK: &str = include_str!("../../demo/switchyard.min.js");

/// How long a demo token lives: the page's client refreshes it through this endpoint.
const TOKEN_TTL: Duration = Duration::from_secs(600);

/// The one chat room of the demo.
const ROOM: &str = "chat.demo.lobby";

/// What a demo token may do: the demo's rooms (prices are open to every user).
const CAPS: &str = "chat.demo.>=sub+pub+history+presence";

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    user: Option<String>,
}

#[derive(Serialize)]
struct TokenReply<'a> {
    token: String,
    user: &'a str,
    expires_in_s: u64,
    room: &'static str,
    prices: Vec<String>,
}

/// Answers `/demo`, `/demo/...`: 404 unless `server.demo` is on.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if !node.config.server.demo {
        return error(StatusCode::NOT_FOUND, 404, "not found");
    }
    let path = req.uri().path();
    if path == "/demo/token" {
        if req.method() != Method::POST {
            return api::wrong_method(&Method::POST);
        }
        return token(node, req).await;
    }
    if req.method() != Method::GET {
        return api::wrong_method(&Method::GET);
    }
    match path {
        "/demo" => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
            resp.headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/demo/"));
            resp
        }
        "/demo/" => file(INDEX, "text/html; charset=utf-8"),
        "/demo/app.js" => file(APP, "text/javascript; charset=utf-8"),
        "/demo/switchyard.min.js" => file(SDK, "text/javascript; charset=utf-8"),
        _ => error(StatusCode::NOT_FOUND, 404, "not found"),
    }
}

fn file(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// A display name: short, and safe to show and to use as a user id.
fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn token(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let body: TokenRequest = match api::optional_body(&node, req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let user = match body.user {
        Some(u) if valid_name(&u) => u,
        Some(_) => {
            let why = "`user` must be 1-32 characters of A-Z, a-z, 0-9, - and _";
            return error(StatusCode::BAD_REQUEST, code::BAD_FIELD, why);
        }
        None => format!("guest-{:04x}", fastrand::u16(..)),
    };
    let caps = match auth::parse_cap(CAPS) {
        Ok(c) => vec![c],
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, code::INTERNAL, &e),
    };
    let token = match auth::mint(&node.config, &user, TOKEN_TTL, caps) {
        Ok(t) => t,
        // E.g. no HMAC secret: this node verifies tokens it cannot sign.
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, 503, &e.to_string()),
    };
    let feed = &node.config.feed;
    let symbols = if feed.kucoin.enabled {
        &feed.kucoin.symbols
    } else {
        &feed.synthetic.symbols
    };
    let prices = symbols
        .iter()
        .map(|s| format!("{}.{s}", feed.namespace))
        .collect();
    json(
        StatusCode::OK,
        &TokenReply {
            token,
            user: &user,
            expires_in_s: TOKEN_TTL.as_secs(),
            room: ROOM,
            prices,
        },
    )
}
