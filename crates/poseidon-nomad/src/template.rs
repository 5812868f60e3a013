//! Template jobs (`template-<id>`, one per environment) and runner jobs (`<id>-<uuid>`) as
//! JSON values: Nomad accepts its own job JSON back, so jobs stay untyped and only the keys
//! Poseidon owns are edited (spec §7, nomad-api §1.4).

use std::time::Duration;

use poseidon_core::environment::EnvironmentConfig;
use poseidon_core::ids::EnvironmentId;
use serde_json::{Map, Value, json};

use crate::config::NetworkConfig;

pub(crate) const TEMPLATE_PREFIX: &str = "template-";
pub(crate) const RUNNER_GROUP: &str = "default-group";
pub(crate) const RUNNER_TASK: &str = "default-task";
const CONFIG_GROUP: &str = "config";
/// The scheduling reservation of a runner in MB; `memoryLimit` is the hard limit above it.
const MEMORY_RESERVATION_MB: u64 = 50;

/// Why a template job cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid template job: {0}")]
pub struct TemplateError(String);

/// Poseidon's embedded template (`template-environment-job.hcl` as JSON).
pub(crate) fn embedded() -> Value {
    json!({
        "ID": "template-0", "Name": "template-0", "Type": "batch", "Datacenters": ["dc1"],
        "TaskGroups": [
            {"Name": RUNNER_GROUP, "Count": 1,
             "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
             "Spreads": [{"Attribute": "${node.unique.name}", "Weight": 100}],
             "RestartPolicy": {"Attempts": 3, "Delay": 15_000_000_000_u64,
                               "Interval": 3_600_000_000_000_u64, "Mode": "fail"},
             "ReschedulePolicy": {"Unlimited": false, "Attempts": 3,
                                  "Interval": 21_600_000_000_000_u64, "Delay": 60_000_000_000_u64,
                                  "MaxDelay": 240_000_000_000_u64, "DelayFunction": "exponential"},
             "Networks": [],
             "Tasks": [{"Name": RUNNER_TASK, "Driver": "docker", "KillTimeout": 0,
                        "KillSignal": "SIGKILL",
                        "Config": {"image": "openhpi/docker_exec_phusion", "command": "sleep",
                                   "args": ["infinity"], "network_mode": "none"},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": 40, "MemoryMB": MEMORY_RESERVATION_MB}}]},
            {"Name": CONFIG_GROUP, "Count": 0,
             "Tasks": [{"Name": CONFIG_GROUP, "Driver": "exec", "Config": {"command": "true"},
                        "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
                        "Resources": {"CPU": 1, "MemoryMB": 10}}],
             "Meta": {"used": "false", "prewarmingPoolSize": "0"}}
        ]
    })
}

/// Accepts a job as `server.templatejobfile` or Nomad's parser gives it (`{"Job": …}` or the
/// job itself) once it has the groups and tasks Poseidon relies on.
pub(crate) fn validate(job: Value) -> Result<Value, TemplateError> {
    let mut job = match job {
        Value::Object(mut object) if object.contains_key("Job") => object.remove("Job").unwrap(),
        other => other,
    };
    if !job.is_object() {
        return Err(TemplateError("the job is not a JSON object".into()));
    }
    task_mut(&mut job, RUNNER_GROUP, RUNNER_TASK)
        .ok_or_else(|| TemplateError(format!("no group {RUNNER_GROUP} with task {RUNNER_TASK}")))?;
    if group_mut(&mut job, CONFIG_GROUP).is_none() {
        return Err(TemplateError(format!("no group {CONFIG_GROUP}")));
    }
    Ok(job)
}

/// `template-<id>`, or `None` for other job ids.
pub(crate) fn environment_of_template(job_id: &str) -> Option<EnvironmentId> {
    let id = job_id.strip_prefix(TEMPLATE_PREFIX)?;
    (!id.contains('-')).then(|| id.parse().ok().map(EnvironmentId)).flatten()
}

pub(crate) fn template_id(environment: EnvironmentId) -> String {
    format!("{TEMPLATE_PREFIX}{environment}")
}

/// The template job of `environment` built from `base` (spec §7.2).
pub(crate) fn template_job(
    base: &Value,
    environment: &EnvironmentConfig,
    network: &NetworkConfig,
    force_pull: bool,
) -> Value {
    let mut job = base.clone();
    let id = template_id(environment.id);
    job["ID"] = json!(id);
    job["Name"] = json!(id);
    let group = group_mut(&mut job, RUNNER_GROUP).expect("validated template");
    group["Count"] = json!(1);
    group["Networks"] = match environment.network_access {
        true => json!([network_block(network, &environment.exposed_ports)]),
        false => json!([]),
    };
    let task = task_mut(&mut job, RUNNER_GROUP, RUNNER_TASK).expect("validated template");
    let config = object_entry(task, "Config");
    config.insert("image".into(), json!(environment.image));
    let mode = if environment.network_access { "" } else { "none" };
    config.insert("network_mode".into(), json!(mode));
    config.insert("force_pull".into(), json!(force_pull));
    let resources = object_entry(task, "Resources");
    if environment.cpu_limit > 0 {
        resources.insert("CPU".into(), json!(environment.cpu_limit));
    }
    if environment.memory_limit > 0 {
        let limit = u64::from(environment.memory_limit);
        // Nomad refuses MemoryMaxMB below MemoryMB (nomad-api §6.5).
        resources.insert("MemoryMB".into(), json!(MEMORY_RESERVATION_MB.min(limit)));
        resources.insert("MemoryMaxMB".into(), json!(limit));
    }
    let meta = config_meta_mut(&mut job);
    meta.insert("used".into(), json!("false"));
    meta.insert("prewarmingPoolSize".into(), json!(environment.prewarming_pool_size.to_string()));
    job
}

/// A runner job copied from a template job: own id, `used=false`, no pool size, no force pull.
pub(crate) fn runner_job(template: &Value, runner_id: &str) -> Value {
    let mut job = strip_server_fields(template.clone());
    job["ID"] = json!(runner_id);
    job["Name"] = json!(runner_id);
    if let Some(task) = task_mut(&mut job, RUNNER_GROUP, RUNNER_TASK) {
        object_entry(task, "Config").insert("force_pull".into(), json!(false));
    }
    let meta = config_meta_mut(&mut job);
    meta.clear();
    meta.insert("used".into(), json!("false"));
    job
}

/// The runner job with its `config` meta recording a claim (for recovery after a restart).
pub(crate) fn mark_used(job: &Value, inactivity_timeout: Duration) -> Value {
    let mut job = strip_server_fields(job.clone());
    let meta = config_meta_mut(&mut job);
    meta.insert("used".into(), json!("true"));
    meta.insert("timeout".into(), json!(inactivity_timeout.as_secs().to_string()));
    job
}

/// Whether a runner job was claimed, and its inactivity timeout (spec §8.1).
pub(crate) fn claim_of(job: &Value) -> Option<Duration> {
    let meta = group(job, CONFIG_GROUP)?.get("Meta")?;
    if meta.get("used")?.as_str()? != "true" {
        return None;
    }
    let seconds = meta.get("timeout").and_then(Value::as_str).and_then(|s| s.parse().ok());
    Some(Duration::from_secs(seconds.unwrap_or(0)))
}

/// The environment a template job describes (the inverse of [`template_job`]).
pub(crate) fn environment_of(job: &Value) -> Option<EnvironmentConfig> {
    let id = environment_of_template(job.get("ID")?.as_str()?)?;
    let task = group(job, RUNNER_GROUP)?
        .get("Tasks")?
        .as_array()?
        .iter()
        .find(|task| task.get("Name").and_then(Value::as_str) == Some(RUNNER_TASK))?;
    let config = task.get("Config")?;
    let resources = task.get("Resources");
    let number = |key: &str| {
        resources.and_then(|r| r.get(key)).and_then(Value::as_u64).unwrap_or(0).min(u32::MAX.into())
            as u32
    };
    let networks = group(job, RUNNER_GROUP)?.get("Networks").and_then(Value::as_array);
    let exposed_ports = networks
        .and_then(|networks| networks.first())
        .and_then(|network| network.get("DynamicPorts"))
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|port| port.get("To").and_then(Value::as_u64))
                .filter_map(|port| u16::try_from(port).ok())
                .collect()
        })
        .unwrap_or_default();
    let pool_size = group(job, CONFIG_GROUP)
        .and_then(|group| group.get("Meta"))
        .and_then(|meta| meta.get("prewarmingPoolSize"))
        .and_then(Value::as_str)
        .and_then(|size| size.parse().ok())
        .unwrap_or(0);
    Some(EnvironmentConfig {
        id,
        prewarming_pool_size: pool_size,
        cpu_limit: number("CPU"),
        memory_limit: number("MemoryMaxMB"),
        image: config.get("image").and_then(Value::as_str).unwrap_or_default().to_owned(),
        network_access: config.get("network_mode").and_then(Value::as_str) != Some("none")
            && networks.is_some_and(|networks| !networks.is_empty()),
        exposed_ports,
    })
}

