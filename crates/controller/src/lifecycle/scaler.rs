//! The scaler's rules: how many VMs a pool should have, which to create, and which may go.
//!
//! A pool's **spare** VMs are those that can still take a job: booting, registering their
//! runner, or idle. The scaler wants `queued jobs + min_idle` spare VMs, never more than
//! `max_size` VMs in all (busy ones included), and creates at most `scale_up_step` a pass
//! and `scale_up_per_minute` in any minute ([`creations_allowed`]).
//!
//! **Safety**: a VM is removed only when
//! - its agent reports it **idle** and it is not needed (spare beyond what is wanted, idle
//!   for `idle_timeout`; or past `max_vm_lifetime`): it is first sent `drain`, and deleted
//!   only once the agent acknowledged the drain and is still not running a job;
//! - its ephemeral job is done (the runner takes no other job);
//! - it missed `boot_timeout` (created → `vm_started`) or `registration_timeout`
//!   (`vm_started` → runner online);
//! - it ended (shutting down, terminated), or is lost while not running a job.
//!
//! A VM running a job (`job_running`, or a job started on its boot and not completed), a VM
//! registering its runner within its timeout, and a VM in an unknown state are never removed.
//! A lost VM that was running a job is left until `max_vm_lifetime`: it may only be
//! partitioned, with the job still going.

use crate::model::{Health, Millis, VmRecord};

/// A pool's scaling settings (times in ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePolicy {
    pub min_idle: u32,
    pub max_size: u32,
    pub idle_timeout: Millis,
    pub max_vm_lifetime: Millis,
    pub boot_timeout: Millis,
    pub registration_timeout: Millis,
    /// VMs created per pass, at most.
    pub scale_up_step: u32,
    /// VMs created in any [`RATE_WINDOW_MS`], at most (`None`: no limit).
    pub scale_up_per_minute: Option<u32>,
}

/// The window `scale_up_per_minute` counts creations over.
pub const RATE_WINDOW_MS: Millis = 60_000;

/// How many of the `wanted` VMs a pass may create, when `created_in_window` were created in
/// the last [`RATE_WINDOW_MS`] (deleted ones included): the rest wait for a later pass.
pub fn creations_allowed(p: &ScalePolicy, wanted: u32, created_in_window: u32) -> u32 {
    match p.scale_up_per_minute {
        Some(limit) => wanted.min(limit.saturating_sub(created_in_window)),
        None => wanted,
    }
}

/// Where a drain the scaler sent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    None,
    /// Sent, not acknowledged yet.
    Sent(Reason),
    /// The agent acknowledged it: it takes no new job.
    Acked(Reason),
}

/// One instance of the pool, as the scaler sees it.
#[derive(Debug, Clone)]
pub struct Instance<'a> {
    pub name: &'a str,
    /// When the scaler asked for it (or adopted it).
    pub created_at: Millis,
    /// What its agent reported, once it announced itself.
    pub vm: Option<&'a VmRecord>,
    pub drain: Drain,
    /// The provider reports it stopped on its own (the agent exited, the VM powered off).
    pub stopped: bool,
}

/// Why a VM is drained or deleted (also the metric label and the timeline's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    BootTimeout,
    RegistrationTimeout,
    JobDone,
    Idle,
    OverMax,
    Lifetime,
    Ended,
    Lost,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BootTimeout => "boot_timeout",
            Reason::RegistrationTimeout => "registration_timeout",
            Reason::JobDone => "job_done",
            Reason::Idle => "idle",
            Reason::OverMax => "over_max_size",
            Reason::Lifetime => "max_lifetime",
            Reason::Ended => "ended",
            Reason::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        [
            Reason::BootTimeout,
            Reason::RegistrationTimeout,
            Reason::JobDone,
            Reason::Idle,
            Reason::OverMax,
            Reason::Lifetime,
            Reason::Ended,
            Reason::Lost,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What the scaler does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleAction {
    Create { count: u32, why: CreateReason },
    Drain { name: String, reason: Reason },
    Delete { name: String, reason: Reason },
}

/// Why VMs are created (the VM's timeline and the log say it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateReason {
    /// Queued jobs no spare VM can take.
    QueuedJobs,
    /// Only to keep `min_idle` spare VMs.
    MinIdle,
}

