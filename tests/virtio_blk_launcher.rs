//! `tessera ... -chardev socket,id=c0,path=SOCK -device vhost-user-blk-pci,chardev=c0` end to end: the launcher
//! connects to a qemu-storage-daemon the test started and passes the stream to tessera-core; the tiny guest of
//! virtio_common.rs writes and reads the disk; the image is checked afterwards. Wrong memory options fail as
//! QEMU's do.

#[path = "virtio_common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{check_image, guest, image, qsd};
use tessera_tests::bins;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn dir(tag: &str) -> Dir {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let p = std::env::temp_dir().join(format!("tessera-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    Dir(p)
}

fn tessera(args: &[String]) -> Output {
    let mut cmd = Command::new(bins::launcher("tessera"));
    cmd.args(args);
    // Bounded: the guest ends itself through isa-debug-exit within a second; `timeout` stops a hang.
    let out = Command::new("timeout").arg("60").arg(cmd.get_program()).args(cmd.get_args()).output().unwrap();
    assert_ne!(out.status.code(), Some(124), "tessera hung; stdout {:?}", String::from_utf8_lossy(&out.stdout));
    out
}

fn args(kernel: &Path, sock: &Path, mem: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["-accel", "kvm", "-m", "64M", "-nographic", "-device", "isa-debug-exit"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(mem.iter().map(|s| s.to_string()));
    a.push("-kernel".into());
    a.push(kernel.display().to_string());
    a.push("-chardev".into());
    a.push(format!("socket,id=c0,path={}", sock.display()));
    a.push("-device".into());
    a.push("vhost-user-blk-pci,chardev=c0,num-queues=2".into());
    a
}

const SHARED: &[&str] = &["-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem"];

#[test]
fn the_launcher_attaches_a_qemu_storage_daemon_export() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let d = dir("vbl");
    let img = image(&d.0);
    let sock = d.0.join("qsd.sock");
    let Some(_b) = qsd(&img, &sock, 2) else { return };
    let out = tessera(&args(&guest(&d.0), &sock, SHARED));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("virtio-blk: ok"), "stdout {stdout:?} stderr {:?}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0x21), "stderr {:?}", String::from_utf8_lossy(&out.stderr));
    check_image(&img);
}

#[test]
fn guest_ram_that_is_not_shared_is_refused() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let d = dir("vbl-mem");
    let img = image(&d.0);
    let sock = d.0.join("qsd.sock");
    let Some(_b) = qsd(&img, &sock, 2) else { return };
    let want = "-device vhost-user-blk-pci,chardev=c0,num-queues=2: Failed initializing \
                vhost-user memory map, consider using -object memory-backend-file share=on";
    for mem in [&[][..], &["-object", "memory-backend-memfd,id=mem,size=64M", "-machine", "memory-backend=mem"][..]] {
        let out = tessera(&args(&guest(&d.0), &sock, mem));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mem:?}: stderr {stderr:?}");
        assert!(stderr.contains(want), "{mem:?}: stderr {stderr:?}");
    }
}

#[test]
fn device_errors_read_like_qemus() {
    let d = dir("vbl-err");
    let k = d.0.join("k");
    std::fs::write(&k, b"x").unwrap();
    let base = |dev: &str| -> Vec<String> {
        let mut a: Vec<String> =
            ["-accel", "kvm", "-nographic", "-chardev", "socket,id=c0,path=/nonexistent/x.sock", "-device", dev]
                .iter()
                .map(|s| s.to_string())
                .collect();
        a.extend(SHARED.iter().map(|s| s.to_string()));
        a.push("-kernel".into());
        a.push(k.display().to_string());
        a
    };
    for (dev, want) in [
        ("vhost-user-blk-pci", "-device vhost-user-blk-pci: chardev is mandatory"),
        (
            "vhost-user-blk-pci,chardev=c9",
            "-device vhost-user-blk-pci,chardev=c9: Property 'vhost-user-blk-pci.chardev' can't find value 'c9'",
        ),
        (
            "vhost-user-blk-pci,chardev=c0,num-queues=0",
            "-device vhost-user-blk-pci,chardev=c0,num-queues=0: num-queues property must be larger than 0",
        ),
        (
            "vhost-user-blk-pci,chardev=c0,bogus=1",
            "-device vhost-user-blk-pci,chardev=c0,bogus=1: Property 'vhost-user-blk-pci.bogus' not found",
        ),
        (
            "vhost-user-blk-pci,chardev=c0",
            "-chardev socket,id=c0,path=/nonexistent/x.sock: Failed to connect to '/nonexistent/x.sock': No such \
             file or directory",
        ),
    ] {
        let out = tessera(&base(dev));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{dev}: {stderr}");
        assert!(stderr.contains(want), "{dev}: want {want:?}, got {stderr:?}");
    }
}
