//! The scaler: one pass per pool with a provider, on a timer and whenever demand or a VM
//! changes. It reads what the provider lists, what is stored (instances, VMs, drains,
//! queued jobs), asks [`lifecycle::plan`] what to do, and does it: instances are recorded
//! before they are created (a restart never creates a name twice or forgets one),
//! instances the provider lists that we never recorded are adopted, a VM is drained
//! through the command queue, and a VM is deleted only after its runner is removed on
//! GitHub (never while GitHub says it runs a job). Idempotent: a pass after any crash
//! picks up where the last one stopped.

use super::*;
use crate::lifecycle::{Drain, ScaleAction, ScaleReason};
use crate::model::InstanceRecord;
use crate::provider::{InstanceSpec, InstanceStatus, PoolScaling, ProviderError, ProviderInstance};
use crate::token::Removed;

/// Where agents of locally created VMs reach the controller (set once the listeners are
/// bound).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub http: String,
    pub grpc: String,
}

/// What the last pass found for a pool, for the pool view.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolScaleView {
    pub desired: u32,
    pub actual: u32,
    pub spare: u32,
    pub busy: u32,
    pub queued_jobs: u32,
    pub at: Millis,
    /// The last provider failure, until a pass succeeds.
    pub last_error: Option<String>,
    /// VMs the provider keeps failing to bring up, and why (a stock-out, a quota).
    pub provider_trouble: Option<String>,
}

/// What the provider says it cannot bring up: `None`, or how many VMs and the first reason.
fn trouble_of(listed: &[ProviderInstance]) -> Option<String> {
    let troubled: Vec<&str> = listed.iter().filter_map(|l| l.trouble.as_deref()).collect();
    let first = troubled.first()?;
    Some(format!(
        "{} VM(s) cannot be brought up: {first}",
        troubled.len()
    ))
}

/// A drain sent by the scaler waits for its agent this long.
const DRAIN_TTL: Duration = Duration::from_secs(15 * 60);

impl Controller {
    /// Records where agents reach this controller.
    pub fn set_advertised(&self, a: Advertised) {
        let _ = self.advertised.set(a);
    }

    /// Asks for a scaler pass soon (demand or a VM changed).
    pub(super) fn nudge_scaler(&self) {
        self.scale_nudge.notify_one();
    }

    /// Waits until a pass is asked for.
    pub async fn scaler_nudged(&self) {
        self.scale_nudge.notified().await;
    }

    /// The last pass's figures of a scaled pool (`None` before its first pass).
    pub fn pool_scale_view(&self, pool_id: &str) -> Option<PoolScaleView> {
        self.scale_views().get(pool_id).cloned()
    }

