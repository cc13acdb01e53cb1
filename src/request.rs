//! The checks a request passes before it reaches the engine, shared by the client
//! protocol (session) and the HTTP API so both refuse the same input with the same
//! code: channel and namespace resolution, publication `data` size and nesting,
//! `msg_id` grammar, and the mapping of engine errors to codes.

use serde_json::value::RawValue;

use crate::channel::Channel;
use crate::config::NamespaceConfig;
use crate::engine::EngineError;
use crate::node::Node;
use crate::protocol::code;

/// A refused request: a stable code from docs/protocol.md and a reason.
#[derive(Debug)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }

    /// The HTTP status the API answers this refusal with.
    pub fn status(&self) -> hyper::StatusCode {
        use hyper::StatusCode as S;
        match self.code {
            code::INTERNAL => S::INTERNAL_SERVER_ERROR,
            code::PERMISSION_DENIED => S::FORBIDDEN,
            code::TOO_LARGE => S::PAYLOAD_TOO_LARGE,
            code::UNAVAILABLE | code::DEGRADED => S::SERVICE_UNAVAILABLE,
            _ => S::BAD_REQUEST,
        }
    }
}

impl From<EngineError> for Refusal {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable(m) => Refusal::new(
                code::UNAVAILABLE,
                format!("temporarily unavailable, retry: {m}"),
            ),
            EngineError::Rejected(m) => Refusal::new(code::BAD_FIELD, m),
            EngineError::Degraded(m) => Refusal::new(
                code::DEGRADED,
                format!("presence and cursors are degraded, retry: {m}"),
            ),
        }
    }
}

/// Resolves a channel name to the channel and its namespace options.
pub fn resolve<'a>(node: &'a Node, name: &str) -> Result<(Channel, &'a NamespaceConfig), Refusal> {
    let channel = Channel::parse(name)
        .map_err(|e| Refusal::new(code::BAD_CHANNEL, format!("invalid channel: {e}")))?;
    let ns = node.namespace(channel.namespace()).ok_or_else(|| {
        Refusal::new(
            code::UNKNOWN_NAMESPACE,
            format!("unknown namespace {:?}", channel.namespace()),
        )
    })?;
    Ok((channel, ns))
}

/// Checks a publication's `data` against the namespace's limits and its `msg_id`
/// against the grammar.
pub fn check_publication(
    ns: &NamespaceConfig,
    data: &RawValue,
    msg_id: Option<&str>,
) -> Result<(), Refusal> {
    if let Some(id) = msg_id {
        crate::ids::check_msg_id(id).map_err(|why| Refusal::new(code::BAD_FIELD, why))?;
    }
    let text = data.get();
    if text.len() > ns.max_data_bytes {
        return Err(Refusal::new(
            code::TOO_LARGE,
            format!("data is larger than {} bytes", ns.max_data_bytes),
        ));
    }
    if nesting_exceeds(text, ns.max_data_depth) {
        return Err(Refusal::new(
            code::TOO_DEEP,
            format!(
                "data is nested deeper than {} arrays or objects",
                ns.max_data_depth
            ),
        ));
    }
    Ok(())
}

/// Checks a presence page cursor (a previous page's `next`, a connection id).
pub fn check_page_token(cursor: &str) -> Result<(), Refusal> {
    if !cursor.is_empty() && cursor.len() <= 256 && cursor.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Refusal::new(
            code::BAD_FIELD,
            "`cursor` must be a previous page's `next`",
        ))
    }
}

/// Whether already-validated JSON text nests arrays and objects deeper than `max`.
///
/// One pass over the bytes, no allocation: the parser already checked the syntax,
/// so only brackets outside strings count.
pub fn nesting_exceeds(json: &str, max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::nesting_exceeds;

    #[test]
    fn nesting() {
        assert!(!nesting_exceeds("1", 0));
        assert!(!nesting_exceeds(r#"{"a":[1,{"b":2}]}"#, 3));
        assert!(nesting_exceeds(r#"{"a":[1,{"b":2}]}"#, 2));
        // Brackets inside strings, and escaped quotes, do not count.
        assert!(!nesting_exceeds(r#"{"a":"[[[[{{{{\"[[["}"#, 1));
        assert!(!nesting_exceeds(r#"[["\\"],["\\\"]]"]]"#, 2));
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(nesting_exceeds(&deep, 64));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(!nesting_exceeds(&ok, 64));
        // Siblings do not add up.
        let wide = format!("[{}]", vec!["[[]]"; 1000].join(","));
        assert!(!nesting_exceeds(&wide, 3));
    }
}
