//! Acked cursors in Redis: `cursor:{user}:{device}` hashes of channel → seq (and
//! its stream epoch), moved forward only by a script; and the cursor store's
//! generation, which tells a device without a cursor from one whose cursor Redis lost.
//!
//! Acks are coalesced in memory per user+device+channel (the highest wins) and
//! written by one writer task once per `ack_flush_interval`, or at once when a
//! device disconnects. While Redis is unreachable they stay buffered, bounded
//! by `ack_buffer`, and are written when it is back.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::scripts::eval;
use super::Store;
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::engine::{AckedSeq, BoxFuture, CursorRead, Cursors, DeviceCursor, EngineError};

type Device = (Arc<str>, Arc<str>);

/// Acks not yet in Redis: per user+device, channel → position.
#[derive(Default)]
struct Pending {
    by_device: HashMap<Device, HashMap<Channel, AckedSeq>>,
    entries: usize,
}

impl Pending {
    fn get(&self, user: &str, device: &str, channel: &Channel) -> Option<AckedSeq> {
        self.by_device
            .get(&(Arc::from(user), Arc::from(device)))
            .and_then(|m| m.get(channel))
            .cloned()
    }

    /// Puts a failed batch back under newer acks: what is pending now is newer.
    fn merge_older(&mut self, older: Pending) {
        for (dev, channels) in older.by_device {
            let mine = self.by_device.entry(dev).or_default();
            for (channel, at) in channels {
                match mine.get_mut(&channel) {
                    Some(newer) => {
                        let mut merged = at;
                        merged.advance(newer.clone());
                        *newer = merged;
                    }
                    None => {
                        mine.insert(channel, at);
                        self.entries += 1;
                    }
                }
            }
        }
    }
}

/// The cursor store's generation, as `GENERATION` keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Generation {
    id: String,
    created_ms: u64,
    /// Created because Redis had lost the previous one (and its cursors).
    lost: bool,
}

impl Generation {
    fn parse(v: &str) -> Option<Generation> {
        let mut parts = v.split(' ');
        let id = parts.next()?.to_string();
        let created_ms = parts.next()?.parse().ok()?;
        let lost = parts.next()? == "1";
        Some(Generation {
            id,
            created_ms,
            lost,
        })
    }
}

fn bulk(v: &redis::Value) -> Option<&str> {
    match v {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// Cursors of the Redis engine.
pub struct RedisCursors {
    store: Arc<Store>,
    pending: Mutex<Pending>,
    /// The batch the writer is sending: still visible to `get` until it is stored.
    in_flight: Mutex<Pending>,
    /// The generation id this node last saw.
    generation: Mutex<Option<String>>,
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
            generation: Mutex::default(),
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
                for (channel, at) in channels {
                    cmd.arg(channel.as_str())
                        .arg(at.seq.to_string())
                        .arg(at.epoch.as_deref().unwrap_or(""));
                }
            }
        }
        let result = self.store.exec(&pipe).await;
        // Back to pending before it leaves in_flight, so a failed batch stays visible.
        let mut pending = self.pending.lock();
        let batch = std::mem::take(&mut *self.in_flight.lock());
        if result.is_err() {
            pending.merge_older(batch);
        }
        result.map(drop)
    }

    fn buffered(&self, user: &str, device: &str, channel: &Channel) -> Option<AckedSeq> {
        let pending = self.pending.lock().get(user, device, channel);
        let in_flight = self.in_flight.lock().get(user, device, channel);
        newest(in_flight, pending)
    }

    /// The generation behind `seen` (what a read found; `None` when the key is
    /// missing). When it is not the one this node knew, Redis is asked to create
    /// or mark it: one more round trip, only when the generation changed.
    async fn generation(&self, seen: Option<&str>) -> Result<Generation, EngineError> {
        let known = self.generation.lock().clone();
        if let Some(g) = seen.and_then(Generation::parse) {
            if known.as_deref() == Some(g.id.as_str()) {
                return Ok(g);
            }
        }
        let fresh = format!("{:x}{:04x}", unix_ms(), fastrand::u16(..));
        let key = self.store.keys.cursor_generation();
        let v = self
            .store
            .eval(
                &self.store.scripts.generation,
                &[&key],
                &[
                    fresh.as_bytes(),
                    unix_ms().to_string().as_bytes(),
                    known.as_deref().unwrap_or("").as_bytes(),
                ],
            )
            .await?;
        let g = bulk(&v)
            .and_then(Generation::parse)
            .ok_or_else(|| EngineError::Degraded("unreadable cursor generation".into()))?;
        if known.as_deref().is_some_and(|k| k != g.id) {
            tracing::warn!(
                generation = %g.id,
                "the cursor store lost its data (Redis restarted without persistence, failed over or evicted): resumes without a cursor answer recovered: false"
            );
        }
        *self.generation.lock() = Some(g.id.clone());
        Ok(g)
    }
}

