//! Waits that are cheap to poll on every wake-up of a busy task.
//!
//! A `CancellationToken`'s future takes two locks each time it is polled,
//! and a task's `select!` polls it on every wake-up: on the relay path that
//! was a few % of each message's instructions (BENCHMARKS.md). [`on_cancel`]
//! waits on the token once, in a small task of its own, and hands the
//! busy task a `oneshot::Receiver`, whose poll is a few atomic operations.
//! Likewise [`Silence`] keeps one timer for a connection's whole life
//! instead of one per read.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// "Nothing heard for `after`": one timer per connection, moved only when
/// it fires (to `after` past the last `heard`), not re-armed on every read.
pub struct Silence {
    after: Duration,
    heard: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Silence {
    /// Counting from now.
    pub fn new(after: Duration) -> Silence {
        Silence { after, heard: Instant::now(), timer: Box::pin(tokio::time::sleep(after)) }
    }

    /// Something arrived.
    pub fn heard(&mut self) {
        self.heard = Instant::now();
    }

    /// Completes once `after` has passed since the last `heard`. Safe to
    /// drop and call again (in a `select!` loop): the timer lives here.
    pub async fn elapsed(&mut self) {
        loop {
            self.timer.as_mut().await;
            if self.heard.elapsed() >= self.after {
                return;
            }
            self.timer.as_mut().reset(self.heard + self.after);
        }
    }
}

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
    async fn silence_counts_from_the_last_thing_heard() {
        // Real time (paused time would need tokio's test-util, which the
        // bench's gateway binary would then be built with): only bounds that
        // a correct timer cannot miss are asserted.
        let after = Duration::from_millis(200);
        let mut s = Silence::new(after);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let heard = tokio::time::Instant::now();
        s.heard();
        s.elapsed().await;
        let waited = heard.elapsed();
        assert!(waited >= after, "silent {waited:?} after the last thing heard");
        assert!(waited < Duration::from_secs(10), "the timer never fired");
        // An interrupted wait (dropped) leaves the deadline where it was.
        s.heard();
        let heard = tokio::time::Instant::now();
        tokio::select! {
            _ = s.elapsed() => panic!("silent before the deadline"),
            _ = tokio::time::sleep(after / 2) => {}
        }
        s.elapsed().await;
        assert!(heard.elapsed() >= after);
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
