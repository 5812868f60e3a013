//! cgroups: detection of the host's layout, one runner's cgroups, per-execution tracking
//! cgroups, and the removal of leftovers.
//!
//! Layouts (detected with `statfs` on the cgroup root):
//! * **Legacy** (v1 only): limits in the `memory`, `pids` and `cpu` hierarchies; executions
//!   are tracked and killed through the `freezer` hierarchy.
//! * **Hybrid** (v1 controllers plus a controller-less v2 tree at `unified`, this host):
//!   limits on v1; tracking, `cgroup.kill` and `cgroup.events` in the v2 tree.
//! * **Unified** (v2 only): limits and tracking in one tree.
//!
//! Every directory we create lives below `<hierarchy>/<top>/`, where `top` is the runtime's
//! `cgroup_name`; nothing else is ever written. The root path is injectable so that unit tests
//! run on plain temporary directories.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, TMPFS_MAGIC, statfs};
use nix::unistd::Pid;

/// CFS period for CPU limits (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel's smallest CFS quota (1 ms).
pub const CPU_MIN_QUOTA_US: u64 = 1_000;
/// How long a kill or a removal may take before it is reported as failed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// A failed cgroup operation, with the path (and value) it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot detect the cgroup layout at {path}: {source}")]
    Detect { path: PathBuf, source: nix::Error },
    #[error("unsupported cgroup layout at {path}")]
    Unsupported { path: PathBuf },
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cgroup {path} still has processes after {DRAIN_TIMEOUT:?}")]
    NotDrained { path: PathBuf },
}

/// The cgroup layout of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    Legacy { root: PathBuf },
    Hybrid { root: PathBuf },
    Unified { root: PathBuf },
}

/// The v1 controllers whose limits we set.
const V1_LIMIT_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

impl Layout {
    /// Detects the layout below `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
        let detect = |path: &Path| {
            statfs(path).map_err(|source| CgroupError::Detect { path: path.to_owned(), source })
        };
        let fs = detect(root)?;
        if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
            return Ok(Layout::Unified { root: root.to_owned() });
        }
        if fs.filesystem_type() != TMPFS_MAGIC {
            return Err(CgroupError::Unsupported { path: root.to_owned() });
        }
        let unified = root.join("unified");
        let hybrid = unified.exists() && detect(&unified)?.filesystem_type() == CGROUP2_SUPER_MAGIC;
        Ok(if hybrid {
            Layout::Hybrid { root: root.to_owned() }
        } else {
            Layout::Legacy { root: root.to_owned() }
        })
    }

    /// Every hierarchy we create directories in.
    fn hierarchies(&self) -> Vec<PathBuf> {
        match self {
            Layout::Legacy { root } => {
                V1_LIMIT_CONTROLLERS.iter().chain(&["freezer"]).map(|c| root.join(c)).collect()
            }
            Layout::Hybrid { root } => {
                V1_LIMIT_CONTROLLERS.iter().chain(&["unified"]).map(|c| root.join(c)).collect()
            }
            Layout::Unified { root } => vec![root.clone()],
        }
    }

    /// Creates our top-level directory in every hierarchy (on v2 it also delegates the
    /// controllers our runners need).
    pub fn create_top(&self, top: &str) -> Result<(), CgroupError> {
        for hierarchy in self.hierarchies() {
            create_dir(&hierarchy.join(top), true)?;
        }
        if let Layout::Unified { root } = self {
            write_file(&root.join(top).join("cgroup.subtree_control"), "+memory +pids +cpu")?;
        }
        Ok(())
    }

    /// Kills every process below `<hierarchy>/<top>` and removes all those directories
    /// (left over from a crashed service). Directories outside `top` are never touched.
    pub fn remove_leftovers(&self, top: &str) -> Result<(), CgroupError> {
        for hierarchy in self.hierarchies() {
            let dir = hierarchy.join(top);
            if !dir.exists() {
                continue;
            }
            if self.tracks_with_v2(&hierarchy) {
                write_file(&dir.join("cgroup.kill"), "1")?;
            }
            remove_tree(&dir, true)?;
        }
        Ok(())
    }

    /// Removes our (empty) top-level directories when the runtime goes away, so that a clean
    /// stop leaves nothing in the cgroup trees. A directory that still has runners stays.
    pub fn remove_top(&self, top: &str) {
        for hierarchy in self.hierarchies() {
            let _ = fs::remove_dir(hierarchy.join(top));
        }
    }

    fn tracks_with_v2(&self, hierarchy: &Path) -> bool {
        match self {
            Layout::Legacy { .. } => false,
            Layout::Hybrid { root } => hierarchy == root.join("unified"),
            Layout::Unified { .. } => true,
        }
    }

    /// The directories of runner `name` (not created yet).
    pub fn runner(&self, top: &str, name: &str) -> RunnerCgroup {
        let v1 = |root: &Path| V1Dirs {
            memory: root.join("memory").join(top).join(name),
            pids: root.join("pids").join(top).join(name),
            cpu: root.join("cpu").join(top).join(name),
        };
        match self {
            Layout::Legacy { root } => RunnerCgroup {
                v1: Some(v1(root)),
                tracking: Tracking {
                    kind: TrackingKind::Freezer,
                    dir: root.join("freezer").join(top).join(name),
                },
            },
            Layout::Hybrid { root } => RunnerCgroup {
                v1: Some(v1(root)),
                tracking: Tracking {
                    kind: TrackingKind::V2,
                    dir: root.join("unified").join(top).join(name),
                },
            },
            Layout::Unified { root } => RunnerCgroup {
                v1: None,
                tracking: Tracking { kind: TrackingKind::V2, dir: root.join(top).join(name) },
            },
        }
    }
}

