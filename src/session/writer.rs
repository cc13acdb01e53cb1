//! The writer: the one task that writes to a connection's socket. It drains the
//! outbox in batches (many frames per syscall), and owns the connection's timers:
//! WebSocket pings, the idle timeout, token expiry, and the drain on shutdown.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use futures_util::FutureExt;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use super::outbox::{Batch, Closing, Item, Outbox, Stamp};
use crate::clock::unix_deadline;
use crate::node::Node;
use crate::protocol::{self, close};

/// Most items taken from the outbox per write.
const BATCH_ITEMS: usize = 256;

/// What the reader and the writer of one connection share.
pub struct Duplex {
    pub outbox: Arc<Outbox>,
    /// Token expiry, Unix seconds; moved by `refresh`.
    pub expires_at: AtomicU64,
    /// Whether `expiring` was sent for the current token.
    pub expiring_sent: AtomicBool,
    /// Test hook: the writer panics at its next turn.
    #[cfg(feature = "test-hooks")]
    pub panic_writer: AtomicBool,
    /// Whether every ack this connection received is written (true until its first
    /// ack): the close frame waits for it, so a resume anywhere sees those acks.
    settled: AtomicBool,
    settled_wake: Notify,
    /// Milliseconds since `start` of the last inbound frame.
    last_inbound: AtomicU64,
    start: Instant,
}

