//! Writes to Nomad that must happen eventually (deregistrations, claim metadata) are retried
//! in the background, so that no API answer waits for Nomad.

use std::time::Duration;

use tokio::time::Instant;

use crate::client::NomadError;

const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(60);

/// What one attempt achieved.
pub(crate) enum Attempt {
    /// Done, or no longer needed.
    Finished,
    Failed(NomadError),
}

/// Runs `attempt` until it finishes or `patience` has passed, waiting 500 ms (doubling, at most
/// 60 s) between attempts; failures are logged as `what` on behalf of `job`.
pub(crate) async fn until_done<F: Future<Output = Attempt>>(
    what: &str,
    job: &str,
    patience: Duration,
    mut attempt: impl FnMut() -> F,
) {
    let deadline = Instant::now() + patience;
    let mut delay = FIRST_DELAY;
    loop {
        let error = match attempt().await {
            Attempt::Finished => return,
            Attempt::Failed(error) => error,
        };
        if Instant::now() + delay >= deadline {
            tracing::error!(job, %error, "gave up: {what}");
            return;
        }
        tracing::warn!(job, %error, retry_in = ?delay, "failed, will retry: {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn attempts_back_off_until_done_or_out_of_patience() {
        let attempts = AtomicUsize::new(0);
        until_done("test", "job", Duration::from_secs(60), || async {
            match attempts.fetch_add(1, Ordering::SeqCst) {
                0..3 => Attempt::Failed(NomadError::Unreachable("down".into())),
                _ => Attempt::Finished,
            }
        })
        .await;
        assert_eq!(attempts.load(Ordering::SeqCst), 4);

        let attempts = AtomicUsize::new(0);
        let started = Instant::now();
        until_done("test", "job", Duration::from_secs(10), || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            Attempt::Failed(NomadError::Unreachable("down".into()))
        })
        .await;
        // 0.5 + 1 + 2 + 4 s of waiting; the next wait (8 s) would end after the deadline.
        assert_eq!(attempts.load(Ordering::SeqCst), 5);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
