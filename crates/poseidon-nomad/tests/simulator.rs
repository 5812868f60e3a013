//! The backend under the core against the Nomad simulator (without sandboxes: these tests
//! need allocations, not processes): pools, claims, recovery, and the faults of spec §6.6.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nomad_sim::{SimConfig, SimHandle, Simulator};
use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::EnvironmentId;
use poseidon_core::{Core, CoreConfig};
use poseidon_nomad::{NomadBackend, NomadConfig};

const ENV: EnvironmentId = EnvironmentId(7);
const WAIT: Duration = Duration::from_secs(15);

fn environment(pool: u32) -> EnvironmentConfig {
    EnvironmentConfig {
        id: ENV,
        prewarming_pool_size: pool,
        cpu_limit: 20,
        memory_limit: 256,
        image: "openhpi/co_execenv_python:3.8".into(),
        network_access: false,
        exposed_ports: Vec::new(),
    }
}

async fn simulator(capacity: Option<usize>) -> SimHandle {
    Simulator::start(SimConfig { capacity, ..SimConfig::default() }).await.expect("simulator")
}

fn config(sim: &SimHandle) -> NomadConfig {
    NomadConfig {
        port: sim.address().port(),
        request_attempts: 2,
        start_timeout: Duration::from_secs(60),
        reconcile_interval: Duration::from_secs(1),
        ..NomadConfig::default()
    }
}

async fn core_on(sim: &SimHandle) -> Core {
    let backend = NomadBackend::start(config(sim)).await.expect("backend");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.restore().await.expect("restore");
    core
}

/// Runner jobs (not templates) the simulator holds.
fn runner_jobs(sim: &SimHandle) -> Vec<String> {
    let mut jobs: Vec<String> = sim
        .jobs()
        .into_iter()
        .map(|job| job.id)
        .filter(|id| id.starts_with(&format!("{ENV}-")))
        .collect();
    jobs.sort();
    jobs
}

