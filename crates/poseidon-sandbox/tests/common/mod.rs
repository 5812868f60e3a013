//! Shared helpers: one runtime per test binary (its own cgroup name and state directory, so
//! test binaries never collide), unique sandbox names, and a "run to completion" helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use poseidon_sandbox::{
    ExitInfo, Limits, Process, ProcessSpec, Runtime, RuntimeConfig, Sandbox, SandboxSpec,
};
use tokio::io::AsyncReadExt;

pub const UID_BASE: u32 = 300_000;
pub const CGROUP_NAME: &str = "poseidon-test-sandbox";

/// In the system's temporary directory: the runners reach their image there as an
/// unprivileged id, so every ancestor must be searchable (a checkout below `/root` is not).
/// Removed when the test process exits.
pub fn state_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("poseidon-sandbox-test-{tag}-{}", std::process::id()))
}

/// What the test process removes when it exits: runtimes live in statics and are never
/// dropped, and a test that fails does not get to clean up after itself.
#[derive(Default)]
struct Leftovers {
    cgroups: Vec<String>,
    dirs: Vec<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> =
    Mutex::new(Leftovers { cgroups: Vec::new(), dirs: Vec::new() });

extern "C" fn remove_leftovers() {
    let leftovers = std::mem::take(&mut *LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner()));
    for name in leftovers.cgroups {
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified"] {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(hierarchy).join(&name));
        }
    }
    for dir in leftovers.dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Registers `cgroup_name` and `dir` for removal at exit.
fn remove_at_exit(cgroup_name: &str, dir: &Path) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain `extern "C"` function without arguments, as atexit expects;
    // it only touches a static and the file system.
    REGISTERED.call_once(|| unsafe {
        libc::atexit(remove_leftovers);
    });
    let mut leftovers = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    leftovers.cgroups.push(cgroup_name.to_owned());
    leftovers.dirs.push(dir.to_owned());
}

pub fn config(cgroup_name: &str, tag: &str) -> RuntimeConfig {
    let state_dir = state_dir(tag);
    remove_at_exit(cgroup_name, &state_dir);
    RuntimeConfig {
        state_dir,
        init_program: env!("CARGO_BIN_EXE_poseidon-sandbox-init").into(),
        init_args: Vec::new(),
        cgroup_name: cgroup_name.into(),
        uid_base: UID_BASE,
        defaults: Limits {
            memory_mb: Some(256),
            pids: Some(128),
            disk_mb: Some(64),
            ..Limits::default()
        },
    }
}

pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| shared_runtime(CGROUP_NAME, "main"))
}

/// A runtime shared by a whole test binary (in a static, never dropped; see [`config`] for
/// what is removed at exit).
pub fn shared_runtime(cgroup_name: &str, tag: &str) -> Runtime {
    Runtime::new(config(cgroup_name, tag)).expect("runtime")
}

pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub async fn sandbox(limits: Limits) -> Sandbox {
    let rt = runtime();
    rt.create(SandboxSpec { name: unique_name("t"), image: rt.host_image(), limits })
        .await
        .expect("create sandbox")
}

pub fn batch(command: &str) -> ProcessSpec {
    ProcessSpec { command: command.into(), ..ProcessSpec::default() }
}

pub fn privileged(command: &str) -> ProcessSpec {
    ProcessSpec { privileged: true, ..batch(command) }
}

/// The collected output of an execution.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub exit: ExitInfo,
}

/// Reads both outputs to the end, then waits; everything bounded by 30 s.
pub async fn finish(mut process: Process) -> Output {
    let collect = async {
        let mut stdout = process.stdout.take();
        let mut stderr = process.stderr.take();
        let read_out = async {
            let mut buf = Vec::new();
            if let Some(s) = stdout.as_mut() {
                s.read_to_end(&mut buf).await.expect("stdout");
            }
            buf
        };
        let read_err = async {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                s.read_to_end(&mut buf).await.expect("stderr");
            }
            buf
        };
        // Concurrently: `wait` kills what the main process left behind, which is what lets
        // the outputs reach end-of-file.
        let (out, err, exit) = tokio::join!(read_out, read_err, process.wait());
        let exit = exit.expect("wait");
        Output {
            stdout: String::from_utf8_lossy(&out).into_owned(),
            stderr: String::from_utf8_lossy(&err).into_owned(),
            exit,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .expect("execution finished in time")
}

pub async fn run(sandbox: &Sandbox, spec: ProcessSpec) -> Output {
    let mut process = sandbox.spawn(spec).await.expect("spawn");
    drop(process.stdin.take());
    finish(process).await
}
