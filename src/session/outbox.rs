//! The outbox: one connection's bounded queue of frames waiting for its writer,
//! and the connection's close decision.
//!
//! Producers (the hub's fan-out, the connection's own replies, a replay) never
//! wait: a push either fits within the bounds or marks the connection for closing
//! with 4008 (docs/architecture.md, "Slow consumers"). The outbox owns three
//! kinds of room:
//! - live publications, bounded by `session.outbox_messages` / `outbox_bytes`;
//! - replayed publications, counted apart so a replay never trips the live bound
//!   (a replay waits for [`Outbox::replay_room`] before it reads its next page);
//! - conflation slots: one per conflated subscription, holding the newest
//!   publication not yet written, queued at most once.
//!
//! The writer takes plain frames: nothing it takes points back into the hub.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::engine::PageLimit;
use crate::protocol::close;

/// Something the writer sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    /// A text frame (shared bytes: fan-out clones a refcount, not the payload).
    Text(Bytes),
    /// A WebSocket ping.
    Ping,
    /// A WebSocket pong answering the client's ping.
    Pong(Bytes),
}

/// A publication picked to measure publish→deliver latency: recorded once the
/// socket write that carries it has completed.
pub struct Stamp {
    /// The publication's `ts` (Unix ms, the publishing node's clock).
    pub ts_ms: u64,
    pub latency: metrics::Histogram,
}

impl Stamp {
    /// Records the time from the publication to now.
    pub fn written(self) {
        let now_ms = crate::clock::unix_ms_fraction();
        self.latency
            .record(((now_ms - self.ts_ms as f64) / 1000.0).max(0.0));
    }
}

/// What waits in the queue.
enum Queued {
    /// A live publication or a reply.
    Text(Bytes),
    /// A live publication whose delivery latency is measured.
    Stamped(Bytes, Stamp),
    /// A replayed publication (counted in `replay_frames`, not in the live bound).
    Replay(Bytes),
    /// A conflation slot: whatever is newest in it when the writer gets there.
    Slot(usize),
    Ping,
    Pong(Bytes),
}

/// Which limit a push is held to.
enum Bound {
    /// Live publications: the frame and byte bounds.
    Live,
    /// Replies: twice the byte bound.
    Reply,
    /// Pings and pongs.
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

/// One conflated subscription's slot.
#[derive(Default)]
struct Slot {
    open: bool,
    /// The newest publication not yet taken by the writer (and its stamp, if sampled).
    pending: Option<(Bytes, Option<Stamp>)>,
    /// Whether the slot is in the queue.
    queued: bool,
}

struct State {
    queue: VecDeque<Queued>,
    /// Bytes of queued text frames (live, replies and replays).
    bytes: usize,
    /// Replayed frames queued, and their bytes: outside the live bound.
    replay_frames: usize,
    replay_bytes: usize,
    closing: Option<Closing>,
    slots: Vec<Slot>,
    /// Open slots (scales the backlog that triggers conflation).
    open_slots: usize,
}

impl State {
    fn live_frames(&self) -> usize {
        self.queue.len() - self.replay_frames
    }

    fn live_bytes(&self) -> usize {
        self.bytes - self.replay_bytes
    }
}

/// A bounded queue of outbound frames plus the connection's close decision.
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer.
    wake: Notify,
    /// Wakes those waiting for a close decision or for replay room.
    changed: Notify,
    max_messages: usize,
    max_bytes: usize,
    /// Backlog (frames) above which conflated subscriptions stop queueing every publication.
    conflate_backlog: usize,
}

