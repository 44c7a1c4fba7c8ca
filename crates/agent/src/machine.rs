//! The agent's lifecycle as a pure state machine: [`Machine::step`] takes an [`Input`] and the
//! current time and returns the [`Action`]s for the I/O shell to perform. No I/O, no clocks;
//! every transition is unit-tested below.
//!
//! States are PROTOCOL.md's: `initializing` -> `waiting_for_controller` -> `ready` ->
//! `registering_runner` -> `idle` -> `job_running` -> (ephemeral: job done) ->
//! `shutting_down`; `drain` moves to `draining`; `error` is terminal.

use miglet_proto::command::{Command, CommandError, LogLevel, RegisterRunner};
use miglet_proto::event::JobDetails;
use miglet_proto::state::MigletState;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// How long to wait after `Running job:` for the started hook's details before reporting
/// `job_started` with only what the runner printed.
pub const JOB_DETAILS_WAIT: Millis = 10_000;
/// How many executed command ids are remembered (a command id runs at most once).
pub const REMEMBERED_COMMANDS: usize = 512;

/// What to do once the agent is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostJobAction {
    Exit,
    Poweroff,
    None,
}

impl PostJobAction {
    pub fn parse(s: &str) -> Option<PostJobAction> {
        match s.trim().to_ascii_lowercase().as_str() {
            "exit" => Some(PostJobAction::Exit),
            "poweroff" => Some(PostJobAction::Poweroff),
            "none" => Some(PostJobAction::None),
            _ => None,
        }
    }
}

/// Exit codes of the agent, distinct so a supervisor can tell them apart.
pub mod exit_code {
    pub const OK: u8 = 0;
    /// The runner failed to configure or crashed.
    pub const RUNNER_FAILED: u8 = 70;
    /// A required setting is missing or invalid.
    pub const CONFIG: u8 = 78;
}

/// How a command reached the agent (acks go back the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Stream,
    Http,
}

/// Everything the shell tells the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Configuration is loaded and the runner installation checked.
    Started,
    /// The controller acknowledged `vm_started`.
    VmStartedAcked,
    /// A command; `parsed` is the typed command or why it could not be read.
    Command {
        id: String,
        via: Via,
        parsed: Result<Command, CommandError>,
    },
    /// `config.sh` finished; `Err` carries a message safe to report.
    RunnerConfigured(Result<(), String>),
    /// A line the runner printed (stdout or stderr).
    RunnerLine(String),
    /// The job-started hook reported the job's identity.
    HookStarted(JobDetails),
    /// The job-completed hook ran.
    HookCompleted(JobDetails),
    /// The runner listener process exited.
    RunnerExited { code: Option<i32> },
    /// SIGTERM or SIGINT.
    Signal,
    /// The VM is being preempted (GCE metadata `instance/preempted` is `TRUE`): drain now.
    Preempted,
    /// The event spool refuses writes (disk full, read-only, at its bound): events wait in
    /// memory, so the agent takes no new job (it drains) and says so.
    SpoolUnusable(String),
    /// Time passes (deadlines are checked here).
    Tick,
}

/// Everything the core asks the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send (and spool until acknowledged) an event with these per-type fields.
    Event {
        event_type: &'static str,
        fields: Map<String, Value>,
    },
    Ack {
        id: String,
        via: Via,
        success: bool,
        message: String,
    },
    /// Log one of PROTOCOL.md's verbatim transition messages at info.
    Log(&'static str),
    /// The agent entered `error`: log why at ERROR, with what to do about it.
    Failed {
        reason: String,
    },
    /// Configure the runner with these parameters, then start its listener.
    StartRunner(RegisterRunner),
    /// Start the listener again after `after` (retryable exit or self-update).
    RestartRunner {
        after: Duration,
    },
    /// SIGINT the listener; SIGKILL after the grace period, or at once with `force`.
    StopRunner {
        force: bool,
    },
    SetLogLevel(LogLevel),
    SetHeartbeatInterval(Duration),
    SendHeartbeat,
    /// Flush the spool and end: exit with `code`, then `post` (poweroff or stay).
    Finish {
        code: u8,
        post: PostJobAction,
    },
}

