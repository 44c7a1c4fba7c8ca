//! `/admin/events`: event search, and the live event stream (server-sent events).

use super::*;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventQuery {
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

pub(super) fn event_filter(q: EventQuery) -> Result<EventFilter, ApiError> {
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
pub(super) async fn search_events(
    State(app): State<AppState>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let filter = event_filter(query(q)?)?;
    let rows = app.reads().events_page(&filter).await?;
    let next_before = next_page(&rows, filter.limit, |r| r.seq);
    Ok(Json(EventPage {
        events: rows.iter().map(EventView::from).collect(),
        next_before,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventStreamQuery {
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
pub(super) async fn event_stream(
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
            .reads()
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
            let rows = match app.reads().events_page(&filter).await {
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
