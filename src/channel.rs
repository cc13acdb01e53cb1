//! Channel names (docs/protocol.md, "Channels"): validation, the namespace, and the NATS-style
//! patterns (`*` one token, `>` the tail) that capabilities grant.

use std::fmt;
use std::sync::Arc;

/// Longest channel name in bytes.
pub const MAX_CHANNEL_BYTES: usize = 200;
const MIN_TOKENS: usize = 2;
const MAX_TOKENS: usize = 16;

/// A validated channel name such as `prices.BTC-USDT`; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidChannel(pub &'static str);

impl fmt::Display for InvalidChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Whether `token` is one non-empty run of `[A-Za-z0-9_-]`.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Channel {
    /// Validates `name` against the channel grammar.
    pub fn parse(name: &str) -> Result<Channel, InvalidChannel> {
        if name.len() > MAX_CHANNEL_BYTES {
            return Err(InvalidChannel("channel name longer than 200 bytes"));
        }
        let mut count = 0;
        for token in name.split('.') {
            count += 1;
            if !is_valid_token(token) {
                return Err(InvalidChannel(
                    "channel tokens must be non-empty and use only A-Z a-z 0-9 _ -",
                ));
            }
        }
        if !(MIN_TOKENS..=MAX_TOKENS).contains(&count) {
            return Err(InvalidChannel("a channel has 2 to 16 dot-separated tokens"));
        }
        Ok(Channel(Arc::from(name)))
    }

    /// The channel name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first token, which selects the namespace options.
    pub fn namespace(&self) -> &str {
        // A valid name has a dot; `split` here cost ~100 instructions a call, and a
        // publication asks four times.
        let end = self
            .0
            .bytes()
            .position(|b| b == b'.')
            .unwrap_or(self.0.len());
        &self.0[..end]
    }
}

// A channel hashes and compares as its name, so maps keyed by channel can be
// looked up by a subject's `&str` without building a `Channel`.
impl std::borrow::Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({})", self.0)
    }
}

/// Whether `pattern` (after `{user}` is replaced by `user`) matches `channel`.
///
/// `*` matches exactly one token and `>` (last only) one or more tokens, as in NATS.
/// `{user}` only matches when the user id is itself a valid token, so a user id
/// containing a dot cannot widen its own grant.
pub fn pattern_matches(pattern: &str, user: &str, channel: &Channel) -> bool {
    let mut names = channel.as_str().split('.');
    let mut patterns = pattern.split('.').peekable();
    while let Some(p) = patterns.next() {
        if p == ">" {
            return patterns.peek().is_none() && names.next().is_some();
        }
        let Some(name) = names.next() else {
            return false;
        };
        let ok = match p {
            "*" => true,
            _ if p.contains("{user}") => is_valid_token(user) && p.replace("{user}", user) == name,
            _ => p == name,
        };
        if !ok {
            return false;
        }
    }
    names.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    #[test]
    fn grammar() {
        assert!(Channel::parse("prices.BTC-USDT").is_ok());
        assert!(Channel::parse("chat.room.42").is_ok());
        assert!(Channel::parse("prices").is_err());
        assert!(Channel::parse("chat..x").is_err());
        assert!(Channel::parse("chat.a b").is_err());
        assert!(Channel::parse("chat.*").is_err());
        assert!(Channel::parse("a.".repeat(16).trim_end_matches('.')).is_ok());
        assert!(Channel::parse("a.".repeat(17).trim_end_matches('.')).is_err());
        assert!(Channel::parse(&format!("chat.{}", "x".repeat(200))).is_err());
        assert_eq!(ch("chat.room.1").namespace(), "chat");
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("chat.room.*", "u", &ch("chat.room.1")));
        assert!(!pattern_matches("chat.room.*", "u", &ch("chat.room.1.x")));
        assert!(pattern_matches("chat.>", "u", &ch("chat.room.1.x")));
        assert!(!pattern_matches("chat.>", "u", &ch("prices.x")));
        assert!(pattern_matches(
            "chat.dm.{user}",
            "alice",
            &ch("chat.dm.alice")
        ));
        assert!(!pattern_matches(
            "chat.dm.{user}",
            "bob",
            &ch("chat.dm.alice")
        ));
        assert!(!pattern_matches(
            "chat.dm.{user}",
            "a.b",
            &ch("chat.dm.a.b")
        ));
        assert!(pattern_matches(
            "prices.BTC-USDT",
            "u",
            &ch("prices.BTC-USDT")
        ));
        assert!(!pattern_matches("prices.BTC", "u", &ch("prices.BTC-USDT")));
    }
}
