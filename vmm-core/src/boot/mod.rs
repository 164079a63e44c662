//! Loading a kernel into guest RAM and computing the boot vCPU's entry state.
//!
//! `-kernel` is recognised by content, as QEMU does (hw/i386/x86.c `x86_load_linux`):
//! * a Linux bzImage (`HdrS` at 0x202) → [`bzimage`]: the 64-bit boot protocol, or with
//!   [`LinuxEntry::Decompressed`] the payload unpacked on the host and entered at its own `startup_64`
//!   ([`elf64`]), which is what the software CPU uses to skip the decompressor;
//! * an ELF with a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note → [`pvh`];
//! * anything else fails with QEMU's message.
//!
//! Low memory used by the boot structures (all below the EBDA at 0x9fc00, none used by a PVH or Linux kernel
//! before it has read them):
//! 0x500 GDT · 0x540 IDT · 0x6000 hvm_start_info (+ memmap, modules) · 0x7000 zero page · 0x8ff0 stack top ·
//! 0x9000 PML4 · 0xa000 PDPT · 0xb000–0xefff page directories (identity map of the low 4 GiB) · 0x20000 cmdline.

pub mod bzimage;
pub mod elf64;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::boot_e820_entry;
use tessera_vcpu::{DescriptorTable, FpuControl, Regs, Segment, SpecialRegs, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{GuestRam, RamLayout};
use crate::Error;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x540;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Start of the Extended BIOS Data Area: RAM below it is usable, as on a PC with 639 KiB of base memory.
pub const EBDA_START: u64 = 0x9fc00;
/// The BIOS area kept reserved in the e820 map (QEMU reports 0xf0000–0xfffff reserved too).
pub const BIOS_START: u64 = 0xf0000;
pub const HIGH_MEMORY: u64 = 0x10_0000;

// GDT selectors. 0x10/0x18 are `__BOOT_CS`/`__BOOT_DS` of the Linux 64-bit boot protocol
// (Documentation/x86/boot.rst, "64-bit Boot Protocol"); PVH takes any flat 32-bit selectors.
pub const SEL_CODE32: u16 = 0x08;
pub const SEL_CODE64: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;

/// Access/flags words (bits 8–15 access byte, 20–23 flags, as in the descriptor's bytes 5–6).
const GDT_CODE32: u16 = 0xc09b;
const GDT_CODE64: u16 = 0xa09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x008b;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0, fast strings, as firmware leaves it.
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// The kernel image, initrd and command line, kept open so a guest reboot can load them again.
pub struct BootSource {
    pub kernel: File,
    pub kernel_path: String,
    pub initrd: Option<(File, String)>,
    pub cmdline: String,
}

/// ACPI tables the engine keeps in guest RAM (the software CPU's platform; KVM guests have none yet): the boot
/// code reserves their area in the memory map and tells the kernel where the RSDP is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiInfo {
    /// Guest physical address of the RSDP (`boot_params.acpi_rsdp_addr`, PVH `rsdp_paddr`).
    pub rsdp_addr: u64,
    /// The area holding the tables, reported reserved in e820.
    pub base: u64,
    pub size: u64,
}

/// How a Linux bzImage is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxEntry {
    /// The 64-bit boot protocol: the compressed kernel at 1 MiB, entered at its decompressor (KVM).
    BootProtocol64,
    /// The payload decompressed on the host and the ELF vmlinux entered at its `startup_64` (software CPU).
    Decompressed,
}

/// The register state the boot vCPU starts with. Applied with [`EntryState::apply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub regs: Regs,
    pub sregs: SpecialRegs,
    pub fpu: FpuControl,
    pub msrs: Vec<(u32, u64)>,
}

impl EntryState {
    /// Load this state into `vcpu`. The APIC base stays what the engine gave the vCPU at creation.
    pub fn apply(&self, vcpu: &mut dyn Vcpu) -> Result<(), Error> {
        let current = vcpu.sregs().map_err(Error::Vcpu)?;
        let sregs = SpecialRegs { apic_base: current.apic_base, ..self.sregs };
        vcpu.set_sregs(&sregs).map_err(Error::Vcpu)?;
        vcpu.set_regs(&self.regs).map_err(Error::Vcpu)?;
        vcpu.set_fpu_control(&self.fpu).map_err(Error::Vcpu)?;
        vcpu.set_msrs(&self.msrs).map_err(Error::Vcpu)?;
        Ok(())
    }
}

