//! The hub: this node's subscription index (channel → local subscriptions) and
//! the fan-out of live publications to them.
//!
//! A [`Subscription`] joins the hub *buffering*: live publications are held while
//! its history is read, then [`Subscription::go_live`] sends the replay and the
//! buffered publications after it, under the subscription's own lock, so the seam
//! between history and live has no gap and no duplicate (DESIGN §4.2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::channel::Channel;
use crate::engine::{LiveSink, Publication};
use crate::session::outbox::Outbox;

enum Phase {
    /// History is being read; live publications wait here (bounded).
    Buffering(Vec<Arc<Publication>>),
    Live,
    /// Unsubscribed: publications are ignored.
    Cancelled,
}

struct SubState {
    phase: Phase,
    /// Highest seq queued to the client on this channel.
    last_seq: u64,
    /// Conflated subscriptions: the newest publication not yet taken by the writer.
    pending: Option<Bytes>,
    /// Conflated subscriptions: whether a slot for this subscription is queued.
    queued: bool,
}

/// One connection's subscription to one channel.
pub struct Subscription {
    pub channel: Channel,
    pub outbox: Arc<Outbox>,
    /// Hub-unique id, so unsubscribing removes exactly this subscription.
    pub id: u64,
    /// Set for conflated subscriptions: the node's count of ticks replaced unsent.
    conflated: Option<Arc<AtomicU64>>,
    state: Mutex<SubState>,
}

impl Subscription {
    /// A buffering subscription; what may arrive during replay is bounded like the outbox.
    /// `conflated` (the hub's counter) makes it a conflated subscription.
    pub fn new(
        channel: Channel,
        outbox: Arc<Outbox>,
        conflated: Option<Arc<AtomicU64>>,
    ) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        if conflated.is_some() {
            outbox.count_conflated_channel(true);
        }
        Arc::new(Subscription {
            channel,
            outbox,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            conflated,
            state: Mutex::new(SubState {
                phase: Phase::Buffering(Vec::new()),
                last_seq: 0,
                pending: None,
                queued: false,
            }),
        })
    }

    /// Offers one live publication.
    fn offer(self: &Arc<Self>, publication: &Arc<Publication>) {
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Buffering(buf) => {
                if buf.len() >= self.outbox.max_messages() {
                    drop(st);
                    self.outbox.close(
                        crate::protocol::close::SLOW_CONSUMER,
                        "slow consumer: too many publications during replay",
                        false,
                    );
                } else {
                    buf.push(Arc::clone(publication));
                }
            }
            Phase::Cancelled => {}
            Phase::Live => {
                if publication.seq > st.last_seq {
                    st.last_seq = publication.seq;
                    self.enqueue(&mut st, &publication.frame);
                }
            }
        }
    }

    fn enqueue(self: &Arc<Self>, st: &mut SubState, frame: &Bytes) {
        if let Some(skipped) = &self.conflated {
            // A client that keeps up gets every publication; only one that has
            // fallen behind gets the latest value instead of a backlog.
            if !st.queued && self.outbox.try_push_within_backlog(frame) {
                return;
            }
            if st.pending.replace(frame.clone()).is_some() {
                skipped.fetch_add(1, Ordering::Relaxed);
            }
            if !st.queued {
                st.queued = true;
                self.outbox.push_conflated(Arc::clone(self));
            }
        } else {
            self.outbox.push(frame.clone());
        }
    }

    /// Sends `reply` (the `subscribed` frame), then the replay, then everything buffered
    /// after it, and switches to live delivery. `after` is the seq the client already has.
    pub fn go_live(self: &Arc<Self>, reply: Bytes, replay: &[Arc<Publication>], after: u64) {
        let mut st = self.state.lock();
        st.last_seq = after;
        if !replay.is_empty() && !self.outbox.can_start_replay() {
            drop(st);
            let why = "slow consumer: unread backlog too large to start a replay";
            self.outbox
                .close(crate::protocol::close::SLOW_CONSUMER, why, false);
            return;
        }
        self.outbox.push_reply(reply);
        for p in replay {
            if p.seq > st.last_seq {
                st.last_seq = p.seq;
                self.outbox.push_replay(p.frame.clone());
            }
        }
        let buffered = match std::mem::replace(&mut st.phase, Phase::Live) {
            Phase::Buffering(buf) => buf,
            Phase::Live => Vec::new(),
            Phase::Cancelled => {
                st.phase = Phase::Cancelled;
                return;
            }
        };
        for p in &buffered {
            if p.seq > st.last_seq {
                st.last_seq = p.seq;
                self.enqueue(&mut st, &p.frame);
            }
        }
    }

    /// Stops delivery: nothing more is queued, and a queued conflated slot sends nothing.
    pub fn cancel(&self) {
        let mut st = self.state.lock();
        let was = std::mem::replace(&mut st.phase, Phase::Cancelled);
        st.pending = None;
        if self.conflated.is_some() && !matches!(was, Phase::Cancelled) {
            self.outbox.count_conflated_channel(false);
        }
    }

    /// For the writer: the newest pending publication of a conflated subscription.
    pub fn take_pending(&self) -> Option<Bytes> {
        let mut st = self.state.lock();
        st.queued = false;
        st.pending.take()
    }
}

