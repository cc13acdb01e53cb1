//! The commands a client sends once connected: subscribe (with its replay),
//! unsubscribe, publish, ack, history, presence and refresh
//! (docs/protocol.md, "Client → server"). Each validates through
//! [`crate::request`] and answers with a reply or a refusal.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use tracing::Instrument;

use super::{replay, Outcome, Session};
use crate::auth::Permission;
use crate::channel::Channel;
use crate::clock::unix_ms;
use crate::config::NamespaceConfig;
use crate::engine::{
    AckedSeq, ClientInfo, CursorRead, HistoryFrom, JoinLeave, PageLimit, Position, PublicationList,
    PublishRequest,
};
use crate::hub::{Progress, Subscription};
use crate::protocol::{self, code};
use crate::request::{self, Refusal};

#[derive(Serialize)]
struct Refreshed {
    expires_at: u64,
}

#[derive(Serialize)]
struct HistoryReply<'a> {
    channel: &'a str,
    publications: PublicationList<'a>,
    position: Position,
}

#[derive(Serialize)]
struct PresenceReply<'a> {
    channel: &'a str,
    clients: Vec<ClientInfo>,
    /// Cursor of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// Most publications in the first page of a replay (the one sent with the reply).
const FIRST_PAGE: usize = 64;

impl Session {
    fn require(&self, ns: &NamespaceConfig, perm: Permission, channel: &Channel) -> Outcome {
        if ns.allow.contains(&perm) || self.identity.granted(perm, channel) {
            Ok(())
        } else {
            Err(Refusal::new(
                code::PERMISSION_DENIED,
                format!("permission denied: {} on {channel}", perm_name(perm)),
            ))
        }
    }

    pub(super) async fn subscribe(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        since: Option<Position>,
        snapshot: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::Sub, &channel)?;
        if self.subs.contains_key(&channel) {
            return Err(Refusal::new(
                code::ALREADY_SUBSCRIBED,
                format!("already subscribed to {channel}"),
            ));
        }
        if self.subs.len() >= self.node.config.session.max_subscriptions {
            return Err(Refusal::new(
                code::TOO_MANY_SUBSCRIPTIONS,
                format!(
                    "at most {} subscriptions per connection",
                    self.node.config.session.max_subscriptions
                ),
            ));
        }
        let engine = &node.engine;
        // What the client already has: an explicit position, else its stored cursor
        // (with the stream epoch it was acked in, it is exactly a `since`).
        let mut cursor_lost = false;
        let from_cursor = since.is_none() && ns.acked;
        let resume = match since {
            Some(p) => Some(Resume::Position(p)),
            None if ns.acked => match engine
                .cursors
                .get(&self.identity.user, &self.device, &channel)
                .await?
            {
                CursorRead::Found(AckedSeq {
                    seq,
                    epoch: Some(epoch),
                }) => Some(Resume::Position(Position {
                    seq,
                    epoch: epoch.to_string(),
                })),
                CursorRead::Found(AckedSeq { seq, epoch: None }) => Some(Resume::Cursor(seq)),
                CursorRead::Absent => None,
                CursorRead::Lost => {
                    cursor_lost = true;
                    None
                }
            },
            None => None,
        };
        let stored_cursor = from_cursor.then_some(resume.is_some());
        let snapshot = snapshot.unwrap_or(ns.default_snapshot).min(ns.history_size);
        let from = match &resume {
            Some(Resume::Position(p)) => HistoryFrom::After(p.clone()),
            Some(Resume::Cursor(seq)) => HistoryFrom::Cursor(*seq),
            None => HistoryFrom::Latest(snapshot),
        };