/// What `-kernel` is, judged by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
    Unknown,
}

pub fn detect(file: &mut File) -> Result<KernelFormat, std::io::Error> {
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Ok(KernelFormat::Unknown)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Load `-kernel` (and `-initrd`, `-append`) into RAM and return the boot vCPU's entry state.
pub fn load(ram: &GuestRam, src: &mut BootSource, linux: LinuxEntry) -> Result<EntryState, Error> {
    load_with_acpi(ram, src, linux, None)
}

/// [`load`], for a machine with ACPI tables in RAM (see [`AcpiInfo`]).
pub fn load_with_acpi(
    ram: &GuestRam,
    src: &mut BootSource,
    linux: LinuxEntry,
    acpi: Option<AcpiInfo>,
) -> Result<EntryState, Error> {
    let format = detect(&mut src.kernel).map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })?;
    match format {
        KernelFormat::BzImage => match linux {
            LinuxEntry::BootProtocol64 => bzimage::load(ram, src, acpi),
            LinuxEntry::Decompressed => elf64::load_decompressed(ram, src, acpi),
        },
        KernelFormat::Elf => pvh::load(ram, src, acpi),
        KernelFormat::Unknown => {
            let size = src.kernel.metadata().map(|m| m.len()).unwrap_or(0);
            // QEMU takes any other file for an old zImage and fails this way when it is too short for its setup
            // sectors; a longer one it would boot in real mode, which Tessera does not do.
            let setup = {
                let mut b = [0u8; 1];
                src.kernel.seek(SeekFrom::Start(0x1f1)).ok();
                let s = if read_up_to(&mut src.kernel, &mut b).unwrap_or(0) == 1 { b[0] } else { 0 };
                (u64::from(if s == 0 { 4 } else { s }) + 1) * 512
            };
            if setup > size {
                Err(Error::InvalidKernelHeader)
            } else {
                Err(Error::UnsupportedKernel {
                    path: src.kernel_path.clone(),
                    reason: "it is neither a Linux bzImage (boot protocol 2.00 or later) nor an ELF with a PVH note"
                        .into(),
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// shared pieces

/// One GDT descriptor from a base, a limit (in units given by the G flag) and the access/flags word.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The hidden part of a segment register loaded from such a descriptor.
pub fn segment(selector: u16, flags: u16, base: u32, limit: u32) -> Segment {
    let g = flags & 0x8000 != 0;
    Segment {
        base: u64::from(base),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: flags & 0x80 != 0,
        dpl: ((flags >> 5) & 3) as u8,
        db: flags & 0x4000 != 0,
        s: flags & 0x10 != 0,
        l: flags & 0x2000 != 0,
        g,
        avl: flags & 0x1000 != 0,
        unusable: false,
    }
}

/// Write the boot GDT and an empty IDT; return the descriptor-table registers.
fn write_gdt(mem: &GuestMemoryMmap) -> Result<(DescriptorTable, DescriptorTable), Error> {
    let gdt = [
        0,
        gdt_entry(GDT_CODE32, 0, 0xfffff),
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0x67),
    ];
    for (i, e) in gdt.iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, &e.to_le_bytes(), "the GDT")?;
    }
    write(mem, IDT_ADDR, &0u64.to_le_bytes(), "the IDT")?;
    Ok((
        DescriptorTable { base: GDT_ADDR, limit: (gdt.len() * 8 - 1) as u16 },
        DescriptorTable { base: IDT_ADDR, limit: 7 },
    ))
}

fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8], what: &'static str) -> Result<(), Error> {
    mem.write_slice(data, GuestAddress(addr)).map_err(|_| Error::BootData { what, addr })
}

fn common_sregs(code: Segment, gdt: DescriptorTable, idt: DescriptorTable) -> SpecialRegs {
    let data = segment(SEL_DATA, GDT_DATA, 0, 0xfffff);
    let tss = segment(SEL_TSS, GDT_TSS, 0, 0x67);
    let ldt = Segment { type_: 2, present: true, limit: 0xffff, ..Segment::default() };
    SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt,
        gdt,
        idt,
        ..SpecialRegs::default()
    }
}

