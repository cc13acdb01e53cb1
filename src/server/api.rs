//! The server HTTP API for backends (DESIGN §6): publish, broadcast, history,
//! presence, users and their cursors, disconnect, token revocation, nodes.
//! Every call needs `Authorization: apikey <key>`; with no key configured the
//! API is closed.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument;

use super::{error, json, Body};
use crate::channel::Channel;
use crate::config::NamespaceConfig;
use crate::engine::memory::unix_ms;
use crate::engine::{EngineError, HistoryFrom, Position, PublicationList, PublishRequest};
use crate::node::Node;
use crate::protocol::code;

/// Largest accepted request body.
const MAX_BODY: usize = 1 << 20;

#[derive(Deserialize)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    msg_id: Option<String>,
}

#[derive(Deserialize)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
    msg_id: Option<String>,
}

#[derive(Serialize)]
struct PublishResult {
    channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

#[derive(Serialize)]
struct HistoryBody<'a> {
    channel: &'a str,
    publications: PublicationList<'a>,
    position: Position,
    complete: bool,
}

/// Compares without an early exit, so the key cannot be guessed byte by byte from timing.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The refusal for a request without the right API key, if any.
fn refusal(node: &Node, req: &Request<Incoming>) -> Option<Response<Body>> {
    let key = &node.config.api.key;
    if key.is_empty() {
        let why = "the API is disabled: set api.key";
        return Some(error(StatusCode::FORBIDDEN, 403, why));
    }
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("apikey "))
        .map(str::trim);
    match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            401,
            "missing or wrong API key",
        )),
    }
}

async fn body<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    // Refuse a declared oversize body before reading it (and before `100 Continue`).
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::TOO_LARGE,
            "body larger than 1 MiB",
        ));
    }
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::TOO_LARGE,
                "body too large or unreadable",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            code::MALFORMED,
            &format!("invalid JSON body: {e}"),
        )
    })
}

fn resolve<'a>(
    node: &'a Node,
    name: &str,
) -> Result<(Channel, &'a NamespaceConfig), (StatusCode, u16, String)> {
    let channel = Channel::parse(name).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            code::BAD_CHANNEL,
            format!("invalid channel: {e}"),
        )
    })?;
    let ns = node.namespace(channel.namespace()).ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            code::UNKNOWN_NAMESPACE,
            format!("unknown namespace {:?}", channel.namespace()),
        )
    })?;
    Ok((channel, ns))
}

async fn publish_one(
    node: &Node,
    name: &str,
    data: Box<RawValue>,
    msg_id: Option<String>,
) -> Result<crate::engine::Published, (StatusCode, u16, String)> {
    let (channel, ns) = resolve(node, name)?;
    if data.get().len() > ns.max_data_bytes {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            code::TOO_LARGE,
            format!("data is larger than {} bytes", ns.max_data_bytes),
        ));
    }
    let span = tracing::info_span!("api_publish", channel = %channel);
    node.engine
        .broker
        .publish(PublishRequest {
            channel,
            data,
            from: None,
            msg_id,
        })
        .instrument(span)
        .await
        .map_err(engine_error)
}

