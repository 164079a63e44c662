//! Supervision: the launcher starts fake children that speak the real control protocol (this test executable,
//! re-run as `fake_child`, behind `tessera-core`/`tessera-chardev` wrapper scripts), and the tests check what
//! it does when they exit, fail, die, or when the launcher itself is signalled or killed. No orphans, ever.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tessera_ipc::child::start_child_default;
use tessera_ipc::messages::{ChildConfig, ChildToLauncher, LauncherToChild, Role};
use tessera_tests::bins;

// ---------------------------------------------------------------------------------------------------------------
// the fake child

/// Not a test: the body of the fake children. The wrapper scripts run this executable with
/// `fake_child --exact --ignored`; `TESSERA_FAKE_ROLE` says which child it is, `TESSERA_FAKE_<ROLE>` how it
/// behaves (`ready`, `exit:N`, `fatal:TEXT`, `fail-start`, `ignore-shutdown`, `no-ready`, `close-channel`,
/// `follow-frontends`), and it leaves
/// what it saw in `$TESSERA_FAKE_DIR`.
#[test]
#[ignore = "run by the launcher as a fake child, not a test by itself"]
fn fake_child() {
    let Ok(role_name) = std::env::var("TESSERA_FAKE_ROLE") else { return };
    let dir = PathBuf::from(std::env::var("TESSERA_FAKE_DIR").expect("TESSERA_FAKE_DIR"));
    let role = if role_name == "core" { Role::Core } else { Role::Chardev };
    let behaviour = std::env::var(format!("TESSERA_FAKE_{}", role_name.to_uppercase())).unwrap_or("ready".into());
    // Written whole and renamed into place: the tests poll for these files.
    let put_as = |name: &str, what: &str, text: &str| {
        let tmp = dir.join(format!(".{name}.{what}.{}", std::process::id()));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{what}"))).unwrap();
    };
    if behaviour == "fail-start" {
        eprintln!("fake {role_name}: failing at start as asked");
        std::process::exit(3);
    }
    let mut start = start_child_default(role).expect("handshake and configuration");
    // Files are named after the role, and for chardevs also after the chardev (several may run).
    let names = match &start.config {
        ChildConfig::Chardev(c) => vec![role_name.clone(), format!("chardev-{}", c.id)],
        ChildConfig::Core(_) => vec![role_name.clone()],
    };
    let put = |what: &str, text: String| {
        for n in &names {
            put_as(n, what, &text);
        }
    };
    put("config", format!("{:#?}", start.config));
    // Show that the descriptors arrived: the core reads its kernel file through the passed descriptor.
    if let ChildConfig::Core(core) = &start.config {
        if let Some(k) = &core.boot.kernel {
            let mut f = std::fs::File::from(start.fds.take(k.fd).expect("kernel fd"));
            let mut text = String::new();
            f.read_to_string(&mut text).unwrap();
            put("kernel", text);
        }
    }
    // Like the real chardev: once every front end is closed (the core is gone), exit 0 by itself.
    if let (ChildConfig::Chardev(c), "follow-frontends") = (&start.config, behaviour.as_str()) {
        let mut serial = std::fs::File::from(start.fds.take(c.frontends[0]).expect("front end fd"));
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = serial.read_to_end(&mut sink);
            std::process::exit(0);
        });
    }
    if behaviour == "no-ready" {
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    start.control.send(&ChildToLauncher::Ready, &[]).unwrap();
    put("pid", std::process::id().to_string());
    if behaviour == "close-channel" {
        drop(start.control);
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if let Some(code) = behaviour.strip_prefix("exit:") {
        let code = code.parse().unwrap();
        start.control.send(&ChildToLauncher::Exit { code, reason: "asked by the test".into() }, &[]).unwrap();
    }
    if let Some(message) = behaviour.strip_prefix("fatal:") {
        start.control.send(&ChildToLauncher::Fatal { message: message.into() }, &[]).unwrap();
    }
    loop {
        match start.control.recv::<LauncherToChild>() {
            Ok((LauncherToChild::Shutdown, _)) if behaviour == "ignore-shutdown" => {
                put("shutdown-ignored", String::new())
            }
            Ok((LauncherToChild::Shutdown, _)) => {
                put("shutdown", String::new());
                std::process::exit(0);
            }
            Ok((other, _)) => panic!("unexpected {other:?}"),
            // The launcher is gone: so are we.
            Err(_) => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// the tests

struct Setup {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        for (binary, role) in [("tessera-core", "core"), ("tessera-chardev", "chardev")] {
            let path = dir.path().join(binary);
            let script = format!(
                "#!/bin/sh\necho \"$0 $*\" > \"$TESSERA_FAKE_DIR/{role}.argv\"\n\
                 TESSERA_FAKE_ROLE={role} exec '{}' fake_child --exact --ignored --nocapture --quiet\n",
                exe.display()
            );
            std::fs::write(&path, script).unwrap();
            let mut perm = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(&path, perm).unwrap();
        }
        let kernel = dir.path().join("kernel.bin");
        std::fs::write(&kernel, "not really a kernel").unwrap();
        Setup { dir, kernel }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }

    fn launch(&self, extra: &[&str], env: &[(&str, &str)]) -> Launched {
        let mut cmd = Command::new(bins::launcher("tessera"));
        cmd.args(["-kernel", self.kernel.to_str().unwrap(), "-serial", "null", "-display", "none"])
            .args(extra)
            .env("TESSERA_LIBEXEC_DIR", self.dir.path())
            .env("TESSERA_FAKE_DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Launched(cmd.spawn().unwrap())
    }

    /// The pid a fake child wrote once it had sent Ready.
    fn wait_pid(&self, role: &str) -> Pid {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = self.read(&format!("{role}.pid")) {
                return Pid::from_raw(p.trim().parse().unwrap());
            }
            assert!(Instant::now() < deadline, "the fake {role} never got ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The launcher under test; killed if a test fails while it runs (its children follow it: PDEATHSIG).
struct Launched(Child);

impl std::ops::Deref for Launched {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Launched {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the launcher did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    s
}

/// True when `pid` no longer runs (absent, or a zombie waiting for whoever inherited it).
fn gone(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn assert_gone_soon(pid: Pid, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exit_request_becomes_the_exit_status_and_everything_stops() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CORE", "exit:7")]);
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(7), "stderr: {err}");
    // The contract: both children were started as `<binary> --ipc-fd 3`, configured, and told to shut down.
    assert!(s.read("core.argv").unwrap().ends_with("tessera-core --ipc-fd 3\n"), "{:?}", s.read("core.argv"));
    assert!(s.read("chardev.argv").unwrap().ends_with("tessera-chardev --ipc-fd 3\n"));
    assert_eq!(s.read("core.kernel").as_deref(), Some("not really a kernel"));
    let core_config = s.read("core.config").unwrap();
    assert!(core_config.contains("accel: Tcg"), "no -accel means TCG, as in QEMU: {core_config}");
    let chardev_config = s.read("chardev.config").unwrap();
    assert!(chardev_config.contains("backend: Null"), "{chardev_config}");
    assert!(s.read("core.shutdown").is_some() && s.read("chardev.shutdown").is_some());
    assert_gone_soon(s.wait_pid("core"), "tessera-core");
    assert_gone_soon(s.wait_pid("chardev"), "tessera-chardev");
}

#[test]
fn fatal_is_printed_qemu_style_and_exits_1() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CORE", "fatal:the software CPU is not wired in yet")]);
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("tessera: the software CPU is not wired in yet\n"), "{err}");
    assert!(s.read("chardev.shutdown").is_some());
}

#[test]
fn a_killed_child_is_reported_and_the_graph_stops() {
    let s = Setup::new();
    // Restarts off: the death ends the VM (restarts are tested in backend_restart.rs).
    let mut l = s.launch(&["-tessera-restart-limit", "0"], &[]);
    let core = s.wait_pid("core");
    let chardev = s.wait_pid("chardev");
    kill(chardev, Signal::SIGKILL).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(1));
    assert_eq!(err, format!("tessera: tessera-chardev (pid {chardev}) died: killed by signal 9\n"));
    assert!(s.read("core.shutdown").is_some(), "the core was shut down in order");
    assert_gone_soon(core, "tessera-core");
}

#[test]
fn the_core_is_blamed_when_the_chardev_follows_it() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CHARDEV", "follow-frontends")]);
    let core = s.wait_pid("core");
    s.wait_pid("chardev");
    kill(core, Signal::SIGKILL).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(1));
    assert_eq!(err, format!("tessera: tessera-core (pid {core}) died: killed by signal 9\n"));
}

#[test]
fn a_child_that_closes_its_channel_but_lingers_is_stopped() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CORE", "close-channel")]);
    let core = s.wait_pid("core");
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(1));
    assert_eq!(err, format!("tessera: tessera-core (pid {core}) closed its control channel\n"));
    assert_gone_soon(core, "tessera-core");
    assert!(s.read("chardev.shutdown").is_some());
}

#[test]
fn a_child_that_fails_to_start_is_reported() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CORE", "fail-start")]);
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("fake core: failing at start as asked\n"), "{err}");
    assert!(err.contains("tessera: tessera-core (pid ") && err.ends_with(" died: exited with status 3\n"), "{err}");
    assert!(s.read("chardev.shutdown").is_some());
}

