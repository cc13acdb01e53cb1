//! One client connection: the reader that parses and executes client frames,
//! the writer task that drains the outbox, and the cleanup when either ends.
//!
//! The reader executes commands one at a time (a command may await the engine);
//! the writer keeps sending publications and heartbeats meanwhile, so each
//! connection runs a reader and a writer task.

pub mod frame_reader;
pub mod outbox;
pub mod rate_limit;
pub mod writer;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::auth::{Identity, Permission};
use crate::channel::Channel;
use crate::config::NamespaceConfig;
use crate::connections::Conn;
use crate::engine::memory::unix_ms;
use crate::engine::{
    AckedSeq, ClientInfo, CursorRead, HistoryFrom, JoinLeave, Position, PublicationList,
    PublishRequest,
};
use crate::hub::Subscription;
use crate::node::{ConnectionSlot, Node};
use crate::protocol::{self, close, code, Command};
use crate::request::{self, Refusal};
use crate::server::parse_errors::JsonParseErrors;
use frame_reader::{FrameReader, OpCode, ReadError};
use outbox::Outbox;
use rate_limit::RateLimiter;
use writer::Link;

type Outcome = Result<(), Refusal>;

/// The state of one connection, owned by its reader.
pub struct Session {
    node: Arc<Node>,
    link: Arc<Link>,
    conn_id: Arc<str>,
    /// Shares the connection id's allocation when the client names no device.
    device: Arc<str>,
    identity: Identity,
    subs: HashMap<Channel, Joined>,
    limiter: RateLimiter,
    violations: u32,
    /// Whether this connection acked anything: its cursors are written on disconnect.
    acked: bool,
    since: u64,
}

#[derive(Serialize)]
struct Refreshed {
    expires_at: u64,
}

#[derive(Serialize)]
struct HistoryReply<'a> {
    channel: &'a str,
    publications: PublicationList<'a>,
    position: Position,
}

#[derive(Serialize)]
struct PresenceReply<'a> {
    channel: &'a str,
    clients: Vec<ClientInfo>,
    /// Cursor of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// Serves an upgraded connection until it closes.
pub async fn serve(
    node: Arc<Node>,
    io: TokioIo<Upgraded>,
    identity: Identity,
    device: Option<String>,
    slot: ConnectionSlot,
) {
    // Unwrap hyper's upgrade to the TCP stream: its owned halves need no shared lock,
    // and hyper's HTTP buffers are freed. Bytes hyper read past the handshake come first.
    match io
        .into_inner()
        .downcast::<TokioIo<JsonParseErrors<TcpStream>>>()
    {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_inner().into_split();
            // Copy out: even an empty slice would pin hyper's whole read buffer.
            let early = bytes::Bytes::copy_from_slice(&parts.read_buf);
            drop(parts.read_buf);
            let read = std::io::Cursor::new(early).chain(read);
            run(node, read, write, identity, device, slot).await
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            run(node, read, write, identity, device, slot).await
        }
    }
}