fn network_block(network: &NetworkConfig, exposed_ports: &[u16]) -> Value {
    let ports: Vec<Value> =
        exposed_ports.iter().map(|port| json!({"Label": port.to_string(), "To": port})).collect();
    let mut block = json!({"Mode": network.mode, "DynamicPorts": ports});
    for (key, value) in [
        ("Device", &network.device),
        ("CIDR", &network.cidr),
        ("IP", &network.ip),
        ("Hostname", &network.hostname),
    ] {
        if !value.is_empty() {
            block[key] = json!(value);
        }
    }
    let dns = [&network.dns_servers, &network.dns_searches, &network.dns_options];
    if dns.iter().any(|list| !list.is_empty()) {
        block["DNS"] = json!({"Servers": dns[0], "Searches": dns[1], "Options": dns[2]});
    }
    block
}

/// Drops the keys Nomad owns, so that a job read back can be registered again as a new job.
fn strip_server_fields(mut job: Value) -> Value {
    if let Some(object) = job.as_object_mut() {
        for key in [
            "Status",
            "StatusDescription",
            "Stable",
            "Version",
            "SubmitTime",
            "CreateIndex",
            "ModifyIndex",
            "JobModifyIndex",
            "ParentID",
            "Stop",
        ] {
            object.remove(key);
        }
    }
    job
}

