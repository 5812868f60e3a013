//! Faults of the Nomad cluster under a running execution (spec §6.6), over the simulator:
//! the execution ends at once with the matching message and the runner is gone.
//! Runs with `POSEIDON_E2E_BACKEND=nomad`; says that it was skipped otherwise.

// Shared by every test crate; each uses a part of it.
#[allow(dead_code)]
mod common;

use std::time::Duration;

use common::ws::Terminal;
use common::{INACTIVITY_TIMEOUT, ServerOptions, TestServer, nomad_backend, with_server};

/// The running allocation of runner `runner`.
fn allocation_of(server: &TestServer, runner: &str) -> String {
    let sim = server.nomad_sim().expect("a server of the Nomad backend");
    sim.allocations()
        .into_iter()
        .find(|a| a.job_id == runner && a.client_status == "running" && a.desired_status == "run")
        .map(|a| a.id)
        .unwrap_or_else(|| panic!("runner {runner} has no running allocation"))
}

/// Starts `sleep 60` on a fresh runner, applies `fault` to its allocation and returns how the
/// execution ended.
async fn execution_under_fault(
    server: &TestServer,
    fault: impl FnOnce(&nomad_sim::SimHandle, &str),
) -> (String, Terminal, Duration) {
    let runner = server.claim(1, INACTIVITY_TIMEOUT).await;
    let url = server.execute(&runner, "echo started; sleep 60", 60, false).await;
    let mut session = server.connect(&url).await;
    session.wait_for_stdout("started").await;
    fault(server.nomad_sim().unwrap(), &allocation_of(server, &runner));
    let transcript = session.finish().await;
    (runner, transcript.terminal, transcript.elapsed)
}

/// A fault applied to an allocation of the simulator.
type Fault = fn(&nomad_sim::SimHandle, &str);

fn skipped() -> bool {
    if !nomad_backend() {
        eprintln!("skipped: only for the Nomad backend (POSEIDON_E2E_BACKEND=nomad)");
    }
    !nomad_backend()
}

#[tokio::test]
async fn an_oom_killed_allocation_ends_its_execution_with_the_oom_message() {
    if skipped() {
        return;
    }
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let (runner, terminal, elapsed) = execution_under_fault(server, |sim, allocation| {
            sim.restart_allocation(allocation, true).unwrap();
        })
        .await;
        assert_eq!(terminal, Terminal::Error("the allocation was OOM Killed".into()));
        assert!(elapsed < Duration::from_secs(10), "ended at once, not at the time limit");
        server.list_files(&runner, &[]).await.expect(410, "the OOM-killed runner is gone");
        server.wait_idle(1, 1).await;
    })
    .await;
}

#[tokio::test]
async fn restarted_rescheduled_and_stopped_allocations_end_their_executions() {
    if skipped() {
        return;
    }
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 1).await;
        let cases: [(&str, Fault, &str); 3] = [
            (
                "restart",
                |sim, a| sim.restart_allocation(a, false).unwrap(),
                "Error executing the request",
            ),
            (
                "reschedule",
                |sim, a| sim.reschedule_allocation(a).unwrap(),
                "Error executing the request",
            ),
            (
                "stop",
                |sim, a| sim.stop_allocation(a).unwrap(),
                "the allocation stopped as expected",
            ),
        ];
        for (fault, apply, message) in cases {
            server.wait_idle(1, 1).await;
            let (runner, terminal, _) = execution_under_fault(server, apply).await;
            assert_eq!(terminal, Terminal::Error(message.into()), "{fault}");
            server.list_files(&runner, &[]).await.expect(410, fault);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while server.nomad_runner_jobs(1).contains(&runner) {
                assert!(std::time::Instant::now() < deadline, "{fault}: the job stays");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        server.wait_idle(1, 1).await;
        assert_eq!(server.nomad_runner_jobs(1).len(), 1, "exactly the pool");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_nomad_keeps_health_claims_and_deletes_answering() {
    if skipped() {
        return;
    }
    with_server(ServerOptions::default(), async |server| {
        server.create_env(1, 2).await;
        let sim = server.nomad_sim().unwrap();
        sim.set_unreachable(true).await.unwrap();
        server.get("/health").await.expect_empty(204, "health while Nomad is down");
        let runner = server.claim(1, INACTIVITY_TIMEOUT).await;
        let started = std::time::Instant::now();
        server.delete(&format!("/runners/{runner}")).await.expect_empty(204, "DELETE");
        assert!(started.elapsed() < Duration::from_secs(3), "DELETE answered at once");
        sim.set_unreachable(false).await.unwrap();
        server.wait_idle(1, 2).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while server.nomad_runner_jobs(1).len() != 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "jobs: {:?}",
                server.nomad_runner_jobs(1)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let runner = server.claim(1, INACTIVITY_TIMEOUT).await;
        server.run(&runner, "true").await.assert_exit(0);
    })
    .await;
}
