//! The in-process engine for a single node: a per-namespace sequence, bounded
//! per-channel history (size and age), `msg_id` dedupe, presence and cursors.
//!
//! Seq assignment, storage and live delivery of one channel happen under that
//! channel's lock, so every subscriber sees a channel in seq order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use super::{
    AckedSeq, BoxFuture, Broker, ClientInfo, Control, CursorRead, Cursors, DeviceCursor,
    EngineError, HistoryFrom, HistoryPage, JoinLeave, LiveSink, NodeInfo, Position, Presence,
    PresencePage, PresenceStats, Publication, PublishRequest, Published,
};
use crate::channel::Channel;
use crate::config::NamespaceConfig;
use crate::connections::{Connections, Revocations};
use crate::hub::Hub;

/// Current Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
    sink: Arc<dyn LiveSink>,
}

impl MemoryBroker {
    /// A broker for these namespaces delivering live publications to `sink`.
    pub fn new(
        namespaces: &std::collections::BTreeMap<String, NamespaceConfig>,
        sink: Arc<dyn LiveSink>,
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
            sink,
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
        self.sink.deliver(&publication);
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
            });
        };
        let mut log = log.lock();
        log.trim(&ns.cfg, Instant::now());
        let trimmed = log.trimmed_through.max(swept);
        let after = match &from {
            HistoryFrom::After(p) if p.epoch == self.epoch => Some(p.seq),
            HistoryFrom::After(_) => None,
            HistoryFrom::Cursor(seq) => Some(*seq),
            HistoryFrom::Latest(_) => Some(0),
        };
        let (publications, complete) = match from {
            HistoryFrom::After(_) | HistoryFrom::Cursor(_) => {
                let (after, epoch_ok) = match after {
                    Some(seq) => (seq, true),
                    None => (0, false),
                };
                let newer: Vec<_> = log
                    .entries
                    .iter()
                    .filter(|(_, pb)| pb.seq > after)
                    .map(|(_, pb)| Arc::clone(pb))
                    .collect();
                let covered = epoch_ok && after >= trimmed;
                if newer.len() > limit {
                    // Too much to replay: send the newest part and say so.
                    (newer[newer.len() - limit..].to_vec(), false)
                } else {
                    (newer, covered)
                }
            }
            HistoryFrom::Latest(n) => {
                let n = n.min(limit);
                let skip = log.entries.len().saturating_sub(n);
                (
                    log.entries
                        .iter()
                        .skip(skip)
                        .map(|(_, p)| Arc::clone(p))
                        .collect(),
                    true,
                )
            }
        };
        Ok(HistoryPage {
            publications,
            position: position(log.last_seq.max(swept)),
            complete,
        })
    }
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
    ) -> BoxFuture<'a, Result<HistoryPage, EngineError>> {
        let result = self.history_now(channel, from, limit);
        Box::pin(async move { result })
    }

    fn watch<'a>(&'a self, _channel: &'a Channel) -> BoxFuture<'a, Result<(), EngineError>> {
        // Every publication already passes through this process's hub.
        Box::pin(async { Ok(()) })
    }

    fn unwatch(&self, _channel: &Channel) {}
}

/// Presence of the memory engine.
pub struct MemoryPresence {
    channels: Mutex<HashMap<Channel, BTreeMap<String, ClientInfo>>>,
    /// A user's connections are the node's own: the index answers for them.
    connections: Arc<Connections>,
    node: String,
}

impl MemoryPresence {
    /// Presence of one node, answering user queries from its connection index.
    pub fn new(connections: Arc<Connections>, node: &str) -> Self {
        MemoryPresence {
            channels: Mutex::default(),
            connections,
            node: node.to_string(),
        }
    }
}

impl Presence for MemoryPresence {
    fn join(&self, channel: &Channel, info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        self.channels
            .lock()
            .entry(channel.clone())
            .or_default()
            .insert(info.conn_id.clone(), info);
        Box::pin(async { Ok(()) })
    }

    fn leave<'a>(
        &'a self,
        channel: &'a Channel,
        conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let mut channels = self.channels.lock();
        if let Some(members) = channels.get_mut(channel) {
            members.remove(conn_id);
            if members.is_empty() {
                channels.remove(channel);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn page<'a>(
        &'a self,
        channel: &'a Channel,
        cursor: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<PresencePage, EngineError>> {
        let mut page = PresencePage::default();
        if let Some(members) = self.channels.lock().get(channel) {
            // Pages in conn_id order: the cursor is the last conn_id returned.
            let from = match cursor {
                Some(c) => Bound::Excluded(c.to_string()),
                None => Bound::Unbounded,
            };
            let mut rest = members.range((from, Bound::Unbounded));
            page.clients = rest.by_ref().take(limit).map(|(_, i)| i.clone()).collect();
            if rest.next().is_some() {
                page.next = page.clients.last().map(|i| i.conn_id.clone());
            }
        }
        Box::pin(async move { Ok(page) })
    }

    fn stats<'a>(
        &'a self,
        channel: &'a Channel,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let stats = match self.channels.lock().get(channel) {
            Some(members) => {
                let users: HashSet<&str> = members.values().map(|i| i.user.as_str()).collect();
                PresenceStats {
                    clients: members.len() as u64,
                    users: users.len() as u64,
                }
            }
            None => PresenceStats {
                clients: 0,
                users: 0,
            },
        };
        Box::pin(async move { Ok(stats) })
    }

