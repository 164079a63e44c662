//! Starting a child: find its executable, start it as `<binary> --ipc-fd 3` with its end of a fresh control
//! socketpair at fd 3, bound to die with the launcher, shake hands, and send its configuration with its
//! descriptors attached.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;
use tessera_ipc::messages::{ChildConfig, LauncherToChild, Role};
use tessera_ipc::{Channel, FdList, CONTROL_FD};

use crate::error::{os_error, Error, Result};

/// How long a child may take to greet the launcher after it was started.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the children's executables are: `$TESSERA_LIBEXEC_DIR`, else the launcher's own directory.
pub fn libexec_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("TESSERA_LIBEXEC_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(|e| Error::host("locating the launcher executable", os_error(e)))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The path of `binary`, checked to be an executable file.
pub fn find_binary(dir: &Path, binary: &'static str) -> Result<PathBuf> {
    let path = dir.join(binary);
    let fail = |e: std::io::Error| Error::ChildBinary { binary, dir: dir.display().to_string(), source: os_error(e) };
    let meta = std::fs::metadata(&path).map_err(fail)?;
    if !meta.is_file() {
        return Err(fail(std::io::Error::from_raw_os_error(libc::EACCES)));
    }
    Ok(path)
}

/// A started child whose handshake is not done yet.
pub struct Started {
    pub pid: Pid,
    pub control: Channel,
}

/// Start `path` with its control channel at fd 3. With `detached` (`-daemonize`) its stdout and stderr are
/// /dev/null, as the daemon's own are once it runs: a daemon must not keep the terminal or a pipe open (what
/// goes wrong before `Ready` still reaches the user through `Fatal` or the exit status).
///
/// `sandbox` is how the child confines itself: [`tessera_policy::prepare_command`] passes it in the
/// environment and adds the policy's async-signal-safe hook after ours (so fd 3 is in place when it marks
/// every other descriptor close-on-exec); the child applies its profile at the top of its `main`.
pub fn start(
    path: &Path,
    binary: &'static str,
    detached: bool,
    sandbox: &tessera_policy::SandboxOptions,
) -> Result<Started> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::host("socketpair", os_error(e)))?;
    let child_fd = theirs.as_raw_fd();
    let launcher = nix::unistd::getpid();
    let mut cmd = Command::new(path);
    cmd.arg0(binary).arg("--ipc-fd").arg(CONTROL_FD.to_string()).stdin(Stdio::null());
    if detached {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe system calls
    // (dup2, fcntl, prctl, getppid, sigprocmask, signal); it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            // The control channel goes to fd 3 and must survive exec (dup2 clears close-on-exec; when the
            // socket already is fd 3, clear the flag by hand).
            if child_fd == CONTROL_FD {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // No orphans: the child dies when the launcher does, even by SIGKILL. If the launcher died before
            // the prctl took effect, the child has been reparented already: give up instead of running alone.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != launcher.as_raw() {
                libc::_exit(1);
            }
            // The launcher blocks the signals it reads through a signalfd; the child starts with none blocked.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Ctrl-C and a terminal hangup reach the whole foreground process group: the launcher turns them
            // into an orderly shutdown, so the children must not die of them first.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    // Registered after the hook above: hooks run in order, and this one keeps fd 3 only.
    tessera_policy::prepare_command(&mut cmd, sandbox, &[CONTROL_FD]);
    let child = cmd.spawn().map_err(|e| Error::Spawn { binary, source: os_error(e) })?;
    drop(theirs);
    let pid = Pid::from_raw(child.id() as i32);
    // The launcher reaps its children itself (waitpid), so the std handle is not kept.
    drop(child);
    Ok(Started { pid, control: Channel::new(ours) })
}

/// Start a backend that takes command-line flags (tessera-blk): `fds[i]` becomes its descriptor `3 + i`, and
/// one more descriptor after them is its end of a liveness link: the launcher watches the other end like a
/// control channel, so the backend's death is noticed the same way (the backend never reads or writes it).
///
/// `sandbox` as for [`start`]: the backend confines itself once it has taken over its descriptors, keeping
/// exactly the ones it inherited (every other one is close-on-exec by then).
pub fn start_plain(
    path: &Path,
    binary: &'static str,
    args: &[String],
    fds: &[BorrowedFd<'_>],
    detached: bool,
    sandbox: &tessera_policy::SandboxOptions,
) -> Result<Started> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::host("socketpair", os_error(e)))?;
    let mut sources: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    sources.push(theirs.as_raw_fd());
    let launcher = nix::unistd::getpid();
    let mut cmd = Command::new(path);
    cmd.arg0(binary).args(args).stdin(Stdio::null());
    if detached {
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
    }
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe system calls
    // (fcntl, dup2, close, prctl, getppid, sigprocmask, signal); `sources` was allocated before the fork and
    // is only read and written in place.
    unsafe {
        cmd.pre_exec(move || {
            // Move every source above the targets first, so that no dup2 overwrites a source not yet moved.
            for s in sources.iter_mut() {
                let high = libc::fcntl(*s, libc::F_DUPFD_CLOEXEC, 64);
                if high < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                *s = high;
            }
            for (i, s) in sources.iter().enumerate() {
                // dup2 clears close-on-exec on the target.
                if libc::dup2(*s, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*s);
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != launcher.as_raw() {
                libc::_exit(1);
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    // Registered after the hook above, which put the descriptors at 3, 4, ...: this one keeps those only.
    let keep: Vec<i32> = (0..=fds.len() as i32).map(|i| 3 + i).collect();
    tessera_policy::prepare_command(&mut cmd, sandbox, &keep);
    let child = cmd.spawn().map_err(|e| Error::Spawn { binary, source: os_error(e) })?;
    drop(theirs);
    let pid = Pid::from_raw(child.id() as i32);
    drop(child);
    let control = Channel::new(ours);
    control.set_nonblocking(true).map_err(|e| Error::Child(e.to_string()))?;
    Ok(Started { pid, control })
}

/// Greet the child (it must answer as `role` within [`HANDSHAKE_TIMEOUT`]) and send its configuration with
/// its descriptors attached.
pub fn configure(started: &Started, role: Role, config: &ChildConfig, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let mut p = [PollFd::new(started.control.as_fd(), PollFlags::POLLIN)];
    let ms = HANDSHAKE_TIMEOUT.as_millis() as u16;
    match poll(&mut p, PollTimeout::from(ms)) {
        Ok(0) => {
            return Err(Error::Child(format!(
                "{role} (pid {}) did not answer within {} s",
                started.pid,
                HANDSHAKE_TIMEOUT.as_secs()
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(Error::host("poll", os_error(e))),
    }
    started
        .control
        .handshake(Role::Launcher, role)
        .map_err(|e| Error::Child(format!("{role} (pid {}): {e}", started.pid)))?;
    let mut list = FdList::new();
    for fd in fds {
        list.push(*fd);
    }
    started
        .control
        .send(&LauncherToChild::Configure(config.clone()), list.as_slice())
        .map_err(|e| Error::Child(format!("{role} (pid {}): sending the configuration: {e}", started.pid)))?;
    started.control.set_nonblocking(true).map_err(|e| Error::Child(e.to_string()))?;
    Ok(())
}
