//! The hub: this node's subscription index (channel → local subscriptions), the
//! fan-out of live publications and join/leave events to them (it implements
//! [`Deliveries`], the one way engines deliver), and each subscription's phase.
//!
//! A [`Subscription`] joins the hub *replaying*: live publications are not queued
//! but remembered, while its replay is queued page by page; it switches to live
//! under its own lock only once the replay has passed every live seq seen, so the
//! seam between history and live has no gap and no duplicate
//! (docs/architecture.md, "The seam").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::channel::Channel;
use crate::engine::{Deliveries, JoinLeave, Publication};
use crate::metrics::Delivering;
use crate::session::outbox::{Outbox, Stamp};

enum Phase {
    /// History is being replayed: live publications are not queued (they are in
    /// the stream, and the replay reads on until it reaches them); the highest
    /// seen is remembered so the switch to live waits for the replay to pass it.
    Replaying {
        live_max: u64,
        /// A conflated subscription's newest live publication seen meanwhile: what
        /// it switches to live with when the replay is behind (later publications
        /// supersede the ones between, so it need not read them).
        newest: Option<Arc<Publication>>,
    },
    Live,
    /// Unsubscribed: publications are ignored.
    Cancelled,
}

struct SubState {
    phase: Phase,
    /// Highest seq queued to the client on this channel.
    last_seq: u64,
}

/// Where a replaying subscription stands after [`Subscription::try_go_live`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Live: the replay is over.
    Live,
    /// Live publications up to a seq the replay has not queued yet: read on after `after`.
    Behind { after: u64 },
    /// Unsubscribed or closed.
    Cancelled,
}

/// One connection's subscription to one channel.
pub struct Subscription {
    pub channel: Channel,
    pub outbox: Arc<Outbox>,
    /// Hub-unique id, so unsubscribing removes exactly this subscription.
    pub id: u64,
    /// Conflated subscriptions: the outbox slot and the node's count of ticks replaced unsent.
    conflation: Option<(usize, Arc<AtomicU64>)>,
    state: Mutex<SubState>,
}

