//! Applying a profile inside the child, in this order (docs/SECURITY.md "Order"):
//!
//! [`prepare`] (single-threaded: namespaces cannot be entered by a threaded process)
//!  1. close every descriptor not kept;
//!  2. arm PR_SET_PDEATHSIG (the signal the process armed itself, else SIGKILL) and check the launcher is
//!     still the parent;
//!  3. unshare user (when unprivileged), mount, ipc, uts, net namespaces; uid/gid maps;
//!  4. make every mount private, mount an empty tmpfs (or bind `-chroot DIR`), pivot_root into it, detach the
//!     old root, remount the new one read-only;
//!  5. drop the capability bounding set, ambient and inheritable sets (needs CAP_SETPCAP: before the uid change);
//!  6. `-runas`: setgroups, setresgid, setresuid;
//!  7. clear permitted and effective capabilities, check all five sets are empty;
//!  8. rlimits, PR_SET_DUMPABLE 0, PR_SET_NO_NEW_PRIVS;
//!  9. re-arm the parent-death signal (a credential change clears it) and check the parent again.
//!
//! [`Prepared::lock`] (may run with threads: seccomp is installed on all of them)
//! 10. Landlock (restricts the calling thread and the threads it creates afterwards);
//! 11. seccomp, last, with SECCOMP_FILTER_FLAG_TSYNC: an errno filter, then the allow-list.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{chdir, getegid, geteuid, getppid, pivot_root, setresgid, setresuid, Gid, Uid};

use crate::options::{LandlockMode, SandboxOptions, SeccompMode, SANDBOX_ENV};
use crate::profile::{LandlockScope, LandlockTcp, ProcessKind, Profile};
use crate::seccomp;
use crate::PolicyError;

/// What was applied, for the child to log (and to send to the launcher if it wants).
#[derive(Clone, Debug)]
pub struct SandboxReport {
    pub kind: ProcessKind,
    pub enabled: bool,
    pub user_namespace: bool,
    pub uid: u32,
    pub gid: u32,
    /// What the process sees as `/`.
    pub root: String,
    pub landlock: String,
    pub seccomp: String,
    /// Isolation that was asked for "if available" and is not there, and similar: the child should print them.
    pub warnings: Vec<String>,
}

impl std::fmt::Display for SandboxReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.enabled {
            return write!(
                f,
                "tessera-{}: sandbox off (uid {}, gid {}, root {})",
                self.kind, self.uid, self.gid, self.root
            );
        }
        write!(
            f,
            "tessera-{}: sandboxed: uid {} gid {}{}, root {}, landlock {}, seccomp {}",
            self.kind,
            self.uid,
            self.gid,
            if self.user_namespace { " (own user namespace)" } else { "" },
            self.root,
            self.landlock,
            self.seccomp
        )
    }
}

/// A process that went through [`prepare`] and still has to [`lock`](Prepared::lock) itself.
pub struct Prepared {
    profile: Profile,
    /// `filesystem.read_only` files now in the root: Landlock lets them be read.
    read_only: Vec<PathBuf>,
    options: SandboxOptions,
    report: SandboxReport,
}

fn os(step: &'static str) -> impl FnOnce(nix::Error) -> PolicyError {
    move |e| PolicyError::Os { step, source: std::io::Error::from(e) }
}

fn io_os(step: &'static str) -> impl FnOnce(std::io::Error) -> PolicyError {
    move |source| PolicyError::Os { step, source }
}

/// [`prepare`] then [`Prepared::lock`]: the one call for a child that starts no thread before it is confined.
pub fn enter(kind: ProcessKind, options: &SandboxOptions, keep_fds: &[RawFd]) -> Result<SandboxReport, PolicyError> {
    prepare(kind, options, keep_fds)?.lock()
}

/// [`enter`] with the options the launcher put in [`SANDBOX_ENV`]; without that variable (a child started by
/// hand), the defaults: sandbox on.
pub fn enter_from_env(kind: ProcessKind, keep_fds: &[RawFd]) -> Result<SandboxReport, PolicyError> {
    let options = match std::env::var(SANDBOX_ENV) {
        Ok(v) => SandboxOptions::from_env_value(&v)?,
        Err(std::env::VarError::NotPresent) => SandboxOptions::default(),
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(PolicyError::SandboxEnv { value: "(not UTF-8)".to_string(), message: "unreadable".to_string() })
        }
    };
    enter(kind, &options, keep_fds)
}

