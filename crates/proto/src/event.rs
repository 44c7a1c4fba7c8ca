//! Events and heartbeats, transport-neutral.
//!
//! An agent reports the same facts over HTTP JSON (typed fields) or gRPC (`data` map of
//! strings). [`EventReport`] and [`HeartbeatReport`] are the one shape both become, so the
//! controller stores and interprets them in one code path; [`EventKind`] is the typed view.

use crate::json::{CurrentJobJson, EventBody, HeartbeatBody, VmHealthJson};
use crate::pb;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;

pub const VM_STARTED: &str = "vm_started";
pub const RUNNER_REGISTERED: &str = "runner_registered";
pub const JOB_STARTED: &str = "job_started";
pub const JOB_COMPLETED: &str = "job_completed";
pub const RUNNER_CRASHED: &str = "runner_crashed";
pub const VM_SHUTTING_DOWN: &str = "vm_shutting_down";
pub const ERROR: &str = "error";
/// The base contract's heartbeat type; some agents post it as an event too.
pub const JOB_HEARTBEAT: &str = "job_heartbeat";
/// What an event of a type this version does not know is stored as (its own name stays in
/// the stored report): forward compatible, without letting senders invent types.
pub const UNKNOWN: &str = "unknown";

/// Every event type of the contract.
pub const KNOWN_EVENT_TYPES: &[&str] = &[
    VM_STARTED,
    RUNNER_REGISTERED,
    JOB_STARTED,
    JOB_COMPLETED,
    RUNNER_CRASHED,
    VM_SHUTTING_DOWN,
    ERROR,
    JOB_HEARTBEAT,
];

/// Whether `event_type` is one of the contract's event types.
pub fn is_known_event_type(event_type: &str) -> bool {
    KNOWN_EVENT_TYPES.contains(&event_type)
}

/// Per-type fields whose JSON value is a boolean.
const BOOL_FIELDS: &[&str] = &["success"];
/// Per-type fields whose JSON value is an integer.
const INT_FIELDS: &[&str] = &[
    "exit_code",
    "duration",
    "cpu",
    "memory",
    "disk",
    "runner_id",
];
/// Per-type fields whose JSON value is a list of strings (comma-joined in gRPC `data`).
const LIST_FIELDS: &[&str] = &["labels"];

/// One event as reported by an agent, over either transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventReport {
    pub event_type: String,
    pub event_id: Option<String>,
    pub boot_id: Option<String>,
    pub vm_id: Option<String>,
    pub pool_id: Option<String>,
    pub org_id: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    pub metadata: Map<String, Value>,
    /// Per-type fields with native JSON types.
    pub fields: Map<String, Value>,
}

impl EventReport {
    pub fn from_json(body: EventBody) -> EventReport {
        EventReport {
            event_type: body.event_type,
            event_id: body.event_id.filter(|s| !s.is_empty()),
            boot_id: body.boot_id.filter(|s| !s.is_empty()),
            vm_id: body.vm_id,
            pool_id: body.pool_id.filter(|s| !s.is_empty()),
            org_id: body.org_id.filter(|s| !s.is_empty()),
            timestamp: body.timestamp,
            metadata: body.metadata.unwrap_or_default(),
            fields: body.fields,
        }
    }

    pub fn to_json(&self) -> EventBody {
        EventBody {
            event_type: self.event_type.clone(),
            timestamp: self.timestamp,
            vm_id: self.vm_id.clone(),
            pool_id: self.pool_id.clone(),
            org_id: self.org_id.clone(),
            metadata: (!self.metadata.is_empty()).then(|| self.metadata.clone()),
            event_id: self.event_id.clone(),
            boot_id: self.boot_id.clone(),
            fields: self.fields.clone(),
        }
    }

