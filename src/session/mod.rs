//! One client connection's life: the upgrade hand-off, registration, the read
//! loop (rate limit, dispatch to [`commands`]), the close handshake and the
//! cleanup when either side ends.
//!
//! The reader executes commands one at a time (a command may await the engine);
//! the writer keeps sending publications and heartbeats meanwhile, and a replay
//! reads its later pages on its own task, so the reader is never held by one.

mod commands;
pub mod frame_reader;
pub mod outbox;
mod pipeline;
pub mod rate_limit;
mod replay;
pub mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use tracing::Instrument;

use fastwebsockets::upgrade::UpgradeFut;
use futures_util::future::Either;
use futures_util::FutureExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::auth::Identity;
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::connections::Conn;
use crate::engine::ClientInfo;
use crate::node::{ConnectionSlot, Node};
use crate::protocol::{self, close, code, Command};
use crate::request::Refusal;
use crate::server::parse_errors::JsonParseErrors;
use commands::Joined;
use frame_reader::{FrameReader, OpCode, ReadError};
use outbox::Outbox;
use pipeline::Pipeline;
use rate_limit::RateLimiter;
use writer::Duplex;

type Outcome = Result<(), Refusal>;

/// The state of one connection, owned by its reader.
pub struct Session {
    node: Arc<Node>,
    link: Arc<Duplex>,
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
    /// Publishes awaiting their acknowledgement; allocated while there are any.
    pipeline: Option<Box<Pipeline>>,
}

/// What the upgrade request established about a connection.
pub struct Handshake {
    pub identity: Identity,
    /// The client's device id, if it named one.
    pub device: Option<String>,
    pub slot: ConnectionSlot,
}

/// Completes the upgrade, then serves the connection until it closes.
///
/// This is each connection's task, and its state is what an idle connection
/// costs: the handshake comes boxed and the connection's state is built outside
/// any future, so each is held once rather than once per nested `async fn`.
pub async fn serve(node: Arc<Node>, upgrade: UpgradeFut, handshake: Box<Handshake>) {
    let io = match upgrade.await {
        Ok(ws) => ws.into_inner(),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    open(node, io, *handshake).await
}

/// The served connection of an upgraded socket: on TCP, inline in the task; on
/// anything else (never taken by our listener), boxed.
fn open(
    node: Arc<Node>,
    io: TokioIo<Upgraded>,
    handshake: Handshake,
) -> Either<impl Future<Output = ()> + Send, Pin<Box<dyn Future<Output = ()> + Send>>> {
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
            Either::Left(Connection::open(node, read, write, handshake).serve())
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            Either::Right(Box::pin(
                Connection::open(node, read, write, handshake).serve(),
            ))
        }
    }
}

/// A connection being served: its session, the reader of its frames, its writer
/// task and its place in the node's admission count.
struct Connection<R> {
    session: Session,
    reader: FrameReader<R>,
    writer: tokio::task::JoinHandle<()>,
    slot: ConnectionSlot,
}

impl<R: AsyncRead + Unpin + Send + 'static> Connection<R> {
    /// Queues the welcome and starts the writer.
    fn open<W>(node: Arc<Node>, read_io: R, write_io: W, handshake: Handshake) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Handshake {
            identity,
            device,
            slot,
        } = handshake;
        let cfg = &node.config.session;
        let outbox = Arc::new(Outbox::new(
            cfg.outbox_messages,
            cfg.outbox_bytes,
            cfg.conflate_backlog,
        ));
        let link = Arc::new(Duplex::new(outbox, identity.expires_at));
        let conn_id: Arc<str> = Arc::from(format!("{}-{:012x}", node.id, fastrand::u64(..1 << 48)));
        let device = device.map_or_else(|| Arc::clone(&conn_id), Arc::from);

        link.outbox.push_reply(protocol::reply(
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
        let reader = FrameReader::new(read_io, cfg.max_frame_bytes);
        let writer = tokio::spawn(writer::run(write_io, Arc::clone(&link), Arc::clone(&node)));
        let session = Session {
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
            pipeline: None,
        };
        Connection {
            session,
            reader,
            writer,
            slot,
        }
    }

    /// Serves the connection until it closes.
    // Not an `async fn`: that would hold `self` twice (its argument and the local it
    // is moved into), 1,120 bytes against this block's 736 for the whole task.
    #[allow(clippy::manual_async_fn)]
    fn serve(mut self) -> impl Future<Output = ()> + Send {
        async move {
            tracing::debug!(conn = %self.session.conn_id, user = %self.session.identity.user, "connected");
            // A panic while serving this connection must not leave it half alive: close
            // the socket (1011) and clean up as for any other close.
            let served = AssertUnwindSafe(read_loop(&mut self.session, &mut self.reader))
                .catch_unwind()
                .await;
            if served.is_err() {
                tracing::error!(conn = %self.session.conn_id, "session panicked; closing with 1011");
                self.session
                    .link
                    .outbox
                    .close(close::INTERNAL_ERROR, "internal error", true);
            }
            // Boxed: the end of a connection is its rarest path and should not size the
            // state every idle connection carries.
            Box::pin(self.finish()).await;
        }
    }

    /// Unsubscribes, completes the closing handshake and waits for the writer.
    async fn finish(self) {
        let Connection {
            mut session,
            mut reader,
            writer,
            slot,
        } = self;
        // Acks first: the close frame waits for them (see `Duplex::settle`).
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
        // Every way out of the read loop decides a close; the fallback is the reader's own.
        let code = session.link.outbox.close_code().unwrap_or(close::NORMAL);
        crate::metrics::get().connection_closed(code);
        drop(slot);
    }
}

