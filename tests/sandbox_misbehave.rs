//! Issue 7, item 4, with the real binaries: one process of a running graph (launcher, tessera-core,
//! tessera-chardev, tessera-blk; the virtio-blk guest of virtio_common.rs on the serial console) is the
//! test-only misbehave build of itself and, right after confining itself, tries what a compromised process
//! would: open("/etc/passwd"), socket(AF_INET), execve, ptrace of its parent, mount.
//!
//! What the design promises, and what is checked:
//! - a path is answered ENOENT and the process carries on: the guest writes and reads its disk and ends as it
//!   always does (exit status 0x21, the sector on the image), so the guest and the other processes are
//!   unaffected;
//! - socket, execve, ptrace and mount kill the process (SIGSYS, seccomp's KILL_PROCESS) before the call does
//!   anything; the launcher reports that death, naming the seccomp filter, and ends the graph cleanly (the
//!   other children are stopped in order, none of them is reported dead, the launcher exits 1). A backend is
//!   not restarted (yet): a killed tessera-blk ends the VM, as a killed chardev or core does;
//! - with `-sandbox on,seccomp=log` (the filter lets every call through and only logs it) the other layers
//!   still deny each attempt on their own, and the guest again runs to its end.
//!
//! As root every run uses `-runas nobody` too. Bounded: each VM has 60 s; failures print the guest's serial
//! output and the launcher's stderr.

#[path = "virtio_common.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{check_image, guest, image};
use tessera_tests::{bins, misbehave};

const SHARED: &[&str] = &["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem"];
const PROCESSES: &[&str] = &["core", "chardev", "blk"];
const KILLED: &[&str] = &["socket-inet", "execve", "ptrace-parent", "mount"];

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

/// Runs the virtio-blk guest with `process` (core, chardev or blk) misbehaving as `ops` says, under `sandbox`
/// (the `-sandbox` value), and returns the launcher's output.
fn run(dir: &Path, process: &str, ops: &str, sandbox: &str) -> (Output, std::path::PathBuf) {
    let lib = misbehave::libexec_with(dir, &format!("tessera-{process}"));
    let img = image(dir);
    let mut cmd = Command::new(bins::launcher("tessera"));
    cmd.args(["-sandbox", sandbox]);
    if is_root() {
        cmd.args(["-runas", "nobody"]);
    }
    cmd.args(["-accel", "kvm", "-m", "64M", "-nographic", "-device", "isa-debug-exit"])
        .args(SHARED)
        .arg("-kernel")
        .arg(guest(dir))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", img.display()))
        .env("TESSERA_LIBEXEC_DIR", &lib)
        .env("TESSERA_MISBEHAVE", format!("{process}:{ops}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    (bins::wait_output(cmd.spawn().unwrap(), Duration::from_secs(60)), img)
}

fn texts(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The guest ran to its end: it wrote and read the disk, said so on the serial console, and exited 0x10
/// through isa-debug-exit (status 0x21); the sector is on the image.
fn assert_guest_unaffected(what: &str, out: &Output, img: &Path) {
    let (stdout, stderr) = texts(out);
    assert!(stdout.contains("virtio-blk: ok"), "{what}: guest serial: {stdout:?}\nstderr: {stderr}");
    assert_eq!(out.status.code(), Some(0x21), "{what}: guest serial: {stdout:?}\nstderr: {stderr}");
    assert!(!stderr.contains(" died: "), "{what}: a process died: {stderr}");
    check_image(img);
}

#[test]
fn a_path_is_not_found_and_the_graph_runs_on() {
    if !kvm_available("a_path_is_not_found_and_the_graph_runs_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for process in PROCESSES {
        let (out, img) = run(dir.path(), process, "open-passwd", "on");
        let (_, stderr) = texts(&out);
        let want = format!("tessera-{process}: misbehave: open-passwd: denied ENOENT");
        assert!(stderr.lines().any(|l| l == want), "{process}: no {want:?} in stderr: {stderr}");
        assert_guest_unaffected(&format!("{process} open-passwd"), &out, &img);
    }
}

#[test]
fn socket_execve_ptrace_and_mount_kill_the_process_and_the_launcher_ends_the_graph() {
    if !kvm_available("socket_execve_ptrace_and_mount_kill_the_process_and_the_launcher_ends_the_graph") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for process in PROCESSES {
        for op in KILLED {
            let (out, _) = run(dir.path(), process, op, "on");
            let (stdout, stderr) = texts(&out);
            let what = format!("{process} {op}");
            let prefix = format!("tessera-{process}: misbehave: {op}: ");
            assert!(stderr.contains(&format!("{prefix}trying")), "{what}: the attempt was not made: {stderr}");
            // Killed inside the call: no line says how it returned.
            assert!(
                !stderr.contains(&format!("{prefix}denied")) && !stderr.contains(&format!("{prefix}ALLOWED")),
                "{what}: the call returned: {stderr}"
            );
            // The launcher's report: this process, killed by its seccomp filter; nobody else died.
            let deaths: Vec<&str> = stderr.lines().filter(|l| l.contains(" died: ")).collect();
            assert_eq!(deaths.len(), 1, "{what}: one death reported: {stderr}");
            assert!(
                deaths[0].starts_with(&format!("tessera: tessera-{process} ")) && deaths[0].contains(
                    "died: killed by signal 31 (by its sandbox's seccomp filter: it made a system call its sandbox \
                     profile does not allow"
                ),
                "{what}: {stderr}"
            );
            assert_eq!(out.status.code(), Some(1), "{what}: the launcher's status; stderr: {stderr}");
            // The guest never finished its work (the graph ended first): what it printed is no success.
            assert!(!stdout.contains("virtio-blk: FAILED"), "{what}: guest serial {stdout:?}");
        }
    }
}

/// With the filter only logging, the namespaces, the empty root, the dropped capabilities, -runas and Landlock
/// deny each attempt by themselves (docs/SECURITY.md, "without seccomp" column), and the process carries on.
#[test]
fn without_the_filter_killing_the_other_layers_deny_each_attempt() {
    if !kvm_available("without_the_filter_killing_the_other_layers_deny_each_attempt") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ops = "open-passwd,connect-inet,execve,ptrace-parent,mount,setuid-root";
    for process in PROCESSES {
        let (out, img) = run(dir.path(), process, ops, "on,seccomp=log");
        let (_, stderr) = texts(&out);
        for (op, denials) in [
            ("open-passwd", &["ENOENT"][..]),
            // An empty network namespace: no route (Landlock's TCP rule, on kernels that have it, says EACCES).
            ("connect-inet", &["ENETUNREACH", "EACCES"][..]),
            ("execve", &["ENOENT"][..]),
            ("ptrace-parent", &["EPERM"][..]),
            ("mount", &["EPERM"][..]),
            ("setuid-root", &["EPERM"][..]),
        ] {
            let prefix = format!("tessera-{process}: misbehave: {op}: denied ");
            let line = stderr
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("{process} {op}: not denied: {stderr}"));
            assert!(denials.iter().any(|d| line.ends_with(d)), "{process} {op}: {line}");
        }
        assert_guest_unaffected(&format!("{process} under seccomp=log"), &out, &img);
    }
}
