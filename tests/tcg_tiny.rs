//! Tiny guests on the software CPU (`-accel tcg`) through the real `tessera-core`: PVH entry in 32-bit
//! protected mode, the UART and isa-debug-exit on the core's bus next to the platform's ports, guest resets
//! (i8042, 0xcf9) with and without `-no-reboot`, and what the engine refuses.

#[path = "core_harness.rs"]
mod harness;

use harness::{start, Setup, TempDir};
use tessera_ipc::messages::{Accel, DebugExitConfig};
use tessera_tests::tiny_guest::{asm, pvh_guest};

const ZERO_IDT: &str = "zero_idt: .word 0\n    .long 0\n";
const KBD_RESET: &str = "    mov $0xfe, %al\n    outb %al, $0x64\n";
/// PIIX reset control: bit 2 (reset CPU) with bit 1 (hard reset), as Linux's reboot=p writes it.
const CF9_RESET: &str = "    mov $0xcf9, %dx\n    mov $0x06, %al\n    outb %al, %dx\n";

fn tcg(setup: &mut Setup) {
    setup.accel = Accel::Tcg;
}

#[test]
fn hello_on_the_software_cpu() {
    let dir = TempDir::new("tcg-hello");
    let code = format!("{}{}", asm::print("msg"), asm::debug_exit(0x501, 0x21));
    let elf = pvh_guest(&dir.0, "hello", &code, &asm::string("msg", "Hello from the software CPU\n")).unwrap();
    let mut setup = Setup::new(&elf);
    tcg(&mut setup);
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit((0x21 << 1) | 1);
    assert_eq!(core.text(), "Hello from the software CPU\n");
}

/// The platform answers its ports: the PIT's channel 2 counts down (gated through port 0x61) and the CMOS holds
/// the memory size above 16 MiB in 64 KiB units (registers 0x34/0x35), which the guest reports through
/// isa-debug-exit.
#[test]
fn the_platform_answers_its_ports() {
    let dir = TempDir::new("tcg-ports");
    let code = r#"
    mov $0x34, %al
    outb %al, $0x70
    inb $0x71, %al
    mov %al, %bl
    mov $0x35, %al
    outb %al, $0x70
    inb $0x71, %al
    mov %al, %bh
    /* 64 MiB of RAM: (64 - 16) MiB / 64 KiB = 0x300 */
    cmp $0x300, %bx
    jne 8f
    /* PIT channel 2: gate on, mode 0, count 0xffff; two latched reads must differ. */
    mov $0x01, %al
    outb %al, $0x61
    mov $0xb0, %al
    outb %al, $0x43
    mov $0xff, %al
    outb %al, $0x42
    outb %al, $0x42
    mov $0x80, %al
    outb %al, $0x43
    inb $0x42, %al
    mov %al, %cl
    inb $0x42, %al
    mov %al, %ch
    mov $100000, %ecx
1:  loop 1b
    mov $0x80, %al
    outb %al, $0x43
    inb $0x42, %al
    mov %al, %dl
    inb $0x42, %al
    mov %al, %dh
    cmp $0xffff, %dx
    je 8f
    mov $0x501, %dx
    mov $0x11, %al
    outb %al, %dx
8:  mov $0x501, %dx
    mov $0x22, %al
    outb %al, %dx
"#;
    let elf = pvh_guest(&dir.0, "ports", code, "").unwrap();
    let mut setup = Setup::new(&elf);
    tcg(&mut setup);
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit((0x11 << 1) | 1);
}

fn guest(dir: &TempDir, name: &str, reset: &str) -> std::path::PathBuf {
    let code = format!("{}{reset}", asm::print("msg"));
    pvh_guest(&dir.0, name, &code, &format!("{}{ZERO_IDT}", asm::string("msg", "resetting\n"))).unwrap()
}

/// Counts its boots in RAM that survives a reset, resets until the third boot, then exits with the count.
fn counting_guest(dir: &TempDir, name: &str, reset: &str) -> std::path::PathBuf {
    let code = format!(
        r#"
    incl 0x50000
    mov 0x50000, %eax
    add $0x30, %al
    movb %al, digit
{print}
    cmpl $3, 0x50000
    jae 5f
{reset}
5:  mov 0x50000, %eax
    mov $0x501, %dx
    outb %al, %dx
"#,
        print = asm::print("msg")
    );
    let data = format!("msg: .ascii \"boot \"\ndigit: .byte 0x3f\n    .asciz \"\\n\"\n{ZERO_IDT}");
    pvh_guest(&dir.0, name, &code, &data).unwrap()
}

fn run_no_reboot(name: &str, reset: &str) {
    let dir = TempDir::new(name);
    let mut setup = Setup::new(&guest(&dir, name, reset));
    tcg(&mut setup);
    setup.no_reboot = true;
    let mut core = start(&setup);
    core.expect_ready();
    let reason = core.expect_exit(0);
    assert_eq!(core.text(), "resetting\n");
    assert!(reason.contains("-no-reboot"), "{reason}");
}

fn run_reboots(name: &str, reset: &str) {
    let dir = TempDir::new(name);
    let mut setup = Setup::new(&counting_guest(&dir, name, reset));
    tcg(&mut setup);
    let mut core = start(&setup);
    core.expect_ready();
    core.expect_exit((3 << 1) | 1);
    assert_eq!(core.text(), "boot 1\nboot 2\nboot 3\n");
}

// A triple fault is not among these: the software CPU delivers exceptions in long mode only, so a
// protected-mode guest's fault ends the VM with its "outside long mode" error instead (Linux's triple-fault
// restart happens in long mode and is covered by the CPU's own tests).

#[test]
fn resets_with_no_reboot_exit_0() {
    run_no_reboot("tcg-kbd", KBD_RESET);
    run_no_reboot("tcg-cf9", CF9_RESET);
}

#[test]
fn resets_reboot_the_guest() {
    run_reboots("tcg-kbd-reboot", KBD_RESET);
    run_reboots("tcg-cf9-reboot", CF9_RESET);
}

#[test]
fn more_than_one_vcpu_is_refused_clearly() {
    let dir = TempDir::new("tcg-smp");
    let elf = pvh_guest(&dir.0, "smp", &asm::debug_exit(0x501, 1), "").unwrap();
    let mut setup = Setup::new(&elf);
    tcg(&mut setup);
    setup.smp = 2;
    let mut core = start(&setup);
    let msg = core.expect_fatal();
    assert!(msg.contains("-smp 2") && msg.contains("software CPU"), "{msg}");
}

#[test]
fn isa_debug_exit_on_a_platform_port_is_refused() {
    let dir = TempDir::new("tcg-overlap");
    let elf = pvh_guest(&dir.0, "overlap", &asm::debug_exit(0x604, 1), "").unwrap();
    let mut setup = Setup::new(&elf);
    tcg(&mut setup);
    setup.debug_exit = Some(DebugExitConfig { iobase: 0x604, iosize: 1 });
    let mut core = start(&setup);
    let msg = core.expect_fatal();
    assert!(msg.contains("isa-debug-exit") && msg.contains("overlaps"), "{msg}");
}
