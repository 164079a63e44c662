//! Supervision restarts (issue #8): a backend that dies while the guest runs is started again and the core
//! reconnected to it; one that keeps dying is reported failed past `-tessera-restart-limit`; with the limit at
//! 0 a backend's death ends the VM, as before restarts existed. The graph is the real one (launcher,
//! tessera-core, tessera-chardev) with a tiny guest on the software CPU; a backend that "keeps dying" is the
//! real tessera-chardev behind a wrapper script that exits at start once the test says so.
//!
//! The launcher's side of reconnecting is tested on its own with a fake core (this test executable re-run as
//! `fake_core`) that answers what the real core will: it prints through each new serial channel it is given and
//! speaks vhost-user (GET_FEATURES) to each new tessera-blk connection, then reports the device reconnected.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tessera_ipc::child::start_child_default;
use tessera_ipc::messages::{
    ChardevBackend, ChardevToCore, ChildConfig, ChildToLauncher, CoreToChardev, LauncherToChild, MonitorCommand,
    MonitorValue, Role, VhostUserSocket,
};
use tessera_ipc::{Channel, ReceivedFds};
use tessera_tests::bins;
use tessera_tests::qmp::{counting_guest, ticking_guest, Qmp, STEP};

/// A launcher whose children come from `libexec`; killed if the test fails, with its stderr and the guest's
/// output printed.
struct Vm {
    child: Option<Child>,
    serial: PathBuf,
}

impl Vm {
    fn start(libexec: &Path, kernel: &Path, serial: &Path, extra: &[&str]) -> Vm {
        let child = Command::new(bins::launcher("qemu-system-x86_64"))
            .env("TESSERA_LIBEXEC_DIR", libexec)
            .args(["-accel", "tcg", "-display", "none", "-m", "64M", "-kernel"])
            .arg(kernel)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Vm { child: Some(child), serial: serial.to_path_buf() }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Restarts begin once the graph is up: wait until the guest printed.
    fn wait_booted(&self) {
        let deadline = Instant::now() + STEP;
        while self.serial().is_empty() {
            assert!(Instant::now() < deadline, "the guest printed nothing");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(mut self) -> (i32, String) {
        let out = bins::wait_output(self.child.take().unwrap(), STEP);
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(out) = c.wait_with_output() {
                eprintln!("launcher stderr:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            let s = self.serial();
            eprintln!("guest serial output (last 400 bytes):\n{}", &s[s.len().saturating_sub(400)..]);
        }
    }
}

/// A libexec directory with the real tessera-core and a tessera-chardev that runs the real one, unless
/// `die_flag` exists: then it exits with status 7 at start.
fn libexec_with_fragile_chardev(dir: &Path, die_flag: &Path) -> PathBuf {
    let core = bins::binary("tessera-core", "tessera-core");
    let chardev = bins::binary("tessera-chardev", "tessera-chardev");
    let libexec = dir.join("libexec");
    std::fs::create_dir(&libexec).unwrap();
    std::os::unix::fs::symlink(core, libexec.join("tessera-core")).unwrap();
    let script = format!(
        "#!/bin/sh\nif [ -e '{}' ]; then echo 'fragile chardev: dying at start' >&2; exit 7; fi\nexec '{}' \"$@\"\n",
        die_flag.display(),
        chardev.display()
    );
    let path = libexec.join("tessera-chardev");
    std::fs::write(&path, script).unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&path, perm).unwrap();
    libexec
}

/// The pid of backend `id` (x-tessera-query-backends).
fn backend(q: &mut Qmp, id: &str) -> Value {
    let r = q.cmd(r#"{"execute": "x-tessera-query-backends"}"#);
    r["return"].as_array().unwrap().iter().find(|b| b["id"] == id).cloned().unwrap_or_else(|| panic!("no {id}: {r}"))
}

fn backend_pid(q: &mut Qmp, id: &str) -> Pid {
    let b = backend(q, id);
    Pid::from_raw(b["pid"].as_i64().unwrap_or_else(|| panic!("{id} has no process: {b}")) as i32)
}

#[test]
fn a_backend_that_keeps_dying_is_reported_failed_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let die = dir.path().join("die");
    let libexec = libexec_with_fragile_chardev(dir.path(), &die);
    let kernel = ticking_guest(dir.path(), 3_000_000);
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start(
        &libexec,
        &kernel,
        &dir.path().join("serial.txt"),
        &["-qmp", &format!("unix:{sock},server=on,wait=off"), "-tessera-restart-limit", "3"],
    );
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    vm.wait_booted();
    let pid = backend_pid(&mut q, "serial0");
    std::fs::write(&die, "").unwrap();
    kill(pid, Signal::SIGKILL).unwrap();

    let e = q.event("X_TESSERA_BACKEND_DISCONNECTED");
    assert_eq!(e["data"]["id"], "serial0", "{e}");
    assert!(e["data"]["reason"].as_str().unwrap().contains("killed by signal 9"), "{e}");
    // Three restarts (0, 50 and 100 ms after each death), each dying at start: then the device is failed.
    let started = Instant::now();
    let f = q.event("X_TESSERA_BACKEND_FAILED");
    assert!(started.elapsed() < Duration::from_secs(10), "the restarts took {:?}", started.elapsed());
    assert_eq!(f["data"]["id"], "serial0", "{f}");
    assert_eq!(f["data"]["restarts"], 3, "{f}");
    assert!(f["data"]["reason"].as_str().unwrap().contains("exited with status 7"), "{f}");
    assert_eq!(backend(&mut q, "serial0")["state"], "failed");
    assert!(q.events.iter().all(|e| e["event"] != "X_TESSERA_BACKEND_RECONNECTED"), "{:?}", q.events);

    // The VM goes on without the device; a restart the operator asks for is refused with the reason.
    assert_eq!(q.cmd(r#"{"execute": "query-status"}"#)["return"]["running"], true);
    let r = q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "serial0"}}"#);
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(r["error"]["desc"].as_str().unwrap().contains("exited with status 7"), "{r}");

    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("serial0: giving up after 3 restarts in a row (-tessera-restart-limit 3)"), "{stderr}");
    assert!(stderr.contains(&format!("serial0: tessera-chardev (pid {pid}) died: killed by signal 9")), "{stderr}");
}

#[test]
fn with_restart_limit_0_a_backend_death_ends_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let libexec = libexec_with_fragile_chardev(dir.path(), &dir.path().join("never"));
    let kernel = ticking_guest(dir.path(), 3_000_000);
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start(
        &libexec,
        &kernel,
        &dir.path().join("serial.txt"),
        &["-qmp", &format!("unix:{sock},server=on,wait=off"), "-tessera-restart-limit", "0"],
    );
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    vm.wait_booted();
    let pid = backend_pid(&mut q, "serial0");
    kill(pid, Signal::SIGKILL).unwrap();
    let (status, stderr) = vm.wait();
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains(&format!("tessera-chardev (pid {pid}) died: killed by signal 9")), "{stderr}");
}

