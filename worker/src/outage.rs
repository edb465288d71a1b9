//! Riding out an outage without losing messages: wait for a breaker to let a call
//! through, and retry a database operation until PostgreSQL answers, holding whatever
//! the caller holds (unacked messages) meanwhile.

use std::time::{Duration, Instant};

use spool_shared::breaker::SharedBreaker;
use tokio_util::sync::CancellationToken;

/// Waits until `breaker` lets a call through (in half-open, this takes a probe slot),
/// holding whatever the caller holds meanwhile. `false` when shutdown comes first.
pub async fn until_admitted(breaker: &SharedBreaker, shutdown: &CancellationToken) -> bool {
    loop {
        let wait = breaker.with(|b| {
            let now = Instant::now();
            // Refused while half-open: other calls hold every probe slot; theirs decide soon.
            (!b.try_acquire(now)).then(|| b.retry_after(now).unwrap_or(Duration::from_millis(100)))
        });
        let Some(wait) = wait else { return true };
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Runs a database operation until it succeeds, with backoff (100 ms, doubling up to 5 s),
/// logging and counting each failure; the caller holds its messages unacked meanwhile.
/// `None` when shutdown comes first.
///
/// With the PostgreSQL `breaker`, an outage pauses a consumer (its batch slots stay
/// taken, so it takes no more messages) instead of bouncing messages through the queue
/// until their delivery limit dead-letters them: while the breaker is open nobody writes;
/// when it half-opens, one probe write decides. Without one (the dead-letter sink), the
/// operation is simply retried.
pub async fn until_db_answers<T, F, Fut>(
    breaker: Option<&SharedBreaker>,
    shutdown: &CancellationToken,
    what: &str,
    mut operation: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sea_orm::DbErr>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Some(breaker) = breaker
            && !until_admitted(breaker, shutdown).await
        {
            return None;
        }
        let result = operation().await;
        if let Some(breaker) = breaker {
            breaker.with(|b| b.record(result.is_ok(), Instant::now()));
        }
        match result {
            Ok(value) => return Some(value),
            Err(error) => {
                tracing::error!(error.cause_chain = ?error, what, retry_in = ?backoff, "database unavailable; retrying");
                metrics::counter!("spool_worker_database_errors_total").increment(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
