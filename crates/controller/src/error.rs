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
            ApiError::Store(inner) => {
                tracing::error!(error = %crate::error::chain(inner), "Store failure");
                tonic::Status::internal("internal error")
            }
        }
    }
}

/// Formats an error with its whole source chain (`a: b: c`), for logs.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