fn group<'a>(job: &'a Value, name: &str) -> Option<&'a Value> {
    job.get("TaskGroups")?
        .as_array()?
        .iter()
        .find(|group| group.get("Name").and_then(Value::as_str) == Some(name))
}

fn group_mut<'a>(job: &'a mut Value, name: &str) -> Option<&'a mut Value> {
    job.get_mut("TaskGroups")?
        .as_array_mut()?
        .iter_mut()
        .find(|group| group.get("Name").and_then(Value::as_str) == Some(name))
}

fn task_mut<'a>(job: &'a mut Value, group: &str, task: &str) -> Option<&'a mut Value> {
    group_mut(job, group)?
        .get_mut("Tasks")?
        .as_array_mut()?
        .iter_mut()
        .find(|candidate| candidate.get("Name").and_then(Value::as_str) == Some(task))
}

fn config_meta_mut(job: &mut Value) -> &mut Map<String, Value> {
    object_entry(group_mut(job, CONFIG_GROUP).expect("validated template"), "Meta")
}

/// `value[key]` as an object, replacing a `null` or missing entry with `{}`.
fn object_entry<'a>(value: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let entry = &mut value[key];
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("just made an object")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(network: bool) -> EnvironmentConfig {
        EnvironmentConfig {
            id: EnvironmentId(29),
            prewarming_pool_size: 1,
            cpu_limit: 40,
            memory_limit: 512,
            image: "openhpi/docker_exec_phusion".into(),
            network_access: network,
            exposed_ports: if network { vec![8080, 3000] } else { Vec::new() },
        }
    }

    /// nomad-api §1.4: the body Go Poseidon sends for environment 29 (without `Namespace`,
    /// which the client sets).
    #[test]
    fn the_template_matches_go_poseidons_job() {
        let job = template_job(&embedded(), &environment(false), &NetworkConfig::default(), true);
        let expected = json!({
        "ID": "template-29", "Name": "template-29", "Type": "batch", "Datacenters": ["dc1"],
        "TaskGroups": [
          {"Name": "default-group", "Count": 1,
           "EphemeralDisk": {"Migrate": false, "SizeMB": 10, "Sticky": false},
           "Spreads": [{"Attribute": "${node.unique.name}", "Weight": 100}],
           "RestartPolicy": {"Attempts": 3, "Delay": 15000000000_u64, "Interval": 3600000000000_u64, "Mode": "fail"},
           "ReschedulePolicy": {"Unlimited": false, "Attempts": 3, "Interval": 21600000000000_u64,
                                "Delay": 60000000000_u64, "MaxDelay": 240000000000_u64, "DelayFunction": "exponential"},
           "Networks": [],
           "Tasks": [{"Name": "default-task", "Driver": "docker", "KillTimeout": 0, "KillSignal": "SIGKILL",
             "Config": {"image": "openhpi/docker_exec_phusion", "command": "sleep", "args": ["infinity"],
                        "network_mode": "none", "force_pull": true},
             "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
             "Resources": {"CPU": 40, "MemoryMB": 50, "MemoryMaxMB": 512}}]},
          {"Name": "config", "Count": 0,
           "Tasks": [{"Name": "config", "Driver": "exec", "Config": {"command": "true"},
             "LogConfig": {"MaxFiles": 1, "MaxFileSizeMB": 1},
             "Resources": {"CPU": 1, "MemoryMB": 10}}],
           "Meta": {"used": "false", "prewarmingPoolSize": "1"}}
        ]});
        assert_eq!(job, expected);
    }

    #[test]
    fn network_access_maps_to_a_network_with_dynamic_ports() {
        let network = NetworkConfig {
            mode: "cni/secure-bridge".into(),
            dns_servers: vec!["1.1.1.1".into()],
            ..NetworkConfig::default()
        };
        let job = template_job(&embedded(), &environment(true), &network, false);
        let group = &job["TaskGroups"][0];
        assert_eq!(
            group["Networks"],
            json!([{"Mode": "cni/secure-bridge",
                    "DynamicPorts": [{"Label": "8080", "To": 8080}, {"Label": "3000", "To": 3000}],
                    "DNS": {"Servers": ["1.1.1.1"], "Searches": [], "Options": []}}])
        );
        assert_eq!(group["Tasks"][0]["Config"]["network_mode"], json!(""));
        assert_eq!(group["Tasks"][0]["Config"]["force_pull"], json!(false));
    }

    #[test]
    fn a_small_memory_limit_lowers_the_reservation() {
        let mut small = environment(false);
        small.memory_limit = 30;
        let job = template_job(&embedded(), &small, &NetworkConfig::default(), true);
        let resources = &job["TaskGroups"][0]["Tasks"][0]["Resources"];
        assert_eq!(
            (resources["MemoryMB"].clone(), resources["MemoryMaxMB"].clone()),
            (json!(30), json!(30))
        );
    }

    #[test]
    fn environments_round_trip_through_template_jobs() {
        for network in [false, true] {
            let environment = environment(network);
            let job = template_job(&embedded(), &environment, &NetworkConfig::default(), true);
            assert_eq!(environment_of(&job), Some(environment));
        }
    }

    #[test]
    fn runner_jobs_reset_meta_and_force_pull_and_claims_are_recorded() {
        let mut template =
            template_job(&embedded(), &environment(false), &NetworkConfig::default(), true);
        template["Status"] = json!("running");
        template["JobModifyIndex"] = json!(12);
        let runner = runner_job(&template, "29-abc");
        assert_eq!(
            (runner["ID"].clone(), runner["Name"].clone()),
            (json!("29-abc"), json!("29-abc"))
        );
        assert_eq!(runner["TaskGroups"][1]["Meta"], json!({"used": "false"}));
        assert_eq!(runner["TaskGroups"][0]["Tasks"][0]["Config"]["force_pull"], json!(false));
        assert!(runner.get("Status").is_none() && runner.get("JobModifyIndex").is_none());
        assert_eq!(claim_of(&runner), None);
        let used = mark_used(&runner, Duration::from_secs(60));
        assert_eq!(used["TaskGroups"][1]["Meta"], json!({"used": "true", "timeout": "60"}));
        assert_eq!(claim_of(&used), Some(Duration::from_secs(60)));
    }

    #[test]
    fn template_ids_are_recognised_exactly() {
        assert_eq!(environment_of_template("template-10"), Some(EnvironmentId(10)));
        assert_eq!(environment_of_template("template-1-x"), None);
        assert_eq!(environment_of_template("10-abc"), None);
        assert_eq!(environment_of_template("template-"), None);
    }

    #[test]
    fn templates_need_the_runner_task_and_the_config_group() {
        assert!(validate(json!({"Job": embedded()})).is_ok());
        let mut broken = embedded();
        broken["TaskGroups"].as_array_mut().unwrap().remove(1);
        assert!(validate(broken).unwrap_err().to_string().contains("no group config"));
        assert!(validate(json!([])).is_err());
    }
}
