//! Guest RAM: one memfd, mapped in this process with vm-memory and laid out like QEMU's `pc` machine.
//!
//! The memfd is what a vhost-user backend will map later (SET_MEM_TABLE passes it with an offset per region), so
//! all RAM lives in the one file: the part below 4 GiB at file offset 0, the rest right after it.

use std::fs::File;
use std::sync::Arc;

use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::Error;

/// The start of the 32-bit PCI hole that QEMU's `pc` machine keeps free below 4 GiB once RAM reaches 3.5 GiB
/// (QEMU hw/i386/pc_piix.c: `ram_size >= 0xe0000000` → lowmem 0xc0000000 with gigabyte alignment).
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// RAM sizes at or above this are split around the hole.
pub const SPLIT_THRESHOLD: u64 = 0xe000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The smallest RAM the core accepts: enough for the boot structures below 1 MiB and a tiny guest.
pub const MIN_RAM: u64 = 2 << 20;

/// One contiguous piece of guest-physical RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Where RAM sits in the guest-physical address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamLayout {
    pub regions: Vec<RamRegion>,
}

impl RamLayout {
    /// QEMU `pc` layout for `size` bytes of RAM.
    pub fn pc(size: u64) -> RamLayout {
        let below_4g = if size >= SPLIT_THRESHOLD { PCI_HOLE_START } else { size };
        let mut regions = vec![RamRegion { guest_addr: 0, size: below_4g, file_offset: 0 }];
        if size > below_4g {
            regions.push(RamRegion { guest_addr: HIGH_RAM_START, size: size - below_4g, file_offset: below_4g });
        }
        RamLayout { regions }
    }

    /// The end of RAM below 4 GiB (exclusive).
    pub fn low_ram_end(&self) -> u64 {
        self.regions.first().map(|r| r.guest_addr + r.size).unwrap_or(0)
    }

    /// RAM above 4 GiB, if any.
    pub fn high_ram(&self) -> Option<RamRegion> {
        self.regions.get(1).copied()
    }

    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Guest RAM: the memfd, its mapping, and the layout.
pub struct GuestRam {
    memfd: Arc<File>,
    mem: GuestMemoryMmap,
    layout: RamLayout,
}

impl GuestRam {
    /// Allocate `size` bytes of guest RAM in a new memfd and map it.
    pub fn new(size: u64) -> Result<GuestRam, Error> {
        if size < MIN_RAM {
            return Err(Error::RamTooSmall { size, min: MIN_RAM });
        }
        let memfd = nix::sys::memfd::memfd_create(c"tessera-guest-ram", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::Ram { size, source: e.into() })?;
        let memfd = Arc::new(File::from(memfd));
        // ftruncate reserves nothing: pages are allocated when the guest first touches them.
        memfd.set_len(size).map_err(|e| Error::Ram { size, source: e })?;
        let layout = RamLayout::pc(size);
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = layout
            .regions
            .iter()
            .map(|r| {
                let len = usize::try_from(r.size).map_err(|_| Error::RamTooLarge { size })?;
                Ok((GuestAddress(r.guest_addr), len, Some(FileOffset::from_arc(memfd.clone(), r.file_offset))))
            })
            .collect::<Result<_, Error>>()?;
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| Error::Ram { size, source: std::io::Error::other(e.to_string()) })?;
        Ok(GuestRam { memfd, mem, layout })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    /// The memfd that backs all of RAM (for vhost-user backends later).
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Each region with its host address, for hypervisor memory slots.
    pub fn host_regions(&self) -> Vec<(RamRegion, u64)> {
        self.layout
            .regions
            .iter()
            .map(|r| {
                let host = self
                    .mem
                    .iter()
                    .find(|m| m.start_addr().raw_value() == r.guest_addr)
                    .and_then(|m| m.get_host_address(MemoryRegionAddress(0)).ok())
                    .map(|p| p as u64)
                    .unwrap_or(0);
                (*r, host)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_ram_is_one_region() {
        let l = RamLayout::pc(256 << 20);
        assert_eq!(l.regions, vec![RamRegion { guest_addr: 0, size: 256 << 20, file_offset: 0 }]);
        assert_eq!(l.low_ram_end(), 256 << 20);
        assert!(l.high_ram().is_none());
    }

    #[test]
    fn ram_just_below_the_threshold_stays_low() {
        let l = RamLayout::pc(SPLIT_THRESHOLD - (1 << 20));
        assert_eq!(l.regions.len(), 1);
        assert_eq!(l.low_ram_end(), SPLIT_THRESHOLD - (1 << 20));
    }

    #[test]
    fn large_ram_is_split_around_the_pci_hole() {
        let l = RamLayout::pc(4 << 30);
        assert_eq!(l.low_ram_end(), PCI_HOLE_START);
        assert_eq!(
            l.high_ram(),
            Some(RamRegion {
                guest_addr: HIGH_RAM_START,
                size: (4 << 30) - PCI_HOLE_START,
                file_offset: PCI_HOLE_START
            })
        );
        assert_eq!(l.total(), 4 << 30);
    }

    #[test]
    fn ram_is_backed_by_the_memfd() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory().write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        // The write is visible through the file: the memfd really backs the mapping.
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(ram.memfd().as_ref(), &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
        assert!(matches!(GuestRam::new(4096), Err(Error::RamTooSmall { .. })));
    }
}
