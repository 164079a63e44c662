//! Tiny guests built from assembly with the system's `as` and `ld` (binutils), for tests that boot a real VM.
//!
//! [`pvh_guest`] wraps 32-bit code in a 64-bit ELF with a Xen PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`), linked at
//! 1 MiB: the core enters it in 32-bit protected mode, paging off, flat segments, EBX = `hvm_start_info`.
//! [`asm`] has snippets (serial output polling LSR, isa-debug-exit) to compose guests from.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the guest is linked (and entered).
pub const LOAD_ADDR: u32 = 0x10_0000;

fn linker_script(load_addr: u64) -> String {
    format!(
        r#"
ENTRY(_start)
PHDRS {{
    text PT_LOAD FLAGS(7);
    note PT_NOTE;
}}
SECTIONS {{
    . = {load_addr:#x};
    .text : {{ *(.text*) *(.rodata*) *(.data*) *(.bss*) }} :text
    .note.Xen : {{ *(.note.Xen) }} :text :note
    /DISCARD/ : {{ *(.note.gnu*) *(.comment) }}
}}
"#
    )
}

/// The Xen ELF note that announces the 32-bit PVH entry point (Xen public/elfnote.h: type 18).
const PVH_NOTE: &str = r#"
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4          /* namesz: "Xen\0" */
    .long 4          /* descsz */
    .long 18         /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long _start
    .p2align 2
"#;

/// Assemble `code` (32-bit, AT&T syntax, must not define `_start`) and `data` into a PVH ELF at
/// `dir/name.elf`. `code` runs first and should end by writing to isa-debug-exit or resetting; if it falls
/// through, the guest halts with interrupts off.
pub fn pvh_guest(dir: &Path, name: &str, code: &str, data: &str) -> Result<PathBuf, String> {
    guest_elf(dir, name, code, data, u64::from(LOAD_ADDR), true)
}

/// Like [`pvh_guest`], linked at `load_addr`, and with the PVH note only when `pvh_note` is set (to test how
/// an ELF without it is refused).
pub fn guest_elf(
    dir: &Path,
    name: &str,
    code: &str,
    data: &str,
    load_addr: u64,
    pvh_note: bool,
) -> Result<PathBuf, String> {
    let src = format!(
        "    .code32\n    .text\n    .globl _start\n_start:\n{code}\n{halt}\n    .data\n{data}\n{note}\n",
        halt = asm::HALT_FOREVER,
        note = if pvh_note { PVH_NOTE } else { "" }
    );
    let asm_path = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let ld_script = dir.join(format!("{name}.ld"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&asm_path, src).map_err(|e| format!("writing {}: {e}", asm_path.display()))?;
    std::fs::write(&ld_script, linker_script(load_addr))
        .map_err(|e| format!("writing {}: {e}", ld_script.display()))?;
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&asm_path))?;
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "--build-id=none", "-z", "noexecstack", "-z", "max-page-size=0x1000", "-T"])
        .arg(&ld_script)
        .arg("-o")
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run {cmd:?} (is binutils installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Assembly snippets (32-bit, AT&T syntax). Labels are local numeric labels so snippets compose.
pub mod asm {
    /// `cli; hlt` forever (appended after every guest body).
    pub const HALT_FOREVER: &str = "9:\n    cli\n    hlt\n    jmp 9b\n";

    /// Print the NUL-terminated string at label `label` on COM1, polling LSR.THRE (bit 5) before each byte.
    pub fn print(label: &str) -> String {
        format!(
            r#"
    mov ${label}, %esi
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
"#
        )
    }

    /// Write the byte `value` to isa-debug-exit at `port` (the core exits with `(value << 1) | 1`).
    pub fn debug_exit(port: u16, value: u8) -> String {
        format!("    mov ${port:#x}, %dx\n    mov ${value:#x}, %al\n    outb %al, %dx\n")
    }

    /// A NUL-terminated string constant at `label`.
    pub fn string(label: &str, text: &str) -> String {
        let escaped: String = text
            .chars()
            .map(|c| match c {
                '\n' => "\\n".to_string(),
                '"' => "\\\"".to_string(),
                '\\' => "\\\\".to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("{label}: .asciz \"{escaped}\"\n")
    }
}
