//! tessera-blk started by hand (standalone, as under QEMU): unconfined unless asked, confined when
//! `TESSERA_SANDBOX` asks (`v1,on`, and `-runas nobody`'s form as root), and then still serving its image
//! through `--socket-path` (bound before confinement) and flushing and exiting on SIGTERM. Checked from outside
//! through /proc. (Under the launcher: tests/sandbox_launcher.rs; its misbehave build: tests/sandbox_misbehave.rs.)

#[path = "vhost_user_client.rs"]
mod vhost_user_client;

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
        Blk::start_with(dir, sandbox, &[])
    }

    fn start_with(dir: &Path, sandbox: Option<&str>, extra: &[&str]) -> Blk {
        let img = dir.join("disk.img");
        if !img.exists() {
            std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        }
        let sock = dir.join("blk.sock");
        let log = dir.join("blk.log");
        let mut cmd = Command::new(bins::binary("tessera-blk", "tessera-blk"));
        cmd.arg("--socket-path").arg(&sock).arg("--image").arg(&img).args(["--format", "raw"]).args(extra);
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

/// `--direct --aio io_uring` confined: the blk profile's `io-uring` group lets the rings be made (disabled,
/// restricted to READV/WRITEV, enabled), and reads and writes through them reach the image. The front end is
/// rust-vmm's vhost frontend with guest memory in a file the back end maps.
#[test]
fn confined_direct_io_runs_on_io_uring() {
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    use vm_memory::{Bytes, GuestAddress};

    use vhost_user_client::{AVAIL, DESC, USED};
    const QSIZE: u16 = 16;

    // A directory on a disk filesystem: O_DIRECT needs one that supports it.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("disk.img"), &content).unwrap();
    let sandbox = if is_root() { "v1,on,runas=65534:65534" } else { "v1,on" };
    let blk = Blk::start_with(dir.path(), Some(sandbox), &["--direct", "--aio", "io_uring", "--io-threads", "0"]);
    assert_eq!(blk.field("Seccomp"), "2", "{}", blk.logs());

    let file = tempfile::tempfile_in(dir.path()).unwrap();
    let mem = vhost_user_client::guest_memory(&file);
    let mut fe = Frontend::connect(&blk.sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
    let _ = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(vhost::vhost_user::message::VhostUserProtocolFeatures::empty()).unwrap();
    let (_call, kick) = vhost_user_client::start_queue0(&mut fe, &mem, &file, QSIZE, 0);

    // Two requests (virtio 1.2 §5.2.6): write 4 KiB at sector 8 from 0x40000, then read sector 0..8 into
    // 0x50000. Page-aligned buffers, so O_DIRECT takes them and the ring (not the bounce path) runs them.
    let mut next = 0u16;
    let mut desc = |addr: u64, len: u32, flags: u16| {
        let i = next;
        next += 1;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&(if flags & 1 != 0 { i + 1 } else { 0 }).to_le_bytes());
        mem.write_slice(&d, GuestAddress(DESC + u64::from(i) * 16)).unwrap();
        i
    };
    let header = |at: u64, t: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    };
    let written = vec![0xa5u8; 4096];
    mem.write_slice(&written, GuestAddress(0x40000)).unwrap();
    header(0x10000, 1, 8);
    header(0x10100, 0, 0);
    mem.write_obj(0xffu8, GuestAddress(0x20000)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x20001)).unwrap();
    let w = desc(0x10000, 16, 1);
    desc(0x40000, 4096, 1);
    desc(0x20000, 1, 2);
    let r = desc(0x10100, 16, 1);
    desc(0x50000, 4096, 1 | 2);
    desc(0x20001, 1, 2);
    mem.write_obj(w, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(r, GuestAddress(AVAIL + 6)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
    let start = Instant::now();
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "requests not completed: {}", blk.logs());
        std::thread::sleep(Duration::from_millis(5));
    }
    let statuses: Vec<u8> = (0..2).map(|i| mem.read_obj(GuestAddress(0x20000 + i)).unwrap()).collect();
    assert_eq!(statuses, vec![0, 0], "VIRTIO_BLK_S_OK for both: {}", blk.logs());
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
    assert_eq!(got, content[..4096], "read through the ring");
    let on_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(&on_disk[4096..8192], &written[..], "written through the ring");
    assert!(!blk.logs().contains("io_uring unavailable"), "the ring was made: {}", blk.logs());
    if is_root() {
        // The queue thread's ring is open in the process (readable by root despite PR_SET_DUMPABLE 0).
        let rings = std::fs::read_dir(format!("/proc/{}/fd", blk.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|l| l.to_string_lossy().contains("io_uring"))
            .count();
        assert!(rings > 0, "an io_uring descriptor: {}", blk.logs());
    }
    drop(fe);
    blk.stop();
}
