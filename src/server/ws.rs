//! The `/ws` endpoint: checks the handshake (version, key, origin), finds the
//! token (header, query, or subprotocol), verifies it and admits the connection
//! *before* upgrading, then hands the upgraded socket to a session.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION,
};
use hyper::{Request, Response, StatusCode};

use super::{error, Body};
use crate::auth::AuthError;
use crate::node::{Admission, Node};

/// The subprotocol a browser offers beside `bearer.<jwt>`; selected when offered.
pub const SUBPROTOCOL: &str = "switchyard.v1";
const BEARER_PROTOCOL_PREFIX: &str = "bearer.";

struct Credentials {
    token: Option<String>,
    /// The `device` query value, checked against its grammar.
    device: Result<Option<String>, String>,
    /// The subprotocol to echo, when the client offered any.
    protocol: Option<String>,
}

/// Whether a `Sec-WebSocket-Key` is the base64 encoding of 16 bytes (RFC 6455 §4.2.1):
/// 22 base64 digits and `==`.
fn valid_key(key: &[u8]) -> bool {
    let digit = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key[..22].iter().all(digit) && &key[22..] == b"=="
}

fn credentials<B>(req: &Request<B>) -> Credentials {
    let mut token = None;
    let mut device = Ok(None);
    if let Some(query) = req.uri().query() {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "token" => token = Some(v.into_owned()),
                "device" => {
                    device = crate::ids::check_device(&v).map(|()| Some(v.into_owned()));
                }
                _ => {}
            }
        }
    }
    if let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            token = Some(t.trim().to_string());
        }
    }
    let mut protocol = None;
    let offered: Vec<&str> = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for p in &offered {
        if let Some(t) = p.strip_prefix(BEARER_PROTOCOL_PREFIX) {
            token = Some(t.to_string());
            protocol.get_or_insert_with(|| p.to_string());
        }
    }
    // Browsers fail the handshake unless one offered protocol is echoed:
    // prefer the plain one so the token is not reflected back.
    if offered.contains(&SUBPROTOCOL) {
        protocol = Some(SUBPROTOCOL.to_string());
    }
    Credentials {
        token,
        device,
        protocol,
    }
}

fn unauthorized(e: &AuthError) -> Response<Body> {
    crate::metrics::get().auth_refused(e.code);
    error(StatusCode::UNAUTHORIZED, e.code, e.reason)
}

/// Answers `GET /ws`: refuses with a JSON error or returns `101` and starts the session.
pub fn upgrade(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    // The outcome is the HTTP status: 101 accepted, else the refusal (never the token).
    let span = tracing::info_span!(
        "ws.connect",
        user = tracing::field::Empty,
        status = tracing::field::Empty
    );
    let resp = span.in_scope(|| accept(node, req));
    let status = resp.status().as_u16();
    span.record("status", status);
    let metrics = crate::metrics::get();
    if status == 101 {
        metrics.connections_opened.increment(1);
    } else {
        metrics.connection_refused(status);
    }
    resp
}

fn accept(node: Arc<Node>, mut req: Request<Incoming>) -> Response<Body> {
    if node.shutdown.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            503,
            "node is draining; reconnect to another node",
        );
    }
    let backbone = node.engine.broker.backbone();
    if !backbone.is_ready() {
        let why = format!(
            "node is not ready ({}); reconnect to another node",
            backbone.blocking.join("; ")
        );
        return error(StatusCode::SERVICE_UNAVAILABLE, 503, &why);
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return error(
            StatusCode::BAD_REQUEST,
            400,
            "expected a WebSocket upgrade request",
        );
    }
    let headers = req.headers();
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        // RFC 6455 §4.2.2: refuse, naming the version this server speaks.
        let mut resp = error(
            StatusCode::BAD_REQUEST,
            400,
            "only WebSocket version 13 is supported",
        );
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return resp;
    }
    if !headers
        .get(SEC_WEBSOCKET_KEY)
        .is_some_and(|k| valid_key(k.as_bytes()))
    {
        return error(
            StatusCode::BAD_REQUEST,
            400,
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        );
    }
    // An origin that is not visible ASCII matches no pattern.
    let origin = headers.get(ORIGIN).map(|o| o.to_str().unwrap_or(""));
    if !node.origins.allows(origin) {
        return error(
            StatusCode::FORBIDDEN,
            403,
            "origin not allowed (server.allowed_origins)",
        );
    }
    let creds = credentials(&req);
    let device = match creds.device {
        Ok(device) => device,
        Err(why) => {
            return error(
                StatusCode::BAD_REQUEST,
                crate::protocol::code::BAD_FIELD,
                &why,
            )
        }
    };
    let identity = match creds.token.as_deref() {
        None => return unauthorized(&AuthError::MISSING),
        Some(token) => match node.verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => return unauthorized(&e),
        },
    };
    tracing::Span::current().record("user", &*identity.user);
    if identity
        .jti
        .as_deref()
        .is_some_and(|jti| node.engine.control.is_revoked(jti))
    {
        return unauthorized(&AuthError::REVOKED);
    }
    let slot = match node.admit(&identity.user) {
        Ok(slot) => slot,
        Err(Admission::NodeFull) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                503,
                "node is at its connection limit",
            )
        }
        Err(Admission::UserFull) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                429,
                "too many connections for this user",
            )
        }
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                400,
                &format!("bad upgrade request: {e}"),
            )
        }
    };
    let (mut parts, _) = response.into_parts();
    if let Some(p) = creds.protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        parts.headers.insert(SEC_WEBSOCKET_PROTOCOL, p);
    }
    let handshake = Box::new(crate::session::Handshake {
        identity,
        device,
        slot,
    });
    tokio::spawn(crate::session::serve(node, fut, handshake));
    Response::from_parts(parts, Full::default())
}
