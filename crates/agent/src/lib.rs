//! MIGlet, the agent. See ARCHITECTURE.md.

pub mod agent;
pub mod auth;
pub mod clock;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod hooks;
pub mod machine;
pub mod outgoing;
pub mod runner;
pub mod spool;
pub mod transport;

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section is a single read or write), so a poisoned lock is still usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
