//! The store's hot paths on a real SQLite database (WAL, synchronous=FULL, in a temp dir):
//! heartbeats and events written by many concurrent callers (so the writer's group commits
//! and multi-row heartbeat statements are what is measured, every write durable before it
//! returns), the same events in one batch, and the command queue: enqueue, the open-commands
//! read, and deliver + acknowledge.
//!
//! `cargo bench -p mig-controller --bench store`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mig_controller::lifecycle;
use mig_controller::store::{
    CommandRecord, CommandState, EventRow, HeartbeatInput, Mutation, Store, VmRecord,
};
use miglet_proto::command::Command;
use miglet_proto::event::{HealthFigures, HeartbeatReport};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Concurrent callers per iteration (a fleet's worth of in-flight writes).
const FLEET: usize = 1000;

fn vm_id(i: usize) -> String {
    format!("bench-{i:05}")
}

fn vm(i: usize) -> VmRecord {
    lifecycle::adopt(
        &vm_id(i),
        Some("bench"),
        None,
        Some("b-1"),
        Some("ready"),
        1,
    )
}

fn heartbeat(i: usize, now: i64) -> Mutation {
    let report = HeartbeatReport {
        boot_id: Some("b-1".into()),
        miglet_state: Some("idle".into()),
        runner_state: Some("listening".into()),
        health: HealthFigures {
            cpu_percent: Some(12.5),
            memory_used_bytes: Some(1 << 30),
            memory_total_bytes: Some(8 << 30),
            disk_used_bytes: Some(40 << 30),
            disk_total_bytes: Some(100 << 30),
        },
        ..Default::default()
    };
    Mutation::IngestHeartbeat(Box::new(HeartbeatInput {
        vm_id: vm_id(i),
        report_json: serde_json::to_string(&report).unwrap_or_default(),
        report,
        transport: "grpc".into(),
        now,
        connected: true,
    }))
}

fn event(i: usize, n: u64) -> EventRow {
    let data = format!(
        r#"{{"type":"job_completed","vm_id":"{}","event_id":"ev-{n}","job_id":"{n}","run_id":"{n}","result":"succeeded"}}"#,
        vm_id(i)
    );
    EventRow {
        seq: 0,
        vm_id: vm_id(i),
        event_id: Some(format!("ev-{n}")),
        event_type: "job_completed".into(),
        boot_id: Some("b-1".into()),
        transport: "grpc".into(),
        occurred_at: Some(n as i64),
        received_at: n as i64,
        raw: data.clone(),
        data,
    }
}

fn bench(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let Ok(store) = rt.block_on(Store::open_sqlite(dir.path())) else {
        return;
    };
    let seeded = rt.block_on(store.write((0..FLEET).map(|i| Mutation::PutVm(vm(i))).collect()));
    // Two commands waiting for every VM, as the open-commands read finds them.
    let waiting: Vec<Mutation> = (0..FLEET * 2)
        .map(|k| {
            let cmd = Command::Drain {
                reason: "seed".into(),
                timeout_seconds: None,
            };
            Mutation::InsertCommand(CommandRecord::pending(
                format!("seed-{k}"),
                &vm_id(k % FLEET),
                "b-1",
                &cmd,
                "bench",
                1,
                i64::MAX,
            ))
        })
        .collect();
    if seeded.is_err() || rt.block_on(store.write(waiting)).is_err() {
        return;
    }
    let store = Arc::new(store);
    let n = Arc::new(AtomicU64::new(1));

    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    g.throughput(Throughput::Elements(FLEET as u64));
    g.bench_function("heartbeats_1000_concurrent_writes", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let now = n.fetch_add(1, Ordering::Relaxed) as i64;
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..FLEET {
                    let s = store.clone();
                    tasks.spawn(async move { s.write(vec![heartbeat(i, now)]).await.is_ok() });
                }
                tasks.join_all().await.into_iter().filter(|ok| *ok).count()
            }
        })
    });
    g.bench_function("events_1000_concurrent_writes", |b| {
        // Each write is what ingest_event stores: the event and the VM's new record.
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let base = n.fetch_add(FLEET as u64, Ordering::Relaxed);
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..FLEET {
                    let s = store.clone();
                    let e = event(i, base + i as u64);
                    let mut v = vm(i);
                    v.last_seen_at = e.received_at;
                    tasks.spawn(async move {
                        s.write(vec![Mutation::InsertEvent(e), Mutation::PutVm(v)])
                            .await
                            .is_ok()
                    });
                }
                tasks.join_all().await.into_iter().filter(|ok| *ok).count()
            }
        })
    });
    g.bench_function("events_1000_in_one_write", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let base = n.fetch_add(FLEET as u64, Ordering::Relaxed);
            async move {
                let batch = (0..FLEET)
                    .map(|i| Mutation::InsertEvent(event(i, base + i as u64)))
                    .collect();
                store.write(batch).await.is_ok()
            }
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("command_enqueue", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let k = n.fetch_add(1, Ordering::Relaxed);
            async move {
                let cmd = Command::Drain {
                    reason: "bench".into(),
                    timeout_seconds: None,
                };
                let rec = CommandRecord::pending(
                    format!("cmd-{k}"),
                    // VMs of their own, so the queue read below keeps its size.
                    &format!("bench-q-{}", k % FLEET as u64),
                    "b-1",
                    &cmd,
                    "bench",
                    k as i64,
                    i64::MAX,
                );
                store
                    .write(vec![Mutation::InsertCommand(rec)])
                    .await
                    .is_ok()
            }
        })
    });
    g.bench_function("commands_open_for_vm", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let k = n.fetch_add(1, Ordering::Relaxed);
            async move {
                store
                    .commands_open_for_vm(&vm_id(k as usize % FLEET))
                    .await
                    .map(|c| c.len())
                    .ok()
            }
        })
    });
    g.bench_function("command_deliver_then_ack", |b| {
        b.to_async(&rt).iter(|| {
            let store = store.clone();
            let k = n.fetch_add(1, Ordering::Relaxed);
            async move {
                let id = format!("dq-{k}");
                let cmd = Command::Drain {
                    reason: "bench".into(),
                    timeout_seconds: None,
                };
                let vm = vm_id(k as usize % FLEET);
                let rec =
                    CommandRecord::pending(id.clone(), &vm, "b-1", &cmd, "bench", 1, i64::MAX);
                let queued = store.write(vec![Mutation::InsertCommand(rec)]).await;
                let delivered = store
                    .write(vec![Mutation::MarkDelivered {
                        ids: vec![id.clone()],
                        at: 2,
                        via: "bench".into(),
                    }])
                    .await;
                let acked = store
                    .write(vec![Mutation::CommandTransition {
                        id,
                        to: CommandState::Acknowledged,
                        at: 3,
                        detail: None,
                        result_message: Some("ok".into()),
                        result: None,
                    }])
                    .await;
                queued.is_ok() && delivered.is_ok() && acked.is_ok()
            }
        })
    });
    g.finish();
    rt.block_on(store.close());
}

criterion_group!(benches, bench);
criterion_main!(benches);
