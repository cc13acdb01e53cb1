//! The server HTTP API for backends (docs/openapi.yaml is its contract): publish,
//! broadcast, history, presence, users and their cursors, disconnect, token
//! revocation, nodes, prices. Every call needs `Authorization: apikey <key>`; with
//! no key configured the API is closed. The contract itself is served without a key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument;

use super::{error, json, Body};
use crate::clock::unix_ms;
use crate::engine::{
    ClientInfo, HistoryFrom, PageLimit, Position, PublicationList, PublishRequest,
};
use crate::node::Node;
use crate::protocol::code;
use crate::request::{self, Refusal};

/// Largest accepted request body.
const MAX_BODY: usize = 1 << 20;

/// The contract as written, for any deployment.
pub const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

/// The channel pattern of [`OPENAPI`], once for `Channel`, then for `PresenceChannel`.
const ANY_NAMESPACE: &str = r#"pattern: "^[A-Za-z0-9_-]+(\\.[A-Za-z0-9_-]+){1,15}$""#;

/// The contract of this node: its channel patterns name its namespaces, so a
/// schema-valid channel is one the node serves.
pub fn contract(node: &Node) -> String {
    let pattern = |names: Vec<&str>| {
        format!(
            r#"pattern: "^({})(\\.[A-Za-z0-9_-]+){{1,15}}$""#,
            names.join("|")
        )
    };
    let namespaces = &node.config.namespaces;
    let all: Vec<&str> = namespaces.keys().map(String::as_str).collect();
    let with_presence: Vec<&str> = namespaces
        .iter()
        .filter(|(_, ns)| ns.presence)
        .map(|(name, _)| name.as_str())
        .collect();
    let doc = OPENAPI.replacen(ANY_NAMESPACE, &pattern(all), 1);
    if with_presence.is_empty() {
        return doc;
    }
    doc.replacen(ANY_NAMESPACE, &pattern(with_presence), 1)
}

/// An API endpoint with the path segments it names (still percent-encoded).
enum Route<'a> {
    Publish,
    Broadcast,
    History(&'a str),
    Presence(&'a str),
    PresenceStats(&'a str),
    User(&'a str),
    UserCursors(&'a str),
    Disconnect(&'a str),
    Revoke(&'a str),
    Nodes,
    Prices,
    Price(&'a str),
    OpenApi,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Option<Route<'a>> {
        let rest = path.strip_prefix("/api/v1/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        Some(match segments.as_slice() {
            ["publish"] => Route::Publish,
            ["broadcast"] => Route::Broadcast,
            ["history", ch] => Route::History(ch),
            ["presence", ch] => Route::Presence(ch),
            ["presence", ch, "stats"] => Route::PresenceStats(ch),
            ["users", user] => Route::User(user),
            ["users", user, "cursors"] => Route::UserCursors(user),
            ["users", user, "disconnect"] => Route::Disconnect(user),
            ["tokens", jti, "revoke"] => Route::Revoke(jti),
            ["nodes"] => Route::Nodes,
            ["prices"] => Route::Prices,
            ["prices", symbol] => Route::Price(symbol),
            ["openapi.yaml"] => Route::OpenApi,
            _ => return None,
        })
    }

    /// Each endpoint answers exactly one method.
    fn method(&self) -> Method {
        match self {
            Route::Publish | Route::Broadcast | Route::Disconnect(_) | Route::Revoke(_) => {
                Method::POST
            }
            _ => Method::GET,
        }
    }
}

/// A refusal as a JSON error response.
fn refused(r: Refusal) -> Response<Body> {
    error(r.status(), r.code, &r.reason)
}

/// `405` with the one method the endpoint answers.
pub fn wrong_method(allowed: &Method) -> Response<Body> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        405,
        &format!("method not allowed; use {allowed}"),
    );
    if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
        resp.headers_mut().insert(ALLOW, v);
    }
    resp
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

/// Reads and parses a JSON body within `server.body_read_timeout`.
async fn body<T: for<'de> Deserialize<'de>>(
    node: &Node,
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    // Refuse a declared oversize body before reading it (and before `100 Continue`).
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > MAX_BODY) {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::TOO_LARGE,
            "body larger than 1 MiB",
        ));
    }
    let timeout = node.config.server.body_read_timeout;
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    let bytes = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::TOO_LARGE,
                "body too large or unreadable",
            ))
        }
        Err(_) => {
            // The rest of the body may still arrive: this connection cannot be reused.
            let mut resp = error(
                StatusCode::REQUEST_TIMEOUT,
                408,
                &format!(
                    "request body not received within server.body_read_timeout ({})",
                    humantime::format_duration(timeout)
                ),
            );
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return Err(resp);
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            code::MALFORMED,
            &format!("invalid JSON body: {e}"),
        )
    })
}

