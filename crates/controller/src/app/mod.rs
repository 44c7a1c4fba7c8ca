//! The controller's operations, shared by the HTTP and gRPC front ends.
//!
//! Every operation on a VM runs under that VM's lock (see [`VmLocks`]): read the record,
//! decide with the pure functions of [`crate::lifecycle`], write the outcome as one atomic
//! store batch, and only then answer. Work on different VMs runs in parallel and shares the
//! store's group commits.

mod identity;

pub(crate) use identity::fill_pool;

use crate::auth::{Named, Principal};
use crate::config::Settings;
use crate::error::ApiError;
use crate::lifecycle::{self, Channel, Contact, ContactKind};
use crate::store::{
    CommandRecord, CommandState, EventRow, HeartbeatInput, Millis, Mutation, Outcome, PendingWrite,
    RegistrationRow, Store, VmLogRow, VmRecord, millis,
};
use crate::streams::{StreamHandle, Streams, VmLocks};
use miglet_proto::command::{
    Command, CommandEnvelope, REDACTED, REGISTER_RUNNER, RegisterRunner, redact_secrets,
};
use miglet_proto::event::{EventKind, EventReport, HeartbeatReport};
use miglet_proto::ids::{validate_id, validate_type_name, validate_vm_id};
use miglet_proto::json::{CommandJson, RegistrationTokenRequest, RegistrationTokenResponse};
use miglet_proto::pb;
use serde_json::{Map, Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Longest acknowledgment message kept.
const MAX_ACK_MESSAGE: usize = 4096;

/// Which transport a report arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

/// An agent's acknowledgment of one command.
#[derive(Debug)]
pub struct Ack<'a> {
    pub command_id: &'a str,
    pub success: bool,
    pub message: &'a str,
    pub result: Map<String, Value>,
    /// `http` or `grpc`, for the command's history.
    pub via: &'a str,
}

/// The result of storing an event.
#[derive(Debug, Clone)]
pub struct EventAccepted {
    pub vm: VmRecord,
    /// The event id was stored before; nothing changed.
    pub duplicate: bool,
}

/// A new stream session: its handle and what to send right after the `connect_ack`.
#[derive(Debug)]
pub struct StreamOpened {
    pub handle: StreamHandle,
    /// Commands already marked delivered on this stream.
    pub commands: Vec<pb::Command>,
    /// Commands still open for the VM (for redelivery timing).
    pub open: usize,
    /// The session should look for deliverable commands at once.
    pub deliver_now: bool,
    /// The open's write, still being committed: the session sends the `connect_ack` and
    /// `commands` (all stored before) at once, then waits for it with
    /// [`Controller::stream_open_commit`] before anything else. `None` when the write is
    /// already durable (a connect that starts a boot: that is the VM's `vm_started`).
    pub commit: Option<Box<OpenCommit>>,
}

/// A stream open's write in flight, with the VM's lock held until it is committed.
#[derive(Debug)]
pub struct OpenCommit {
    write: PendingWrite,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    vm: VmRecord,
    plan: Option<DeliveryPlan>,
    via: String,
    now: Millis,
    registration_id: Option<String>,
    remote: Option<SocketAddr>,
    new_boot: bool,
    stream_id: String,
}

/// Commands picked for delivery and the write that marks them delivered.
#[derive(Debug)]
struct DeliveryPlan {
    open: Vec<CommandRecord>,
    envelopes: Vec<CommandEnvelope>,
    mutation: Option<Mutation>,
}

/// What one reconciler pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub expired_commands: usize,
    pub health_changes: usize,
    pub registrations_issued: usize,
    pub heartbeats_pruned: u64,
    pub events_pruned: u64,
}