/// The job the agent knows is running.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunningJob {
    pub name: Option<String>,
    pub details: JobDetails,
    pub started_at: Millis,
    /// `job_started` has been reported.
    pub reported: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub state: MigletState,
    pub job: Option<RunningJob>,
    /// Set by `drain`: finish the current job, take no new one.
    pub draining: bool,
    pub drain_deadline: Option<Millis>,
    /// The runner listener process is alive.
    pub runner_alive: bool,
    /// A job finished on this (ephemeral) runner.
    pub job_done: bool,
    pub post_job_action: PostJobAction,
    pub runner_name: Option<String>,
    pub labels: Vec<String>,
    /// Exit code to finish with once the runner is gone.
    finish_code: u8,
    executed: HashMap<String, (bool, String)>,
    executed_order: VecDeque<String>,
}

fn ack(id: &str, via: Via, success: bool, message: impl Into<String>) -> Action {
    Action::Ack {
        id: id.to_owned(),
        via,
        success,
        message: message.into(),
    }
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn put(m: &mut Map<String, Value>, k: &str, v: &Option<String>) {
    if let Some(v) = v {
        m.insert(k.into(), Value::String(v.clone()));
    }
}

/// Parses `<yyyy-MM-dd HH:mm:ssZ>: Running job: NAME` and
/// `<ts>: Job NAME completed with result: R`.
pub fn parse_runner_line(line: &str) -> Option<RunnerLine> {
    let line = line.trim_end();
    let rest = line.get(20..).and_then(|r| r.strip_prefix(": "))?;
    if line.as_bytes().get(19) != Some(&b'Z') {
        return None;
    }
    if let Some(name) = rest.strip_prefix("Running job: ") {
        return Some(RunnerLine::JobStarted(name.to_owned()));
    }
    if rest == "Listening for Jobs" {
        return Some(RunnerLine::Listening);
    }
    let body = rest.strip_prefix("Job ")?;
    let (name, result) = body.rsplit_once(" completed with result: ")?;
    Some(RunnerLine::JobCompleted {
        name: name.to_owned(),
        result: result.to_owned(),
    })
}

/// The runner output lines the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerLine {
    Listening,
    JobStarted(String),
    JobCompleted { name: String, result: String },
}

impl Machine {
    pub fn new(post_job_action: PostJobAction) -> Machine {
        Machine {
            state: MigletState::Initializing,
            job: None,
            draining: false,
            drain_deadline: None,
            runner_alive: false,
            job_done: false,
            post_job_action,
            runner_name: None,
            labels: Vec::new(),
            finish_code: exit_code::OK,
            executed: HashMap::new(),
            executed_order: VecDeque::new(),
        }
    }

    fn remember(&mut self, id: &str, success: bool, message: &str) {
        if self
            .executed
            .insert(id.to_owned(), (success, message.to_owned()))
            .is_none()
        {
            self.executed_order.push_back(id.to_owned());
            while self.executed_order.len() > REMEMBERED_COMMANDS {
                if let Some(old) = self.executed_order.pop_front() {
                    self.executed.remove(&old);
                }
            }
        }
    }

    /// Restores the record of commands executed before a restart (oldest first), so a
    /// command delivered again after the agent restarted is acknowledged, not run again.
    pub fn restore_executed(&mut self, done: impl IntoIterator<Item = (String, bool, String)>) {
        for (id, success, message) in done {
            self.remember(&id, success, &message);
        }
    }

