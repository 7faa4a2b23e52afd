//! Graceful shutdown: a signal that remembers it fired, and a drain barrier.
//!
//! Phases: `Running` -> `Draining` (SIGTERM: stop accepting, idle sessions get 421,
//! transactions in flight may finish) -> `Forced` (the grace period is over: every
//! session answers 421 and closes). Nothing is lost when a transaction is cut: its
//! client has not been answered 250 and will retry.

use tokio::sync::{mpsc, watch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    Draining,
    Forced,
}

/// Owned by the process; moves the phase forward and waits for sessions to end.
pub struct Shutdown {
    phase: watch::Sender<Phase>,
    drain_tx: Option<mpsc::Sender<()>>,
    drain_rx: mpsc::Receiver<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (phase, _) = watch::channel(Phase::Running);
        let (drain_tx, drain_rx) = mpsc::channel(1);
        Shutdown {
            phase,
            drain_tx: Some(drain_tx),
            drain_rx,
        }
    }

    /// A listener for a new session, holding a drain guard.
    pub fn listener(&self) -> ShutdownListener {
        ShutdownListener {
            phase: self.phase.subscribe(),
            _guard: self.drain_tx.clone(),
        }
    }

    pub fn set(&self, phase: Phase) {
        self.phase.send_if_modified(|current| {
            if phase > *current {
                *current = phase;
                true
            } else {
                false
            }
        });
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Waits until every session (every listener handed out) is gone.
    pub async fn drained(&mut self) {
        self.drain_tx = None;
        while self.drain_rx.recv().await.is_some() {}
    }
}

/// Held by each session (and each accept loop).
#[derive(Clone)]
pub struct ShutdownListener {
    phase: watch::Receiver<Phase>,
    _guard: Option<mpsc::Sender<()>>,
}

impl ShutdownListener {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&mut self, phase: Phase) {
        let _ = self.phase.wait_for(|current| *current >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_listeners() {
        let mut shutdown = Shutdown::new();
        let mut listener = shutdown.listener();
        shutdown.set(Phase::Draining);
        listener.reached(Phase::Draining).await;
        assert_eq!(listener.phase(), Phase::Draining);
        let waiter = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(listener);
        });
        shutdown.drained().await;
        waiter.await.unwrap();
        shutdown.set(Phase::Running);
        assert_eq!(
            shutdown.phase(),
            Phase::Draining,
            "phases only move forward"
        );
    }
}
