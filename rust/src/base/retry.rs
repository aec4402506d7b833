//! The one retry loop: peers start in any order, so reaching one is tried again with backoff.

use std::time::Duration;

use tokio::time::Instant;

/// The pauses between tries: `first`, doubling up to `longest`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub longest: Duration,
}

/// Tries `attempt` until it succeeds or `deadline` (`None`: none) has passed, pausing with
/// `backoff` in between; past the deadline, the last try's error.
pub async fn with_backoff<T, E, F>(
    deadline: Option<Instant>,
    backoff: Backoff,
    mut attempt: impl FnMut() -> F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let mut pause = backoff.first;
    loop {
        let error = match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|left| left.is_zero()) {
            return Err(error);
        }
        tokio::time::sleep(left.map_or(pause, |left| left.min(pause))).await;
        // No time left for another try: this error says why.
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(error);
        }
        pause = (pause * 2).min(backoff.longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tries_until_it_succeeds_or_the_deadline_passes() {
        let backoff = Backoff {
            first: Duration::from_millis(10),
            longest: Duration::from_millis(40),
        };
        let mut tries = 0;
        let done: Result<u32, u32> = with_backoff(None, backoff, || {
            tries += 1;
            std::future::ready(if tries == 4 { Ok(tries) } else { Err(tries) })
        })
        .await;
        assert_eq!(done, Ok(4));

        let began = Instant::now();
        let deadline = began + Duration::from_millis(100);
        let mut tries = 0;
        let failed: Result<(), u32> = with_backoff(Some(deadline), backoff, || {
            tries += 1;
            std::future::ready(Err(tries))
        })
        .await;
        // Tries at 0, 10, 30 and 70 ms (or later, on a busy machine); the pause after the last
        // ends at the deadline.
        assert!((2..=4).contains(&failed.unwrap_err()));
        assert!(Instant::now() >= deadline);
    }
}