impl CreateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CreateReason::QueuedJobs => "queued_jobs",
            CreateReason::MinIdle => "min_idle",
        }
    }
}

/// One pass's decisions and the figures behind them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<ScaleAction>,
    /// VMs wanted: busy ones plus the spare ones wanted, within `max_size`.
    pub desired: u32,
    /// VMs there are (not being deleted by this plan).
    pub actual: u32,
    pub spare: u32,
    pub busy: u32,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created; its agent has not announced itself.
    Booting,
    /// Announced; its runner is not online yet.
    Registering,
    Idle,
    /// Running a job (or one started on this boot and not completed).
    Busy,
    /// Its job completed: the ephemeral runner takes no other.
    JobDone,
    /// Draining with no job: takes no new job (drained by the scaler, or by an operator).
    Draining,
    /// Shutting down or terminated.
    Ended,
    Lost,
}

const REGISTERING: &[&str] = &[
    "initializing",
    "waiting_for_controller",
    "ready",
    "registering_runner",
];

/// The phase of an instance from what its agent reported.
pub fn phase(vm: Option<&VmRecord>) -> Phase {
    let Some(vm) = vm else {
        return Phase::Booting;
    };
    let state = vm.state.as_str();
    // Running a job (as last reported: a lost VM may only be partitioned, job going on).
    if state == "job_running" || vm.current_job.is_some() {
        return Phase::Busy;
    }
    // A job ran on this boot and is over: the agent then shuts down (or stays, with a
    // post-job action of `none`); either way the VM's work is done.
    if vm.job_started_at.is_some() {
        return Phase::JobDone;
    }
    if matches!(state, "shutting_down" | "terminated") {
        return Phase::Ended;
    }
    if vm.health == Health::Lost {
        return Phase::Lost;
    }
    match state {
        "idle" => Phase::Idle,
        "draining" => Phase::Draining,
        s if REGISTERING.contains(&s) => Phase::Registering,
        // `unknown`, or a state this version does not know: left alone (counted, never
        // spare).
        _ => Phase::Busy,
    }
}

/// The deletion an instance is due whatever the demand, if any.
fn due_deletion(p: &ScalePolicy, i: &Instance<'_>, phase: Phase, now: Millis) -> Option<Reason> {
    let lifetime_over = now - i.created_at >= p.max_vm_lifetime;
    let gone = i.stopped || matches!(phase, Phase::Ended | Phase::Lost | Phase::JobDone);
    // A drained VM that shut down (as a drain ends) goes for the drain's reason.
    if let (Drain::Sent(reason) | Drain::Acked(reason), true) = (i.drain, gone) {
        return Some(reason);
    }
    // A VM whose job is done goes for that, even if its agent also stopped.
    if phase == Phase::JobDone {
        return Some(Reason::JobDone);
    }
    if i.stopped {
        return Some(Reason::Ended);
    }
    match phase {
        Phase::Booting if now - i.created_at >= p.boot_timeout => Some(Reason::BootTimeout),
        Phase::Registering
            if i.vm
                .is_some_and(|v| now - v.booted_at >= p.registration_timeout) =>
        {
            Some(Reason::RegistrationTimeout)
        }
        Phase::JobDone => Some(Reason::JobDone),
        Phase::Ended => Some(Reason::Ended),
        Phase::Lost => Some(Reason::Lost),
        Phase::Busy if lifetime_over && i.vm.is_some_and(|v| v.health == Health::Lost) => {
            Some(Reason::Lost)
        }
        _ => match i.drain {
            // Drained and still not running a job: it goes.
            Drain::Acked(reason) if phase != Phase::Busy => Some(reason),
            _ => None,
        },
    }
}

