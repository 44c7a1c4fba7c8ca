//! Pure decisions about a VM's lifecycle and its command queue: functions over
//! (current record, observation, now) that return the new record and what to do. No I/O;
//! the [`crate::app`] layer reads the store, calls these, and writes the result.

use crate::model::{
    CommandRecord, CommandState, Health, HeartbeatInput, HeartbeatRow, HeartbeatVmUpdate, Millis,
    VmLogRow, VmRecord,
};
use miglet_proto::event::{CurrentJob, EventKind, HeartbeatReport, JobDetails};
use miglet_proto::state::MigletState;

/// States in which the agent is waiting for (or about to wait for) `register_runner`.
pub const PRE_REGISTRATION: &[&str] = &["initializing", "waiting_for_controller", "ready"];

/// How an agent announced itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactKind {
    /// A `vm_started` event (either transport).
    VmStarted,
    /// A `ConnectRequest` opening a gRPC stream.
    Connect,
}

/// What the agent told us about itself when it announced itself.
#[derive(Debug, Clone, Copy)]
pub struct Contact<'a> {
    pub kind: ContactKind,
    pub boot_id: Option<&'a str>,
    pub pool_id: Option<&'a str>,
    pub org_id: Option<&'a str>,
    pub version: Option<&'a str>,
}

/// Whether an announcement starts a new boot of the VM.
///
/// * An unknown VM always starts one (a gRPC connect from an unknown VM counts as its
///   `vm_started`).
/// * A `vm_started` starts one unless it names the boot we already know (a resend).
/// * A connect starts one only if it names a different boot, or, for agents that send no
///   boot id, if the VM was shutting down or terminated. A plain reconnect never does, so it
///   never causes a second registration.
pub fn starts_new_boot(existing: Option<&VmRecord>, c: &Contact<'_>) -> bool {
    let Some(vm) = existing else {
        return true;
    };
    match (c.kind, c.boot_id) {
        (_, Some(b)) => b != vm.boot_id,
        (ContactKind::VmStarted, None) => true,
        (ContactKind::Connect, None) => matches!(vm.state.as_str(), "shutting_down" | "terminated"),
    }
}

/// Applies an announcement. Returns the new record and whether it began a new boot.
pub fn on_contact(
    existing: Option<&VmRecord>,
    vm_id: &str,
    c: &Contact<'_>,
    now: Millis,
) -> (VmRecord, bool) {
    let new_boot = starts_new_boot(existing, c);
    let mut vm = match existing {
        Some(v) => v.clone(),
        None => VmRecord {
            vm_id: vm_id.to_owned(),
            pool_id: String::new(),
            org_id: String::new(),
            boot_id: String::new(),
            boot_seq: 0,
            booted_at: now,
            state: MigletState::Ready.as_str().to_owned(),
            health: Health::Healthy,
            connected: false,
            last_seen_at: now,
            last_heartbeat_at: None,
            runner_state: None,
            current_job: None,
            latest_health: None,
            registration_command_id: None,
            runner_registered: false,
            acks_commands: false,
            agent_version: None,
            job_started_at: None,
            created_at: now,
            updated_at: now,
        },
    };
    if let Some(p) = c.pool_id.filter(|p| !p.is_empty()) {
        vm.pool_id = p.to_owned();
    }
    if vm.pool_id.is_empty() {
        vm.pool_id = "default".to_owned();
    }
    if let Some(o) = c.org_id.filter(|o| !o.is_empty()) {
        vm.org_id = o.to_owned();
    }
    if let Some(v) = c.version.filter(|v| !v.is_empty()) {
        vm.agent_version = Some(v.to_owned());
    }
    if new_boot {
        vm.boot_seq += 1;
        vm.boot_id = c
            .boot_id
            .map(str::to_owned)
            .unwrap_or_else(|| format!("boot-{}", vm.boot_seq));
        vm.booted_at = now;
        vm.state = MigletState::Ready.as_str().to_owned();
        vm.runner_state = None;
        vm.current_job = None;
        vm.registration_command_id = None;
        vm.runner_registered = false;
        vm.job_started_at = None;
    }
    if PRE_REGISTRATION.contains(&vm.state.as_str()) {
        // Announcing itself is what a waiting agent does right after its vm_started is
        // acknowledged: from here on it waits in `ready`.
        vm.state = MigletState::Ready.as_str().to_owned();
    }
    vm.health = Health::Healthy;
    vm.last_seen_at = vm.last_seen_at.max(now);
    vm.updated_at = now;
    (vm, new_boot)
}

