//! `poseidon`: runs learners' untrusted code for CodeOcean in prewarmed, isolated runners.
//!
//! This file only dispatches: the hidden `sandbox-init` entry point (the init of every
//! runner, started by the sandbox runtime from this very binary) must run before anything
//! else exists in the process, so it is checked before tokio, tracing or clap start.
//! Everything else lives in:
//!
//! * `cli`: the command line (`poseidon [serve] [--config FILE]`, `poseidon version`);
//! * `config`: the YAML file and `POSEIDON_*` variables;
//! * `service`: wiring the backend, the core and the API, start-up and shutdown;
//! * `images`: `poseidon image import|pull|ls|rm`.
#![forbid(unsafe_code)]

mod cli;
mod config;
mod images;
mod nomad;
mod service;

use std::ffi::OsStr;
use std::process::ExitCode;

use clap::Parser;

/// The first argument that turns this process into a runner's init.
const SANDBOX_INIT: &str = "sandbox-init";

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(OsStr::new(SANDBOX_INIT)) {
        poseidon_sandbox::init::main(args.collect())
    }
    let cli = cli::Cli::parse_from(cli::normalize_go_flags(std::env::args_os()));
    match cli.command.unwrap_or_default() {
        cli::Command::Version => {
            println!("{}", service::version());
            ExitCode::SUCCESS
        }
        cli::Command::Serve => report(service::run(cli.config.as_deref())),
        cli::Command::Image(command) => report(images::run(cli.config.as_deref(), command)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("poseidon: {error:#}");
            ExitCode::FAILURE
        }
    }
}
