use std::sync::atomic::Ordering;
use std::time::Duration;

use poseidon_core::backend::{BackendError, FileUpdate, ListRequest};
use poseidon_core::ids::{EnvironmentId, RunnerId};
use poseidon_core::{CoreConfig, ExecutionEvent, FileOpError, RunnerError};

use crate::executions::{claimed, request, start, terminal};
use crate::support::{core, environment, eventually};

async fn sleep_ms(milliseconds: u64) {
    tokio::time::sleep(Duration::from_millis(milliseconds)).await;
}

fn list_request() -> ListRequest {
    ListRequest { path: "./".into(), recursive: true, privileged: false }
}

#[tokio::test(start_paused = true)]
async fn file_operations_and_execution_starts_reset_the_inactivity_timer() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::from_secs(2)).await;
    sleep_ms(1500).await;
    core.update_files(&runner, FileUpdate::default()).await.unwrap();
    sleep_ms(1500).await;
    core.list_files(&runner, list_request()).await.unwrap();
    sleep_ms(1500).await;
    core.read_file(&runner, "a.txt", false).await.unwrap();
    sleep_ms(1500).await;
    let mut execution = start(&core, &runner, request("exit:0")).await;
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Exit(0));
    sleep_ms(1900).await;
    assert!(core.has_runner(&runner));
    assert_eq!(backend.runner(&runner).file_operations.load(Ordering::SeqCst), 3);
    sleep_ms(200).await;
    assert!(!core.has_runner(&runner));
    assert_eq!(
        core.list_files(&runner, list_request()).await.unwrap_err(),
        FileOpError::UnknownRunner
    );
}

#[tokio::test(start_paused = true)]
async fn storing_an_execution_does_not_reset_the_inactivity_timer() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::from_secs(2)).await;
    sleep_ms(1500).await;
    core.store_execution(&runner, request("exit:0")).unwrap();
    sleep_ms(600).await;
    assert!(!core.has_runner(&runner));
}

#[tokio::test(start_paused = true)]
async fn a_zero_inactivity_timeout_never_expires() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
    assert!(core.has_runner(&runner));
}

#[tokio::test(start_paused = true)]
async fn a_huge_inactivity_timeout_does_not_overflow() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::MAX).await;
    core.update_files(&runner, FileUpdate::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(core.has_runner(&runner));
}

#[tokio::test(start_paused = true)]
async fn a_failed_backend_destroy_is_reported_but_the_runner_is_gone() {
    let (core, backend) = core();
    backend.fail_destroy.store(true, Ordering::SeqCst);
    core.put_environment(environment(1, 1)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 1).await;
    let runner = core.claim(EnvironmentId(1), Duration::ZERO).await.unwrap().id;
    assert_eq!(
        core.destroy_runner(&runner).await,
        Err(RunnerError::Backend(BackendError::Internal("destroy failed".into())))
    );
    assert!(!core.has_runner(&runner));
    assert_eq!(core.destroy_runner(&runner).await, Err(RunnerError::Unknown));
}

#[tokio::test(start_paused = true)]
async fn idle_runners_are_not_addressable() {
    let (core, backend) = core();
    core.put_environment(environment(1, 1)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 1).await;
    let idle: RunnerId = backend.runners.lock().unwrap()[0].id.clone();
    assert!(!core.has_runner(&idle));
    assert_eq!(core.destroy_runner(&idle).await, Err(RunnerError::Unknown));
    assert_eq!(core.read_file(&idle, "a", false).await.unwrap_err(), FileOpError::UnknownRunner);
    assert_eq!(core.statistics()[0].idle_runners, 1);
}