/// How many lines a chardev can have written without acknowledging them yet: one host write's worth (the core
/// sends at most every 2 ms; this guest prints far less than 64 lines in that time).
const MAX_REPLAYED_LINES: u32 = 64;

/// Check the output of [`counting_guest`] across chardev restarts. Serial output is delivered at least once
/// (docs/ARCHITECTURE.md, "serial channel"): the core sends again what the killed chardev had not acknowledged,
/// and the chardev may have written some of that already. So at a restart the lines may go back a little (a
/// replay), and the line where the replay starts may be cut and joined to the replayed bytes (a seam). Nothing
/// may be missing: after a seam the count resumes at or before where it was, never after. Returns the lines
/// counted and the number of seams. `finished`: the guest printed its last; a seam must then be followed by its
/// replay (while it runs, the replay may still be on its way).
fn check_count_at_least_once(text: &str, finished: bool) -> Result<(usize, usize), String> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut next = 0u32;
    let mut seams = 0;
    let mut after_seam = false;
    for (i, line) in lines.iter().enumerate() {
        if i + 1 == lines.len() {
            // The line being printed when the output was read.
            break;
        }
        let value = (line.len() == 8).then(|| u32::from_str_radix(line, 16).ok()).flatten();
        match value {
            Some(v) if v == next => {
                next += 1;
                after_seam = false;
            }
            // The first line after a seam, or a replay starting on a line boundary.
            Some(v) if v < next && next - v <= MAX_REPLAYED_LINES => {
                if !after_seam {
                    seams += 1;
                }
                next = v + 1;
                after_seam = false;
            }
            _ if !after_seam => {
                // A line cut by the crash and joined to the replayed bytes: the next one must not skip ahead.
                seams += 1;
                after_seam = true;
            }
            _ => return Err(format!("line {i}: {line:?} where {next:08x} was expected (lost output)")),
        }
    }
    if finished && after_seam {
        return Err(format!("the last line is not {next:08x} (lost output)"));
    }
    Ok((next as usize, seams))
}

