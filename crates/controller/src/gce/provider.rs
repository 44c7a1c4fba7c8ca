//! The `gce-mig` provider: a pool's VMs are the named instances of one managed instance group.
//! VMs are created with `createInstances` (the scaler's names, each VM's settings as its own
//! metadata) and deleted only with `deleteInstances` naming them; `listManagedInstances` is the
//! truth (a name whose numeric `id` changed is another VM: autohealing recreated it). An
//! operation that is `DONE` means Compute scheduled the work.

use super::mig::{MigClient, MigError};
use super::rules::{self, SettingProblem};
use crate::provider::{InstanceSpec, Provider, ProviderError, ProviderFuture, ProviderInstance};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a call waits for its operation to be scheduled before the next pass looks.
const OP_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct GceMigProvider {
    client: MigClient,
    /// Refuse to scale while the group has settings that delete busy VMs (else warn).
    refuse_unsafe: bool,
}

fn provider_error(what: &str, e: MigError) -> ProviderError {
    let text = format!("{what}: {e}");
    if e.is_retryable() {
        ProviderError::Retryable(text)
    } else {
        ProviderError::Fatal(text)
    }
}

/// A VM's settings as metadata keys: `MIGLET_CONTROLLER_ENDPOINT` → `miglet-controller-endpoint`
/// (metadata keys are `[a-zA-Z0-9-_]`, and the agent reads them this way).
pub fn metadata_key(setting: &str) -> String {
    setting.to_ascii_lowercase().replace('_', "-")
}

impl GceMigProvider {
    pub fn new(client: MigClient, refuse_unsafe: bool) -> GceMigProvider {
        GceMigProvider {
            client,
            refuse_unsafe,
        }
    }

    /// Every managed instance of the group.
    async fn listed(&self) -> Result<Vec<serde_json::Value>, ProviderError> {
        self.client
            .list_managed()
            .await
            .map_err(|e| provider_error("listManagedInstances", e))
    }

    /// Waits (bounded) for the operation a mutation returned to be scheduled.
    async fn scheduled(
        &self,
        what: &str,
        asked: Result<serde_json::Value, MigError>,
    ) -> Result<(), ProviderError> {
        let op = asked.map_err(|e| provider_error(what, e))?;
        self.client
            .wait(&op, OP_WAIT)
            .await
            .map_err(|e| provider_error(what, e))?;
        Ok(())
    }

    /// The group's settings that delete or replace busy VMs (gcp.md §4.5).
    pub async fn check_settings(&self) -> Result<Vec<SettingProblem>, ProviderError> {
        let igm = self
            .client
            .get()
            .await
            .map_err(|e| provider_error("reading the MIG", e))?;
        Ok(rules::check_settings(
            &igm,
            None,
            self.client.mig.regional(),
        ))
    }
}

impl Provider for GceMigProvider {
    fn kind(&self) -> &'static str {
        "gce-mig"
    }

    fn create<'a>(&'a self, specs: &'a [InstanceSpec]) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let mut instances = Vec::new();
            for s in specs {
                if !rules::valid_instance_name(&s.name) {
                    return Err(ProviderError::Fatal(format!(
                        "{:?} is not a Compute instance name (lower-case letters, digits and -, a letter first): give the pool an id that is",
                        s.name
                    )));
                }
                let metadata: BTreeMap<String, String> = s
                    .settings
                    .iter()
                    .chain(&s.secret_files)
                    .map(|(k, v)| (metadata_key(k), v.clone()))
                    .collect();
                instances.push((s.name.clone(), metadata));
            }
            let request = uuid::Uuid::new_v4();
            let asked = self.client.create_instances(&instances, &request).await;
            self.scheduled("createInstances", asked).await
        })
    }

    fn delete<'a>(&'a self, names: &'a [String]) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let listed = self.listed().await?;
            let urls: Vec<String> = listed
                .iter()
                .filter(|mi| {
                    mi["name"]
                        .as_str()
                        .is_some_and(|n| names.iter().any(|x| x == n))
                        && mi["currentAction"] != "DELETING"
                })
                .filter_map(|mi| mi["instance"].as_str().map(str::to_owned))
                .collect();
            if urls.is_empty() {
                return Ok(());
            }
            let request = uuid::Uuid::new_v4();
            let asked = self.client.delete_instances(&urls, &request).await;
            self.scheduled("deleteInstances", asked).await
        })
    }

    fn preflight(&self) -> ProviderFuture<'_, Vec<String>> {
        Box::pin(async move {
            let problems: Vec<String> = self
                .check_settings()
                .await?
                .into_iter()
                .map(|p| {
                    format!(
                        "MIG {}: {} is {}: {}",
                        self.client.mig.name, p.setting, p.found, p.fix
                    )
                })
                .collect();
            if self.refuse_unsafe && !problems.is_empty() {
                return Err(ProviderError::Fatal(format!(
                    "not scaling (unsafe_mig_settings = \"refuse\"): {}",
                    problems.join("; ")
                )));
            }
            Ok(problems)
        })
    }

    fn list(&self) -> ProviderFuture<'_, Vec<ProviderInstance>> {
        Box::pin(async move {
            let listed = self.listed().await?;
            Ok(listed
                .iter()
                .filter_map(|mi| {
                    let name = rules::name_of(mi["name"].as_str().or(mi["instance"].as_str())?);
                    Some(ProviderInstance {
                        name: name.to_owned(),
                        id: mi["id"]
                            .as_str()
                            .filter(|i| !i.is_empty())
                            .map(str::to_owned),
                        status: rules::instance_status(mi),
                        created_at: None,
                        trouble: rules::create_trouble(mi).map(|t| match t {
                            rules::CreateTrouble::StockOut(m) => {
                                format!("stock-out, the MIG keeps trying: {m}")
                            }
                            rules::CreateTrouble::Quota(m) => {
                                format!("quota exceeded, raise it: {m}")
                            }
                            rules::CreateTrouble::Other(m) => m,
                        }),
                    })
                })
                .collect())
        })
    }
}
