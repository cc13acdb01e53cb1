//! The memory engine's cursors: each user+device's acked position per channel,
//! in this process.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::channel::Channel;
use crate::engine::{AckedSeq, BoxFuture, CursorRead, Cursors, DeviceCursor, EngineError};

/// Cursors of the memory engine.
#[derive(Default)]
pub struct MemoryCursors {
    cursors: Mutex<HashMap<(String, String, Channel), AckedSeq>>,
}

impl Cursors for MemoryCursors {
    fn ack<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
        at: AckedSeq,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let mut cursors = self.cursors.lock();
        match cursors.entry((user.to_string(), device.to_string(), channel.clone())) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().advance(at),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(at);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn get<'a>(
        &'a self,
        user: &'a str,
        device: &'a str,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<CursorRead, EngineError>> {
        let found = self
            .cursors
            .lock()
            .get(&(user.to_string(), device.to_string(), channel.clone()))
            .cloned();
        Box::pin(async move { Ok(found.map_or(CursorRead::Absent, CursorRead::Found)) })
    }

    fn list<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<DeviceCursor>, EngineError>> {
        let mut list: Vec<DeviceCursor> = self
            .cursors
            .lock()
            .iter()
            .filter(|((u, _, _), _)| u == user)
            .map(|((_, device, channel), at)| DeviceCursor {
                device: device.clone(),
                channel: channel.to_string(),
                seq: at.seq,
                epoch: at.epoch.as_deref().map(str::to_string),
            })
            .collect();
        list.sort_by(|a, b| (&a.device, &a.channel).cmp(&(&b.device, &b.channel)));
        Box::pin(async move { Ok(list) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }
}
