//! The MIG controller. See ARCHITECTURE.md for the map of modules and message flows.

pub mod app;
pub mod config;
pub mod error;
pub mod export;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod server;
pub mod store;
pub mod streams;
pub mod token;
