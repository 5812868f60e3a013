//! Pool refill: PUT an environment with a pool of P and time until `idleRunners` reaches P,
//! then time its deletion. There is no baseline: the floor has no pool, and P Docker
//! containers would measure dockerd, not a pool.

use super::Bench;
use crate::report::{Metric, ScenarioReport, Stat, Target};
use crate::stats::millis;
use serde_json::json;
use std::time::Instant;

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let pool = bench.sizes.pool;
    let mut report = ScenarioReport::new("pool-refill", json!({"pool": pool}));
    let started = Instant::now();
    let put = bench.client.put_environment(environment, pool).await;
    let put_answered = started.elapsed();
    let filled = match put {
        Ok(()) => bench.await_idle(environment, pool).await.map(|_| started.elapsed()),
        Err(error) => Err(error.into()),
    };
    let deleting = Instant::now();
    bench.remove_environment(environment, &mut report).await;
    let deleted = deleting.elapsed();
    match filled {
        Ok(filled) => {
            let seconds = filled.as_secs_f64();
            report.metrics = vec![
                Metric::new("PUT environment answered", "ms", &[millis(put_answered)]),
                Metric::new("pool filled (PUT → idleRunners = pool)", "s", &[seconds])
                    .target(Target::at_most(Stat::P50, 2.0)),
                Metric::new("runners started per second", "1/s", &[pool as f64 / seconds]),
                Metric::new("DELETE environment with a full pool", "ms", &[millis(deleted)]),
            ];
        }
        Err(error) => report.error(&error),
    }
    report
}
