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

impl CompletionWaiters {
    /// Registers interest in one job; the receiver fires when it finishes (or when the
    /// listener reconnects and cannot know what it missed).
    pub fn subscribe(&self, job_id: Uuid) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(job_id).or_default().push(tx);
        rx
    }

    /// Drops the senders of waiters that gave up (timed out or disconnected).
    pub fn forget(&self, job_id: Uuid) {
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
