//! The Tessera launcher: a `qemu-system-x86_64` command line becomes a supervised graph of processes.
//!
//! * [`opts`]: QEMU's option grammar (argv, QemuOpts `key=val` lists, sizes, booleans);
//!   [`options`]: the option table.
//! * [`config`]: what the options mean, checked as QEMU checks them, into a [`config::VmConfig`].
//! * [`plan`]: the process graph and the host resources each child gets, as data.
//! * [`resources`]: opening those resources; [`spawn`]: starting a child on the control-channel contract
//!   (docs/ARCHITECTURE.md); [`supervise`]: watching the graph and ending it; [`host`]: pid file, daemon,
//!   terminal; [`restart`]: restarting backends that die; [`qmp`]: the QMP monitor.
//! * [`error`]: the one error type, with QEMU's wording.

pub mod config;
pub mod error;
pub mod host;
pub mod net;
pub mod options;
pub mod opts;
pub mod plan;
pub mod qmp;
pub mod resources;
pub mod restart;
pub mod spawn;
pub mod supervise;

use std::os::fd::BorrowedFd;

use config::{Command, VmConfig};
use error::{Error, Result};
use plan::{ChildPlan, Plan};
use supervise::{Child, End, Graph};
use tessera_ipc::messages::Role;

/// The QEMU release whose command line Tessera follows.
pub const QEMU_VERSION: &str = "8.2.0";

/// First line of `-version`: tools that parse QEMU's version read "8.2.0" from it.
pub fn version_line() -> String {
    format!("QEMU emulator version {QEMU_VERSION} (tessera {})", env!("CARGO_PKG_VERSION"))
}

pub fn version_text() -> String {
    format!(
        "{}\nTessera is not QEMU: it runs QEMU {QEMU_VERSION}'s command line as a graph of processes.",
        version_line()
    )
}

