//! The sandbox proven from outside: tessera-sandbox-probe (policy/src/bin) confines itself with a process
//! kind's profile exactly as a Tessera child does, then waits; these tests read /proc/PID of the confined
//! process (status, namespaces, its root directory), release it to try one hostile operation, and check that
//! the operation was refused or the process was killed by SIGSYS.
//!
//! Needs the probe built (`cargo build -p tessera-policy --bins`; scripts/test.sh builds every binary first)
//! and root for the -runas cases (they are reported as skipped otherwise).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const KINDS: [&str; 4] = ["core", "chardev", "blk", "net"];
const NOBODY: u32 = 65534;
const SIGSYS: i32 = 31;

fn probe_path() -> PathBuf {
    // target/debug/deps/sandbox_probe-HASH -> target/debug/tessera-sandbox-probe
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let probe = dir.join("tessera-sandbox-probe");
    assert!(probe.exists(), "{} is missing: run `cargo build -p tessera-policy --bins` first", probe.display());
    probe
}

fn own_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn is_root() -> bool {
    own_uid() == 0
}

/// The strictest set-up this test run can ask for: as root, `-runas nobody` (no user namespace needed); as
/// anyone else, the probe's own uid inside a user namespace of its own. Returns (options, uid, user namespace).
fn confined() -> (&'static str, u32, bool) {
    if is_root() {
        (RUNAS_NOBODY, NOBODY, false)
    } else {
        ("v1,on,seccomp=kill,landlock=on", own_uid(), true)
    }
}

/// What the test saw of one confined probe.
struct Observed {
    pid: u32,
    status: String,
    /// None when unreadable: the probe is not dumpable, so only root (CAP_SYS_PTRACE) may look.
    root_entries: Option<Vec<String>>,
    /// Namespaces (mnt, net, ipc, uts, user) whose inode differs from the test's own; None when unreadable.
    new_namespaces: Option<Vec<&'static str>>,
    threads_seccomp: Vec<String>,
    lines: Vec<String>,
    exit: std::process::ExitStatus,
    stderr: String,
}

impl Observed {
    fn field(&self, name: &str) -> &str {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{}/status:\n{}", self.pid, self.status))
    }

    fn result(&self) -> Option<&str> {
        self.lines.iter().find_map(|l| l.strip_prefix("result "))
    }

    fn killed_by(&self) -> Option<i32> {
        self.exit.signal()
    }

    fn describe(&self) -> String {
        format!("lines {:?}, exit {:?}, stderr {:?}", self.lines, self.exit, self.stderr)
    }
}

/// Runs the probe for `kind`/`op` with `env` as TESSERA_SANDBOX, optionally started as `as_user` (uid = gid).
fn run(kind: &str, op: &str, env: &str, as_user: Option<u32>) -> Observed {
    let mut cmd = Command::new(probe_path());
    cmd.args([kind, op])
        .env("TESSERA_SANDBOX", env)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(u) = as_user {
        cmd.uid(u).gid(u);
    }
    let mut child: Child = cmd.spawn().expect("start the probe");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut pid = None;
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let line = line.trim_end().to_string();
        if let Some(p) = line.strip_prefix("ready ") {
            pid = Some(p.parse::<u32>().unwrap());
            lines.push(line);
            break;
        }
        lines.push(line);
    }
    let (mut status, mut root_entries, mut new_namespaces, mut threads_seccomp) =
        (String::new(), None, None, Vec::new());
    if let Some(pid) = pid {
        assert_eq!(pid, child.id(), "the probe is the process the test started");
        status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        // Needs ptrace-read access to the probe, which is not dumpable: root (or CAP_SYS_PTRACE) only.
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/root")) {
            root_entries = Some(dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect());
        }
        let mut differ = Vec::new();
        for ns in ["mnt", "net", "ipc", "uts", "user"] {
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            match std::fs::read_link(format!("/proc/{pid}/ns/{ns}")) {
                Ok(theirs) if theirs != ours => differ.push(ns),
                Ok(_) => {}
                Err(_) => {
                    differ.clear();
                    break;
                }
            }
        }
        if !differ.is_empty() || is_root() {
            new_namespaces = Some(differ);
        }
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let s = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
            if let Some(l) = s.lines().find(|l| l.starts_with("Seccomp:")) {
                threads_seccomp.push(l.split_whitespace().nth(1).unwrap_or("").to_string());
            }
        }
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    drop(child.stdin.take());
    for line in stdout.lines() {
        lines.push(line.unwrap());
    }
    let out = child.wait_with_output().unwrap();
    Observed {
        pid: pid.unwrap_or(0),
        status,
        root_entries,
        new_namespaces,
        threads_seccomp,
        lines,
        exit: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_confined(o: &Observed, kind: &str, uid: u32, user_namespace: bool) {
    assert!(o.pid != 0, "{kind}: the probe never got ready: {}", o.describe());
    assert_eq!(o.field("Seccomp"), "2", "{kind}: filter mode");
    assert_eq!(o.field("NoNewPrivs"), "1", "{kind}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(o.field(cap), "0000000000000000", "{kind}: {cap}");
    }
    let want = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(o.field("Uid"), want, "{kind}: real, effective, saved, fs uid");
    assert_eq!(o.field("Gid"), want, "{kind}: gids");
    // Without root the test may not look into a non-dumpable process: these two checks need root.
    if is_root() {
        assert_eq!(o.root_entries.as_deref(), Some(&[][..]), "{kind}: its root");
        let mut expected = vec!["mnt", "net", "ipc", "uts"];
        if user_namespace {
            expected.push("user");
        }
        assert_eq!(o.new_namespaces, Some(expected), "{kind}: namespaces of its own");
    }
    assert!(o.threads_seccomp.iter().all(|s| s == "2"), "{kind}: every thread filtered: {:?}", o.threads_seccomp);
}

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("{test}: skipped, needs root (-runas and starting the probe as another user)");
    true
}

