//! The seccomp policy of executions: a deny-list of system calls a learner never needs,
//! kept as data ([`DENIED`]) and compiled once per runner init.
//!
//! Denied calls fail with `EPERM`; `clone` is refused only when it asks for a new namespace;
//! `clone3` fails with `ENOSYS` (its flags live in memory a filter cannot inspect), which makes
//! the C library fall back to `clone`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `open_tree_attr` (Linux 6.15, the same number on every architecture); too new for `libc`.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// System calls refused with `EPERM`, with the reason a learner does not need them.
pub const DENIED: &[(&str, i64)] = &[
    // File system layout: the runner's mounts are fixed.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    // Namespaces: no new ones, no entering others.
    ("setns", libc::SYS_setns),
    ("unshare", libc::SYS_unshare),
    // The kernel itself.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("syslog", libc::SYS_syslog),
    // Large attack surfaces.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    // Key rings are not namespaced per runner.
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    // The clock is the host's.
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    // Hardware ports.
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

/// Namespace flags `clone` may not carry. (`CLONE_NEWTIME` shares its bit with the exit
/// signal of `clone` and is only accepted by `clone3` and `unshare`, both refused anyway.)
pub const DENIED_CLONE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Why the policy could not be compiled (a bug, not a runtime condition).
#[derive(Debug, thiserror::Error)]
#[error("cannot compile the seccomp policy: {0}")]
pub struct PolicyError(#[from] seccompiler::BackendError);

/// The compiled filters, installed in this order.
#[derive(Debug, Clone)]
pub struct Policy {
    pub filters: Vec<BpfProgram>,
}

impl Policy {
    /// Compiles the policy for the running architecture.
    pub fn compile() -> Result<Policy, PolicyError> {
        let arch = TargetArch::try_from(std::env::consts::ARCH)?;
        let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
        let clone_rules = DENIED_CLONE_FLAGS
            .iter()
            .map(|&flag| {
                let condition = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?;
                SeccompRule::new(vec![condition])
            })
            .collect::<Result<Vec<_>, _>>()?;
        denied.insert(libc::SYS_clone, clone_rules);
        let eperm = SeccompFilter::new(
            denied,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            arch,
        )?;
        let enosys = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )?;
        Ok(Policy { filters: vec![eperm.try_into()?, enosys.try_into()?] })
    }

    /// Installs the filters in the calling thread (requires `no_new_privs`).
    pub fn install(&self) -> Result<(), seccompiler::Error> {
        for filter in &self.filters {
            seccompiler::apply_filter(filter)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_compiles_and_lists_each_call_once() {
        let policy = Policy::compile().unwrap();
        assert_eq!(policy.filters.len(), 2);
        let mut names: Vec<_> = DENIED.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DENIED.len());
    }
}
