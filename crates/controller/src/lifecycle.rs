//! Pure decisions about a VM's lifecycle and its command queue: functions over
//! (current record, observation, now) that return the new record and what to do. No I/O,
//! and nothing of the controller but [`crate::model`]; the [`crate::app`] layer reads the
//! store, calls these, and writes the result. One home per rule:
//!
//! * `vm.rs`: contact (`vm_started`, a stream connect), boots, what an event or a heartbeat
//!   does to the VM, recovery;
//! * `command.rs`: the command transition table and which commands go out on a channel now;
//! * `registration.rs`: when a VM is due a `register_runner`;
//! * `runner.rs`: which runners on GitHub no VM needs, and their two-phase removal;
//! * `job.rs`: a job's steps and the pool that runs it; `backstop.rs`: what the backstop
//!   poll asks GitHub; `scaler.rs`: how many VMs a pool needs and which may go.

mod backstop;
mod command;
mod job;
mod registration;
mod runner;
mod scaler;
mod vm;

pub use backstop::*;
pub use command::*;
pub use job::*;
pub use registration::*;
pub use runner::*;
pub use scaler::{
    CreateReason, Drain, Instance, Plan, RATE_WINDOW_MS, Reason as ScaleReason, ScaleAction,
    ScalePolicy, creations_allowed, plan,
};
pub use vm::*;

#[cfg(test)]
use crate::model::{CommandRecord, CommandState, Health, HeartbeatInput, Millis, VmRecord};
#[cfg(test)]
use miglet_proto::event::{CurrentJob, EventKind, HeartbeatReport, JobDetails};
#[cfg(test)]
use miglet_proto::state::MigletState;

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
