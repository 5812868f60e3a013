use std::sync::Arc;
use std::time::Duration;

use poseidon_core::backend::{BackendError, LostReason};
use poseidon_core::ids::{EnvironmentId, ExecutionId, RunnerId};
use poseidon_core::{
    Core, CoreConfig, ERROR_GENERIC, ERROR_OOM, ERROR_STOPPED, ExecutionEvent, ExecutionRequest,
    RunnerError, RunningExecution, StartError,
};
use tokio::time::Instant;

use crate::support::{TestBackend, core, core_with, environment, eventually};

pub fn request(command: &str) -> ExecutionRequest {
    ExecutionRequest {
        command: command.into(),
        privileged: false,
        time_limit: None,
        environment: Vec::new(),
    }
}

/// A core with one environment and one claimed runner.
pub async fn claimed(
    config: CoreConfig,
    inactivity: Duration,
) -> (Core, Arc<TestBackend>, RunnerId) {
    let (core, backend) = core_with(config);
    core.put_environment(environment(1, 1)).await.unwrap();
    eventually("the pool is full", || core.statistics()[0].idle_runners == 1).await;
    let runner = core.claim(EnvironmentId(1), inactivity).await.unwrap().id;
    (core, backend, runner)
}

pub async fn start(core: &Core, runner: &RunnerId, request: ExecutionRequest) -> RunningExecution {
    let id = core.store_execution(runner, request).unwrap();
    core.start_execution(runner, id).await.unwrap()
}

/// Every event up to the terminal one; asserts that nothing follows it.
pub async fn all_events(execution: &mut RunningExecution) -> Vec<ExecutionEvent> {
    let mut events = Vec::new();
    while let Some(event) = execution.next_event().await {
        events.push(event);
    }
    assert_eq!(execution.next_event().await, None);
    events
}

pub async fn terminal(execution: &mut RunningExecution) -> ExecutionEvent {
    let events = all_events(execution).await;
    let terminal = events.last().cloned().expect("a terminal event");
    assert_eq!(events.iter().filter(|event| event.is_terminal()).count(), 1, "{events:?}");
    terminal
}

fn error(text: &str) -> ExecutionEvent {
    ExecutionEvent::Error(text.into())
}

#[tokio::test(start_paused = true)]
async fn output_streams_in_order_then_the_exit_code() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let mut execution = start(&core, &runner, request("out:hello;err:oops;out:bye;exit:3")).await;
    assert_eq!(
        all_events(&mut execution).await,
        vec![
            ExecutionEvent::Stdout("hello".into()),
            ExecutionEvent::Stderr("oops".into()),
            ExecutionEvent::Stdout("bye".into()),
            ExecutionEvent::Exit(3),
        ]
    );
    let sent = backend.runner(&runner).requests.lock().unwrap()[0].clone();
    assert!(sent.tty && sent.separate_stderr && !sent.privileged);
    assert_eq!(sent.env, vec![("CODEOCEAN".to_owned(), "true".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn backend_outcomes_map_to_poseidon_terminal_events() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    for (command, expected) in [
        ("out:a;oom", error(ERROR_OOM)),
        ("out:a;exiterr", error(ERROR_GENERIC)),
        ("out:a;dropexit", error(ERROR_GENERIC)),
        ("exit:0", ExecutionEvent::Exit(0)),
    ] {
        let mut execution = start(&core, &runner, request(command)).await;
        assert_eq!(terminal(&mut execution).await, expected, "{command}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_execute_is_a_backend_start_error() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let id = core.store_execution(&runner, request("refuse")).unwrap();
    let error = core.start_execution(&runner, id).await.unwrap_err();
    assert_eq!(error, StartError::Backend(BackendError::Internal("cannot start".into())));
    assert!(core.has_runner(&runner));
}

#[tokio::test(start_paused = true)]
async fn the_time_limit_reports_timeout_first_and_the_runner_stays_usable() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let limited = ExecutionRequest { time_limit: Some(Duration::from_secs(1)), ..request("flood") };
    let started = Instant::now();
    let mut execution = start(&core, &runner, limited).await;
    let events = all_events(&mut execution).await;
    let elapsed = started.elapsed();
    assert_eq!(events.last(), Some(&ExecutionEvent::Timeout));
    assert!(
        events[..events.len() - 1].iter().all(|event| matches!(event, ExecutionEvent::Stdout(_)))
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed <= Duration::from_millis(1100),
        "{elapsed:?}"
    );
    eventually("the execution is stopped", || backend.runner(&runner).stopped_executions() == 1)
        .await;
    assert!(core.has_runner(&runner));
    let mut next = start(&core, &runner, request("out:again;exit:0")).await;
    assert_eq!(
        all_events(&mut next).await,
        vec![ExecutionEvent::Stdout("again".into()), ExecutionEvent::Exit(0)]
    );
}

#[tokio::test(start_paused = true)]
async fn an_execution_that_does_not_stop_after_its_time_limit_costs_its_runner() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let limited =
        ExecutionRequest { time_limit: Some(Duration::from_secs(1)), ..request("out:a;stubborn") };
    let mut execution = start(&core, &runner, limited).await;
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Timeout);
    tokio::time::sleep(Duration::from_millis(2900)).await;
    assert!(core.has_runner(&runner));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!core.has_runner(&runner));
    eventually("the runner is destroyed", || {
        backend.runner(&runner).destroyed.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn next_event_is_cancel_safe() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let mut execution = start(&core, &runner, request("out:a;pause;out:b;pause;exit:4")).await;
    let mut events = Vec::new();
    let mut cancelled = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(1), execution.next_event()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => break,
            Err(_) => cancelled += 1,
        }
    }
    assert!(cancelled > 5, "{cancelled}");
    let expected = vec![
        ExecutionEvent::Stdout("a".into()),
        ExecutionEvent::Stdout("b".into()),
        ExecutionEvent::Exit(4),
    ];
    assert_eq!(events, expected);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_execution_stops_it() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let execution = start(&core, &runner, request("hang")).await;
    drop(execution);
    eventually("the execution is stopped", || backend.runner(&runner).stopped_executions() == 1)
        .await;
}

