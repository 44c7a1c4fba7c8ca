//! MIGlet, the agent. See ARCHITECTURE.md.

pub mod machine;
