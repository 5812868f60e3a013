//! Fault injection: restarts, OOM kills, failures and reschedules, lost nodes, stops,
//! capacity, event stream drops and an unreachable server.

mod common;

use std::time::Duration;

use common::{EventStream, TestSim, describe, poseidon_job};
use nomad_sim::{FaultError, SimConfig};
use serde_json::{Value, json};

const ALL_TOPICS: &str = "topic=Job&topic=Evaluation&topic=Allocation";

fn task_events(alloc: &Value) -> Vec<Value> {
    alloc["TaskStates"]["default-task"]["Events"].as_array().cloned().unwrap_or_default()
}

fn is_alloc(event: &Value, client: &str, desired: &str) -> bool {
    let alloc = &event["Payload"]["Allocation"];
    alloc["ClientStatus"] == client
        && alloc.get("DesiredStatus").and_then(Value::as_str) == Some(desired)
}

#[tokio::test]
async fn oom_restart_keeps_the_allocation_and_reports_the_kill() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("2-a", "default")).await;
    let alloc = sim.running_alloc("2-a").await;
    let mut stream = EventStream::open_after(&sim, "topic=Allocation:2-a").await;
    sim.sim.restart_allocation(&alloc.id, true).unwrap();
    let events = stream.until(|e| is_alloc(e, "running", "run")).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described,
        ["Allocation/AllocationUpdated/pending/run", "Allocation/AllocationUpdated/running/run"]
    );
    let restarting = &events[0]["Payload"]["Allocation"];
    assert_eq!(restarting["ID"], alloc.id.as_str(), "a restart keeps the allocation");
    assert_eq!(restarting["TaskStates"]["default-task"]["State"], "pending");
    assert_eq!(restarting["TaskStates"]["default-task"]["Restarts"], 1);
    let tail = task_events(restarting);
    let terminated = &tail[tail.len() - 2];
    assert_eq!(terminated["Type"], "Terminated");
    assert_eq!(terminated["Details"]["oom_killed"], "true");
    assert_eq!(terminated["Details"]["exit_code"], "137");
    assert_eq!(terminated["ExitCode"], 137);
    assert_eq!(terminated["Message"], "OOM Killed");
    assert_eq!(tail[tail.len() - 1]["Type"], "Restarting");
    assert_eq!(tail[tail.len() - 1]["Details"]["restart_reason"], "Restart within policy");

    sim.sim.restart_allocation(&alloc.id, false).unwrap();
    let events = stream.until(|e| is_alloc(e, "running", "run")).await;
    let restarting = &events[0]["Payload"]["Allocation"];
    assert_eq!(restarting["TaskStates"]["default-task"]["Restarts"], 2);
    let tail = task_events(restarting);
    assert_eq!(tail[tail.len() - 2]["Details"]["oom_killed"], "false");
    assert_eq!(
        sim.sim.restart_allocation("nope", false),
        Err(FaultError::UnknownAllocation("nope".into()))
    );
    sim.finish().await;
}

