//! End to end, as a user runs it: the launcher starts the real tessera-core and tessera-chardev; a tiny PVH
//! guest (assembled here with the system's `as` and `ld`) prints "hello" on COM1, which reaches stdout through
//! the chardev process, and writes to isa-debug-exit, whose value becomes the exit status. Skipped, with a
//! message, only where /dev/kvm is absent.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::bins;

/// COM1 output polling LSR.THRE, then `exit` (optional) to isa-debug-exit at 0x501, then halt forever.
fn guest(dir: &Path, name: &str, exit: Option<u8>) -> PathBuf {
    guest_elf(dir, name, exit, 64)
}

/// The same guest in an ELF of `class` 32 or 64 bits (QEMU boots PVH notes in both).
fn guest_elf(dir: &Path, name: &str, exit: Option<u8>, class: u32) -> PathBuf {
    let exit_code = match exit {
        Some(v) => format!("    mov $0x501, %dx\n    mov ${v:#x}, %al\n    outb %al, %dx\n"),
        None => String::new(),
    };
    let src = format!(
        r#"    .code32
    .text
    .globl _start
_start:
    mov $msg, %esi
1:  movb (%esi), %bl
    test %bl, %bl
    jz 3f
    mov $0x3fd, %dx
2:  inb %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    inc %esi
    jmp 1b
3:
{exit_code}
9:  cli
    hlt
    jmp 9b
    .data
msg: .asciz "hello\n"
    /* Xen PVH entry note (Xen public/elfnote.h: XEN_ELFNOTE_PHYS32_ENTRY = 18) */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long _start
    .p2align 2
"#
    );
    let script = "ENTRY(_start)\nPHDRS { text PT_LOAD FLAGS(7); note PT_NOTE; }\nSECTIONS {\n    . = 0x100000;\n    \
                  .text : { *(.text*) *(.rodata*) *(.data*) *(.bss*) } :text\n    .note.Xen : { *(.note.Xen) } :text :note\n    \
                  /DISCARD/ : { *(.note.gnu*) *(.comment) }\n}\n";
    let s = dir.join(format!("{name}.S"));
    let o = dir.join(format!("{name}.o"));
    let ld = dir.join(format!("{name}.ld"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&s, src).unwrap();
    std::fs::write(&ld, script).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("binutils (as, ld) must be installed");
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (as_flag, emulation) = if class == 32 { ("--32", "elf_i386") } else { ("--64", "elf_x86_64") };
    run(Command::new("as").arg(as_flag).arg("-o").arg(&o).arg(&s));
    run(Command::new("ld")
        .args([
            "-m",
            emulation,
            "--build-id=none",
            "-z",
            "noexecstack",
            "-z",
            "max-page-size=0x1000",
            "--no-warn-rwx-segments",
            "-T",
        ])
        .arg(&ld)
        .arg("-o")
        .arg(&elf)
        .arg(&o));
    elf
}

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped: /dev/kvm is absent, the guest cannot run on KVM here");
    false
}

fn launcher() -> Command {
    bins::launcher_command("qemu-system-x86_64")
}

use bins::wait_output;

#[test]
fn hello_through_the_chardev_and_the_debug_exit_status() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest(dir.path(), "hello", Some(0x21));
    let child = launcher()
        .args(["-accel", "kvm", "-m", "64M", "-kernel"])
        .arg(&elf)
        .args(["-serial", "stdio", "-display", "none", "-device", "isa-debug-exit,iobase=0x501,iosize=2"])
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout, "hello\n", "guest serial output; stderr: {stderr}");
    // isa-debug-exit: value v becomes (v << 1) | 1.
    assert_eq!(out.status.code(), Some(0x43), "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn a_32_bit_pvh_elf_boots_too() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest_elf(dir.path(), "hello32", Some(0x10), 32);
    let child = launcher()
        .args(["-accel", "kvm", "-m", "64M", "-kernel"])
        .arg(&elf)
        .args(["-nographic", "-device", "isa-debug-exit,iobase=0x501"])
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.ends_with("hello\n"),
        "guest serial output: {stdout:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0x21), "stdout: {stdout}");
}

#[test]
fn separate_processes_and_sigterm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let elf = guest(dir.path(), "forever", None);
    let serial = dir.path().join("serial.txt");
    let mut child = launcher()
        .args(["-accel", "kvm", "-m", "64M", "-kernel"])
        .arg(&elf)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-display", "none"])
        .spawn()
        .unwrap();
    // The guest's bytes reach the file through the chardev process.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&serial).unwrap_or_default() != "hello\n" {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("no hello in {}: {:?}\nstderr: {err}", serial.display(), std::fs::read_to_string(&serial));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let mut names: Vec<String> = children
        .split_whitespace()
        .map(|c| std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default().trim().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["tessera-chardev", "tessera-core"]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = wait_output(child, Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("qemu-system-x86_64: terminating on signal 15 from pid "), "{stderr}");
}