/// Registers the connection, then reads and executes frames until it closes.
async fn read_loop<R: AsyncRead + Unpin>(session: &mut Session, reader: &mut FrameReader<R>) {
    let outbox = Arc::clone(&session.link.outbox);
    Box::pin(session.register()).await;
    loop {
        let full = session.pipeline.as_mut().is_some_and(|p| p.is_full());
        let frame = tokio::select! {
            reply = next_reply(&mut session.pipeline) => {
                outbox.push_reply(reply);
                if session.pipeline.as_mut().is_some_and(|p| p.is_empty()) {
                    session.pipeline = None;
                }
                continue;
            }
            frame = reader.read_frame(), if !full => frame,
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

/// The next reply of a publish in flight; pending while there is none.
async fn next_reply(pipeline: &mut Option<Box<Pipeline>>) -> bytes::Bytes {
    match pipeline {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}

/// How long a closing connection waits for the client's close frame.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

impl Session {
    fn client_info(&self, since: u64) -> ClientInfo {
        ClientInfo::new(
            &self.conn_id,
            &self.identity.user,
            &self.device,
            &self.node.id,
            since,
        )
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
            .push_reply(protocol::error_message(id, code, reason));
    }

    /// Charges one inbound frame to the rate limit; a refused frame is answered
    /// with error 110, and sustained abuse closes the connection with 4009.
    fn within_rate(&mut self, len: usize) -> bool {
        if self.limiter.allow(len) {
            self.violations = self.violations.saturating_sub(1);
            return true;
        }
        crate::metrics::get().rate_limited.increment(1);
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
                self.link
                    .panic_writer
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.link.outbox.push_control(outbox::Item::Ping);
                return;
            }
            panic!("test hook: session reader panic");
        }
        let (id, command) = match protocol::parse(text) {
            Ok(parsed) => parsed,
            Err(rej) => {
                // A malformed request is still a request: answered after earlier publishes.
                self.drain_pipeline().await;
                self.reply_error(rej.id.as_deref(), rej.code, &rej.reason);
                return;
            }
        };
        let id = id.as_deref();
        if !matches!(command, Command::Publish { .. }) {
            // Every reply in request order: earlier publishes are answered first.
            self.drain_pipeline().await;
        }
        let result = match command {
            Command::Subscribe {
                channel,
                since,
                snapshot,
            } => {
                let span = tracing::info_span!(
                    "subscribe",
                    channel = %channel,
                    user = %self.identity.user,
                    resumed = since.is_some(),
                    replayed = tracing::field::Empty,
                    recovered = tracing::field::Empty,
                );
                self.subscribe(id, &channel, since, snapshot)
                    .instrument(span)
                    .await
            }
            Command::Unsubscribe { channel } => self.unsubscribe(id, &channel).await,
            Command::Publish {
                channel,
                data,
                msg_id,
                traceparent,
            } => {
                self.publish(id, &channel, data, msg_id, traceparent.as_deref())
                    .await;
                Ok(())
            }
            Command::Ack { channel, seq } => self.ack(&channel, seq).await,
            Command::History {
                channel,
                since,
                limit,
            } => {
                let span = tracing::info_span!("history", channel = %channel, count = tracing::field::Empty);
                self.history(id, &channel, since, limit)
                    .instrument(span)
                    .await
            }
            Command::Presence {
                channel,
                cursor,
                limit,
            } => {
                let span = tracing::info_span!("presence", channel = %channel);
                self.presence(id, &channel, cursor, limit)
                    .instrument(span)
                    .await
            }
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

    /// Waits for every publish in flight and queues their replies.
    async fn drain_pipeline(&mut self) {
        if let Some(mut p) = self.pipeline.take() {
            while !p.is_empty() {
                let reply = p.next().await;
                self.link.outbox.push_reply(reply);
            }
        }
    }

    async fn cleanup(&mut self) {
        for (_, joined) in std::mem::take(&mut self.subs) {
            self.end_subscription(joined).await;
        }
        tracing::debug!(conn = %self.conn_id, "disconnected");
    }
}
