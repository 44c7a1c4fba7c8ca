//! The controller's records and states: what a VM, an event, a heartbeat, a command, a
//! registration and an operator token are. Plain data that imports nothing else of the
//! controller: the rules ([`crate::lifecycle`]), the store and the front ends all build on it.

use chrono::{DateTime, Utc};
use miglet_proto::event::{CurrentJob, HealthFigures};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// A stored name that is not one of its type's values (a corrupt row, or a bad filter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {0}")]
pub struct UnknownValue(pub String);

/// Unix milliseconds, the unit of every time column.
pub type Millis = i64;

pub fn millis(t: DateTime<Utc>) -> Millis {
    t.timestamp_millis()
}

pub fn from_millis(ms: Millis) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Whether a VM is reporting as expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Missed the configured number of heartbeat intervals.
    Unhealthy,
    /// Silent for much longer; presumed gone.
    Lost,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Lost => "lost",
        }
    }
}

impl FromStr for Health {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "healthy" => Health::Healthy,
            "unhealthy" => Health::Unhealthy,
            "lost" => Health::Lost,
            other => return Err(UnknownValue(format!("health {other:?}"))),
        })
    }
}

/// Life of a queued command: `pending` -> `delivered` -> `acknowledged` | `failed`, or
/// `expired` from either of the first two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    Delivered,
    Acknowledged,
    Failed,
    Expired,
}

impl CommandState {
    pub const OPEN: &'static [CommandState] = &[CommandState::Pending, CommandState::Delivered];
    /// Every state.
    pub const ALL: [CommandState; 5] = [
        CommandState::Pending,
        CommandState::Delivered,
        CommandState::Acknowledged,
        CommandState::Failed,
        CommandState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Pending => "pending",
            CommandState::Delivered => "delivered",
            CommandState::Acknowledged => "acknowledged",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }

    pub fn is_open(self) -> bool {
        Self::OPEN.contains(&self)
    }
}

impl fmt::Display for CommandState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CommandState {
    type Err = UnknownValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => CommandState::Pending,
            "delivered" => CommandState::Delivered,
            "acknowledged" => CommandState::Acknowledged,
            "failed" => CommandState::Failed,
            "expired" => CommandState::Expired,
            other => return Err(UnknownValue(format!("command state {other:?}"))),
        })
    }
}

/// Everything the controller knows about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub vm_id: String,
    pub pool_id: String,
    pub org_id: String,
    /// The agent's boot id, or one the controller made up for agents that send none.
    pub boot_id: String,
    /// Counts boots of this VM id, starting at 1.
    pub boot_seq: i64,
    pub booted_at: Millis,
    /// The agent's lifecycle state as last reported (`miglet_state` names), or `terminated`.
    pub state: String,
    pub health: Health,
    pub connected: bool,
    pub last_seen_at: Millis,
    pub last_heartbeat_at: Option<Millis>,
    pub runner_state: Option<String>,
    pub current_job: Option<CurrentJob>,
    pub latest_health: Option<HealthFigures>,
    /// The `register_runner` command issued for the current boot, if any.
    pub registration_command_id: Option<String>,
    /// The runner of the current boot is known to be registered (event or ack).
    pub runner_registered: bool,
    /// The agent has acknowledged commands before, so unacknowledged ones are redelivered
    /// over HTTP too.
    pub acks_commands: bool,
    pub agent_version: Option<String>,
    /// When the current boot first reported a job; from then on its registration token is
    /// never handed out again.
    pub job_started_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub seq: i64,
    pub vm_id: String,
    pub event_id: Option<String>,
    pub event_type: String,
    pub boot_id: Option<String>,
    /// `http` or `grpc`.
    pub transport: String,
    pub occurred_at: Option<Millis>,
    pub received_at: Millis,
    /// The normalized report (JSON of [`miglet_proto::event::EventReport`]).
    pub data: String,
    /// The body as received (HTTP) or the message rendered as JSON (gRPC).
    pub raw: String,
}

/// A heartbeat as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatRow {
    pub seq: i64,
    pub vm_id: String,
    pub transport: String,
    pub occurred_at: Option<Millis>,
    pub received_at: Millis,
    pub miglet_state: Option<String>,
    pub runner_state: Option<String>,
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
    /// JSON of [`miglet_proto::event::HeartbeatReport`].
    pub report: String,
}

/// What the VM row learns from a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatVmUpdate {
    pub vm_id: String,
    pub at: Millis,
    pub state: Option<String>,
    pub runner_state: Option<String>,
    pub current_job: Option<CurrentJob>,
    pub latest_health: HealthFigures,
}

/// A heartbeat as received, for the writer to apply to the VM's stored record
/// ([`crate::store::Mutation::IngestHeartbeat`]); the decision is [`crate::lifecycle::heartbeat_effect`].
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatInput {
    pub vm_id: String,
    pub report: miglet_proto::event::HeartbeatReport,
    /// The report as stored (JSON).
    pub report_json: String,
    pub transport: String,
    pub now: Millis,
    /// Whether the VM has a stream open here (used only if the VM is new).
    pub connected: bool,
}

