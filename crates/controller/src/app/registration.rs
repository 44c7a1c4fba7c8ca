//! `register_runner`: issued once per boot (with a fresh token from the pool's source), and
//! the HTTP registration-token endpoint.

use super::*;

impl Controller {
    /// Queues a `register_runner` for the VM's current boot. Failures to get a token are
    /// logged and retried by the reconciler; they do not fail the caller's request.
    pub(super) async fn issue_registration_locked(
        &self,
        vm: &mut VmRecord,
    ) -> Result<(), ApiError> {
        let mut batch = Vec::with_capacity(2);
        let now = self.now_ms();
        let Some(record) = self.put_vm_with_registration(&mut batch, vm, now) else {
            return Ok(());
        };
        self.store.write(batch).await?;
        self.registration_queued(vm, &record);
        Ok(())
    }

    /// After a registration is stored: log it and wake the VM's stream.
    pub(super) fn registration_queued(&self, vm: &VmRecord, record: &CommandRecord) {
        info!(vm_id = %vm.vm_id, command_id = %record.id, boot_id = %vm.boot_id, "Queued register_runner");
        self.streams.nudge(&vm.vm_id);
    }

    /// Builds the `register_runner` for the VM's current boot and points the VM at it (the
    /// caller stores both, in one write). The token is not fetched here: it is filled in when
    /// the command goes out ([`Controller::materialize`]), the one place a token source is
    /// asked for a `register_runner`. `None` (logged) when the VM's pool has no registration
    /// set up; the reconciler tries again.
    pub(super) fn prepare_registration(
        &self,
        vm: &mut VmRecord,
        now: Millis,
    ) -> Option<CommandRecord> {
        let reg = match self.settings.pools.get(&vm.pool_id) {
            Ok(r) => r.clone(),
            Err(e) => {
                warn!(vm_id = %vm.vm_id, pool_id = %vm.pool_id, error = %e, "Cannot register the VM's runner: add the pool to the config (or a [pools.\"*\"] fallback)");
                return None;
            }
        };
        let id = format!(
            "register-{}-{}-{}",
            vm.vm_id,
            now / 1000,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let lifetime = reg.token.lifetime().as_millis() as Millis;
        let command = Command::RegisterRunner(RegisterRunner {
            // Stored redacted in any case; the real token is fetched at delivery.
            registration_token: Some(REDACTED.to_owned()),
            jit_config: None,
            runner_url: reg.runner_url.clone(),
            runner_group: reg.runner_group.clone(),
            labels: reg.labels.clone(),
            expires_at: Some(crate::store::from_millis(now + lifetime)),
            runner_name: Some(vm.vm_id.clone()),
        });
        let record = CommandRecord::pending(
            id.clone(),
            &vm.vm_id,
            &vm.boot_id,
            &command,
            "controller",
            now,
            now + lifetime,
        );
        vm.registration_command_id = Some(id);
        vm.updated_at = now;
        Some(record)
    }

    /// `POST .../registration-token`: registration config for the VM's pool, on request.
    pub async fn registration_config(
        &self,
        caller: &Principal,
        vm_id: &str,
        mut request: RegistrationTokenRequest,
        raw_request: String,
    ) -> Result<RegistrationTokenResponse, ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        check_optional_id("pool_id", request.pool_id.as_deref())?;
        fill_pool(caller, &mut request.pool_id);
        let named = Named {
            pool_id: request.pool_id.as_deref(),
            ..Named::default()
        };
        crate::auth::check_names(caller, vm_id, &named, None)?;
        let _guard = self.locks.lock(vm_id).await;
        let vm = self.store.vm_get(vm_id).await?;
        let known = self.names_for(vm_id, vm.as_ref()).await?;
        crate::auth::check_names(caller, vm_id, &named, known.as_ref())?;
        if vm.as_ref().is_some_and(|v| v.job_started_at.is_some()) {
            return Err(ApiError::Conflict(JOB_STARTED.into()));
        }
        let pool = vm
            .as_ref()
            .map(|v| v.pool_id.clone())
            .or_else(|| request.pool_id.clone())
            .unwrap_or_else(|| "default".into());
        let reg = self
            .settings
            .pools
            .get(&pool)
            .map_err(|e| ApiError::NotFound(e.to_string()))?;
        let token = reg.token.registration_token(self.clock().now()).await.map_err(|e| {
            warn!(vm_id, pool_id = %pool, error = %crate::error::chain(&e), "Registration token unavailable");
            ApiError::Unavailable("registration token unavailable; retry later".into())
        })?;
        let response = RegistrationTokenResponse {
            registration_token: token.token,
            expires_at: token.expires_at,
            runner_url: reg.runner_url.clone(),
            runner_group: reg.runner_group.clone(),
            labels: reg.labels.clone(),
        };
        let mut stored = serde_json::to_value(&response).map_err(bad)?;
        if let Value::Object(fields) = &mut stored {
            redact_secrets(fields);
        }
        let now = self.now_ms();
        let mut batch = vec![Mutation::InsertRegistration(RegistrationRow {
            seq: 0,
            vm_id: vm_id.to_owned(),
            requested_at: now,
            request: raw_request,
            response: stored.to_string(),
        })];
        if vm.is_some() {
            batch.push(Mutation::TouchVm {
                vm_id: vm_id.to_owned(),
                at: now,
            });
        }
        self.store.write(batch).await?;
        Ok(response)
    }
}
