//! Registration, the event stream, reads, updates, deletion, namespaces and ACL over HTTP.

mod common;

use common::{EventStream, TestSim, describe, poseidon_job};
use nomad_sim::SimConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn register_runs_the_allocation_with_nomads_event_sequence() {
    let sim = TestSim::start(SimConfig::default()).await;
    let mut stream =
        EventStream::open(&sim, "topic=Job&topic=Evaluation&topic=Allocation&index=0").await;
    assert_eq!(stream.line().await, Some(json!({})), "a heartbeat first");
    let eval_id = sim.register(&poseidon_job("29-a", "default")).await;
    let events = stream
        .until(|e| {
            e["Topic"] == "Allocation" && e["Payload"]["Allocation"]["ClientStatus"] == "running"
        })
        .await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described,
        [
            "Job/JobRegistered/pending",
            "Evaluation/JobRegistered/pending",
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
    let indexes: Vec<u64> = events.iter().map(|e| e["Index"].as_u64().unwrap()).collect();
    assert_eq!(indexes[0], indexes[1], "job and evaluation lines share the register index");
    assert!(indexes.windows(2).all(|w| w[0] <= w[1]), "{indexes:?}");
    assert!(indexes[2] > indexes[1] && indexes[5] > indexes[2]);
    assert_eq!(events[1]["Key"], eval_id.as_str());
    assert_eq!(events[2]["FilterKeys"], json!(["29-a", ""]));
    assert_eq!(events[0]["FilterKeys"], Value::Null);
    let planned = &events[2]["Payload"]["Allocation"];
    assert_eq!(planned["Name"], "29-a.default-group[0]");
    assert!(planned.get("TaskStates").is_none() && planned.get("Job").is_none(), "{planned}");
    assert_eq!(planned["CreateTime"], planned["ModifyTime"]);
    let running = &events[8]["Payload"]["Allocation"];
    assert_eq!(running["ClientDescription"], "Tasks are running");
    let task = &running["TaskStates"]["default-task"];
    assert_eq!(task["State"], "running");
    assert!(task["StartedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(task["FinishedAt"], Value::Null);
    let types: Vec<&str> =
        task["Events"].as_array().unwrap().iter().map(|e| e["Type"].as_str().unwrap()).collect();
    assert_eq!(types, ["Received", "Task Setup", "Started"]);

    let eval = sim.get_json(&format!("/v1/evaluation/{eval_id}")).await;
    assert_eq!(eval["Status"], "complete");
    assert_eq!(eval["TriggeredBy"], "job-register");
    assert!(eval.get("FailedTGAllocs").is_none() && eval.get("BlockedEval").is_none(), "{eval}");
    let allocs = sim.sim.allocations();
    assert_eq!(allocs.len(), 1, "no allocation for the count-0 config group: {allocs:?}");
    sim.finish().await;
}

#[tokio::test]
async fn job_reads_echo_meta_and_server_fields() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("29-b", "default")).await;
    sim.running_alloc("29-b").await;
    let (status, _) = sim.get("/v1/job/29-b?namespace=default").await;
    assert_eq!(status, 200);
    let response = sim.client.get(sim.url("/v1/job/29-b")).send().await.unwrap();
    let index: u64 = response.headers()["X-Nomad-Index"].to_str().unwrap().parse().unwrap();
    assert!(index > 1);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["Status"], "running");
    assert_eq!(job["Version"], 0);
    assert_eq!(job["Region"], "global");
    assert_eq!(job["TaskGroups"][1]["Meta"], json!({"used": "false", "prewarmingPoolSize": "1"}));
    assert_eq!(job["TaskGroups"][0]["Tasks"][0]["Config"]["args"], json!(["infinity"]));
    assert_eq!(job["TaskGroups"][0]["Spreads"][0]["Attribute"], "${node.unique.name}");
    assert_eq!(job["TaskGroups"][0]["Tasks"][0]["Vault"], Value::Null, "unset fields are null");
    assert_eq!(sim.get("/v1/job/nope").await, (404, "job not found".to_owned()));
    assert_eq!(sim.get("/v1/job/29-b?namespace=other").await.0, 404);

    let stubs = sim.get_json("/v1/jobs?prefix=29-").await;
    assert_eq!(stubs.as_array().unwrap().len(), 1);
    assert_eq!(stubs[0]["Status"], "running");
    assert_eq!(stubs[0]["JobSummary"]["Summary"]["default-group"]["Running"], 1);
    assert!(stubs[0].get("Meta").is_none());
    assert_eq!(sim.get_json("/v1/jobs?prefix=30-").await, json!([]));
    sim.finish().await;
}

