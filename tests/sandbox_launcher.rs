//! The sandbox as a user runs it: the real launcher starts the real tessera-core, tessera-chardev and
//! tessera-blk with `-sandbox on` (and, as root, `-runas nobody`), a tiny KVM guest runs, and each child is
//! inspected from outside through /proc: Seccomp 2, NoNewPrivs 1, no capability, the -runas uid, an empty root. Also:
//! `-sandbox off` runs unconfined, `-sandbox on,seccomp=log` runs with the filter in log mode, and the hostile
//! operations of `tessera_policy::hostile` are refused under the core and chardev profiles with the options
//! exactly as the launcher parses and passes them (the sandbox probe stands in for a compromised child).
//!
//! Bounded: every guest run has a deadline, and failures print the guest's serial output and the launcher's
//! stderr. KVM cases are skipped, with a message, where /dev/kvm is absent; root-only checks (-runas, looking
//! into a non-dumpable process's root) say when they are skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::bins;
use tessera_tests::tiny_guest::{asm, pvh_guest};

const NOBODY: u32 = 65534;
const SIGSYS: i32 = 31;
const PROG: &str = "qemu-system-x86_64";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("{test}: skipped, /dev/kvm is absent: the guest cannot run on KVM here");
    false
}

/// "hello\n" on COM1, then isa-debug-exit with `exit` (the VM's status becomes `(exit << 1) | 1`), or halt
/// forever when `exit` is None.
fn guest(dir: &Path, name: &str, exit: Option<u8>) -> PathBuf {
    let mut code = asm::print("msg");
    if let Some(v) = exit {
        code.push_str(&asm::debug_exit(0x501, v));
    }
    pvh_guest(dir, name, &code, &asm::string("msg", "hello\n")).unwrap_or_else(|e| panic!("building {name}: {e}"))
}

fn launcher() -> Command {
    bins::launcher_command(PROG)
}

use bins::wait_output;

/// The strictest options this run can use: as root, `-runas nobody` too.
fn confining_args() -> Vec<&'static str> {
    let mut a = vec!["-sandbox", "on"];
    if is_root() {
        a.extend(["-runas", "nobody"]);
    } else {
        eprintln!("not root: -runas nobody is not tested (the children keep the test's uid)");
    }
    a
}

#[test]
fn a_guest_boots_and_exits_under_sandbox_on() {
    if !kvm_available("a_guest_boots_and_exits_under_sandbox_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest(dir.path(), "hello", Some(0x21));
    let child = launcher()
        .args(confining_args())
        .args(["-accel", "kvm", "-m", "64M", "-kernel"])
        .arg(&elf)
        .args(["-serial", "stdio", "-display", "none", "-device", "isa-debug-exit,iobase=0x501,iosize=2"])
        .args(["-d", "sandbox"])
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "hello\n", "guest serial output; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0x43), "stdout: {stdout}\nstderr: {stderr}");
    // `-d sandbox`: each child says how it is confined.
    for kind in ["core", "chardev"] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("tessera-{kind}: sandboxed:")))
            .unwrap_or_else(|| panic!("no sandbox report from tessera-{kind}; stderr: {stderr}"));
        assert!(line.contains("seccomp on (kill process)"), "{line}");
        assert!(line.contains("root empty (read-only tmpfs)"), "{line}");
        if is_root() {
            assert!(line.contains(&format!("uid {NOBODY} gid {NOBODY}")), "{line}");
        }
    }
}

/// What the test saw of one child of the launcher.
struct ChildView {
    pid: u32,
    comm: String,
    status: String,
    /// None when unreadable (a non-dumpable process: only root may look).
    root: Option<Vec<String>>,
    threads_seccomp: Vec<String>,
}

impl ChildView {
    fn field(&self, name: &str) -> &str {
        self.status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{}/status:\n{}", self.pid, self.status))
    }
}

fn children_of(pid: u32) -> Vec<ChildView> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let mut out = Vec::new();
    for c in list.split_whitespace() {
        let pid: u32 = c.parse().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let root = std::fs::read_dir(format!("/proc/{pid}/root"))
            .ok()
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect());
        let mut threads_seccomp = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks {
                let s = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
                if let Some(l) = s.lines().find(|l| l.starts_with("Seccomp:")) {
                    threads_seccomp.push(l.split_whitespace().nth(1).unwrap_or("").to_string());
                }
            }
        }
        out.push(ChildView { pid, comm, status, root, threads_seccomp });
    }
    out.sort_by(|a, b| a.comm.cmp(&b.comm));
    out
}

