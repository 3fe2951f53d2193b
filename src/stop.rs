//! Cancellation that is cheap to check on every wake-up of a busy task.
//!
//! A `CancellationToken`'s future takes two locks each time it is polled,
//! and a task's `select!` polls it on every wake-up: on the relay path that
//! was a few % of each message's instructions (BENCHMARKS.md). [`on_cancel`]
//! waits on the token once, in a small task of its own, and hands the
//! busy task a `oneshot::Receiver`, whose poll is a few atomic operations.

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Completes (with `Ok`) once `token` is cancelled. The watcher task ends
/// then, or when the receiver is dropped. Needs a Tokio runtime.
pub fn on_cancel(token: &CancellationToken) -> oneshot::Receiver<()> {
    let (mut tx, rx) = oneshot::channel();
    let token = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => {
                let _ = tx.send(());
            }
            _ = tx.closed() => {}
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_on_cancel_and_not_before() {
        let token = CancellationToken::new();
        let mut rx = on_cancel(&token);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "not cancelled yet");
        token.cancel();
        assert_eq!(rx.await, Ok(()));
        // A token cancelled already fires at once.
        assert_eq!(on_cancel(&token).await, Ok(()));
    }

    #[tokio::test]
    async fn the_watcher_ends_when_the_receiver_is_dropped() {
        let token = CancellationToken::new();
        let before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
        drop(on_cancel(&token));
        for _ in 0..100 {
            if tokio::runtime::Handle::current().metrics().num_alive_tasks() == before {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the watcher task is still alive");
    }
}
