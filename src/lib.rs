//! ehrsync: keeps EHR vendors' OAuth2 access tokens alive, pulls records from their APIs into
//! SQLite on a schedule, and reports its health to Prometheus.
//!
//! The crate is a library with a thin binary (`src/main.rs`) on top; `ARCHITECTURE.md` maps the
//! modules and the invariants they keep.

pub mod agent;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod http;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod notify;
pub mod oidc;
pub mod sandbox;
pub mod scheduler;
pub mod service;
pub mod signals;
pub mod store;
pub mod sync;
pub mod token;
pub mod vendor;
pub mod views;
