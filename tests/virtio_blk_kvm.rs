//! tessera-core's virtio-pci transport and vhost-user frontend, driven by a tiny guest on KVM: the guest finds
//! the virtio-blk function by scanning PCI configuration space (mechanism #1), follows its capability list to
//! the common/notify/device structures in BAR 0, sets up a split virtqueue in its RAM, writes sector 1, reads it
//! back and reads sector 2 (written by the host beforehand), and reports on the serial port. The backend is
//! qemu-storage-daemon or tessera-blk; the image is checked on the host afterwards.

#[path = "core_harness.rs"]
mod harness;

#[path = "virtio_common.rs"]
mod common;

use std::path::Path;

use common::{check_image, guest, guest_with, image, qsd, tessera_blk};
use harness::{kvm_available, start, Setup, TempDir};
use tessera_ipc::messages::{VhostUserBlkConfig, VhostUserSocket};

fn setup(dir: &TempDir, sock: &Path, queues: Option<u16>) -> Setup {
    let mut s = Setup::new(&guest(&dir.0));
    s.ram_shared = true;
    s.vhost_user_blk = vec![VhostUserBlkConfig {
        id: "disk0".into(),
        socket: VhostUserSocket::Path(sock.display().to_string()),
        num_queues: queues,
        slot: None,
        origin: "-device vhost-user-blk-pci,chardev=c0".into(),
    }];
    s
}

fn run_guest_and_check(dir: &TempDir, img: &Path, sock: &Path, queues: u16) {
    let mut core = start(&setup(dir, sock, Some(queues)));
    core.expect_ready();
    core.expect_exit(0x21);
    assert_eq!(core.text(), "virtio-blk: ok\n");
    check_image(img);
}

#[test]
fn a_guest_writes_and_reads_through_qemu_storage_daemon() {
    if !kvm_available("a_guest_writes_and_reads_through_qemu_storage_daemon") {
        return;
    }
    let dir = TempDir::new("vblk-qsd");
    let img = image(&dir.0);
    let sock = dir.0.join("qsd.sock");
    let Some(_b) = qsd(&img, &sock, 2) else { return };
    run_guest_and_check(&dir, &img, &sock, 2);
}

#[test]
fn a_guest_writes_and_reads_through_tessera_blk() {
    if !kvm_available("a_guest_writes_and_reads_through_tessera_blk") {
        return;
    }
    let dir = TempDir::new("vblk-tblk");
    let img = image(&dir.0);
    let sock = dir.0.join("blk.sock");
    let _b = tessera_blk(&img, &sock, 1);
    run_guest_and_check(&dir, &img, &sock, 1);
}

#[test]
fn unshared_guest_ram_is_refused_like_qemu() {
    let dir = TempDir::new("vblk-noshare");
    let img = image(&dir.0);
    let sock = dir.0.join("unused.sock");
    let mut s = setup(&dir, &sock, Some(1));
    s.ram_shared = false;
    let _ = img;
    let mut core = start(&s);
    let msg = core.expect_fatal();
    assert_eq!(
        msg,
        "-device vhost-user-blk-pci,chardev=c0: Failed initializing vhost-user memory map, consider using \
         -object memory-backend-file share=on"
    );
}

#[test]
fn too_many_queues_for_the_backend_fail_with_qemus_message() {
    if !kvm_available("too_many_queues_for_the_backend_fail_with_qemus_message") {
        return;
    }
    let dir = TempDir::new("vblk-mq");
    let img = image(&dir.0);
    let sock = dir.0.join("qsd.sock");
    let Some(_b) = qsd(&img, &sock, 1) else { return };
    let mut core = start(&setup(&dir, &sock, Some(2)));
    let msg = core.expect_fatal();
    assert_eq!(
        msg,
        "-device vhost-user-blk-pci,chardev=c0: The maximum number of queues supported by the backend is 1"
    );
}

#[test]
fn the_device_is_reset_and_restarted_across_a_guest_reboot() {
    if !kvm_available("the_device_is_reset_and_restarted_across_a_guest_reboot") {
        return;
    }
    for backend in ["qsd", "tessera-blk"] {
        let dir = TempDir::new("vblk-reboot");
        let img = image(&dir.0);
        let sock = dir.0.join("b.sock");
        let _b = match backend {
            "qsd" => match qsd(&img, &sock, 1) {
                Some(b) => b,
                None => continue,
            },
            _ => tessera_blk(&img, &sock, 1),
        };
        let mut s = setup(&dir, &sock, Some(1));
        s.kernel = guest_with(&dir.0, true);
        let mut core = start(&s);
        core.expect_ready();
        core.expect_exit(0x21);
        assert_eq!(core.text(), "virtio-blk: first boot ok\nvirtio-blk: ok\n", "{backend}");
        check_image(&img);
    }
}

#[test]
fn a_backend_that_hangs_up_or_talks_nonsense_is_a_clear_error() {
    if !kvm_available("a_backend_that_hangs_up_or_talks_nonsense_is_a_clear_error") {
        return;
    }
    use std::io::{Read, Write};
    for garbage in [None, Some(&b"this is not vhost-user at all"[..])] {
        let dir = TempDir::new("vblk-bad");
        let sock = dir.0.join("bad.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if let Some(g) = garbage {
                let mut buf = [0u8; 12];
                let _ = s.read(&mut buf);
                let _ = s.write_all(g);
            }
        });
        let mut core = start(&setup(&dir, &sock, Some(1)));
        let msg = core.expect_fatal();
        assert!(msg.starts_with("-device vhost-user-blk-pci,chardev=c0: vhost-user backend: "), "{msg}");
        peer.join().unwrap();
    }
}