/// A VM we hear from without an announcement (the controller lost its data, or the agent
/// skips `vm_started` and reports over HTTP only). It is adopted as it is. `reported_state`
/// is the state it reports, if any: a VM that says it is still waiting for registration
/// (its `vm_started` may simply arrive after this report) can be registered once it
/// announces itself; any other VM may already run a runner, so it is never sent a
/// registration on this evidence.
pub fn adopt(
    vm_id: &str,
    pool_id: Option<&str>,
    org_id: Option<&str>,
    boot_id: Option<&str>,
    reported_state: Option<&str>,
    now: Millis,
) -> VmRecord {
    let c = Contact {
        kind: ContactKind::Connect,
        boot_id,
        pool_id,
        org_id,
        version: None,
    };
    let (mut vm, _) = on_contact(None, vm_id, &c, now);
    match reported_state {
        Some(st) if PRE_REGISTRATION.contains(&st) => {
            vm.state = st.to_owned();
            vm.runner_registered = false;
        }
        Some(st) => {
            vm.state = st.to_owned();
            vm.runner_registered = true;
        }
        None => {
            vm.state = "unknown".to_owned();
            vm.runner_registered = true;
        }
    }
    vm
}

/// The line for the VM's controller log when a contact made a silent VM healthy again
/// (`old` is the record before, `new` after).
pub fn recovery_log(old: Option<&VmRecord>, new: &VmRecord, now: Millis) -> Option<VmLogRow> {
    let old = old?;
    (old.health != Health::Healthy && new.health == Health::Healthy).then(|| VmLogRow {
        vm_id: new.vm_id.clone(),
        at: now,
        kind: "health_changed".into(),
        detail: Some(format!("{} -> healthy", old.health.as_str())),
    })
}

/// Whether an event or heartbeat that names `boot_id` belongs to the VM's current boot.
/// Reports that name no boot are taken as current.
pub fn is_current_boot(vm: &VmRecord, boot_id: Option<&str>) -> bool {
    boot_id.is_none_or(|b| b == vm.boot_id)
}

fn job_from(d: &JobDetails, now: Millis) -> CurrentJob {
    CurrentJob {
        job_id: d.job_id.clone(),
        run_id: d.run_id.clone(),
        job_name: d.job_name.clone(),
        repository: d.repository.clone(),
        branch: d.branch.clone(),
        commit: d.commit.clone(),
        status: Some("running".into()),
        started_at: chrono::DateTime::from_timestamp_millis(now),
    }
}

/// Applies an event of the current boot to the VM record.
pub fn on_event(vm: &VmRecord, kind: &EventKind, now: Millis) -> VmRecord {
    let mut vm = vm.clone();
    vm.last_seen_at = vm.last_seen_at.max(now);
    vm.health = Health::Healthy;
    vm.updated_at = now;
    match kind {
        EventKind::RunnerRegistered { .. } => {
            vm.runner_registered = true;
            vm.runner_state = Some("idle".into());
            if PRE_REGISTRATION.contains(&vm.state.as_str())
                || vm.state == "registering_runner"
                || vm.state == "unknown"
            {
                vm.state = MigletState::Idle.as_str().into();
            }
        }
        EventKind::JobStarted(d) => {
            vm.runner_registered = true;
            vm.runner_state = Some("running".into());
            vm.current_job = Some(job_from(d, now));
            vm.job_started_at.get_or_insert(now);
            if vm.state != MigletState::Draining.as_str() {
                vm.state = MigletState::JobRunning.as_str().into();
            }
        }
        EventKind::JobCompleted(_) => {
            vm.current_job = None;
            vm.runner_state = Some("idle".into());
            if vm.state == MigletState::JobRunning.as_str() {
                vm.state = MigletState::Idle.as_str().into();
            }
        }
        EventKind::RunnerCrashed { .. } => {
            vm.runner_state = Some("offline".into());
            vm.current_job = None;
        }
        EventKind::VmShuttingDown { .. } => {
            vm.state = MigletState::ShuttingDown.as_str().into();
        }
        EventKind::VmStarted { .. } | EventKind::Error { .. } | EventKind::Other => {}
    }
    vm
}