#[tokio::test(start_paused = true)]
async fn the_inactivity_timeout_ends_executions_with_timeout_and_destroys_the_runner() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::from_secs(2)).await;
    let started = Instant::now();
    let mut execution = start(&core, &runner, request("out:a;hang")).await;
    assert_eq!(
        all_events(&mut execution).await,
        vec![ExecutionEvent::Stdout("a".into()), ExecutionEvent::Timeout]
    );
    assert!(started.elapsed() <= Duration::from_millis(2100));
    assert!(!core.has_runner(&runner));
    eventually("the runner is destroyed", || {
        backend.runner(&runner).destroyed.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    assert_eq!(core.store_execution(&runner, request("exit:0")), Err(RunnerError::Unknown));
}

#[tokio::test(start_paused = true)]
async fn destroying_the_runner_ends_executions_with_stopped() {
    let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let mut execution = start(&core, &runner, request("hang")).await;
    core.destroy_runner(&runner).await.unwrap();
    assert_eq!(terminal(&mut execution).await, error(ERROR_STOPPED));
    assert!(backend.runner(&runner).destroyed.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(core.destroy_runner(&runner).await, Err(RunnerError::Unknown));
    assert_eq!(
        core.start_execution(&runner, ExecutionId::new()).await.unwrap_err(),
        StartError::UnknownRunner
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_claimed_runner_ends_executions_with_its_reason_and_is_gone() {
    for (reason, expected) in [
        (LostReason::OomKilled, error(ERROR_OOM)),
        (LostReason::Stopped, error(ERROR_STOPPED)),
        (LostReason::Failed("allocation failed".into()), error(ERROR_GENERIC)),
    ] {
        let (core, backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
        let mut execution = start(&core, &runner, request("hang")).await;
        backend.runner(&runner).make_lost(reason.clone());
        assert_eq!(terminal(&mut execution).await, expected, "{reason:?}");
        assert!(!core.has_runner(&runner));
        eventually("a replacement is idle", || core.statistics()[0].idle_runners == 1).await;
    }
}

#[tokio::test(start_paused = true)]
async fn stored_executions_are_one_shot() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let id = core.store_execution(&runner, request("exit:0")).unwrap();
    assert!(core.has_execution(&runner, id));
    assert!(!core.has_execution(&runner, ExecutionId::new()));
    let mut execution = core.start_execution(&runner, id).await.unwrap();
    assert!(!core.has_execution(&runner, id));
    assert_eq!(core.start_execution(&runner, id).await.unwrap_err(), StartError::UnknownExecution);
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Exit(0));
}

#[tokio::test(start_paused = true)]
async fn stored_executions_expire_after_their_ttl() {
    let config =
        CoreConfig { stored_execution_ttl: Duration::from_secs(60), ..CoreConfig::default() };
    let (core, _backend, runner) = claimed(config, Duration::ZERO).await;
    let id = core.store_execution(&runner, request("exit:0")).unwrap();
    tokio::time::sleep(Duration::from_secs(59)).await;
    let kept = core.store_execution(&runner, request("exit:0")).unwrap();
    assert!(core.has_execution(&runner, id));
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert!(!core.has_execution(&runner, id));
    assert!(core.has_execution(&runner, kept));
    assert_eq!(core.start_execution(&runner, id).await.unwrap_err(), StartError::UnknownExecution);
}

#[tokio::test(start_paused = true)]
async fn stored_executions_are_bounded_per_runner() {
    let config = CoreConfig { max_stored_executions: 2, ..CoreConfig::default() };
    let (core, _backend, runner) = claimed(config, Duration::ZERO).await;
    let first = core.store_execution(&runner, request("exit:0")).unwrap();
    core.store_execution(&runner, request("exit:0")).unwrap();
    assert_eq!(
        core.store_execution(&runner, request("exit:0")),
        Err(RunnerError::TooManyExecutions)
    );
    let mut execution = core.start_execution(&runner, first).await.unwrap();
    assert_eq!(terminal(&mut execution).await, ExecutionEvent::Exit(0));
    core.store_execution(&runner, request("exit:0")).unwrap();
}

#[tokio::test(start_paused = true)]
async fn stdin_reaches_the_backend() {
    let (core, _backend, runner) = claimed(CoreConfig::default(), Duration::ZERO).await;
    let execution = start(&core, &runner, request("hang")).await;
    execution.stdin.send("input\n".into()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn executions_of_unknown_runners_are_refused() {
    let (core, _backend) = core();
    let unknown: RunnerId = "1-unknown".parse().unwrap();
    assert_eq!(core.store_execution(&unknown, request("exit:0")), Err(RunnerError::Unknown));
    assert!(!core.has_execution(&unknown, ExecutionId::new()));
    assert_eq!(
        core.start_execution(&unknown, ExecutionId::new()).await.unwrap_err(),
        StartError::UnknownRunner
    );
}
