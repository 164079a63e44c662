//! tessera-net confined as the launcher confines it: started with its listening vhost-user socket (and tap) as
//! descriptors, `TESSERA_SANDBOX` and the launcher's `pre_exec` hook from `tessera_policy::prepare_command`
//! (`-sandbox on`, and `-runas nobody` as root), without a launcher in between (the launcher's -nic/-netdev
//! mapping lives on another branch). Checked from outside:
//! - user-mode networking (`--user`, profile `net-user`): /proc shows Seccomp 2, NoNewPrivs 1, no capability,
//!   the -runas uid, an empty root, and the *host's* network namespace; the vhost-user socket answers
//!   GET_FEATURES (through the relay's private socket, made after confinement); a `hostfwd=` port opened after
//!   confinement accepts a host connection;
//! - user-mode networking end to end (root): a guest's DNS query to 10.0.2.3 is forwarded to the resolver
//!   /etc/resolv.conf names (the test's responder, through a resolv.conf bound over the host's for that process),
//!   so the confined process reads the file through its root's read-only bind;
//! - tap (`--tap-fd`, profile `net`, root only): the same, but in a network namespace of its own;
//! - the misbehave build: a path is ENOENT and the process carries on; execve kills it (user mode); socket(AF_INET)
//!   kills it (tap);
//! - `--tap IFNAME` and `guestfwd=...-cmd:` are refused under the sandbox with a message saying why.
//!
//! The first three need tessera-net's `--socket-fd` (the net branch adds it): skipped, saying so, without it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::{bins, misbehave};

const NOBODY: u32 = 65534;
/// net-user.toml's `filesystem.read_only`: libslirp's resolver list and glib's seed.
const NET_USER_FILES: &[&str] = &["/etc/resolv.conf", "/dev/urandom"];
const SIGSYS: i32 = 31;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn has_socket_fd(bin: &Path) -> bool {
    let out = Command::new(bin).arg("--help").output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("--socket-fd")
}

fn options() -> tessera_policy::SandboxOptions {
    let mut o = tessera_policy::SandboxOptions::default();
    o.apply_sandbox_arg("on").unwrap();
    if is_root() {
        o.runas = Some(tessera_policy::RunAs { uid: NOBODY, gid: NOBODY });
    }
    o
}

/// A tessera-net started as the launcher starts a backend: `--socket-fd 3` (and `--tap-fd 4`), confined.
struct Net {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    _listener: UnixListener,
}

impl Net {
    fn start(dir: &Path, bin: &Path, args: &[&str], tap: Option<RawFd>, env: &[(&str, &str)]) -> Net {
        Net::start_seeing(dir, bin, args, tap, env, None)
    }

