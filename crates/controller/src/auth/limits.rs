//! Per-VM and per-address rate limits (GCRA token buckets, one per key).
//!
//! A caller over its limit gets 429 with `Retry-After` (HTTP) or `RESOURCE_EXHAUSTED` (gRPC)
//! and nothing is done for it. Keys idle long enough to be full again are forgotten by
//! [`RateLimits::prune`], which the reconciler calls, so the maps stay bounded by the callers
//! active in the last few seconds.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// A sustained rate and a burst, per key. A rate of 0 disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_second: u32,
    pub burst: u32,
}

impl Limit {
    fn quota(self) -> Option<Quota> {
        let rate = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second)).unwrap_or(rate);
        Some(Quota::per_second(rate).allow_burst(burst))
    }
}

pub struct RateLimits {
    per_vm: Option<DefaultKeyedRateLimiter<String>>,
    per_addr: Option<DefaultKeyedRateLimiter<IpAddr>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("per_vm", &self.per_vm.is_some())
            .field("per_addr", &self.per_addr.is_some())
            .finish()
    }
}

impl RateLimits {
    pub fn new(per_vm: Limit, per_addr: Limit) -> RateLimits {
        RateLimits {
            per_vm: per_vm.quota().map(DefaultKeyedRateLimiter::keyed),
            per_addr: per_addr.quota().map(DefaultKeyedRateLimiter::keyed),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request from `addr`'s bucket; `Err` says how long to wait.
    pub fn check_addr(&self, addr: IpAddr) -> Result<(), Duration> {
        match &self.per_addr {
            None => Ok(()),
            Some(l) => l
                .check_key(&addr)
                .map_err(|n| n.wait_time_from(self.clock.now())),
        }
    }

    /// Takes one request from `vm_id`'s bucket; `Err` says how long to wait.
    pub fn check_vm(&self, vm_id: &str) -> Result<(), Duration> {
        match &self.per_vm {
            None => Ok(()),
            Some(l) => l
                .check_key(&vm_id.to_owned())
                .map_err(|n| n.wait_time_from(self.clock.now())),
        }
    }

    /// Forgets keys whose buckets are full again.
    pub fn prune(&self) {
        if let Some(l) = &self.per_vm {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_addr {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// Whole seconds for a `Retry-After` header, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_per_key() {
        let l = RateLimits::new(
            Limit {
                per_second: 1,
                burst: 3,
            },
            Limit {
                per_second: 0,
                burst: 0,
            },
        );
        for _ in 0..3 {
            assert!(l.check_vm("a").is_ok());
        }
        let wait = l.check_vm("a").err();
        assert!(wait.is_some_and(|w| w <= Duration::from_secs(1)));
        assert!(l.check_vm("b").is_ok(), "keys are independent");
        for _ in 0..100 {
            assert!(
                l.check_addr("10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])))
                    .is_ok()
            );
        }
        l.prune();
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(10)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2100)), 3);
    }
}
