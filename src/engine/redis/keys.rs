//! Names of the Redis keys and pub/sub channels (docs/architecture.md, "Keys and
//! channels"), all under `redis.key_prefix`; user and device ids are
//! percent-encoded where they appear in a key.

/// Key and pub/sub channel names, all under the configured prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

/// Escapes `%` and `:` so a user or device id cannot reach into another key's name.
fn escape(part: &str) -> std::borrow::Cow<'_, str> {
    if part.contains(['%', ':']) {
        part.replace('%', "%25").replace(':', "%3A").into()
    } else {
        part.into()
    }
}

/// The keys of one set of expiring entries: data hash and expiry zset; for
/// channels also per-user counts and the ids in lexicographic order (for pages).
#[derive(Debug, Clone)]
pub struct EntrySet {
    data: String,
    pub(super) exp: String,
    counted: Option<(String, String)>,
}

impl EntrySet {
    pub(super) fn keys(&self) -> Vec<&str> {
        let mut k = vec![self.data.as_str(), self.exp.as_str()];
        if let Some((users, ids)) = &self.counted {
            k.push(users);
            k.push(ids);
        }
        k
    }
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Members of a channel: `presence:{channel}` (+ `:exp`, `:users`, `:ids`).
    pub fn channel_presence(&self, channel: &str) -> EntrySet {
        let data = format!("{}presence:{channel}", self.prefix);
        EntrySet {
            exp: format!("{data}:exp"),
            counted: Some((format!("{data}:users"), format!("{data}:ids"))),
            data,
        }
    }

    /// Connections of a user: `user:{user}` (+ `:exp`).
    pub fn user_connections(&self, user: &str) -> EntrySet {
        let data = format!("{}user:{}", self.prefix, escape(user));
        EntrySet {
            exp: format!("{data}:exp"),
            counted: None,
            data,
        }
    }

    /// The node registry: `nodes` (+ `:exp`).
    pub fn nodes(&self) -> EntrySet {
        let data = format!("{}nodes", self.prefix);
        EntrySet {
            exp: format!("{data}:exp"),
            counted: None,
            data,
        }
    }

    /// `cursor:{user}:{device}`: channel → highest acked seq, `<channel> epoch` → its epoch.
    pub fn cursor(&self, user: &str, device: &str) -> String {
        format!("{}cursor:{}:{}", self.prefix, escape(user), escape(device))
    }

    /// `cursor-generation`: the cursor store's generation (detects lost data).
    pub fn cursor_generation(&self) -> String {
        format!("{}cursor-generation", self.prefix)
    }

    /// `cursor-devices:{user}`: the devices that have cursors.
    pub fn cursor_devices(&self, user: &str) -> String {
        format!("{}cursor-devices:{}", self.prefix, escape(user))
    }

    /// `revoked`: token id → Unix ms until which it is refused.
    pub fn revoked(&self) -> String {
        format!("{}revoked", self.prefix)
    }

    /// Pub/sub channel of cluster commands.
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// Pub/sub channel of join/leave events.
    pub fn join_leave(&self) -> String {
        format!("{}joinleave", self.prefix)
    }
}
