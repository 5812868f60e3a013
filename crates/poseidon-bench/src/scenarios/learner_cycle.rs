//! Learner cycle: C learners at once, each repeating what CodeOcean does for one run: claim,
//! copy two files, run `python3 main.py` with one line of stdin, list the files, download the
//! output, destroy. Baseline: the same files and program in a temporary directory, no sandbox.

use super::{Bench, ScenarioError};
use crate::execution::{self, Command};
use crate::process::time_process;
use crate::progress::Progress;
use crate::report::{Metric, ScenarioReport, Stat, Target};
use crate::stats::millis;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const MAIN_PY: &str = r"name = input()
with open('data.txt') as data, open('out.txt', 'w') as out:
    out.write(data.read().upper() + name + '\n')
print('hello ' + name)
";
const DATA_TXT: &str = "poseidon bench\n";
const STDIN: &str = "learner\n";
const EXPECTED_OUT: &str = "POSEIDON BENCH\nlearner\n";
const COMMAND: &str = "python3 main.py";

/// Durations of the steps of one cycle.
#[derive(Debug, Clone, Copy, Default)]
struct Cycle {
    claim: Duration,
    copy: Duration,
    execute: Duration,
    list: Duration,
    download: Duration,
    destroy: Duration,
    total: Duration,
    overloaded_answers: u32,
}

/// What all learners of one side (Poseidon or the floor) produced.
#[derive(Debug, Default)]
struct Outcome {
    cycles: Vec<Cycle>,
    errors: Vec<ScenarioError>,
    elapsed: Duration,
}

impl Outcome {
    fn per_second(&self) -> Vec<f64> {
        if self.cycles.is_empty() || self.elapsed.is_zero() {
            return Vec::new();
        }
        vec![self.cycles.len() as f64 / self.elapsed.as_secs_f64()]
    }

    fn step(&self, pick: fn(&Cycle) -> Duration) -> Vec<f64> {
        self.cycles.iter().map(|cycle| millis(pick(cycle))).collect()
    }
}

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let sizes = bench.sizes;
    let pool = (sizes.learners as u64 * 4).max(4);
    let mut report = ScenarioReport::new(
        "learner-cycle",
        json!({"learners": sizes.learners, "duration_s": sizes.duration.as_secs_f64(),
               "pool": pool, "command": COMMAND}),
    );
    let ours = match bench.prepare_environment(environment, pool).await {
        Ok(()) => {
            run_learners("learner-cycle: poseidon", bench, || poseidon_cycle(bench, environment))
                .await
        }
        Err(error) => {
            report.error(&error);
            Outcome::default()
        }
    };
    bench.remove_environment(environment, &mut report).await;
    let floor = run_learners("learner-cycle: floor", bench, floor_cycle).await;
    for error in ours.errors.iter() {
        report.error(&error);
    }
    for error in floor.errors.iter() {
        report.error_in("floor", error);
    }
    let overloaded: u64 = ours.cycles.iter().map(|cycle| u64::from(cycle.overloaded_answers)).sum();
    report.note(format!("claims answered NOMAD_OVERLOAD {overloaded} times (pool empty, retried)"));
    report.note("no Docker baseline for this scenario");
    report.metrics = metrics(&ours, &floor);
    report
}

