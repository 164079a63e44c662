//! Architectural state, the MMU (4-level paging with a software TLB) and memory access.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use iced_x86::Instruction;
use tessera_vcpu::{DescriptorTable, IoHandler, Segment, VcpuExit};

use crate::mem::GuestRam;

pub(crate) const CF: u64 = 1 << 0;
pub(crate) const PF: u64 = 1 << 2;
pub(crate) const AF: u64 = 1 << 4;
pub(crate) const ZF: u64 = 1 << 6;
pub(crate) const SF: u64 = 1 << 7;
pub(crate) const TF: u64 = 1 << 8;
pub(crate) const IF: u64 = 1 << 9;
pub(crate) const DF: u64 = 1 << 10;
pub(crate) const OF: u64 = 1 << 11;
pub(crate) const IOPL: u64 = 3 << 12;
pub(crate) const NT: u64 = 1 << 14;
pub(crate) const RF: u64 = 1 << 16;
pub(crate) const VM: u64 = 1 << 17;
pub(crate) const AC: u64 = 1 << 18;
pub(crate) const ID: u64 = 1 << 21;
pub(crate) const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

pub(crate) const CR0_PE: u64 = 1;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
pub(crate) const CR4_PGE: u64 = 1 << 7;
pub(crate) const EFER_SCE: u64 = 1;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const EFER_NXE: u64 = 1 << 11;

/// Physical address width reported in CPUID 0x80000008 (40 bits, like QEMU's qemu64).
pub(crate) const PHYS_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << PHYS_BITS) - 1) & !0xfff;

pub(crate) const SEG_ES: usize = 0;
pub(crate) const SEG_CS: usize = 1;
pub(crate) const SEG_SS: usize = 2;
pub(crate) const SEG_DS: usize = 3;
pub(crate) const SEG_FS: usize = 4;
pub(crate) const SEG_GS: usize = 5;

pub(crate) const VEC_DE: u8 = 0;
pub(crate) const VEC_DB: u8 = 1;
pub(crate) const VEC_BP: u8 = 3;
pub(crate) const VEC_UD: u8 = 6;
pub(crate) const VEC_NM: u8 = 7;
pub(crate) const VEC_DF: u8 = 8;
pub(crate) const VEC_TS: u8 = 10;
pub(crate) const VEC_NP: u8 = 11;
pub(crate) const VEC_SS: u8 = 12;
pub(crate) const VEC_GP: u8 = 13;
pub(crate) const VEC_PF: u8 = 14;

/// Why the current instruction stopped: a guest exception to deliver, or an exit to the run loop.
#[derive(Debug)]
pub(crate) enum Fault {
    Exc(u8, Option<u32>),
    Exit(VcpuExit),
}
pub(crate) type Res<T> = Result<T, Fault>;