/// The program name messages are printed under: argv[0]'s basename, as QEMU's `error_get_progname`.
pub fn program_name(argv0: Option<&str>) -> String {
    argv0
        .and_then(|a| std::path::Path::new(a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tessera".into())
}

/// Write to stdout, ignoring failures: a closed pipe (`tessera -h | head -1`) must not panic the launcher.
pub fn out(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// Write a line to stderr, ignoring failures.
pub fn err_line(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn print_error(e: &Error, prog: &str) {
    let text = e.render(prog);
    if e.to_stdout() {
        out(&text);
    } else {
        err_line(&text);
    }
}

/// The launcher's `main`: returns the process exit status.
pub fn main_entry() -> i32 {
    let argv: Vec<String> = std::env::args_os().map(|a| a.to_string_lossy().into_owned()).collect();
    let prog = program_name(argv.first().map(String::as_str));
    let parsed = match config::parse(argv.get(1..).unwrap_or_default(), &prog) {
        Ok(p) => p,
        Err(e) => {
            print_error(&e, &prog);
            return 1;
        }
    };
    for w in &parsed.warnings {
        err_line(&format!("{prog}: {w}"));
    }
    let cfg = match parsed.command {
        Command::Print { text, code } => {
            out(&text);
            return code;
        }
        Command::Run(cfg) => cfg,
    };
    let plan = plan::build(&cfg);
    if cfg.dump_plan {
        out(&plan.dump());
        return 0;
    }
    match run(&cfg, plan, &prog) {
        Ok(code) => code,
        Err(e) => {
            print_error(&e, &prog);
            1
        }
    }
}

/// Start the graph `plan` describes and supervise it to the end; returns the exit status.
pub fn run(cfg: &VmConfig, mut plan: Plan, prog: &str) -> Result<i32> {
    // Everything that can be checked without side effects first: the children's executables.
    let dir = spawn::libexec_dir()?;
    let core_path = spawn::find_binary(&dir, plan::CORE_BINARY)?;
    let chardev_path =
        if plan.chardevs.is_empty() { None } else { Some(spawn::find_binary(&dir, plan::CHARDEV_BINARY)?) };
    // Each backend's executable (tessera-blk, tessera-net), in plan order.
    let backend_paths = plan.backends.iter().map(|b| spawn::find_binary(&dir, b.binary)).collect::<Result<Vec<_>>>()?;

    // QEMU starts its vCPUs from the human monitor when there is no QMP one; Tessera has only QMP.
    if cfg.start_paused && cfg.monitors.is_empty() {
        return Err(Error::NotSupportedYet(
            "-S without a QMP monitor (Tessera has no human monitor: add -qmp to start the vCPUs with 'cont')".into(),
        ));
    }
    // -runas needs root in the launcher; say so before anything starts (the children would each fail).
    cfg.sandbox.check_launcher().map_err(|e| Error::Sandbox(e.to_string()))?;
    for note in cfg.sandbox.notes() {
        err_line(&format!("{prog}: {note}"));
    }

    let daemon = if cfg.daemonize { Some(host::daemonize()?) } else { None };
    if let Some(name) = &cfg.process_name {
        if let Ok(c) = std::ffi::CString::new(name.as_bytes()) {
            let _ = nix::sys::prctl::set_name(&c);
        }
    }
    let sfd = supervise::signal_fd()?;
    let terminal = host::TerminalGuard::save();
    let _pidfile = cfg.pidfile.as_deref().map(host::PidFile::create).transpose()?;

    let accel = resources::select_accel(&plan.accels, "/dev/kvm", prog)?;
    if cfg.cpu_model == "host" && accel.kind != config::AccelKind::Kvm {
        return Err(Error::HostCpuNeedsKvm);
    }

    let mut graph = Graph::new(sfd);
    let opened = {
        let sfd = &mut graph.sfd;
        let mut interrupt = || -> Result<()> {
            match supervise::read_signals(sfd) {
                (Some(t), _) => Err(Error::Message(t.message())),
                _ => Ok(()),
            }
        };
        resources::open_all(&plan, prog, &mut interrupt)?
    };
    graph.qmp = {
        let sfd = &mut graph.sfd;
        let mut interrupt = || -> Result<()> {
            match supervise::read_signals(sfd) {
                (Some(t), _) => Err(Error::Message(t.message())),
                _ => Ok(()),
            }
        };
        qmp::server::Server::open(&cfg.monitors, prog, &mut interrupt)?
    };
    graph.backends = restart::Backends::new(cfg.restart_limit, cfg.sandbox.clone(), cfg.daemonize);
    graph.backends.external = cfg.vhost_user_blk.iter().map(|d| d.id.clone()).collect();
    // What restarting a backend needs is kept: its host descriptors, except the serial links (a restart gets
    // fresh ones, and the core must see the old one close when its chardev dies).
    for r in plan.chardevs.iter().flat_map(|c| c.fds.iter()).chain(plan.backends.iter().flat_map(|b| b.fds.iter())) {
        let link = matches!(plan.resources[*r], plan::Resource::SerialChardev(_) | plan::Resource::SerialCore(_));
        if !link && !graph.backends.kept.iter().any(|(k, _)| k == r) {
            let fd = opened.fd(*r).try_clone_to_owned().map_err(|e| Error::host("dup", error::os_error(e)))?;
            graph.backends.kept.push((*r, fd));
        }
    }
    for c in plan.chardevs.iter_mut().chain(std::iter::once(&mut plan.core)) {
        resources::finish_config(&mut c.config, &c.fds, &opened, &accel);
    }

    // Chardevs first, so that the first bytes the guest prints have somewhere to go; then the core.
    let start = |graph: &mut Graph, child: &ChildPlan, path: &std::path::Path| -> std::result::Result<(), End> {
        let started =
            spawn::start(path, child.binary, cfg.daemonize, &cfg.sandbox).map_err(|e| End::Failed(e.to_string()))?;
        let fds: Vec<BorrowedFd<'_>> = resources::child_fds(&child.fds, &opened, child.role == Role::Core, &accel);
        let result = spawn::configure(&started, child.role, &child.config, &fds);
        let pid = started.pid;
        graph.children.push(Child::new(child.role, child.label.clone(), pid, started.control));
        if let Err(e) = result {
            // Most likely the child failed at start and said why on stderr: report how it ended.
            return Err(End::Failed(match Graph::wait_briefly(pid) {
                Some(status) => {
                    if let Some(c) = graph.children.last_mut() {
                        c.exited = Some(status);
                    }
                    format!("{} (pid {pid}) died: {}", child.label, supervise::describe(status))
                }
                None => e.to_string(),
            }));
        }
        Ok(())
    };
    let mut outcome: Option<End> = None;
    // (`chardev_path` is known whenever the plan has chardevs.)
    for (c, path) in plan.chardevs.iter().zip(chardev_path.iter().cycle()) {
        if let Err(end) = start(&mut graph, c, path) {
            outcome = Some(end);
            break;
        }
        if let (Some(child), tessera_ipc::messages::ChildConfig::Chardev(cc)) = (graph.children.last_mut(), &c.config) {
            let links = c
                .fds
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(plan.resources[**r], plan::Resource::SerialChardev(_)))
                .map(|(pos, _)| pos)
                .collect();
            let kind = restart::Kind::Chardev { plan: Box::new(c.clone()), links };
            child.unit = Some(graph.backends.units.len());
            let unit = restart::Unit::new(cc.id.clone(), kind, path.clone(), child.pid);
            graph.backends.units.push(unit);
        }
    }
    // Block and network backends: they take flags, not a configuration message, and are ready once started (their
    // listening socket exists already; the core's connection waits in its backlog).
    if outcome.is_none() {
        for (b, path) in plan.backends.iter().zip(backend_paths.iter()) {
            let fds: Vec<BorrowedFd<'_>> = b.fds.iter().map(|&r| opened.fd(r)).collect();
            match spawn::start_plain(path, b.binary, &b.args, &fds, cfg.daemonize, &cfg.sandbox) {
                Ok(started) => {
                    let mut child = Child::new(b.role, b.label.clone(), started.pid, started.control);
                    child.ready = true;
                    // The plan's first descriptor of a vhost-user backend is its listening socket; its label
                    // names the device (`tessera-blk (drive0)`).
                    let id = b.label.rsplit_once(" (").and_then(|(_, r)| r.strip_suffix(')'));
                    if let (Some(&listener), Some(id)) = (b.fds.first(), id) {
                        child.unit = Some(graph.backends.units.len());
                        let kind = restart::Kind::VhostUser { plan: b.clone(), listener };
                        let unit = restart::Unit::new(id.to_string(), kind, path.clone(), started.pid);
                        graph.backends.units.push(unit);
                    }
                    graph.children.push(child);
                }
                Err(e) => {
                    outcome = Some(End::Failed(e.to_string()));
                    break;
                }
            }
        }
    }
    if outcome.is_none() {
        outcome = graph.run(true);
    }
    if outcome.is_none() {
        if let Err(end) = start(&mut graph, &plan.core, &core_path) {
            outcome = Some(end);
        }
    }
    if outcome.is_none() {
        outcome = graph.run(true);
    }
    // The descriptors now live in the children.
    drop(opened);
    drop(accel);
    if outcome.is_none() {
        if let Some(d) = daemon {
            d.ready();
        }
        if !graph.qmp.is_empty() {
            // The core's run-state events are for the monitors (tag 0 is never a client's command).
            if let Err(why) =
                qmp::server::Link::to_core(&mut graph, 0, tessera_ipc::messages::MonitorCommand::EnableEvents)
            {
                err_line(&format!("{prog}: the monitors will miss the core's events: {why}"));
            }
        }
        graph.running = true;
        outcome = graph.run(false);
    }
    let end = outcome.unwrap_or(End::Exit(0));
    if let End::Signal(_) = end {
        let (name, data) = supervise::signal_event();
        graph.qmp.event(&name, data);
    }
    graph.shutdown();
    graph.qmp.close();
    // The terminal is back to normal before the last words (the chardev may have left it raw if it died).
    drop(terminal);
    if let Some(msg) = supervise::end_message(&end) {
        err_line(&format!("{prog}: {msg}"));
    }
    Ok(end.status())
}