/// Runs `cycle` in `learners` tasks until the duration is over; every cycle that started
/// finishes.
async fn run_learners<F, Fut>(label: &str, bench: &Bench<'_>, cycle: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Cycle, ScenarioError>>,
{
    let progress = Progress::start(label, 0);
    let done = progress.counter();
    let started = Instant::now();
    let deadline = started + bench.sizes.duration;
    let learners = (0..bench.sizes.learners).map(|_| {
        let (done, cycle) = (&done, &cycle);
        async move {
            let mut outcome = Outcome::default();
            while Instant::now() < deadline {
                match cycle().await {
                    Ok(result) => outcome.cycles.push(result),
                    Err(error) => outcome.errors.push(error),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            outcome
        }
    });
    let mut total = Outcome::default();
    for outcome in futures::future::join_all(learners).await {
        total.cycles.extend(outcome.cycles);
        total.errors.extend(outcome.errors);
    }
    total.elapsed = started.elapsed();
    progress.finish();
    total
}

async fn poseidon_cycle(bench: &Bench<'_>, environment: u64) -> Result<Cycle, ScenarioError> {
    let client = bench.client;
    let started = Instant::now();
    let claim = client.claim(environment, bench.sizes.fill_timeout).await?;
    let runner = claim.runner_id.as_str();
    let mut cycle = Cycle {
        claim: started.elapsed(),
        overloaded_answers: claim.overloaded_answers,
        ..Cycle::default()
    };
    let steps = async {
        let step = Instant::now();
        client
            .copy_files(
                runner,
                &[("main.py", MAIN_PY.as_bytes()), ("data.txt", DATA_TXT.as_bytes())],
            )
            .await?;
        cycle.copy = step.elapsed();
        let command =
            Command { line: COMMAND, stdin: Some(STDIN), time_limit_secs: 10, connected: None };
        let timing = execution::run(client, runner, command).await?;
        cycle.execute = timing.ended;
        let step = Instant::now();
        client.list_files(runner).await?;
        cycle.list = step.elapsed();
        let step = Instant::now();
        let output = client.download(runner, "out.txt").await?;
        cycle.download = step.elapsed();
        check_output(runner, &output)
    };
    let result: Result<(), ScenarioError> = steps.await;
    let step = Instant::now();
    let destroyed = client.destroy(runner).await;
    cycle.destroy = step.elapsed();
    cycle.total = started.elapsed();
    result?;
    destroyed?;
    Ok(cycle)
}

fn check_output(runner: &str, output: &[u8]) -> Result<(), ScenarioError> {
    if output == EXPECTED_OUT.as_bytes() {
        return Ok(());
    }
    let found = String::from_utf8_lossy(output).into_owned();
    Err(ScenarioError::WrongOutput { runner: runner.to_owned(), found, expected: EXPECTED_OUT })
}

/// The same cycle without Poseidon: a temporary directory for the workspace.
async fn floor_cycle() -> Result<Cycle, ScenarioError> {
    let started = Instant::now();
    let dir = tempfile::tempdir().map_err(ScenarioError::Floor)?;
    let step = Instant::now();
    tokio::fs::write(dir.path().join("main.py"), MAIN_PY).await.map_err(ScenarioError::Floor)?;
    tokio::fs::write(dir.path().join("data.txt"), DATA_TXT).await.map_err(ScenarioError::Floor)?;
    let copy = step.elapsed();
    let timing =
        time_process("bash", &["-c", COMMAND], Some(STDIN.as_bytes()), Some(dir.path())).await?;
    let step = Instant::now();
    let mut entries = tokio::fs::read_dir(dir.path()).await.map_err(ScenarioError::Floor)?;
    while entries.next_entry().await.map_err(ScenarioError::Floor)?.is_some() {}
    let list = step.elapsed();
    let step = Instant::now();
    let output = tokio::fs::read(dir.path().join("out.txt")).await.map_err(ScenarioError::Floor)?;
    let download = step.elapsed();
    check_output("floor", &output)?;
    let step = Instant::now();
    dir.close().map_err(ScenarioError::Floor)?;
    let destroy = step.elapsed();
    Ok(Cycle {
        claim: Duration::ZERO,
        copy,
        execute: timing.exit,
        list,
        download,
        destroy,
        total: started.elapsed(),
        overloaded_answers: 0,
    })
}

fn metrics(ours: &Outcome, floor: &Outcome) -> Vec<Metric> {
    let step = |name: &str, pick: fn(&Cycle) -> Duration| {
        Metric::new(name, "ms", &ours.step(pick)).baseline("floor (no sandbox)", &floor.step(pick))
    };
    vec![
        Metric::new("cycles per second", "1/s", &ours.per_second())
            .baseline("floor (no sandbox)", &floor.per_second())
            .target(Target::at_least(Stat::P50, 100.0)),
        step("cycle", |cycle| cycle.total),
        Metric::new("claim", "ms", &ours.step(|cycle| cycle.claim)),
        step("copy two files", |cycle| cycle.copy),
        step("execute python3 (POST → exit)", |cycle| cycle.execute),
        step("list files", |cycle| cycle.list),
        step("download out.txt", |cycle| cycle.download),
        step("destroy", |cycle| cycle.destroy),
    ]
}
