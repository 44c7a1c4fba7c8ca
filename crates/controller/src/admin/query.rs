//! Query-string parsing shared by the admin handlers: paging, cursors, times, filters;
//! each bad value is a 400 that names it.

use super::*;

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// The key of the last row when the page is full (there may be more), else `None`.
pub(super) fn next_page<T, K>(rows: &[T], limit: u32, key: impl Fn(&T) -> K) -> Option<K> {
    (rows.len() == limit as usize)
        .then(|| rows.last().map(key))
        .flatten()
}

pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let l = limit.unwrap_or(DEFAULT_PAGE);
    if l == 0 || l > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(l)
}

pub(super) fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

pub(super) fn vm_id_of(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let vm_id = path_one(p)?;
    miglet_proto::ids::validate_vm_id(&vm_id).map_err(bad)?;
    Ok(vm_id)
}

/// RFC 3339 time or Unix milliseconds (an optional sign and 1 to 18 digits, as the
/// OpenAPI document's pattern says).
pub(super) fn parse_time(name: &str, v: &str) -> Result<Millis, ApiError> {
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
pub(super) fn cursor(v: Option<String>) -> Result<Option<String>, ApiError> {
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
pub(super) fn given(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.is_empty())
}

/// A VM id filter (`vm=`): empty means any VM.
pub(super) fn vm_filter(v: Option<String>) -> Result<Option<String>, ApiError> {
    let vm = given(v);
    if let Some(v) = &vm {
        miglet_proto::ids::validate_vm_id(v).map_err(bad)?;
    }
    Ok(vm)
}

/// A free-text filter: trimmed; empty means any.
pub(super) fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}
