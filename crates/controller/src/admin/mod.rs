//! The operator API under `/api/v1/admin/`: read the fleet (read-only role), queue commands
//! and follow them (admin role). Authorization is done by the HTTP gate before these handlers
//! run; every admin action, allowed or refused, is written to the audit log with who, what,
//! on what, from where and when.
//!
//! Every route is declared with `#[utoipa::path]` and mounted through an `OpenApiRouter`, so
//! the OpenAPI document ([`openapi`], checked in as `docs/openapi.json`) cannot miss one.
//! Answers are views made for the API, not the store's records.

mod contract;
mod identity;

use crate::app::Controller;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::http::{body_bytes, path_one};
use crate::store::{
    AuditRow, CommandFilter, CommandRecord, CommandState, EventFilter, EventRow, Health,
    HeartbeatRow, Millis, VmFilter, VmRecord,
};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use miglet_proto::command::Command;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type AppState = Arc<Controller>;

/// Most rows one page returns.
pub const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 100;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "MIG controller operator API",
        description = "Read the fleet and steer it. Authenticate with an operator token: `Authorization: Bearer migop_...`. GET needs the read-only role, everything else admin."
    ),
    modifiers(&BearerAuth),
    security(("operator_token" = [])),
    tags(
        (name = "vms", description = "VMs, their timelines and heartbeats"),
        (name = "events", description = "Event search"),
        (name = "commands", description = "Queue commands and follow them"),
        (name = "pools", description = "Pool summaries"),
        (name = "operators", description = "Who is calling; the audit log"),
        (name = "identity", description = "Which pool a VM belongs to, and how a VM proves who it is"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "operator_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn router_and_doc() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(whoami))
        .routes(routes!(list_vms))
        .routes(routes!(get_vm))
        .routes(routes!(vm_timeline))
        .routes(routes!(vm_heartbeats))
        .routes(routes!(enqueue))
        .routes(routes!(enqueue_pool))
        .routes(routes!(search_events))
        .routes(routes!(event_stream))
        .routes(routes!(list_commands))
        .routes(routes!(get_command))
        .routes(routes!(list_pools))
        .routes(routes!(identity::move_pool))
        .routes(routes!(identity::create_enrollment_token))
        .routes(routes!(audit))
        .routes(routes!(openapi_json))
        .split_for_parts();
    utoipa::Modify::modify(&contract::Contract, &mut doc);
    (router, doc)
}

pub fn routes() -> axum::Router<AppState> {
    router_and_doc().0
}

/// The OpenAPI document of the operator API, generated from the code.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router_and_doc().1
}

// ---- views -------------------------------------------------------------------------------

fn time(ms: Millis) -> String {
    miglet_proto::rfc3339(crate::store::from_millis(ms))
}

fn opt_time(ms: Option<Millis>) -> Option<String> {
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

// ---- helpers -----------------------------------------------------------------------------

fn actor(p: Option<&Extension<Principal>>) -> String {
    p.map_or_else(|| "unknown".to_owned(), |Extension(p)| p.actor())
}

/// Records an admin action and how it ended (`Ok(detail)` or the error).
async fn audit_action(
    app: &Controller,
    actor: String,
    action: &str,
    target: String,
    peer: SocketAddr,
    result: Result<String, &ApiError>,
) {
    app.audit()
        .action(
            actor,
            action,
            target,
            Some(peer),
            result.map_err(|e| (e.code(), e.to_string())),
        )
        .await;
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// The key of the last row when the page is full (there may be more), else `None`.
fn next_page<T, K>(rows: &[T], limit: u32, key: impl Fn(&T) -> K) -> Option<K> {
    (rows.len() == limit as usize)
        .then(|| rows.last().map(key))
        .flatten()
}

fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let l = limit.unwrap_or(DEFAULT_PAGE);
    if l == 0 || l > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(l)
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn vm_id_of(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let vm_id = path_one(p)?;
    miglet_proto::ids::validate_vm_id(&vm_id).map_err(bad)?;
    Ok(vm_id)
}

/// RFC 3339 time or Unix milliseconds (an optional sign and 1 to 18 digits, as the
/// OpenAPI document's pattern says).
fn parse_time(name: &str, v: &str) -> Result<Millis, ApiError> {
    let digits = v.strip_prefix(['+', '-']).unwrap_or(v);
    if (1..=18).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(ms) = v.parse::<i64>()
    {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "{name} must be an RFC 3339 time or Unix milliseconds, not {v:?}"
            ))
        })
}

