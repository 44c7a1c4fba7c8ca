//! A log line that may repeat thousands of times a second (every write while the disk is
//! full, every refused connection in a flood) is written at most once per interval, with how
//! many were left out. One [`LogThrottle`] per kind of line, usually a `static`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Debug)]
pub struct LogThrottle {
    every_ms: i64,
    last: AtomicI64,
    quiet: AtomicU64,
}

impl LogThrottle {
    pub const fn new(every_ms: i64) -> LogThrottle {
        LogThrottle {
            every_ms,
            last: AtomicI64::new(i64::MIN),
            quiet: AtomicU64::new(0),
        }
    }

    /// `Some(left out since the last line)` when a line may be written now, else `None`
    /// (and the line is counted as left out). `now_ms` is any monotonic millisecond count.
    pub fn allow(&self, now_ms: i64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < self.every_ms
            || self
                .last
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.quiet.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.quiet.swap(0, Ordering::Relaxed))
    }

    /// [`LogThrottle::allow`] on the system clock.
    pub fn allow_now(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.allow(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_left_out() {
        let t = LogThrottle::new(1_000);
        assert_eq!(t.allow(10_000), Some(0));
        assert_eq!(t.allow(10_001), None);
        assert_eq!(t.allow(10_999), None);
        assert_eq!(t.allow(11_000), Some(2));
        assert_eq!(t.allow(11_500), None);
        assert_eq!(t.allow(20_000), Some(1));
    }
}
