//! The engine boundary: what carries publications ([`Broker`]), who is where
//! ([`Presence`]), how far each device has read ([`Cursors`]) and what acts on
//! connections across nodes ([`Control`]).
//!
//! The memory engine implements all three for one node; cluster engines plug in
//! behind the same traits, so sessions and the hub never know which one runs.

pub mod build;
pub mod memory;
pub mod nats;
pub mod redis;
pub mod revocations;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::Channel;

/// A boxed future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The outcome of a publication already sent ([`Broker::publish_ordered`]).
pub type AckFuture = BoxFuture<'static, Result<Published, EngineError>>;

/// Where a client is in a channel's stream: a sequence within one stream incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
}

/// One message on a channel, with its `msg` frame encoded once for every recipient.
#[derive(Debug)]
pub struct Publication {
    pub channel: Channel,
    pub seq: u64,
    /// Server time in Unix milliseconds.
    pub ts: u64,
    pub data: Box<RawValue>,
    pub from: Option<Arc<str>>,
    /// The complete `msg` message, encoded once: the payload of every recipient's text frame.
    pub msg: Bytes,
}

#[derive(Serialize)]
struct MsgFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a str,
    seq: u64,
    ts: u64,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
}

impl Publication {
    /// Builds a publication and encodes its frame.
    pub fn new(
        channel: Channel,
        seq: u64,
        ts: u64,
        data: Box<RawValue>,
        from: Option<Arc<str>>,
    ) -> Self {
        let msg = crate::protocol::encode(&MsgFrame {
            kind: "msg",
            channel: channel.as_str(),
            seq,
            ts,
            data: &data,
            from: from.as_deref(),
        });
        Publication {
            channel,
            seq,
            ts,
            data,
            from,
            msg,
        }
    }
}

/// A list of publications serialized as their `msg` objects (for `history`).
pub struct PublicationList<'a>(pub &'a [Arc<Publication>]);

impl Serialize for PublicationList<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for p in self.0 {
            let raw: &RawValue = serde_json::from_slice(&p.msg).map_err(S::Error::custom)?;
            seq.serialize_element(raw)?;
        }
        seq.end()
    }
}

/// A request to publish.
#[derive(Debug)]
pub struct PublishRequest {
    pub channel: Channel,
    pub data: Box<RawValue>,
    pub from: Option<Arc<str>>,
    /// Idempotency key: a repeat within the dedupe window returns the original seq.
    pub msg_id: Option<String>,
    /// The caller's W3C trace context (`traceparent`), forwarded to the delivering
    /// nodes as it came when this node makes no spans (trace export off).
    pub caller_trace: Option<opentelemetry::Context>,
}

/// What a publish produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    /// True when `msg_id` matched an earlier publication and nothing new was stored.
    pub duplicate: bool,
}

/// Which part of a channel's retained history to read.
#[derive(Debug, Clone)]
pub enum HistoryFrom {
    /// Publications with `seq > position.seq`, oldest first.
    After(Position),
    /// Publications with `seq` above a stored cursor, in the current epoch.
    Cursor(u64),
    /// The newest `n` publications, oldest first.
    Latest(usize),
}

/// Most publications, and most bytes of them, one read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLimit {
    pub messages: usize,
    pub bytes: usize,
}

impl PageLimit {
    /// As many as `messages`, whatever their size (a `history` reply).
    pub fn messages(messages: usize) -> Self {
        PageLimit {
            messages,
            bytes: usize::MAX,
        }
    }

    /// Whether a page of `count` publications and `bytes` takes one more of `len`
    /// bytes. An empty page takes one however large, so a replay always moves.
    pub fn admits(&self, count: usize, bytes: usize, len: usize) -> bool {
        count == 0 || (count < self.messages && bytes.saturating_add(len) <= self.bytes)
    }
}