        let conflated = ns.conflate.then(|| node.hub.conflation_counter());
        let sub = Subscription::new(channel.clone(), Arc::clone(&self.link.outbox), conflated);
        node.hub.add(Arc::clone(&sub));
        if let Err(e) = engine.broker.watch(&channel).await {
            self.drop_from_hub(&sub);
            return Err(e.into());
        }
        // The first page now, the rest as the client reads (docs/architecture.md, "Replay").
        let page_limit = self.link.outbox.replay_page();
        // A short first page: the reply goes out sooner, most resumes fit in it, and
        // the engine streams a longer rest more cheaply (`Broker::replay_reader`).
        let first_page = PageLimit {
            messages: page_limit.messages.min(FIRST_PAGE),
            ..page_limit
        };
        let page = match engine
            .broker
            .history(&channel, from, ns.max_replay, first_page)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                self.drop_from_hub(&sub);
                engine.broker.unwatch(&channel);
                return Err(e.into());
            }
        };
        let after = match &resume {
            Some(Resume::Position(p)) if p.epoch == page.position.epoch => p.seq,
            Some(Resume::Position(_)) => 0,
            Some(Resume::Cursor(seq)) => *seq,
            None if snapshot > 0 => 0,
            None => page.position.seq,
        };
        // A lost cursor may have pointed anywhere: nothing can be proven recovered.
        let recovered = if resume.is_none() {
            !cursor_lost
        } else {
            page.complete
        };
        let replayed =
            page.publications.iter().filter(|p| p.seq > after).count() as u64 + page.remaining;
        let series = crate::metrics::get().delivering(channel.namespace());
        series.replay_size.record(replayed as f64);
        if !recovered {
            series.unrecovered.increment(1);
        }
        let span = tracing::Span::current();
        span.record("replayed", crate::telemetry::int(replayed));
        span.record("recovered", recovered);
        let reply = protocol::reply(
            "subscribed",
            id,
            protocol::Subscribed {
                channel: channel.as_str(),
                position: page.position.clone(),
                recovered,
                replayed,
                stored_cursor,
            },
        );
        let catch_up = if sub.begin(reply, &page.publications, after)
            && (page.remaining > 0 || sub.try_go_live() != Progress::Live)
        {
            let task = replay::catch_up(
                Arc::clone(&engine.broker),
                Arc::clone(&sub),
                page_limit,
                page.remaining,
                node.config.session.replay_retry_for,
            );
            // A child of the subscribe span: the rest of the replay, however long it takes.
            let replay = tracing::info_span!("replay", channel = %channel, remaining = crate::telemetry::int(page.remaining));
            Some(tokio::spawn(task.instrument(replay)))
        } else {
            None
        };
        let epoch = node.epoch(&page.position.epoch);
        self.subs.insert(
            channel.clone(),
            Joined {
                sub,
                epoch,
                catch_up,
            },
        );
        if ns.presence {
            self.join_presence(&channel, ns).await;
        }
        Ok(())
    }

    fn drop_from_hub(&self, sub: &Arc<Subscription>) {
        sub.cancel();
        self.node.hub.remove(&sub.channel, sub.id);
    }

    async fn join_presence(&self, channel: &Channel, ns: &NamespaceConfig) {
        let info = self.client_info(unix_ms());
        if let Err(e) = self.node.engine.presence.join(channel, info).await {
            tracing::warn!(error = %e, %channel, "presence join failed");
        }
        if ns.join_leave {
            self.announce("join", channel);
        }
    }

    fn announce(&self, kind: &str, channel: &Channel) {
        self.node.engine.control.announce(JoinLeave {
            kind: kind.to_string(),
            channel: channel.to_string(),
            user: self.identity.user.to_string(),
            device: self.device.to_string(),
        });
    }

    pub(super) async fn end_subscription(&self, joined: Joined) {
        if let Some(task) = &joined.catch_up {
            task.abort();
        }
        let sub = &joined.sub;
        self.drop_from_hub(sub);
        self.node.engine.broker.unwatch(&sub.channel);
        if let Some(ns) = self.node.namespace(sub.channel.namespace()) {
            if ns.presence {
                if let Err(e) = self
                    .node
                    .engine
                    .presence
                    .leave(&sub.channel, &self.conn_id)
                    .await
                {
                    tracing::warn!(error = %e, channel = %sub.channel, "presence leave failed");
                }
                if ns.join_leave {
                    self.announce("leave", &sub.channel);
                }
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, id: Option<&RawValue>, name: &str) -> Outcome {
        let channel = Channel::parse(name)
            .map_err(|e| Refusal::new(code::BAD_CHANNEL, format!("invalid channel: {e}")))?;
        let Some(joined) = self.subs.remove(&channel) else {
            return Err(Refusal::new(
                code::NOT_SUBSCRIBED,
                format!("not subscribed to {channel}"),
            ));
        };
        self.end_subscription(joined).await;
        self.link.outbox.push_reply(protocol::reply(
            "unsubscribed",
            id,
            protocol::ChannelOnly {
                channel: channel.as_str(),
            },
        ));
        Ok(())
    }

    /// Sends a publish and queues its reply in the pipeline: the reply comes once
    /// JetStream acknowledged it, after the replies of every earlier publish.
    pub(super) async fn publish(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        data: Box<RawValue>,
        msg_id: Option<String>,
        traceparent: Option<&str>,
    ) {
        let reply = match self.send_publish(name, data, msg_id, traceparent).await {
            Ok(ack) => {
                let id: Option<Box<RawValue>> = id.map(ToOwned::to_owned);
                Box::pin(async move {
                    let (channel, outcome) = ack.await;
                    match outcome {
                        Ok(p) => protocol::reply(
                            "published",
                            id.as_deref(),
                            protocol::PublishedReply {
                                channel: channel.as_str(),
                                seq: p.seq,
                                duplicate: p.duplicate,
                            },
                        ),
                        Err(f) => protocol::error_message(id.as_deref(), f.code, &f.reason),
                    }
                }) as crate::engine::BoxFuture<'static, bytes::Bytes>
            }
            Err(f) => {
                let frame = protocol::error_message(id, f.code, &f.reason);
                Box::pin(std::future::ready(frame))
            }
        };
        self.pipeline
            .get_or_insert_with(Default::default)
            .push(reply);
    }

    /// Checks and sends one publish; the future resolves to its channel and outcome.
    async fn send_publish(
        &mut self,
        name: &str,
        data: Box<RawValue>,
        msg_id: Option<String>,
        traceparent: Option<&str>,
    ) -> Result<
        crate::engine::BoxFuture<'static, (Channel, Result<crate::engine::Published, Refusal>)>,
        Refusal,
    > {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::Pub, &channel)?;
        if !ns.client_publish {
            return Err(Refusal::new(
                code::PUBLISH_DISABLED,
                format!(
                    "clients cannot publish in namespace {:?}",
                    channel.namespace()
                ),
            ));
        }
        request::check_publication(ns, &data, msg_id.as_deref())?;
        let span = tracing::info_span!(
            "publish",
            channel = %channel,
            namespace = channel.namespace(),
            user = %self.identity.user,
            seq = tracing::field::Empty,
            duplicate = tracing::field::Empty,
        );
        let caller_trace = traceparent.map(|t| crate::telemetry::remote_parent(Some(t), None));
        if let Some(cx) = &caller_trace {
            let _ = span.set_parent(cx.clone());
        }
        let series = crate::metrics::get().publishing(channel.namespace());
        let sent = self
            .node
            .engine
            .broker
            .publish_ordered(PublishRequest {
                channel: channel.clone(),
                data,
                from: Some(Arc::clone(&self.identity.user)),
                msg_id,
                caller_trace,
            })
            .instrument(span.clone())
            .await;
        let ack = match sent {
            Ok(ack) => ack,
            Err(e) => {
                series.outcome(
                    crate::metrics::Source::Client,
                    &Err::<crate::engine::Published, _>(&e),
                );
                return Err(e.into());
            }
        };
        Ok(Box::pin(
            async move {
                let outcome = ack.await;
                series.outcome(crate::metrics::Source::Client, &outcome);
                if let Ok(p) = &outcome {
                    let span = tracing::Span::current();
                    span.record("seq", crate::telemetry::int(p.seq));
                    span.record("duplicate", p.duplicate);
                }
                (channel, outcome.map_err(Refusal::from))
            }
            .instrument(span),
        ))
    }

    pub(super) async fn ack(&mut self, name: &str, seq: u64) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        if !ns.acked {
            return Err(Refusal::new(
                code::NOT_ENABLED,
                format!("namespace {:?} has no acked cursors", channel.namespace()),
            ));
        }
        self.require(ns, Permission::Sub, &channel)?;
        // The incarnation the client's seqs come from: its subscription's.
        let epoch = self.subs.get(&channel).map(|j| Arc::clone(&j.epoch));
        self.node
            .engine
            .cursors
            .ack(
                &self.identity.user,
                &self.device,
                &channel,
                AckedSeq { seq, epoch },
            )
            .await?;
        if !self.acked {
            self.acked = true;
            self.link.unsettle();
        }
        Ok(())
    }

    pub(super) async fn history(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        since: Option<Position>,
        limit: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        self.require(ns, Permission::History, &channel)?;
        let limit = limit.unwrap_or(ns.max_replay).clamp(1, ns.max_replay);
        let from = match since {
            Some(p) => HistoryFrom::After(p),
            None => HistoryFrom::Latest(limit),
        };
        let page = self
            .node
            .engine
            .broker
            .history(&channel, from, limit, PageLimit::messages(limit))
            .await?;
        tracing::Span::current().record("count", crate::telemetry::int(page.publications.len()));
        self.link.outbox.push_reply(protocol::reply(
            "history",
            id,
            HistoryReply {
                channel: channel.as_str(),
                publications: PublicationList(&page.publications),
                position: page.position,
            },
        ));
        Ok(())
    }

    pub(super) async fn presence(
        &mut self,
        id: Option<&RawValue>,
        name: &str,
        cursor: Option<String>,
        limit: Option<usize>,
    ) -> Outcome {
        let node = Arc::clone(&self.node);
        let (channel, ns) = request::resolve(&node, name)?;
        if !ns.presence {
            return Err(Refusal::new(
                code::NOT_ENABLED,
                format!("namespace {:?} has no presence", channel.namespace()),
            ));
        }
        self.require(ns, Permission::Presence, &channel)?;
        if let Some(c) = &cursor {
            request::check_page_token(c)?;
        }
        let max = self.node.config.presence_page_max();
        let limit = limit.unwrap_or(max).clamp(1, max);
        let page = self
            .node
            .engine
            .presence
            .page(&channel, cursor.as_deref(), limit)
            .await?;
        self.link.outbox.push_reply(protocol::reply(
            "presence",
            id,
            PresenceReply {
                channel: channel.as_str(),
                clients: page.clients,
                next: page.next,
            },
        ));
        Ok(())
    }

    pub(super) fn refresh(&mut self, id: Option<&RawValue>, token: &str) -> Outcome {
        let identity =
            self.node.verifier.verify(token).map_err(|e| {
                Refusal::new(code::BAD_TOKEN, format!("refresh refused: {}", e.reason))
            })?;
        if identity.user != self.identity.user {
            return Err(Refusal::new(
                code::BAD_TOKEN,
                "refresh refused: token is for another user",
            ));
        }
        if let Some(jti) = identity.jti.as_deref() {
            if self.node.engine.control.is_revoked(jti) {
                return Err(Refusal::new(
                    code::BAD_TOKEN,
                    "refresh refused: token revoked",
                ));
            }
        }
        self.node
            .connections
            .set_token(&self.identity.user, &self.conn_id, identity.jti.clone());
        self.link
            .expires_at
            .store(identity.expires_at, Ordering::Relaxed);
        self.link.expiring_sent.store(false, Ordering::Relaxed);
        let expires_at = identity.expires_at;
        self.identity = identity;
        self.link
            .outbox
            .push_reply(protocol::reply("refreshed", id, Refreshed { expires_at }));
        Ok(())
    }
}

enum Resume {
    Position(Position),
    /// A stored cursor without its epoch (acked on a channel the connection was not
    /// subscribed to): taken to be in the current incarnation.
    Cursor(u64),
}

/// One of the connection's subscriptions, with the stream incarnation it follows
/// (acks on the channel are recorded in it).
pub(super) struct Joined {
    sub: Arc<Subscription>,
    pub(super) epoch: Arc<str>,
    /// The task reading the rest of the replay, while there is one.
    catch_up: Option<tokio::task::JoinHandle<()>>,
}

fn perm_name(p: Permission) -> &'static str {
    match p {
        Permission::Sub => "sub",
        Permission::Pub => "pub",
        Permission::History => "history",
        Permission::Presence => "presence",
    }
}
