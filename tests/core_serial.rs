//! Serial input: bytes from the chardev side reach the guest's RX FIFO (more than the FIFO holds, in order),
//! a break shows as LSR.BI, and the guest's echo comes back over the serial channel.

#[path = "core_harness.rs"]
mod harness;

use harness::{kvm_available, start, Setup, TempDir};
use tessera_tests::tiny_guest::{asm, pvh_guest};

/// Polls LSR; on BI prints "[break]"; on DR reads RBR: '!' ends the VM (debug-exit 0x22), anything else is
/// echoed back.
const ECHO: &str = r#"
10: mov $0x3fd, %dx
    inb %dx, %al
    mov %al, %cl
    test $0x10, %cl
    jz 12f
    mov $brk, %esi
11: movb (%esi), %bl
    test %bl, %bl
    jz 12f
    call putc
    inc %esi
    jmp 11b
12: test $0x01, %cl
    jz 10b
    mov $0x3f8, %dx
    inb %dx, %al
    mov %al, %bl
    cmp $0x21, %bl
    je 20f
    call putc
    jmp 10b
20: mov $0x501, %dx
    mov $0x22, %al
    outb %al, %dx
    jmp 9f

/* putc: write %bl to COM1 once THR is empty; clobbers %al, %dx */
putc:
    mov $0x3fd, %dx
1:  inb %dx, %al
    test $0x20, %al
    jz 1b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    ret
"#;

#[test]
fn input_is_echoed_in_order_beyond_the_fifo_and_break_is_seen() {
    if !kvm_available("input_is_echoed_in_order_beyond_the_fifo_and_break_is_seen") {
        return;
    }
    let dir = TempDir::new("echo");
    // A stack for `call`: the boot stack the core sets is below 1 MiB; use our own to be independent of it.
    let code = format!("    mov $0x90000, %esp\n{ECHO}");
    let kernel = pvh_guest(&dir.0, "echo", &code, &asm::string("brk", "[break]")).unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();

    core.send_input(b"hello, echo\n");
    core.wait_output(b"hello, echo\n");

    // 300 bytes in one message: more than the 64-byte FIFO, so the core must feed them as the guest drains it.
    let long: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
    core.send_input(&long);
    core.wait_output(&long);

    core.send_break();
    core.wait_output(b"[break]\0");

    core.send_input(b"!");
    core.expect_exit((0x22 << 1) | 1);
    let expected = [b"hello, echo\n".as_slice(), &long, b"[break]\0"].concat();
    assert_eq!(core.output, expected, "echo: {:?}", core.text());
}
