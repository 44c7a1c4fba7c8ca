//! Simulated agents and the traffic they make, for the load generator and the fault suite.
//!
//! Against a controller each agent does what the real MIGlet does: enroll with the pool's
//! bootstrap secret, announce `vm_started` over HTTP, open its gRPC stream (or poll over HTTP),
//! acknowledge every command, heartbeat every interval, and send job events over its stream
//! (HTTP for pollers). Like the real agent it survives the controller going away: enrollment,
//! `vm_started` and events are retried, a broken stream is reopened with the agent's own
//! backoff ([`miglet_proto::backoff`]), and events not acknowledged yet are sent again. So a
//! report can tell events *lost* (acknowledged, then missing from the store) from events
//! *retried* (sent again because no acknowledgment came). Against the echo baseline it skips
//! what needs the controller (enrolling, HTTP) and drives the stream the same way.

use anyhow::{Context, bail};
use miglet_proto::backoff::{Backoff, EVENT_RETRY, STREAM_RECONNECT};
use miglet_proto::pb::command_service_client::CommandServiceClient;
use miglet_proto::pb::{self, MiGletMessage, controller_message, mi_glet_message};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// What the fleet talks to.
#[derive(Debug)]
pub enum Target {
    Controller {
        http: reqwest::Client,
        base: String,
        secret: String,
        admin_token: String,
        /// Bounds concurrent HTTP requests, and so the connections they hold.
        http_permits: Semaphore,
    },
    Echo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Stream,
    Http,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub heartbeats_sent: AtomicU64,
    pub heartbeat_errors: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_accepted: AtomicU64,
    pub event_errors: AtomicU64,
    /// Events sent again because no acknowledgment came (the stream broke, or HTTP failed).
    pub events_retried: AtomicU64,
    /// Streams reopened after they broke.
    pub reconnects: AtomicU64,
    /// Attempts (enroll, `vm_started`, stream open) that failed and were retried.
    pub retries: AtomicU64,
    pub commands_received: AtomicU64,
    pub enqueue_errors: AtomicU64,
    pub agent_errors: AtomicU64,
    /// Error notices the server sent on a stream (refused messages).
    pub stream_errors: AtomicU64,
    pub streams_up: AtomicU64,
    pub http_agents_up: AtomicU64,
    /// Streams open right now (up at reconnects, down when one breaks).
    pub streams_open: AtomicU64,
    /// Commands received again after an agent had executed them (acknowledged again, not
    /// executed again).
    pub commands_redelivered: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Timings {
    /// Command id -> when the enqueue call was made.
    pub enqueued: HashMap<String, Instant>,
    /// Command id -> when an agent received it, and how.
    pub received: HashMap<String, (Instant, Via)>,
    /// `vm_started` sent -> `register_runner` received, ms, agents started in the ramp.
    pub registration_ramp_ms: Vec<f64>,
    /// The same for agents that joined the loaded fleet during the measured window.
    pub registration_steady_ms: Vec<f64>,
    /// Joiners' registration in three parts, ms: the `vm_started` request, opening the
    /// stream (connect to `connect_ack`), and `connect_ack` to `register_runner`.
    pub join_phases: Vec<[f64; 3]>,
    /// Agents that received their `register_runner`.
    pub registered: std::collections::HashSet<String>,
    /// Command ids each agent has executed (an id runs at most once per agent).
    pub executed: std::collections::HashSet<String>,
    /// Heartbeats the controller answered 200 over HTTP, per VM (they must all be stored).
    pub http_heartbeats_acked: HashMap<String, u64>,
}

/// An agent the event and command generators can pick.
#[derive(Debug, Clone)]
pub struct Member {
    pub vm: String,
    pub cred: String,
    /// What the agent sends on its stream (whichever stream is open now), or `None` for a
    /// poller.
    pub stream: Option<mpsc::Sender<MiGletMessage>>,
}

#[derive(Debug)]
pub struct Fleet {
    pub target: Target,
    pub grpc: String,
    pub pool: String,
    pub heartbeat: Duration,
    pub poll: Duration,
    /// Agents sharing one HTTP/2 connection (1 = one connection each, like real VMs).
    pub per_connection: usize,
    pub channels: Vec<OnceCell<Channel>>,
    pub counters: Counters,
    pub timings: Mutex<Timings>,
    pub members: Mutex<Vec<Member>>,
    /// Agent-seconds connected, summed when agents stop (for VM-hours).
    pub agent_millis: AtomicU64,
    /// Every (VM, event id) the controller acknowledged: these must be in its store.
    pub acknowledged: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Fleet {
    /// A fleet for `target`; `slots` shared connections of `per_connection` agents each.
    pub fn new(
        target: Target,
        grpc: String,
        pool: String,
        heartbeat: Duration,
        poll: Duration,
        per_connection: usize,
        slots: usize,
    ) -> Fleet {
        Fleet {
            target,
            grpc,
            pool,
            heartbeat,
            poll,
            per_connection,
            channels: (0..slots).map(|_| OnceCell::new()).collect(),
            counters: Counters::default(),
            timings: Mutex::default(),
            members: Mutex::default(),
            agent_millis: AtomicU64::default(),
            acknowledged: Mutex::default(),
        }
    }

    fn acked(&self, vm: &str, event_id: &str) {
        lock(&self.acknowledged).insert((vm.to_owned(), event_id.to_owned()));
    }
}

/// Counts an open stream down when its session ends, however it ends.
struct OpenStream<'a>(&'a AtomicU64);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a stream session ended.
#[derive(Debug)]
enum SessionEnd {
    Stopped,
    /// The stream broke; the agent reconnects. `auth`: the credential was refused.
    Broken {
        reason: String,
        auth: bool,
    },
}

/// The agent's events the controller has not acknowledged yet, in the order sent.
#[derive(Debug, Default)]
struct Unacked {
    events: std::collections::VecDeque<(String, MiGletMessage)>,
}

impl Unacked {
    fn add(&mut self, id: String, m: MiGletMessage) {
        self.events.push_back((id, m));
    }