/// The state a heartbeat reports, if it is one of the contract's states.
/// The VM a heartbeat from an unknown VM creates (before the heartbeat is applied to it).
pub fn adopt_for_heartbeat(input: &HeartbeatInput) -> VmRecord {
    let r = &input.report;
    let mut v = adopt(
        &input.vm_id,
        r.pool_id.as_deref(),
        r.org_id.as_deref(),
        r.boot_id.as_deref(),
        heartbeat_state(r).as_deref(),
        input.now,
    );
    v.connected = input.connected;
    v
}

/// What a heartbeat does to a known VM: the row stored and the VM's update. A heartbeat of an
/// earlier boot is stored but changes only the VM's contact time and health figures.
pub fn heartbeat_effect(
    vm: &VmRecord,
    input: &HeartbeatInput,
) -> (HeartbeatRow, HeartbeatVmUpdate) {
    let report = &input.report;
    let current = is_current_boot(vm, report.boot_id.as_deref());
    let state = current.then(|| heartbeat_state(report)).flatten();
    let current_job = match (&report.current_job, &vm.current_job) {
        _ if !current => vm.current_job.clone(),
        // The job event knew more (name, branch, ...) than a heartbeat carries.
        (Some(_), Some(known)) => Some(known.clone()),
        (Some(hb), None) => Some(hb.clone()),
        (None, known) if state.as_deref() == Some("job_running") => known.clone(),
        (None, _) => None,
    };
    let h = &report.health;
    let row = HeartbeatRow {
        seq: 0,
        vm_id: input.vm_id.clone(),
        transport: input.transport.clone(),
        occurred_at: report.timestamp.map(|t| t.timestamp_millis()),
        received_at: input.now,
        miglet_state: report.miglet_state.clone(),
        runner_state: report.runner_state.clone(),
        cpu_percent: h.cpu_percent,
        memory_used_bytes: h.memory_used_bytes,
        memory_total_bytes: h.memory_total_bytes,
        disk_used_bytes: h.disk_used_bytes,
        disk_total_bytes: h.disk_total_bytes,
        report: input.report_json.clone(),
    };
    let update = HeartbeatVmUpdate {
        vm_id: input.vm_id.clone(),
        at: input.now,
        state,
        runner_state: if current {
            report.runner_state.clone()
        } else {
            None
        },
        current_job,
        latest_health: report.health.clone(),
    };
    (row, update)
}

pub fn heartbeat_state(report: &HeartbeatReport) -> Option<String> {
    report
        .miglet_state
        .as_deref()
        .and_then(|s| s.parse::<MigletState>().ok())
        .map(|s| s.as_str().to_owned())
}

/// Whether the VM should be issued a `register_runner` now: it waits in `ready` in its
/// current boot (it has announced itself), has no live registration command and no
/// registered runner. A VM that only reported itself still waiting for its `vm_started`
/// acknowledgment is not sent one: it would have to refuse it.
pub fn needs_registration(vm: &VmRecord) -> bool {
    vm.registration_command_id.is_none()
        && !vm.runner_registered
        && vm.health != Health::Lost
        && vm.state == MigletState::Ready.as_str()
}

/// The channel a VM asks for its commands on.
#[derive(Debug, Clone, Copy)]
pub enum Channel<'a> {
    /// `GET .../commands`. `acks` says whether this agent acknowledges commands; one that
    /// never does (a base-contract agent) gets each command once.
    Http { acks: bool },
    /// A gRPC stream, named by its id.
    Stream { stream_id: &'a str },
}

/// The value stored in `delivered_via` for a stream.
pub fn stream_via(stream_id: &str) -> String {
    format!("grpc:{stream_id}")
}

