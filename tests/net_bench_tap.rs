//! Benchmark (ignored by default; run with `--ignored --nocapture`, as root): TCP throughput between a guest
//! under QEMU TCG and a network namespace the test makes, over a tap: tessera-net `--tap` (vhost-user, the tap
//! with a vnet header, checksum/TSO offloads) against QEMU's own `-netdev tap` (vhost=off; QEMU also opens the tap
//! with a vnet header and offloads), in the same run, same guest. The test's end runs in the namespace on a
//! thread that joined it (`setns`). Guest to namespace: the guest pipes /dev/zero through busybox nc; the thread
//! counts bytes from the first on. Namespace to guest: the thread writes into the guest's `nc -l`. Results go to
//! docs/benchmarks.md by hand.

#[path = "net_support.rs"]
mod net_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use net_support::{direct_boot_args, ensure_debian_packages, kernel, qemu, run_guest, Backend, Initramfs, TempDir};

const MIB: usize = 1 << 20;
const NS_ADDR: &str = "10.197.0.1";
const GUEST_ADDR: &str = "10.197.0.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A namespace with a persistent `tap0` (NS_ADDR/24), removed on drop.
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

    /// Runs `f` on a new thread that has joined this namespace (network namespaces are per thread).
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on a descriptor we own; it changes only this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Boots `cmd` and measures both directions; MiB/s (namespace -> guest, guest -> namespace). The guest sends
/// to `port` in the namespace.
fn measure(ns: &Netns, cmd: Command, mib: usize, port: u16) -> Result<(f64, f64), String> {
    let bytes = mib * MIB;
    let (ready_tx, ready_rx) = mpsc::channel();
    let g2h = ns.spawn(move || -> Result<f64, String> {
        let listener = TcpListener::bind((NS_ADDR, port)).map_err(|e| e.to_string());
        let listener = match listener {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256 << 10];
        let first = s.read(&mut buf).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut got = first;
        while got < bytes {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return Err(e.to_string()),
            }
        }
        if got < bytes {
            return Err(format!("only {got} bytes"));
        }
        Ok((got - first) as f64 / MIB as f64 / start.elapsed().as_secs_f64())
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())??;
    let mut h2g: Option<std::thread::JoinHandle<Result<f64, String>>> = None;
    let run = run_guest(cmd, Duration::from_secs(240), |out| {
        if out.contains("TESSERA-RESULT FAIL") || out.contains("TESSERA-G2H-DONE") {
            return true;
        }
        if out.contains("TESSERA-H2G-READY") && h2g.is_none() {
            h2g = Some(ns.spawn(move || -> Result<f64, String> {
                let mut s = TcpStream::connect((GUEST_ADDR, 5001)).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
                let chunk = vec![0u8; 256 << 10];
                let start = Instant::now();
                let mut sent = 0;
                while sent < bytes {
                    s.write_all(&chunk).map_err(|e| e.to_string())?;
                    sent += chunk.len();
                }
                s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
                // The guest's nc exits at EOF and closes: everything has arrived.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
                Ok(sent as f64 / MIB as f64 / start.elapsed().as_secs_f64())
            }));
        }
        false
    })
    .map_err(|e| e.to_string())?;
    if run.serial.contains("TESSERA-RESULT FAIL") || run.timed_out {
        return Err(format!("guest failed:\n{}", run.serial));
    }
    let h2g =
        h2g.ok_or_else(|| format!("guest never ready:\n{}", run.serial))?.join().map_err(|_| "h2g panicked")??;
    let g2h = g2h.join().map_err(|_| "g2h panicked")??;
    Ok((h2g, g2h))
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (root)"]
fn tap_throughput_vs_qemu() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: a network namespace and a tap need root");
        return;
    }
    ensure_debian_packages(&["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio", "iproute2"])
        .expect("packages");
    let mib: usize = std::env::var("TESSERA_NET_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let rounds: usize = std::env::var("TESSERA_NET_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let dir = TempDir::new("net-bench-tap").expect("temp dir");
    let ns = Netns::new(&format!("tessera-bench-{}", std::process::id())).expect("namespace");
    let exec = ["ip".to_string(), "netns".into(), "exec".into(), ns.0.clone()];
    let exec_ref: Vec<&str> = exec.iter().map(String::as_str).collect();
    let mut rows: Vec<(bool, (f64, f64))> = Vec::new();
    for round in 0..rounds {
        let order: [bool; 2] = if round % 2 == 0 { [true, false] } else { [false, true] };
        for tessera in order {
            // The namespace's server port, named in the guest's script: a new one per measurement.
            let port = 5002 + round as u16 * 2 + u16::from(tessera);
            let script = format!(
                "fail() {{ echo \"TESSERA-RESULT FAIL: $*\"; poweroff -f; }}\n\
                 i=0; while ! ifconfig eth0 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && fail eth0; sleep 0.1; done\n\
                 ifconfig eth0 {GUEST_ADDR} netmask 255.255.255.0 up\n\
                 ping -c 1 -W 10 {NS_ADDR} >/dev/null 2>&1 || fail ping\n\
                 nc -l -p 5001 >/dev/null & ncpid=$!\nsleep 1\necho TESSERA-H2G-READY\nwait $ncpid || fail 'nc -l'\n\
                 dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {NS_ADDR} {port}; true\n\
                 echo TESSERA-G2H-DONE\nsleep 30\n",
                mib * 16 + 16
            );
            let initrd = Initramfs::new(&script)
                .modules(&["virtio_pci", "failover", "net_failover", "virtio_net"])
                .build(&dir.path().join("initrd.gz"))
                .expect("initramfs");
            let r = if tessera {
                let (_b, sock) = Backend::start_with(dir.path(), &exec_ref, &["--tap", "tap0"]);
                measure(&ns, qemu(&sock, &initrd), mib, port)
            } else {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns.0, "qemu-system-x86_64", "-accel", "tcg", "-m", "256M", "-nodefaults"])
                    .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"])
                    // vectors=0 like the tessera-net runs (see `qemu()`), so both use INTx.
                    .args(["-device", "virtio-net-pci,netdev=n0,vectors=0"])
                    .args(direct_boot_args(&kernel().expect("kernel"), &initrd));
                measure(&ns, cmd, mib, port)
            };
            let name = if tessera { "tessera-net --tap" } else { "qemu -netdev tap" };
            match r {
                Ok(v) => {
                    println!("round {round} {name}: ns->guest {:.1} MiB/s, guest->ns {:.1} MiB/s", v.0, v.1);
                    rows.push((tessera, v));
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
    let avg = |t: bool, f: fn(&(f64, f64)) -> f64| {
        let v: Vec<f64> = rows.iter().filter(|r| r.0 == t).map(|r| f(&r.1)).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (th, tg) = (avg(true, |r| r.0), avg(true, |r| r.1));
    let (qh, qg) = (avg(false, |r| r.0), avg(false, |r| r.1));
    println!("| direction | tessera-net --tap MiB/s | qemu -netdev tap MiB/s | ratio |");
    println!("|---|---|---|---|");
    println!("| namespace -> guest | {th:.1} | {qh:.1} | {:.2}x |", th / qh);
    println!("| guest -> namespace | {tg:.1} | {qg:.1} | {:.2}x |", tg / qg);
}
