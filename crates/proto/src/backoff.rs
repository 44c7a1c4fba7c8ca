//! How an agent waits between attempts to reach the controller: capped exponential backoff
//! with jitter, so a fleet that lost its controller does not come back in lockstep. The
//! agent and the load generator's simulated agents use the same one.

use rand::Rng;
use std::time::Duration;

/// Reconnecting the gRPC stream: from 1 s, doubling, up to a minute.
pub const STREAM_RECONNECT: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(60));
/// Resending a spooled event over HTTP: from 0.5 s up to 30 s.
pub const EVENT_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// The n-th wait is uniform in [d/2, d] where d = min(base * 2^n, cap).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The policy of one of the constants above.
    pub fn of((base, cap): (Duration, Duration)) -> Backoff {
        Backoff::new(base, cap)
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let d = exp.min(self.cap);
        let half = d / 2;
        half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
    }

    /// After a success: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (i, x) in d.iter().enumerate() {
            let full = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
            assert!(*x >= full / 2 && *x <= full, "{i}: {x:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
