//! `poseidon-bench`: drives a Poseidon over HTTP and WebSocket exactly as CodeOcean does, beside
//! baselines measured in the same run, and reports a table and optionally JSON.

mod client;
mod docker;
mod execution;
mod memory;
mod process;
mod progress;
mod report;
mod scenarios;
mod service;
mod stats;

use anyhow::Context as _;
use clap::Parser;
use client::Poseidon;
use docker::{DockerBaseline, DockerError};
use report::{Machine, RunReport, ScenarioReport};
use scenarios::{Bench, Scenario, Sizes};
use service::SpawnedService;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load generator for Poseidon: exec latency, learner cycles, pool refill, idle footprint and
/// concurrency, each with its baselines (fork+exec, optionally Docker).
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    #[command(flatten)]
    bench: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Runs one command on a claimed runner, as CodeOcean would, and prints its output.
    Exec(ExecArgs),
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Base URL of the service, e.g. http://127.0.0.1:7200.
    #[arg(long)]
    url: String,
    #[arg(long, env = "POSEIDON_TOKEN")]
    token: Option<String>,
    /// The runner id from `POST /runners`.
    #[arg(long)]
    runner: String,
    #[arg(long)]
    command: String,
    /// One line of input for the program (a newline is added).
    #[arg(long)]
    stdin: Option<String>,
    /// Seconds before the execution gets `timeout`.
    #[arg(long, default_value_t = 10)]
    time_limit: u64,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["url", "spawn"])))]
struct Args {
    /// Base URL of a running service, e.g. http://127.0.0.1:7200.
    #[arg(long)]
    url: Option<String>,
    /// Value of the Poseidon-Token header for --url (a spawned service gets a random one).
    #[arg(long, env = "POSEIDON_TOKEN")]
    token: Option<String>,
    /// Start this poseidon binary on a free loopback port for the run, and stop it afterwards.
    #[arg(long, value_name = "PATH_TO_POSEIDON")]
    spawn: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// exec-latency: sequential executions of `echo hi`.
    #[arg(long, default_value_t = 200)]
    executions: usize,
    /// learner-cycle: learners at once.
    #[arg(long, default_value_t = 8)]
    learners: usize,
    /// learner-cycle: seconds the learners keep cycling.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// pool-refill: prewarming pool size to fill.
    #[arg(long, default_value_t = 200)]
    pool: u64,
    /// idle-footprint: idle runners to hold.
    #[arg(long, default_value_t = 1000)]
    idle_runners: u64,
    /// concurrency: runners with a long and a short execution each.
    #[arg(long, default_value_t = 500)]
    concurrent: usize,
    /// concurrency: seconds the long executions sleep.
    #[arg(long, default_value_t = 5)]
    sleep: u64,
    /// network-pool: prewarming pool size of network-enabled runners.
    #[arg(long, default_value_t = 50)]
    network_pool: u64,
    /// network-pool: rounds of claim + DELETE, each timed until the pool is full again.
    #[arg(long, default_value_t = 100)]
    network_rounds: usize,
    /// Seconds any pool may take to fill before the scenario fails.
    #[arg(long, default_value_t = 120)]
    fill_timeout: u64,
    /// Also measure `docker exec` / `docker run` (needs Debian's docker.io; starts and stops a
    /// private dockerd).
    #[arg(long)]
    docker: bool,
    /// Write the machine-readable result here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Every scenario with tiny sizes (seconds in total), for CI; any error fails the run.
    #[arg(long)]
    smoke: bool,
}

