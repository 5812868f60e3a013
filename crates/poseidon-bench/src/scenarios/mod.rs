//! The scenarios of the issue, each measuring Poseidon and its baselines in the same run.

mod concurrency;
mod exec_latency;
mod idle_footprint;
mod learner_cycle;
mod network_pool;
mod pool_refill;

use crate::client::{ClientError, Poseidon};
use crate::docker::DockerBaseline;
use crate::execution::ExecutionError;
use crate::memory::{cgroup_cpu_seconds, own_cpu_seconds, process_cpu_seconds, rss_kib};
use crate::process::ProcessError;
use crate::progress::Progress;
use crate::report::{CpuUse, ScenarioReport};
use crate::service::ServiceProcess;
use std::time::{Duration, Instant};

/// The sizes of a run, from the command line or `--smoke`.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub executions: usize,
    pub learners: usize,
    pub duration: Duration,
    pub pool: u64,
    pub idle_runners: u64,
    pub concurrent: usize,
    pub sleep_secs: u64,
    /// network-pool: pool size, and rounds of claim + DELETE.
    pub network_pool: u64,
    pub network_rounds: usize,
    /// Bound for every wait on a pool to fill.
    pub fill_timeout: Duration,
}

/// A scenario's name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    ExecLatency,
    LearnerCycle,
    PoolRefill,
    IdleFootprint,
    Concurrency,
    NetworkPool,
    All,
}

impl Scenario {
    /// The scenarios `self` stands for, in the order `all` runs them: the heavy pools last.
    pub fn expand(self) -> Vec<Scenario> {
        match self {
            Scenario::All => vec![
                Scenario::ExecLatency,
                Scenario::LearnerCycle,
                Scenario::Concurrency,
                Scenario::PoolRefill,
                Scenario::NetworkPool,
                Scenario::IdleFootprint,
            ],
            one => vec![one],
        }
    }
}

/// Why a scenario stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Execution(#[from] ExecutionError),
    #[error("baseline")]
    Process(#[from] ProcessError),
    #[error("environment {environment}: {idle} of {wanted} idle runners after {waited:?}")]
    PoolNotFilled { environment: u64, idle: u64, wanted: u64, waited: Duration },
    #[error("runner {runner}: output {found:?}, expected {expected:?}")]
    WrongOutput { runner: String, found: String, expected: &'static str },
    #[error("floor")]
    Floor(#[source] std::io::Error),
}

/// What every scenario works with.
#[derive(Debug)]
pub struct Bench<'a> {
    pub client: &'a Poseidon,
    pub sizes: Sizes,
    pub docker: Option<&'a DockerBaseline>,
    /// The service when the harness spawned it, for memory and CPU figures.
    pub service: Option<ServiceProcess>,
    /// Environment ids of this run start here; derived from the pid so that runs against a
    /// shared service do not collide. Each scenario has ten ids from `base + 10 × scenario`.
    pub environment_base: u64,
}

/// How often the statistics route is polled while a pool fills.
const FILL_POLL: Duration = Duration::from_millis(10);

impl Bench<'_> {
    /// Runs `scenario` and records the wall and CPU time it took.
    pub async fn run(&self, scenario: Scenario) -> ScenarioReport {
        let started = Instant::now();
        let service_before = self.service_cpu_seconds();
        let harness_before = own_cpu_seconds();
        let mut report = self.run_scenario(scenario).await;
        let service_after = self.service_cpu_seconds();
        report.cpu = Some(CpuUse {
            wall_s: started.elapsed().as_secs_f64(),
            service_s: service_after.zip(service_before).map(|(after, before)| after - before),
            harness_s: own_cpu_seconds() - harness_before,
            service_rss_mib: self
                .service
                .as_ref()
                .and_then(|service| rss_kib(service.pid))
                .map(|kib| kib as f64 / 1024.0),
        });
        report
    }

    /// CPU seconds of the spawned service and all its runners so far.
    fn service_cpu_seconds(&self) -> Option<f64> {
        let service = self.service.as_ref()?;
        let runners = cgroup_cpu_seconds(&service.cgroup).unwrap_or(0.0);
        Some(process_cpu_seconds(service.pid)? + runners)
    }

    async fn run_scenario(&self, scenario: Scenario) -> ScenarioReport {
        let environment = self.environment_base + 10 * scenario as u64;
        match scenario {
            Scenario::ExecLatency => exec_latency::run(self, environment).await,
            Scenario::LearnerCycle => learner_cycle::run(self, environment).await,
            Scenario::PoolRefill => pool_refill::run(self, environment).await,
            Scenario::IdleFootprint => idle_footprint::run(self, environment).await,
            Scenario::Concurrency => concurrency::run(self, environment).await,
            Scenario::NetworkPool => network_pool::run(self, environment).await,
            Scenario::All => unreachable!("`all` is expanded before running"),
        }
    }

    /// Waits until `environment` has at least `wanted` idle runners; returns how long it took.
    async fn await_idle(&self, environment: u64, wanted: u64) -> Result<Duration, ScenarioError> {
        let progress = Progress::start(format!("environment {environment}: idle runners"), wanted);
        let waited =
            self.poll_idle(environment, wanted, FILL_POLL, |idle| progress.set(idle)).await;
        progress.finish();
        waited
    }

    /// Polls the statistics every `poll` (bounded by `--fill-timeout`) until `environment` has
    /// at least `wanted` idle runners, telling `seen` each count; returns how long it took.
    async fn poll_idle(
        &self,
        environment: u64,
        wanted: u64,
        poll: Duration,
        seen: impl Fn(u64),
    ) -> Result<Duration, ScenarioError> {
        let started = Instant::now();
        loop {
            let idle = self.client.environment_statistics(environment).await?.idle_runners;
            seen(idle);
            if idle >= wanted {
                return Ok(started.elapsed());
            }
            let waited = started.elapsed();
            if waited >= self.sizes.fill_timeout {
                return Err(ScenarioError::PoolNotFilled { environment, idle, wanted, waited });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Creates `environment` with a pool of `pool` and waits for it to fill.
    async fn prepare_environment(&self, environment: u64, pool: u64) -> Result<(), ScenarioError> {
        self.client.put_environment(environment, pool).await?;
        self.await_idle(environment, pool).await.map(drop)
    }

    /// Deletes `environment`, recording a failure in `report`.
    async fn remove_environment(&self, environment: u64, report: &mut ScenarioReport) {
        if let Err(error) = self.client.delete_environment(environment).await {
            report.error(&error);
        }
    }
}

/// Every sample of an optional duration, in milliseconds.
fn millis_of<'a>(durations: impl IntoIterator<Item = &'a Option<Duration>>) -> Vec<f64> {
    durations.into_iter().flatten().map(|duration| crate::stats::millis(*duration)).collect()
}