/// The first page of a channel's history from some point.
#[derive(Debug)]
pub struct HistoryPage {
    pub publications: Vec<Arc<Publication>>,
    /// The stream's top for this channel when read: the last seq stored and the epoch.
    pub position: Position,
    /// For [`HistoryFrom::After`] and [`HistoryFrom::Cursor`]: whether every publication
    /// after the position is either in this read (this page and the `remaining`
    /// after it) or provably never existed (docs/architecture.md, "Replay").
    pub complete: bool,
    /// Publications of this read stored after the page (read them with
    /// [`Broker::history_after`]); 0 when the page reached the end.
    pub remaining: u64,
}

/// A later page of a replay.
#[derive(Debug, Default)]
pub struct ReplayPage {
    pub publications: Vec<Arc<Publication>>,
    /// Publications stored after this page when it was read; 0 at the end.
    pub remaining: u64,
    /// Publications after the requested seq were dropped (size or age) before they
    /// were read: the replay cannot go on without a gap.
    pub lost: bool,
}

/// Why an engine operation failed.
#[derive(Debug, Clone)]
pub enum EngineError {
    /// The backbone is unreachable or overloaded; the client may retry.
    Unavailable(String),
    /// The request cannot succeed (e.g. unknown namespace).
    Rejected(String),
    /// The shared store (Redis) is unreachable: presence, cursors and control are
    /// degraded while delivery goes on; the client may retry.
    Degraded(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::Unavailable(m) => write!(f, "unavailable: {m}"),
            EngineError::Rejected(m) => write!(f, "rejected: {m}"),
            EngineError::Degraded(m) => write!(f, "degraded: {m}"),
        }
    }
}

/// What engines deliver to this node (the hub implements it): the one way
/// anything comes up out of an engine.
pub trait Deliveries: Send + Sync {
    /// A live publication: once per publication per node, in seq order per channel.
    /// Returns how many local subscriptions it was offered to.
    fn publication(&self, publication: &Arc<Publication>) -> usize;
    /// A member joined or left a channel (namespaces with `join_leave`), from any node.
    fn join_leave(&self, event: &JoinLeave);
}

/// Delivers nothing: for a process without clients (`switchyard feed`).
pub struct NoDeliveries;

impl Deliveries for NoDeliveries {
    fn publication(&self, _: &Arc<Publication>) -> usize {
        0
    }
    fn join_leave(&self, _: &JoinLeave) {}
}

/// A user and its connections on this node as `(conn_id, device, since)`.
pub type UserConnections = (Arc<str>, Vec<(Arc<str>, Arc<str>, u64)>);

/// This node's open connections as engines act on them (the connection index
/// implements it): control commands close them, the registry counts them.
pub trait LocalConnections: Send + Sync {
    /// Closes the user's connections (only `device`'s, if given) with 4003; returns how many.
    fn kick_user(&self, user: &str, device: Option<&str>, reason: &str) -> usize;
    /// Closes every connection authenticated with token id `jti` with 4003; returns how many.
    fn kick_token(&self, jti: &str, reason: &str) -> usize;
    /// Open connections.
    fn count(&self) -> usize;
    /// Every connection, by user (the presence heartbeat).
    fn snapshot(&self) -> Vec<UserConnections>;
    /// The user's connections on this node.
    fn of_user(&self, user: &str, node: &str) -> Vec<ClientInfo>;
}