/// A JSON body that may be absent (empty means all defaults).
pub(super) async fn optional_body<T: for<'de> Deserialize<'de> + Default>(
    node: &Node,
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let headers = req.headers();
    let empty = match headers.get(CONTENT_LENGTH) {
        Some(len) => len.to_str().is_ok_and(|v| v.trim() == "0"),
        None => headers.get(TRANSFER_ENCODING).is_none(),
    };
    if empty {
        return Ok(T::default());
    }
    body(node, req).await
}

/// The query parameters; one that is given twice is refused.
struct Query<'a>(HashMap<Cow<'a, str>, Cow<'a, str>>);

impl<'a> Query<'a> {
    fn parse(req: &'a Request<Incoming>) -> Result<Query<'a>, Refusal> {
        let mut params = HashMap::new();
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            let what = format!("query parameter `{k}` is given more than once");
            if params.insert(k, v).is_some() {
                return Err(Refusal::new(code::BAD_FIELD, what));
            }
        }
        Ok(Query(params))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| &**v)
    }

    /// A seq parameter (an unsigned 64-bit integer), if present.
    fn seq(&self, name: &str) -> Result<Option<u64>, Refusal> {
        let Some(v) = self.text(name) else {
            return Ok(None);
        };
        v.parse::<u64>().map(Some).map_err(|_| {
            Refusal::new(
                code::BAD_FIELD,
                format!(
                    "query parameter `{name}` must be an integer from 0 to {}",
                    u64::MAX
                ),
            )
        })
    }

    /// A `limit`: an integer of at least 1; any larger one is served as the maximum.
    fn limit(&self, max: usize) -> Result<usize, Refusal> {
        let Some(v) = self.text("limit") else {
            return Ok(max);
        };
        let digits = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        match v.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(usize::try_from(n).map_or(max, |n| n.min(max))),
            // Only an overflow fails to parse digits: a huge limit.
            Err(_) if digits => Ok(max),
            _ => Err(Refusal::new(
                code::BAD_FIELD,
                "query parameter `limit` must be an integer of at least 1",
            )),
        }
    }
}

/// A path segment, percent-decoded; `None` if it is not UTF-8.
fn decode(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}

/// A user id from a path segment, checked against the `sub` grammar.
fn user_segment(segment: &str) -> Result<String, Refusal> {
    decode(segment)
        .filter(|u| crate::ids::is_valid_user(u))
        .ok_or_else(|| {
            Refusal::new(
                code::BAD_FIELD,
                "invalid user id: 1 to 255 bytes of visible ASCII",
            )
        })
}

/// A channel name from a path segment.
fn channel_segment<'n>(
    node: &'n Node,
    segment: &str,
) -> Result<(crate::channel::Channel, &'n crate::config::NamespaceConfig), Refusal> {
    let name = decode(segment).unwrap_or_default();
    request::resolve(node, &name)
}

/// Routes `/api/...`.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some(route) = Route::parse(&path) else {
        if let Some(resp) = refusal(&node, &req) {
            return resp;
        }
        return error(StatusCode::NOT_FOUND, 404, "no such API endpoint");
    };
    let method = route.method();
    // The contract is public: a client can read it before it has a key.
    if !matches!(route, Route::OpenApi) {
        if let Some(resp) = refusal(&node, &req) {
            return resp;
        }
    }
    if req.method() != method {
        return wrong_method(&method);
    }
    match endpoint(&node, route, req).await {
        Ok(resp) => resp,
        Err(r) => refused(r),
    }
}

type Answer = Result<Response<Body>, Refusal>;