impl Args {
    fn sizes(&self) -> anyhow::Result<Sizes> {
        if self.smoke {
            return Ok(Sizes {
                executions: 5,
                learners: 2,
                duration: Duration::from_secs(1),
                pool: 5,
                idle_runners: 10,
                concurrent: 5,
                sleep_secs: 1,
                network_pool: 3,
                network_rounds: 3,
                fill_timeout: Duration::from_secs(20),
            });
        }
        anyhow::ensure!(self.learners > 0 && self.concurrent > 0, "sizes must be positive");
        anyhow::ensure!(
            self.pool > 0 && self.idle_runners > 0 && self.network_pool > 0,
            "pool sizes must be positive"
        );
        Ok(Sizes {
            executions: self.executions,
            learners: self.learners,
            duration: Duration::try_from_secs_f64(self.duration).context("--duration")?,
            pool: self.pool,
            idle_runners: self.idle_runners,
            concurrent: self.concurrent,
            sleep_secs: self.sleep,
            network_pool: self.network_pool,
            network_rounds: self.network_rounds,
            fill_timeout: Duration::from_secs(self.fill_timeout),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.tool {
        Some(Tool::Exec(exec)) => run_exec(exec).await,
        None => run(&cli.bench).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("poseidon-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let sizes = args.sizes()?;
    raise_open_file_limit();
    let spawned = match &args.spawn {
        Some(binary) => Some(SpawnedService::start(binary).await?),
        None => None,
    };
    let (url, token) = match (&spawned, &args.url) {
        (Some(service), _) => (service.url().to_owned(), Some(service.token().to_owned())),
        (None, Some(url)) => (url.clone(), args.token.clone()),
        (None, None) => unreachable!("clap requires --url or --spawn"),
    };
    let client = Poseidon::new(&url, token).context("building the HTTP client")?;
    client.health().await.context("the service is not healthy")?;
    let (docker, docker_status) = start_docker(args.docker).await;
    let mut report = empty_report(args, &url, docker_status);
    print!("{}", report.render_header());
    let bench = Bench {
        client: &client,
        sizes,
        docker: docker.as_ref(),
        service: spawned.as_ref().map(SpawnedService::process),
        environment_base: 7_000_000 + u64::from(std::process::id() % 100_000) * 100,
    };
    let outcome = tokio::select! {
        () = run_scenarios(&bench, args.scenario, &mut report.scenarios) => Ok(()),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let mut teardown = ScenarioReport::new("teardown", serde_json::Value::Null);
    tear_down(&client, docker, spawned, &mut teardown).await;
    if teardown.error_count > 0 || !teardown.notes.is_empty() {
        print!("\n{}", teardown.render());
        report.scenarios.push(teardown);
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    outcome?;
    Ok(exit_code(&report, args.smoke))
}

/// `poseidon-bench exec`: one execution, its output on stdout/stderr and its outcome last.
async fn run_exec(exec: &ExecArgs) -> anyhow::Result<ExitCode> {
    let client =
        Poseidon::new(&exec.url, exec.token.clone()).context("building the HTTP client")?;
    let stdin = exec.stdin.as_ref().map(|line| format!("{line}\n"));
    let command = execution::Command {
        line: &exec.command,
        stdin: stdin.as_deref(),
        time_limit_secs: exec.time_limit,
        connected: None,
    };
    let limit = Duration::from_secs(exec.time_limit.saturating_add(10));
    let timing =
        tokio::time::timeout(limit, execution::run_unbounded(&client, &exec.runner, command))
            .await
            .context("the execution did not end in time")??;
    print!("{}", timing.stdout);
    eprint!("{}", timing.stderr);
    eprintln!("[{:?} after {:.1} ms]", timing.outcome, timing.ended.as_secs_f64() * 1e3);
    Ok(match timing.outcome {
        execution::Outcome::Exit(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

/// The report's header fields, before any scenario ran.
fn empty_report(args: &Args, url: &str, docker_baseline: String) -> RunReport {
    RunReport {
        machine: Machine::describe(),
        service: match &args.spawn {
            Some(binary) => format!("spawned {} at {url}", binary.display()),
            None => url.to_owned(),
        },
        build: if cfg!(debug_assertions) { "debug" } else { "release" },
        smoke: args.smoke,
        docker_baseline,
        scenarios: Vec::new(),
    }
}

async fn run_scenarios(bench: &Bench<'_>, scenario: Scenario, reports: &mut Vec<ScenarioReport>) {
    for scenario in scenario.expand() {
        let report = bench.run(scenario).await;
        print!("\n{}", report.render());
        reports.push(report);
    }
}

/// Deletes whatever the run left (after an error or Ctrl-C), then stops dockerd and the
/// spawned service.
async fn tear_down(
    client: &Poseidon,
    docker: Option<DockerBaseline>,
    spawned: Option<SpawnedService>,
    report: &mut ScenarioReport,
) {
    let (left, errors) = client.clean_up().await;
    if left > 0 {
        report.note(format!("deleted {left} runners or environments that a failed step left"));
    }
    for error in errors {
        report.error(&error);
    }
    if let Some(docker) = docker
        && let Err(error) = docker.stop().await
    {
        report.error(&error);
    }
    if let Some(service) = spawned {
        match service.stop().await {
            Ok(leftovers) if !leftovers.is_empty() => report.note(format!(
                "the stopped service left {} cgroup directories; the harness removed them: {}",
                leftovers.len(),
                leftovers
                    .iter()
                    .map(|dir| dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Ok(_) => {}
            Err(error) => report.error(&error),
        }
    }
}

async fn start_docker(wanted: bool) -> (Option<DockerBaseline>, String) {
    if !wanted {
        return (None, "not run (no --docker)".to_owned());
    }
    eprintln!("starting a private dockerd and importing the image ...");
    match DockerBaseline::start().await {
        Ok(docker) => {
            (Some(docker), "Debian docker.io, private dockerd, --network none".to_owned())
        }
        Err(DockerError::NotInstalled) => (None, "not run (docker.io not installed)".to_owned()),
        Err(error) => (None, format!("not run ({error})")),
    }
}

/// Errors fail a smoke run; missed speed targets never fail any run.
fn exit_code(report: &RunReport, smoke: bool) -> ExitCode {
    if smoke && report.error_count() > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Hundreds of concurrent WebSockets need more descriptors than the usual soft limit of 1024;
/// the spawned service inherits the raised limit too.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
