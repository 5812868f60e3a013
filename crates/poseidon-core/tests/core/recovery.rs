//! Restoring what a backend kept over a restart, and the hooks for backends whose runners
//! outlive the service (claims, environment deletion, shutdown).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use poseidon_core::backend::{BackendError, Recovery, Runner, StartingRunner};
use poseidon_core::ids::{EnvironmentId, RunnerId};
use poseidon_core::{CoreConfig, CoreError};
use tokio::sync::oneshot;

use crate::support::{TestBackend, core, core_with, environment, eventually, settle};

const ENV: EnvironmentId = EnvironmentId(1);

fn runner(backend: &TestBackend) -> Arc<dyn Runner> {
    backend.new_runner(RunnerId::new(ENV), Vec::new())
}

type Start = oneshot::Sender<Result<Arc<dyn Runner>, BackendError>>;

/// A starting runner that resolves when the returned sender is used.
fn starting() -> (Start, StartingRunner) {
    let (sender, receiver) = oneshot::channel();
    let future = receiver.map(|result| result.expect("the test keeps the sender")).boxed();
    (sender, future)
}

#[tokio::test(start_paused = true)]
async fn recovered_runners_rejoin_and_starting_ones_count_towards_the_pool() {
    let (core, backend) = core();
    let idle = runner(&backend);
    let used = runner(&backend);
    let (start, pending) = starting();
    *backend.recovery.lock().unwrap() = Some(Recovery {
        environments: vec![environment(1, 2)],
        idle: vec![(ENV, idle.clone())],
        used: vec![(ENV, used.clone(), Duration::from_secs(5))],
        starting: vec![(ENV, pending)],
    });

    assert_eq!(core.restore().await.unwrap(), 1);
    settle().await;
    let statistics = &core.statistics()[0];
    assert_eq!((statistics.idle_runners, statistics.used_runners), (1, 1));
    assert!(core.has_runner(used.id()));
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 0, "the starting one counts");

    start.send(Ok(runner(&backend))).ok().unwrap();
    eventually("the starting runner joins the pool", || core.statistics()[0].idle_runners == 2)
        .await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 0);

    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert!(core.has_runner(used.id()), "the inactivity timer restarts with its full duration");
    eventually("the used runner times out", || !core.has_runner(used.id())).await;
    assert!(backend.runner(used.id()).destroyed.load(Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_starting_runner_that_fails_is_replaced_once() {
    let (core, backend) = core();
    let (start, pending) = starting();
    *backend.recovery.lock().unwrap() = Some(Recovery {
        environments: vec![environment(1, 1)],
        starting: vec![(ENV, pending)],
        ..Recovery::default()
    });
    core.restore().await.unwrap();
    settle().await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 0);
    start.send(Err(BackendError::Unavailable("no capacity".into()))).ok().unwrap();
    eventually("a replacement fills the pool", || core.statistics()[0].idle_runners == 1).await;
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn surplus_and_orphaned_runners_are_destroyed() {
    let (core, backend) = core();
    let kept = runner(&backend);
    let surplus = runner(&backend);
    let orphan: Arc<dyn Runner> = backend.new_runner(RunnerId::new(EnvironmentId(9)), Vec::new());
    let orphan_used: Arc<dyn Runner> =
        backend.new_runner(RunnerId::new(EnvironmentId(9)), Vec::new());
    let (start, pending) = starting();
    *backend.recovery.lock().unwrap() = Some(Recovery {
        environments: vec![environment(1, 1)],
        idle: vec![(ENV, kept.clone()), (ENV, surplus.clone()), (EnvironmentId(9), orphan.clone())],
        used: vec![(EnvironmentId(9), orphan_used.clone(), Duration::ZERO)],
        starting: vec![(ENV, pending)],
    });
    core.restore().await.unwrap();
    let late = runner(&backend);
    start.send(Ok(late.clone())).ok().unwrap();
    eventually("surplus runners are destroyed", || backend.destroyed() == 4).await;
    for destroyed in [&surplus, &orphan, &orphan_used, &late] {
        assert!(backend.runner(destroyed.id()).destroyed.load(Ordering::SeqCst));
    }
    assert_eq!(core.statistics()[0].idle_runners, 1);
    assert!(!core.has_runner(orphan_used.id()));
    assert_eq!(backend.creation_attempts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn backend_environments_win_over_the_state_file() {
    let directory = tempfile::tempdir().unwrap();
    let config =
        CoreConfig { state_dir: Some(directory.path().join("state")), ..CoreConfig::default() };
    let (first, _) = core_with(config.clone());
    first.put_environment(environment(3, 0)).await.unwrap();
    first.shutdown().await;

    let (second, backend) = core_with(config.clone());
    *backend.recovery.lock().unwrap() =
        Some(Recovery { environments: vec![environment(1, 0)], ..Recovery::default() });
    assert_eq!(second.restore().await.unwrap(), 1);
    assert_eq!(second.environments(), vec![environment(1, 0)]);
    second.shutdown().await;

    let (third, _) = core_with(config);
    assert_eq!(third.restore().await.unwrap(), 1, "the state file was rewritten");
    assert_eq!(third.environments(), vec![environment(1, 0)]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_recovery_is_reported() {
    struct Failing;
    #[async_trait::async_trait]
    impl poseidon_core::backend::Backend for Failing {
        async fn prepare_environment(
            &self,
            _: &poseidon_core::environment::EnvironmentConfig,
        ) -> Result<(), BackendError> {
            Ok(())
        }
        async fn create_runner(
            &self,
            _: &poseidon_core::environment::EnvironmentConfig,
            _: RunnerId,
        ) -> Result<Arc<dyn Runner>, BackendError> {
            Err(BackendError::Unavailable("down".into()))
        }
        async fn recover(&self) -> Result<Recovery, BackendError> {
            Err(BackendError::Unavailable("nomad is unreachable".into()))
        }
    }
    let core = poseidon_core::Core::new(Arc::new(Failing), CoreConfig::default());
    let error = core.restore().await.unwrap_err();
    assert!(matches!(error, CoreError::Recover(BackendError::Unavailable(_))));
    assert!(error.to_string().contains("nomad is unreachable"));
}

#[tokio::test(start_paused = true)]
async fn claims_and_environment_deletions_reach_the_backend() {
    let (core, backend) = core();
    core.put_environment(environment(1, 1)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 1).await;
    let claimed = core.claim(ENV, Duration::from_secs(7)).await.unwrap();
    assert_eq!(*backend.claims.lock().unwrap(), vec![(claimed.id, Duration::from_secs(7))]);
    core.delete_environment(ENV).await.unwrap();
    assert_eq!(*backend.deleted_environments.lock().unwrap(), vec![ENV]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_keeps_runners_that_outlive_the_service() {
    let (core, backend) = core();
    backend.outlive.store(true, Ordering::SeqCst);
    core.put_environment(environment(1, 2)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 2).await;
    core.claim(ENV, Duration::ZERO).await.unwrap();
    backend.set_creation_delay(Duration::from_secs(3600));
    settle().await;
    core.shutdown().await;
    assert_eq!(backend.destroyed(), 0);
    assert_eq!(backend.created(), 2, "the creation in flight was interrupted");
}

#[tokio::test(start_paused = true)]
async fn shutdown_destroys_local_runners() {
    let (core, backend) = core();
    core.put_environment(environment(1, 2)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 2).await;
    core.shutdown().await;
    assert_eq!(backend.destroyed(), 2);
}
