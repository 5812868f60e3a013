//! Exec latency: one runner, N sequential executions of `echo hi`; time from `POST …/execute`
//! to the first `stdout` frame and to `exit`. Baselines: `bash -c 'echo hi'` forked directly,
//! and `docker exec` / `docker run` when `--docker` runs.

use super::{Bench, ScenarioError, millis_of};
use crate::execution::{self, Command, ExecutionTiming};
use crate::process::{ProcessTiming, time_process};
use crate::progress::Progress;
use crate::report::{Metric, ScenarioReport, Stat, Target};
use serde_json::json;

const COMMAND: &str = "echo hi";
const EXPECTED: &str = "hi";
/// Runs before the measured ones, for Poseidon and the baselines alike, so that neither pays
/// for cold caches.
const WARM_UP: usize = 3;
/// `docker run` costs ~200 ms each; this many are enough for a median.
const DOCKER_RUNS: usize = 20;

/// Timings of the measured executions of each kind.
#[derive(Debug, Default)]
struct Samples {
    poseidon: Vec<ExecutionTiming>,
    floor: Vec<ProcessTiming>,
    docker_exec: Vec<ProcessTiming>,
    docker_run: Vec<ProcessTiming>,
}

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let executions = bench.sizes.executions;
    let mut report = ScenarioReport::new(
        "exec-latency",
        json!({"executions": executions, "command": COMMAND, "warm_up": WARM_UP}),
    );
    let mut samples = Samples::default();
    if let Err(error) = measure(bench, environment, &mut samples).await {
        report.error(&error);
    }
    bench.remove_environment(environment, &mut report).await;
    report.metrics = metrics(&samples);
    if bench.docker.is_none() {
        report.note("no Docker baseline in this run");
    }
    report
}

async fn measure(
    bench: &Bench<'_>,
    environment: u64,
    samples: &mut Samples,
) -> Result<(), ScenarioError> {
    bench.prepare_environment(environment, 1).await?;
    let runner = bench.client.claim(environment, bench.sizes.fill_timeout).await?.runner_id;
    let measured = measure_poseidon(bench, &runner, samples).await;
    bench.client.destroy(&runner).await?;
    measured?;
    measure_floor(bench.sizes.executions, samples).await?;
    if let Some(docker) = bench.docker {
        let progress = Progress::start("exec-latency: docker exec", bench.sizes.executions as u64);
        for index in 0..WARM_UP + bench.sizes.executions {
            let timing = docker.exec(COMMAND, None).await?;
            if index >= WARM_UP {
                samples.docker_exec.push(timing);
                progress.add(1);
            }
        }
        progress.finish();
        let progress = Progress::start("exec-latency: docker run", DOCKER_RUNS as u64);
        for _ in 0..DOCKER_RUNS {
            samples.docker_run.push(docker.run(COMMAND, None).await?);
            progress.add(1);
        }
        progress.finish();
    }
    Ok(())
}

async fn measure_poseidon(
    bench: &Bench<'_>,
    runner: &str,
    samples: &mut Samples,
) -> Result<(), ScenarioError> {
    let command = Command { line: COMMAND, stdin: None, time_limit_secs: 10, connected: None };
    let progress = Progress::start("exec-latency: poseidon", bench.sizes.executions as u64);
    for index in 0..WARM_UP + bench.sizes.executions {
        let timing = execution::run(bench.client, runner, command).await?;
        if !timing.stdout.contains(EXPECTED) {
            let (runner, found) = (runner.to_owned(), timing.stdout);
            return Err(ScenarioError::WrongOutput { runner, found, expected: EXPECTED });
        }
        if index >= WARM_UP {
            samples.poseidon.push(timing);
            progress.add(1);
        }
    }
    progress.finish();
    Ok(())
}

async fn measure_floor(executions: usize, samples: &mut Samples) -> Result<(), ScenarioError> {
    let progress = Progress::start("exec-latency: floor", executions as u64);
    for index in 0..WARM_UP + executions {
        let timing = time_process("bash", &["-c", COMMAND], None, None).await?;
        if index >= WARM_UP {
            samples.floor.push(timing);
            progress.add(1);
        }
    }
    progress.finish();
    Ok(())
}

fn metrics(samples: &Samples) -> Vec<Metric> {
    let ours = |pick: fn(&ExecutionTiming) -> Option<std::time::Duration>| {
        millis_of(&samples.poseidon.iter().map(pick).collect::<Vec<_>>())
    };
    let first_byte = |timings: &[ProcessTiming]| {
        millis_of(&timings.iter().map(|timing| timing.first_stdout).collect::<Vec<_>>())
    };
    let exit = |timings: &[ProcessTiming]| {
        millis_of(&timings.iter().map(|timing| Some(timing.exit)).collect::<Vec<_>>())
    };
    vec![
        Metric::new("POST execute answered", "ms", &ours(|t| Some(t.posted))),
        Metric::new("WebSocket connected", "ms", &ours(|t| Some(t.connected))),
        Metric::new("first stdout", "ms", &ours(|t| t.first_stdout))
            .baseline("floor (fork+exec)", &first_byte(&samples.floor))
            .baseline("docker exec", &first_byte(&samples.docker_exec))
            .baseline("docker run", &first_byte(&samples.docker_run))
            .target(Target::at_most(Stat::P50, 3.0)),
        Metric::new("exit", "ms", &ours(|t| Some(t.ended)))
            .baseline("floor (fork+exec)", &exit(&samples.floor))
            .baseline("docker exec", &exit(&samples.docker_exec))
            .baseline("docker run", &exit(&samples.docker_run)),
    ]
}