#[tokio::test]
async fn restarts_beyond_the_policy_fail_and_reschedule() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("2-b", "default")).await;
    let alloc = sim.running_alloc("2-b").await;
    for restarts in 1..=3 {
        sim.sim.restart_allocation(&alloc.id, false).unwrap();
        sim.wait_allocs("2-b", |a| a[0].restarts == restarts && a[0].client_status == "running")
            .await;
    }
    let mut stream = EventStream::open_after(&sim, ALL_TOPICS).await;
    sim.sim.restart_allocation(&alloc.id, false).unwrap();
    let events =
        stream.until(|e| is_alloc(e, "running", "run") && e["Key"] != alloc.id.as_str()).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described,
        [
            "Allocation/AllocationUpdated/failed/run",
            "Evaluation/AllocationUpdated/pending",
            "Job/AllocationUpdated/pending",
            "Allocation/PlanResult/failed/run",
            "Evaluation/PlanResult/pending",
            "Evaluation/PlanResult/pending",
            "Evaluation/EvaluationUpdated/complete",
            "Allocation/PlanResult/failed/stop",
            "Allocation/PlanResult/pending/run",
            "Evaluation/PlanResult/pending",
            "Job/PlanResult/running",
            "Evaluation/EvaluationUpdated/complete",
            "Allocation/AllocationUpdated/pending/run",
            "Allocation/AllocationUpdated/pending/run",
            "Allocation/AllocationUpdated/running/run",
        ],
        "{events:#?}"
    );
    let failed = &events[0]["Payload"]["Allocation"];
    let tail = task_events(failed);
    assert_eq!(tail.last().unwrap()["Type"], "Not Restarting");
    assert_eq!(tail.last().unwrap()["FailsTask"], true);
    assert_eq!(events[1]["Payload"]["Evaluation"]["TriggeredBy"], "alloc-failure");
    let followup = &events[5]["Payload"]["Evaluation"];
    assert_eq!(followup["TriggeredBy"], "alloc-reschedule");
    assert!(followup["WaitUntil"].is_string());
    assert_eq!(events[3]["Payload"]["Allocation"]["FollowupEvalID"], followup["ID"]);
    let old = &events[7]["Payload"]["Allocation"];
    let new = &events[8]["Payload"]["Allocation"];
    assert_eq!(sim.get_json("/v1/job/2-b").await["Status"], "running");
    assert_eq!(old["DesiredDescription"], "alloc was rescheduled because it failed");
    assert_eq!(old["NextAllocation"], new["ID"]);
    assert_eq!(new["PreviousAllocation"], alloc.id.as_str());
    assert_eq!(new["RescheduleTracker"]["Events"][0]["PrevAllocID"], alloc.id.as_str());
    assert_eq!(new["Name"], "2-b.default-group[0]");
    let stubs = sim.get_json("/v1/job/2-b/allocations").await;
    assert_eq!(stubs.as_array().unwrap().len(), 2);
    assert!(stubs.as_array().unwrap().iter().all(|s| s.get("PreviousAllocation").is_none()));
    let ids: Vec<&str> =
        stubs.as_array().unwrap().iter().map(|s| s["ID"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "allocation lists are in ID order, not by time");
    sim.finish().await;
}

#[tokio::test]
async fn failure_without_reschedule_attempts_leaves_the_job_dead() {
    let sim = TestSim::start(SimConfig::default()).await;
    let mut job = poseidon_job("2-c", "default");
    job["TaskGroups"][0]["ReschedulePolicy"]["Attempts"] = json!(0);
    sim.register(&job).await;
    let alloc = sim.running_alloc("2-c").await;
    sim.sim.fail_allocation(&alloc.id).unwrap();
    sim.wait_allocs("2-c", |a| a[0].client_status == "failed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sim.sim.allocations().len(), 1, "nothing replaces it");
    let deadline = std::time::Instant::now() + common::WAIT;
    while sim.get_json("/v1/job/2-c").await["Status"] != "dead" {
        assert!(std::time::Instant::now() < deadline, "the job never became dead");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // reschedule_allocation reschedules regardless of the policy.
    let mut job = poseidon_job("2-c2", "default");
    job["TaskGroups"][0]["ReschedulePolicy"]["Attempts"] = json!(0);
    sim.register(&job).await;
    let alloc = sim.running_alloc("2-c2").await;
    sim.sim.reschedule_allocation(&alloc.id).unwrap();
    let allocs = sim
        .wait_allocs("2-c2", |a| a.iter().any(|a| a.client_status == "running" && a.id != alloc.id))
        .await;
    let new = allocs.iter().find(|a| a.id != alloc.id).unwrap();
    assert_eq!(new.previous_allocation.as_deref(), Some(alloc.id.as_str()));
    sim.finish().await;
}

#[tokio::test]
async fn stop_and_lost_allocations_are_replaced() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("2-d", "default")).await;
    let alloc = sim.running_alloc("2-d").await;
    let mut stream = EventStream::open_after(&sim, "topic=Allocation").await;
    sim.sim.stop_allocation(&alloc.id).unwrap();
    let events = stream.until(|e| is_alloc(e, "complete", "stop")).await;
    assert_eq!(describe(&events[0]), "Allocation/AllocationUpdateDesiredStatus/running/stop");
    assert_eq!(events[0]["Payload"]["Allocation"]["DesiredTransition"], json!({"Migrate": true}));
    let placed = events.iter().find(|e| is_alloc(e, "pending", "run")).expect("a replacement");
    assert_eq!(placed["Payload"]["Allocation"]["PreviousAllocation"], alloc.id.as_str());
    let replacement = sim.running_alloc("2-d").await;
    assert_ne!(replacement.id, alloc.id);

    sim.sim.lose_allocation(&replacement.id).unwrap();
    let events = stream.until(|e| is_alloc(e, "lost", "stop")).await;
    assert_eq!(
        events.last().unwrap()["Payload"]["Allocation"]["ClientDescription"],
        "alloc is lost since its node is down"
    );
    let allocs = sim
        .wait_allocs("2-d", |a| {
            a.iter().any(|a| {
                a.client_status == "running"
                    && a.previous_allocation.as_deref() == Some(replacement.id.as_str())
            })
        })
        .await;
    assert_eq!(allocs.len(), 3);
    assert!(matches!(sim.sim.stop_allocation(&alloc.id), Err(FaultError::WrongState { .. })));
    sim.finish().await;
}