/// A VM page's cursor (the last VM id of the previous page); anything else is refused
/// rather than silently ignored.
fn cursor(v: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(c) = given(v) else {
        return Ok(None);
    };
    miglet_proto::ids::validate_vm_id(&c).map_err(|_| {
        ApiError::BadRequest(format!(
            "cursor {c:?} is not one this API returned (pass next_cursor of the previous page)"
        ))
    })?;
    Ok(Some(c))
}

/// A filter that must match exactly (ids, enums, times): absent or empty means "any"; it is
/// not trimmed, so what the document's pattern refuses, the server refuses too.
fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// A VM id filter (`vm=`): empty means any VM.
fn vm_filter(v: Option<String>) -> Result<Option<String>, ApiError> {
    let vm = given(v);
    if let Some(v) = &vm {
        miglet_proto::ids::validate_vm_id(v).map_err(bad)?;
    }
    Ok(vm)
}

/// A free-text filter: trimmed; empty means any.
fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

// ---- handlers ----------------------------------------------------------------------------

/// Who is calling.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `operator`, or `anonymous` in open mode.
    pub kind: String,
    pub name: Option<String>,
    pub token_id: Option<String>,
    pub role: String,
}

/// Who the token belongs to and its role.
#[utoipa::path(get, path = "/api/v1/admin/whoami", tag = "operators",
    responses((status = 200, body = WhoAmI), (status = 401, description = "no or bad token")))]
