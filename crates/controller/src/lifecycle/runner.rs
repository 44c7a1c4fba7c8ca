//! Runners on GitHub that no VM needs any more, and their removal in two phases.
//!
//! Every runner the controller mints carries its label and is named `<vm id>-<boot>`. A
//! runner is **stale** when its VM is unknown, has booted again since, was terminated, or
//! has been lost longer than a grace period. A stale runner is first marked; only at a later
//! pass, if it is still stale, offline and not busy, is it deleted, so a runner that was
//! about to come online (or is running a job GitHub knows of) is never removed.

use crate::model::{Health, Millis, VmRecord};
use miglet_proto::event::EventKind;

/// The name a VM's boot registers its runner under on GitHub: unique per boot, since a
/// runner of an earlier boot may still be registered.
pub fn runner_name(vm_id: &str, boot_seq: i64) -> String {
    format!("{vm_id}-{boot_seq}")
}

/// Why a boot's runner is not needed any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEnd {
    /// The VM booted again: the earlier boot's runner process is gone.
    NewBoot,
    /// Its (ephemeral) job completed: the runner takes no other job.
    JobCompleted,
    /// The VM is shutting down or terminated.
    VmEnded,
}

/// An ephemeral runner removes itself once its job is done; it is given this long to do
/// so before it is removed for it.
pub const SELF_REMOVAL_GRACE_MS: Millis = 60_000;

impl RunnerEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerEnd::NewBoot => "new_boot",
            RunnerEnd::JobCompleted => "job_completed",
            RunnerEnd::VmEnded => "vm_ended",
        }
    }

    /// How long after the change the runner is removed.
    pub fn grace_ms(self) -> Millis {
        match self {
            RunnerEnd::JobCompleted => SELF_REMOVAL_GRACE_MS,
            RunnerEnd::NewBoot | RunnerEnd::VmEnded => 0,
        }
    }
}

/// A boot whose runner no VM needs any more, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerDone {
    pub boot_seq: i64,
    pub why: RunnerEnd,
}

/// Whether a boot of the VM may have a runner on GitHub: it was sent a registration, or
/// registered one.
fn may_have_runner(vm: &VmRecord) -> bool {
    vm.registration_command_id.is_some() || vm.runner_registered
}

fn has_ended(vm: &VmRecord) -> bool {
    matches!(vm.state.as_str(), "shutting_down" | "terminated")
}

/// The boot whose runner is done after the VM changed from `old` to `new`, removed right
/// away (by its remembered id) instead of waiting for a cleanup pass: the earlier boot's
/// when the VM booted again; the current boot's when its job completed (`event`, of the
/// current boot) or the VM started shutting down.
pub fn runner_done(
    old: Option<&VmRecord>,
    new: &VmRecord,
    event: Option<&EventKind>,
) -> Option<RunnerDone> {
    let old = old?;
    if !may_have_runner(old) && !may_have_runner(new) {
        return None;
    }
    let done = |why| {
        Some(RunnerDone {
            boot_seq: old.boot_seq,
            why,
        })
    };
    if new.boot_seq > old.boot_seq {
        return if may_have_runner(old) {
            done(RunnerEnd::NewBoot)
        } else {
            None
        };
    }
    if has_ended(new) && !has_ended(old) {
        return done(RunnerEnd::VmEnded);
    }
    if matches!(event, Some(EventKind::JobCompleted(_))) && !has_ended(old) {
        return done(RunnerEnd::JobCompleted);
    }
    None
}

/// What GitHub lists about one of our runners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitHubRunner {
    pub id: u64,
    pub name: String,
    pub online: bool,
    pub busy: bool,
}

/// The VM id and boot a runner name stands for (`<vm id>-<boot>`).
pub fn runner_owner(name: &str) -> Option<(&str, i64)> {
    let (vm, boot) = name.rsplit_once('-')?;
    let boot: i64 = boot.parse().ok()?;
    (!vm.is_empty() && boot > 0).then_some((vm, boot))
}