fn engine_error(e: EngineError) -> (StatusCode, u16, String) {
    match e {
        EngineError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, code::UNAVAILABLE, m),
        EngineError::Rejected(m) => (StatusCode::BAD_REQUEST, code::BAD_FIELD, m),
        EngineError::Degraded(m) => (StatusCode::SERVICE_UNAVAILABLE, code::DEGRADED, m),
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Routes `/api/...`.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Some(resp) = refusal(&node, &req) {
        return resp;
    }
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/api/v1/publish") => {
            let b: PublishBody = match body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match publish_one(&node, &b.channel, b.data, b.msg_id).await {
                Ok(p) => json(
                    StatusCode::OK,
                    &serde_json::json!({"channel": b.channel, "seq": p.seq, "duplicate": p.duplicate}),
                ),
                Err((status, c, m)) => error(status, c, &m),
            }
        }
        (Method::POST, "/api/v1/broadcast") => {
            let b: BroadcastBody = match body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let mut results = Vec::with_capacity(b.channels.len());
            for name in &b.channels {
                // One msg_id per channel: dedupe must not fold two channels into one.
                let msg_id = b.msg_id.as_ref().map(|m| format!("{m}/{name}"));
                let r = match publish_one(&node, name, b.data.clone(), msg_id).await {
                    Ok(p) => PublishResult {
                        channel: name.clone(),
                        seq: Some(p.seq),
                        duplicate: Some(p.duplicate),
                        error: None,
                        code: None,
                    },
                    Err((_, c, m)) => PublishResult {
                        channel: name.clone(),
                        seq: None,
                        duplicate: None,
                        error: Some(m),
                        code: Some(c),
                    },
                };
                results.push(r);
            }
            json(StatusCode::OK, &serde_json::json!({ "results": results }))
        }
        (Method::GET, p) if p.starts_with("/api/v1/history/") => {
            let name = &p["/api/v1/history/".len()..];
            let (channel, ns) = match resolve(&node, name) {
                Ok(r) => r,
                Err((status, c, m)) => return error(status, c, &m),
            };
            let limit = query_param(&req, "limit")
                .and_then(|l| l.parse::<usize>().ok())
                .unwrap_or(ns.max_replay)
                .clamp(1, ns.max_replay);
            let since = query_param(&req, "since").and_then(|s| s.parse::<u64>().ok());
            let from = match (since, query_param(&req, "epoch")) {
                (Some(seq), Some(epoch)) => HistoryFrom::After(Position { seq, epoch }),
                (Some(_), None) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        code::BAD_FIELD,
                        "`since` needs `epoch`",
                    )
                }
                (None, _) => HistoryFrom::Latest(limit),
            };
            match node.engine.broker.history(&channel, from, limit).await {
                Ok(page) => json(
                    StatusCode::OK,
                    &HistoryBody {
                        channel: channel.as_str(),
                        publications: PublicationList(&page.publications),
                        position: page.position,
                        complete: page.complete,
                    },
                ),
                Err(e) => {
                    let (status, c, m) = engine_error(e);
                    error(status, c, &m)
                }
            }
        }
        (Method::GET, "/api/v1/prices") => match node.prices.all().await {
            Ok(list) => {
                let now = unix_ms();
                let prices: Vec<PriceBody> = list.iter().map(|c| PriceBody::new(c, now)).collect();
                json(StatusCode::OK, &serde_json::json!({ "prices": prices }))
            }
            Err(e) => engine_response(e),
        },
        (Method::GET, p) if p.starts_with("/api/v1/prices/") => {
            let symbol = &p["/api/v1/prices/".len()..];
            if !crate::channel::is_valid_token(symbol) {
                return error(StatusCode::BAD_REQUEST, code::BAD_FIELD, "invalid symbol");
            }
            match node.prices.get(symbol).await {
                Ok(Some(c)) => json(StatusCode::OK, &PriceBody::new(&c, unix_ms())),
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    404,
                    &format!("no price for {symbol}"),
                ),
                Err(e) => engine_response(e),
            }
        }
        (Method::GET, "/api/v1/nodes") => match node.engine.control.nodes().await {
            Ok(nodes) => json(StatusCode::OK, &serde_json::json!({ "nodes": nodes })),
            Err(e) => engine_response(e),
        },
        (Method::GET, p) if p.starts_with("/api/v1/presence/") => {
            let rest = &p["/api/v1/presence/".len()..];
            let (name, stats) = match rest.strip_suffix("/stats") {
                Some(name) => (name, true),
                None => (rest, false),
            };
            presence(&node, &req, name, stats).await
        }
        (Method::GET, p) if p.starts_with("/api/v1/users/") => {
            let rest = &p["/api/v1/users/".len()..];
            match rest.strip_suffix("/cursors") {
                Some(user) => match decode(user) {
                    Some(user) => match node.engine.cursors.list(&user).await {
                        Ok(cursors) => json(
                            StatusCode::OK,
                            &serde_json::json!({"user": user, "cursors": cursors}),
                        ),
                        Err(e) => engine_response(e),
                    },
                    None => bad_user(),
                },
                None => match decode(rest) {
                    Some(user) => match node.engine.presence.user(&user).await {
                        Ok(conns) => json(
                            StatusCode::OK,
                            &serde_json::json!({
                                "user": user,
                                "online": !conns.is_empty(),
                                "connections": conns,
                            }),
                        ),
                        Err(e) => engine_response(e),
                    },
                    None => bad_user(),
                },
            }
        }
        (Method::POST, p) if p.starts_with("/api/v1/users/") && p.ends_with("/disconnect") => {
            let raw = &p["/api/v1/users/".len()..p.len() - "/disconnect".len()];
            let Some(user) = decode(raw) else {
                return bad_user();
            };
            let b: DisconnectBody = match optional_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            match node
                .engine
                .control
                .disconnect(&user, b.device.as_deref())
                .await
            {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({"user": user, "device": b.device}),
                ),
                Err(e) => engine_response(e),
            }
        }
        (Method::POST, p) if p.starts_with("/api/v1/tokens/") && p.ends_with("/revoke") => {
            let raw = &p["/api/v1/tokens/".len()..p.len() - "/revoke".len()];
            let Some(jti) = decode(raw) else {
                return error(StatusCode::BAD_REQUEST, code::BAD_FIELD, "invalid token id");
            };
            let b: RevokeBody = match optional_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            // Kept until the token would expire; without that, for `revocation_ttl`.
            let until_ms = match b.expires_at {
                Some(secs) => secs.saturating_mul(1000),
                None => unix_ms() + node.config.redis.revocation_ttl.as_millis() as u64,
            };
            match node.engine.control.revoke(&jti, until_ms).await {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({"jti": jti, "revoked_until_ms": until_ms}),
                ),
                Err(e) => engine_response(e),
            }
        }
        _ => error(StatusCode::NOT_FOUND, 404, "no such API endpoint"),
    }
}