#[tokio::test]
async fn meta_update_keeps_the_allocation_and_group_change_replaces_it() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("29-c", "default")).await;
    let first = sim.running_alloc("29-c").await;
    // Poseidon's "mark used": re-register the job's own GET output with changed meta.
    let mut job = sim.get_json("/v1/job/29-c").await;
    job["TaskGroups"][1]["Meta"] = json!({"used": "true", "timeout": "60"});
    let eval = sim.register(&job).await;
    sim.wait_eval(&eval, "complete").await;
    let job = sim.get_json("/v1/job/29-c").await;
    assert_eq!(job["Version"], 1);
    assert_eq!(job["TaskGroups"][1]["Meta"], json!({"used": "true", "timeout": "60"}));
    let allocs = sim.sim.allocations();
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    assert_eq!(allocs[0].id, first.id);
    assert_eq!(allocs[0].client_status, "running");

    let mut changed = job.clone();
    changed["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMaxMB"] = json!(256);
    sim.register(&changed).await;
    let allocs = sim
        .wait_allocs("29-c", |a| {
            a.len() == 2
                && a.iter().any(|a| a.id == first.id && a.client_status == "complete")
                && a.iter().any(|a| a.id != first.id && a.client_status == "running")
        })
        .await;
    let replacement = allocs.iter().find(|a| a.id != first.id).unwrap();
    assert_eq!(replacement.previous_allocation.as_deref(), Some(first.id.as_str()));
    sim.finish().await;
}

#[tokio::test]
async fn purge_delete_stops_and_removes_the_job() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("29-d", "default")).await;
    let alloc = sim.running_alloc("29-d").await;
    let mut stream =
        EventStream::open(&sim, "topic=Job&topic=Evaluation&topic=Allocation&index=999999").await;
    stream.batch().await.expect("the newest buffered batch is re-delivered");
    let (status, body) = sim.delete("/v1/job/29-d?purge=true").await;
    assert_eq!(status, 200, "{body}");
    let response: Value = serde_json::from_str(&body).unwrap();
    assert!(!response["EvalID"].as_str().unwrap().is_empty());
    let events = stream
        .until(|e| {
            e["Topic"] == "Allocation" && e["Payload"]["Allocation"]["ClientStatus"] == "complete"
        })
        .await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        described,
        [
            "Job/JobDeregistered/running",
            "Evaluation/JobDeregistered/pending",
            "Allocation/PlanResult/running/stop",
            "Evaluation/PlanResult/pending",
            "Evaluation/EvaluationUpdated/complete",
            "Allocation/AllocationUpdated/complete/stop",
        ],
        "{events:#?}"
    );
    let stopped = &events[2]["Payload"]["Allocation"];
    assert_eq!(stopped["DesiredDescription"], "alloc not needed due to job update");
    let killed = &events[5]["Payload"]["Allocation"]["TaskStates"]["default-task"];
    let types: Vec<&str> =
        killed["Events"].as_array().unwrap().iter().map(|e| e["Type"].as_str().unwrap()).collect();
    assert_eq!(&types[types.len() - 2..], ["Killing", "Killed"]);
    assert_eq!(sim.get("/v1/job/29-d").await.0, 404);
    let left = sim.get_json("/v1/job/29-d/allocations").await;
    assert_eq!(left[0]["ID"], alloc.id.as_str(), "allocations outlive a purged job");
    assert!(left[0].get("PreviousAllocation").is_none());
    // Deleting what does not exist is fine.
    let (status, body) = sim.delete("/v1/job/never?purge=true").await;
    assert_eq!(status, 200);
    let response: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(response["EvalID"], "");
    sim.finish().await;
}

