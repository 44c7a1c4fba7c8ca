//! The HTTP/JSON front end (axum): the base contract's endpoints plus the command ack.
//!
//! Handlers only parse and validate, call [`Controller`], and shape the answer. Every error
//! is JSON `{"error": ..., "code": ...}` with a 4xx/5xx status: malformed JSON 400, body over
//! 1 MiB 413, wrong method 405, unknown path 404, no or bad credential 401 (with
//! `WWW-Authenticate`), someone else's resource 403, over a rate limit 429 (with
//! `Retry-After`). The [`gate`] middleware runs before every handler.

use crate::app::{Controller, Transport};
use crate::auth::{self, Principal, Route};
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use miglet_proto::event::{EventKind, EventReport, HeartbeatReport};
use miglet_proto::json::{
    CommandAckBody, CommandAckResponse, CommandsResponse, EnrollRequest, EnrollResponse, ErrorBody,
    EventBody, HealthBody, HeartbeatBody, Received, RegistrationTokenRequest, VmStartedAck,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::warn;

pub use crate::extract::MAX_BODY;
use crate::extract::{body_bytes, parse_json, path_one};
/// A request that takes longer than this is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Store(e) => {
                crate::error::log_store_failure(e, "while serving a request");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let body = ErrorBody {
            error: self.to_string(),
            code: self.code().to_owned(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mig-controller\""),
                );
            }
            ApiError::TooManyRequests(wait) => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(crate::auth::limits::retry_after_secs(*wait)),
                );
            }
            _ => {}
        }
        response
    }
}

type AppState = Arc<Controller>;

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/enroll", post(post_enroll))
        .route("/api/v1/vms/{vm_id}/credential", post(post_refresh))
        .merge(crate::admin::routes())
        .merge(crate::dashboard::routes())
        .route("/api/v1/vms/{vm_id}/events", post(post_event))
        .route("/api/v1/vms/{vm_id}/heartbeat", post(post_heartbeat))
        .route(
            "/api/v1/vms/{vm_id}/registration-token",
            post(post_registration_token),
        )
        .route("/api/v1/vms/{vm_id}/commands", get(get_commands))
        .route("/api/v1/github/webhook", post(post_webhook))
        .route(
            "/api/v1/vms/{vm_id}/commands/{command_id}/ack",
            post(post_ack),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), gate))
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        // Failures are logged where their cause is known (once a second for store failures);
        // the trace layer's own line for every 5xx would repeat them per request.
        .layer(
            TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
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

/// Counts every request by route template (never the concrete path), method and status.
async fn count_requests(
    State(app): State<AppState>,
    matched: Option<axum::extract::MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let response = next.run(req).await;
    app.metrics()
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            route,
            method,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// Rate limits, then authentication and authorization, for every request (see
/// [`crate::auth`]). The verified [`Principal`] goes into the request's extensions.
async fn gate(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let gate = app.gate();
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if let Err(refused) = gate.check_peer(peer.map(|p| p.ip())) {
        return ApiError::from(refused).into_response();
    }
    let route = auth::route(req.method(), req.uri().path());
    let admin_write = matches!(route, Route::Admin { write: true });
    let action = if admin_write {
        format!("{} {}", req.method(), req.uri().path())
    } else {
        String::new()
    };
    let principal = if route == Route::Public {
        None
    } else {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        match gate.principal(app.reads(), token).await {
            Ok(p) => p,
            Err(denied) => {
                if admin_write {
                    let actor = auth::unverified_actor(token);
                    app.audit()
                        .unauthenticated(actor, action, peer, &denied.to_string())
                        .await;
                }
                return ApiError::from(denied).into_response();
            }
        }
    };
    if let Err(refused) = gate.admit(&route, principal.as_ref()) {
        if let auth::Refused::Denied(denied) = &refused
            && admin_write
        {
            match &principal {
                Some(p) => app.audit().denied(p, action, peer, denied).await,
                None => {
                    app.audit()
                        .unauthenticated("anonymous".into(), action, peer, &denied.to_string())
                        .await;
                }
            }
        }
        return ApiError::from(refused).into_response();
    }
    if let Some(p) = principal {
        req.extensions_mut().insert(p);
    }
    next.run(req).await
}

async fn health(State(app): State<AppState>) -> axum::Json<HealthBody> {
    axum::Json(HealthBody {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        auth_mode: Some(app.gate().mode.as_str().into()),
    })
}

async fn post_enroll(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<EnrollResponse>, ApiError> {
    let bytes = body_bytes(body)?;
    let request: EnrollRequest = parse_json(&bytes)?;
    match app.enroll(&request, Some(peer)).await {
        Ok(r) => Ok(axum::Json(r)),
        Err(e) => {
            warn!(vm_id = %request.vm_id, pool_id = %request.pool_id, method = ?request.method, peer = %peer.ip(), error = %e, "Enrollment refused");
            Err(e)
        }
    }
}

async fn post_refresh(
    State(app): State<AppState>,
    Caller(caller): Caller,
) -> Result<axum::Json<EnrollResponse>, ApiError> {
    Ok(axum::Json(app.refresh_credential(&caller).await?))
}

/// The verified caller [`gate`] put into the request. Every agent route has one (in open
/// mode, [`Principal::Open`]); a request without one is refused, never served as anyone.
struct Caller(Principal);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Caller, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "this endpoint needs a credential: Authorization: Bearer <token>".into(),
                )
            })
    }
}