/// Whether a runner is one no VM needs: its VM is unknown, booted again, terminated, or lost
/// since before `lost_before`.
pub fn runner_is_stale(runner: &GitHubRunner, vm: Option<&VmRecord>, lost_before: Millis) -> bool {
    let Some((_, boot)) = runner_owner(&runner.name) else {
        // Carries our label but not our naming: not ours to judge.
        return false;
    };
    let Some(vm) = vm else {
        return true;
    };
    vm.boot_seq > boot
        || vm.state == "terminated"
        || (vm.health == Health::Lost && vm.last_seen_at < lost_before)
}

/// A runner is a **ghost** when its VM's agent says the runner is idle (waiting for a job) but
/// GitHub reports the runner offline: jobs will not reach it. Flagged once it has been so
/// since before `flag_before`.
pub fn is_ghost(runner: &GitHubRunner, vm: Option<&VmRecord>) -> bool {
    !runner.online && vm.is_some_and(|v| v.state == "idle" && v.health != Health::Lost)
}

/// The listener's exit code for a version GitHub no longer accepts.
pub const RUNNER_DEPRECATED_EXIT: i64 = 7;

/// Whether a `runner_crashed` event says the runner's version is deprecated (its exit code,
/// or the reason the agent gives).
pub fn runner_deprecated(exit_code: Option<i64>, reason: Option<&str>) -> bool {
    exit_code == Some(RUNNER_DEPRECATED_EXIT)
        || reason.is_some_and(|r| r.to_ascii_lowercase().contains("deprecated"))
}

/// What a cleanup pass does with one runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    Keep,
    /// Stale for the first time: remember it, delete at a later pass.
    Mark,
    Delete,
}

