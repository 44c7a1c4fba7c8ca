//! What the controller's GitHub traffic looks like, for `/metrics`: requests by endpoint and
//! status, the rate limit left, mint latency, how much of the mint budget is in use, and the
//! runner cleanup. One set for the whole controller (every App or PAT records into it), so a
//! metric name is registered once.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    /// `app:<id>` or `pat` (never the token).
    pub account: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `jit` or `registration_token`.
    pub kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn mint_histogram() -> Histogram {
    // 10 ms .. about 80 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

#[derive(Debug, Clone)]
pub struct GitHubMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub rate_limit_remaining: Family<AccountLabel, Gauge>,
    pub mint_budget_used: Family<AccountLabel, FloatGauge>,
    pub mint_waiting: Family<AccountLabel, Gauge>,
    pub mint_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    pub runners_deleted: Counter,
    pub runners_stale: Gauge,
    pub ghost_runners: Gauge,
}

impl Default for GitHubMetrics {
    fn default() -> GitHubMetrics {
        GitHubMetrics {
            requests: Family::default(),
            rate_limit_remaining: Family::default(),
            mint_budget_used: Family::default(),
            mint_waiting: Family::default(),
            mint_seconds: Family::new_with_constructor(mint_histogram),
            runners_deleted: Counter::default(),
            runners_stale: Gauge::default(),
            ghost_runners: Gauge::default(),
        }
    }
}

impl GitHubMetrics {
    /// Registers every metric (`mig_github_*` under the controller's `mig` prefix).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "github_requests",
            "Calls to the GitHub API, by endpoint and HTTP status (0: no answer)",
            self.requests.clone(),
        );
        r.register(
            "github_rate_limit_remaining",
            "X-RateLimit-Remaining of the last answer, per App or PAT",
            self.rate_limit_remaining.clone(),
        );
        r.register(
            "github_mint_budget_used_ratio",
            "Share of the mint budget (registration tokens and JIT configs per minute) in use, per App or PAT",
            self.mint_budget_used.clone(),
        );
        r.register(
            "github_mint_waiting",
            "Registrations waiting for the mint budget, per App or PAT (served in the order they asked)",
            self.mint_waiting.clone(),
        );
        r.register(
            "github_mint_seconds",
            "Time to mint a registration token or a JIT runner config on GitHub",
            self.mint_seconds.clone(),
        );
        r.register(
            "github_runners_deleted",
            "Runners removed from GitHub because no VM needed them",
            self.runners_deleted.clone(),
        );
        r.register(
            "github_runners_stale",
            "Runners on GitHub no VM needs, marked for removal at the next cleanup pass",
            self.runners_stale.clone(),
        );
        r.register(
            "github_ghost_runners",
            "Runners whose agent says idle while GitHub has reported them offline for over 5 minutes (jobs cannot reach them)",
            self.ghost_runners.clone(),
        );
    }
}

/// A low-cardinality name for the endpoint of an API path (no owner, repo or id).
pub fn endpoint(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default();
    let name = match last {
        "registration-token" | "remove-token" | "generate-jitconfig" | "access_tokens"
        | "installation" | "runner-groups" | "runners" => last,
        id if id.chars().all(|c| c.is_ascii_digit()) && path.contains("/actions/runners/") => {
            "runner"
        }
        _ => "other",
    };
    format!("{method} {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_carry_no_names_or_ids() {
        assert_eq!(
            endpoint("POST", "/orgs/acme/actions/runners/generate-jitconfig"),
            "POST generate-jitconfig"
        );
        assert_eq!(
            endpoint("DELETE", "/repos/a/b/actions/runners/42"),
            "DELETE runner"
        );
        assert_eq!(
            endpoint("GET", "http://x/orgs/a/actions/runners?per_page=100&page=2"),
            "GET runners"
        );
        assert_eq!(
            endpoint("POST", "/app/installations/7/access_tokens"),
            "POST access_tokens"
        );
        assert_eq!(endpoint("GET", "/something/else"), "GET other");
    }
}
