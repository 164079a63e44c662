//! `-netdev tap,ifname=...,script=no,downscript=no` on Tessera: the launcher runs inside a network namespace the
//! test makes (`ip netns exec`), opens the tap there and passes it to the tessera-net it starts; Debian's Linux on
//! Tessera's software CPU and the namespace fetch pages from each other (busybox httpd on both sides), after a
//! ping. No traffic leaves the namespace. Needs root (CAP_NET_ADMIN); without it the test says so and checks
//! nothing.
//!
//! The launcher opens the tap with a vnet header, so the guest negotiates checksum and TCP segmentation offloads
//! (checked in the device's feature bits); pages of 1 MiB each way make the guest send and receive frames beyond
//! the MTU.
//!
//! Also: a tap the kernel refuses fails with QEMU's message (compared with the installed QEMU 7.2).

#[path = "net_support.rs"]
mod net_support;

use std::process::Command;
use std::time::Duration;

use net_support::{direct_boot_args, ensure_debian_packages, kernel, run_guest, Initramfs, TempDir, NET_MODULES};
use tessera_tests::bins;

const NS_ADDR: &str = "10.198.0.1";
const GUEST_ADDR: &str = "10.198.0.2";
/// Size of the large pages fetched each way, all `q` (a letter busybox httpd's headers never have).
const BIG: usize = 1 << 20;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A network namespace with a persistent tap `tap0` (address NS_ADDR/24) in it, removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Self, String> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        ip(&["-n", name, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&["-n", name, "addr", "add", &format!("{NS_ADDR}/24"), "dev", "tap0"])?;
        ip(&["-n", name, "link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn guest_on_tessera_and_namespace_talk_over_tap() {
    if !is_root() {
        eprintln!("SKIPPED: creating a network namespace and a tap needs root");
        return;
    }
    ensure_debian_packages(&["busybox-static", "linux-image-amd64", "cpio", "iproute2"]).expect("packages");
    let dir = TempDir::new("core-net-tap").expect("temp dir");
    let ns = Netns::new(&format!("tessera-core-net-{}", std::process::id())).expect("make the test namespace");

    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("index.html"), "page-from-the-namespace\n").expect("page");
    std::fs::write(www.join("big"), vec![b'q'; BIG]).expect("big page");
    let mut httpd = ns
        .exec()
        .args(["busybox", "httpd", "-f", "-p", &format!("{NS_ADDR}:8081"), "-h"])
        .arg(&www)
        .spawn()
        .expect("start httpd in the namespace");

    let script = format!(
        r#"
fail() {{ echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }}
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
ifconfig eth0 {GUEST_ADDR} netmask 255.255.255.0 up
echo "TESSERA-FEATURES $(cat /sys/bus/virtio/devices/virtio0/features)"
ping -c 2 -W 10 {NS_ADDR} >/tmp/ping 2>&1 || fail "ping: $(cat /tmp/ping)"
printf 'GET /index.html HTTP/1.0\r\n\r\n' | nc -w 30 {NS_ADDR} 8081 >/tmp/page 2>&1 || fail "nc: $(cat /tmp/page)"
grep -q page-from-the-namespace /tmp/page || fail "page: $(cat /tmp/page)"
echo "TESSERA-STEP fetched from the namespace"
printf 'GET /big HTTP/1.0\r\n\r\n' | nc -w 60 {NS_ADDR} 8081 >/tmp/big 2>&1 || fail "nc big: $(tail -c 200 /tmp/big)"
echo "TESSERA-BIG-FROM-NS $(tr -cd q </tmp/big | wc -c)"
mkdir -p /www && echo page-from-the-guest > /www/index.html
dd if=/dev/zero bs=1024 count={big_kib} 2>/dev/null | tr '\0' q > /www/big
httpd -p 8080 -h /www || fail httpd
echo "TESSERA-HTTPD-READY"
sleep 200
"#,
        big_kib = BIG / 1024
    );
    let initrd = Initramfs::new(&script).modules(NET_MODULES).build(&dir.path().join("initrd.gz")).expect("initramfs");
    for (package, bin) in
        [("tessera-core", "tessera-core"), ("tessera-chardev", "tessera-chardev"), ("tessera-net", "tessera-net")]
    {
        bins::binary(package, bin);
    }
    let mut cmd = ns.exec();
    cmd.arg(bins::launcher("tessera"))
        .args(["-accel", "tcg", "-m", "256M"])
        .args(direct_boot_args(&kernel().expect("kernel"), &initrd))
        .args(["-netdev", "tap,id=t0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-pci,netdev=t0"]);
    let mut fetched: Option<Result<String, String>> = None;
    let mut big: Option<Result<usize, String>> = None;
    let run = run_guest(cmd, Duration::from_secs(240), |out| {
        if out.contains("TESSERA-RESULT FAIL") {
            return true;
        }
        if out.contains("TESSERA-HTTPD-READY") && fetched.is_none() {
            let o = ns
                .exec()
                // busybox nc, not wget: the static busybox's wget crashes in glibc's NSS.
                .args([
                    "sh",
                    "-c",
                    &format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 30 {GUEST_ADDR} 8080"),
                ])
                .output();
            fetched = Some(match o {
                Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
                Ok(o) => Err(format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr))),
                Err(e) => Err(e.to_string()),
            });
            let o = ns
                .exec()
                .args([
                    "sh",
                    "-c",
                    &format!("printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 60 {GUEST_ADDR} 8080"),
                ])
                .output();
            big = Some(match o {
                Ok(o) if o.status.success() => Ok(o.stdout.iter().filter(|&&b| b == b'q').count()),
                Ok(o) => Err(format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr))),
                Err(e) => Err(e.to_string()),
            });
            return true;
        }
        false
    })
    .expect("run tessera");
    let _ = httpd.kill();
    let _ = httpd.wait();
    let ctx = format!("--- guest serial and launcher messages ---\n{}", run.serial);
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{ctx}");
    assert!(run.serial.contains("TESSERA-STEP fetched from the namespace"), "{ctx}");
    match fetched {
        Some(Ok(page)) => assert!(page.contains("page-from-the-guest"), "got {page:?}\n{ctx}"),
        Some(Err(e)) => panic!("fetching from the guest failed: {e}\n{ctx}"),
        None => panic!("the guest never got its server ready:\n{ctx}"),
    }
    assert!(run.serial.contains(&format!("TESSERA-BIG-FROM-NS {BIG}")), "{ctx}");
    match big {
        Some(Ok(n)) => assert_eq!(n, BIG, "{ctx}"),
        Some(Err(e)) => panic!("fetching the big page from the guest failed: {e}\n{ctx}"),
        None => panic!("no big page fetched:\n{ctx}"),
    }
    // virtio feature bits as the guest driver lists them (one character per bit): CSUM (0), GUEST_CSUM (1),
    // GUEST_TSO4 (7), HOST_TSO4 (11) negotiated.
    let features = run
        .serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("TESSERA-FEATURES "))
        .unwrap_or_else(|| panic!("no feature line:\n{ctx}"))
        .to_string();
    for bit in [0, 1, 7, 11] {
        assert_eq!(features.as_bytes().get(bit), Some(&b'1'), "feature bit {bit} in {features}:\n{ctx}");
    }
}

