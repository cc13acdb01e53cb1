//! The node's index of its open connections by user, so control commands
//! (disconnect a user or one device, revoke a token id) find the connections
//! they act on, and a single node can answer who is connected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::engine::{ClientInfo, LocalConnections, UserConnections};
use crate::protocol::close;
use crate::session::outbox::Outbox;

/// One open connection as the index knows it.
pub struct Conn {
    pub conn_id: Arc<str>,
    pub device: Arc<str>,
    /// The token id the connection authenticated with (moved by `refresh`).
    pub jti: Option<Arc<str>>,
    /// Unix milliseconds.
    pub since: u64,
    pub outbox: Arc<Outbox>,
}

/// One user's admitted slots and open connections on this node.
#[derive(Default)]
struct UserConns {
    /// Slots taken before the upgrade (`Node::admit`), released when the connection ends.
    admitted: usize,
    conns: Vec<Conn>,
}

/// Open connections of this node, by user. Also counts each user's admitted
/// slots, so one map per user serves both admission and control.
#[derive(Default)]
pub struct Connections {
    by_user: Mutex<HashMap<Arc<str>, UserConns>>,
    count: AtomicUsize,
}

impl Connections {
    /// Takes one of `user`'s at most `max` slots.
    pub fn admit(&self, user: &Arc<str>, max: usize) -> bool {
        let mut by_user = self.by_user.lock();
        let u = by_user.entry(Arc::clone(user)).or_default();
        if u.admitted >= max {
            if u.admitted == 0 && u.conns.is_empty() {
                by_user.remove(user);
            }
            return false;
        }
        u.admitted += 1;
        true
    }

    /// Gives back a slot taken by [`Connections::admit`].
    pub fn release(&self, user: &str) {
        let mut by_user = self.by_user.lock();
        if let Some(u) = by_user.get_mut(user) {
            u.admitted = u.admitted.saturating_sub(1);
            if u.admitted == 0 && u.conns.is_empty() {
                by_user.remove(user);
            }
        }
    }

    /// Adds a connection of `user`.
    pub fn insert(&self, user: &Arc<str>, conn: Conn) {
        self.by_user
            .lock()
            .entry(Arc::clone(user))
            .or_default()
            .conns
            .push(conn);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes a connection of `user`.
    pub fn remove(&self, user: &str, conn_id: &str) {
        let mut by_user = self.by_user.lock();
        if let Some(u) = by_user.get_mut(user) {
            let before = u.conns.len();
            u.conns.retain(|c| &*c.conn_id != conn_id);
            self.count
                .fetch_sub(before - u.conns.len(), Ordering::Relaxed);
            if u.admitted == 0 && u.conns.is_empty() {
                by_user.remove(user);
            }
        }
    }

    /// Records the token id a connection now uses.
    pub fn set_token(&self, user: &str, conn_id: &str, jti: Option<Arc<str>>) {
        if let Some(c) = self
            .by_user
            .lock()
            .get_mut(user)
            .and_then(|u| u.conns.iter_mut().find(|c| &*c.conn_id == conn_id))
        {
            c.jti = jti;
        }
    }
}

impl Connections {
    /// The largest outbox backlog (frames) and the bytes queued in all outboxes.
    pub fn backlog(&self) -> (usize, usize) {
        // Copied out: the index is not held while each outbox is locked.
        let outboxes: Vec<Arc<Outbox>> = self
            .by_user
            .lock()
            .values()
            .flat_map(|u| u.conns.iter().map(|c| Arc::clone(&c.outbox)))
            .collect();
        outboxes.iter().fold((0, 0), |(frames, bytes), o| {
            let (f, b) = o.backlog();
            (frames.max(f), bytes + b)
        })
    }
}

impl LocalConnections for Connections {
    /// Open connections indexed.
    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    /// Closes the user's connections (only `device`'s, if given) with 4003; returns how many.
    fn kick_user(&self, user: &str, device: Option<&str>, reason: &str) -> usize {
        let by_user = self.by_user.lock();
        let Some(u) = by_user.get(user) else {
            return 0;
        };
        let mut n = 0;
        for c in u
            .conns
            .iter()
            .filter(|c| device.is_none_or(|d| *c.device == *d))
        {
            c.outbox.close(close::KICKED, reason, true);
            n += 1;
        }
        n
    }
    /// Closes every connection authenticated with token id `jti` with 4003; returns how many.
    fn kick_token(&self, jti: &str, reason: &str) -> usize {
        // A scan: revocations are rare, and an index by token id would cost every
        // connection memory for them.
        let by_user = self.by_user.lock();
        let mut n = 0;
        for c in by_user.values().flat_map(|u| &u.conns) {
            if c.jti.as_deref() == Some(jti) {
                c.outbox.close(close::KICKED, reason, true);
                n += 1;
            }
        }
        n
    }
    /// Every connection as `(user, [(conn_id, device, since)])`, for the Redis
    /// heartbeat. Only references are copied under the lock.
    fn snapshot(&self) -> Vec<UserConnections> {
        self.by_user
            .lock()
            .iter()
            .filter(|(_, u)| !u.conns.is_empty())
            .map(|(user, u)| {
                let entries = u
                    .conns
                    .iter()
                    .map(|c| (Arc::clone(&c.conn_id), Arc::clone(&c.device), c.since))
                    .collect();
                (Arc::clone(user), entries)
            })
            .collect()
    }
    /// The user's connections on this node.
    fn of_user(&self, user: &str, node: &str) -> Vec<ClientInfo> {
        self.by_user
            .lock()
            .get(user)
            .map(|u| {
                u.conns
                    .iter()
                    .map(|c| ClientInfo::new(&c.conn_id, user, &c.device, node, c.since))
                    .collect()
            })
            .unwrap_or_default()
    }
}
