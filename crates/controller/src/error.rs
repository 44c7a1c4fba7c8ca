//! One transport-neutral error for the API layer, mapped to HTTP status + JSON body or to a
//! gRPC status at the edges. The message is safe to show to the caller; internal details are
//! logged where the error is converted, never sent.

use crate::store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// 401 / `UNAUTHENTICATED`: no credential, or one that does not verify.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 / `PERMISSION_DENIED`: a valid credential that may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 409: the request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 429 / `RESOURCE_EXHAUSTED`, with how long to wait.
    #[error("rate limit exceeded; retry in {} s", crate::auth::limits::retry_after_secs(*.0))]
    TooManyRequests(std::time::Duration),
    #[error("internal error")]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Unauthorized(_) => "unauthenticated",
            ApiError::Forbidden(_) => "permission_denied",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooManyRequests(_) => "rate_limited",
            ApiError::Store(_) => "internal",
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        match &e {
            ApiError::BadRequest(m) => tonic::Status::invalid_argument(m.clone()),
            ApiError::NotFound(m) => tonic::Status::not_found(m.clone()),
            ApiError::PayloadTooLarge(m) => tonic::Status::resource_exhausted(m.clone()),
            ApiError::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            ApiError::Unauthorized(m) => tonic::Status::unauthenticated(m.clone()),
            ApiError::Forbidden(m) => tonic::Status::permission_denied(m.clone()),
            ApiError::Conflict(m) => tonic::Status::failed_precondition(m.clone()),
            ApiError::TooManyRequests(_) => tonic::Status::resource_exhausted(e.to_string()),
            ApiError::Store(inner) => {
                log_store_failure(inner, "on the stream");
                tonic::Status::internal("internal error")
            }
        }
    }
}

/// Logs a store failure at ERROR with what to do about it, at most once a second (a full
/// disk fails every write, and every write would say so), counting the ones not logged.
pub fn log_store_failure(e: &StoreError, what: &str) {
    static LINES: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(1_000);
    let Some(more) = LINES.allow_now() else {
        return;
    };
    tracing::error!(
        error = %chain(e),
        advice = e.advice(),
        similar_failures_not_logged = more,
        "Store failure {what}"
    );
}

/// Formats an error with its whole source chain (`a: b: c`), for logs.
pub use miglet_proto::error_chain as chain;

impl From<crate::auth::Refused> for ApiError {
    fn from(r: crate::auth::Refused) -> ApiError {
        match r {
            crate::auth::Refused::Limited(wait) => ApiError::TooManyRequests(wait),
            crate::auth::Refused::Denied(d) => ApiError::from(d),
        }
    }
}

impl From<crate::auth::Denied> for ApiError {
    fn from(d: crate::auth::Denied) -> ApiError {
        match d {
            crate::auth::Denied::Unauthenticated(m) => ApiError::Unauthorized(m),
            crate::auth::Denied::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

impl From<crate::auth::NameError> for ApiError {
    fn from(e: crate::auth::NameError) -> ApiError {
        match e {
            crate::auth::NameError::Inconsistent(m) => ApiError::BadRequest(m),
            crate::auth::NameError::Forbidden(m) => ApiError::Forbidden(m),
        }
    }
}

impl From<crate::auth::enroll::EnrollError> for ApiError {
    fn from(e: crate::auth::enroll::EnrollError) -> ApiError {
        use crate::auth::enroll::EnrollError as E;
        match e {
            E::BadRequest(m) => ApiError::BadRequest(m),
            E::Refused(m) => ApiError::Unauthorized(format!("enrollment refused: {m}")),
            E::Unavailable(m) => ApiError::Unavailable(m),
            E::Forbidden(m) => ApiError::Forbidden(m),
            E::Store(s) => ApiError::Store(s),
        }
    }
}
