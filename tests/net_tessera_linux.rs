//! Debian's Linux 6.1 on Tessera's own software CPU (`tessera -accel tcg`) with a network card, as a user runs
//! it: `-nic user,hostfwd=...` and `-netdev user,id=...` + `-device virtio-net-pci,netdev=...,mac=...`. The
//! launcher starts tessera-net, tessera-core drives the virtio-net-pci over vhost-user. Inside, busybox gets an
//! address by DHCP (`udhcpc`), fetches a page from an HTTP server the test runs on 127.0.0.1 (reached as
//! 10.0.2.2), and serves a page the test fetches from 127.0.0.1 through `hostfwd`; and keeps fetching while the
//! test kills tessera-net (the launcher restarts it, the core reconnects the device).
//!
//! Everything stays on this machine (servers on 127.0.0.1 only). Each guest run is bounded (240 s; a boot takes
//! about 20 s here) and a failure prints the guest's serial output and the launcher's messages.

#[path = "net_support.rs"]
mod net_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use net_support::{
    direct_boot_args, ensure_debian_packages, free_port, http_get, http_server, kernel, run_guest, token, Backend,
    Initramfs, TempDir, NET_MODULES,
};
use tessera_tests::bins;

const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const PACKAGES: &[&str] = &["busybox-static", "linux-image-amd64", "cpio"];

/// busybox udhcpc calls this with the lease in its environment.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet" up
    [ -n "$router" ] && route add default gw "$router" dev "$interface"
    echo "TESSERA-LEASE ip=$ip subnet=$subnet router=$router dns=$dns"
    ;;
esac
exit 0
"#;

/// Waits for eth0, takes a lease (QEMU's: 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3), prints the MAC.
const GUEST_PRELUDE: &str = r#"
fail() { echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }
chmod 755 /udhcpc.sh
ifconfig lo 127.0.0.1 up
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
echo "TESSERA-MAC $(cat /sys/class/net/eth0/address)"
ifconfig eth0 up
udhcpc -i eth0 -s /udhcpc.sh -q -f -n -t 10 -T 2 >/tmp/dhcp 2>&1 || fail "udhcpc: $(cat /tmp/dhcp)"
grep -q 'ip=10.0.2.15 subnet=255.255.255.0 router=10.0.2.2 dns=10.0.2.3' /tmp/dhcp || fail "unexpected lease: $(cat /tmp/dhcp)"
echo "TESSERA-STEP lease ok"
grep virtio /proc/interrupts
"#;

fn initrd(dir: &Path, script: &str) -> PathBuf {
    Initramfs::new(script)
        .modules(NET_MODULES)
        .file("/udhcpc.sh", UDHCPC_SCRIPT.as_bytes().to_vec())
        .build(&dir.join("initrd.gz"))
        .expect("build initramfs")
}

/// `tessera -accel tcg` booting Debian's kernel with `initrd` and the network options `net`.
fn tessera(initrd: &Path, net: &[String]) -> Command {
    bins::binary("tessera-net", "tessera-net");
    let mut cmd = bins::launcher_command("tessera");
    cmd.args(["-accel", "tcg", "-m", "256M"]).args(direct_boot_args(&kernel().expect("kernel"), initrd)).args(net);
    cmd
}

