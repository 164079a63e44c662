//! PVH boot of an ELF kernel (Xen's PVH ABI, xenbits docs/misc/pvh.html; Linux arch/x86/platform/pvh): the
//! segments are loaded at their physical addresses, the boot vCPU starts in 32-bit protected mode with paging
//! off at the `XEN_ELFNOTE_PHYS32_ENTRY` address, and EBX points to an `hvm_start_info` (version 1: with the
//! memory map) that names the command line and the modules (module 0 is the initrd).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, GuestAddress};

use super::{
    e820_map_with_acpi, load_initrd, protected_mode_entry, write, AcpiInfo, BootSource, EntryState, CMDLINE_ADDR,
    PVH_INFO_ADDR,
};
use crate::memory::GuestRam;
use crate::Error;

/// The memory map follows the start info, the module list follows the memory map.
const MEMMAP_ADDR: u64 = PVH_INFO_ADDR + 0x40;
const MODLIST_ADDR: u64 = PVH_INFO_ADDR + 0x800;
/// Command lines longer than this are refused (the region up to the next structure is much larger; Linux keeps
/// 2 KiB, COMMAND_LINE_SIZE on x86).
pub const MAX_PVH_CMDLINE: usize = 64 * 1024;

pub fn load(ram: &GuestRam, src: &mut BootSource, acpi: Option<AcpiInfo>) -> Result<EntryState, Error> {
    let mem = ram.memory();
    let mut ident = [0u8; 5];
    {
        use std::io::{Read, Seek, SeekFrom};
        src.kernel
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })?;
        src.kernel
            .read_exact(&mut ident)
            .map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })?;
    }
    if ident[4] != 2 {
        // linux-loader reads ELF64 only. QEMU also boots 32-bit PVH ELFs; say plainly that this one is not.
        return Err(Error::UnsupportedKernel {
            path: src.kernel_path.clone(),
            reason: "it is a 32-bit ELF; Tessera boots 64-bit ELF files with a PVH note (link with -m elf_x86_64)"
                .into(),
        });
    }
    // Decide on the note before loading anything, as QEMU does: an ELF without it is refused with QEMU's
    // message even when its segments would not fit in RAM.
    if !has_pvh_note(&mut src.kernel).map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })? {
        return Err(Error::NoPvhNote);
    }
    let loaded = Elf::load(mem, None, &mut src.kernel, None).map_err(|e| elf_error(src, e))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
        _ => return Err(Error::NoPvhNote),
    };
    let kernel_end = loaded.kernel_end;

    let cmdline = src.cmdline.as_bytes();
    if cmdline.len() >= MAX_PVH_CMDLINE || cmdline.contains(&0) {
        return Err(Error::Cmdline(format!(
            "the kernel command line must be shorter than {MAX_PVH_CMDLINE} bytes and contain no NUL"
        )));
    }
    let mut c = cmdline.to_vec();
    c.push(0);
    write(mem, CMDLINE_ADDR, &c, "the kernel command line")?;

    // The initrd goes as high as RAM below 4 GiB allows, above the kernel.
    let initrd = load_initrd(ram, &mut src.initrd, u64::from(u32::MAX) + 1, kernel_end)?;

    let memmap: Vec<hvm_memmap_table_entry> = e820_map_with_acpi(ram.layout(), acpi)
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.r#type, reserved: 0 })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: acpi.map_or(0, |a| a.rsdp_addr),
        ..Default::default()
    };
    let mut params;
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        params
            .set_modules(&[hvm_modlist_entry { paddr: addr, size, ..Default::default() }], GuestAddress(MODLIST_ADDR));
    } else {
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| Error::BootConfig(e.to_string()))?;

    protected_mode_entry(mem, entry, PVH_INFO_ADDR)
}

fn elf_error(src: &BootSource, e: linux_loader::loader::Error) -> Error {
    use linux_loader::loader::elf::Error as E;
    use linux_loader::loader::Error as L;
    match e {
        L::Elf(E::ReadKernelImage) | L::MemoryOverflow => Error::KernelDoesNotFit { path: src.kernel_path.clone() },
        L::Elf(E::InvalidPvhNote) => {
            Error::UnsupportedKernel { path: src.kernel_path.clone(), reason: "its Xen PVH note is malformed".into() }
        }
        other => Error::UnsupportedKernel { path: src.kernel_path.clone(), reason: format!("bad ELF file: {other}") },
    }
}

/// Xen public/elfnote.h: the 32-bit physical entry point of a PVH kernel.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Whether an ELF64 file has a `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`] in one of its PT_NOTE segments
/// (ELF gABI, "Note Section": namesz, descsz, type, then name and descriptor, each padded to 4 bytes).
/// Malformed headers count as "no note"; linux-loader then reports the precise problem when it loads.
pub fn has_pvh_note(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_NOTE: u32 = 4;
    const MAX_NOTES: u64 = 1 << 20;
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    match file.read_exact(&mut ehdr) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        other => other?,
    }
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let phoff = le64(&ehdr, 0x20);
    let phentsize = u64::from(u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]));
    if phentsize < 56 {
        return Ok(false);
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        if file.read_exact(&mut ph).is_err() {
            return Ok(false);
        }
        if le32(&ph, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (le64(&ph, 8), le64(&ph, 32).min(MAX_NOTES));
        let mut notes = vec![0u8; size as usize];
        file.seek(SeekFrom::Start(offset))?;
        if file.read_exact(&mut notes).is_err() {
            return Ok(false);
        }
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = le32(&notes, at) as usize;
            let descsz = le32(&notes, at + 4) as usize;
            let kind = le32(&notes, at + 8);
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or_default();
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
                return Ok(true);
            }
            let pad = |n: usize| n.div_ceil(4) * 4;
            at = match at.checked_add(12 + pad(namesz) + pad(descsz)) {
                Some(next) => next,
                None => break,
            };
        }
    }
    Ok(false)
}