async fn run<R, W>(
    node: Arc<Node>,
    read_io: R,
    write_io: W,
    identity: Identity,
    device: Option<String>,
    slot: ConnectionSlot,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &node.config.session;
    let outbox = Arc::new(Outbox::new(
        cfg.outbox_messages,
        cfg.outbox_bytes,
        cfg.conflate_backlog,
    ));
    let link = Arc::new(Link::new(Arc::clone(&outbox), identity.expires_at));
    let conn_id: Arc<str> = Arc::from(format!("{}-{:012x}", node.id, fastrand::u64(..1 << 48)));
    let device = device.map_or_else(|| Arc::clone(&conn_id), Arc::from);

    outbox.push_reply(protocol::reply(
        "welcome",
        None,
        protocol::Welcome {
            conn_id: &conn_id,
            node: &node.id,
            user: &identity.user,
            expires_at: identity.expires_at,
            ping_interval_ms: cfg.ping_interval.as_millis() as u64,
        },
    ));

    let mut reader = FrameReader::new(read_io, cfg.max_frame_bytes);

    let writer = tokio::spawn(writer::run(write_io, Arc::clone(&link), Arc::clone(&node)));

    let mut session = Session {
        limiter: RateLimiter::new(cfg),
        node,
        link,
        conn_id,
        device,
        identity,
        subs: HashMap::new(),
        violations: 0,
        acked: false,
        since: unix_ms(),
    };
    tracing::debug!(conn = %session.conn_id, user = %session.identity.user, "connected");
    // A panic while serving this connection must not leave it half alive: close
    // the socket (1011) and clean up as for any other close.
    let served = AssertUnwindSafe(read_loop(&mut session, &mut reader))
        .catch_unwind()
        .await;
    if served.is_err() {
        tracing::error!(conn = %session.conn_id, "session panicked; closing with 1011");
        outbox.close(close::INTERNAL_ERROR, "internal error", true);
    }

    // Boxed: the end of a connection is its rarest path and should not size the
    // state every idle connection carries.
    Box::pin(finish(session, reader, writer, slot)).await;
}

/// Registers the connection, then reads and executes frames until it closes.
async fn read_loop<R: AsyncRead + Unpin>(session: &mut Session, reader: &mut FrameReader<R>) {
    let outbox = Arc::clone(&session.link.outbox);
    Box::pin(session.register()).await;
    loop {
        let frame = tokio::select! {
            frame = reader.read_frame() => frame,
            _ = outbox.closing() => break,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(ReadError::TooLarge) => {
                outbox.close(close::FRAME_TOO_LARGE, "frame too large", true);
                break;
            }
            Err(ReadError::Closed) => {
                outbox.close(close::NORMAL, "", false);
                break;
            }
            Err(ReadError::Protocol(why)) => {
                let reason = format!("protocol violation: {why}");
                outbox.close(close::PROTOCOL_VIOLATION, &reason, true);
                break;
            }
        };
        session.link.touch();
        if frame.opcode != OpCode::Pong
            && frame.opcode != OpCode::Close
            && !session.within_rate(frame.payload.len())
        {
            continue;
        }
        match frame.opcode {
            OpCode::Text if frame.fin => match std::str::from_utf8(&frame.payload) {
                Ok(text) => {
                    // Boxed: command handling is the largest state of this task; an idle
                    // connection should not carry it.
                    Box::pin(session.on_text(text)).await
                }
                Err(_) => {
                    outbox.close(close::PROTOCOL_VIOLATION, "invalid UTF-8", true);
                    break;
                }
            },
            OpCode::Binary if frame.fin => {
                session.reply_error(
                    None,
                    code::BINARY_FRAME,
                    "binary frames are not supported; send JSON text frames",
                );
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                outbox.close(
                    close::PROTOCOL_VIOLATION,
                    "fragmented messages are not supported",
                    true,
                );
                break;
            }
            OpCode::Close => {
                // Answer the client's close; what is queued is of no use to it now.
                outbox.close(close::NORMAL, "", false);
                break;
            }
            OpCode::Ping => {
                outbox.push_control(writer::pong(&frame.payload));
            }
            OpCode::Pong => {}
        }
    }
}

/// Unsubscribes, completes the closing handshake and waits for the writer.
async fn finish<R: AsyncRead + Unpin>(
    mut session: Session,
    mut reader: FrameReader<R>,
    writer: tokio::task::JoinHandle<()>,
    slot: ConnectionSlot,
) {
    // Acks first: the close frame waits for them (see `Link::settle`).
    session.write_acks().await;
    session.link.settle();
    session.cleanup().await;
    session.unregister().await;
    // Closing handshake: keep reading (and discarding) until the client answers our
    // close or goes away. Dropping a socket with unread input makes the kernel send a
    // reset, which would destroy the close frame still on its way to the client.
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        loop {
            match reader.read_frame().await {
                Ok(frame) if frame.opcode == OpCode::Close => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
    })
    .await;
    // The writer sends the close frame and ends on its own, bounded by its write timeout.
    let _ = writer.await;
    drop(slot);
}