    /// Reads a gRPC event. `event_id` and `boot_id` travel in `data`; the other `data` keys
    /// become per-type fields, typed where the contract gives them a type (`success`,
    /// `exit_code`, `labels`, ...). A `data` value that does not parse as its type is kept as
    /// the string it was.
    pub fn from_pb(n: &pb::EventNotification) -> EventReport {
        let mut fields = Map::new();
        let mut metadata = Map::new();
        let mut event_id = None;
        let mut boot_id = None;
        for (k, v) in &n.data {
            match k.as_str() {
                "event_id" => event_id = Some(v.clone()).filter(|s| !s.is_empty()),
                "boot_id" => boot_id = Some(v.clone()).filter(|s| !s.is_empty()),
                // The prototype puts crash details under `reason`/`error`; both stay fields.
                _ => {
                    if let Some(meta_key) = k.strip_prefix("metadata.") {
                        metadata.insert(meta_key.to_owned(), Value::String(v.clone()));
                    } else {
                        fields.insert(k.clone(), typed_value(k, v));
                    }
                }
            }
        }
        EventReport {
            event_type: n.r#type.clone(),
            event_id,
            boot_id,
            vm_id: Some(n.vm_id.clone()).filter(|s| !s.is_empty()),
            pool_id: Some(n.pool_id.clone()).filter(|s| !s.is_empty()),
            org_id: Some(n.org_id.clone()).filter(|s| !s.is_empty()),
            timestamp: crate::from_unix(n.timestamp),
            metadata,
            fields,
        }
    }

    pub fn to_pb(&self) -> pb::EventNotification {
        let mut data: HashMap<String, String> = HashMap::new();
        for (k, v) in &self.fields {
            data.insert(k.clone(), string_value(v));
        }
        for (k, v) in &self.metadata {
            data.insert(format!("metadata.{k}"), string_value(v));
        }
        if let Some(id) = &self.event_id {
            data.insert("event_id".into(), id.clone());
        }
        if let Some(b) = &self.boot_id {
            data.insert("boot_id".into(), b.clone());
        }
        pb::EventNotification {
            r#type: self.event_type.clone(),
            vm_id: self.vm_id.clone().unwrap_or_default(),
            pool_id: self.pool_id.clone().unwrap_or_default(),
            org_id: self.org_id.clone().unwrap_or_default(),
            data,
            timestamp: self.timestamp.map(|t| t.timestamp()).unwrap_or_default(),
        }
    }

    fn str_field(&self, k: &str) -> Option<String> {
        match self.fields.get(k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    /// The `exit_code` the event carries (a number, or a string of one).
    pub fn exit_code(&self) -> Option<i64> {
        self.int_field("exit_code")
    }

    fn int_field(&self, k: &str) -> Option<i64> {
        match self.fields.get(k) {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
    }

    fn bool_field(&self, k: &str) -> Option<bool> {
        match self.fields.get(k) {
            Some(Value::Bool(b)) => Some(*b),
            Some(Value::String(s)) => match s.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }

    fn job(&self) -> JobDetails {
        JobDetails {
            job_id: self.str_field("job_id"),
            run_id: self.str_field("run_id"),
            job_name: self.str_field("job_name"),
            repository: self.str_field("repository"),
            branch: self.str_field("branch"),
            commit: self.str_field("commit"),
            result: self.str_field("result"),
            success: self.bool_field("success"),
            exit_code: self.int_field("exit_code"),
            duration_seconds: self.int_field("duration"),
        }
    }

    /// The typed view of this event.
    pub fn kind(&self) -> EventKind {
        match self.event_type.as_str() {
            VM_STARTED => EventKind::VmStarted {
                version: self.str_field("version"),
                machine_type: self.str_field("machine_type"),
            },
            RUNNER_REGISTERED => EventKind::RunnerRegistered {
                runner_url: self.str_field("runner_url"),
                runner_name: self.str_field("runner_name"),
            },
            JOB_STARTED => EventKind::JobStarted(self.job()),
            JOB_COMPLETED => EventKind::JobCompleted(self.job()),
            RUNNER_CRASHED => EventKind::RunnerCrashed {
                reason: self.str_field("reason").or_else(|| {
                    self.metadata
                        .get("error")
                        .and_then(|v| v.as_str().map(str::to_owned))
                }),
            },
            VM_SHUTTING_DOWN => EventKind::VmShuttingDown {
                reason: self.str_field("reason"),
            },
            ERROR => EventKind::Error {
                message: self.str_field("message"),
            },
            _ => EventKind::Other,
        }
    }
}

/// What a job event tells about the job. Every member is optional: base-contract agents send
/// few of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDetails {
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    pub job_name: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub result: Option<String>,
    pub success: Option<bool>,
    pub exit_code: Option<i64>,
    pub duration_seconds: Option<i64>,
}

/// Typed view of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    VmStarted {
        version: Option<String>,
        machine_type: Option<String>,
    },
    RunnerRegistered {
        runner_url: Option<String>,
        runner_name: Option<String>,
    },
    JobStarted(JobDetails),
    JobCompleted(JobDetails),
    RunnerCrashed {
        reason: Option<String>,
    },
    VmShuttingDown {
        reason: Option<String>,
    },
    Error {
        message: Option<String>,
    },
    /// A type this version does not interpret; stored as sent.
    Other,
}

fn typed_value(key: &str, v: &str) -> Value {
    if BOOL_FIELDS.contains(&key) {
        match v {
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
    } else if INT_FIELDS.contains(&key) {
        if let Ok(n) = v.parse::<i64>() {
            return Value::from(n);
        }
    } else if LIST_FIELDS.contains(&key) {
        return Value::Array(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        );
    }
    Value::String(v.to_owned())
}

fn string_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Whole-VM health figures, in exact units.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthFigures {
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub disk_used_bytes: Option<i64>,
    pub disk_total_bytes: Option<i64>,
}

/// The job a heartbeat says is running.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CurrentJob {
    pub job_id: Option<String>,
    pub run_id: Option<String>,
    pub job_name: Option<String>,
    pub repository: Option<String>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub status: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
}

/// One heartbeat, over either transport. Every part is optional: a base-contract agent may
/// leave any of them out, and that is not an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReport {
    /// The VM the heartbeat names itself (checked against the path or stream, then dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    pub timestamp: Option<DateTime<Utc>>,
    pub pool_id: Option<String>,
    pub org_id: Option<String>,
    pub boot_id: Option<String>,
    pub miglet_state: Option<String>,
    pub runner_state: Option<String>,
    pub runner_configured: Option<bool>,
    pub runner_name: Option<String>,
    pub runner_labels: Vec<String>,
    pub health: HealthFigures,
    pub current_job: Option<CurrentJob>,
}

