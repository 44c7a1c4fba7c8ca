//! What each sized pool looked like over the last hours, for the dashboard's chart of pool
//! size and queued jobs: one sample per [`SAMPLE_SECS`] (each figure the largest the passes
//! in that span saw, so a VM that came and went within it still shows), the last
//! [`SAMPLES_KEPT`] kept in memory. A restart starts the chart afresh; Prometheus
//! (`mig_pool_vms`, `mig_pool_desired_vms`, `mig_pool_queued_jobs`) keeps the long history.

use super::*;
use std::collections::VecDeque;

/// One sample covers this long.
pub const SAMPLE_SECS: i64 = 10;
const SAMPLE_MS: Millis = SAMPLE_SECS * 1000;
/// Samples kept per pool: two hours.
pub const SAMPLES_KEPT: usize = 720;

/// A pool at one moment.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct PoolSample {
    /// Unix ms of the pass.
    pub at: Millis,
    pub desired: u32,
    pub actual: u32,
    pub busy: u32,
    pub queued_jobs: u32,
}

/// Adds `s` to `samples`: merged into the last sample (each figure the larger) when both
/// fall in the same [`SAMPLE_SECS`] span, and the oldest goes beyond `keep`.
pub fn push_sample(samples: &mut VecDeque<PoolSample>, s: PoolSample, keep: usize) {
    let span = |t: Millis| t.div_euclid(SAMPLE_MS);
    match samples.back_mut() {
        Some(last) if span(last.at) == span(s.at) => {
            *last = PoolSample {
                at: s.at.max(last.at),
                desired: s.desired.max(last.desired),
                actual: s.actual.max(last.actual),
                busy: s.busy.max(last.busy),
                queued_jobs: s.queued_jobs.max(last.queued_jobs),
            };
        }
        Some(last) if last.at > s.at => {}
        _ => samples.push_back(s),
    }
    while samples.len() > keep {
        samples.pop_front();
    }
}

impl Controller {
    /// Records what a pool's pass found.
    pub(super) fn record_sample(&self, pool_id: &str, v: &PoolScaleView) {
        let mut all = self
            .pool_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let samples = all.entry(pool_id.to_owned()).or_default();
        push_sample(
            samples,
            PoolSample {
                at: v.at,
                desired: v.desired,
                actual: v.actual,
                busy: v.busy,
                queued_jobs: v.queued_jobs,
            },
            SAMPLES_KEPT,
        );
    }

    /// A sized pool's samples since `since` (Unix ms), oldest first; `None` for a pool the
    /// controller does not size.
    pub fn pool_history(&self, pool_id: &str, since: Millis) -> Option<Vec<PoolSample>> {
        self.settings.pools.get(pool_id).ok()?.scaling.as_ref()?;
        let all = self
            .pool_history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(
            all.get(pool_id)
                .map(|s| s.iter().filter(|x| x.at >= since).copied().collect())
                .unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: Millis, actual: u32) -> PoolSample {
        PoolSample {
            at: ms,
            desired: actual,
            actual,
            busy: 0,
            queued_jobs: 0,
        }
    }

    #[test]
    fn one_sample_per_span_holding_its_peak_and_only_the_newest_kept() {
        let mut s = VecDeque::new();
        push_sample(&mut s, at(1_000, 1), 3);
        push_sample(&mut s, at(5_000, 2), 3);
        push_sample(&mut s, at(9_000, 0), 3);
        assert_eq!(s.len(), 1, "same span: one sample");
        assert_eq!((s[0].at, s[0].actual), (9_000, 2), "the span's peak");
        push_sample(&mut s, at(10_000, 3), 3);
        push_sample(&mut s, at(25_000, 4), 3);
        push_sample(&mut s, at(31_000, 5), 3);
        assert_eq!(
            s.iter().map(|x| x.actual).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        // A sample from the past (a clock step back) does not reorder the chart.
        push_sample(&mut s, at(5_000, 9), 3);
        assert_eq!(s.back().map(|x| x.actual), Some(5));
    }
}
