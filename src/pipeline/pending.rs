//! A check started early (iprev at connect, SPF at HELO and MAIL) that runs while the
//! client keeps talking, and is awaited only when its result is needed.

use tokio::task::JoinHandle;

pub struct Pending<T> {
    state: State<T>,
}

enum State<T> {
    Running(JoinHandle<T>),
    Done(T),
    /// The task panicked or was cancelled.
    Lost,
}

impl<T: Send + 'static> Pending<T> {
    pub fn spawn(future: impl Future<Output = T> + Send + 'static) -> Self {
        // Boxed, so that the task's own allocation is the size of the result once the
        // check is done: an idle session keeps its finished checks until MAIL, and a
        // DNS look-up's state is kilobytes.
        Pending {
            state: State::Running(tokio::spawn(Box::pin(future))),
        }
    }

    /// The result, waiting for it the first time. `None` if the check died, which the
    /// caller must treat as a temporary error (nothing is certain about it).
    pub async fn get(&mut self) -> Option<&T> {
        if let State::Running(handle) = &mut self.state {
            self.state = match handle.await {
                Ok(value) => State::Done(value),
                Err(err) => {
                    tracing::error!(error = %err, "an authentication check failed");
                    State::Lost
                }
            };
        }
        match &self.state {
            State::Done(value) => Some(value),
            _ => None,
        }
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if let State::Running(handle) = &self.state {
            handle.abort();
        }
    }
}
