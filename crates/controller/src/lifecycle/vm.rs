//! A VM's record over time: contact and boots, job events, heartbeats, recovery.

use super::registration::PRE_REGISTRATION;
use crate::model::{
    Health, HeartbeatInput, HeartbeatRow, HeartbeatVmUpdate, Millis, SilentChange, SilentVm,
    VmLogRow, VmRecord,
};
use miglet_proto::event::{CurrentJob, EventKind, HeartbeatReport, JobDetails};
use miglet_proto::state::MigletState;

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

pub(super) fn job_from(d: &JobDetails, now: Millis) -> CurrentJob {
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

/// From when silence counts against a VM: last seen before `unhealthy_before`, a healthy VM
/// turns unhealthy; before `lost_before`, it is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Silence {
    pub unhealthy_before: Millis,
    pub lost_before: Millis,
}

impl Silence {
    /// The thresholds at `now`: so many missed heartbeat intervals.
    pub fn at(
        now: Millis,
        heartbeat_interval: std::time::Duration,
        unhealthy_after_missed: u32,
        lost_after_missed: u32,
    ) -> Silence {
        let interval = heartbeat_interval.as_millis() as Millis;
        Silence {
            unhealthy_before: now - interval * Millis::from(unhealthy_after_missed),
            lost_before: now - interval * Millis::from(lost_after_missed),
        }
    }
}

/// Could silence ever change a VM in this state and health? The sweep's read skips the VMs
/// for which it cannot (a terminated VM; a lost one that is not shutting down), so that a
/// pass over a large fleet reads only the few that may change.
pub fn may_change_when_silent(state: &str, health: Health) -> bool {
    state != "terminated" && (health != Health::Lost || state == "shutting_down")
}

/// What silence does to a VM: a VM that was shutting down and went quiet and disconnected is
/// terminated (done, not sick); otherwise a healthy or unhealthy VM past `lost_before` is
/// lost, and a healthy one past `unhealthy_before` unhealthy.
pub fn silent_change(vm: &SilentVm, t: &Silence) -> Option<SilentChange> {
    if !may_change_when_silent(&vm.state, vm.health) {
        return None;
    }
    if vm.state == "shutting_down" && !vm.connected && vm.last_seen_at < t.unhealthy_before {
        return Some(SilentChange::Terminated);
    }
    let to = match vm.health {
        Health::Healthy | Health::Unhealthy if vm.last_seen_at < t.lost_before => Health::Lost,
        Health::Healthy if vm.last_seen_at < t.unhealthy_before => Health::Unhealthy,
        _ => return None,
    };
    Some(SilentChange::Health {
        from: vm.health,
        to,
    })
}

/// A VM record for tests: announced once, then set to the given facts.
#[cfg(test)]
pub(crate) fn test_vm(
    vm_id: &str,
    state: &str,
    health: Health,
    connected: bool,
    seen: Millis,
) -> VmRecord {
    let contact = Contact {
        kind: ContactKind::VmStarted,
        boot_id: Some("b"),
        pool_id: Some("p"),
        org_id: None,
        version: None,
    };
    let (mut vm, _) = on_contact(None, vm_id, &contact, seen);
    vm.state = state.into();
    vm.health = health;
    vm.connected = connected;
    vm.last_seen_at = seen;
    vm
}

#[cfg(test)]
mod silence_tests {
    use super::*;

    fn vm(state: &str, health: Health, connected: bool, seen: Millis) -> SilentVm {
        SilentVm {
            vm_id: "vm".into(),
            state: state.into(),
            health,
            connected,
            last_seen_at: seen,
        }
    }

    const T: Silence = Silence {
        unhealthy_before: 100,
        lost_before: 10,
    };

    #[test]
    fn thresholds_count_missed_intervals() {
        let t = Silence::at(100_000, std::time::Duration::from_secs(10), 3, 30);
        assert_eq!((t.unhealthy_before, t.lost_before), (70_000, -200_000));
    }

    #[test]
    fn silence_progresses_healthy_unhealthy_lost() {
        let h = |from, to| Some(SilentChange::Health { from, to });
        assert_eq!(
            silent_change(&vm("idle", Health::Healthy, true, 100), &T),
            None
        );
        assert_eq!(
            silent_change(&vm("idle", Health::Healthy, true, 99), &T),
            h(Health::Healthy, Health::Unhealthy)
        );
        assert_eq!(
            silent_change(&vm("idle", Health::Unhealthy, false, 50), &T),
            None
        );
        assert_eq!(
            silent_change(&vm("idle", Health::Unhealthy, false, 9), &T),
            h(Health::Unhealthy, Health::Lost)
        );
        assert_eq!(
            silent_change(&vm("job_running", Health::Healthy, false, 9), &T),
            h(Health::Healthy, Health::Lost)
        );
        assert_eq!(silent_change(&vm("idle", Health::Lost, false, 0), &T), None);
    }

    #[test]
    fn a_quiet_shutting_down_vm_is_terminated_not_lost() {
        let quiet = vm("shutting_down", Health::Lost, false, 0);
        assert_eq!(silent_change(&quiet, &T), Some(SilentChange::Terminated));
        // Still connected: only its health follows silence.
        let connected = vm("shutting_down", Health::Healthy, true, 50);
        assert_eq!(
            silent_change(&connected, &T),
            Some(SilentChange::Health {
                from: Health::Healthy,
                to: Health::Unhealthy
            })
        );
        assert_eq!(
            silent_change(&vm("terminated", Health::Healthy, false, 0), &T),
            None
        );
    }

    /// The sweep's read may skip a VM only if silence can never change it.
    #[test]
    fn skipped_vms_are_never_changed() {
        for state in [
            "ready",
            "idle",
            "job_running",
            "shutting_down",
            "terminated",
            "x",
        ] {
            for health in [Health::Healthy, Health::Unhealthy, Health::Lost] {
                for connected in [false, true] {
                    if !may_change_when_silent(state, health) {
                        assert_eq!(
                            silent_change(&vm(state, health, connected, -1_000), &T),
                            None
                        );
                    }
                }
            }
        }
    }
}
