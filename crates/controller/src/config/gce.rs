//! `[pools.<id>.provider] kind = "gce-mig"`: the group, the controller's Google credentials
//! and what to do about unsafe group settings, checked.

use super::file::ProviderConfig;
use crate::gce::auth::{GoogleAuth, GoogleCredentials, METADATA_BASE};
use crate::gce::mig::{COMPUTE_API, MigClient, MigLocation, MigRef};
use crate::gce::provider::GceMigProvider;
use crate::gce::rules::valid_instance_name;
use std::sync::Arc;

/// Longest pool id of a `gce-mig` pool: its VMs are named `<pool>-<12 hex>`, at most 63.
const MAX_POOL_ID: usize = 50;

pub(super) fn gce_provider(
    id: &str,
    prov: &ProviderConfig,
) -> Result<GceMigProvider, (&'static str, String)> {
    if id.len() > MAX_POOL_ID || !valid_instance_name(id) {
        return Err((
            "kind",
            format!(
                "a gce-mig pool's id names its VMs: {id:?} must be 1 to {MAX_POOL_ID} lower-case letters, digits and -, a letter first"
            ),
        ));
    }
    let name =
        |field: &'static str, v: &Option<String>| -> Result<String, (&'static str, String)> {
            match v {
                Some(s)
                    if valid_instance_name(s)
                        || (field == "project" && !s.is_empty() && s.len() <= 63) =>
                {
                    Ok(s.clone())
                }
                Some(s) => Err((field, format!("{s:?} is not a Compute name"))),
                None => Err((field, "required for gce-mig".into())),
            }
        };
    let location = match (&prov.zone, &prov.region) {
        (Some(_), None) => MigLocation::Zone(name("zone", &prov.zone)?),
        (None, Some(_)) => MigLocation::Region(name("region", &prov.region)?),
        _ => return Err(("zone", "give exactly one of zone or region".into())),
    };
    let mig = MigRef {
        project: name("project", &prov.project)?,
        location,
        name: name("instance_group_manager", &prov.instance_group_manager)?,
    };
    let credentials = match &prov.key_file {
        Some(f) => GoogleCredentials::KeyFile(f.clone()),
        None => GoogleCredentials::Metadata {
            base: prov
                .metadata_url
                .clone()
                .unwrap_or_else(|| METADATA_BASE.into()),
        },
    };
    let refuse = match prov.unsafe_mig_settings.as_deref().unwrap_or("warn") {
        "warn" => false,
        "refuse" => true,
        other => {
            return Err(("unsafe_mig_settings", format!("{other:?}: warn or refuse")));
        }
    };
    let clock = crate::clock::Clock::system();
    let auth = GoogleAuth::new(credentials, clock).map_err(|e| ("key_file", e.to_string()))?;
    let api = prov
        .compute_api_url
        .clone()
        .unwrap_or_else(|| COMPUTE_API.into());
    if !(api.starts_with("https://")
        || api.starts_with("http://127.0.0.1")
        || api.starts_with("http://localhost"))
    {
        return Err((
            "compute_api_url",
            format!("{api}: https, or http on loopback (a stand-in)"),
        ));
    }
    let client = MigClient::new(&api, Arc::new(auth), mig).map_err(|e| ("kind", e.to_string()))?;
    Ok(GceMigProvider::new(client, refuse))
}