// ---------------------------------------------------------------------------------------------------------------
// acknowledged output: tessera-chardev's side, with the test playing the core

/// Wait for `Written` acknowledgements until one says `total`; each must not run ahead of what `written()`
/// shows has reached the host side, and the counts never go back. Returns how many acknowledgements came.
fn acknowledgements(core: &tessera_tests::chardev::CoreEnd, total: u64, written: impl Fn() -> u64) -> usize {
    let deadline = Instant::now() + tessera_tests::chardev::PATIENCE;
    let (mut last, mut count) = (0, 0);
    while last < total {
        match core.recv(deadline) {
            ChardevToCore::Written(n) => {
                assert!(n > last && n <= total, "acknowledged {n} after {last}, of {total} sent");
                assert!(written() >= n, "acknowledged {n} bytes before the host side had them");
                last = n;
                count += 1;
            }
            other => panic!("expected an acknowledgement, got {other:?}"),
        }
    }
    count
}

#[test]
fn tessera_chardev_acknowledges_output_once_written_and_only_when_asked() {
    use tessera_tests::chardev::{config, pattern, serial_channel, Fds, Running};
    let file = tempfile::tempfile().unwrap();
    let mut fds = Fds::default();
    let (core, fe) = serial_channel(&mut fds);
    let (quiet, fe2) = serial_channel(&mut fds);
    let output = fds.add(file.try_clone().unwrap());
    let mut cfg = config("file0", ChardevBackend::File { output, input: None }, vec![fe, fe2]);
    cfg.mux = true;
    let running = Running::start(cfg, fds);
    let len = || file.metadata().unwrap().len();

    // The second front end never asks: it gets no acknowledgements.
    quiet.output(b"unasked ");
    let deadline = Instant::now() + tessera_tests::chardev::PATIENCE;
    while len() < 8 {
        assert!(Instant::now() < deadline, "the first output never reached the file");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The empty Output asks; then 2 MiB in chunks of many sizes, acknowledged in batches.
    core.output(b"");
    let mut total = 0;
    for i in 0..200u32 {
        let c = pattern([1, 100, 4096, 30_000][i as usize % 4], i);
        total += c.len() as u64;
        core.output(&c);
    }
    let unasked = 8;
    let acks = acknowledgements(&core, total, || len().saturating_sub(unasked));
    eprintln!("{total} bytes acknowledged in {acks} messages");
    assert!(acks < 200, "{acks} acknowledgements for 200 writes: not batched");
    assert!(quiet.quiet_for(Duration::from_millis(300)), "a front end that did not ask got acknowledgements");
    running.shutdown();
    let (status, err) = running.wait();
    assert!(status.success(), "{err}");
}

#[test]
fn tessera_chardev_acknowledges_output_it_drops_by_policy() {
    use tessera_tests::chardev::{config, serial_channel, Fds, Running};
    // `null` takes nothing, and a socket server without a client drops output as QEMU does: both count as
    // written, or the core would keep them to send again forever.
    let dir = tempfile::tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
    for server in [false, true] {
        let mut fds = Fds::default();
        let (core, fe) = serial_channel(&mut fds);
        let backend = if server {
            let l = fds.add(listener.try_clone().unwrap());
            ChardevBackend::SocketServer { listener: l, connected: None, telnet: false }
        } else {
            ChardevBackend::Null
        };
        let running = Running::start(config("c0", backend, vec![fe]), fds);
        core.output(b"");
        core.output(b"nobody hears this");
        core.output(b"nor this");
        acknowledgements(&core, 25, || u64::MAX);
        running.shutdown();
        let (status, err) = running.wait();
        assert!(status.success(), "{err}");
    }
}

#[test]
fn the_at_least_once_check_allows_replays_and_finds_loss() {
    let text = |lines: &[&str]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    assert_eq!(check_count_at_least_once(&text(&["00000000", "00000001", "00000002"]), true), Ok((3, 0)));
    // A replay on a line boundary, and one through a cut line ("0000000" + "2").
    let replayed = text(&["00000000", "00000001", "00000002", "00000001", "00000002", "00000003"]);
    assert_eq!(check_count_at_least_once(&replayed, true), Ok((4, 1)));
    let cut = text(&["00000000", "00000001", "0000000000000001", "00000002", "00000003"]);
    assert_eq!(check_count_at_least_once(&cut, true), Ok((4, 1)));
    let cut_looking_valid = text(&["00000000", "00000001", "0000000f", "00000001", "00000002"]);
    assert_eq!(check_count_at_least_once(&cut_looking_valid, true), Ok((3, 1)));
    // Lost lines: a skip ahead, with or without a seam before it.
    assert!(check_count_at_least_once(&text(&["00000000", "00000002"]), true).is_err());
    assert!(check_count_at_least_once(&text(&["00000000", "0000", "00000002"]), true).is_err());
}

/// A killed chardev loses what it had received but not written (its socket buffer, its queue): the core keeps
/// what the chardev has not acknowledged writing and sends it again to the restarted one, so nothing is lost; a
/// line the dead one wrote but had not acknowledged yet may come twice (at least once, by design).
#[test]
fn a_killed_chardev_is_restarted_and_no_guest_output_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let libexec = libexec_with_fragile_chardev(dir.path(), &dir.path().join("never"));
    let kernel = counting_guest(dir.path(), 200_000);
    let serial = dir.path().join("serial.txt");
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start(&libexec, &kernel, &serial, &["-qmp", &format!("unix:{sock},server=on,wait=off")]);
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    let wait_lines = |vm: &Vm, n: usize| {
        let deadline = Instant::now() + STEP;
        loop {
            let (got, _) = check_count_at_least_once(&vm.serial(), false).unwrap_or_else(|e| panic!("{e}"));
            if got >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "the guest printed {got} lines, waiting for {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut lines = wait_lines(&vm, 20);
    for round in 0..5 {
        let pid = backend_pid(&mut q, "serial0");
        kill(pid, Signal::SIGKILL).unwrap();
        let d = q.event("X_TESSERA_BACKEND_DISCONNECTED");
        assert_eq!(d["data"]["id"], "serial0", "{d}");
        let r = q.event("X_TESSERA_BACKEND_RECONNECTED");
        eprintln!("round {round}: stall {} ms", r["data"]["stall-ms"]);
        assert_ne!(backend_pid(&mut q, "serial0"), pid, "a new process serves serial0");
        lines = wait_lines(&vm, lines + 20);
    }
    // A restart the operator asks for: the new process is a fresh exec of the binary.
    let old = backend_pid(&mut q, "serial0");
    let r = q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "serial0"}}"#);
    assert_eq!(r, json!({"return": {}}));
    assert_ne!(backend_pid(&mut q, "serial0"), old);
    lines = wait_lines(&vm, lines + 20);
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
    // After the end, every line the guest printed is in the file, in order; a few lines may come twice, at the
    // restarts only (six of them: five kills and the operator's restart).
    let (total, seams) =
        check_count_at_least_once(&std::fs::read_to_string(&serial).unwrap(), true).unwrap_or_else(|e| panic!("{e}"));
    assert!(total >= lines, "{total} < {lines}");
    eprintln!("{total} lines, {seams} replays of lines the killed chardev had written but not acknowledged");
    assert!(seams <= 6, "{seams} replays for 6 restarts");
}

