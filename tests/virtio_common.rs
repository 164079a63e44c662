//! Shared by the virtio_blk_* tests (included with `#[path]`): a tiny PVH guest that drives a virtio-blk PCI
//! function through its registers, a disk image, and the vhost-user backends (qemu-storage-daemon, tessera-blk).

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::tiny_guest::{asm, pvh_guest};

pub const DISK_SIZE: u64 = 1 << 20;
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const HDR: u32 = 0x20_3000;
const WBUF: u32 = 0x20_4000;
const RBUF: u32 = 0x20_5000;
const RBUF2: u32 = 0x20_6000;
const STATUS: u32 = 0x20_7000;

/// One request with descriptors 0-2 (header, 512-byte data, status), made available as entry `n - 1`, then
/// poll the used index until it reaches `n`. `write` means device-writable data (a read request).
fn request(n: u32, typ: u32, sector: u32, buf: u32, device_writes: bool) -> String {
    let data_flags = if device_writes { 3 } else { 1 };
    format!(
        r#"
    movl ${typ}, {HDR}
    movl $0, {HDR}+4
    movl ${sector}, {HDR}+8
    movl $0, {HDR}+12
    movb $0xff, {STATUS}
    movl ${HDR}, {DESC}
    movl $0, {DESC}+4
    movl $16, {DESC}+8
    movw $1, {DESC}+12
    movw $1, {DESC}+14
    movl ${buf}, {DESC}+16
    movl $0, {DESC}+20
    movl $512, {DESC}+24
    movw ${data_flags}, {DESC}+28
    movw $2, {DESC}+30
    movl ${STATUS}, {DESC}+32
    movl $0, {DESC}+36
    movl $1, {DESC}+40
    movw $2, {DESC}+44
    movw $0, {DESC}+46
    movw $0, {AVAIL}+4+{slot}
    movw ${n}, {AVAIL}+2
    mov qnotify, %ebx
    movw $0, (%ebx)
    mov $20000000, %ecx
poll{n}:
    movzwl {USED}+2, %eax
    cmp ${n}, %eax
    je done{n}
    dec %ecx
    jnz poll{n}
    jmp fail_timeout
done{n}:
    cmpb $0, {STATUS}
    jne fail_status
"#,
        slot = 2 * ((n - 1) % 8)
    )
}

pub fn guest(dir: &Path) -> PathBuf {
    guest_with(dir, false)
}

/// Where the rebooting guest keeps its "first boot done" flag: RAM survives a reboot, the kernel image is
/// loaded again.
const FLAG: u32 = 0x30_0000;

