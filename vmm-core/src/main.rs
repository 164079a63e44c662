//! `tessera-core --ipc-fd N`: started by the launcher, never by hand. Receives its configuration over the
//! control channel, builds the VM, runs it, and reports how it ended.

use std::sync::Arc;

use tessera_core::vm::{report_fatal, Vm};
use tessera_ipc::child::start_child;
use tessera_ipc::messages::{ChildConfig, Role};

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
    match Vm::new(cfg, start.fds, control.clone()) {
        Ok(vm) => vm.run(),
        Err(e) => report_fatal(&control, &e.to_string()),
    }
}

fn usage(problem: &str) -> i32 {
    eprintln!("tessera-core: {problem}\nusage: tessera-core --ipc-fd N (started by the tessera launcher)");
    1
}
