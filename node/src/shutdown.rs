//! Staged shutdown signal shared by every task of a node: `Draining` stops accepting new
//! work, `Stopped` ends what is left (upgraded connections get their close frames first).

use tokio::sync::watch;

/// Phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Stopped,
}

/// Receiver side, cloned into every task.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<Phase>);

/// Sender side, owned by the `node` module.
#[derive(Debug)]
pub struct Trigger(watch::Sender<Phase>);

/// A new signal in the `Running` phase.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Phase::Running);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Moves to `phase` (never backwards).
    pub fn advance(&self, phase: Phase) {
        self.0.send_if_modified(|p| (*p < phase).then(|| *p = phase).is_some());
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Resolves once the node stops accepting new work.
    pub async fn wait(&mut self) {
        self.wait_for(Phase::Draining).await;
    }

    /// Resolves once `phase` is reached (or the trigger is gone).
    pub async fn wait_for(&mut self, phase: Phase) {
        let _ = self.0.wait_for(|p| *p >= phase).await;
    }

    pub fn phase(&self) -> Phase {
        *self.0.borrow()
    }
}