    /// [`Net::start`], with `resolv` (root only) bound over /etc/resolv.conf in a mount namespace of the
    /// child's own, made before the sandbox's: the host's file as far as tessera-net can tell.
    fn start_seeing(
        dir: &Path,
        bin: &Path,
        args: &[&str],
        tap: Option<RawFd>,
        env: &[(&str, &str)],
        resolv: Option<&Path>,
    ) -> Net {
        use std::os::unix::ffi::OsStrExt;
        let resolv = resolv.map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap());
        let sock = dir.join("net.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let log = dir.join("net.log");
        let mut cmd = Command::new(bin);
        cmd.args(["--socket-fd", "3"]);
        if tap.is_some() {
            cmd.args(["--tap-fd", "4"]);
        }
        cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let mut sources = [Some(listener.as_raw_fd()), tap];
        // SAFETY: unshare, mount, fcntl and dup2 only, between fork and exec (async-signal-safe; the path was
        // made before the fork); the sources are open in this process. Each source moves above the targets first, so no dup2 overwrites one not moved yet.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(r) = &resolv {
                    let none = std::ptr::null();
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()) != 0
                        || libc::mount(r.as_ptr(), c"/etc/resolv.conf".as_ptr(), none, libc::MS_BIND, none.cast()) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for s in sources.iter_mut().flatten() {
                    *s = libc::fcntl(*s, libc::F_DUPFD_CLOEXEC, 64);
                    if *s < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, s) in sources.iter().enumerate() {
                    if let Some(fd) = s {
                        if libc::dup2(*fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        let keep: Vec<RawFd> = if tap.is_some() { vec![3, 4] } else { vec![3] };
        tessera_policy::prepare_command(&mut cmd, &options(), &keep);
        let child = cmd.spawn().unwrap();
        Net { child, sock, log, _listener: listener }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process is filtered (Seccomp 2); panics with its log if it ends first.
    fn wait_confined(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
            if status.lines().any(|l| l == "Seccomp:\t2") {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("tessera-net ended ({st}) before it was confined: {}", self.logs());
            }
            assert!(Instant::now() < deadline, "tessera-net never confined itself: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end (at most 20 s).
    fn wait_end(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "tessera-net did not end: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET_FEATURES over the vhost-user socket (vhost-user spec: header request 1, flags version 1).
    fn features(&self) -> u64 {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut m = Vec::new();
        for w in [1u32, 1, 0] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        s.write_all(&m).unwrap();
        let mut reply = [0u8; 20];
        s.read_exact(&mut reply).unwrap_or_else(|e| panic!("no GET_FEATURES reply ({e}): {}", self.logs()));
        u64::from_le_bytes(reply[12..20].try_into().unwrap())
    }

    /// Seccomp, NoNewPrivs, capabilities, uid, root (empty but for `root_files`, the profile's
    /// `filesystem.read_only`); whether its network namespace is the test's.
    fn assert_confined(&self, own_net_namespace: bool, root_files: &[&str]) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| -> String {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        assert_eq!(field("Seccomp"), "2");
        assert_eq!(field("NoNewPrivs"), "1");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(cap), "0000000000000000", "{cap}");
        }
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            // A thread that ended meanwhile (the relay of a closed connection) has no status to read.
            let Ok(s) = std::fs::read_to_string(t.unwrap().path().join("status")) else { continue };
            if s.is_empty() {
                continue;
            }
            assert!(s.lines().any(|l| l == "Seccomp:\t2"), "every thread is filtered: {s}");
        }
        if is_root() {
            let want = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
            assert_eq!(field("Uid"), want);
            let root = Path::new("/proc").join(pid.to_string()).join("root");
            let mut top: Vec<String> = std::fs::read_dir(&root)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            top.sort();
            let mut want: Vec<String> = root_files
                .iter()
                .filter(|f| Path::new(f).exists())
                .map(|f| f.trim_start_matches('/').split('/').next().unwrap().to_string())
                .collect();
            want.sort();
            want.dedup();
            assert_eq!(top, want, "its root holds only {root_files:?}");
            for f in root_files.iter().filter(|f| Path::new(f).exists()) {
                let inside = root.join(f.trim_start_matches('/'));
                let meta = std::fs::metadata(&inside).unwrap_or_else(|e| panic!("{f} in its root: {e}"));
                assert_eq!(meta.file_type(), std::fs::metadata(f).unwrap().file_type(), "{f}");
                if meta.is_file() {
                    assert_eq!(std::fs::read(&inside).unwrap(), std::fs::read(f).unwrap(), "{f}: the host's file");
                }
            }
            let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
            for f in root_files.iter().filter(|f| Path::new(f).exists()) {
                let line =
                    mounts.lines().find(|l| l.split(' ').nth(1) == Some(f)).unwrap_or_else(|| panic!("{f}: {mounts}"));
                let opts = line.split(' ').nth(3).unwrap();
                assert!(opts.split(',').any(|o| o == "ro"), "{f} is mounted read-only: {line}");
            }
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
            let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
            assert_eq!(theirs != ours, own_net_namespace, "network namespace {theirs:?} (ours {ours:?})");
        } else {
            eprintln!("not root: -runas, the root and the namespaces of a non-dumpable process are not checked");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tessera_net(test: &str) -> Option<PathBuf> {
    let bin = bins::binary("tessera-net", "tessera-net");
    if has_socket_fd(&bin) {
        Some(bin)
    } else {
        eprintln!("{test}: skipped, this tessera-net has no --socket-fd (the net branch adds it)");
        None
    }
}

#[test]
fn user_mode_networking_runs_confined_in_the_host_network_namespace() {
    let Some(bin) = tessera_net("user_mode_networking_runs_confined_in_the_host_network_namespace") else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let user = format!("hostfwd=tcp:127.0.0.1:{port}-:8080");
    let mut net = Net::start(dir.path(), &bin, &["--user", &user], None, &[("RUST_LOG", "debug")]);
    net.wait_confined();
    let f = net.features();
    assert!(f & (1 << 32) != 0, "VERSION_1 offered: {f:#x}");
    net.assert_confined(false, NET_USER_FILES);
    // The hostfwd= listener libslirp opened after confinement takes a host connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        assert!(Instant::now() < deadline, "hostfwd port {port} refuses ({e}): {}", net.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(net.logs().contains("tessera-net: sandboxed:"), "the sandbox report: {}", net.logs());
    assert!(matches!(net.child.try_wait(), Ok(None)), "still serving: {}", net.logs());
}

/// A tap interface (non-persistent, gone with its last descriptor), opened as the launcher opens one.
fn open_tap() -> std::fs::File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
    let mut req = IfReq { name: [0; 16], flags: 0x0002 | 0x1000, _pad: [0; 22] }; // IFF_TAP | IFF_NO_PI
    req.name[..9].copy_from_slice(b"tsbx%d\0\0\0");
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes), which IfReq lays out.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), 0x400454ca, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file
}

fn tap_available(test: &str) -> bool {
    if is_root() && Path::new("/dev/net/tun").exists() {
        return true;
    }
    eprintln!("{test}: skipped, needs root and /dev/net/tun to open a tap");
    false
}

#[test]
fn a_tap_backend_runs_confined_in_a_network_namespace_of_its_own() {
    let Some(bin) = tessera_net("a_tap_backend_runs_confined_in_a_network_namespace_of_its_own") else { return };
    if !tap_available("a_tap_backend_runs_confined_in_a_network_namespace_of_its_own") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tap = open_tap();
    let mut net = Net::start(dir.path(), &bin, &[], Some(tap.as_raw_fd()), &[]);
    net.wait_confined();
    let f = net.features();
    assert!(f & (1 << 32) != 0, "VERSION_1 offered: {f:#x}");
    net.assert_confined(true, &[]);
    assert!(matches!(net.child.try_wait(), Ok(None)), "still serving: {}", net.logs());
}

#[test]
fn the_misbehaving_net_backend_is_denied_or_killed() {
    let test = "the_misbehaving_net_backend_is_denied_or_killed";
    if tessera_net(test).is_none() {
        return;
    }
    let bin = misbehave::binary("tessera-net");
    let dir = tempfile::tempdir().unwrap();
    // User mode: the two files of its root can be opened and read (libslirp's DNS forwarding needs
    // /etc/resolv.conf), and nothing else: /etc/passwd stays ENOENT.
    if NET_USER_FILES.iter().all(|f| Path::new(f).exists()) {
        let mut net = Net::start(
            dir.path(),
            &bin,
            &["--user"],
            None,
            &[("TESSERA_MISBEHAVE", "net:read-resolv-conf,read-urandom,open-passwd")],
        );
        net.wait_confined();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !net.logs().contains("misbehave: open-passwd: denied") {
            assert!(Instant::now() < deadline, "no misbehave lines: {}", net.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        let logs = net.logs();
        assert!(logs.contains("tessera-net: misbehave: read-resolv-conf: ALLOWED"), "{logs}");
        assert!(logs.contains("tessera-net: misbehave: read-urandom: ALLOWED"), "{logs}");
        assert!(logs.contains("tessera-net: misbehave: open-passwd: denied ENOENT"), "{logs}");
        assert!(matches!(net.child.try_wait(), Ok(None)), "still serving: {logs}");
    }
    // User mode: socket(AF_INET) is its job; a path, execve, ptrace and mount are not.
    for (ops, killer) in [("open-passwd,execve", "execve"), ("ptrace-parent", "ptrace-parent"), ("mount", "mount")] {
        let mut net = Net::start(dir.path(), &bin, &["--user"], None, &[("TESSERA_MISBEHAVE", &format!("net:{ops}"))]);
        let status = net.wait_end();
        let logs = net.logs();
        assert_eq!(status.signal(), Some(SIGSYS), "{ops}: {status:?} {logs}");
        if ops.starts_with("open-passwd") {
            assert!(logs.contains("tessera-net: misbehave: open-passwd: denied ENOENT"), "{logs}");
        }
        assert!(logs.contains(&format!("tessera-net: misbehave: {killer}: trying")), "{logs}");
        assert!(!logs.contains("ALLOWED"), "{logs}");
    }
    if !tap_available(test) {
        return;
    }
    let tap = open_tap();
    let mut net = Net::start(
        dir.path(),
        &bin,
        &[],
        Some(tap.as_raw_fd()),
        &[("TESSERA_MISBEHAVE", "net:open-passwd,socket-inet")],
    );
    let status = net.wait_end();
    let logs = net.logs();
    assert_eq!(status.signal(), Some(SIGSYS), "tap socket-inet: {status:?} {logs}");
    assert!(logs.contains("tessera-net: misbehave: open-passwd: denied ENOENT"), "{logs}");
    assert!(logs.contains("tessera-net: misbehave: socket-inet: trying"), "{logs}");
}

/// What cannot work confined is refused with a message saying so, instead of failing later or running less
/// confined: `--tap IFNAME` (opens /dev/net/tun by path) and `guestfwd=...-cmd:` (starts a program).
#[test]
fn what_cannot_work_confined_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bin = bins::binary("tessera-net", "tessera-net");
    for (args, says) in [
        (&["--tap", "tsbx-none"][..], "--tap tsbx-none opens /dev/net/tun by path, which the sandbox hides"),
        (
            &["--user", "guestfwd=tcp:10.0.2.100:1234-cmd:cat"][..],
            "guestfwd=...-cmd: starts a program, which a confined tessera-net cannot",
        ),
    ] {
        let out = Command::new(&bin)
            .arg("--socket-path")
            .arg(dir.path().join("never.sock"))
            .args(args)
            .env(tessera_policy::SANDBOX_ENV, "v1,on")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!dir.path().join("never.sock").exists(), "{args:?}: nothing was served");
    }
}

/// A DNS responder for the test (RFC 1035 §4.1): answers every query for an A record with `answer`, any
/// other type with no record; counts the queries it saw.
fn dns_responder(addr: &str, answer: [u8; 4]) -> (std::net::UdpSocket, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let sock =
        std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding the test's DNS responder {addr}: {e}"));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (s, count) = (sock.try_clone().unwrap(), seen.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            // Header (12 bytes), then the question: labels up to a zero byte, type and class.
            let mut at = 12;
            while at < n && q[at] != 0 {
                at += 1 + usize::from(q[at]);
            }
            if n < 12 || at + 5 > n {
                continue;
            }
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let question = &q[12..at + 5];
            let is_a = q[at + 1..at + 3] == [0, 1];
            let mut r = Vec::new();
            r.extend_from_slice(&q[0..2]); // id
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            r.extend_from_slice(question);
            if is_a {
                // Name: a pointer to the question's (offset 12); A, IN, TTL 60, 4 bytes.
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&answer);
            }
            let _ = s.send_to(&r, from);
        }
    });
    (sock, seen)
}

