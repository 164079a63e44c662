//! The launcher-side hook, run in a real fork/exec: descriptors not passed do not reach the child, the kept
//! ones do, and a child whose launcher is gone refuses to start.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use tessera_policy::pre_exec_child;

/// A pipe whose ends are inherited across exec (no O_CLOEXEC), as a careless library might leave one.
fn leaky_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // Moved to high numbers (F_DUPFD does not set close-on-exec): the shell's own directory descriptor for
    // the glob takes the lowest free number and must not be mistaken for a leak.
    let high = fds.map(|fd| {
        // SAFETY: fd is open; F_DUPFD returns a new descriptor >= 200 or -1.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD, 200) };
        assert!(new >= 200);
        // SAFETY: fd was created above and is not used again.
        unsafe { libc::close(fd) };
        new
    });
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(high[0]), OwnedFd::from_raw_fd(high[1])) }
}

fn child_fds(hook: Option<(u32, Vec<RawFd>)>) -> std::io::Result<Vec<RawFd>> {
    let mut cmd = Command::new("/bin/sh");
    // The shell lists its own descriptors (ls adds its directory descriptor, so list with a glob instead).
    cmd.args(["-c", "cd /proc/self/fd && echo *"]);
    if let Some((pid, keep)) = hook {
        // SAFETY: pre_exec_child is async-signal-safe (raw syscalls, no allocation); `keep` was allocated
        // before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || pre_exec_child(pid, &keep));
        }
    }
    let out = cmd.output()?;
    Ok(String::from_utf8(out.stdout).unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect())
}

#[test]
fn descriptors_not_passed_do_not_reach_the_child() {
    let (r, w) = leaky_pipe();
    let leaked = [r.as_raw_fd(), w.as_raw_fd()];
    let without = child_fds(None).unwrap();
    assert!(leaked.iter().all(|fd| without.contains(fd)), "control: the pipe leaks without the hook: {without:?}");
    let with = child_fds(Some((std::process::id(), vec![]))).unwrap();
    assert!(leaked.iter().all(|fd| !with.contains(fd)), "leaked into the child: {with:?}");
    let kept = child_fds(Some((std::process::id(), vec![w.as_raw_fd()]))).unwrap();
    assert!(kept.contains(&w.as_raw_fd()) && !kept.contains(&r.as_raw_fd()), "{kept:?}");
}

#[test]
fn a_child_whose_launcher_is_gone_does_not_start() {
    // Pid 1 is never our pid: as if the launcher had died and the child been reparented.
    let e = child_fds(Some((1, vec![]))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "{e}");
}

#[test]
fn prepare_command_hands_the_options_and_the_hook_to_the_child() {
    let mut options = tessera_policy::SandboxOptions::default();
    options.apply_sandbox_arg("on,seccomp=log").unwrap();
    let (r, w) = leaky_pipe();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "echo \"$TESSERA_SANDBOX\"; cd /proc/self/fd && echo *"]);
    tessera_policy::prepare_command(&mut cmd, &options, &[w.as_raw_fd()]);
    let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    let mut lines = out.lines();
    let env = lines.next().unwrap();
    let got = tessera_policy::SandboxOptions::from_env_value(env).unwrap();
    assert_eq!(got.parent_pid, Some(std::process::id()));
    assert_eq!(got.seccomp, tessera_policy::SeccompMode::Log);
    let fds: Vec<RawFd> = lines.next().unwrap().split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert!(fds.contains(&w.as_raw_fd()) && !fds.contains(&r.as_raw_fd()), "{fds:?}");
}
