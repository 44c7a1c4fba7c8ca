//! The controller's time. In production it is the system clock; tests use an adjustable
//! one (the system clock plus an offset they move forward), so command expiry, redelivery,
//! credential lifetimes, VM health and retention are tested by advancing time, not by
//! sleeping. Every rule that depends on time reads it here.

use crate::model::Millis;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Set for an adjustable clock: milliseconds added to the system time.
    offset_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock tests can move forward with [`Clock::advance`].
    pub fn adjustable() -> Clock {
        Clock {
            offset_ms: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// Unix milliseconds now.
    pub fn now_ms(&self) -> Millis {
        Utc::now().timestamp_millis()
            + self
                .offset_ms
                .as_ref()
                .map_or(0, |o| o.load(Ordering::Relaxed))
    }

    /// Unix seconds now.
    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    pub fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default()
    }

    /// Moves an adjustable clock forward (every copy of it sees the new time). Answers
    /// false, and does nothing, on the system clock.
    pub fn advance(&self, by: Duration) -> bool {
        match &self.offset_ms {
            Some(o) => {
                o.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_moves_forward_for_every_copy() {
        let c = Clock::adjustable();
        let copy = c.clone();
        let before = copy.now_ms();
        assert!(c.advance(Duration::from_secs(3600)));
        assert!(copy.now_ms() - before >= 3_600_000);
        assert!(!Clock::system().advance(Duration::from_secs(1)));
        let s = Clock::system();
        assert!((s.now_ms() - Utc::now().timestamp_millis()).abs() < 1_000);
    }
}
