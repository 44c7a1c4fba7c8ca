//! Runners on GitHub that no VM needs any more. Two paths, both in their own loop (GitHub
//! being slow never holds up the reconciler):
//! - **at the end of a boot** ([`lifecycle::runner_done`]: the VM booted again, shut down,
//!   or its ephemeral job completed and the runner had a minute to remove itself), the
//!   boot's runner is removed by the id remembered when it was minted (found by name for a
//!   registration-token runner), unless GitHub says it is busy;
//! - **a cleanup pass** every minute lists the scope's runners with our label and removes
//!   whatever the first path missed (a VM lost past a grace period, a runner whose VM we
//!   never heard of, a controller restart) in two passes, as [`lifecycle::cleanup_step`]
//!   says, never while GitHub reports it online or busy.

use super::*;
use crate::token::Removed;
use futures_util::StreamExt;

/// A boot's runner waiting to be removed from GitHub (in memory: after a restart, the
/// cleanup pass finds what was waiting here).
#[derive(Debug, Clone)]
pub(super) struct EndedRunner {
    pool_id: String,
    vm_id: String,
    why: lifecycle::RunnerEnd,
    due_at: Millis,
    tries: u32,
}

/// At most this many runners wait for removal; beyond, the cleanup pass finds them.
const MAX_ENDED: usize = 100_000;
/// Removals tried per pass, and at once.
const REMOVALS_PER_PASS: usize = 500;
const REMOVALS_AT_ONCE: usize = 4;
/// A removal that failed is tried again after this long, this many times in all.
const REMOVAL_RETRY_MS: Millis = 60_000;
const REMOVAL_TRIES: u32 = 3;
/// How many of a VM's `github_runner` notes are searched for a runner's id (one per boot).
const MINTED_NOTES_READ: u32 = 16;

/// How often the runner lists are read (each pass costs a page of API calls per scope).
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// A lost VM's runner is left alone this long: the VM may only be partitioned.
const LOST_GRACE: Duration = Duration::from_secs(10 * 60);
/// An idle agent whose runner GitHub reports offline this long is flagged as a ghost.
const GHOST_AFTER: Duration = Duration::from_secs(5 * 60);