#[test]
fn sigkill_of_the_launcher_takes_the_children_down() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[]);
    let core = s.wait_pid("core");
    let chardev = s.wait_pid("chardev");
    l.kill().unwrap();
    l.wait().unwrap();
    assert_gone_soon(core, "tessera-core");
    assert_gone_soon(chardev, "tessera-chardev");
}

#[test]
fn sigterm_shuts_down_in_order_and_says_so() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[]);
    s.wait_pid("core");
    kill(Pid::from_raw(l.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(
        err,
        format!("tessera: terminating on signal 15 from pid {} ({})\n", std::process::id(), comm.trim_end())
    );
    assert_eq!(status.code(), Some(0), "QEMU exits 0 after a terminating signal");
    assert!(s.read("core.shutdown").is_some() && s.read("chardev.shutdown").is_some());
}

#[test]
fn a_child_that_ignores_shutdown_is_killed_after_the_grace_period() {
    let s = Setup::new();
    let mut l = s.launch(&[], &[("TESSERA_FAKE_CORE", "ignore-shutdown")]);
    let core = s.wait_pid("core");
    kill(Pid::from_raw(l.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    assert!(s.read("core.shutdown-ignored").is_some());
    assert_gone_soon(core, "tessera-core");
}

#[test]
fn daemonize_detaches_once_ready_and_the_pidfile_follows_the_daemon() {
    let s = Setup::new();
    let pidfile = s.path("vm.pid");
    let mut l = s.launch(&["-daemonize", "-pidfile", pidfile.to_str().unwrap()], &[]);
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    // Nothing keeps the caller's stderr open once the daemon runs (a `2>&1 | cat` must end).
    let mut stderr = l.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(Duration::from_secs(10)).expect("the daemon or its children keep stderr open");
    assert_eq!(status.code(), Some(0), "{text}");
    // By the time the parent exits the graph is Ready.
    let core = s.wait_pid("core");
    let daemon = Pid::from_raw(std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap());
    // If the test fails from here on, the daemon (and with it its children) must not outlive it.
    struct KillOnDrop(Pid);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGKILL);
        }
    }
    let guard = KillOnDrop(daemon);
    assert_ne!(daemon.as_raw() as u32, l.id());
    assert!(!gone(daemon));
    // A second instance cannot take the same pid file.
    let mut second = s.launch(&["-pidfile", pidfile.to_str().unwrap()], &[]);
    assert_eq!(wait_with_timeout(&mut second, Duration::from_secs(30)).code(), Some(1));
    assert_eq!(
        stderr_of(&mut second),
        "tessera: cannot create PID file: Cannot lock pid file: Resource temporarily unavailable\n"
    );
    kill(daemon, Signal::SIGTERM).unwrap();
    assert_gone_soon(daemon, "the daemon");
    // Gone: its pid may be reused, so the guard must not fire anymore.
    std::mem::forget(guard);
    assert_gone_soon(core, "tessera-core");
    assert!(s.read("core.shutdown").is_some());
    assert!(!pidfile.exists(), "the pid file is removed at exit");
}

