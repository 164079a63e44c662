//! Guest-boot helpers for the tessera-net tests: Debian's kernel with a busybox initramfs the test builds,
//! under QEMU TCG (the shared `tessera_tests::linux_guest`), plus the tessera-net backend and QEMU command line
//! the `net_*` tests use. Included by them with `#[path]`.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(unused_imports)] // each net_* test uses a different part
pub use tessera_tests::linux_guest::{
    built_binary, direct_boot_args, ensure_debian_packages, kernel, GuestRun, Initramfs, TempDir,
};

/// Runs `cmd` (QEMU with the serial port on stdout) until it exits, `timeout` passes, or `watch` (called with
/// the whole output whenever more arrives) returns true; QEMU is killed in the last two cases.
pub fn run_guest(cmd: Command, timeout: Duration, watch: impl FnMut(&str) -> bool) -> io::Result<GuestRun> {
    tessera_tests::linux_guest::run_guest_until(cmd, timeout, None, watch)
}

// ---- tessera-net specifics shared by the net_* tests ----

/// Modules a busybox guest needs for virtio-net.
pub const NET_MODULES: &[&str] = &["virtio_pci", "failover", "net_failover", "virtio_net"];

/// The tessera-net process; killed on drop.
pub struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    pub fn start(dir: &Path, args: &[&str]) -> (Self, PathBuf) {
        Self::start_with(dir, &[], args)
    }

    /// Runs tessera-net under `wrapper` (e.g. `ip netns exec NS`).
    pub fn start_with(dir: &Path, wrapper: &[&str], args: &[&str]) -> (Self, PathBuf) {
        let sock = dir.join("net.sock");
        let log = dir.join("tessera-net.log");
        let bin = built_binary("tessera-net").expect("tessera-net binary");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .arg("--socket-path")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut b = Backend { child, log };
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(20) {
                panic!("tessera-net did not create {}: {}", sock.display(), b.logs());
            }
            if let Ok(Some(s)) = b.child.try_wait() {
                panic!("tessera-net exited early ({s}): {}", b.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (b, sock)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU (TCG, 256 MiB of shared memfd memory) booting Debian's kernel with `initrd`, its one
/// NIC a virtio-net-pci on the vhost-user socket `sock`.
pub fn qemu(sock: &Path, initrd: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c,path={}", sock.display()))
        // vectors=0 (INTx): Debian's QEMU 7.2 under TCG segfaults in msix_set_vector_notifiers
        // when starting vhost-user-net with MSI-X (see docs/net.md).
        .args(["-netdev", "vhost-user,id=n0,chardev=c", "-device", "virtio-net-pci,netdev=n0,vectors=0"])
        .args(direct_boot_args(&kernel().expect("kernel"), initrd));
    cmd
}

// ---- host-side servers and names the guest tests share ----

/// A tiny HTTP server on 127.0.0.1 answering every GET with `body`, counting requests.
pub fn http_server(body: String) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("local addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        // Bounded: a test never needs more than a few hundred requests.
        for stream in listener.incoming().take(256) {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            h.fetch_add(1, Ordering::SeqCst);
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    (port, hits)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// GET / from 127.0.0.1:port, returning the whole response.
pub fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn token(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("tessera-net-{tag}-{nanos:x}")
}
