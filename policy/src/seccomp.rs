//! The profile's syscall groups turned into seccomp BPF with seccompiler, and installed on every thread.
//!
//! Two filters, because seccompiler gives one match action per filter: the errno filter answers the `errno`
//! groups' syscalls with their error and allows the rest; the allow-list filter allows the profile's syscalls
//! (and the errno groups' ones, which the first filter answers) and kills (or logs) everything else. The kernel
//! runs both and takes the strictest verdict (seccomp(2), "Filter return values": KILL > ERRNO > LOG > ALLOW).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

use crate::options::SeccompMode;
use crate::profile::{ArgOp, ArgValue, Profile};
use crate::syscalls;
use crate::PolicyError;

/// The BPF programs for one process, in installation order.
pub struct Filters {
    pub programs: Vec<BpfProgram>,
}

fn build_err(kind: &str, e: impl std::fmt::Display) -> PolicyError {
    PolicyError::SeccompBuild { kind: kind.to_string(), message: e.to_string() }
}

fn condition(
    kind: &str,
    arg: u8,
    op: ArgOp,
    mask: Option<u64>,
    value: &ArgValue,
    pid: u32,
) -> Result<SeccompCondition, PolicyError> {
    let value = match value {
        ArgValue::Number(n) => *n,
        ArgValue::Symbol(s) if s == "$pid" => u64::from(pid),
        ArgValue::Symbol(s) => return Err(build_err(kind, format!("unknown symbolic value {s}"))),
    };
    let op = match op {
        ArgOp::Eq => SeccompCmpOp::Eq,
        ArgOp::MaskedEq => SeccompCmpOp::MaskedEq(mask.unwrap_or(u64::MAX)),
    };
    // Every argument the profiles compare is an int or is read by the kernel as 32 bits (the ioctl command,
    // mmap's prot bits, socket domains, prctl options, pids): compare the low 32 bits.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| build_err(kind, e))
}

/// Builds the filters for `profile`; `pid` fills in `"$pid"` values.
pub fn build(profile: &Profile, mode: SeccompMode, pid: u32) -> Result<Filters, PolicyError> {
    let kind = profile.kind.name();
    let number = |name: &str| syscalls::number(name).ok_or_else(|| build_err(kind, format!("unknown syscall {name}")));
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, group) in &profile.allow {
        for s in &group.syscalls {
            allow.insert(number(s)?, Vec::new());
        }
        for r in &group.rules {
            let mut conds = vec![condition(kind, r.arg, r.op, r.mask, &r.value, pid)?];
            for c in &r.and {
                conds.push(condition(kind, c.arg, c.op, c.mask, &c.value, pid)?);
            }
            let rule = SeccompRule::new(conds).map_err(|e| build_err(kind, e))?;
            allow.entry(number(&r.syscall)?).or_default().push(rule);
        }
    }
    let mut by_errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (_, group) in &profile.errno {
        let errno = syscalls::errno_number(&group.errno)
            .ok_or_else(|| build_err(kind, format!("unknown errno {}", group.errno)))?;
        for s in &group.syscalls {
            let nr = number(s)?;
            by_errno.entry(errno).or_default().insert(nr, Vec::new());
            allow.insert(nr, Vec::new());
        }
    }
    let arch = TargetArch::x86_64;
    let mut programs = Vec::new();
    for (errno, rules) in by_errno {
        let f = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), arch)
            .map_err(|e| build_err(kind, e))?;
        programs.push(BpfProgram::try_from(f).map_err(|e| build_err(kind, e))?);
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let f = SeccompFilter::new(allow, mismatch, SeccompAction::Allow, arch).map_err(|e| build_err(kind, e))?;
    programs.push(BpfProgram::try_from(f).map_err(|e| build_err(kind, e))?);
    Ok(Filters { programs })
}

/// Installs the filters on every thread of the process (SECCOMP_FILTER_FLAG_TSYNC): vhost-user-backend starts
/// its worker threads itself, and a thread without the filter would be a way out.
pub fn install(filters: &Filters) -> Result<(), PolicyError> {
    for p in &filters.programs {
        seccompiler::apply_filter_all_threads(p).map_err(|e| match e {
            seccompiler::Error::Seccomp(io) if io.raw_os_error() == Some(libc::EINVAL) => {
                PolicyError::SeccompUnavailable { source: io }
            }
            other => PolicyError::SeccompInstall { message: other.to_string() },
        })?;
    }
    Ok(())
}