/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

impl Session {
    fn client_info(&self, since: u64) -> ClientInfo {
        ClientInfo {
            conn_id: self.conn_id.to_string(),
            user: self.identity.user.to_string(),
            device: self.device.to_string(),
            node: self.node.id.clone(),
            since,
        }
    }

    /// Makes the connection reachable by control commands and visible as the
    /// user's; a token revoked while this connection was being set up closes it.
    async fn register(&self) {
        let jti = self.identity.jti.clone();
        self.node.connections.insert(
            &self.identity.user,
            Conn {
                conn_id: Arc::clone(&self.conn_id),
                device: Arc::clone(&self.device),
                jti: jti.clone(),
                since: self.since,
                outbox: Arc::clone(&self.link.outbox),
            },
        );
        if jti.is_some_and(|j| self.node.engine.control.is_revoked(&j)) {
            self.link.outbox.close(close::KICKED, "token revoked", true);
            return;
        }
        if let Err(e) = self
            .node
            .engine
            .presence
            .connect(self.client_info(self.since))
            .await
        {
            tracing::debug!(error = %e, "user presence not recorded");
        }
    }

    /// Writes this connection's acks: the device may resume on another node at once,
    /// so its cursor must be stored before the close completes.
    async fn write_acks(&self) {
        if self.acked {
            if let Err(e) = self.node.engine.cursors.flush().await {
                tracing::warn!(error = %e, "acks of a closed connection stay buffered");
            }
        }
    }

    async fn unregister(&self) {
        self.node
            .connections
            .remove(&self.identity.user, &self.conn_id);
        if let Err(e) = self
            .node
            .engine
            .presence
            .disconnect(&self.identity.user, &self.conn_id)
            .await
        {
            tracing::debug!(error = %e, "user presence not removed");
        }
    }

    fn reply_error(&self, id: Option<&RawValue>, code: u16, reason: &str) {
        self.link
            .outbox
            .push_reply(protocol::error_frame(id, code, reason));
    }

    /// Charges one inbound frame to the rate limit; a refused frame is answered
    /// with error 110, and sustained abuse closes the connection with 4009.
    fn within_rate(&mut self, len: usize) -> bool {
        if self.limiter.allow(len) {
            self.violations = self.violations.saturating_sub(1);
            return true;
        }
        self.violations += 1;
        if self.violations > self.node.config.session.rate_violations_before_close {
            let why = "rate limit exceeded repeatedly";
            self.link.outbox.close(close::RATE_LIMIT, why, true);
        } else {
            self.reply_error(
                None,
                code::RATE_LIMITED,
                "rate limit exceeded; frame dropped",
            );
        }
        false
    }

    async fn on_text(&mut self, text: &str) {
        #[cfg(feature = "test-hooks")]
        if let Some(target) = text.strip_prefix("test-panic:") {
            if target == "writer" {
                self.link.panic_writer.store(true, Ordering::Relaxed);
                self.link.outbox.push_control(outbox::Item::Ping);
                return;
            }
            panic!("test hook: session reader panic");
        }
        let (id, command) = match protocol::parse(text) {
            Ok(parsed) => parsed,
            Err(rej) => {
                self.reply_error(rej.id.as_deref(), rej.code, &rej.reason);
                return;
            }
        };
        let id = id.as_deref();
        let result = match command {
            Command::Subscribe {
                channel,
                since,
                snapshot,
            } => self.subscribe(id, &channel, since, snapshot).await,
            Command::Unsubscribe { channel } => self.unsubscribe(id, &channel).await,
            Command::Publish {
                channel,
                data,
                msg_id,
            } => self.publish(id, &channel, data, msg_id).await,
            Command::Ack { channel, seq } => self.ack(&channel, seq).await,
            Command::History {
                channel,
                since,
                limit,
            } => self.history(id, &channel, since, limit).await,
            Command::Presence {
                channel,
                cursor,
                limit,
            } => self.presence(id, &channel, cursor, limit).await,
            Command::Refresh { token } => self.refresh(id, &token),
            Command::Ping => {
                self.link
                    .outbox
                    .push_reply(protocol::reply("pong", id, protocol::Empty {}));
                Ok(())
            }
        };
        if let Err(f) = result {
            self.reply_error(id, f.code, &f.reason);
        }
    }