const RUNAS_NOBODY: &str = "v1,on,seccomp=kill,landlock=on,runas=65534:65534";

#[test]
fn every_kind_runs_confined_and_does_its_work() {
    let (env, uid, userns) = confined();
    for kind in KINDS {
        let o = run(kind, "allowed", env, None);
        assert_confined(&o, kind, uid, userns);
        assert_eq!(o.result(), Some("allowed ok"), "{kind}: {}", o.describe());
        assert!(o.exit.success(), "{kind}: {}", o.describe());
        assert!(o.lines.iter().any(|l| l.contains("landlock fully enforced")), "{kind}: {}", o.describe());
    }
}

#[test]
fn an_unprivileged_start_confines_itself_in_a_user_namespace() {
    if skip_unless_root("an_unprivileged_start_confines_itself_in_a_user_namespace") {
        return;
    }
    for kind in KINDS {
        let o = run(kind, "allowed", "v1,on,seccomp=kill,landlock=on", Some(NOBODY));
        assert_confined(&o, kind, NOBODY, true);
        assert_eq!(o.result(), Some("allowed ok"), "{kind}: {}", o.describe());
    }
}

/// The operations a compromised process would try first; the profile kills each one.
#[test]
fn hostile_operations_kill_the_process() {
    let (env, _, _) = confined();
    for kind in KINDS {
        for op in ["socket-inet", "execve", "ptrace-parent", "mount", "kill-parent", "setuid-root", "mmap-exec"] {
            let o = run(kind, op, env, None);
            assert!(o.pid != 0, "{kind} {op}: never ready: {}", o.describe());
            assert_eq!(o.killed_by(), Some(SIGSYS), "{kind} {op}: {}", o.describe());
            assert_eq!(o.result(), None, "{kind} {op}: the operation returned: {}", o.describe());
        }
    }
}

#[test]
fn paths_are_answered_no_such_file() {
    for kind in KINDS {
        let o = run(kind, "open-passwd", "v1,on,seccomp=kill,landlock=on", None);
        assert_eq!(o.result(), Some("open-passwd errno ENOENT"), "{kind}: {}", o.describe());
        assert!(o.exit.success());
    }
}

#[test]
fn threads_started_before_the_filter_are_filtered_too() {
    for kind in KINDS {
        let o = run(kind, "thread:socket-inet", "v1,on,seccomp=kill,landlock=on", None);
        assert!(o.pid != 0, "{kind}: {}", o.describe());
        assert_eq!(o.threads_seccomp.len(), 2, "{kind}: main thread and the early one");
        assert!(o.threads_seccomp.iter().all(|s| s == "2"), "{kind}: {:?}", o.threads_seccomp);
        assert_eq!(o.killed_by(), Some(SIGSYS), "{kind}: {}", o.describe());
    }
    // Threads are allowed, as threads (clone with CLONE_THREAD), in every kind.
    for kind in KINDS {
        let o = run(kind, "spawn-thread", "v1,on", None);
        assert_eq!(o.result(), Some("spawn-thread ok"), "{kind}: {}", o.describe());
    }
}

/// Without the seccomp filter the other layers still refuse: nothing visible (empty root), no network
/// (Landlock TCP rules, empty network namespace), no capability for mount, no ptrace or signal outside
/// (Landlock scopes, another uid).
#[test]
fn the_other_layers_hold_without_seccomp() {
    let (env, _, userns) = confined();
    let env = env.replace("seccomp=kill", "seccomp=off");
    for (op, want) in [
        ("open-passwd", &["ENOENT"][..]),
        ("execve", &["ENOENT"]),
        ("connect-inet", &["EACCES", "ENETUNREACH"]),
        ("mount", &["EPERM"]),
        ("ptrace-parent", &["EPERM"]),
        ("kill-parent", &["EPERM"]),
        // In a user namespace uid 0 is not even mapped: EINVAL.
        ("setuid-root", if userns { &["EINVAL"] } else { &["EPERM"] }),
    ] {
        let o = run("blk", op, &env, None);
        assert_eq!(o.field("Seccomp"), "0");
        if is_root() {
            assert_eq!(o.root_entries.as_deref(), Some(&[][..]));
        }
        let r = o.result().unwrap_or_else(|| panic!("{op}: {}", o.describe()));
        assert!(want.iter().any(|w| r == format!("{op} errno {w}")), "{op}: got {r}, want one of {want:?}");
    }
}

