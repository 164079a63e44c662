//! tessera-blk killed with SIGKILL at random moments under a busy guest, and restarted on the
//! same socket: with `INFLIGHT_SHMFD` the new process resubmits whatever its predecessor had
//! in flight, so the guest sees stalls but no error and no lost or torn write.
//!
//! Debian's kernel under Debian's QEMU 7.2 (`-accel tcg`, unmodified; `-chardev
//! socket,...,reconnect=1`), 2 vCPUs, `vhost-user-blk-pci` with 2 queues, tessera-blk with
//! `--direct` (requests spend longer in flight in the back end, so more kills catch some). In
//! the guest, four writers (two pinned to each vCPU, so both queues carry requests) loop:
//! write 256 KiB of one of four patterns with O_DIRECT into one of their slots, read it back
//! with O_DIRECT, compare; consecutive rounds write different patterns, so a lost write shows.
//! The host kills and restarts the back end 22 times, each time once the previous restart has
//! completed a request plus a random 0.2-1.2 s, and prints each stall (SIGKILL to the first
//! request completed by the new process, from its log). Then it writes a stop marker into the
//! image's last sector, which the writers poll; the guest checks dmesg for I/O errors.
//!
//! Bounded: the guest run is capped at 240 s (about 90 s here: QEMU 7.2 retries the socket once
//! a second, so each stall is 1-2 s). On failure the guest's serial output and the back ends'
//! logs are printed.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_tests::linux_guest::{
    built_binary, direct_boot_args, ensure_debian_packages, kernel, run_guest_until, GuestRun, Initramfs, TempDir,
};

const DISK_MIB: u64 = 64;
const KILLS: usize = 22;
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Time for a restarted back end to complete its first request before the test gives up.
const STALL_LIMIT: Duration = Duration::from_secs(30);
const STOP_MARKER: &[u8] = b"TESSERA-STOP";

const PACKAGES: &[&str] = &["qemu-system-x86", "qemu-utils", "busybox-static", "linux-image-amd64", "cpio"];
const MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// 1 MiB of pseudo-random bytes, different for each seed.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    (0..(1 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const SCRIPT: &str = r#"
fail() { echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }
i=0
while [ ! -b /dev/vda ]; do
    i=$((i+1)); [ $i -gt 200 ] && fail "no /dev/vda appeared"
    sleep 0.1