impl Subscription {
    /// A replaying subscription. `conflated` (the hub's counter) makes it a
    /// conflated subscription with a slot in the outbox.
    pub fn new(
        channel: Channel,
        outbox: Arc<Outbox>,
        conflated: Option<Arc<AtomicU64>>,
    ) -> Arc<Self> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let conflation = conflated.map(|counter| (outbox.open_slot(), counter));
        Arc::new(Subscription {
            channel,
            outbox,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            conflation,
            state: Mutex::new(SubState {
                phase: Phase::Replaying {
                    live_max: 0,
                    newest: None,
                },
                last_seq: 0,
            }),
        })
    }

    /// Offers one live publication (`stamp`: sampled for the latency histogram);
    /// whether it was queued.
    fn offer(&self, publication: &Arc<Publication>, stamp: Option<Stamp>) -> bool {
        let mut st = self.state.lock();
        match &mut st.phase {
            Phase::Replaying { live_max, newest } => {
                if publication.seq > *live_max {
                    *live_max = publication.seq;
                    if self.conflation.is_some() {
                        *newest = Some(Arc::clone(publication));
                    }
                }
                false
            }
            Phase::Cancelled => false,
            Phase::Live => {
                if publication.seq <= st.last_seq {
                    return false;
                }
                st.last_seq = publication.seq;
                let frame = &publication.msg;
                match (&self.conflation, stamp) {
                    (Some((slot, skipped)), stamp) => {
                        self.outbox.push_conflated(*slot, frame, stamp, skipped);
                        true
                    }
                    (None, Some(stamp)) => self.outbox.push_stamped(frame.clone(), stamp),
                    (None, None) => self.outbox.push(frame.clone()),
                }
            }
        }
    }

    /// Queues `reply` (the `subscribed` frame) and the first replay page; `after` is
    /// the seq the client already has. `false` when the connection cannot take a
    /// replay now (it is closed with 4008) or is closing.
    pub fn begin(&self, reply: Bytes, page: &[Arc<Publication>], after: u64) -> bool {
        let mut st = self.state.lock();
        st.last_seq = after;
        if !page.is_empty() && !self.outbox.can_start_replay() {
            drop(st);
            let why = "slow consumer: unread backlog too large to start a replay";
            self.outbox
                .close(crate::protocol::close::SLOW_CONSUMER, why, false);
            return false;
        }
        if !self.outbox.push_reply(reply) {
            return false;
        }
        Self::queue_replay(&self.outbox, &mut st, page)
    }

    /// Queues the next replay page (what the client has is skipped).
    pub fn replay(&self, page: &[Arc<Publication>]) -> bool {
        let mut st = self.state.lock();
        if !matches!(st.phase, Phase::Replaying { .. }) {
            return false;
        }
        Self::queue_replay(&self.outbox, &mut st, page)
    }

    fn queue_replay(outbox: &Outbox, st: &mut SubState, page: &[Arc<Publication>]) -> bool {
        for p in page {
            if p.seq > st.last_seq {
                st.last_seq = p.seq;
                if !outbox.push_replay(p.msg.clone()) {
                    return false;
                }
            }
        }
        true
    }

    /// Switches to live delivery if the replay has queued every live publication
    /// seen so far; called once history held nothing more. Under the subscription's
    /// lock, so no publication falls between the replay and live (docs/architecture.md,
    /// "The seam").
    pub fn try_go_live(&self) -> Progress {
        let mut st = self.state.lock();
        let st = &mut *st;
        match &mut st.phase {
            Phase::Replaying { live_max, newest } if *live_max > st.last_seq => {
                match (&self.conflation, newest.take()) {
                    // Conflated: the newest live publication supersedes what the
                    // replay has not read; queued in the channel's slot, it is the
                    // switch to live (docs/feed.md, "Slow clients: conflation").
                    (Some((slot, skipped)), Some(p)) => {
                        skipped.fetch_add(p.seq - st.last_seq - 1, Ordering::Relaxed);
                        st.last_seq = p.seq;
                        st.phase = Phase::Live;
                        self.outbox.push_conflated(*slot, &p.msg, None, skipped);
                        Progress::Live
                    }
                    _ => Progress::Behind { after: st.last_seq },
                }
            }
            Phase::Replaying { .. } => {
                st.phase = Phase::Live;
                Progress::Live
            }
            Phase::Live => Progress::Live,
            Phase::Cancelled => Progress::Cancelled,
        }
    }

    /// Whether a replay may skip publications (the newest supersedes them).
    pub fn is_conflated(&self) -> bool {
        self.conflation.is_some()
    }

    /// The highest seq queued to the client.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().last_seq
    }

    /// Stops delivery: nothing more is queued, and a queued conflated slot sends nothing.
    pub fn cancel(&self) {
        let mut st = self.state.lock();
        let was = std::mem::replace(&mut st.phase, Phase::Cancelled);
        if let (Some((slot, _)), false) = (&self.conflation, matches!(was, Phase::Cancelled)) {
            self.outbox.close_slot(*slot);
        }
    }
}

/// One channel's local subscriptions.
struct Local {
    subs: Vec<Arc<Subscription>>,
    /// The channel's namespace's series, looked up once per channel.
    metrics: Arc<Delivering>,
}

/// This node's local subscription index.
#[derive(Default)]
pub struct Hub {
    channels: RwLock<HashMap<Channel, Local>>,
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
        let mut map = self.channels.write();
        let local = map.entry(sub.channel.clone()).or_insert_with(|| Local {
            subs: Vec::new(),
            metrics: crate::metrics::get().delivering(sub.channel.namespace()),
        });
        local.metrics.subscriptions.increment(1);
        local.subs.push(sub);
    }

    /// Removes a subscription.
    pub fn remove(&self, channel: &Channel, id: u64) {
        let mut map = self.channels.write();
        if let Some(local) = map.get_mut(channel) {
            let before = local.subs.len();
            local.subs.retain(|s| s.id != id);
            local
                .metrics
                .subscriptions
                .decrement((before - local.subs.len()) as f64);
            if local.subs.is_empty() {
                map.remove(channel);
            }
        }
    }
}

