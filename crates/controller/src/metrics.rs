//! Prometheus metrics, served on their own listener (`--metrics-addr`).
//!
//! Counters and histograms are updated where things happen; fleet gauges (VMs by pool, state
//! and health, open streams, heartbeat age, commands by state, time in transitional states)
//! are read from the store at each scrape. Labels are low-cardinality only: pool, state,
//! health, event type (the contract's types, else `unknown`), command type, route template, method,
//! status class. Never a VM id.

use crate::store::{Millis, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub pool: String,
    pub state: String,
    pub health: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// `workflow_job`, `ping`, or `other`.
    pub event: String,
    /// `applied`, `duplicate`, `ignored`, `unsigned`, `bad_signature`, `bad_payload`.
    pub result: String,
}

pub use crate::net::RefusedLabels;

type FloatGauge = Gauge<f64, AtomicU64>;

/// States a healthy VM passes through quickly; lingering in one is worth an alert.
pub const TRANSITIONAL_STATES: &[&str] = &[
    "initializing",
    "waiting_for_controller",
    "ready",
    "registering_runner",
    "draining",
    "shutting_down",
];

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. about 65 s.
    exponential_buckets(0.001, 2.0, 17)
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    vms: Family<VmLabels, Gauge>,
    streams: Gauge,
    heartbeat_age: Family<PoolLabel, FloatGauge>,
    oldest_in_state: Family<StateLabel, FloatGauge>,
    commands: Family<StateLabel, Gauge>,
    pub events: Family<TypeLabel, Counter>,
    pub heartbeats: Family<TransportLabel, Counter>,
    pub command_ack_latency: Family<TypeLabel, Histogram>,
    pub registration_latency: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    connections_open: Family<ListenerLabel, Gauge>,
    connections_refused: Family<RefusedLabels, Counter>,
    pub scaling: ScalingMetrics,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub pool: String,
    pub reason: String,
}

/// What GitHub asks of the fleet (webhook deliveries, how long jobs wait) and what the
/// scaler does about it, per pool.
#[derive(Debug, Clone)]
pub struct ScalingMetrics {
    pub webhook_deliveries: Family<WebhookLabels, Counter>,
    pub job_queue_seconds: Family<PoolLabel, Histogram, fn() -> Histogram>,
    pub desired: Family<PoolLabel, Gauge>,
    pub actual: Family<PoolLabel, Gauge>,
    pub queued: Family<PoolLabel, Gauge>,
    pub created: Family<PoolLabel, Counter>,
    pub deleted: Family<ReasonLabels, Counter>,
    /// Jobs the backstop poll changed: `found` (no webhook told of it), `moved` (a step a
    /// webhook missed), `vanished` (GitHub no longer knows it).
    pub backstop_jobs: Family<ChangeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    pub change: String,
}

impl ScalingMetrics {
    fn register(r: &mut Registry) -> ScalingMetrics {
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        r.register(
            "webhook_deliveries",
            "GitHub webhook deliveries, by event and result (unsigned and bad_signature are refused with 401)",
            webhook_deliveries.clone(),
        );
        let job_queue_seconds: Family<PoolLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(queue_histogram);
        r.register(
            "job_queue_seconds",
            "How long jobs waited for a runner (workflow_job queued to in_progress), per pool",
            job_queue_seconds.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Family::<PoolLabel, Gauge>::default();
            r.register(name, help, g.clone());
            g
        };
        let desired = gauge(
            r,
            "pool_desired_vms",
            "VMs the scaler wants: busy ones plus queued jobs plus min_idle, within max_size",
        );
        let actual = gauge(
            r,
            "pool_vms",
            "VMs the scaler's pools have (not being deleted)",
        );
        let queued = gauge(
            r,
            "pool_queued_jobs",
            "Jobs queued for the pool that no VM has taken yet",
        );
        let created = Family::<PoolLabel, Counter>::default();
        r.register(
            "pool_vms_created",
            "VMs the scaler created",
            created.clone(),
        );
        let deleted = Family::<ReasonLabels, Counter>::default();
        r.register(
            "pool_vms_deleted",
            "VMs the scaler deleted, by reason (job_done, idle, over_max_size, max_lifetime, boot_timeout, registration_timeout, ended, lost)",
            deleted.clone(),
        );
        let backstop_jobs = Family::<ChangeLabel, Counter>::default();
        r.register(
            "backstop_jobs",
            "Jobs the backstop poll of GitHub's API changed because webhooks missed them: found (never delivered), moved (a step not delivered), vanished (GitHub no longer knows the job)",
            backstop_jobs.clone(),
        );
        ScalingMetrics {
            backstop_jobs,
            webhook_deliveries,
            job_queue_seconds,
            desired,
            actual,
            queued,
            created,
            deleted,
        }
    }
}

