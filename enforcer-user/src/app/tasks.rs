//! The daemon's helper tasks, supervised: each has a name, one that ends
//! while the daemon runs is noticed (the main loop logs it and health
//! reports it), and shutdown cancels them and waits for every one.

use std::{collections::HashMap, future::Future, time::Duration};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long shutdown waits for the tasks to finish before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A task that ended: its name, and how.
pub struct Ended {
    pub name: &'static str,
    pub outcome: Result<(), JoinError>,
}

impl Ended {
    /// What ended the task, for the log.
    pub fn cause(&self) -> String {
        match &self.outcome {
            Ok(()) => "it returned".to_owned(),
            Err(err) if err.is_panic() => "it panicked".to_owned(),
            Err(err) => err.to_string(),
        }
    }
}

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    cancel: CancellationToken,
}

impl Tasks {
    /// Runs `task` until it ends or shutdown begins; then it is dropped at
    /// its next await.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.spawn_until(name, move |_| async move {
            // Ending by cancellation is what shutdown asks for.
            let _ = cancel.run_until_cancelled(task).await;
        });
    }

    /// Runs the task `start` makes, handing it the token that shutdown
    /// cancels: for a task that finishes its work (open HTTP requests, the
    /// enforcer's queue) before it ends.
    pub fn spawn_until<F>(&mut self, name: &'static str, start: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(start(self.cancel.clone()));
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next task to end; `None` when none runs.
    pub async fn next_end(&mut self) -> Option<Ended> {
        let (id, outcome) = match self.set.join_next_with_id().await? {
            Ok((id, ())) => (id, Ok(())),
            Err(err) => (err.id(), Err(err)),
        };
        let name = self.names.remove(&id).unwrap_or("unnamed");
        Some(Ended { name, outcome })
    }

    /// Cancels every task and waits for them all (aborting those that are
    /// still running after [`SHUTDOWN_GRACE`]). Returns the tasks that
    /// panicked meanwhile.
    pub async fn shutdown(mut self, before_join: impl Future<Output = ()>) -> Vec<&'static str> {
        self.cancel.cancel();
        before_join.await;
        let mut panicked = Vec::new();
        let joined = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Some(ended) = self.next_end().await {
                if matches!(&ended.outcome, Err(err) if err.is_panic()) {
                    panicked.push(ended.name);
                }
            }
        })
        .await;
        if joined.is_err() {
            let waiting: Vec<&str> = self.names.values().copied().collect();
            warn!(
                tasks = waiting.join(", "),
                "tasks did not stop within {SHUTDOWN_GRACE:?}: aborting them"
            );
            self.set.shutdown().await;
        }
        panicked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_is_named_and_shutdown_joins_the_rest() {
        let mut tasks = Tasks::default();
        let (stopped, mut told) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("returns", async {});
        // Would run forever: shutdown cancels it and waits for it.
        tasks.spawn("runs", async move {
            let _dropped_at_cancel = stopped;
            std::future::pending::<()>().await;
        });
        let ended = tasks.next_end().await.expect("a task ended");
        assert_eq!(ended.name, "returns");
        assert_eq!(ended.cause(), "it returned");
        assert!(told.try_recv().is_err(), "the other task still runs");
        // A task that finishes its work once cancelled gets to finish it.
        let (finished, mut finished_seen) = tokio::sync::oneshot::channel();
        tasks.spawn_until("graceful", |cancel| async move {
            cancel.cancelled().await;
            let _ = finished.send(());
        });
        let panicked = tasks.shutdown(async {}).await;
        assert!(panicked.is_empty());
        assert!(
            told.try_recv()
                .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(finished_seen.try_recv(), Ok(()));
    }

    #[tokio::test]
    async fn panics_are_noticed_while_running_and_at_shutdown() {
        let mut tasks = Tasks::default();
        tasks.spawn("panics", async { panic!("on purpose") });
        let ended = tasks.next_end().await.expect("a task ended");
        assert_eq!(
            (ended.name, ended.cause().as_str()),
            ("panics", "it panicked")
        );
        tasks.spawn_until("panics at shutdown", |cancel| async move {
            cancel.cancelled().await;
            panic!("on purpose");
        });
        assert_eq!(tasks.shutdown(async {}).await, ["panics at shutdown"]);
    }
}