#[derive(Debug)]
pub struct Controller {
    store: Store,
    settings: Arc<Settings>,
    streams: Streams,
    locks: VmLocks,
    shutdown: CancellationToken,
    gate: crate::auth::Gatekeeper,
    metrics: crate::metrics::Metrics,
    /// When the last retention pass ran (Unix ms).
    last_prune: std::sync::atomic::AtomicI64,
    /// Bumped after every stored event, so live views wake up at once.
    events_stored: tokio::sync::watch::Sender<u64>,
    /// Each VM's pool and org, for checks without a store read.
    names: identity::NameCache,
    audit: crate::audit::Audit,
}

/// Why a registration token is refused once a job ran on the VM's current boot.
const JOB_STARTED: &str = "a job already started on this VM's current boot; its registration token is not handed out again";

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn check_optional_id(what: &'static str, v: Option<&str>) -> Result<(), ApiError> {
    match v {
        Some(s) if !s.is_empty() => validate_id(what, s).map_err(bad),
        _ => Ok(()),
    }
}

impl Controller {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        shutdown: CancellationToken,
        gate: crate::auth::Gatekeeper,
    ) -> Arc<Controller> {
        Arc::new(Controller {
            metrics: crate::metrics::Metrics::new(&store),
            audit: crate::audit::Audit::new(store.clone(), settings.clock.clone()),
            last_prune: std::sync::atomic::AtomicI64::new(0),
            store,
            settings,
            streams: Streams::default(),
            locks: VmLocks::default(),
            shutdown,
            gate,
            events_stored: tokio::sync::watch::Sender::new(0),
            names: identity::NameCache::default(),
        })
    }

    /// Unix ms now, on the controller's clock.
    pub(crate) fn now_ms(&self) -> Millis {
        self.settings.clock.now_ms()
    }

    /// The controller's clock (tests move it forward instead of sleeping).
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.settings.clock
    }

    /// The audit log's writer.
    pub fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The metrics in the Prometheus text format, fleet gauges read now.
    pub async fn render_metrics(&self) -> String {
        self.metrics
            .render(&self.store, self.streams.count(), self.now_ms())
            .await
    }

    /// Changes after every stored event (for live event streams).
    pub fn events_stored(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_stored.subscribe()
    }

    /// Authentication, authorization and rate limits.
    pub fn gate(&self) -> &crate::auth::Gatekeeper {
        &self.gate
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn redeliver_after(&self) -> Millis {
        self.settings.redelivery_timeout.as_millis() as Millis
    }

    /// Stores an event (once per `event_id`) from `caller` and applies it to the VM.
    pub async fn ingest_event(
        &self,
        caller: &Principal,
        vm_id: &str,
        mut report: EventReport,
        raw: String,
        transport: Transport,
    ) -> Result<EventAccepted, ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        validate_type_name("type", &report.event_type).map_err(bad)?;
        check_optional_id("vm_id", report.vm_id.as_deref())?;
        check_optional_id("pool_id", report.pool_id.as_deref())?;
        check_optional_id("org_id", report.org_id.as_deref())?;
        check_optional_id("event_id", report.event_id.as_deref())?;
        check_optional_id("boot_id", report.boot_id.as_deref())?;
        fill_pool(caller, &mut report.pool_id);
        let named = Named {
            vm_id: report.vm_id.as_deref(),
            pool_id: report.pool_id.as_deref(),
            org_id: report.org_id.as_deref(),
        };
        crate::auth::check_names(caller, vm_id, &named, None)?;
        let now = self.now_ms();
        let _guard = self.locks.lock(vm_id).await;
        let existing = self.store.vm_get(vm_id).await?;
        let known = self.names_for(vm_id, existing.as_ref()).await?;
        self.check_message(caller, vm_id, &named, known.as_ref())?;
        if let Some(event_id) = &report.event_id
            && self.store.event_exists(vm_id, event_id).await?
        {
            let vm = existing.unwrap_or_else(|| {
                lifecycle::adopt(vm_id, report.pool_id.as_deref(), None, None, None, now)
            });
            return Ok(EventAccepted {
                vm,
                duplicate: true,
            });
        }
        let kind = report.kind();
        let mut batch = Vec::with_capacity(4);
        let (mut vm, new_boot) = if matches!(kind, EventKind::VmStarted { .. }) {
            let version = report.fields.get("version").and_then(Value::as_str);
            let contact = Contact {
                kind: ContactKind::VmStarted,
                boot_id: report.boot_id.as_deref(),
                pool_id: report.pool_id.as_deref(),
                org_id: report.org_id.as_deref(),
                version,
            };
            lifecycle::on_contact(existing.as_ref(), vm_id, &contact, now)
        } else {
            let base = match &existing {
                Some(v) => v.clone(),
                None => lifecycle::adopt(
                    vm_id,
                    report.pool_id.as_deref(),
                    report.org_id.as_deref(),
                    report.boot_id.as_deref(),
                    None,
                    now,
                ),
            };
            if lifecycle::is_current_boot(&base, report.boot_id.as_deref()) {
                (lifecycle::on_event(&base, &kind, now), false)
            } else {
                // A late event of an earlier boot: stored, but it says nothing about now.
                let mut v = base;
                v.last_seen_at = v.last_seen_at.max(now);
                (v, false)
            }
        };
        if new_boot {
            self.push_new_boot(&mut batch, existing.as_ref(), &vm, now, "vm_started");
        }
        batch.extend(lifecycle::recovery_log(existing.as_ref(), &vm, now).map(Mutation::VmLog));
        let data =
            serde_json::to_string(&report).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // A type this version does not know is accepted (forward compatibility) but stored
        // as `unknown` (its name stays in the report) and changes no state.
        let known_type = miglet_proto::event::is_known_event_type(&report.event_type);
        batch.push(Mutation::InsertEvent(EventRow {
            seq: 0,
            vm_id: vm_id.to_owned(),
            event_id: report.event_id.clone(),
            event_type: if known_type {
                report.event_type.clone()
            } else {
                miglet_proto::event::UNKNOWN.to_owned()
            },
            boot_id: report.boot_id.clone(),
            transport: transport.as_str().to_owned(),
            occurred_at: report.timestamp.map(millis),
            received_at: now,
            data,
            raw,
        }));
        vm.connected = self.streams.is_connected(vm_id);
        // The registration a new boot needs goes in the same atomic write as its vm_started.
        let registration = if lifecycle::needs_registration(&vm) {
            self.prepare_registration(&mut vm, now).await
        } else {
            None
        };
        batch.push(Mutation::PutVm(vm.clone()));
        batch.extend(
            registration
                .iter()
                .map(|r| Mutation::InsertCommand(r.clone())),
        );
        let event_type = report.event_type.clone();
        self.store.write(batch).await?;
        self.names.remember(&vm);
        self.metrics.event(&event_type);
        self.events_stored.send_modify(|n| *n = n.wrapping_add(1));
        if new_boot {
            info!(vm_id, pool_id = %vm.pool_id, boot_id = %vm.boot_id, transport = transport.as_str(), "VM started a new boot");
        }
        if let Some(r) = &registration {
            self.registration_queued(&vm, r);
        }
        Ok(EventAccepted {
            vm,
            duplicate: false,
        })
    }

    /// The writes that open a new boot: the old boot's unfinished registration is superseded
    /// and the boot is logged.
    fn push_new_boot(
        &self,
        batch: &mut Vec<Mutation>,
        old: Option<&VmRecord>,
        vm: &VmRecord,
        now: Millis,
        via: &str,
    ) {
        if let Some(old_reg) = old.and_then(|o| o.registration_command_id.clone()) {
            batch.push(Mutation::CommandTransition {
                id: old_reg,
                from: CommandState::OPEN,
                to: CommandState::Expired,
                at: now,
                detail: Some("superseded by a new boot".into()),
                result_message: Some("superseded by a new boot of the VM".into()),
                result: None,
            });
        }
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm.vm_id.clone(),
            at: now,
            kind: "boot_started".into(),
            detail: Some(
                json!({"boot_id": vm.boot_id, "boot_seq": vm.boot_seq, "via": via}).to_string(),
            ),
        }));
    }

    /// Stores a heartbeat from `caller` and applies it to the VM. Every part of the
    /// heartbeat is optional.
    pub async fn ingest_heartbeat(
        &self,
        caller: &Principal,
        vm_id: &str,
        mut report: HeartbeatReport,
        transport: Transport,
    ) -> Result<(), ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        check_optional_id("vm_id", report.vm_id.as_deref())?;
        check_optional_id("pool_id", report.pool_id.as_deref())?;
        check_optional_id("org_id", report.org_id.as_deref())?;
        check_optional_id("boot_id", report.boot_id.as_deref())?;
        fill_pool(caller, &mut report.pool_id);
        let named_vm = report.vm_id.take();
        let named = Named {
            vm_id: named_vm.as_deref(),
            pool_id: report.pool_id.as_deref(),
            org_id: report.org_id.as_deref(),
        };
        crate::auth::check_names(caller, vm_id, &named, None)?;
        let now = self.now_ms();
        let report_json = serde_json::to_string(&report).map_err(bad)?;
        // Held until the write is durable, so no read-decide-write of this VM interleaves.
        let _guard = self.locks.lock(vm_id).await;
        // The VM's names come from memory (no read on the fleet's most frequent message).
        let known = self.known_names(vm_id).await?;
        self.check_message(caller, vm_id, &named, known.as_ref())?;
        let first_contact = known.is_none().then(|| crate::auth::VmNames {
            pool_id: report.pool_id.clone().unwrap_or_else(|| "default".into()),
            org_id: report.org_id.clone().unwrap_or_default(),
        });
        // The writer applies the heartbeat to the VM as stored (lifecycle::heartbeat_effect):
        // no read here, and heartbeats of many VMs share statements.
        let batch = vec![Mutation::IngestHeartbeat(Box::new(HeartbeatInput {
            vm_id: vm_id.to_owned(),
            report,
            report_json,
            transport: transport.as_str().to_owned(),
            now,
            connected: self.streams.is_connected(vm_id),
        }))];
        self.store.write(batch).await?;
        if let Some(names) = first_contact {
            self.names.remember_names(vm_id, names);
        }
        self.metrics
            .heartbeats
            .get_or_create(&crate::metrics::TransportLabel {
                transport: transport.as_str().into(),
            })
            .inc();
        Ok(())
    }

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
    async fn deliver_locked(
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
        batch.extend(plan.mutation.clone());
        self.store.write(batch).await?;
        self.delivered(vm, &plan, via, now);
        Ok((plan.envelopes, plan.open.len()))
    }

    /// Picks and fills in the commands to hand out on `channel` now, and the write that marks
    /// them delivered (for the caller's batch).
    async fn plan_delivery(
        &self,
        vm: &VmRecord,
        channel: Channel<'_>,
        via: &str,
        now: Millis,
    ) -> Result<DeliveryPlan, ApiError> {
        let open = self.store.commands_open_for_vm(&vm.vm_id).await?;
        let chosen = lifecycle::select_deliverable(&open, channel, now, self.redeliver_after());
        let mut envelopes = Vec::with_capacity(chosen.len());
        for c in chosen {
            match self.materialize(vm, c).await {
                Ok(env) => envelopes.push(env),
                Err(reason) => {
                    warn!(vm_id = %vm.vm_id, command_id = %c.id, %reason, "Command held back: it could not be prepared for delivery");
                }
            }
        }
        let mutation = (!envelopes.is_empty()).then(|| Mutation::MarkDelivered {
            ids: envelopes.iter().map(|e| e.id.clone()).collect(),
            at: now,
            via: via.to_owned(),
        });
        Ok(DeliveryPlan {
            open,
            envelopes,
            mutation,
        })
    }

    /// After a planned delivery is stored: logs it and ends the vm_started-to-registration
    /// wait if a boot's registration went out for the first time.
    fn delivered(&self, vm: &VmRecord, plan: &DeliveryPlan, via: &str, now: Millis) {
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
    /// stored (the registration token comes fresh from the pool's token source).
    async fn materialize(
        &self,
        vm: &VmRecord,
        c: &CommandRecord,
    ) -> Result<CommandEnvelope, String> {
        let mut command = Command::from_json_parameters(&c.command_type, &c.parameters)
            .map_err(|e| e.to_string())?;
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
            let token = reg
                .token
                .registration_token(self.clock().now())
                .await
                .map_err(|e| crate::error::chain(&e))?;
            r.registration_token = Some(token.token);
            let stored = c.expires_at.map(crate::store::from_millis);
            r.expires_at = Some(stored.map_or(token.expires_at, |s| s.min(token.expires_at)));
        }
        Ok(CommandEnvelope {
            id: c.id.clone(),
            created_at: crate::store::from_millis(c.created_at),
            command,
        })
    }

    /// Queues a `register_runner` for the VM's current boot. Failures to get a token are
    /// logged and retried by the reconciler; they do not fail the caller's request.
    async fn issue_registration_locked(&self, vm: &mut VmRecord) -> Result<(), ApiError> {
        let Some(record) = self.prepare_registration(vm, self.now_ms()).await else {
            return Ok(());
        };
        self.store
            .write(vec![
                Mutation::InsertCommand(record.clone()),
                Mutation::PutVm(vm.clone()),
            ])
            .await?;
        self.registration_queued(vm, &record);
        Ok(())
    }

    /// After a registration is stored: log it and wake the VM's stream.
    fn registration_queued(&self, vm: &VmRecord, record: &CommandRecord) {
        info!(vm_id = %vm.vm_id, command_id = %record.id, boot_id = %vm.boot_id, "Queued register_runner");
        self.streams.nudge(&vm.vm_id);
    }

    /// Builds the `register_runner` for the VM's current boot and points the VM at it (the
    /// caller stores both, in one write). `None` (logged) when the pool has no registration
    /// set up or no token can be had now; the reconciler tries again.
    async fn prepare_registration(&self, vm: &mut VmRecord, now: Millis) -> Option<CommandRecord> {
        let reg = match self.settings.pools.get(&vm.pool_id) {
            Ok(r) => r.clone(),
            Err(e) => {
                warn!(vm_id = %vm.vm_id, pool_id = %vm.pool_id, error = %e, "Cannot register the VM's runner");
                return None;
            }
        };
        let token = match reg.token.registration_token(self.clock().now()).await {
            Ok(t) => t,
            Err(e) => {
                warn!(vm_id = %vm.vm_id, pool_id = %vm.pool_id, error = %crate::error::chain(&e), "Registration token unavailable; will retry");
                return None;
            }
        };
        let id = format!(
            "register-{}-{}-{}",
            vm.vm_id,
            now / 1000,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let command = Command::RegisterRunner(RegisterRunner {
            registration_token: Some(token.token),
            jit_config: None,
            runner_url: reg.runner_url.clone(),
            runner_group: reg.runner_group.clone(),
            labels: reg.labels.clone(),
            expires_at: Some(token.expires_at),
            runner_name: Some(vm.vm_id.clone()),
        });
        let record = CommandRecord::pending(
            id.clone(),
            &vm.vm_id,
            &vm.boot_id,
            &command,
            "controller",
            now,
            millis(token.expires_at),
        );
        vm.registration_command_id = Some(id);
        vm.updated_at = now;
        Some(record)
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
            from: &[
                CommandState::Pending,
                CommandState::Delivered,
                CommandState::Expired,
            ],
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

    /// Opens a stream session for a `ConnectRequest`. A connect from an unknown VM counts as
    /// its `vm_started`; a reconnect never causes a second registration.
    ///
    /// A reconnect's write (the VM is connected, what goes out now is marked delivered) is
    /// left in flight in [`StreamOpened::commit`]: what it hands out was stored before, and
    /// a delivery that is never recorded is only delivered again, which the agent
    /// de-duplicates. That keeps a group commit off the agent's wait for its commands.
    pub async fn stream_open(
        &self,
        caller: &Principal,
        c: &pb::ConnectRequest,
        remote: Option<SocketAddr>,
    ) -> Result<StreamOpened, ApiError> {
        validate_vm_id(&c.vm_id).map_err(bad)?;
        check_optional_id("pool_id", Some(&c.pool_id))?;
        check_optional_id("org_id", Some(&c.org_id))?;
        check_optional_id("boot_id", Some(&c.boot_id))?;
        if c.version.len() > 128 {
            return Err(ApiError::BadRequest(
                "version is longer than 128 characters".into(),
            ));
        }
        let vm_id = c.vm_id.as_str();
        let mut pool_id = Some(c.pool_id.clone());
        fill_pool(caller, &mut pool_id);
        let named = Named {
            vm_id: Some(vm_id),
            pool_id: pool_id.as_deref(),
            org_id: Some(c.org_id.as_str()),
        };
        crate::auth::check_names(caller, vm_id, &named, None)?;
        let now = self.now_ms();
        let guard = self.locks.lock_owned(vm_id).await;
        let existing = self.store.vm_get(vm_id).await?;
        let known = self.names_for(vm_id, existing.as_ref()).await?;
        self.check_message(caller, vm_id, &named, known.as_ref())?;
        let contact = Contact {
            kind: ContactKind::Connect,
            boot_id: Some(c.boot_id.as_str()).filter(|s| !s.is_empty()),
            pool_id: pool_id.as_deref(),
            org_id: Some(c.org_id.as_str()),
            version: Some(c.version.as_str()),
        };
        let (mut vm, new_boot) = lifecycle::on_contact(existing.as_ref(), vm_id, &contact, now);
        vm.connected = true;
        self.names.remember(&vm);
        let handle = self.streams.register(vm_id);
        let mut batch = Vec::with_capacity(6);
        if new_boot {
            self.push_new_boot(&mut batch, existing.as_ref(), &vm, now, "connect");
        }
        batch.extend(lifecycle::recovery_log(existing.as_ref(), &vm, now).map(Mutation::VmLog));
        // What is already waiting (a registration queued at vm_started, commands queued
        // while the VM was away) goes out with the connect_ack, marked in the same write.
        let via = lifecycle::stream_via(&handle.stream_id);
        let plan = if new_boot {
            // A new boot's old commands were just superseded; nothing to hand out yet.
            None
        } else {
            let channel = Channel::Stream {
                stream_id: &handle.stream_id,
            };
            match self.plan_delivery(&vm, channel, &via, now).await {
                Ok(p) => Some(p),
                Err(e) => {
                    self.streams.unregister(vm_id, handle.generation);
                    return Err(e);
                }
            }
        };
        let registration = if lifecycle::needs_registration(&vm) {
            self.prepare_registration(&mut vm, now).await
        } else {
            None
        };
        batch.push(Mutation::PutVm(vm.clone()));
        batch.extend(
            registration
                .iter()
                .map(|r| Mutation::InsertCommand(r.clone())),
        );
        batch.extend(plan.as_ref().and_then(|p| p.mutation.clone()));
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm_id.to_owned(),
            at: now,
            kind: "stream_connected".into(),
            detail: Some(
                json!({"stream_id": handle.stream_id, "remote": remote.map(|r| r.to_string()), "version": c.version})
                    .to_string(),
            ),
        }));
        let write = match self.store.submit(batch).await {
            Ok(w) => w,
            Err(e) => {
                self.streams.unregister(vm_id, handle.generation);
                return Err(e.into());
            }
        };
        let (commands, open) = match &plan {
            Some(p) => (
                p.envelopes.iter().map(CommandEnvelope::to_pb).collect(),
                p.open.len(),
            ),
            None => (Vec::new(), 0),
        };
        // A registration queued just now is handed out by the session's first pass.
        let deliver_now = registration.is_some() || plan.is_none();
        let commit = OpenCommit {
            write,
            _guard: guard,
            vm,
            plan,
            via,
            now,
            registration_id: registration.map(|r| r.id),
            remote,
            new_boot,
            stream_id: handle.stream_id.clone(),
        };
        let commit = if new_boot {
            if let Err(e) = self.stream_open_commit(commit).await {
                self.streams.unregister(vm_id, handle.generation);
                return Err(e);
            }
            None
        } else {
            Some(Box::new(commit))
        };
        Ok(StreamOpened {
            handle,
            commands,
            open,
            deliver_now,
            commit,
        })
    }

    /// Waits for a stream open's write to be committed, then logs the connect and the
    /// deliveries it recorded. On failure the session must end (the stream is still
    /// registered; [`Controller::stream_closed`] takes it out).
    pub async fn stream_open_commit(&self, commit: OpenCommit) -> Result<(), ApiError> {
        let OpenCommit {
            write,
            _guard,
            vm,
            plan,
            via,
            now,
            registration_id,
            remote,
            new_boot,
            stream_id,
        } = commit;
        write.durable().await?;
        info!(vm_id = %vm.vm_id, %stream_id, new_boot, remote = ?remote, "Stream connected");
        if let Some(id) = &registration_id {
            info!(vm_id = %vm.vm_id, command_id = %id, boot_id = %vm.boot_id, "Queued register_runner");
        }
        if let Some(p) = &plan {
            self.delivered(&vm, p, &via, now);
        }
        Ok(())
    }

    /// Ends a stream session. The VM is marked disconnected only if no newer stream took over.
    pub async fn stream_closed(&self, vm_id: &str, handle: &StreamHandle, reason: &str) {
        let now = self.now_ms();
        let _guard = self.locks.lock(vm_id).await;
        let current = self.streams.unregister(vm_id, handle.generation);
        let mut batch = Vec::with_capacity(2);
        if current {
            batch.push(Mutation::SetConnected {
                vm_id: vm_id.to_owned(),
                connected: false,
                at: now,
            });
        }
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm_id.to_owned(),
            at: now,
            kind: if current {
                "stream_disconnected"
            } else {
                "stream_replaced"
            }
            .into(),
            detail: Some(json!({"stream_id": handle.stream_id, "reason": reason}).to_string()),
        }));
        if let Err(e) = self.store.write(batch).await {
            warn!(vm_id, error = %crate::error::chain(&e), "Failed to record stream end");
        }
        info!(vm_id, stream_id = %handle.stream_id, reason, replaced = !current, "Stream closed");
    }

    /// The commands to push on a stream now (marked delivered), and how many stay open.
    pub async fn stream_deliverable(
        &self,
        caller: &Principal,
        vm_id: &str,
        handle: &StreamHandle,
    ) -> Result<(Vec<pb::Command>, usize), ApiError> {
        let _guard = self.locks.lock(vm_id).await;
        // A stream replaced by a newer one (registered under this lock) gets nothing more,
        // or the two would take turns redelivering the same command.
        if handle.replaced.is_cancelled() || handle.closed.is_cancelled() {
            return Ok((Vec::new(), 0));
        }
        let Some(vm) = self.store.vm_get(vm_id).await? else {
            return Ok((Vec::new(), 0));
        };
        // The VM may have been moved to another pool since the stream opened.
        self.check_caller(caller, vm_id, Some(&vm)).await?;
        let now = self.now_ms();
        let via = lifecycle::stream_via(&handle.stream_id);
        let (envs, open) = self
            .deliver_locked(
                &vm,
                Channel::Stream {
                    stream_id: &handle.stream_id,
                },
                &via,
                now,
            )
            .await?;
        Ok((envs.iter().map(CommandEnvelope::to_pb).collect(), open))
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