async fn whoami(principal: Option<Extension<Principal>>) -> Json<WhoAmI> {
    Json(match principal.map(|Extension(p)| p) {
        Some(Principal::Operator(o)) => WhoAmI {
            kind: "operator".into(),
            name: Some(o.name),
            token_id: Some(o.token_id),
            role: o.role.as_str().into(),
        },
        _ => WhoAmI {
            kind: "anonymous".into(),
            name: None,
            token_id: None,
            role: "admin".into(),
        },
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct VmQuery {
    /// Only VMs of this pool.
    pool: Option<String>,
    /// Only VMs in this state.
    state: Option<String>,
    /// `healthy`, `unhealthy` or `lost`.
    health: Option<String>,
    /// Only VMs of pools whose runners carry this label.
    label: Option<String>,
    /// Text in the VM id or its current job (run id, repository, job name).
    q: Option<String>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmPage {
    pub vms: Vec<VmView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// VMs, filtered, in `vm_id` order.
#[utoipa::path(get, path = "/api/v1/admin/vms", tag = "vms", params(VmQuery),
    responses((status = 200, body = VmPage), (status = 400, description = "bad filter")))]
async fn list_vms(
    State(app): State<AppState>,
    q: Result<Query<VmQuery>, QueryRejection>,
) -> Result<Json<VmPage>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let health = given(q.health)
        .map(|h| {
            h.parse::<Health>()
                .map_err(|_| bad(format!("unknown health {h:?} (healthy, unhealthy, lost)")))
        })
        .transpose()?;
    let mut pools = non_empty(q.pool).map(|p| vec![p]);
    if let Some(label) = non_empty(q.label) {
        let with_label = app.settings().pools.with_label(&label);
        let seen: Vec<String> = app
            .store()
            .pool_counts()
            .await?
            .into_iter()
            .map(|c| c.pool_id)
            .filter(|p| with_label(p))
            .collect();
        pools = Some(match pools {
            Some(p) => p.into_iter().filter(|x| seen.contains(x)).collect(),
            None => seen,
        });
    }
    let filter = VmFilter {
        pools,
        state: non_empty(q.state),
        health,
        text: non_empty(q.q),
        after: cursor(q.cursor)?,
        limit,
    };
    let vms = app.store().vms_page(&filter).await?;
    let next_cursor = next_page(&vms, limit, |v| v.vm_id.clone());
    Ok(Json(VmPage {
        vms: vms.iter().map(VmView::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmDetail {
    pub vm: VmView,
    /// Its most recent commands, newest first.
    pub commands: Vec<CommandView>,
}

/// One VM with its recent commands.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmDetail), (status = 404, description = "unknown VM")))]
async fn get_vm(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
) -> Result<Json<VmDetail>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let vm = app
        .store()
        .vm_get(&vm_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown VM {vm_id:?}")))?;
    let commands = app
        .store()
        .commands_page(&CommandFilter {
            vm_id: Some(vm_id),
            limit: 50,
            ..CommandFilter::default()
        })
        .await?;
    Ok(Json(VmDetail {
        vm: VmView::from(&vm),
        commands: commands.iter().map(CommandView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TimelineQuery {
    /// At most this many entries, the most recent (1 to 500, default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    pub vm_id: String,
    /// Oldest first.
    pub entries: Vec<TimelineEntry>,
    /// Whether older entries were left out.
    pub truncated: bool,
}

/// Everything that happened to a VM, in order: its events, what the controller observed, and
/// every command state change.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}/timeline", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id"), TimelineQuery),
    responses((status = 200, body = Timeline), (status = 404, description = "unknown VM")))]
async fn vm_timeline(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    q: Result<Query<TimelineQuery>, QueryRejection>,
) -> Result<Json<Timeline>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let limit = page_limit(query(q)?.limit)? as usize;
    let store = app.store();
    if store.vm_get(&vm_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("unknown VM {vm_id:?}")));
    }
    let mut all: Vec<(Millis, u8, i64, TimelineEntry)> = Vec::new();
    for e in store.events_for_vm(&vm_id).await? {
        let view = EventView::from(&e);
        all.push((
            e.received_at,
            1,
            e.seq,
            TimelineEntry {
                at: time(e.received_at),
                source: "event".into(),
                what: e.event_type.clone(),
                detail: e.event_id.clone().map(|id| format!("event_id={id}")),
                data: view.data,
            },
        ));
    }
    for (i, l) in store.vm_log_for_vm(&vm_id).await?.into_iter().enumerate() {
        all.push((
            l.at,
            0,
            i as i64,
            TimelineEntry {
                at: time(l.at),
                source: "controller".into(),
                what: l.kind,
                detail: l.detail,
                data: Value::Object(Map::new()),
            },
        ));
    }
    for c in store.commands_for_vm(&vm_id).await? {
        for (i, t) in store
            .command_transitions(&c.id)
            .await?
            .into_iter()
            .enumerate()
        {
            all.push((
                t.at,
                2,
                c.seq * 1000 + i as i64,
                TimelineEntry {
                    at: time(t.at),
                    source: "command".into(),
                    what: format!("{} {}", c.command_type, t.to_state),
                    detail: t.detail,
                    data: serde_json::json!({ "command_id": c.id }),
                },
            ));
        }
    }
    all.sort_by_key(|(at, order, seq, _)| (*at, *order, *seq));
    let truncated = all.len() > limit;
    let skip = all.len().saturating_sub(limit);
    Ok(Json(Timeline {
        vm_id,
        entries: all.into_iter().skip(skip).map(|(_, _, _, e)| e).collect(),
        truncated,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct HeartbeatQuery {
    /// Only heartbeats received at or after this time (RFC 3339 or Unix ms).
    since: Option<String>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatPage {
    /// Newest first.
    pub heartbeats: Vec<HeartbeatView>,
    pub next_before: Option<i64>,
}

/// A VM's heartbeat history, newest first.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}/heartbeats", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id"), HeartbeatQuery),
    responses((status = 200, body = HeartbeatPage), (status = 400, description = "bad parameter")))]
async fn vm_heartbeats(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    q: Result<Query<HeartbeatQuery>, QueryRejection>,
) -> Result<Json<HeartbeatPage>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let since = given(q.since)
        .map(|s| parse_time("since", &s))
        .transpose()?;
    let rows = app
        .store()
        .heartbeats_page(&vm_id, since, q.before, limit)
        .await?;
    let next_before = next_page(&rows, limit, |r| r.seq);
    Ok(Json(HeartbeatPage {
        heartbeats: rows.iter().map(HeartbeatView::from).collect(),
        next_before,
    }))
}

/// A command to queue.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    /// `drain`, `shutdown`, `set_log_level` or `update_config`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// As PROTOCOL.md defines them for the type.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Seconds the command stays deliverable (default: the controller's command TTL).
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Enqueued {
    pub command: CommandView,
}

fn parse_enqueue(
    body: Result<Bytes, BytesRejection>,
) -> Result<(Command, Option<Duration>), ApiError> {
    let bytes = body_bytes(body)?;
    let body: EnqueueBody = contract::parse_body(&bytes)?;
    let command = contract::parse_command(&body.command_type, &body.parameters).map_err(bad)?;
    let ttl = match body.ttl_secs {
        Some(s) if !(1..=contract::MAX_COMMAND_TTL_SECS).contains(&s) => {
            return Err(bad(format!(
                "ttl_secs must be 1 to {}",
                contract::MAX_COMMAND_TTL_SECS
            )));
        }
        Some(s) => Some(Duration::from_secs(s)),
        None => None,
    };
    Ok((command, ttl))
}

/// Queue a command for one VM (admin). It is delivered until the VM acknowledges it; follow
/// it at `/api/v1/admin/commands/{id}`.
#[utoipa::path(post, path = "/api/v1/admin/vms/{vm_id}/commands", tag = "commands",
    params(("vm_id" = String, Path, description = "VM id")),
    request_body = EnqueueBody,
    responses((status = 201, body = Enqueued), (status = 400, description = "bad command"),
        (status = 403, description = "read-only token"), (status = 404, description = "unknown VM")))]
async fn enqueue(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = actor(principal.as_ref());
    let vm_id = path_one(vm_id)?;
    let result = async {
        let (command, ttl) = parse_enqueue(body)?;
        app.enqueue(&vm_id, command, &who, ttl).await
    }
    .await;
    let summary = result
        .as_ref()
        .map(|r| format!("command_id={} type={}", r.id, r.command_type));
    audit_action(
        &app,
        who,
        "command.enqueue",
        format!("vm:{vm_id}"),
        peer,
        summary,
    )
    .await;
    let record = result?;
    Ok((
        StatusCode::CREATED,
        Json(Enqueued {
            command: CommandView::from(&record),
        }),
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolEnqueued {
    pub commands: Vec<CommandView>,
    /// VMs of the pool that got nothing (terminated or lost), with the reason.
    #[schema(value_type = Object)]
    pub skipped: BTreeMap<String, String>,
}

/// Queue a command for every live VM of a pool (admin); terminated and lost VMs are skipped.
#[utoipa::path(post, path = "/api/v1/admin/pools/{pool_id}/commands", tag = "commands",
    params(("pool_id" = String, Path, description = "pool id")),
    request_body = EnqueueBody,
    responses((status = 201, body = PoolEnqueued), (status = 400, description = "bad command"),
        (status = 403, description = "read-only token"), (status = 404, description = "no VM in the pool")))]
async fn enqueue_pool(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    pool_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = actor(principal.as_ref());
    let pool_id = path_one(pool_id)?;
    let result = async {
        miglet_proto::ids::validate_id("pool_id", &pool_id).map_err(bad)?;
        let (command, ttl) = parse_enqueue(body)?;
        let mut vms = Vec::new();
        let mut after = None;
        loop {
            let page = app
                .store()
                .vms_page(&VmFilter {
                    pools: Some(vec![pool_id.clone()]),
                    after: after.clone(),
                    limit: MAX_PAGE,
                    ..VmFilter::default()
                })
                .await?;
            let done = page.len() < MAX_PAGE as usize;
            after = page.last().map(|v| v.vm_id.clone());
            vms.extend(page);
            if done {
                break;
            }
        }
        if vms.is_empty() {
            return Err(ApiError::NotFound(format!("no VM in pool {pool_id:?}")));
        }
        let mut out = PoolEnqueued {
            commands: Vec::new(),
            skipped: BTreeMap::new(),
        };
        for vm in vms {
            if vm.state == "terminated" || vm.health == Health::Lost {
                out.skipped
                    .insert(vm.vm_id, format!("{} / {}", vm.state, vm.health.as_str()));
                continue;
            }
            let record = app.enqueue(&vm.vm_id, command.clone(), &who, ttl).await?;
            out.commands.push(CommandView::from(&record));
        }
        Ok(out)
    }
    .await;
    let summary = result.as_ref().map(|r| {
        format!(
            "queued={} skipped={} ids={}",
            r.commands.len(),
            r.skipped.len(),
            r.commands
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    audit_action(
        &app,
        who,
        "command.enqueue_pool",
        format!("pool:{pool_id}"),
        peer,
        summary,
    )
    .await;
    Ok((StatusCode::CREATED, Json(result?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// Event types, comma-separated (e.g. `job_started,job_completed`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Only this VM's events.
    vm: Option<String>,
    /// Only events of this pool's VMs.
    pool: Option<String>,
    /// Received at or after (RFC 3339 or Unix ms).
    since: Option<String>,
    /// Received before (RFC 3339 or Unix ms).
    until: Option<String>,
    /// Text inside a value of the event's fields or metadata (repository, job, run id,
    /// reason, ...); keys and JSON punctuation never match.
    q: Option<String>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// Newest first.
    pub events: Vec<EventView>,
    pub next_before: Option<i64>,
}

fn event_filter(q: EventQuery) -> Result<EventFilter, ApiError> {
    let types: Vec<String> = q
        .event_type
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    for t in &types {
        miglet_proto::ids::validate_type_name("type", t).map_err(bad)?;
    }
    let vm_id = vm_filter(q.vm)?;
    let since = given(q.since)
        .map(|s| parse_time("since", &s))
        .transpose()?;
    let until = given(q.until)
        .map(|s| parse_time("until", &s))
        .transpose()?;
    if let (Some(a), Some(b)) = (since, until)
        && a >= b
    {
        return Err(bad("since must be before until"));
    }
    Ok(EventFilter {
        types,
        vm_id,
        pool_id: non_empty(q.pool),
        since,
        until,
        text: non_empty(q.q),
        before_seq: q.before,
        after_seq: None,
        limit: page_limit(q.limit)?,
    })
}

/// Search events by type, VM, pool, time range and text inside their data.
#[utoipa::path(get, path = "/api/v1/admin/events", tag = "events", params(EventQuery),
    responses((status = 200, body = EventPage), (status = 400, description = "bad filter")))]
async fn search_events(
    State(app): State<AppState>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let filter = event_filter(query(q)?)?;
    let rows = app.store().events_page(&filter).await?;
    let next_before = next_page(&rows, filter.limit, |r| r.seq);
    Ok(Json(EventPage {
        events: rows.iter().map(EventView::from).collect(),
        next_before,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventStreamQuery {
    /// Event types, comma-separated.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Only this VM's events.
    vm: Option<String>,
    /// Only events of this pool's VMs.
    pool: Option<String>,
    /// Text inside a value of the event's fields or metadata (repository, job, run id,
    /// reason, ...); keys and JSON punctuation never match.
    q: Option<String>,
    /// Start after this event `seq` (default: only new events). The `Last-Event-ID` header
    /// of a reconnecting client wins.
    after: Option<i64>,
}

/// Live events as Server-Sent Events: `id` is the event's `seq`, `event` its type, `data` the
/// event as JSON. Reconnecting with `Last-Event-ID` resumes without a gap; a comment every
/// 15 s keeps idle connections open.
#[utoipa::path(get, path = "/api/v1/admin/events/stream", tag = "events", params(EventStreamQuery),
    responses((status = 200, description = "an endless `text/event-stream` of EventView", content_type = "text/event-stream"),
        (status = 400, description = "bad filter")))]
async fn event_stream(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    q: Result<Query<EventStreamQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let q = query(q)?;
    let mut filter = event_filter(EventQuery {
        event_type: q.event_type,
        vm: q.vm,
        pool: q.pool,
        since: None,
        until: None,
        q: q.q,
        before: None,
        limit: Some(MAX_PAGE),
    })?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let mut last = match resume.or(q.after) {
        Some(seq) => seq,
        None => app
            .store()
            .events_page(&EventFilter {
                limit: 1,
                ..EventFilter::default()
            })
            .await?
            .first()
            .map_or(0, |e| e.seq),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    let mut wake = app.events_stored();
    let stop = app.shutdown_token().clone();
    tokio::spawn(async move {
        loop {
            filter.after_seq = Some(last);
            let rows = match app.store().events_page(&filter).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %crate::error::chain(&e), "Event stream read failed; retrying");
                    Vec::new()
                }
            };
            let full = rows.len() == MAX_PAGE as usize;
            for r in &rows {
                last = r.seq;
                let ev = SseEvent::default()
                    .id(r.seq.to_string())
                    .event(r.event_type.clone())
                    .json_data(EventView::from(r))
                    .unwrap_or_default();
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
                () = tx.closed() => return,
                // A store error above is retried at this pace at the latest.
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CommandQuery {
    /// Only this VM's commands.
    vm: Option<String>,
    /// `pending`, `delivered`, `acknowledged`, `failed` or `expired`.
    state: Option<String>,
    /// Command type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    command_type: Option<String>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandPage {
    /// Newest first.
    pub commands: Vec<CommandView>,
    pub next_before: Option<i64>,
}

/// Commands, newest first.
#[utoipa::path(get, path = "/api/v1/admin/commands", tag = "commands", params(CommandQuery),
    responses((status = 200, body = CommandPage), (status = 400, description = "bad filter")))]
async fn list_commands(
    State(app): State<AppState>,
    q: Result<Query<CommandQuery>, QueryRejection>,
) -> Result<Json<CommandPage>, ApiError> {
    let q = query(q)?;
    let state = given(q.state)
        .map(|s| {
            s.parse::<CommandState>()
                .map_err(|_| bad(format!("unknown command state {s:?}")))
        })
        .transpose()?;
    let vm_id = vm_filter(q.vm)?;
    let filter = CommandFilter {
        vm_id,
        state,
        command_type: non_empty(q.command_type),
        before_seq: q.before,
        limit: page_limit(q.limit)?,
    };
    let rows = app.store().commands_page(&filter).await?;
    let next_before = next_page(&rows, filter.limit, |r| r.seq);
    Ok(Json(CommandPage {
        commands: rows.iter().map(CommandView::from).collect(),
        next_before,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransitionView {
    pub at: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandDetail {
    pub command: CommandView,
    /// Every state change, oldest first.
    pub transitions: Vec<TransitionView>,
}

/// One command and every state change it went through.
#[utoipa::path(get, path = "/api/v1/admin/commands/{command_id}", tag = "commands",
    params(("command_id" = String, Path, description = "command id")),
    responses((status = 200, body = CommandDetail), (status = 404, description = "unknown command")))]
async fn get_command(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandDetail>, ApiError> {
    let id = path_one(id)?;
    miglet_proto::ids::validate_id("command_id", &id).map_err(bad)?;
    let command = app
        .store()
        .command_get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown command {id:?}")))?;
    let transitions = app.store().command_transitions(&id).await?;
    Ok(Json(CommandDetail {
        command: CommandView::from(&command),
        transitions: transitions
            .into_iter()
            .map(|t| TransitionView {
                at: time(t.at),
                from_state: t.from_state,
                to_state: t.to_state,
                detail: t.detail,
            })
            .collect(),
    }))
}

/// A pool at a glance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolSummary {
    pub pool_id: String,
    pub total: i64,
    /// Streams open now.
    pub connected: i64,
    #[schema(value_type = Object)]
    pub by_state: BTreeMap<String, i64>,
    #[schema(value_type = Object)]
    pub by_health: BTreeMap<String, i64>,
    /// The runner labels the pool registers with (from the controller's config).
    pub labels: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

/// Every pool with VMs, with counts by state and health.
#[utoipa::path(get, path = "/api/v1/admin/pools", tag = "pools",
    responses((status = 200, body = PoolList)))]
async fn list_pools(State(app): State<AppState>) -> Result<Json<PoolList>, ApiError> {
    let mut pools: BTreeMap<String, PoolSummary> = BTreeMap::new();
    for c in app.store().pool_counts().await? {
        let p = pools
            .entry(c.pool_id.clone())
            .or_insert_with(|| PoolSummary {
                pool_id: c.pool_id.clone(),
                total: 0,
                connected: 0,
                by_state: BTreeMap::new(),
                by_health: BTreeMap::new(),
                labels: app
                    .settings()
                    .pools
                    .get(&c.pool_id)
                    .map(|r| r.labels.clone())
                    .unwrap_or_default(),
            });
        p.total += c.count;
        p.connected += c.connected;
        *p.by_state.entry(c.state).or_default() += c.count;
        *p.by_health.entry(c.health.as_str().to_owned()).or_default() += c.count;
    }
    Ok(Json(PoolList {
        pools: pools.into_values().collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
    /// `next_before` of the previous page.
    before: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    pub next_before: Option<i64>,
}

/// The audit log of admin actions, newest first.
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "operators", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, description = "bad parameter")))]
async fn audit(
    State(app): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let rows = app.store().audit_list(q.before, limit).await?;
    let next_before = next_page(&rows, limit, |r| r.seq);
    Ok(Json(AuditPage {
        entries: rows.iter().map(AuditView::from).collect(),
        next_before,
    }))
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/api/v1/admin/openapi.json", tag = "operators",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> Json<Value> {
    Json(serde_json::to_value(openapi()).unwrap_or(Value::Null))
}

/// The checked-in document's path, relative to the workspace root.
pub const OPENAPI_FILE: &str = "docs/openapi.json";

/// The document as it is checked in: pretty JSON with a final newline.
pub fn openapi_text() -> String {
    let mut text = openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `docs/openapi.json` is what the code generates. To refresh it:
    /// `cargo run -p mig-controller -- openapi > docs/openapi.json`.
    #[test]
    fn checked_in_openapi_document_matches_the_code() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(OPENAPI_FILE);
        let checked_in = std::fs::read_to_string(&path)?;
        assert!(
            checked_in == openapi_text(),
            "{} is out of date: run `cargo run -p mig-controller -- openapi > {OPENAPI_FILE}`",
            path.display()
        );
        Ok(())
    }

    #[test]
    fn every_route_is_documented() {
        let doc = openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for p in [
            "/api/v1/admin/vms",
            "/api/v1/admin/vms/{vm_id}",
            "/api/v1/admin/vms/{vm_id}/timeline",
            "/api/v1/admin/vms/{vm_id}/heartbeats",
            "/api/v1/admin/vms/{vm_id}/commands",
            "/api/v1/admin/pools/{pool_id}/commands",
            "/api/v1/admin/events",
            "/api/v1/admin/commands",
            "/api/v1/admin/commands/{command_id}",
            "/api/v1/admin/pools",
            "/api/v1/admin/audit",
            "/api/v1/admin/whoami",
        ] {
            assert!(
                paths.iter().any(|x| x.as_str() == p),
                "{p} missing from {paths:?}"
            );
        }
    }
}