/// The newer of two positions of one cursor (`b` is the more recent ack).
fn newest(a: Option<AckedSeq>, b: Option<AckedSeq>) -> Option<AckedSeq> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.advance(b);
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

async fn writer(
    cursors: Weak<RedisCursors>,
    mut flush_now: mpsc::Receiver<oneshot::Sender<Result<(), EngineError>>>,
    interval: std::time::Duration,
) {
    // Learn the generation early, so a loss is noticed even before this node's
    // first resume (Redis may be down: a read learns it later).
    if let Some(c) = cursors.upgrade() {
        if let Err(e) = c.generation(None).await {
            tracing::debug!(error = %e, "cursor generation not read yet");
        }
    }
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
        at: AckedSeq,
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
                    cur.advance(at);
                    Ok(())
                }
                None if full => Err(EngineError::Degraded(
                    "ack buffer full while redis is unreachable; ack again later".into(),
                )),
                None => {
                    channels.insert(channel.clone(), at);
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
    ) -> BoxFuture<'a, Result<CursorRead, EngineError>> {
        Box::pin(async move {
            // Buffered first: an ack written meanwhile is then in Redis when it is read.
            let buffered = self.buffered(user, device, channel);
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("GET").arg(self.store.keys.cursor_generation());
            pipe.cmd("HMGET")
                .arg(self.store.keys.cursor(user, device))
                .arg(channel.as_str())
                .arg(format!("{channel} epoch"));
            let mut replies = self.store.exec(&pipe).await?.into_iter();
            let generation = replies.next();
            let stored = match replies.next() {
                Some(redis::Value::Array(fields)) => {
                    let seq = fields.first().and_then(bulk).and_then(|s| s.parse().ok());
                    seq.map(|seq| AckedSeq {
                        seq,
                        epoch: fields.get(1).and_then(bulk).map(Arc::from),
                    })
                }
                _ => None,
            };
            let generation = self.generation(generation.as_ref().and_then(bulk)).await?;
            Ok(match newest(stored, buffered) {
                Some(at) => CursorRead::Found(at),
                None if generation.lost
                    && unix_ms().saturating_sub(generation.created_ms)
                        < self.store.cfg.cursor_ttl.as_millis() as u64 =>
                {
                    CursorRead::Lost
                }
                None => CursorRead::Absent,
            })
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
                let map: HashMap<String, String> = redis::from_redis_value(v).unwrap_or_default();
                for (channel, seq) in &map {
                    // `<channel> epoch` fields belong to their channel's entry.
                    let Ok(seq) = seq.parse::<u64>() else {
                        continue;
                    };
                    if channel.contains(' ') {
                        continue;
                    }
                    list.push(DeviceCursor {
                        device: device.clone(),
                        channel: channel.clone(),
                        seq,
                        epoch: map.get(&format!("{channel} epoch")).cloned(),
                    });
                }
            }
            // Acks this node has not written yet count too.
            for pending in [&self.pending, &self.in_flight] {
                for ((u, device), channels) in &pending.lock().by_device {
                    if &**u != user {
                        continue;
                    }
                    for (channel, at) in channels {
                        let entry = list
                            .iter_mut()
                            .find(|c| *c.device == **device && c.channel == channel.as_str());
                        let stored = entry.as_ref().map(|c| AckedSeq {
                            seq: c.seq,
                            epoch: c.epoch.as_deref().map(Arc::from),
                        });
                        let Some(at) = newest(stored, Some(at.clone())) else {
                            continue;
                        };
                        let epoch = at.epoch.as_deref().map(str::to_string);
                        match entry {
                            Some(c) => {
                                c.seq = at.seq;
                                c.epoch = epoch;
                            }
                            None => list.push(DeviceCursor {
                                device: device.to_string(),
                                channel: channel.to_string(),
                                seq: at.seq,
                                epoch,
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