// ---------------------------------------------------------------------------------------------------------------
// the launcher's side of reconnecting, with a fake core

/// Not a test: the body of the fake core (see the module comment). It logs what it got to
/// `$TESSERA_FAKE_DIR/core.log`.
#[test]
#[ignore = "run by the launcher as a fake tessera-core, not a test by itself"]
fn fake_core() {
    let Ok(dir) = std::env::var("TESSERA_FAKE_DIR") else { return };
    let log_path = PathBuf::from(dir).join("core.log");
    let log = |line: String| {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        writeln!(f, "{line}").unwrap();
    };
    let mut start = start_child_default(Role::Core).expect("handshake and configuration");
    let ChildConfig::Core(core) = start.config.clone() else { panic!("not a core's configuration") };
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    for s in &core.serial {
        let ch = Channel::from_fd(start.fds.take(s.channel).unwrap());
        ch.send(&CoreToChardev::Output(b"first\n".to_vec()), &[]).unwrap();
        keep.push(Box::new(ch));
    }
    for d in &core.vhost_user_blk {
        if let VhostUserSocket::Connected(i) = d.socket {
            keep.push(Box::new(start.fds.take(i).unwrap()));
        }
    }
    start.control.send(&ChildToLauncher::Ready, &[]).unwrap();
    loop {
        match start.control.recv::<LauncherToChild>() {
            Ok((LauncherToChild::SerialReconnect { chardev_id, channel }, fds)) => {
                let ch = Channel::from_fd(ReceivedFds::new(fds).take(channel).unwrap());
                ch.send(&CoreToChardev::Output(format!("reconnected {chardev_id}\n").into_bytes()), &[]).unwrap();
                log(format!("serial-reconnect {chardev_id}"));
                keep.push(Box::new(ch));
            }
            Ok((LauncherToChild::VhostUserReconnect { id, socket }, fds)) => {
                eprintln!("fake core: reconnect {id}");
                let VhostUserSocket::Connected(i) = socket else { panic!("a path: {socket:?}") };
                let mut s = UnixStream::from(ReceivedFds::new(fds).take(i).unwrap());
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                // VHOST_USER_GET_FEATURES (request 1), version 1 flags, no payload; the reply carries a u64.
                let mut reply = [0u8; 20];
                let asked = s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).and_then(|()| s.read_exact(&mut reply));
                if let Err(e) = asked {
                    // A backend that died at start: the real core waits for the next reconnect too.
                    log(format!("vhost-user-reconnect {id} failed: {e}"));
                    continue;
                }
                let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
                eprintln!("fake core: {id}: backend features {features:#x}");
                log(format!("vhost-user-reconnect {id} features {features:#x}"));
                start.control.send(&ChildToLauncher::BackendReconnected { id, stall_ms: 1 }, &[]).unwrap();
                keep.push(Box::new(s));
            }
            // EnableEvents (the launcher has a monitor): this fake sends none.
            Ok((LauncherToChild::Monitor { tag, command: MonitorCommand::EnableEvents }, _)) => {
                let result = Ok(MonitorValue::Empty);
                start.control.send(&ChildToLauncher::MonitorReply { tag, result }, &[]).unwrap();
            }
            Ok((LauncherToChild::Shutdown, _)) | Err(_) => std::process::exit(0),
            Ok((other, _)) => log(format!("unexpected {other:?}")),
        }
    }
}

