//! `tessera-chardev --ipc-fd N`: see the library documentation.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use tessera_chardev::{terminal, Chardev, ChardevError};
use tessera_ipc::child::start_child;
use tessera_ipc::messages::{ChildConfig, ChildToLauncher, Role};
use tessera_policy::ProcessKind;

/// Tessera's character-device backend. Started by the tessera launcher, not by hand.
#[derive(Parser)]
#[command(name = "tessera-chardev", version)]
struct Args {
    /// The control channel to the launcher.
    #[arg(long, default_value_t = tessera_ipc::CONTROL_FD)]
    ipc_fd: i32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = terminal::install_handlers() {
        return fail(None, &e);
    }
    // Confined after the terminal handlers are in place (their parent-death signal, SIGTERM, is kept) and
    // before anything is read from the launcher: the profile keeps the control channel only; the terminal,
    // files and sockets arrive over it (docs/SECURITY.md).
    let report = match tessera_policy::enter_from_env(ProcessKind::Chardev, &[args.ipc_fd]) {
        Ok(r) => r,
        Err(e) => {
            terminal::restore();
            let _ = writeln!(std::io::stderr(), "{}", sandbox_error(&e));
            return ExitCode::FAILURE;
        }
    };
    for w in &report.warnings {
        let _ = writeln!(std::io::stderr(), "tessera-chardev: warning: {w}");
    }
    #[cfg(feature = "misbehave")]
    tessera_policy::hostile::misbehave_from_env("chardev");
    let start = match start_child(Role::Chardev, args.ipc_fd) {
        Ok(s) => s,
        Err(e) => return fail(None, &ChardevError::from(e)),
    };
    let ChildConfig::Chardev(cfg) = start.config else {
        let e = ChardevError::WrongConfig;
        let _ = start.control.send(&ChildToLauncher::Fatal { message: format!("tessera-chardev: {e}") }, &[]);
        return fail(None, &e);
    };
    let id = cfg.id.clone();
    if cfg.log.items.iter().any(|i| i == "sandbox") {
        let _ = writeln!(std::io::stderr(), "{report} [{id}]");
    }
    // The control channel is kept aside so a setup error can still be reported on it.
    let control = match start.control.socket().try_clone() {
        Ok(s) => tessera_ipc::Channel::new(s),
        Err(e) => return fail(Some(&id), &ChardevError::sys("duplicate the control channel", errno_of(&e))),
    };
    match Chardev::new(cfg, start.fds, start.control) {
        Ok(chardev) => {
            drop(control);
            ExitCode::from(chardev.run() as u8)
        }
        Err(e) => {
            terminal::restore();
            let message = format!("tessera-chardev: {id}: {}", e.chain());
            let _ = control.send(&ChildToLauncher::Fatal { message }, &[]);
            fail(Some(&id), &e)
        }
    }
}

/// The error and its causes on one line, prefixed with the program name once.
fn sandbox_error(e: &tessera_policy::PolicyError) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    if msg.starts_with("tessera-chardev: ") {
        msg
    } else {
        format!("tessera-chardev: sandbox: {msg}")
    }
}

fn fail(id: Option<&str>, e: &ChardevError) -> ExitCode {
    let prefix = id.map_or_else(String::new, |id| format!("{id}: "));
    let _ = writeln!(std::io::stderr(), "tessera-chardev: {prefix}{}", e.chain());
    ExitCode::FAILURE
}

fn errno_of(e: &std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
