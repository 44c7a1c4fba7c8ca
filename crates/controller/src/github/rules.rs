//! The GitHub rules, as pure functions of what GitHub answered and of `now`: how a response
//! is classified, when a cached token must be replaced, and the mint budget.

use super::GitHubError;
use crate::model::Millis;

/// Secondary rate limits without a `Retry-After` are waited out for at least a minute
/// (GitHub's documented advice), then doubled per repeat up to this.
pub const SECONDARY_MIN_WAIT_SECS: u64 = 60;

/// What of a response matters for its classification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer<'a> {
    pub status: u16,
    /// `Retry-After`, seconds.
    pub retry_after: Option<u64>,
    /// `X-RateLimit-Remaining`.
    pub remaining: Option<u64>,
    /// `X-RateLimit-Reset`, Unix seconds.
    pub reset: Option<i64>,
    /// The JSON body's `message`.
    pub message: &'a str,
}

/// Whether a response is a success, or which error it is. `now_secs` is the controller's
/// time, for a primary limit's reset.
pub fn classify(a: &Answer<'_>, now_secs: i64) -> Result<(), GitHubError> {
    let message = a.message.to_owned();
    match a.status {
        200..=299 => Ok(()),
        401 => Err(GitHubError::Unauthorized(message)),
        403 | 429 => {
            if let Some(secs) = a.retry_after {
                return Err(GitHubError::RateLimited {
                    retry_in_secs: secs.max(1),
                    message,
                });
            }
            if a.remaining == Some(0) {
                let wait = a
                    .reset
                    .map_or(SECONDARY_MIN_WAIT_SECS as i64, |r| r - now_secs);
                return Err(GitHubError::RateLimited {
                    retry_in_secs: wait.max(1) as u64,
                    message,
                });
            }
            if a.status == 429 || a.message.to_ascii_lowercase().contains("rate limit") {
                return Err(GitHubError::RateLimited {
                    retry_in_secs: SECONDARY_MIN_WAIT_SECS,
                    message,
                });
            }
            Err(GitHubError::Forbidden(message))
        }
        404 => Err(GitHubError::NotFound(message)),
        409 | 422 => Err(GitHubError::Rejected {
            status: a.status,
            message,
        }),
        status @ 500..=599 => Err(GitHubError::Server { status, message }),
        status => Err(GitHubError::Server { status, message }),
    }
}

/// Whether a cached credential expiring at `expires_at` must be replaced now: it is used
/// only while more than `margin_ms` of its life is left.
pub fn due_for_refresh(expires_at: Millis, now: Millis, margin_ms: Millis) -> bool {
    expires_at - now <= margin_ms
}

/// A waiter that has not asked again for this long is gone (its VM ended or was served by
/// another path): it no longer holds a place in the queue. Agents ask again every few
/// seconds while their registration is held back.
pub const WAITER_GONE_MS: Millis = 2 * 60 * 1000;
/// At most this many waiters keep a place; beyond, askers are refused without one (they
/// still get a mint once the queue is short again).
const MAX_WAITERS: usize = 100_000;

/// A budget of mints (registration tokens, JIT configs) per minute, shared by every pool
/// that uses one GitHub App or PAT: a token bucket over explicit times, so that a boot storm
/// is spread out instead of tripping GitHub's secondary limit. While mints are scarce they
/// are handed out **in the order they were first asked for** (a queue of waiters), so no VM
/// of a storm waits behind VMs that asked later, however their retries fall.
#[derive(Debug, Clone, PartialEq)]
pub struct MintBudget {
    per_minute: f64,
    tokens: f64,
    last: Option<Millis>,
    /// Who is waiting, oldest first, with when each last asked.
    waiting: std::collections::VecDeque<(String, Millis)>,
}

impl MintBudget {
    /// `per_minute` mints a minute, at most a minute's worth at once.
    pub fn new(per_minute: u32) -> MintBudget {
        let per_minute = f64::from(per_minute.max(1));
        MintBudget {
            per_minute,
            tokens: per_minute,
            last: None,
            waiting: std::collections::VecDeque::new(),
        }
    }

    fn refill(&mut self, now: Millis) {
        if let Some(last) = self.last {
            let elapsed = (now - last).max(0) as f64;
            self.tokens = (self.tokens + elapsed * self.per_minute / 60_000.0).min(self.per_minute);
        }
        self.last = Some(now);
    }

    /// Takes one mint at `now` for `who` (a runner name, or a pool's token), or says how
    /// many milliseconds until its turn may come. A mint is granted only when every waiter
    /// that asked before `who` can be served too; otherwise `who` keeps (or takes) its place
    /// at the end of the queue.
    pub fn take_for(&mut self, who: &str, now: Millis) -> Result<(), Millis> {
        self.refill(now);
        self.waiting
            .retain(|(_, asked)| now - *asked < WAITER_GONE_MS);
        let place = self.waiting.iter().position(|(w, _)| w == who);
        let ahead = place.unwrap_or(self.waiting.len()) as f64;
        if self.tokens >= ahead + 1.0 {
            self.tokens -= 1.0;
            if let Some(p) = place {
                self.waiting.remove(p);
            }
            return Ok(());
        }
        match place {
            Some(p) => self.waiting[p].1 = now,
            None if self.waiting.len() < MAX_WAITERS => {
                self.waiting.push_back((who.to_owned(), now))
            }
            None => {}
        }
        let missing = ahead + 1.0 - self.tokens;
        Err((missing * 60_000.0 / self.per_minute).ceil() as Millis)
    }

