//! Long-polls: wake requests waiting for a job as soon as it finishes.
//!
//! The worker announces each finished job with `pg_notify` in the same statement that
//! records its result; one listener connection per API process fans the notices out
//! to the waiting requests. Waiters re-read the job from the database afterwards, so a
//! missed notice only costs the rest of the wait, never a wrong answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sea_orm::DatabaseConnection;
use spool_shared::db;
use spool_shared::job::JOB_DONE_CHANNEL;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Clone, Default)]
pub struct CompletionWaiters {
    waiting: Arc<Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>>,
}

/// One request's interest in one job. Awaiting it ends when the job finishes (or when
/// the listener reconnects and cannot know what it missed). Dropping it, however the
/// request ends (answered, timed out, refused, disconnected), takes its entry out of the
/// map: otherwise waits for jobs that never finish (a wrong id) would pile up there.
pub struct Waiter {
    waiters: CompletionWaiters,
    job_id: Uuid,
    finished: Option<oneshot::Receiver<()>>,
}

impl Waiter {
    pub async fn finished(&mut self) {
        if let Some(finished) = self.finished.as_mut() {
            let _ = finished.await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        drop(self.finished.take()); // closes this waiter's sender, which `forget` looks for
        self.waiters.forget(self.job_id);
    }
}

impl CompletionWaiters {
    /// Registers interest in one job, until the returned waiter is dropped.
    pub fn subscribe(&self, job_id: Uuid) -> Waiter {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(job_id).or_default().push(tx);
        Waiter { waiters: self.clone(), job_id, finished: Some(rx) }
    }

    #[cfg(test)]
    fn jobs_waited_on(&self) -> usize {
        self.lock().len()
    }

    /// Drops the senders of waiters that gave up.
    fn forget(&self, job_id: Uuid) {
        let mut waiting = self.lock();
        if let Some(senders) = waiting.get_mut(&job_id) {
            senders.retain(|s| !s.is_closed());
            if senders.is_empty() {
                waiting.remove(&job_id);
            }
        }
    }

    fn wake(&self, job_id: Uuid) {
        if let Some(senders) = self.lock().remove(&job_id) {
            for sender in senders {
                let _ = sender.send(());
            }
        }
    }

    fn wake_all(&self) {
        for (_, senders) in self.lock().drain() {
            for sender in senders {
                let _ = sender.send(());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<oneshot::Sender<()>>>> {
        // A panic while holding this lock leaves the map consistent: recover it.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Listens for completions until shutdown, reconnecting when the connection drops;
    /// after a gap every waiter re-checks its job.
    pub async fn listen(self, db: DatabaseConnection, shutdown: CancellationToken) {
        let wake = |payload: &str| {
            if let Ok(job_id) = Uuid::parse_str(payload) {
                self.wake(job_id);
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = db::listen_forever(&db, JOB_DONE_CHANNEL, || self.wake_all(), wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_waiter_leaves_the_map_however_it_ends() {
        let waiters = CompletionWaiters::default();
        let (job, other_job) = (Uuid::now_v7(), Uuid::now_v7());

        // Given up (a wrong id, a timeout, a client gone): dropped unwoken.
        drop(waiters.subscribe(job));
        assert_eq!(waiters.jobs_waited_on(), 0);

        // Two requests wait for one job; one gives up, the other is still woken.
        let mut staying = waiters.subscribe(job);
        let leaving = waiters.subscribe(job);
        let _elsewhere = waiters.subscribe(other_job);
        drop(leaving);
        assert_eq!(waiters.jobs_waited_on(), 2);
        waiters.wake(job);
        tokio::time::timeout(Duration::from_secs(1), staying.finished()).await.expect("woken");
        drop(staying);
        assert_eq!(waiters.jobs_waited_on(), 1, "only the other job's waiter is left");
    }
}