/// The pass: what to create, drain and delete for a pool with `instances` and `queued`
/// jobs no VM has taken yet, at `now`.
pub fn plan(p: &ScalePolicy, instances: &[Instance<'_>], queued: u32, now: Millis) -> Plan {
    let mut out = Plan::default();
    let mut idle: Vec<(&Instance<'_>, Millis)> = Vec::new();
    for i in instances {
        let ph = phase(i.vm);
        if let Some(reason) = due_deletion(p, i, ph, now) {
            out.actions.push(ScaleAction::Delete {
                name: i.name.to_owned(),
                reason,
            });
            continue;
        }
        out.actual += 1;
        let draining = i.drain != Drain::None;
        match ph {
            Phase::Booting | Phase::Registering if !draining => out.spare += 1,
            Phase::Idle if !draining => {
                out.spare += 1;
                let since = i.vm.map_or(i.created_at, |v| v.booted_at);
                idle.push((i, since));
            }
            Phase::Busy => out.busy += 1,
            _ => {}
        }
    }
    let want_spare = queued.saturating_add(p.min_idle);
    out.desired = out.busy.saturating_add(want_spare).min(p.max_size);
    if out.spare < want_spare {
        let room = p.max_size.saturating_sub(out.actual);
        let count = (want_spare - out.spare).min(room).min(p.scale_up_step);
        if count > 0 {
            let why = if queued > out.spare {
                CreateReason::QueuedJobs
            } else {
                CreateReason::MinIdle
            };
            out.actions.push(ScaleAction::Create { count, why });
        }
        return with_lifetime_drains(p, out, &idle, now);
    }
    // Idle VMs beyond what is wanted, longest idle first: over max_size at once, otherwise
    // once idle for idle_timeout.
    idle.sort_by_key(|(i, since)| (*since, i.name));
    let mut excess = out.spare - want_spare;
    let mut over_max = out.actual.saturating_sub(p.max_size);
    let mut drained = Vec::new();
    for (i, since) in &idle {
        if excess == 0 {
            break;
        }
        let reason = if over_max > 0 {
            over_max -= 1;
            Reason::OverMax
        } else if now - since >= p.idle_timeout {
            Reason::Idle
        } else {
            continue;
        };
        excess -= 1;
        drained.push(i.name);
        out.actions.push(ScaleAction::Drain {
            name: i.name.to_owned(),
            reason,
        });
    }
    idle.retain(|(i, _)| !drained.contains(&i.name));
    with_lifetime_drains(p, out, &idle, now)
}

/// Idle VMs past `max_vm_lifetime` are drained (and replaced, if still wanted, at the next
/// pass).
fn with_lifetime_drains(
    p: &ScalePolicy,
    mut out: Plan,
    idle: &[(&Instance<'_>, Millis)],
    now: Millis,
) -> Plan {
    for (i, _) in idle {
        if now - i.created_at >= p.max_vm_lifetime {
            out.actions.push(ScaleAction::Drain {
                name: i.name.to_owned(),
                reason: Reason::Lifetime,
            });
        }
    }
    out
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[test]
    fn creations_are_held_to_the_rate_over_the_last_minute() {
        let mut p = ScalePolicy {
            min_idle: 0,
            max_size: 100,
            idle_timeout: 1,
            max_vm_lifetime: 1,
            boot_timeout: 1,
            registration_timeout: 1,
            scale_up_step: 10,
            scale_up_per_minute: None,
        };
        assert_eq!(creations_allowed(&p, 10, 500), 10);
        p.scale_up_per_minute = Some(12);
        assert_eq!(creations_allowed(&p, 10, 0), 10);
        assert_eq!(creations_allowed(&p, 10, 5), 7);
        assert_eq!(creations_allowed(&p, 10, 12), 0);
        assert_eq!(creations_allowed(&p, 10, 40), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::test_vm;
    use proptest::prelude::*;

    const MIN: Millis = 60_000;

    fn policy() -> ScalePolicy {
        ScalePolicy {
            min_idle: 1,
            max_size: 10,
            idle_timeout: 10 * MIN,
            max_vm_lifetime: 24 * 60 * MIN,
            boot_timeout: 5 * MIN,
            registration_timeout: 5 * MIN,
            scale_up_step: 4,
            scale_up_per_minute: None,
        }
    }

    fn vm(state: &str, health: Health, booted_at: Millis) -> VmRecord {
        let mut v = test_vm("v", state, health, true, booted_at);
        v.booted_at = booted_at;
        if state == "job_running" {
            v.job_started_at = Some(booted_at);
        }
        v
    }

    fn inst<'a>(name: &'a str, created_at: Millis, vm: Option<&'a VmRecord>) -> Instance<'a> {
        Instance {
            name,
            created_at,
            vm,
            drain: Drain::None,
            stopped: false,
        }
    }

    fn creates(p: &Plan) -> u32 {
        p.actions
            .iter()
            .map(|a| match a {
                ScaleAction::Create { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn queued_jobs_and_min_idle_are_met_in_steps_within_max_size() {
        let p = policy();
        // 3 queued, nothing yet: 3 + 1 spare wanted.
        let plan0 = plan(&p, &[], 3, 0);
        assert_eq!(creates(&plan0), 4);
        assert_eq!(plan0.desired, 4);
        // 50 queued: 4 a pass (the step), never beyond max_size.
        assert_eq!(creates(&plan(&p, &[], 50, 0)), 4);
        let busy = vm("job_running", Health::Healthy, 0);
        let many: Vec<Instance<'_>> = (0..8).map(|_| inst("b", 0, Some(&busy))).collect();
        let full = plan(&p, &many, 50, 0);
        assert_eq!(creates(&full), 2, "room for 2 more");
        assert_eq!((full.desired, full.actual, full.busy), (10, 8, 8));
        // Booting and registering VMs count as spare: no double creation.
        let ready = vm("ready", Health::Healthy, 0);
        let coming = [inst("a", 0, None), inst("b", 0, Some(&ready))];
        assert_eq!(creates(&plan(&p, &coming, 1, MIN)), 0);
        // Why: jobs no spare VM can take, or only min_idle.
        let why = |pl: &Plan| {
            pl.actions.iter().find_map(|a| match a {
                ScaleAction::Create { why, .. } => Some(*why),
                _ => None,
            })
        };
        assert_eq!(why(&plan0), Some(CreateReason::QueuedJobs));
        assert_eq!(why(&plan(&p, &[], 0, 0)), Some(CreateReason::MinIdle));
        assert_eq!(
            why(&plan(&p, &coming[..1], 1, MIN)),
            Some(CreateReason::MinIdle)
        );
    }

    #[test]
    fn busy_registering_and_unknown_vms_are_never_removed() {
        let p = ScalePolicy {
            min_idle: 0,
            ..policy()
        };
        let late = 100 * 24 * 60 * MIN;
        for state in ["job_running", "registering_runner", "unknown", "draining"] {
            let v = vm(state, Health::Healthy, late - MIN);
            let i = [inst("x", late - 2 * MIN, Some(&v))];
            assert!(plan(&p, &i, 0, late).actions.is_empty(), "{state}");
        }
        // Past its lifetime while running a job: kept until the job is done.
        let v = vm("job_running", Health::Healthy, 0);
        let old = [inst("x", 0, Some(&v))];
        assert!(plan(&p, &old, 0, late).actions.is_empty());
        // A drain acknowledged while a job runs waits for the job.
        let mut drained = inst("x", 0, Some(&v));
        drained.drain = Drain::Acked(Reason::Idle);
        assert!(plan(&p, &[drained], 0, MIN).actions.is_empty());
    }

    #[test]
    fn idle_vms_beyond_demand_are_drained_then_deleted() {
        let p = ScalePolicy {
            min_idle: 1,
            ..policy()
        };
        let a = vm("idle", Health::Healthy, 0);
        let b = vm("idle", Health::Healthy, MIN);
        let idle = [inst("a", 0, Some(&a)), inst("b", 0, Some(&b))];
        // Not idle long enough yet.
        assert!(plan(&p, &idle, 0, 5 * MIN).actions.is_empty());
        let later = plan(&p, &idle, 0, 11 * MIN);
        assert_eq!(
            later.actions,
            [ScaleAction::Drain {
                name: "a".into(),
                reason: Reason::Idle
            }],
            "the longest idle; one stays for min_idle"
        );
        // Demand came back: nothing goes.
        assert!(plan(&p, &idle, 1, 11 * MIN).actions.is_empty());
        // Sent: it no longer counts as spare, nothing more happens until the agent acks.
        let mut sent = idle.clone();
        sent[0].drain = Drain::Sent(Reason::Idle);
        let waiting = plan(&p, &sent, 0, 12 * MIN);
        assert!(waiting.actions.is_empty(), "{waiting:?}");
        sent[0].drain = Drain::Acked(Reason::Idle);
        assert_eq!(
            plan(&p, &sent, 0, 12 * MIN).actions,
            [ScaleAction::Delete {
                name: "a".into(),
                reason: Reason::Idle
            }]
        );
        // A smaller max_size drains at once, without waiting for idle_timeout.
        let small = ScalePolicy {
            max_size: 1,
            min_idle: 0,
            ..policy()
        };
        let over = plan(&small, &idle, 0, 2 * MIN);
        assert_eq!(
            over.actions,
            [ScaleAction::Drain {
                name: "a".into(),
                reason: Reason::OverMax
            }],
            "one over max_size; the other is not idle long enough"
        );
        // Once the agent reports `draining` and acknowledged, it is deleted.
        let draining = vm("draining", Health::Healthy, 0);
        let mut acked = inst("a", 0, Some(&draining));
        acked.drain = Drain::Acked(Reason::OverMax);
        assert_eq!(
            plan(&small, &[acked.clone()], 0, 3 * MIN).actions,
            [ScaleAction::Delete {
                name: "a".into(),
                reason: Reason::OverMax
            }]
        );
        // An operator's drain (not the scaler's) is left alone.
        acked.drain = Drain::None;
        assert!(plan(&small, &[acked], 0, 3 * MIN).actions.is_empty());
    }

    #[test]
    fn timeouts_finished_jobs_and_ended_vms_are_reaped() {
        let p = policy();
        let ready = vm("ready", Health::Healthy, MIN);
        let mut done = vm("idle", Health::Healthy, 0);
        done.job_started_at = Some(MIN);
        let gone = vm("shutting_down", Health::Healthy, 0);
        let mut done_and_down = vm("shutting_down", Health::Healthy, 0);
        done_and_down.job_started_at = Some(MIN);
        assert_eq!(
            phase(Some(&done_and_down)),
            Phase::JobDone,
            "shut down after its job"
        );
        let lost = vm("idle", Health::Lost, 0);
        let mut lost_busy = vm("job_running", Health::Lost, 0);
        lost_busy.current_job = None;
        let i = [
            inst("boot", 0, None),
            inst("reg", 0, Some(&ready)),
            inst("done", 0, Some(&done)),
            inst("gone", 0, Some(&gone)),
            inst("lost", 0, Some(&lost)),
            inst("lost-busy", 0, Some(&lost_busy)),
        ];
        let deletes: Vec<(String, Reason)> = plan(&p, &i, 0, 6 * MIN)
            .actions
            .into_iter()
            .filter_map(|a| match a {
                ScaleAction::Delete { name, reason } => Some((name, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            deletes,
            [
                ("boot".to_owned(), Reason::BootTimeout),
                ("reg".to_owned(), Reason::RegistrationTimeout),
                ("done".to_owned(), Reason::JobDone),
                ("gone".to_owned(), Reason::Ended),
                ("lost".to_owned(), Reason::Lost),
            ],
            "a lost VM that ran a job is left: it may be partitioned"
        );
        assert!(
            plan(&p, &i[..2], 0, 4 * MIN)
                .actions
                .iter()
                .all(|a| matches!(a, ScaleAction::Create { .. }))
        );
        for r in [
            Reason::BootTimeout,
            Reason::Idle,
            Reason::OverMax,
            Reason::Lost,
        ] {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn a_drained_vm_that_shut_down_goes_for_the_drains_reason() {
        let p = policy();
        let down = vm("shutting_down", Health::Healthy, 0);
        let mut i = inst("a", 0, Some(&down));
        i.drain = Drain::Sent(Reason::Idle);
        let delete = |reason| {
            vec![ScaleAction::Delete {
                name: "a".into(),
                reason,
            }]
        };
        assert_eq!(
            plan(&p, &[i.clone()], 1, MIN).actions[..1],
            delete(Reason::Idle)[..]
        );
        // A process that exited on its own: ended.
        let idle = vm("idle", Health::Healthy, 0);
        let mut exited = inst("a", 0, Some(&idle));
        exited.stopped = true;
        assert_eq!(
            plan(&p, &[exited], 0, MIN).actions[..1],
            delete(Reason::Ended)[..]
        );
    }

    #[test]
    fn idle_vms_past_their_lifetime_are_recycled() {
        let p = policy();
        let v = vm("idle", Health::Healthy, 0);
        let i = [inst("old", 0, Some(&v))];
        let day = 24 * 60 * MIN;
        let out = plan(&p, &i, 1, day);
        assert!(out.actions.contains(&ScaleAction::Drain {
            name: "old".into(),
            reason: Reason::Lifetime
        }));
        assert_eq!(creates(&out), 1, "the queued job still gets a VM");
    }

    fn any_state() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "ready",
            "registering_runner",
            "idle",
            "job_running",
            "draining",
            "shutting_down",
            "unknown",
        ])
    }

    proptest! {
        /// Whatever the pool looks like: a VM running a job is never drained or deleted,
        /// creates stay within the step and max_size.
        #[test]
        fn never_a_busy_vm_and_never_beyond_max_size(
            vms in prop::collection::vec((any_state(), any::<bool>(), 0i64..3, 0u8..3), 0..14),
            queued in 0u32..30,
            now in 0i64..(48 * 60 * MIN),
        ) {
            let p = policy();
            let records: Vec<VmRecord> = vms
                .iter()
                .map(|(state, lost, started, _)| {
                    let mut v = vm(state, if *lost { Health::Lost } else { Health::Healthy }, 0);
                    if *started == 1 { v.job_started_at = Some(0); }
                    v
                })
                .collect();
            let names: Vec<String> = (0..records.len()).map(|n| format!("vm{n}")).collect();
            let instances: Vec<Instance<'_>> = records
                .iter()
                .zip(&names)
                .zip(&vms)
                .map(|((v, n), (_, _, _, d))| Instance {
                    name: n,
                    created_at: 0,
                    vm: Some(v),
                    drain: match d { 0 => Drain::None, 1 => Drain::Sent(Reason::Idle), _ => Drain::Acked(Reason::Idle) },
                    stopped: false,
                })
                .collect();
            let out = plan(&p, &instances, queued, now);
            for a in &out.actions {
                let name = match a {
                    ScaleAction::Drain { name, .. } | ScaleAction::Delete { name, .. } => name,
                    ScaleAction::Create { count, .. } => {
                        prop_assert!(*count <= p.scale_up_step);
                        prop_assert!(out.actual + count <= p.max_size.max(out.actual));
                        continue;
                    }
                };
                let i = names.iter().position(|n| n == name).unwrap_or(usize::MAX);
                let v = &records[i];
                let running = v.state == "job_running" || v.current_job.is_some();
                let lifetime_over = now >= p.max_vm_lifetime;
                prop_assert!(
                    !running || (v.health == Health::Lost && lifetime_over),
                    "{a:?} on a VM running a job: {v:?}"
                );
                if matches!(a, ScaleAction::Drain { .. }) {
                    prop_assert_eq!(v.state.as_str(), "idle", "only idle VMs are drained");
                }
            }
        }
    }
}
