//! `tessera-core --ipc-fd N`: started by the launcher, never by hand. Receives its configuration over the
//! control channel, builds the VM, runs it, and reports how it ended.

use std::sync::Arc;

use tessera_core::vm::{report_fatal, Vm};
use tessera_ipc::child::start_child;
use tessera_ipc::messages::{ChildConfig, Role};
use tessera_policy::ProcessKind;

fn main() {
    let code = run();
    std::process::exit(code);
}

fn run() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fd = match args.as_slice() {
        [flag, n] if flag == "--ipc-fd" => match n.parse::<i32>() {
            Ok(fd) => fd,
            Err(_) => return usage(&format!("--ipc-fd expects a file descriptor number, not '{n}'")),
        },
        _ => return usage("expected --ipc-fd N"),
    };
    // Confined before anything is read from the launcher (docs/SECURITY.md): the profile keeps the control
    // channel only; everything else (/dev/kvm, the kernel, the serial channels) arrives over it.
    let report = match tessera_policy::enter_from_env(ProcessKind::Core, &[fd]) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", sandbox_error(&e));
            return 1;
        }
    };
    for w in &report.warnings {
        eprintln!("tessera-core: warning: {w}");
    }
    #[cfg(feature = "misbehave")]
    tessera_policy::hostile::misbehave_from_env("core");
    let start = match start_child(Role::Core, fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tessera-core: {e}");
            return 1;
        }
    };
    let control = Arc::new(start.control);
    let cfg = match start.config {
        ChildConfig::Core(cfg) => cfg,
        other => {
            let kind = match other {
                ChildConfig::Chardev(_) => "a chardev",
                ChildConfig::Core(_) => "a core",
            };
            return report_fatal(&control, &format!("tessera-core was given {kind} configuration"));
        }
    };
    if cfg.log.items.iter().any(|i| i == "sandbox") {
        eprintln!("{report}");
    }
    let mut fds = start.fds;
    if let Some(index) = cfg.kvm {
        match fds.take(index) {
            Ok(kvm) => tessera_core::kvm::provide_device(kvm),
            Err(e) => return report_fatal(&control, &format!("tessera-core: the /dev/kvm descriptor: {e}")),
        }
    }
    match Vm::new(cfg, fds, control.clone()) {
        Ok(vm) => vm.run(),
        Err(e) => report_fatal(&control, &e.to_string()),
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
    if msg.starts_with("tessera-core: ") {
        msg
    } else {
        format!("tessera-core: sandbox: {msg}")
    }
}

fn usage(problem: &str) -> i32 {
    eprintln!("tessera-core: {problem}\nusage: tessera-core --ipc-fd N (started by the tessera launcher)");
    1
}
