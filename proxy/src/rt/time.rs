//! Timers for code that runs on either driver: this thread's runtime when it runs one,
//! else tokio's. Deadlines are `std::time::Instant`s.

use super::{is_current, Sleep};
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

/// A deadline passed before the work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline has elapsed")]
pub struct Elapsed;

/// Now, as this thread's runtime read it at the start of its turn (a turn's work late at
/// worst, which deadlines and statement timings can afford); the clock itself off a
/// worker. One clock read per turn instead of one per use.
pub fn now() -> Instant {
    super::turn_time().unwrap_or_else(Instant::now)
}

/// Waits until `deadline`.
pub async fn sleep_until(deadline: Instant) {
    if is_current() {
        Sleep { deadline, id: None }.await
    } else {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await
    }
}

/// Waits for `d`.
pub async fn sleep(d: Duration) {
    sleep_until(Instant::now() + d).await
}

/// `work`'s output, unless `deadline` passes first.
pub async fn timeout_at<F: Future>(deadline: Instant, work: F) -> Result<F::Output, Elapsed> {
    let mut work = pin!(work);
    let mut timer = pin!(sleep_until(deadline));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// `work`'s output, unless `d` passes first.
pub async fn timeout<F: Future>(d: Duration, work: F) -> Result<F::Output, Elapsed> {
    timeout_at(Instant::now() + d, work).await
}