/// A running graph with the `forever` guest (prints hello to a file through the chardev, then halts) and a
/// `-drive ...,if=virtio` served by a tessera-blk the launcher starts (guest RAM in a shared memfd, as
/// vhost-user needs): the three kinds of children the launcher starts today.
struct Running {
    child: Child,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(extra: &[&str]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let elf = guest(dir.path(), "forever", None);
        let serial = dir.path().join("serial.txt");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
        bins::binary("tessera-blk", "tessera-blk");
        let mut child = launcher()
            .args(extra)
            .args(["-accel", "kvm", "-m", "64M", "-kernel"])
            .arg(&elf)
            .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem"])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", disk.display()))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-display", "none"])
            .spawn()
            .unwrap();
        // The guest's bytes reach the file through the chardev process: the whole graph is up and serving.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&serial).unwrap_or_default() != "hello\n" {
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!(
                    "{extra:?}: no hello in {}: {:?}\nlauncher stderr: {err}",
                    serial.display(),
                    std::fs::read_to_string(&serial)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Running { child, serial, _dir: dir }
    }

    fn children(&self) -> Vec<ChildView> {
        let c = children_of(self.child.id());
        let names: Vec<&str> = c.iter().map(|c| c.comm.as_str()).collect();
        assert_eq!(names, ["tessera-blk", "tessera-chardev", "tessera-core"], "the launcher's children");
        c
    }

    /// SIGTERM, as a user stopping the VM: the graph ends in order and the launcher exits 0.
    fn stop(mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the launcher did not end after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "serial: {:?}\nstderr: {stderr}", std::fs::read_to_string(&self.serial));
        assert!(stderr.contains("terminating on signal 15"), "{stderr}");
    }
}

#[test]
fn every_child_of_a_running_graph_is_confined() {
    if !kvm_available("every_child_of_a_running_graph_is_confined") {
        return;
    }
    let vm = Running::start(&confining_args());
    for c in vm.children() {
        let who = format!("{} (pid {})", c.comm, c.pid);
        assert_eq!(c.field("Seccomp"), "2", "{who}: seccomp filter mode\n{}", c.status);
        assert_eq!(c.field("NoNewPrivs"), "1", "{who}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(c.field(cap), "0000000000000000", "{who}: {cap}");
        }
        assert!(
            !c.threads_seccomp.is_empty() && c.threads_seccomp.iter().all(|s| s == "2"),
            "{who}: every thread filtered: {:?}",
            c.threads_seccomp
        );
        if is_root() {
            let want = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
            assert_eq!(c.field("Uid"), want, "{who}: -runas nobody");
            assert_eq!(c.field("Gid"), want, "{who}: -runas nobody");
            assert_eq!(c.root.as_deref(), Some(&[][..]), "{who}: its root is an empty directory");
        } else {
            eprintln!("{who}: not root, /proc/PID/root of a non-dumpable process is not readable: not checked");
        }
    }
    vm.stop();
}

#[test]
fn sandbox_off_runs_unconfined() {
    if !kvm_available("sandbox_off_runs_unconfined") {
        return;
    }
    let vm = Running::start(&["-sandbox", "off"]);
    for c in vm.children() {
        let who = format!("{} (pid {})", c.comm, c.pid);
        assert_eq!(c.field("Seccomp"), "0", "{who}");
        assert_eq!(c.field("NoNewPrivs"), "0", "{who}");
        // The host's root: it has at least the directories every Debian system has.
        let root = c.root.clone().unwrap_or_default();
        assert!(root.iter().any(|e| e == "proc") && root.iter().any(|e| e == "etc"), "{who}: root {root:?}");
    }
    vm.stop();
}

#[test]
fn seccomp_log_mode_runs_the_guest_with_the_filter_logging() {
    if !kvm_available("seccomp_log_mode_runs_the_guest_with_the_filter_logging") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest(dir.path(), "hello", Some(0x05));
    let child = launcher()
        .args(["-sandbox", "on,seccomp=log,spawn=allow", "-accel", "kvm", "-m", "64M", "-kernel"])
        .arg(&elf)
        .args(["-nographic", "-device", "isa-debug-exit,iobase=0x501", "-d", "sandbox"])
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.ends_with("hello\n"), "guest serial output: {stdout:?}; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0x0b), "stderr: {stderr}");
    // A QEMU sub-option that cannot loosen Tessera's allow-lists is accepted with a note.
    assert!(
        stderr.contains(&format!("{PROG}: -sandbox spawn=allow: fork and execve stay denied")),
        "the spawn=allow note; stderr: {stderr}"
    );
    for kind in ["core", "chardev"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("tessera-{kind}: sandboxed:")) && l.contains("seccomp log only")),
            "tessera-{kind} reports log mode; stderr: {stderr}"
        );
    }
}

