//! The audit log's one writer: every admin action with its outcome, every refused admin
//! write, and operator-level changes (token and pool moves). Refusals of callers who proved
//! nothing (no token, a wrong or revoked one) are throttled, so an anonymous flood cannot
//! flood the store; how many were not recorded is written as one summary row by the
//! reconciler ([`Audit::flush_suppressed`]).

use crate::auth::{Denied, Principal};
use crate::store::{AuditRow, Millis, Mutation, Store};
use std::net::SocketAddr;
use std::sync::Mutex;

/// Anonymous refusals recorded in a burst, and per second after it.
const REFUSALS_BURST: f64 = 20.0;
const REFUSALS_PER_SEC: f64 = 1.0;

/// A token bucket over explicit times (Unix ms), so that it is tested without a clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    burst: f64,
    per_ms: f64,
    tokens: f64,
    last: Option<Millis>,
    suppressed: u64,
    since: Option<Millis>,
}

impl Throttle {
    pub fn new(burst: f64, per_sec: f64) -> Throttle {
        Throttle {
            burst,
            per_ms: per_sec / 1000.0,
            tokens: burst,
            last: None,
            suppressed: 0,
            since: None,
        }
    }

    /// Whether one more may be recorded at `now`; a refusal not admitted is counted.
    pub fn admit(&mut self, now: Millis) -> bool {
        if let Some(last) = self.last {
            let elapsed = (now - last).max(0) as f64;
            self.tokens = (self.tokens + elapsed * self.per_ms).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            self.since.get_or_insert(now);
            false
        }
    }

    /// How many were not admitted since when, and starts counting again.
    pub fn take_suppressed(&mut self) -> Option<(u64, Millis)> {
        let n = std::mem::take(&mut self.suppressed);
        let since = self.since.take();
        (n > 0).then(|| (n, since.unwrap_or_default()))
    }
}

#[derive(Debug)]
pub struct Audit {
    store: Store,
    clock: crate::clock::Clock,
    refusals: Mutex<Throttle>,
}

impl Audit {
    pub fn new(store: Store, clock: crate::clock::Clock) -> Audit {
        Audit {
            store,
            clock,
            refusals: Mutex::new(Throttle::new(REFUSALS_BURST, REFUSALS_PER_SEC)),
        }
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one row; a failure is logged (the action itself already happened or was
    /// refused, and the caller's answer does not depend on the audit row).
    pub async fn write(&self, row: AuditRow) {
        if let Err(e) = self.store.write(vec![Mutation::Audit(row)]).await {
            tracing::error!(error = %crate::error::chain(&e), "Audit log write failed; the action is in the controller's log only");
        }
    }

    /// An admin action and how it ended: `Ok(detail)` or the error's code and message.
    pub async fn action(
        &self,
        actor: String,
        action: &str,
        target: String,
        peer: Option<SocketAddr>,
        result: Result<String, (&str, String)>,
    ) {
        let (outcome, detail) = match result {
            Ok(d) => ("ok".to_owned(), d),
            Err((code, message)) => (format!("error: {code}"), message),
        };
        self.write(AuditRow {
            seq: 0,
            at: self.clock.now_ms(),
            actor,
            action: action.into(),
            target: Some(target),
            remote_addr: peer.map(|p| p.ip().to_string()),
            outcome,
            detail: Some(detail),
        })
        .await;
    }

    /// An admin write refused to an operator who proved who they are (403).
    pub async fn denied(
        &self,
        who: &Principal,
        action: String,
        peer: Option<SocketAddr>,
        denied: &Denied,
    ) {
        self.write(AuditRow {
            seq: 0,
            at: self.clock.now_ms(),
            actor: who.actor(),
            action,
            target: None,
            remote_addr: peer.map(|p| p.ip().to_string()),
            outcome: "denied".into(),
            detail: Some(denied.to_string()),
        })
        .await;
    }

    /// An admin write refused to a caller who proved nothing (401): `actor` says what came
    /// (`anonymous`, or the id of a token that did not verify). Throttled.
    pub async fn unauthenticated(
        &self,
        actor: String,
        action: String,
        peer: Option<SocketAddr>,
        reason: &str,
    ) {
        let now = self.clock.now_ms();
        if !self.throttle().admit(now) {
            return;
        }
        self.write(AuditRow {
            seq: 0,
            at: now,
            actor,
            action,
            target: None,
            remote_addr: peer.map(|p| p.ip().to_string()),
            outcome: "unauthenticated".into(),
            detail: Some(reason.to_owned()),
        })
        .await;
    }

    /// Writes one row summing up the refusals the throttle did not record, if any.
    pub async fn flush_suppressed(&self) {
        let Some((n, since)) = self.throttle().take_suppressed() else {
            return;
        };
        tracing::warn!(
            refusals = n,
            "Admin writes without a valid operator token were refused faster than the audit log records them one by one (someone may be probing the operator API)"
        );
        self.write(AuditRow {
            seq: 0,
            at: self.clock.now_ms(),
            actor: "controller".into(),
            action: "audit.suppressed".into(),
            target: None,
            remote_addr: None,
            outcome: "ok".into(),
            detail: Some(format!(
                "{n} similar refusals not recorded (admin writes without a valid operator token) since {}",
                crate::store::from_millis(since).to_rfc3339()
            )),
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_second_and_the_rest_counted() {
        let mut t = Throttle::new(3.0, 1.0);
        let admitted = (0..10).filter(|_| t.admit(1_000)).count();
        assert_eq!(admitted, 3);
        assert_eq!(t.take_suppressed(), Some((7, 1_000)));
        assert_eq!(t.take_suppressed(), None);
        assert!(!t.admit(1_500), "half a second refills half a token");
        assert!(t.admit(2_000));
        assert!(!t.admit(2_000));
        // A long quiet spell refills up to the burst, not beyond.
        let admitted = (0..10).filter(|_| t.admit(100_000)).count();
        assert_eq!(admitted, 3);
        assert_eq!(t.take_suppressed(), Some((9, 1_500)));
    }
}