    /// How many askers wait for a mint.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The share of the budget in use at `now` (0 = all free, 1 = exhausted), for metrics.
    pub fn used(&mut self, now: Millis) -> f64 {
        self.refill(now);
        1.0 - self.tokens / self.per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16) -> Answer<'static> {
        Answer {
            status,
            ..Answer::default()
        }
    }

    #[test]
    fn responses_are_classified_as_github_documents() {
        assert!(classify(&answer(201), 0).is_ok());
        assert!(matches!(
            classify(&answer(401), 0),
            Err(GitHubError::Unauthorized(_))
        ));
        assert!(matches!(
            classify(&answer(403), 0),
            Err(GitHubError::Forbidden(_))
        ));
        assert!(matches!(
            classify(&answer(404), 0),
            Err(GitHubError::NotFound(_))
        ));
        assert!(matches!(
            classify(&answer(422), 0),
            Err(GitHubError::Rejected { status: 422, .. })
        ));
        assert!(classify(&answer(502), 0).is_err_and(|e| e.is_transient()));
        // Retry-After wins; then an exhausted primary limit waits for its reset; then a
        // secondary limit waits a minute.
        let retry = Answer {
            status: 403,
            retry_after: Some(30),
            message: "You have exceeded a secondary rate limit",
            ..Answer::default()
        };
        assert!(matches!(
            classify(&retry, 0),
            Err(GitHubError::RateLimited {
                retry_in_secs: 30,
                ..
            })
        ));
        let primary = Answer {
            status: 403,
            remaining: Some(0),
            reset: Some(1_000),
            message: "API rate limit exceeded",
            ..Answer::default()
        };
        assert!(matches!(
            classify(&primary, 900),
            Err(GitHubError::RateLimited {
                retry_in_secs: 100,
                ..
            })
        ));
        let secondary = Answer {
            status: 403,
            message: "You have exceeded a secondary rate limit. Please wait a few minutes.",
            ..Answer::default()
        };
        assert!(matches!(
            classify(&secondary, 0),
            Err(GitHubError::RateLimited {
                retry_in_secs: 60,
                ..
            })
        ));
        assert!(matches!(
            classify(&answer(429), 0),
            Err(GitHubError::RateLimited { .. })
        ));
    }

    #[test]
    fn a_token_is_replaced_before_it_expires() {
        assert!(!due_for_refresh(3_600_000, 0, 300_000));
        assert!(due_for_refresh(3_600_000, 3_300_000, 300_000));
        assert!(due_for_refresh(3_600_000, 4_000_000, 300_000));
    }

    #[test]
    fn the_budget_spreads_a_storm_over_time() {
        let mut b = MintBudget::new(180);
        let mut granted = 0;
        for _ in 0..500 {
            if b.take_for("storm", 0).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 180, "a minute's worth at once");
        assert!((b.used(0) - 1.0).abs() < 1e-9);
        // One more every 60/180 s.
        assert_eq!(b.take_for("storm", 0), Err(334));
        assert!(b.take_for("storm", 334).is_ok());
        assert!(b.take_for("storm", 334).is_err());
        // After a quiet minute the whole budget is back, never more.
        assert!(b.used(120_000) < 1e-9);
    }

    #[test]
    fn scarce_mints_go_in_the_order_they_were_asked_for() {
        let mut b = MintBudget::new(60);
        for i in 0..60 {
            assert!(b.take_for(&format!("early-{i}"), 0).is_ok());
        }
        // Three VMs ask in turn while the budget is empty: they queue in that order.
        for who in ["a", "b", "c"] {
            assert!(b.take_for(who, 0).is_err());
        }
        assert_eq!(b.waiting(), 3);
        // One mint a second comes back. After a second, only "a" may have it, however
        // eagerly "c" retries; after two, "b"; a newcomer waits behind all of them.
        assert_eq!(b.take_for("c", 1_000), Err(2_000));
        assert!(b.take_for("newcomer", 1_000).is_err());
        assert!(b.take_for("a", 1_000).is_ok());
        assert!(b.take_for("c", 2_000).is_err());
        assert!(b.take_for("b", 2_000).is_ok());
        assert!(b.take_for("c", 3_000).is_ok());
        assert!(b.take_for("newcomer", 4_000).is_ok());
        assert_eq!(b.waiting(), 0);
    }

    #[test]
    fn a_waiter_that_stops_asking_loses_its_place() {
        let mut b = MintBudget::new(1);
        assert!(b.take_for("first", 0).is_ok());
        assert!(b.take_for("gone", 0).is_err());
        assert!(b.take_for("patient", 1).is_err());
        // "gone" never asks again; after a minute the mint is "patient"'s.
        assert!(
            b.take_for("patient", 60_000).is_err(),
            "gone still holds its place"
        );
        assert!(b.take_for("patient", WAITER_GONE_MS).is_ok());
    }
}