/// A cached price with its age.
#[derive(Serialize)]
struct PriceBody<'a> {
    symbol: &'a str,
    tick: &'a crate::feed::Tick,
    /// Unix ms when the feed received it.
    received_at: u64,
    /// How old the tick is now (the feed may be down: check it).
    age_ms: u64,
}

impl<'a> PriceBody<'a> {
    fn new(c: &'a crate::feed::cache::CachedTick, now: u64) -> Self {
        PriceBody {
            symbol: &c.tick.symbol,
            tick: &c.tick,
            received_at: c.received_at,
            age_ms: now.saturating_sub(c.received_at),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    /// Only this device's connections.
    device: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// The token's `exp` (Unix seconds): how long the revocation must be kept.
    expires_at: Option<u64>,
}

/// A JSON body that may be absent (empty means all defaults).
async fn optional_body<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let empty = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0")
        || (req.headers().get(hyper::header::CONTENT_LENGTH).is_none()
            && req
                .headers()
                .get(hyper::header::TRANSFER_ENCODING)
                .is_none());
    if empty {
        return Ok(T::default());
    }
    body(req).await
}

/// A path segment, percent-decoded; `None` if empty, not UTF-8, or holding a `/`.
fn decode(segment: &str) -> Option<String> {
    let s = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!s.is_empty() && !s.contains('/')).then_some(s)
}

fn bad_user() -> Response<Body> {
    error(StatusCode::BAD_REQUEST, code::BAD_FIELD, "invalid user id")
}

fn engine_response(e: EngineError) -> Response<Body> {
    let (status, c, m) = engine_error(e);
    error(status, c, &m)
}

#[derive(Serialize)]
struct PresenceBody<'a> {
    channel: &'a str,
    clients: Vec<crate::engine::ClientInfo>,
    next: Option<String>,
}

/// `GET /api/v1/presence/{channel}[?cursor=&limit=]` and `.../stats`.
async fn presence(node: &Node, req: &Request<Incoming>, name: &str, stats: bool) -> Response<Body> {
    let (channel, ns) = match resolve(node, name) {
        Ok(r) => r,
        Err((status, c, m)) => return error(status, c, &m),
    };
    if !ns.presence {
        return error(
            StatusCode::BAD_REQUEST,
            code::NOT_ENABLED,
            &format!("namespace {:?} has no presence", channel.namespace()),
        );
    }
    let p = &node.engine.presence;
    if stats {
        return match p.stats(&channel).await {
            Ok(s) => json(
                StatusCode::OK,
                &serde_json::json!({"channel": channel.as_str(), "clients": s.clients, "users": s.users}),
            ),
            Err(e) => engine_response(e),
        };
    }
    let max = node.config.presence_page_max();
    let limit = query_param(req, "limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(max)
        .clamp(1, max);
    let cursor = query_param(req, "cursor");
    match p.page(&channel, cursor.as_deref(), limit).await {
        Ok(page) => json(
            StatusCode::OK,
            &PresenceBody {
                channel: channel.as_str(),
                clients: page.clients,
                next: page.next,
            },
        ),
        Err(e) => engine_response(e),
    }
}
