//! Linux bzImage through the 64-bit boot protocol (Documentation/x86/boot.rst): linux-loader copies the
//! protected-mode kernel to 1 MiB and returns the image's setup header; this file builds the zero page around
//! it (header copied from the image, loader type, command line, initrd, e820) and enters the decompressor's
//! 64-bit entry (load address + 0x200) with RSI = zero page.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Address, ByteValued, GuestAddress};

use super::{
    e820_map_with_acpi, load_initrd, long_mode_entry, AcpiInfo, BootSource, EntryState, CMDLINE_ADDR, HIGH_MEMORY,
    ZERO_PAGE_ADDR,
};
use crate::memory::GuestRam;
use crate::Error;

/// "HdrS", at 0x202.
const HDR_MAGIC: u32 = 0x5372_6448;
/// setup_header.loadflags bit 0: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x01;
/// xloadflags bit 0: the kernel has the 64-bit entry at +0x200 (boot protocol 2.12).
const XLF_KERNEL_64: u16 = 0x01;
/// type_of_loader for a boot loader without an assigned ID (boot.rst, "type_of_loader").
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Where a relocatable kernel runs when the loader does not move it (CONFIG_PHYSICAL_START default), used
/// when pref_address is absent.
const DEFAULT_RUN_ADDRESS: u64 = 0x100_0000;
/// The 64-bit entry is 0x200 bytes into the protected-mode kernel (boot.rst, "64-bit Boot Protocol").
const ENTRY_64_OFFSET: u64 = 0x200;

/// Read and check the setup header of a bzImage (offset 0x1f1 of the file).
pub fn read_setup_header(src: &mut BootSource) -> Result<setup_header, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut hdr = setup_header::default();
    let io = |e| Error::ReadKernel { path: src.kernel_path.clone(), source: e };
    src.kernel.seek(SeekFrom::Start(0x1f1)).map_err(io)?;
    src.kernel
        .read_exact(hdr.as_mut_slice())
        .map_err(|e| Error::ReadKernel { path: src.kernel_path.clone(), source: e })?;
    let size = src.kernel.metadata().map(|m| m.len()).unwrap_or(0);
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    if hdr.header != HDR_MAGIC || (setup_sects + 1) * 512 > size {
        return Err(Error::InvalidKernelHeader);
    }
    let version = hdr.version;
    let loadflags = hdr.loadflags;
    let xloadflags = hdr.xloadflags;
    if version < 0x0200 || loadflags & LOADED_HIGH == 0 {
        return Err(Error::UnsupportedKernel {
            path: src.kernel_path.clone(),
            reason: "it is an old zImage (boot protocol before 2.00 or not loaded high); Tessera boots bzImages".into(),
        });
    }
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::UnsupportedKernel {
            path: src.kernel_path.clone(),
            reason: format!(
                "it has no 64-bit entry point (boot protocol {}.{:02}, needs 2.12 with XLF_KERNEL_64); Tessera \
                 boots bzImages through the 64-bit boot protocol",
                version >> 8,
                version & 0xff
            ),
        });
    }
    Ok(hdr)
}

/// The physical range the kernel uses while it decompresses and starts: from its run address (pref_address for
/// a relocatable kernel) for init_size bytes (boot.rst, "init_size").
pub fn kernel_working_range(hdr: &setup_header) -> (u64, u64) {
    let pref = hdr.pref_address;
    let start = if pref != 0 { pref } else { DEFAULT_RUN_ADDRESS };
    (start, start + u64::from(hdr.init_size))
}

pub fn load(ram: &GuestRam, src: &mut BootSource, acpi: Option<AcpiInfo>) -> Result<EntryState, Error> {
    let hdr = read_setup_header(src)?;
    let (_, work_end) = kernel_working_range(&hdr);
    check_ram_for_kernel(ram, src, work_end)?;
    let loaded =
        BzImage::load(ram.memory(), None, &mut src.kernel, Some(GuestAddress(HIGH_MEMORY))).map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel) => {
                Error::KernelDoesNotFit { path: src.kernel_path.clone() }
            }
            other => Error::UnsupportedKernel { path: src.kernel_path.clone(), reason: other.to_string() },
        })?;
    let hdr = loaded.setup_header.unwrap_or(hdr);
    let floor = work_end.max(loaded.kernel_end);
    write_zero_page(ram, src, hdr, floor, acpi)?;
    long_mode_entry(ram.memory(), loaded.kernel_load.raw_value() + ENTRY_64_OFFSET)
}

pub(crate) fn check_ram_for_kernel(ram: &GuestRam, src: &BootSource, need: u64) -> Result<(), Error> {
    let have = ram.layout().low_ram_end();
    if have < need {
        return Err(Error::KernelNeedsRam { path: src.kernel_path.clone(), need, have: ram.layout().total() });
    }
    Ok(())
}

/// Build the zero page: the image's setup header plus what the loader fills in, the command line, the initrd
/// (above `floor`) and the e820 map.
pub(crate) fn write_zero_page(
    ram: &GuestRam,
    src: &mut BootSource,
    hdr: setup_header,
    floor: u64,
    acpi: Option<AcpiInfo>,
) -> Result<(), Error> {
    let mem = ram.memory();
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    // boot.rst, "cmdline_size": the maximum length without the terminating NUL (protocol 2.06+; 255 before).
    let max_len = if params.hdr.version >= 0x0206 { params.hdr.cmdline_size as usize } else { 255 };
    let cmdline = Cmdline::try_from(&src.cmdline, max_len + 1)
        .map_err(|e| Error::Cmdline(format!("the kernel accepts at most {max_len} bytes of printable ASCII ({e})")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline).map_err(|e| Error::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;

    let max_end = u64::from(params.hdr.initrd_addr_max) + 1;
    if let Some((addr, size)) = load_initrd(ram, &mut src.initrd, max_end, floor)? {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map_with_acpi(ram.layout(), acpi);
    if let Some(a) = acpi {
        // zero-page.rst: acpi_rsdp_addr at 0x070 (boot protocol 2.14+ reads it; older kernels scan 0xe0000).
        params.acpi_rsdp_addr = a.rsdp_addr;
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    // `sentinel` stays 0: a non-zero value makes the kernel treat the zero page as stale (sanitize_boot_params).
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(|e| Error::BootConfig(e.to_string()))
}
