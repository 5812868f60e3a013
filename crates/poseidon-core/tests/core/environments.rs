use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use poseidon_core::backend::BackendError;
use poseidon_core::ids::EnvironmentId;
use poseidon_core::{
    ClaimError, Core, CoreConfig, CoreError, ERROR_GENERIC, EnvironmentError, ExecutionEvent,
    PutOutcome, StoreError,
};

use crate::executions::{request, start, terminal};
use crate::support::{TestBackend, core, environment, eventually, settle};

async fn ready(core: &Core, pool_size: u32) -> poseidon_core::ids::RunnerId {
    core.put_environment(environment(1, pool_size)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == pool_size as usize)
        .await;
    core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap().id
}

#[tokio::test(start_paused = true)]
async fn put_creates_then_updates() {
    let (core, _backend) = core();
    assert_eq!(core.put_environment(environment(2, 0)).await.unwrap(), PutOutcome::Created);
    assert_eq!(core.put_environment(environment(1, 0)).await.unwrap(), PutOutcome::Created);
    assert_eq!(core.put_environment(environment(1, 0)).await.unwrap(), PutOutcome::Updated);
    let ids: Vec<_> = core.environments().iter().map(|config| config.id).collect();
    assert_eq!(ids, vec![EnvironmentId(1), EnvironmentId(2)]);
    assert_eq!(core.environment(EnvironmentId(2)), Some(environment(2, 0)));
    assert_eq!(core.environment(EnvironmentId(3)), None);
}

#[tokio::test(start_paused = true)]
async fn an_identical_put_keeps_idle_and_claimed_runners() {
    let (core, backend) = core();
    let runner = ready(&core, 1).await;
    eventually("the pool is full again", || core.statistics()[0].idle_runners == 1).await;
    let mut execution = start(&core, &runner, request("hang")).await;
    assert_eq!(core.put_environment(environment(1, 1)).await.unwrap(), PutOutcome::Updated);
    settle().await;
    assert!(core.has_runner(&runner));
    assert_eq!((backend.created(), backend.destroyed()), (2, 0));
    assert!(tokio::time::timeout(Duration::from_secs(1), execution.next_event()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_changed_put_recreates_every_runner_and_ends_claimed_ones_with_a_generic_error() {
    let (core, backend) = core();
    let runner = ready(&core, 1).await;
    eventually("the pool is full again", || core.statistics()[0].idle_runners == 1).await;
    let mut execution = start(&core, &runner, request("hang")).await;
    let mut changed = environment(1, 1);
    changed.image = "python:3".into();
    assert_eq!(core.put_environment(changed).await.unwrap(), PutOutcome::Updated);
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Error(ERROR_GENERIC.into()));
    assert!(!core.has_runner(&runner));
    eventually("the new pool is full", || core.statistics()[0].idle_runners == 1).await;
    eventually("the old runners are destroyed", || backend.destroyed() == 2).await;
    assert_eq!(backend.live_runners(), 1);
    assert_eq!(core.statistics()[0].used_runners, 0);
}

#[tokio::test(start_paused = true)]
async fn a_put_the_backend_rejects_changes_nothing() {
    let (core, backend) = core();
    core.put_environment(environment(1, 0)).await.unwrap();
    backend.reject_prepare.store(true, Ordering::SeqCst);
    let mut changed = environment(1, 0);
    changed.image = "missing".into();
    let error = core.put_environment(changed).await.unwrap_err();
    assert!(
        matches!(error, EnvironmentError::Backend(BackendError::InvalidEnvironment(_))),
        "{error:?}"
    );
    assert_eq!(core.environment(EnvironmentId(1)), Some(environment(1, 0)));
    assert!(matches!(
        core.put_environment(environment(5, 0)).await,
        Err(EnvironmentError::Backend(_))
    ));
    assert_eq!(core.environment(EnvironmentId(5)), None);
}

#[tokio::test(start_paused = true)]
async fn delete_removes_the_environment_and_ends_its_runners() {
    let (core, backend) = core();
    assert!(matches!(
        core.delete_environment(EnvironmentId(1)).await,
        Err(EnvironmentError::NotFound)
    ));
    let runner = ready(&core, 2).await;
    let mut execution = start(&core, &runner, request("hang")).await;
    core.put_environment(environment(2, 0)).await.unwrap();
    core.delete_environment(EnvironmentId(1)).await.unwrap();
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Error(ERROR_GENERIC.into()));
    assert!(!core.has_runner(&runner));
    assert_eq!(core.environment(EnvironmentId(1)), None);
    assert_eq!(
        core.claim(EnvironmentId(1), Duration::ZERO).await,
        Err(ClaimError::UnknownEnvironment)
    );
    eventually("every runner is gone", || backend.live_runners() == 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.live_runners(), 0);
    let ids: Vec<_> = core.statistics().iter().map(|statistics| statistics.id).collect();
    assert_eq!(ids, vec![EnvironmentId(2)]);
}

#[tokio::test]
async fn environments_survive_a_restart_through_the_state_directory() {
    let directory = tempfile::tempdir().unwrap();
    let config =
        CoreConfig { state_dir: Some(directory.path().join("state")), ..CoreConfig::default() };
    let first = Core::new(Arc::new(TestBackend::default()), config.clone());
    assert_eq!(first.restore().await.unwrap(), 0);
    let mut kept = environment(1, 2);
    kept.exposed_ports = vec![80];
    first.put_environment(environment(3, 1)).await.unwrap();
    first.put_environment(kept.clone()).await.unwrap();
    first.put_environment(environment(4, 0)).await.unwrap();
    first.delete_environment(EnvironmentId(3)).await.unwrap();
    first.shutdown().await;

    let backend = Arc::new(TestBackend::default());
    let second = Core::new(backend.clone(), config);
    assert_eq!(second.restore().await.unwrap(), 2);
    assert_eq!(second.environments(), vec![kept, environment(4, 0)]);
    eventually("the restored pool is full", || second.statistics()[0].idle_runners == 2).await;
    assert_eq!(backend.created(), 2);
    second.shutdown().await;
}

#[tokio::test]
async fn restore_skips_environments_the_backend_rejects() {
    let directory = tempfile::tempdir().unwrap();
    let config = CoreConfig { state_dir: Some(directory.path().into()), ..CoreConfig::default() };
    let first = Core::new(Arc::new(TestBackend::default()), config.clone());
    first.put_environment(environment(1, 0)).await.unwrap();
    let backend = Arc::new(TestBackend::default());
    backend.reject_prepare.store(true, Ordering::SeqCst);
    let second = Core::new(backend, config);
    assert_eq!(second.restore().await.unwrap(), 0);
    assert!(second.environments().is_empty());
}

#[tokio::test]
async fn restore_reports_a_corrupt_state_file() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(directory.path().join("environments.json"), "[1, 2").unwrap();
    let config = CoreConfig { state_dir: Some(directory.path().into()), ..CoreConfig::default() };
    let core = Core::new(Arc::new(TestBackend::default()), config);
    let error = core.restore().await.unwrap_err();
    assert!(matches!(error, CoreError::Store(StoreError::Corrupt { .. })));
    assert!(error.to_string().contains("environments.json"), "{error}");
}
