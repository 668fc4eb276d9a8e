//! One jittered exponential backoff, shared by everything that waits before trying again
//! (accept errors today; backend reconnects and worker restarts reuse it).

use std::time::Duration;

/// `base * 2^attempt`, capped at `max`, without jitter: the deterministic schedule that
/// passive ejection uses (its growth must be predictable in logs and tests).
pub fn exponential(base: Duration, max: Duration, attempt: u32) -> Duration {
    // 2^20 × any sane base is already far past any cap; stopping there avoids overflow.
    let factor = 1u32 << attempt.min(20);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// A retry schedule that grows exponentially with "equal jitter": each delay is half the
/// exponential step plus a random share of the other half, so many peers retrying after one
/// shared cause (a full fd table, a restarted worker) spread out instead of retrying in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// First delay, before jitter.
    base: Duration,
    /// Largest delay, before jitter; waiting longer than this helps no one.
    max: Duration,
    /// Delays handed out since the last success.
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `base` and growing up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay to wait; each call grows the following one.
    pub fn next_delay(&mut self) -> Duration {
        let step = exponential(self.base, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// Forget past failures: the next delay is `base`-sized again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exponential_grows_and_caps() {
        assert_eq!(exponential(10 * MS, 1000 * MS, 0), 10 * MS);
        assert_eq!(exponential(10 * MS, 1000 * MS, 3), 80 * MS);
        assert_eq!(exponential(10 * MS, 1000 * MS, 7), 1000 * MS);
        assert_eq!(exponential(10 * MS, 1000 * MS, u32::MAX), 1000 * MS);
    }

    #[test]
    fn jittered_delays_stay_within_half_to_full_step_and_reset() {
        let mut b = Backoff::new(10 * MS, 100 * MS);
        for attempt in 0..10 {
            let step = exponential(10 * MS, 100 * MS, attempt);
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "attempt {attempt}: {d:?} vs {step:?}"
            );
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= 10 * MS);
    }
}
