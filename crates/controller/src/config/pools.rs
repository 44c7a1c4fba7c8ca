//! `[pools.*]`: each pool's runner settings, token source and enrollment, checked.

use super::github::Accounts;
use super::*;

/// Every pool's registration, by id (`*` is the fallback for pools not listed), and
/// whether these are the development defaults (no `[pools]` at all).
pub(super) fn build_pools(
    args: &ServeArgs,
    pools: &HashMap<String, PoolConfig>,
    data_dir: &Path,
    auth_mode: AuthMode,
    metrics: &crate::github::metrics::GitHubMetrics,
) -> Result<(Pools, bool), ConfigError> {
    if pools.is_empty() {
        return Ok((
            Pools::new(HashMap::new(), Some(dev_pool(args, data_dir)?)),
            true,
        ));
    }
    let mut by_id = HashMap::new();
    let mut fallback = None;
    let mut accounts = Accounts::new(metrics.clone());
    for (id, p) in pools {
        let reg = pool_registration(id, p, auth_mode, &mut accounts, data_dir)?;
        if id == "*" {
            fallback = Some(reg);
        } else {
            by_id.insert(id.clone(), reg);
        }
    }
    Ok((Pools::new(by_id, fallback), false))
}

/// Without `[pools]`: one fallback pool for development, with the flags' token and runner
/// URL (or stand-ins) and the data dir's development bootstrap secret.
fn dev_pool(args: &ServeArgs, data_dir: &Path) -> Result<PoolRegistration, ConfigError> {
    let token = args
        .static_token
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("DEV-NOT-A-GITHUB-TOKEN-{}", uuid::Uuid::new_v4().simple()));
    let runner_url = args
        .runner_url
        .clone()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "https://github.com/example-org".into());
    check_url("runner_url (MIG_CONTROLLER_RUNNER_URL)", &runner_url)?;
    Ok(PoolRegistration {
        runner_url,
        runner_group: default_group(),
        labels: default_labels(),
        token: Arc::new(StaticToken::new(
            token,
            Duration::from_secs(default_token_ttl()),
        )),
        scaling: None,
        enrollment: PoolEnrollment {
            bootstrap_secret_file: Some(dev_secret_file(data_dir)),
            ..PoolEnrollment::default()
        },
    })
}

/// One `[pools.<id>]` table, checked.
fn pool_registration(
    id: &str,
    p: &PoolConfig,
    auth_mode: AuthMode,
    accounts: &mut Accounts,
    data_dir: &Path,
) -> Result<PoolRegistration, ConfigError> {
    if id != "*" {
        miglet_proto::ids::validate_id("pool id", id).map_err(|e| ConfigError::Invalid {
            name: format!("pools.{id}"),
            reason: e.to_string(),
        })?;
    }
    let name = format!("pools.{id}");
    let ttl = Duration::from_secs(p.token_ttl_secs.max(1));
    let (token, runner_url): (Arc<dyn TokenSource>, String) =
        match (&p.token, &p.token_file, &p.github) {
            (Some(t), None, None) if !t.is_empty() => (
                Arc::new(StaticToken::new(t.clone(), ttl)),
                p.runner_url.clone(),
            ),
            (None, Some(f), None) => (
                Arc::new(TokenFile::new(f.clone(), ttl)),
                p.runner_url.clone(),
            ),
            (None, None, Some(g)) => {
                let (source, derived) = super::github::source(&name, g, accounts)?;
                let url = if p.runner_url.is_empty() {
                    derived
                } else {
                    p.runner_url.clone()
                };
                (source, url)
            }
            _ => {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "set exactly one of token or token_file, or a [github] table".into(),
                });
            }
        };
    check_url(&format!("{name}.runner_url"), &runner_url)?;
    Ok(PoolRegistration {
        runner_url,
        runner_group: p.runner_group.clone(),
        labels: p.labels.clone(),
        token,
        scaling: pool_scaling(id, p, data_dir)?,
        enrollment: pool_enrollment(&name, &p.enrollment, auth_mode)?,
    })
}

