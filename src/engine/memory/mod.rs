//! The in-process engine for a single node, split like the cluster engines:
//! broker (sequence, history, dedupe), presence, cursors and control.

mod broker;
mod control;
mod cursors;
mod presence;

pub use broker::MemoryBroker;
pub use control::MemoryControl;
pub use cursors::MemoryCursors;
pub use presence::MemoryPresence;
