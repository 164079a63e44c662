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

/// `TESSERA_BLK=path` runs the test with that tessera-blk (e.g. the blk branch's build) through a private
/// libexec directory; otherwise the one built next to the launcher.
fn libexec_with_blk(d: &Path) -> Option<PathBuf> {
    let blk = std::env::var_os("TESSERA_BLK")?;
    let lib = d.join("libexec");
    std::fs::create_dir_all(&lib).unwrap();
    let built = bins::launcher("tessera");
    let built = built.parent().unwrap();
    for b in ["tessera-core", "tessera-chardev"] {
        std::os::unix::fs::symlink(built.join(b), lib.join(b)).unwrap();
    }
    std::os::unix::fs::symlink(blk, lib.join("tessera-blk")).unwrap();
    Some(lib)
}

fn tessera_env(args: &[String], libexec: Option<&Path>) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("60").arg(bins::launcher("tessera")).args(args);
    if let Some(l) = libexec {
        cmd.env("TESSERA_LIBEXEC_DIR", l);
    }
    let out = cmd.output().unwrap();
    assert_ne!(out.status.code(), Some(124), "tessera hung; stdout {:?}", String::from_utf8_lossy(&out.stdout));
    out
}

#[test]
fn a_drive_is_served_by_a_tessera_blk_the_launcher_starts() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let d = dir("vbl-drive");
    let libexec = libexec_with_blk(&d.0);
    let kernel = guest(&d.0);
    for (n, disk) in [
        "-drive file={img},if=virtio,format=raw,cache=none,discard=unmap",
        "-drive file={img},if=virtio,format=raw,cache=none,aio=threads",
        "-drive file={img},if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,num-queues=1",
        "-blockdev driver=file,node-name=f,filename={img} -blockdev driver=raw,node-name=r,file=f \
         -device virtio-blk-pci,drive=r",
        "-blockdev driver=raw,node-name=r,file.driver=file,file.filename={img},file.cache.direct=on \
         -device virtio-blk-pci,drive=r,addr=5",
    ]
    .iter()
    .enumerate()
    {
        let img = d.0.join(format!("disk{n}.img"));
        std::fs::rename(image(&d.0), &img).unwrap();
        let mut a: Vec<String> = ["-accel", "kvm", "-m", "64M", "-nographic", "-device", "isa-debug-exit"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(SHARED.iter().map(|s| s.to_string()));
        a.extend(["-kernel".to_string(), kernel.display().to_string()]);
        a.extend(disk.replace("{img}", &img.display().to_string()).split_whitespace().map(String::from));
        let out = tessera_env(&a, libexec.as_deref());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("virtio-blk: ok"), "{disk}: stdout {stdout:?} stderr {stderr:?}");
        assert_eq!(out.status.code(), Some(0x21), "{disk}: stderr {stderr:?}");
        check_image(&img);
    }
}

#[test]
fn drive_errors_read_like_qemus() {
    let d = dir("vbl-drive-err");
    let k = d.0.join("k");
    std::fs::write(&k, b"x").unwrap();
    let missing = d.0.join("missing.img");
    let libexec = libexec_with_blk(&d.0);
    for (drive, want) in [
        (
            format!("file={},if=virtio", missing.display()),
            format!("Could not open '{}': No such file or directory", missing.display()),
        ),
        (format!("file={},if=virtio,bogus=1", k.display()), "Invalid parameter 'bogus'".to_string()),
        (format!("file={},if=virtio,format=xyz", k.display()), "'xyz' invalid format".to_string()),
        (format!("file={},if=virtio,aio=bogus", k.display()), "invalid aio option".to_string()),
        (format!("file={},if=virtio,aio=native", k.display()), "aio=native".to_string()),
        (format!("file={},if=none,id=x -device virtio-blk-pci", k.display()), "drive property not set".into()),
        (
            format!("file={},if=none,id=x -device virtio-blk-pci,drive=y", k.display()),
            "Property 'virtio-blk-pci.drive' can't find value 'y'".into(),
        ),
    ] {
        let mut a: Vec<String> = ["-accel", "kvm", "-nographic"].iter().map(|s| s.to_string()).collect();
        a.extend(SHARED.iter().map(|s| s.to_string()));
        a.extend(["-kernel".to_string(), k.display().to_string(), "-drive".to_string()]);
        a.extend(drive.split(' ').map(String::from));
        let out = tessera_env(&a, libexec.as_deref());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{drive}: {stderr}");
        assert!(stderr.contains(&want), "{drive}: want {want:?}, got {stderr:?}");
    }
}

#[test]
fn a_qcow2_drive_is_written_through_tessera_blk() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm is absent");
        return;
    }
    let d = dir("vbl-qcow2");
    let libexec = libexec_with_blk(&d.0);
    let raw = image(&d.0);
    let qcow2 = d.0.join("disk.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2).status();
    match st {
        Ok(s) => assert!(s.success(), "qemu-img convert failed"),
        Err(e) => {
            eprintln!("SKIPPED: qemu-img cannot be run: {e}");
            return;
        }
    }
    let mut a: Vec<String> = ["-accel", "kvm", "-m", "64M", "-nographic", "-device", "isa-debug-exit"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(SHARED.iter().map(|s| s.to_string()));
    a.extend(["-kernel".to_string(), guest(&d.0).display().to_string(), "-drive".to_string()]);
    a.push(format!("file={},if=virtio", qcow2.display()));
    let out = tessera_env(&a, libexec.as_deref());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(String::from_utf8_lossy(&out.stdout).contains("virtio-blk: ok"), "stderr {stderr:?}");
    assert_eq!(out.status.code(), Some(0x21), "stderr {stderr:?}");
    // The guest's sector is in the qcow2 (tessera-blk flushed its metadata when the launcher stopped it).
    let back = d.0.join("back.raw");
    let st = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&qcow2).arg(&back).status();
    assert!(st.unwrap().success(), "qemu-img convert back failed");
    check_image(&back);
}