#[test]
fn pty_chardev_is_announced_and_passed() {
    let s = Setup::new();
    let mut l = s.launch(&["-serial", "pty"], &[("TESSERA_FAKE_CORE", "exit:0")]);
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let mut out = String::new();
    l.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(status.code(), Some(0), "{}", stderr_of(&mut l));
    let line = out.lines().find(|l| l.starts_with("char device redirected to ")).expect("the pty announcement");
    let path = line.strip_prefix("char device redirected to ").unwrap().strip_suffix(" (label serial1)").unwrap();
    assert!(path.starts_with("/dev/pts/"), "{line}");
    let config = s.read("chardev-serial1.config").unwrap();
    assert!(config.contains(&format!("path: \"{path}\"")), "{config}");
}

#[test]
fn socket_server_with_wait_accepts_before_starting() {
    let s = Setup::new();
    let sock = s.path("serial.sock");
    let mut l = s.launch(
        &["-chardev", &format!("socket,id=sk,path={},server=on", sock.display()), "-serial", "chardev:sk"],
        &[("TESSERA_FAKE_CORE", "exit:0")],
    );
    // The launcher waits for us before starting anything.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the launcher never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.read("core.argv").is_none(), "nothing starts before a client connects");
    let client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    let err = stderr_of(&mut l);
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(
        err.lines().next().unwrap(),
        format!(
            "tessera: -chardev socket,id=sk,path={p},server=on: info: QEMU waiting for connection on: disconnected:unix:{p},server=on",
            p = sock.display()
        )
    );
    let config = s.read("chardev-sk.config").unwrap();
    assert!(config.contains("SocketServer"), "{config}");
    assert!(config.contains("connected: Some("), "{config}");
    drop(client);
}

#[test]
fn tcp_server_with_wait_announces_the_bound_address() {
    use std::io::BufRead;
    let s = Setup::new();
    let mut l = s.launch(&["-serial", "telnet:127.0.0.1:0,server=on"], &[("TESSERA_FAKE_CORE", "exit:0")]);
    let mut stderr = std::io::BufReader::new(l.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let prefix = "tessera: -serial telnet:127.0.0.1:0,server=on: info: QEMU waiting for connection on: \
                  disconnected:telnet:127.0.0.1:";
    let port =
        line.strip_prefix(prefix).and_then(|r| r.strip_suffix(",server=on\n")).unwrap_or_else(|| panic!("{line}"));
    let port: u16 = port.parse().unwrap();
    assert_ne!(port, 0);
    let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let status = wait_with_timeout(&mut l, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    let config = s.read("chardev-serial1.config").unwrap();
    assert!(config.contains("telnet: true") && config.contains("connected: Some("), "{config}");
    drop(client);
}
