//! The Lua scripts of the Redis engine (the sources are the `.lua` files beside
//! this one, each with its KEYS and ARGV), loaded once per connection and called
//! by SHA. Scripts that read expiring entries are prefixed with `forget.lua`.

use redis::Pipeline;

const FORGET: &str = include_str!("scripts/forget.lua");
const JOIN: &str = include_str!("scripts/join.lua");
const LEAVE: &str = include_str!("scripts/leave.lua");
const PAGE: &str = include_str!("scripts/page.lua");
const STATS: &str = include_str!("scripts/stats.lua");
const ALL: &str = include_str!("scripts/all.lua");
const CURSOR: &str = include_str!("scripts/cursor.lua");
const GENERATION: &str = include_str!("scripts/generation.lua");

/// The Lua scripts, loaded once per connection and called by SHA.
pub struct Scripts {
    pub(super) join: redis::Script,
    pub(super) leave: redis::Script,
    pub(super) page: redis::Script,
    pub(super) stats: redis::Script,
    pub(super) all: redis::Script,
    pub(super) cursor: redis::Script,
    pub(super) generation: redis::Script,
    /// The sources, for `SCRIPT LOAD` after Redis lost them.
    pub(super) sources: Vec<String>,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let sources: Vec<String> = vec![
            JOIN.to_string(),
            format!("{FORGET}\n{LEAVE}"),
            format!("{FORGET}\n{PAGE}"),
            format!("{FORGET}\n{STATS}"),
            format!("{FORGET}\n{ALL}"),
            CURSOR.to_string(),
            GENERATION.to_string(),
        ];
        let s = |i: usize| redis::Script::new(&sources[i]);
        Scripts {
            join: s(0),
            leave: s(1),
            page: s(2),
            stats: s(3),
            all: s(4),
            cursor: s(5),
            generation: s(6),
            sources,
        }
    }
}

/// Adds an `EVALSHA` of `script` to a pipeline.
pub(super) fn eval<'p>(
    pipe: &'p mut Pipeline,
    script: &redis::Script,
    keys: &[&str],
) -> &'p mut redis::Pipeline {
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
}
