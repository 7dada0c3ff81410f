//! The flatmesh agent: serves many models to many tenants over OpenAI-compatible HTTP.

pub mod admin_client;
pub mod agent;
pub mod api;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
mod docs;
pub mod files;
pub mod ids;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod scheduler;
pub mod serve;
pub mod telemetry;
pub mod tenancy;
pub mod units;
pub mod util;