/// The two-phase step: a stale runner is marked; one marked at an earlier pass and still
/// stale, offline and idle is deleted. A runner that is not stale any more is unmarked
/// (`Keep`).
pub fn cleanup_step(stale: bool, marked_before: bool, runner: &GitHubRunner) -> Cleanup {
    match (stale, marked_before) {
        (false, _) => Cleanup::Keep,
        (true, false) => Cleanup::Mark,
        (true, true) if !runner.online && !runner.busy => Cleanup::Delete,
        (true, true) => Cleanup::Mark,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(name: &str, online: bool, busy: bool) -> GitHubRunner {
        GitHubRunner {
            id: 1,
            name: name.into(),
            online,
            busy,
        }
    }

    fn vm(boot_seq: i64, state: &str, health: Health, seen: Millis) -> VmRecord {
        let mut v = crate::lifecycle::test_vm("vm-1", state, health, false, seen);
        v.boot_seq = boot_seq;
        v
    }

    #[test]
    fn a_runner_is_done_when_its_boot_ends_its_job_or_its_vm() {
        let mut registered = vm(2, "idle", Health::Healthy, 0);
        registered.runner_registered = true;
        let done = |why| Some(RunnerDone { boot_seq: 2, why });
        // Booted again.
        let again = vm(3, "ready", Health::Healthy, 0);
        assert_eq!(
            runner_done(Some(&registered), &again, None),
            done(RunnerEnd::NewBoot)
        );
        // A boot that never got a registration has no runner to remove.
        let fresh = vm(2, "ready", Health::Healthy, 0);
        assert_eq!(runner_done(Some(&fresh), &again, None), None);
        assert_eq!(runner_done(None, &again, None), None);
        // Shutting down, once.
        let ending = vm(2, "shutting_down", Health::Healthy, 0);
        let mut ending_registered = ending.clone();
        ending_registered.runner_registered = true;
        assert_eq!(
            runner_done(Some(&registered), &ending_registered, None),
            done(RunnerEnd::VmEnded)
        );
        assert_eq!(
            runner_done(Some(&ending_registered), &ending_registered, None),
            None
        );
        // Its job completed: removed after the runner had time to remove itself.
        let completed = EventKind::JobCompleted(Default::default());
        assert_eq!(
            runner_done(Some(&registered), &registered, Some(&completed)),
            done(RunnerEnd::JobCompleted)
        );
        assert_eq!(RunnerEnd::JobCompleted.grace_ms(), SELF_REMOVAL_GRACE_MS);
        assert_eq!(RunnerEnd::VmEnded.grace_ms(), 0);
        // Any other event of a live VM leaves its runner alone.
        let started = EventKind::JobStarted(Default::default());
        assert_eq!(
            runner_done(Some(&registered), &registered, Some(&started)),
            None
        );
        assert_eq!(runner_name("vm-1", 2), "vm-1-2");
        assert_eq!(runner_owner(&runner_name("vm-1", 2)), Some(("vm-1", 2)));
    }

    #[test]
    fn names_say_whose_runner_it_is() {
        assert_eq!(runner_owner("vm-1-3"), Some(("vm-1", 3)));
        assert_eq!(runner_owner("build-box"), None);
        assert_eq!(runner_owner("-3"), None);
        assert_eq!(runner_owner("vm-0"), None);
    }

    #[test]
    fn stale_runners_are_those_no_vm_needs() {
        let r = runner("vm-1-2", false, false);
        assert!(runner_is_stale(&r, None, 0), "unknown VM");
        assert!(
            runner_is_stale(&r, Some(&vm(3, "ready", Health::Healthy, 0)), 0),
            "booted again"
        );
        assert!(runner_is_stale(
            &r,
            Some(&vm(2, "terminated", Health::Healthy, 0)),
            0
        ));
        assert!(
            runner_is_stale(&r, Some(&vm(2, "idle", Health::Lost, 5)), 10),
            "lost long ago"
        );
        assert!(
            !runner_is_stale(&r, Some(&vm(2, "idle", Health::Lost, 50)), 10),
            "lost just now"
        );
        assert!(!runner_is_stale(
            &r,
            Some(&vm(2, "job_running", Health::Healthy, 0)),
            0
        ));
        assert!(!runner_is_stale(
            &runner("someone-else", false, false),
            None,
            0
        ));
    }

    #[test]
    fn a_ghost_is_idle_by_its_agent_and_offline_on_github() {
        let idle = vm(1, "idle", Health::Healthy, 0);
        assert!(is_ghost(&runner("vm-1-1", false, false), Some(&idle)));
        assert!(!is_ghost(&runner("vm-1-1", true, false), Some(&idle)));
        assert!(!is_ghost(
            &runner("vm-1-1", false, false),
            Some(&vm(1, "job_running", Health::Healthy, 0))
        ));
        assert!(!is_ghost(&runner("vm-1-1", false, false), None));
    }

    #[test]
    fn a_deprecated_runner_is_recognised_by_code_or_reason() {
        assert!(runner_deprecated(Some(7), None));
        assert!(runner_deprecated(
            Some(1),
            Some("Runner version v2.300.0 is deprecated")
        ));
        assert!(!runner_deprecated(Some(1), Some("terminated error")));
        assert!(!runner_deprecated(None, None));
    }

    #[test]
    fn deletion_takes_two_passes_and_never_a_busy_or_online_runner() {
        let idle = runner("vm-1-1", false, false);
        assert_eq!(cleanup_step(true, false, &idle), Cleanup::Mark);
        assert_eq!(cleanup_step(true, true, &idle), Cleanup::Delete);
        assert_eq!(
            cleanup_step(true, true, &runner("vm-1-1", false, true)),
            Cleanup::Mark
        );
        assert_eq!(
            cleanup_step(true, true, &runner("vm-1-1", true, false)),
            Cleanup::Mark
        );
        assert_eq!(cleanup_step(false, true, &idle), Cleanup::Keep);
    }
}