#[test]
fn a_tap_the_kernel_refuses_fails_like_qemu() {
    if !is_root() {
        eprintln!("SKIPPED: opening /dev/net/tun needs root");
        return;
    }
    // `lo` exists and is not a tap: TUNSETIFF fails with EINVAL. Nothing is started.
    let args = ["-netdev", "tap,id=n0,ifname=lo,script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0"];
    let want = "-netdev tap,id=n0,ifname=lo,script=no,downscript=no: could not configure /dev/net/tun (lo): \
                Invalid argument";
    let mut cmd = bins::launcher_command("tessera");
    cmd.args(["-display", "none", "-monitor", "none", "-m", "256M", "-kernel"])
        .arg(kernel().expect("kernel"))
        .args(args);
    let out = bins::wait_output(cmd.spawn().expect("start tessera"), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), format!("tessera: {want}\n"));
    if std::path::Path::new("/usr/bin/qemu-system-x86_64").exists() {
        let q = Command::new("timeout")
            .args(["10", "qemu-system-x86_64", "-display", "none", "-S", "-monitor", "none", "-serial", "none"])
            .args(args)
            .output()
            .expect("run qemu");
        let q = String::from_utf8_lossy(&q.stderr).into_owned();
        assert_eq!(q.lines().next(), Some(format!("qemu-system-x86_64: {want}").as_str()), "QEMU says {q:?}");
    }
}

