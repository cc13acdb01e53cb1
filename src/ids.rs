//! The grammar of the identifiers clients choose that reach a NATS header or a
//! Redis key: `msg_id`, the `device` of a connection and the token's `sub` (channel
//! names have their own grammar in [`crate::channel`]). docs/protocol.md lists them.
//!
//! Each is visible ASCII (`!` to `~`): no spaces, no control characters (a CR or LF
//! in a NATS header value panics the client library), nothing a terminal or a log
//! line could misread.

/// Longest accepted `msg_id`.
pub const MAX_MSG_ID_BYTES: usize = 128;
/// Longest accepted device id.
pub const MAX_DEVICE_BYTES: usize = 128;
/// Longest accepted user id (a token's `sub`): OpenID Connect's limit.
pub const MAX_USER_BYTES: usize = 255;

fn visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a `msg_id`; the error is the reason to answer.
pub fn check_msg_id(id: &str) -> Result<(), String> {
    check("msg_id", id, MAX_MSG_ID_BYTES)
}

/// Checks a device id; the error is the reason to answer.
pub fn check_device(device: &str) -> Result<(), String> {
    check("device", device, MAX_DEVICE_BYTES)
}

fn check(what: &str, s: &str, max: usize) -> Result<(), String> {
    if visible_ascii(s, max) {
        Ok(())
    } else {
        Err(format!(
            "`{what}` must be 1 to {max} bytes of visible ASCII (no spaces or control characters)"
        ))
    }
}

/// Whether `user` is a valid user id (a token's `sub`).
pub fn is_valid_user(user: &str) -> bool {
    visible_ascii(user, MAX_USER_BYTES)
}

/// A node id for a node configured without one (`server.node_id` empty).
pub fn random_node_id() -> String {
    format!("node-{:06x}", fastrand::u32(..0x100_0000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar() {
        assert!(check_msg_id("feed:BTC-USDT:42").is_ok());
        assert!(check_msg_id("8f0c2a3e-1b7d-4c39-9d0e-2f6a1c5b7e90").is_ok());
        assert!(check_msg_id(&"x".repeat(128)).is_ok());
        for bad in ["", "a\rb", "a\nb", "a b", "a\tb", "a\u{7f}", "é", "\0"] {
            assert!(check_msg_id(bad).is_err(), "{bad:?}");
            assert!(check_device(bad).is_err(), "{bad:?}");
            assert!(!is_valid_user(bad), "{bad:?}");
        }
        assert!(check_msg_id(&"x".repeat(129)).is_err());
        assert!(check_device(&"d".repeat(128)).is_ok());
        assert!(check_device(&"d".repeat(129)).is_err());
        assert!(is_valid_user("alice@example.com"));
        assert!(is_valid_user("auth0|5f7c8ec7c33c6c004bbafe82"));
        assert!(is_valid_user(&"u".repeat(255)));
        assert!(!is_valid_user(&"u".repeat(256)));
    }
}
