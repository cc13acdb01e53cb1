//! Acked cursors in Redis (DESIGN §4.5): `cursor:{user}:{device}` hashes of
//! channel → seq, moved forward only by a script.
//!
//! Acks are coalesced in memory per user+device+channel (the highest wins) and
//! written by one writer task once per `ack_flush_interval`, or at once when a
//! device disconnects. While Redis is unreachable they stay buffered, bounded
//! by `ack_buffer`, and are written when it is back.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{eval, Store};
use crate::channel::Channel;
use crate::engine::{BoxFuture, Cursors, DeviceCursor, EngineError};

type Device = (Arc<str>, Arc<str>);

/// Acks not yet in Redis: per user+device, channel → seq.
#[derive(Default)]
struct Pending {
    by_device: HashMap<Device, HashMap<Channel, u64>>,
    entries: usize,
}

impl Pending {
    fn get(&self, user: &str, device: &str, channel: &Channel) -> Option<u64> {
        self.by_device
            .get(&(Arc::from(user), Arc::from(device)))
            .and_then(|m| m.get(channel))
            .copied()
    }

    fn merge(&mut self, other: Pending) {
        for (dev, channels) in other.by_device {
            let mine = self.by_device.entry(dev).or_default();
            for (channel, seq) in channels {
                let cur = mine.entry(channel).or_insert_with(|| {
                    self.entries += 1;
                    0
                });
                *cur = (*cur).max(seq);
            }
        }
    }
}

/// Cursors of the Redis engine.
pub struct RedisCursors {
    store: Arc<Store>,
    pending: Mutex<Pending>,
    /// The batch the writer is sending: still visible to `get` until it is stored.
    in_flight: Mutex<Pending>,
    flush_now: mpsc::Sender<oneshot::Sender<Result<(), EngineError>>>,
}

/// Waiting `flush` calls the writer answers together.
const FLUSH_QUEUE: usize = 1024;

impl RedisCursors {
    pub(super) fn start(store: Arc<Store>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(FLUSH_QUEUE);
        let interval = store.cfg.ack_flush_interval;
        let cursors = Arc::new(RedisCursors {
            store,
            pending: Mutex::default(),
            in_flight: Mutex::default(),
            flush_now: tx,
        });
        tokio::spawn(writer(Arc::downgrade(&cursors), rx, interval));
        cursors
    }

    /// Writes everything pending; on failure puts it back (merged with newer acks).
    async fn write(&self) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let ttl = self.store.cfg.cursor_ttl.as_millis() as u64;
        {
            // Moved under both locks (in `buffered`'s order): a reader sees each
            // ack in one of the two at every instant.
            let mut pending = self.pending.lock();
            if pending.entries == 0 {
                return Ok(());
            }
            let mut in_flight = self.in_flight.lock();
            *in_flight = std::mem::take(&mut *pending);
            for ((user, device), channels) in &in_flight.by_device {
                let key = self.store.keys.cursor(user, device);
                let devices = self.store.keys.cursor_devices(user);
                let cmd = eval(&mut pipe, &self.store.scripts.cursor, &[&key, &devices])
                    .arg(ttl)
                    .arg(&**device);
                for (channel, seq) in channels {
                    cmd.arg(channel.as_str()).arg(seq.to_string());
                }
            }
        }
        let result = self.store.exec(&pipe).await;
        // Back to pending before it leaves in_flight, so a failed batch stays visible.
        let mut pending = self.pending.lock();
        let batch = std::mem::take(&mut *self.in_flight.lock());
        if result.is_err() {
            pending.merge(batch);
        }
        result.map(drop)
    }

    fn buffered(&self, user: &str, device: &str, channel: &Channel) -> Option<u64> {
        let a = self.pending.lock().get(user, device, channel);
        let b = self.in_flight.lock().get(user, device, channel);
        a.max(b)
    }
}