/// 32-bit protected mode, paging off, flat segments (PVH entry; Linux platform/pvh/head.S).
fn protected_mode_entry(mem: &GuestMemoryMmap, rip: u64, rbx: u64) -> Result<EntryState, Error> {
    let (gdt, idt) = write_gdt(mem)?;
    let mut sregs = common_sregs(segment(SEL_CODE32, GDT_CODE32, 0, 0xfffff), gdt, idt);
    sregs.cr0 = CR0_PE | CR0_ET;
    let regs = Regs { rip, rbx, rsp: BOOT_STACK, rflags: 0x2, ..Regs::default() };
    Ok(EntryState { regs, sregs, fpu: FpuControl::default(), msrs: boot_msrs() })
}

/// 64-bit mode with the low 4 GiB identity-mapped, RSI = zero page (Linux 64-bit boot protocol).
fn long_mode_entry(mem: &GuestMemoryMmap, rip: u64) -> Result<EntryState, Error> {
    let (gdt, idt) = write_gdt(mem)?;
    write_identity_page_tables(mem)?;
    let mut sregs = common_sregs(segment(SEL_CODE64, GDT_CODE64, 0, 0xfffff), gdt, idt);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    let regs = Regs { rip, rsi: ZERO_PAGE_ADDR, rsp: BOOT_STACK, rbp: BOOT_STACK, rflags: 0x2, ..Regs::default() };
    Ok(EntryState { regs, sregs, fpu: FpuControl::default(), msrs: boot_msrs() })
}

fn boot_msrs() -> Vec<(u32, u64)> {
    vec![(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)]
}

