//! Client protocol v1 (docs/protocol.md): parsing client frames into [`Command`]s,
//! encoding server frames, and the stable error and close codes.
//!
//! Every code here is listed in docs/protocol.md; tests assert them by number.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::engine::Position;

/// Stable numeric error codes carried by `error` frames.
pub mod code {
    pub const INTERNAL: u16 = 100;
    pub const MALFORMED: u16 = 101;
    pub const UNKNOWN_TYPE: u16 = 102;
    pub const BAD_FIELD: u16 = 103;
    pub const BAD_CHANNEL: u16 = 104;
    pub const UNKNOWN_NAMESPACE: u16 = 105;
    pub const PERMISSION_DENIED: u16 = 106;
    pub const ALREADY_SUBSCRIBED: u16 = 107;
    pub const NOT_SUBSCRIBED: u16 = 108;
    pub const TOO_MANY_SUBSCRIPTIONS: u16 = 109;
    pub const RATE_LIMITED: u16 = 110;
    pub const TOO_LARGE: u16 = 111;
    pub const PUBLISH_DISABLED: u16 = 112;
    pub const UNAVAILABLE: u16 = 113;
    pub const BAD_TOKEN: u16 = 114;
    pub const NOT_ENABLED: u16 = 115;
    pub const BINARY_FRAME: u16 = 116;
    /// Presence, cursors or control need Redis, which is unreachable; retry later.
    pub const DEGRADED: u16 = 117;
    /// Publication `data` nests arrays or objects deeper than `max_data_depth`.
    pub const TOO_DEEP: u16 = 118;
}

/// Close codes for fatal conditions.
pub mod close {
    pub const NORMAL: u16 = 1000;
    /// The server hit an internal error (a bug) while serving the connection.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// A replay could not go on (the backbone stayed away): reconnect later with `since`.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// Disconnected by an operator, or the token was revoked.
    pub const KICKED: u16 = 4003;
    pub const IDLE_TIMEOUT: u16 = 4005;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const RATE_LIMIT: u16 = 4009;
    pub const FRAME_TOO_LARGE: u16 = 4010;
    pub const PROTOCOL_VIOLATION: u16 = 4011;
    pub const SHUTTING_DOWN: u16 = 4012;
}

/// A request id as the client sent it (number or string), echoed verbatim.
pub type RequestId = Box<RawValue>;

/// A parsed client request.
#[derive(Debug)]
pub enum Command {
    Subscribe {
        channel: String,
        since: Option<Position>,
        snapshot: Option<usize>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Box<RawValue>,
        msg_id: Option<String>,
        /// The publisher's W3C trace context: the parent of the publish span.
        traceparent: Option<String>,
    },
    Ack {
        channel: String,
        seq: u64,
    },
    History {
        channel: String,
        since: Option<Position>,
        limit: Option<usize>,
    },
    Presence {
        channel: String,
        /// A previous reply's `next`, for the following page.
        cursor: Option<String>,
        limit: Option<usize>,
    },
    Refresh {
        token: String,
    },
    Ping,
}

/// A request that could not be understood, answered with an `error` frame.
#[derive(Debug)]
pub struct Rejection {
    pub id: Option<RequestId>,
    pub code: u16,
    pub reason: String,
}

/// Every field any request may carry; one borrowed pass, then per-type checks,
/// so the error can name the missing field and still echo the `id`.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    channel: Option<Cow<'a, str>>,
    since: Option<Position>,
    snapshot: Option<usize>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    msg_id: Option<Cow<'a, str>>,
    seq: Option<u64>,
    limit: Option<usize>,
    #[serde(borrow)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow)]
    cursor: Option<Cow<'a, str>>,
    #[serde(borrow)]
    traceparent: Option<Cow<'a, str>>,
}