impl Duplex {
    /// A link for a connection whose token expires at `expires_at` (Unix seconds).
    pub fn new(outbox: Arc<Outbox>, expires_at: u64) -> Self {
        Duplex {
            outbox,
            expires_at: AtomicU64::new(expires_at),
            expiring_sent: AtomicBool::new(false),
            settled: AtomicBool::new(true),
            settled_wake: Notify::new(),
            #[cfg(feature = "test-hooks")]
            panic_writer: AtomicBool::new(false),
            last_inbound: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Records inbound traffic (any frame, pongs included).
    pub fn touch(&self) {
        self.last_inbound
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The connection received an ack that is not written yet.
    pub fn unsettle(&self) {
        self.settled.store(false, Ordering::Release);
    }

    /// Every ack the connection received is written (or could not be): the close
    /// frame may go.
    pub fn settle(&self) {
        self.settled.store(true, Ordering::Release);
        self.settled_wake.notify_waiters();
    }

    async fn settled(&self) {
        let notified = self.settled_wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.settled.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    fn last_inbound(&self) -> Instant {
        self.start + Duration::from_millis(self.last_inbound.load(Ordering::Relaxed))
    }
}

#[derive(Serialize)]
struct InMs {
    in_ms: u64,
}

#[derive(Serialize)]
struct AfterMs {
    after_ms: u64,
}

fn encode_frame(buf: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let mut frame = Frame::new(true, opcode, None, Payload::Borrowed(payload));
    let mut head = [0u8; 10];
    let n = frame.fmt_head(&mut head);
    // One allocation for head and payload: a lone frame would otherwise grow twice.
    buf.reserve(n + payload.len());
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(payload);
}

fn encode_close(buf: &mut Vec<u8>, closing: &Closing) {
    let mut payload = closing.code.to_be_bytes().to_vec();
    // Control frame payloads are at most 125 bytes; cut the reason on a char boundary.
    let mut reason = closing.reason.as_str();
    while reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    payload.extend_from_slice(reason.as_bytes());
    encode_frame(buf, OpCode::Close, &payload);
}

/// Runs until the connection is closed or the socket fails. A panic while writing
/// closes the connection with 1011, and the reader then cleans up.
pub async fn run<W: AsyncWrite + Unpin>(mut io: W, link: Arc<Duplex>, node: Arc<Node>) {
    let wrote = AssertUnwindSafe(write_loop(&mut io, &link, &node))
        .catch_unwind()
        .await;
    if wrote.is_err() {
        tracing::error!("connection writer panicked; closing with 1011");
        let mut buf = Vec::new();
        let closing = Closing {
            code: close::INTERNAL_ERROR,
            reason: "internal error".into(),
            flush: false,
        };
        encode_close(&mut buf, &closing);
        let timeout = node.config.session.write_timeout;
        // Boxed: the rarest path should not size every connection's writer.
        let _ = Box::pin(tokio::time::timeout(timeout, async {
            io.write_all(&buf).await?;
            io.shutdown().await
        }))
        .await;
        link.outbox
            .close(close::INTERNAL_ERROR, "internal error", false);
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(io: &mut W, link: &Duplex, node: &Node) {
    // Read from the node's config rather than copied: this future is per connection.
    let cfg = &node.config.session;
    let shutdown = &node.shutdown;
    let reconnect_jitter = node.config.server.reconnect_jitter;
    let expiring_notice = node.config.auth.expiring_notice;
    let outbox = &link.outbox;
    let mut buf: Vec<u8> = Vec::new();
    // Stamps of sampled publications in `buf`: recorded once it is written.
    let mut stamps = Vec::new();
    let mut next_ping = Instant::now() + cfg.ping_interval;
    let mut draining = false;
    loop {
        #[cfg(feature = "test-hooks")]
        if link.panic_writer.load(Ordering::Relaxed) {
            panic!("test hook: connection writer panic");
        }
        let mut items = Vec::new();
        let batch = outbox.take(&mut items, &mut stamps, BATCH_ITEMS);
        for item in items {
            match item {
                Item::Text(bytes) => encode_frame(&mut buf, OpCode::Text, &bytes),
                Item::Ping => encode_frame(&mut buf, OpCode::Ping, b""),
                Item::Pong(payload) => encode_frame(&mut buf, OpCode::Pong, &payload),
            }
        }
        let closing = match batch {
            Batch::Close(c) => {
                // The close frame tells the client its acks are done with: they must
                // be stored first, or a resume elsewhere replays what it acked.
                if !link.settled.load(Ordering::Acquire) {
                    if !write(io, &mut buf, cfg.write_timeout, outbox).await {
                        return;
                    }
                    // Boxed: a rare path that should not size every idle connection's writer.
                    let _ = Box::pin(tokio::time::timeout(cfg.write_timeout, link.settled())).await;
                }
                encode_close(&mut buf, &c);
                Some(c)
            }
            Batch::Frames => None,
        };
        if !write(io, &mut buf, cfg.write_timeout, outbox).await {
            return;
        }
        stamps.drain(..).for_each(Stamp::written);
        if let Some(c) = closing {
            tracing::debug!(code = c.code, reason = %c.reason, "closing connection");
            let _ = tokio::time::timeout(cfg.write_timeout, io.shutdown()).await;
            return;
        }
        if !outbox.is_empty() {
            continue;
        }
        // Idle connections should cost almost nothing: give the batch buffers back.
        buf = Vec::new();
        stamps = Vec::new();

        let now = Instant::now();
        let idle_deadline = link.last_inbound() + cfg.idle_timeout;
        let expires_at = unix_deadline(link.expires_at.load(Ordering::Relaxed), now);
        let notice_at = expires_at.checked_sub(expiring_notice).unwrap_or(now);
        let mut deadline = next_ping.min(idle_deadline).min(expires_at);
        if !link.expiring_sent.load(Ordering::Relaxed) {
            deadline = deadline.min(notice_at);
        }
        tokio::select! {
            _ = outbox.ready() => {}
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                let expires_at = unix_deadline(link.expires_at.load(Ordering::Relaxed), now);
                if now >= link.last_inbound() + cfg.idle_timeout {
                    outbox.close(close::IDLE_TIMEOUT, "idle timeout", true);
                } else if now >= expires_at {
                    outbox.close(close::TOKEN_EXPIRED, "token expired", true);
                } else {
                    let notice_at = expires_at.checked_sub(expiring_notice).unwrap_or(now);
                    if now >= notice_at && !link.expiring_sent.swap(true, Ordering::Relaxed) {
                        let in_ms = expires_at.saturating_duration_since(now).as_millis() as u64;
                        outbox.push_reply(protocol::reply("expiring", None, InMs { in_ms }));
                    }
                    if now >= next_ping {
                        outbox.push_control(Item::Ping);
                        next_ping = now + cfg.ping_interval;
                    }
                }
            }
            _ = shutdown.wait(), if !draining => {
                draining = true;
                let jitter = reconnect_jitter.as_millis() as u64;
                let after_ms = if jitter == 0 { 0 } else { fastrand::u64(..=jitter) };
                outbox.push_reply(protocol::reply("reconnect", None, AfterMs { after_ms }));
                outbox.close(close::SHUTTING_DOWN, "node shutting down", true);
            }
        }
    }
}

/// Writes and clears `buf`; `false` when the socket failed or stalled (the
/// connection is then closed without a close frame).
async fn write<W: AsyncWrite + Unpin>(
    io: &mut W,
    buf: &mut Vec<u8>,
    timeout: Duration,
    outbox: &Outbox,
) -> bool {
    if buf.is_empty() {
        return true;
    }
    match tokio::time::timeout(timeout, io.write_all(buf)).await {
        Ok(Ok(())) => {
            buf.clear();
            true
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            outbox.close(close::NORMAL, "write failed", false);
            false
        }
        Err(_) => {
            tracing::debug!("write timed out; dropping connection");
            outbox.close(close::SLOW_CONSUMER, "write timed out", false);
            false
        }
    }
}

/// A pong for the client's ping payload.
pub fn pong(payload: &[u8]) -> Item {
    Item::Pong(Bytes::copy_from_slice(payload))
}