/// Boot, fetch from the host, serve through hostfwd; returns the guest's output after checking it.
fn fetch_both_ways(name: &str, net: impl FnOnce(u16) -> Vec<String>) -> String {
    ensure_debian_packages(PACKAGES).expect("install test packages");
    let dir = TempDir::new(name).expect("temp dir");
    let host_page = token("host");
    let guest_page = token("guest");
    let (http_port, hits) = http_server(host_page.clone());
    let fwd_port = free_port();
    let script = format!(
        "{GUEST_PRELUDE}\n\
         printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 30 10.0.2.2 {http_port} >/tmp/page 2>/tmp/err || fail \"nc: $(cat /tmp/err)\"\n\
         grep -q '{host_page}' /tmp/page || fail \"page from the host: $(cat /tmp/page)\"\n\
         echo TESSERA-STEP fetched from host\n\
         mkdir -p /www && echo '{guest_page}' > /www/index.html\n\
         httpd -p 8080 -h /www || fail httpd\n\
         echo TESSERA-HTTPD-READY\n\
         sleep 200\n"
    );
    let cmd = tessera(&initrd(dir.path(), &script), &net(fwd_port));
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
    .expect("run tessera");
    let ctx = format!("--- guest serial and launcher messages ---\n{}", run.serial);
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{ctx}");
    assert!(!run.timed_out, "guest timed out after {:?}:\n{ctx}", run.elapsed);
    assert!(run.serial.contains("TESSERA-STEP fetched from host"), "{ctx}");
    assert!(hits.load(Ordering::SeqCst) >= 1, "the host server saw no request:\n{ctx}");
    // Interrupts are MSI-X, one vector per queue.
    for want in ["PCI-MSI", "virtio0-input.0", "virtio0-output.0"] {
        assert!(run.serial.contains(want), "{want:?} missing:\n{ctx}");
    }
    match fetched {
        Some(Ok(resp)) => assert!(resp.contains(&guest_page), "hostfwd answer lacks the page: {resp:?}\n{ctx}"),
        Some(Err(e)) => panic!("hostfwd fetch failed: {e}\n{ctx}"),
        None => panic!("the guest never got its server ready:\n{ctx}"),
    }
    run.serial
}

#[test]
fn nic_user_dhcp_fetch_and_hostfwd() {
    let out = fetch_both_ways("core-nic-user", |port| {
        vec!["-nic".into(), format!("user,hostfwd=tcp:127.0.0.1:{port}-:8080")]
    });
    // QEMU's first default MAC.
    assert!(out.contains("TESSERA-MAC 52:54:00:12:34:56"), "{out}");
}

#[test]
fn netdev_user_with_device_and_mac() {
    let out = fetch_both_ways("core-netdev-user", |port| {
        vec![
            "-netdev".into(),
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080"),
            "-device".into(),
            "virtio-net-pci,netdev=n0,mac=52:54:00:ab:cd:ef".into(),
        ]
    });
    assert!(out.contains("TESSERA-MAC 52:54:00:ab:cd:ef"), "{out}");
}

#[test]
fn netdev_vhost_user_with_an_external_backend() {
    // tessera-net started by the test, reached through -chardev socket as QEMU users write it; guest RAM must be
    // a share=on memory backend then (QEMU's rule for vhost-user).
    ensure_debian_packages(PACKAGES).expect("install test packages");
    let dir = TempDir::new("core-netdev-vhost-user").expect("temp dir");
    let backend_dir = dir.path().to_path_buf();
    let mut backend: Option<Backend> = None;
    let out = fetch_both_ways("core-netdev-vhost-user", |port| {
        let (b, sock) = Backend::start(&backend_dir, &["--user", &format!("hostfwd=tcp:127.0.0.1:{port}-:8080")]);
        backend = Some(b);
        vec![
            "-object".into(),
            "memory-backend-memfd,id=mem,size=256M,share=on".into(),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-chardev".into(),
            format!("socket,id=c0,path={}", sock.display()),
            "-netdev".into(),
            "vhost-user,id=n0,chardev=c0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ]
    });
    assert!(out.contains("TESSERA-MAC 52:54:00:12:34:56"), "{out}");
    let alive = backend.as_mut().is_some_and(|b| b.alive());
    assert!(alive, "tessera-net died: {}", backend.map(|b| b.logs()).unwrap_or_default());
}

#[test]
fn netdev_vhost_user_needs_shared_memory() {
    // Without share=on the core refuses an external vhost-user backend with QEMU's message, before the guest
    // runs; the backend is connected to but never given memory.
    let dir = TempDir::new("core-netdev-noshare").expect("temp dir");
    let (_b, sock) = Backend::start(dir.path(), &["--user"]);
    let mut cmd = bins::launcher_command("tessera");
    cmd.args(["-accel", "tcg", "-m", "256M", "-display", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel().expect("kernel"))
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", sock.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c0", "-device", "virtio-net-pci,netdev=n0"]);
    let out = bins::wait_output(cmd.spawn().expect("start tessera"), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "-device virtio-net-pci,netdev=n0: Failed initializing vhost-user memory map, consider using -object \
             memory-backend-file share=on"
        ),
        "{stderr}"
    );
}

