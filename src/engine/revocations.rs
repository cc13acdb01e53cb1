//! Revoked token ids held in memory on every node, so checking a token on
//! connect costs no round trip. The control engines fill it (from the control
//! bus and the shared store); sessions and the API read it through `Control`.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::clock::unix_ms;

/// Revoked token ids held in memory (id → Unix ms until which it is refused), so
/// checking a token on connect costs no round trip.
#[derive(Default)]
pub struct Revocations {
    until: Mutex<HashMap<String, u64>>,
}

impl Revocations {
    /// Refuses `jti` until `until_ms` (the later of two revocations wins); drops expired ones.
    pub fn add(&self, jti: &str, until_ms: u64) {
        self.merge([(jti.to_string(), until_ms)]);
    }

    /// Adds many at once.
    pub fn merge(&self, entries: impl IntoIterator<Item = (String, u64)>) {
        let now = unix_ms();
        let mut map = self.until.lock();
        map.retain(|_, until| *until > now);
        for (jti, until) in entries {
            let e = map.entry(jti).or_insert(until);
            *e = (*e).max(until);
        }
    }

    /// Whether `jti` is refused now.
    pub fn contains(&self, jti: &str) -> bool {
        self.until
            .lock()
            .get(jti)
            .is_some_and(|until| *until > unix_ms())
    }
}
