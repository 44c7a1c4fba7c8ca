//! `migctl`: list and inspect VMs, search events, drain / shut down / change log levels, and
//! watch the fleet live, over the MIG controller's admin API.
//!
//! Endpoint and token come from flags, then `MIGCTL_*` variables, then the config file
//! (`$XDG_CONFIG_HOME/migctl/config.toml` or `~/.config/migctl/config.toml`, or `--config`).

mod client;
mod table;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::{Client, ClientError, Target};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "migctl",
    version,
    about = "Operate a fleet of MIGlet VMs through the MIG controller"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
struct ConnArgs {
    /// Controller URL [default: http://localhost:8080].
    #[arg(long, env = "MIGCTL_ENDPOINT", global = true)]
    endpoint: Option<String>,
    /// Operator token (prefer --token-file or the config file).
    #[arg(long, env = "MIGCTL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File holding the operator token.
    #[arg(long, env = "MIGCTL_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// CA bundle to trust for the controller's certificate.
    #[arg(long, env = "MIGCTL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (with --client-key).
    #[arg(long, env = "MIGCTL_CLIENT_CERT", global = true)]
    client_cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, env = "MIGCTL_CLIENT_KEY", global = true)]
    client_key: Option<PathBuf>,
    /// Config file [default: $XDG_CONFIG_HOME/migctl/config.toml].
    #[arg(long, env = "MIGCTL_CONFIG", global = true)]
    config: Option<PathBuf>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    endpoint: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// VMs: list, show.
    #[command(subcommand)]
    Vms(VmsCmd),
    /// Events: search.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Pools with counts by state and health.
    Pools,
    /// Recent jobs from GitHub's webhooks: pool, VM, queue time, duration, result.
    Jobs {
        /// At most this many, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Drain a VM (or every VM of a pool): finish the running job, take no new one.
    Drain {
        #[command(flatten)]
        target: CommandTarget,
        /// Why (shown to the agent, in its logs and in the command's history).
        #[arg(long, default_value = "requested with migctl")]
        reason: String,
        /// Give up on the job after this many seconds.
        #[arg(long)]
        timeout_seconds: Option<i64>,
    },
    /// Shut a VM (or a pool's VMs) down.
    Shutdown {
        #[command(flatten)]
        target: CommandTarget,
        /// Why (shown to the agent, in its logs and in the command's history).
        #[arg(long, default_value = "requested with migctl")]
        reason: String,
        /// Stop the runner at once, cancelling a running job.
        #[arg(long)]
        force: bool,
    },
    /// Change an agent's log level.
    LogLevel {
        /// trace, debug, info, warn or error.
        level: String,
        #[command(flatten)]
        target: CommandTarget,
    },
    /// Follow events live (Ctrl-C to stop).
    Watch {
        #[command(flatten)]
        filter: EventFilterArgs,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Args)]
struct CommandTarget {
    /// The VM.
    #[arg(required_unless_present = "pool", conflicts_with = "pool")]
    vm: Option<String>,
    /// Every live VM of this pool instead.
    #[arg(long)]
    pool: Option<String>,
    /// Wait until each command is acknowledged (or failed, or expired).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, seconds.
    #[arg(long, default_value_t = 120)]
    wait_timeout: u64,
}

#[derive(Debug, Subcommand)]
enum VmsCmd {
    /// List VMs.
    List {
        /// Only VMs of this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Only VMs in this state (ready, idle, job_running, draining, ...).
        #[arg(long)]
        state: Option<String>,
        /// healthy, unhealthy or lost.
        #[arg(long)]
        health: Option<String>,
        /// Runner label of the VM's pool.
        #[arg(long)]
        label: Option<String>,
        /// Text in the VM id or its current job.
        #[arg(long, short = 'q')]
        query: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Follow pages to the end.
        #[arg(long)]
        all: bool,
    },
    /// One VM with its timeline.
    Show {
        vm: String,
        /// Timeline entries to show (most recent).
        #[arg(long, default_value_t = 50)]
        timeline: u32,
    },
}