impl Deliveries for Hub {
    fn publication(&self, publication: &Arc<Publication>) -> usize {
        let channels = self.channels.read();
        let Some(local) = channels.get(&publication.channel) else {
            return 0;
        };
        // One recipient per publication, picked at random, carries the stamp: the
        // histogram costs one sample per publication, not one per delivery.
        let sampled = fastrand::usize(..local.subs.len().max(1));
        let mut queued = 0u64;
        for (i, sub) in local.subs.iter().enumerate() {
            let stamp = (i == sampled).then(|| Stamp {
                ts_ms: publication.ts,
                latency: local.metrics.delivery_latency.clone(),
            });
            queued += u64::from(sub.offer(publication, stamp));
        }
        local.metrics.deliveries.increment(queued);
        local
            .metrics
            .delivered_bytes
            .increment(queued * publication.msg.len() as u64);
        local.subs.len()
    }

    fn join_leave(&self, event: &JoinLeave) {
        let Ok(channel) = Channel::parse(&event.channel) else {
            return;
        };
        if let Some(local) = self.channels.read().get(&channel) {
            // Encoded once for every subscriber of the channel.
            let frame = crate::protocol::encode(event);
            for sub in &local.subs {
                sub.outbox.push(frame.clone());
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
        let _ = outbox.take(&mut items, &mut Vec::new(), usize::MAX);
        items
            .into_iter()
            .filter_map(|i| match i {
                Item::Text(b) => Some(String::from_utf8(b.to_vec()).unwrap()),
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

    fn live(sub: &Subscription) {
        sub.begin(bytes::Bytes::from_static(b"{}"), &[], 0);
        assert_eq!(sub.try_go_live(), Progress::Live);
    }

    #[test]
    fn seam_reads_on_past_what_live_saw_during_the_replay() {
        let ch = Channel::parse("t.a").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(100, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&sub));
        // Published while history was being read: not queued, but remembered...
        hub.publication(&publication(&ch, 5));
        hub.publication(&publication(&ch, 6));
        // ...so a first page that ends at 5 cannot go live yet.
        let first = [publication(&ch, 4), publication(&ch, 5)];
        assert!(sub.begin(
            bytes::Bytes::from_static(b"{\"type\":\"subscribed\"}"),
            &first,
            3
        ));
        assert_eq!(sub.try_go_live(), Progress::Behind { after: 5 });
        // The next page holds 6; a late duplicate of 5 is skipped.
        assert!(sub.replay(&[publication(&ch, 5), publication(&ch, 6)]));
        assert_eq!(sub.try_go_live(), Progress::Live);
        hub.publication(&publication(&ch, 6)); // a late duplicate from the backbone
        hub.publication(&publication(&ch, 7));
        let frames = drain(&outbox);
        assert!(frames[0].contains("subscribed"), "reply first");
        assert_eq!(seqs(&frames), vec![4, 5, 6, 7]);
    }

    #[test]
    fn a_conflated_seam_goes_live_with_the_newest_publication_live_saw() {
        let ch = Channel::parse("p.s").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(100, 1 << 20, 16));
        let skipped = Arc::new(AtomicU64::new(0));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), Some(Arc::clone(&skipped)));
        hub.add(Arc::clone(&sub));
        // The snapshot (5) was read; 6, 7 and 8 went by live meanwhile.
        for seq in 6..=8 {
            hub.publication(&publication(&ch, seq));
        }
        assert!(sub.begin(bytes::Bytes::from_static(b"{}"), &[publication(&ch, 5)], 0));
        // No second read: 8 supersedes 6 and 7.
        assert_eq!(sub.try_go_live(), Progress::Live);
        hub.publication(&publication(&ch, 8)); // a late duplicate
        hub.publication(&publication(&ch, 9));
        assert_eq!(seqs(&drain(&outbox)), vec![5, 8, 9]);
        assert_eq!(skipped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn replayed_frames_do_not_count_against_the_live_bound() {
        let ch = Channel::parse("t.b").unwrap();
        let other = Channel::parse("t.c").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(4, 1 << 20, 16));
        let replaying = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        let live_sub = Subscription::new(other.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&replaying));
        hub.add(Arc::clone(&live_sub));
        live(&live_sub);
        let page: Vec<_> = (1..=10).map(|s| publication(&ch, s)).collect();
        assert!(replaying.begin(bytes::Bytes::from_static(b"{}"), &page, 0));
        // Two replies and ten replayed frames queued: live frames on another channel
        // still fit (the replies count, the replay does not: 2 + 2 = 4).
        for seq in 11..=12 {
            hub.publication(&publication(&other, seq));
        }
        assert!(!outbox.is_closing(), "the replay is outside the live bound");
        hub.publication(&publication(&other, 13));
        assert!(outbox.is_closing(), "the live bound still holds");
    }

    #[test]
    fn conflation_keeps_one_slot_with_the_newest_value() {
        let ch = Channel::parse("p.x").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(4, 1 << 20, 2));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), Some(Arc::default()));
        hub.add(Arc::clone(&sub));
        live(&sub);
        drain(&outbox); // the reply
        for seq in 1..=50 {
            hub.publication(&publication(&ch, seq));
        }
        // 50 publications into an outbox bounded at 4 frames: no close; the first two
        // queue normally (backlog 2), then one slot holds the newest.
        assert!(!outbox.is_closing());
        assert_eq!(seqs(&drain(&outbox)), vec![1, 2, 50]);
        // A client that keeps up gets every publication.
        hub.publication(&publication(&ch, 51));
        hub.publication(&publication(&ch, 52));
        assert_eq!(seqs(&drain(&outbox)), vec![51, 52]);
    }

    #[test]
    fn full_outbox_closes_a_non_conflated_subscriber_with_4008() {
        let ch = Channel::parse("c.x").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(3, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&sub));
        live(&sub);
        for seq in 1..=5 {
            hub.publication(&publication(&ch, seq));
        }
        let mut items = Vec::new();
        match outbox.take(&mut items, &mut Vec::new(), usize::MAX) {
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
        live(&sub);
        drain(&outbox); // the reply
                        // Fill the backlog so the channel is conflating, then unsubscribe:
                        // the queued slot must not send the pending publication.
        for seq in 1..=20 {
            hub.publication(&publication(&ch, seq));
        }
        sub.cancel();
        hub.remove(&ch, sub.id);
        hub.publication(&publication(&ch, 21));
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
        assert!(!sub.begin(bytes::Bytes::from_static(b"{}"), &[publication(&ch, 1)], 0));
        let mut items = Vec::new();
        match outbox.take(&mut items, &mut Vec::new(), usize::MAX) {
            Batch::Close(c) => assert_eq!(c.code, crate::protocol::close::SLOW_CONSUMER),
            Batch::Frames => panic!("expected a close"),
        }
    }

    #[test]
    fn join_leave_reaches_the_channel_subscribers_only() {
        let ch = Channel::parse("c.j").unwrap();
        let hub = Hub::new();
        let outbox = Arc::new(Outbox::new(10, 1 << 20, 16));
        let sub = Subscription::new(ch.clone(), Arc::clone(&outbox), None);
        hub.add(Arc::clone(&sub));
        let event = |channel: &str| JoinLeave {
            kind: "join".into(),
            channel: channel.into(),
            user: "u".into(),
            device: "d".into(),
        };
        hub.join_leave(&event("c.j"));
        hub.join_leave(&event("c.other"));
        let frames = drain(&outbox);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"channel\":\"c.j\""), "{frames:?}");
    }
}