async fn writer(
    cursors: Weak<RedisCursors>,
    mut flush_now: mpsc::Receiver<oneshot::Sender<Result<(), EngineError>>>,
    interval: std::time::Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = tick.tick() => {}
            req = flush_now.recv() => match req {
                Some(reply) => waiting.push(reply),
                None => return,
            },
        }
        while let Ok(reply) = flush_now.try_recv() {
            waiting.push(reply);
        }
        let Some(cursors) = cursors.upgrade() else {
            return;
        };
        let result = cursors.write().await;
        if let Err(e) = &result {
            if waiting.is_empty() {
                tracing::debug!(error = %e, "cursor write failed; acks stay buffered");
            }
        }
        for reply in waiting {
            let _ = reply.send(result.clone());
        }
    }
}

impl Cursors for RedisCursors {
    fn ack<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
        seq: u64,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let result = {
            let mut pending = self.pending.lock();
            let bound = self.store.cfg.ack_buffer;
            let full = pending.entries >= bound;
            let channels = pending
                .by_device
                .entry((Arc::from(user), Arc::from(device)))
                .or_default();
            match channels.get_mut(channel) {
                Some(cur) => {
                    *cur = (*cur).max(seq);
                    Ok(())
                }
                None if full => Err(EngineError::Degraded(
                    "ack buffer full while redis is unreachable; ack again later".into(),
                )),
                None => {
                    channels.insert(channel.clone(), seq);
                    pending.entries += 1;
                    Ok(())
                }
            }
        };
        Box::pin(async move { result })
    }

    fn get<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<Option<u64>, EngineError>> {
        Box::pin(async move {
            // Buffered first: an ack written meanwhile is then in Redis when it is read.
            let buffered = self.buffered(user, device, channel);
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("HGET")
                .arg(self.store.keys.cursor(user, device))
                .arg(channel.as_str());
            let stored = match self.store.exec(&pipe).await?.pop() {
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok()),
                _ => None,
            };
            Ok(stored.max(buffered))
        })
    }

    fn list<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<DeviceCursor>, EngineError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("SMEMBERS")
                .arg(self.store.keys.cursor_devices(user));
            let devices: Vec<String> = match self.store.exec(&pipe).await?.pop() {
                Some(v) => redis::from_redis_value(v).unwrap_or_default(),
                None => Vec::new(),
            };
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for d in &devices {
                pipe.cmd("HGETALL").arg(self.store.keys.cursor(user, d));
            }
            let replies = if devices.is_empty() {
                Vec::new()
            } else {
                self.store.exec(&pipe).await?
            };
            let mut list = Vec::new();
            for (device, v) in devices.iter().zip(replies) {
                let map: HashMap<String, u64> = redis::from_redis_value(v).unwrap_or_default();
                for (channel, seq) in map {
                    list.push(DeviceCursor {
                        device: device.clone(),
                        channel,
                        seq,
                    });
                }
            }
            // Acks this node has not written yet count too.
            for pending in [&self.pending, &self.in_flight] {
                for ((u, device), channels) in &pending.lock().by_device {
                    if &**u != user {
                        continue;
                    }
                    for (channel, seq) in channels {
                        match list
                            .iter_mut()
                            .find(|c| *c.device == **device && c.channel == channel.as_str())
                        {
                            Some(c) => c.seq = c.seq.max(*seq),
                            None => list.push(DeviceCursor {
                                device: device.to_string(),
                                channel: channel.to_string(),
                                seq: *seq,
                            }),
                        }
                    }
                }
            }
            list.sort_by(|a, b| (&a.device, &a.channel).cmp(&(&b.device, &b.channel)));
            Ok(list)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            // Waits for room: a closing connection must know its acks are written.
            if self.flush_now.send(tx).await.is_err() {
                return Err(EngineError::Degraded("cursor writer stopped".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(EngineError::Degraded("cursor writer stopped".into())))
        })
    }
}