#[inline]
pub(crate) fn gp0<T>() -> Res<T> {
    Err(Fault::Exc(VEC_GP, Some(0)))
}
#[inline]
pub(crate) fn ud<T>() -> Res<T> {
    Err(Fault::Exc(VEC_UD, None))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Access {
    Read,
    Write,
    Exec,
}

// TLB permission bits: which accesses may use the cached host pointer without a page walk.
const P_RS: u8 = 1;
const P_WS: u8 = 2;
const P_XS: u8 = 4;
const P_RU: u8 = 8;
const P_WU: u8 = 16;
const P_XU: u8 = 32;

#[derive(Clone, Copy, Default)]
pub(crate) struct TlbEntry {
    /// Linear page number | TLB_VALID; 0 = empty.
    tag: u64,
    /// Host address of the page if it is RAM (0 = MMIO, always the slow path).
    host: usize,
    /// Guest physical page address.
    gpa: u64,
    perm: u8,
    global: bool,
}
const TLB_VALID: u64 = 1 << 63;
pub(crate) const TLB_SIZE: usize = 1024;

/// A decoded block: straight-line instructions from one guest page.
///
/// Blocks are keyed by (linear RIP, guest physical address) so the same physical code mapped at two linear
/// addresses (the kernel's identity map and its high mapping) gets correct RIP-relative operands. A later JIT
/// stores its compiled code next to `insns` (`code` is the slot for that); invalidation stays the same.
pub(crate) struct Block {
    pub insns: Box<[Instruction]>,
    /// Pre-decoded fast form of each instruction of `insns` (same length; see `fast`).
    pub ops: Box<[crate::fast::Op]>,
    /// Guest physical address and the bytes the block was decoded from: writes this CPU does not see (device
    /// DMA through vhost-user, other vCPUs) are caught by comparing them when the page is next mapped for
    /// execution (see `Cpu::validate_code_page`).
    pub gpa: u64,
    pub bytes: Box<[u8]>,
    /// Number of times this block ran (the JIT's trigger later).
    pub runs: std::cell::Cell<u32>,
    /// Where the block falls through to (the IP after its last instruction).
    pub end_ip: u64,
    /// The blocks that ran after this one, for the fall-through exit (0) and any other exit (1): the run loop
    /// takes the next block from here instead of translating RIP and looking it up (see `Link`).
    pub links: [std::cell::Cell<Link>; 2],
}

/// A cached successor: valid while `BlockCache::gen` still equals `gen` (no block was dropped and no TLB
/// entry was invalidated since, so `to` is alive and RIP still translates to it) and the CPU is in the same
/// mode (CPL, decoder bitness) as when the link was made.
#[derive(Clone, Copy)]
pub(crate) struct Link {
    pub rip: u64,
    pub gen: u64,
    pub mode: u32,
    pub to: *const Block,
}

impl Default for Link {
    fn default() -> Self {
        Link { rip: 0, gen: u64::MAX, mode: 0, to: std::ptr::null() }
    }
}

// SAFETY: `runs` and `links` are only touched by the thread that owns the `Cpu` (blocks are shared through
// `Arc` only so that the executing block survives its own invalidation); a link's pointer is dereferenced only
// by that thread, and only while the cache generation it was made in is current.
unsafe impl Sync for Block {}
// SAFETY: as for `Sync`: the link pointers are plain addresses of blocks the owning CPU's cache keeps alive; a
// vCPU moved to another thread takes its cache (and so all blocks its links point to) along.
unsafe impl Send for Block {}

/// (linear RIP, guest physical address | decoder bitness << 56).
pub(crate) type BlockKey = (u64, u64);

/// Entries of the direct-mapped lookup in front of the block map.
pub(crate) const FAST_BLOCKS: usize = 4096;

#[derive(Default)]
pub(crate) struct BlockCache {
    /// Direct-mapped by RIP: (key, block). A hit skips the hash map; cleared on every invalidation.
    pub fast: Vec<Option<(BlockKey, Arc<Block>)>>,
    pub map: HashMap<BlockKey, Arc<Block>, BuildIdHasher>,
    /// Guest physical page -> keys of the blocks decoded from it.
    pub page_blocks: HashMap<u64, Vec<BlockKey>, BuildIdHasher>,
    pub decoded: u64,
    pub invalidations: u64,
    /// Bumped whenever a block leaves the cache or a translation is invalidated: every `Link` older than
    /// this is dead.
    pub gen: u64,
    /// Blocks removed from the cache (and blocks never cached, such as page-crossing ones) are kept here
    /// until the next block fetch, because the running block may be among them: the run loop holds a plain
    /// pointer to the current block instead of an `Arc` clone (two atomic operations per block saved).
    pub retired: Vec<Arc<Block>>,
}

/// A cheap multiplicative hasher for integer keys (addresses); SipHash would dominate a block lookup.
#[derive(Default, Clone, Copy)]
pub(crate) struct BuildIdHasher;
pub(crate) struct IdHasher(u64);
impl std::hash::BuildHasher for BuildIdHasher {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}
impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// x87/SSE state (the FXSAVE image's contents).
#[derive(Clone)]
pub(crate) struct Fpu {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word as FXSAVE stores it (bit set = register valid).
    pub ftw: u8,
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    /// ST0..ST7 in physical register order, 80-bit values in the low 10 bytes.
    pub st: [[u8; 16]; 8],
    pub mxcsr: u32,
    pub xmm: [u128; 16],
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu { fcw: 0x37f, fsw: 0, ftw: 0, fop: 0, fip: 0, fdp: 0, st: [[0; 16]; 8], mxcsr: 0x1f80, xmm: [0; 16] }
    }
}