    fn ack(&mut self, ids: &[String]) {
        self.events.retain(|(id, _)| !ids.contains(id));
    }
}

fn event_id_of(m: &MiGletMessage) -> Option<String> {
    match &m.message {
        Some(mi_glet_message::Message::Event(e)) => e.data.get("event_id").cloned(),
        _ => None,
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How an agent reaches the gRPC server.
#[derive(Debug, Clone, Copy)]
pub enum Conn {
    /// Slot in [`Fleet::channels`], shared with `per_connection - 1` other agents.
    Shared(usize),
    /// A connection of its own.
    Own,
}

/// Which agent this is and how it behaves.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub vm: String,
    pub over_http: bool,
    pub conn: Conn,
    /// Joined during the measured window (its registration counts as steady state).
    pub joiner: bool,
}

impl Fleet {
    async fn http_json(
        &self,
        req: impl FnOnce(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Value> {
        let Target::Controller {
            http,
            base,
            http_permits,
            ..
        } = &self.target
        else {
            bail!("no HTTP against the echo server");
        };
        let _permit = http_permits.acquire().await?;
        Ok(req(http, base)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Runs `attempt` until it succeeds (with the agent's backoff) or `stop`; `None` if
    /// stopped first.
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        policy: (Duration, Duration),
        stop: &mut watch::Receiver<bool>,
        mut attempt: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let mut backoff = Backoff::of(policy);
        loop {
            if *stop.borrow() {
                return None;
            }
            match attempt().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    if self.counters.retries.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("{what} failed, retrying: {e:#}");
                    }
                    tokio::select! {
                        _ = stop.changed() => return None,
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    async fn enroll(&self, vm: &str) -> anyhow::Result<String> {
        let Target::Controller { secret, .. } = &self.target else {
            return Ok(String::new());
        };
        let body = json!({"vm_id": vm, "pool_id": self.pool, "method": "bootstrap", "bootstrap_secret": secret});
        let r = self
            .http_json(|c, base| c.post(format!("{base}/api/v1/enroll")).json(&body))
            .await?;
        r["credential"]
            .as_str()
            .map(str::to_owned)
            .context("no credential in the enrollment answer")
    }

    async fn post(&self, cred: &str, vm: &str, what: &str, body: Value) -> anyhow::Result<Value> {
        self.http_json(|c, base| {
            c.post(format!("{base}/api/v1/vms/{vm}/{what}"))
                .bearer_auth(cred)
                .json(&body)
        })
        .await
    }

    /// Records a received command; true for the agent's first `register_runner`. A command
    /// the agent executed before is only acknowledged again, as the real agent does.
    fn note_command(&self, vm: &str, id: &str, via: Via, started: Instant, joiner: bool) -> bool {
        self.counters
            .commands_received
            .fetch_add(1, Ordering::Relaxed);
        let mut t = lock(&self.timings);
        if !t.executed.insert(id.to_owned()) {
            self.counters
                .commands_redelivered
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if id.starts_with("register-") {
            if !t.registered.insert(vm.to_owned()) {
                // A redelivery: the first receipt counted.
                return false;
            }
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if joiner {
                t.registration_steady_ms.push(ms);
            } else {
                t.registration_ramp_ms.push(ms);
            }
            true
        } else {
            t.received
                .entry(id.to_owned())
                .or_insert_with(|| (Instant::now(), via));
            false
        }
    }

    /// Makes the agent one the generators pick: after its runner is registered (jobs and
    /// their events come only then), or at once against the echo server.
    fn join(&self, vm: &str, cred: &str, stream: Option<&mpsc::Sender<MiGletMessage>>) {
        lock(&self.members).push(Member {
            vm: vm.to_owned(),
            cred: cred.to_owned(),
            stream: stream.cloned(),
        });
    }

    async fn channel(&self, conn: Conn) -> anyhow::Result<Channel> {
        let connect = || async {
            tonic::transport::Endpoint::from_shared(self.grpc.clone())?
                .connect_timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .connect()
                .await
                .context("gRPC connect")
        };
        match conn {
            Conn::Own => connect().await,
            Conn::Shared(i) => {
                let cell = self.channels.get(i).context("connection slot")?;
                Ok(cell.get_or_try_init(connect).await?.clone())
            }
        }
    }

    /// One simulated agent, until `stop`.
    pub async fn agent(
        self: Arc<Fleet>,
        spec: AgentSpec,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let vm = spec.vm.clone();
        let controller = matches!(self.target, Target::Controller { .. });
        let Some(cred) = self
            .retrying(&format!("enroll {vm}"), STREAM_RECONNECT, &mut stop, || {
                self.enroll(&vm)
            })
            .await
        else {
            return Ok(());
        };
        let started = Instant::now();
        if controller {
            let body = json!({"type":"vm_started","vm_id":vm,"pool_id":self.pool,"event_id":format!("{vm}-start")});
            let posted = self
                .retrying(&format!("vm_started {vm}"), EVENT_RETRY, &mut stop, || {
                    self.post(&cred, &vm, "events", body.clone())
                })
                .await;
            if posted.is_none() {
                return Ok(());
            }
            self.acked(&vm, &format!("{vm}-start"));
        }
        let posted = Instant::now();
        let offset = Duration::from_millis(spread_ms(&vm, self.heartbeat.as_millis() as u64));
        let up_at = Instant::now();
        let result = if spec.over_http {
            self.counters.http_agents_up.fetch_add(1, Ordering::Relaxed);
            self.poll_loop(&vm, &cred, offset, started, spec.joiner, &mut stop)
                .await
        } else {
            self.stream_agent(&spec, cred, offset, [started, posted], &mut stop)
                .await
        };
        self.agent_millis
            .fetch_add(up_at.elapsed().as_millis() as u64, Ordering::Relaxed);
        result
    }

    /// A stream agent: sessions one after the other until `stop`, reopened with the agent's
    /// backoff when one breaks, unacknowledged events sent again on the next.
    async fn stream_agent(
        &self,
        spec: &AgentSpec,
        mut cred: String,
        offset: Duration,
        times: [Instant; 2],
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (outbox, mut queued) = mpsc::channel::<MiGletMessage>(64);
        let mut unacked = Unacked::default();
        let mut backoff = Backoff::of(STREAM_RECONNECT);
        let mut next_beat = tokio::time::Instant::now() + offset;
        let mut first = true;
        loop {
            let end = self
                .session(
                    spec,
                    &cred,
                    &outbox,
                    &mut queued,
                    &mut unacked,
                    &mut next_beat,
                    (times, first),
                    &mut backoff,
                    stop,
                )
                .await;
            first = false;
            match end {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Broken { reason, auth } => {
                    if self.counters.reconnects.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("{}: stream broke ({reason}); reconnecting", spec.vm);
                    }
                    let wait = backoff.next_delay();
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                    if auth {
                        match self
                            .retrying(
                                &format!("enroll {}", spec.vm),
                                STREAM_RECONNECT,
                                stop,
                                || self.enroll(&spec.vm),
                            )
                            .await
                        {
                            Some(c) => cred = c,
                            None => return Ok(()),
                        }
                    }
                }
            }
        }
    }

    async fn poll_loop(
        &self,
        vm: &str,
        cred: &str,
        offset: Duration,
        started: Instant,
        joiner: bool,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut next_beat = tokio::time::Instant::now() + offset;
        let mut poll = tokio::time::interval_at(
            tokio::time::Instant::now() + offset.min(self.poll),
            self.poll,
        );
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = poll.tick() => {
                    let body = self.http_json(|c, base| c.get(format!("{base}/api/v1/vms/{vm}/commands")).bearer_auth(cred)).await;
                    let body = match body {
                        Ok(b) => b,
                        Err(e) => {
                            // The next poll is the retry, as for the real agent.
                            if self.counters.retries.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("poll {vm} failed, polling again: {e:#}");
                            }
                            continue;
                        }
                    };
                    for c in body["commands"].as_array().cloned().unwrap_or_default() {
                        let id = c["id"].as_str().unwrap_or_default().to_owned();
                        if self.note_command(vm, &id, Via::Http, started, joiner) {
                            self.join(vm, cred, None);
                        }
                        if let Err(e) = self.post(cred, vm, &format!("commands/{id}/ack"), json!({"success": true})).await {
                            // The controller delivers it again; the agent acknowledges again.
                            if self.counters.retries.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("ack {vm} failed, the command will come again: {e:#}");
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(next_beat) => {
                    next_beat += self.heartbeat;
                    self.counters.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                    match self.post(cred, vm, "heartbeat", json!({"type":"job_heartbeat","vm_id":vm,"miglet_state":"idle"})).await {
                        Ok(_) => *lock(&self.timings).http_heartbeats_acked.entry(vm.to_owned()).or_default() += 1,
                        Err(_) => { self.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed); }
                    }
                }
            }
        }
    }

    /// One stream session: open, send again what was not acknowledged, then heartbeats,
    /// queued messages and command acknowledgments until it breaks or `stop`.
    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        spec: &AgentSpec,
        cred: &str,
        outbox: &mpsc::Sender<MiGletMessage>,
        queued: &mut mpsc::Receiver<MiGletMessage>,
        unacked: &mut Unacked,
        next_beat: &mut tokio::time::Instant,
        ([started, posted], first): ([Instant; 2], bool),
        backoff: &mut Backoff,
        stop: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        let vm = &spec.vm;
        let controller = matches!(self.target, Target::Controller { .. });
        let broken = |reason: String, auth: bool| SessionEnd::Broken { reason, auth };
        let channel = match self.channel(spec.conn).await {
            Ok(c) => c,
            Err(e) => return broken(format!("{e:#}"), false),
        };
        let (tx, rx) = mpsc::channel::<MiGletMessage>(32);
        let connect = wrap(mi_glet_message::Message::Connect(pb::ConnectRequest {
            vm_id: vm.clone(),
            pool_id: self.pool.clone(),
            version: "loadgen".into(),
            ..Default::default()
        }));
        if tx.send(connect).await.is_err() {
            return broken("stream closed".into(), false);
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if controller {
            match format!("Bearer {cred}").parse() {
                Ok(v) => {
                    req.metadata_mut().insert("authorization", v);
                }
                Err(_) => return broken("credential is not header-safe".into(), true),
            }
        }
        let mut client = CommandServiceClient::new(channel).max_decoding_message_size(1 << 20);
        let opened = tokio::select! {
            _ = stop.changed() => return SessionEnd::Stopped,
            r = client.stream_commands(req) => r,
        };
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(st) => {
                let auth = st.code() == tonic::Code::Unauthenticated;
                return broken(format!("open: {st}"), auth);
            }
        };
        match inbound.message().await {
            Ok(Some(pb::ControllerMessage {
                message: Some(controller_message::Message::ConnectAck(a)),
            })) if a.accepted => {}
            Ok(other) => return broken(format!("no accepted connect_ack: {other:?}"), false),
            Err(st) => {
                let auth = st.code() == tonic::Code::Unauthenticated;
                return broken(format!("connect: {st}"), auth);
            }
        }
        let acked = Instant::now();
        backoff.reset();
        self.counters.streams_open.fetch_add(1, Ordering::Relaxed);
        let _open = OpenStream(&self.counters.streams_open);
        if first {
            self.counters.streams_up.fetch_add(1, Ordering::Relaxed);
            if !controller {
                self.join(vm, cred, Some(outbox));
            }
        }
        // What the last stream carried without an acknowledgment goes again, in order.
        for (_, m) in &unacked.events {
            self.counters.events_retried.fetch_add(1, Ordering::Relaxed);
            if tx.send(m.clone()).await.is_err() {
                return broken("stream closed while replaying".into(), false);
            }
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return SessionEnd::Stopped,
                () = tokio::time::sleep_until(*next_beat) => {
                    *next_beat += self.heartbeat;
                    self.counters.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
                    if tx.send(heartbeat(vm)).await.is_err() {
                        self.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                        return broken("stream closed".into(), false);
                    }
                }
                Some(m) = queued.recv() => {
                    if let Some(id) = event_id_of(&m) {
                        unacked.add(id, m.clone());
                    }
                    if tx.send(m).await.is_err() {
                        return broken("stream closed".into(), false);
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::ControllerMessage { message: Some(m) })) => match m {
                        controller_message::Message::Command(c) => {
                            if self.note_command(vm, &c.id, Via::Stream, started, spec.joiner) {
                                if spec.joiner {
                                    let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
                                    lock(&self.timings).join_phases.push([ms(started, posted), ms(posted, acked), ms(acked, Instant::now())]);
                                }
                                self.join(vm, cred, Some(outbox));
                            }
                            // The echo server would answer an ack with another command.
                            if controller {
                                let ack = wrap(mi_glet_message::Message::CommandAck(pb::CommandAck {
                                    command_id: c.id, success: true, message: "ok".into(), result: Default::default() }));
                                if tx.send(ack).await.is_err() {
                                    return broken("stream closed".into(), false);
                                }
                            }
                        }
                        controller_message::Message::EventAck(a) => {
                            self.counters.events_accepted.fetch_add(a.event_ids.len() as u64, Ordering::Relaxed);
                            for id in &a.event_ids {
                                self.acked(vm, id);
                            }
                            unacked.ack(&a.event_ids);
                        }
                        controller_message::Message::Error(e) => {
                            if self.counters.stream_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("{vm}: the server refused a message: {} {}", e.code, e.message);
                            }
                        }
                        controller_message::Message::ConnectAck(_) => {}
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => return broken("closed by the server".into(), false),
                    Err(st) => {
                        let auth = st.code() == tonic::Code::Unauthenticated;
                        return broken(format!("{st}"), auth);
                    }
                },
            }
        }
    }

    /// Sends job events at `per_sec` across the fleet, round-robin, until `stop`: over the
    /// agent's stream, or over HTTP for pollers.
    pub async fn events(self: Arc<Fleet>, per_sec: f64, stop: watch::Receiver<bool>) {
        if per_sec <= 0.0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut n = 0usize;
        let mut inflight = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            tick.tick().await;
            let Some(m) = pick(&self.members, n) else {
                continue;
            };
            n += 1;
            let ty = if n.is_multiple_of(2) {
                "job_completed"
            } else {
                "job_started"
            };
            let event_id = format!("{}-ev-{n}", m.vm);
            self.counters.events_sent.fetch_add(1, Ordering::Relaxed);
            match m.stream {
                Some(tx) => {
                    let ev = pb::EventNotification {
                        r#type: ty.into(),
                        vm_id: m.vm.clone(),
                        pool_id: self.pool.clone(),
                        data: [
                            ("event_id".to_owned(), event_id),
                            ("run_id".to_owned(), n.to_string()),
                            ("job_id".to_owned(), n.to_string()),
                        ]
                        .into(),
                        timestamp: chrono::Utc::now().timestamp(),
                        ..Default::default()
                    };
                    if tx
                        .try_send(wrap(mi_glet_message::Message::Event(ev)))
                        .is_err()
                    {
                        // The agent's queue is full (its stream is down): the real agent
                        // would spool it; the generator counts it as not sent.
                        self.counters.event_errors.fetch_add(1, Ordering::Relaxed);
                        self.counters.events_sent.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                None => {
                    let f = self.clone();
                    let mut stop = stop.clone();
                    inflight.spawn(async move {
                        let body = json!({"type": ty, "vm_id": m.vm, "run_id": n.to_string(), "job_id": n.to_string(), "event_id": event_id});
                        // Like the agent's spool: sent again until the controller takes it.
                        let mut tries = 0u64;
                        let done = f
                            .retrying("event over HTTP", EVENT_RETRY, &mut stop, || {
                                tries += 1;
                                f.post(&m.cred, &m.vm, "events", body.clone())
                            })
                            .await;
                        f.counters
                            .events_retried
                            .fetch_add(tries.saturating_sub(1), Ordering::Relaxed);
                        match done {
                            Some(_) => {
                                f.counters.events_accepted.fetch_add(1, Ordering::Relaxed);
                                f.acked(&m.vm, &event_id);
                            }
                            None => {
                                f.counters.event_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                    while inflight.len() > 256 {
                        let _ = inflight.join_next().await;
                    }
                }
            }
        }
        while inflight.join_next().await.is_some() {}
    }

    /// Queues a command for a random agent at `per_sec` until `stop`, recording when each was
    /// queued: `set_log_level` through the admin API, or an echo probe on the agent's stream.
    pub async fn commands(self: Arc<Fleet>, per_sec: f64, stop: watch::Receiver<bool>) {
        if per_sec <= 0.0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec));
        let mut n = 0usize;
        let mut inflight = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            tick.tick().await;
            let Some(m) = pick(&self.members, n.wrapping_mul(7919)) else {
                continue;
            };
            n += 1;
            let f = self.clone();
            inflight.spawn(async move {
                let t0 = Instant::now();
                let id = match &f.target {
                    Target::Controller { admin_token, .. } => {
                        let body = json!({"type":"set_log_level","parameters":{"level":"info"}});
                        f.http_json(|c, base| {
                            c.post(format!("{base}/api/v1/admin/vms/{}/commands", m.vm))
                                .bearer_auth(admin_token)
                                .json(&body)
                        })
                        .await
                        .ok()
                        .and_then(|v| v["command"]["id"].as_str().map(str::to_owned))
                    }
                    Target::Echo => {
                        let id = format!("probe-{n}");
                        lock(&f.timings).enqueued.insert(id.clone(), t0);
                        let probe = wrap(mi_glet_message::Message::CommandAck(pb::CommandAck {
                            command_id: id.clone(),
                            ..Default::default()
                        }));
                        match &m.stream {
                            Some(tx) if tx.send(probe).await.is_ok() => Some(id),
                            _ => None,
                        }
                    }
                };
                match id {
                    Some(id) => {
                        lock(&f.timings).enqueued.entry(id).or_insert(t0);
                    }
                    None => {
                        f.counters.enqueue_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            while inflight.len() > 64 {
                let _ = inflight.join_next().await;
            }
        }
        while inflight.join_next().await.is_some() {}
    }

    /// The state the controller holds for a command (for the ones never received).
    pub async fn command_state(&self, id: &str) -> String {
        let Target::Controller { admin_token, .. } = &self.target else {
            return "n/a".into();
        };
        match self
            .http_json(|c, base| {
                c.get(format!("{base}/api/v1/admin/commands/{id}"))
                    .bearer_auth(admin_token)
            })
            .await
        {
            Ok(v) => v["command"]["state"]
                .as_str()
                .or(v["state"].as_str())
                .unwrap_or("unknown")
                .to_owned(),
            Err(e) => format!("lookup failed: {e}"),
        }
    }
}

fn pick(members: &Mutex<Vec<Member>>, n: usize) -> Option<Member> {
    let m = lock(members);
    (!m.is_empty()).then(|| m[n % m.len()].clone())
}

fn wrap(m: mi_glet_message::Message) -> MiGletMessage {
    MiGletMessage { message: Some(m) }
}

fn heartbeat(vm: &str) -> MiGletMessage {
    wrap(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
        vm_id: vm.into(),
        miglet_state: "idle".into(),
        timestamp: chrono::Utc::now().timestamp(),
        health: Some(pb::VmHealth {
            cpu_usage_percent: 3.5,
            memory_usage_percent: 21.0,
            disk_usage_percent: 40.0,
            memory_total_bytes: 8 << 30,
            memory_used_bytes: 1 << 30,
            disk_total_bytes: 100 << 30,
            disk_used_bytes: 40 << 30,
        }),
        ..Default::default()
    }))
}

/// A stable offset in `0..max` ms for `vm`, so heartbeats spread over the interval.
fn spread_ms(vm: &str, max: u64) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(vm);
    if max == 0 { 0 } else { h % max }
}

/// What the store holds of what the fleet sent, checked after the controller stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCheck {
    /// Events the controller acknowledged.
    pub acknowledged: usize,
    /// Acknowledged events missing from the store (must be 0).
    pub lost: usize,
    /// Events stored more than once under the same id (must be 0).
    pub duplicated: usize,
    /// Examples of lost events (VM, event id).
    pub lost_sample: Vec<(String, String)>,
    /// Heartbeats the controller answered 200 over HTTP.
    pub http_heartbeats_acknowledged: u64,
    /// Of those, missing from the store (must be 0).
    pub http_heartbeats_lost: u64,
}

impl Fleet {
    /// Compares what the controller acknowledged with what `store` holds.
    pub async fn check_store(
        &self,
        store: &mig_controller::store::Store,
    ) -> anyhow::Result<StoreCheck> {
        let acked = lock(&self.acknowledged).clone();
        let mut by_vm: HashMap<&str, Vec<&str>> = HashMap::new();
        for (vm, id) in &acked {
            by_vm.entry(vm.as_str()).or_default().push(id.as_str());
        }
        let mut out = StoreCheck {
            acknowledged: acked.len(),
            ..StoreCheck::default()
        };
        for (vm, ids) in by_vm {
            let stored = store.events_for_vm(vm).await?;
            let mut count: HashMap<&str, usize> = HashMap::new();
            for e in &stored {
                if let Some(id) = &e.event_id {
                    *count.entry(id.as_str()).or_default() += 1;
                }
            }
            out.duplicated += count.values().filter(|n| **n > 1).count();
            for id in ids {
                if !count.contains_key(id) {
                    out.lost += 1;
                    if out.lost_sample.len() < 10 {
                        out.lost_sample.push((vm.to_owned(), id.to_owned()));
                    }
                }
            }
        }
        let beats = lock(&self.timings).http_heartbeats_acked.clone();
        for (vm, acked) in beats {
            let stored = store
                .heartbeats_for_vm(&vm)
                .await?
                .iter()
                .filter(|h| h.transport == "http")
                .count() as u64;
            out.http_heartbeats_acknowledged += acked;
            out.http_heartbeats_lost += acked.saturating_sub(stored);
        }
        Ok(out)
    }
}
