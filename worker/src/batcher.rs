//! Dynamic batching: gather items from a stream until the batch is full or the oldest
//! item has waited `max_delay`, whichever comes first.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// Waits for the first item, then collects up to `max_size` items or until `max_delay()`
/// has passed since the first one arrived. `max_delay` is asked when the first item
/// arrives, not before the wait: whether company is worth waiting for depends on what
/// else is running then. Returns `None` once the stream has ended and nothing is left
/// (a final partial batch is returned first), or when `stop` fires while no batch has
/// started: a batch already started is always completed.
pub async fn next_batch<S, T>(
    stream: &mut S,
    max_size: usize,
    max_delay: impl FnOnce() -> Duration,
    stop: &CancellationToken,
) -> Option<Vec<T>>
where
    S: Stream<Item = T> + Unpin,
{
    let first = tokio::select! {
        biased;
        _ = stop.cancelled() => return None,
        item = stream.next() => item?,
    };
    let mut batch = Vec::with_capacity(max_size);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + max_delay();
    while batch.len() < max_size {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => batch.push(item),
            // Stream ended or deadline passed: run what we have.
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn channel_stream(rx: mpsc::Receiver<u32>) -> impl Stream<Item = u32> + Unpin {
        Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })).fuse()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_returned_without_waiting_for_the_deadline() {
        let (tx, rx) = mpsc::channel(16);
        for i in 0..10 {
            tx.send(i).await.expect("receiver alive");
        }
        let mut stream = channel_stream(rx);
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut stream, 4, || Duration::from_secs(10), &CancellationToken::new()).await;
        assert_eq!(batch, Some(vec![0, 1, 2, 3]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(
            next_batch(&mut stream, 4, || Duration::from_secs(10), &CancellationToken::new()).await,
            Some(vec![4, 5, 6, 7])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_delay_what_is_already_there_runs_at_once() {
        let (tx, rx) = mpsc::channel(16);
        for i in 0..3 {
            tx.send(i).await.expect("receiver alive");
        }
        let mut stream = channel_stream(rx);
        let started = tokio::time::Instant::now();
        assert_eq!(next_batch(&mut stream, 8, || Duration::ZERO, &CancellationToken::new()).await, Some(vec![0, 1, 2]));
        assert_eq!(started.elapsed(), Duration::ZERO);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_runs_when_the_deadline_passes() {
        let (tx, rx) = mpsc::channel(16);
        tx.send(1).await.expect("receiver alive");
        tx.send(2).await.expect("receiver alive");
        let mut stream = channel_stream(rx);
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut stream, 8, || Duration::from_millis(5), &CancellationToken::new()).await;
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(started.elapsed(), Duration::from_millis(5));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_first_item_not_from_the_call() {
        let (tx, rx) = mpsc::channel(16);
        let mut stream = channel_stream(rx);
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(1).await.expect("receiver alive");
            tokio::time::sleep(Duration::from_millis(3)).await;
            tx.send(2).await.expect("receiver alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx.send(3).await.expect("receiver alive");
        });
        let started = tokio::time::Instant::now();
        let batch = next_batch(&mut stream, 8, || Duration::from_millis(5), &CancellationToken::new()).await;
        assert_eq!(batch, Some(vec![1, 2]));
        assert_eq!(started.elapsed(), Duration::from_millis(105));
        assert_eq!(
            next_batch(&mut stream, 8, || Duration::from_millis(5), &CancellationToken::new()).await,
            Some(vec![3])
        );
        producer.await.expect("producer finished");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_the_wait_for_a_first_item_but_not_a_started_batch() {
        let (tx, rx) = mpsc::channel(16);
        let mut stream = channel_stream(rx);
        let stop = CancellationToken::new();
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                stop.cancel();
            })
        };
        assert_eq!(next_batch(&mut stream, 8, || Duration::from_millis(5), &stop).await, None);
        stopper.await.expect("stopper finished");

        // A batch in progress runs to its deadline even if stop fires meanwhile.
        let stop = CancellationToken::new();
        tx.send(1).await.expect("receiver alive");
        let late_stop = stop.clone();
        let producer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            late_stop.cancel();
            tx.send(2).await.expect("receiver alive");
        });
        assert_eq!(next_batch(&mut stream, 8, || Duration::from_millis(5), &stop).await, Some(vec![1, 2]));
        producer.await.expect("producer finished");
        assert!(stop.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_stream_yields_its_remainder_then_none() {
        let (tx, rx) = mpsc::channel(16);
        tx.send(7).await.expect("receiver alive");
        drop(tx);
        let mut stream = channel_stream(rx);
        assert_eq!(
            next_batch(&mut stream, 8, || Duration::from_secs(1), &CancellationToken::new()).await,
            Some(vec![7])
        );
        assert_eq!(next_batch(&mut stream, 8, || Duration::from_secs(1), &CancellationToken::new()).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_is_decided_when_the_first_item_arrives() {
        let (tx, rx) = mpsc::channel(16);
        let mut stream = channel_stream(rx);
        // Another batch holds the model while this call starts waiting, and is done by
        // the time the first item comes: the item runs at once, alone.
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let producer = {
            let busy = std::sync::Arc::clone(&busy);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                busy.store(false, std::sync::atomic::Ordering::SeqCst);
                tx.send(1).await.expect("receiver alive");
                tokio::time::sleep(Duration::from_millis(1)).await;
                tx.send(2).await.expect("receiver alive");
            })
        };
        let started = tokio::time::Instant::now();
        let delay =
            || if busy.load(std::sync::atomic::Ordering::SeqCst) { Duration::from_millis(5) } else { Duration::ZERO };
        assert_eq!(next_batch(&mut stream, 8, delay, &CancellationToken::new()).await, Some(vec![1]));
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        producer.await.expect("producer finished");
    }
}
