//! `miglet-faults`: the fault-injection suite. It breaks a real controller and real agents
//! the way production does (`kill -9`, network partitions, full disks, floods) and checks
//! from the store, afterwards, that nothing acknowledged was lost or doubled and that every
//! part recovered. Each scenario prints its figures and checks; the exit code is non-zero if
//! any check failed.
//!
//! ```text
//! miglet-faults --scenario all                 # the full sizes (RELIABILITY.md)
//! miglet-faults --scenario all --small         # what the test suite and CI run
//! ```

mod crash;
mod disk;
mod floods;
mod harness;
mod partition;

use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Crash,
    Partition,
    Disk,
    Floods,
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "miglet-faults",
    about = "Break a controller and its agents, then check nothing was lost"
)]
struct Args {
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// The sizes the test suite runs (a few hundred agents, seconds per fault).
    #[arg(long)]
    small: bool,
    /// Simulated agents [default: 500; 100 with --small].
    #[arg(long)]
    agents: Option<usize>,
    /// Real `miglet` agents with jobs [default: 3; 2 with --small].
    #[arg(long)]
    real_agents: Option<usize>,
    /// `kill -9`s of the controller [default: 5; 2 with --small].
    #[arg(long)]
    crashes: Option<usize>,
    /// How long the partition lasts, all modes together [default: 60; 20 with --small].
    #[arg(long)]
    partition_secs: Option<u64>,
    /// Write the report as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the working directory (logs, stores) instead of removing it.
    #[arg(long)]
    keep: bool,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Opts {
    pub agents: usize,
    pub real_agents: usize,
    pub crashes: usize,
    pub partition_secs: u64,
    pub events_per_sec: f64,
    pub commands_per_sec: f64,
    pub flood_sockets: usize,
    pub streams_one_vm: usize,
    pub enrollments: usize,
    pub slow_handshakes: usize,
}

/// One thing a scenario checks, with what it saw and what it needed.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: String,
    pub got: f64,
    pub want: String,
    pub ok: bool,
}

impl Check {
    pub fn new(what: &str, got: usize, want: usize) -> Check {
        Check {
            what: what.into(),
            got: got as f64,
            want: want.to_string(),
            ok: got == want,
        }
    }

    pub fn at_least(what: &str, got: f64, min: f64) -> Check {
        Check {
            what: what.into(),
            got,
            want: format!(">= {min}"),
            ok: got >= min,
        }
    }

    pub fn at_most(what: &str, got: f64, max: f64) -> Check {
        Check {
            what: what.into(),
            got,
            want: format!("<= {max}"),
            ok: got <= max,
        }
    }
}

/// Waits (bounded) until `cond` holds.
pub async fn wait_for(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > within {
            anyhow::bail!("timed out after {} s waiting for {what}", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

#[allow(clippy::print_stdout)]
fn print_scenario(name: &str, figures: &Value, checks: &[Check], secs: f64) {
    println!("\n== {name} ({secs:.0} s)");
    if let Some(o) = figures.as_object() {
        for (k, v) in o {
            println!("  {k:<40} {v}");
        }
    }
    for c in checks {
        println!(
            "  [{}] {:<60} {} (want {})",
            if c.ok { "ok" } else { "FAILED" },
            c.what,
            c.got,
            c.want
        );
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let small = args.small;
    let o = Opts {
        agents: args.agents.unwrap_or(if small { 100 } else { 500 }),
        real_agents: args.real_agents.unwrap_or(if small { 2 } else { 3 }),
        crashes: args.crashes.unwrap_or(if small { 2 } else { 5 }),
        partition_secs: args.partition_secs.unwrap_or(if small { 20 } else { 60 }),
        events_per_sec: if small { 40.0 } else { 200.0 },
        commands_per_sec: if small { 2.0 } else { 5.0 },
        flood_sockets: if small { 5_000 } else { 15_000 },
        streams_one_vm: if small { 50 } else { 200 },
        enrollments: if small { 500 } else { 10_000 },
        slow_handshakes: if small { 200 } else { 1_000 },
    };
    let dir = std::env::temp_dir().join(format!("miglet-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let wanted = |s: Scenario| args.scenario == s || args.scenario == Scenario::All;
    let mut report = serde_json::Map::new();
    let mut failed = 0usize;
    let mut record = |name: &str, r: anyhow::Result<(Value, Vec<Check>)>, secs: f64| match r {
        Ok((figures, checks)) => {
            print_scenario(name, &figures, &checks, secs);
            failed += checks.iter().filter(|c| !c.ok).count();
            report.insert(
                name.into(),
                json!({
                    "secs": secs,
                    "figures": figures,
                    "checks": checks.iter().map(|c| json!({"what": c.what, "got": c.got, "want": c.want, "ok": c.ok})).collect::<Vec<_>>(),
                }),
            );
        }
        Err(e) => {
            failed += 1;
            eprintln!("\n== {name}: could not run: {e:#}");
            report.insert(name.into(), json!({"error": format!("{e:#}")}));
        }
    };
    for (s, name) in [
        (Scenario::Crash, "crash"),
        (Scenario::Partition, "partition"),
        (Scenario::Disk, "disk"),
        (Scenario::Floods, "floods"),
    ] {
        if !wanted(s) {
            continue;
        }
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub)?;
        if s == Scenario::Disk && !disk::can_mount(&sub) {
            // Without root nothing here can fill a disk on purpose; CI runs as root.
            if std::env::var_os("CI").is_some() {
                record(
                    name,
                    Err(anyhow::anyhow!(
                        "CI must run the disk scenario: it needs root to mount a tmpfs"
                    )),
                    0.0,
                );
            } else {
                eprintln!("\n== disk: SKIPPED (needs root to mount a tmpfs)");
                record(
                    name,
                    Ok((json!({"skipped": "needs root"}), Vec::new())),
                    0.0,
                );
            }
            continue;
        }
        eprintln!("\n[{name}] running ...");
        let started = Instant::now();
        let r = match s {
            Scenario::Crash => crash::run(&o, &sub).await,
            Scenario::Partition => partition::run(&o, &sub).await,
            Scenario::Disk => disk::run(&o, &sub).await,
            Scenario::Floods => floods::run(&o, &sub).await,
            Scenario::All => continue,
        };
        record(name, r, started.elapsed().as_secs_f64());
    }
    let report = Value::Object(report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if args.keep {
        eprintln!("\nWorking directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!(
        "\n{}",
        if failed == 0 {
            "Every check passed.".to_owned()
        } else {
            format!("{failed} check(s) failed.")
        }
    );
    Ok(if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