    /// Applies one input.
    pub fn step(&mut self, input: Input, now: Millis) -> Vec<Action> {
        let before = self.state;
        let mut out = Vec::new();
        match input {
            Input::Started => {
                if self.state == MigletState::Initializing {
                    self.state = MigletState::WaitingForController;
                    out.push(Action::Event {
                        event_type: "vm_started",
                        fields: Map::new(),
                    });
                }
            }
            Input::VmStartedAcked => {
                if self.state == MigletState::WaitingForController {
                    out.push(Action::Log(
                        "Controller acknowledgment received, transitioning to ready state",
                    ));
                    self.state = MigletState::Ready;
                    out.push(Action::Log(
                        "MIGlet is ready - polling controller for registration config",
                    ));
                }
            }
            Input::Command { id, via, parsed } => self.on_command(&id, via, parsed, now, &mut out),
            Input::RunnerConfigured(Ok(())) => {
                if self.state == MigletState::RegisteringRunner {
                    self.runner_alive = true;
                }
            }
            Input::RunnerConfigured(Err(message)) => {
                self.runner_alive = false;
                let reason = format!("the runner could not be configured: {message}");
                out.push(Action::Event {
                    event_type: "error",
                    fields: fields(json!({"code": "runner_config_failed", "message": message})),
                });
                self.fail(reason, &mut out);
            }
            Input::RunnerLine(line) => {
                if let Some(parsed) = parse_runner_line(&line) {
                    self.on_runner_line(parsed, now, &mut out);
                }
            }
            Input::HookStarted(details) => {
                let job = self.job.get_or_insert_with(|| RunningJob {
                    started_at: now,
                    ..RunningJob::default()
                });
                merge(&mut job.details, &details);
                if matches!(self.state, MigletState::Idle) {
                    self.state = MigletState::JobRunning;
                }
                self.report_job_started(&mut out);
            }
            Input::HookCompleted(details) => {
                if let Some(job) = self.job.as_mut() {
                    merge(&mut job.details, &details);
                }
            }
            Input::RunnerExited { code } => self.on_runner_exit(code, &mut out),
            Input::Signal => self.begin_shutdown(false, &mut out),
            Input::Preempted => {
                if !self.draining {
                    out.push(Action::Event {
                        event_type: "error",
                        fields: fields(json!({"code": "preempted", "message": "the VM is being preempted; draining"})),
                    });
                    let _ = self.on_drain("preempted", None, now, &mut out);
                }
            }
            Input::SpoolUnusable(reason) => {
                if !self.draining {
                    out.push(Action::Event {
                        event_type: "error",
                        fields: fields(json!({
                            "code": "spool_unavailable",
                            "message": format!("the event spool refuses writes ({reason}); taking no new job"),
                        })),
                    });
                    let _ = self.on_drain("spool_unavailable", None, now, &mut out);
                }
            }
            Input::Tick => {
                if let Some(deadline) = self.drain_deadline
                    && now >= deadline
                    && self.runner_alive
                    && self.state == MigletState::Draining
                {
                    self.drain_deadline = None;
                    self.state = MigletState::ShuttingDown;
                    out.push(Action::StopRunner { force: true });
                }
                if let Some(job) = &self.job
                    && !job.reported
                    && now - job.started_at >= JOB_DETAILS_WAIT
                {
                    self.report_job_started(&mut out);
                }
            }
        }
        if self.state != before {
            out.push(Action::SendHeartbeat);
        }
        out
    }

