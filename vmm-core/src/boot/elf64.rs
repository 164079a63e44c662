//! The software CPU's fast path for a bzImage (see shared notes "linux-on-a-software-cpu", §0 and §2): do on the
//! host what the decompressor would do in the guest. The payload (`payload_offset`/`payload_length` of the
//! setup header, after the setup sectors) is an xz stream with the x86 BCJ filter whose content is the ELF
//! vmlinux; it is unpacked with liblzma (xz2), its segments are loaded at their physical addresses, and the
//! vCPU enters the vmlinux's own 64-bit entry (`startup_64`, the ELF entry point, a physical address) in long
//! mode with identity paging and RSI = zero page, exactly as the decompressor jumps to it when it does not
//! relocate the kernel (arch/x86/boot/compressed/head_64.S, misc.c `extract_kernel`).

use std::io::{Cursor, Read, Seek, SeekFrom};

use linux_loader::loader::{Elf, KernelLoader};

use super::bzimage::{check_ram_for_kernel, kernel_working_range, read_setup_header, write_zero_page};
use super::{long_mode_entry, AcpiInfo, BootSource, EntryState};
use crate::memory::GuestRam;
use crate::Error;

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
/// Refuse to unpack beyond this: a hostile image must not make the core allocate without bound.
const MAX_VMLINUX: u64 = 512 << 20;

/// The bzImage's payload, decompressed: the ELF vmlinux (followed by the relocation table, which is only needed
/// when the kernel is moved and is ignored here).
pub fn decompress_payload(src: &mut BootSource) -> Result<Vec<u8>, Error> {
    let hdr = read_setup_header(src)?;
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let start = (setup_sects + 1) * 512 + u64::from(hdr.payload_offset);
    let len = u64::from(hdr.payload_length);
    let path = src.kernel_path.clone();
    let bad = |reason: String| Error::UnsupportedKernel { path: path.clone(), reason };
    if len > MAX_VMLINUX {
        return Err(bad(format!("its payload_length ({len}) is implausible")));
    }
    let mut payload = vec![0u8; len as usize];
    src.kernel
        .seek(SeekFrom::Start(start))
        .and_then(|_| src.kernel.read_exact(&mut payload))
        .map_err(|e| bad(format!("its payload ({len} bytes at {start:#x}) cannot be read: {e}")))?;
    if !payload.starts_with(XZ_MAGIC) {
        return Err(bad(
            "its payload is not xz-compressed; the direct vmlinux path supports xz only (Debian's kernels)".into(),
        ));
    }
    let out = unxz(&payload).map_err(bad)?;
    if !out.starts_with(b"\x7fELF") || out.get(4) != Some(&2) {
        return Err(bad("its payload is not a 64-bit ELF vmlinux".into()));
    }
    Ok(out)
}

/// Decompress one xz stream. The kernel build appends the uncompressed size after the stream
/// (scripts/Makefile.lib `size_append`), so decoding stops at the end of the first stream instead of reading
/// to the end of the input (xz2's `XzDecoder` reports such trailing bytes as corruption).
fn unxz(input: &[u8]) -> Result<Vec<u8>, String> {
    use xz2::stream::{Action, Status, Stream};
    // The kernel's xz uses a 32 MiB dictionary (scripts/xz_wrap.sh); allow some room above it.
    let mut stream = Stream::new_stream_decoder(128 << 20, 0).map_err(|e| format!("liblzma: {e}"))?;
    let mut out: Vec<u8> = Vec::with_capacity(64 << 20);
    loop {
        if out.len() == out.capacity() {
            if out.len() as u64 >= MAX_VMLINUX {
                return Err(format!("its payload decompresses to more than {} MiB", MAX_VMLINUX >> 20));
            }
            out.reserve(out.len());
        }
        let consumed = stream.total_in() as usize;
        let produced = out.len();
        let status = stream
            .process_vec(&input[consumed..], &mut out, Action::Finish)
            .map_err(|e| format!("its xz payload does not decompress: {e}"))?;
        match status {
            Status::StreamEnd => return Ok(out),
            _ if stream.total_in() as usize == consumed && out.len() == produced && out.len() < out.capacity() => {
                return Err("its xz payload ends before the end of the stream".into())
            }
            _ => {}
        }
    }
}

/// Load a bzImage for the software CPU: decompressed vmlinux at its physical addresses, zero page as for the
/// 64-bit boot protocol, entry at `startup_64`.
pub fn load_decompressed(ram: &GuestRam, src: &mut BootSource, acpi: Option<AcpiInfo>) -> Result<EntryState, Error> {
    let hdr = read_setup_header(src)?;
    let (_, work_end) = kernel_working_range(&hdr);
    let vmlinux = decompress_payload(src)?;
    // e_entry; decompress_payload checked the ELF magic and class, not the length.
    let entry = vmlinux.get(0x18..0x20).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or_else(|| {
        Error::UnsupportedKernel { path: src.kernel_path.clone(), reason: "its vmlinux is truncated".into() }
    })?;
    check_ram_for_kernel(ram, src, work_end)?;
    let loaded = Elf::load(ram.memory(), None, &mut Cursor::new(vmlinux), None).map_err(|e| match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => {
            Error::KernelDoesNotFit { path: src.kernel_path.clone() }
        }
        other => Error::UnsupportedKernel { path: src.kernel_path.clone(), reason: format!("vmlinux: {other}") },
    })?;
    write_zero_page(ram, src, hdr, work_end.max(loaded.kernel_end), acpi)?;
    long_mode_entry(ram.memory(), entry)
}