    fn require(&self, ns: &NamespaceConfig, perm: Permission, channel: &Channel) -> Outcome {
        if ns.allow.contains(&perm) || self.identity.granted(perm, channel) {
            Ok(())
        } else {
            Err(Refusal::new(
                code::PERMISSION_DENIED,
                format!("permission denied: {} on {channel}", perm_name(perm)),
            ))
        }
    }

    async fn subscribe(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        since: Option<Position>,
        snapshot: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::Sub, &channel)?;
        if self.subs.contains_key(&channel) {
            return Err(Refusal::new(
                code::ALREADY_SUBSCRIBED,
                format!("already subscribed to {channel}"),
            ));
        }
        if self.subs.len() >= self.node.config.session.max_subscriptions {
            return Err(Refusal::new(
                code::TOO_MANY_SUBSCRIPTIONS,
                format!(
                    "at most {} subscriptions per connection",
                    self.node.config.session.max_subscriptions
                ),
            ));
        }
        let engine = &self.node.engine;
        // What the client already has: an explicit position, else its stored cursor
        // (with the stream epoch it was acked in, it is exactly a `since`).
        let mut cursor_lost = false;
        let from_cursor = since.is_none() && ns.acked;
        let resume = match since {
            Some(p) => Some(Resume::Position(p)),
            None if ns.acked => match engine
                .cursors
                .get(&self.identity.user, &self.device, &channel)
                .await?
            {
                CursorRead::Found(AckedSeq {
                    seq,
                    epoch: Some(epoch),
                }) => Some(Resume::Position(Position {
                    seq,
                    epoch: epoch.to_string(),
                })),
                CursorRead::Found(AckedSeq { seq, epoch: None }) => Some(Resume::Cursor(seq)),
                CursorRead::Absent => None,
                CursorRead::Lost => {
                    cursor_lost = true;
                    None
                }
            },
            None => None,
        };
        let stored_cursor = from_cursor.then_some(resume.is_some());
        let snapshot = snapshot.unwrap_or(ns.default_snapshot).min(ns.history_size);
        let from = match &resume {
            Some(Resume::Position(p)) => HistoryFrom::After(p.clone()),
            Some(Resume::Cursor(seq)) => HistoryFrom::Cursor(*seq),
            None => HistoryFrom::Latest(snapshot),
        };

