//! Concurrency: C runners each start a long `sleep S` at once; while those run, each runner
//! gets a short `echo hi` too. Measures the short executions' first byte and every error.
//! Baseline: C `sleep S` processes and C `bash -c 'echo hi'` forked directly.

use super::{Bench, ScenarioError, millis_of};
use crate::client::ClientError;
use crate::execution::{self, Command, ExecutionTiming};
use crate::process::{ProcessTiming, time_process};
use crate::progress::Progress;
use crate::report::{Metric, ScenarioReport, Stat, Target};
use futures::future::join_all;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SHORT: &str = "echo hi";
/// Bound for all long executions to be connected before the short ones start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Results of one side (Poseidon or the floor).
#[derive(Debug, Default)]
struct Samples {
    short_posted: Vec<Option<Duration>>,
    short_connected: Vec<Option<Duration>>,
    short_first_byte: Vec<Option<Duration>>,
    short_exit: Vec<Option<Duration>>,
    long_exit: Vec<Option<Duration>>,
}

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let sizes = bench.sizes;
    let long = format!("sleep {}", sizes.sleep_secs);
    let mut report = ScenarioReport::new(
        "concurrency",
        json!({"concurrent": sizes.concurrent, "long": long, "short": SHORT}),
    );
    let mut ours = Samples::default();
    let before = report.error_count;
    match bench.prepare_environment(environment, sizes.concurrent as u64).await {
        Ok(()) => measure_poseidon(bench, environment, &long, &mut ours, &mut report).await,
        Err(error) => report.error(&error),
    }
    let failures = report.error_count - before;
    bench.remove_environment(environment, &mut report).await;
    let floor = measure_floor(sizes.concurrent, &long, &mut report).await;
    report.note("each runner runs one long and one short execution at the same time");
    report.metrics = vec![
        Metric::new("short: POST execute answered", "ms", &millis_of(&ours.short_posted)),
        Metric::new("short: WebSocket connected", "ms", &millis_of(&ours.short_connected)),
        Metric::new("short: first stdout", "ms", &millis_of(&ours.short_first_byte))
            .baseline("floor (fork+exec)", &millis_of(&floor.short_first_byte))
            .target(Target::at_most(Stat::P99, 50.0)),
        Metric::new("short: exit", "ms", &millis_of(&ours.short_exit))
            .baseline("floor (fork+exec)", &millis_of(&floor.short_exit)),
        Metric::new("long: exit", "ms", &millis_of(&ours.long_exit))
            .baseline("floor (fork+exec)", &millis_of(&floor.long_exit)),
        Metric::new("failed operations", "count", &[failures as f64])
            .target(Target::at_most(Stat::Max, 0.0)),
    ];
    report
}

async fn measure_poseidon(
    bench: &Bench<'_>,
    environment: u64,
    long: &str,
    samples: &mut Samples,
    report: &mut ScenarioReport,
) {
    let concurrent = bench.sizes.concurrent;
    let claims = join_all(
        (0..concurrent).map(|_| bench.client.claim(environment, bench.sizes.fill_timeout)),
    )
    .await;
    let mut runners = Vec::new();
    for claim in claims {
        match claim {
            Ok(claim) => runners.push(claim.runner_id),
            Err(error) => report.error(&error),
        }
    }
    let connected = AtomicU64::new(0);
    let progress = Progress::start("concurrency: poseidon executions", 2 * runners.len() as u64);
    let done = progress.counter();
    let long_command = Command {
        line: long,
        stdin: None,
        time_limit_secs: bench.sizes.sleep_secs + 10,
        connected: Some(&connected),
    };
    let longs = join_all(runners.iter().map(|runner| async {
        let result = execution::run(bench.client, runner, long_command).await;
        done.fetch_add(1, Ordering::Relaxed);
        result
    }));
    let shorts = async {
        await_connected(&connected, runners.len() as u64).await;
        let short = Command { line: SHORT, stdin: None, time_limit_secs: 10, connected: None };
        join_all(runners.iter().map(|runner| async {
            let result = execution::run(bench.client, runner, short).await;
            done.fetch_add(1, Ordering::Relaxed);
            result
        }))
        .await
    };
    let (longs, shorts) = tokio::join!(longs, shorts);
    progress.finish();
    for result in shorts {
        record(result, report, |timing| {
            samples.short_posted.push(Some(timing.posted));
            samples.short_connected.push(Some(timing.connected));
            samples.short_first_byte.push(timing.first_stdout);
            samples.short_exit.push(Some(timing.ended));
        });
    }
    for result in longs {
        record(result, report, |timing| samples.long_exit.push(Some(timing.ended)));
    }
    let destroyed: Vec<Result<(), ClientError>> =
        join_all(runners.iter().map(|runner| bench.client.destroy(runner))).await;
    for error in destroyed.into_iter().filter_map(Result::err) {
        report.error(&error);
    }
}

/// Waits (bounded) until `wanted` long executions are connected, so that the short ones
/// really run while the long ones do.
async fn await_connected(connected: &AtomicU64, wanted: u64) {
    let started = Instant::now();
    while connected.load(Ordering::Relaxed) < wanted && started.elapsed() < CONNECT_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn record<E: Into<ScenarioError>>(
    result: Result<ExecutionTiming, E>,
    report: &mut ScenarioReport,
    store: impl FnOnce(ExecutionTiming),
) {
    match result {
        Ok(timing) => store(timing),
        Err(error) => report.error(&error.into()),
    }
}

async fn measure_floor(concurrent: usize, long: &str, report: &mut ScenarioReport) -> Samples {
    let progress = Progress::start("concurrency: floor processes", 2 * concurrent as u64);
    let done = progress.counter();
    let longs = join_all((0..concurrent).map(|_| async {
        let timing = time_process("bash", &["-c", long], None, None).await;
        done.fetch_add(1, Ordering::Relaxed);
        timing
    }));
    // `join!` polls `longs` first, and that first poll spawns every long process (the spawn
    // happens before the first await), so the short ones start while the long ones run.
    let shorts = join_all((0..concurrent).map(|_| async {
        let timing = time_process("bash", &["-c", SHORT], None, None).await;
        done.fetch_add(1, Ordering::Relaxed);
        timing
    }));
    let (longs, shorts) = tokio::join!(longs, shorts);
    progress.finish();
    let mut samples = Samples::default();
    for result in shorts {
        record_floor(result, report, |timing| {
            samples.short_first_byte.push(timing.first_stdout);
            samples.short_exit.push(Some(timing.exit));
        });
    }
    for result in longs {
        record_floor(result, report, |timing| samples.long_exit.push(Some(timing.exit)));
    }
    samples
}

fn record_floor<E: std::error::Error>(
    result: Result<ProcessTiming, E>,
    report: &mut ScenarioReport,
    store: impl FnOnce(ProcessTiming),
) {
    match result {
        Ok(timing) => store(timing),
        Err(error) => report.error_in("floor", &error),
    }
}