fn body_text(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// GitHub's webhook: authenticated by its signature, not by a bearer token.
async fn post_webhook(
    State(app): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let answer = app
        .ingest_webhook(
            crate::app::WebhookHeaders {
                event: header("x-github-event"),
                delivery: header("x-github-delivery"),
                signature: header("x-hub-signature-256"),
            },
            &bytes,
        )
        .await?;
    Ok(axum::Json(answer).into_response())
}

async fn post_event(
    State(app): State<AppState>,
    Caller(caller): Caller,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = path_one(vm_id)?;
    let bytes = body_bytes(body)?;
    let parsed: EventBody = parse_json(&bytes)?;
    let report = EventReport::from_json(parsed);
    let is_vm_started = matches!(report.kind(), EventKind::VmStarted { .. });
    let accepted = app
        .ingest_event(&caller, &vm_id, report, body_text(&bytes), Transport::Http)
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
            timestamp: Some(app.clock().now()),
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
    Caller(caller): Caller,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<Received>, ApiError> {
    let vm_id = path_one(vm_id)?;
    let bytes = body_bytes(body)?;
    let parsed: HeartbeatBody = parse_json(&bytes)?;
    app.ingest_heartbeat(
        &caller,
        &vm_id,
        HeartbeatReport::from_json(parsed),
        Transport::Http,
    )
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
    Caller(caller): Caller,
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
        .registration_config(&caller, &vm_id, request, body_text(&bytes))
        .await?;
    Ok(axum::Json(response).into_response())
}

async fn get_commands(
    State(app): State<AppState>,
    Caller(caller): Caller,
    vm_id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<CommandsResponse>, ApiError> {
    let vm_id = path_one(vm_id)?;
    let commands = app.poll_commands(&caller, &vm_id).await?;
    Ok(axum::Json(CommandsResponse { commands, vm_id }))
}

async fn post_ack(
    State(app): State<AppState>,
    Caller(caller): Caller,
    ids: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<axum::Json<CommandAckResponse>, ApiError> {
    let Path((vm_id, command_id)) = ids.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let bytes = body_bytes(body)?;
    let ack: CommandAckBody = parse_json(&bytes)?;
    let state = app
        .ack_command(
            &caller,
            &vm_id,
            crate::app::Ack {
                command_id: &command_id,
                success: ack.success,
                message: &ack.message,
                result: ack.result,
                via: "http",
            },
        )
        .await?;
    Ok(axum::Json(CommandAckResponse {
        status: "received".into(),
        vm_id,
        command_id,
        state: state.as_str().into(),
    }))
}
