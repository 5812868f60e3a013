//! Runner life cycles: no leaks over many cycles, and clean-up of a crashed service's leftovers.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use poseidon_sandbox::{Limits, Runtime, SandboxSpec};
use serial_test::serial;

const CYCLES: usize = 200;

/// Everything a runner could leak, as counts.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    fds: usize,
    mounts: usize,
    cgroups: usize,
    processes: usize,
    scratch_entries: usize,
}

fn count_dir(path: &Path) -> usize {
    fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// Sub-cgroups below our top directory in every hierarchy.
fn cgroups(top: &str) -> usize {
    ["memory", "pids", "cpu", "freezer", "unified"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join(top))
        .map(|dir| {
            fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).filter(|e| e.path().is_dir()).count())
                .unwrap_or(0)
        })
        .sum()
}

/// Processes in one of our cgroups (the kernel drops exited ones from `cgroup.procs`).
fn processes(top: &str) -> usize {
    let mut pids = std::collections::BTreeSet::new();
    for hierarchy in ["memory", "pids", "unified"] {
        collect_procs(&Path::new("/sys/fs/cgroup").join(hierarchy).join(top), &mut pids);
    }
    pids.len()
}

fn collect_procs(dir: &Path, pids: &mut std::collections::BTreeSet<u32>) {
    let listed = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    pids.extend(listed.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    for entry in fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok) {
        if entry.path().is_dir() {
            collect_procs(&entry.path(), pids);
        }
    }
}

fn footprint(top: &str, tag: &str) -> Footprint {
    Footprint {
        fds: count_dir(Path::new("/proc/self/fd")),
        mounts: fs::read_to_string("/proc/self/mountinfo").unwrap().lines().count(),
        cgroups: cgroups(top),
        processes: processes(top),
        scratch_entries: count_dir(&state_dir(tag).join("mnt")),
    }
}

async fn cycle(runtime: &Runtime, name: String) {
    let sandbox = runtime
        .create(SandboxSpec { name, image: runtime.host_image(), limits: Limits::default() })
        .await
        .unwrap();
    let out = run(&sandbox, batch("echo hi; sleep 100 &")).await;
    assert_eq!(out.stdout, "hi\n");
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
#[serial]
async fn nothing_leaks_after_many_cycles() {
    let top = "poseidon-test-cycles";
    let runtime = Runtime::new(config(top, "cycles")).unwrap();
    cycle(&runtime, unique_name("warmup")).await;
    let before = footprint(top, "cycles");
    let started = Instant::now();
    for _ in 0..CYCLES {
        cycle(&runtime, unique_name("cycle")).await;
    }
    let elapsed = started.elapsed();
    let after = footprint(top, "cycles");
    println!("{CYCLES} cycles in {elapsed:?}");
    assert_eq!(before, after, "after {CYCLES} cycles in {elapsed:?}");
    assert_eq!(after.cgroups, 0);
    assert_eq!(after.processes, 0);
    // Dropping without destroy must not leak either.
    let dropped = runtime
        .create(SandboxSpec {
            name: unique_name("dropped"),
            image: runtime.host_image(),
            limits: Limits::default(),
        })
        .await
        .unwrap();
    drop(dropped);
    // The aborted reader task releases the control socket at its next poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(footprint(top, "cycles"), after);
    // Nor may a creation dropped half-way (polled once: its cgroups and init exist by then).
    let spec = SandboxSpec {
        name: unique_name("cancelled"),
        image: runtime.host_image(),
        limits: Limits::default(),
    };
    let cancelled = tokio::time::timeout(Duration::ZERO, runtime.create(spec)).await;
    assert!(cancelled.is_err(), "the creation was not cut short");
    let deadline = Instant::now() + Duration::from_secs(5);
    while footprint(top, "cycles") != after && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(footprint(top, "cycles"), after);
}

#[tokio::test]
#[serial]
async fn leftovers_of_a_crashed_service_are_removed_at_start() {
    let top = "poseidon-test-leftovers";
    let runtime = Runtime::new(config(top, "leftovers")).unwrap();
    let sandbox = runtime
        .create(SandboxSpec {
            name: unique_name("crashed"),
            image: runtime.host_image(),
            limits: Limits::default(),
        })
        .await
        .unwrap();
    let process = sandbox.spawn(batch("setsid sleep 100")).await.unwrap();
    // A crash: neither the sandbox nor the execution gets to clean up.
    std::mem::forget(process);
    std::mem::forget(sandbox);
    assert!(processes(top) >= 2, "init and sleep are running");
    assert!(cgroups(top) > 0);
    let _restarted = Runtime::new(config(top, "leftovers")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes(top) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(processes(top), 0);
    assert_eq!(cgroups(top), 0);
}

#[test]
fn a_state_dir_the_runners_cannot_reach_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let private = tempfile::tempdir().unwrap();
    fs::set_permissions(private.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let config = poseidon_sandbox::RuntimeConfig {
        state_dir: private.path().join("state"),
        ..config("poseidon-test-private", "private")
    };
    let err = Runtime::new(config).unwrap_err();
    assert!(err.to_string().contains("searchable"), "{err}");
    assert!(!Path::new("/sys/fs/cgroup/pids/poseidon-test-private").exists());
}