/// Stores, orders and delivers publications.
pub trait Broker: Send + Sync {
    /// Stores a publication and delivers it live; returns its seq.
    fn publish(&self, req: PublishRequest) -> BoxFuture<'_, Result<Published, EngineError>>;
    /// Sends a publication and returns, without waiting, the future of its
    /// outcome: publications sent by successive calls are stored in call order,
    /// whatever order their outcomes are awaited in. What pipelines a connection's
    /// publishes (docs/architecture.md, "Publishing"). By default the publish
    /// completes here.
    fn publish_ordered(
        &self,
        req: PublishRequest,
    ) -> BoxFuture<'_, Result<AckFuture, EngineError>> {
        Box::pin(async move {
            let outcome = self.publish(req).await;
            Ok(Box::pin(std::future::ready(outcome)) as AckFuture)
        })
    }
    /// Reads retained history: at most `limit` publications in all (the newest of
    /// them when there are more, and then not `complete`), the first `page` of
    /// them now.
    fn history<'a>(
        &'a self,
        channel: &'a Channel,
        from: HistoryFrom,
        limit: usize,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<HistoryPage, EngineError>>;
    /// Reads the publications stored after `after`, oldest first, a page at a time:
    /// how a replay continues until it reaches live delivery.
    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: u64,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<ReplayPage, EngineError>>;
    /// A reader that continues one replay of `channel` with `remaining`
    /// publications still to read (it may keep state on the backbone between
    /// pages); `None` when [`Broker::history_after`] is as good.
    fn replay_reader(&self, _channel: &Channel, _remaining: u64) -> Option<Box<dyn ReplayReader>> {
        None
    }
    /// Counts one more local subscription to `channel`; resolves once live
    /// publications of the channel reach this node's hub, so history read after it
    /// overlaps live delivery instead of leaving a gap.
    fn watch<'a>(&'a self, channel: &'a Channel) -> BoxFuture<'a, Result<(), EngineError>>;
    /// Releases one successful `watch`.
    fn unwatch(&self, channel: &Channel);
    /// The backbone's state, for readiness.
    fn backbone(&self) -> BackboneState {
        BackboneState::default()
    }
    /// Publications sent and still awaiting the backbone's ack (0 where publishing
    /// is synchronous).
    fn acks_waiting(&self) -> usize {
        0
    }
}

/// Continues one replay page by page (for a long catch-up): what
/// [`Broker::history_after`] returns, from state kept between pages.
pub trait ReplayReader: Send {
    /// The publications stored after `after`, oldest first, up to `page`.
    fn next_page(
        &mut self,
        after: u64,
        page: PageLimit,
    ) -> BoxFuture<'_, Result<ReplayPage, EngineError>>;
}

/// The broker's backbone as `/readyz` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackboneState {
    /// Why the node cannot take traffic now; empty when it can.
    pub blocking: Vec<String>,
    /// Namespaces whose stream is not available (their requests answer 113), and why.
    pub namespaces: std::collections::BTreeMap<String, String>,
}

impl BackboneState {
    /// Whether the node can take traffic (some namespaces may still be unavailable).
    pub fn is_ready(&self) -> bool {
        self.blocking.is_empty()
    }
}

/// One connection as presence records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub conn_id: String,
    pub user: String,
    pub device: String,
    pub node: String,
    /// Unix milliseconds when it joined the channel (or connected, for a user's connections).
    pub since: u64,
}

impl ClientInfo {
    /// One connection of `user` on `node` since `since` (Unix ms).
    pub fn new(conn_id: &str, user: &str, device: &str, node: &str, since: u64) -> Self {
        ClientInfo {
            conn_id: conn_id.to_string(),
            user: user.to_string(),
            device: device.to_string(),
            node: node.to_string(),
            since,
        }
    }
}

/// One page of a channel's members.
#[derive(Debug, Default)]
pub struct PresencePage {
    pub clients: Vec<ClientInfo>,
    /// Opaque page token for the next page; `None` when this was the last.
    pub next: Option<String>,
}

/// A channel's member counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PresenceStats {
    /// Connections subscribed.
    pub clients: u64,
    /// Distinct users among them.
    pub users: u64,
}

