//! Property tests of the agent's state machine: any sequence of inputs, however unlikely,
//! keeps its promises: states only follow PROTOCOL.md's transitions, `error` is terminal, the
//! runner is registered at most once per boot, every command is acknowledged (never lost)
//! and a command id is executed at most once.

use super::*;
use chrono::TimeZone;
use miglet_proto::command::RegisterRunner;
use proptest::prelude::*;
use std::collections::HashMap;

fn register(expires_in: i64) -> Command {
    Command::RegisterRunner(RegisterRunner {
        registration_token: Some("tok".into()),
        jit_config: None,
        runner_url: "https://github.com/o".into(),
        runner_group: "default".into(),
        labels: vec!["self-hosted".into()],
        expires_at: chrono::Utc
            .timestamp_opt(1_800_000_000 + expires_in, 0)
            .single(),
        runner_name: Some("vm-1".into()),
    })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (-100i64..4000).prop_map(register),
        1 => (any::<bool>(), proptest::option::of(0i64..100)).prop_map(|(_, t)| Command::Drain {
            reason: "r".into(),
            timeout_seconds: t
        }),
        1 => any::<bool>().prop_map(|force| Command::Shutdown {
            reason: "r".into(),
            force
        }),
        4 => Just(Command::SetLogLevel {
            level: LogLevel::Debug
        }),
        4 => prop_oneof![Just("heartbeat_interval"), Just("nope")].prop_map(|k| Command::UpdateConfig {
            key: k.into(),
            value: "10s".into()
        }),
    ]
}

const TS: &str = "2027-01-15 08:00:00Z";

/// The inputs of a boot that goes well, in order.
fn happy_path() -> Vec<Input> {
    vec![
        Input::Started,
        Input::VmStartedAcked,
        Input::Command {
            id: "reg".into(),
            via: Via::Stream,
            parsed: Ok(register(3600)),
        },
        Input::RunnerConfigured(Ok(())),
        Input::RunnerLine(format!("{TS}: Listening for Jobs")),
        Input::RunnerLine(format!("{TS}: Running job: build")),
        Input::HookStarted(JobDetails::default()),
        Input::HookCompleted(JobDetails::default()),
        Input::RunnerLine(format!("{TS}: Job build completed with result: Succeeded")),
        Input::RunnerExited { code: Some(0) },
    ]
}

/// A boot: the happy path with random inputs (mostly harmless, sometimes disruptive)
/// between its steps, so deep states are reached and then disturbed.
fn boot() -> impl Strategy<Value = Vec<Input>> {
    let steps = happy_path();
    proptest::collection::vec(proptest::collection::vec(input(), 0..3), steps.len() + 1).prop_map(
        move |gaps| {
            let mut out = Vec::new();
            for (i, gap) in gaps.into_iter().enumerate() {
                out.extend(gap);
                if let Some(step) = steps.get(i) {
                    out.push(step.clone());
                }
            }
            out
        },
    )
}

/// One input: mostly harmless ones (repeats, ticks, hooks, live settings), sometimes one
/// that ends or breaks the boot (signals, crashes, drain, shutdown, a full spool).
fn input() -> impl Strategy<Value = Input> {
    let harmless = prop_oneof![
        Just(Input::Started),
        Just(Input::VmStartedAcked),
        ((0u8..6), command(), any::<bool>()).prop_map(|(id, c, stream)| Input::Command {
            id: format!("c-{id}"),
            via: if stream { Via::Stream } else { Via::Http },
            parsed: Ok(c),
        }),
        Just(Input::Command {
            id: "bad".into(),
            via: Via::Http,
            parsed: Err(miglet_proto::command::CommandError::UnknownType("x".into())),
        }),
        Just(Input::RunnerConfigured(Ok(()))),
        Just(Input::RunnerLine(format!("{TS}: Listening for Jobs"))),
        Just(Input::RunnerLine(format!("{TS}: Running job: build"))),
        Just(Input::RunnerLine(format!(
            "{TS}: Job build completed with result: Succeeded"
        ))),
        Just(Input::RunnerLine("garbage".into())),
        Just(Input::HookStarted(JobDetails::default())),
        Just(Input::HookCompleted(JobDetails::default())),
        Just(Input::Tick),
    ];
    let disruptive = prop_oneof![
        Just(Input::RunnerConfigured(Err("config.sh failed".into()))),
        proptest::option::of(-1i32..9).prop_map(|code| Input::RunnerExited { code }),
        Just(Input::Signal),
        Just(Input::Preempted),
        Just(Input::SpoolUnusable("full".into())),
    ];
    prop_oneof![12 => harmless, 1 => disruptive]
}

/// PROTOCOL.md's transitions (staying put is always allowed).
fn allowed(from: MigletState, to: MigletState) -> bool {
    use MigletState::*;
    match (from, to) {
        (a, b) if a == b => true,
        (Error, _) => false,
        (_, Error) => true,
        (ShuttingDown, _) => false,
        (_, ShuttingDown) => true,
        (Draining, _) => false,
        (Initializing, WaitingForController)
        | (WaitingForController, Ready)
        | (Ready, RegisteringRunner)
        | (RegisteringRunner, Idle)
        // A job proves the runner registered, even if its `Listening` line was missed.
        | (RegisteringRunner, JobRunning)
        | (Idle, JobRunning)
        | (JobRunning, Idle)
        | (JobRunning, Draining) => true,
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_input_sequence_keeps_the_machines_promises(
        inputs in prop_oneof![boot(), proptest::collection::vec(input(), 1..60)],
        post in prop_oneof![Just(PostJobAction::Exit), Just(PostJobAction::None), Just(PostJobAction::Poweroff)],
    ) {
        let mut m = Machine::new(post);
        let mut now: Millis = 1_800_000_000_000;
        let mut registrations = 0;
        let mut first_ack: HashMap<String, (bool, String)> = HashMap::new();
        for input in inputs {
            now += 700;
            let before = m.state;
            let command = match &input {
                Input::Command { id, .. } => Some(id.clone()),
                _ => None,
            };
            let actions = m.step(input, now);
            prop_assert!(
                allowed(before, m.state),
                "{before} -> {} is not a PROTOCOL.md transition", m.state
            );
            registrations += actions.iter().filter(|a| matches!(a, Action::StartRunner(_))).count();
            prop_assert!(registrations <= 1, "the runner was registered twice in one boot");
            if let Some(id) = command {
                let acks: Vec<(bool, String)> = actions
                    .iter()
                    .filter_map(|a| match a {
                        Action::Ack { id: i, success, message, .. } if *i == id => {
                            Some((*success, message.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(acks.len(), 1, "command {} acknowledged {} times", id, acks.len());
                // Executed once: coming again, it is answered as the first time.
                let first = first_ack.entry(id.clone()).or_insert_with(|| acks[0].clone());
                prop_assert_eq!(&acks[0], first, "command {} ran again", id);
            }
            let finishes = actions.iter().filter(|a| matches!(a, Action::Finish { .. })).count();
            prop_assert!(finishes <= 1);
            if finishes == 1 {
                // The shell stops here.
                break;
            }
            if m.state == MigletState::Error {
                prop_assert!(
                    actions.iter().any(|a| matches!(a, Action::Failed { .. })) || before == MigletState::Error,
                    "entered error without saying why"
                );
            }
        }
    }
}