/// Every descriptor above 2 open in this process now, for a back end that keeps exactly what it was given and
/// what it opened for its job (tessera-blk, tessera-net: [`enter_from_env`] with this list). Not for use
/// between fork and exec (it allocates).
pub fn open_descriptors() -> Result<Vec<RawFd>, PolicyError> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(io_os("listing /proc/self/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The listing's own descriptor is in the list and closed by now: F_GETFD leaves it out.
    // SAFETY: F_GETFD only reads a descriptor's flags; a closed one fails with EBADF.
    Ok(listed.into_iter().filter(|&fd| fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0).collect())
}

/// Closes every descriptor except 0, 1, 2 and `keep` (close_range over the gaps).
fn close_other_fds(keep: &[RawFd], flags: libc::c_uint) -> std::io::Result<()> {
    // The keep list is small: sort a stack copy without allocating (this runs in pre_exec too).
    let mut sorted = [0 as RawFd; 64];
    let n = keep.len().min(64);
    if keep.len() > 64 {
        return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
    }
    sorted[..n].copy_from_slice(&keep[..n]);
    sorted[..n].sort_unstable();
    let mut next: libc::c_uint = 3;
    for &fd in &sorted[..n] {
        let Ok(fd) = libc::c_uint::try_from(fd) else { continue };
        if fd < next {
            continue;
        }
        if fd > next {
            close_range(next, fd - 1, flags)?;
        }
        next = fd + 1;
    }
    close_range(next, libc::c_uint::MAX, flags)
}

fn close_range(first: libc::c_uint, last: libc::c_uint, flags: libc::c_uint) -> std::io::Result<()> {
    // SAFETY: close_range only closes (or marks close-on-exec) descriptors in the range; the caller has made
    // sure no live Rust object owns one of them (they are exactly the descriptors the process was not given).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// For the launcher's `CommandExt::pre_exec`, after the control socket was dup2'ed to fd 3: arms
/// PR_SET_PDEATHSIG(SIGKILL), fails if `launcher_pid` is no longer the parent, and marks every descriptor but
/// 0, 1, 2 and `keep` close-on-exec. Async-signal-safe: raw syscalls only, no allocation, no lock.
pub fn pre_exec_child(launcher_pid: u32, keep: &[RawFd]) -> std::io::Result<()> {
    arm_parent_death_signal(libc::SIGKILL, Some(launcher_pid))?;
    close_other_fds(keep, libc::CLOSE_RANGE_CLOEXEC)
}

/// Everything the launcher does for one child, in one call: sets [`SANDBOX_ENV`] from `options` (with this
/// process as the expected parent) and registers [`pre_exec_child`] as a `pre_exec` hook keeping `keep`
/// (plus 0, 1, 2). Register the launcher's own `pre_exec` that dup2's the control socket to fd 3 *before*
/// calling this (hooks run in registration order), and list 3 in `keep`.
pub fn prepare_command(cmd: &mut std::process::Command, options: &SandboxOptions, keep: &[RawFd]) {
    use std::os::unix::process::CommandExt;
    let (name, value) = options.child_env();
    cmd.env(name, value);
    let launcher = std::process::id();
    let keep = keep.to_vec();
    // SAFETY: the hook runs between fork and exec; pre_exec_child only makes raw syscalls on stack data and
    // `keep`, which was allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || pre_exec_child(launcher, &keep));
    }
}

fn arm_parent_death_signal(signal: libc::c_int, parent: Option<u32>) -> std::io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointer.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(p) = parent {
        // Checked after arming: if the parent died before, the signal will never come (the process was
        // reparented), and the child must not run on unsupervised.
        // SAFETY: getppid has no arguments and cannot fail.
        let now = unsafe { libc::getppid() };
        if u32::try_from(now).ok() != Some(p) {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// The parent-death signal the process has armed, 0 if none.
fn current_parent_death_signal() -> libc::c_int {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int to the pointer given, which points to a live c_int.
    let rc = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int, 0, 0, 0) };
    if rc == 0 {
        signal
    } else {
        0
    }
}

/// Arms `signal` as parent-death signal and checks the parent is still the launcher.
fn parent_check(options: &SandboxOptions, signal: libc::c_int) -> Result<(), PolicyError> {
    arm_parent_death_signal(signal, options.parent_pid).map_err(|e| {
        if e.raw_os_error() == Some(libc::ESRCH) {
            PolicyError::ParentGone { expected: options.parent_pid.unwrap_or(0), actual: getppid().as_raw() }
        } else {
            PolicyError::Os { step: "PR_SET_PDEATHSIG", source: e }
        }
    })
}

fn thread_count() -> Result<usize, PolicyError> {
    Ok(std::fs::read_dir("/proc/self/task").map_err(io_os("listing /proc/self/task"))?.count())
}

fn has_effective_cap(cap: caps::Capability) -> bool {
    caps::has_cap(None, caps::CapSet::Effective, cap).unwrap_or(false)
}

/// Steps 1 to 9 (see the module comment). Must run before the process starts any thread.
///
/// `keep_fds` lists every descriptor the process holds besides 0, 1 and 2 (normally just the control
/// channel, fd 3; a standalone back end also its image and listening socket, opened before this call): all
/// others are closed, and a Rust object still owning one of them would close a number that may be reused.
pub fn prepare(kind: ProcessKind, options: &SandboxOptions, keep_fds: &[RawFd]) -> Result<Prepared, PolicyError> {
    let profile = Profile::load(kind)?;
    close_other_fds(keep_fds, 0).map_err(io_os("closing descriptors not passed"))?;
    // Keep the signal the process chose (tessera-chardev arms SIGTERM so it can restore the terminal before
    // it goes); SIGKILL when none is armed.
    let death_signal = match current_parent_death_signal() {
        0 => libc::SIGKILL,
        chosen => chosen,
    };
    parent_check(options, death_signal)?;
    let mut report = SandboxReport {
        kind,
        enabled: options.enabled,
        user_namespace: false,
        uid: geteuid().as_raw(),
        gid: getegid().as_raw(),
        root: "/ (host)".to_string(),
        landlock: "off".to_string(),
        seccomp: "off".to_string(),
        warnings: Vec::new(),
    };
    let privileged = geteuid().is_root() && has_effective_cap(caps::Capability::CAP_SYS_ADMIN);
    // Switching to another uid needs real root (CAP_SETUID in the initial user namespace); a root without
    // CAP_SYS_ADMIN (some containers) cannot do the mounts either.
    if options.runas.is_some() && (!geteuid().is_root() || (options.enabled && !privileged)) {
        return Err(PolicyError::RunAsNeedsRoot { kind });
    }

    if !options.enabled {
        // QEMU's meaning without a sandbox: chroot and change user, nothing else.
        if let Some(dir) = &options.chroot {
            nix::unistd::chroot(dir.as_path()).map_err(os("chroot (-chroot)"))?;
            chdir("/").map_err(os("chdir / after chroot"))?;
            report.root = dir.display().to_string();
        }
        if let Some(r) = options.runas {
            switch_user(r.uid, r.gid)?;
            report.uid = r.uid;
            report.gid = r.gid;
        }
        parent_check(options, death_signal)?;
        return Ok(Prepared { profile, read_only: Vec::new(), options: options.clone(), report });
    }

    let threads = thread_count()?;
    if threads != 1 {
        return Err(PolicyError::ThreadsRunning { kind, count: threads });
    }

    // 3. Namespaces.
    let ns = &profile.namespaces;
    let mut flags = CloneFlags::empty();
    for (wanted, flag) in [
        (ns.mount, CloneFlags::CLONE_NEWNS),
        (ns.ipc, CloneFlags::CLONE_NEWIPC),
        (ns.uts, CloneFlags::CLONE_NEWUTS),
        (ns.net, CloneFlags::CLONE_NEWNET),
    ] {
        if wanted {
            flags |= flag;
        }
    }
    let use_userns = !privileged;
    if use_userns {
        if !ns.user {
            return Err(PolicyError::NeedsPrivilege { kind });
        }
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    let (outer_uid, outer_gid) = (geteuid().as_raw(), getegid().as_raw());
    if let Err(e) = unshare(flags) {
        return Err(if use_userns {
            PolicyError::UserNamespaceUnavailable { kind, source: e.into() }
        } else {
            PolicyError::Os { step: "unshare (mount, ipc, uts, net namespaces)", source: e.into() }
        });
    }
    if use_userns {
        // The same ids inside as outside, so the process looks unchanged; it holds every capability inside
        // its own namespace only, and gives them up below. setgroups must be denied before an unprivileged
        // process may write its gid_map (user_namespaces(7)).
        std::fs::write("/proc/self/setgroups", "deny").map_err(io_os("writing /proc/self/setgroups"))?;
        std::fs::write("/proc/self/uid_map", format!("{outer_uid} {outer_uid} 1"))
            .map_err(io_os("writing /proc/self/uid_map"))?;
        std::fs::write("/proc/self/gid_map", format!("{outer_gid} {outer_gid} 1"))
            .map_err(io_os("writing /proc/self/gid_map"))?;
        report.user_namespace = true;
    }

    // 4. The filesystem: an empty root.
    let mut read_only = Vec::new();
    if ns.mount {
        let wanted = if options.chroot.is_some() { &[][..] } else { &profile.filesystem.read_only[..] };
        let (root, mounted, missing) = enter_empty_root(options.chroot.as_deref(), wanted)?;
        report.root = root;
        for m in &missing {
            report.warnings.push(format!("{m} is not on the host: left out of the root"));
        }
        read_only = mounted;
    }

    // 5. Capabilities that survive a uid change must go while CAP_SETPCAP is still there.
    caps::clear(None, caps::CapSet::Bounding)
        .map_err(|e| PolicyError::Capabilities { step: "dropping the bounding set", message: e.to_string() })?;
    caps::clear(None, caps::CapSet::Ambient)
        .map_err(|e| PolicyError::Capabilities { step: "clearing the ambient set", message: e.to_string() })?;
    caps::clear(None, caps::CapSet::Inheritable)
        .map_err(|e| PolicyError::Capabilities { step: "clearing the inheritable set", message: e.to_string() })?;

    // 6. -runas.
    if let Some(r) = options.runas {
        switch_user(r.uid, r.gid)?;
        report.uid = r.uid;
        report.gid = r.gid;
    }

    // 7. No capability left, in any set.
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::clear(None, set)
            .map_err(|e| PolicyError::Capabilities { step: "clearing effective/permitted", message: e.to_string() })?;
    }
    verify_no_capabilities()?;

    // 8. Limits and process flags.
    apply_rlimits(&profile)?;
    // Not dumpable: no core dump of guest RAM, and other processes of the same uid cannot ptrace it or
    // read its memory (ptrace(2) "Ptrace access mode checking").
    prctl("PR_SET_DUMPABLE", libc::PR_SET_DUMPABLE, 0)?;
    prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)?;

    // 9. A credential change resets the parent-death signal (credentials(7)): arm it again.
    parent_check(options, death_signal)?;
    Ok(Prepared { profile, read_only, options: options.clone(), report })
}