    fn connect(&self, _info: ClientInfo) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn disconnect<'a>(
        &'a self,
        _user: &'a str,
        _conn_id: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Vec<ClientInfo>, EngineError>> {
        let list = self.connections.of_user(user, &self.node);
        Box::pin(async move { Ok(list) })
    }
}

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

/// Control of the memory engine: commands act on this node's connections, and
/// the registry is this node alone.
pub struct MemoryControl {
    connections: Arc<Connections>,
    hub: Arc<Hub>,
    revoked: Revocations,
    me: NodeInfo,
}

impl MemoryControl {
    /// Control for the node described by `me`.
    pub fn new(connections: Arc<Connections>, hub: Arc<Hub>, me: NodeInfo) -> Self {
        MemoryControl {
            connections,
            hub,
            revoked: Revocations::default(),
            me,
        }
    }
}

impl Control for MemoryControl {
    fn disconnect<'a>(
        &'a self,
        user: &'a str,
        device: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.connections
            .kick_user(user, device, "disconnected by the server");
        Box::pin(async { Ok(()) })
    }

    fn revoke<'a>(&'a self, jti: &'a str, until_ms: u64) -> BoxFuture<'a, Result<(), EngineError>> {
        self.revoked.add(jti, until_ms);
        self.connections.kick_token(jti, "token revoked");
        Box::pin(async { Ok(()) })
    }

    fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.contains(jti)
    }

    fn announce(&self, event: JoinLeave) {
        if let Ok(channel) = Channel::parse(&event.channel) {
            self.hub
                .broadcast(&channel, &crate::protocol::encode(&event));
        }
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, EngineError>> {
        let mut me = self.me.clone();
        me.connections = self.connections.count() as u64;
        me.heartbeat_at = unix_ms();
        Box::pin(async move { Ok(vec![me]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;

    struct Discard;
    impl LiveSink for Discard {
        fn deliver(&self, _: &Arc<Publication>) {}
    }

    fn broker(cfg: NamespaceConfig) -> Arc<MemoryBroker> {
        let mut namespaces = BTreeMap::new();
        namespaces.insert("ns".to_string(), cfg);
        MemoryBroker::new(&namespaces, Arc::new(Discard))
    }

    fn publish(b: &MemoryBroker, channel: &str, msg_id: Option<&str>) -> Published {
        b.publish_now(PublishRequest {
            channel: Channel::parse(channel).unwrap(),
            data: RawValue::from_string("1".into()).unwrap(),
            from: None,
            msg_id: msg_id.map(str::to_string),
        })
        .unwrap()
    }

    fn after(b: &MemoryBroker, channel: &str, seq: u64) -> HistoryPage {
        let from = HistoryFrom::After(Position {
            seq,
            epoch: b.epoch().to_string(),
        });
        b.history_now(&Channel::parse(channel).unwrap(), from, 100)
            .unwrap()
    }

    #[test]
    fn seq_is_per_namespace_and_increasing_per_channel() {
        let b = broker(NamespaceConfig::default());
        assert_eq!(publish(&b, "ns.a", None).seq, 1);
        assert_eq!(publish(&b, "ns.b", None).seq, 2);
        assert_eq!(publish(&b, "ns.a", None).seq, 3);
        let page = after(&b, "ns.a", 0);
        let seqs: Vec<u64> = page.publications.iter().map(|p| p.seq).collect();
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

    #[test]
    fn wrong_epoch_and_too_much_to_replay_are_incomplete() {
        let b = broker(NamespaceConfig {
            history_size: 1000,
            ..NamespaceConfig::default()
        });
        for _ in 0..10 {
            publish(&b, "ns.a", None);
        }
        let ch = Channel::parse("ns.a").unwrap();
        let other = HistoryFrom::After(Position {
            seq: 5,
            epoch: "other".into(),
        });
        let page = b.history_now(&ch, other, 100).unwrap();
        assert_eq!((page.complete, page.publications.len()), (false, 10));
        let bounded = HistoryFrom::After(Position {
            seq: 0,
            epoch: b.epoch().to_string(),
        });
        let page = b.history_now(&ch, bounded, 4).unwrap();
        let seqs: Vec<u64> = page.publications.iter().map(|p| p.seq).collect();
        assert_eq!(
            (page.complete, seqs),
            (false, vec![7, 8, 9, 10]),
            "the newest part, flagged"
        );
    }
}
