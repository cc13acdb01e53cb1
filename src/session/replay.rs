//! Catching a subscription up from history: the pages after the first, read one
//! at a time as the client drains them, until the replay reaches what live
//! delivery has seen and the subscription switches to live
//! (docs/architecture.md, "Replay").
//!
//! A replaying client's memory is one page, whatever `max_replay` is, and live
//! publications that arrive meanwhile are not buffered: they are in the stream,
//! and the replay reads on until it has passed them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{Broker, PageLimit};
use crate::hub::{Progress, Subscription};
use crate::protocol::close;

/// Longest pause between reads when history has not yet caught up with what
/// live delivery showed (a replica a moment behind), and between failed reads.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Reads the rest of a replay into `sub`'s outbox and switches it to live.
/// `remaining`: what the first page said follows it (0: it reached the end of
/// what was stored). A backbone that fails every read for `retry_for` closes the
/// connection with 1013.
pub async fn catch_up(
    broker: Arc<dyn Broker>,
    sub: Arc<Subscription>,
    limit: PageLimit,
    remaining: u64,
    retry_for: Duration,
) {
    let mut at_end = remaining == 0;
    let outbox = Arc::clone(&sub.outbox);
    // A long catch-up reads through the engine's replay reader when it has one.
    let mut reader = broker.replay_reader(&sub.channel, remaining);
    let mut pause = Duration::ZERO;
    let mut failing_since: Option<Instant> = None;
    loop {
        let after = if at_end {
            match sub.try_go_live() {
                Progress::Live | Progress::Cancelled => return,
                Progress::Behind { after } => after,
            }
        } else {
            sub.last_seq()
        };
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        if !outbox.replay_room().await {
            return;
        }
        let read = match reader.as_mut() {
            Some(r) => match r.next_page(after, limit).await {
                Ok(page) => Ok(page),
                Err(e) => {
                    // E.g. the account's consumer limit: go on with plain reads.
                    tracing::debug!(channel = %sub.channel, error = %e, "replay reader failed; reading pages directly");
                    reader = None;
                    broker.history_after(&sub.channel, after, limit).await
                }
            },
            None => broker.history_after(&sub.channel, after, limit).await,
        };
        match read {
            // Conflated: what was dropped is superseded by what follows; read on.
            Ok(page) if page.lost && !sub.is_conflated() => {
                let why = "slow consumer: the replay fell behind the channel's retained history";
                outbox.close(close::SLOW_CONSUMER, why, true);
                return;
            }
            Ok(page) => {
                failing_since = None;
                let moved = page.publications.last().is_some_and(|p| p.seq > after);
                if !sub.replay(&page.publications) {
                    return;
                }
                at_end = page.remaining == 0;
                // Live showed publications that history does not hold yet: read again
                // shortly rather than spin.
                pause = if at_end && !moved {
                    (pause * 2).clamp(Duration::from_millis(1), MAX_PAUSE)
                } else {
                    Duration::ZERO
                };
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= retry_for {
                    tracing::warn!(channel = %sub.channel, error = %e, "replay abandoned");
                    let why = "replay interrupted: backbone unavailable; resubscribe with since";
                    outbox.close(close::TRY_AGAIN_LATER, why, true);
                    return;
                }
                tracing::debug!(channel = %sub.channel, error = %e, "replay page failed; retrying");
                pause = (pause * 2).clamp(Duration::from_millis(50), MAX_PAUSE);
            }
        }
    }
}