#[derive(Debug, Args)]
struct EventFilterArgs {
    /// Event types, comma-separated.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only this VM's events.
    #[arg(long)]
    vm: Option<String>,
    /// Only events of this pool's VMs.
    #[arg(long)]
    pool: Option<String>,
    /// Text inside a value of the event (repository, job, run id, reason, ...).
    #[arg(long, short = 'q')]
    query: Option<String>,
}

#[derive(Debug, Subcommand)]
enum EventsCmd {
    /// Search events, newest first.
    Search {
        #[command(flatten)]
        filter: EventFilterArgs,
        /// Received at or after (RFC 3339 or Unix ms).
        #[arg(long)]
        since: Option<String>,
        /// Received before (RFC 3339 or Unix ms).
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn config_path(explicit: &Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("migctl/config.toml"))
}

fn target(c: &ConnArgs) -> anyhow::Result<Target> {
    let file: FileConfig = match config_path(&c.config) {
        Some(p) if p.exists() || c.config.is_some() => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("config file {} is not valid: {}", p.display(), e.message())
            })?
        }
        _ => FileConfig::default(),
    };
    let token = match (&c.token, &c.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(read_token(f)?),
        (None, None) => match (&file.token, &file.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(read_token(f)?),
            (None, None) => None,
        },
    };
    let client_cert = match (
        c.client_cert.clone().or(file.client_cert),
        c.client_key.clone().or(file.client_key),
    ) {
        (Some(a), Some(b)) => Some((a, b)),
        (None, None) => None,
        _ => anyhow::bail!("--client-cert and --client-key go together"),
    };
    Ok(Target {
        endpoint: c
            .endpoint
            .clone()
            .or(file.endpoint)
            .unwrap_or_else(|| "http://localhost:8080".into()),
        token,
        ca_file: c.ca_file.clone().or(file.ca_file),
        client_cert,
    })
}

fn read_token(path: &PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?
        .trim()
        .to_owned())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// "2026-11-23T00:01:02.345Z" -> "2026-11-23 00:01:02".
fn when(v: &Value) -> String {
    v.as_str()
        .map(|t| t.replace('T', " ").chars().take(19).collect())
        .unwrap_or_else(|| "-".into())
}

fn ago(v: &Value) -> String {
    let Some(t) = v
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    else {
        return "-".into();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

#[allow(clippy::print_stdout)]
fn emit(output: Output, json: &Value, table: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(json).unwrap_or_default()),
        Output::Table => print!("{}", table()),
    }
}