/// What the writer gets from [`Outbox::take`].
#[derive(Debug, PartialEq, Eq)]
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
                replay_frames: 0,
                replay_bytes: 0,
                closing: None,
                slots: Vec::new(),
                open_slots: 0,
            }),
            wake: Notify::new(),
            changed: Notify::new(),
            max_messages,
            max_bytes,
            conflate_backlog,
        }
    }

    /// How much one replay page may hold: half the outbox, so a page and the
    /// live traffic of the connection's other subscriptions fit together.
    pub fn replay_page(&self) -> PageLimit {
        PageLimit {
            messages: (self.max_messages / 2).max(1),
            bytes: (self.max_bytes / 2).max(1),
        }
    }

    /// Queues a live text frame; on overflow the connection is closed with 4008 and
    /// `false` returned.
    pub fn push(&self, frame: Bytes) -> bool {
        self.push_item(frame.len(), Queued::Text(frame), Bound::Live)
    }

    /// [`Outbox::push`] of a publication sampled for the latency histogram.
    pub fn push_stamped(&self, frame: Bytes, stamp: Stamp) -> bool {
        self.push_item(frame.len(), Queued::Stamped(frame, stamp), Bound::Live)
    }

    /// Queues a reply. Replies get headroom (twice the byte bound) so an answer is
    /// not lost behind a burst; a client that keeps asking without reading still
    /// ends as a slow consumer.
    pub fn push_reply(&self, frame: Bytes) -> bool {
        self.push_item(frame.len(), Queued::Text(frame), Bound::Reply)
    }

    /// Queues a replayed publication. Replays are paged (see [`Outbox::replay_room`]),
    /// so these are bounded by a page, not by `max_replay`, and never count against
    /// the live bound.
    pub fn push_replay(&self, frame: Bytes) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        st.bytes += frame.len();
        st.replay_frames += 1;
        st.replay_bytes += frame.len();
        st.queue.push_back(Queued::Replay(frame));
        drop(st);
        self.wake.notify_one();
        true
    }

    /// Whether a new replay may start: not while the client has not read the bytes
    /// already queued, so a client that subscribes without reading ends as a slow
    /// consumer instead of holding a page per subscription.
    pub fn can_start_replay(&self) -> bool {
        self.state.lock().bytes <= self.max_bytes
    }

    /// Resolves `true` once at most half a page of replayed frames is unread (the
    /// next page may be read), or `false` once the connection is closing.
    pub async fn replay_room(&self) -> bool {
        let low = self.replay_page();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.state.lock();
                if st.closing.is_some() {
                    return false;
                }
                if st.replay_frames <= low.messages / 2 && st.replay_bytes <= low.bytes / 2 {
                    return true;
                }
            }
            changed.await;
        }
    }

    /// Opens a conflation slot for a conflated subscription.
    pub fn open_slot(&self) -> usize {
        let mut st = self.state.lock();
        st.open_slots += 1;
        if let Some(i) = st.slots.iter().position(|s| !s.open && !s.queued) {
            st.slots[i].open = true;
            return i;
        }
        st.slots.push(Slot {
            open: true,
            ..Slot::default()
        });
        st.slots.len() - 1
    }

    /// Closes a slot: a queued slot then sends nothing.
    pub fn close_slot(&self, slot: usize) {
        let mut st = self.state.lock();
        if let Some(s) = st.slots.get_mut(slot) {
            if s.open {
                s.open = false;
                s.pending = None;
                st.open_slots -= 1;
            }
        }
        if st.open_slots == 0 && st.slots.iter().all(|s| !s.queued) {
            st.slots = Vec::new();
        }
    }

    /// Queues a publication of a conflated subscription. A client that keeps up gets
    /// every publication; once its backlog is long, the slot holds only the newest
    /// (a replaced one is counted in `skipped`). Never closes the connection: a slot
    /// is queued at most once, so slots are bounded by `max_subscriptions`.
    pub fn push_conflated(
        &self,
        slot: usize,
        frame: &Bytes,
        stamp: Option<Stamp>,
        skipped: &AtomicU64,
    ) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.closing.is_some() {
            return;
        }
        // The backlog allowed grows with the conflated channels: twenty symbols
        // ticking at the same instant are a burst, not a client falling behind.
        let backlog = self
            .conflate_backlog
            .saturating_mul(st.open_slots.max(1))
            .min(self.max_messages);
        let short = st.live_frames() < backlog && st.live_bytes() + frame.len() <= self.max_bytes;
        let Some(s) = st.slots.get_mut(slot).filter(|s| s.open) else {
            return;
        };
        if !s.queued && short {
            st.bytes += frame.len();
            st.queue.push_back(match stamp {
                Some(stamp) => Queued::Stamped(frame.clone(), stamp),
                None => Queued::Text(frame.clone()),
            });
        } else {
            // A replaced publication was never delivered: its stamp goes with it.
            if s.pending.replace((frame.clone(), stamp)).is_some() {
                skipped.fetch_add(1, Ordering::Relaxed);
            }
            if s.queued {
                return;
            }
            s.queued = true;
            st.queue.push_back(Queued::Slot(slot));
        }
        drop(guard);
        self.wake.notify_one();
    }

    /// Queues a ping or pong.
    pub fn push_control(&self, item: Item) -> bool {
        let queued = match item {
            Item::Text(b) => Queued::Text(b),
            Item::Ping => Queued::Ping,
            Item::Pong(b) => Queued::Pong(b),
        };
        self.push_item(0, queued, Bound::None)
    }

    fn push_item(&self, len: usize, item: Queued, bound: Bound) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        let over = match bound {
            Bound::Live => {
                st.live_frames() >= self.max_messages || st.live_bytes() + len > self.max_bytes
            }
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
            st.replay_frames = 0;
            st.replay_bytes = 0;
            for s in &mut st.slots {
                s.queued = false;
                s.pending = None;
            }
        }
        drop(st);
        self.wake.notify_one();
        self.changed.notify_waiters();
    }

    /// The close code decided, if any.
    pub fn close_code(&self) -> Option<u16> {
        self.state.lock().closing.as_ref().map(|c| c.code)
    }

    /// Whether a close has been decided.
    pub fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Resolves once a close has been decided.
    pub async fn closing(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_closing() {
                return;
            }
            changed.await;
        }
    }

    /// Resolves when there may be something to take.
    pub async fn ready(&self) {
        self.wake.notified().await
    }

    /// Moves up to `max` queued items into `out` (and the stamps of sampled ones into
    /// `stamps`); reports a pending close once the queue is empty (or immediately
    /// when the close does not flush).
    pub fn take(&self, out: &mut Vec<Item>, stamps: &mut Vec<Stamp>, max: usize) -> Batch {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let n = st.queue.len().min(max);
        let replay_before = st.replay_frames;
        for queued in st.queue.drain(..n) {
            match queued {
                Queued::Text(b) => {
                    st.bytes -= b.len();
                    out.push(Item::Text(b));
                }
                Queued::Stamped(b, stamp) => {
                    st.bytes -= b.len();
                    out.push(Item::Text(b));
                    stamps.push(stamp);
                }
                Queued::Replay(b) => {
                    st.bytes -= b.len();
                    st.replay_frames -= 1;
                    st.replay_bytes -= b.len();
                    out.push(Item::Text(b));
                }
                Queued::Slot(i) => {
                    if let Some(s) = st.slots.get_mut(i) {
                        s.queued = false;
                        if let Some((b, stamp)) = s.pending.take() {
                            out.push(Item::Text(b));
                            stamps.extend(stamp);
                        }
                    }
                }
                Queued::Ping => out.push(Item::Ping),
                Queued::Pong(b) => out.push(Item::Pong(b)),
            }
        }
        if st.queue.is_empty() {
            // Drained: an idle connection keeps no queue allocation.
            st.queue = VecDeque::new();
            if st.open_slots == 0 {
                st.slots = Vec::new();
            }
        }
        let batch = match &st.closing {
            Some(c) if st.queue.is_empty() => Batch::Close(c.clone()),
            _ => Batch::Frames,
        };
        let replay_taken = replay_before != st.replay_frames;
        drop(guard);
        if replay_taken {
            self.changed.notify_waiters();
        }
        batch
    }

    /// Frames and bytes currently queued.
    pub fn backlog(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.queue.len(), st.bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    fn take_all(o: &Outbox) -> (Vec<Item>, Batch) {
        let mut items = Vec::new();
        let batch = o.take(&mut items, &mut Vec::new(), usize::MAX);
        (items, batch)
    }

    #[test]
    fn live_frames_past_the_frame_bound_close_4008_and_drop_the_backlog() {
        let o = Outbox::new(3, 1 << 20, 16);
        assert!(o.push(frame(1)) && o.push(frame(1)) && o.push(frame(1)));
        assert!(!o.push(frame(1)), "the fourth does not fit");
        let (items, batch) = take_all(&o);
        assert!(items.is_empty(), "a slow consumer's backlog is dropped");
        assert!(matches!(batch, Batch::Close(c) if c.code == close::SLOW_CONSUMER && !c.flush));
    }

    #[test]
    fn live_frames_past_the_byte_bound_close_4008() {
        let o = Outbox::new(100, 1024, 16);
        assert!(o.push(frame(1000)));
        assert!(!o.push(frame(100)));
        assert!(o.is_closing());
    }

    #[test]
    fn replies_get_twice_the_byte_bound() {
        let o = Outbox::new(100, 1024, 16);
        assert!(o.push_reply(frame(1000)) && o.push_reply(frame(1000)));
        assert!(!o.is_closing());
        assert!(!o.push_reply(frame(100)), "past twice the bound");
        assert!(o.is_closing());
    }

    #[test]
    fn replayed_frames_are_outside_the_live_bound() {
        let o = Outbox::new(2, 1 << 20, 16);
        for _ in 0..10 {
            assert!(o.push_replay(frame(10)));
        }
        assert!(
            o.push(frame(1)) && o.push(frame(1)),
            "live still has its two"
        );
        assert!(!o.push(frame(1)));
    }

    /// An outbox of 8 (a page is 4 frames; room means at most 2 unread) holding a
    /// full page of replay, and a task waiting for room in it.
    async fn waiting_for_room() -> (std::sync::Arc<Outbox>, tokio::task::JoinHandle<bool>) {
        let o = std::sync::Arc::new(Outbox::new(8, 1 << 20, 16));
        for _ in 0..4 {
            o.push_replay(frame(10));
        }
        let waiting = tokio::spawn({
            let o = std::sync::Arc::clone(&o);
            async move { o.replay_room().await }
        });
        // On the test's single-threaded runtime this runs the task until it waits.
        tokio::task::yield_now().await;
        (o, waiting)
    }

    #[tokio::test]
    async fn replay_room_waits_until_the_client_read_the_page_down() {
        let (o, waiting) = waiting_for_room().await;
        assert!(!waiting.is_finished(), "four unread: no room yet");
        let mut items = Vec::new();
        o.take(&mut items, &mut Vec::new(), 2);
        assert!(waiting.await.unwrap(), "two read: room for the next page");
    }

    #[tokio::test]
    async fn replay_room_ends_when_the_connection_closes() {
        let (o, waiting) = waiting_for_room().await;
        assert!(!waiting.is_finished());
        o.close(close::NORMAL, "", false);
        assert!(!waiting.await.unwrap());
    }

    #[test]
    fn a_flushing_close_sends_what_is_queued_first_and_the_first_decision_wins() {
        let o = Outbox::new(10, 1 << 20, 16);
        o.push(frame(1));
        o.close(close::SHUTTING_DOWN, "drain", true);
        o.close(close::SLOW_CONSUMER, "later", false);
        assert!(!o.push(frame(1)), "nothing new after the decision");
        let mut items = Vec::new();
        assert_eq!(
            o.take(&mut items, &mut Vec::new(), 0),
            Batch::Frames,
            "the queue first"
        );
        let (items, batch) = take_all(&o);
        assert_eq!(items, vec![Item::Text(frame(1))]);
        assert!(matches!(batch, Batch::Close(c) if c.code == close::SHUTTING_DOWN));
    }

    #[test]
    fn a_conflation_slot_sends_the_newest_and_counts_what_it_replaced() {
        let o = Outbox::new(10, 1 << 20, 1);
        let skipped = AtomicU64::new(0);
        let slot = o.open_slot();
        o.push_conflated(slot, &Bytes::from_static(b"1"), None, &skipped);
        // Backlog of one reached: the slot is queued and keeps only the newest.
        for v in [&b"2"[..], b"3", b"4"] {
            o.push_conflated(slot, &Bytes::copy_from_slice(v), None, &skipped);
        }
        let (items, _) = take_all(&o);
        assert_eq!(
            items,
            vec![
                Item::Text(Bytes::from_static(b"1")),
                Item::Text(Bytes::from_static(b"4"))
            ]
        );
        assert_eq!(skipped.load(Ordering::Relaxed), 2, "2 and 3 were replaced");
    }

    #[test]
    fn a_closed_slot_sends_nothing() {
        let o = Outbox::new(10, 1 << 20, 1);
        let skipped = AtomicU64::new(0);
        let slot = o.open_slot();
        o.push_conflated(slot, &Bytes::from_static(b"1"), None, &skipped);
        o.push_conflated(slot, &Bytes::from_static(b"2"), None, &skipped);
        o.close_slot(slot);
        let (items, _) = take_all(&o);
        assert_eq!(items, vec![Item::Text(Bytes::from_static(b"1"))]);
    }

    #[test]
    fn a_replay_does_not_start_over_unread_bytes() {
        let o = Outbox::new(100, 1024, 16);
        assert!(o.can_start_replay());
        o.push_reply(frame(1500));
        assert!(!o.can_start_replay());
    }
}