        let conflated = ns.conflate.then(|| self.node.hub.conflation_counter());
        let sub = Subscription::new(channel.clone(), Arc::clone(&self.link.outbox), conflated);
        self.node.hub.add(Arc::clone(&sub));
        if let Err(e) = engine.broker.watch(&channel).await {
            self.drop_from_hub(&sub);
            return Err(e.into());
        }
        let page = match engine.broker.history(&channel, from, ns.max_replay).await {
            Ok(page) => page,
            Err(e) => {
                self.drop_from_hub(&sub);
                engine.broker.unwatch(&channel);
                return Err(e.into());
            }
        };
        let after = match &resume {
            Some(Resume::Position(p)) if p.epoch == page.position.epoch => p.seq,
            Some(Resume::Position(_)) => 0,
            Some(Resume::Cursor(seq)) => *seq,
            None if snapshot > 0 => 0,
            None => page.position.seq,
        };
        // A lost cursor may have pointed anywhere: nothing can be proven recovered.
        let recovered = if resume.is_none() {
            !cursor_lost
        } else {
            page.complete
        };
        let replayed = page.publications.iter().filter(|p| p.seq > after).count();
        let reply = protocol::reply(
            "subscribed",
            id,
            protocol::Subscribed {
                channel: channel.as_str(),
                position: page.position.clone(),
                recovered,
                replayed,
                stored_cursor,
            },
        );
        sub.go_live(reply, &page.publications, after);
        let epoch = self.node.epoch(&page.position.epoch);
        self.subs.insert(channel.clone(), Joined { sub, epoch });
        if ns.presence {
            self.join_presence(&channel, ns).await;
        }
        Ok(())
    }

    fn drop_from_hub(&self, sub: &Arc<Subscription>) {
        sub.cancel();
        self.node.hub.remove(&sub.channel, sub.id);
    }

    async fn join_presence(&self, channel: &Channel, ns: &NamespaceConfig) {
        let info = self.client_info(unix_ms());
        if let Err(e) = self.node.engine.presence.join(channel, info).await {
            tracing::warn!(error = %e, %channel, "presence join failed");
        }
        if ns.join_leave {
            self.announce("join", channel);
        }
    }

    fn announce(&self, kind: &str, channel: &Channel) {
        self.node.engine.control.announce(JoinLeave {
            kind: kind.to_string(),
            channel: channel.to_string(),
            user: self.identity.user.to_string(),
            device: self.device.to_string(),
        });
    }

    async fn leave(&self, sub: &Arc<Subscription>) {
        self.drop_from_hub(sub);
        self.node.engine.broker.unwatch(&sub.channel);
        if let Some(ns) = self.node.namespace(sub.channel.namespace()) {
            if ns.presence {
                if let Err(e) = self
                    .node
                    .engine
                    .presence
                    .leave(&sub.channel, &self.conn_id)
                    .await
                {
                    tracing::warn!(error = %e, channel = %sub.channel, "presence leave failed");
                }
                if ns.join_leave {
                    self.announce("leave", &sub.channel);
                }
            }
        }
    }

    async fn unsubscribe(&mut self, id: Option<&RawValue>, name: &str) -> Outcome {
        let channel = Channel::parse(name)
            .map_err(|e| Refusal::new(code::BAD_CHANNEL, format!("invalid channel: {e}")))?;
        let Some(Joined { sub, .. }) = self.subs.remove(&channel) else {
            return Err(Refusal::new(
                code::NOT_SUBSCRIBED,
                format!("not subscribed to {channel}"),
            ));
        };
        self.leave(&sub).await;
        self.link.outbox.push_reply(protocol::reply(
            "unsubscribed",
            id,
            protocol::ChannelOnly {
                channel: channel.as_str(),
            },
        ));
        Ok(())
    }

    async fn publish(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        data: Box<RawValue>,
        msg_id: Option<String>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::Pub, &channel)?;
        if !ns.client_publish {
            return Err(Refusal::new(
                code::PUBLISH_DISABLED,
                format!(
                    "clients cannot publish in namespace {:?}",
                    channel.namespace()
                ),
            ));
        }
        request::check_publication(ns, &data, msg_id.as_deref())?;
        let span = tracing::info_span!("publish", channel = %channel, user = %self.identity.user);
        let published = self
            .node
            .engine
            .broker
            .publish(PublishRequest {
                channel: channel.clone(),
                data,
                from: Some(Arc::clone(&self.identity.user)),
                msg_id,
            })
            .instrument(span)
            .await?;
        self.link.outbox.push_reply(protocol::reply(
            "published",
            id,
            protocol::Published {
                channel: channel.as_str(),
                seq: published.seq,
                duplicate: published.duplicate,
            },
        ));
        Ok(())
    }

    async fn ack(&mut self, name: &str, seq: u64) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        if !ns.acked {
            return Err(Refusal::new(
                code::NOT_ENABLED,
                format!("namespace {:?} has no acked cursors", channel.namespace()),
            ));
        }
        self.require(ns, Permission::Sub, &channel)?;
        // The incarnation the client's seqs come from: its subscription's.
        let epoch = self.subs.get(&channel).map(|j| Arc::clone(&j.epoch));
        self.node
            .engine
            .cursors
            .ack(
                &self.identity.user,
                &self.device,
                &channel,
                AckedSeq { seq, epoch },
            )
            .await?;
        if !self.acked {
            self.acked = true;
            self.link.unsettle();
        }
        Ok(())
    }

    async fn history(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        since: Option<Position>,
        limit: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::History, &channel)?;
        let limit = limit.unwrap_or(ns.max_replay).clamp(1, ns.max_replay);
        let from = match since {
            Some(p) => HistoryFrom::After(p),
            None => HistoryFrom::Latest(limit),
        };
        let page = self
            .node
            .engine
            .broker
            .history(&channel, from, limit)
            .await?;
        self.link.outbox.push_reply(protocol::reply(
            "history",
            id,
            HistoryReply {
                channel: channel.as_str(),
                publications: PublicationList(&page.publications),
                position: page.position,
            },
        ));
        Ok(())
    }

    async fn presence(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        cursor: Option<String>,
        limit: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        if !ns.presence {
            return Err(Refusal::new(
                code::NOT_ENABLED,
                format!("namespace {:?} has no presence", channel.namespace()),
            ));
        }
        self.require(ns, Permission::Presence, &channel)?;
        if let Some(c) = &cursor {
            request::check_page_cursor(c)?;
        }
        let max = self.node.config.presence_page_max();
        let limit = limit.unwrap_or(max).clamp(1, max);
        let page = self
            .node
            .engine
            .presence
            .page(&channel, cursor.as_deref(), limit)
            .await?;
        self.link.outbox.push_reply(protocol::reply(
            "presence",
            id,
            PresenceReply {
                channel: channel.as_str(),
                clients: page.clients,
                next: page.next,
            },
        ));
        Ok(())
    }

    fn refresh(&mut self, id: Option<&RawValue>, token: &str) -> Outcome {
        let identity =
            self.node.verifier.verify(token).map_err(|e| {
                Refusal::new(code::BAD_TOKEN, format!("refresh refused: {}", e.reason))
            })?;
        if identity.user != self.identity.user {
            return Err(Refusal::new(
                code::BAD_TOKEN,
                "refresh refused: token is for another user",
            ));
        }
        if let Some(jti) = identity.jti.as_deref() {
            if self.node.engine.control.is_revoked(jti) {
                return Err(Refusal::new(
                    code::BAD_TOKEN,
                    "refresh refused: token revoked",
                ));
            }
        }
        self.node
            .connections
            .set_token(&self.identity.user, &self.conn_id, identity.jti.clone());
        self.link
            .expires_at
            .store(identity.expires_at, Ordering::Relaxed);
        self.link.expiring_sent.store(false, Ordering::Relaxed);
        let expires_at = identity.expires_at;
        self.identity = identity;
        self.link
            .outbox
            .push_reply(protocol::reply("refreshed", id, Refreshed { expires_at }));
        Ok(())
    }

    async fn cleanup(&mut self) {
        for (_, Joined { sub, .. }) in std::mem::take(&mut self.subs) {
            self.leave(&sub).await;
        }
        tracing::debug!(conn = %self.conn_id, "disconnected");
    }
}

enum Resume {
    Position(Position),
    /// A stored cursor without its epoch (acked on a channel the connection was not
    /// subscribed to): taken to be in the current incarnation.
    Cursor(u64),
}

/// One of the connection's subscriptions, with the stream incarnation it follows
/// (acks on the channel are recorded in it).
struct Joined {
    sub: Arc<Subscription>,
    epoch: Arc<str>,
}

fn perm_name(p: Permission) -> &'static str {
    match p {
        Permission::Sub => "sub",
        Permission::Pub => "pub",
        Permission::History => "history",
        Permission::Presence => "presence",
    }
}