fn queue_histogram() -> Histogram {
    // 0.5 s .. about 4.5 hours.
    Histogram::new(exponential_buckets(0.5, 2.0, 15))
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(store: &Store, github: Option<&crate::github::metrics::GitHubMetrics>) -> Metrics {
        let mut r = Registry::with_prefix("mig");
        if let Some(g) = github {
            g.register(&mut r);
        }
        let vms = Family::<VmLabels, Gauge>::default();
        r.register("vms", "VMs by pool, state and health", vms.clone());
        let streams = Gauge::default();
        r.register("streams_connected", "Open gRPC streams", streams.clone());
        let heartbeat_age = Family::<PoolLabel, FloatGauge>::default();
        r.register(
            "oldest_heartbeat_age_seconds",
            "Age of the oldest last heartbeat among live VMs, per pool",
            heartbeat_age.clone(),
        );
        let oldest_in_state = Family::<StateLabel, FloatGauge>::default();
        r.register(
            "vm_oldest_in_state_seconds",
            "How long the VM longest in each transitional state has been in it",
            oldest_in_state.clone(),
        );
        let commands = Family::<StateLabel, Gauge>::default();
        r.register("commands", "Commands by state", commands.clone());
        let events = Family::<TypeLabel, Counter>::default();
        r.register("events_ingested", "Events stored, by type", events.clone());
        let heartbeats = Family::<TransportLabel, Counter>::default();
        r.register(
            "heartbeats_ingested",
            "Heartbeats stored, by transport",
            heartbeats.clone(),
        );
        let command_ack_latency = Family::<TypeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        r.register(
            "command_ack_latency_seconds",
            "From queueing a command to its acknowledgment, by command type",
            command_ack_latency.clone(),
        );
        let registration_latency = Histogram::new(latency_buckets());
        r.register(
            "registration_latency_seconds",
            "From a VM's vm_started to its register_runner going out",
            registration_latency.clone(),
        );
        r.register(
            "store_write_seconds",
            "Store write latency (queueing and group commit included)",
            store.write_seconds(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests by route template, method and status class",
            http_requests.clone(),
        );
        let connections_open = Family::<ListenerLabel, Gauge>::default();
        r.register(
            "connections_open",
            "Open connections by listener",
            connections_open.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        r.register(
            "connections_refused",
            "Connections closed at accept or during their handshake, by listener and reason (per_addr, total, handshake)",
            connections_refused.clone(),
        );
        Metrics {
            scaling: ScalingMetrics::register(&mut r),
            registry: r,
            connections_open,
            connections_refused,
            vms,
            streams,
            heartbeat_age,
            oldest_in_state,
            commands,
            events,
            heartbeats,
            command_ack_latency,
            registration_latency,
            http_requests,
        }
    }

    /// The connection counters of one listener (`http` or `grpc`).
    pub fn connections(&self, listener: &'static str) -> crate::net::ConnMetrics {
        crate::net::ConnMetrics {
            listener,
            open: self
                .connections_open
                .get_or_create(&ListenerLabel {
                    listener: listener.into(),
                })
                .clone(),
            refused: self.connections_refused.clone(),
        }
    }

    /// Counts a stored event; a type the contract does not know counts as `unknown`.
    pub fn event(&self, event_type: &str) {
        let kind = if miglet_proto::event::is_known_event_type(event_type) {
            event_type
        } else {
            miglet_proto::event::UNKNOWN
        };
        self.events
            .get_or_create(&TypeLabel {
                r#type: kind.into(),
            })
            .inc();
    }

    /// Records an acknowledgment `latency_ms` after queueing.
    pub fn command_acked(&self, command_type: &str, latency_ms: Millis) {
        self.command_ack_latency
            .get_or_create(&TypeLabel {
                r#type: command_type.into(),
            })
            .observe(latency_ms.max(0) as f64 / 1000.0);
    }

    /// Refreshes the fleet gauges from the store and renders everything.
    pub async fn render(&self, store: &Store, streams: usize, now: Millis) -> String {
        self.streams.set(streams as i64);
        match (store.pool_counts().await, store.fleet_gauges().await) {
            (Ok(counts), Ok(g)) => {
                self.vms.clear();
                for c in counts {
                    self.vms
                        .get_or_create(&VmLabels {
                            pool: c.pool_id,
                            state: c.state,
                            health: c.health.as_str().into(),
                        })
                        .set(c.count);
                }
                self.heartbeat_age.clear();
                for (pool, oldest) in g.oldest_heartbeat_by_pool {
                    self.heartbeat_age
                        .get_or_create(&PoolLabel { pool })
                        .set((now - oldest).max(0) as f64 / 1000.0);
                }
                self.oldest_in_state.clear();
                for s in TRANSITIONAL_STATES {
                    let since = g
                        .oldest_by_state
                        .iter()
                        .find(|(st, _)| st == s)
                        .map(|(_, t)| *t);
                    self.oldest_in_state
                        .get_or_create(&StateLabel { state: (*s).into() })
                        .set(since.map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0));
                }
                self.commands.clear();
                for (state, n) in g.commands_by_state {
                    self.commands.get_or_create(&StateLabel { state }).set(n);
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %crate::error::chain(&e), "Metrics: fleet gauges unavailable");
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "Metrics encoding failed");
        }
        out
    }
}
