//! Backend restart under load (issue #8 items 2 and 4): Debian's Linux 6.1 on Tessera's software CPU, driven
//! through the real `tessera-core` by the fake launcher (core_harness.rs), with `-device vhost-user-blk-pci` on a
//! block backend the test started by hand on a socket path. In the guest, four writers loop over their own
//! 128 KiB slots: write a pattern with O_DIRECT in 4 KiB requests, read it back the same way, compare. The test SIGKILLs the backend at
//! random moments and starts it again on the same path; playing the launcher, it connects to the path as soon as
//! the new backend listens and hands the stream over with `VhostUserReconnect` (the sandboxed core cannot open
//! paths itself). It prints each stall: the core's `BackendReconnected { stall_ms }` (from the core noticing the
//! hang-up to the device restored) and the test's own clock from the kill to that report.
//!
//! Checked: no writer saw a mismatch or an I/O error, the kernel logged no I/O error, and the last block each
//! writer wrote is in the image on the host.
//!
//! Backends: tessera-blk (`TESSERA_BLK=path` picks another build). With VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD it
//! runs with `--direct`, so requests complete out of order and the inflight region says what to resubmit. Without
//! it the used index is the only record of what completed, which is exact only when requests complete in order:
//! the test then runs tessera-blk with `--io-threads 0`. qemu-storage-daemon is the second backend (7.2
//! does not offer INFLIGHT_SHMFD either: the restore relies on its completions staying in order).
//!
//! Bounds: the boot takes 30-120 s of wall time here, the kills about a minute; every step is allowed 300 s.

#[path = "core_harness.rs"]
mod harness;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{start, Core, Setup, TempDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tessera_ipc::messages::{
    Accel, ChildToLauncher, CoreToChardev, FdIndex, LauncherToChild, VhostUserBlkConfig, VhostUserSocket,
};
use tessera_ipc::IpcError;

const STEP: Duration = Duration::from_secs(300);
/// How many times the backend is killed (fewer if [`KILL_PHASE`] runs out first).
const KILLS: usize = 30;
/// Wall-time bound of the kill phase.
const KILL_PHASE: Duration = Duration::from_secs(150);
const DEVICE_ID: &str = "disk0";
const WRITERS: u32 = 4;
/// Request queues the device offers. Linux's virtio-blk uses at most one per CPU and the software CPU runs one
/// vCPU for now, so the guest enables one of the two (the other is never started nor restored).
const QUEUES: u16 = 2;
/// 128 KiB slots each writer cycles through.
const SLOTS_PER_WRITER: u32 = 8;
const SLOT: usize = 128 << 10;

const SCRIPT: &str = r#"
exec </dev/console >/dev/console 2>&1
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
[ -b /dev/vda ] || echo "NO-VDA"
echo "VDA-QUEUES: $(ls /sys/block/vda/mq | wc -l) CPUS: $(grep -c ^processor /proc/cpuinfo)"
writer() {
  id=$1; n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n+1)); blk=$(((id*8 + n%8)*32))
    yes "w$id.$n." | head -c 131072 > /tmp/t$id
    dd if=/tmp/t$id of=/dev/vda bs=4096 seek=$blk count=32 oflag=direct 2>/tmp/e$id || echo "IOERR w$id n$n write $(cat /tmp/e$id)"
    dd if=/dev/vda of=/tmp/r$id bs=4096 skip=$blk count=32 iflag=direct 2>/tmp/e$id || echo "IOERR w$id n$n read $(cat /tmp/e$id)"
    cmp -s /tmp/t$id /tmp/r$id || echo "MISMATCH w$id n$n blk$blk"
  done
  echo "WRITER $id DONE $n"
}
for id in 1 2 3 4; do writer $id & done
echo WRITERS-STARTED
read line
touch /tmp/stop
wait
echo "KERNEL-IO-ERRORS: $(dmesg | grep -c -i 'i/o error')"
dmesg | grep -i 'i/o error' | head -5
echo ALL-WRITERS-DONE
"#;

/// A vhost-user block backend the test starts, kills and starts again.
trait Backend {
    fn start(&mut self);
    fn kill(&mut self);
    fn label(&self) -> String;
}