/// This node's local subscription index.
#[derive(Default)]
pub struct Hub {
    channels: RwLock<HashMap<Channel, Vec<Arc<Subscription>>>>,
    /// Publications replaced unsent in conflated subscriptions (latest value won).
    conflated: Arc<AtomicU64>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// The counter conflated subscriptions of this hub count skipped publications in.
    pub fn conflation_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.conflated)
    }

    /// Publications skipped by conflation so far.
    pub fn conflated(&self) -> u64 {
        self.conflated.load(Ordering::Relaxed)
    }

    /// Adds a subscription.
    pub fn add(&self, sub: Arc<Subscription>) {
        self.channels
            .write()
            .entry(sub.channel.clone())
            .or_default()
            .push(sub);
    }

    /// Removes a subscription.
    pub fn remove(&self, channel: &Channel, id: u64) {
        let mut map = self.channels.write();
        if let Some(list) = map.get_mut(channel) {
            list.retain(|s| s.id != id);
            if list.is_empty() {
                map.remove(channel);
            }
        }
    }

    /// Sends a non-publication frame (join/leave) to the channel's live subscribers.
    pub fn broadcast(&self, channel: &Channel, frame: &Bytes) {
        if let Some(list) = self.channels.read().get(channel) {
            for sub in list {
                sub.outbox.push(frame.clone());
            }
        }
    }
}

