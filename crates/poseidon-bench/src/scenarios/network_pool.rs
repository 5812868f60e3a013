//! Network pool: creating runners with network access (a veth pair, an address, a mapped
//! port) as a pool sees it, beside the same without network access in the same run.
//!
//! * Fill: PUT a pool of P and time until it is full; reported per runner.
//! * Churn: R rounds of claim + DELETE, each timed from the claim until the pool is full
//!   again. The replacement is created while the claimed runner is torn down, which is when
//!   creation is slowest (the kernel frees a destroyed runner's network namespace meanwhile).
//!   The statistics are polled every millisecond, so the figures carry up to ~1 ms of polling
//!   and HTTP on top of the creation itself.

use std::time::{Duration, Instant};

use super::{Bench, ScenarioError};
use crate::progress::Progress;
use crate::report::{Metric, ScenarioReport, Stat, Target};
use crate::stats::millis;
use serde_json::json;

/// The port each network-enabled runner exposes (one host port mapped per runner).
const EXPOSED_PORT: u16 = 8080;
/// How often the statistics are polled during churn.
const CHURN_POLL: Duration = Duration::from_millis(1);

/// What one variant (with or without network access) measured.
#[derive(Debug, Default)]
struct Samples {
    fill_per_runner_ms: Vec<f64>,
    replacement_ms: Vec<f64>,
}

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let (pool, rounds) = (bench.sizes.network_pool, bench.sizes.network_rounds);
    let mut report = ScenarioReport::new(
        "network-pool",
        json!({"pool": pool, "rounds": rounds, "exposed_ports": [EXPOSED_PORT]}),
    );
    let mut plain = Samples::default();
    let mut networked = Samples::default();
    let variants: [(u64, Option<&[u16]>, &mut Samples); 2] =
        [(environment + 1, None, &mut plain), (environment, Some(&[EXPOSED_PORT]), &mut networked)];
    for (id, ports, samples) in variants {
        if let Err(error) = measure(bench, id, ports, samples).await {
            report.error(&error);
        }
        bench.remove_environment(id, &mut report).await;
    }
    report.metrics = vec![
        Metric::new("network runner created, filling a pool", "ms", &networked.fill_per_runner_ms)
            .baseline("without network", &plain.fill_per_runner_ms),
        Metric::new("network runner replaced (claim + DELETE)", "ms", &networked.replacement_ms)
            .target(Target::at_most(Stat::P50, 15.0))
            .baseline("without network", &plain.replacement_ms),
    ];
    report
}

async fn measure(
    bench: &Bench<'_>,
    environment: u64,
    exposed_ports: Option<&[u16]>,
    samples: &mut Samples,
) -> Result<(), ScenarioError> {
    let pool = bench.sizes.network_pool;
    let started = Instant::now();
    bench.client.put_environment_with(environment, pool, exposed_ports).await?;
    bench.await_idle(environment, pool).await?;
    samples.fill_per_runner_ms.push(millis(started.elapsed()) / pool as f64);
    let label = if exposed_ports.is_some() { "with network" } else { "without network" };
    let rounds = bench.sizes.network_rounds;
    let progress = Progress::start(format!("network-pool: churn {label}"), rounds as u64);
    for round in 0..rounds {
        let started = Instant::now();
        let claim = bench.client.claim(environment, bench.sizes.fill_timeout).await?;
        bench.client.destroy(&claim.runner_id).await?;
        bench.poll_idle(environment, pool, CHURN_POLL, |_| {}).await?;
        samples.replacement_ms.push(millis(started.elapsed()));
        progress.set(round as u64 + 1);
    }
    progress.finish();
    Ok(())
}