/// A pool's `[enrollment]`: at least one method when VMs must authenticate.
fn pool_enrollment(
    name: &str,
    e: &EnrollmentConfig,
    auth_mode: AuthMode,
) -> Result<PoolEnrollment, ConfigError> {
    if let Some(prefix) = &e.vm_id_prefix {
        miglet_proto::ids::validate_id("vm_id_prefix", prefix).map_err(|err| {
            ConfigError::Invalid {
                name: format!("{name}.enrollment.vm_id_prefix"),
                reason: err.to_string(),
            }
        })?;
    }
    let enrollment = PoolEnrollment {
        bootstrap_secret_file: e.bootstrap_secret_file.clone(),
        enrollment_tokens: e.enrollment_tokens,
        vm_id_prefix: e.vm_id_prefix.clone(),
        gce: e.gce.as_ref().map(|g| GceRule {
            project_id: g.project_id.clone(),
            zones: g.zones.clone(),
            instance_name_prefix: g.instance_name_prefix.clone(),
            service_account: g.service_account.clone(),
        }),
    };
    if auth_mode == AuthMode::Authenticated && !enrollment.any() {
        return Err(ConfigError::Invalid {
            name: format!("{name}.enrollment"),
            reason: "no enrollment method: set bootstrap_secret_file, enrollment_tokens = true and/or [gce], or its VMs can never connect".into(),
        });
    }
    if enrollment
        .gce
        .as_ref()
        .is_some_and(|g| g.project_id.is_empty())
    {
        return Err(ConfigError::Invalid {
            name: format!("{name}.enrollment.gce.project_id"),
            reason: "is empty".into(),
        });
    }
    Ok(enrollment)
}

