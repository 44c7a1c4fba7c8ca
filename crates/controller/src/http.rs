//! The HTTP/JSON front end (axum): the base contract's endpoints plus the command ack.
//!
//! Handlers only parse and validate, call [`Controller`], and shape the answer. Every error
//! is JSON `{"error": ..., "code": ...}` with a 4xx/5xx status: malformed JSON 400, body over
//! 1 MiB 413, wrong method 405, unknown path 404.

use crate::app::{Controller, Transport};
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use miglet_proto::event::{EventKind, EventReport, HeartbeatReport};
use miglet_proto::json::{
    CommandAckBody, CommandAckResponse, CommandsResponse, ErrorBody, EventBody, HealthBody,
    HeartbeatBody, Received, RegistrationTokenRequest, VmStartedAck,
};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;
/// A request that takes longer than this is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(e) => {
                tracing::error!(error = %crate::error::chain(e), "Store failure while serving a request");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        };
        (status, axum::Json(body)).into_response()
    }
}

type AppState = Arc<Controller>;

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/vms/{vm_id}/events", post(post_event))
        .route("/api/v1/vms/{vm_id}/heartbeat", post(post_heartbeat))
        .route(
            "/api/v1/vms/{vm_id}/registration-token",
            post(post_registration_token),
        )
        .route("/api/v1/vms/{vm_id}/commands", get(get_commands))
        .route(
            "/api/v1/vms/{vm_id}/commands/{command_id}/ack",
            post(post_ack),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(app)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {}", uri.path()))
}

async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: "method not allowed for this endpoint".into(),
        code: "method_not_allowed".into(),
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

async fn health(State(app): State<AppState>) -> axum::Json<HealthBody> {
    let _ = &app;
    axum::Json(HealthBody {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        auth_mode: None,
    })
}

fn path_one(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

fn body_bytes(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body is larger than {MAX_BODY} bytes"))
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))
}

fn body_text(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn post_event(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = path_one(vm_id)?;
    let bytes = body_bytes(body)?;
    let parsed: EventBody = parse_json(&bytes)?;
    let report = EventReport::from_json(parsed);
    let is_vm_started = matches!(report.kind(), EventKind::VmStarted { .. });
    let accepted = app
        .ingest_event(&vm_id, report, body_text(&bytes), Transport::Http)
        .await?;
    if is_vm_started {
        return Ok(axum::Json(VmStartedAck {
            status: "acknowledged".into(),
            acknowledged: true,
            vm_id,
            pool_id: accepted.vm.pool_id,
            org_id: accepted.vm.org_id,
            message: "VM started event acknowledged - MIGlet is ready for registration config"
                .into(),
            timestamp: Some(chrono::Utc::now()),
        })
        .into_response());
    }
    Ok(axum::Json(Received {
        status: "received".into(),
        acknowledged: Some(false),
        vm_id,
        message: if accepted.duplicate {
            "Event already stored".into()
        } else {
            "Event received and stored".into()
        },
        duplicate: Some(accepted.duplicate),
    })
    .into_response())
}

async fn post_heartbeat(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Received>, ApiError> {
    let vm_id = path_one(vm_id)?;
    let bytes = body_bytes(body)?;
    let parsed: HeartbeatBody = parse_json(&bytes)?;
    crate::app::check_body_vm(&vm_id, parsed.vm_id.as_deref())?;
    app.ingest_heartbeat(&vm_id, HeartbeatReport::from_json(parsed), Transport::Http)
        .await?;
    Ok(axum::Json(Received {
        status: "received".into(),
        acknowledged: None,
        vm_id,
        message: "Heartbeat received".into(),
        duplicate: None,
    }))
}

async fn post_registration_token(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = path_one(vm_id)?;
    let bytes = body_bytes(body)?;
    // The base contract's agent may send an empty body.
    let request: RegistrationTokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        RegistrationTokenRequest::default()
    } else {
        parse_json(&bytes)?
    };
    let response = app
        .registration_config(&vm_id, request, body_text(&bytes))
        .await?;
    Ok(axum::Json(response).into_response())
}

async fn get_commands(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<CommandsResponse>, ApiError> {
    let vm_id = path_one(vm_id)?;
    let commands = app.poll_commands(&vm_id).await?;
    Ok(axum::Json(CommandsResponse { commands, vm_id }))
}

async fn post_ack(
    State(app): State<AppState>,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<CommandAckResponse>, ApiError> {
    let Path((vm_id, command_id)) = ids.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let bytes = body_bytes(body)?;
    let ack: CommandAckBody = parse_json(&bytes)?;
    let state = app
        .ack_command(
            &vm_id,
            &command_id,
            ack.success,
            &ack.message,
            ack.result,
            "http",
        )
        .await?;
    Ok(axum::Json(CommandAckResponse {
        status: "received".into(),
        vm_id,
        command_id,
        state: state.as_str().into(),
    }))
}