/// The v1 directories that carry a runner's limits.
#[derive(Clone, Debug)]
struct V1Dirs {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
}

/// How processes are found and killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingKind {
    /// cgroup v2: `cgroup.kill`.
    V2,
    /// cgroup v1 freezer: freeze, SIGKILL every member, thaw.
    Freezer,
}

#[derive(Clone, Debug)]
struct Tracking {
    kind: TrackingKind,
    dir: PathBuf,
}

/// Resource limits as written to the cgroup files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: Option<u64>,
    /// CFS quota per [`CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
    pub pids: u64,
}

/// CFS quota for `mhz` on a host whose CPUs run at `host_mhz`: `mhz / host_mhz × period`,
/// at least the kernel's minimum.
pub fn cpu_quota_us(mhz: u32, host_mhz: f64) -> u64 {
    let quota = (f64::from(mhz) / host_mhz * CPU_PERIOD_US as f64).round() as u64;
    quota.max(CPU_MIN_QUOTA_US)
}

/// One runner's cgroups.
#[derive(Clone, Debug)]
pub struct RunnerCgroup {
    v1: Option<V1Dirs>,
    tracking: Tracking,
}

impl RunnerCgroup {
    fn dirs(&self) -> Vec<&Path> {
        let mut dirs = Vec::new();
        if let Some(v1) = &self.v1 {
            dirs.extend([v1.memory.as_path(), v1.pids.as_path(), v1.cpu.as_path()]);
        }
        dirs.push(&self.tracking.dir);
        dirs
    }

