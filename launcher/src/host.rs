//! Process-level chores QEMU does the same way: the pid file, `-daemonize`, and keeping the terminal's
//! settings safe.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use nix::sys::termios::{tcgetattr, tcsetattr, SetArg, Termios};

use crate::error::{os_error, strerror, Error, Result};

/// `-pidfile`: created, locked (a second instance with the same file fails), holds "<pid>\n"; removed at exit
/// if it still is the file this process wrote. As QEMU's `qemu_write_pidfile`.
pub struct PidFile {
    path: String,
    file: File,
}

impl PidFile {
    pub fn create(path: &str) -> Result<PidFile> {
        let fail = |what: &str, e: std::io::Error| Error::PidFile(format!("{what}: {}", strerror(&os_error(e))));
        loop {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| fail(&format!("Could not create '{path}'"), e))?;
            let lock = libc::flock {
                l_type: libc::F_WRLCK as i16,
                l_whence: libc::SEEK_SET as i16,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: F_SETLK with a valid flock structure on an open descriptor we own.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } < 0 {
                return Err(fail("Cannot lock pid file", std::io::Error::last_os_error()));
            }
            // The file may have been replaced between open and lock: lock the one that is at `path` now.
            let ours = file.metadata().map_err(|e| fail("Cannot stat file", e))?;
            match std::fs::metadata(path) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                _ => continue,
            }
            file.set_len(0).map_err(|e| fail("Failed to truncate pid file", e))?;
            (&file)
                .write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(|e| fail("Failed to write pid file", e))?;
            return Ok(PidFile { path: path.to_string(), file });
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let (Ok(ours), Ok(now)) = (self.file.metadata(), std::fs::metadata(&self.path)) {
            if ours.ino() == now.ino() && ours.dev() == now.dev() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The daemon side of `-daemonize`: tells the waiting parent how the start went.
pub struct Daemon {
    to_parent: OwnedFd,
}

/// Fork: the parent waits until the daemon reports its start (and exits with the status it reports, 1 if it
/// died first); the child becomes a session leader and carries on. Must run before any thread is started.
pub fn daemonize() -> Result<Daemon> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::host("pipe", os_error(e)))?;
    // SAFETY: the launcher is single-threaded here (daemonize runs before anything starts threads), so the
    // child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| Error::host("fork", os_error(e)))? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(w);
            let mut status = [1u8];
            let mut f = File::from(r);
            let code = match f.read(&mut status) {
                Ok(1) => i32::from(status[0]),
                _ => 1,
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            nix::unistd::setsid().map_err(|e| Error::host("setsid", os_error(e)))?;
            Ok(Daemon { to_parent: w })
        }
    }
}

impl Daemon {
    /// The graph runs: release the parent (status 0) and let go of the terminal.
    pub fn ready(self) {
        let _ = File::from(self.to_parent).write_all(&[0]);
        if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
            for fd in 0..=2 {
                // SAFETY: dup2 onto the standard descriptors, which this process owns; /dev/null stays open
                // until the end of this block.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
    }
}

/// The terminal's settings at start, put back at exit: the chardev process sets raw mode itself and restores
/// it, but if it is killed the launcher must not leave the user's terminal raw.
pub struct TerminalGuard {
    saved: Option<Termios>,
}

impl TerminalGuard {
    pub fn save() -> TerminalGuard {
        let stdin = std::io::stdin();
        TerminalGuard { saved: tcgetattr(stdin.as_fd()).ok() }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let Some(saved) = &self.saved else { return };
        let stdin = std::io::stdin();
        // Only when something changed: setting the terminal from a background process group would stop the
        // launcher with SIGTTOU.
        let Ok(now) = tcgetattr(stdin.as_fd()) else { return };
        let same = now.input_flags == saved.input_flags
            && now.output_flags == saved.output_flags
            && now.control_flags == saved.control_flags
            && now.local_flags == saved.local_flags
            && now.control_chars == saved.control_chars;
        if !same {
            let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, saved);
        }
    }
}