impl Controller {
    /// One pass over the runners on GitHub: removes the runners of ended boots that are
    /// due, and runs a cleanup pass if one is due. Errors are logged, never returned: every
    /// step is tried again later.
    pub async fn runners_once(&self) -> RunnerReport {
        let now = self.now_ms();
        let mut report = RunnerReport {
            removed_at_end: self.remove_ended_runners(now).await,
            ..RunnerReport::default()
        };
        match self.cleanup_runners_if_due(now).await {
            Ok(Some((marked, deleted))) => {
                report.runners_marked = marked;
                report.runners_deleted = deleted;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "Runner cleanup pass failed; the next pass tries again");
            }
        }
        report
    }

    /// Notes the runner of a boot that is done after the VM changed from `old` to `vm`
    /// (`event`: an event of the current boot that caused it), if the pool's source
    /// registers runners on GitHub; it is removed once due ([`Controller::runners_once`]).
    pub(super) fn note_runner_done(
        &self,
        old: Option<&VmRecord>,
        vm: &VmRecord,
        event: Option<&EventKind>,
        now: Millis,
    ) {
        let Some(done) = lifecycle::runner_done(old, vm, event) else {
            return;
        };
        let manages = self
            .settings
            .pools
            .get(&vm.pool_id)
            .is_ok_and(|p| p.token.runner_label().is_some());
        if !manages {
            return;
        }
        let mut ended = self.ended();
        if ended.len() >= MAX_ENDED {
            return;
        }
        let name = lifecycle::runner_name(&vm.vm_id, done.boot_seq);
        ended.entry(name).or_insert(EndedRunner {
            pool_id: vm.pool_id.clone(),
            vm_id: vm.vm_id.clone(),
            why: done.why,
            due_at: now + done.why.grace_ms(),
            tries: 0,
        });
    }

    /// Removes the runners of ended boots that are due (a few at once). Returns how many
    /// were removed or found gone.
    pub async fn remove_ended_runners(&self, now: Millis) -> usize {
        let due: Vec<(String, EndedRunner)> = {
            let mut ended = self.ended();
            let names: Vec<String> = ended
                .iter()
                .filter(|(_, r)| r.due_at <= now)
                .map(|(n, _)| n.clone())
                .take(REMOVALS_PER_PASS)
                .collect();
            names
                .into_iter()
                .filter_map(|n| ended.remove(&n).map(|r| (n, r)))
                .collect()
        };
        futures_util::stream::iter(due)
            .map(|(name, r)| self.remove_ended(name, r, now))
            .buffer_unordered(REMOVALS_AT_ONCE)
            .filter(|removed| std::future::ready(*removed))
            .count()
            .await
    }

    /// Removes one ended boot's runner. Returns whether it is gone from GitHub.
    async fn remove_ended(&self, name: String, mut r: EndedRunner, now: Millis) -> bool {
        let Ok(reg) = self.settings.pools.get(&r.pool_id) else {
            return false;
        };
        let id = match self.minted_runner_id(&r.vm_id, &name).await {
            Ok(id) => id,
            Err(e) => {
                warn!(vm_id = %r.vm_id, runner = %name, error = %crate::error::chain(&e), "Could not read which runner GitHub minted for the VM; the cleanup pass removes it");
                return false;
            }
        };
        match reg.token.remove_runner_named(&name, id).await {
            Ok(Removed::Deleted) => {
                self.settings.github_metrics.runners_deleted.inc();
                info!(vm_id = %r.vm_id, pool_id = %r.pool_id, runner = %name, runner_id = ?id, why = r.why.as_str(), "Runner removed from GitHub: its boot is done");
                self.log_runner_removed(&r, &name, id, now).await;
                true
            }
            Ok(Removed::Gone) => true,
            Ok(Removed::Busy) => {
                info!(vm_id = %r.vm_id, runner = %name, why = r.why.as_str(), "Runner not removed: GitHub says it is running a job; the cleanup pass removes it once it is idle");
                false
            }
            Err(e) => {
                r.tries += 1;
                if r.tries < REMOVAL_TRIES {
                    r.due_at = now + REMOVAL_RETRY_MS;
                    self.ended().insert(name, r);
                } else {
                    warn!(vm_id = %r.vm_id, runner = %name, error = %crate::error::chain(&e), "Could not remove an ended boot's runner from GitHub after {REMOVAL_TRIES} tries; the cleanup pass removes it");
                }
                false
            }
        }
    }

    /// The id GitHub gave runner `name` when it was minted for the VM (noted on the VM's
    /// timeline at first delivery); `None` for a runner registered with a token.
    pub(super) async fn minted_runner_id(
        &self,
        vm_id: &str,
        name: &str,
    ) -> Result<Option<u64>, ApiError> {
        let notes = self
            .store
            .vm_log_latest(vm_id, "github_runner", MINTED_NOTES_READ)
            .await?;
        Ok(notes.iter().find_map(|n| {
            let d: Value = serde_json::from_str(n.detail.as_deref()?).ok()?;
            (d["runner_name"].as_str() == Some(name))
                .then(|| d["runner_id"].as_u64())
                .flatten()
        }))
    }

    async fn log_runner_removed(&self, r: &EndedRunner, name: &str, id: Option<u64>, now: Millis) {
        let row = VmLogRow {
            vm_id: r.vm_id.clone(),
            at: now,
            kind: "github_runner_removed".into(),
            detail: Some(
                json!({"runner_name": name, "runner_id": id, "why": r.why.as_str()}).to_string(),
            ),
        };
        if let Err(e) = self.store.write(vec![Mutation::VmLog(row)]).await {
            warn!(vm_id = %r.vm_id, error = %crate::error::chain(&e), "Could not record a runner's removal on the VM's timeline");
        }
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, EndedRunner>> {
        self.ended_runners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One cleanup pass, if one is due. Returns (marked, deleted).
    pub(super) async fn cleanup_runners_if_due(
        &self,
        now: Millis,
    ) -> Result<Option<(usize, usize)>, ApiError> {
        let last = self
            .last_runner_cleanup
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last < CLEANUP_EVERY.as_millis() as Millis {
            return Ok(None);
        }
        self.last_runner_cleanup
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.cleanup_runners(now).await.map(Some)
    }

    /// Reads every GitHub-minting pool's runners once (pools sharing a source are read once)
    /// and marks or deletes the stale ones. A source that cannot be read is logged and left
    /// for the next pass. Returns (marked, deleted).
    pub async fn cleanup_runners(&self, now: Millis) -> Result<(usize, usize), ApiError> {
        let lost_before = now - LOST_GRACE.as_millis() as Millis;
        let mut seen_sources: Vec<usize> = Vec::new();
        let mut seen_runners = std::collections::HashSet::new();
        let (mut marked, mut deleted) = (0, 0);
        for (pool_id, reg) in self.settings.pools.iter() {
            let key = Arc::as_ptr(&reg.token).cast::<()>() as usize;
            if seen_sources.contains(&key) {
                continue;
            }
            seen_sources.push(key);
            let runners = match reg.token.our_runners().await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    warn!(pool_id, error = %crate::error::chain(&e), "Could not list the pool's runners on GitHub; stale runners are cleaned up at a later pass");
                    continue;
                }
            };
            for r in runners {
                seen_runners.insert(r.id);
                let vm = match lifecycle::runner_owner(&r.name) {
                    Some((vm_id, _)) => self.store.vm_get(vm_id).await?,
                    None => None,
                };
                let stale = lifecycle::runner_is_stale(&r, vm.as_ref(), lost_before);
                self.watch_ghost(&r, vm.as_ref(), now).await;
                let was_marked = self.marks().contains(&r.id);
                match lifecycle::cleanup_step(stale, was_marked, &r) {
                    lifecycle::Cleanup::Keep => {
                        self.marks().remove(&r.id);
                    }
                    lifecycle::Cleanup::Mark => {
                        if self.marks().insert(r.id) {
                            marked += 1;
                            info!(pool_id, runner_id = r.id, runner = %r.name, online = r.online, busy = r.busy, "Runner on GitHub no VM needs; it is removed at the next pass if still offline and idle");
                        }
                    }
                    lifecycle::Cleanup::Delete => match reg.token.remove_runner(r.id).await {
                        Ok(Removed::Deleted | Removed::Gone) => {
                            self.marks().remove(&r.id);
                            deleted += 1;
                            self.settings.github_metrics.runners_deleted.inc();
                            info!(pool_id, runner_id = r.id, runner = %r.name, "Runner removed from GitHub");
                        }
                        Ok(Removed::Busy) => {
                            info!(pool_id, runner_id = r.id, runner = %r.name, "Runner not removed: GitHub says it is running a job");
                        }
                        Err(e) => {
                            warn!(pool_id, runner_id = r.id, error = %crate::error::chain(&e), "Could not remove a runner on GitHub; trying again at the next pass");
                        }
                    },
                }
            }
        }
        let ghosts = {
            let mut g = self.ghosts();
            g.retain(|id, _| seen_runners.contains(id));
            g.values().filter(|(_, flagged)| *flagged).count()
        };
        self.settings
            .github_metrics
            .ghost_runners
            .set(i64::try_from(ghosts).unwrap_or(i64::MAX));
        // Marks of runners GitHub no longer lists are dropped.
        let stale = {
            let mut marks = self.marks();
            marks.retain(|id| seen_runners.contains(id));
            marks.len()
        };
        self.settings
            .github_metrics
            .runners_stale
            .set(i64::try_from(stale).unwrap_or(i64::MAX));
        Ok((marked, deleted))
    }

    /// Tracks since when a runner has been a ghost; logs it on its VM's timeline (and at
    /// WARN) once it has been one for [`GHOST_AFTER`].
    async fn watch_ghost(&self, r: &lifecycle::GitHubRunner, vm: Option<&VmRecord>, now: Millis) {
        if !lifecycle::is_ghost(r, vm) {
            self.ghosts().remove(&r.id);
            return;
        }
        let newly_flagged = {
            let mut ghosts = self.ghosts();
            let entry = ghosts.entry(r.id).or_insert((now, false));
            let due = now - entry.0 >= GHOST_AFTER.as_millis() as Millis;
            let first = due && !entry.1;
            entry.1 |= due;
            first
        };
        let (Some(vm), true) = (vm, newly_flagged) else {
            return;
        };
        warn!(vm_id = %vm.vm_id, runner_id = r.id, runner = %r.name, "Ghost runner: the agent says its runner is idle, but GitHub has reported it offline for 5 minutes; jobs cannot reach it. Check the VM's network to GitHub, or drain and replace the VM");
        let row = VmLogRow {
            vm_id: vm.vm_id.clone(),
            at: now,
            kind: "ghost_runner".into(),
            detail: Some(json!({"runner_id": r.id, "runner": r.name}).to_string()),
        };
        if let Err(e) = self.store.write(vec![Mutation::VmLog(row)]).await {
            warn!(vm_id = %vm.vm_id, error = %crate::error::chain(&e), "Could not record a ghost runner");
        }
    }

    fn ghosts(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (Millis, bool)>> {
        self.ghost_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.runner_marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
