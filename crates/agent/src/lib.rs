//! MIGlet, the agent. See ARCHITECTURE.md.

pub mod agent;
pub mod config;
pub mod health;
pub mod hooks;
pub mod machine;
pub mod runner;
pub mod spool;
pub mod transport;
