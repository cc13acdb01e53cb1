//! The memory engine's broker: a per-namespace sequence, bounded per-channel
//! history (size and age) and `msg_id` dedupe, in this process.
//!
//! Seq assignment, storage and live delivery of one channel happen under that
//! channel's lock, so every subscriber sees a channel in seq order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::NamespaceConfig;
use crate::engine::{
    BoxFuture, Broker, Deliveries, EngineError, HistoryFrom, HistoryPage, PageLimit, Position,
    Publication, PublishRequest, Published, ReplayPage,
};

#[derive(Default)]
struct ChannelLog {
    entries: VecDeque<(Instant, Arc<Publication>)>,
    /// Seq of the newest publication ever stored.
    last_seq: u64,
    /// Highest seq that was removed (by size or age); replay after an older position is incomplete.
    trimmed_through: u64,
}

impl ChannelLog {
    fn trim(&mut self, cfg: &NamespaceConfig, now: Instant) {
        while let Some((at, p)) = self.entries.front() {
            if self.entries.len() > cfg.history_size || now.duration_since(*at) > cfg.history_ttl {
                self.trimmed_through = self.trimmed_through.max(p.seq);
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }
}

/// `msg_id`s seen within the dedupe window, per channel: a key used on one channel
/// never suppresses a publication on another.
#[derive(Default)]
struct Dedupe {
    seen: HashMap<(Channel, String), u64>,
    order: VecDeque<(Instant, (Channel, String))>,
}

impl Dedupe {
    fn expire(&mut self, window: Duration, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) <= window {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.seen.remove(&key);
            }
        }
    }
}

struct Namespace {
    cfg: NamespaceConfig,
    next_seq: AtomicU64,
    dedupe: Mutex<Dedupe>,
    /// Highest `trimmed_through` of channel logs that were dropped entirely.
    swept_through: AtomicU64,
}

/// Broker of the memory engine.
pub struct MemoryBroker {
    epoch: String,
    namespaces: HashMap<String, Namespace>,
    channels: Mutex<HashMap<Channel, Arc<Mutex<ChannelLog>>>>,
    deliveries: Arc<dyn Deliveries>,
}

impl MemoryBroker {
    /// A broker for these namespaces delivering live publications to `sink`.
    pub fn new(
        namespaces: &std::collections::BTreeMap<String, NamespaceConfig>,
        deliveries: Arc<dyn Deliveries>,
    ) -> Arc<Self> {
        let namespaces = namespaces
            .iter()
            .map(|(name, cfg)| {
                (
                    name.clone(),
                    Namespace {
                        cfg: cfg.clone(),
                        next_seq: AtomicU64::new(1),
                        dedupe: Mutex::new(Dedupe::default()),
                        swept_through: AtomicU64::new(0),
                    },
                )
            })
            .collect();
        Arc::new(MemoryBroker {
            // A new process is a new stream incarnation: positions from before are not ours.
            epoch: format!("mem-{:x}-{:04x}", unix_ms(), fastrand::u16(..)),
            namespaces,
            channels: Mutex::new(HashMap::new()),
            deliveries,
        })
    }

