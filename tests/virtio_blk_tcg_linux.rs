//! Debian's Linux 6.1 on Tessera's software CPU with a virtio-blk disk, as a user runs it: `tessera -accel tcg
//! ... -drive file=IMG,if=virtio` (tessera-blk started by the launcher) and `-chardev socket -device
//! vhost-user-blk-pci` (qemu-storage-daemon started by the test). The initramfs loads the six virtio modules
//! (they are modules in Debian's kernel), finds /dev/vda through PCI0 in the DSDT, reads a sector the host wrote,
//! writes one, and powers off; the image is checked on the host. Interrupts are MSI-X into the userspace LAPIC.
//!
//! Bounds: a boot takes about 20 s of wall time here; each run is allowed 240 s (`timeout`), and a failure
//! prints the guest's output.

#[path = "virtio_common.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tessera_tests::bins;

/// The installed Debian kernel (`linux-image-amd64`; the newest `/boot/vmlinuz-*`).
static KERNEL_PATH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    tessera_tests::linux_guest::kernel()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/boot/vmlinuz-(none installed)".into())
});
/// The driver modules of that kernel.
static MODULES_PATH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let release =
        tessera_tests::linux_guest::kernel_release(std::path::Path::new(KERNEL_PATH.as_str())).unwrap_or_default();
    format!("/lib/modules/{release}/kernel/drivers")
});
/// In dependency order.
const VIRTIO_MODULES: &[&str] = &[
    "virtio/virtio_ring.ko",
    "virtio/virtio.ko",
    "virtio/virtio_pci_legacy_dev.ko",
    "virtio/virtio_pci_modern_dev.ko",
    "virtio/virtio_pci.ko",
    "block/virtio_blk.ko",
];

const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
for m in /mods/*.ko; do insmod "$m" || echo "insmod $m failed"; done
sleep 1
echo "vda-size: $(cat /sys/block/vda/size)"
grep virtio0 /proc/interrupts
echo "sector2: $(dd if=/dev/vda bs=512 skip=2 count=1 2>/dev/null | head -c 8)"
echo "written by linux on tessera" | dd of=/dev/vda bs=512 seek=3 conv=sync 2>/dev/null
sync
echo TESSERA-VDA-DONE
poweroff -f
"#;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prerequisites() -> bool {
    for p in [KERNEL_PATH.as_str(), "/bin/busybox", MODULES_PATH.as_str()] {
        if !Path::new(p).exists() {
            eprintln!("SKIPPED: {p} is absent (linux-image-amd64, busybox-static)");
            return false;
        }
    }
    true
}

/// busybox, the modules (numbered so that the shell's glob loads them in order) and the init script.
fn initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("mods")).unwrap();
    for d in ["proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for (i, m) in VIRTIO_MODULES.iter().enumerate() {
        let name = Path::new(m).file_name().unwrap().to_string_lossy().to_string();
        std::fs::copy(Path::new(MODULES_PATH.as_str()).join(m), root.join(format!("mods/{i}-{name}"))).unwrap();
    }
    std::fs::write(root.join("init"), INIT).unwrap();
    let out = dir.join("initrd.gz");
    let script = format!(
        "set -e; cd {root}; chmod +x init; for a in $(bin/busybox --list); do [ $a = busybox ] || ln -sf busybox bin/$a; \
         done; find . | cpio -o -H newc --quiet | gzip -1 > {out}",
        root = root.display(),
        out = out.display()
    );
    let st = Command::new("bash").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "building the initramfs failed");
    out
}

fn run(dir: &Path, initrd: &Path, extra: &[String]) -> (i32, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg("240").arg(bins::launcher("tessera"));
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "256M",
        "-nographic",
        "-kernel",
        KERNEL_PATH.as_str(),
        "-append",
        "console=ttyS0",
    ]);
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem"]);
    cmd.arg("-initrd").arg(initrd).args(extra).current_dir(dir);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn check(code: i32, text: &str, img: &Path) {
    assert_eq!(code, 0, "guest output:\n{text}");
    for want in ["vda-size: 32768", "PCI-MSI", "virtio0-req.0", "sector2: HOSTDATA", "TESSERA-VDA-DONE"] {
        assert!(text.contains(want), "{want:?} missing; guest output:\n{text}");
    }
    let mut s = [0u8; 27];
    std::fs::File::open(img).unwrap().read_exact_at(&mut s, 3 * 512).unwrap();
    assert_eq!(&s, b"written by linux on tessera", "guest output:\n{text}");
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(b"HOSTDATA", 1024).unwrap();
    p
}

#[test]
fn linux_on_the_software_cpu_uses_vda_from_tessera_blk_and_qemu_storage_daemon() {
    if !prerequisites() {
        return;
    }
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let d = Dir(std::env::temp_dir().join(format!("tessera-vblk-linux-{}-{n}", std::process::id())));
    std::fs::create_dir_all(&d.0).unwrap();
    let initrd = initramfs(&d.0);

    let img = image(&d.0, "drive.img");
    let (code, text) = run(&d.0, &initrd, &["-drive".into(), format!("file={},if=virtio,format=raw", img.display())]);
    check(code, &text, &img);

    let img = image(&d.0, "qsd.img");
    let sock = d.0.join("qsd.sock");
    let Some(_b) = common::qsd(&img, &sock, 1) else { return };
    let (code, text) = run(
        &d.0,
        &initrd,
        &[
            "-chardev".into(),
            format!("socket,id=c0,path={}", sock.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=c0,num-queues=1".into(),
        ],
    );
    check(code, &text, &img);
}