/// A libexec directory with the fake core, the real tessera-chardev and the real tessera-blk; that one behind a
/// wrapper that exits with status 9 at start while `dir/blk-dies` exists.
fn libexec_with_fake_core(dir: &Path) -> PathBuf {
    let libexec = dir.join("libexec");
    std::fs::create_dir(&libexec).unwrap();
    std::os::unix::fs::symlink(bins::binary("tessera-chardev", "tessera-chardev"), libexec.join("tessera-chardev"))
        .unwrap();
    let blk = libexec.join("tessera-blk");
    let script = format!(
        "#!/bin/sh\nif [ -e '{}' ]; then echo 'fragile tessera-blk: dying at start' >&2; exit 9; fi\nexec '{}' \"$@\"\n",
        dir.join("blk-dies").display(),
        bins::binary("tessera-blk", "tessera-blk").display()
    );
    std::fs::write(&blk, script).unwrap();
    let mut perm = std::fs::metadata(&blk).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&blk, perm).unwrap();
    let path = libexec.join("tessera-core");
    let script = format!(
        "#!/bin/sh\nTESSERA_FAKE_DIR='{}' exec '{}' fake_core --exact --ignored --nocapture --quiet\n",
        dir.display(),
        std::env::current_exe().unwrap().display()
    );
    std::fs::write(&path, script).unwrap();
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&path, perm).unwrap();
    libexec
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + STEP;
    while !f() {
        assert!(Instant::now() < deadline, "waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn core_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("core.log")).unwrap_or_default()
}

#[test]
fn a_killed_chardev_is_restarted_on_a_new_serial_channel() {
    let dir = tempfile::tempdir().unwrap();
    let libexec = libexec_with_fake_core(dir.path());
    let sock = dir.path().join("qmp.sock").display().to_string();
    let serial = dir.path().join("serial.txt");
    let vm =
        Vm::start(&libexec, Path::new("/dev/null"), &serial, &["-qmp", &format!("unix:{sock},server=on,wait=off")]);
    wait_for("the core's first words", || vm.serial() == "first\n");
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    let pid = backend_pid(&mut q, "serial0");
    kill(pid, Signal::SIGKILL).unwrap();
    let d = q.event("X_TESSERA_BACKEND_DISCONNECTED");
    assert_eq!(d["data"]["id"], "serial0");
    let r = q.event("X_TESSERA_BACKEND_RECONNECTED");
    assert!(r["data"]["stall-ms"].is_u64(), "{r}");
    // The core got a new channel, and what it sends through it reaches the same output file.
    wait_for("the restarted chardev's output", || vm.serial() == "first\nreconnected serial0\n");
    let new_pid = backend_pid(&mut q, "serial0");
    assert_ne!(new_pid, pid);
    assert_eq!(backend(&mut q, "serial0")["restarts"], 1);

    // An operator's restart: the old process is stopped in order, a new one serves.
    assert_eq!(
        q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "serial0"}}"#),
        json!({"return": {}})
    );
    assert_ne!(backend_pid(&mut q, "serial0"), new_pid);
    let d = q.event("X_TESSERA_BACKEND_DISCONNECTED");
    assert_eq!(d["data"], json!({"id": "serial0", "reason": "x-tessera-backend-restart"}));
    q.event("X_TESSERA_BACKEND_RECONNECTED");
    wait_for("the second restart's output", || vm.serial().matches("reconnected serial0").count() == 2);
    assert!(kill(new_pid, None).is_err(), "the old chardev is gone");
    assert!(!core_log(dir.path()).contains("unexpected"), "{}", core_log(dir.path()));
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("serial0: restarted tessera-chardev"), "{stderr}");
}

