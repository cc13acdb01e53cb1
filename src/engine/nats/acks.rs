//! JetStream publish acknowledgements for one NATS connection: one wildcard reply
//! subscription, a map from reply token to the publish waiting for it, and the bound
//! on acks in flight (docs/architecture.md, "Publishing").
//!
//! async-nats's `jetstream::Context::publish` does the same with a fresh inbox string,
//! a second timer and an untagged-enum parse that builds a serde error for every
//! successful ack: ~6,000 instructions per publication more (docs/benchmarks.md,
//! "Own publish acks").

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Most publications of one node awaiting their ack; past it a publish waits.
pub const MAX_IN_FLIGHT: usize = 5_000;

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<async_nats::Message>, Tokens>>>;

/// Hashes a token (the node's own counter, so SipHash's resistance to chosen keys
/// buys nothing) with one multiply: two lookups per publication.
#[derive(Default)]
struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type Tokens = BuildHasherDefault<TokenHasher>;

/// Where a node's publications get their acks.
pub struct Acks {
    /// `<inbox>.`: a reply subject is this and a decimal token.
    prefix: String,
    next: AtomicU64,
    waiters: Waiters,
    permits: Arc<Semaphore>,
    listener: tokio::task::JoinHandle<()>,
}

/// What JetStream answered a publication.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Stored (or, `duplicate`, already stored under the same `Nats-Msg-Id`) at `seq`.
    Stored { seq: u64, duplicate: bool },
    /// No stream listens on the subject.
    NoStream,
    /// Refused: JetStream's own description and codes.
    Refused(String),
}

/// One publication's place among the waiting: dropped unanswered, it leaves.
pub struct Waiting {
    token: u64,
    answer: Option<oneshot::Receiver<async_nats::Message>>,
    waiters: Waiters,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(serde::Deserialize)]
struct AckBody<'a> {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(borrow, default)]
    error: Option<AckError<'a>>,
}

#[derive(serde::Deserialize)]
struct AckError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(borrow, default)]
    description: Cow<'a, str>,
}

impl Acks {
    /// Subscribes to the node's ack subjects; the listener routes every reply.
    pub async fn start(client: &async_nats::Client) -> Result<Acks, async_nats::SubscribeError> {
        let prefix = format!("{}.", client.new_inbox());
        let mut replies = client.subscribe(format!("{prefix}*")).await?;
        let waiters: Waiters = Arc::default();
        let routes = Arc::clone(&waiters);
        let skip = prefix.len();
        let listener = tokio::spawn(async move {
            while let Some(m) = replies.next().await {
                let token = m.subject.get(skip..).and_then(|t| t.parse::<u64>().ok());
                // An answer nobody waits for any more (timed out) is dropped.
                if let Some(tx) = token.and_then(|t| routes.lock().remove(&t)) {
                    let _ = tx.send(m);
                }
            }
        });
        Ok(Acks {
            prefix,
            next: AtomicU64::new(0),
            waiters,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            listener,
        })
    }

    /// Waits for room among the acks in flight, then takes a reply subject for one
    /// publication: publish with it, then await [`Waiting::answer`].
    pub async fn wait_turn(&self) -> (async_nats::Subject, Waiting) {
        // The semaphore is never closed, so `ok()` never drops the bound.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(token, tx);
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        reply.push_str(itoa::Buffer::new().format(token));
        let waiting = Waiting {
            token,
            answer: Some(rx),
            waiters: Arc::clone(&self.waiters),
            _permit: permit,
        };
        (reply.into(), waiting)
    }
}

impl Acks {
    /// Publications registered and not yet answered or given up.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().len()
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Waiting {
    /// JetStream's answer; `None` if the connection went before it came.
    pub async fn answer(mut self) -> Option<Answer> {
        // Awaited in place: a wait cut short (the caller's timeout) still leaves
        // through `drop`.
        let m = self.answer.as_mut()?.await.ok()?;
        self.answer = None;
        Some(parse(&m))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Unanswered (timed out, or the publish failed): nobody will take the reply.
        if self.answer.is_some() {
            self.waiters.lock().remove(&self.token);
        }
    }
}

/// Reads JetStream's reply to a publication.
fn parse(m: &async_nats::Message) -> Answer {
    if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Answer::NoStream;
    }
    match serde_json::from_slice::<AckBody>(&m.payload) {
        Ok(AckBody {
            error: None,
            seq,
            duplicate,
        }) if seq > 0 => Answer::Stored { seq, duplicate },
        Ok(AckBody { error: Some(e), .. }) => Answer::Refused(format!(
            "{} (code {}, err_code {})",
            e.description, e.code, e.err_code
        )),
        Ok(_) => Answer::Refused("an acknowledgement without a sequence".into()),
        Err(e) => Answer::Refused(format!("an unreadable acknowledgement: {e}")),
    }
}