#[test]
fn log_mode_lets_calls_through_with_the_filter_on() {
    let o = run("blk", "socket-inet", "v1,on,seccomp=log,landlock=on", None);
    assert_eq!(o.field("Seccomp"), "2");
    assert_eq!(o.result(), Some("socket-inet ok"), "{}", o.describe());
}

#[test]
fn sandbox_off_keeps_qemu_meaning_of_runas_and_chroot() {
    if skip_unless_root("sandbox_off_keeps_qemu_meaning_of_runas_and_chroot") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tessera-chroot-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("marker")).unwrap();
    let hex: String = dir.as_os_str().as_encoded_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let o = run("blk", "open-passwd", &format!("v1,off,runas=65534:65534,chroot={hex}"), None);
    assert_eq!(o.field("Seccomp"), "0");
    assert_eq!(o.field("Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(o.root_entries, Some(vec!["marker".to_string()]), "chroot(2) into the directory");
    assert_eq!(o.result(), Some("open-passwd errno ENOENT"));
    // With the sandbox on, -chroot DIR becomes the (read-only) root instead of the empty tmpfs.
    let o = run("blk", "allowed", &format!("v1,on,runas=65534:65534,chroot={hex}"), None);
    assert_eq!(o.field("Seccomp"), "2");
    assert_eq!(o.root_entries, Some(vec!["marker".to_string()]));
    assert_eq!(o.result(), Some("allowed ok"), "{}", o.describe());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn runas_without_root_is_a_clear_error() {
    // As root, start the probe as nobody; otherwise it is unprivileged already.
    let as_user = is_root().then_some(NOBODY);
    let o = run("core", "allowed", "v1,on,runas=1000:1000", as_user);
    assert_eq!(o.exit.code(), Some(3), "{}", o.describe());
    assert!(o.stderr.contains("-runas needs the launcher to run as root"), "{}", o.stderr);
}

/// PR_SET_PDEATHSIG: a confined process dies with its parent, also after -runas changed its credentials
/// (which clears the signal: the sandbox arms it again); a process that chose its own parent-death signal
/// (tessera-chardev arms SIGTERM to restore the terminal) keeps it.
#[test]
fn a_confined_process_dies_with_its_parent() {
    let mut envs = vec!["v1,on,seccomp=kill,landlock=on"];
    if is_root() {
        envs.push(RUNAS_NOBODY);
    }
    for env in envs {
        for own_signal in [false, true] {
            let what = format!("{env}, own SIGTERM: {own_signal}");
            // The shell stays the probe's parent (": " keeps it from exec'ing the probe); the probe waits on
            // the shell's stdin, which is this test's pipe.
            let mut sh = Command::new("/bin/sh");
            sh.args(["-c", "\"$0\" blk allowed; :"])
                .arg(probe_path())
                .env("TESSERA_SANDBOX", env)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            if own_signal {
                sh.env("PROBE_PDEATHSIG", "term");
            }
            let mut sh = sh.spawn().unwrap();
            let mut stdout = BufReader::new(sh.stdout.take().unwrap());
            let pid = loop {
                let mut line = String::new();
                assert!(stdout.read_line(&mut line).unwrap() > 0, "{what}: the probe never got ready");
                if let Some(p) = line.trim_end().strip_prefix("ready ") {
                    break p.parse::<u32>().unwrap();
                }
            };
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).unwrap().trim().to_string();
            assert_eq!(ppid, sh.id().to_string(), "{what}: the shell is the probe's parent");
            // Keep the probe's stdin open: at end of file it would go on and exit by itself (Child::wait
            // closes it).
            let stdin = sh.stdin.take();
            sh.kill().unwrap();
            sh.wait().unwrap();
            let gone = (0..200).any(|_| {
                let alive = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .map(|s| !s.lines().any(|l| l.starts_with("State:") && l.contains("zombie")))
                    .unwrap_or(false);
                if alive {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                !alive
            });
            assert!(gone, "{what}: the probe (pid {pid}) outlived its parent");
            let rest: Vec<String> = stdout.lines().map(|l| l.unwrap()).collect();
            let said_sigterm = rest.iter().any(|l| l == "signal SIGTERM");
            assert_eq!(said_sigterm, own_signal, "{what}: which signal came: {rest:?}");
            drop(stdin);
        }
    }
}