done
nq=$(ls -d /sys/block/vda/mq/* | wc -l)
[ "$nq" = 2 ] || fail "expected 2 virtqueues, the guest has $nq"
last=$(( $(cat /sys/block/vda/size) - 1 ))
# writer W BASE: 1 MiB slots at MiB BASE..BASE+3. A 1 MiB O_DIRECT write or read becomes
# several requests in flight at once, which the back end may complete in any order.
writer() {
    w=$1; base=$2; r=0
    while :; do
        dd if=/dev/vda bs=512 skip=$last count=1 iflag=direct 2>/dev/null | grep -q TESSERA-STOP && break
        p=$(( (r + w) % 4 ))
        slot=$(( base + r % 4 ))
        dd if=/p$p of=/dev/vda bs=1M seek=$slot count=1 oflag=direct 2>/tmp/e$w || echo "TESSERA-IOERR w$w round $r write: $(cat /tmp/e$w)"
        dd if=/dev/vda of=/tmp/b$w bs=1M skip=$slot count=1 iflag=direct 2>/tmp/e$w || echo "TESSERA-IOERR w$w round $r read: $(cat /tmp/e$w)"
        cmp -s /p$p /tmp/b$w || echo "TESSERA-MISMATCH w$w round $r slot $slot pattern $p"
        r=$((r+1))
        [ $((r % 25)) = 0 ] && echo "TESSERA-PROGRESS w$w $r rounds"
    done
    echo "TESSERA-WRITER w$w done after $r rounds"
}
pids=""
for w in 0 1 2 3 4 5; do
    writer $w $((w * 4)) &
    taskset -p $((1 << (w % 2))) $! >/dev/null || fail "taskset"
    pids="$pids $!"
done
echo "TESSERA-STEP writers started"
for p in $pids; do wait $p; done
if dmesg | grep -i -E "i/o error|blk_update_request|critical .*error" >/tmp/dm; then fail "guest I/O errors: $(cat /tmp/dm)"; fi
echo "TESSERA-RESULT PASS"
"#;

struct Backend {
    child: Child,
    log: PathBuf,
}

/// Host I/O throttling for the back end, so that its requests stay in flight long enough for a
/// kill to catch several of them, completing out of order: a blkio cgroup (v1) limiting the
/// IOPS of the disk that holds the image. Without it a request spends microseconds in the back
/// end, kills almost never catch one, and QEMU's own fallback without inflight tracking
/// (re-reading the avail ring from the used index, right only for in-order completion) would
/// pass this test too. `None` where the host has no such cgroup (then the test still runs, and
/// says that it could not throttle).
struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    const IOPS: u32 = 20;

    fn new(image: &Path) -> Option<Throttle> {
        use std::os::unix::fs::MetadataExt;
        let root = Path::new("/sys/fs/cgroup/blkio");
        if !root.join("blkio.throttle.write_iops_device").exists() {
            return None;
        }
        let dev = fs::metadata(image).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        // Limits apply to whole disks: a partition's disk is its sysfs parent.
        let sys = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        let disk = if sys.join("partition").exists() { sys.parent()?.to_path_buf() } else { sys };
        let disk_dev = fs::read_to_string(disk.join("dev")).ok()?.trim().to_owned();
        let dir = root.join(format!("tessera-blk-test-{}", std::process::id()));
        fs::create_dir_all(&dir).ok()?;
        let t = Throttle { dir };
        for f in ["blkio.throttle.write_iops_device", "blkio.throttle.read_iops_device"] {
            fs::write(t.dir.join(f), format!("{disk_dev} {}", Self::IOPS)).ok()?;
        }
        Some(t)
    }

    fn add(&self, pid: u32) {
        if let Err(e) = fs::write(self.dir.join("cgroup.procs"), pid.to_string()) {
            panic!("cannot put tessera-blk into {}: {e}", self.dir.display());
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Backend {
    fn start(dir: &Path, image: &Path, sock: &Path, generation: usize, throttle: Option<&Throttle>) -> Backend {
        let log = dir.join(format!("tessera-blk.{generation}.log"));
        let bin = built_binary("tessera-blk").expect("tessera-blk binary");
        let child = Command::new(&bin)
            .args(["--socket-path", sock.to_str().unwrap(), "--image", image.to_str().unwrap()])
            // io_uring for the O_DIRECT transfers (blk_boot covers --direct on the I/O pool).
            .args(["--format", "raw", "--num-queues", "2", "--direct", "--aio", "io_uring"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        if let Some(t) = throttle {
            t.add(child.id());
        }
        Backend { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the test knows, for a failure message.
fn report(serial: &Mutex<String>, dir: &Path) -> String {
    let mut out = format!("===== guest serial =====\n{}\n", serial.lock().map(|s| s.clone()).unwrap_or_default());
    let mut logs: Vec<_> = fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
    logs.sort();
    // The last few back ends are the interesting ones.
    for p in logs.iter().rev().take(3).rev() {
        out.push_str(&format!("===== {} =====\n{}\n", p.display(), fs::read_to_string(p).unwrap_or_default()));
    }
    out
}

#[test]
fn sigkill_under_load_loses_nothing() {
    ensure_debian_packages(PACKAGES).expect("install packages");
    let dir = TempDir::new("blk-inflight").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0u8; (DISK_MIB << 20) as usize]).unwrap();
    let sock = dir.path().join("blk.sock");
    let throttle = Throttle::new(&image);
    match &throttle {
        Some(_) => eprintln!("back end I/O throttled to {} IOPS (blkio cgroup)", Throttle::IOPS),
        None => eprintln!("NOTE: no blkio cgroup to throttle the back end; kills will rarely catch requests in flight"),
    }
    let mut backend = Backend::start(dir.path(), &image, &sock, 0, throttle.as_ref());
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no socket: {}", backend.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut initrd = Initramfs::new(SCRIPT).modules(MODULES);
    for p in 0..4 {
        initrd = initrd.file(&format!("/p{p}"), pattern(p));
    }
    let initrd = initrd.build(&dir.path().join("initrd.gz")).expect("build initramfs");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults", "-smp", "2"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={},reconnect=1", sock.display()))
        .arg("-device")
        .arg("vhost-user-blk-pci,chardev=c0,num-queues=2")
        .args(direct_boot_args(&kernel().expect("kernel"), &initrd));
    let serial = Arc::new(Mutex::new(String::new()));
    let guest_serial = serial.clone();
    let guest = std::thread::spawn(move || {
        run_guest_until(cmd, GUEST_TIMEOUT, Some("TESSERA-RESULT"), |out| {
            if let Ok(mut s) = guest_serial.lock() {
                s.clear();
                s.push_str(out);
            }
            false
        })
        .expect("run qemu")
    });
    let seen = |needle: &str| serial.lock().map(|s| s.contains(needle)).unwrap_or(false);

    let wait_start = Instant::now();
    while !seen("TESSERA-STEP writers started") {
        if guest.is_finished() || wait_start.elapsed() > Duration::from_secs(180) {
            let run = guest.join().ok();
            panic!(
                "the guest never started its writers (ended: {:?})\n{}",
                run.map(|r| (r.status, r.timed_out)),
                report(&serial, dir.path())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("random seed {seed}");
    let mut stalls = Vec::new();
    let mut resubmitted_total = 0u64;
    for kill in 1..=KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(200 + seed % 1000));
        if guest.is_finished() {
            panic!("the guest ended before kill {kill}\n{}", report(&serial, dir.path()));
        }
        // SIGKILL: no flush, no goodbye; the front end finds the socket closed.
        let _ = backend.child.kill();
        let killed_at = Instant::now();
        let _ = backend.child.wait();
        backend = Backend::start(dir.path(), &image, &sock, kill, throttle.as_ref());
        let stall = loop {
            let log = backend.log();
            if log.contains("first request completed on this connection") {
                break killed_at.elapsed();
            }
            if let Ok(Some(status)) = backend.child.try_wait() {
                panic!("restarted tessera-blk exited ({status}) after kill {kill}\n{}", report(&serial, dir.path()));
            }
            if killed_at.elapsed() > STALL_LIMIT {
                panic!(
                    "no request completed within {STALL_LIMIT:?} after kill {kill}\n{}",
                    report(&serial, dir.path())
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let log = backend.log();
        let resubmitted: u64 = log
            .lines()
            .filter_map(|l| l.split("resubmitting ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        resubmitted_total += resubmitted;
        eprintln!("kill {kill:2}: stall {:5} ms, {resubmitted} request(s) resubmitted", stall.as_millis());
        stalls.push(stall);
    }

    // Let the writers finish: the stop marker goes into the image's last sector, which they
    // read with O_DIRECT (so through to the file) every round.
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.write_at(STOP_MARKER, (DISK_MIB << 20) - 512).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let run: GuestRun = guest.join().expect("guest thread");
    let text = format!("{}\n{}", report(&serial, dir.path()), run.serial);
    let ms: Vec<u128> = stalls.iter().map(|s| s.as_millis()).collect();
    eprintln!(
        "{} kills; stall min {} ms, median {} ms, max {} ms; {resubmitted_total} request(s) resubmitted in all",
        ms.len(),
        ms.iter().min().unwrap_or(&0),
        {
            let mut m = ms.clone();
            m.sort_unstable();
            m.get(m.len() / 2).copied().unwrap_or(0)
        },
        ms.iter().max().unwrap_or(&0)
    );
    for bad in ["TESSERA-MISMATCH", "TESSERA-IOERR", "I/O error", "TESSERA-RESULT FAIL"] {
        assert!(!run.serial.contains(bad), "guest reported {bad} (timed out: {})\n{text}", run.timed_out);
    }
    if throttle.is_some() {
        // Throttled, kills catch requests in flight; if none was ever resubmitted, this test did
        // not exercise what it is for.
        assert!(resubmitted_total > 0, "no kill caught a request in flight\n{text}");
    }
    assert!(run.serial.contains("TESSERA-RESULT PASS"), "guest did not pass (timed out: {})\n{text}", run.timed_out);
    for w in 0..6 {
        assert!(run.serial.contains(&format!("TESSERA-WRITER w{w} done")), "writer {w} did not finish\n{text}");
    }
}
