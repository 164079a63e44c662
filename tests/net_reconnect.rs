//! The serve-again loop end to end: tessera-net is killed and started again on the same socket
//! while a guest under QEMU TCG runs (`-chardev socket,...,reconnect=1`); QEMU reconnects and
//! the guest, keeping its DHCP address, reaches the host again. (User-mode connection state is
//! per process and is lost with it; that is expected.)

#[path = "net_support.rs"]
mod net_support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use net_support::{
    direct_boot_args, ensure_debian_packages, kernel, run_guest, Backend, Initramfs, TempDir, NET_MODULES,
};

const UDHCPC_SCRIPT: &str =
    "#!/bin/sh\n[ \"$1\" = bound ] && ifconfig \"$interface\" \"$ip\" netmask \"$subnet\" up\nexit 0\n";

/// A server on 127.0.0.1 answering each connection with `body` (bounded number of them).
fn server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().take(64) {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 512];
            let _ = s.read(&mut b);
            let _ = s.write_all(body.as_bytes());
        }
    });
    port
}

#[test]
fn guest_keeps_networking_across_a_backend_restart() {
    ensure_debian_packages(&["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio"]).expect("packages");
    let dir = TempDir::new("net-reconnect").expect("temp dir");
    let port = server("reconnect-token\n");
    let script = format!(
        r#"
chmod 755 /udhcpc.sh
fail() {{ echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }}
i=0; while ! ifconfig eth0 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && fail eth0; sleep 0.1; done
ifconfig eth0 up
udhcpc -i eth0 -s /udhcpc.sh -q -f -n -t 10 -T 2 >/tmp/dhcp 2>&1 || fail "dhcp: $(cat /tmp/dhcp)"
echo x | nc -w 10 10.0.2.2 {port} >/tmp/p1 2>&1; grep -q reconnect-token /tmp/p1 || fail "before restart: $(cat /tmp/p1)"
echo TESSERA-PHASE1
sleep 3
i=0
until echo x | nc -w 5 10.0.2.2 {port} >/tmp/p2 2>&1 && grep -q reconnect-token /tmp/p2; do
    i=$((i+1)); [ $i -gt 30 ] && fail "after restart: $(cat /tmp/p2)"
    sleep 2
done
echo "TESSERA-RESULT PASS after $i retries"
"#
    );
    let initrd = Initramfs::new(&script)
        .modules(NET_MODULES)
        .file("/udhcpc.sh", UDHCPC_SCRIPT.as_bytes().to_vec())
        .build(&dir.path().join("initrd.gz"))
        .expect("initramfs");
    let (first, sock) = Backend::start(dir.path(), &["--user"]);
    let mut backends = vec![first];
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c,path={},reconnect=1", sock.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c", "-device", "virtio-net-pci,netdev=n0,vectors=0"])
        .args(direct_boot_args(&kernel().expect("kernel"), &initrd));
    let mut restarted = false;
    let run = run_guest(cmd, Duration::from_secs(240), |out| {
        if out.contains("TESSERA-RESULT") {
            return true;
        }
        if out.contains("TESSERA-PHASE1") && !restarted {
            restarted = true;
            backends.clear(); // kills the first process
            let _ = std::fs::remove_file(&sock);
            backends.push(Backend::start(dir.path(), &["--user"]).0);
        }
        false
    })
    .expect("run qemu");
    let logs: String = backends.iter().map(|b| b.logs()).collect();
    let ctx = format!("--- guest ---\n{}\n--- tessera-net (second) ---\n{logs}", run.serial);
    assert!(restarted, "the guest never reached the restart point:\n{ctx}");
    assert!(run.serial.contains("TESSERA-RESULT PASS"), "{ctx}");
    assert!(logs.contains("front end connected"), "QEMU never reconnected to the second process:\n{ctx}");
    let alive = backends.iter_mut().all(|b| b.alive());
    assert!(alive, "the restarted tessera-net died:\n{ctx}");
}
