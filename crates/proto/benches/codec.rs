//! Protocol encode/decode on the controller's hot paths: a heartbeat and a job event as they
//! arrive over gRPC (protobuf) and over HTTP (JSON), into the transport-neutral reports the
//! controller stores, and a command on its way out on both transports.
//!
//! `cargo bench -p miglet-proto --bench codec`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use miglet_proto::command::{Command, CommandEnvelope};
use miglet_proto::event::{EventReport, HeartbeatReport};
use miglet_proto::json::{EventBody, HeartbeatBody};
use miglet_proto::pb::{self, MiGletMessage, mi_glet_message};
use prost::Message;
use std::hint::black_box;

fn heartbeat() -> MiGletMessage {
    MiGletMessage {
        message: Some(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
            vm_id: "pool-a-7f3k".into(),
            pool_id: "pool-a".into(),
            org_id: "acme".into(),
            health: Some(pb::VmHealth {
                cpu_usage_percent: 37.5,
                memory_usage_percent: 41.0,
                disk_usage_percent: 63.2,
                memory_total_bytes: 8 << 30,
                memory_used_bytes: 3 << 30,
                disk_total_bytes: 100 << 30,
                disk_used_bytes: 63 << 30,
            }),
            runner_state: Some(pb::RunnerState {
                state: "running".into(),
                configured: true,
                runner_name: "pool-a-7f3k".into(),
                labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
            }),
            current_job: Some(pb::JobInfo {
                job_id: "123456789".into(),
                run_id: "987654321".into(),
                repository: "acme/widgets".into(),
                branch: "main".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                status: "in_progress".into(),
                started_at: 1_795_000_000,
            }),
            timestamp: 1_795_000_100,
            miglet_state: "job_running".into(),
        })),
    }
}

const HEARTBEAT_JSON: &str = r#"{"type":"job_heartbeat","vm_id":"pool-a-7f3k","pool_id":"pool-a","org_id":"acme","boot_id":"b-1","miglet_state":"job_running","runner_state":"running","health":{"cpu_percent":37.5,"memory_used_bytes":3221225472,"memory_total_bytes":8589934592,"disk_used_bytes":67645734912,"disk_total_bytes":107374182400},"timestamp":"2026-11-23T03:00:00Z"}"#;

const EVENT_JSON: &str = r#"{"type":"job_started","vm_id":"pool-a-7f3k","pool_id":"pool-a","event_id":"ev-000123","boot_id":"b-1","job_id":"123456789","run_id":"987654321","repository":"acme/widgets","workflow":"ci","timestamp":"2026-11-23T03:00:00Z"}"#;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto");
    g.throughput(Throughput::Elements(1));

    let hb = heartbeat();
    let bytes = hb.encode_to_vec();
    g.bench_function("heartbeat_pb_encode", |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            buf.clear();
            black_box(&hb).encode(&mut buf).map(|()| buf.len())
        })
    });
    g.bench_function("heartbeat_pb_decode_to_report", |b| {
        b.iter(|| {
            let m = MiGletMessage::decode(black_box(bytes.as_slice())).ok();
            match m.and_then(|m| m.message) {
                Some(mi_glet_message::Message::Heartbeat(h)) => Some(HeartbeatReport::from_pb(&h)),
                _ => None,
            }
        })
    });
    g.bench_function("heartbeat_json_decode_to_report", |b| {
        b.iter(|| {
            serde_json::from_str::<HeartbeatBody>(black_box(HEARTBEAT_JSON))
                .map(HeartbeatReport::from_json)
                .ok()
        })
    });
    let report = serde_json::from_str::<HeartbeatBody>(HEARTBEAT_JSON)
        .map(HeartbeatReport::from_json)
        .unwrap_or_default();
    g.bench_function("heartbeat_report_to_stored_json", |b| {
        b.iter(|| {
            serde_json::to_string(black_box(&report))
                .map(|s| s.len())
                .ok()
        })
    });
    g.bench_function("event_json_decode_to_report", |b| {
        b.iter(|| {
            serde_json::from_str::<EventBody>(black_box(EVENT_JSON))
                .map(EventReport::from_json)
                .ok()
        })
    });
    let event = serde_json::from_str::<EventBody>(EVENT_JSON)
        .map(EventReport::from_json)
        .ok();
    let event_pb = event.as_ref().map(EventReport::to_pb).unwrap_or_default();
    let event_bytes = event_pb.encode_to_vec();
    g.bench_function("event_pb_decode_to_report", |b| {
        b.iter(|| {
            pb::EventNotification::decode(black_box(event_bytes.as_slice()))
                .ok()
                .map(|n| EventReport::from_pb(&n))
        })
    });
    let cmd = CommandEnvelope {
        id: "drain-01a2064a4a51701aae4082fda85e9278".into(),
        created_at: chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap_or_default(),
        command: Command::Drain {
            reason: "scale-in".into(),
            timeout_seconds: Some(3600),
        },
    };
    g.bench_function("command_to_pb_encoded", |b| {
        b.iter(|| black_box(&cmd).to_pb().encode_to_vec().len())
    });
    g.bench_function("command_to_json_encoded", |b| {
        b.iter(|| {
            serde_json::to_string(&black_box(&cmd).to_json())
                .map(|s| s.len())
                .ok()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