#[tokio::test]
async fn registration_errors_are_nomads() {
    let sim = TestSim::start(SimConfig::default()).await;
    let (status, body) = sim.put("/v1/jobs", &json!({})).await;
    assert_eq!((status, body.as_str()), (400, "Job must be specified"));
    let (status, body) = sim.put("/v1/jobs", &json!({"Job": {"Name": "x"}})).await;
    assert_eq!((status, body.as_str()), (400, "Job ID hasn't been provided"));
    let (status, body) =
        sim.put("/v1/job/other", &json!({"Job": poseidon_job("29-e", "default")})).await;
    assert_eq!((status, body.as_str()), (400, "Job ID does not match name"));
    let mut typo = poseidon_job("29-e", "default");
    typo["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMax"] = json!(512);
    let (status, body) = sim.put("/v1/jobs", &json!({"Job": typo})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("MemoryMax"), "{body}");
    let mut mistyped = poseidon_job("29-e", "default");
    mistyped["TaskGroups"][0]["Count"] = json!("1");
    assert_eq!(sim.put("/v1/jobs", &json!({"Job": mistyped})).await.0, 400);
    let mut low = poseidon_job("29-e", "default");
    low["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMaxMB"] = json!(30);
    let (status, body) = sim.put("/v1/jobs", &json!({"Job": low})).await;
    assert_eq!(status, 500);
    assert!(
        body.starts_with("1 error occurred:\n\t* Task group default-group validation failed"),
        "{body}"
    );
    assert!(
        body.contains("MemoryMaxMB value (30) should be larger than MemoryMB value (50)"),
        "{body}"
    );
    let response = sim.client.put(sim.url("/v1/jobs")).body("{").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(sim.sim.jobs().is_empty());
    sim.finish().await;
}

#[tokio::test]
async fn namespaces_separate_jobs_and_streams() {
    let config =
        SimConfig { namespaces: vec!["default".into(), "poseidon".into()], ..SimConfig::default() };
    let sim = TestSim::start(config).await;
    let mut stream = EventStream::open(&sim, "topic=Job&namespace=poseidon").await;
    let (status, body) = sim
        .put("/v1/jobs?namespace=nowhere", &json!({"Job": poseidon_job("29-f", "nowhere")}))
        .await;
    assert_eq!(status, 500);
    assert_eq!(body, "job \"29-f\" is in nonexistent namespace \"nowhere\"");
    sim.register(&poseidon_job("29-f", "default")).await;
    let (status, _) = sim
        .put("/v1/jobs?namespace=poseidon", &json!({"Job": poseidon_job("29-g", "poseidon")}))
        .await;
    assert_eq!(status, 200);
    let batch = stream.batch().await.unwrap();
    assert_eq!(
        batch["Events"][0]["Key"], "29-g",
        "the default namespace's job is filtered: {batch}"
    );
    assert_eq!(batch["Events"][0]["Namespace"], "poseidon");
    assert_eq!(sim.get_json("/v1/jobs?namespace=poseidon").await.as_array().unwrap().len(), 1);
    assert_eq!(sim.get_json("/v1/jobs").await[0]["ID"], "29-f");
    assert_eq!(sim.get_json("/v1/jobs?namespace=*").await.as_array().unwrap().len(), 2);
    sim.running_alloc("29-g").await;
    assert_eq!(sim.get_json("/v1/job/29-g/allocations").await, json!([]), "default namespace");
    assert_eq!(
        sim.get_json("/v1/job/29-g/allocations?namespace=poseidon").await.as_array().unwrap().len(),
        1
    );
    assert_eq!(
        sim.get_json("/v1/allocations?namespace=poseidon").await.as_array().unwrap().len(),
        1
    );
    sim.finish().await;
}

