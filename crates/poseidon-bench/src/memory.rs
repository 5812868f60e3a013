//! Memory and CPU time of the host, the service and its runners, from /proc and the cgroup
//! file systems. Runner inits are not children of the service (they are reparented), so the
//! runners are found by the service's cgroup name instead of by the process tree.

use std::fs;
use std::path::Path;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// /proc reports CPU times in USER_HZ ticks, which Linux fixes at 100 per second.
const TICKS_PER_SECOND: f64 = 100.0;

/// A field of /proc/meminfo in KiB, e.g. `MemAvailable`.
pub fn meminfo_kib(field: &str) -> Option<u64> {
    kib_field(&fs::read_to_string("/proc/meminfo").ok()?, field)
}

/// The resident set of one process (`VmRSS`) in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    kib_field(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?, "VmRSS")
}

/// Proportional set size of `pids` in KiB. PSS splits shared pages (the binary, libraries)
/// between the processes that map them, so the sum is what they really cost, unlike RSS.
pub fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            kib_field(&fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?, "Pss")
        })
        .sum()
}

/// Every process in cgroup `name` or below it, in any hierarchy.
pub fn processes_in_cgroup(name: &str) -> Vec<u32> {
    let prefix = format!("/{name}/");
    let exact = format!("/{name}");
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            cgroups
                .lines()
                .filter_map(|line| line.splitn(3, ':').nth(2))
                .any(|path| path == exact || path.starts_with(&prefix))
        })
        .collect()
}

/// Memory charged to cgroup `name` (v1 `memory.usage_in_bytes`, else v2 `memory.current`):
/// the runners' pages including kernel memory and their tmpfs files.
pub fn cgroup_memory_bytes(name: &str) -> Option<u64> {
    let root = Path::new(CGROUP_ROOT);
    let read = |path: &Path| fs::read_to_string(path).ok()?.trim().parse().ok();
    read(&root.join("memory").join(name).join("memory.usage_in_bytes"))
        .or_else(|| read(&root.join(name).join("memory.current")))
}

/// CPU seconds of cgroup `name` and everything below it, from the cgroup v2 `cpu.stat`
/// (present without controllers, and kept for removed children).
pub fn cgroup_cpu_seconds(name: &str) -> Option<f64> {
    let root = Path::new(CGROUP_ROOT);
    [root.join("unified").join(name), root.join(name)].iter().find_map(|dir| {
        let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
        let usec: u64 =
            stat.lines().find_map(|line| line.strip_prefix("usage_usec "))?.parse().ok()?;
        Some(usec as f64 / 1e6)
    })
}

/// Directories named `name` directly below a cgroup hierarchy's root, in every hierarchy.
pub fn cgroup_directories(name: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|hierarchy| hierarchy.path().join(name))
        .chain(std::iter::once(root.join(name)))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// CPU seconds (user + system) of `pid`, with the children it already reaped.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    Some(cpu_ticks(pid, true)? as f64 / TICKS_PER_SECOND)
}

/// CPU seconds (user + system) this process used so far, without its children (the
/// baselines' processes).
pub fn own_cpu_seconds() -> f64 {
    cpu_ticks(std::process::id(), false).unwrap_or(0) as f64 / TICKS_PER_SECOND
}

/// utime + stime (+ cutime + cstime) from /proc/PID/stat.
fn cpu_ticks(pid: u32, with_reaped_children: bool) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // `fields[0]` is field 3 (state); utime is field 14, stime 15, cutime 16, cstime 17.
    let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
    let own = field(14)? + field(15)?;
    Some(if with_reaped_children { own + field(16)? + field(17)? } else { own })
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kib_field_reads_the_named_line_only() {
        let text = "MemTotal:       24684092 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(kib_field(text, "MemAvailable"), Some(20_000_000));
        assert_eq!(kib_field(text, "Mem"), None);
    }

    #[test]
    fn own_process_has_memory() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        assert!(pss_kib(&[me]) > 0);
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = own_cpu_seconds();
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(100) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        assert!(own_cpu_seconds() > before);
        assert!(process_cpu_seconds(std::process::id()).unwrap() >= own_cpu_seconds());
    }

    #[test]
    fn a_cgroup_that_does_not_exist_has_nothing() {
        let name = format!("poseidon-bench-missing-{}", std::process::id());
        assert!(processes_in_cgroup(&name).is_empty());
        assert!(cgroup_directories(&name).is_empty());
        assert_eq!(cgroup_memory_bytes(&name), None);
    }
}