/// Just the id of a frame whose other fields did not parse.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<(Option<RequestId>, Command), Rejection> {
    let env: Envelope = serde_json::from_str(text).map_err(|e| {
        // Valid JSON with a wrongly typed field: still echo the id, and say which.
        match serde_json::from_str::<IdOnly>(text) {
            Ok(only) => Rejection {
                id: only.id.map(|raw| raw.to_owned()),
                code: code::BAD_FIELD,
                reason: format!("invalid field: {e}"),
            },
            Err(_) => Rejection {
                id: None,
                code: code::MALFORMED,
                reason: format!("malformed frame: {e}"),
            },
        }
    })?;
    let id = env.id.map(|raw| raw.to_owned());
    let missing = |field: &str, kind: &str| Rejection {
        id: env.id.map(|raw| raw.to_owned()),
        code: code::BAD_FIELD,
        reason: format!("`{kind}` needs `{field}`"),
    };
    let kind = env
        .kind
        .as_deref()
        .ok_or_else(|| missing("type", "every frame"))?;
    let channel = |kind: &str| {
        env.channel
            .as_deref()
            .map(str::to_string)
            .ok_or_else(|| missing("channel", kind))
    };
    let command = match kind {
        "subscribe" => Command::Subscribe {
            channel: channel(kind)?,
            since: env.since,
            snapshot: env.snapshot,
        },
        "unsubscribe" => Command::Unsubscribe {
            channel: channel(kind)?,
        },
        "publish" => Command::Publish {
            channel: channel(kind)?,
            data: env.data.ok_or_else(|| missing("data", kind))?.to_owned(),
            msg_id: env.msg_id.as_deref().map(str::to_string),
            traceparent: match env.traceparent.as_deref() {
                // Bounded and printable: it reaches span attributes and the NATS header.
                Some(t) if t.len() > 128 || !t.bytes().all(|b| b.is_ascii_graphic()) => {
                    return Err(Rejection {
                        id,
                        code: code::BAD_FIELD,
                        reason: "`traceparent` must be a W3C traceparent (at most 128 visible ASCII bytes)".into(),
                    })
                }
                t => t.map(str::to_string),
            },
        },
        "ack" => Command::Ack {
            channel: channel(kind)?,
            seq: env.seq.ok_or_else(|| missing("seq", kind))?,
        },
        "history" => Command::History {
            channel: channel(kind)?,
            since: env.since,
            limit: env.limit,
        },
        "presence" => Command::Presence {
            channel: channel(kind)?,
            cursor: env.cursor.as_deref().map(str::to_string),
            limit: env.limit,
        },
        "refresh" => Command::Refresh {
            token: env
                .token
                .as_deref()
                .map(str::to_string)
                .ok_or_else(|| missing("token", kind))?,
        },
        "ping" => Command::Ping,
        other => {
            return Err(Rejection {
                id,
                code: code::UNKNOWN_TYPE,
                reason: format!("unknown frame type {other:?}"),
            })
        }
    };
    Ok((id, command))
}

/// Serializes a server frame; the frame types are plain structs, so this cannot fail
/// for them, but a failure is still reported rather than panicking.
pub fn encode<T: Serialize>(frame: &T) -> Bytes {
    match serde_json::to_vec(frame) {
        Ok(v) => Bytes::from(v),
        Err(_) => {
            Bytes::from_static(br#"{"type":"error","code":100,"reason":"internal encoding error"}"#)
        }
    }
}

/// `error` frame.
#[derive(Serialize)]
pub struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a RawValue>,
    pub code: u16,
    pub reason: &'a str,
}

/// Encodes an `error` frame.
pub fn error_message(id: Option<&RawValue>, code: u16, reason: &str) -> Bytes {
    encode(&ErrorFrame {
        kind: "error",
        id,
        code,
        reason,
    })
}

/// A reply: `type`, the echoed `id`, and the reply's own fields flattened in.
#[derive(Serialize)]
pub struct Reply<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a RawValue>,
    #[serde(flatten)]
    pub body: T,
}

/// Encodes a reply frame of type `kind`.
pub fn reply<T: Serialize>(kind: &'static str, id: Option<&RawValue>, body: T) -> Bytes {
    encode(&Reply { kind, id, body })
}

/// `welcome` body.
#[derive(Serialize)]
pub struct Welcome<'a> {
    pub conn_id: &'a str,
    pub node: &'a str,
    pub user: &'a str,
    pub expires_at: u64,
    pub ping_interval_ms: u64,
}

/// `subscribed` body.
#[derive(Serialize)]
pub struct Subscribed<'a> {
    pub channel: &'a str,
    pub position: Position,
    pub recovered: bool,
    pub replayed: u64,
    /// Acked namespaces without `since`: whether the device resumed from a stored cursor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_cursor: Option<bool>,
}

/// A body with only a channel (`unsubscribed`).
#[derive(Serialize)]
pub struct ChannelOnly<'a> {
    pub channel: &'a str,
}

/// `published` body.
#[derive(Serialize)]
pub struct PublishedReply<'a> {
    pub channel: &'a str,
    pub seq: u64,
    pub duplicate: bool,
}

/// An empty body (`pong`).
#[derive(Serialize)]
pub struct Empty {}
