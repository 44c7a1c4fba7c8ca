//! Crash: `kill -9` the controller at random moments under a fleet of simulated agents and a
//! few real ones mid-job, restart it on the same data dir each time, then read the store:
//! every acknowledged event and HTTP heartbeat is there once, every queued command was
//! executed (once per agent), one `register_runner` per boot, every stream back within 10 s;
//! the real agents finish their jobs and report them once.

use crate::harness::{
    Ctl, RealAgent, SimFleet, double_registrations, github, job, unacknowledged_commands,
};
use crate::{Check, Opts};
use rand::Rng;
use serde_json::json;
use std::time::Duration;

pub async fn run(
    o: &Opts,
    dir: &std::path::Path,
) -> anyhow::Result<(serde_json::Value, Vec<Check>)> {
    let (gh, github_url) = github().await?;
    let mut ctl = Ctl::start(
        &dir.join("ctl"),
        &[
            "--heartbeat-interval-secs",
            "2",
            "--redelivery-timeout-secs",
            "2",
        ],
        &github_url,
    )
    .await?;
    // The real agents' jobs outlast the crashes.
    let job_ms = (o.crashes as u64 * 6_000 + 4_000).max(8_000);
    let mut real = Vec::new();
    for i in 0..o.real_agents {
        gh.enqueue_job(job(&format!("crash-job-{i}"), job_ms));
        real.push(RealAgent::spawn(dir, &ctl, &format!("real-{i}"), &[])?);
    }
    let mut sim = SimFleet::start(&ctl, o.agents, 0.2, Duration::from_secs(2)).await?;
    let ramp = sim.wait_up(o.agents, Duration::from_secs(120)).await?;
    sim.generate(o.events_per_sec, o.commands_per_sec);
    let mut reconnect_ms = Vec::new();
    for k in 0..o.crashes {
        let pause = rand::rng().random_range(1_500..4_000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        ctl.kill9().await?;
        eprintln!("[crash] controller killed ({} of {})", k + 1, o.crashes);
        ctl.spawn().await?;
        let back = sim.wait_reconnected(Duration::from_secs(30)).await?;
        reconnect_ms.push(back.as_secs_f64() * 1000.0);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    sim.stop_generating().await;
    let missing_commands = sim.wait_commands_received(Duration::from_secs(20)).await;
    let mut real_exits = Vec::new();
    for a in &mut real {
        real_exits.push(a.wait(Duration::from_secs(job_ms / 1000 + 60)).await?);
    }
    let not_acked = sim
        .wait_commands_acknowledged(Duration::from_secs(20))
        .await;
    let fleet = sim.stop().await;
    ctl.stop().await?;
    let store = ctl.store().await?;
    let stored = fleet.check_store(&store).await?;
    let doubles = double_registrations(&store).await?;
    let unacked = unacknowledged_commands(&store, &fleet).await?;
    let mut real_events_once = true;
    for a in &real {
        let types: Vec<String> = store
            .events_for_vm(&a.vm)
            .await?
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        for ty in [
            "runner_registered",
            "job_started",
            "job_completed",
            "vm_shutting_down",
        ] {
            if types.iter().filter(|t| *t == ty).count() != 1 {
                real_events_once = false;
                eprintln!("[crash] {}: {ty} in {types:?}", a.vm);
            }
        }
    }
    store.close().await;
    let c = &fleet.counters;
    let max_reconnect = reconnect_ms.iter().copied().fold(0.0, f64::max);
    let checks = vec![
        Check::new("acknowledged events lost", stored.lost, 0),
        Check::new("events stored twice", stored.duplicated, 0),
        Check::new(
            "acknowledged HTTP heartbeats lost",
            stored.http_heartbeats_lost as usize,
            0,
        ),
        Check::new("queued commands never executed", missing_commands, 0),
        Check::new("queued commands not acknowledged (admin API)", not_acked, 0),
        Check::new(
            "queued commands not acknowledged in the store",
            unacked.len(),
            0,
        ),
        Check::new("register_runner handed out twice in one boot", doubles, 0),
        Check::new(
            "GitHub registrations of the real agents",
            gh.registrations(),
            o.real_agents,
        ),
        Check::new(
            "real agents that did not exit 0",
            real_exits.iter().filter(|c| **c != Some(0)).count(),
            0,
        ),
        Check::new(
            "real agents' job events not stored exactly once",
            usize::from(!real_events_once),
            0,
        ),
        Check::at_most(
            "slowest reconnect after a crash (ms)",
            max_reconnect,
            10_000.0,
        ),
    ];
    let figures = json!({
        "agents": o.agents,
        "real_agents": o.real_agents,
        "crashes": o.crashes,
        "ramp_secs": ramp.as_secs_f64(),
        "reconnect_ms": reconnect_ms,
        "events_sent": c.events_sent.load(std::sync::atomic::Ordering::Relaxed),
        "events_acknowledged": stored.acknowledged,
        "events_retried": c.events_retried.load(std::sync::atomic::Ordering::Relaxed),
        "stream_reconnects": c.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        "http_heartbeats_acknowledged": stored.http_heartbeats_acknowledged,
        "commands_queued": miglet_sim::fleet::lock(&fleet.timings).enqueued.len(),
        "commands_redelivered": c.commands_redelivered.load(std::sync::atomic::Ordering::Relaxed),
        "unacknowledged_sample": unacked.iter().take(5).collect::<Vec<_>>(),
        "lost_sample": stored.lost_sample,
    });
    Ok((figures, checks))
}