/// End to end: a guest of a confined `tessera-net --user` asks 10.0.2.3 for a name, and libslirp forwards
/// the query to the resolver /etc/resolv.conf names, as unconfined QEMU does. The resolver is the test's own
/// responder on 127.77.0.53 (port 53: root), named by a resolv.conf bound over the host's in a mount
/// namespace of tessera-net's own; a tessera-net that cannot read the file would send the query to
/// 127.0.0.1 instead and the guest would get no answer. Nothing leaves the machine.
#[test]
fn a_confined_user_mode_guest_resolves_names_through_the_hosts_resolver() {
    use tessera_tests::linux_guest::{direct_boot_args, ensure_debian_packages, kernel, run_guest_until, Initramfs};
    let test = "a_confined_user_mode_guest_resolves_names_through_the_hosts_resolver";
    let Some(bin) = tessera_net(test) else { return };
    if !is_root() {
        eprintln!("{test}: skipped, needs root (a mount namespace for the test's resolv.conf, UDP port 53)");
        return;
    }
    ensure_debian_packages(&["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_responder, queries) = dns_responder("127.77.0.53:53", [10, 9, 8, 7]);
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.77.0.53\n").unwrap();
    let mut net = Net::start_seeing(dir.path(), &bin, &["--user"], None, &[], Some(&resolv));
    net.wait_confined();
    let script = r#"
fail() { echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
route add default gw 10.0.2.2
nslookup tessera-dns.test 10.0.2.3 >/tmp/ns 2>&1
echo "TESSERA-NSLOOKUP-BEGIN"; cat /tmp/ns; echo "TESSERA-NSLOOKUP-END"
poweroff -f
"#;
    let initrd = Initramfs::new(script)
        .modules(&["virtio_pci", "failover", "net_failover", "virtio_net"])
        .build(&dir.path().join("initrd.gz"))
        .unwrap();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-m", "256M", "-nodefaults"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c,path={}", net.sock.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c", "-device", "virtio-net-pci,netdev=n0,vectors=0"])
        .args(direct_boot_args(&kernel().unwrap(), &initrd));
    let run = run_guest_until(qemu, Duration::from_secs(240), None, |out| {
        out.contains("TESSERA-NSLOOKUP-END") || out.contains("TESSERA-RESULT FAIL")
    })
    .unwrap();
    let alive = matches!(net.child.try_wait(), Ok(None));
    let ctx = || format!("--- guest ---\n{}\n--- tessera-net ---\n{}", run.serial, net.logs());
    assert!(run.serial.contains("TESSERA-NSLOOKUP-END"), "the guest did not get to its query:\n{}", ctx());
    let answer = run.serial.split("TESSERA-NSLOOKUP-BEGIN").nth(1).unwrap_or_default();
    assert!(answer.contains("10.9.8.7"), "no answer from the host's resolver:\n{}", ctx());
    assert!(queries.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the responder saw no query:\n{}", ctx());
    assert!(alive, "still serving:\n{}", ctx());
}
