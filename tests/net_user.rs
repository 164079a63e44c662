//! End to end: Debian's kernel under Debian's QEMU (`-accel tcg`) with a virtio-net-pci device
//! on `-netdev vhost-user`, served by `tessera-net --user`. Inside, busybox gets an address by
//! DHCP, fetches a page from an HTTP server the test runs on 127.0.0.1 (reached as 10.0.2.2),
//! and serves a page that the test fetches from 127.0.0.1 through `hostfwd`. With
//! `restrict=on` the guest cannot reach the host, while hostfwd still works.
//!
//! Everything stays on this machine: the servers listen on 127.0.0.1 only. Each guest run is
//! bounded; a failure prints the guest's serial output and the backend's log.

#[path = "net_support.rs"]
mod net_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use net_support::{
    ensure_debian_packages, free_port, http_get, http_server, qemu, run_guest, token, Backend, Initramfs, TempDir,
    NET_MODULES,
};

const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio"];

/// busybox udhcpc calls this with the lease in its environment.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet" up
    [ -n "$router" ] && route add default gw "$router" dev "$interface"
    echo "nameserver $dns" > /etc/resolv.conf
    echo "TESSERA-LEASE ip=$ip subnet=$subnet router=$router dns=$dns"
    ;;
esac
exit 0
"#;

const GUEST_PRELUDE: &str = r#"
fail() { echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }
ifconfig lo 127.0.0.1 up
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
ifconfig eth0 up
udhcpc -i eth0 -s /udhcpc.sh -q -f -n -t 10 -T 2 >/tmp/dhcp 2>&1 || fail "udhcpc: $(cat /tmp/dhcp)"
grep -q "$EXPECTED_LEASE" /tmp/dhcp || fail "unexpected lease: $(cat /tmp/dhcp)"
echo "TESSERA-STEP lease ok"
"#;

/// QEMU's lease: 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.
const FULL_LEASE: &str = "EXPECTED_LEASE='ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3'";
/// With restrict=on libslirp (like QEMU) offers neither a gateway nor a DNS server.
const RESTRICTED_LEASE: &str = "EXPECTED_LEASE='ip=10.0.2.15 subnet=255.255.255.0 router= dns='";

fn initrd(dir: &Path, script: &str) -> PathBuf {
    Initramfs::new(script)
        .modules(NET_MODULES)
        .file("/udhcpc.sh", UDHCPC_SCRIPT.as_bytes().to_vec())
        .build(&dir.join("initrd.gz"))
        .expect("build initramfs")
}

fn setup(name: &str) -> TempDir {
    ensure_debian_packages(PACKAGES).expect("install test packages");
    // The udhcpc script must be executable: the initramfs builder writes plain files.
    TempDir::new(name).expect("temp dir")
}

/// The guest serves `page` with busybox httpd on port 8080, prints the marker, and waits.
fn guest_httpd(page: &str) -> String {
    format!(
        r#"
mkdir -p /www && echo "{page}" > /www/index.html
httpd -p 8080 -h /www || fail "httpd"
echo "TESSERA-HTTPD-READY"
sleep 200
"#
    )
}

#[test]
fn dhcp_fetch_from_host_and_hostfwd() {
    let dir = setup("net-user");
    let host_page = token("host");
    let guest_page = token("guest");
    let (http_port, hits) = http_server(host_page.clone());
    let fwd_port = free_port();
    let opts = format!("hostfwd=tcp:127.0.0.1:{fwd_port}-:8080");
    let (mut backend, sock) = Backend::start(dir.path(), &["--user", &opts]);
    let script = format!(
        "chmod 755 /udhcpc.sh\n{FULL_LEASE}\n{GUEST_PRELUDE}\n\
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 20 10.0.2.2 {http_port} >/tmp/page 2>/tmp/err || fail \"nc: $(cat /tmp/err)\"\n\
         grep -q '{host_page}' /tmp/page || fail \"page from the host: $(cat /tmp/page)\"\n\
         echo TESSERA-STEP fetched from host\n{}",
        guest_httpd(&guest_page)
    );
    let cmd = qemu(&sock, &initrd(dir.path(), &script));
    let mut fetched: Option<std::io::Result<String>> = None;
    let run = run_guest(cmd, GUEST_TIMEOUT, |out| {
        if out.contains("TESSERA-RESULT FAIL") {
            return true;
        }
        if out.contains("TESSERA-HTTPD-READY") && fetched.is_none() {
            fetched = Some(http_get(fwd_port));
            return true;
        }
        false
    })
    .expect("run qemu");
    let alive = backend.alive();
    let ctx = || format!("--- guest ---\n{}\n--- tessera-net ---\n{}", run.serial, backend.logs());
    assert!(alive, "tessera-net died:\n{}", ctx());
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{}", ctx());
    assert!(!run.timed_out, "guest timed out after {:?}:\n{}", run.elapsed, ctx());
    assert!(run.serial.contains("TESSERA-STEP fetched from host"), "{}", ctx());
    assert!(hits.load(Ordering::SeqCst) >= 1, "the host server saw no request:\n{}", ctx());
    match fetched {
        Some(Ok(resp)) => assert!(resp.contains(&guest_page), "hostfwd answer lacks the page: {resp:?}\n{}", ctx()),
        Some(Err(e)) => panic!("hostfwd fetch failed: {e}\n{}", ctx()),
        None => panic!("the guest never got its server ready:\n{}", ctx()),
    }
}

#[test]
fn restrict_on_isolates_the_guest_but_hostfwd_works() {
    let dir = setup("net-restrict");
    let guest_page = token("restricted");
    let (http_port, hits) = http_server("must not be reached".into());
    let fwd_port = free_port();
    let opts = format!("restrict=on,hostfwd=tcp:127.0.0.1:{fwd_port}-:8080");
    let (mut backend, sock) = Backend::start(dir.path(), &["--user", &opts]);
    let script = format!(
        "chmod 755 /udhcpc.sh\n{RESTRICTED_LEASE}\n{GUEST_PRELUDE}\n\
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 {http_port} >/tmp/page 2>/tmp/err\n\
         grep -q 'must not' /tmp/page && fail \"restricted guest reached the host\"\n\
         echo TESSERA-STEP host unreachable\n{}",
        guest_httpd(&guest_page)
    );
    let cmd = qemu(&sock, &initrd(dir.path(), &script));
    let mut fetched: Option<std::io::Result<String>> = None;
    let run = run_guest(cmd, GUEST_TIMEOUT, |out| {
        if out.contains("TESSERA-RESULT FAIL") {
            return true;
        }
        if out.contains("TESSERA-HTTPD-READY") && fetched.is_none() {
            fetched = Some(http_get(fwd_port));
            return true;
        }
        false
    })
    .expect("run qemu");
    let alive = backend.alive();
    let ctx = || format!("--- guest ---\n{}\n--- tessera-net ---\n{}", run.serial, backend.logs());
    assert!(alive, "tessera-net died:\n{}", ctx());
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{}", ctx());
    assert!(run.serial.contains("TESSERA-STEP host unreachable"), "{}", ctx());
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the restricted guest reached the host server:\n{}", ctx());
    match fetched {
        Some(Ok(resp)) => assert!(resp.contains(&guest_page), "hostfwd answer lacks the page: {resp:?}\n{}", ctx()),
        Some(Err(e)) => panic!("hostfwd fetch failed: {e}\n{}", ctx()),
        None => panic!("the guest never got its server ready:\n{}", ctx()),
    }
}
