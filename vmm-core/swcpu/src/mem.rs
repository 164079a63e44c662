//! Guest RAM as the software CPU sees it: a list of regions (guest physical base, host pointer, length).
//!
//! The CPU keeps raw host pointers instead of going through vm-memory's checked API on every access: an
//! interpreter performs several memory accesses per guest instruction and the TLB caches a host pointer per
//! guest page, so each access is one bounds-free unaligned load after the TLB hit. All accesses go through
//! `read_unaligned`/`write_unaligned` on raw pointers and never create Rust references into guest memory,
//! because guest RAM is shared with other processes (vhost-user backends) that may write it concurrently.

use crate::Error;

/// One contiguous piece of guest RAM.
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    host: *mut u8,
    len: u64,
}

/// The guest RAM regions a [`crate::SoftVcpu`] reads and writes. Addresses outside every region are MMIO
/// and go to the [`tessera_vcpu::IoHandler`].
///
/// From vm-memory (the core's RAM), one triple per region:
///
/// ```ignore
/// let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize)).collect();
/// // SAFETY: `mem` (and so every mmap) is kept alive for as long as the vCPUs run.
/// let ram = unsafe { GuestRam::new(&regions) }?;
/// ```
#[derive(Clone, Debug)]
pub struct GuestRam {
    regions: Vec<Region>,
}

// SAFETY: the regions are plain memory mappings that the creator of `GuestRam` promised (in `GuestRam::new`'s
// contract) stay mapped for the lifetime of this value; all accesses are raw unaligned loads/stores, which are
// as thread-safe as the guest's own memory model (the guest is responsible for synchronising its vCPUs).
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`; `GuestRam` has no interior state besides the pointers themselves.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Builds the RAM map from `(guest physical base, host pointer, length)` triples.
    ///
    /// Bases and lengths must be multiples of 4 KiB (the CPU caches translations per page) and regions must
    /// not overlap; host pointers must be 8-byte aligned (page-table entries are updated with 64-bit atomics).
    ///
    /// # Safety
    /// Every `[host, host + len)` range must be a readable and writable mapping that stays mapped, and is not
    /// unmapped or remapped, for as long as this `GuestRam` or any CPU built from it exists. Other threads and
    /// processes may write the memory concurrently (the CPU never forms references into it).
    pub unsafe fn new(regions: &[(u64, *mut u8, usize)]) -> Result<Self, Error> {
        let mut list: Vec<Region> = Vec::with_capacity(regions.len());
        for &(gpa, host, len) in regions {
            let len64 = len as u64;
            if gpa & 0xfff != 0 || len64 & 0xfff != 0 || len == 0 {
                return Err(Error::BadRam(format!(
                    "region at {gpa:#x} with length {len:#x} is not a non-empty multiple of 4 KiB at a 4 KiB boundary"
                )));
            }
            if host.is_null() || (host as usize) & 7 != 0 {
                return Err(Error::BadRam(format!(
                    "region at {gpa:#x} has a null or misaligned host pointer {host:p}"
                )));
            }
            if gpa.checked_add(len64).is_none_or(|end| end > 1 << 52) {
                return Err(Error::BadRam(format!(
                    "region at {gpa:#x} with length {len:#x} goes beyond the 52-bit physical address space"
                )));
            }
            list.push(Region { gpa, host, len: len64 });
        }
        list.sort_by_key(|r| r.gpa);
        for w in list.windows(2) {
            if w[0].gpa + w[0].len > w[1].gpa {
                return Err(Error::BadRam(format!("regions at {:#x} and {:#x} overlap", w[0].gpa, w[1].gpa)));
            }
        }
        Ok(GuestRam { regions: list })
    }

    /// Host pointer for `[gpa, gpa + len)` if the whole range is RAM inside one region.
    #[inline]
    pub(crate) fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            if gpa >= r.gpa && gpa - r.gpa < r.len {
                let off = gpa - r.gpa;
                if r.len - off < len {
                    return None;
                }
                // SAFETY: `off + len <= r.len`, so the result stays inside the region's mapping.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }

    /// Copies guest RAM at `gpa` into `buf`; false if any byte is not RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let a = gpa + done as u64;
            let chunk = (0x1000 - (a & 0xfff) as usize).min(buf.len() - done);
            match self.host_ptr(a, chunk as u64) {
                Some(p) => {
                    // SAFETY: `host_ptr` checked the range is inside a live mapping (contract of `new`); the
                    // destination is a distinct Rust buffer.
                    unsafe { std::ptr::copy_nonoverlapping(p, buf[done..].as_mut_ptr(), chunk) };
                }
                None => return false,
            }
            done += chunk;
        }
        true
    }

    /// Copies `buf` into guest RAM at `gpa`; false if any byte is not RAM (bytes before it are written).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let a = gpa + done as u64;
            let chunk = (0x1000 - (a & 0xfff) as usize).min(buf.len() - done);
            match self.host_ptr(a, chunk as u64) {
                Some(p) => {
                    // SAFETY: as in `read`; the source is a distinct Rust buffer.
                    unsafe { std::ptr::copy_nonoverlapping(buf[done..].as_ptr(), p, chunk) };
                }
                None => return false,
            }
            done += chunk;
        }
        true
    }
}
