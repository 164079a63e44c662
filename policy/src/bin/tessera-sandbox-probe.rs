//! Test helper: confines itself with a process kind's profile, then performs one operation a test names and
//! reports what happened, so tests can prove the sandbox from outside (tests/sandbox_*.rs).
//!
//! Usage: `tessera-sandbox-probe KIND OP` with the options in `TESSERA_SANDBOX` (as the launcher sets them).
//! Protocol on stdin/stdout: the probe prints `ready PID` once confined and waits for a line on stdin, so the
//! test can inspect /proc/PID meanwhile; then it performs OP and prints `result OP ok` or
//! `result OP errno NAME`. A filter that kills the process shows as death by SIGSYS instead.
//! OP prefixed with `thread:` runs in a thread started before the seccomp filter was installed (TSYNC).
//! Exit status: 0 after a result, 2 on bad usage, 3 when the sandbox could not be entered (message on stderr).

use std::io::{BufRead, Write};

use tessera_policy::hostile::{attempt as op, errno_name};
use tessera_policy::{prepare, ProcessKind, SandboxOptions, SANDBOX_ENV};

extern "C" fn on_sigterm(_: libc::c_int) {
    let msg = b"signal SIGTERM\n";
    // SAFETY: writes a static buffer to stdout, then leaves without running anything else.
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        libc::_exit(0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(op_name)) = (args.get(1).and_then(|k| ProcessKind::from_name(k)), args.get(2)) else {
        eprintln!("usage: tessera-sandbox-probe core|chardev|blk|net OP (options in {SANDBOX_ENV})");
        std::process::exit(2);
    };
    let options = match std::env::var(SANDBOX_ENV) {
        Ok(v) => match SandboxOptions::from_env_value(&v) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("tessera-sandbox-probe: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => SandboxOptions::default(),
    };
    let fail = |e: tessera_policy::PolicyError| -> ! {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        eprintln!("tessera-sandbox-probe: {msg}");
        std::process::exit(3);
    };
    // PROBE_PDEATHSIG=term: arm SIGTERM as parent-death signal first, as tessera-chardev does, with a handler
    // that says so; the sandbox must keep that choice (also across -runas).
    if std::env::var_os("PROBE_PDEATHSIG").is_some_and(|v| v == "term") {
        // SAFETY: the handler only calls write(2) and _exit(2), both async-signal-safe.
        unsafe {
            libc::signal(libc::SIGTERM, on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
        }
    }
    let prepared = prepare(kind, &options, &[]).unwrap_or_else(|e| fail(e));

    // For thread:OP, a thread that exists before the filter is installed, to show TSYNC covers it.
    let (in_thread, op_name) = match op_name.strip_prefix("thread:") {
        Some(rest) => (true, rest.to_string()),
        None => (false, op_name.clone()),
    };
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = if in_thread {
        let name = op_name.clone();
        match std::thread::Builder::new().name("probe-early".to_string()).spawn(move || {
            let _ = go_rx.recv();
            op(&name)
        }) {
            Ok(handle) => Some(handle),
            Err(e) => {
                // A profile with an RLIMIT_NPROC too low for a second task refuses it here already.
                println!("result thread:{op_name} errno {}", errno_name(e.raw_os_error().unwrap_or(0)));
                return;
            }
        }
    } else {
        None
    };

    let report = prepared.lock().unwrap_or_else(|e| fail(e));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "report {report}");
    for w in &report.warnings {
        let _ = writeln!(out, "warning {w}");
    }
    // SAFETY: getpid has no arguments and cannot fail.
    let _ = writeln!(out, "ready {}", unsafe { libc::getpid() });
    let _ = out.flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);

    let result = match worker {
        Some(w) => {
            let _ = go_tx.send(());
            w.join().unwrap_or_else(|_| Err("thread panicked".to_string()))
        }
        None => op(&op_name),
    };
    let _ = match result {
        Ok(()) => writeln!(out, "result {op_name} ok"),
        Err(e) => writeln!(out, "result {op_name} errno {e}"),
    };
    let _ = out.flush();
}
