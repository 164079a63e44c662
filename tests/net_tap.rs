//! tessera-net on a tap device: a guest under QEMU TCG and a network namespace the test makes
//! itself (`ip netns add`), joined by a tap in that namespace that tessera-net opens with
//! `--tap`. The guest fetches a page from busybox httpd in the namespace and the namespace
//! fetches one from busybox httpd in the guest; no traffic leaves the namespace.
//! Needs root (CAP_NET_ADMIN) for the namespace; without it the test says so and passes
//! nothing off as tested.
//!
//! Also: `--tap-fd` with a descriptor that is not a tap is refused with a clear error.

#[path = "net_support.rs"]
mod net_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use net_support::{built_binary, ensure_debian_packages, qemu, run_guest, Backend, Initramfs, TempDir, NET_MODULES};

const NS_ADDR: &str = "10.199.0.1";
const GUEST_ADDR: &str = "10.199.0.2";

/// A network namespace with a tap in it, removed on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Netns {
    fn new(name: &str) -> Result<Self, String> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&["-n", name, "addr", "add", &format!("{NS_ADDR}/24"), "dev", "tap0"])?;
        ip(&["-n", name, "link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME` as a command prefix.
    fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn guest_and_namespace_talk_over_tap() {
    if !is_root() {
        eprintln!("SKIPPED: creating a network namespace and a tap needs root");
        return;
    }
    ensure_debian_packages(&["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio", "iproute2"])
        .expect("install test packages");
    let dir = TempDir::new("net-tap").expect("temp dir");
    let ns = Netns::new(&format!("tessera-net-{}", std::process::id())).expect("make the test namespace");
    let exec = ns.exec();
    let exec: Vec<&str> = exec.iter().map(String::as_str).collect();

    // A page served inside the namespace.
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("index.html"), "page-from-the-namespace\n").expect("page");
    let mut httpd = Command::new(exec[0])
        .args(&exec[1..])
        .args(["busybox", "httpd", "-f", "-p", &format!("{NS_ADDR}:8081"), "-h"])
        .arg(&www)
        .spawn()
        .expect("start httpd in the namespace");

    let (mut backend, sock) = Backend::start_with(dir.path(), &exec, &["--tap", "tap0"]);
    let script = format!(
        r#"
fail() {{ echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }}
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
ifconfig eth0 {GUEST_ADDR} netmask 255.255.255.0 up
ping -c 2 -W 5 {NS_ADDR} >/tmp/ping 2>&1 || fail "ping: $(cat /tmp/ping)"
printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 20 {NS_ADDR} 8081 >/tmp/page 2>&1 || fail "nc: $(cat /tmp/page)"
grep -q page-from-the-namespace /tmp/page || fail "page: $(cat /tmp/page)"
echo "TESSERA-STEP fetched from the namespace"
mkdir -p /www && echo page-from-the-guest > /www/index.html
httpd -p 8080 -h /www || fail httpd
echo "TESSERA-HTTPD-READY"
sleep 200
"#
    );
    let initrd = Initramfs::new(&script).modules(NET_MODULES).build(&dir.path().join("initrd.gz")).expect("initramfs");
    let mut fetched: Option<Result<String, String>> = None;
    let run = run_guest(qemu(&sock, &initrd), Duration::from_secs(240), |out| {
        if out.contains("TESSERA-RESULT FAIL") {
            return true;
        }
        if out.contains("TESSERA-HTTPD-READY") && fetched.is_none() {
            let o = Command::new(exec[0])
                .args(&exec[1..])
                // busybox nc, not wget: the static busybox's wget crashes in glibc's NSS.
                .args([
                    "sh",
                    "-c",
                    &format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 20 {GUEST_ADDR} 8080"),
                ])
                .output();
            fetched = Some(match o {
                Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
                Ok(o) => Err(format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr))),
                Err(e) => Err(e.to_string()),
            });
            return true;
        }
        false
    })
    .expect("run qemu");
    let _ = httpd.kill();
    let _ = httpd.wait();
    let alive = backend.alive();
    let ctx = || format!("--- guest ---\n{}\n--- tessera-net ---\n{}", run.serial, backend.logs());
    assert!(alive, "tessera-net died:\n{}", ctx());
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{}", ctx());
    assert!(run.serial.contains("TESSERA-STEP fetched from the namespace"), "{}", ctx());
    match fetched {
        Some(Ok(page)) => assert!(page.contains("page-from-the-guest"), "got {page:?}\n{}", ctx()),
        Some(Err(e)) => panic!("fetching from the guest failed: {e}\n{}", ctx()),
        None => panic!("the guest never got its server ready:\n{}", ctx()),
    }
}

#[test]
fn tap_fd_that_is_not_a_tap_is_refused() {
    let dir = TempDir::new("net-tapfd").expect("temp dir");
    let bin = built_binary("tessera-net").expect("tessera-net binary");
    // fd 0 is /dev/null here: open, but not a tap.
    let out = Command::new(bin)
        .args(["--socket-path"])
        .arg(dir.path().join("s.sock"))
        .args(["--tap-fd", "0"])
        .stdin(std::fs::File::open("/dev/null").expect("/dev/null"))
        .output()
        .expect("run tessera-net");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted /dev/null as a tap: {err}");
    assert!(err.contains("fd 0") && err.contains("not a tun/tap descriptor"), "{err}");
    assert!(!Path::new(&dir.path().join("s.sock")).exists(), "served a socket without a host side");
    // A descriptor that is not open at all is named too.
    let out = Command::new(built_binary("tessera-net").expect("bin"))
        .args(["--socket-path", "/nonexistent/s.sock", "--tap-fd", "987"])
        .output()
        .expect("run tessera-net");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tap-fd 987 is not an open file descriptor"), "{err}");
}
