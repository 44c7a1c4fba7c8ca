//! The backstop poll: once per `[webhook] backstop_interval_secs`, for each GitHub scope
//! that scaled pools register runners in, what GitHub's API says of the jobs we hold open
//! and of the repositories' queued work ([`crate::github::demand`]), applied exactly as a
//! webhook delivery is ([`Controller::apply_job`]). What to ask is decided by
//! [`lifecycle::jobs_to_check`] and [`lifecycle::repositories_to_read`].

use super::*;
use crate::metrics::ChangeLabel;
use crate::token::{PollQuery, TokenSource};
use std::collections::BTreeMap;

/// Repositories a pool's jobs came from within this long are read by the poll.
const SEEN_FOR_MS: Millis = 7 * 24 * 3600 * 1000;

/// What one scope's pass changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackstopPass {
    pub found: u32,
    pub moved: u32,
    pub vanished: u32,
    pub calls: usize,
}

impl Controller {
    /// One backstop pass over every scope; returns what it changed in all.
    pub async fn backstop_once(&self) -> BackstopPass {
        let mut total = BackstopPass::default();
        let Some(interval) = self.settings.backstop.interval else {
            return total;
        };
        // Pools sharing one API and scope share one poll.
        let mut scopes: BTreeMap<String, (Arc<dyn TokenSource>, Vec<String>)> = BTreeMap::new();
        for (id, pool) in self.settings.pools.iter() {
            if id == "*" || pool.scaling.is_none() {
                continue;
            }
            if let Some(key) = pool.token.poll_key() {
                scopes
                    .entry(key)
                    .or_insert_with(|| (pool.token.clone(), Vec::new()))
                    .1
                    .push(id.to_owned());
            }
        }
        let quiet = Millis::try_from(interval.as_millis()).unwrap_or(Millis::MAX);
        for (key, (source, pools)) in scopes {
            match self.backstop_scope(&*source, &pools, quiet).await {
                Ok(pass) => {
                    total.found += pass.found;
                    total.moved += pass.moved;
                    total.vanished += pass.vanished;
                    total.calls += pass.calls;
                }
                Err(e) => {
                    warn!(scope = %key, error = %e, "Backstop poll failed to read or write the store; the next pass tries again");
                }
            }
        }
        total
    }

    async fn backstop_scope(
        &self,
        source: &dyn TokenSource,
        pools: &[String],
        quiet: Millis,
    ) -> Result<BackstopPass, ApiError> {
        let now = self.now_ms();
        let max_calls = self.settings.backstop.max_calls;
        let mut open = Vec::new();
        let mut seen = Vec::new();
        for pool in pools {
            open.extend(self.store.jobs_open_for_pool(pool).await?);
            seen.extend(
                self.store
                    .job_repositories(pool, now - SEEN_FOR_MS, 50)
                    .await?,
            );
        }
        let query = PollQuery {
            check: lifecycle::jobs_to_check(&open, now, quiet, max_calls.div_ceil(2)),
            seen,
            max_calls,
        };
        let Some(report) = source.poll_jobs(&query).await else {
            return Ok(BackstopPass::default());
        };
        let mut pass = BackstopPass {
            calls: report.calls,
            ..BackstopPass::default()
        };
        for update in &report.jobs {
            let answer = self.apply_job(None, update).await?;
            if answer.result == "applied" {
                if answer.new_job {
                    pass.found += 1;
                } else {
                    pass.moved += 1;
                }
            }
        }
        for id in &report.vanished {
            if let Some(job) = open.iter().find(|j| j.job_id == *id) {
                let gone = lifecycle::vanished(job, self.now_ms());
                if self.apply_job(None, &gone).await?.result == "applied" {
                    pass.vanished += 1;
                }
            }
        }
        self.count_backstop(&pass);
        if pass.found + pass.moved + pass.vanished > 0 {
            info!(pools = ?pools, found = pass.found, moved = pass.moved, vanished = pass.vanished, calls = pass.calls, "Backstop poll corrected jobs that webhooks missed; if this keeps happening, check the webhook's recent deliveries on GitHub");
        }
        if let Some(why) = &report.stopped {
            warn!(pools = ?pools, reason = %why, calls = pass.calls, "Backstop poll stopped early; the next pass goes on");
        }
        Ok(pass)
    }

    fn count_backstop(&self, pass: &BackstopPass) {
        for (change, n) in [
            ("found", pass.found),
            ("moved", pass.moved),
            ("vanished", pass.vanished),
        ] {
            if n > 0 {
                self.metrics
                    .scaling
                    .backstop_jobs
                    .get_or_create(&ChangeLabel {
                        change: change.into(),
                    })
                    .inc_by(u64::from(n));
            }
        }
    }
}
