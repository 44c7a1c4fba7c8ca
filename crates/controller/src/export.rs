//! `mig-controller export`: writes the sample controller's per-VM folder layout from the
//! store, so tools built on that folder keep working:
//!
//! ```text
//! OUT/{vm_id}/vm.json
//! OUT/{vm_id}/event-<type>-<YYYYMMDD-HHMMSS.mmm>.json
//! OUT/{vm_id}/heartbeat-<YYYYMMDD-HHMMSS.mmm>.json
//! OUT/{vm_id}/registration-token-request-<ts>.json   (as received)
//! OUT/{vm_id}/registration-token-response-<ts>.json  (token redacted)
//! OUT/{vm_id}/command-<type>-<ts>.json               (record and state history)
//! ```
//!
//! Times are UTC. Two files that would share a name get `-1`, `-2`, ... suffixes instead of
//! overwriting each other (the sample lost data that way).

use crate::store::{Store, StoreError, from_millis};
use miglet_proto::event::{EventReport, HeartbeatReport};
use miglet_proto::ids::validate_vm_id;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("failed to read the store")]
    Store(#[from] StoreError),
    #[error("failed to write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub vms: usize,
    pub files: usize,
}

fn stamp(ms: i64) -> String {
    from_millis(ms).format("%Y%m%d-%H%M%S%.3f").to_string()
}

struct VmDir {
    dir: PathBuf,
    used: HashSet<String>,
    written: usize,
}

impl VmDir {
    fn write(&mut self, stem: &str, contents: &str) -> Result<(), ExportError> {
        let mut name = format!("{stem}.json");
        let mut n = 0;
        while !self.used.insert(name.clone()) {
            n += 1;
            name = format!("{stem}-{n}.json");
        }
        let path = self.dir.join(&name);
        std::fs::write(&path, contents).map_err(|source| ExportError::Write {
            path: path.display().to_string(),
            source,
        })?;
        self.written += 1;
        Ok(())
    }
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into())
}

pub async fn export(store: &Store, out: &Path) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    for vm in store.vms_list().await? {
        if validate_vm_id(&vm.vm_id).is_err() {
            tracing::warn!(vm_id = %vm.vm_id, "Skipping a VM whose id is not safe as a folder name");
            continue;
        }
        let dir = out.join(&vm.vm_id);
        std::fs::create_dir_all(&dir).map_err(|source| ExportError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        let mut d = VmDir {
            dir,
            used: HashSet::new(),
            written: 0,
        };
        d.write("vm", &pretty(&vm))?;
        for e in store.events_for_vm(&vm.vm_id).await? {
            let body = if e.transport == "http" {
                e.raw.clone()
            } else {
                serde_json::from_str::<EventReport>(&e.data)
                    .map(|r| pretty(&r.to_json()))
                    .unwrap_or_else(|_| e.raw.clone())
            };
            d.write(
                &format!("event-{}-{}", e.event_type, stamp(e.received_at)),
                &body,
            )?;
        }
        for h in store.heartbeats_for_vm(&vm.vm_id).await? {
            let body = serde_json::from_str::<HeartbeatReport>(&h.report)
                .map(|r| pretty(&r.to_json(&vm.vm_id)))
                .unwrap_or_else(|_| h.report.clone());
            d.write(&format!("heartbeat-{}", stamp(h.received_at)), &body)?;
        }
        for r in store.registrations_for_vm(&vm.vm_id).await? {
            let ts = stamp(r.requested_at);
            d.write(&format!("registration-token-request-{ts}"), &r.request)?;
            d.write(&format!("registration-token-response-{ts}"), &r.response)?;
        }
        for c in store.commands_for_vm(&vm.vm_id).await? {
            let history = store.command_transitions(&c.id).await?;
            let doc = serde_json::json!({"command": c, "history": history});
            d.write(
                &format!("command-{}-{}", c.command_type, stamp(c.created_at)),
                &pretty(&doc),
            )?;
        }
        summary.vms += 1;
        summary.files += d.written;
    }
    Ok(summary)
}
