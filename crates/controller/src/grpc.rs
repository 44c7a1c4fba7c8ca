//! The gRPC front end: `miglet.commands.CommandService/StreamCommands`.
//!
//! One session task per stream owns the inbound side and the outbound channel, so nothing
//! sends on a stream concurrently. The session: wait for `ConnectRequest` (bounded), answer
//! `ConnectAck{accepted:true}`, then loop over inbound messages, command nudges, a
//! redelivery timer, replacement by a newer stream, and server shutdown. A failed send or
//! the end of the inbound stream means the peer is gone.

use crate::app::{Controller, StreamOpened, Transport};
use crate::auth::{Principal, Route};
use crate::error::ApiError;
use crate::streams::StreamHandle;
use miglet_proto::event::{EventReport, HeartbeatReport};
use miglet_proto::pb::command_service_server::CommandService;
use miglet_proto::pb::{
    self, ControllerMessage, MiGletMessage, controller_message, mi_glet_message,
};
use serde_json::{Map, Value};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// How long a new stream may take to send its `ConnectRequest`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbound messages buffered per stream before the session waits for the peer.
const OUTBOUND_DEPTH: usize = 64;
/// How soon a stream tries again to deliver after the store refused the delivery.
const DELIVERY_RETRY: Duration = Duration::from_secs(1);
/// Largest accepted inbound message.
pub const MAX_MESSAGE: usize = 1 << 20;

pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone)]
pub struct GrpcService {
    app: Arc<Controller>,
    sessions: TaskTracker,
}

impl GrpcService {
    pub fn new(app: Arc<Controller>, sessions: TaskTracker) -> GrpcService {
        GrpcService { app, sessions }
    }
}

type Outbound = mpsc::Sender<Result<ControllerMessage, Status>>;

fn msg(m: controller_message::Message) -> ControllerMessage {
    ControllerMessage { message: Some(m) }
}

fn error_msg(code: &str, message: String) -> ControllerMessage {
    msg(controller_message::Message::Error(pb::ErrorNotification {
        code: code.into(),
        message,
        details: Default::default(),
        timestamp: chrono::Utc::now().timestamp(),
    }))
}