#[tokio::test]
async fn no_capacity_blocks_the_evaluation_until_room_appears() {
    let sim = TestSim::start(SimConfig { capacity: Some(1), ..SimConfig::default() }).await;
    sim.register(&poseidon_job("3-a", "default")).await;
    let first = sim.running_alloc("3-a").await;
    let eval = sim.register(&poseidon_job("3-b", "default")).await;
    let eval = sim.wait_eval(&eval, "complete").await;
    let failed = &eval["FailedTGAllocs"]["default-group"];
    assert_eq!(failed["DimensionExhausted"]["memory"], 1, "{eval}");
    let blocked_id = eval["BlockedEval"].as_str().expect("a blocked evaluation").to_owned();
    let blocked = sim.get_json(&format!("/v1/evaluation/{blocked_id}")).await;
    assert_eq!(blocked["Status"], "blocked");
    assert_eq!(blocked["TriggeredBy"], "queued-allocs");
    assert_eq!(blocked["PreviousEval"], eval["ID"]);
    let job = sim.get_json("/v1/job/3-b").await;
    assert_eq!(job["Status"], "pending", "a blocked evaluation keeps the job pending");
    let stub = &sim.get_json("/v1/jobs?prefix=3-b").await[0];
    assert_eq!(stub["JobSummary"]["Summary"]["default-group"]["Queued"], 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sim.sim.allocations().iter().all(|a| a.job_id != "3-b"));

    // Freeing the slot places the blocked job without any client action.
    sim.delete("/v1/job/3-a?purge=true").await;
    let placed = sim.running_alloc("3-b").await;
    assert_eq!(placed.name, "3-b.default-group[0]");
    sim.wait_eval(&blocked_id, "complete").await;
    assert_eq!(sim.sim.allocations().iter().filter(|a| a.client_status == "running").count(), 1);
    assert_ne!(placed.id, first.id);

    // Growing the capacity does too.
    sim.sim.set_capacity(Some(1));
    sim.register(&poseidon_job("3-c", "default")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sim.sim.allocations().iter().all(|a| a.job_id != "3-c"));
    sim.sim.set_capacity(Some(2));
    sim.running_alloc("3-c").await;
    sim.finish().await;
}

