//! Raw mode on the user's terminal, and putting it back on every way out of the process.
//!
//! The settings follow QEMU's stdio chardev: no echo, no line editing, no input translation, 8-bit
//! characters, one byte at a time, but output post-processing (`OPOST`, so `\n` still starts a new line)
//! kept, and `ISIG` kept when `signal=on` so Ctrl-C still interrupts. The original settings are saved in a
//! process-wide slot that the panic hook and the signal handlers read: a panic, SIGTERM, SIGHUP and the
//! launcher's death (`PR_SET_PDEATHSIG`, set to SIGTERM here) all restore the terminal before the process
//! goes. After Ctrl-Z and `fg` (SIGCONT) raw mode is applied again, as QEMU does.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::OnceLock;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::ChardevError;

struct Saved {
    fd: RawFd,
    original: libc::termios,
    raw: libc::termios,
}

/// Set once, read by signal handlers: `OnceLock::get` is a plain atomic load once initialised.
static SAVED: OnceLock<Saved> = OnceLock::new();

/// Puts the original settings back when dropped.
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Put the terminal on `fd` into raw mode. `allow_signals` keeps `ISIG` (`signal=on`). Only one terminal
    /// per process: a chardev process serves one chardev.
    pub fn enter(fd: BorrowedFd<'_>, allow_signals: bool) -> Result<RawMode, ChardevError> {
        let original = nix::sys::termios::tcgetattr(fd).map_err(ChardevError::RawMode)?;
        let original: libc::termios = original.into();
        let mut raw = original;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_oflag |= libc::OPOST;
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
        if !allow_signals {
            raw.c_lflag &= !libc::ISIG;
        }
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        if SAVED.set(Saved { fd: fd.as_raw_fd(), original, raw }).is_err() {
            return Err(ChardevError::sys("put a second terminal into raw mode", nix::Error::EBUSY));
        }
        apply(|s| &s.raw);
        Ok(RawMode { _private: () })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Put the terminal's original settings back (if raw mode was entered). Async-signal-safe.
pub fn restore() {
    apply(|s| &s.original);
}

fn apply(which: fn(&Saved) -> &libc::termios) {
    if let Some(saved) = SAVED.get() {
        // SAFETY: tcsetattr reads a termios we own for the duration of the call; it is async-signal-safe
        // (POSIX.1-2017 §2.4.3), which matters because signal handlers call this.
        unsafe {
            libc::tcsetattr(saved.fd, libc::TCSANOW, which(saved));
        }
    }
}

/// Restore the terminal before the default panic report (a panic anywhere, in any thread, would otherwise
/// leave the user's terminal raw).
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}

extern "C" fn restore_and_die(sig: libc::c_int) {
    restore();
    // SA_RESETHAND made the default action current again: re-raising ends the process with the same
    // signal, so the launcher sees what killed it.
    // SAFETY: raise is async-signal-safe.
    unsafe {
        libc::raise(sig);
    }
}

extern "C" fn reapply_raw(_sig: libc::c_int) {
    apply(|s| &s.raw);
}

/// Install the process's signal dispositions and the panic hook. Call before touching the terminal.
///
/// SIGINT and SIGQUIT are ignored: with `signal=on` the terminal sends them to the whole foreground process
/// group, which the chardev shares with the launcher (it has to, to read the terminal), and the launcher
/// drives the shutdown; this process keeps running so the guest's last output still reaches the terminal.
pub fn install_handlers() -> Result<(), ChardevError> {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    let die = SigAction::new(
        SigHandler::Handler(restore_and_die),
        SaFlags::SA_RESETHAND | SaFlags::SA_NODEFER,
        SigSet::empty(),
    );
    let cont = SigAction::new(SigHandler::Handler(reapply_raw), SaFlags::SA_RESTART, SigSet::empty());
    for (sig, action) in [
        (Signal::SIGINT, &ignore),
        (Signal::SIGQUIT, &ignore),
        (Signal::SIGTERM, &die),
        (Signal::SIGHUP, &die),
        (Signal::SIGCONT, &cont),
    ] {
        // SAFETY: the handlers only call async-signal-safe functions (tcsetattr, raise) on data that is
        // immutable once set.
        unsafe { sigaction(sig, action) }.map_err(|e| ChardevError::sys("install a signal handler", e))?;
    }
    install_panic_hook();
    // The launcher starts children with PR_SET_PDEATHSIG(SIGKILL); SIGKILL cannot be caught, and would leave
    // the user's terminal raw. SIGTERM, handled above, restores it first. Had the launcher already died,
    // its SIGKILL would have ended this process before this point.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| ChardevError::sys("set the parent-death signal", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::termios::{tcgetattr, LocalFlags};
    use std::os::fd::AsFd;

    // The only test in this binary that enters raw mode: the saved settings are process-wide.
    #[test]
    fn raw_mode_and_its_restoration_by_drop_and_by_panic() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let canonical = |fd| tcgetattr(fd).unwrap().local_flags.contains(LocalFlags::ICANON | LocalFlags::ECHO);
        assert!(canonical(&pty.slave));
        install_panic_hook();

        let raw = RawMode::enter(pty.slave.as_fd(), true).unwrap();
        assert!(!canonical(&pty.slave));
        assert!(tcgetattr(&pty.slave).unwrap().local_flags.contains(LocalFlags::ISIG));
        drop(raw);
        assert!(canonical(&pty.slave), "drop restores");

        // Raw again (as after SIGCONT), then a panic in some thread.
        reapply_raw(libc::SIGCONT);
        assert!(!canonical(&pty.slave));
        let panicked = std::thread::spawn(|| panic!("deliberate panic to test the hook")).join();
        assert!(panicked.is_err());
        assert!(canonical(&pty.slave), "the panic hook restores");

        // One terminal per process.
        assert!(RawMode::enter(pty.slave.as_fd(), true).is_err());
    }
}
