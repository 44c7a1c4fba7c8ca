//! One path per job: a VM announces itself (`vm_started` on either transport, or a stream
//! connect) through [`Controller::announce`], and a VM's record is written with the
//! `register_runner` it is due through [`Controller::put_vm_with_registration`], whoever
//! noticed (an event, a stream open, an HTTP poll, the reconciler).

use super::*;

impl Controller {
    /// A VM announcing itself: the lifecycle decides whether this starts a new boot, and
    /// the writes that open a boot go into `batch`. Returns the VM as it is now and whether
    /// a boot started.
    pub(super) fn announce(
        &self,
        batch: &mut Vec<Mutation>,
        existing: Option<&VmRecord>,
        vm_id: &str,
        contact: &Contact<'_>,
        now: Millis,
    ) -> (VmRecord, bool) {
        let (vm, new_boot) = lifecycle::on_contact(existing, vm_id, contact, now);
        if new_boot {
            let via = match contact.kind {
                ContactKind::VmStarted => "vm_started",
                ContactKind::Connect => "connect",
            };
            self.push_new_boot(batch, existing, &vm, now, via);
        }
        (vm, new_boot)
    }

    /// Puts the VM's record into `batch`, with the `register_runner` it is due now (if
    /// [`lifecycle::needs_registration`]) in the same atomic write. Returns that command;
    /// the caller calls [`Controller::registration_queued`] once the write is durable.
    pub(super) fn put_vm_with_registration(
        &self,
        batch: &mut Vec<Mutation>,
        vm: &mut VmRecord,
        now: Millis,
    ) -> Option<CommandRecord> {
        let registration = if lifecycle::needs_registration(vm) {
            self.prepare_registration(vm, now)
        } else {
            None
        };
        batch.push(Mutation::PutVm(vm.clone()));
        batch.extend(
            registration
                .iter()
                .map(|r| Mutation::InsertCommand(r.clone())),
        );
        registration
    }

    /// The writes that open a new boot: the old boot's unfinished registration is superseded
    /// and the boot is logged.
    pub(super) fn push_new_boot(
        &self,
        batch: &mut Vec<Mutation>,
        old: Option<&VmRecord>,
        vm: &VmRecord,
        now: Millis,
        via: &str,
    ) {
        if let Some(old_reg) = old.and_then(|o| o.registration_command_id.clone()) {
            batch.push(Mutation::CommandTransition {
                id: old_reg,
                to: CommandState::Expired,
                at: now,
                detail: Some("superseded by a new boot".into()),
                result_message: Some("superseded by a new boot of the VM".into()),
                result: None,
            });
        }
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm.vm_id.clone(),
            at: now,
            kind: "boot_started".into(),
            detail: Some(
                json!({"boot_id": vm.boot_id, "boot_seq": vm.boot_seq, "via": via}).to_string(),
            ),
        }));
    }
}
