//! When a VM is due a `register_runner`.

use crate::model::{Health, VmRecord};
use miglet_proto::state::MigletState;

/// States in which the agent is waiting for (or about to wait for) `register_runner`.
pub const PRE_REGISTRATION: &[&str] = &["initializing", "waiting_for_controller", "ready"];

/// Whether the VM should be issued a `register_runner` now: it waits in `ready` in its
/// current boot (it has announced itself), has no live registration command and no
/// registered runner. A VM that only reported itself still waiting for its `vm_started`
/// acknowledgment is not sent one: it would have to refuse it.
pub fn needs_registration(vm: &VmRecord) -> bool {
    vm.registration_command_id.is_none()
        && !vm.runner_registered
        && vm.health != Health::Lost
        && vm.state == MigletState::Ready.as_str()
}