    /// The epoch of this process's streams.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn namespace(&self, channel: &Channel) -> Result<&Namespace, EngineError> {
        self.namespaces.get(channel.namespace()).ok_or_else(|| {
            EngineError::Rejected(format!("unknown namespace {:?}", channel.namespace()))
        })
    }

    fn log(&self, channel: &Channel) -> Arc<Mutex<ChannelLog>> {
        Arc::clone(self.channels.lock().entry(channel.clone()).or_default())
    }

    /// Drops channel logs whose history has fully expired, so idle channels cost nothing.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut channels = self.channels.lock();
        channels.retain(|channel, log| {
            let Ok(ns) = self.namespace(channel) else {
                return false;
            };
            let mut log = log.lock();
            log.trim(&ns.cfg, now);
            if log.entries.is_empty() {
                // Remember how far history had been trimmed, so replay stays honest.
                ns.swept_through
                    .fetch_max(log.last_seq.max(log.trimmed_through), Ordering::Relaxed);
                false
            } else {
                true
            }
        });
    }

    /// Starts the periodic sweep; it ends when the broker is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(broker) => broker.sweep(),
                    None => return,
                }
            }
        });
    }

    fn publish_now(&self, req: PublishRequest) -> Result<Published, EngineError> {
        let ns = self.namespace(&req.channel)?;
        let now = Instant::now();
        // The dedupe lock is held across the store so two racing publishes of
        // one msg_id cannot both be stored.
        let key = req.msg_id.map(|id| (req.channel.clone(), id));
        let mut dedupe = match &key {
            Some(key) => {
                let mut d = ns.dedupe.lock();
                d.expire(ns.cfg.dedupe_window, now);
                if let Some(&seq) = d.seen.get(key) {
                    return Ok(Published {
                        seq,
                        duplicate: true,
                    });
                }
                Some(d)
            }
            None => None,
        };
        let log = self.log(&req.channel);
        let mut log = log.lock();
        let seq = ns.next_seq.fetch_add(1, Ordering::Relaxed);
        let publication = Arc::new(Publication::new(
            req.channel,
            seq,
            unix_ms(),
            req.data,
            req.from,
        ));
        log.last_seq = seq;
        log.entries.push_back((now, Arc::clone(&publication)));
        log.trim(&ns.cfg, now);
        if let (Some(d), Some(key)) = (dedupe.as_mut(), key) {
            d.seen.insert(key.clone(), seq);
            d.order.push_back((now, key));
        }
        drop(dedupe);
        // As on the NATS engine: one span per publication, with its local reach.
        let span = tracing::info_span!(
            "deliver",
            channel = %publication.channel,
            seq = crate::telemetry::int(seq),
            recipients = tracing::field::Empty,
        );
        let recipients = span.in_scope(|| self.deliveries.publication(&publication));
        span.record("recipients", crate::telemetry::int(recipients));
        Ok(Published {
            seq,
            duplicate: false,
        })
    }

    fn history_now(
        &self,
        channel: &Channel,
        from: HistoryFrom,
        limit: usize,
        page: PageLimit,
    ) -> Result<HistoryPage, EngineError> {
        let ns = self.namespace(channel)?;
        let log = self.channels.lock().get(channel).cloned();
        let swept = ns.swept_through.load(Ordering::Relaxed);
        let position = |seq| Position {
            seq,
            epoch: self.epoch.clone(),
        };
        let Some(log) = log else {
            let complete = match &from {
                HistoryFrom::After(p) => p.epoch == self.epoch && p.seq >= swept,
                HistoryFrom::Cursor(seq) => *seq >= swept,
                HistoryFrom::Latest(_) => true,
            };
            return Ok(HistoryPage {
                publications: Vec::new(),
                position: position(swept),
                complete,
                remaining: 0,
            });
        };
        let mut log = log.lock();
        log.trim(&ns.cfg, Instant::now());
        let trimmed = log.trimmed_through.max(swept);
        // Where the read starts, and whether the retained history covers it.
        let (after, covered, n) = match &from {
            HistoryFrom::After(p) if p.epoch == self.epoch => (p.seq, p.seq >= trimmed, limit),
            HistoryFrom::After(_) => (0, false, limit),
            HistoryFrom::Cursor(seq) => (*seq, *seq >= trimmed, limit),
            HistoryFrom::Latest(n) => (0, true, (*n).min(limit)),
        };
        let newer = log.entries.len() - log.entries.partition_point(|(_, p)| p.seq <= after);
        // More than `n` to read: the newest `n`, and (for a resume) say so.
        let skip = log.entries.len() - newer + newer.saturating_sub(n);
        let complete = match from {
            HistoryFrom::Latest(_) => true,
            _ => covered && newer <= n,
        };
        let (publications, remaining) = take_page(log.entries.range(skip..), page);
        Ok(HistoryPage {
            publications,
            position: position(log.last_seq.max(swept)),
            complete,
            remaining,
        })
    }

    fn history_after_now(
        &self,
        channel: &Channel,
        after: u64,
        page: PageLimit,
    ) -> Result<ReplayPage, EngineError> {
        let ns = self.namespace(channel)?;
        let swept = ns.swept_through.load(Ordering::Relaxed);
        let Some(log) = self.channels.lock().get(channel).cloned() else {
            return Ok(ReplayPage {
                lost: swept > after,
                ..ReplayPage::default()
            });
        };
        let mut log = log.lock();
        log.trim(&ns.cfg, Instant::now());
        let lost = log.trimmed_through.max(swept) > after;
        let start = log.entries.partition_point(|(_, p)| p.seq <= after);
        let (publications, remaining) = take_page(log.entries.range(start..), page);
        Ok(ReplayPage {
            publications,
            remaining,
            lost,
        })
    }
}

