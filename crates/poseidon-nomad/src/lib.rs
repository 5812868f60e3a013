//! Poseidon's Nomad backend: environments as template jobs `template-<id>`, runners as jobs
//! `<id>-<uuid>` copied from them, allocations followed through Nomad's event stream,
//! executions and file operations through `alloc exec`. Compatible with the Go Poseidon's use
//! of a cluster (same jobs, same metadata), so either can take over from the other.
#![forbid(unsafe_code)]

mod backend;
mod client;
mod command;
mod config;
mod events;
mod exec;
mod files;
mod retry;
mod runner;
mod template;
mod tls;
mod tracker;

pub use backend::{NomadBackend, NomadStartError};
pub use client::NomadError;
pub use config::{NetworkConfig, NomadConfig, TemplateSource, TlsFiles};