/// The running runner allocation of `job`.
fn allocation_of(sim: &SimHandle, job: &str) -> String {
    sim.allocations()
        .into_iter()
        .find(|a| a.job_id == job && a.client_status == "running" && a.desired_status == "run")
        .map(|a| a.id)
        .unwrap_or_else(|| panic!("{job} has no running allocation"))
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn idle(core: &Core) -> usize {
    core.statistics().first().map_or(0, |statistics| statistics.idle_runners)
}

fn used(core: &Core) -> usize {
    core.statistics().first().map_or(0, |statistics| statistics.used_runners)
}

#[tokio::test]
async fn the_pool_fills_with_runner_jobs_and_claims_are_recorded_in_nomad() {
    let sim = simulator(None).await;
    let core = core_on(&sim).await;
    core.put_environment(environment(2)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 2).await;
    assert_eq!(runner_jobs(&sim).len(), 2);
    assert!(sim.jobs().iter().any(|job| job.id == "template-7"));

    let claimed = core.claim(ENV, Duration::from_secs(90)).await.unwrap();
    eventually("the claim is in the job's meta", || {
        sim.jobs().iter().any(|job| {
            job.id == claimed.id.as_str()
                && job.job["TaskGroups"][1]["Meta"]["used"] == "true"
                && job.job["TaskGroups"][1]["Meta"]["timeout"] == "90"
        })
    })
    .await;
    eventually("the pool refills", || idle(&core) == 2).await;
    assert_eq!(runner_jobs(&sim).len(), 3);

    let started = Instant::now();
    core.destroy_runner(&claimed.id).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    eventually("the job is deregistered", || runner_jobs(&sim).len() == 2).await;

    core.delete_environment(ENV).await.unwrap();
    eventually("every job is gone", || sim.jobs().is_empty()).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_blocked_evaluation_counts_towards_the_pool_and_never_over_provisions() {
    // One slot for the template job's allocation, one for a runner.
    let sim = simulator(Some(2)).await;
    let core = core_on(&sim).await;
    core.put_environment(environment(3)).await.unwrap();
    eventually("one runner runs", || idle(&core) == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runner_jobs(&sim).len(), 3, "two runner jobs wait for capacity");
    assert!(sim.evaluations().iter().any(|evaluation| evaluation.status == "blocked"));

    sim.set_capacity(None);
    eventually("the blocked runners are placed", || idle(&core) == 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runner_jobs(&sim).len(), 3);
    assert_eq!(idle(&core), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn restarted_oom_killed_and_rescheduled_allocations_replace_their_runner() {
    let sim = simulator(None).await;
    let core = core_on(&sim).await;
    core.put_environment(environment(1)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 1).await;

    for fault in ["restart", "oom", "reschedule", "stop"] {
        let job = runner_jobs(&sim).pop().unwrap();
        let allocation = allocation_of(&sim, &job);
        match fault {
            "restart" => sim.restart_allocation(&allocation, false).unwrap(),
            "oom" => sim.restart_allocation(&allocation, true).unwrap(),
            "reschedule" => sim.reschedule_allocation(&allocation).unwrap(),
            _ => sim.stop_allocation(&allocation).unwrap(),
        }
        eventually(&format!("the runner is replaced after {fault}"), || {
            let jobs = runner_jobs(&sim);
            jobs.len() == 1 && jobs[0] != job && idle(&core) == 1
        })
        .await;
    }

    let claimed = core.claim(ENV, Duration::ZERO).await.unwrap();
    let allocation = allocation_of(&sim, claimed.id.as_str());
    sim.restart_allocation(&allocation, true).unwrap();
    eventually("the claimed runner is gone", || !core.has_runner(&claimed.id)).await;
    eventually("only the pool's runner is left", || runner_jobs(&sim).len() == 1).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_dropped_event_stream_is_resumed_and_missed_changes_are_caught_up() {
    let sim = simulator(None).await;
    let core = core_on(&sim).await;
    core.put_environment(environment(1)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 1).await;
    let job = runner_jobs(&sim).pop().unwrap();

    sim.drop_event_streams();
    sim.clear_event_buffer();
    sim.restart_allocation(&allocation_of(&sim, &job), false).unwrap();
    eventually("the restart is noticed", || {
        let jobs = runner_jobs(&sim);
        jobs.len() == 1 && jobs[0] != job && idle(&core) == 1
    })
    .await;
    let subscriptions: Vec<String> = sim
        .requests()
        .into_iter()
        .map(|request| request.path)
        .filter(|path| path.starts_with("/v1/event/stream"))
        .collect();
    assert!(subscriptions.len() >= 2, "the stream was subscribed again: {subscriptions:?}");
    assert!(
        subscriptions[1..]
            .iter()
            .all(|path| !path.contains("index=0&") && !path.ends_with("index=0")),
        "resumed after the last index seen: {subscriptions:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn while_nomad_is_unreachable_claims_and_deletes_answer_and_cleanup_follows() {
    let sim = simulator(None).await;
    let core = core_on(&sim).await;
    core.put_environment(environment(2)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 2).await;

    sim.set_unreachable(true).await.unwrap();
    let claimed = core.claim(ENV, Duration::from_secs(60)).await.unwrap();
    let started = Instant::now();
    core.destroy_runner(&claimed.id).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "DELETE answers at once");
    assert!(
        core.put_environment(environment(3)).await.is_err(),
        "Nomad refuses nothing, it is down"
    );

    sim.set_unreachable(false).await.unwrap();
    eventually("the deleted runner's job is gone and the pool refilled", || {
        !runner_jobs(&sim).contains(&claimed.id.to_string()) && idle(&core) == 2
    })
    .await;
    assert_eq!(runner_jobs(&sim).len(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_restart_recovers_idle_used_and_starting_runners_without_over_provisioning() {
    let sim = simulator(None).await;
    let first = core_on(&sim).await;
    first.put_environment(environment(2)).await.unwrap();
    eventually("the pool is full", || idle(&first) == 2).await;
    let claimed = first.claim(ENV, Duration::from_secs(3)).await.unwrap();
    eventually("the claim is recorded", || {
        sim.jobs().iter().any(|job| {
            job.id == claimed.id.as_str() && job.job["TaskGroups"][1]["Meta"]["used"] == "true"
        })
    })
    .await;
    eventually("the pool refills", || idle(&first) == 2).await;
    sim.set_pending_delay(Duration::from_secs(2));
    let second_claim = first.claim(ENV, Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.shutdown().await;
    drop(first);
    let before: Vec<String> = runner_jobs(&sim);
    assert_eq!(before.len(), 4, "two idle (one starting), two used");

    let second = core_on(&sim).await;
    assert!(second.has_runner(&claimed.id));
    assert!(second.has_runner(&second_claim.id));
    assert_eq!(second.environments(), vec![environment(2)]);
    eventually("the starting runner joins the pool", || idle(&second) == 2).await;
    assert_eq!(used(&second), 2);
    assert_eq!(runner_jobs(&sim), before, "no runner job was added or lost");

    eventually("the recovered inactivity timer fires", || !second.has_runner(&claimed.id)).await;
    eventually("its job is deregistered", || runner_jobs(&sim).len() == 3).await;

    // Runner jobs copied from the recovered template job register as well.
    sim.set_pending_delay(Duration::from_millis(10));
    second.claim(ENV, Duration::ZERO).await.unwrap();
    eventually("the pool refills from the recovered template", || idle(&second) == 2).await;
    assert_eq!(runner_jobs(&sim).len(), 4);
    sim.shutdown().await;
}

/// The Go Poseidon's template job in HCL (spec §7.1), with its own datacenter.
const TEMPLATE_HCL: &str = r#"
// The environment template: one runner group and a count-0 group for metadata.
job "template-0" {
  datacenters = ["dc-hcl"]
  type        = "batch"

  group "default-group" {
    count = 1
    ephemeral_disk {
      migrate = false
      size    = 10
      sticky  = false
    }
    spread {
      attribute = "${node.unique.name}"
      weight    = 100
    }
    restart {
      attempts = 3
      delay    = "15s"
      interval = "1h"
      mode     = "fail"
    }
    reschedule {
      unlimited      = false
      attempts       = 3
      interval       = "6h"
      delay          = "1m"
      max_delay      = "4m"
      delay_function = "exponential"
    }
    task "default-task" {
      driver       = "docker"
      kill_timeout = "0s"
      kill_signal  = "SIGKILL"
      config {
        image        = "openhpi/docker_exec_phusion"
        command      = "sleep"
        args         = ["infinity"]
        network_mode = "none"
      }
      logs {
        max_files     = 1
        max_file_size = 1
      }
      resources {
        cpu    = 40
        memory = 50
      }
    }
  }

  group "config" {
    count = 0
    task "config" {
      driver = "exec"
      config {
        command = "true"
      }
      logs {
        max_files     = 1
        max_file_size = 1
      }
      resources {
        cpu    = 1 # the minimum
        memory = 10
      }
    }
    meta {
      used               = "false"
      prewarmingPoolSize = "0"
    }
  }
}
"#;

#[tokio::test]
async fn an_hcl_template_file_is_parsed_by_nomad_and_used() {
    let sim = simulator(None).await;
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("job.hcl");
    std::fs::write(&file, TEMPLATE_HCL).unwrap();
    let backend = NomadBackend::start(NomadConfig {
        template: poseidon_nomad::TemplateSource::File(file.clone()),
        ..config(&sim)
    })
    .await
    .expect("an HCL template");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.put_environment(environment(1)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 1).await;
    for job in sim.jobs() {
        assert_eq!(job.job["Datacenters"], serde_json::json!(["dc-hcl"]), "{}", job.id);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_json_template_file_is_used_and_hcl_goes_through_nomads_parser() {
    let sim = simulator(None).await;
    let directory = tempfile::tempdir().unwrap();
    let json = directory.path().join("job.json");
    let mut template = serde_json::json!({"Job": {
        "ID": "template-0", "Type": "batch", "Datacenters": ["dc-custom"],
        "TaskGroups": [
            {"Name": "default-group", "Count": 1,
             "Tasks": [{"Name": "default-task", "Driver": "docker",
                        "Config": {"image": "x", "command": "sleep", "args": ["infinity"]},
                        "Resources": {"CPU": 40, "MemoryMB": 50}}]},
            {"Name": "config", "Count": 0,
             "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
                        "Resources": {"CPU": 1, "MemoryMB": 10}}],
             "Meta": {"used": "false"}}]}});
    std::fs::write(&json, template.to_string()).unwrap();
    let backend = NomadBackend::start(NomadConfig {
        template: poseidon_nomad::TemplateSource::File(json.clone()),
        ..config(&sim)
    })
    .await
    .expect("a JSON template");
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.put_environment(environment(1)).await.unwrap();
    eventually("the pool is full", || idle(&core) == 1).await;
    let registered = sim.jobs().into_iter().find(|job| job.id == "template-7").unwrap();
    assert_eq!(registered.job["Datacenters"], serde_json::json!(["dc-custom"]));

    let hcl = directory.path().join("job.hcl");
    std::fs::write(&hcl, "job \"template-0\" {\n  this is no job\n}\n").unwrap();
    let error = NomadBackend::start(NomadConfig {
        template: poseidon_nomad::TemplateSource::File(hcl),
        ..config(&sim)
    })
    .await
    .unwrap_err();
    assert!(error.to_string().contains("cannot parse the template job file"), "{error}");
    assert!(sim.requests().iter().any(|request| request.path.starts_with("/v1/jobs/parse")));

    template["Job"]["TaskGroups"].as_array_mut().unwrap().pop();
    std::fs::write(&json, template.to_string()).unwrap();
    let error = NomadBackend::start(NomadConfig {
        template: poseidon_nomad::TemplateSource::File(json),
        ..config(&sim)
    })
    .await
    .unwrap_err();
    assert!(error.to_string().contains("no group config"), "{error}");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_start_that_times_out_deregisters_its_job_so_a_late_placement_cannot_over_provision() {
    // Room for the template job's allocation only.
    let sim = simulator(Some(1)).await;
    let backend = NomadBackend::start(NomadConfig {
        start_timeout: Duration::from_millis(500),
        ..config(&sim)
    })
    .await
    .unwrap();
    let core = Core::new(Arc::new(backend), CoreConfig::default());
    core.put_environment(environment(1)).await.unwrap();
    let first = {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(job) = runner_jobs(&sim).pop() {
                break job;
            }
            assert!(Instant::now() < deadline, "no runner job registered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    eventually("the blocked runner job is deregistered", || !runner_jobs(&sim).contains(&first))
        .await;
    assert!(runner_jobs(&sim).len() <= 1, "never more runner jobs than the pool");

    sim.set_capacity(None);
    eventually("the pool fills once there is room", || idle(&core) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(runner_jobs(&sim).len(), 1);
    sim.shutdown().await;
}