#[tonic::async_trait]
impl CommandService for GrpcService {
    type StreamCommandsStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn stream_commands(
        &self,
        request: Request<Streaming<MiGletMessage>>,
    ) -> Result<Response<Self::StreamCommandsStream>, Status> {
        let conn = request.extensions().get::<crate::net::ConnMeta>().cloned();
        let remote = conn.as_ref().map(|c| c.remote);
        // The stream keeps its connection from idling out for as long as it lasts.
        let busy = conn.map(|c| c.activity.begin());
        let gate = self.app.gate();
        gate.check_peer(remote.map(|a| a.ip()))
            .map_err(ApiError::from)?;
        // The credential is checked before anything is read from the stream, by the same
        // gate as every HTTP request.
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer);
        let caller = match gate.principal(self.app.reads(), token).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(Status::unauthenticated(
                    "this stream needs a VM credential: metadata authorization: Bearer <credential>",
                ));
            }
            Err(denied) => return Err(ApiError::from(denied).into()),
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(CONNECT_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no connect message within 30 s"))??
            .ok_or_else(|| Status::cancelled("stream closed before connect"))?;
        let Some(mi_glet_message::Message::Connect(connect)) = first.message else {
            return Err(Status::failed_precondition(
                "the first message on the stream must be connect",
            ));
        };
        gate.admit(&Route::Vm(connect.vm_id.clone()), Some(&caller))
            .map_err(ApiError::from)?;

        let opened = self
            .app
            .stream_open(&caller, &connect, remote)
            .await
            .map_err(Status::from)?;
        let (tx, rx) = mpsc::channel(OUTBOUND_DEPTH);
        let ack = msg(controller_message::Message::ConnectAck(pb::ConnectAck {
            accepted: true,
            message: "Connection accepted".into(),
            server_version: SERVER_VERSION.into(),
        }));
        // Cannot fail: the channel is new and empty.
        let _ = tx.try_send(Ok(ack));
        let app = self.app.clone();
        let vm_id = connect.vm_id.clone();
        self.sessions.spawn(async move {
            let _busy = busy;
            let handle = opened.handle.clone();
            let reason = run_session(&app, &vm_id, opened, inbound, &tx, &caller).await;
            app.stream_closed(&vm_id, &handle, reason).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Sends commands in order; `Err` when the peer is gone.
async fn send_commands(tx: &Outbound, commands: Vec<pb::Command>) -> Result<(), &'static str> {
    for c in commands {
        if tx
            .send(Ok(msg(controller_message::Message::Command(c))))
            .await
            .is_err()
        {
            return Err("peer gone");
        }
    }
    Ok(())
}

/// Ready when the credential the stream was opened with expires (never for other callers):
/// a stream lives no longer than it, and the agent reconnects with its refreshed one.
async fn credential_expiry(app: &Controller, caller: &Principal) {
    match caller {
        Principal::Vm(c) => {
            let left = c.expires_at - app.clock().now_secs();
            tokio::time::sleep(Duration::from_secs(left.max(0) as u64)).await;
        }
        _ => std::future::pending().await,
    }
}

/// One delivery pass: the commands due now go out. After a failed delivery (the store
/// refused the write) the command stays pending and nothing else would wake this stream
/// for it, so `retry` is armed to try again soon; returns whether it was.
async fn deliver(
    app: &Controller,
    vm_id: &str,
    handle: &StreamHandle,
    tx: &Outbound,
    caller: &Principal,
    open: &mut usize,
    retry: Pin<&mut tokio::time::Sleep>,
) -> Result<bool, &'static str> {
    match app.stream_deliverable(caller, vm_id, handle).await {
        Ok((commands, still_open)) => {
            *open = still_open;
            send_commands(tx, commands).await?;
            Ok(false)
        }
        Err(e) => {
            static FAILED: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(1_000);
            if let Some(similar_failures_not_logged) = FAILED.allow_now() {
                warn!(vm_id, error = %e, retry_in_secs = DELIVERY_RETRY.as_secs(), similar_failures_not_logged, "Command delivery on a stream failed; it stays queued and will be tried again");
            }
            retry.reset(tokio::time::Instant::now() + DELIVERY_RETRY);
            Ok(true)
        }
    }
}

/// Drives one stream until it ends; returns why it ended. One `select!` over everything
/// that can happen to a stream, so nothing sends on it concurrently.
async fn run_session(
    app: &Controller,
    vm_id: &str,
    opened: StreamOpened,
    mut inbound: Streaming<MiGletMessage>,
    tx: &Outbound,
    caller: &Principal,
) -> &'static str {
    let StreamOpened {
        handle,
        commands,
        mut open,
        deliver_now,
        commit,
    } = opened;
    let handle = &handle;
    // What was waiting when the stream opened (stored before; marked delivered on this
    // stream by the open's write).
    if let Err(gone) = send_commands(tx, commands).await {
        return gone;
    }
    // Nothing else happens on the stream before the open's write is committed.
    if let Some(commit) = commit
        && let Err(e) = commit.settled().await
    {
        warn!(vm_id, error = %e, "Could not record the stream's open; ending it");
        let _ = tx.send(Err(Status::from(e))).await;
        return "store write failed";
    }
    let expiry = credential_expiry(app, caller);
    tokio::pin!(expiry);
    let shutdown = app.shutdown_token().clone();
    let redelivery = app.settings().redelivery_timeout;
    let mut tick = tokio::time::interval(redelivery.max(Duration::from_secs(1)) / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = deliver_now;
    let retry = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(retry);
    let mut retrying = false;
    loop {
        if std::mem::take(&mut due) {
            match deliver(app, vm_id, handle, tx, caller, &mut open, retry.as_mut()).await {
                Ok(armed) => retrying = armed,
                Err(gone) => return gone,
            }
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return "controller shutting down",
            () = &mut expiry => {
                let _ = tx.send(Err(Status::unauthenticated("credential expired; reconnect with a fresh one"))).await;
                return "credential expired";
            }
            () = handle.replaced.cancelled() => {
                let _ = tx.send(Err(Status::aborted("replaced by a newer stream for this VM"))).await;
                return "replaced by a newer stream";
            }
            () = handle.closed.cancelled() => {
                let _ = tx.send(Err(Status::permission_denied("the VM moved to another pool; enroll into it again"))).await;
                return "ended by the controller: the VM moved to another pool";
            }
            () = handle.nudge.notified() => due = true,
            () = &mut retry, if retrying => {
                retrying = false;
                due = true;
            }
            _ = tick.tick(), if open > 0 => due = true,
            next = inbound.message() => match on_inbound(app, vm_id, next, tx, caller).await {
                // An ack or event may have changed what is open.
                Ok(()) => due = due || open > 0,
                Err(reason) => return reason,
            },
        }
    }
}

/// One inbound read: a message is rate-limited (refused with a notice, the stream stays up)
/// and handled; the end of the stream or a broken one ends the session with its reason.
async fn on_inbound(
    app: &Controller,
    vm_id: &str,
    next: Result<Option<MiGletMessage>, Status>,
    tx: &Outbound,
    caller: &Principal,
) -> Result<(), &'static str> {
    match next {
        Ok(Some(m)) => {
            // The per-VM limit holds on the stream too: over it, a message is refused (not
            // stored) with a notice.
            if let Err(refused) = app.gate().check_vm_rate(vm_id) {
                let notice = error_msg("rate_limited", ApiError::from(refused).to_string());
                return tx.send(Ok(notice)).await.map_err(|_| "peer gone");
            }
            handle_message(app, vm_id, m, tx, caller).await
        }
        Ok(None) => Err("stream ended by the agent"),
        Err(status) => {
            debug!(vm_id, code = ?status.code(), message = status.message(), "Stream receive failed");
            // Tell the agent why, if it can still hear (a message over the size limit ends
            // the stream with RESOURCE_EXHAUSTED / OUT_OF_RANGE).
            let _ = tx.try_send(Err(status));
            Err("stream broken")
        }
    }
}