/// The first page of `entries`, and how many are left after it.
fn take_page<'a>(
    entries: impl ExactSizeIterator<Item = &'a (Instant, Arc<Publication>)>,
    page: PageLimit,
) -> (Vec<Arc<Publication>>, u64) {
    let total = entries.len();
    let mut bytes = 0usize;
    let mut publications = Vec::with_capacity(total.min(page.messages));
    for (_, p) in entries {
        if !page.admits(publications.len(), bytes, p.msg.len()) {
            break;
        }
        bytes += p.msg.len();
        publications.push(Arc::clone(p));
    }
    let remaining = (total - publications.len()) as u64;
    (publications, remaining)
}

impl Broker for MemoryBroker {
    fn publish(&self, req: PublishRequest) -> BoxFuture<'_, Result<Published, EngineError>> {
        let result = self.publish_now(req);
        Box::pin(async move { result })
    }

    fn history<'a>(
        &'a self,
        channel: &'a Channel,
        from: HistoryFrom,
        limit: usize,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<HistoryPage, EngineError>> {
        let result = self.history_now(channel, from, limit, page);
        Box::pin(async move { result })
    }

    fn history_after<'a>(
        &'a self,
        channel: &'a Channel,
        after: u64,
        page: PageLimit,
    ) -> BoxFuture<'a, Result<ReplayPage, EngineError>> {
        let result = self.history_after_now(channel, after, page);
        Box::pin(async move { result })
    }

    fn watch<'a>(&'a self, _channel: &'a Channel) -> BoxFuture<'a, Result<(), EngineError>> {
        // Every publication already passes through this process's hub.
        Box::pin(async { Ok(()) })
    }

    fn unwatch(&self, _channel: &Channel) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;

    fn broker(cfg: NamespaceConfig) -> Arc<MemoryBroker> {
        let mut namespaces = BTreeMap::new();
        namespaces.insert("ns".to_string(), cfg);
        MemoryBroker::new(&namespaces, Arc::new(crate::engine::NoDeliveries))
    }

    const ALL: PageLimit = PageLimit {
        messages: usize::MAX,
        bytes: usize::MAX,
    };

    fn publish(b: &MemoryBroker, channel: &str, msg_id: Option<&str>) -> Published {
        b.publish_now(PublishRequest {
            channel: Channel::parse(channel).unwrap(),
            data: RawValue::from_string("1".into()).unwrap(),
            from: None,
            msg_id: msg_id.map(str::to_string),
            caller_trace: None,
        })
        .unwrap()
    }

    fn after(b: &MemoryBroker, channel: &str, seq: u64) -> HistoryPage {
        let from = HistoryFrom::After(Position {
            seq,
            epoch: b.epoch().to_string(),
        });
        b.history_now(&Channel::parse(channel).unwrap(), from, 100, ALL)
            .unwrap()
    }

    #[test]
    fn seq_is_per_namespace_and_increasing_per_channel() {
        let b = broker(NamespaceConfig::default());
        assert_eq!(publish(&b, "ns.a", None).seq, 1);
        assert_eq!(publish(&b, "ns.b", None).seq, 2);
        assert_eq!(publish(&b, "ns.a", None).seq, 3);
        let page = after(&b, "ns.a", 0);
        let seqs = seqs_of(&page.publications);
        assert_eq!(
            (seqs, page.complete, page.position.seq),
            (vec![1, 3], true, 3)
        );
    }

    #[test]
    fn expired_history_is_trimmed_and_reported_incomplete() {
        // A zero TTL expires everything but the publication stored in the same instant.
        let b = broker(NamespaceConfig {
            history_ttl: Duration::ZERO,
            ..NamespaceConfig::default()
        });
        publish(&b, "ns.a", None);
        publish(&b, "ns.a", None);
        let page = after(&b, "ns.a", 0);
        assert!(
            !page.complete,
            "seq 1 expired: replay from 0 cannot be complete"
        );
        assert_eq!(page.position.seq, 2);
    }

    #[test]
    fn sweeping_an_idle_channel_keeps_recovery_honest() {
        let b = broker(NamespaceConfig {
            history_ttl: Duration::ZERO,
            ..NamespaceConfig::default()
        });
        publish(&b, "ns.a", None);
        b.sweep();
        assert!(
            b.channels.lock().is_empty(),
            "the expired channel log is dropped"
        );
        let page = after(&b, "ns.a", 0);
        assert!(!page.complete, "seq 1 existed and is gone");
        assert_eq!(page.position.seq, 1);
        assert!(after(&b, "ns.a", 1).complete, "nothing after 1 was lost");
    }

    #[test]
    fn msg_id_dedupes_within_the_window_only() {
        let b = broker(NamespaceConfig::default());
        let first = publish(&b, "ns.a", Some("m1"));
        let again = publish(&b, "ns.a", Some("m1"));
        assert_eq!((again.seq, again.duplicate), (first.seq, true));
        let b = broker(NamespaceConfig {
            dedupe_window: Duration::ZERO,
            ..NamespaceConfig::default()
        });
        let first = publish(&b, "ns.a", Some("m1"));
        let later = publish(&b, "ns.a", Some("m1"));
        assert!(
            !later.duplicate && later.seq > first.seq,
            "outside the window it is new"
        );
    }

    /// A broker with ten publications on `ns.a` (seqs 1..=10), all retained.
    fn ten_published() -> (Arc<MemoryBroker>, Channel) {
        let b = broker(NamespaceConfig {
            history_size: 1000,
            ..NamespaceConfig::default()
        });
        for _ in 0..10 {
            publish(&b, "ns.a", None);
        }
        (b, Channel::parse("ns.a").unwrap())
    }

    fn seqs_of(publications: &[Arc<Publication>]) -> Vec<u64> {
        publications.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn wrong_epoch_and_too_much_to_replay_are_incomplete() {
        let (b, ch) = ten_published();
        let other = HistoryFrom::After(Position {
            seq: 5,
            epoch: "other".into(),
        });
        let page = b.history_now(&ch, other, 100, ALL).unwrap();
        assert_eq!((page.complete, page.publications.len()), (false, 10));
        let bounded = HistoryFrom::After(Position {
            seq: 0,
            epoch: b.epoch().to_string(),
        });
        let page = b.history_now(&ch, bounded, 4, ALL).unwrap();
        let seqs = seqs_of(&page.publications);
        assert_eq!(
            (page.complete, seqs),
            (false, vec![7, 8, 9, 10]),
            "the newest part, flagged"
        );
    }

    #[test]
    fn pages_continue_where_the_last_ended_and_report_what_is_left() {
        let (b, ch) = ten_published();
        let from = HistoryFrom::After(Position {
            seq: 2,
            epoch: b.epoch().to_string(),
        });
        let first = b
            .history_now(&ch, from, 100, PageLimit::messages(3))
            .unwrap();
        let seqs = seqs_of(&first.publications);
        assert_eq!(
            (seqs, first.remaining, first.complete),
            (vec![3, 4, 5], 5, true)
        );
        let next = b.history_after_now(&ch, 5, PageLimit::messages(3)).unwrap();
        let seqs = seqs_of(&next.publications);
        assert_eq!((seqs, next.remaining, next.lost), (vec![6, 7, 8], 2, false));
        // A byte bound smaller than one publication still returns one.
        let tiny = PageLimit {
            messages: 10,
            bytes: 1,
        };
        assert_eq!(
            b.history_after_now(&ch, 8, tiny)
                .unwrap()
                .publications
                .len(),
            1
        );
    }

    #[test]
    fn a_page_after_trimmed_publications_reports_them_lost() {
        let b = broker(NamespaceConfig {
            history_size: 3,
            ..NamespaceConfig::default()
        });
        for _ in 0..6 {
            publish(&b, "ns.a", None);
        }
        let ch = Channel::parse("ns.a").unwrap();
        // 1..=3 were trimmed: a replay standing at 1 has lost 2 and 3.
        assert!(b.history_after_now(&ch, 1, ALL).unwrap().lost);
        let page = b.history_after_now(&ch, 3, ALL).unwrap();
        let seqs = seqs_of(&page.publications);
        assert_eq!((seqs, page.lost), (vec![4, 5, 6], false));
    }
}
