//! A connection's publishes in flight: sent in the order the client sent them,
//! their acknowledgements awaited together, their replies queued in request order
//! (docs/protocol.md, "Publishing"). At most [`MAX_IN_FLIGHT`]: past that the
//! session stops reading the client until the oldest is answered. Any other
//! request waits until every earlier publish is answered, so every reply keeps
//! request order.

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use parking_lot::Mutex;

use crate::engine::BoxFuture;

/// Publishes one connection may have waiting for their acknowledgement.
pub const MAX_IN_FLIGHT: usize = 256;

/// The replies of publishes in flight, oldest first.
#[derive(Default)]
pub struct Pipeline {
    /// Never locked: every access is through `&mut` (`get_mut`). The mutex only makes
    /// the session `Sync`, as its `&self` methods are awaited, which the futures
    /// (`Send`, not `Sync`) alone would not be.
    replies: Mutex<FuturesOrdered<BoxFuture<'static, Bytes>>>,
}

impl Pipeline {
    /// Queues the reply of a publish that was sent (or refused) after every earlier one.
    pub fn push(&mut self, reply: BoxFuture<'static, Bytes>) {
        self.replies.get_mut().push_back(reply);
    }

    /// Whether the connection must wait for an answer before it reads on.
    pub fn is_full(&mut self) -> bool {
        self.replies.get_mut().len() >= MAX_IN_FLIGHT
    }

    pub fn is_empty(&mut self) -> bool {
        self.replies.get_mut().is_empty()
    }

    /// The oldest reply, once it is ready; pending forever when nothing is in flight.
    pub async fn next(&mut self) -> Bytes {
        match self.replies.get_mut().next().await {
            Some(reply) => reply,
            None => std::future::pending().await,
        }
    }
}
