//! `nomad-sim`: the Nomad API simulator as a program, for manual use and benchmarks.
//!
//! `nomad-sim --listen 127.0.0.1:4646` runs allocations as sandboxes of this binary (its
//! hidden `sandbox-init` entry point is each sandbox's init); `--no-sandbox` runs without.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nomad_sim::{SimConfig, Simulator};
use poseidon_sandbox::{Limits, Runtime, RuntimeConfig};

/// The first argument that turns this process into a sandbox's init.
const SANDBOX_INIT: &str = "sandbox-init";

#[derive(Debug, Parser)]
#[command(about = "A Nomad API simulator for tests")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:4646")]
    listen: SocketAddr,
    /// Require this ACL token.
    #[arg(long, env = "NOMAD_SIM_TOKEN")]
    token: Option<String>,
    /// Namespaces besides `default`.
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// Allocations the simulated node holds.
    #[arg(long)]
    capacity: Option<usize>,
    /// Milliseconds from placement to running.
    #[arg(long, default_value_t = 200)]
    pending_ms: u64,
    #[arg(long, default_value = "/var/lib/nomad-sim")]
    state_dir: PathBuf,
    /// Our cgroup in every hierarchy; leftovers of an earlier run under it are removed, so
    /// simulators running at the same time need different names.
    #[arg(long, default_value = "nomad-sim")]
    cgroup_name: String,
    /// Host uid of sandbox root (65536 ids from there).
    #[arg(long, default_value_t = 400_000)]
    uid_base: u32,
    /// Simulate allocations without processes (exec is refused).
    #[arg(long)]
    no_sandbox: bool,
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(OsStr::new(SANDBOX_INIT)) {
        poseidon_sandbox::init::main(args.collect())
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nomad-sim: cannot start tokio: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nomad-sim: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let sandboxes = if cli.no_sandbox {
        None
    } else {
        let config = RuntimeConfig {
            state_dir: cli.state_dir.clone(),
            init_program: std::env::current_exe()
                .map_err(|e| format!("cannot find our executable: {e}"))?,
            init_args: vec![SANDBOX_INIT.into()],
            cgroup_name: cli.cgroup_name.clone(),
            uid_base: cli.uid_base,
            defaults: Limits {
                pids: Some(512),
                disk_mb: Some(512),
                nofile: Some(4096),
                ..Limits::default()
            },
        };
        Some(Runtime::new(config).map_err(|e| format!("cannot start the sandbox runtime: {e}"))?)
    };
    let mut namespaces = vec!["default".to_owned()];
    namespaces.extend(cli.namespaces);
    let config = SimConfig {
        listen: cli.listen,
        runtime: sandboxes,
        acl_token: cli.token,
        namespaces,
        capacity: cli.capacity,
        pending_delay: Duration::from_millis(cli.pending_ms),
        ..SimConfig::default()
    };
    let sim = Simulator::start(config).await.map_err(|e| e.to_string())?;
    println!("nomad-sim listening on {}", sim.url());
    wait_for_stop().await?;
    sim.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM: either way the sandboxes and their cgroups are removed on the way out.
async fn wait_for_stop() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot wait for SIGTERM: {e}"))?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted.map_err(|e| format!("cannot wait for SIGINT: {e}")),
        _ = terminate.recv() => Ok(()),
    }
}