struct TesseraBlk {
    bin: PathBuf,
    img: PathBuf,
    sock: PathBuf,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Backend for TesseraBlk {
    fn start(&mut self) {
        let c = Command::new(&self.bin)
            .arg("--socket-path")
            .arg(&self.sock)
            .arg("--image")
            .arg(&self.img)
            .args(["--format", "raw", "--num-queues", &QUEUES.to_string()])
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} (cargo build -p tessera-blk): {e}", self.bin.display()));
        self.child = Some(c);
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn label(&self) -> String {
        format!("tessera-blk {}", self.extra.join(" "))
    }
}

struct Qsd {
    img: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
}

impl Backend for Qsd {
    fn start(&mut self) {
        // qemu-storage-daemon does not replace a socket file left by its killed predecessor.
        let _ = std::fs::remove_file(&self.sock);
        let c = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={},cache.direct=off", self.img.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
                self.sock.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon (qemu-utils)");
        self.child = Some(c);
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn label(&self) -> String {
        "qemu-storage-daemon".into()
    }
}

impl Drop for TesseraBlk {
    fn drop(&mut self) {
        self.kill();
    }
}
impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn prerequisites() -> bool {
    match tessera_tests::linux_guest::kernel() {
        Ok(k) if k.exists() && Path::new("/bin/busybox").exists() => true,
        _ => {
            eprintln!("SKIPPED: a kernel in /boot and /bin/busybox are needed (linux-image-amd64, busybox-static)");
            false
        }
    }
}

fn tessera_blk_binary() -> PathBuf {
    match std::env::var_os("TESSERA_BLK") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().join("tessera-blk"),
    }
}

/// Connect to `sock`, retrying until the backend listens (or `timeout`).
fn connect(sock: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Whether the backend at `sock` offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (a probe connection; backends
/// serve the next front end after it).
fn has_inflight(sock: &Path) -> bool {
    use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::VhostBackend;
    let mut f = Frontend::from_stream(connect(sock, Duration::from_secs(10)), 1);
    f.set_owner().unwrap();
    f.get_features().unwrap();
    f.get_protocol_features().unwrap().contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
}

/// Start `b`, probe it, stop it again.
fn has_inflight_after_start(b: &mut TesseraBlk, sock: &Path) -> bool {
    b.start();
    let r = has_inflight(sock);
    b.kill();
    r
}

/// Take the serial output that is waiting (without blocking).
fn pump_serial(core: &mut Core) {
    loop {
        match core.serials[0].try_recv::<CoreToChardev>() {
            Ok((CoreToChardev::Output(b), _)) => core.output.extend(b),
            Err(IpcError::WouldBlock) => return,
            Err(e) => {
                let control = core.control.try_recv::<ChildToLauncher>().map(|m| m.0);
                let status = core.wait_exit();
                panic!(
                    "serial channel failed: {e}; control: {control:?}; core {status}; stderr: {}; serial output:\n{}",
                    core.stderr_text(),
                    core.text()
                )
            }
        }
    }
}

/// Wait for a control message while taking serial output; `None` after `timeout`.
fn next_control(core: &mut Core, timeout: Duration) -> Option<ChildToLauncher> {
    let deadline = Instant::now() + timeout;
    loop {
        pump_serial(core);
        match core.control.try_recv::<ChildToLauncher>() {
            Ok((m, _)) => return Some(m),
            Err(IpcError::WouldBlock) => {}
            Err(e) => panic!("control channel failed: {e}; serial output:\n{}", core.text()),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = [
            PollFd::new(core.control.as_fd(), PollFlags::POLLIN),
            PollFd::new(core.serials[0].as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(left.as_millis().min(100) as u16));
    }
}

fn wait_for(core: &mut Core, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !core.text().contains(needle) {
        if Instant::now() > deadline {
            panic!("the guest never printed {needle:?} within {timeout:?}; its serial output:\n{}", core.text());
        }
        if let Some(m) = next_control(core, Duration::from_millis(200)) {
            // The guest may print the marker and power off at once: its output is in the socket already.
            pump_serial(core);
            if !core.text().contains(needle) {
                panic!("unexpected control message while waiting for {needle:?}: {m:?}; serial:\n{}", core.text());
            }
        }
    }
}

/// xorshift: random kill moments without another crate; the seed is printed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn run(backend: &mut dyn Backend, img: &Path, sock: &Path, dir: &TempDir) {
    let initrd = tessera_tests::linux_guest::Initramfs::new(SCRIPT)
        .modules(&["virtio_pci", "virtio_blk"])
        .build(&dir.0.join("initrd.gz"))
        .expect("build the initramfs");
    let mut setup = Setup::new(&tessera_tests::linux_guest::kernel().unwrap());
    setup.initrd = Some(initrd);
    setup.cmdline = "console=ttyS0".into();
    setup.ram = 256 << 20;
    setup.ram_shared = true;
    setup.accel = Accel::Tcg;
    setup.debug_exit = None;
    setup.vhost_user_blk = vec![VhostUserBlkConfig {
        id: DEVICE_ID.into(),
        socket: VhostUserSocket::Path(sock.display().to_string()),
        num_queues: Some(QUEUES),
        slot: None,
        origin: "-device vhost-user-blk-pci,chardev=c0".into(),
    }];
    // The harness connects the path and passes the stream, as the launcher does.
    connect(sock, Duration::from_secs(10));
    let mut core = start(&setup);
    match next_control(&mut core, STEP) {
        Some(ChildToLauncher::Ready) => {}
        other => panic!("expected Ready, got {other:?}; stderr: {}", core.stderr_text()),
    }
    let boot = Instant::now();
    wait_for(&mut core, "WRITERS-STARTED", STEP);
    eprintln!("{}: the guest's writers started {:.1} s after Ready", backend.label(), boot.elapsed().as_secs_f64());

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill schedule seed {seed:#x}");
    let mut rng = Rng(seed);
    let phase = Instant::now();
    let mut stalls = Vec::new();
    for k in 0..KILLS {
        if phase.elapsed() > KILL_PHASE {
            break;
        }
        // A random moment: the writers keep several requests in flight most of the time.
        let wait = Duration::from_millis(200 + rng.below(1300));
        if let Some(m) = next_control(&mut core, wait) {
            panic!("unexpected control message {m:?}; serial output:\n{}", core.text());
        }
        backend.kill();
        let killed = Instant::now();
        backend.start();
        // Playing the launcher: the core reports the hang-up; the new backend's connection follows.
        match next_control(&mut core, STEP) {
            Some(ChildToLauncher::BackendDisconnected { id, reason }) => {
                assert_eq!(id, DEVICE_ID, "reason {reason}")
            }
            other => panic!("expected BackendDisconnected after kill {k}, got {other:?}; serial:\n{}", core.text()),
        }
        let stream = connect(sock, Duration::from_secs(30));
        let listening = killed.elapsed().as_millis();
        let msg = LauncherToChild::VhostUserReconnect {
            id: DEVICE_ID.into(),
            socket: VhostUserSocket::Connected(FdIndex(0)),
        };
        core.control.send(&msg, &[stream.as_fd()]).expect("send VhostUserReconnect");
        drop(stream);
        match next_control(&mut core, STEP) {
            Some(ChildToLauncher::BackendReconnected { id, stall_ms }) => {
                assert_eq!(id, DEVICE_ID);
                let total = killed.elapsed().as_millis();
                eprintln!(
                    "kill {k}: core stall {stall_ms} ms, kill -> reconnected {total} ms (the new backend listened \
                     after {listening} ms)"
                );
                stalls.push((stall_ms, total, listening));
            }
            other => panic!("expected BackendReconnected after kill {k}, got {other:?}; serial:\n{}", core.text()),
        }
    }
    assert!(stalls.len() >= 5, "only {} kills fitted in {KILL_PHASE:?}", stalls.len());
    core.send_input(b"stop\n");
    wait_for(&mut core, "ALL-WRITERS-DONE", STEP);
    let text = core.text();
    let max = stalls.iter().map(|s| s.1).max().unwrap_or(0);
    let mean = stalls.iter().map(|s| s.1).sum::<u128>() / stalls.len() as u128;
    // What the core itself adds: from the new backend listening to the device restored.
    let core_part: Vec<u128> = stalls.iter().map(|s| s.1.saturating_sub(s.2)).collect();
    let core_max = core_part.iter().max().copied().unwrap_or(0);
    let core_mean = core_part.iter().sum::<u128>() / stalls.len() as u128;
    eprintln!(
        "{}: {} kills; kill -> reconnected mean {mean} ms, max {max} ms; backend listening -> reconnected mean \
         {core_mean} ms, max {core_max} ms",
        backend.label(),
        stalls.len()
    );
    for bad in ["MISMATCH", "IOERR", "NO-VDA"] {
        assert!(!text.contains(bad), "{bad} in the guest's output:\n{text}");
    }
    assert!(text.contains("KERNEL-IO-ERRORS: 0"), "the kernel logged I/O errors:\n{text}");
    // The last block each writer wrote is in the image (its read-back was checked in the guest).
    let mut done = 0;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if let ["WRITER", id, "DONE", n] = w[..] {
            let (id, n): (u32, u32) = (id.parse().unwrap(), n.trim().parse().unwrap());
            assert!(n > 1, "writer {id} made no progress:\n{text}");
            // The loop increments n and checks the stop file after a whole iteration.
            let slot = id * SLOTS_PER_WRITER + n % SLOTS_PER_WRITER;
            let mut b = vec![0u8; SLOT];
            std::fs::File::open(img).unwrap().read_exact_at(&mut b, u64::from(slot) * SLOT as u64).unwrap();
            let pat = format!("w{id}.{n}.\n");
            let want: Vec<u8> = pat.bytes().cycle().take(SLOT).collect();
            assert!(b == want, "slot {slot} of writer {id} (iteration {n}) in the image differs");
            eprintln!("writer {id}: {n} write/read-back rounds");
            done += 1;
        }
    }
    assert_eq!(done, WRITERS, "every writer reported:\n{text}");
    let _ = core.wait_exit();
    let log = core.stderr_text();
    let in_flight: u32 = log
        .lines()
        .filter_map(|l| l.split('(').nth(1)?.split(" requests were in flight").next()?.parse::<u32>().ok())
        .sum();
    eprintln!("requests in flight at the kills, handed to the restarted backend: {in_flight}");
}

fn image(dir: &TempDir) -> PathBuf {
    let p = dir.0.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(16 << 20).unwrap();
    p
}

#[test]
fn linux_keeps_writing_while_tessera_blk_is_killed_and_restarted() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("vu-reconnect-blk");
    let img = image(&dir);
    let sock = dir.0.join("blk.sock");
    let mut b =
        TesseraBlk { bin: tessera_blk_binary(), img: img.clone(), sock: sock.clone(), extra: vec![], child: None };
    if has_inflight_after_start(&mut b, &sock) {
        // Requests complete out of order (O_DIRECT goes to io_uring or the I/O pool): the inflight region is what
        // tells the restarted backend which ones to resubmit.
        b.extra = vec!["--direct".into()];
    } else {
        // Completion order is all the used index can express: one thread per queue keeps it.
        eprintln!("{} lacks VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: running it with --io-threads 0", b.bin.display());
        b.extra = vec!["--io-threads".into(), "0".into()];
    }
    b.start();
    run(&mut b, &img, &sock, &dir);
}

#[test]
fn linux_keeps_writing_while_qemu_storage_daemon_is_killed_and_restarted() {
    if !prerequisites() {
        return;
    }
    if Command::new("qemu-storage-daemon").arg("--version").output().is_err() {
        eprintln!("SKIPPED: qemu-storage-daemon is absent (qemu-utils)");
        return;
    }
    let dir = TempDir::new("vu-reconnect-qsd");
    let img = image(&dir);
    let sock = dir.0.join("qsd.sock");
    let mut b = Qsd { img: img.clone(), sock: sock.clone(), child: None };
    b.start();
    run(&mut b, &img, &sock, &dir);
}
