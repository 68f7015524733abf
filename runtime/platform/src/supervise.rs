//! Parts of a process that must run until it stops: a server, a writer, a background loop.
//!
//! If one ends without a stop having been asked for (a server that failed, a loop that
//! panicked), the process stops as a whole and exits non-zero, so that Kubernetes restarts it.
//! Otherwise it would look healthy while serving one listener of two, or while a loop it relies
//! on (a lease keeper, an evidence publisher) is dead, and nothing would restart it.
//!
//! The stop is a `watch` channel: `true` asks every part to stop (a drain), and a part that ends
//! unasked sends it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinHandle};
use tracing::error;

/// Awaits `task`; if it ended while `stop` was still `false`, logs it at ERROR and sends `true`.
pub async fn stop_all_if_it_ends_unasked<R: std::fmt::Debug>(
    what: &'static str,
    task: impl Future<Output = R>,
    stop: watch::Sender<bool>,
) -> R {
    let ended = task.await;
    if !*stop.borrow() {
        error!(task = what, result = ?ended, "a part of the process ended on its own; stopping the process");
        let _ = stop.send(true);
    }
    ended
}

/// Spawns `task` under [`stop_all_if_it_ends_unasked`]. Spawned on its own, so that a panic in
/// it is caught (as `Err`) and stops the process instead of silently ending the task.
pub fn spawn_supervised<T>(
    what: &'static str,
    task: impl Future<Output = T> + Send + 'static,
    stop: &watch::Sender<bool>,
) -> Supervised<T>
where
    T: std::fmt::Debug + Send + 'static,
{
    let task = tokio::spawn(task);
    let abort = task.abort_handle();
    Supervised {
        ended: tokio::spawn(stop_all_if_it_ends_unasked(what, task, stop.clone())),
        abort,
    }
}

/// A task spawned by [`spawn_supervised`]. As a future it resolves when the task ended: its
/// output, or `Err` if it panicked or was aborted.
#[derive(Debug)]
pub struct Supervised<T> {
    ended: JoinHandle<Result<T, JoinError>>,
    abort: AbortHandle,
}

impl<T> Supervised<T> {
    /// Aborts the task itself (its supervisor then ends too).
    pub fn abort(&self) {
        self.abort.abort();
    }

    /// A handle that aborts the task itself.
    #[must_use]
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl<T> Future for Supervised<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The supervisor never panics and is never aborted; if it were, its error stands in.
        Pin::new(&mut self.ended).poll(cx).map(Result::flatten)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_part_that_ends_unasked_stops_the_process() {
        let (stop, stopped) = watch::channel(false);
        stop_all_if_it_ends_unasked("gRPC server", async {}, stop).await;
        assert!(
            *stopped.borrow(),
            "the other parts drain and the process exits"
        );
    }

    #[tokio::test]
    async fn a_task_that_panics_stops_the_process() {
        let (stop, stopped) = watch::channel(false);
        let ended =
            spawn_supervised("writer", async { panic!("a bug in the writer") }, &stop).await;
        assert!(ended.unwrap_err().is_panic());
        assert!(*stopped.borrow(), "the servers drain and the process exits");
    }

    #[tokio::test]
    async fn a_part_that_runs_on_does_not_stop_the_process() {
        let (stop, stopped) = watch::channel(false);
        let supervised = spawn_supervised("background task", std::future::pending::<()>(), &stop);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!*stopped.borrow());
        supervised.abort();
        assert!(supervised.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn a_part_that_ends_after_the_stop_was_asked_for_is_not_a_failure() {
        let (stop, mut stopped) = watch::channel(false);
        let mut asked = stopped.clone();
        let supervised = spawn_supervised(
            "lease keeper",
            async move {
                let _ = asked.wait_for(|s| *s).await;
                "drained"
            },
            &stop,
        );
        stop.send(true).unwrap();
        stopped.borrow_and_update();
        assert_eq!(supervised.await.unwrap(), "drained");
        // The stop stays the one that was asked for; nothing sent it again.
        assert!(!stopped.has_changed().unwrap());
    }
}