/// Everything that is not architecturally a register file entry but persists across instructions.
pub(crate) struct Cpu {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub seg: [Segment; 6],
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub fpu: Fpu,
    pub msr: crate::system::Msrs,
    pub cpl: u8,
    /// STI / MOV SS interrupt shadow for the next instruction.
    pub shadow: bool,
    pub halted: bool,
    pub ram: GuestRam,
    pub tlb: Box<[TlbEntry; TLB_SIZE]>,
    /// Guest physical pages holding decoded code; writes to them go through the slow path.
    pub code_pages: HashSet<u64, BuildIdHasher>,
    pub cache: BlockCache,
    /// Set when something (self-modifying code, a mode change) requires leaving the current block.
    pub end_block: bool,
    /// IP of the instruction being executed (faults report it).
    pub cur_ip: u64,
    pub instructions: u64,
    /// Unknown MSRs / unimplemented instructions already logged (log once each).
    pub logged: HashSet<u64, BuildIdHasher>,
    /// CPUID.1:EDX.APIC (a LAPIC device answers at the APIC base).
    pub advertise_apic: bool,
    /// Host time at creation and TSC rate: the guest clock (see `crate::GuestClock`).
    pub clock: crate::GuestClock,
    /// The machine's hooks (time, platform MSRs, idle), if any.
    pub hooks: Option<std::sync::Arc<dyn crate::CpuHooks>>,
}