async fn endpoint(node: &Node, route: Route<'_>, req: Request<Incoming>) -> Answer {
    match route {
        Route::Publish => {
            let parent = caller_trace(&req);
            let b: PublishBody = match body(node, req).await {
                Ok(b) => b,
                Err(resp) => return Ok(resp),
            };
            let p = publish_one(node, &b.channel, b.data, b.msg_id, &parent).await?;
            Ok(json(
                StatusCode::OK,
                &PublishResult::done(b.channel, p.seq, p.duplicate),
            ))
        }
        Route::Broadcast => {
            let parent = caller_trace(&req);
            let b: BroadcastBody = match body(node, req).await {
                Ok(b) => b,
                Err(resp) => return Ok(resp),
            };
            if let Some(id) = &b.msg_id {
                crate::ids::check_msg_id(id).map_err(|why| Refusal::new(code::BAD_FIELD, why))?;
            }
            // The channels are independent: published together, each awaiting its
            // own ack, instead of one round trip after another.
            let publishes = b.channels.into_iter().map(|name| {
                // Dedupe is per channel: one msg_id covers every channel of the broadcast.
                let (data, msg_id, parent) = (b.data.clone(), b.msg_id.clone(), &parent);
                async move {
                    match publish_one(node, &name, data, msg_id, parent).await {
                        Ok(p) => PublishResult::done(name, p.seq, p.duplicate),
                        Err(r) => PublishResult {
                            channel: name,
                            seq: None,
                            duplicate: None,
                            error: Some(r.reason),
                            code: Some(r.code),
                        },
                    }
                }
            });
            let results = futures_util::future::join_all(publishes).await;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "results": results }),
            ))
        }
        Route::History(segment) => {
            let (channel, ns) = channel_segment(node, segment)?;
            let query = Query::parse(&req)?;
            // Documented: a larger limit is served as `max_replay`.
            let limit = query.limit(ns.max_replay)?;
            let from = match (query.seq("since")?, query.text("epoch")) {
                (Some(seq), Some(epoch)) => HistoryFrom::After(Position {
                    seq,
                    epoch: epoch.to_string(),
                }),
                (None, None) => HistoryFrom::Latest(limit),
                (Some(_), None) => {
                    return Err(Refusal::new(code::BAD_FIELD, "`since` needs `epoch`"))
                }
                (None, Some(_)) => {
                    return Err(Refusal::new(code::BAD_FIELD, "`epoch` needs `since`"))
                }
            };
            let page = node
                .engine
                .broker
                .history(&channel, from, limit, PageLimit::messages(limit))
                .await?;
            Ok(json(
                StatusCode::OK,
                &HistoryBody {
                    channel: channel.as_str(),
                    publications: PublicationList(&page.publications),
                    position: page.position,
                    complete: page.complete,
                },
            ))
        }
        Route::Presence(segment) | Route::PresenceStats(segment) => {
            let stats = matches!(route, Route::PresenceStats(_));
            presence(node, &req, segment, stats).await
        }
        Route::User(segment) => {
            let user = user_segment(segment)?;
            let conns = node.engine.presence.user(&user).await?;
            Ok(json(
                StatusCode::OK,
                &UserBody {
                    online: !conns.is_empty(),
                    user,
                    connections: conns,
                },
            ))
        }
        Route::UserCursors(segment) => {
            let user = user_segment(segment)?;
            let cursors = node.engine.cursors.list(&user).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"user": user, "cursors": cursors}),
            ))
        }
        Route::Disconnect(segment) => {
            let user = user_segment(segment)?;
            let b: DisconnectBody = match optional_body(node, req).await {
                Ok(b) => b,
                Err(resp) => return Ok(resp),
            };
            if let Some(device) = &b.device {
                crate::ids::check_device(device)
                    .map_err(|why| Refusal::new(code::BAD_FIELD, why))?;
            }
            node.engine
                .control
                .disconnect(&user, b.device.as_deref())
                .await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"user": user, "device": b.device}),
            ))
        }
        Route::Revoke(segment) => {
            let jti = decode(segment)
                .filter(|j| !j.is_empty())
                .ok_or_else(|| Refusal::new(code::BAD_FIELD, "invalid token id"))?;
            let b: RevokeBody = match optional_body(node, req).await {
                Ok(b) => b,
                Err(resp) => return Ok(resp),
            };
            // Kept until the token would expire; without that, for `revocation_ttl`.
            let until_ms = match b.expires_at {
                Some(secs) => secs.saturating_mul(1000),
                None => unix_ms() + node.config.redis.revocation_ttl.as_millis() as u64,
            };
            node.engine.control.revoke(&jti, until_ms).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"jti": jti, "revoked_until_ms": until_ms}),
            ))
        }
        Route::Nodes => {
            let nodes = node.engine.registry.nodes().await?;
            Ok(json(StatusCode::OK, &serde_json::json!({ "nodes": nodes })))
        }
        Route::Prices => {
            let list = node.prices.all().await?;
            let now = unix_ms();
            let prices: Vec<PriceBody> = list.iter().map(|c| PriceBody::new(c, now)).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "prices": prices }),
            ))
        }
        Route::Price(symbol) => {
            if !crate::channel::is_valid_token(symbol) {
                return Err(Refusal::new(code::BAD_FIELD, "invalid symbol"));
            }
            match node.prices.get(symbol).await? {
                Some(c) => Ok(json(StatusCode::OK, &PriceBody::new(&c, unix_ms()))),
                None => Ok(error(
                    StatusCode::NOT_FOUND,
                    404,
                    &format!("no price for {symbol}"),
                )),
            }
        }
        Route::OpenApi => {
            let mut resp = Response::new(Body::from(contract(node)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/yaml"),
            );
            Ok(resp)
        }
    }
}

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

