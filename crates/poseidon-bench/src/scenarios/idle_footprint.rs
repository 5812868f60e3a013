//! Idle footprint: host memory (MemAvailable), the runners' memory and the service's own RSS
//! with N idle runners. Per runner = the difference to before the pool existed, divided by N.

use super::Bench;
use crate::memory::{cgroup_memory_bytes, meminfo_kib, processes_in_cgroup, pss_kib, rss_kib};
use crate::report::{Metric, ScenarioReport, Stat, Target};
use crate::service::ServiceProcess;
use serde_json::json;
use std::time::{Duration, Instant};

/// Time for the runners to finish starting (page faults, the first allocations) before the
/// memory is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Bound for the runners' processes to be gone after the environment was deleted.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
const KIB_PER_MIB: f64 = 1024.0;

/// Memory of the host and, when the harness spawned the service, of the service and runners.
#[derive(Debug, Clone, Copy, Default)]
struct Snapshot {
    available_kib: u64,
    service_rss_kib: Option<u64>,
    /// PSS of the processes in the service's cgroups (the runners), and their number.
    runners_pss_kib: Option<(u64, usize)>,
    /// Memory charged to the service's cgroups (the runners' pages, kernel memory, tmpfs).
    runners_charged_kib: Option<u64>,
}

fn snapshot(service: Option<&ServiceProcess>) -> Snapshot {
    let available_kib = meminfo_kib("MemAvailable").unwrap_or(0);
    let Some(service) = service else {
        return Snapshot { available_kib, ..Snapshot::default() };
    };
    let runners = processes_in_cgroup(&service.cgroup);
    Snapshot {
        available_kib,
        service_rss_kib: rss_kib(service.pid),
        runners_pss_kib: Some((pss_kib(&runners), runners.len())),
        runners_charged_kib: Some(cgroup_memory_bytes(&service.cgroup).unwrap_or(0) / 1024),
    }
}

pub async fn run(bench: &Bench<'_>, environment: u64) -> ScenarioReport {
    let runners = bench.sizes.idle_runners;
    let mut report = ScenarioReport::new("idle-footprint", json!({"idle_runners": runners}));
    let service = bench.service.as_ref();
    let before = snapshot(service);
    let started = Instant::now();
    let filled = bench.prepare_environment(environment, runners).await;
    let fill = started.elapsed();
    if let Err(error) = filled {
        report.error(&error);
        bench.remove_environment(environment, &mut report).await;
        return report;
    }
    tokio::time::sleep(SETTLE).await;
    let after = snapshot(service);
    let deleting = Instant::now();
    bench.remove_environment(environment, &mut report).await;
    let teardown = match service {
        Some(service) => await_teardown(&service.cgroup).await,
        None => None,
    };
    let teardown_time = deleting.elapsed();
    let per_runner = |before: u64, after: u64| mib(after.saturating_sub(before)) / runners as f64;
    let mut metrics = vec![
        Metric::new(
            "host memory per idle runner (MemAvailable drop)",
            "MiB",
            &[per_runner(after.available_kib, before.available_kib)],
        )
        .target(Target::at_most(Stat::P50, 1.0)),
        Metric::new(
            "host memory used by all idle runners",
            "MiB",
            &[mib(before.available_kib.saturating_sub(after.available_kib))],
        ),
        Metric::new("pool filled", "s", &[fill.as_secs_f64()]),
    ];
    if let (Some((pss_before, _)), Some((pss_after, processes))) =
        (before.runners_pss_kib, after.runners_pss_kib)
    {
        metrics.push(Metric::new(
            "runner processes' PSS per idle runner",
            "MiB",
            &[per_runner(pss_before, pss_after)],
        ));
        report.note(format!("{processes} processes in the runners' cgroups with the pool full"));
    }
    if let (Some(charged_before), Some(charged_after)) =
        (before.runners_charged_kib, after.runners_charged_kib)
    {
        metrics.push(Metric::new(
            "memory cgroup charge per idle runner",
            "MiB",
            &[per_runner(charged_before, charged_after)],
        ));
    }
    match (before.service_rss_kib, after.service_rss_kib) {
        (Some(rss_before), Some(rss_after)) => {
            metrics.push(Metric::new("service RSS, empty", "MiB", &[mib(rss_before)]));
            metrics.push(Metric::new("service RSS, pool full", "MiB", &[mib(rss_after)]));
        }
        _ => report.note("service and runner memory not measured: the harness did not spawn it"),
    }
    match teardown {
        Some(Ok(())) => metrics.push(Metric::new(
            "runner processes gone after DELETE",
            "s",
            &[teardown_time.as_secs_f64()],
        )),
        Some(Err(left)) => report.failure(format!(
            "{left} runner processes still alive {TEARDOWN_TIMEOUT:?} after DELETE"
        )),
        None => {}
    }
    report.note("MemAvailable is host-wide: other work on the machine adds noise");
    report.metrics = metrics;
    report
}

fn mib(kib: u64) -> f64 {
    kib as f64 / KIB_PER_MIB
}

/// Waits until no process is left in the service's cgroups; `Err` with the number still
/// there after the bound.
async fn await_teardown(cgroup: &str) -> Option<Result<(), usize>> {
    let started = Instant::now();
    loop {
        let left = processes_in_cgroup(cgroup).len();
        if left == 0 {
            return Some(Ok(()));
        }
        if started.elapsed() >= TEARDOWN_TIMEOUT {
            return Some(Err(left));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