impl Cpu {
    pub fn new(ram: GuestRam) -> Self {
        let flat = |type_: u8, s: bool| Segment {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_,
            present: true,
            dpl: 0,
            db: false,
            s,
            l: false,
            g: false,
            avl: false,
            unusable: false,
        };
        let mut seg = [flat(3, true); 6];
        seg[SEG_CS] = flat(0xb, true);
        Cpu {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: 2,
            seg,
            tr: flat(0xb, false),
            ldt: flat(2, false),
            gdt: DescriptorTable { base: 0, limit: 0xffff },
            idt: DescriptorTable { base: 0, limit: 0xffff },
            cr0: 0x6000_0010,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff0ff0, 0x400],
            fpu: Fpu::default(),
            msr: crate::system::Msrs::default(),
            cpl: 0,
            shadow: false,
            halted: false,
            ram,
            tlb: Box::new([TlbEntry::default(); TLB_SIZE]),
            code_pages: HashSet::default(),
            cache: BlockCache { fast: vec![None; FAST_BLOCKS], ..Default::default() },
            end_block: false,
            cur_ip: 0,
            instructions: 0,
            logged: HashSet::default(),
            advertise_apic: true,
            clock: crate::GuestClock::new(1_000_000),
            hooks: None,
        }
    }

    /// 64-bit mode: long mode active and CS.L set.
    #[inline]
    pub fn long64(&self) -> bool {
        self.efer & EFER_LMA != 0 && self.seg[SEG_CS].l
    }

    /// Decoder bitness for the current CS.
    pub fn bitness(&self) -> u32 {
        if self.long64() {
            64
        } else if self.cr0 & CR0_PE != 0 && self.seg[SEG_CS].db {
            32
        } else {
            16
        }
    }

    pub fn flush_tlb(&mut self, keep_global: bool) {
        self.cache.gen += 1;
        for e in self.tlb.iter_mut() {
            if !(keep_global && e.global) {
                e.tag = 0;
            }
        }
    }

    /// INVLPG: SDM Vol. 3A "INVLPG" removes the translation for the page, global or not. A 2 MiB page is
    /// cached as 4 KiB entries here, so every entry pointing into the same large page must go too; entries
    /// are few, so all entries whose linear address lies in the surrounding 2 MiB are dropped.
    pub fn invlpg(&mut self, la: u64) {
        self.cache.gen += 1;
        let big = la >> 21;
        for e in self.tlb.iter_mut() {
            if e.tag != 0 && ((e.tag & !TLB_VALID) >> 9) == big & ((1 << 43) - 1) {
                e.tag = 0;
            }
        }
    }

    /// Marks a physical page as holding code: cached writable translations to it must take the slow path
    /// from now on so that writes invalidate the decoded blocks.
    pub fn mark_code_page(&mut self, gpa_page: u64) {
        if self.code_pages.insert(gpa_page) {
            for e in self.tlb.iter_mut() {
                if e.tag != 0 && e.gpa == gpa_page {
                    e.perm &= !(P_WS | P_WU);
                }
            }
        }
    }

    /// A write touched `gpa_page`, which holds code: drop its blocks.
    pub fn invalidate_code_page(&mut self, gpa_page: u64) {
        if let Some(keys) = self.cache.page_blocks.remove(&gpa_page) {
            self.cache.gen += 1;
            for k in keys {
                if let Some(b) = self.cache.map.remove(&k) {
                    self.cache.retired.push(b);
                }
            }
            self.cache.invalidations += 1;
            for e in self.cache.fast.iter_mut() {
                if e.as_ref().is_some_and(|(k, _)| (k.1 & ((1 << 56) - 1)) & !0xfff == gpa_page) {
                    *e = None;
                }
            }
        }
        self.code_pages.remove(&gpa_page);
        // The running block may be among them: finish the current instruction and re-fetch.
        self.end_block = true;
    }

    /// Drops the blocks of `gpa_page` whose bytes changed behind the CPU's back. Called on every instruction
    /// TLB fill: a page that receives new code by DMA or from another vCPU must be (re)mapped or its TLB
    /// entry flushed before this vCPU executes it, which is exactly when a fill happens.
    pub fn validate_code_page(&mut self, gpa_page: u64) {
        let Some(keys) = self.cache.page_blocks.get(&gpa_page) else { return };
        // One copy of the page, then every block compared against it (blocks never cross the page).
        let mut buf = [0u8; 0x1000];
        let mut stale = !self.ram.read(gpa_page, &mut buf);
        for k in keys {
            if stale {
                break;
            }
            if let Some(b) = self.cache.map.get(k) {
                let off = (b.gpa & 0xfff) as usize;
                stale = buf.get(off..off + b.bytes.len()) != Some(&b.bytes[..]);
            }
        }
        if stale {
            log::debug!("code page {gpa_page:#x} changed without a CPU write: dropping its blocks");
            self.invalidate_code_page(gpa_page);
        }
    }

    pub fn flush_code_cache(&mut self) {
        self.cache.gen += 1;
        self.cache.fast.iter_mut().for_each(|e| *e = None);
        self.cache.retired.extend(self.cache.map.drain().map(|(_, b)| b));
        self.cache.page_blocks.clear();
        self.code_pages.clear();
    }
}

/// The CPU while it runs: state plus the device callbacks for MMIO and port I/O.
pub(crate) struct Exec<'a> {
    pub c: &'a mut Cpu,
    pub io: &'a dyn IoHandler,
}

impl std::ops::Deref for Exec<'_> {
    type Target = Cpu;
    fn deref(&self) -> &Cpu {
        self.c
    }
}
impl std::ops::DerefMut for Exec<'_> {
    fn deref_mut(&mut self) -> &mut Cpu {
        self.c
    }
}

#[inline]
fn canonical(la: u64) -> bool {
    ((la as i64) << 16 >> 16) as u64 == la
}

