//! `miglet-sim scale-bench`: how fast a `local` pool answers demand, with real `miglet`
//! processes and the runner stand-in: the time from a `workflow_job` queued to its
//! `in_progress` on a cold pool (no VM) and on a warm one (`min_idle` 1), and how long a
//! pool takes from 0 to N VMs whose runners are online. Prints figures (BENCHMARKS.md).

use crate::demo::{Fleet, FleetSpec};
use miglet_sim::github::Job;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Where the fleets live while measured (a fresh directory per fleet).
    #[arg(long, default_value = "./bench_data")]
    dir: PathBuf,
    /// VMs in the scale-out measurement.
    #[arg(long, default_value_t = 100)]
    vms: u32,
    /// VMs created per scaler pass in the scale-out measurement.
    #[arg(long, default_value_t = 25)]
    step: u32,
    /// Queue-time measurements of each kind.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// A line of figures, on standard output.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

fn spec(a: &BenchArgs, name: &str, min_idle: u32, max_size: u32, step: u32) -> FleetSpec {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    FleetSpec {
        dir: a.dir.join(name),
        http_addr: any,
        grpc_addr: any,
        min_idle,
        max_size,
        scale_up_step: step,
        github_app: false,
    }
}

/// VMs of the pool whose runner is online and waiting for a job.
async fn idle_vms(f: &Fleet) -> usize {
    f.server
        .app
        .store()
        .vms_list()
        .await
        .map(|v| v.iter().filter(|v| v.state == "idle").count())
        .unwrap_or(0)
}

/// Waits (bounded) until `cond`, checking every 20 ms; returns how long it took.
async fn until<F, Fut>(what: &str, limit: Duration, mut cond: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        anyhow::ensure!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// Queues one job and measures until it is in progress on a runner.
async fn queue_time(f: &Fleet, id: u64) -> anyhow::Result<Duration> {
    f.github.enqueue_job(Job {
        name: format!("bench #{id}"),
        job_key: "bench".into(),
        result: "Succeeded".into(),
        duration_ms: 500,
        run_id: id.to_string(),
        repository: "bench/app".into(),
        id,
        labels: vec!["self-hosted".into(), "demo".into()],
        ..Job::default()
    });
    let store = f.server.app.store();
    until("the job to start", Duration::from_secs(120), || async {
        store
            .job_get(i64::try_from(id).unwrap_or(i64::MAX))
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.status != "queued")
    })
    .await
}

fn summary(v: &[Duration]) -> String {
    let ms: Vec<u128> = v.iter().map(Duration::as_millis).collect();
    let min = ms.iter().min().copied().unwrap_or(0);
    let max = ms.iter().max().copied().unwrap_or(0);
    format!("{min}-{max} ms over {} runs ({ms:?})", ms.len())
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&a.dir);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..a.rounds {
        let f = Fleet::start(&spec(&a, &format!("cold-{round}"), 0, 4, 4)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        cold.push(queue_time(&f, 9000 + u64::from(round)).await?);
        f.stop().await;
        let f = Fleet::start(&spec(&a, &format!("warm-{round}"), 1, 4, 4)).await?;
        until("a warm VM", Duration::from_secs(120), || async {
            idle_vms(&f).await >= 1
        })
        .await?;
        warm.push(queue_time(&f, 9100 + u64::from(round)).await?);
        f.stop().await;
    }
    say!(
        "queued -> in_progress, cold pool (min_idle 0): {}",
        summary(&cold)
    );
    say!(
        "queued -> in_progress, warm pool (min_idle 1): {}",
        summary(&warm)
    );
    let n = a.vms;
    let started = Instant::now();
    let f = Fleet::start(&spec(&a, "scale", n, n, a.step)).await?;
    let store = f.server.app.store();
    until(
        "every VM to be created",
        Duration::from_secs(600),
        || async {
            store
                .instances_live("demo")
                .await
                .map(|i| i.len() >= n as usize)
                .unwrap_or(false)
        },
    )
    .await?;
    let created = started.elapsed();
    until(
        "every runner to be online",
        Duration::from_secs(900),
        || async { idle_vms(&f).await >= n as usize },
    )
    .await?;
    let online = started.elapsed();
    say!(
        "0 -> {n} VMs (step {}): all created in {:.1} s, all runners online in {:.1} s",
        a.step,
        created.as_secs_f64(),
        online.as_secs_f64()
    );
    f.stop().await;
    Ok(())
}
