-- When each VM entered its current state, so a VM stuck in a transitional state shows in the
-- metrics (`mig_vm_oldest_in_state_seconds`).
ALTER TABLE vms ADD COLUMN state_since INTEGER;
UPDATE vms SET state_since = updated_at;
CREATE INDEX vms_state_since ON vms (state, state_since);
