//! The command queue: enqueue, what goes out to a VM now (HTTP polling and the delivery
//! plan both transports share), secrets filled back in at delivery, and acknowledgments.

use super::*;
use crate::token::{Registration, RunnerRequest};

/// The runner's work folder, relative to its install directory (the runner's default).
const RUNNER_WORK_FOLDER: &str = "_work";

impl Controller {
    /// `GET .../commands`: the commands to hand out now over HTTP, marked delivered.
    pub async fn poll_commands(
        &self,
        caller: &Principal,
        vm_id: &str,
    ) -> Result<Vec<CommandJson>, ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        crate::auth::check_names(caller, vm_id, &Named::default(), None)?;
        let _guard = self.locks.lock(vm_id).await;
        let stored = self.store.vm_get(vm_id).await?;
        self.check_caller(caller, vm_id, stored.as_ref()).await?;
        let Some(mut vm) = stored else {
            // Nothing is ever queued for a VM we have not heard of.
            return Ok(Vec::new());
        };
        if lifecycle::needs_registration(&vm) {
            self.issue_registration_locked(&mut vm).await?;
        }
        let now = self.now_ms();
        let (envelopes, _open) = self
            .deliver_locked(
                &vm,
                Channel::Http {
                    acks: vm.acks_commands,
                },
                "http",
                now,
            )
            .await?;
        Ok(envelopes.iter().map(CommandEnvelope::to_json).collect())
    }

    /// Picks, fills in and marks delivered the commands for `channel`. Also returns how many
    /// commands stay open (delivering does not close any).
    pub(super) async fn deliver_locked(
        &self,
        vm: &VmRecord,
        channel: Channel<'_>,
        via: &str,
        now: Millis,
    ) -> Result<(Vec<CommandEnvelope>, usize), ApiError> {
        let plan = self.plan_delivery(vm, channel, via, now).await?;
        let mut batch = vec![Mutation::TouchVm {
            vm_id: vm.vm_id.clone(),
            at: now,
        }];
        batch.extend(plan.writes.iter().cloned());
        self.store.write(batch).await?;
        self.delivered(vm, &plan, via, now);
        Ok((plan.envelopes, plan.open.len()))
    }

    /// Picks and fills in the commands to hand out on `channel` now, and the write that marks
    /// them delivered (for the caller's batch).
    pub(super) async fn plan_delivery(
        &self,
        vm: &VmRecord,
        channel: Channel<'_>,
        via: &str,
        now: Millis,
    ) -> Result<DeliveryPlan, ApiError> {
        let open = self.store.commands_open_for_vm(&vm.vm_id).await?;
        let chosen = lifecycle::select_deliverable(&open, channel, now, self.redeliver_after());
        let mut envelopes = Vec::with_capacity(chosen.len());
        let mut notes = Vec::new();
        for c in chosen {
            match self.materialize(vm, c).await {
                Ok((env, note)) => {
                    envelopes.push(env);
                    // A runner minted for this boot is remembered on its first delivery.
                    if c.delivery_count == 0 {
                        notes.extend(note.map(Mutation::VmLog));
                    }
                }
                Err(reason) => {
                    // Per delivery attempt (a stream retries every half redelivery period):
                    // one line a second is enough to say a token source is down.
                    static HELD_BACK: crate::throttle::LogThrottle =
                        crate::throttle::LogThrottle::new(1_000);
                    if let Some(similar_not_logged) = HELD_BACK.allow_now() {
                        warn!(vm_id = %vm.vm_id, pool_id = %vm.pool_id, command_id = %c.id, command_type = %c.command_type, %reason, similar_not_logged, "Command held back: it could not be prepared for delivery (for register_runner: check the pool's token source); it stays queued and is tried again");
                    }
                }
            }
        }
        let mut writes: Vec<Mutation> = Vec::with_capacity(notes.len() + 1);
        if !envelopes.is_empty() {
            writes.push(Mutation::MarkDelivered {
                ids: envelopes.iter().map(|e| e.id.clone()).collect(),
                at: now,
                via: via.to_owned(),
            });
        }
        writes.extend(notes);
        Ok(DeliveryPlan {
            open,
            envelopes,
            writes,
        })
    }

    /// After a planned delivery is stored: logs it and ends the vm_started-to-registration
    /// wait if a boot's registration went out for the first time.
    pub(super) fn delivered(&self, vm: &VmRecord, plan: &DeliveryPlan, via: &str, now: Millis) {
        for env in &plan.envelopes {
            info!(vm_id = %vm.vm_id, command_id = %env.id, command_type = env.command.type_name(), via, "Command delivered");
        }
        for c in &plan.open {
            if c.command_type == REGISTER_RUNNER
                && c.delivery_count == 0
                && plan.envelopes.iter().any(|e| e.id == c.id)
            {
                self.metrics
                    .registration_latency
                    .observe((now - vm.booted_at).max(0) as f64 / 1000.0);
            }
        }
    }

    /// Turns a stored command back into the typed command, filling in secrets that are never
    /// stored: the registration token is fetched here, from the pool's token source, and
    /// nowhere else for a `register_runner`.
    pub(super) async fn materialize(
        &self,
        vm: &VmRecord,
        c: &CommandRecord,
    ) -> Result<(CommandEnvelope, Option<VmLogRow>), String> {
        let mut command = Command::from_json_parameters(&c.command_type, &c.parameters)
            .map_err(|e| e.to_string())?;
        let mut note = None;
        if let Command::RegisterRunner(r) = &mut command
            && r.registration_token.as_deref() == Some(REDACTED)
        {
            if vm.job_started_at.is_some() {
                return Err(JOB_STARTED.into());
            }
            let reg = self
                .settings
                .pools
                .get(&vm.pool_id)
                .map_err(|e| e.to_string())?;
            let runner_name = lifecycle::runner_name(&vm.vm_id, vm.boot_seq);
            let request = RunnerRequest {
                runner_name: &runner_name,
                labels: &r.labels,
                work_folder: RUNNER_WORK_FOLDER,
            };
            let registration = reg
                .token
                .registration(request, self.clock().now())
                .await
                .map_err(|e| crate::error::chain(&e))?;
            let stored = c.expires_at.map(crate::store::from_millis);
            let until = |t: chrono::DateTime<chrono::Utc>| Some(stored.map_or(t, |s| s.min(t)));
            match registration {
                Registration::Token(token) => {
                    r.registration_token = Some(token.token);
                    r.expires_at = until(token.expires_at);
                    // A runner we will clean up is named and labelled as ours.
                    if let Some(label) = reg.token.runner_label() {
                        if !r.labels.contains(&label) {
                            r.labels.push(label);
                        }
                        r.runner_name = Some(runner_name);
                    }
                }
                Registration::Jit {
                    config,
                    runner_id,
                    expires_at,
                } => {
                    // The runner GitHub knows this boot by, on the VM's timeline.
                    note = Some(VmLogRow {
                        vm_id: vm.vm_id.clone(),
                        at: self.now_ms(),
                        kind: "github_runner".into(),
                        detail: Some(
                            json!({"runner_id": runner_id, "runner_name": runner_name, "boot_id": vm.boot_id})
                                .to_string(),
                        ),
                    });
                    r.registration_token = None;
                    r.jit_config = Some(config);
                    r.runner_name = Some(runner_name);
                    r.expires_at = until(expires_at);
                }
            }
        }
        Ok((
            CommandEnvelope {
                id: c.id.clone(),
                created_at: crate::store::from_millis(c.created_at),
                command,
            },
            note,
        ))
    }

    /// Records an agent's acknowledgment. Idempotent: acknowledging a finished command again
    /// changes nothing and answers its state. A VM may acknowledge only its own commands.
    pub async fn ack_command(
        &self,
        caller: &Principal,
        vm_id: &str,
        ack: Ack<'_>,
    ) -> Result<CommandState, ApiError> {
        let Ack {
            command_id,
            success,
            message,
            result,
            via,
        } = ack;
        validate_vm_id(vm_id).map_err(bad)?;
        validate_id("command_id", command_id).map_err(bad)?;
        crate::auth::check_names(caller, vm_id, &Named::default(), None)?;
        let _guard = self.locks.lock(vm_id).await;
        let stored = self.store.vm_get(vm_id).await?;
        self.check_caller(caller, vm_id, stored.as_ref()).await?;
        let cmd = match self.store.command_get(command_id).await? {
            Some(c) if c.vm_id == vm_id => c,
            _ => {
                return Err(ApiError::NotFound(format!(
                    "no command {command_id:?} for VM {vm_id:?}"
                )));
            }
        };
        let to = if success {
            CommandState::Acknowledged
        } else {
            CommandState::Failed
        };
        let mut msg = message.to_owned();
        if msg.len() > MAX_ACK_MESSAGE {
            let mut cut = MAX_ACK_MESSAGE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
        }
        let now = self.now_ms();
        let mut batch = vec![Mutation::CommandTransition {
            id: cmd.id.clone(),
            to,
            at: now,
            detail: Some(format!("ack via {via}")),
            result_message: Some(msg.clone()),
            result: (!result.is_empty()).then_some(result),
        }];
        if let Some(mut vm) = stored
            && !vm.acks_commands
        {
            vm.acks_commands = true;
            vm.updated_at = now;
            batch.push(Mutation::PutVm(vm));
        }
        let outcomes = self.store.write(batch).await?;
        if outcomes.first() == Some(&Outcome::Applied(true)) {
            self.metrics
                .command_acked(&cmd.command_type, now - cmd.created_at);
            info!(vm_id, command_id, success, message = %msg, via, "Command acknowledged");
            Ok(to)
        } else {
            Ok(cmd.state)
        }
    }

    /// Queues a command for a known VM (internal API; the operator API builds on it).
    /// `register_runner` is reserved to the controller itself.
    pub async fn enqueue(
        &self,
        vm_id: &str,
        command: Command,
        source: &str,
        ttl: Option<Duration>,
    ) -> Result<CommandRecord, ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        if matches!(command, Command::RegisterRunner(_)) {
            return Err(ApiError::BadRequest(
                "register_runner is issued by the controller itself".into(),
            ));
        }
        let _guard = self.locks.lock(vm_id).await;
        let vm = self
            .store
            .vm_get(vm_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("unknown VM {vm_id:?}")))?;
        let now = self.now_ms();
        let ttl = ttl.unwrap_or(self.settings.command_ttl);
        let record = CommandRecord::pending(
            format!("{}-{}", command.type_name(), uuid::Uuid::now_v7().simple()),
            vm_id,
            &vm.boot_id,
            &command,
            source,
            now,
            now + ttl.as_millis() as Millis,
        );
        self.store
            .write(vec![Mutation::InsertCommand(record.clone())])
            .await?;
        info!(vm_id, command_id = %record.id, command_type = %record.command_type, source, "Command queued");
        self.streams.nudge(vm_id);
        Ok(record)
    }
}