/// A registration config request and its (redacted) answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationRow {
    pub seq: i64,
    pub vm_id: String,
    pub requested_at: Millis,
    pub request: String,
    pub response: String,
}

/// A queued command as stored. `parameters` never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRecord {
    pub seq: i64,
    pub id: String,
    pub vm_id: String,
    pub boot_id: Option<String>,
    pub command_type: String,
    pub parameters: Map<String, Value>,
    pub state: CommandState,
    /// Who queued it: `controller` (automatic) or an operator name.
    pub source: String,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
    pub delivered_at: Option<Millis>,
    /// `http`, or `grpc:<stream id>` for the stream it went out on.
    pub delivered_via: Option<String>,
    pub delivery_count: i64,
    pub finished_at: Option<Millis>,
    pub result_message: Option<String>,
    pub result: Option<Map<String, Value>>,
}

impl CommandRecord {
    /// A new command, `pending`, with nothing delivered yet.
    pub fn pending(
        id: String,
        vm_id: &str,
        boot_id: &str,
        command: &miglet_proto::command::Command,
        source: &str,
        created_at: Millis,
        expires_at: Millis,
    ) -> CommandRecord {
        CommandRecord {
            seq: 0,
            id,
            vm_id: vm_id.to_owned(),
            boot_id: Some(boot_id.to_owned()),
            command_type: command.type_name().to_owned(),
            parameters: command.redacted_json_parameters(),
            state: CommandState::Pending,
            source: source.to_owned(),
            created_at,
            expires_at: Some(expires_at),
            delivered_at: None,
            delivered_via: None,
            delivery_count: 0,
            finished_at: None,
            result_message: None,
            result: None,
        }
    }
}

/// One step in a command's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandTransition {
    pub command_id: String,
    pub at: Millis,
    pub from_state: Option<String>,
    pub to_state: String,
    pub detail: Option<String>,
}

/// One entry of the controller's own log about a VM.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmLogRow {
    pub vm_id: String,
    pub at: Millis,
    pub kind: String,
    pub detail: Option<String>,
}

/// A command the reconciler expired.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiredCommand {
    pub id: String,
    pub vm_id: String,
    pub command_type: String,
}

/// What the silent-VM sweep reads of a VM that has not been heard from for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilentVm {
    pub vm_id: String,
    pub state: String,
    pub health: Health,
    pub connected: bool,
    pub last_seen_at: Millis,
}

/// What silence does to a VM (decided by the lifecycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilentChange {
    /// Its health drops (`healthy` -> `unhealthy`, or either -> `lost`).
    Health { from: Health, to: Health },
    /// A VM that was shutting down went quiet and disconnected: it is done, not sick.
    Terminated,
}

/// An operator API token; the secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperatorTokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: Millis,
    pub created_by: String,
    pub expires_at: Option<Millis>,
    pub revoked_at: Option<Millis>,
}

/// One audited admin action: who, what, on what, from where, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub seq: i64,
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub remote_addr: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

/// The pool a VM id is bound to by its first proven identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmBinding {
    pub vm_id: String,
    pub pool_id: String,
    pub bound_at: Millis,
    /// How the binding was made: `method=bootstrap`, `method=gce ...`, `operator:...`.
    pub proof: String,
}

/// A one-time enrollment token for one VM id and pool; the secret itself is never stored,
/// only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnrollmentTokenRecord {
    pub id: String,
    pub vm_id: String,
    pub pool_id: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: Millis,
    pub created_by: String,
    pub expires_at: Millis,
    pub used_at: Option<Millis>,
}

/// An operator token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// May read everything the admin API shows.
    ReadOnly,
    /// May also enqueue commands and change things.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read-only" | "readonly" | "read_only" => Ok(Role::ReadOnly),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (expected read-only or admin)"
            )),
        }
    }
}

/// A job GitHub told us of (`workflow_job`), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRecord {
    pub job_id: i64,
    pub run_id: i64,
    pub run_attempt: i64,
    /// `owner/name`.
    pub repository: String,
    pub name: String,
    pub workflow_name: Option<String>,
    /// The job's `runs-on` labels.
    pub labels: Vec<String>,
    /// `queued`, `waiting`, `in_progress` or `completed`.
    pub status: String,
    pub conclusion: Option<String>,
    /// The pool whose labels match the job's (`None`: none of ours can run it).
    pub pool_id: Option<String>,
    /// The runner that took it, and that runner's VM when it is one of ours.
    pub runner_name: Option<String>,
    pub vm_id: Option<String>,
    pub queued_at: Millis,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub updated_at: Millis,
}

/// An instance the scaler asked a provider for, or adopted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceRecord {
    pub name: String,
    pub pool_id: String,
    pub provider: String,
    /// `requested`, `running`, `deleting` or `deleted`.
    pub state: String,
    pub requested_at: Millis,
    pub provider_id: Option<String>,
    /// The `drain` the scaler sent it, and why.
    pub drain_command_id: Option<String>,
    pub drain_reason: Option<String>,
    pub delete_reason: Option<String>,
    pub deleted_at: Option<Millis>,
    pub updated_at: Millis,
}
