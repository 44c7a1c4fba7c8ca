//! MIGlet, the agent. See ARCHITECTURE.md.

pub mod config;
pub mod health;
pub mod hooks;
pub mod machine;
pub mod spool;
