//! The operator API under `/api/v1/admin/`: read the fleet (read-only role) and queue
//! commands (admin role). Authorization is done by the HTTP gate before these handlers run;
//! every admin action, allowed or refused, is written to the audit log with who, what, on
//! what, from where and when.

use crate::app::Controller;
use crate::auth::{Denied, Principal};
use crate::error::ApiError;
use crate::http::{body_bytes, parse_json, path_one};
use crate::store::{AuditRow, Mutation};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use miglet_proto::command::Command;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

type AppState = Arc<Controller>;

/// Most rows one page of the audit log returns.
pub const MAX_PAGE: u32 = 500;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/whoami", get(whoami))
        .route("/api/v1/admin/vms", get(list_vms))
        .route("/api/v1/admin/vms/{vm_id}", get(get_vm))
        .route("/api/v1/admin/vms/{vm_id}/commands", post(enqueue))
        .route("/api/v1/admin/commands/{command_id}", get(get_command))
        .route("/api/v1/admin/audit", get(audit))
}

fn actor(p: Option<&Extension<Principal>>) -> String {
    p.map_or_else(|| "unknown".to_owned(), |Extension(p)| p.actor())
}

async fn write_audit(app: &Controller, row: AuditRow) {
    if let Err(e) = app.store().write(vec![Mutation::Audit(row)]).await {
        tracing::error!(error = %crate::error::chain(&e), "Audit log write failed");
    }
}

/// Records a refused admin action.
pub async fn audit_denied(
    app: &Controller,
    who: &Principal,
    action: String,
    peer: Option<SocketAddr>,
    denied: &Denied,
) {
    write_audit(
        app,
        AuditRow {
            seq: 0,
            at: chrono::Utc::now().timestamp_millis(),
            actor: who.actor(),
            action,
            target: None,
            remote_addr: peer.map(|p| p.ip().to_string()),
            outcome: "denied".into(),
            detail: Some(denied.to_string()),
        },
    )
    .await;
}

async fn whoami(principal: Option<Extension<Principal>>) -> Json<Value> {
    let body = match principal.map(|Extension(p)| p) {
        Some(Principal::Operator(o)) => json!({
            "kind": "operator", "name": o.name, "token_id": o.token_id, "role": o.role,
        }),
        _ => json!({ "kind": "anonymous", "role": "admin", "note": "open mode" }),
    };
    Json(body)
}

async fn list_vms(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let vms = app.store().vms_list().await?;
    Ok(Json(json!({ "count": vms.len(), "vms": vms })))
}

async fn get_vm(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let vm_id = path_one(vm_id)?;
    miglet_proto::ids::validate_vm_id(&vm_id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let vm = app
        .store()
        .vm_get(&vm_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown VM {vm_id:?}")))?;
    let commands = app.store().commands_for_vm(&vm_id).await?;
    Ok(Json(json!({ "vm": vm, "commands": commands })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    #[serde(rename = "type")]
    command_type: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    ttl_secs: Option<u64>,
}

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
        let bytes = body_bytes(body)?;
        let body: EnqueueBody = parse_json(&bytes)?;
        let command = Command::from_json_parameters(&body.command_type, &body.parameters)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let ttl = match body.ttl_secs {
            Some(0) => return Err(ApiError::BadRequest("ttl_secs must be at least 1".into())),
            Some(s) => Some(Duration::from_secs(s.min(30 * 86_400))),
            None => None,
        };
        app.enqueue(&vm_id, command, &who, ttl).await
    }
    .await;
    let (outcome, detail) = match &result {
        Ok(r) => (
            "ok".to_owned(),
            format!("command_id={} type={}", r.id, r.command_type),
        ),
        Err(e) => (format!("error: {}", e.code()), e.to_string()),
    };
    write_audit(
        &app,
        AuditRow {
            seq: 0,
            at: chrono::Utc::now().timestamp_millis(),
            actor: who,
            action: "command.enqueue".into(),
            target: Some(format!("vm:{vm_id}")),
            remote_addr: Some(peer.ip().to_string()),
            outcome,
            detail: Some(detail),
        },
    )
    .await;
    let record = result?;
    Ok((StatusCode::CREATED, Json(json!({ "command": record }))))
}

async fn get_command(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = path_one(id)?;
    miglet_proto::ids::validate_id("command_id", &id)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let command = app
        .store()
        .command_get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown command {id:?}")))?;
    let transitions = app.store().command_transitions(&id).await?;
    Ok(Json(
        json!({ "command": command, "transitions": transitions }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

async fn audit(
    State(app): State<AppState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let rows = app.store().audit_list(q.before, limit).await?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.seq))
        .flatten();
    Ok(Json(json!({ "entries": rows, "next_before": next })))
}