/// `-chroot DIR` (and QEMU 8.1's `-run-with chroot=DIR`) with the sandbox on: DIR, read-only, is each child's
/// root instead of the empty one.
#[test]
fn chroot_becomes_every_childs_root() {
    if !kvm_available("chroot_becomes_every_childs_root") {
        return;
    }
    if !is_root() {
        eprintln!("chroot_becomes_every_childs_root: skipped, needs root (reading a non-dumpable process's root)");
        return;
    }
    let jail = tempfile::tempdir().unwrap();
    std::fs::create_dir(jail.path().join("marker")).unwrap();
    let dir = jail.path().to_str().unwrap().to_string();
    for option in [vec!["-chroot".to_string(), dir.clone()], vec!["-run-with".to_string(), format!("chroot={dir}")]] {
        let mut args: Vec<&str> = confining_args();
        args.extend(option.iter().map(String::as_str));
        let vm = Running::start(&args);
        for c in vm.children() {
            assert_eq!(c.root, Some(vec!["marker".to_string()]), "{option:?}: {} (pid {}) root", c.comm, c.pid);
            assert_eq!(c.field("Seccomp"), "2", "{option:?}: {}", c.comm);
        }
        vm.stop();
    }
}

#[test]
fn runas_from_an_unprivileged_launcher_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Never read: the launcher refuses before it opens anything.
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = launcher();
    cmd.args(["-runas", "nobody", "-display", "none", "-kernel"]).arg(&kernel);
    let uid = if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
        NOBODY
    } else {
        nix::unistd::geteuid().as_raw()
    };
    let out = wait_output(cmd.spawn().unwrap(), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{PROG}: -runas needs the launcher to run as root (it runs as uid {uid})\n")
    );
}

// ---------------------------------------------------------------------------------------------------------------
// hostile operations under the options the launcher passes

/// The sandbox options the launcher builds from `args`, in the form it hands each child.
fn options_from_command_line(args: &[&str]) -> tessera_policy::SandboxOptions {
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.extend(["-kernel".to_string(), "/etc/hostname".to_string()]);
    match tessera_launcher::config::parse(&argv, PROG).expect("the command line parses").command {
        tessera_launcher::config::Command::Run(cfg) => cfg.sandbox,
        other => panic!("{args:?} parsed to {other:?}"),
    }
}

/// Runs the sandbox probe as `kind`, started the way the launcher starts a child (environment and pre_exec
/// hook from `tessera_policy::prepare_command`), lets it try `op`, and returns its output lines and status.
fn probe(
    kind: &str,
    op: &str,
    options: &tessera_policy::SandboxOptions,
) -> (Vec<String>, std::process::ExitStatus, String) {
    let mut cmd = Command::new(bins::binary("tessera-policy", "tessera-sandbox-probe"));
    cmd.args([kind, op]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    tessera_policy::prepare_command(&mut cmd, options, &[]);
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let ready = line.starts_with("ready ");
        lines.push(line.trim_end().to_string());
        if ready {
            if let Some(pid) = lines.last().and_then(|l| l.strip_prefix("ready ")) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{kind}: probe not filtered:\n{status}");
            }
            child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "{kind} {op}: the probe is stuck: {lines:?}");
    }
    drop(child.stdin.take());
    for l in stdout.lines() {
        lines.push(l.unwrap());
    }
    let out = child.wait_with_output().unwrap();
    (lines, out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn hostile_operations_are_denied_under_every_profile() {
    let mut args = vec!["-sandbox", "on"];
    if is_root() {
        args.extend(["-runas", "nobody"]);
    }
    let options = options_from_command_line(&args);
    for kind in ["core", "chardev", "blk", "net", "net-user"] {
        // The control: ordinary work goes through.
        let (lines, status, stderr) = probe(kind, "allowed", &options);
        assert!(lines.iter().any(|l| l == "result allowed ok"), "{kind}: {lines:?} {status:?} {stderr}");
        // Killed by the filter (SIGSYS) before the call does anything. (User-mode networking's job is host
        // sockets: socket(AF_INET) is allowed under net-user.)
        let socket = if kind == "net-user" { None } else { Some("socket-inet") };
        for op in
            socket.into_iter().chain(["execve", "ptrace-parent", "mount", "kill-parent", "setuid-root", "mmap-exec"])
        {
            let (lines, status, stderr) = probe(kind, op, &options);
            assert!(lines.iter().any(|l| l.starts_with("ready ")), "{kind} {op}: never confined: {lines:?} {stderr}");
            assert_eq!(status.signal(), Some(SIGSYS), "{kind} {op}: {lines:?} {status:?} {stderr}");
            assert!(!lines.iter().any(|l| l.starts_with("result ")), "{kind} {op}: the call returned: {lines:?}");
        }
        // A path is answered "no such file": nothing is visible.
        let (lines, status, stderr) = probe(kind, "open-passwd", &options);
        assert!(lines.iter().any(|l| l == "result open-passwd errno ENOENT"), "{kind}: {lines:?} {status:?} {stderr}");
    }
}