fn vm_rows(vms: &[Value]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|v| {
            vec![
                s(&v["vm_id"]),
                s(&v["pool_id"]),
                s(&v["state"]),
                s(&v["health"]),
                if v["connected"] == true {
                    "stream"
                } else {
                    "-"
                }
                .into(),
                v["current_job"]["run_id"]
                    .as_str()
                    .map(|r| {
                        format!(
                            "{} {}",
                            r,
                            v["current_job"]["repository"].as_str().unwrap_or("")
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                ago(&v["last_heartbeat_at"]),
            ]
        })
        .collect()
}

const VM_HEADER: [&str; 7] = ["VM", "POOL", "STATE", "HEALTH", "LINK", "JOB", "HEARTBEAT"];

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&target(&cli.conn)?)?;
    let out = cli.output;
    match cli.command {
        Cmd::Vms(VmsCmd::List {
            pool,
            state,
            health,
            label,
            query,
            limit,
            all,
        }) => {
            let mut vms = Vec::new();
            let mut cursor = String::new();
            loop {
                let page = client
                    .get(
                        "/api/v1/admin/vms",
                        &[
                            ("pool", pool.clone().unwrap_or_default()),
                            ("state", state.clone().unwrap_or_default()),
                            ("health", health.clone().unwrap_or_default()),
                            ("label", label.clone().unwrap_or_default()),
                            ("q", query.clone().unwrap_or_default()),
                            ("limit", limit.to_string()),
                            ("cursor", cursor.clone()),
                        ],
                    )
                    .await?;
                vms.extend(page["vms"].as_array().cloned().unwrap_or_default());
                match page["next_cursor"].as_str() {
                    Some(c) if all => cursor = c.to_owned(),
                    _ => break,
                }
            }
            let json = json!({ "vms": vms });
            emit(out, &json, || {
                if vms.is_empty() {
                    let filters = [
                        ("pool", &pool),
                        ("state", &state),
                        ("health", &health),
                        ("label", &label),
                        ("query", &query),
                    ];
                    let named: Vec<String> = filters
                        .iter()
                        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {v:?}")))
                        .collect();
                    return if named.is_empty() {
                        "No VMs yet: none has contacted the controller.\n".into()
                    } else {
                        format!("No VMs match {}.\n", named.join(", "))
                    };
                }
                table::render(&VM_HEADER, &vm_rows(&vms))
            });
        }
        Cmd::Vms(VmsCmd::Show { vm, timeline }) => {
            let detail = client.get(&format!("/api/v1/admin/vms/{vm}"), &[]).await?;
            let tl = client
                .get(
                    &format!("/api/v1/admin/vms/{vm}/timeline"),
                    &[("limit", timeline.to_string())],
                )
                .await?;
            let json = json!({ "vm": detail["vm"], "commands": detail["commands"], "timeline": tl["entries"] });
            emit(out, &json, || {
                let v = &detail["vm"];
                let mut t = table::render(&VM_HEADER, &vm_rows(std::slice::from_ref(v)));
                t.push_str(&format!(
                    "\nboot {} (#{}) since {}; runner {}; agent {}\n",
                    s(&v["boot_id"]),
                    s(&v["boot_seq"]),
                    when(&v["booted_at"]),
                    s(&v["runner_state"]),
                    s(&v["agent_version"])
                ));
                if let Some(h) = v["latest_health"].as_object() {
                    t.push_str(&format!(
                        "health: cpu {}%, memory {} / {} bytes, disk {} / {} bytes\n",
                        s(&h["cpu_percent"].clone()),
                        s(&h["memory_used_bytes"].clone()),
                        s(&h["memory_total_bytes"].clone()),
                        s(&h["disk_used_bytes"].clone()),
                        s(&h["disk_total_bytes"].clone()),
                    ));
                }
                t.push_str("\nTIMELINE\n");
                let rows: Vec<Vec<String>> = tl["entries"]
                    .as_array()
                    .map(|e| {
                        e.iter()
                            .map(|e| {
                                vec![
                                    when(&e["at"]),
                                    s(&e["source"]),
                                    s(&e["what"]),
                                    e["detail"].as_str().unwrap_or("").to_owned(),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                t.push_str(&table::render(
                    &["WHEN (UTC)", "SOURCE", "WHAT", "DETAIL"],
                    &rows,
                ));
                t
            });
        }
        Cmd::Events(EventsCmd::Search {
            filter,
            since,
            until,
            limit,
        }) => {
            let page = client
                .get(
                    "/api/v1/admin/events",
                    &[
                        ("type", filter.event_type.unwrap_or_default()),
                        ("vm", filter.vm.unwrap_or_default()),
                        ("pool", filter.pool.unwrap_or_default()),
                        ("q", filter.query.unwrap_or_default()),
                        ("since", since.unwrap_or_default()),
                        ("until", until.unwrap_or_default()),
                        ("limit", limit.to_string()),
                    ],
                )
                .await?;
            emit(out, &page, || {
                let events = page["events"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                if events.is_empty() {
                    return "No events match.\n".into();
                }
                event_table(events)
            });
        }
        Cmd::Pools => {
            let pools = client.get("/api/v1/admin/pools", &[]).await?;
            emit(out, &pools, || {
                let rows: Vec<Vec<String>> = pools["pools"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .map(|p| {
                                let counts = |k: &str| {
                                    p[k].as_object()
                                        .map(|m| {
                                            m.iter()
                                                .map(|(k, v)| format!("{k}={v}"))
                                                .collect::<Vec<_>>()
                                                .join(" ")
                                        })
                                        .unwrap_or_default()
                                };
                                vec![
                                    s(&p["pool_id"]),
                                    s(&p["total"]),
                                    s(&p["connected"]),
                                    counts("by_state"),
                                    counts("by_health"),
                                    match p["alert"]["message"].as_str() {
                                        Some(a) => format!("alert: {a}"),
                                        None => registration_status(&p["registration"]),
                                    },
                                    scaling_status(&p["scaling"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if rows.is_empty() {
                    return "No pools yet: no VM has contacted the controller.\n".into();
                }
                table::render(
                    &[
                        "POOL", "VMS", "STREAMS", "STATES", "HEALTH", "RUNNERS", "SCALING",
                    ],
                    &rows,
                )
            });
        }
        Cmd::Jobs { limit } => {
            let jobs = client
                .get("/api/v1/admin/jobs", &[("limit", limit.to_string())])
                .await?;
            emit(out, &jobs, || {
                let secs = |v: &Value| {
                    v.as_i64()
                        .map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0))
                };
                let rows: Vec<Vec<String>> = jobs["jobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|j| {
                        vec![
                            s(&j["job_id"]),
                            s(&j["repository"]),
                            s(&j["name"]),
                            s(&j["pool_id"]),
                            s(&j["vm_id"]),
                            s(&j["status"]),
                            s(&j["conclusion"]),
                            secs(&j["queue_ms"]),
                            secs(&j["duration_ms"]),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    return "No jobs yet: none came in through the GitHub webhook.\n".into();
                }
                table::render(
                    &[
                        "JOB",
                        "REPOSITORY",
                        "NAME",
                        "POOL",
                        "VM",
                        "STATUS",
                        "RESULT",
                        "QUEUED",
                        "RAN",
                    ],
                    &rows,
                )
            });
        }
        Cmd::Drain {
            target,
            reason,
            timeout_seconds,
        } => {
            let mut params = json!({ "reason": reason });
            if let Some(t) = timeout_seconds {
                params["timeout_seconds"] = json!(t);
            }
            send(&client, out, &target, "drain", params).await?;
        }
        Cmd::Shutdown {
            target,
            reason,
            force,
        } => {
            send(
                &client,
                out,
                &target,
                "shutdown",
                json!({ "reason": reason, "force": force }),
            )
            .await?;
        }
        Cmd::LogLevel { level, target } => {
            send(
                &client,
                out,
                &target,
                "set_log_level",
                json!({ "level": level }),
            )
            .await?;
        }
        Cmd::Watch { filter, count } => {
            let mut seen = 0usize;
            client
                .watch(
                    &[
                        ("type", filter.event_type.unwrap_or_default()),
                        ("vm", filter.vm.unwrap_or_default()),
                        ("pool", filter.pool.unwrap_or_default()),
                        ("q", filter.query.unwrap_or_default()),
                    ],
                    || eprintln!("Watching live events (Ctrl-C to stop)."),
                    |ev| {
                        print_event(out, &ev);
                        seen += 1;
                        count.is_none_or(|c| seen < c)
                    },
                )
                .await?;
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_event(out: Output, ev: &Value) {
    match out {
        Output::Json => println!("{ev}"),
        Output::Table => println!(
            "{}  {:<20}  {:<18}  {}",
            when(&ev["received_at"]),
            s(&ev["vm_id"]),
            s(&ev["type"]),
            compact(&ev["data"])
        ),
    }
}

fn compact(v: &Value) -> String {
    let text = match v {
        Value::Object(m) => m
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "vm_id" | "pool_id" | "org_id"))
            .map(|(k, v)| format!("{k}={}", s(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => s(other),
    };
    text.chars().take(120).collect()
}

fn event_table(events: &[Value]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                s(&e["seq"]),
                when(&e["received_at"]),
                s(&e["vm_id"]),
                s(&e["type"]),
                compact(&e["data"]),
            ]
        })
        .collect();
    table::render(&["SEQ", "RECEIVED (UTC)", "VM", "TYPE", "DATA"], &rows)
}

/// Queues `command_type` for the target and, with `--wait`, follows each command until it
/// is acknowledged, failed or expired.
async fn send(
    client: &Client,
    out: Output,
    target: &CommandTarget,
    command_type: &str,
    parameters: Value,
) -> anyhow::Result<()> {
    let body = json!({ "type": command_type, "parameters": parameters });
    let mut commands: Vec<Value> = match (&target.vm, &target.pool) {
        (Some(vm), _) => {
            let r = client
                .post(&format!("/api/v1/admin/vms/{vm}/commands"), &body)
                .await
                .map_err(|e| match e {
                    ClientError::Api { status: 404, .. } => anyhow::anyhow!(
                        "no VM {vm:?} on this controller (`migctl vms list` shows the VMs)"
                    ),
                    other => other.into(),
                })?;
            vec![r["command"].clone()]
        }
        (None, Some(pool)) => {
            let r = client
                .post(&format!("/api/v1/admin/pools/{pool}/commands"), &body)
                .await
                .map_err(|e| match e {
                    ClientError::Api { status: 404, .. } => anyhow::anyhow!(
                        "pool {pool:?} has no VMs on this controller (`migctl pools` shows the pools with VMs)"
                    ),
                    other => other.into(),
                })?;
            for (vm, why) in r["skipped"].as_object().into_iter().flatten() {
                eprintln!("Skipped {vm}: {}", s(why));
            }
            r["commands"].as_array().cloned().unwrap_or_default()
        }
        (None, None) => anyhow::bail!("name a VM or --pool"),
    };
    if target.wait {
        wait_for_acks(client, target, &mut commands).await?;
    }
    let failed = commands
        .iter()
        .filter(|c| matches!(c["state"].as_str(), Some("failed" | "expired")))
        .count();
    let json = json!({ "commands": commands });
    emit(out, &json, || {
        let rows: Vec<Vec<String>> = commands
            .iter()
            .map(|c| {
                vec![
                    s(&c["id"]),
                    s(&c["vm_id"]),
                    s(&c["type"]),
                    s(&c["state"]),
                    c["result_message"].as_str().unwrap_or("").to_owned(),
                ]
            })
            .collect();
        table::render(&["COMMAND", "VM", "TYPE", "STATE", "RESULT"], &rows)
    });
    if failed > 0 {
        anyhow::bail!("{failed} command(s) failed or expired");
    }
    Ok(())
}

/// Follows each command until it is acknowledged, failed or expired, saying on standard
/// error what it waits for and how far it got.
async fn wait_for_acks(
    client: &Client,
    target: &CommandTarget,
    commands: &mut [Value],
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(target.wait_timeout);
    let total = commands.len();
    let done = |c: &Value| {
        matches!(
            c["state"].as_str(),
            Some("acknowledged" | "failed" | "expired")
        )
    };
    eprintln!(
        "Waiting up to {} s for {total} command(s) to be acknowledged by their VMs...",
        target.wait_timeout
    );
    let mut last_report = tokio::time::Instant::now();
    loop {
        for c in commands.iter_mut().filter(|c| !done(c)) {
            let id = s(&c["id"]);
            let d = client
                .get(&format!("/api/v1/admin/commands/{id}"), &[])
                .await?;
            *c = d["command"].clone();
            if done(c) {
                eprintln!(
                    "  {} on {}: {}",
                    s(&c["type"]),
                    s(&c["vm_id"]),
                    s(&c["state"])
                );
            }
        }
        let waiting: Vec<&Value> = commands.iter().filter(|c| !done(c)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let list: Vec<String> = waiting
                .iter()
                .map(|c| format!("{} ({})", s(&c["vm_id"]), s(&c["state"])))
                .collect();
            anyhow::bail!(
                "{} of {total} command(s) not acknowledged after {} s: {} (an agent acknowledges when it next connects or polls)",
                waiting.len(),
                target.wait_timeout,
                list.join(", ")
            );
        }
        if now - last_report >= Duration::from_secs(5) {
            last_report = now;
            let delivered = waiting.iter().filter(|c| c["state"] == "delivered").count();
            eprintln!(
                "  {}/{total} done; still waiting on {} ({delivered} delivered, {} not picked up yet)",
                total - waiting.len(),
                waiting
                    .iter()
                    .map(|c| s(&c["vm_id"]))
                    .collect::<Vec<_>>()
                    .join(", "),
                waiting.len() - delivered
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A sized pool at a glance: `-` (VMs made by someone else), or wanted vs there, busy,
/// queued jobs, the last hour's median queue time and the provider's last error.
fn scaling_status(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let mut out = format!(
        "{} {}/{} wanted (max {}), {} busy, {} queued",
        s(&v["provider"]),
        s(&v["actual"]),
        s(&v["desired"]),
        s(&v["max_size"]),
        s(&v["busy"]),
        s(&v["queued_jobs"]),
    );
    if let Some(p50) = v["queue"]["p50_seconds"].as_f64() {
        out.push_str(&format!(
            ", waited {p50:.1} s (p90 {:.1} s)",
            v["queue"]["p90_seconds"].as_f64().unwrap_or(p50)
        ));
    }
    if let Some(e) = v["last_error"].as_str() {
        out.push_str(&format!("; error: {e}"));
    }
    if let Some(t) = v["provider_trouble"].as_str() {
        out.push_str(&format!("; {t}"));
    }
    out
}

/// A pool's GitHub minting at a glance: `-` (not minting), `ok`, or the last error.
fn registration_status(r: &Value) -> String {
    if r.is_null() {
        return "-".into();
    }
    match r["last_error"].as_str() {
        Some(e) => format!("error: {e}"),
        None if r["last_ok_at"].is_i64() => "ok".into(),
        None => "not used yet".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_pool_shows_wanted_and_there() {
        assert_eq!(scaling_status(&Value::Null), "-");
        let v = serde_json::json!({"provider": "local", "actual": 3, "desired": 5, "max_size": 10,
            "busy": 2, "queued_jobs": 4, "last_error": null});
        assert_eq!(
            scaling_status(&v),
            "local 3/5 wanted (max 10), 2 busy, 4 queued"
        );
        let v = serde_json::json!({"provider": "local", "actual": 3, "desired": 5, "max_size": 10,
            "busy": 2, "queued_jobs": 4, "last_error": null,
            "queue": {"jobs_started": 9, "p50_seconds": 1.25, "p90_seconds": 7.0}});
        assert_eq!(
            scaling_status(&v),
            "local 3/5 wanted (max 10), 2 busy, 4 queued, waited 1.2 s (p90 7.0 s)"
        );
        let v = serde_json::json!({"provider": "local", "actual": 0, "desired": 1, "max_size": 1,
            "busy": 0, "queued_jobs": 1, "last_error": "no such file"});
        assert!(scaling_status(&v).ends_with("; error: no such file"));
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn values_render_compactly() {
        assert_eq!(s(&Value::Null), "-");
        assert_eq!(
            when(&json!("2026-11-23T00:01:02.345Z")),
            "2026-11-23 00:01:02"
        );
        assert_eq!(
            compact(&json!({"vm_id":"x","run_id":"7","result":"Succeeded"})),
            "result=Succeeded run_id=7"
        );
    }
}
