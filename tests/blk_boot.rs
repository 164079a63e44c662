//! End to end: Debian's kernel under Debian's QEMU (`-accel tcg`) boots a busybox initramfs and
//! uses a vhost-user-blk disk served by `tessera-blk`: a pattern written and read back with
//! O_DIRECT, then an ext4 file system made, filled, checked with fsck and read back; on raw and
//! on qcow2. The host then checks the image independently (the pattern at its offset through
//! `qemu-img convert`, and `qemu-img check` for qcow2). A read-only export must refuse writes.
//!
//! Each guest run is bounded in time; on failure the guest's serial output and the backend's log
//! are printed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::linux_guest::{
    built_binary, direct_boot_args, ensure_debian_packages, kernel, run_guest_watching, GuestRun, Initramfs, TempDir,
};

const DISK_MIB: u64 = 64;
/// The pattern lives in the last MiB, outside the 60 MiB file system.
const PATTERN_MIB: u64 = 63;
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

const PACKAGES: &[&str] =
    &["qemu-system-x86", "qemu-utils", "busybox-static", "linux-image-amd64", "e2fsprogs", "cpio"];

const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

/// Deterministic, incompressible-looking 1 MiB.
fn pattern() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..(1 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const GUEST_PRELUDE: &str = r#"
fail() { echo "TESSERA-RESULT FAIL: $*"; poweroff -f; }
i=0
while [ ! -b /dev/vda ]; do
    i=$((i+1)); [ $i -gt 200 ] && fail "no /dev/vda appeared"
    sleep 0.1
done
echo "TESSERA-STEP vda present, size $(cat /sys/block/vda/size) sectors, ro=$(cat /sys/block/vda/ro)"
"#;

const RW_SCRIPT: &str = r#"
dd if=/pattern.bin of=/dev/vda bs=65536 seek=1008 oflag=direct conv=fsync 2>/tmp/err || fail "O_DIRECT write: $(cat /tmp/err)"
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back.bin bs=65536 skip=1008 count=16 iflag=direct 2>/tmp/err || fail "O_DIRECT read: $(cat /tmp/err)"
cmp /pattern.bin /tmp/back.bin || fail "pattern read back differs"
echo "TESSERA-STEP pattern ok"
/sbin/mke2fs -t ext4 -q -F /dev/vda 60M >/tmp/err 2>&1 || fail "mke2fs: $(cat /tmp/err)"
mount -t ext4 /dev/vda /mnt || fail "mount ext4"
cp /pattern.bin /mnt/pattern || fail "copy pattern"
mkdir /mnt/dir
n=0
while [ $n -lt 50 ]; do echo "file $n $(seq 1 $n)" > /mnt/dir/f$n || fail "write f$n"; n=$((n+1)); done
sync
umount /mnt || fail "umount"
/sbin/e2fsck -f -n /dev/vda >/tmp/fsck 2>&1 || fail "e2fsck: $(cat /tmp/fsck)"
echo "TESSERA-STEP fsck clean"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/vda /mnt || fail "mount ext4 again"
cmp /pattern.bin /mnt/pattern || fail "pattern in ext4 differs"
grep -q "file 49 1" /mnt/dir/f49 || fail "f49 content"
umount /mnt
echo "TESSERA-RESULT PASS"
"#;

const RO_SCRIPT: &str = r#"
[ "$(cat /sys/block/vda/ro)" = 1 ] || fail "kernel does not see the disk as read-only"
dd if=/dev/vda of=/tmp/back.bin bs=65536 skip=1008 count=16 iflag=direct 2>/tmp/err || fail "read: $(cat /tmp/err)"
cmp /pattern.bin /tmp/back.bin || fail "read-only disk content differs"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/tmp/err; then fail "write to a read-only disk succeeded"; fi
echo "TESSERA-STEP write refused: $(cat /tmp/err)"
if /sbin/mke2fs -t ext4 -q -F /dev/vda 60M >/tmp/err 2>&1; then fail "mke2fs on a read-only disk succeeded"; fi
echo "TESSERA-RESULT PASS"
"#;

const MQ_DIRECT_SCRIPT: &str = r#"
nq=$(ls -d /sys/block/vda/mq/* | wc -l)
[ "$nq" = 2 ] || fail "expected 2 virtqueues, the guest has $nq"
serial=$(cat /sys/block/vda/serial)
[ "$serial" = "tessera-disk-01" ] || fail "GET_ID serial is '$serial'"
echo "TESSERA-STEP 2 queues, serial $serial"
blkdiscard -o 0 -l 16777216 /dev/vda || fail "blkdiscard"
# One O_DIRECT writer per vCPU, so both queues carry requests at once.
taskset 1 dd if=/pattern.bin of=/dev/vda bs=65536 seek=512 oflag=direct conv=fsync 2>/tmp/e0 &
p0=$!
taskset 2 dd if=/pattern.bin of=/dev/vda bs=65536 seek=768 oflag=direct conv=fsync 2>/tmp/e1 &
p1=$!
wait $p0 || fail "writer 0: $(cat /tmp/e0)"
wait $p1 || fail "writer 1: $(cat /tmp/e1)"
echo 3 > /proc/sys/vm/drop_caches
for seek in 512 768; do
    dd if=/dev/vda of=/tmp/back bs=65536 skip=$seek count=16 iflag=direct 2>/tmp/err || fail "read: $(cat /tmp/err)"
    cmp /pattern.bin /tmp/back || fail "pattern at block $seek differs"
done
dd if=/dev/vda of=/tmp/z bs=65536 count=16 iflag=direct 2>/dev/null
dd if=/dev/zero of=/tmp/zref bs=65536 count=16 2>/dev/null
cmp /tmp/z /tmp/zref || fail "discarded range does not read as zeroes"
echo "TESSERA-RESULT PASS"
"#;

const RESTART_SCRIPT: &str = r#"
dd if=/pattern.bin of=/dev/vda bs=65536 seek=512 oflag=direct conv=fsync 2>/tmp/err || fail "write before restart: $(cat /tmp/err)"
echo "TESSERA-PHASE1 written"
# The host restarts tessera-blk now; QEMU reconnects. Any I/O after this goes to the new backend.
sleep 8
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=65536 skip=512 count=16 iflag=direct 2>/tmp/err || fail "read after restart: $(cat /tmp/err)"
cmp /pattern.bin /tmp/back || fail "data written before the restart differs"
dd if=/pattern.bin of=/dev/vda bs=65536 seek=768 oflag=direct conv=fsync 2>/tmp/err || fail "write after restart: $(cat /tmp/err)"
echo "TESSERA-RESULT PASS"
"#;

struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> (Self, PathBuf) {
        let sock = dir.join("blk.sock");
        let log = dir.join("tessera-blk.log");
        let bin = built_binary("tessera-blk").expect("tessera-blk binary");
        let child = Command::new(&bin)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).expect("log file"))
            .stderr(fs::File::create(dir.join("tessera-blk.err")).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut b = Backend { child, log };
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(20) {
                panic!("tessera-blk did not create {}: {}", sock.display(), b.logs());
            }
            if let Ok(Some(s)) = b.child.try_wait() {
                panic!("tessera-blk exited early ({s}): {}", b.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (b, sock)
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("tessera-blk.err");
        format!("{}{}", fs::read_to_string(&self.log).unwrap_or_default(), fs::read_to_string(err).unwrap_or_default())
    }

    /// SIGTERM (the backend flushes and exits 0), then wait.
    fn stop(mut self) -> String {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    assert!(s.success(), "tessera-blk exited with {s}: {}", self.logs());
                    break;
                }
                _ if start.elapsed() > Duration::from_secs(20) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("tessera-blk did not exit on SIGTERM: {}", self.logs());
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        self.logs()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().expect("run qemu-img")
}

fn boot(dir: &Path, sock: &Path, script: &str) -> GuestRun {
    boot_with(dir, sock, script, 1)
}

fn boot_with(dir: &Path, sock: &Path, script: &str, queues: u32) -> GuestRun {
    boot_watching(dir, sock, script, queues, |_| {})
}

fn boot_watching(dir: &Path, sock: &Path, script: &str, queues: u32, watch: impl FnMut(&str)) -> GuestRun {
    let initrd = Initramfs::new(&format!("{GUEST_PRELUDE}\n{script}"))
        .modules(MODULES)
        .binaries(&["/sbin/mke2fs", "/sbin/e2fsck"])
        .file("/pattern.bin", pattern())
        .build(&dir.join("initrd.gz"))
        .expect("build initramfs");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "256M", "-nodefaults"])
        .args(["-smp", &queues.to_string()])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"])
        .arg("-chardev")
        // reconnect=1: QEMU reconnects to a restarted backend within a second.
        .arg(format!("socket,id=c0,path={},reconnect=1", sock.display()))
        .arg("-device")
        .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
        .args(direct_boot_args(&kernel().expect("kernel"), &initrd));
    run_guest_watching(cmd, GUEST_TIMEOUT, Some("TESSERA-RESULT"), watch).expect("run qemu")
}

fn check_guest(run: &GuestRun, backend_log: &str) {
    // Shown with --nocapture; captured (and dropped) by the harness on success.
    eprintln!("===== serial ({:?}) =====\n{}", run.elapsed, run.serial);
    if !run.serial.contains("TESSERA-RESULT PASS") {
        panic!(
            "guest did not pass (timed out: {}, status {:?}, {:?})\n===== serial =====\n{}\n===== tessera-blk =====\n{}",
            run.timed_out, run.status, run.elapsed, run.serial, backend_log
        );
    }
}

/// Host-side check: the pattern is at PATTERN_MIB in the image, read through qemu-img.
fn check_pattern_on_host(dir: &Path, image: &Path, format: &str) {
    let raw = dir.join("converted.raw");
    let out = qemu_img(&["convert", "-f", format, "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    let data = fs::read(&raw).unwrap();
    let at = (PATTERN_MIB << 20) as usize;
    assert!(data[at..at + (1 << 20)] == pattern()[..], "pattern not found in the image on the host");
}

fn rw_test(format: &str) {
    ensure_debian_packages(PACKAGES).expect("install packages");
    let dir = TempDir::new(&format!("blk-{format}")).unwrap();
    let image = dir.path().join(format!("disk.{format}"));
    let out = qemu_img(&["create", "-q", "-f", format, image.to_str().unwrap(), &format!("{DISK_MIB}M")]);
    assert!(out.status.success(), "qemu-img create: {out:?}");
    let (backend, sock) = Backend::start(dir.path(), &image, &["--format", format]);
    let run = boot(dir.path(), &sock, RW_SCRIPT);
    let log = backend.stop();
    check_guest(&run, &log);
    if format == "qcow2" {
        let out = qemu_img(&["check", image.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "qemu-img check failed on the image tessera-blk wrote:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    check_pattern_on_host(dir.path(), &image, format);
}

#[test]
fn raw_pattern_ext4_fsck() {
    rw_test("raw");
}

#[test]
fn qcow2_pattern_ext4_fsck() {
    rw_test("qcow2");
}

#[test]
fn read_only_export_rejects_writes() {
    ensure_debian_packages(PACKAGES).expect("install packages");
    let dir = TempDir::new("blk-ro").unwrap();
    let image = dir.path().join("disk.raw");
    let mut content = vec![0u8; (DISK_MIB << 20) as usize];
    let at = (PATTERN_MIB << 20) as usize;
    content[at..at + (1 << 20)].copy_from_slice(&pattern());
    fs::write(&image, &content).unwrap();
    let (backend, sock) = Backend::start(dir.path(), &image, &["--read-only", "--format", "raw"]);
    let run = boot(dir.path(), &sock, RO_SCRIPT);
    let log = backend.stop();
    check_guest(&run, &log);
    assert!(fs::read(&image).unwrap() == content, "the read-only image changed");
}

#[test]
fn raw_direct_two_queues_discard_serial() {
    ensure_debian_packages(PACKAGES).expect("install packages");
    // Under the system temp dir (a disk file system here): tmpfs may refuse O_DIRECT.
    let dir = TempDir::new("blk-mq").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0xc3u8; (DISK_MIB << 20) as usize]).unwrap();
    let blocks_before = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&image).unwrap());
    let (backend, sock) = Backend::start(
        dir.path(),
        &image,
        &["--format", "raw", "--direct", "--num-queues", "2", "--serial", "tessera-disk-01"],
    );
    let run = boot_with(dir.path(), &sock, MQ_DIRECT_SCRIPT, 2);
    let log = backend.stop();
    check_guest(&run, &log);
    let data = fs::read(&image).unwrap();
    for mib in [32usize, 48] {
        assert!(data[mib << 20..(mib + 1) << 20] == pattern()[..], "pattern missing at {mib} MiB on the host");
    }
    assert!(data[..16 << 20].iter().all(|b| *b == 0), "discarded range not zero on the host");
    let blocks_after = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&image).unwrap());
    assert!(
        blocks_before - blocks_after >= 30_000,
        "guest discard did not punch holes: {blocks_before} -> {blocks_after} blocks"
    );
}

/// The serve loop is the skeleton of "restart a backend, the guest keeps running": stop
/// tessera-blk between two guest I/O phases, start a new one on the same socket, and the guest
/// continues on it (QEMU reconnects). Restarts with requests in flight (SIGKILL under load) are
/// tests/blk_restart_inflight.rs.
#[test]
fn backend_restart_while_guest_idle() {
    ensure_debian_packages(PACKAGES).expect("install packages");
    let dir = TempDir::new("blk-restart").unwrap();
    let image = dir.path().join("disk.raw");
    fs::write(&image, vec![0u8; (DISK_MIB << 20) as usize]).unwrap();
    let args = ["--format", "raw"];
    let (first, sock) = Backend::start(dir.path(), &image, &args);
    let mut first = Some(first);
    let mut second: Option<Backend> = None;
    let mut logs = String::new();
    let run = boot_watching(dir.path(), &sock, RESTART_SCRIPT, 1, |serial| {
        if serial.contains("TESSERA-PHASE1") {
            if let Some(b) = first.take() {
                logs.push_str(&b.stop());
                let _ = fs::remove_file(&sock);
                second = Some(Backend::start(dir.path(), &image, &args).0);
            }
        }
    });
    if let Some(b) = second {
        logs.push_str("===== restarted backend =====\n");
        logs.push_str(&b.stop());
    } else {
        logs.push_str("(the guest never reached the restart point)");
    }
    check_guest(&run, &logs);
    let data = fs::read(&image).unwrap();
    for mib in [32usize, 48] {
        assert!(data[mib << 20..(mib + 1) << 20] == pattern()[..], "pattern missing at {mib} MiB");
    }
}
