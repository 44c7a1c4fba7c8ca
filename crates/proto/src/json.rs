//! Serde types for every HTTP JSON body of PROTOCOL.md.
//!
//! Readers are tolerant: unknown fields are ignored (or kept, where a body is stored as
//! sent), optional parts may be missing, and `commands: null` reads as an empty list. Writers
//! emit exactly the field names of the contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `POST /api/v1/vms/{vm_id}/events` request: the envelope every event shares plus its
/// per-type fields (kept in `fields`, see [`crate::event`] for the typed view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// Addition: unique per event; the controller stores an event id once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Addition: identifies the VM boot the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Per-type fields (`runner_url`, `job_id`, `success`, ...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// Answer to `vm_started`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStartedAck {
    pub status: String,
    pub acknowledged: bool,
    pub vm_id: String,
    pub pool_id: String,
    pub org_id: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
}

/// Answer to any other event and to heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Received {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
    pub vm_id: String,
    pub message: String,
    /// Addition: false when the event id had been stored before (a resend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

/// What an agent needs from an event answer to treat it as an acknowledgment: 200 with
/// `acknowledged: true`, or `status` `acknowledged` / `received`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct AnyAck {
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub acknowledged: Option<bool>,
    #[serde(default)]
    pub message: Option<String>,
}

impl AnyAck {
    pub fn is_ack(&self) -> bool {
        self.acknowledged == Some(true)
            || matches!(self.status.as_deref(), Some("acknowledged" | "received"))
    }
}

/// `POST /api/v1/vms/{vm_id}/heartbeat` request (`type` is `job_heartbeat`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatBody {
    #[serde(rename = "type", default = "job_heartbeat")]
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miglet_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_health: Option<VmHealthJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<CurrentJobJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

fn job_heartbeat() -> String {
    "job_heartbeat".to_owned()
}

/// `vm_health` of a heartbeat. The first five members are the base contract's units (MB and
/// GB); the `*_bytes` and `*_percent` members are our exact additions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmHealthJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_load: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_usage_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<i64>,
}

/// `current_job` of a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CurrentJobJson {
    #[serde(default)]
    pub job_id: String,
    #[serde(default)]
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
}

/// `POST /api/v1/vms/{vm_id}/registration-token` request. Every member is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistrationTokenRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_group: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub labels: Vec<String>,
}

/// `POST /api/v1/vms/{vm_id}/registration-token` answer.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationTokenResponse {
    pub registration_token: String,
    pub expires_at: DateTime<Utc>,
    pub runner_url: String,
    pub runner_group: String,
    pub labels: Vec<String>,
}

impl std::fmt::Debug for RegistrationTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrationTokenResponse")
            .field("registration_token", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .field("runner_url", &self.runner_url)
            .field("runner_group", &self.runner_group)
            .field("labels", &self.labels)
            .finish()
    }
}

/// One command as JSON: `id`, `type`, `parameters` (native JSON types), `created_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandJson {
    pub id: String,
    #[serde(rename = "type")]
    pub command_type: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub parameters: Map<String, Value>,
    pub created_at: DateTime<Utc>,
}

/// `GET /api/v1/vms/{vm_id}/commands` answer. `commands` is always written as an array and
/// read as empty when `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandsResponse {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub commands: Vec<CommandJson>,
    pub vm_id: String,
}

/// `POST /api/v1/vms/{vm_id}/commands/{command_id}/ack` request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandAckBody {
    pub success: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub result: Map<String, Value>,
}

/// `POST .../ack` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandAckResponse {
    pub status: String,
    pub vm_id: String,
    pub command_id: String,
    /// The command's state after the ack (`acknowledged` or `failed`).
    pub state: String,
}

/// Every error answer: a stable machine-readable `code` and a human `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: String,
}

/// `GET /health` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthBody {
    pub status: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_mode: Option<String>,
}