/// Who is subscribed to which channel, and which users are connected.
pub trait Presence: Send + Sync {
    /// Records a connection as a member of `channel`.
    fn join(&self, channel: &Channel, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>>;
    /// Removes a connection from `channel`.
    fn leave<'a>(
        &'a self,
        channel: &'a Channel,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>>;
    /// Up to `limit` members, continuing after `after` (a previous page's `next`).
    fn page<'a>(
        &'a self,
        channel: &'a Channel,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<PresencePage, EngineError>>;
    /// Member counts, without loading the members.
    fn stats<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>>;
    /// Records a connection of a user (whether the user is online anywhere).
    fn connect(&self, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>>;
    /// Removes a connection of a user.
    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>>;
    /// A user's open connections on every node.
    fn user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<ClientInfo>, EngineError>>;
}

/// One device's cursor on one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceCursor {
    pub device: String,
    pub channel: String,
    pub seq: u64,
    /// The stream incarnation `seq` belongs to; absent for an ack on a channel the
    /// connection was not subscribed to.
    pub epoch: Option<String>,
}

/// An acked position: a seq, in a stream incarnation when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedSeq {
    pub seq: u64,
    pub epoch: Option<Arc<str>>,
}

impl AckedSeq {
    /// Folds a newer ack in: the higher seq of one incarnation, or the newer
    /// incarnation (whose seqs start again) when they differ.
    pub fn advance(&mut self, newer: AckedSeq) {
        match (&self.epoch, &newer.epoch) {
            (Some(a), Some(b)) if a != b => *self = newer,
            _ => {
                self.seq = self.seq.max(newer.seq);
                if newer.epoch.is_some() {
                    self.epoch = newer.epoch;
                }
            }
        }
    }
}

/// What a cursor read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorRead {
    /// The device's cursor.
    Found(AckedSeq),
    /// No cursor: a device that never acked here.
    Absent,
    /// No cursor, but the cursor store lost its data within `redis.cursor_ttl`: the
    /// device may have had one, so it cannot be told it missed nothing.
    Lost,
}

/// Per user+device read cursors (acked namespaces, docs/architecture.md).
pub trait Cursors: Send + Sync {
    /// Moves the cursor forward to `at`; never back within one stream incarnation.
    /// May be buffered (see [`Cursors::flush`]).
    fn ack<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
        at: AckedSeq,
    ) -> BoxFuture<'a, Result<(), EngineError>>;
    /// The highest acked position, including acks not yet written.
    fn get<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<CursorRead, EngineError>>;
    /// Every cursor of every device of a user.
    fn list<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<DeviceCursor>, EngineError>>;
    /// Writes buffered acks now (a device disconnects and may resume on another node).
    fn flush(&self) -> BoxFuture<'_, Result<(), EngineError>>;
}

/// A member joined or left a channel (namespaces with `join_leave`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinLeave {
    /// `join` or `leave`.
    #[serde(rename = "type")]
    pub kind: String,
    pub channel: String,
    pub user: String,
    pub device: String,
}

/// A gateway node as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub region: String,
    pub connections: u64,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unix milliseconds of the last heartbeat.
    pub heartbeat_at: u64,
}

/// Commands that act on connections wherever they are, the node registry, and
/// join/leave events (docs/architecture.md, "Redis": control).
pub trait Control: Send + Sync {
    /// Closes the user's connections (one device's, if given) on every node with 4003.
    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        device: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), EngineError>>;
    /// Refuses a token id until `until_ms` and closes connections using it, on every node.
    fn revoke<'a>(&'a self, jti: &'a str, until_ms: u64) -> BoxFuture<'a, Result<(), EngineError>>;
    /// Whether a token id is revoked (a local lookup: no round trip per connect).
    fn is_revoked(&self, jti: &str) -> bool;
    /// Delivers a join/leave event to the channel's subscribers on every node
    /// (through each node's [`Deliveries`]).
    fn announce(&self, event: JoinLeave);
}

/// The cluster's nodes and the health of the shared store: the node registry.
pub trait Registry: Send + Sync {
    /// Live nodes.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, EngineError>>;
    /// State of the shared store, for readiness: `None` when there is none.
    fn store_up(&self) -> Option<bool> {
        None
    }
    /// Leaves the cluster: flushes and removes this node's entries (clean shutdown).
    fn leave_cluster(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The engine a node runs on.
#[derive(Clone)]
pub struct Engine {
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn Presence>,
    pub cursors: Arc<dyn Cursors>,
    pub control: Arc<dyn Control>,
    pub registry: Arc<dyn Registry>,
}
