//! `server.allowed_origins`: which browser origins may open a WebSocket.
//!
//! A browser sends `Origin` on every WebSocket handshake and lets any page open a
//! socket to any host, with the user's cookies; the check stops other sites from
//! using a logged-in user's connection. Clients that are not browsers send no
//! `Origin` and are not affected.

/// One allowed origin: `scheme://host[:port]`, the host optionally `*.` + a domain.
#[derive(Debug, Clone)]
pub struct Pattern {
    scheme: String,
    /// With a wildcard: the domain after `*.`, which the host must end with.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// An origin split into its parts, lowercased.
fn split(origin: &str) -> Option<(String, String, Option<u16>)> {
    let origin = origin.to_ascii_lowercase();
    let (scheme, rest) = origin.split_once("://")?;
    if scheme.is_empty() || rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return None;
    }
    // An IPv6 host is bracketed and has colons of its own.
    let split_at = match rest.find(']') {
        Some(end) if rest.starts_with('[') => rest[end..].find(':').map(|i| end + i),
        _ => rest.rfind(':'),
    };
    let (host, port) = match split_at {
        Some(i) => (&rest[..i], Some(rest[i + 1..].parse::<u16>().ok()?)),
        None => (rest, None),
    };
    if host.is_empty() {
        return None;
    }
    Some((scheme.to_string(), host.to_string(), port))
}

impl Pattern {
    /// Parses one entry of `server.allowed_origins`.
    pub fn parse(entry: &str) -> Result<Pattern, String> {
        let bad = || {
            format!("{entry:?} is not an origin: write scheme://host[:port], the host optionally starting with *.")
        };
        let (scheme, host, port) = split(entry).ok_or_else(bad)?;
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                (domain.to_string(), true)
            }
            Some(_) => return Err(bad()),
            None if host.contains('*') => return Err(bad()),
            None => (host, false),
        };
        Ok(Pattern {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    fn matches(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let host_ok = if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        };
        scheme == self.scheme && host_ok && port == self.port
    }
}

/// The configured origins; empty allows every origin.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Vec<Pattern>);

impl AllowedOrigins {
    /// Parses `server.allowed_origins`.
    pub fn parse(entries: &[String]) -> Result<AllowedOrigins, String> {
        entries
            .iter()
            .map(|e| Pattern::parse(e))
            .collect::<Result<Vec<_>, _>>()
            .map(AllowedOrigins)
    }

    /// Whether a handshake with this `Origin` header (absent for non-browsers) may proceed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let Some(origin) = origin else {
            return true;
        };
        match split(origin) {
            Some((scheme, host, port)) => self.0.iter().any(|p| p.matches(&scheme, &host, port)),
            // `null` (sandboxed frames, file: pages) and anything unparsable.
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> AllowedOrigins {
        AllowedOrigins::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn matching() {
        let a = allowed(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:8000",
        ]);
        assert!(a.allows(Some("https://app.example.com")));
        assert!(a.allows(Some("HTTPS://App.Example.com")));
        assert!(!a.allows(Some("http://app.example.com")));
        assert!(!a.allows(Some("https://app.example.com:8443")));
        assert!(!a.allows(Some("https://evil-app.example.com")));
        assert!(a.allows(Some("https://a.example.org")));
        assert!(a.allows(Some("https://a.b.example.org")));
        assert!(!a.allows(Some("https://example.org")));
        assert!(!a.allows(Some("https://evilexample.org")));
        assert!(a.allows(Some("http://localhost:8000")));
        assert!(!a.allows(Some("http://localhost:8001")));
        assert!(!a.allows(Some("null")));
        assert!(a.allows(None), "non-browser clients send no Origin");
        assert!(AllowedOrigins::default().allows(Some("https://anything.test")));
        let v6 = allowed(&["http://[::1]:8000"]);
        assert!(v6.allows(Some("http://[::1]:8000")));
        assert!(!v6.allows(Some("http://[::1]")));
    }

    #[test]
    fn bad_entries() {
        for bad in [
            "example.com",
            "https://",
            "https://a.com/path",
            "https://*.",
            "https://a.*.com",
            "https://a.com:x",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
