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
        let reg = pool_registration(id, p, auth_mode, &mut accounts)?;
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
