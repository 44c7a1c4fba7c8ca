//! Property tests of the controller's side of the lifecycle: random sequences of what agents
//! and time can do to one VM, applied through the same pure functions the app layer calls,
//! keep the promises PROTOCOL.md makes:
//!
//! * at most one live `register_runner` per boot, and none once the boot's runner registered
//!   or the VM left `ready`; a VM that waits in `ready` in a boot always has one;
//! * a reconnect of the same boot never starts a new boot; boots only count up;
//! * an event or heartbeat of an earlier boot, or of a type we do not know, changes no state;
//! * a queue read never hands out an expired or finished command and never leaves a pending
//!   one behind, in queue order.

use super::*;
use crate::model::CommandRecord;
use proptest::prelude::*;

const BOOTS: &[&str] = &["b1", "b2", "b3"];

#[derive(Debug, Clone)]
enum Step {
    /// `vm_started` or a connect naming `boot` (an index into BOOTS), or no boot.
    Contact(ContactKind, Option<usize>),
    /// An event of `kind` for `boot` (None: names no boot).
    Event(u8, Option<usize>),
    /// A heartbeat reporting `state` for `boot`.
    Heartbeat(&'static str, Option<usize>),
    /// The live registration's command expires unacknowledged.
    ExpireRegistration,
    /// The health sweep finds the VM silent for long.
    Lost,
}

fn boot() -> impl Strategy<Value = Option<usize>> {
    proptest::option::weighted(0.8, 0usize..BOOTS.len())
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (prop_oneof![Just(ContactKind::VmStarted), Just(ContactKind::Connect)], boot())
            .prop_map(|(k, b)| Step::Contact(k, b)),
        4 => (0u8..7, boot()).prop_map(|(k, b)| Step::Event(k, b)),
        2 => (
            prop_oneof![
                Just("ready"),
                Just("idle"),
                Just("job_running"),
                Just("draining"),
                Just("waiting_for_controller"),
                Just("no-such-state"),
            ],
            boot()
        )
            .prop_map(|(s, b)| Step::Heartbeat(s, b)),
        1 => Just(Step::ExpireRegistration),
        1 => Just(Step::Lost),
    ]
}

fn kind(k: u8) -> EventKind {
    let job = JobDetails {
        job_id: Some("42".into()),
        ..JobDetails::default()
    };
    match k {
        0 => EventKind::RunnerRegistered {
            runner_url: None,
            runner_name: None,
        },
        1 => EventKind::JobStarted(job),
        2 => EventKind::JobCompleted(job),
        3 => EventKind::RunnerCrashed { reason: None },
        4 => EventKind::VmShuttingDown { reason: None },
        5 => EventKind::Error { message: None },
        _ => EventKind::Other,
    }
}

/// What the model keeps beside the record: the registrations of the current boot.
#[derive(Default)]
struct Ledger {
    issued_in_boot: u32,
    live: bool,
    runner_registered_in_boot: bool,
    next_id: u32,
}

/// The app layer's step, reduced to its decisions: after any write under the VM's lock, a VM
/// that needs a registration is issued one (the reconciler does the same for the rest).
fn issue_if_needed(vm: &mut VmRecord, ledger: &mut Ledger) -> Result<(), TestCaseError> {
    if needs_registration(vm) {
        prop_assert!(!ledger.live, "a second live registration in one boot");
        prop_assert!(
            !ledger.runner_registered_in_boot,
            "a registration after the boot's runner registered"
        );
        ledger.next_id += 1;
        vm.registration_command_id = Some(format!("reg-{}", ledger.next_id));
        ledger.issued_in_boot += 1;
        ledger.live = true;
    }
    Ok(())
}

fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut now: Millis = 1_000;
    let mut vm: Option<VmRecord> = None;
    let mut ledger = Ledger::default();
    for s in steps {
        now += 500;
        let before = vm.clone();
        match s {
            Step::Contact(k, b) => {
                let c = Contact {
                    kind: *k,
                    boot_id: b.map(|i| BOOTS[i]),
                    pool_id: Some("p"),
                    org_id: None,
                    version: None,
                };
                let (mut next, new_boot) = on_contact(vm.as_ref(), "vm-1", &c, now);
                if let Some(old) = &before {
                    let reconnect = *k == ContactKind::Connect
                        && c.boot_id.is_none_or(|b| b == old.boot_id)
                        && !matches!(old.state.as_str(), "shutting_down" | "terminated");
                    if reconnect {
                        prop_assert!(!new_boot, "a reconnect started a new boot");
                        prop_assert_eq!(next.boot_seq, old.boot_seq);
                        prop_assert_eq!(
                            &next.registration_command_id,
                            &old.registration_command_id
                        );
                    }
                    prop_assert!(next.boot_seq >= old.boot_seq, "boot_seq went back");
                    prop_assert_eq!(next.boot_seq > old.boot_seq, new_boot);
                    prop_assert_eq!(next.pool_id.as_str(), "p");
                }
                if new_boot {
                    prop_assert!(next.registration_command_id.is_none());
                    ledger = Ledger {
                        next_id: ledger.next_id,
                        ..Ledger::default()
                    };
                }
                issue_if_needed(&mut next, &mut ledger)?;
                // An announced VM waiting in `ready` always has its registration.
                if next.state == "ready" && !ledger.runner_registered_in_boot {
                    prop_assert!(ledger.live, "a ready VM was left without a registration");
                }
                vm = Some(next);
            }
            Step::Event(k, b) => {
                let Some(cur) = vm.as_mut() else { continue };
                let kind = kind(*k);
                if !is_current_boot(cur, b.map(|i| BOOTS[i])) {
                    // The app stores it but applies nothing.
                    continue;
                }
                let next = on_event(cur, &kind, now);
                if matches!(kind, EventKind::Other | EventKind::Error { .. }) {
                    prop_assert_eq!(&next.state, &cur.state, "an unknown event changed state");
                    prop_assert_eq!(next.runner_registered, cur.runner_registered);
                    prop_assert_eq!(&next.current_job, &cur.current_job);
                }
                prop_assert_eq!(next.boot_seq, cur.boot_seq, "an event started a boot");
                if next.runner_registered {
                    ledger.runner_registered_in_boot = true;
                }
                *cur = next;
                issue_if_needed(cur, &mut ledger)?;
            }
            Step::Heartbeat(state, b) => {
                let Some(cur) = vm.as_mut() else { continue };
                let report = HeartbeatReport {
                    miglet_state: Some((*state).to_owned()),
                    boot_id: b.map(|i| BOOTS[i].to_owned()),
                    ..HeartbeatReport::default()
                };
                let input = HeartbeatInput {
                    vm_id: "vm-1".into(),
                    transport: "http".into(),
                    report,
                    report_json: String::new(),
                    connected: false,
                    now,
                };
                let (_, update) = heartbeat_effect(cur, &input);
                if !is_current_boot(cur, b.map(|i| BOOTS[i])) {
                    prop_assert!(update.state.is_none(), "an old boot's heartbeat set state");
                    prop_assert!(update.runner_state.is_none());
                }
                if let Some(st) = &update.state {
                    prop_assert!(
                        st.parse::<MigletState>().is_ok(),
                        "a heartbeat stored state {st}"
                    );
                }
            }
            Step::ExpireRegistration => {
                let Some(cur) = vm.as_mut() else { continue };
                if ledger.live {
                    cur.registration_command_id = None;
                    ledger.live = false;
                    issue_if_needed(cur, &mut ledger)?;
                }
            }
            Step::Lost => {
                let Some(cur) = vm.as_mut() else { continue };
                cur.health = Health::Lost;
                prop_assert!(!needs_registration(cur), "a lost VM would be registered");
            }
        }
        if let Some(v) = &vm {
            prop_assert!(
                v.state == "unknown" || v.state.parse::<MigletState>().is_ok(),
                "state {} is not one of the contract's",
                v.state
            );
            prop_assert!(v.last_seen_at <= now);
            prop_assert_eq!(v.registration_command_id.is_some(), ledger.live);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_contact_sequence_keeps_one_registration_per_boot(
        steps in proptest::collection::vec(step(), 1..60)
    ) {
        run(&steps)?;
    }

    #[test]
    fn a_queue_read_never_loses_or_resends_wrongly(
        cmds in proptest::collection::vec(command_row(), 0..20),
        stream in prop_oneof![Just(None), Just(Some("s1")), Just(Some("s2"))],
        acks in any::<bool>(),
        // Coarse times, so boundaries (expiry == now, redelivery due == now) come up often.
        now in (0i64..20).prop_map(|t| t * 500),
    ) {
        let redeliver_after = 3_000;
        let channel = match stream {
            Some(s) => Channel::Stream { stream_id: s },
            None => Channel::Http { acks },
        };
        let out = select_deliverable(&cmds, channel, now, redeliver_after);
        // In queue order, each at most once.
        let positions: Vec<usize> = out
            .iter()
            .map(|o| cmds.iter().position(|c| std::ptr::eq(c, *o)).unwrap_or(usize::MAX))
            .collect();
        prop_assert!(positions.windows(2).all(|w| w[0] < w[1]), "order or duplicates: {positions:?}");
        for c in &out {
            prop_assert!(c.expires_at.is_none_or(|e| e > now), "an expired command went out");
            prop_assert!(
                CommandState::OPEN.contains(&c.state),
                "a {} command went out",
                c.state.as_str()
            );
            if c.state == CommandState::Delivered {
                let timed_out = c.delivered_at.is_none_or(|d| d + redeliver_after <= now);
                match channel {
                    Channel::Http { acks } => prop_assert!(acks && timed_out),
                    Channel::Stream { stream_id } => prop_assert!(
                        timed_out || c.delivered_via.as_deref() != Some(stream_via(stream_id).as_str()),
                        "resent on the stream that carries it before the timeout"
                    ),
                }
            }
        }
        for c in &cmds {
            if c.state == CommandState::Pending && c.expires_at.is_none_or(|e| e > now) {
                prop_assert!(out.iter().any(|o| std::ptr::eq(*o, c)), "a pending command was left behind");
            }
        }
    }
}

fn command_row() -> impl Strategy<Value = CommandRecord> {
    (
        prop_oneof![
            Just(CommandState::Pending),
            Just(CommandState::Delivered),
            Just(CommandState::Acknowledged),
            Just(CommandState::Failed),
            Just(CommandState::Expired),
        ],
        proptest::option::of((0i64..24).prop_map(|t| t * 500)),
        proptest::option::of((0i64..20).prop_map(|t| t * 500)),
        prop_oneof![
            Just(None),
            Just(Some("http".to_owned())),
            Just(Some(stream_via("s1"))),
            Just(Some(stream_via("s2"))),
        ],
    )
        .prop_map(|(state, expires_at, delivered_at, via)| {
            let mut c = CommandRecord::pending(
                "c".into(),
                "vm-1",
                "b1",
                &miglet_proto::command::Command::SetLogLevel {
                    level: miglet_proto::command::LogLevel::Debug,
                },
                "controller",
                0,
                0,
            );
            c.state = state;
            c.expires_at = expires_at;
            if state != CommandState::Pending {
                c.delivered_at = delivered_at;
                c.delivered_via = via;
            }
            c
        })
}
