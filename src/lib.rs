pub mod config;
pub mod vendor;
