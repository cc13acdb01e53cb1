//! The namespace-wide live subscription (`live_subscription = "namespace"`,
//! docs/architecture.md, "Live delivery"): one NATS subscription and one task per
//! namespace per node receive every republished message of the namespace and hand
//! those of the channels this node holds to the hub. Each channel is delivered in
//! order and its gaps are repaired from the stream, as a channel's own live task
//! does, but a channel costs a map entry instead of a subscription and a task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{watch, OnceCell};

use super::{
    deliver_message, live_position, live_start, ready_within, repair, unavailable, ChannelLink,
};
use crate::channel::Channel;
use crate::engine::{Deliveries, EngineError};

/// Messages held for one channel while its start is read or a gap is repaired;
/// past this the channel is read from the stream instead, so a burst during a
/// repair costs bounded memory.
const MAX_HELD: usize = 256;

/// A namespace's live subscription on this node, opened by the first watch.
pub(super) struct NamespaceLive {
    shared: Arc<Shared>,
    task: OnceCell<tokio::task::JoinHandle<()>>,
}

/// What the subscription's task and the per-channel openings and repairs share.
struct Shared {
    client: async_nats::Client,
    deliveries: Arc<dyn Deliveries>,
    reconnects: watch::Receiver<u64>,
    /// `<live_prefix>.<namespace>.>`
    live_subject: String,
    /// Length of `<live_prefix>.`: what precedes the channel in a live subject.
    live_prefix_len: usize,
    /// `<subject_prefix>.`: what precedes the channel in the stream.
    subject_prefix: String,
    request_timeout: Duration,
    /// Set by the first watch (the stream is provisioned after the broker starts).
    stream: std::sync::OnceLock<Arc<stream::Stream>>,
    routes: Mutex<Routes>,
}

/// The channels this node holds in the namespace.
#[derive(Default)]
struct Routes {
    channels: HashMap<Channel, Route>,
    /// Tells a route from an earlier one of the same channel, so an opening or a
    /// repair of a channel unwatched meanwhile stops instead of delivering.
    next_id: u64,
}

/// A channel this node holds.
struct Route {
    /// The map's key again: the subscription's task hands it to the hub without
    /// a second lookup.
    channel: Channel,
    id: u64,
    refs: usize,
    phase: Phase,
    /// While the channel's start is read; its watchers wait on it.
    opening: Option<watch::Receiver<Option<Result<(), String>>>>,
}

/// Who delivers a channel's messages now.
enum Phase {
    /// The subscription's task delivers each message that follows `last`.
    Live { last: u64 },
    /// An opening or a repair task owns the channel: messages wait for it, and once
    /// more than [`MAX_HELD`] came (or the connection was lost) it reads the stream.
    /// Each held message with its seq and the channel's previous seq.
    Held {
        held: Vec<(u64, u64, async_nats::Message)>,
        refetch: bool,
    },
}

impl NamespaceLive {
    /// The namespace's live subscription, not opened yet.
    pub(super) fn new(
        client: async_nats::Client,
        deliveries: Arc<dyn Deliveries>,
        reconnects: watch::Receiver<u64>,
        cfg: &crate::config::NatsConfig,
        namespace: &str,
    ) -> NamespaceLive {
        NamespaceLive {
            shared: Arc::new(Shared {
                client,
                deliveries,
                reconnects,
                live_subject: format!("{}.{namespace}.>", cfg.live_prefix),
                live_prefix_len: cfg.live_prefix.len() + 1,
                subject_prefix: format!("{}.", cfg.subject_prefix),
                request_timeout: cfg.request_timeout,
                stream: std::sync::OnceLock::new(),
                routes: Mutex::new(Routes::default()),
            }),
            task: OnceCell::new(),
        }
    }

    /// Counts one more local subscription to `channel`; resolves once its live
    /// publications reach the hub (the contract of `Broker::watch`).
    pub(super) async fn watch(
        &self,
        channel: &Channel,
        stream: &Arc<stream::Stream>,
    ) -> Result<(), EngineError> {
        let _ = self.shared.stream.set(Arc::clone(stream));
        self.task
            .get_or_try_init(|| subscribe(Arc::clone(&self.shared)))
            .await?;
        let ready = {
            let mut routes = self.shared.routes.lock();
            match routes.channels.get_mut(channel) {
                Some(route) => {
                    route.refs += 1;
                    match &route.opening {
                        Some(ready) => ready.clone(),
                        None => return Ok(()),
                    }
                }
                None => {
                    let id = routes.next_id;
                    routes.next_id += 1;
                    let (tx, rx) = watch::channel(None);
                    routes.channels.insert(
                        channel.clone(),
                        Route {
                            channel: channel.clone(),
                            id,
                            refs: 1,
                            phase: Phase::Held {
                                held: Vec::new(),
                                refetch: false,
                            },
                            opening: Some(rx.clone()),
                        },
                    );
                    let shared = Arc::clone(&self.shared);
                    tokio::spawn(open(shared, channel.clone(), id, tx));
                    rx
                }
            }
        };
        let result = ready_within(ready, self.shared.request_timeout).await;
        if result.is_err() {
            self.unwatch(channel);
        }
        result
    }

    /// Releases one successful `watch`.
    pub(super) fn unwatch(&self, channel: &Channel) {
        let mut routes = self.shared.routes.lock();
        if let Some(route) = routes.channels.get_mut(channel) {
            route.refs -= 1;
            if route.refs == 0 {
                routes.channels.remove(channel);
            }
        }
    }
}