/// Handles one message of the stream's VM, checked against `caller` like every message.
async fn handle_message(
    app: &Controller,
    vm_id: &str,
    m: MiGletMessage,
    tx: &Outbound,
    caller: &Principal,
) -> Result<(), &'static str> {
    let reply = match m.message {
        None => None,
        Some(mi_glet_message::Message::Connect(_)) => Some(msg(
            controller_message::Message::ConnectAck(pb::ConnectAck {
                accepted: true,
                message: "Already connected".into(),
                server_version: SERVER_VERSION.into(),
            }),
        )),
        Some(mi_glet_message::Message::CommandAck(ack)) => {
            on_ack(app, vm_id, ack, caller).await.err()
        }
        Some(mi_glet_message::Message::Event(ev)) => on_event(app, vm_id, &ev, caller).await,
        Some(mi_glet_message::Message::Heartbeat(hb)) => app
            .ingest_heartbeat(
                caller,
                vm_id,
                HeartbeatReport::from_pb(&hb),
                Transport::Grpc,
            )
            .await
            .err()
            .map(|e| reject("invalid_heartbeat", e)),
        Some(mi_glet_message::Message::Error(err)) => {
            on_agent_error(app, vm_id, err, caller).await.err()
        }
    };
    if let Some(r) = reply
        && tx.send(Ok(r)).await.is_err()
    {
        return Err("peer gone");
    }
    Ok(())
}

/// A `CommandAck`: recorded (idempotently); a refusal is answered.
async fn on_ack(
    app: &Controller,
    vm_id: &str,
    ack: pb::CommandAck,
    caller: &Principal,
) -> Result<(), ControllerMessage> {
    let result: Map<String, Value> = ack
        .result
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let ack = crate::app::Ack {
        command_id: &ack.command_id,
        success: ack.success,
        message: &ack.message,
        result,
        via: "grpc",
    };
    app.ack_command(caller, vm_id, ack)
        .await
        .map(|_| ())
        .map_err(|e| reject("invalid_ack", e))
}

/// An event: stored, and answered with an `EventAck` when it carries an id (or a refusal).
async fn on_event(
    app: &Controller,
    vm_id: &str,
    ev: &pb::EventNotification,
    caller: &Principal,
) -> Option<ControllerMessage> {
    let raw = event_raw(ev);
    let report = EventReport::from_pb(ev);
    let event_id = report.event_id.clone();
    match app
        .ingest_event(caller, vm_id, report, raw, Transport::Grpc)
        .await
    {
        Ok(_) => event_id.map(|id| {
            msg(controller_message::Message::EventAck(pb::EventAck {
                event_ids: vec![id],
            }))
        }),
        Err(e) => Some(reject("invalid_event", e)),
    }
}

/// An agent-side error is stored as an `error` event.
async fn on_agent_error(
    app: &Controller,
    vm_id: &str,
    err: pb::ErrorNotification,
    caller: &Principal,
) -> Result<(), ControllerMessage> {
    let mut data = err.details;
    data.insert("code".into(), err.code);
    data.insert("message".into(), err.message);
    let ev = pb::EventNotification {
        r#type: "error".into(),
        vm_id: vm_id.to_owned(),
        data,
        timestamp: err.timestamp,
        ..Default::default()
    };
    let raw = event_raw(&ev);
    app.ingest_event(
        caller,
        vm_id,
        EventReport::from_pb(&ev),
        raw,
        Transport::Grpc,
    )
    .await
    .map(|_| ())
    .map_err(|e| reject("invalid_error", e))
}

/// Bad input from the agent is answered with an `ErrorNotification` and the stream stays up;
/// nothing is stored. A refusal says so in its code (`permission_denied`, ...); other bad
/// input gets `code`. Store failures are logged and reported as internal.
fn reject(code: &str, e: ApiError) -> ControllerMessage {
    let code = match &e {
        ApiError::Forbidden(_)
        | ApiError::Unauthorized(_)
        | ApiError::TooManyRequests(_)
        | ApiError::Store(_) => e.code(),
        _ => code,
    };
    let text = match &e {
        ApiError::Store(inner) => {
            crate::error::log_store_failure(inner, "on the stream");
            "internal error; send again".to_owned()
        }
        other => other.to_string(),
    };
    error_msg(code, text)
}

/// The gRPC event rendered as JSON, kept as the event's raw form.
fn event_raw(ev: &pb::EventNotification) -> String {
    let mut data: Vec<(&String, &String)> = ev.data.iter().collect();
    data.sort();
    serde_json::json!({
        "type": ev.r#type,
        "vm_id": ev.vm_id,
        "pool_id": ev.pool_id,
        "org_id": ev.org_id,
        "data": data.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "timestamp": ev.timestamp,
    })
    .to_string()
}