/// With `reboot`, the guest does everything once, resets the machine through the i8042, and does it all again
/// on the second boot (the device must have been reset and restarted in between).
pub fn guest_with(dir: &Path, reboot: bool) -> PathBuf {
    let sectors = DISK_SIZE / 512;
    let mut code = String::from(
        r#"
    mov $0x90000, %esp
    movl $0, USEDIDX
    movl $0, AVAILIDX
    jmp main
cfgrd:
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    in %dx, %eax
    ret
cfgwr:
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
    mov %ebx, %eax
    out %eax, %dx
    ret
main:
    mov $1, %ebx
vfind:
    mov %ebx, %eax
    shl $11, %eax
    or $0x80000000, %eax
    call cfgrd
    cmp $0x10421af4, %eax
    je vfound
    inc %ebx
    cmp $32, %ebx
    jne vfind
    jmp fail_nodev
vfound:
    mov %ebx, %eax
    shl $11, %eax
    or $0x80000000, %eax
    mov %eax, cfgbase
    or $0x10, %eax
    call cfgrd
    and $0xfffffff0, %eax
    mov %eax, bar
    mov cfgbase, %eax
    or $0x34, %eax
    call cfgrd
    and $0xff, %eax
    mov %eax, %esi
capl:
    test %esi, %esi
    jz capsdone
    mov cfgbase, %eax
    or %esi, %eax
    call cfgrd
    mov %eax, %ecx
    cmp $0x11, %cl
    jne notmsix
    mov %esi, msixcap
    mov cfgbase, %eax
    or %esi, %eax
    add $4, %eax
    call cfgrd
    and $0xfffffff8, %eax
    add bar, %eax
    mov %eax, msixtable
    jmp nextcap
notmsix:
    cmp $0x09, %cl
    jne nextcap
    shr $24, %ecx
    mov cfgbase, %eax
    or %esi, %eax
    add $8, %eax
    call cfgrd
    add bar, %eax
    mov %eax, %edi
    cmp $1, %ecx
    jne notcommon
    mov %edi, common
notcommon:
    cmp $4, %ecx
    jne notdev
    mov %edi, devcfg
notdev:
    cmp $2, %ecx
    jne nextcap
    mov %edi, notify
    mov cfgbase, %eax
    or %esi, %eax
    add $16, %eax
    call cfgrd
    mov %eax, mult
nextcap:
    mov cfgbase, %eax
    or %esi, %eax
    call cfgrd
    shr $8, %eax
    and $0xfc, %eax
    mov %eax, %esi
    jmp capl
capsdone:
    cmpl $0, common
    je fail_caps
    cmpl $0, notify
    je fail_caps
    cmpl $0, devcfg
    je fail_caps
    mov common, %ebp
    movb $0, 0x14(%ebp)
    movb $1, 0x14(%ebp)
    movb $3, 0x14(%ebp)
    movl $1, 0x00(%ebp)
    mov 0x04(%ebp), %eax
    test $1, %eax
    jz fail_features
    movl $1, 0x08(%ebp)
    movl $1, 0x0c(%ebp)
    movl $0, 0x08(%ebp)
    movl $0, 0x0c(%ebp)
    movb $0xb, 0x14(%ebp)
    movb 0x14(%ebp), %al
    test $8, %al
    jz fail_features
    movw $0, 0x16(%ebp)
    movw $8, 0x18(%ebp)
"#,
    );
    code += &format!(
        r#"
    movl ${DESC}, 0x20(%ebp)
    movl $0, 0x24(%ebp)
    movl ${AVAIL}, 0x28(%ebp)
    movl $0, 0x2c(%ebp)
    movl ${USED}, 0x30(%ebp)
    movl $0, 0x34(%ebp)
    movzwl 0x1e(%ebp), %eax
    imul mult, %eax
    add notify, %eax
    mov %eax, qnotify
    movw $1, 0x1c(%ebp)
    movw $0, 0x1a(%ebp)
    cmpw $0, 0x1a(%ebp)
    jne fail_msix
    mov msixtable, %ebx
    test %ebx, %ebx
    jz fail_msix
    movl $0xfee00000, (%ebx)
    movl $0, 4(%ebx)
    movl $0x40, 8(%ebx)
    movl $0, 12(%ebx)
    mov cfgbase, %eax
    or msixcap, %eax
    call cfgrd
    or $0x80000000, %eax
    mov %eax, %ebx
    mov cfgbase, %eax
    or msixcap, %eax
    call cfgwr
    orl $0x100, 0xfee000f0
    movb $0xf, 0x14(%ebp)
    movb 0x14(%ebp), %al
    test $0x40, %al
    jnz fail_start
    mov devcfg, %ebx
    mov (%ebx), %eax
    cmp ${sectors}, %eax
    jne fail_capacity
    mov 4(%ebx), %eax
    test %eax, %eax
    jnz fail_capacity
    xor %ecx, %ecx
fill:
    mov %cl, %al
    xor $0xa5, %al
    mov %al, {WBUF}(%ecx)
    inc %ecx
    cmp $512, %ecx
    jne fill
"#
    );
    code += &request(1, 1, 1, WBUF, false);
    code += &request(2, 0, 1, RBUF, true);
    code += &request(3, 0, 2, RBUF2, true);
    code += &format!(
        r#"
    xor %ecx, %ecx
cmp:
    mov {WBUF}(%ecx), %al
    cmp {RBUF}(%ecx), %al
    jne fail_compare
    inc %ecx
    cmp $512, %ecx
    jne cmp
    mov $1000000, %ecx
irrpoll:
    testl $1, 0xfee00220
    jnz irrok
    dec %ecx
    jnz irrpoll
    jmp fail_msix
irrok:
    cmpl $0x54534f48, {RBUF2}
    jne fail_hostdata
    cmpl $0x41544144, {RBUF2}+4
    jne fail_hostdata
"#
    );
    if reboot {
        code += &format!("    cmpl $0x1234, {FLAG}\n    je final\n    movl $0x1234, {FLAG}\n");
        code += &asm::print("first");
        code += "    mov $0xfe, %al\n    outb %al, $0x64\n    jmp stop\nfinal:\n";
    }
    code += &asm::print("ok");
    code += &asm::debug_exit(0x501, 0x10);
    // isa-debug-exit ends the VM from another thread: stop here until it does.
    code += "stop:\n    cli\n    hlt\n    jmp stop\n";
    let mut data = String::from("cfgbase: .long 0\nbar: .long 0\ncommon: .long 0\nnotify: .long 0\nmult: .long 0\n");
    data += "devcfg: .long 0\nqnotify: .long 0\nmsixcap: .long 0\nmsixtable: .long 0\n";
    data += &asm::string("ok", "virtio-blk: ok\n");
    data += &asm::string("first", "virtio-blk: first boot ok\n");
    for f in ["nodev", "caps", "features", "start", "capacity", "timeout", "status", "compare", "hostdata", "msix"] {
        code += &format!("fail_{f}:\n{}{}    jmp stop\n", asm::print(&format!("m_{f}")), asm::debug_exit(0x501, 0x3));
        data += &asm::string(&format!("m_{f}"), &format!("virtio-blk: FAILED: {f}\n"));
    }
    // The rings' index words are cleared at start: on a second boot they still hold the first boot's values.
    let code = code.replace("USEDIDX", &USED.to_string()).replace("AVAILIDX", &AVAIL.to_string());
    pvh_guest(dir, if reboot { "virtio_blk_reboot" } else { "virtio_blk" }, &code, &data).unwrap()
}