#[test]
fn a_killed_tessera_blk_is_restarted_and_a_device_can_be_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let libexec = libexec_with_fake_core(dir.path());
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("qmp.sock").display().to_string();
    let serial = dir.path().join("serial.txt");
    let vm = Vm::start(
        &libexec,
        Path::new("/dev/null"),
        &serial,
        &[
            "-qmp",
            &format!("unix:{sock},server=on,wait=off"),
            "-drive",
            &format!("file={},if=virtio,format=raw,id=drive0", image.display()),
        ],
    );
    wait_for("the core's first words", || vm.serial() == "first\n");
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    let pid = backend_pid(&mut q, "drive0");
    kill(pid, Signal::SIGKILL).unwrap();
    assert_eq!(q.event("X_TESSERA_BACKEND_DISCONNECTED")["data"]["id"], "drive0");
    let r = q.event("X_TESSERA_BACKEND_RECONNECTED");
    assert_eq!(r["data"], json!({"id": "drive0", "stall-ms": 1}), "the core's stall is reported");
    // The new tessera-blk answered the core's GET_FEATURES on the new connection.
    let log = core_log(dir.path());
    assert!(log.contains("vhost-user-reconnect drive0 features 0x"), "{log}");
    let first_restart = backend_pid(&mut q, "drive0");
    assert_ne!(first_restart, pid);

    // An operator's restart: SIGTERM (tessera-blk flushes the image), a new process, a new connection.
    let r = q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "drive0"}}"#);
    assert_eq!(r, json!({"return": {}}));
    assert!(kill(first_restart, None).is_err(), "the old tessera-blk is gone");
    let restarted = backend_pid(&mut q, "drive0");
    assert_ne!(restarted, first_restart);
    q.event("X_TESSERA_BACKEND_RECONNECTED");

    // Swap to a tessera-blk the test runs: the core is pointed at it, the launcher's backend is stopped.
    let other_sock = dir.path().join("other.sock");
    struct Reaped(Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _other = Reaped(
        Command::new(bins::binary("tessera-blk", "tessera-blk"))
            .arg("--socket-path")
            .arg(&other_sock)
            .arg("--image")
            .arg(&image)
            .args(["--format", "raw", "--no-locking"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the other backend's socket", || other_sock.exists());
    let r = q.cmd(&format!(
        r#"{{"execute": "x-tessera-backend-swap", "arguments": {{"id": "drive0", "socket": "{}"}}}}"#,
        other_sock.display()
    ));
    assert_eq!(r, json!({"return": {}}));
    q.event("X_TESSERA_BACKEND_RECONNECTED");
    wait_for("the launcher's tessera-blk to stop", || kill(restarted, None).is_err());
    assert_eq!(backend(&mut q, "drive0")["state"], "swapped");
    assert_eq!(core_log(dir.path()).matches("vhost-user-reconnect drive0 features").count(), 3);
    let r =
        q.cmd(r#"{"execute": "x-tessera-backend-swap", "arguments": {"id": "drive0", "socket": "/nonexistent.sock"}}"#);
    assert!(r["error"]["desc"].as_str().unwrap().starts_with("Failed to connect to '/nonexistent.sock'"), "{r}");
    let r = q.cmd(r#"{"execute": "x-tessera-backend-swap", "arguments": {"id": "serial0", "socket": "/x"}}"#);
    assert!(r["error"]["desc"].as_str().unwrap().contains("not a vhost-user device"), "{r}");
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}

#[test]
fn a_tessera_blk_that_keeps_dying_is_reported_failed() {
    let dir = tempfile::tempdir().unwrap();
    let libexec = libexec_with_fake_core(dir.path());
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("qmp.sock").display().to_string();
    let vm = Vm::start(
        &libexec,
        Path::new("/dev/null"),
        &dir.path().join("serial.txt"),
        &[
            "-qmp",
            &format!("unix:{sock},server=on,wait=off"),
            "-drive",
            &format!("file={},if=virtio,format=raw,id=drive0", image.display()),
            "-tessera-restart-limit",
            "4",
        ],
    );
    wait_for("the core's first words", || vm.serial() == "first\n");
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    let pid = backend_pid(&mut q, "drive0");
    std::fs::write(dir.path().join("blk-dies"), "").unwrap();
    kill(pid, Signal::SIGKILL).unwrap();
    q.event("X_TESSERA_BACKEND_DISCONNECTED");
    // Backing off: 0, 50, 100, 200 ms between the four restarts.
    let started = Instant::now();
    let f = q.event("X_TESSERA_BACKEND_FAILED");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(10), "{took:?}");
    assert_eq!(f["data"]["id"], "drive0");
    assert_eq!(f["data"]["restarts"], 4);
    assert!(f["data"]["reason"].as_str().unwrap().contains("exited with status 9"), "{f}");
    assert_eq!(backend(&mut q, "drive0")["state"], "failed");
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(stderr.matches("fragile tessera-blk: dying at start").count(), 4, "{stderr}");
}

/// The whole path with the real core: a tessera-blk killed three times (and once restarted by the operator) is
/// restarted, the core restores the device each time and reports its stall (9-40 ms on the development host).
#[test]
fn a_killed_tessera_blk_is_restarted_and_the_real_core_restores_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let kernel = ticking_guest(dir.path(), 3_000_000);
    let sock = dir.path().join("qmp.sock").display().to_string();
    let libexec = bins::profile_dir();
    bins::binary("tessera-core", "tessera-core");
    bins::binary("tessera-chardev", "tessera-chardev");
    bins::binary("tessera-blk", "tessera-blk");
    let vm = Vm::start(
        &libexec,
        &kernel,
        &dir.path().join("serial.txt"),
        &[
            "-object",
            "memory-backend-memfd,id=mem,size=64M,share=on",
            "-machine",
            "memory-backend=mem",
            "-qmp",
            &format!("unix:{sock},server=on,wait=off"),
            "-drive",
            &format!("file={},if=virtio,format=raw,id=drive0", image.display()),
        ],
    );
    vm.wait_booted();
    let (mut q, _) = Qmp::unix(&sock);
    q.negotiate();
    for round in 0..4 {
        let pid = backend_pid(&mut q, "drive0");
        if round == 3 {
            let r = q.cmd(r#"{"execute": "x-tessera-backend-restart", "arguments": {"id": "drive0"}}"#);
            assert_eq!(r, json!({"return": {}}));
        } else {
            kill(pid, Signal::SIGKILL).unwrap();
        }
        assert_eq!(q.event("X_TESSERA_BACKEND_DISCONNECTED")["data"]["id"], "drive0");
        let r = q.event("X_TESSERA_BACKEND_RECONNECTED");
        eprintln!("round {round}: stall {} ms", r["data"]["stall-ms"]);
        assert!(r["data"]["stall-ms"].as_u64().unwrap() < 5_000, "{r}");
        assert_ne!(backend_pid(&mut q, "drive0"), pid);
    }
    assert_eq!(backend(&mut q, "drive0")["restarts"], 4);
    assert_eq!(q.cmd(r#"{"execute": "query-status"}"#)["return"]["running"], true);
    q.cmd(r#"{"execute": "quit"}"#);
    let (status, stderr) = vm.wait();
    assert_eq!(status, 0, "{stderr}");
}
