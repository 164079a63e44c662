//! tessera-blk started by hand (standalone, as under QEMU): unconfined unless asked, confined when
//! `TESSERA_SANDBOX` asks (`v1,on`, and `-runas nobody`'s form as root), and then still serving its image
//! through `--socket-path` (bound before confinement) and flushing and exiting on SIGTERM. Checked from outside
//! through /proc. (Under the launcher: tests/sandbox_launcher.rs; its misbehave build: tests/sandbox_misbehave.rs.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::bins;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct Blk {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Blk {
    fn start(dir: &Path, sandbox: Option<&str>) -> Blk {
        let img = dir.join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let sock = dir.join("blk.sock");
        let log = dir.join("blk.log");
        let mut cmd = Command::new(bins::binary("tessera-blk", "tessera-blk"));
        cmd.arg("--socket-path").arg(&sock).arg("--image").arg(&img).args(["--format", "raw"]);
        cmd.env_remove(tessera_policy::SANDBOX_ENV).env("RUST_LOG", "debug");
        if let Some(s) = sandbox {
            cmd.env(tessera_policy::SANDBOX_ENV, s);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let mut b = Blk { child: cmd.spawn().unwrap(), sock, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Serving: the log says it waits for a front end (after the sandbox, if any, is on).
        while !b.logs().contains("waiting for a vhost-user front end") {
            if let Ok(Some(st)) = b.child.try_wait() {
                panic!("tessera-blk ended ({st}): {}", b.logs());
            }
            assert!(Instant::now() < deadline, "tessera-blk never served: {}", b.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap()
    }

    fn field(&self, name: &str) -> String {
        let status = self.status();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    }

    /// GET_FEATURES (vhost-user spec: request 1, flags version 1), the feature word.
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

    /// SIGTERM: tessera-blk flushes its image and exits 0.
    fn stop(mut self) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "tessera-blk did not end on SIGTERM: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "{}", self.logs());
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn by_hand_it_runs_as_before_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let blk = Blk::start(dir.path(), None);
    assert_eq!(blk.field("Seccomp"), "0", "{}", blk.logs());
    assert_eq!(blk.field("NoNewPrivs"), "0");
    assert!(blk.features() & (1 << 32) != 0, "VERSION_1");
    assert!(!blk.logs().contains("sandbox"), "{}", blk.logs());
    blk.stop();
}

#[test]
fn by_hand_with_tessera_sandbox_it_confines_itself_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = if is_root() { "v1,on,runas=65534:65534" } else { "v1,on" };
    let blk = Blk::start(dir.path(), Some(sandbox));
    assert_eq!(blk.field("Seccomp"), "2", "{}", blk.logs());
    assert_eq!(blk.field("NoNewPrivs"), "1");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(blk.field(cap), "0000000000000000", "{cap}");
    }
    assert!(blk.logs().contains("tessera-blk: sandboxed:"), "{}", blk.logs());
    if is_root() {
        assert_eq!(blk.field("Uid"), format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}"));
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{}/root", blk.child.id())).unwrap().collect();
        assert!(root.is_empty(), "its root is empty: {root:?}");
    }
    // Still a vhost-user-blk back end: it answers on the socket it bound before confinement.
    assert!(blk.features() & (1 << 32) != 0, "VERSION_1");
    blk.stop();
}