/// Pids of the tessera-net processes whose command line holds `needle` (a port unique to this test).
fn tessera_net_pids(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("tessera-net") && cmdline.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn a_killed_tessera_net_is_restarted_and_the_guest_keeps_fetching() {
    // Issue #8 for the network: the launcher restarts a tessera-net that died, the core reconnects the
    // virtio-net device to it, and the guest, not reset, fetches from the host again (connections open at the
    // kill are lost with libslirp's state, as after a host network outage; later ones work).
    const KILLS: usize = 3;
    ensure_debian_packages(PACKAGES).expect("install test packages");
    let dir = TempDir::new("core-net-restart").expect("temp dir");
    let page = token("restart");
    let (http_port, hits) = http_server(page.clone());
    let fwd_port = free_port();
    let script = format!(
        "{GUEST_PRELUDE}\n\
         i=0\n\
         while [ $i -lt 400 ]; do\n\
           if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 10.0.2.2 {http_port} 2>/dev/null | grep -q '{page}'; then\n\
             echo \"FETCH $i ok\"\n\
           else echo \"FETCH $i failed\"; fi\n\
           [ -e /tmp/stop ] && break\n\
           i=$((i+1)); sleep 0.3\n\
         done\n\
         echo TESSERA-FETCH-LOOP-END\n\
         poweroff -f\n"
    );
    let net = vec!["-nic".to_string(), format!("user,hostfwd=tcp:127.0.0.1:{fwd_port}-:8080")];
    let cmd = tessera(&initrd(dir.path(), &script), &net);
    let needle = format!("{fwd_port}-:8080");
    // Kill after some fetches went through; the next kill only after a fetch succeeded since the last one.
    let mut kills: Vec<(i32, usize)> = Vec::new();
    let mut ok_after_last_kill = 0;
    let run = run_guest(cmd, GUEST_TIMEOUT, |out| {
        if out.contains("TESSERA-RESULT FAIL") || out.contains("TESSERA-FETCH-LOOP-END") {
            return true;
        }
        let oks = out.lines().filter(|l| l.starts_with("FETCH ") && l.trim_end().ends_with(" ok")).count();
        let since = kills.last().map_or(0, |&(_, at)| at);
        ok_after_last_kill = oks.saturating_sub(since);
        if ok_after_last_kill >= 3 && kills.len() < KILLS {
            let pids = tessera_net_pids(&needle);
            if let [pid] = pids[..] {
                // SAFETY: kill(2) on a pid this test found by its unique command line; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills.push((pid, oks));
                ok_after_last_kill = 0;
            }
        }
        // Enough after the last kill: let the guest finish.
        if kills.len() == KILLS && ok_after_last_kill >= 3 {
            return true;
        }
        false
    })
    .expect("run tessera");
    let ctx = format!("--- guest serial and launcher messages ---\n{}", run.serial);
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{ctx}");
    assert_eq!(kills.len(), KILLS, "not every kill happened (fetches stopped working?):\n{ctx}");
    assert!(ok_after_last_kill >= 3, "the guest fetched nothing after the last restart:\n{ctx}");
    let distinct: std::collections::HashSet<i32> = kills.iter().map(|&(p, _)| p).collect();
    assert_eq!(distinct.len(), KILLS, "each kill found a new tessera-net process: {kills:?}\n{ctx}");
    let (hits, kill_points) = (hits.load(Ordering::SeqCst), kills.iter().map(|&(_, at)| at).collect::<Vec<_>>());
    assert!(hits >= 3 * (KILLS + 1), "the host server saw {hits} requests (kills after {kill_points:?}):\n{ctx}");
    eprintln!("killed tessera-net {KILLS} times ({kills:?}); the guest kept fetching");
}