/// A pool's `[provider]` and sizing settings, checked: the scaler sizes only pools with a
/// provider; sizing settings without one are refused (they would do nothing).
fn pool_scaling(
    id: &str,
    p: &PoolConfig,
    data_dir: &Path,
) -> Result<Option<crate::provider::PoolScaling>, ConfigError> {
    let name = format!("pools.{id}");
    let invalid = |what: &str, reason: String| ConfigError::Invalid {
        name: format!("{name}.{what}"),
        reason,
    };
    let Some(prov) = &p.provider else {
        let sizing = p.min_idle.is_some()
            || p.max_size.is_some()
            || p.scale_up_step.is_some()
            || p.scale_up_per_minute.is_some();
        return if sizing {
            Err(invalid(
                "provider",
                "min_idle, max_size and scale_up_step size a pool the controller creates VMs for: add [pools.<id>.provider]".into(),
            ))
        } else {
            Ok(None)
        };
    };
    if id == "*" {
        return Err(invalid(
            "provider",
            "the \"*\" pool cannot have a provider: name the pool".into(),
        ));
    }
    let ms =
        |what: &str, v: Option<u64>, default: u64| -> Result<crate::model::Millis, ConfigError> {
            let secs = v.unwrap_or(default);
            if secs == 0 {
                return Err(invalid(what, "must be at least 1".into()));
            }
            Ok(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
        };
    let policy = crate::lifecycle::ScalePolicy {
        min_idle: p.min_idle.unwrap_or(0),
        max_size: p.max_size.unwrap_or(10),
        idle_timeout: ms("idle_timeout_secs", p.idle_timeout_secs, 600)?,
        max_vm_lifetime: ms("max_vm_lifetime_secs", p.max_vm_lifetime_secs, 86_400)?,
        boot_timeout: ms("boot_timeout_secs", p.boot_timeout_secs, 300)?,
        registration_timeout: ms(
            "registration_timeout_secs",
            p.registration_timeout_secs,
            300,
        )?,
        scale_up_step: p.scale_up_step.unwrap_or(10).max(1),
        scale_up_per_minute: match p.scale_up_per_minute {
            Some(0) => return Err(invalid("scale_up_per_minute", "must be at least 1".into())),
            other => other,
        },
    };
    if policy.min_idle > policy.max_size {
        return Err(invalid(
            "min_idle",
            format!(
                "{} is more than max_size {}",
                policy.min_idle, policy.max_size
            ),
        ));
    }
    let provider = provider_of(id, prov, data_dir)
        .map_err(|(what, reason)| invalid(&format!("provider.{what}"), reason))?;
    Ok(Some(crate::provider::PoolScaling { policy, provider }))
}

/// The pool's provider, from `[pools.<id>.provider]`; an error names the key at fault.
fn provider_of(
    id: &str,
    prov: &ProviderConfig,
    data_dir: &Path,
) -> Result<Arc<dyn crate::provider::Provider>, (&'static str, String)> {
    Ok(match prov.kind.as_str() {
        "local" => Arc::new(local_provider(id, prov, data_dir)?),
        "exec" => Arc::new(exec_provider(id, prov)?),
        "gce-mig" => Arc::new(super::gce::gce_provider(id, prov)?),
        other => {
            return Err((
                "kind",
                format!("{other:?} is not a provider this controller has (local, exec, gce-mig)"),
            ));
        }
    })
}

/// An `exec` provider's settings, checked.
fn exec_provider(
    id: &str,
    prov: &ProviderConfig,
) -> Result<crate::provider::exec::ExecProvider, (&'static str, String)> {
    let command = prov.command.clone().ok_or((
        "command",
        "required: the program that creates, deletes and lists the pool's VMs".into(),
    ))?;
    if !command.is_file() {
        return Err(("command", format!("{} is not a file", command.display())));
    }
    let timeout = match prov.timeout_secs.unwrap_or(120) {
        0 => return Err(("timeout_secs", "must be at least 1".into())),
        t => Duration::from_secs(t),
    };
    Ok(crate::provider::exec::ExecProvider::new(
        id,
        crate::provider::exec::ExecSettings {
            command,
            args: prov.args.clone(),
            env: prov
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            timeout,
        },
    ))
}

/// A `local` provider's settings, checked.
fn local_provider(
    id: &str,
    prov: &ProviderConfig,
    data_dir: &Path,
) -> Result<crate::provider::local::LocalProvider, (&'static str, String)> {
    let template = prov.runner_template.clone().ok_or((
        "runner_template",
        "required: the runner directory each VM gets a copy of".into(),
    ))?;
    if !template.join("config.sh").is_file() {
        return Err((
            "runner_template",
            format!(
                "{} holds no config.sh: give a runner directory",
                template.display()
            ),
        ));
    }
    let miglet_bin = match &prov.miglet_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("miglet")))
            .filter(|b| b.is_file())
            .unwrap_or_else(|| PathBuf::from("miglet")),
    };
    Ok(crate::provider::local::LocalProvider::new(
        crate::provider::local::LocalSettings {
            miglet_bin,
            runner_template: template,
            work_dir: prov
                .work_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("local-vms").join(id)),
            env: prov
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            args: prov.args.clone(),
            stop_grace: Duration::from_secs(prov.stop_grace_secs.unwrap_or(30)),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, FileConfig, ServeArgs, Settings};

    fn resolve(text: &str) -> Result<Settings, ConfigError> {
        let file: FileConfig = toml::from_str(text).unwrap_or_else(|e| panic!("test TOML: {e}"));
        Settings::resolve(ServeArgs::default(), file)
    }

    fn refused(text: &str) -> String {
        match resolve(text) {
            Err(ConfigError::Invalid { name, .. }) => name,
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("accepted an invalid configuration"),
        }
    }

    fn sized(runner: &std::path::Path, extra: &str) -> String {
        format!(
            "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\n\
             enrollment = {{ bootstrap_secret_file = \"/x\" }}\n{extra}\n\
             [pools.p.provider]\nkind = \"local\"\nrunner_template = {:?}\n",
            runner.display().to_string()
        )
    }

    #[test]
    fn a_sized_pool_reads_every_rule_and_refuses_what_cannot_work()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("config.sh"), "#!/bin/sh\n")?;
        let s = resolve(&sized(
            dir.path(),
            "min_idle = 2\nmax_size = 20\nidle_timeout_secs = 30\nscale_up_step = 5\nscale_up_per_minute = 40",
        ))?;
        let scaling = s.pools.get("p")?.scaling.as_ref().ok_or("not sized")?;
        let p = &scaling.policy;
        assert_eq!((p.min_idle, p.max_size, p.scale_up_step), (2, 20, 5));
        assert_eq!(p.scale_up_per_minute, Some(40));
        assert_eq!(p.idle_timeout, 30_000);
        assert_eq!(p.max_vm_lifetime, 86_400_000, "default");
        assert_eq!(
            resolve(&sized(dir.path(), ""))?
                .pools
                .get("p")?
                .scaling
                .as_ref()
                .and_then(|s| s.policy.scale_up_per_minute),
            None,
            "no rate limit unless set"
        );
        assert_eq!(
            refused(&sized(dir.path(), "scale_up_per_minute = 0")),
            "pools.p.scale_up_per_minute"
        );
        assert_eq!(
            refused(&sized(dir.path(), "min_idle = 5\nmax_size = 2")),
            "pools.p.min_idle"
        );
        let unsized_rate = "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\nscale_up_per_minute = 3\n";
        assert_eq!(refused(unsized_rate), "pools.p.provider");
        Ok(())
    }

    #[test]
    fn an_exec_pool_names_its_program() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let program = dir.path().join("provider");
        std::fs::write(&program, "#!/bin/sh\n")?;
        let pool = |provider: &str| {
            format!(
                "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\n\
                 enrollment = {{ bootstrap_secret_file = \"/x\" }}\nmax_size = 3\n\
                 [pools.p.provider]\nkind = \"exec\"\n{provider}\n"
            )
        };
        let ok = resolve(&pool(&format!(
            "command = {:?}\ntimeout_secs = 30",
            program.display().to_string()
        )))?;
        let scaling = ok.pools.get("p")?.scaling.as_ref().ok_or("not sized")?;
        assert_eq!(scaling.provider.kind(), "exec");
        assert_eq!(refused(&pool("")), "pools.p.provider.command");
        assert_eq!(
            refused(&pool("command = \"/no/such/provider\"")),
            "pools.p.provider.command"
        );
        assert_eq!(
            refused(&pool(&format!(
                "command = {:?}\ntimeout_secs = 0",
                program.display().to_string()
            ))),
            "pools.p.provider.timeout_secs"
        );
        assert_eq!(
            refused(&pool("").replace("exec", "gce")),
            "pools.p.provider.kind"
        );
        Ok(())
    }

    #[test]
    fn a_gce_mig_pool_names_its_group_and_how_to_reach_it() -> Result<(), Box<dyn std::error::Error>>
    {
        let pool = |id: &str, provider: &str| {
            format!(
                "[pools.{id}]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\n\
                 enrollment = {{ bootstrap_secret_file = \"/x\" }}\nmax_size = 3\n\
                 [pools.{id}.provider]\nkind = \"gce-mig\"\n{provider}\n"
            )
        };
        let good = "project = \"acme-ci\"\nzone = \"europe-west1-b\"\ninstance_group_manager = \"ci-runners\"";
        let ok = resolve(&pool("ci", good))?;
        let scaling = ok.pools.get("ci")?.scaling.as_ref().ok_or("not sized")?;
        assert_eq!(scaling.provider.kind(), "gce-mig");
        assert_eq!(
            refused(&pool("CI_Pool", good)),
            "pools.CI_Pool.provider.kind"
        );
        assert_eq!(
            refused(&pool(
                "ci",
                "project = \"acme-ci\"\ninstance_group_manager = \"ci-runners\""
            )),
            "pools.ci.provider.zone"
        );
        assert_eq!(
            refused(&pool("ci", &format!("{good}\nregion = \"europe-west1\""))),
            "pools.ci.provider.zone"
        );
        assert_eq!(
            refused(&pool(
                "ci",
                &format!("{good}\nunsafe_mig_settings = \"maybe\"")
            )),
            "pools.ci.provider.unsafe_mig_settings"
        );
        assert_eq!(
            refused(&pool(
                "ci",
                &format!("{good}\ncompute_api_url = \"http://evil.example\"")
            )),
            "pools.ci.provider.compute_api_url"
        );
        Ok(())
    }

    #[test]
    fn the_backstop_poll_has_defaults_and_bounds() -> Result<(), Box<dyn std::error::Error>> {
        let pool = "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\nenrollment = { bootstrap_secret_file = \"/x\" }\n";
        let b = resolve(pool)?.backstop;
        assert_eq!(b.interval, Some(std::time::Duration::from_secs(60)));
        assert_eq!(b.max_calls, 30);
        let off = resolve(&format!("[webhook]\nbackstop_interval_secs = 0\n{pool}"))?;
        assert_eq!(off.backstop.interval, None);
        assert_eq!(
            refused(&format!("[webhook]\nbackstop_max_calls = 0\n{pool}")),
            "webhook.backstop_max_calls"
        );
        assert_eq!(
            refused(&format!(
                "[webhook]\nbackstop_interval_secs = 100000\n{pool}"
            )),
            "webhook.backstop_interval_secs"
        );
        Ok(())
    }
}