    /// Creates the directories (failing if one exists: names are unique).
    pub fn create(&self) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            create_dir(dir, false)?;
        }
        Ok(())
    }

    /// Writes the limits.
    pub fn apply(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        match &self.v1 {
            Some(v1) => apply_v1(v1, limits),
            None => apply_v2(&self.tracking.dir, limits),
        }
    }

    /// Moves `pid` (and so its future children) into every cgroup of the runner.
    pub fn add(&self, pid: Pid) -> Result<(), CgroupError> {
        for dir in self.dirs() {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The number of OOM kills in the runner so far.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let file = match &self.v1 {
            Some(v1) => v1.memory.join("memory.oom_control"),
            None => self.tracking.dir.join("memory.events"),
        };
        let text = read_file(&file)?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Creates the tracking cgroup of execution `id` and opens its `cgroup.procs` for the
    /// init's child to join.
    pub fn create_exec(&self, id: u64) -> Result<(ExecCgroup, OwnedFd), CgroupError> {
        let cgroup = ExecCgroup {
            kind: self.tracking.kind,
            dir: self.tracking.dir.join(format!("exec-{id}")),
        };
        create_dir(&cgroup.dir, false)?;
        let procs = cgroup.dir.join("cgroup.procs");
        match fs::OpenOptions::new()
            .write(true)
            .create(is_fixture(&cgroup.dir))
            .truncate(false)
            .open(&procs)
        {
            Ok(file) => Ok((cgroup, file.into())),
            Err(source) => {
                let _ = fs::remove_dir(&cgroup.dir);
                Err(CgroupError::Open { path: procs, source })
            }
        }
    }

    /// Kills every process of the runner (all its executions included).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        kill_dir(self.tracking.kind, &self.tracking.dir, true)
    }

    /// Waits (bounded) until the runner has no processes, then removes all its directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        wait_empty(&self.tracking.dir, true)?;
        let mut first_error = None;
        for dir in self.dirs() {
            if let Err(e) = remove_tree(dir, false) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn apply_v1(dirs: &V1Dirs, limits: &CgroupLimits) -> Result<(), CgroupError> {
    if let Some(bytes) = limits.memory_bytes {
        write_file(&dirs.memory.join("memory.limit_in_bytes"), &bytes.to_string())?;
        // Swap included: memory + swap may not exceed the same limit. The file is missing
        // when the kernel does not account swap; then there is nothing to limit.
        let memsw = dirs.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_file(&memsw, &bytes.to_string())?;
        }
    }
    write_file(&dirs.pids.join("pids.max"), &limits.pids.to_string())?;
    if let Some(quota) = limits.cpu_quota_us {
        write_file(&dirs.cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write_file(&dirs.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
    }
    Ok(())
}

fn apply_v2(dir: &Path, limits: &CgroupLimits) -> Result<(), CgroupError> {
    if let Some(bytes) = limits.memory_bytes {
        write_file(&dir.join("memory.max"), &bytes.to_string())?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write_file(&swap, "0")?;
        }
    }
    write_file(&dir.join("pids.max"), &limits.pids.to_string())?;
    if let Some(quota) = limits.cpu_quota_us {
        write_file(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    }
    Ok(())
}

/// An execution's tracking cgroup, nested in its runner's.
#[derive(Clone, Debug)]
pub struct ExecCgroup {
    kind: TrackingKind,
    dir: PathBuf,
}

impl ExecCgroup {
    /// Kills every process in the cgroup. A cgroup that is already gone is not an error.
    pub fn kill(&self) -> Result<(), CgroupError> {
        if !self.dir.exists() {
            return Ok(());
        }
        kill_dir(self.kind, &self.dir, false)
    }

    /// Whether the cgroup has no process left.
    pub fn is_empty(&self) -> bool {
        procs(&self.dir).map(|p| p.is_empty()).unwrap_or(true)
    }

    /// Removes the (empty) directory; a missing one is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        remove_dir(&self.dir)
    }
}

fn kill_dir(kind: TrackingKind, dir: &Path, recursive: bool) -> Result<(), CgroupError> {
    match kind {
        TrackingKind::V2 => write_file(&dir.join("cgroup.kill"), "1"),
        TrackingKind::Freezer => freeze_and_kill(dir, recursive),
    }
}

/// v1: freeze (so nothing can fork while we look), SIGKILL every member, thaw (so the
/// signals are delivered).
fn freeze_and_kill(dir: &Path, recursive: bool) -> Result<(), CgroupError> {
    let state = dir.join("freezer.state");
    write_file(&state, "FROZEN")?;
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while read_file(&state)?.trim() != "FROZEN" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let result = kill_members(dir, recursive);
    write_file(&state, "THAWED")?;
    result
}

/// Sends SIGKILL to every pid listed in `dir` (and below, if `recursive`).
fn kill_members(dir: &Path, recursive: bool) -> Result<(), CgroupError> {
    for pid in procs(dir)? {
        let _ = kill(pid, Signal::SIGKILL);
    }
    if recursive {
        for child in child_dirs(dir)? {
            kill_members(&child, true)?;
        }
    }
    Ok(())
}

/// The pids in `dir/cgroup.procs` (an absent cgroup has none).
fn procs(dir: &Path) -> Result<Vec<Pid>, CgroupError> {
    let path = dir.join("cgroup.procs");
    match fs::read_to_string(&path) {
        Ok(text) => {
            Ok(text.lines().filter_map(|l| l.trim().parse().ok()).map(Pid::from_raw).collect())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// Whether `dir` and (if `recursive`) its descendants have no process.
fn is_empty_tree(dir: &Path, recursive: bool) -> Result<bool, CgroupError> {
    if !procs(dir)?.is_empty() {
        return Ok(false);
    }
    if recursive {
        for child in child_dirs(dir)? {
            if !is_empty_tree(&child, true)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn wait_empty(dir: &Path, recursive: bool) -> Result<(), CgroupError> {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !is_empty_tree(dir, recursive)? {
        if Instant::now() >= deadline {
            return Err(CgroupError::NotDrained { path: dir.to_owned() });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read { path: dir.to_owned(), source });
        }
    };
    Ok(entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Removes `dir` and every cgroup below it, deepest first. With `kill_first`, members of
/// each (v1) directory are killed before; killing is retried until the tree drains.
fn remove_tree(dir: &Path, kill_first: bool) -> Result<(), CgroupError> {
    for child in child_dirs(dir)? {
        remove_tree(&child, kill_first)?;
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        if kill_first {
            kill_members(dir, false)?;
        }
        match remove_dir(dir) {
            Err(CgroupError::Remove { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// `rmdir`; cgroup directories contain only virtual files, so `rmdir` is how they go. A plain
/// directory (test fixtures) is emptied of files first.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty && is_fixture(dir) => {
            fs::remove_dir_all(dir)
                .map_err(|source| CgroupError::Remove { path: dir.to_owned(), source })
        }
        Err(source) => Err(CgroupError::Remove { path: dir.to_owned(), source }),
    }
}

/// Whether `dir` is on an ordinary file system (a unit-test fixture), not on cgroupfs.
fn is_fixture(dir: &Path) -> bool {
    use nix::sys::statfs::CGROUP_SUPER_MAGIC;
    statfs(dir).is_ok_and(|fs| {
        fs.filesystem_type() != CGROUP_SUPER_MAGIC && fs.filesystem_type() != CGROUP2_SUPER_MAGIC
    })
}

fn create_dir(dir: &Path, parents: bool) -> Result<(), CgroupError> {
    let result = if parents { fs::create_dir_all(dir) } else { fs::create_dir(dir) };
    result.map_err(|source| CgroupError::Create { path: dir.to_owned(), source })
}

/// Writes `value` with a single `write` (cgroup files take one value per write).
pub fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let error =
        |source| CgroupError::Write { path: path.to_owned(), value: value.to_owned(), source };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(is_fixture_parent(path))
        .truncate(true)
        .open(path)
        .map_err(error)?;
    file.write_all(value.as_bytes()).map_err(error)
}

/// Fixtures need their files created; on cgroupfs every file exists already.
fn is_fixture_parent(path: &Path) -> bool {
    path.parent().is_some_and(is_fixture)
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: PathBuf) -> String {
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn cpu_quota_is_relative_to_host_mhz_with_kernel_minimum() {
        assert_eq!(cpu_quota_us(1300, 2600.0), 50_000);
        assert_eq!(cpu_quota_us(5200, 2600.0), 200_000);
        assert_eq!(cpu_quota_us(1, 2600.0), CPU_MIN_QUOTA_US);
    }

    #[test]
    fn hybrid_runner_writes_v1_limits_and_tracks_in_v2() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::Hybrid { root: root.path().to_owned() };
        layout.create_top("top").unwrap();
        let runner = layout.runner("top", "r1");
        runner.create().unwrap();
        runner
            .apply(&CgroupLimits {
                memory_bytes: Some(64 << 20),
                cpu_quota_us: Some(50_000),
                pids: 32,
            })
            .unwrap();
        let p = root.path();
        assert_eq!(read(p.join("memory/top/r1/memory.limit_in_bytes")), "67108864");
        assert_eq!(read(p.join("pids/top/r1/pids.max")), "32");
        assert_eq!(read(p.join("cpu/top/r1/cpu.cfs_quota_us")), "50000");
        assert_eq!(read(p.join("cpu/top/r1/cpu.cfs_period_us")), "100000");
        runner.add(Pid::from_raw(42)).unwrap();
        assert_eq!(read(p.join("unified/top/r1/cgroup.procs")), "42");
        let (exec, _procs) = runner.create_exec(3).unwrap();
        exec.kill().unwrap();
        assert_eq!(read(p.join("unified/top/r1/exec-3/cgroup.kill")), "1");
        assert!(runner.create().is_err(), "names are unique");
    }

    #[test]
    fn unified_runner_writes_v2_limits_and_reads_oom_events() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::Unified { root: root.path().to_owned() };
        layout.create_top("top").unwrap();
        assert_eq!(read(root.path().join("top/cgroup.subtree_control")), "+memory +pids +cpu");
        let runner = layout.runner("top", "r");
        runner.create().unwrap();
        runner
            .apply(&CgroupLimits {
                memory_bytes: Some(1 << 20),
                cpu_quota_us: Some(2_000),
                pids: 5,
            })
            .unwrap();
        let dir = root.path().join("top/r");
        assert_eq!(read(dir.join("memory.max")), "1048576");
        assert_eq!(read(dir.join("cpu.max")), "2000 100000");
        assert_eq!(read(dir.join("pids.max")), "5");
        fs::write(dir.join("memory.events"), "low 0\noom 2\noom_kill 2\n").unwrap();
        assert_eq!(runner.oom_kills().unwrap(), 2);
    }

    #[test]
    fn legacy_layout_tracks_in_freezer_and_leftovers_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::Legacy { root: root.path().to_owned() };
        layout.create_top("top").unwrap();
        let runner = layout.runner("top", "old");
        runner.create().unwrap();
        let (exec, _) = runner.create_exec(1).unwrap();
        exec.kill().unwrap();
        assert_eq!(read(root.path().join("freezer/top/old/exec-1/freezer.state")), "THAWED");
        fs::create_dir(root.path().join("memory/other")).unwrap();
        layout.remove_leftovers("top").unwrap();
        for c in ["memory", "pids", "cpu", "freezer"] {
            assert!(!root.path().join(c).join("top").exists(), "{c}");
        }
        assert!(root.path().join("memory/other").exists(), "not ours");
    }

    /// The v1-only path on the real hierarchies of this (hybrid) host: the freezer kills
    /// every member of an execution cgroup, and everything is removed afterwards.
    #[test]
    fn legacy_freezer_kills_an_execution_on_real_cgroups() {
        let root = Path::new("/sys/fs/cgroup");
        if !root.join("freezer").exists() {
            return;
        }
        let layout = Layout::Legacy { root: root.to_owned() };
        let top = format!("poseidon-unit-{}", std::process::id());
        layout.create_top(&top).unwrap();
        let runner = layout.runner(&top, "r");
        runner.create().unwrap();
        runner
            .apply(&CgroupLimits { memory_bytes: Some(64 << 20), cpu_quota_us: None, pids: 8 })
            .unwrap();
        let (exec, procs) = runner.create_exec(1).unwrap();
        let mut child = std::process::Command::new("sleep").arg("100").spawn().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        runner.add(pid).unwrap();
        nix::unistd::write(&procs, pid.to_string().as_bytes()).unwrap();
        assert!(!exec.is_empty());
        exec.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(exec.is_empty());
        exec.remove().unwrap();
        runner.remove().unwrap();
        layout.remove_leftovers(&top).unwrap();
        assert!(!root.join("freezer").join(&top).exists());
    }

    #[test]
    fn write_errors_name_path_and_value() {
        let err = write_file(Path::new("/nonexistent/dir/pids.max"), "7").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/dir/pids.max") && text.contains("\"7\""));
    }
}
