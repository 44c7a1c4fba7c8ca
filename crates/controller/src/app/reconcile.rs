//! The reconciler's pass: expiry, silent VMs, registrations that are missing, retention.

use super::*;
use crate::store::SilentChange;

impl Controller {
    /// One reconciler pass: expire overdue commands, mark silent VMs unhealthy or lost, and
    /// issue registrations that are due (first time, or after an expired one); every
    /// retention interval, thin and drop old history. Idempotent: each step re-reads the store.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, ApiError> {
        let now = self.now_ms();
        let mut report = ReconcileReport {
            expired_commands: self.expire_overdue(now).await?,
            ..ReconcileReport::default()
        };
        if let Some((heartbeats, events)) = self.prune_if_due(now).await? {
            report.heartbeats_pruned = heartbeats;
            report.events_pruned = events;
        }
        report.health_changes = self.sweep_silent(now).await?;
        report.registrations_issued = self.issue_missing_registrations().await?;
        Ok(report)
    }

    /// Open commands past `expires_at` expire; a VM whose registration expired forgets it
    /// (under its lock, re-checked: a concurrent write may have pointed it elsewhere), so the
    /// next step issues a new one. Returns how many expired.
    async fn expire_overdue(&self, now: Millis) -> Result<usize, ApiError> {
        let outcomes = self
            .store
            .write(vec![Mutation::ExpireCommands { now }])
            .await?;
        let Some(Outcome::Expired(list)) = outcomes.into_iter().next() else {
            return Ok(0);
        };
        for e in &list {
            warn!(vm_id = %e.vm_id, command_id = %e.id, command_type = %e.command_type, "Command expired before acknowledgment");
            if e.command_type != REGISTER_RUNNER {
                continue;
            }
            let _guard = self.locks.lock(&e.vm_id).await;
            if let Some(mut vm) = self.store.vm_get(&e.vm_id).await?
                && vm.registration_command_id.as_deref() == Some(e.id.as_str())
            {
                vm.registration_command_id = None;
                vm.updated_at = now;
                self.store.write(vec![Mutation::PutVm(vm)]).await?;
            }
        }
        Ok(list.len())
    }

    /// The retention pass, once per retention interval: heartbeats and events pruned.
    async fn prune_if_due(&self, now: Millis) -> Result<Option<(u64, u64)>, ApiError> {
        let r = &self.settings.retention;
        let last = self.last_prune.load(std::sync::atomic::Ordering::Relaxed);
        if now - last < r.interval.as_millis() as Millis {
            return Ok(None);
        }
        self.last_prune
            .store(now, std::sync::atomic::Ordering::Relaxed);
        let ms = |d: Duration| d.as_millis() as Millis;
        let pruned = self
            .store
            .write(vec![Mutation::PruneHistory(crate::store::Prune {
                heartbeats_full_after: now - ms(r.heartbeat_full),
                heartbeat_bucket_ms: ms(r.heartbeat_bucket),
                heartbeats_drop_before: now - ms(r.heartbeat_max_age),
                events_drop_before: r.event_max_age.map(|a| now - ms(a)),
                limit: 50_000,
            })])
            .await?;
        Ok(match pruned.first() {
            Some(Outcome::Pruned {
                heartbeats, events, ..
            }) => Some((*heartbeats, *events)),
            _ => None,
        })
    }

    /// `register_runner` for VMs waiting without one (its first issue failed, or the last one
    /// expired undelivered). Returns how many were issued.
    async fn issue_missing_registrations(&self) -> Result<usize, ApiError> {
        let mut issued = 0;
        for candidate in self.store.vms_needing_registration().await? {
            let _guard = self.locks.lock(&candidate.vm_id).await;
            if let Some(mut vm) = self.store.vm_get(&candidate.vm_id).await?
                && lifecycle::needs_registration(&vm)
            {
                self.issue_registration_locked(&mut vm).await?;
                if vm.registration_command_id.is_some() {
                    issued += 1;
                }
            }
        }
        Ok(issued)
    }

    /// Silent VMs, as the lifecycle says ([`lifecycle::silent_change`]): healthy →
    /// unhealthy → lost, shutting down → terminated. Each change is a compare-and-set on
    /// what was read, so a VM heard from meanwhile keeps its health. Returns how many VMs'
    /// health changed.
    async fn sweep_silent(&self, now: Millis) -> Result<usize, ApiError> {
        let s = &self.settings;
        let silence = lifecycle::Silence::at(
            now,
            s.heartbeat_interval,
            s.unhealthy_after_missed,
            s.lost_after_missed,
        );
        let mut changes = Vec::new();
        let mut batch = Vec::new();
        for vm in self
            .store
            .vms_silent_before(silence.unhealthy_before)
            .await?
        {
            if let Some(change) = lifecycle::silent_change(&vm, &silence) {
                batch.push(Mutation::SilenceVm {
                    vm_id: vm.vm_id.clone(),
                    seen_at: vm.last_seen_at,
                    change,
                    at: now,
                });
                changes.push((vm.vm_id, change));
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        let outcomes = self.store.write(batch).await?;
        let mut applied = 0;
        for ((vm_id, change), outcome) in changes.into_iter().zip(outcomes) {
            if outcome != Outcome::Applied(true) {
                continue;
            }
            match change {
                SilentChange::Health { from, to } => {
                    applied += 1;
                    warn!(vm_id = %vm_id, from = from.as_str(), to = to.as_str(), "VM health changed: no heartbeat or contact for the configured number of intervals");
                }
                SilentChange::Terminated => {
                    info!(vm_id = %vm_id, "VM terminated: it went quiet after shutting down");
                }
            }
        }
        Ok(applied)
    }
}
