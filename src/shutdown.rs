//! The node's drain signal, threaded through every task that must react to it.

use tokio::sync::watch;

/// Broadcasts "start draining" once; cheap to clone into every task.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            tx: watch::Sender::new(false),
        }
    }
}

impl Shutdown {
    /// Starts draining; later calls do nothing.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once draining has started.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}
