//! What the operator API answers: views made for the API (times as RFC 3339, states as
//! their names), built from the store's records.

use super::*;

pub(super) fn time(ms: Millis) -> String {
    miglet_proto::rfc3339(crate::store::from_millis(ms))
}

pub(super) fn opt_time(ms: Option<Millis>) -> Option<String> {
    ms.map(time)
}

/// A VM as operators see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub vm_id: String,
    pub pool_id: String,
    pub org_id: String,
    /// The agent's lifecycle state (`ready`, `idle`, `job_running`, `draining`, ...).
    pub state: String,
    /// `healthy`, `unhealthy` (missed heartbeats) or `lost`.
    pub health: String,
    /// Whether a gRPC stream is open.
    pub connected: bool,
    pub boot_id: String,
    pub boot_seq: i64,
    pub booted_at: String,
    pub last_seen_at: String,
    pub last_heartbeat_at: Option<String>,
    pub runner_state: Option<String>,
    pub runner_registered: bool,
    pub current_job: Option<JobView>,
    pub latest_health: Option<HealthView>,
    pub agent_version: Option<String>,
    pub job_started_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub run_id: Option<String>,
    pub job_name: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub started_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthView {
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
}

impl From<&VmRecord> for VmView {
    fn from(v: &VmRecord) -> VmView {
        VmView {
            vm_id: v.vm_id.clone(),
            pool_id: v.pool_id.clone(),
            org_id: v.org_id.clone(),
            state: v.state.clone(),
            health: v.health.as_str().to_owned(),
            connected: v.connected,
            boot_id: v.boot_id.clone(),
            boot_seq: v.boot_seq,
            booted_at: time(v.booted_at),
            last_seen_at: time(v.last_seen_at),
            last_heartbeat_at: opt_time(v.last_heartbeat_at),
            runner_state: v.runner_state.clone(),
            runner_registered: v.runner_registered,
            current_job: v.current_job.as_ref().map(|j| JobView {
                run_id: j.run_id.clone(),
                job_name: j.job_name.clone(),
                repository: j.repository.clone(),
                branch: j.branch.clone(),
                commit: j.commit.clone(),
                started_at: j.started_at.map(miglet_proto::rfc3339),
            }),
            latest_health: v.latest_health.as_ref().map(|h| HealthView {
                cpu_percent: h.cpu_percent,
                memory_used_bytes: h.memory_used_bytes,
                memory_total_bytes: h.memory_total_bytes,
                disk_used_bytes: h.disk_used_bytes,
                disk_total_bytes: h.disk_total_bytes,
            }),
            agent_version: v.agent_version.clone(),
            job_started_at: opt_time(v.job_started_at),
        }
    }
}

/// A queued command and where it is.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    pub id: String,
    pub vm_id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    /// Secrets are never shown (`[REDACTED]`).
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// `pending`, `delivered`, `acknowledged`, `failed` or `expired`.
    pub state: String,
    /// Who queued it: `controller` or the operator.
    pub source: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub delivered_at: Option<String>,
    pub delivered_via: Option<String>,
    pub delivery_count: i64,
    pub finished_at: Option<String>,
    pub result_message: Option<String>,
    /// Milliseconds from queueing to the acknowledgment, once acknowledged or failed.
    pub ack_latency_ms: Option<i64>,
}

impl From<&CommandRecord> for CommandView {
    fn from(c: &CommandRecord) -> CommandView {
        CommandView {
            id: c.id.clone(),
            vm_id: c.vm_id.clone(),
            command_type: c.command_type.clone(),
            parameters: c.parameters.clone(),
            state: c.state.as_str().to_owned(),
            source: c.source.clone(),
            created_at: time(c.created_at),
            expires_at: opt_time(c.expires_at),
            delivered_at: opt_time(c.delivered_at),
            delivered_via: c.delivered_via.clone(),
            delivery_count: c.delivery_count,
            finished_at: opt_time(c.finished_at),
            result_message: c.result_message.clone(),
            ack_latency_ms: c
                .finished_at
                .filter(|_| matches!(c.state, CommandState::Acknowledged | CommandState::Failed))
                .map(|f| f - c.created_at),
        }
    }
}

/// A stored event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    /// Position in the store; pages and the live stream go by it.
    pub seq: i64,
    pub vm_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub event_id: Option<String>,
    pub boot_id: Option<String>,
    pub transport: String,
    pub occurred_at: Option<String>,
    pub received_at: String,
    /// The event's fields as reported.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl From<&EventRow> for EventView {
    fn from(e: &EventRow) -> EventView {
        let report: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
        EventView {
            seq: e.seq,
            vm_id: e.vm_id.clone(),
            event_type: e.event_type.clone(),
            event_id: e.event_id.clone(),
            boot_id: e.boot_id.clone(),
            transport: e.transport.clone(),
            occurred_at: opt_time(e.occurred_at),
            received_at: time(e.received_at),
            data: report.get("fields").cloned().unwrap_or(report),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatView {
    pub seq: i64,
    pub received_at: String,
    pub occurred_at: Option<String>,
    pub transport: String,
    pub miglet_state: Option<String>,
    pub runner_state: Option<String>,
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
}

impl From<&HeartbeatRow> for HeartbeatView {
    fn from(h: &HeartbeatRow) -> HeartbeatView {
        HeartbeatView {
            seq: h.seq,
            received_at: time(h.received_at),
            occurred_at: opt_time(h.occurred_at),
            transport: h.transport.clone(),
            miglet_state: h.miglet_state.clone(),
            runner_state: h.runner_state.clone(),
            cpu_percent: h.cpu_percent,
            memory_used_bytes: h.memory_used_bytes,
            memory_total_bytes: h.memory_total_bytes,
            disk_used_bytes: h.disk_used_bytes,
            disk_total_bytes: h.disk_total_bytes,
        }
    }
}

/// One line of a VM's timeline.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    pub at: String,
    /// `event` (reported by the agent), `controller` (observed by the controller: boots,
    /// streams, health, enrollment) or `command` (a command changed state).
    pub source: String,
    /// The event type, the observation, or `<command type> <new state>`.
    pub what: String,
    pub detail: Option<String>,
    /// The event's fields; `command_id` for a command; empty for an observation.
    #[schema(value_type = Object)]
    pub data: Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub remote_addr: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
}

impl From<&AuditRow> for AuditView {
    fn from(a: &AuditRow) -> AuditView {
        AuditView {
            seq: a.seq,
            at: time(a.at),
            actor: a.actor.clone(),
            action: a.action.clone(),
            target: a.target.clone(),
            remote_addr: a.remote_addr.clone(),
            outcome: a.outcome.clone(),
            detail: a.detail.clone(),
        }
    }
}
