//! What a VM reports: job events (a `vm_started` announces a boot) and heartbeats.

use super::*;

/// The ids an event names, each valid if present.
fn check_event_ids(vm_id: &str, report: &EventReport) -> Result<(), ApiError> {
    validate_vm_id(vm_id).map_err(bad)?;
    validate_type_name("type", &report.event_type).map_err(bad)?;
    check_optional_id("vm_id", report.vm_id.as_deref())?;
    check_optional_id("pool_id", report.pool_id.as_deref())?;
    check_optional_id("org_id", report.org_id.as_deref())?;
    check_optional_id("event_id", report.event_id.as_deref())?;
    check_optional_id("boot_id", report.boot_id.as_deref())
}

/// The VM after an event that is not an announcement: applied if it is of the current boot
/// (an unknown VM is adopted); a late event of an earlier boot is stored but says nothing
/// about now.
fn after_event(
    existing: Option<&VmRecord>,
    vm_id: &str,
    report: &EventReport,
    kind: &EventKind,
    now: Millis,
) -> VmRecord {
    let base = match existing {
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
        lifecycle::on_event(&base, kind, now)
    } else {
        let mut v = base;
        v.last_seen_at = v.last_seen_at.max(now);
        v
    }
}

/// The stored row of an event. A type this version does not know is accepted (forward
/// compatibility) but stored as `unknown` (its name stays in the report) and changes no
/// state.
fn event_row(
    vm_id: &str,
    report: &EventReport,
    transport: Transport,
    now: Millis,
    raw: String,
) -> Result<EventRow, ApiError> {
    let data = serde_json::to_string(report).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let known_type = miglet_proto::event::is_known_event_type(&report.event_type);
    Ok(EventRow {
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
    })
}

impl Controller {
    /// Stores an event (once per `event_id`) from `caller` and applies it to the VM.
    pub async fn ingest_event(
        &self,
        caller: &Principal,
        vm_id: &str,
        mut report: EventReport,
        raw: String,
        transport: Transport,
    ) -> Result<EventAccepted, ApiError> {
        check_event_ids(vm_id, &report)?;
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
            self.announce(&mut batch, existing.as_ref(), vm_id, &contact, now)
        } else {
            (
                after_event(existing.as_ref(), vm_id, &report, &kind, now),
                false,
            )
        };
        batch.extend(lifecycle::recovery_log(existing.as_ref(), &vm, now).map(Mutation::VmLog));
        batch.push(Mutation::InsertEvent(event_row(
            vm_id, &report, transport, now, raw,
        )?));
        vm.connected = self.streams.is_connected(vm_id);
        // The registration a new boot needs goes in the same atomic write as its vm_started.
        let registration = self.put_vm_with_registration(&mut batch, &mut vm, now);
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
        self.watch_runner_crash(&vm, &report, &kind, now);
        let of_current_boot = !new_boot
            && existing
                .as_ref()
                .is_some_and(|e| lifecycle::is_current_boot(e, report.boot_id.as_deref()));
        self.note_runner_done(
            existing.as_ref(),
            &vm,
            of_current_boot.then_some(&kind),
            now,
        );
        self.nudge_scaler();
        Ok(EventAccepted {
            vm,
            duplicate: false,
        })
    }

    /// A runner that stopped because GitHub no longer accepts its version raises an alert on
    /// its pool (every VM of the pool has the same runner).
    fn watch_runner_crash(
        &self,
        vm: &VmRecord,
        report: &EventReport,
        kind: &EventKind,
        now: Millis,
    ) {
        let EventKind::RunnerCrashed { reason } = kind else {
            return;
        };
        if !lifecycle::runner_deprecated(report.exit_code(), reason.as_deref()) {
            return;
        }
        let message = "the runner's version is deprecated: GitHub no longer accepts it; update the runner in the VM image (or set runner_download_url and runner_sha256 on the agent)";
        warn!(vm_id = %vm.vm_id, pool_id = %vm.pool_id, "Pool alert: {message}");
        self.pool_alerts().insert(
            vm.pool_id.clone(),
            crate::token::PoolAlert {
                at: now,
                vm_id: vm.vm_id.clone(),
                message: message.into(),
            },
        );
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
}
