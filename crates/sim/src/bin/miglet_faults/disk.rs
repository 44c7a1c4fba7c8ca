//! Disk: the controller's data dir and a real agent's data dir each on a small tmpfs that is
//! filled up while the fleet works, then freed. While full the controller refuses writes with
//! an error (logged at ERROR with what to do) and acknowledges nothing it did not store; the
//! agent keeps its events in memory, stops taking work and says so; when space returns both
//! recover and every acknowledged event is in the store once. Needs root (to mount tmpfs).

use crate::harness::{Ctl, RealAgent, SimFleet, github, job};
use crate::{Check, Opts};
use anyhow::{Context, bail};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A tmpfs of `size` mounted at `at`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .context("mount")?;
        if !status.success() {
            bail!("mount -t tmpfs failed ({status})");
        }
        Ok(Tmpfs(at.to_owned()))
    }

    /// Writes a file until the filesystem is full; the file's path.
    fn fill(&self) -> anyhow::Result<PathBuf> {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The files of a directory with their sizes, and the free space of its filesystem.
fn sizes(dir: &Path) -> serde_json::Value {
    let mut files = serde_json::Map::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let len = e.metadata().map_or(0, |m| m.len());
        files.insert(e.file_name().to_string_lossy().into_owned(), json!(len));
    }
    if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
        files.insert(
            "(free bytes)".into(),
            json!(st.blocks_available().saturating_mul(st.fragment_size())),
        );
    }
    serde_json::Value::Object(files)
}

/// Whether this process may mount (root, with the capability).
pub fn can_mount(dir: &Path) -> bool {
    nix::unistd::Uid::effective().is_root() && Tmpfs::mount(&dir.join("probe"), "1m").is_ok()
}

pub async fn run(o: &Opts, dir: &Path) -> anyhow::Result<(serde_json::Value, Vec<Check>)> {
    let (gh, github_url) = github().await?;
    let data = Tmpfs::mount(&dir.join("ctl").join("data"), "24m")?;
    let mut ctl = Ctl::start(
        &dir.join("ctl"),
        // A command whose acknowledgment could not be stored goes out again soon.
        &[
            "--heartbeat-interval-secs",
            "2",
            "--redelivery-timeout-secs",
            "2",
        ],
        &github_url,
    )
    .await?;
    let agents = o.agents.min(200);
    let mut sim = SimFleet::start(&ctl, agents, 0.2, Duration::from_secs(2)).await?;
    sim.wait_up(agents, Duration::from_secs(60)).await?;
    // A real agent whose disk fills up before its job comes.
    let agent_dir = Tmpfs::mount(&dir.join("agent-disk"), "2m")?;
    let mut real = RealAgent::spawn(
        dir,
        &ctl,
        "real-disk",
        &[("MIGLET_DATA_DIR", agent_dir.0.to_str().unwrap_or_default())],
    )?;
    let log_path = real.log.clone();
    crate::wait_for("the real agent's runner", Duration::from_secs(60), || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("State transition from=registering_runner to=idle")
    })
    .await?;
    sim.generate(o.events_per_sec.min(100.0), 2.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = &sim.fleet.counters;
    let acked_before = c.events_accepted.load(std::sync::atomic::Ordering::Relaxed);
    let filler = data.fill()?;
    let agent_filler = agent_dir.fill()?;
    eprintln!("[disk] both disks full");
    gh.enqueue_job(job("disk-job", 2_000));
    let log_path = real.log.clone();
    crate::wait_for(
        "the agent to find its spool full",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("The event spool refuses writes")
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retried_while_full = c.events_retried.load(std::sync::atomic::Ordering::Relaxed)
        + c.retries.load(std::sync::atomic::Ordering::Relaxed);
    std::fs::remove_file(&filler)?;
    std::fs::remove_file(&agent_filler)?;
    eprintln!("[disk] space back");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let files_after = sizes(&data.0);
    let acked_after = c.events_accepted.load(std::sync::atomic::Ordering::Relaxed);
    sim.stop_generating().await;
    let exit = real.wait(Duration::from_secs(90)).await?;
    let not_acked = sim
        .wait_commands_acknowledged(Duration::from_secs(20))
        .await;
    let fleet = sim.stop().await;
    ctl.stop().await?;
    let store = ctl.store().await?;
    let stored = fleet.check_store(&store).await?;
    let real_types: Vec<String> = store
        .events_for_vm("real-disk")
        .await?
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    store.close().await;
    let logs = ctl.logs();
    let full_logged = logs.lines().any(|l| {
        l.contains("\"level\":\"ERROR\"") && l.contains("the disk holding the data dir is full")
    });
    let agent_log = std::fs::read_to_string(&real.log).unwrap_or_default();
    let spool_logged = agent_log
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("The event spool refuses writes"));
    let once = |ty: &str| real_types.iter().filter(|t| *t == ty).count();
    drop(agent_dir);
    drop(data);
    let checks = vec![
        Check::new("acknowledged events lost", stored.lost, 0),
        Check::new("events stored twice", stored.duplicated, 0),
        Check::new(
            "acknowledged HTTP heartbeats lost",
            stored.http_heartbeats_lost as usize,
            0,
        ),
        Check::at_least(
            "sends retried while the disk was full",
            retried_while_full as f64,
            1.0,
        ),
        Check::at_least(
            "events acknowledged after space came back",
            (acked_after - acked_before) as f64,
            1.0,
        ),
        Check::new("queued commands not acknowledged", not_acked, 0),
        Check::new(
            "controller said the disk is full, at ERROR, with what to do",
            usize::from(full_logged),
            1,
        ),
        Check::new(
            "agent said its spool refuses writes, at ERROR",
            usize::from(spool_logged),
            1,
        ),
        Check::new("real agent exit code", exit.unwrap_or(-1) as usize, 0),
        Check::new(
            "real agent's job_completed stored",
            once("job_completed"),
            1,
        ),
        Check::new("real agent's job_started stored", once("job_started"), 1),
    ];
    let figures = json!({
        "agents": agents,
        "events_acknowledged": stored.acknowledged,
        "retried_while_full": retried_while_full,
        "real_agent_events": real_types,
        "controller_data_5s_after_space_came_back": files_after,
    });
    Ok((figures, checks))
}
