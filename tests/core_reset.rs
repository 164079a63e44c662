//! Guest resets: a triple fault and the i8042 reset command end the VM with status 0 under `-no-reboot`, and
//! reboot it (kernel loaded again, vCPUs reset) without it, as QEMU does.

#[path = "core_harness.rs"]
mod harness;

use harness::{kvm_available, start, Setup, TempDir};
use tessera_tests::tiny_guest::{asm, pvh_guest};

/// Load an empty IDT and execute an invalid opcode: #UD cannot be delivered, nor can the #GP and #DF that follow,
/// so the CPU shuts down (SDM Vol. 3 §6.15, interrupt 8).
const TRIPLE_FAULT: &str = "    lidt zero_idt\n    ud2\n";
const ZERO_IDT: &str = "zero_idt: .word 0\n    .long 0\n";

/// The i8042 "pulse reset line" command Linux uses (reboot=k).
const KBD_RESET: &str = "    mov $0xfe, %al\n    outb %al, $0x64\n";

fn guest(dir: &TempDir, name: &str, reset: &str) -> std::path::PathBuf {
    let code = format!("{}{reset}", asm::print("msg"));
    pvh_guest(&dir.0, name, &code, &format!("{}{ZERO_IDT}", asm::string("msg", "resetting\n"))).unwrap()
}

/// Counts its boots in RAM outside its own image (0x50000 survives a reset, as RAM does on a PC), prints
/// "boot N", resets until the third boot, then reports N through isa-debug-exit.
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
    setup.no_reboot = true;
    let mut core = start(&setup);
    core.expect_ready();
    let reason = core.expect_exit(0);
    assert_eq!(core.text(), "resetting\n");
    assert!(reason.contains("-no-reboot"), "{reason}");
}

#[test]
fn triple_fault_with_no_reboot_exits_0() {
    if kvm_available("triple_fault_with_no_reboot_exits_0") {
        run_no_reboot("triple", TRIPLE_FAULT);
    }
}

#[test]
fn i8042_reset_with_no_reboot_exits_0() {
    if kvm_available("i8042_reset_with_no_reboot_exits_0") {
        run_no_reboot("kbdreset", KBD_RESET);
    }
}

fn run_reboots(name: &str, reset: &str) {
    let dir = TempDir::new(name);
    let mut core = start(&Setup::new(&counting_guest(&dir, name, reset)));
    core.expect_ready();
    core.expect_exit((3 << 1) | 1);
    assert_eq!(core.text(), "boot 1\nboot 2\nboot 3\n");
}

#[test]
fn i8042_reset_reboots_the_guest() {
    if kvm_available("i8042_reset_reboots_the_guest") {
        run_reboots("kbdreboot", KBD_RESET);
    }
}

#[test]
fn triple_fault_reboots_the_guest() {
    if kvm_available("triple_fault_reboots_the_guest") {
        run_reboots("triplereboot", TRIPLE_FAULT);
    }
}