    fn on_command(
        &mut self,
        id: &str,
        via: Via,
        parsed: Result<Command, CommandError>,
        now: Millis,
        out: &mut Vec<Action>,
    ) {
        if let Some((success, message)) = self.executed.get(id) {
            // Delivered again (a lost ack): acknowledge again, do not execute again.
            out.push(ack(id, via, *success, message.clone()));
            return;
        }
        let command = match parsed {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                self.remember(id, false, &msg);
                out.push(ack(id, via, false, msg));
                return;
            }
        };
        let (success, message) = match command {
            Command::RegisterRunner(r) => self.on_register(r, now, out),
            Command::Drain {
                reason,
                timeout_seconds,
            } => self.on_drain(&reason, timeout_seconds, now, out),
            Command::Shutdown { reason, force } => {
                if matches!(self.state, MigletState::ShuttingDown | MigletState::Error) && !force {
                    (true, "already shutting down".to_owned())
                } else {
                    let _ = reason;
                    self.begin_shutdown(force, out);
                    (
                        true,
                        if force {
                            "shutting down now"
                        } else {
                            "shutting down"
                        }
                        .to_owned(),
                    )
                }
            }
            Command::SetLogLevel { level } => {
                out.push(Action::SetLogLevel(level));
                (true, format!("log level set to {}", level.as_str()))
            }
            Command::UpdateConfig { key, value } => self.on_update_config(&key, &value, out),
        };
        self.remember(id, success, &message);
        // The ack goes out before the work it starts (the controller needs it at once).
        out.insert(0, ack(id, via, success, message));
    }

    fn on_register(
        &mut self,
        r: RegisterRunner,
        now: Millis,
        out: &mut Vec<Action>,
    ) -> (bool, String) {
        if self.state != MigletState::Ready {
            return (
                false,
                format!("register_runner is not allowed in state {}", self.state),
            );
        }
        if self.draining {
            return (false, "draining: no runner will be registered".into());
        }
        out.push(Action::Log(
            "Received register_runner command from controller",
        ));
        if let Some(exp) = r.expires_at
            && exp.timestamp_millis() <= now
        {
            return (
                false,
                format!(
                    "registration token expired at {}",
                    miglet_proto::rfc3339(exp)
                ),
            );
        }
        if r.jit_config.is_none() && r.runner_url.is_empty() {
            return (false, "missing parameter runner_url".into());
        }
        out.push(Action::Log(
            "Registration config received, transitioning to registering runner",
        ));
        self.state = MigletState::RegisteringRunner;
        self.runner_name = r.runner_name.clone();
        self.labels = r.labels.clone();
        out.push(Action::StartRunner(r));
        (true, "Registration config received".into())
    }

    fn on_drain(
        &mut self,
        _reason: &str,
        timeout: Option<i64>,
        now: Millis,
        out: &mut Vec<Action>,
    ) -> (bool, String) {
        match self.state {
            MigletState::ShuttingDown | MigletState::Error => {
                (true, "already shutting down".into())
            }
            MigletState::JobRunning => {
                self.draining = true;
                self.state = MigletState::Draining;
                self.drain_deadline = timeout.map(|t| now + t * 1000);
                (
                    true,
                    "draining: the current job will finish, no new job will be taken".into(),
                )
            }
            MigletState::Draining => (true, "already draining".into()),
            _ => {
                // No job: nothing to wait for.
                self.draining = true;
                self.begin_shutdown(false, out);
                (true, "drained: no job was running".into())
            }
        }
    }

    fn on_update_config(
        &mut self,
        key: &str,
        value: &str,
        out: &mut Vec<Action>,
    ) -> (bool, String) {
        match key {
            "heartbeat_interval" => match parse_duration(value) {
                Some(d) if d >= Duration::from_secs(1) => {
                    out.push(Action::SetHeartbeatInterval(d));
                    (true, format!("heartbeat_interval set to {}s", d.as_secs()))
                }
                _ => (
                    false,
                    format!("invalid heartbeat_interval {value:?} (e.g. 15s, 1m, or seconds)"),
                ),
            },
            "post_job_action" => match PostJobAction::parse(value) {
                Some(a) => {
                    self.post_job_action = a;
                    (
                        true,
                        format!(
                            "post_job_action set to {}",
                            value.trim().to_ascii_lowercase()
                        ),
                    )
                }
                None => (
                    false,
                    format!("invalid post_job_action {value:?} (exit, poweroff, none)"),
                ),
            },
            "log_level" => match LogLevel::parse(value) {
                Some(l) => {
                    out.push(Action::SetLogLevel(l));
                    (true, format!("log level set to {}", l.as_str()))
                }
                None => (false, format!("invalid log level {value:?}")),
            },
            other => (
                false,
                format!(
                    "unknown config key {other:?} (heartbeat_interval, post_job_action, log_level)"
                ),
            ),
        }
    }

    fn on_runner_line(&mut self, line: RunnerLine, now: Millis, out: &mut Vec<Action>) {
        match line {
            RunnerLine::Listening => {
                if self.state == MigletState::RegisteringRunner {
                    self.state = MigletState::Idle;
                    let mut f = Map::new();
                    put(&mut f, "runner_name", &self.runner_name);
                    f.insert("labels".into(), json!(self.labels));
                    out.push(Action::Event {
                        event_type: "runner_registered",
                        fields: f,
                    });
                }
            }
            RunnerLine::JobStarted(name) => {
                let job = self.job.get_or_insert_with(|| RunningJob {
                    started_at: now,
                    ..RunningJob::default()
                });
                job.name = Some(name);
                if matches!(
                    self.state,
                    MigletState::Idle | MigletState::RegisteringRunner
                ) {
                    self.state = MigletState::JobRunning;
                }
            }
            RunnerLine::JobCompleted { name, result } => {
                if self.job.is_none() {
                    self.job = Some(RunningJob {
                        name: Some(name.clone()),
                        started_at: now,
                        ..RunningJob::default()
                    });
                }
                self.report_job_started(out);
                if let Some(job) = self.job.take() {
                    let mut f = job_fields(&job);
                    let success = matches!(result.as_str(), "Succeeded" | "SucceededWithIssues");
                    f.insert("result".into(), Value::String(result));
                    f.insert("success".into(), Value::Bool(success));
                    f.insert(
                        "duration".into(),
                        json!(((now - job.started_at).max(0) + 500) / 1000),
                    );
                    out.push(Action::Event {
                        event_type: "job_completed",
                        fields: f,
                    });
                }
                self.job_done = true;
                if self.state == MigletState::JobRunning {
                    self.state = MigletState::Idle;
                }
            }
        }
    }

    fn report_job_started(&mut self, out: &mut Vec<Action>) {
        if let Some(job) = self.job.as_mut()
            && !job.reported
        {
            job.reported = true;
            let f = job_fields(job);
            out.push(Action::Event {
                event_type: "job_started",
                fields: f,
            });
        }
    }

    fn on_runner_exit(&mut self, code: Option<i32>, out: &mut Vec<Action>) {
        self.runner_alive = false;
        match self.state {
            MigletState::ShuttingDown | MigletState::Error => {
                // Stopped mid-job: the runner cancels it.
                self.report_job_started(out);
                if let Some(job) = self.job.take() {
                    let mut f = job_fields(&job);
                    f.insert("result".into(), "Canceled".into());
                    f.insert("success".into(), false.into());
                    out.push(Action::Event {
                        event_type: "job_completed",
                        fields: f,
                    });
                }
                self.finish(out);
            }
            _ if code == Some(0) && (self.job_done || self.draining) => {
                // An ephemeral runner exits 0 after its one job.
                self.begin_shutdown(false, out);
            }
            _ if matches!(code, Some(2..=4)) && self.job.is_none() => {
                // Retryable or self-update: the runner's own wrapper restarts it.
                self.runner_alive = true;
                out.push(Action::RestartRunner {
                    after: Duration::from_secs(if code == Some(2) { 5 } else { 1 }),
                });
            }
            _ => {
                let reason = match code {
                    Some(0) => "runner exited before running a job".to_owned(),
                    Some(1) => "runner exited with terminated error (1)".to_owned(),
                    Some(5) => "runner session conflict (5)".to_owned(),
                    Some(7) => "runner version deprecated by GitHub (exit code 7)".to_owned(),
                    Some(c) => format!("runner exited with code {c}"),
                    None => "runner killed by a signal".to_owned(),
                };
                let mut f = fields(json!({"reason": reason}));
                if let Some(c) = code {
                    f.insert("exit_code".into(), c.into());
                }
                out.push(Action::Event {
                    event_type: "runner_crashed",
                    fields: f,
                });
                self.job = None;
                self.fail(format!("the runner stopped: {reason}"), out);
            }
        }
    }

    /// Enters `error` (terminal) for `reason`, which the shell logs at ERROR.
    fn fail(&mut self, reason: String, out: &mut Vec<Action>) {
        out.push(Action::Failed { reason });
        self.finish_code = exit_code::RUNNER_FAILED;
        self.state = MigletState::Error;
        if self.runner_alive {
            out.push(Action::StopRunner { force: false });
        } else {
            self.finish(out);
        }
    }

    fn begin_shutdown(&mut self, force: bool, out: &mut Vec<Action>) {
        let already = self.state == MigletState::ShuttingDown;
        self.state = MigletState::ShuttingDown;
        if self.runner_alive {
            out.push(Action::StopRunner { force });
        } else if !already {
            self.finish(out);
        }
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        if self.state != MigletState::Error {
            self.state = MigletState::ShuttingDown;
        }
        out.push(Action::Event {
            event_type: "vm_shutting_down",
            fields: fields(
                json!({"reason": if self.state == MigletState::Error { "error" } else { "done" }}),
            ),
        });
        let post = match self.post_job_action {
            PostJobAction::None if self.finish_code == exit_code::OK => PostJobAction::None,
            PostJobAction::Poweroff => PostJobAction::Poweroff,
            _ => PostJobAction::Exit,
        };
        out.push(Action::Finish {
            code: self.finish_code,
            post,
        });
    }
}

fn job_fields(job: &RunningJob) -> Map<String, Value> {
    let d = &job.details;
    let mut f = Map::new();
    let name = d.job_name.clone().or_else(|| job.name.clone());
    put(&mut f, "job_id", &d.job_id.clone().or_else(|| name.clone()));
    put(&mut f, "run_id", &d.run_id);
    put(&mut f, "job_name", &name);
    put(&mut f, "repository", &d.repository);
    put(&mut f, "branch", &d.branch);
    put(&mut f, "commit", &d.commit);
    f
}

fn merge(into: &mut JobDetails, from: &JobDetails) {
    macro_rules! fill {
        ($($f:ident),*) => { $( if from.$f.is_some() { into.$f = from.$f.clone(); } )* };
    }
    fill!(job_id, run_id, job_name, repository, branch, commit, result);
}

/// `15s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "s" | "sec" | "secs" => n,
        "m" | "min" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "ms" => return Some(Duration::from_millis(n)),
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
