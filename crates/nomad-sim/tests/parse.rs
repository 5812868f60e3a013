//! `POST /v1/jobs/parse` with Poseidon's template (nomad-api.md §1.5, poseidon spec §7.1) and
//! the schema guard on what clients send.

mod common;

use common::{TestSim, poseidon_job};
use nomad_sim::SimConfig;
use serde_json::{Value, json};

/// Poseidon's default template job as described in the spec (§7.1), in HCL.
const TEMPLATE_HCL: &str = r#"
// The environment template: one runner group and a count-0 group for metadata.
job "template-0" {
  datacenters = ["dc1"]
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

async fn parse(sim: &TestSim, hcl: &str) -> (u16, String) {
    sim.put("/v1/jobs/parse?namespace=default", &json!({"JobHCL": hcl, "Canonicalize": false}))
        .await
}

#[tokio::test]
async fn poseidons_template_parses_to_the_json_of_the_reference() {
    let sim = TestSim::start(SimConfig::default()).await;
    let (status, body) = parse(&sim, TEMPLATE_HCL).await;
    assert_eq!(status, 200, "{body}");
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["ID"], "template-0");
    assert_eq!(job["Type"], "batch");
    let group = &job["TaskGroups"][0];
    assert_eq!(group["EphemeralDisk"], json!({"Migrate": false, "SizeMB": 10, "Sticky": false}));
    assert_eq!(group["Spreads"], json!([{"Attribute": "${node.unique.name}", "Weight": 100}]));
    assert_eq!(
        group["RestartPolicy"],
        json!({"Attempts": 3, "Delay": 15_000_000_000_i64, "Interval": 3_600_000_000_000_i64, "Mode": "fail"})
    );
    assert_eq!(group["ReschedulePolicy"]["MaxDelay"], 240_000_000_000_i64);
    let task = &group["Tasks"][0];
    assert_eq!(task["KillTimeout"], 0);
    assert_eq!(task["Config"]["args"], json!(["infinity"]));
    assert_eq!(task["LogConfig"], json!({"MaxFiles": 1, "MaxFileSizeMB": 1}));
    assert_eq!(task["Resources"], json!({"CPU": 40, "MemoryMB": 50}));
    assert_eq!(job["TaskGroups"][1]["Meta"], json!({"used": "false", "prewarmingPoolSize": "0"}));

    // What parse returns registers as it is.
    let mut runner = job.clone();
    runner["ID"] = json!("0-runner");
    runner["Name"] = json!("0-runner");
    sim.register(&runner).await;
    sim.running_alloc("0-runner").await;
    sim.finish().await;
}

#[tokio::test]
async fn parse_errors_are_400() {
    let sim = TestSim::start(SimConfig::default()).await;
    assert_eq!(parse(&sim, "").await, (400, "Job spec is empty".to_owned()));
    let (status, body) = parse(&sim, "job \"x\" {\n  group \"g\" {\n    count = \n").await;
    assert_eq!(status, 400);
    assert!(body.starts_with("Failed to parse job: line"), "{body}");
    let (status, body) = parse(&sim, "job \"x\" { vault { policies = [\"a\"] } }").await;
    assert_eq!(status, 400);
    assert!(body.contains("vault"), "{body}");
    let (status, body) = sim.put("/v1/jobs/parse", &json!({"JobHCL": "x", "Variabels": ""})).await;
    assert_eq!(status, 400, "unknown request keys are refused: {body}");
    let (status, body) =
        parse(&sim, &json!({"Job": poseidon_job("j", "default")}).to_string()).await;
    assert_eq!(status, 200, "JSON jobs pass: {body}");
    sim.finish().await;
}

#[tokio::test]
async fn dynamic_ports_get_host_ports() {
    let sim = TestSim::start(SimConfig::default()).await;
    let mut job = poseidon_job("7-a", "default");
    job["TaskGroups"][0]["Networks"] = json!([{"Mode": "bridge", "DynamicPorts": [{"Label": "8080", "To": 8080}, {"Label": "3000", "To": 3000}]}]);
    job["TaskGroups"][0]["Tasks"][0]["Config"]["network_mode"] = json!("");
    sim.register(&job).await;
    let alloc = sim.running_alloc("7-a").await;
    let full = sim.get_json(&format!("/v1/allocation/{}", alloc.id)).await;
    let ports = full["AllocatedResources"]["Shared"]["Ports"].as_array().unwrap().clone();
    assert_eq!(ports.len(), 2);
    for (port, label) in ports.iter().zip(["8080", "3000"]) {
        assert_eq!(port["Label"], label);
        assert_eq!(port["To"], label.parse::<i64>().unwrap());
        assert_eq!(port["HostIP"], "127.0.0.1");
        let host = port["Value"].as_u64().unwrap();
        assert!((20000..32000).contains(&host), "{host}");
        assert_ne!(port["Value"], port["To"]);
    }
    assert_eq!(full["AllocatedResources"]["Shared"]["Networks"][0]["Mode"], "bridge");
    assert_eq!(full["Job"]["ID"], "7-a", "the full allocation carries its job");
    assert!(full.get("PreviousAllocation").is_none(), "empty keys are omitted");
    let plain = sim
        .get_json(&format!("/v1/allocation/{}", {
            sim.register(&poseidon_job("7-b", "default")).await;
            sim.running_alloc("7-b").await.id
        }))
        .await;
    assert!(plain["AllocatedResources"]["Shared"]["Ports"].is_null());
    assert_eq!(sim.get("/v1/allocation/nope").await, (404, "alloc not found".to_owned()));
    assert_eq!(sim.get("/v1/evaluation/nope").await, (404, "eval not found".to_owned()));
    sim.finish().await;
}

#[test]
fn the_templates_keys_are_all_in_nomads_schema() {
    let body = json!({"Job": poseidon_job("template-29", "poseidon")});
    assert_eq!(nomad_sim::schema::validate("JobRegisterRequest", &body), Ok(()));
    for (schema, fields) in nomad_sim::schema::NEWER_FIELDS {
        let known = nomad_sim::schema::property_names(schema);
        assert!(!known.is_empty(), "schema {schema} exists");
        for field in *fields {
            assert!(known.contains(&(*field).to_owned()));
        }
    }
}
