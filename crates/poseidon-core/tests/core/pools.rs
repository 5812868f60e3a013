use std::sync::atomic::Ordering;
use std::time::Duration;

use poseidon_core::backend::LostReason;
use poseidon_core::ids::EnvironmentId;
use poseidon_core::{ClaimError, CoreConfig};

use crate::support::{core, core_with, environment, eventually, settle};

fn idle(core: &poseidon_core::Core, id: i64) -> usize {
    core.statistics()
        .iter()
        .find(|statistics| statistics.id == EnvironmentId(id))
        .map_or(0, |s| s.idle_runners)
}

#[tokio::test(start_paused = true)]
async fn pool_fills_to_size_counting_creations_in_flight() {
    let (core, backend) = core();
    backend.set_creation_delay(Duration::from_millis(50));
    core.put_environment(environment(1, 3)).await.unwrap();
    // Identical PUTs while the creations are in flight must not start more.
    core.put_environment(environment(1, 3)).await.unwrap();
    core.put_environment(environment(1, 3)).await.unwrap();
    eventually("the pool is full", || idle(&core, 1) == 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.created(), 3);
    assert_eq!(idle(&core, 1), 3);
}

#[tokio::test(start_paused = true)]
async fn each_claim_replenishes_exactly_one_runner() {
    let (core, backend) = core();
    backend.set_creation_delay(Duration::from_millis(50));
    core.put_environment(environment(1, 2)).await.unwrap();
    eventually("the pool is full", || idle(&core, 1) == 2).await;
    core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap();
    core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap();
    assert_eq!(core.claim(EnvironmentId(1), Duration::ZERO).await, Err(ClaimError::NoIdleRunner));
    eventually("the pool is full again", || idle(&core, 1) == 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.created(), 4);
    let statistics = &core.statistics()[0];
    assert_eq!((statistics.idle_runners, statistics.used_runners), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_changed_put_during_filling_discards_the_stale_creations() {
    let (core, backend) = core();
    backend.set_creation_delay(Duration::from_millis(100));
    core.put_environment(environment(1, 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut changed = environment(1, 2);
    changed.cpu_limit = 40;
    core.put_environment(changed.clone()).await.unwrap();
    eventually("the new pool is full", || idle(&core, 1) == 2).await;
    eventually("stale runners are destroyed", || backend.destroyed() == 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.created(), 4);
    assert_eq!(backend.live_runners(), 2);
    let live = backend
        .runners
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !r.destroyed.load(Ordering::SeqCst))
        .count();
    assert_eq!(live, 2);
    assert_eq!(core.environment(EnvironmentId(1)), Some(changed));
}

#[tokio::test(start_paused = true)]
async fn creations_in_flight_are_bounded_over_all_environments() {
    let (core, backend) =
        core_with(CoreConfig { creation_concurrency: 2, ..CoreConfig::default() });
    backend.set_creation_delay(Duration::from_millis(100));
    core.put_environment(environment(1, 3)).await.unwrap();
    core.put_environment(environment(2, 3)).await.unwrap();
    eventually("both pools are full", || idle(&core, 1) == 3 && idle(&core, 2) == 3).await;
    assert_eq!(backend.max_creations_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn failed_creations_are_retried_with_exponential_backoff() {
    let (core, backend) = core();
    backend.failing_creations.store(3, Ordering::SeqCst);
    core.put_environment(environment(1, 1)).await.unwrap();
    // Attempts at 0, 100 ms, 300 ms and 700 ms.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 2);
    assert_eq!(core.claim(EnvironmentId(1), Duration::ZERO).await, Err(ClaimError::NoIdleRunner));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 3);
    eventually("the pool is full", || idle(&core, 1) == 1).await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 4);
    assert_eq!(backend.created(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lost_idle_runner_is_replaced() {
    let (core, backend) = core();
    core.put_environment(environment(1, 2)).await.unwrap();
    eventually("the pool is full", || idle(&core, 1) == 2).await;
    let lost = backend.runners.lock().unwrap()[0].clone();
    lost.make_lost(LostReason::Failed("init vanished".into()));
    eventually("the lost runner is destroyed", || lost.destroyed.load(Ordering::SeqCst)).await;
    eventually("the pool is full again", || idle(&core, 1) == 2 && backend.created() == 3).await;
    settle().await;
    assert_eq!(backend.live_runners(), 2);
}

#[tokio::test(start_paused = true)]
async fn claim_errors_name_the_cause() {
    let (core, backend) = core();
    assert_eq!(
        core.claim(EnvironmentId(9), Duration::ZERO).await,
        Err(ClaimError::UnknownEnvironment)
    );
    core.put_environment(environment(1, 0)).await.unwrap();
    assert_eq!(core.claim(EnvironmentId(1), Duration::ZERO).await, Err(ClaimError::NoIdleRunner));
    settle().await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn claimed_runners_carry_their_mapped_ports_and_are_addressable() {
    let (core, _backend) = core();
    let mut config = environment(3, 1);
    config.network_access = true;
    config.exposed_ports = vec![80];
    core.put_environment(config).await.unwrap();
    eventually("the pool is full", || idle(&core, 3) == 1).await;
    let claimed = core.claim(EnvironmentId(3), Duration::ZERO).await.unwrap();
    assert_eq!(claimed.id.environment(), Some(EnvironmentId(3)));
    assert_eq!(claimed.mapped_ports.len(), 1);
    assert_eq!(claimed.mapped_ports[0].exposed_port, 80);
    assert!(core.has_runner(&claimed.id));
    assert_eq!(core.statistics()[0].used_runners, 1);
}

#[tokio::test(start_paused = true)]
async fn depleting_environments_compare_idle_share_with_the_threshold() {
    let (core, backend) = core();
    backend.set_creation_delay(Duration::from_secs(10));
    core.put_environment(environment(1, 2)).await.unwrap();
    core.put_environment(environment(2, 0)).await.unwrap();
    assert_eq!(core.depleting_environments(0.5), vec![EnvironmentId(1)]);
    assert_eq!(core.depleting_environments(0.0), Vec::<EnvironmentId>::new());
    eventually("the pool is full", || idle(&core, 1) == 2).await;
    assert_eq!(core.depleting_environments(1.0), Vec::<EnvironmentId>::new());
    core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap();
    assert_eq!(core.depleting_environments(0.6), vec![EnvironmentId(1)]);
    assert_eq!(core.depleting_environments(0.5), Vec::<EnvironmentId>::new());
}

#[tokio::test(start_paused = true)]
async fn shutdown_destroys_every_runner_and_stops_refilling() {
    let (core, backend) = core();
    core.put_environment(environment(1, 2)).await.unwrap();
    eventually("the pool is full", || idle(&core, 1) == 2).await;
    let claimed = core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap();
    eventually("the pool is full again", || idle(&core, 1) == 2).await;
    core.shutdown().await;
    assert_eq!(backend.live_runners(), 0);
    assert!(!core.has_runner(&claimed.id));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(backend.created(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_huge_pool_is_filled_by_a_bounded_number_of_creators() {
    let (core, backend) =
        core_with(CoreConfig { creation_concurrency: 2, ..CoreConfig::default() });
    backend.set_creation_delay(Duration::from_millis(100));
    core.put_environment(environment(1, u32::MAX)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(idle(&core, 1), 20);
    assert_eq!(backend.max_creations_in_flight.load(Ordering::SeqCst), 2);
    core.shutdown().await;
    assert_eq!(backend.live_runners(), 0);
}
