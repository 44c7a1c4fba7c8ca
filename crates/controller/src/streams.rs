//! Live gRPC streams by VM. At most one stream per VM: a new one replaces the old, which is
//! told to close. A stream unregisters only itself, never a newer stream of the same VM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What a stream session holds to hear about new commands and about being replaced.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    pub generation: u64,
    pub stream_id: String,
    /// Signalled when a command is queued for the VM.
    pub nudge: Arc<Notify>,
    /// Cancelled when a newer stream of the same VM replaces this one.
    pub replaced: CancellationToken,
    /// Cancelled when the controller ends the VM's stream (the VM moved to another pool).
    pub closed: CancellationToken,
}

#[derive(Debug, Default)]
pub struct Streams {
    next: AtomicU64,
    by_vm: Mutex<HashMap<String, StreamHandle>>,
}

impl Streams {
    /// Registers a new stream for `vm_id`, replacing (and cancelling) any older one.
    pub fn register(&self, vm_id: &str) -> StreamHandle {
        let generation = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = StreamHandle {
            generation,
            stream_id: uuid::Uuid::now_v7().simple().to_string(),
            nudge: Arc::new(Notify::new()),
            replaced: CancellationToken::new(),
            closed: CancellationToken::new(),
        };
        let old = self.lock().insert(vm_id.to_owned(), handle.clone());
        if let Some(old) = old {
            old.replaced.cancel();
        }
        handle
    }

    /// Removes the stream if it is still the VM's current one; says whether it was.
    pub fn unregister(&self, vm_id: &str, generation: u64) -> bool {
        let mut map = self.lock();
        if map.get(vm_id).is_some_and(|h| h.generation == generation) {
            map.remove(vm_id);
            true
        } else {
            false
        }
    }

    /// Ends the VM's stream, if it has one (its session sees [`StreamHandle::closed`]).
    pub fn close(&self, vm_id: &str) {
        if let Some(h) = self.lock().get(vm_id) {
            h.closed.cancel();
        }
    }

    /// Wakes the VM's stream, if it has one, to deliver queued commands.
    pub fn nudge(&self, vm_id: &str) {
        if let Some(h) = self.lock().get(vm_id) {
            h.nudge.notify_one();
        }
    }

    /// How many streams are open.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    pub fn is_connected(&self, vm_id: &str) -> bool {
        self.lock().contains_key(vm_id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StreamHandle>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.by_vm
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serializes work on one VM (read, decide, write) without a fleet-wide lock: VM ids hash
/// onto a fixed set of async mutexes.
#[derive(Debug)]
pub struct VmLocks {
    stripes: Vec<Arc<tokio::sync::Mutex<()>>>,
}

impl Default for VmLocks {
    fn default() -> Self {
        VmLocks {
            stripes: (0..1024)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
        }
    }
}

impl VmLocks {
    pub async fn lock(&self, vm_id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.stripe(vm_id).lock().await
    }

    /// The same lock as [`VmLocks::lock`], as a guard that can outlive the call (held by a
    /// task that finishes the VM's work later).
    pub async fn lock_owned(&self, vm_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.stripe(vm_id).clone().lock_owned().await
    }

    fn stripe(&self, vm_id: &str) -> &Arc<tokio::sync::Mutex<()>> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(vm_id);
        &self.stripes[(h % self.stripes.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_stream_replaces_older_and_old_cannot_unregister_new() {
        let s = Streams::default();
        let a = s.register("vm");
        let b = s.register("vm");
        assert!(a.replaced.is_cancelled());
        assert!(!b.replaced.is_cancelled());
        assert!(!s.unregister("vm", a.generation));
        assert!(s.is_connected("vm"));
        assert!(s.unregister("vm", b.generation));
        assert!(!s.is_connected("vm"));
    }
}
