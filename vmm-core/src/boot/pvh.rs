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
    // Decide on the note before loading anything, as QEMU does: an ELF without it is refused with QEMU's
    // message even when its segments would not fit in RAM.
    let note_entry =
        pvh_entry(&mut src.kernel).map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })?;
    let Some(note_entry) = note_entry else {
        return Err(Error::NoPvhNote);
    };
    let (entry, kernel_end) = if ident[4] == ELFCLASS32 {
        // linux-loader reads ELF64 only; QEMU also boots 32-bit PVH ELFs, so they are loaded here.
        let end = load_elf32_segments(mem, src)?;
        (note_entry, end)
    } else {
        let loaded = Elf::load(mem, None, &mut src.kernel, None).map_err(|e| elf_error(src, e))?;
        match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), loaded.kernel_end),
            _ => return Err(Error::NoPvhNote),
        }
    };

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

const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// Whether an ELF file has a `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`] in one of its PT_NOTE segments.
pub fn has_pvh_note(file: &mut std::fs::File) -> std::io::Result<bool> {
    Ok(pvh_entry(file)?.is_some())
}

/// A program header, from either ELF class.
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The program headers of a little-endian ELF32 or ELF64 file (ELF gABI, "Program Header"). `None` for files
/// that are not ELF or whose headers are malformed.
fn program_headers(file: &mut std::fs::File) -> std::io::Result<Option<(u8, Vec<Phdr>)>> {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_PHNUM: u64 = 4096;
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    let n = super::read_up_to(file, &mut ehdr)?;
    if n < 52 || ehdr[..4] != *b"\x7fELF" || ehdr[5] != 1 {
        return Ok(None);
    }
    let le16 = |b: &[u8], o: usize| u64::from(u16::from_le_bytes([b[o], b[o + 1]]));
    let le32 = |b: &[u8], o: usize| u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default()));
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let class = ehdr[4];
    let (phoff, phentsize, phnum, min_entsize) = match class {
        ELFCLASS32 => (le32(&ehdr, 0x1c), le16(&ehdr, 0x2a), le16(&ehdr, 0x2c), 32),
        ELFCLASS64 if n == 64 => (le64(&ehdr, 0x20), le16(&ehdr, 0x36), le16(&ehdr, 0x38), 56),
        _ => return Ok(None),
    };
    if phentsize < min_entsize || phnum > MAX_PHNUM {
        return Ok(None);
    }
    let mut out = Vec::new();
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff.saturating_add(i * phentsize)))?;
        if file.read_exact(&mut ph[..min_entsize as usize]).is_err() {
            return Ok(None);
        }
        out.push(if class == ELFCLASS32 {
            Phdr {
                kind: le32(&ph, 0) as u32,
                offset: le32(&ph, 4),
                paddr: le32(&ph, 12),
                filesz: le32(&ph, 16),
                memsz: le32(&ph, 20),
            }
        } else {
            Phdr {
                kind: le32(&ph, 0) as u32,
                offset: le64(&ph, 8),
                paddr: le64(&ph, 24),
                filesz: le64(&ph, 32),
                memsz: le64(&ph, 40),
            }
        });
    }
    Ok(Some((class, out)))
}

/// The PVH entry point of an ELF file: the descriptor of a `Xen` note of type [`XEN_ELFNOTE_PHYS32_ENTRY`]
/// (ELF gABI, "Note Section": namesz, descsz, type, then name and descriptor, each padded to 4 bytes; Xen
/// public/elfnote.h: the descriptor is the 32-bit physical entry, in a 4- or 8-byte field).
/// Malformed headers count as "no note"; the loader then reports the precise problem.
pub fn pvh_entry(file: &mut std::fs::File) -> std::io::Result<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_NOTES: u64 = 1 << 20;
    let Some((_, phdrs)) = program_headers(file)? else {
        return Ok(None);
    };
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    for ph in phdrs.iter().filter(|p| p.kind == PT_NOTE) {
        let mut notes = vec![0u8; ph.filesz.min(MAX_NOTES) as usize];
        file.seek(SeekFrom::Start(ph.offset))?;
        if file.read_exact(&mut notes).is_err() {
            return Ok(None);
        }
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = le32(&notes, at) as usize;
            let descsz = le32(&notes, at + 4) as usize;
            let kind = le32(&notes, at + 8);
            let pad = |n: usize| n.div_ceil(4) * 4;
            let name = notes.get(at + 12..at + 12 + namesz).unwrap_or_default();
            let desc_at = at + 12 + pad(namesz);
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
                if let Some(d) = notes.get(desc_at..desc_at + 4) {
                    return Ok(Some(u64::from(le32(d, 0))));
                }
            }
            at = match at.checked_add(12 + pad(namesz) + pad(descsz)) {
                Some(next) => next,
                None => break,
            };
        }
    }
    Ok(None)
}