fn null_as_empty<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bodies of the seed documents parse.
    #[test]
    fn seed_vm_started_request_and_ack_parse() -> Result<(), serde_json::Error> {
        let req: EventBody = serde_json::from_str(
            r#"{"type":"vm_started","vm_id":"vm-123","pool_id":"pool-001","org_id":"org-001"}"#,
        )?;
        assert_eq!(req.event_type, "vm_started");
        assert_eq!(req.pool_id.as_deref(), Some("pool-001"));
        let ack: VmStartedAck = serde_json::from_str(
            r#"{"status":"acknowledged","acknowledged":true,"vm_id":"vm-123","pool_id":"pool-001",
               "org_id":"org-001","message":"VM started event acknowledged - MIGlet is ready for registration config"}"#,
        )?;
        assert!(ack.acknowledged);
        let any: AnyAck = serde_json::from_str(
            r#"{"status":"received","vm_id":"vm-123","message":"Event received and stored"}"#,
        )?;
        assert!(any.is_ack());
        let nack: AnyAck = serde_json::from_str(r#"{"status":"nope"}"#)?;
        assert!(!nack.is_ack());
        Ok(())
    }

    #[test]
    fn seed_commands_response_parses_and_null_is_empty() -> Result<(), serde_json::Error> {
        let body = r#"{
          "commands": [
            {
              "id": "register-vm-123-1234567890",
              "type": "register_runner",
              "parameters": {
                "registration_token": "AHTXXXXXXXXXXXXXXXXXXXX",
                "runner_url": "https://github.com/leaffyAdmin/django_repo",
                "runner_group": "default",
                "labels": ["self-hosted", "linux", "x64"],
                "expires_at": "2024-01-15T11:30:00Z"
              },
              "created_at": "2024-01-15T10:30:00Z"
            }
          ],
          "vm_id": "vm-123"
        }"#;
        let parsed: CommandsResponse = serde_json::from_str(body)?;
        assert_eq!(parsed.commands.len(), 1);
        assert_eq!(parsed.commands[0].command_type, "register_runner");
        let empty: CommandsResponse = serde_json::from_str(r#"{"commands":null,"vm_id":"v"}"#)?;
        assert!(empty.commands.is_empty());
        let written = serde_json::to_value(&empty)?;
        assert_eq!(written["commands"], serde_json::json!([]));
        Ok(())
    }

    #[test]
    fn seed_registration_token_response_parses() -> Result<(), serde_json::Error> {
        let r: RegistrationTokenResponse = serde_json::from_str(
            r#"{"registration_token":"AHTXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","expires_at":"2024-01-15T11:30:00Z",
               "runner_url":"https://github.com/testorg","runner_group":"default","labels":["self-hosted","linux","x64"]}"#,
        )?;
        assert_eq!(r.runner_group, "default");
        assert!(!format!("{r:?}").contains("AHT"));
        Ok(())
    }

    #[test]
    fn heartbeat_missing_optional_parts_parses() -> Result<(), serde_json::Error> {
        let hb: HeartbeatBody = serde_json::from_str(r#"{"type":"job_heartbeat","vm_id":"v"}"#)?;
        assert!(hb.vm_health.is_none() && hb.current_job.is_none());
        // Go's RFC3339Nano with a local offset, and unknown members.
        let hb: HeartbeatBody = serde_json::from_str(
            r#"{"type":"job_heartbeat","timestamp":"2025-12-01T10:00:00.123456789+05:30","vm_id":"v",
               "pool_id":"p","miglet_state":"idle","vm_health":{"cpu_load":1.5,"memory_used":100},
               "runner_state":"idle","future_field":{"x":1}}"#,
        )?;
        assert_eq!(hb.vm_health.and_then(|h| h.memory_used), Some(100));
        Ok(())
    }

    #[test]
    fn unknown_event_fields_are_kept() -> Result<(), serde_json::Error> {
        let ev: EventBody = serde_json::from_str(
            r#"{"type":"job_started","vm_id":"v","pool_id":"p","job_id":"1","run_id":"2","zzz":true}"#,
        )?;
        assert_eq!(ev.fields.get("zzz"), Some(&Value::Bool(true)));
        let back = serde_json::to_value(&ev)?;
        assert_eq!(back["job_id"], "1");
        Ok(())
    }
}

/// How a VM proves its identity at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollMethod {
    /// A GCE instance identity token (`format=full`, audience = the controller's URL).
    Gce,
    /// The pool's bootstrap secret.
    Bootstrap,
    /// A one-time enrollment token the controller minted for this VM (by an operator, or by
    /// the provider that created the VM).
    Token,
}

/// `POST /api/v1/enroll` (an addition to the base contract): a VM proves who it is once per
/// boot and receives a credential bound to its `vm_id` and pool. `Debug` redacts the proofs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub vm_id: String,
    pub pool_id: String,
    pub method: EnrollMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("vm_id", &self.vm_id)
            .field("pool_id", &self.pool_id)
            .field("method", &self.method)
            .field("boot_id", &self.boot_id)
            .finish_non_exhaustive()
    }
}

/// The answer to an enrollment or a credential refresh. Send `credential` as
/// `Authorization: Bearer <credential>` on every HTTP request and as the `authorization`
/// metadata of the gRPC stream; refresh after `refresh_after`
/// (`POST /api/v1/vms/{vm_id}/credential`). `Debug` redacts the credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub credential: String,
    pub vm_id: String,
    pub pool_id: String,
    pub expires_at: DateTime<Utc>,
    pub refresh_after: DateTime<Utc>,
}

impl std::fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("vm_id", &self.vm_id)
            .field("pool_id", &self.pool_id)
            .field("expires_at", &self.expires_at)
            .field("refresh_after", &self.refresh_after)
            .finish_non_exhaustive()
    }
}