impl Exec<'_> {
    // ---- physical memory ----

    pub fn phys_read(&mut self, gpa: u64, buf: &mut [u8]) {
        if !self.c.ram.read(gpa, buf) {
            for (k, b) in buf.iter_mut().enumerate() {
                let a = gpa + k as u64;
                if let Some(p) = self.c.ram.host_ptr(a, 1) {
                    // SAFETY: `host_ptr` checked the byte lies in a live RAM mapping.
                    *b = unsafe { p.read_volatile() };
                } else {
                    // A range mixing RAM and MMIO (rare): the MMIO bytes go to the device one at a time.
                    self.io.mmio_read(a, std::slice::from_mut(b));
                }
            }
        }
    }

    pub fn phys_write(&mut self, gpa: u64, buf: &[u8]) {
        let page = gpa & !0xfff;
        let last = (gpa + buf.len() as u64 - 1) & !0xfff;
        for p in [page, last] {
            if self.c.code_pages.contains(&p) {
                self.c.invalidate_code_page(p);
            }
        }
        if !self.c.ram.write(gpa, buf) {
            for (k, b) in buf.iter().enumerate() {
                let a = gpa + k as u64;
                if let Some(p) = self.c.ram.host_ptr(a, 1) {
                    // SAFETY: `host_ptr` checked the byte lies in a live RAM mapping.
                    unsafe { p.write_volatile(*b) };
                } else {
                    self.io.mmio_write(a, std::slice::from_ref(b));
                }
            }
        }
    }

    /// MMIO accesses are passed whole (size 1..8) to the device when the range is not RAM.
    fn phys_read_sized(&mut self, gpa: u64, size: usize) -> u64 {
        let mut b = [0u8; 8];
        if self.c.ram.host_ptr(gpa, size as u64).is_none() && self.c.ram.host_ptr(gpa, 1).is_none() {
            self.io.mmio_read(gpa, &mut b[..size]);
        } else {
            self.phys_read(gpa, &mut b[..size]);
        }
        u64::from_le_bytes(b)
    }

    fn phys_write_sized(&mut self, gpa: u64, size: usize, val: u64) {
        let b = val.to_le_bytes();
        if self.c.ram.host_ptr(gpa, size as u64).is_none() && self.c.ram.host_ptr(gpa, 1).is_none() {
            self.io.mmio_write(gpa, &b[..size]);
        } else {
            self.phys_write(gpa, &b[..size]);
        }
    }

    fn pte_read(&mut self, gpa: u64) -> u64 {
        match self.c.ram.host_ptr(gpa, 8) {
            // SAFETY: RAM mapping checked by `host_ptr`; page-table entries are 8-byte aligned in guest physical
            // memory and region bases are 8-byte aligned, so this is an aligned 64-bit load.
            Some(p) => unsafe {
                (*std::sync::atomic::AtomicU64::from_ptr(p as *mut u64)).load(std::sync::atomic::Ordering::Relaxed)
            },
            None => self.phys_read_sized(gpa, 8),
        }
    }

    /// Sets bits in a paging-structure entry with a locked OR (SDM Vol. 3A "Accessed and Dirty Flags":
    /// the processor updates A/D with locked operations).
    fn pte_set_bits(&mut self, gpa: u64, bits: u64) {
        if self.c.code_pages.contains(&(gpa & !0xfff)) {
            self.c.invalidate_code_page(gpa & !0xfff);
        }
        match self.c.ram.host_ptr(gpa, 8) {
            Some(p) => {
                // SAFETY: as in `pte_read`: an aligned 64-bit location inside live RAM.
                unsafe {
                    (*std::sync::atomic::AtomicU64::from_ptr(p as *mut u64))
                        .fetch_or(bits, std::sync::atomic::Ordering::SeqCst)
                };
            }
            None => {
                let v = self.phys_read_sized(gpa, 8) | bits;
                self.phys_write_sized(gpa, 8, v);
            }
        }
    }

    // ---- linear memory ----

    /// Walks the page tables for `la` (SDM Vol. 3A "4-Level Paging"), checks the access, sets A/D bits and
    /// fills the TLB. Returns the TLB entry.
    pub fn translate(&mut self, la: u64, acc: Access, user: bool) -> Res<TlbEntry> {
        let idx = ((la >> 12) as usize) & (TLB_SIZE - 1);
        if self.c.cr0 & CR0_PG == 0 {
            let gpa = la & 0xffff_ffff_f000 & ((1u64 << 52) - 1);
            let host = self.c.ram.host_ptr(gpa, 0x1000).map_or(0, |p| p as usize);
            if acc == Access::Exec {
                self.c.validate_code_page(gpa);
            }
            let mut perm = P_RS | P_WS | P_XS | P_RU | P_WU | P_XU;
            if self.c.code_pages.contains(&gpa) {
                perm &= !(P_WS | P_WU);
            }
            let e = TlbEntry { tag: (la >> 12) | TLB_VALID, host, gpa, perm, global: false };
            self.c.tlb[idx] = e;
            return Ok(e);
        }
        if self.c.cr4 & CR4_PAE == 0 || self.c.efer & EFER_LMA == 0 {
            return Err(Fault::Exit(VcpuExit::Unsupported(format!(
                "paging mode other than 4-level (CR0={:#x} CR4={:#x} EFER={:#x}) at RIP {:#x}",
                self.c.cr0, self.c.cr4, self.c.efer, self.c.cur_ip
            ))));
        }
        if !canonical(la) {
            return gp0();
        }
        let nxe = self.c.efer & EFER_NXE != 0;
        // Bits above MAXPHYADDR are reserved; bit 63 (XD) is reserved unless EFER.NXE.
        let rsvd_hi = (((1u64 << 52) - 1) & !((1u64 << PHYS_BITS) - 1)) | if nxe { 0 } else { 1 << 63 };
        let pf = |present: bool, rsvd: bool| {
            let mut code = present as u32;
            if acc == Access::Write {
                code |= 2;
            }
            if user {
                code |= 4;
            }
            if rsvd {
                code |= 8;
            }
            if acc == Access::Exec && nxe {
                code |= 16;
            }
            code
        };
        let mut table = self.c.cr3 & PHYS_MASK;
        let mut rw = true;
        let mut us = true;
        let mut nx = false;
        let mut entries = [(0u64, 0u64); 4];
        let mut level = 4;
        let (leaf_addr, leaf, page_size) = loop {
            let shift = 12 + 9 * (level - 1);
            let addr = table + ((la >> shift) & 511) * 8;
            let e = self.pte_read(addr);
            if e & 1 == 0 {
                self.c.cr2 = la;
                return Err(Fault::Exc(VEC_PF, Some(pf(false, false))));
            }
            let ps = e & 0x80 != 0;
            // PS is reserved in a PML4E; 1 GiB pages are not advertised (no PDPE1GB), so PS in a PDPTE too.
            let bad_ps = ps && (level == 4 || level == 3);
            let bad_large = ps && level == 2 && e & 0x1f_e000 != 0;
            if e & rsvd_hi != 0 || bad_ps || bad_large {
                self.c.cr2 = la;
                return Err(Fault::Exc(VEC_PF, Some(pf(true, true))));
            }
            rw &= e & 2 != 0;
            us &= e & 4 != 0;
            nx |= nxe && e & (1 << 63) != 0;
            entries[4 - level] = (addr, e);
            if level == 1 || ps {
                break (addr, e, 1u64 << shift);
            }
            table = e & PHYS_MASK;
            level -= 1;
        };
        // Permission checks (SDM Vol. 3A "Access Rights"): no SMEP/SMAP (not advertised).
        let wp = self.c.cr0 & CR0_WP != 0;
        let ok = match acc {
            Access::Read => !user || us,
            Access::Write => {
                if user {
                    us && rw
                } else {
                    rw || !wp
                }
            }
            Access::Exec => !nx && (!user || us),
        };
        if !ok {
            self.c.cr2 = la;
            return Err(Fault::Exc(VEC_PF, Some(pf(true, false))));
        }
        // Accessed bits on every entry used, dirty on the leaf for writes.
        for &(addr, e) in entries.iter().take(5 - level) {
            if e & 0x20 == 0 {
                self.pte_set_bits(addr, 0x20);
            }
        }
        let mut dirty = leaf & 0x40 != 0;
        if acc == Access::Write && !dirty {
            self.pte_set_bits(leaf_addr, 0x40);
            dirty = true;
        }
        let frame = (leaf & PHYS_MASK & !(page_size - 1)) | (la & (page_size - 1) & !0xfff);
        let mut perm = P_RS | P_RU;
        if !nx {
            perm |= P_XS | P_XU;
        }
        if !us {
            perm &= !(P_RU | P_XU);
        }
        if dirty && !self.c.code_pages.contains(&frame) {
            if rw || !wp {
                perm |= P_WS;
            }
            if rw && us {
                perm |= P_WU;
            }
        }
        let global = self.c.cr4 & CR4_PGE != 0 && leaf & 0x100 != 0;
        if acc == Access::Exec {
            self.c.validate_code_page(frame);
        }
        let host = self.c.ram.host_ptr(frame, 0x1000).map_or(0, |p| p as usize);
        let e = TlbEntry { tag: (la >> 12) | TLB_VALID, host, gpa: frame, perm, global };
        self.c.tlb[idx] = e;
        Ok(e)
    }

    #[inline]
    fn need(&self, acc: Access, user: bool) -> u8 {
        match (acc, user) {
            (Access::Read, false) => P_RS,
            (Access::Write, false) => P_WS,
            (Access::Exec, false) => P_XS,
            (Access::Read, true) => P_RU,
            (Access::Write, true) => P_WU,
            (Access::Exec, true) => P_XU,
        }
    }

    /// Linear -> guest physical for one byte, with full checks (slow path, also used for fetch).
    #[inline]
    pub fn la_to_gpa(&mut self, la: u64, acc: Access, user: bool) -> Res<u64> {
        let idx = ((la >> 12) as usize) & (TLB_SIZE - 1);
        let e = self.c.tlb[idx];
        let need = self.need(acc, user);
        if e.tag == (la >> 12) | TLB_VALID && e.perm & need != 0 {
            return Ok(e.gpa | (la & 0xfff));
        }
        let e = self.translate(la, acc, user)?;
        Ok(e.gpa | (la & 0xfff))
    }

    /// Fast-path host pointer for an access of `size` bytes within one page, if the TLB allows it.
    #[inline(always)]
    fn fast_ptr(&self, la: u64, size: usize, need: u8) -> Option<*mut u8> {
        if (la & 0xfff) as usize + size > 0x1000 {
            return None;
        }
        let e = &self.c.tlb[((la >> 12) as usize) & (TLB_SIZE - 1)];
        if e.tag == (la >> 12) | TLB_VALID && e.perm & need != 0 && e.host != 0 {
            Some((e.host + (la & 0xfff) as usize) as *mut u8)
        } else {
            None
        }
    }

    /// Host pointer for `size` bytes at `la` (within one page) if the TLB already grants this access on RAM;
    /// writes are never granted on pages holding decoded code.
    #[inline]
    pub fn host_range(&self, la: u64, size: usize, write: bool) -> Option<*mut u8> {
        let need = match (write, self.user()) {
            (false, false) => P_RS,
            (false, true) => P_RU,
            (true, false) => P_WS,
            (true, true) => P_WU,
        };
        self.fast_ptr(la, size, need)
    }

    #[inline]
    pub fn user(&self) -> bool {
        self.c.cpl == 3
    }

    /// Reads `size` (1, 2, 4 or 8) bytes at linear `la` with the current privilege.
    #[inline]
    pub fn read(&mut self, la: u64, size: usize) -> Res<u64> {
        let user = self.user();
        self.read_as(la, size, user)
    }

    #[inline]
    pub fn read_as(&mut self, la: u64, size: usize, user: bool) -> Res<u64> {
        let need = if user { P_RU } else { P_RS };
        if let Some(p) = self.fast_ptr(la, size, need) {
            // SAFETY: the TLB entry's host page is inside live guest RAM (GuestRam contract) and the access stays
            // within the page; unaligned raw reads never form references into guest memory.
            return Ok(unsafe {
                match size {
                    1 => p.read() as u64,
                    2 => (p as *const u16).read_unaligned() as u64,
                    4 => (p as *const u32).read_unaligned() as u64,
                    _ => (p as *const u64).read_unaligned(),
                }
            });
        }
        self.read_slow(la, size, user)
    }

    fn read_slow(&mut self, la: u64, size: usize, user: bool) -> Res<u64> {
        // Callers pass 1..=8; clamp so a decoding surprise cannot index out of the 8-byte buffer.
        let size = size.clamp(1, 8);
        let end = la.wrapping_add(size as u64 - 1);
        let g0 = self.la_to_gpa(la, Access::Read, user)?;
        if (la ^ end) & !0xfff == 0 {
            return Ok(self.phys_read_sized(g0, size));
        }
        let g1 = self.la_to_gpa(end & !0xfff, Access::Read, user)?;
        let first = 0x1000 - (la & 0xfff) as usize;
        let mut b = [0u8; 8];
        self.phys_read(g0, &mut b[..first]);
        self.phys_read(g1, &mut b[first..size]);
        Ok(u64::from_le_bytes(b))
    }

    #[inline]
    pub fn write(&mut self, la: u64, size: usize, val: u64) -> Res<()> {
        let user = self.user();
        self.write_as(la, size, val, user)
    }

    #[inline]
    pub fn write_as(&mut self, la: u64, size: usize, val: u64, user: bool) -> Res<()> {
        let need = if user { P_WU } else { P_WS };
        if let Some(p) = self.fast_ptr(la, size, need) {
            // SAFETY: as in `read_as`; the TLB grants fast writes only to RAM pages without decoded code.
            unsafe {
                match size {
                    1 => p.write(val as u8),
                    2 => (p as *mut u16).write_unaligned(val as u16),
                    4 => (p as *mut u32).write_unaligned(val as u32),
                    _ => (p as *mut u64).write_unaligned(val),
                }
            }
            return Ok(());
        }
        self.write_slow(la, size, val, user)
    }

    fn write_slow(&mut self, la: u64, size: usize, val: u64, user: bool) -> Res<()> {
        let size = size.clamp(1, 8);
        let end = la.wrapping_add(size as u64 - 1);
        let g0 = self.la_to_gpa(la, Access::Write, user)?;
        if (la ^ end) & !0xfff == 0 {
            self.phys_write_sized(g0, size, val);
            return Ok(());
        }
        let g1 = self.la_to_gpa(end & !0xfff, Access::Write, user)?;
        let first = 0x1000 - (la & 0xfff) as usize;
        let b = val.to_le_bytes();
        self.phys_write(g0, &b[..first]);
        self.phys_write(g1, &b[first..size]);
        Ok(())
    }

    /// Reads any number of bytes (SSE operands, FXSAVE images, descriptor tables).
    pub fn read_bytes(&mut self, la: u64, buf: &mut [u8], user: bool) -> Res<()> {
        // Check every page first so that a fault leaves nothing half done.
        let mut off = 0usize;
        while off < buf.len() {
            let a = la.wrapping_add(off as u64);
            self.la_to_gpa(a, Access::Read, user)?;
            off += 0x1000 - (a & 0xfff) as usize;
        }
        let mut off = 0usize;
        while off < buf.len() {
            let a = la.wrapping_add(off as u64);
            let n = (0x1000 - (a & 0xfff) as usize).min(buf.len() - off);
            let g = self.la_to_gpa(a, Access::Read, user)?;
            self.phys_read(g, &mut buf[off..off + n]);
            off += n;
        }
        Ok(())
    }

    pub fn write_bytes(&mut self, la: u64, buf: &[u8], user: bool) -> Res<()> {
        let mut off = 0usize;
        while off < buf.len() {
            let a = la.wrapping_add(off as u64);
            self.la_to_gpa(a, Access::Write, user)?;
            off += 0x1000 - (a & 0xfff) as usize;
        }
        let mut off = 0usize;
        while off < buf.len() {
            let a = la.wrapping_add(off as u64);
            let n = (0x1000 - (a & 0xfff) as usize).min(buf.len() - off);
            let g = self.la_to_gpa(a, Access::Write, user)?;
            self.phys_write(g, &buf[off..off + n]);
            off += n;
        }
        Ok(())
    }

    /// Checks that a write of `size` bytes at `la` would succeed (for read-modify-write instructions that must
    /// fault before changing anything).
    pub fn probe_write(&mut self, la: u64, size: usize) -> Res<()> {
        let user = self.user();
        if self.fast_ptr(la, size, if user { P_WU } else { P_WS }).is_some() {
            return Ok(());
        }
        self.la_to_gpa(la, Access::Write, user)?;
        let end = la.wrapping_add(size as u64 - 1);
        if (la ^ end) & !0xfff != 0 {
            self.la_to_gpa(end, Access::Write, user)?;
        }
        Ok(())
    }
}