    fn scale_views(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, PoolScaleView>> {
        self.pool_scale
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass over every pool with a provider. A pool whose provider fails is logged and
    /// tried again at the next pass; the others go on.
    pub async fn scale_once(&self) {
        let pools: Vec<(String, PoolScaling)> = self
            .settings
            .pools
            .iter()
            .filter_map(|(id, p)| p.scaling.clone().map(|s| (id.to_owned(), s)))
            .collect();
        for (pool_id, scaling) in pools {
            let now = self.now_ms();
            let result = self.scale_pool(&pool_id, &scaling, now).await;
            let mut views = self.scale_views();
            let view = views.entry(pool_id.clone()).or_default();
            match result {
                Ok(v) => {
                    self.record_sample(&pool_id, &v);
                    if v.provider_trouble != view.provider_trouble
                        && let Some(t) = &v.provider_trouble
                    {
                        warn!(pool_id, trouble = %t, "The pool's provider cannot bring up VMs; the scaler waits for them instead of asking for more");
                    }
                    *view = v;
                }
                Err(e) => {
                    warn!(pool_id, error = %e, "Scaler pass failed for the pool; the next pass tries again (check the pool's provider)");
                    view.last_error = Some(e);
                    view.at = now;
                }
            }
        }
    }

    /// The provider's own check, until it passes once: its warnings are logged; an error
    /// fails the pass (and shows on the pool) until someone fixes the provider's settings.
    async fn preflight(&self, pool_id: &str, scaling: &PoolScaling) -> Result<(), String> {
        if self.preflighted(pool_id) {
            return Ok(());
        }
        let warnings = scaling
            .provider
            .preflight()
            .await
            .map_err(|e| e.to_string())?;
        for w in &warnings {
            warn!(pool_id, warning = %w, "The pool's provider has settings that can hurt running jobs; fix them");
        }
        self.pool_preflighted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pool_id.to_owned());
        Ok(())
    }

    fn preflighted(&self, pool_id: &str) -> bool {
        self.pool_preflighted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(pool_id)
    }

    /// Records the provider's id of an instance the first time it is listed with one; a name
    /// listed with another id is another VM (a MIG recreated it: autohealing, a stop out of
    /// band), which its timeline says. Its agent announces a new boot, which ends the old
    /// boot's runner. Returns the writes, if the id is new.
    fn note_provider_id(
        &self,
        pool_id: &str,
        r: &mut InstanceRecord,
        listed: &[ProviderInstance],
        now: Millis,
    ) -> Option<Vec<Mutation>> {
        let id = listed
            .iter()
            .find(|l| l.name == r.name)
            .and_then(|l| l.id.clone())?;
        match r.provider_id.replace(id.clone()) {
            Some(old) if old != id => {
                warn!(pool_id, vm_id = %r.name, old_id = %old, new_id = %id, "The provider recreated the VM under its name (autohealing, or a stop outside the controller): it is a new VM");
                r.updated_at = now;
                Some(vec![
                    Mutation::VmLog(VmLogRow {
                        vm_id: r.name.clone(),
                        at: now,
                        kind: "vm_recreated".into(),
                        detail: Some(
                            json!({"old_id": old, "new_id": id, "by": "provider"}).to_string(),
                        ),
                    }),
                    Mutation::PutInstance(r.clone()),
                ])
            }
            Some(_) => None,
            None => {
                r.updated_at = now;
                Some(vec![Mutation::PutInstance(r.clone())])
            }
        }
    }

    /// One pool's pass.
    async fn scale_pool(
        &self,
        pool_id: &str,
        scaling: &PoolScaling,
        now: Millis,
    ) -> Result<PoolScaleView, String> {
        self.preflight(pool_id, scaling).await?;
        let listed = scaling.provider.list().await.map_err(|e| e.to_string())?;
        let records = self
            .adopt_and_settle(pool_id, scaling, &listed, now)
            .await
            .map_err(|e| e.to_string())?;
        let (vms, drains) = self
            .instance_facts(pool_id, &records)
            .await
            .map_err(|e| e.to_string())?;
        let stopped = |name: &str| {
            listed
                .iter()
                .any(|l| l.name == name && l.status == InstanceStatus::Stopped)
        };
        let instances: Vec<lifecycle::Instance<'_>> = records
            .iter()
            .zip(&vms)
            .zip(&drains)
            .map(|((r, vm), drain)| lifecycle::Instance {
                name: &r.name,
                created_at: r.requested_at,
                vm: vm.as_ref(),
                drain: *drain,
                stopped: stopped(&r.name),
            })
            .collect();
        let queued = self
            .store
            .jobs_open_for_pool(pool_id)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .filter(|j| j.status == "queued")
            .count();
        let queued = u32::try_from(queued).unwrap_or(u32::MAX);
        let plan = lifecycle::plan(&scaling.policy, &instances, queued, now);
        let label = crate::metrics::PoolLabel {
            pool: pool_id.to_owned(),
        };
        let m = &self.metrics.scaling;
        m.desired.get_or_create(&label).set(i64::from(plan.desired));
        m.actual.get_or_create(&label).set(i64::from(plan.actual));
        m.queued.get_or_create(&label).set(i64::from(queued));
        let mut last_error = None;
        for action in plan.actions.clone() {
            if let Err(e) = self.act(pool_id, scaling, &records, action, now).await {
                warn!(pool_id, error = %e, "Scaler action failed; the next pass tries again");
                last_error = Some(e);
            }
        }
        Ok(PoolScaleView {
            desired: plan.desired,
            actual: plan.actual,
            spare: plan.spare,
            busy: plan.busy,
            queued_jobs: queued,
            at: now,
            last_error,
            provider_trouble: trouble_of(&listed),
        })
    }

    /// What the agents of `records` reported, and where the scaler's drains of them stand.
    /// One read for the pool's VMs; an instance whose VM is not in the pool (bound elsewhere)
    /// is read on its own.
    async fn instance_facts(
        &self,
        pool_id: &str,
        records: &[InstanceRecord],
    ) -> Result<(Vec<Option<VmRecord>>, Vec<Drain>), ApiError> {
        let mut in_pool: std::collections::HashMap<String, VmRecord> = self
            .store
            .vms_in_pool(pool_id)
            .await?
            .into_iter()
            .map(|v| (v.vm_id.clone(), v))
            .collect();
        let mut vms = Vec::with_capacity(records.len());
        let mut drains = Vec::with_capacity(records.len());
        for r in records {
            let vm = match in_pool.remove(&r.name) {
                Some(v) => Some(v),
                None => self.store.vm_get(&r.name).await?,
            };
            vms.push(vm);
            drains.push(self.drain_state(r).await?);
        }
        Ok((vms, drains))
    }

    /// Brings the stored instances in line with the provider's list: instances listed but
    /// never recorded are adopted; recorded ones the provider lost are forgotten once past
    /// the boot timeout (a provider may list a new instance late); deletions cut short are
    /// finished. Returns the live instances.
    async fn adopt_and_settle(
        &self,
        pool_id: &str,
        scaling: &PoolScaling,
        listed: &[ProviderInstance],
        now: Millis,
    ) -> Result<Vec<InstanceRecord>, ApiError> {
        let mut records = self.store.instances_live(pool_id).await?;
        let mut batch = Vec::new();
        for l in listed {
            if !records.iter().any(|r| r.name == l.name) {
                info!(pool_id, vm_id = %l.name, status = l.status.as_str(), "Instance adopted: the provider lists it and it was not recorded (a restart, or made by hand)");
                let r = InstanceRecord {
                    name: l.name.clone(),
                    pool_id: pool_id.to_owned(),
                    provider: scaling.provider.kind().to_owned(),
                    state: "running".into(),
                    requested_at: l.created_at.unwrap_or(now).min(now),
                    provider_id: l.id.clone(),
                    drain_command_id: None,
                    drain_reason: None,
                    delete_reason: None,
                    deleted_at: None,
                    updated_at: now,
                };
                batch.push(Mutation::PutInstance(r.clone()));
                records.push(r);
            }
        }
        let mut live = Vec::with_capacity(records.len());
        for mut r in records {
            let is_listed = listed.iter().any(|l| l.name == r.name);
            if let Some(rows) = self.note_provider_id(pool_id, &mut r, listed, now) {
                batch.extend(rows);
            }
            if r.state == "deleting" {
                let reason = r.delete_reason.clone().unwrap_or_default();
                self.finish_delete(scaling, &mut r, &reason, now).await?;
                continue;
            }
            if !is_listed && now - r.requested_at >= scaling.policy.boot_timeout {
                warn!(pool_id, vm_id = %r.name, "Instance gone: the provider no longer lists it");
                r.state = "deleted".into();
                r.delete_reason = Some("vanished".into());
                r.deleted_at = Some(now);
                r.updated_at = now;
                batch.push(Mutation::PutInstance(r));
                continue;
            }
            live.push(r);
        }
        if !batch.is_empty() {
            self.store.write(batch).await?;
        }
        Ok(live)
    }

    /// Where the scaler's drain of an instance stands.
    async fn drain_state(&self, r: &InstanceRecord) -> Result<Drain, ApiError> {
        let (Some(id), Some(reason)) = (&r.drain_command_id, &r.drain_reason) else {
            return Ok(Drain::None);
        };
        let reason = ScaleReason::parse(reason).unwrap_or(ScaleReason::Idle);
        Ok(match self.store.command_get(id).await?.map(|c| c.state) {
            Some(CommandState::Acknowledged) => Drain::Acked(reason),
            Some(CommandState::Pending | CommandState::Delivered) => Drain::Sent(reason),
            // Failed or expired: decided again from scratch.
            _ => Drain::None,
        })
    }

    async fn act(
        &self,
        pool_id: &str,
        scaling: &PoolScaling,
        records: &[InstanceRecord],
        action: ScaleAction,
        now: Millis,
    ) -> Result<(), String> {
        let find = |name: &str| records.iter().find(|r| r.name == name).cloned();
        match action {
            ScaleAction::Create { count, why } => {
                self.create(pool_id, scaling, (count, why), now).await
            }
            ScaleAction::Drain { name, reason } => {
                let Some(r) = find(&name) else { return Ok(()) };
                self.drain(r, reason, now).await.map_err(|e| e.to_string())
            }
            ScaleAction::Delete { name, reason } => {
                let Some(r) = find(&name) else { return Ok(()) };
                self.delete_instance(scaling, r, reason, now)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Records `count` new instances, then asks the provider for them.
    async fn create(
        &self,
        pool_id: &str,
        scaling: &PoolScaling,
        (count, why): (u32, lifecycle::CreateReason),
        now: Millis,
    ) -> Result<(), String> {
        let recent = self
            .store
            .instances_requested_since(pool_id, now - lifecycle::RATE_WINDOW_MS)
            .await
            .map_err(|e| e.to_string())?;
        let wanted = count;
        let count = lifecycle::creations_allowed(&scaling.policy, wanted, recent);
        if count < wanted {
            debug!(
                pool_id,
                wanted,
                count,
                created_last_minute = recent,
                "Scale-up held to scale_up_per_minute; the rest waits for a later pass"
            );
        }
        if count == 0 {
            return Ok(());
        }
        let (records, specs) = self
            .new_instances(pool_id, scaling, count, now)
            .await
            .map_err(|e| e.to_string())?;
        self.store
            .write(records.iter().cloned().map(Mutation::PutInstance).collect())
            .await
            .map_err(|e| e.to_string())?;
        let created = scaling.provider.create(&specs).await;
        if let Err(ProviderError::Fatal(e)) = &created {
            // Nothing will come of these names: forget them, so the next pass asks anew.
            let gone = records.into_iter().map(|mut r| {
                r.state = "deleted".into();
                r.delete_reason = Some("create_failed".into());
                r.deleted_at = Some(now);
                Mutation::PutInstance(r)
            });
            self.store
                .write(gone.collect())
                .await
                .map_err(|e| e.to_string())?;
            return Err(format!("the provider cannot create VMs: {e}"));
        }
        created.map_err(|e| e.to_string())?;
        let label = crate::metrics::PoolLabel {
            pool: pool_id.to_owned(),
        };
        self.metrics
            .scaling
            .created
            .get_or_create(&label)
            .inc_by(u64::from(count));
        let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        info!(pool_id, count, reason = why.as_str(), vms = ?names, "Scaler created VMs");
        self.mark_created(records, why, now)
            .await
            .map_err(|e| e.to_string())
    }

    /// `count` new instance rows (named `<pool>-<12 hex>`) and what each VM is given.
    async fn new_instances(
        &self,
        pool_id: &str,
        scaling: &PoolScaling,
        count: u32,
        now: Millis,
    ) -> Result<(Vec<InstanceRecord>, Vec<InstanceSpec>), ApiError> {
        let mut records = Vec::new();
        let mut specs = Vec::new();
        for _ in 0..count {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let name = format!("{pool_id}-{}", &id[id.len() - 12..]);
            specs.push(self.spec(pool_id, &name).await?);
            records.push(InstanceRecord {
                name,
                pool_id: pool_id.to_owned(),
                provider: scaling.provider.kind().to_owned(),
                state: "requested".into(),
                requested_at: now,
                provider_id: None,
                drain_command_id: None,
                drain_reason: None,
                delete_reason: None,
                deleted_at: None,
                updated_at: now,
            });
        }
        Ok((records, specs))
    }

    /// The provider took the instances: they are running, and each VM's timeline says why
    /// it was created.
    async fn mark_created(
        &self,
        records: Vec<InstanceRecord>,
        why: lifecycle::CreateReason,
        now: Millis,
    ) -> Result<(), ApiError> {
        let mut batch = Vec::new();
        for mut r in records {
            batch.push(Mutation::VmLog(VmLogRow {
                vm_id: r.name.clone(),
                at: now,
                kind: "vm_created".into(),
                detail: Some(
                    json!({"reason": why.as_str(), "by": "scaler", "provider": r.provider})
                        .to_string(),
                ),
            }));
            r.state = "running".into();
            r.updated_at = now;
            batch.push(Mutation::PutInstance(r));
        }
        self.store.write(batch).await?;
        Ok(())
    }

    /// What a new VM's agent is given: where the controller is, and a one-time enrollment
    /// token when its pool enrolls with them.
    async fn spec(&self, pool_id: &str, name: &str) -> Result<InstanceSpec, ApiError> {
        let mut spec = InstanceSpec {
            name: name.to_owned(),
            pool_id: pool_id.to_owned(),
            settings: Vec::new(),
            secret_files: Vec::new(),
        };
        if let Some(a) = self.advertised.get() {
            spec.settings
                .push(("MIGLET_CONTROLLER_ENDPOINT".into(), a.http.clone()));
            spec.settings
                .push(("MIGLET_CONTROLLER_GRPC_ENDPOINT".into(), a.grpc.clone()));
        }
        let pool = self.settings.pools.get(pool_id).map_err(bad)?;
        if pool.enrollment.enrollment_tokens {
            let ttl = pool
                .scaling
                .as_ref()
                .map_or(3600, |s| (s.policy.boot_timeout / 1000).max(60) as u64);
            let token = self
                .mint_enrollment_token(name, pool_id, ttl, "scaler")
                .await?;
            spec.secret_files
                .push(("MIGLET_ENROLLMENT_TOKEN_FILE".into(), token.token));
        }
        Ok(spec)
    }

    /// Sends `drain` to an idle VM and remembers it on the instance.
    async fn drain(
        &self,
        mut r: InstanceRecord,
        reason: ScaleReason,
        now: Millis,
    ) -> Result<(), ApiError> {
        let command = Command::Drain {
            reason: format!("scaler: {}", reason.as_str()),
            timeout_seconds: None,
        };
        let queued = self
            .enqueue(&r.name, command, "scaler", Some(DRAIN_TTL))
            .await?;
        info!(vm_id = %r.name, pool_id = %r.pool_id, reason = reason.as_str(), command_id = %queued.id, "Scaler drains an idle VM");
        r.drain_command_id = Some(queued.id);
        r.drain_reason = Some(reason.as_str().into());
        r.updated_at = now;
        self.store.write(vec![Mutation::PutInstance(r)]).await?;
        Ok(())
    }

    /// Deletes an instance: its runner on GitHub first (not while GitHub says it runs a
    /// job), then the instance, then the records.
    async fn delete_instance(
        &self,
        scaling: &PoolScaling,
        mut r: InstanceRecord,
        reason: ScaleReason,
        now: Millis,
    ) -> Result<(), ApiError> {
        if let Some(vm) = self.store.vm_get(&r.name).await?
            && let Ok(pool) = self.settings.pools.get(&r.pool_id)
            && pool.token.runner_label().is_some()
        {
            let name = lifecycle::runner_name(&vm.vm_id, vm.boot_seq);
            let id = self.minted_runner_id(&vm.vm_id, &name).await?;
            match pool.token.remove_runner_named(&name, id).await {
                Ok(Removed::Busy) => {
                    info!(vm_id = %vm.vm_id, runner = %name, "VM kept: GitHub says its runner is running a job");
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(vm_id = %vm.vm_id, error = %crate::error::chain(&e), "Could not remove the VM's runner on GitHub before deleting it; the cleanup pass removes it");
                }
            }
        }
        r.state = "deleting".into();
        r.delete_reason = Some(reason.as_str().into());
        r.updated_at = now;
        self.store
            .write(vec![Mutation::PutInstance(r.clone())])
            .await?;
        self.finish_delete(scaling, &mut r, reason.as_str(), now)
            .await
    }

    /// Asks the provider to delete a recorded instance and records that it is gone (with a
    /// line on the VM's timeline, and the count by reason).
    async fn finish_delete(
        &self,
        scaling: &PoolScaling,
        r: &mut InstanceRecord,
        reason: &str,
        now: Millis,
    ) -> Result<(), ApiError> {
        if let Err(e) = scaling.provider.delete(std::slice::from_ref(&r.name)).await {
            warn!(vm_id = %r.name, error = %e, "The provider could not delete the VM; the next pass tries again");
            return Ok(());
        }
        r.state = "deleted".into();
        r.deleted_at = Some(now);
        r.updated_at = now;
        let mut batch = vec![
            Mutation::PutInstance(r.clone()),
            Mutation::VmLog(VmLogRow {
                vm_id: r.name.clone(),
                at: now,
                kind: "vm_deleted".into(),
                detail: Some(json!({"reason": reason, "by": "scaler"}).to_string()),
            }),
        ];
        let _guard = self.locks.lock(&r.name).await;
        if let Some(mut vm) = self.store.vm_get(&r.name).await?
            && vm.state != "terminated"
        {
            vm.state = "terminated".into();
            vm.connected = false;
            vm.updated_at = now;
            batch.push(Mutation::PutVm(vm));
        }
        self.store.write(batch).await?;
        self.metrics
            .scaling
            .deleted
            .get_or_create(&crate::metrics::ReasonLabels {
                pool: r.pool_id.clone(),
                reason: reason.to_owned(),
            })
            .inc();
        info!(vm_id = %r.name, pool_id = %r.pool_id, reason, "Scaler deleted a VM");
        Ok(())
    }
}