/// Load the PT_LOAD segments of a 32-bit ELF at their physical addresses (filesz bytes from the file, the rest
/// of memsz zeroed), as QEMU's PVH loader does. Returns the end of the highest segment.
fn load_elf32_segments(mem: &vm_memory::GuestMemoryMmap, src: &mut BootSource) -> Result<u64, Error> {
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::{Bytes, GuestMemoryBackend};
    let path = src.kernel_path.clone();
    let read_err = |e| Error::ReadKernel { path: path.clone(), source: e };
    let Some((_, phdrs)) = program_headers(&mut src.kernel).map_err(read_err)? else {
        return Err(Error::UnsupportedKernel { path: path.clone(), reason: "bad ELF file: malformed headers".into() });
    };
    let mut end = 0u64;
    for ph in phdrs.iter().filter(|p| p.kind == PT_LOAD) {
        if ph.filesz > ph.memsz {
            return Err(Error::UnsupportedKernel {
                path: path.clone(),
                reason: format!("bad ELF file: a segment at {:#x} has more file bytes than memory bytes", ph.paddr),
            });
        }
        let seg_end = ph.paddr.checked_add(ph.memsz).ok_or(Error::KernelDoesNotFit { path: path.clone() })?;
        if ph.memsz > 0 && !mem.check_range(GuestAddress(ph.paddr), ph.memsz as usize) {
            return Err(Error::KernelDoesNotFit { path: path.clone() });
        }
        let mut data = vec![0u8; ph.memsz as usize];
        src.kernel.seek(SeekFrom::Start(ph.offset)).map_err(read_err)?;
        src.kernel.read_exact(&mut data[..ph.filesz as usize]).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::UnsupportedKernel {
                path: path.clone(),
                reason: format!("bad ELF file: the segment at {:#x} runs past the end of the file", ph.paddr),
            },
            _ => Error::ReadKernel { path: path.clone(), source: e },
        })?;
        mem.write_slice(&data, GuestAddress(ph.paddr)).map_err(|_| Error::KernelDoesNotFit { path: path.clone() })?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(Error::UnsupportedKernel { path, reason: "bad ELF file: no loadable segment".into() });
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    /// A minimal little-endian ELF32 with one PT_LOAD (`code` at `paddr`, memsz = filesz + `bss`) and a PVH
    /// note whose entry is `paddr`.
    fn elf32(paddr: u32, code: &[u8], bss: u32, filesz_override: Option<u32>) -> Vec<u8> {
        let note: Vec<u8> = [4u32.to_le_bytes(), 4u32.to_le_bytes(), XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes()]
            .concat()
            .into_iter()
            .chain(*b"Xen\0")
            .chain(paddr.to_le_bytes())
            .collect();
        let phoff = 52u32;
        let data_off = phoff + 2 * 32;
        let note_off = data_off + code.len() as u32;
        let mut f = vec![0u8; 52];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = ELFCLASS32;
        f[5] = 1;
        f[6] = 1;
        f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[0x12..0x14].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        f[0x18..0x1c].copy_from_slice(&paddr.to_le_bytes());
        f[0x1c..0x20].copy_from_slice(&phoff.to_le_bytes());
        f[0x28..0x2a].copy_from_slice(&52u16.to_le_bytes());
        f[0x2a..0x2c].copy_from_slice(&32u16.to_le_bytes());
        f[0x2c..0x2e].copy_from_slice(&2u16.to_le_bytes());
        let filesz = filesz_override.unwrap_or(code.len() as u32);
        for (kind, off, addr, fsz, msz) in [
            (PT_LOAD, data_off, paddr, filesz, code.len() as u32 + bss),
            (PT_NOTE, note_off, 0, note.len() as u32, note.len() as u32),
        ] {
            for v in [kind, off, addr, addr, fsz, msz, 7, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(code);
        f.extend_from_slice(&note);
        f
    }

    fn source(bytes: &[u8]) -> BootSource {
        let mut file = tempfile_in_memory();
        file.write_all(bytes).unwrap();
        BootSource { kernel: file, kernel_path: "k.elf".into(), initrd: None, cmdline: "x".into() }
    }

    fn tempfile_in_memory() -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(c"elf-test", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
        std::fs::File::from(fd)
    }

    #[test]
    fn elf32_pvh_kernels_load_at_their_physical_addresses() {
        let ram = GuestRam::new(16 << 20).unwrap();
        // Dirty the bss area first: the loader must zero it.
        ram.memory().write_slice(&[0xaa; 16], GuestAddress(0x200004)).unwrap();
        let mut src = source(&elf32(0x200000, &[0xf4, 0x90, 0x90, 0x90], 16, None));
        let entry = load(&ram, &mut src, None).unwrap();
        assert_eq!(entry.regs.rip, 0x200000);
        let mut got = [0u8; 20];
        ram.memory().read_slice(&mut got, GuestAddress(0x200000)).unwrap();
        assert_eq!(&got[..4], &[0xf4, 0x90, 0x90, 0x90]);
        assert_eq!(&got[4..], &[0; 16]);
    }

    #[test]
    fn hostile_elf32_headers_are_errors() {
        let ram = GuestRam::new(16 << 20).unwrap();
        // A segment whose file bytes run past the end of the file.
        let mut src = source(&elf32(0x200000, &[0x90; 8], 0, Some(4096)));
        assert!(matches!(load(&ram, &mut src, None), Err(Error::UnsupportedKernel { .. })), "past EOF");
        // A segment outside guest RAM.
        let mut src = source(&elf32(0xf000_0000, &[0x90; 8], 0, None));
        assert!(matches!(load(&ram, &mut src, None), Err(Error::KernelDoesNotFit { .. })), "outside RAM");
        // Every truncation of a valid file is refused cleanly, never a panic.
        let good = elf32(0x200000, &[0x90; 8], 0, None);
        for n in 0..good.len() {
            let mut src = source(&good[..n]);
            assert!(load(&ram, &mut src, None).is_err(), "truncated to {n} bytes");
        }
    }
}