impl PublishResult {
    fn done(channel: String, seq: u64, duplicate: bool) -> Self {
        PublishResult {
            channel,
            seq: Some(seq),
            duplicate: Some(duplicate),
            error: None,
            code: None,
        }
    }
}

#[derive(Serialize)]
struct HistoryBody<'a> {
    channel: &'a str,
    publications: PublicationList<'a>,
    position: Position,
    complete: bool,
}

#[derive(Serialize)]
struct UserBody {
    user: String,
    online: bool,
    connections: Vec<ClientInfo>,
}

/// The caller's `traceparent`/`tracestate` headers, as the parent of its publish span.
fn caller_trace(req: &Request<Incoming>) -> opentelemetry::Context {
    let header = |k| req.headers().get(k).and_then(|v| v.to_str().ok());
    crate::telemetry::remote_parent(header("traceparent"), header("tracestate"))
}

async fn publish_one(
    node: &Node,
    name: &str,
    data: Box<RawValue>,
    msg_id: Option<String>,
    parent: &opentelemetry::Context,
) -> Result<crate::engine::Published, Refusal> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let (channel, ns) = request::resolve(node, name)?;
    request::check_publication(ns, &data, msg_id.as_deref())?;
    let span = tracing::info_span!(
        "api_publish",
        channel = %channel,
        namespace = channel.namespace(),
        seq = tracing::field::Empty,
        duplicate = tracing::field::Empty,
    );
    let _ = span.set_parent(parent.clone());
    let namespace = crate::metrics::get().publishing(channel.namespace());
    let published = node
        .engine
        .broker
        .publish(PublishRequest {
            channel,
            data,
            from: None,
            msg_id,
            caller_trace: Some(parent.clone()),
        })
        .instrument(span.clone())
        .await;
    namespace.outcome(crate::metrics::Source::Api, &published);
    let published = published?;
    span.record("seq", crate::telemetry::int(published.seq));
    span.record("duplicate", published.duplicate);
    Ok(published)
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
    #[serde(default, deserialize_with = "whole_number")]
    expires_at: Option<u64>,
}

/// A non-negative integer as JSON means it: `5` and `5.0` alike.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f))
            .map(|f| f as u64)
    });
    whole
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom("expected a non-negative integer"))
}

#[derive(Serialize)]
struct PresenceBody<'a> {
    channel: &'a str,
    clients: Vec<ClientInfo>,
    next: Option<String>,
}

/// `GET /api/v1/presence/{channel}[?cursor=&limit=]` and `.../stats`.
async fn presence(node: &Node, req: &Request<Incoming>, segment: &str, stats: bool) -> Answer {
    let (channel, ns) = channel_segment(node, segment)?;
    if !ns.presence {
        return Err(Refusal::new(
            code::NOT_ENABLED,
            format!("namespace {:?} has no presence", channel.namespace()),
        ));
    }
    let p = &node.engine.presence;
    let query = Query::parse(req)?;
    if stats {
        let s = p.stats(&channel).await?;
        return Ok(json(
            StatusCode::OK,
            &serde_json::json!({"channel": channel.as_str(), "clients": s.clients, "users": s.users}),
        ));
    }
    let max = node.config.presence_page_max();
    // Documented: a larger limit is served as `server.presence_page_max`.
    let limit = query.limit(max)?;
    let cursor = query.text("cursor");
    if let Some(c) = cursor {
        request::check_page_token(c)?;
    }
    let page = p.page(&channel, cursor, limit).await?;
    Ok(json(
        StatusCode::OK,
        &PresenceBody {
            channel: channel.as_str(),
            clients: page.clients,
            next: page.next,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::{ANY_NAMESPACE, OPENAPI};

    #[test]
    fn the_contract_has_both_channel_patterns_to_specialise() {
        assert_eq!(OPENAPI.matches(ANY_NAMESPACE).count(), 2);
    }
}
