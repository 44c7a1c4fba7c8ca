//! The MIG controller. See ARCHITECTURE.md for the map of modules and message flows.

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod export;
pub mod extract;
#[doc(hidden)]
pub mod fuzzing;
pub mod gce;
pub mod github;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pki;
pub mod provider;
pub mod server;
pub mod store;
pub mod streams;
pub mod throttle;
pub mod tls;
pub mod token;
