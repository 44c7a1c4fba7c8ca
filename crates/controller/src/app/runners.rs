//! Runners on GitHub that no VM needs any more (their VM ended, booted again, or is long
//! lost; or a runner whose VM we never heard of): removed in two passes, as
//! [`lifecycle::cleanup_step`] says, never while GitHub reports it online or busy.

use super::*;
use crate::token::Removed;

/// How often the runner lists are read (each pass costs a page of API calls per scope).
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// A lost VM's runner is left alone this long: the VM may only be partitioned.
const LOST_GRACE: Duration = Duration::from_secs(10 * 60);
/// An idle agent whose runner GitHub reports offline this long is flagged as a ghost.
const GHOST_AFTER: Duration = Duration::from_secs(5 * 60);

impl Controller {
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
