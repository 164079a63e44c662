//! Benchmark (ignored by default; run with `--ignored --nocapture`): TCP throughput between a
//! guest under QEMU TCG and the host, over tessera-net's user networking (vhost-user) and over
//! QEMU's own `-netdev user`, in the same run, same guest, same kernel. Host to guest: the
//! test writes to `hostfwd` on 127.0.0.1, the guest's busybox nc reads to /dev/null. Guest to
//! host: the guest pipes /dev/zero through busybox nc to a server the test runs on 127.0.0.1
//! (reached as 10.0.2.2). Measured on the host side. Results go to docs/benchmarks.md by hand.

#[path = "net_support.rs"]
mod net_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use net_support::{
    direct_boot_args, ensure_debian_packages, kernel, qemu, run_guest, Backend, Initramfs, TempDir, NET_MODULES,
};

const MIB: usize = 1 << 20;

const UDHCPC_SCRIPT: &str =
    "#!/bin/sh\n[ \"$1\" = bound ] && ifconfig \"$interface\" \"$ip\" netmask \"$subnet\" up\nexit 0\n";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

struct Result2 {
    h2g: f64,
    g2h: f64,
}

/// Boots `cmd`'s guest (built with `script`) and measures both directions; MiB/s.
fn measure(cmd: Command, fwd_port: u16, listener: TcpListener, mib: usize) -> Result<Result2, String> {
    let bytes = mib * MIB;
    // Guest -> host: count bytes from the first to the last.
    let (g2h_tx, g2h_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> std::io::Result<f64> {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0usize;
            let n = s.read(&mut buf)?;
            let start = Instant::now();
            got += n;
            while got < bytes {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got < bytes {
                return Err(std::io::Error::other(format!("only {got} bytes")));
            }
            Ok((got - n) as f64 / MIB as f64 / start.elapsed().as_secs_f64())
        })();
        let _ = g2h_tx.send(r);
    });
    let mut h2g: Option<Result<f64, String>> = None;
    let run = run_guest(cmd, Duration::from_secs(180), |out| {
        if out.contains("TESSERA-RESULT FAIL") || out.contains("TESSERA-G2H-DONE") {
            return true;
        }
        if out.contains("TESSERA-H2G-READY") && h2g.is_none() {
            h2g = Some(
                (|| -> std::io::Result<f64> {
                    let mut s = TcpStream::connect(("127.0.0.1", fwd_port))?;
                    s.set_read_timeout(Some(Duration::from_secs(120)))?;
                    let chunk = vec![0u8; 256 << 10];
                    let start = Instant::now();
                    let mut sent = 0;
                    while sent < bytes {
                        s.write_all(&chunk)?;
                        sent += chunk.len();
                    }
                    s.shutdown(Shutdown::Write)?;
                    // The guest's nc exits at EOF and closes: everything has arrived.
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                    Ok(sent as f64 / MIB as f64 / start.elapsed().as_secs_f64())
                })()
                .map_err(|e| e.to_string()),
            );
        }
        false
    })
    .map_err(|e| e.to_string())?;
    if run.serial.contains("TESSERA-RESULT FAIL") || run.timed_out {
        return Err(format!("guest failed (host->guest: {h2g:?}):\n{}", run.serial));
    }
    let h2g = h2g.ok_or_else(|| format!("guest never ready:\n{}", run.serial))??;
    let g2h = g2h_rx.recv_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    Ok(Result2 { h2g, g2h })
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn user_networking_throughput_vs_qemu() {
    ensure_debian_packages(&["qemu-system-x86", "busybox-static", "linux-image-amd64", "cpio"]).expect("packages");
    let mib: usize = std::env::var("TESSERA_NET_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    let rounds: usize = std::env::var("TESSERA_NET_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let dir = TempDir::new("net-bench").expect("temp dir");
    let mut rows = Vec::new();
    for round in 0..rounds {
        // Alternate who goes first.
        let order: [bool; 2] = if round % 2 == 0 { [true, false] } else { [false, true] };
        for tessera in order {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let g2h_port = listener.local_addr().expect("addr").port();
            let fwd_port = free_port();
            let script = format!(
                "chmod 755 /udhcpc.sh\nfail() {{ echo \"TESSERA-RESULT FAIL: $*\"; poweroff -f; }}\n\
                 i=0; while ! ifconfig eth0 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && fail eth0; sleep 0.1; done\n\
                 ifconfig eth0 up\n\
                 udhcpc -i eth0 -s /udhcpc.sh -q -f -n -t 10 -T 2 >/tmp/dhcp 2>&1 || fail \"dhcp: $(cat /tmp/dhcp)\"\n\
                 # The host closes after the bytes it counts; nc then fails on the extra ones: fine.\n\
                 # Listening before READY: hostfwd connects to the guest as soon as the host does.\n\
                 nc -l -p 5001 >/dev/null & ncpid=$!\nsleep 1\necho TESSERA-H2G-READY\nwait $ncpid || fail 'nc -l'\n\
                 dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc 10.0.2.2 {g2h_port}; true\n\
                 echo TESSERA-G2H-DONE\nsleep 30\n",
                mib * 16 + 16
            );
            let initrd = Initramfs::new(&script)
                .modules(NET_MODULES)
                .file("/udhcpc.sh", UDHCPC_SCRIPT.as_bytes().to_vec())
                .build(&dir.path().join("initrd.gz"))
                .expect("initramfs");
            let fwd = format!("hostfwd=tcp:127.0.0.1:{fwd_port}-:5001");
            let (r, name) = if tessera {
                let (backend, sock) = Backend::start(dir.path(), &["--user", &fwd]);
                let r = measure(qemu(&sock, &initrd), fwd_port, listener, mib);
                drop(backend);
                (r, "tessera-net")
            } else {
                let mut cmd = Command::new("qemu-system-x86_64");
                cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults"])
                    // vectors=0 like the tessera-net runs (see `qemu()`), so both use INTx.
                    .args(["-netdev", &format!("user,id=n0,{fwd}"), "-device", "virtio-net-pci,netdev=n0,vectors=0"])
                    .args(direct_boot_args(&kernel().expect("kernel"), &initrd));
                (measure(cmd, fwd_port, listener, mib), "qemu -netdev user")
            };
            match r {
                Ok(r) => {
                    println!("round {round} {name}: host->guest {:.1} MiB/s, guest->host {:.1} MiB/s", r.h2g, r.g2h);
                    rows.push((tessera, r));
                }
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
    let avg = |t: bool, f: fn(&Result2) -> f64| {
        let v: Vec<f64> = rows.iter().filter(|r| r.0 == t).map(|r| f(&r.1)).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    let (th, tg) = (avg(true, |r| r.h2g), avg(true, |r| r.g2h));
    let (qh, qg) = (avg(false, |r| r.h2g), avg(false, |r| r.g2h));
    println!("| direction | tessera-net MiB/s | qemu -netdev user MiB/s | ratio |");
    println!("|---|---|---|---|");
    println!("| host -> guest | {th:.1} | {qh:.1} | {:.2}x |", th / qh);
    println!("| guest -> host | {tg:.1} | {qg:.1} | {:.2}x |", tg / qg);
}