fn prctl(step: &'static str, option: libc::c_int, value: libc::c_ulong) -> Result<(), PolicyError> {
    // SAFETY: the options used here take plain integers, no pointer.
    let rc = unsafe { libc::prctl(option, value, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if rc != 0 {
        return Err(PolicyError::Os { step, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

fn switch_user(uid: u32, gid: u32) -> Result<(), PolicyError> {
    // Only the -runas group remains as supplementary group, as QEMU does.
    nix::unistd::setgroups(&[Gid::from_raw(gid)]).map_err(os("setgroups (-runas)"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(os("setresgid (-runas)"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(os("setresuid (-runas)"))?;
    Ok(())
}

fn verify_no_capabilities() -> Result<(), PolicyError> {
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted, caps::CapSet::Inheritable, caps::CapSet::Ambient] {
        let left = caps::read(None, set)
            .map_err(|e| PolicyError::Capabilities { step: "reading back", message: e.to_string() })?;
        if !left.is_empty() {
            return Err(PolicyError::Capabilities {
                step: "checking",
                message: format!("{set:?} still holds {left:?}"),
            });
        }
    }
    // Bounding set, by number: the caps crate only knows the capabilities of its release.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ takes a capability number and no pointer.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if rc == 1 {
            // SAFETY: as above.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 {
                return Err(PolicyError::Capabilities {
                    step: "dropping the bounding set",
                    message: format!("capability {cap}: {}", std::io::Error::last_os_error()),
                });
            }
        }
    }
    Ok(())
}

fn apply_rlimits(profile: &Profile) -> Result<(), PolicyError> {
    let r = &profile.rlimits;
    for (resource, name, value) in [
        (Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE", r.nofile),
        (Resource::RLIMIT_CORE, "RLIMIT_CORE", r.core),
        (Resource::RLIMIT_NPROC, "RLIMIT_NPROC", r.nproc),
    ] {
        let Some(value) = value else { continue };
        // Never above the current hard limit: raising it needs CAP_SYS_RESOURCE, which no child has.
        let (_, hard) = getrlimit(resource).map_err(|e| PolicyError::Rlimit { resource: name, source: e.into() })?;
        let v = value.min(hard);
        setrlimit(resource, v, v).map_err(|e| PolicyError::Rlimit { resource: name, source: e.into() })?;
    }
    Ok(())
}

/// Step 4: private mounts, a new empty root (or `chroot`), pivot_root, old root detached, read-only. The
/// profile's `read_only` host files are bound into the empty root at their own path, read-only. Returns the
/// description, the files bound, the files missing on the host.
fn enter_empty_root(
    chroot: Option<&Path>,
    read_only: &[String],
) -> Result<(String, Vec<PathBuf>, Vec<String>), PolicyError> {
    let mut mounted = Vec::new();
    let mut missing = Vec::new();
    let none: Option<&str> = None;
    // Nothing below may propagate back to the host's mount namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(os("making mounts private"))?;
    let (new_root, described): (PathBuf, String) = match chroot {
        Some(dir) => {
            mount(Some(dir), dir, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
                .map_err(os("bind-mounting -chroot dir"))?;
            (dir.to_path_buf(), dir.display().to_string())
        }
        None => {
            // Any existing directory will do as mount point: the mount exists only in this namespace.
            let point = ["/tmp", "/proc"].into_iter().map(PathBuf::from).find(|p| p.is_dir()).ok_or_else(|| {
                PolicyError::Os {
                    step: "finding a mount point",
                    source: std::io::Error::from_raw_os_error(libc::ENOENT),
                }
            })?;
            // Inodes: the root, and per bound file at most its directories and itself.
            let inodes = 2 + read_only.iter().map(|p| Path::new(p).components().count()).sum::<usize>();
            mount(
                Some("tessera-empty"),
                &point,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some(format!("size=4k,nr_inodes={inodes},mode=0555").as_str()),
            )
            .map_err(os("mounting the empty tmpfs root"))?;
            for host in read_only {
                if bind_read_only(Path::new(host), &point)? {
                    mounted.push(PathBuf::from(host));
                } else {
                    missing.push(host.clone());
                }
            }
            let described = if mounted.is_empty() {
                "empty (read-only tmpfs)".to_string()
            } else {
                let names: Vec<String> = mounted.iter().map(|p| p.display().to_string()).collect();
                format!("empty (read-only tmpfs) but {} (read-only)", names.join(", "))
            };
            (point, described)
        }
    };
    chdir(&new_root).map_err(os("chdir to the new root"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then removes it
    // (pivot_root(2), NOTES), so no directory is needed to hold the old root.
    pivot_root(".", ".").map_err(os("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(os("detaching the old root"))?;
    chdir("/").map_err(os("chdir /"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(os("remounting the new root read-only"))?;
    Ok((described, mounted, missing))
}

/// Binds the host file `host` (followed if a symlink, as libc's fopen would) at the same path under
/// `new_root`, then makes that mount read-only, nosuid and noexec. Its other flags stay as the host's mount
/// has them: a mount inherited from another user namespace keeps its flags locked (mount_namespaces(7)),
/// and /dev/urandom needs its mount's device access. Ok(false) if the host has no such file.
fn bind_read_only(host: &Path, new_root: &Path) -> Result<bool, PolicyError> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let none: Option<&str> = None;
    match std::fs::metadata(host) {
        Err(_) => return Ok(false),
        // The mount point made below is a file: a directory cannot be bound on it.
        Ok(m) if m.is_dir() => {
            return Err(PolicyError::Os {
                step: "binding a read-only file (the host has a directory there)",
                source: std::io::Error::from_raw_os_error(libc::EISDIR),
            })
        }
        Ok(_) => {}
    }
    let target = new_root.join(host.strip_prefix("/").unwrap_or(host));
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).map_err(io_os("making a directory for a read-only file"))?;
    }
    std::fs::File::create(&target).map_err(io_os("making the mount point of a read-only file"))?;
    mount(Some(host), &target, none, MsFlags::MS_BIND, none).map_err(os("binding a read-only file"))?;
    let have = statvfs(&target).map_err(os("reading a bound file's mount flags"))?.flags();
    let mut flags =
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    for (has, keep) in [
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(has) {
            flags |= keep;
        }
    }
    mount(none, &target, none, flags, none).map_err(os("remounting a bound file read-only"))?;
    Ok(true)
}

impl Prepared {
    /// What was applied so far.
    pub fn report(&self) -> &SandboxReport {
        &self.report
    }

    /// Steps 10 and 11: Landlock, then seccomp on every thread. After this the process can only make the
    /// profile's syscalls.
    pub fn lock(mut self) -> Result<SandboxReport, PolicyError> {
        if !self.options.enabled {
            return Ok(self.report);
        }
        self.apply_landlock()?;
        match self.options.seccomp {
            SeccompMode::Off => {
                self.report.seccomp = "off (test mode)".to_string();
                self.report.warnings.push("seccomp filter not installed (test mode)".to_string());
            }
            mode => {
                // SAFETY: getpid has no arguments and cannot fail.
                let pid = unsafe { libc::getpid() };
                let filters = seccomp::build(&self.profile, mode, pid as u32)?;
                seccomp::install(&filters)?;
                self.report.seccomp = match mode {
                    SeccompMode::Kill => "on (kill process)".to_string(),
                    _ => "log only (development mode)".to_string(),
                };
            }
        }
        Ok(self.report)
    }

    fn apply_landlock(&mut self) -> Result<(), PolicyError> {
        use landlock::{
            Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
        };
        if self.options.landlock == LandlockMode::Off {
            self.report.landlock = "off".to_string();
            return Ok(());
        }
        let ll = &self.profile.landlock;
        let err = |e: landlock::RulesetError| PolicyError::Landlock { kind: self.report.kind, message: e.to_string() };
        // The newest ABI whose rights we have checked: filesystem rights up to V5 (ioctl on devices), TCP
        // from V4, scopes from V6. The crate leaves out what the running kernel lacks (best effort) and
        // says so in the status.
        let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(ABI::V5)).map_err(err)?;
        if ll.tcp == LandlockTcp::Deny {
            ruleset = ruleset.handle_access(AccessNet::from_all(ABI::V4)).map_err(err)?;
        }
        let mut scopes = landlock::BitFlags::<Scope>::EMPTY;
        for s in &ll.scope {
            scopes |= match s {
                LandlockScope::Signal => Scope::Signal,
                LandlockScope::AbstractUnixSocket => Scope::AbstractUnixSocket,
            };
        }
        if !scopes.is_empty() {
            ruleset = ruleset.scope(scopes).map_err(err)?;
        }
        // The profile's read-only files (bound into the root in step 4) may be read, nothing else.
        let rules = landlock::path_beneath_rules(&self.read_only, AccessFs::ReadFile);
        let status = ruleset.create().map_err(err)?.add_rules(rules).map_err(err)?.restrict_self().map_err(err)?;
        let abi = match status.landlock {
            landlock::LandlockStatus::Available { kernel_abi: Some(v), .. } => format!("kernel ABI {v}"),
            landlock::LandlockStatus::Available { effective_abi, .. } => format!("{effective_abi:?}"),
            other => format!("{other:?}"),
        };
        match status.ruleset {
            RulesetStatus::FullyEnforced => self.report.landlock = format!("fully enforced ({abi})"),
            RulesetStatus::PartiallyEnforced => {
                self.report.landlock = format!("partially enforced ({abi})");
                self.report
                    .warnings
                    .push(format!("the kernel enforces only part of the Landlock rules ({abi}): older than ABI 6"));
            }
            RulesetStatus::NotEnforced => {
                if self.options.landlock == LandlockMode::Required {
                    return Err(PolicyError::LandlockUnavailable { kind: self.report.kind, status: abi });
                }
                self.report.landlock = format!("not available ({abi})");
                self.report.warnings.push(format!(
                    "Landlock is not available on this kernel ({abi}): tessera-{} runs without its second filesystem layer",
                    self.report.kind
                ));
            }
        }
        Ok(())
    }
}