impl LiveSink for Hub {
    fn deliver(&self, publication: &Arc<Publication>) {
        if let Some(list) = self.channels.read().get(&publication.channel) {
            for sub in list {
                sub.offer(publication);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::{Batch, Item};
    use serde_json::value::RawValue;

    fn publication(channel: &Channel, seq: u64) -> Arc<Publication> {
        let data = RawValue::from_string(seq.to_string()).unwrap();
        Arc::new(Publication::new(channel.clone(), seq, 0, data, None))
    }

    fn drain(outbox: &Outbox) -> Vec<String> {
        let mut items = Vec::new();
        let _ = outbox.take(&mut items, usize::MAX);
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
                Item::Conflated(sub) => sub
                    .take_pending()
                    .map(|b| String::from_utf8(b.to_vec()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn seqs(frames: &[String]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| serde_json::from_str::<serde_json::Value>(f).ok()?["seq"].as_u64())
            .collect()
    }

    #[test]
    fn seam_skips_what_replay_already_sent_and_keeps_the_rest() {
        let ch = Channel::parse("t.a").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(100, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&sub));
        // Published while history was being read: 5 and 6 are buffered...
        hub.deliver(&publication(&ch, 5));
        hub.deliver(&publication(&ch, 6));
        // ...and history (read a moment later) already contains 4 and 5.
        let replay = [publication(&ch, 4), publication(&ch, 5)];
        sub.go_live(
            bytes::Bytes::from_static(b"{\"type\":\"subscribed\"}"),
            &replay,
            3,
        );
        hub.deliver(&publication(&ch, 6)); // a late duplicate from the backbone
        hub.deliver(&publication(&ch, 7));
        let frames = drain(&outbox);
        assert!(frames[0].contains("subscribed"), "reply first");
        assert_eq!(seqs(&frames), vec![4, 5, 6, 7]);
    }

    #[test]
    fn conflation_keeps_one_slot_with_the_newest_value() {
        let ch = Channel::parse("p.x").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(4, 1 << 20, 2));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), Some(Arc::default()));
        hub.add(Arc::clone(&sub));
        sub.go_live(bytes::Bytes::from_static(b"{}"), &[], 0);
        drain(&outbox); // the reply
        for seq in 1..=50 {
            hub.deliver(&publication(&ch, seq));
        }
        // 50 publications into an outbox bounded at 4 frames: no close; the first two
        // queue normally (backlog 2), then one slot holds the newest.
        assert!(!outbox.is_closing());
        assert_eq!(seqs(&drain(&outbox)), vec![1, 2, 50]);
        // A client that keeps up gets every publication.
        hub.deliver(&publication(&ch, 51));
        hub.deliver(&publication(&ch, 52));
        assert_eq!(seqs(&drain(&outbox)), vec![51, 52]);
    }

    #[test]
    fn full_outbox_closes_a_non_conflated_subscriber_with_4008() {
        let ch = Channel::parse("c.x").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(3, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&sub));
        sub.go_live(bytes::Bytes::from_static(b"{}"), &[], 0);
        for seq in 1..=5 {
            hub.deliver(&publication(&ch, seq));
        }
        let mut items = Vec::new();
        match outbox.take(&mut items, usize::MAX) {
            Batch::Close(c) => assert_eq!(c.code, crate::protocol::close::SLOW_CONSUMER),
            Batch::Frames => panic!("expected a close"),
        }
        assert!(
            items.is_empty(),
            "a slow consumer's backlog is dropped, not sent"
        );
    }

    #[test]
    fn unsubscribed_subscription_sends_nothing_more() {
        let ch = Channel::parse("p.y").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(10, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), Some(Arc::default()));
        hub.add(Arc::clone(&sub));
        sub.go_live(bytes::Bytes::from_static(b"{}"), &[], 0);
        drain(&outbox); // the reply
                        // Fill the backlog so the channel is conflating, then unsubscribe:
                        // the queued slot must not send the pending publication.
        for seq in 1..=20 {
            hub.deliver(&publication(&ch, seq));
        }
        sub.cancel();
        hub.remove(&ch, sub.id);
        hub.deliver(&publication(&ch, 21));
        assert_eq!(
            seqs(&drain(&outbox)),
            (1..=10).collect::<Vec<u64>>(),
            "backlog is capped by the bound (10)"
        );
    }

    #[test]
    fn replay_does_not_start_over_an_unread_backlog() {
        let ch = Channel::parse("c.r").unwrap();
        let outbox = Arc::new(Outbox::new(100, 1024, 16));
        // Replies the client has not read: over the byte bound, within reply headroom.
        for _ in 0..3 {
            assert!(outbox.push_reply(bytes::Bytes::from(vec![b' '; 500])));
        }
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        sub.go_live(bytes::Bytes::from_static(b"{}"), &[publication(&ch, 1)], 0);
        let mut items = Vec::new();
        match outbox.take(&mut items, usize::MAX) {
            Batch::Close(c) => assert_eq!(c.code, crate::protocol::close::SLOW_CONSUMER),
            Batch::Frames => panic!("expected a close"),
        }
    }
}