/// PML4[0] → PDPT, PDPT[0..4] → four page directories of 512 2-MiB pages: virtual = physical for 0–4 GiB
/// (SDM Vol. 3 §4.5, 4-level paging; PS=1 in a PDE maps 2 MiB).
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write(mem, PML4_ADDR, &(PDPT_ADDR | PRESENT_RW).to_le_bytes(), "the page tables")?;
    for i in 0..4u64 {
        write(mem, PDPT_ADDR + i * 8, &((PD_ADDR + i * 0x1000) | PRESENT_RW).to_le_bytes(), "the page tables")?;
    }
    let mut pd = Vec::with_capacity(4 * 4096);
    for i in 0..2048u64 {
        pd.extend_from_slice(&((i << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
    }
    write(mem, PD_ADDR, &pd, "the page tables")
}

/// E820 type numbers (ACPI 6.5 §15, "System Address Map Interfaces").
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest's memory map, in the order the firmware of QEMU's `pc` machine reports it (less the ACPI tables,
/// which Tessera does not build yet).
pub fn e820_map(layout: &RamLayout) -> Vec<boot_e820_entry> {
    e820_map_with_acpi(layout, None)
}

/// [`e820_map`] with the ACPI tables' area reserved too (QEMU's firmware reports its tables' RAM reserved
/// as well; Linux maps reserved areas for ACPI on demand).
pub fn e820_map_with_acpi(layout: &RamLayout, acpi: Option<AcpiInfo>) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM },
        boot_e820_entry { addr: EBDA_START, size: 0xa0000 - EBDA_START, r#type: E820_RESERVED },
    ];
    if let Some(a) = acpi.filter(|a| a.base >= 0xa0000 && a.base + a.size <= BIOS_START) {
        map.push(boot_e820_entry { addr: a.base, size: a.size, r#type: E820_RESERVED });
    }
    map.push(boot_e820_entry { addr: BIOS_START, size: HIGH_MEMORY - BIOS_START, r#type: E820_RESERVED });
    let low_end = layout.low_ram_end();
    if low_end > HIGH_MEMORY {
        map.push(boot_e820_entry { addr: HIGH_MEMORY, size: low_end - HIGH_MEMORY, r#type: E820_RAM });
    }
    if let Some(high) = layout.high_ram() {
        map.push(boot_e820_entry { addr: high.guest_addr, size: high.size, r#type: E820_RAM });
    }
    map
}

/// Where the initrd goes: as high as possible in RAM below 4 GiB and below `max_end` (exclusive), page-aligned,
/// and not below `floor` (the end of what the kernel occupies or will use while it starts).
pub fn place_initrd(layout: &RamLayout, size: u64, max_end: u64, floor: u64) -> Result<u64, Error> {
    let top = layout.low_ram_end().min(max_end);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    match addr {
        Some(a) if a >= floor => Ok(a),
        _ => Err(Error::InitrdDoesNotFit { size, room: top.saturating_sub(floor) }),
    }
}

/// Load the initrd at the place chosen for it; returns (address, size).
fn load_initrd(
    ram: &GuestRam,
    initrd: &mut Option<(File, String)>,
    max_end: u64,
    floor: u64,
) -> Result<Option<(u64, u64)>, Error> {
    let Some((file, path)) = initrd.as_mut() else { return Ok(None) };
    let size = file.metadata().map_err(|e| Error::ReadInitrd { path: path.clone(), source: e })?.len();
    let addr = place_initrd(ram.layout(), size, max_end, floor)?;
    file.seek(SeekFrom::Start(0)).map_err(|e| Error::ReadInitrd { path: path.clone(), source: e })?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| Error::ReadInitrd { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    Ok(Some((addr, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        // Flat 64-bit code and 32-bit data descriptors as every x86-64 boot loader writes them.
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        let cs = segment(SEL_CODE64, GDT_CODE64, 0, 0xfffff);
        assert!(cs.l && !cs.db && cs.g && cs.present && cs.s);
        assert_eq!((cs.type_, cs.limit), (0xb, 0xffff_ffff));
        let tr = segment(SEL_TSS, GDT_TSS, 0, 0x67);
        assert_eq!((tr.type_, tr.limit, tr.s, tr.g), (0xb, 0x67, false, false));
    }

    #[test]
    fn initrd_goes_to_the_top_and_refuses_to_overlap_the_kernel() {
        let l = RamLayout::pc(256 << 20);
        assert_eq!(place_initrd(&l, 0x1800, u64::MAX, 0).unwrap(), (256 << 20) - 0x2000);
        assert_eq!(place_initrd(&l, 0x1000, 0x8000_0000, 0).unwrap(), (256 << 20) - 0x1000);
        assert_eq!(place_initrd(&l, 0x1000, 0x100_0000, 0).unwrap(), 0xfff000);
        assert!(matches!(place_initrd(&l, 250 << 20, u64::MAX, 16 << 20), Err(Error::InitrdDoesNotFit { .. })));
        assert!(matches!(place_initrd(&l, 1 << 40, u64::MAX, 0), Err(Error::InitrdDoesNotFit { .. })));
    }

    #[test]
    fn e820_describes_low_and_high_ram() {
        let m = e820_map(&RamLayout::pc(4 << 30));
        let ram: Vec<(u64, u64)> = m.iter().filter(|e| e.r#type == E820_RAM).map(|e| (e.addr, e.size)).collect();
        assert_eq!(ram, vec![(0, 0x9fc00), (0x10_0000, 0xc000_0000 - 0x10_0000), (1 << 32, (4 << 30) - 0xc000_0000)]);
    }

    #[test]
    fn acpi_tables_are_reserved_in_e820_between_the_ebda_and_the_bios() {
        let acpi = AcpiInfo { rsdp_addr: 0xe0000, base: 0xe0000, size: 0x10000 };
        let m = e820_map_with_acpi(&RamLayout::pc(256 << 20), Some(acpi));
        let entries: Vec<(u64, u64, u32)> = m.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(entries[2], (0xe0000, 0x10000, E820_RESERVED));
        assert_eq!(entries[3], (BIOS_START, HIGH_MEMORY - BIOS_START, E820_RESERVED));
        assert!(entries.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0), "sorted, no overlap: {entries:x?}");
        // Without tables (KVM) the map is unchanged; an area outside the BIOS hole is not added.
        assert_eq!(e820_map_with_acpi(&RamLayout::pc(256 << 20), None).len(), m.len() - 1);
        let bad = AcpiInfo { rsdp_addr: 0x100000, base: 0x100000, size: 0x1000 };
        assert_eq!(e820_map_with_acpi(&RamLayout::pc(256 << 20), Some(bad)).len(), m.len() - 1);
    }
}