/// Which open commands (in queue order) go out now on `channel`.
///
/// * Expired ones never do.
/// * Pending ones always do.
/// * Delivered, unacknowledged ones go out again on a stream other than the one that carried
///   them (a reconnect), or once `redeliver_after` has passed since the last delivery; over
///   HTTP only to agents that acknowledge.
pub fn select_deliverable<'c>(
    open: &'c [CommandRecord],
    channel: Channel<'_>,
    now: Millis,
    redeliver_after: Millis,
) -> Vec<&'c CommandRecord> {
    open.iter()
        .filter(|c| c.expires_at.is_none_or(|e| e > now))
        .filter(|c| match c.state {
            CommandState::Pending => true,
            CommandState::Delivered => {
                let timed_out = c.delivered_at.is_none_or(|d| d + redeliver_after <= now);
                match channel {
                    Channel::Http { acks } => acks && timed_out,
                    Channel::Stream { stream_id } => {
                        c.delivered_via.as_deref() != Some(stream_via(stream_id).as_str())
                            || timed_out
                    }
                }
            }
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn contact(kind: ContactKind, boot: Option<&str>) -> Contact<'_> {
        Contact {
            kind,
            boot_id: boot,
            pool_id: Some("p"),
            org_id: Some("o"),
            version: None,
        }
    }

    fn fresh(now: Millis) -> VmRecord {
        on_contact(None, "vm-1", &contact(ContactKind::VmStarted, None), now).0
    }

    #[test]
    fn unknown_vm_starts_a_boot_either_way() {
        for kind in [ContactKind::VmStarted, ContactKind::Connect] {
            let (vm, new) = on_contact(None, "vm-1", &contact(kind, None), 10);
            assert!(new);
            assert_eq!(
                (vm.boot_seq, vm.state.as_str(), vm.pool_id.as_str()),
                (1, "ready", "p")
            );
            assert!(needs_registration(&vm));
        }
    }

    #[test]
    fn reconnect_never_starts_a_boot() {
        let mut vm = fresh(1);
        vm.registration_command_id = Some("r".into());
        vm.state = "idle".into();
        let (after, new) = on_contact(Some(&vm), "vm-1", &contact(ContactKind::Connect, None), 5);
        assert!(!new);
        assert_eq!(after.registration_command_id.as_deref(), Some("r"));
        assert_eq!(after.state, "idle");
        // Same boot id: still a reconnect.
        let (after, new) = on_contact(
            Some(&vm),
            "vm-1",
            &contact(ContactKind::Connect, Some("boot-1")),
            5,
        );
        assert!(!new);
        assert_eq!(after.boot_seq, 1);
    }

    #[test]
    fn vm_started_resend_with_same_boot_is_not_a_new_boot() {
        let (vm, _) = on_contact(
            None,
            "vm-1",
            &contact(ContactKind::VmStarted, Some("b1")),
            1,
        );
        assert!(!starts_new_boot(
            Some(&vm),
            &contact(ContactKind::VmStarted, Some("b1"))
        ));
        assert!(starts_new_boot(
            Some(&vm),
            &contact(ContactKind::VmStarted, Some("b2"))
        ));
        // The seed's agent sends no boot id: every vm_started is a boot, as in the sample.
        assert!(starts_new_boot(
            Some(&vm),
            &contact(ContactKind::VmStarted, None)
        ));
    }

    #[test]
    fn new_boot_resets_registration_and_job() {
        let mut vm = fresh(1);
        vm.registration_command_id = Some("r".into());
        vm.runner_registered = true;
        vm.state = "shutting_down".into();
        vm.current_job = Some(CurrentJob::default());
        vm.health = Health::Lost;
        let (after, new) = on_contact(Some(&vm), "vm-1", &contact(ContactKind::Connect, None), 50);
        assert!(new);
        assert_eq!(after.boot_seq, 2);
        assert_eq!(after.boot_id, "boot-2");
        assert!(after.current_job.is_none() && after.registration_command_id.is_none());
        assert_eq!(after.health, Health::Healthy);
        assert!(needs_registration(&after));
    }

    #[test]
    fn events_move_the_state() {
        let vm = fresh(1);
        let vm = on_event(
            &vm,
            &EventKind::RunnerRegistered {
                runner_url: None,
                runner_name: None,
            },
            2,
        );
        assert_eq!((vm.state.as_str(), vm.runner_registered), ("idle", true));
        assert!(!needs_registration(&vm));
        let job = JobDetails {
            run_id: Some("7".into()),
            ..Default::default()
        };
        let vm = on_event(&vm, &EventKind::JobStarted(job.clone()), 3);
        assert_eq!(vm.state, "job_running");
        assert_eq!(
            vm.current_job.as_ref().and_then(|j| j.run_id.as_deref()),
            Some("7")
        );
        let vm = on_event(&vm, &EventKind::JobCompleted(job), 4);
        assert_eq!(vm.state, "idle");
        assert!(vm.current_job.is_none());
        let vm = on_event(&vm, &EventKind::VmShuttingDown { reason: None }, 5);
        assert_eq!(vm.state, "shutting_down");
    }

    #[test]
    fn adopted_vm_is_registered_only_if_it_says_it_waits() {
        let vm = adopt("vm-9", Some("p"), None, None, None, 1);
        assert!(!needs_registration(&vm));
        let vm = adopt("vm-9", Some("p"), None, Some("b1"), Some("idle"), 1);
        assert!(!needs_registration(&vm));
        // A heartbeat from a VM still waiting for its vm_started ack, then the vm_started of
        // the same boot: the VM gets its registration.
        let vm = adopt(
            "vm-9",
            Some("p"),
            None,
            Some("b1"),
            Some("waiting_for_controller"),
            1,
        );
        let c = Contact {
            kind: ContactKind::VmStarted,
            boot_id: Some("b1"),
            pool_id: Some("p"),
            org_id: None,
            version: None,
        };
        let (after, new_boot) = on_contact(Some(&vm), "vm-9", &c, 2);
        assert!(!new_boot);
        assert!(needs_registration(&after));
    }

    #[test]
    fn a_silent_vm_heard_from_again_is_logged_healthy() {
        let mut silent = fresh(1);
        silent.health = Health::Unhealthy;
        let back = on_event(&silent, &EventKind::Other, 5);
        let log = recovery_log(Some(&silent), &back, 5);
        assert_eq!(
            log.and_then(|l| l.detail),
            Some("unhealthy -> healthy".to_owned())
        );
        assert!(recovery_log(Some(&back), &back, 6).is_none());
        assert!(recovery_log(None, &back, 6).is_none());
    }

    #[test]
    fn boot_matching() {
        let (vm, _) = on_contact(
            None,
            "vm-1",
            &contact(ContactKind::VmStarted, Some("b1")),
            1,
        );
        assert!(is_current_boot(&vm, None));
        assert!(is_current_boot(&vm, Some("b1")));
        assert!(!is_current_boot(&vm, Some("b0")));
    }

    fn cmd(
        id: &str,
        state: CommandState,
        delivered: Option<(Millis, &str)>,
        expires: Option<Millis>,
    ) -> CommandRecord {
        CommandRecord {
            seq: 0,
            id: id.into(),
            vm_id: "vm-1".into(),
            boot_id: None,
            command_type: "drain".into(),
            parameters: Map::new(),
            state,
            source: "test".into(),
            created_at: 0,
            expires_at: expires,
            delivered_at: delivered.map(|d| d.0),
            delivered_via: delivered.map(|d| d.1.to_owned()),
            delivery_count: i64::from(delivered.is_some()),
            finished_at: None,
            result_message: None,
            result: None,
        }
    }

    fn ids(v: Vec<&CommandRecord>) -> Vec<&str> {
        v.into_iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn delivery_selection() {
        let open = vec![
            cmd("pending", CommandState::Pending, None, None),
            cmd("expired", CommandState::Pending, None, Some(100)),
            cmd(
                "on-s1",
                CommandState::Delivered,
                Some((90, "grpc:s1")),
                None,
            ),
            cmd("http", CommandState::Delivered, Some((90, "http")), None),
        ];
        // Same stream, before the timeout: the pending one, and the one that went out on
        // another channel (HTTP) without an acknowledgment.
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Stream { stream_id: "s1" },
                100,
                30
            )),
            ["pending", "http"]
        );
        // A new stream (reconnect): everything unacknowledged goes again.
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Stream { stream_id: "s2" },
                100,
                30
            )),
            ["pending", "on-s1", "http"]
        );
        // Same stream after the timeout.
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Stream { stream_id: "s1" },
                120,
                30
            )),
            ["pending", "on-s1", "http"]
        );
        // HTTP, base-contract agent: each command once.
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Http { acks: false },
                500,
                30
            )),
            ["pending"]
        );
        // HTTP, acknowledging agent: again after the timeout only.
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Http { acks: true },
                100,
                30
            )),
            ["pending"]
        );
        assert_eq!(
            ids(select_deliverable(
                &open,
                Channel::Http { acks: true },
                120,
                30
            )),
            ["pending", "on-s1", "http"]
        );
    }
}