impl Drop for NamespaceLive {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// Subscribes to the namespace's live subject and starts its task once the
/// subscription is registered.
async fn subscribe(shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>, EngineError> {
    let sub = shared
        .client
        .subscribe(shared.live_subject.clone())
        .await
        .map_err(|e| unavailable("live subscription", e))?;
    // Answered only after the server processed the SUB before it (see `open_live`).
    let barrier = shared.client.request("$JS.API.INFO", Bytes::new());
    match tokio::time::timeout(shared.request_timeout, barrier).await {
        Ok(Ok(_)) => Ok(tokio::spawn(run(shared, sub))),
        Ok(Err(e)) => Err(unavailable("live subscription", e)),
        Err(_) => Err(unavailable("live subscription", "timed out")),
    }
}

impl Shared {
    fn link(&self, channel: &Channel) -> Option<ChannelLink> {
        Some(ChannelLink {
            stream: Arc::clone(self.stream.get()?),
            deliveries: Arc::clone(&self.deliveries),
            channel: channel.clone(),
            subject: format!("{}{channel}", self.subject_prefix),
        })
    }

    /// Whether `channel`'s route is still the one numbered `id`.
    fn current(&self, channel: &Channel, id: u64) -> bool {
        self.routes
            .lock()
            .channels
            .get(channel)
            .is_some_and(|r| r.id == id)
    }
}

/// The subscription's task: routes each republished message to its channel.
async fn run(shared: Arc<Shared>, mut sub: async_nats::Subscriber) {
    let mut reconnects = shared.reconnects.clone();
    reconnects.borrow_and_update();
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
            changed = reconnects.changed() => {
                if changed.is_err() {
                    return;
                }
                refetch_all(&shared);
                continue;
            }
        };
        let Some((seq, prev)) = live_position(&msg) else {
            continue;
        };
        let Some(name) = msg.subject.as_str().get(shared.live_prefix_len..) else {
            continue;
        };
        let channel = {
            let mut routes = shared.routes.lock();
            let Some(route) = routes.channels.get_mut(name) else {
                continue;
            };
            match &mut route.phase {
                Phase::Live { last } if seq <= *last => continue,
                Phase::Live { last } if prev > *last => {
                    // A gap: a repair task fetches what is missing, then delivers
                    // this message and whatever arrives meanwhile.
                    let from = *last;
                    route.phase = Phase::Held {
                        held: vec![(seq, prev, msg)],
                        refetch: false,
                    };
                    let (channel, id) = (route.channel.clone(), route.id);
                    tokio::spawn(drain(Arc::clone(&shared), channel, id, from));
                    continue;
                }
                Phase::Live { last } => {
                    *last = seq;
                    route.channel.clone()
                }
                Phase::Held { held, refetch } => {
                    if held.len() < MAX_HELD {
                        held.push((seq, prev, msg));
                    } else {
                        *refetch = true;
                    }
                    continue;
                }
            }
        };
        deliver_message(&*shared.deliveries, &channel, seq, &msg);
    }
}

/// After a reconnection: republished messages were lost without a trace while
/// disconnected, so every channel reads what was stored after its last delivered.
fn refetch_all(shared: &Arc<Shared>) {
    let mut routes = shared.routes.lock();
    for (channel, route) in routes.channels.iter_mut() {
        match &mut route.phase {
            Phase::Live { last } => {
                let from = *last;
                route.phase = Phase::Held {
                    held: Vec::new(),
                    refetch: true,
                };
                tokio::spawn(drain(Arc::clone(shared), channel.clone(), route.id, from));
            }
            Phase::Held { refetch, .. } => *refetch = true,
        }
    }
}

/// Opens a channel: reads where its live delivery starts, tells the watchers, then
/// delivers what arrived meanwhile and hands the channel to the subscription's task.
async fn open(
    shared: Arc<Shared>,
    channel: Channel,
    id: u64,
    ready: watch::Sender<Option<Result<(), String>>>,
) {
    let Some(link) = shared.link(&channel) else {
        ready.send_replace(Some(Err("the stream is not available".into())));
        return;
    };
    let last = live_start(&link).await;
    {
        let mut routes = shared.routes.lock();
        match routes.channels.get_mut(&channel) {
            Some(route) if route.id == id => route.opening = None,
            _ => return,
        }
    }
    ready.send_replace(Some(Ok(())));
    drain(shared, channel, id, last).await;
}

/// Delivers what was held for a channel after `last` (repairing from the stream
/// whatever did not arrive or was not held), until nothing is held; then the
/// subscription's task delivers it again.
async fn drain(shared: Arc<Shared>, channel: Channel, id: u64, mut last: u64) {
    let Some(link) = shared.link(&channel) else {
        return;
    };
    loop {
        let (held, refetch) = {
            let mut routes = shared.routes.lock();
            let Some(route) = routes.channels.get_mut(&channel).filter(|r| r.id == id) else {
                return;
            };
            match &mut route.phase {
                Phase::Held { held, refetch } if held.is_empty() && !*refetch => {
                    route.phase = Phase::Live { last };
                    return;
                }
                Phase::Held { held, refetch } => {
                    (std::mem::take(held), std::mem::replace(refetch, false))
                }
                Phase::Live { .. } => return,
            }
        };
        if refetch {
            last = repair(&link, last, u64::MAX).await;
        }
        for (seq, prev, msg) in held {
            if !shared.current(&channel, id) {
                return;
            }
            if seq <= last {
                continue;
            }
            if prev > last {
                repair(&link, last, seq).await;
            }
            deliver_message(&*link.deliveries, &channel, seq, &msg);
            last = seq;
        }
    }
}
