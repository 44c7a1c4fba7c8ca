//! Partition: the agent-controller path, for every agent at once, blackholed, then delayed,
//! then half-open, then reset, for the given time in all, while the fleet sends events and
//! real agents run jobs. The controller marks the silent VMs unhealthy; when the path heals
//! they reconnect, spool out, and are healthy again; nothing acknowledged is lost or
//! stored twice.

use crate::harness::{Ctl, RealAgent, SimFleet, github, job};
use crate::{Check, Opts};
use miglet_sim::proxy::Mode;
use serde_json::json;
use std::time::{Duration, Instant};

/// VMs the controller holds with this health, read through its admin API (directly, not
/// through the agents' broken path).
async fn health_count(ctl: &Ctl, health: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/admin/pools", ctl.direct_http))
        .bearer_auth(ctl.admin_token()?)
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["pools"]
        .as_array()
        .map(|pools| {
            pools
                .iter()
                .filter_map(|p| p["by_health"][health].as_u64())
                .sum()
        })
        .unwrap_or(0))
}

pub async fn run(
    o: &Opts,
    dir: &std::path::Path,
) -> anyhow::Result<(serde_json::Value, Vec<Check>)> {
    let (gh, github_url) = github().await?;
    let mut ctl = Ctl::start(
        &dir.join("ctl"),
        &[
            "--heartbeat-interval-secs",
            "1",
            "--unhealthy-after-missed",
            "3",
            "--lost-after-missed",
            "600",
            "--reconcile-interval-secs",
            "1",
        ],
        &github_url,
    )
    .await?;
    let quarter = Duration::from_secs((o.partition_secs / 4).max(4));
    let job_ms = quarter.as_millis() as u64 * 4 + 6_000;
    let mut real = Vec::new();
    for i in 0..o.real_agents {
        gh.enqueue_job(job(&format!("partition-job-{i}"), job_ms));
        real.push(RealAgent::spawn(
            dir,
            &ctl,
            &format!("real-p{i}"),
            &[("MIGLET_HEARTBEAT_INTERVAL", "1s")],
        )?);
    }
    let mut sim = SimFleet::start(&ctl, o.agents, 0.2, Duration::from_secs(1)).await?;
    sim.wait_up(o.agents, Duration::from_secs(120)).await?;
    sim.generate(o.events_per_sec, 0.0);
    let total = o.agents + o.real_agents;
    let mut unhealthy_seen = 0u64;
    let started = Instant::now();
    for mode in [
        Mode::Blackhole,
        Mode::Delay(Duration::from_millis(700)),
        Mode::HalfOpen,
        Mode::Reset,
    ] {
        ctl.http_proxy.set_mode(mode);
        ctl.grpc_proxy.set_mode(mode);
        eprintln!("[partition] {mode:?} for {} s", quarter.as_secs());
        tokio::time::sleep(quarter).await;
        if mode == Mode::Blackhole {
            unhealthy_seen = health_count(&ctl, "unhealthy").await?;
        }
    }
    let broken_for = started.elapsed();
    ctl.http_proxy.set_mode(Mode::Pass);
    ctl.grpc_proxy.set_mode(Mode::Pass);
    let healed = Instant::now();
    let back = sim.wait_reconnected(Duration::from_secs(60)).await?;
    // Every VM healthy again (the reconciler runs every second; heartbeats every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut healthy = 0;
    while Instant::now() < deadline {
        healthy = health_count(&ctl, "healthy").await?;
        if healthy as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let healthy_after = healed.elapsed();
    sim.stop_generating().await;
    let mut real_exits = Vec::new();
    for a in &mut real {
        real_exits.push(a.wait(Duration::from_secs(job_ms / 1000 + 90)).await?);
    }
    let fleet = sim.stop().await;
    ctl.stop().await?;
    let store = ctl.store().await?;
    let stored = fleet.check_store(&store).await?;
    // Every VM the partition made unhealthy (or lost) has a recovery line after that.
    let mut went_bad = 0;
    let mut recovered_in_log = 0;
    for vm in store.vms_list().await? {
        let log = store.vm_log_for_vm(&vm.vm_id).await?;
        let health = |l: &&mig_controller::store::VmLogRow, to: &str| {
            l.kind == "health_changed" && l.detail.as_deref().unwrap_or_default().ends_with(to)
        };
        let Some(bad_at) = log
            .iter()
            .filter(|l| health(l, "-> unhealthy") || health(l, "-> lost"))
            .map(|l| l.at)
            .min()
        else {
            continue;
        };
        went_bad += 1;
        if log
            .iter()
            .any(|l| health(&l, "-> healthy") && l.at >= bad_at)
        {
            recovered_in_log += 1;
        }
    }
    store.close().await;
    let c = &fleet.counters;
    let checks = vec![
        Check::new("acknowledged events lost", stored.lost, 0),
        Check::new("events stored twice", stored.duplicated, 0),
        Check::new(
            "acknowledged HTTP heartbeats lost",
            stored.http_heartbeats_lost as usize,
            0,
        ),
        Check::at_least(
            "VMs marked unhealthy during the blackhole",
            unhealthy_seen as f64,
            (total as f64 * 0.9).floor(),
        ),
        Check::new("VMs healthy after the path healed", healthy as usize, total),
        Check::at_least(
            "VMs whose log shows they went unhealthy",
            went_bad as f64,
            (total as f64 * 0.9).floor(),
        ),
        Check::new(
            "of those, VMs whose log shows the recovery",
            recovered_in_log,
            went_bad,
        ),
        Check::new(
            "real agents that did not exit 0",
            real_exits.iter().filter(|c| **c != Some(0)).count(),
            0,
        ),
        Check::new(
            "GitHub registrations of the real agents",
            gh.registrations(),
            o.real_agents,
        ),
    ];
    let figures = json!({
        "agents": o.agents,
        "real_agents": o.real_agents,
        "path_broken_secs": broken_for.as_secs_f64(),
        "streams_back_ms": back.as_secs_f64() * 1000.0,
        "all_healthy_after_ms": healthy_after.as_secs_f64() * 1000.0,
        "unhealthy_during_blackhole": unhealthy_seen,
        "events_acknowledged": stored.acknowledged,
        "events_retried": c.events_retried.load(std::sync::atomic::Ordering::Relaxed),
        "stream_reconnects": c.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        "bytes_dropped_by_the_partition": ctl.grpc_proxy.stats().dropped_bytes.load(std::sync::atomic::Ordering::Relaxed)
            + ctl.http_proxy.stats().dropped_bytes.load(std::sync::atomic::Ordering::Relaxed),
    });
    Ok((figures, checks))
}