pub fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK_SIZE).unwrap();
    f.write_all_at(b"HOSTDATA", 1024).unwrap();
    p
}

pub struct Backend(pub Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(sock: &Path, backend: &mut Backend) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(st)) = backend.0.try_wait() {
            panic!("the backend exited before creating {}: {st}", sock.display());
        }
        assert!(Instant::now() < deadline, "the backend never created {}", sock.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn qsd(img: &Path, sock: &Path, queues: u16) -> Option<Backend> {
    let spawned = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ))
        .stdout(Stdio::null())
        .spawn();
    match spawned {
        Ok(c) => {
            let mut b = Backend(c);
            wait_for_socket(sock, &mut b);
            Some(b)
        }
        Err(e) => {
            eprintln!("SKIPPED: qemu-storage-daemon cannot be started: {e}");
            None
        }
    }
}

pub fn tessera_blk(img: &Path, sock: &Path, queues: u16) -> Backend {
    // TESSERA_BLK names another build (e.g. the blk branch's) while tessera-blk is not in this tree.
    let bin = match std::env::var_os("TESSERA_BLK") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().join("tessera-blk"),
    };
    let c = Command::new(&bin)
        .arg("--socket-path")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .args(["--format", "raw", "--num-queues", &queues.to_string()])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} (cargo build -p tessera-blk): {e}", bin.display()));
    let mut b = Backend(c);
    wait_for_socket(sock, &mut b);
    b
}

/// Sector 1 of the image holds what the guest wrote.
pub fn check_image(img: &Path) {
    let mut sector = [0u8; 512];
    std::fs::File::open(img).unwrap().read_exact_at(&mut sector, 512).unwrap();
    let want: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ 0xa5).collect();
    assert_eq!(sector.to_vec(), want, "sector 1 of the image holds what the guest wrote");
}
