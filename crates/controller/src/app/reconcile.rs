//! The reconciler's pass: expiry, silent VMs, registrations that are missing, retention.

use super::*;

impl Controller {
    /// One reconciler pass: expire overdue commands, mark silent VMs unhealthy or lost, and
    /// issue registrations that are due (first time, or after an expired one).
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, ApiError> {
        let now = self.now_ms();
        let interval = self.settings.heartbeat_interval.as_millis() as Millis;
        let outcomes = self
            .store
            .write(vec![
                Mutation::ExpireCommands { now },
                Mutation::MarkSilentVms {
                    now,
                    unhealthy_before: now
                        - interval * Millis::from(self.settings.unhealthy_after_missed),
                    lost_before: now - interval * Millis::from(self.settings.lost_after_missed),
                },
            ])
            .await?;
        let mut report = ReconcileReport::default();
        let r = &self.settings.retention;
        let last = self.last_prune.load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= r.interval.as_millis() as Millis {
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
            if let Some(Outcome::Pruned { heartbeats, events }) = pruned.first() {
                report.heartbeats_pruned = *heartbeats;
                report.events_pruned = *events;
            }
        }
        for o in outcomes {
            match o {
                Outcome::Expired(list) => {
                    report.expired_commands = list.len();
                    for e in list {
                        warn!(vm_id = %e.vm_id, command_id = %e.id, command_type = %e.command_type, "Command expired before acknowledgment");
                        if e.command_type == REGISTER_RUNNER {
                            // Re-check under the VM lock: a concurrent write may have put the id back.
                            let _guard = self.locks.lock(&e.vm_id).await;
                            if let Some(mut vm) = self.store.vm_get(&e.vm_id).await?
                                && vm.registration_command_id.as_deref() == Some(e.id.as_str())
                            {
                                vm.registration_command_id = None;
                                vm.updated_at = now;
                                self.store.write(vec![Mutation::PutVm(vm)]).await?;
                            }
                        }
                    }
                }
                Outcome::HealthChanged(list) => {
                    report.health_changes = list.len();
                    for c in list {
                        warn!(vm_id = %c.vm_id, from = c.from.as_str(), to = c.to.as_str(), "VM health changed");
                    }
                }
                _ => {}
            }
        }
        for candidate in self.store.vms_needing_registration().await? {
            let _guard = self.locks.lock(&candidate.vm_id).await;
            if let Some(mut vm) = self.store.vm_get(&candidate.vm_id).await?
                && lifecycle::needs_registration(&vm)
            {
                self.issue_registration_locked(&mut vm).await?;
                if vm.registration_command_id.is_some() {
                    report.registrations_issued += 1;
                }
            }
        }
        Ok(report)
    }
}