#[test]
fn multiqueue_tap_with_the_control_queue_in_the_core() {
    if !is_root() {
        eprintln!("SKIPPED: creating a network namespace and a tap needs root");
        return;
    }
    ensure_debian_packages(&["busybox-static", "linux-image-amd64", "cpio", "iproute2", "gcc", "libc6-dev"])
        .expect("packages");
    let dir = TempDir::new("core-net-mq").expect("temp dir");
    let ns = Netns::new(&format!("tessera-core-mq-{}", std::process::id())).expect("make the test namespace");
    // Tessera's software CPU has one vCPU: Linux's virtio_net starts with one pair (VQ_PAIRS_SET 1 over the
    // control queue, which the core answers); a small static `channels` program (ethtool -L's ioctl; the host's
    // dynamically linked ethtool does not start on the software CPU) then asks for two and back, and a third is
    // refused by the driver itself (it knows max_virtqueue_pairs from the configuration space).
    let script = format!(
        r#"
fail() {{ echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }}
i=0
while ! ifconfig eth0 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 100 ] && fail "no eth0 appeared"
    sleep 0.1
done
ifconfig eth0 {GUEST_ADDR} netmask 255.255.255.0 up
echo "TESSERA-FEATURES $(cat /sys/bus/virtio/devices/virtio0/features)"
echo "TESSERA-QUEUES-A $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
chmod 755 /bin/channels
channels eth0 2 || fail "channels eth0 2"
echo "TESSERA-QUEUES-B $(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
ethtool -l eth0 | tr '\n' ' ' | sed 's/^/TESSERA-CHANNELS /'; echo
ping -c 2 -W 10 {NS_ADDR} >/tmp/ping 2>&1 || fail "ping with two pairs: $(cat /tmp/ping)"
channels eth0 3 && fail "a third pair was accepted"
channels eth0 1 || fail "channels eth0 1"
ping -c 2 -W 10 {NS_ADDR} >/tmp/ping 2>&1 || fail "ping with one pair: $(cat /tmp/ping)"
echo "TESSERA-STEP pinged"
dmesg | grep -i "queue pairs"
grep virtio0 /proc/interrupts
"#
    );
    let channels = build_channels(dir.path());
    let initrd = Initramfs::new(&script)
        .modules(NET_MODULES)
        .file("/bin/channels", std::fs::read(channels).expect("channels binary"))
        .build(&dir.path().join("initrd.gz"))
        .expect("initramfs");
    for (package, bin) in
        [("tessera-core", "tessera-core"), ("tessera-chardev", "tessera-chardev"), ("tessera-net", "tessera-net")]
    {
        bins::binary(package, bin);
    }
    let mut cmd = ns.exec();
    cmd.arg(bins::launcher("tessera"))
        .args(["-accel", "tcg", "-m", "256M"])
        .args(direct_boot_args(&kernel().expect("kernel"), &initrd))
        .args([
            "-netdev",
            "tap,id=t0,ifname=tap0,script=no,downscript=no,queues=2",
            "-device",
            "virtio-net-pci,netdev=t0,mq=on",
        ]);
    let run = run_guest(cmd, Duration::from_secs(240), |out| out.contains("TESSERA-RESULT FAIL")).expect("run tessera");
    let ctx = format!("--- guest serial and launcher messages ---\n{}", run.serial);
    assert!(!run.serial.contains("TESSERA-RESULT FAIL"), "guest failed:\n{ctx}");
    assert!(run.serial.contains("TESSERA-STEP pinged"), "{ctx}");
    assert!(run.serial.contains("TESSERA-QUEUES-A rx-0 tx-0"), "{ctx}");
    assert!(run.serial.contains("TESSERA-QUEUES-B rx-0 rx-1 tx-0 tx-1"), "{ctx}");
    assert!(!run.serial.contains("Fail to set num of queue pairs"), "{ctx}");
    // CTRL_VQ (17) and MQ (22) negotiated.
    let features = run
        .serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("TESSERA-FEATURES "))
        .unwrap_or_else(|| panic!("no feature line:\n{ctx}"))
        .to_string();
    for bit in [17, 22] {
        assert_eq!(features.as_bytes().get(bit), Some(&b'1'), "feature bit {bit} in {features}:\n{ctx}");
    }
}

/// `channels IFNAME N`: set the combined channel (queue pair) count as `ethtool -L IFNAME combined N` does
/// (SIOCETHTOOL, ETHTOOL_GCHANNELS then ETHTOOL_SCHANNELS), built static so it runs in the busybox guest.
fn build_channels(dir: &std::path::Path) -> std::path::PathBuf {
    const SRC: &str = r#"
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    struct ethtool_channels ch = { .cmd = ETHTOOL_GCHANNELS };
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
    ifr.ifr_data = (void *)&ch;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || ioctl(s, SIOCETHTOOL, &ifr) < 0) { perror("ETHTOOL_GCHANNELS"); return 1; }
    ch.cmd = ETHTOOL_SCHANNELS;
    ch.combined_count = (unsigned)atoi(argv[2]);
    if (ioctl(s, SIOCETHTOOL, &ifr) < 0) { perror("ETHTOOL_SCHANNELS"); return 1; }
    printf("combined %u of %u\\n", ch.combined_count, ch.max_combined);
    return 0;
}
"#;
    let src = dir.join("channels.c");
    let out = dir.join("channels");
    std::fs::write(&src, SRC).expect("write channels.c");
    let st = Command::new("gcc").args(["-static", "-O2", "-o"]).arg(&out).arg(&src).status().expect("run gcc");
    assert!(st.success(), "gcc -static channels.c failed");
    out
}