const MIB: i64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// A byte count off the wire: zero means "not reported" on the stream; negative is nonsense.
fn nonzero_i(v: i64) -> Option<i64> {
    (v > 0).then_some(v)
}

fn bytes(v: Option<i64>) -> Option<i64> {
    v.filter(|b| *b >= 0)
}

/// A count in MiB/GiB (the base contract's units) in bytes; `None` when it would not fit.
fn scaled(v: Option<i64>, unit: i64) -> Option<i64> {
    v.filter(|n| *n >= 0).and_then(|n| n.checked_mul(unit))
}

/// A CPU figure off the wire: NaN, infinities and negatives are dropped, not stored.
fn cpu(v: Option<f64>) -> Option<f64> {
    v.filter(|c| c.is_finite() && *c >= 0.0)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl HeartbeatReport {
    pub fn from_json(b: HeartbeatBody) -> HeartbeatReport {
        let h = b.vm_health.unwrap_or_default();
        let health = HealthFigures {
            cpu_percent: cpu(h.cpu_usage_percent).or(cpu(h.cpu_load)),
            memory_used_bytes: bytes(h.memory_used_bytes).or(scaled(h.memory_used, MIB)),
            memory_total_bytes: bytes(h.memory_total_bytes).or(scaled(h.memory_total, MIB)),
            disk_used_bytes: bytes(h.disk_used_bytes).or(scaled(h.disk_used, GIB)),
            disk_total_bytes: bytes(h.disk_total_bytes).or(scaled(h.disk_total, GIB)),
        };
        HeartbeatReport {
            vm_id: b.vm_id.filter(|s| !s.is_empty()),
            timestamp: b.timestamp,
            pool_id: b.pool_id.filter(|s| !s.is_empty()),
            org_id: b.org_id.filter(|s| !s.is_empty()),
            boot_id: b.boot_id.filter(|s| !s.is_empty()),
            miglet_state: b.miglet_state.filter(|s| !s.is_empty()),
            runner_state: b.runner_state.filter(|s| !s.is_empty()),
            runner_configured: None,
            runner_name: None,
            runner_labels: Vec::new(),
            health,
            current_job: b
                .current_job
                .filter(|j| !j.job_id.is_empty() || !j.run_id.is_empty())
                .map(|j| CurrentJob {
                    job_id: non_empty(&j.job_id),
                    run_id: non_empty(&j.run_id),
                    job_name: j.job_name,
                    repository: j.repository,
                    branch: j.branch,
                    commit: j.commit,
                    status: Some("running".into()),
                    started_at: j.started_at,
                }),
        }
    }

    /// The HTTP form, with both the base contract's MB/GB members and our exact ones filled.
    pub fn to_json(&self, vm_id: &str) -> HeartbeatBody {
        let h = &self.health;
        HeartbeatBody {
            event_type: "job_heartbeat".into(),
            timestamp: self.timestamp,
            vm_id: Some(vm_id.to_owned()),
            pool_id: self.pool_id.clone(),
            org_id: self.org_id.clone(),
            metadata: None,
            miglet_state: self.miglet_state.clone(),
            vm_health: Some(VmHealthJson {
                cpu_load: h.cpu_percent,
                memory_used: h.memory_used_bytes.map(|b| b / MIB),
                memory_total: h.memory_total_bytes.map(|b| b / MIB),
                disk_used: h.disk_used_bytes.map(|b| b / GIB),
                disk_total: h.disk_total_bytes.map(|b| b / GIB),
                cpu_usage_percent: h.cpu_percent,
                memory_used_bytes: h.memory_used_bytes,
                memory_total_bytes: h.memory_total_bytes,
                disk_used_bytes: h.disk_used_bytes,
                disk_total_bytes: h.disk_total_bytes,
            }),
            runner_state: self.runner_state.clone(),
            current_job: self.current_job.as_ref().map(|j| CurrentJobJson {
                job_id: j.job_id.clone().unwrap_or_default(),
                run_id: j.run_id.clone().unwrap_or_default(),
                repository: j.repository.clone(),
                branch: j.branch.clone(),
                commit: j.commit.clone(),
                job_name: j.job_name.clone(),
                started_at: j.started_at,
            }),
            boot_id: self.boot_id.clone(),
        }
    }

    pub fn from_pb(hb: &pb::Heartbeat) -> HeartbeatReport {
        let health = hb
            .health
            .as_ref()
            .map(|h| HealthFigures {
                cpu_percent: cpu(Some(h.cpu_usage_percent)),
                memory_used_bytes: nonzero_i(h.memory_used_bytes),
                memory_total_bytes: nonzero_i(h.memory_total_bytes),
                disk_used_bytes: nonzero_i(h.disk_used_bytes),
                disk_total_bytes: nonzero_i(h.disk_total_bytes),
            })
            .unwrap_or_default();
        let runner = hb.runner_state.as_ref();
        HeartbeatReport {
            vm_id: non_empty(&hb.vm_id),
            timestamp: crate::from_unix(hb.timestamp),
            pool_id: non_empty(&hb.pool_id),
            org_id: non_empty(&hb.org_id),
            boot_id: None,
            miglet_state: non_empty(&hb.miglet_state),
            runner_state: runner.and_then(|r| non_empty(&r.state)),
            runner_configured: runner.map(|r| r.configured),
            runner_name: runner.and_then(|r| non_empty(&r.runner_name)),
            runner_labels: runner.map(|r| r.labels.clone()).unwrap_or_default(),
            health,
            current_job: hb
                .current_job
                .as_ref()
                .filter(|j| !j.job_id.is_empty() || !j.run_id.is_empty())
                .map(|j| CurrentJob {
                    job_id: non_empty(&j.job_id),
                    run_id: non_empty(&j.run_id),
                    job_name: None,
                    repository: non_empty(&j.repository),
                    branch: non_empty(&j.branch),
                    commit: non_empty(&j.commit),
                    status: non_empty(&j.status),
                    started_at: crate::from_unix(j.started_at),
                }),
        }
    }

    /// The gRPC form. `health` and `runner_state` are always set: the prototype's controller
    /// crashes on a heartbeat without them.
    pub fn to_pb(&self, vm_id: &str) -> pb::Heartbeat {
        let h = &self.health;
        let pct = |used: Option<i64>, total: Option<i64>| match (used, total) {
            (Some(u), Some(t)) if t > 0 => u as f64 * 100.0 / t as f64,
            _ => 0.0,
        };
        pb::Heartbeat {
            vm_id: vm_id.to_owned(),
            pool_id: self.pool_id.clone().unwrap_or_default(),
            org_id: self.org_id.clone().unwrap_or_default(),
            health: Some(pb::VmHealth {
                cpu_usage_percent: h.cpu_percent.unwrap_or_default(),
                memory_usage_percent: pct(h.memory_used_bytes, h.memory_total_bytes),
                disk_usage_percent: pct(h.disk_used_bytes, h.disk_total_bytes),
                memory_total_bytes: h.memory_total_bytes.unwrap_or_default(),
                memory_used_bytes: h.memory_used_bytes.unwrap_or_default(),
                disk_total_bytes: h.disk_total_bytes.unwrap_or_default(),
                disk_used_bytes: h.disk_used_bytes.unwrap_or_default(),
            }),
            runner_state: Some(pb::RunnerState {
                state: self
                    .runner_state
                    .clone()
                    .unwrap_or_else(|| "offline".into()),
                configured: self.runner_configured.unwrap_or(false),
                runner_name: self.runner_name.clone().unwrap_or_default(),
                labels: self.runner_labels.clone(),
            }),
            current_job: self.current_job.as_ref().map(|j| pb::JobInfo {
                job_id: j.job_id.clone().unwrap_or_default(),
                run_id: j.run_id.clone().unwrap_or_default(),
                repository: j.repository.clone().unwrap_or_default(),
                branch: j.branch.clone().unwrap_or_default(),
                commit: j.commit.clone().unwrap_or_default(),
                status: j.status.clone().unwrap_or_else(|| "running".into()),
                started_at: j.started_at.map(|t| t.timestamp()).unwrap_or_default(),
            }),
            timestamp: self.timestamp.map(|t| t.timestamp()).unwrap_or_default(),
            miglet_state: self.miglet_state.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_event_round_trips_between_transports() {
        let json = r#"{"type":"job_completed","timestamp":"2025-01-01T00:00:10Z","vm_id":"v",
            "pool_id":"p","event_id":"e-1","boot_id":"b-1","job_id":"build","run_id":"77",
            "job_name":"build","repository":"o/r","success":false,"exit_code":1,"duration":42,
            "result":"failed","metadata":{"k":"v"}}"#;
        let body: EventBody = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        let report = EventReport::from_json(body);
        let back = EventReport::from_pb(&report.to_pb());
        assert_eq!(back, report);
        let EventKind::JobCompleted(job) = back.kind() else {
            panic!("kind")
        };
        assert_eq!(job.success, Some(false));
        assert_eq!(job.duration_seconds, Some(42));
        assert_eq!(job.run_id.as_deref(), Some("77"));
    }

    #[test]
    fn prototype_grpc_events_read() {
        let n = pb::EventNotification {
            r#type: "job_completed".into(),
            vm_id: "v".into(),
            pool_id: "p".into(),
            org_id: String::new(),
            data: [
                ("job_id".to_owned(), "job:".to_owned()),
                ("run_id".to_owned(), String::new()),
                ("success".to_owned(), "true".to_owned()),
            ]
            .into(),
            timestamp: 1_700_000_000,
        };
        let r = EventReport::from_pb(&n);
        assert_eq!(r.event_id, None);
        assert_eq!(r.fields["success"], Value::Bool(true));
        assert!(matches!(
            r.kind(),
            EventKind::JobCompleted(JobDetails {
                success: Some(true),
                ..
            })
        ));
    }

    #[test]
    fn heartbeat_units_and_round_trip() {
        let body: HeartbeatBody = serde_json::from_str(
            r#"{"type":"job_heartbeat","vm_id":"v","miglet_state":"idle",
                "vm_health":{"cpu_load":12.5,"memory_used":512,"memory_total":1024,"disk_used":3,"disk_total":10},
                "runner_state":"idle"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let r = HeartbeatReport::from_json(body);
        assert_eq!(r.health.memory_used_bytes, Some(512 * MIB));
        assert_eq!(r.health.disk_total_bytes, Some(10 * GIB));
        let pb = r.to_pb("v");
        assert_eq!(
            pb.health.as_ref().map(|h| h.memory_usage_percent),
            Some(50.0)
        );
        let back = HeartbeatReport::from_pb(&pb);
        assert_eq!(back.health, r.health);
        assert_eq!(back.miglet_state.as_deref(), Some("idle"));
        // JSON written by us carries both unit systems.
        let j = r.to_json("v");
        let h = j.vm_health.unwrap_or_default();
        assert_eq!(
            (h.memory_used, h.memory_used_bytes),
            (Some(512), Some(512 * MIB))
        );
    }

    #[test]
    fn empty_heartbeat_is_fine() {
        let r = HeartbeatReport::from_pb(&pb::Heartbeat::default());
        assert_eq!(r.health, HealthFigures::default());
        assert!(r.current_job.is_none());
        let pb = r.to_pb("v");
        assert!(pb.health.is_some() && pb.runner_state.is_some());
    }
}
