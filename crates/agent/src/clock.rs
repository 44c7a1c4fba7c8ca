//! The controller's time as this VM sees it. A VM's clock can be off by minutes or hours
//! (no NTP yet at boot, a broken image); every time the controller hands out (a credential's
//! expiry, a registration token's `expires_at`) is in the controller's time. So the agent
//! never compares those with its own clock: credentials are timed from when they arrived
//! (see `auth`), and expiry checks use the controller's time, estimated from the `Date`
//! header of its HTTP answers (every HTTP server sends one, base-contract ones included).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Offsets smaller than this (the `Date` header has one-second precision) are noise.
const NOISE_MS: i64 = 2_000;
/// An offset past this is worth a warning: the VM's clock should be fixed.
const WARN_MS: i64 = 60_000;

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);
static WARNED: AtomicBool = AtomicBool::new(false);

/// The offset (controller − local, ms) a `Date` header value implies at `local_ms`.
pub fn offset_from_date(date: &str, local_ms: i64) -> Option<i64> {
    let server = chrono::DateTime::parse_from_rfc2822(date).ok()?;
    let offset = server.timestamp_millis() - local_ms;
    // A reply stamped within the same second as its send has up to a second of rounding.
    Some(if offset.abs() < NOISE_MS { 0 } else { offset })
}

/// Notes the controller's `Date` header.
pub fn observe_date(date: &str) {
    let local = chrono::Utc::now().timestamp_millis();
    let Some(offset) = offset_from_date(date, local) else {
        return;
    };
    let old = OFFSET_MS.swap(offset, Ordering::Relaxed);
    if offset.abs() >= WARN_MS
        && (old - offset).abs() >= NOISE_MS
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            offset_secs = offset / 1000,
            "This VM's clock is off from the controller's; the controller's time is used for every expiry check. Fix the VM's time (NTP) so that its logs line up"
        );
    }
}

/// Unix ms now, in the controller's time as best known.
pub fn controller_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + OFFSET_MS.load(Ordering::Relaxed)
}

/// The controller's time now.
pub fn controller_now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(controller_now_ms()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_from_date_headers() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-03T08:00:00Z")
            .map(|t| t.timestamp_millis())
            .unwrap_or_default();
        assert_eq!(
            offset_from_date("Thu, 03 Dec 2026 08:00:00 GMT", at),
            Some(0)
        );
        assert_eq!(
            offset_from_date("Thu, 03 Dec 2026 08:00:00 GMT", at + 900),
            Some(0),
            "rounding"
        );
        // The VM runs three hours ahead of the controller.
        assert_eq!(
            offset_from_date("Thu, 03 Dec 2026 08:00:00 GMT", at + 3 * 3_600_000),
            Some(-3 * 3_600_000)
        );
        assert_eq!(offset_from_date("yesterday", at), None);
    }
}