#[tokio::test]
async fn acl_token_is_required_when_configured() {
    let sim =
        TestSim::start(SimConfig { acl_token: Some("secret".into()), ..SimConfig::default() })
            .await;
    assert_eq!(sim.get("/v1/jobs").await, (403, "Permission denied".to_owned()));
    let wrong =
        sim.client.get(sim.url("/v1/jobs")).header("X-Nomad-Token", "guess").send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert_eq!(wrong.text().await.unwrap(), "ACL token not found");
    let right =
        sim.client.get(sim.url("/v1/jobs")).header("X-Nomad-Token", "secret").send().await.unwrap();
    assert_eq!(right.status(), 200);
    let bearer = sim.client.get(sim.url("/v1/jobs")).bearer_auth("secret").send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    let stream = sim.client.get(sim.url("/v1/event/stream?topic=Job")).send().await.unwrap();
    assert_eq!(stream.status(), 403);
    let requests = sim.sim.requests();
    assert_eq!(requests.len(), 5);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[4].path, "/v1/event/stream?topic=Job");
    sim.finish().await;
}

#[tokio::test]
async fn requests_are_recorded_with_their_bodies() {
    let sim = TestSim::start(SimConfig::default()).await;
    let job = poseidon_job("29-h", "default");
    sim.register(&job).await;
    let requests = sim.sim.requests();
    assert_eq!(requests[0].method, "PUT");
    assert_eq!(requests[0].path, "/v1/jobs");
    let body: Value = serde_json::from_str(&requests[0].body).unwrap();
    assert_eq!(body, json!({"Job": job}));
    sim.finish().await;
}

#[tokio::test]
async fn blocking_queries_wait_for_a_newer_index() {
    let sim = TestSim::start(SimConfig::default()).await;
    let index = sim.sim.index();
    let started = std::time::Instant::now();
    let (status, _) = sim.get(&format!("/v1/jobs?index={index}&wait=200ms")).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(190), "it waited");
    let path = format!("/v1/jobs?index={index}&wait=5s");
    let waiting = sim.get(&path);
    let register = async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        sim.register(&poseidon_job("29-i", "default")).await
    };
    let started = std::time::Instant::now();
    let ((status, body), _) = tokio::join!(waiting, register);
    assert_eq!(status, 200);
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert!(body.contains("29-i"), "{body}");
    assert_eq!(sim.get("/v1/jobs?index=x").await, (400, "Invalid index".to_owned()));
    assert_eq!(sim.get("/v1/jobs?index=1&wait=5").await, (400, "Invalid wait time".to_owned()));
    sim.finish().await;
}

#[tokio::test]
async fn deregister_without_purge_keeps_a_stopped_dead_job() {
    let sim = TestSim::start(SimConfig::default()).await;
    sim.register(&poseidon_job("29-j", "default")).await;
    sim.running_alloc("29-j").await;
    let mut stream = EventStream::open_after(&sim, "topic=Job").await;
    let (status, _) = sim.delete("/v1/job/29-j").await;
    assert_eq!(status, 200);
    let events = stream.until(|e| e["Type"] == "JobDeregistered").await;
    assert_eq!(events[0]["Payload"]["Job"]["Stop"], true);
    assert_eq!(events[0]["Payload"]["Job"]["Status"], "dead");
    sim.wait_allocs("29-j", |a| a[0].client_status == "complete").await;
    let job = sim.get_json("/v1/job/29-j").await;
    assert_eq!(job["Stop"], true);
    assert_eq!(job["Status"], "dead");
    // Registering it again starts it again.
    sim.register(&poseidon_job("29-j", "default")).await;
    let alloc = sim.running_alloc("29-j").await;
    assert_eq!(alloc.previous_allocation, None);
    assert_eq!(sim.get_json("/v1/job/29-j").await["Version"], 1);
    sim.finish().await;
}
