//! The outbox: one connection's bounded queue of frames waiting for its writer.
//!
//! Producers (the hub's fan-out, the connection's own replies) never wait: a push
//! either fits within the bounds or marks the connection for closing with 4008
//! (DESIGN §4.6). Conflated subscriptions occupy at most one slot each: the slot
//! points at the subscription, and the writer takes whatever is newest there.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::hub::Subscription;
use crate::protocol::close;

/// Something the writer sends.
pub enum Item {
    /// A text frame (shared bytes: fan-out clones a refcount, not the payload).
    Text(Bytes),
    /// The newest pending publication of a conflated subscription.
    Conflated(Arc<Subscription>),
    /// A WebSocket ping.
    Ping,
    /// A WebSocket pong answering the client's ping.
    Pong(Bytes),
}

/// Which limit a push is held to.
enum Bound {
    /// Live publications: the frame and byte bounds.
    Live,
    /// Replies and replays: twice the byte bound.
    Reply,
    /// Pings, pongs, conflated slots (one per subscription) and replays (see `push_replay`).
    None,
}

/// Why and how the connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    pub reason: String,
    /// Send what is queued before the close frame, or drop it (slow consumer, dead peer).
    /// Flushing is bounded: past a close decision nothing new is queued.
    pub flush: bool,
}

struct State {
    queue: VecDeque<Item>,
    bytes: usize,
    closing: Option<Closing>,
    /// Conflated subscriptions of this connection (scales the backlog that triggers conflation).
    conflated_channels: usize,
}

/// A bounded queue of outbound frames plus the connection's close decision.
pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    closed: Notify,
    max_messages: usize,
    max_bytes: usize,
    /// Backlog (frames) above which conflated subscriptions stop queueing every publication.
    conflate_backlog: usize,
}

/// What the writer gets from [`Outbox::take`].
pub enum Batch {
    /// Frames to send now (possibly none: then wait).
    Frames,
    /// Send these frames (if any), then this close frame, then stop.
    Close(Closing),
}

impl Outbox {
    /// An empty outbox with these bounds.
    pub fn new(max_messages: usize, max_bytes: usize, conflate_backlog: usize) -> Self {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                closing: None,
                conflated_channels: 0,
            }),
            wake: Notify::new(),
            closed: Notify::new(),
            max_messages,
            max_bytes,
            conflate_backlog,
        }
    }

    /// The bound in frames.
    pub fn max_messages(&self) -> usize {
        self.max_messages
    }

    /// Queues a text frame; on overflow the connection is closed with 4008 and `false` returned.
    pub fn push(&self, frame: Bytes) -> bool {
        self.push_item(frame.len(), Item::Text(frame), Bound::Live)
    }

    /// Queues a reply or replayed frame. A replay may exceed the live bounds (it is
    /// limited by `max_replay`), so replies get headroom: twice the byte bound. A client
    /// that keeps asking without reading still ends as a slow consumer.
    pub fn push_reply(&self, frame: Bytes) -> bool {
        self.push_item(frame.len(), Item::Text(frame), Bound::Reply)
    }

    /// Queues a replayed publication. A replay is bounded by `max_replay` and may
    /// exceed the outbox (a client catching up after 4008 needs exactly that); what
    /// keeps memory bounded is [`Outbox::can_start_replay`].
    pub fn push_replay(&self, frame: Bytes) -> bool {
        self.push_item(frame.len(), Item::Text(frame), Bound::None)
    }

    /// Whether a new replay may start: not while the client has not read the bytes
    /// already queued, so at most one oversized replay is ever pending.
    pub fn can_start_replay(&self) -> bool {
        self.state.lock().bytes <= self.max_bytes
    }

    /// Queues a text frame only while the backlog is short and the bounds allow it;
    /// never closes the connection.
    pub fn try_push_within_backlog(&self, frame: &Bytes) -> bool {
        let mut st = self.state.lock();
        // The backlog allowed grows with the conflated channels: twenty symbols
        // ticking at the same instant are a burst, not a client falling behind.
        let backlog = self
            .conflate_backlog
            .saturating_mul(st.conflated_channels.max(1))
            .min(self.max_messages);
        if st.closing.is_some()
            || st.queue.len() >= backlog
            || st.bytes + frame.len() > self.max_bytes
        {
            return false;
        }
        st.bytes += frame.len();
        st.queue.push_back(Item::Text(frame.clone()));
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Counts one more (`true`) or one fewer conflated subscription on this connection.
    pub fn count_conflated_channel(&self, added: bool) {
        let mut st = self.state.lock();
        st.conflated_channels = if added {
            st.conflated_channels + 1
        } else {
            st.conflated_channels.saturating_sub(1)
        };
    }

    /// Queues a conflated subscription's slot. A subscription has at most one slot
    /// queued, so these are bounded by `max_subscriptions` and never trip the bound.
    pub fn push_conflated(&self, sub: Arc<Subscription>) -> bool {
        self.push_item(0, Item::Conflated(sub), Bound::None)
    }

    /// Queues a ping or pong.
    pub fn push_control(&self, item: Item) -> bool {
        self.push_item(0, item, Bound::None)
    }

    fn push_item(&self, len: usize, item: Item, bound: Bound) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        let over = match bound {
            Bound::Live => st.queue.len() >= self.max_messages || st.bytes + len > self.max_bytes,
            Bound::Reply => st.bytes + len > 2 * self.max_bytes,
            Bound::None => false,
        };
        if over {
            drop(st);
            self.close(close::SLOW_CONSUMER, "slow consumer: outbox full", false);
            return false;
        }
        st.bytes += len;
        st.queue.push_back(item);
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Decides to close the connection; the first decision wins.
    pub fn close(&self, code: u16, reason: &str, flush: bool) {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return;
        }
        st.closing = Some(Closing {
            code,
            reason: reason.to_string(),
            flush,
        });
        if !flush {
            st.queue.clear();
            st.bytes = 0;
        }
        drop(st);
        self.wake.notify_one();
        self.closed.notify_waiters();
    }

    /// Whether a close has been decided.
    pub fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Resolves once a close has been decided.
    pub async fn closing(&self) {
        loop {
            let notified = self.closed.notified();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when there may be something to take.
    pub async fn ready(&self) {
        self.wake.notified().await
    }

    /// Moves up to `max` queued items into `out`; reports a pending close once the
    /// queue is empty (or immediately when the close does not flush).
    pub fn take(&self, out: &mut Vec<Item>, max: usize) -> Batch {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let n = st.queue.len().min(max);
        for item in st.queue.drain(..n) {
            if let Item::Text(b) = &item {
                st.bytes -= b.len();
            }
            out.push(item);
        }
        if st.queue.is_empty() {
            // Drained: an idle connection keeps no queue allocation.
            st.queue = VecDeque::new();
        }
        match &st.closing {
            Some(c) if st.queue.is_empty() => Batch::Close(c.clone()),
            _ => Batch::Frames,
        }
    }

    /// Frames currently queued.
    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
