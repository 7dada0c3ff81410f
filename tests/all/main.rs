//! End-to-end tests against the real agent binary, in one test binary to keep link time down.

mod agent;
mod cache;
mod policy;