#[tokio::test]
async fn streams_resume_by_index_inclusively() {
    let config =
        SimConfig { heartbeat_interval: Duration::from_millis(100), ..SimConfig::default() };
    let sim = TestSim::start(config).await;
    let mut stream = EventStream::open(&sim, ALL_TOPICS).await;
    sim.register(&poseidon_job("4-a", "default")).await;
    let seen = stream.until(|e| is_alloc(e, "running", "run")).await;
    let last = seen.last().unwrap()["Index"].as_u64().unwrap();
    // Heartbeats keep coming while nothing happens.
    assert_eq!(stream.line().await, Some(json!({})));
    sim.sim.drop_event_streams();
    assert_eq!(
        tokio::time::timeout(common::WAIT, async { while stream.line().await.is_some() {} }).await,
        Ok(()),
        "the stream ends"
    );

    let mut resumed = EventStream::open(&sim, &format!("{ALL_TOPICS}&index={last}")).await;
    let again = resumed.batch().await.unwrap();
    assert_eq!(again["Index"], last, "index is inclusive: the last batch comes again");
    sim.register(&poseidon_job("4-b", "default")).await;
    let next = resumed.batch().await.unwrap();
    assert_eq!(next["Events"][0]["Key"], "4-b");
    assert!(next["Index"].as_u64().unwrap() > last);

    let mut replay = EventStream::open(&sim, &format!("{ALL_TOPICS}&index=0")).await;
    let first = replay.batch().await.unwrap();
    assert_eq!(first["Events"][0]["Key"], "4-a", "index=0 replays the buffer");
    assert_eq!(first["Events"][0]["Type"], "JobRegistered");
    let (status, body) = sim.get("/v1/event/stream?index=x").await;
    assert_eq!(status, 400);
    assert!(body.starts_with("Unable to parse index"), "{body}");
    sim.finish().await;
}

#[tokio::test]
async fn the_buffer_is_bounded_and_can_be_lost() {
    let sim = TestSim::start(SimConfig { event_buffer_size: 3, ..SimConfig::default() }).await;
    sim.register(&poseidon_job("4-c", "default")).await;
    sim.running_alloc("4-c").await;
    let mut replay = EventStream::open(&sim, "topic=*&index=0").await;
    let first = replay.batch().await.unwrap();
    assert_ne!(first["Events"][0]["Type"], "JobRegistered", "old batches are gone: {first}");
    sim.sim.clear_event_buffer();
    let mut empty = EventStream::open(&sim, "topic=*&index=0").await;
    assert_eq!(empty.line().await, Some(json!({})));
    sim.register(&poseidon_job("4-d", "default")).await;
    let batch = empty.batch().await.unwrap();
    assert_eq!(batch["Events"][0]["Key"], "4-d");
    assert!(
        batch["Index"].as_u64().unwrap() > first["Index"].as_u64().unwrap(),
        "indexes continue"
    );
    sim.finish().await;
}

#[tokio::test]
async fn an_unreachable_server_refuses_connections_and_comes_back() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("5-a", "default")).await;
    let mut stream = EventStream::open(&sim, ALL_TOPICS).await;
    assert_eq!(stream.line().await, Some(json!({})));
    sim.sim.set_unreachable(true).await.unwrap();
    assert_eq!(
        tokio::time::timeout(common::WAIT, async { while stream.line().await.is_some() {} }).await,
        Ok(()),
        "open streams are cut"
    );
    let refused = reqwest::Client::new().get(sim.url("/v1/jobs")).send().await;
    assert!(refused.is_err_and(|e| e.is_connect()), "connections are refused");
    sim.sim.set_unreachable(false).await.unwrap();
    let stubs = sim.get_json("/v1/jobs").await;
    assert_eq!(stubs[0]["ID"], "5-a", "state survives");
    sim.finish().await;
}

#[tokio::test]
async fn stop_events_can_be_suppressed() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("6-a", "default")).await;
    sim.running_alloc("6-a").await;
    sim.sim.set_suppress_stop_events(true);
    let mut stream = EventStream::open_after(&sim, ALL_TOPICS).await;
    sim.delete("/v1/job/6-a?purge=true").await;
    sim.wait_allocs("6-a", |a| a[0].client_status == "complete").await;
    sim.register(&poseidon_job("6-b", "default")).await;
    let events = stream.until(|e| e["Key"] == "6-b").await;
    assert!(events.iter().all(|e| e["Topic"] != "Allocation"), "{events:#?}");
    assert_eq!(describe(&events[0]), "Job/JobDeregistered/running");
    sim.finish().await;
}
