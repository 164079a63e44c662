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

/// The same echo, driven by the UART interrupt: the guest programs the 8259 PIC (IRQ 4 → vector 0x24), enables
/// the UART's received-data interrupt and sleeps in `sti; hlt`; its handler drains the FIFO and echoes.
/// Proves the IRQ line from the UART (irqfd) through the in-kernel PIC to the vCPU.
const IRQ_ECHO: &str = r#"
    incl 0x50000            /* boots so far (RAM outside the image survives a reset) */
    mov $0x90000, %esp
    mov $isr, %eax
    mov $(idt + 0x24 * 8), %edi
    mov %ax, (%edi)
    mov %cs, %cx
    mov %cx, 2(%edi)
    movw $0x8e00, 4(%edi)
    shr $16, %eax
    mov %ax, 6(%edi)
    lidt idtr
    /* 8259A initialisation: ICW1 edge/cascade/ICW4, ICW2 vector bases, ICW3 wiring, ICW4 8086 mode */
    mov $0x11, %al
    outb %al, $0x20
    outb %al, $0xa0
    mov $0x20, %al
    outb %al, $0x21
    mov $0x28, %al
    outb %al, $0xa1
    mov $0x04, %al
    outb %al, $0x21
    mov $0x02, %al
    outb %al, $0xa1
    mov $0x01, %al
    outb %al, $0x21
    outb %al, $0xa1
    mov $0xef, %al          /* only IRQ 4 unmasked */
    outb %al, $0x21
    mov $0xff, %al
    outb %al, $0xa1
    mov $0x3fc, %dx         /* MCR: DTR | RTS | OUT2 (OUT2 gates the IRQ on a PC) */
    mov $0x0b, %al
    outb %al, %dx
    mov $0x3f9, %dx         /* IER: received data available */
    mov $0x01, %al
    outb %al, %dx
    mov $0x52, %bl          /* 'R': ready */
    call putc
30: sti
    hlt
    jmp 30b

/* The handler never returns with IRET: this host's KVM emulates guest instructions and its emulator only does
   real-mode IRET (instruction emulation fails otherwise). It drops its frame and goes back to the idle loop,
   which is all this guest needs. */
isr:
31: mov $0x3fd, %dx
    inb %dx, %al
    test $0x01, %al
    jz 32f
    mov $0x3f8, %dx
    inb %dx, %al
    mov %al, %bl
    cmp $0x21, %bl
    je 33f
    call putc
    jmp 31b
32: mov $0x20, %al          /* non-specific EOI */
    outb %al, $0x20
    mov $0x90000, %esp
    jmp 30b
33: cmpl $2, 0x50000        /* '!' on the first boot of a REBOOT guest resets the machine */
    jae 34f
    cmpb $0, reboot_first
    je 34f
    mov $0xfe, %al
    outb %al, $0x64
34: mov $0x501, %dx
    mov $0x33, %al
    outb %al, %dx
    jmp 9f

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

const IDT: &str = r#"
    .p2align 3
idt: .fill 256, 8, 0
idtr: .word 256 * 8 - 1
    .long idt
"#;

#[test]
fn input_raises_the_uart_interrupt() {
    if !kvm_available("input_raises_the_uart_interrupt") {
        return;
    }
    let dir = TempDir::new("irqecho");
    let kernel = pvh_guest(&dir.0, "irqecho", IRQ_ECHO, &format!("{IDT}reboot_first: .byte 0\n")).unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();
    core.wait_output(b"R");
    core.send_input(b"interrupt-driven\n");
    core.wait_output(b"interrupt-driven\n");
    let long: Vec<u8> = (0..200u32).map(|i| b'A' + (i % 26) as u8).collect();
    core.send_input(&long);
    core.wait_output(&long);
    core.send_input(b"!");
    core.expect_exit((0x33 << 1) | 1);
    assert_eq!(core.output, [b"R".as_slice(), b"interrupt-driven\n", &long].concat());
}

#[test]
fn interrupts_still_arrive_after_a_reboot() {
    if !kvm_available("interrupts_still_arrive_after_a_reboot") {
        return;
    }
    // The reboot builds a new KVM VM; the UART's interrupt line must be wired into it again.
    let dir = TempDir::new("irqreboot");
    let kernel = pvh_guest(&dir.0, "irqreboot", IRQ_ECHO, &format!("{IDT}reboot_first: .byte 1\n")).unwrap();
    let mut core = start(&Setup::new(&kernel));
    core.expect_ready();
    core.wait_output(b"R");
    core.send_input(b"first boot\n");
    core.wait_output(b"first boot\n");
    core.send_input(b"!");
    core.wait_output(b"first boot\nR");
    core.send_input(b"second boot\n");
    core.wait_output(b"second boot\n");
    core.send_input(b"!");
    core.expect_exit((0x33 << 1) | 1);
    assert_eq!(core.text(), "Rfirst boot\nRsecond boot\n");
}
