//! A minimal 64-bit "kernel" environment for running code on the software CPU in tests: identity-mapped
//! 4 GiB (2 MiB pages, user-accessible), a Linux-like GDT, a TSS with RSP0 and IST1, and an IDT whose
//! handler for vector v is a single `hlt` at `HANDLERS + v`, so a test sees which event ended the run.

use std::sync::Mutex;

use tessera_vcpu::{DescriptorTable, IoHandler, Segment, SpecialRegs, Vcpu, VcpuExit};

use crate::{GuestRam, SoftVcpu};

pub const SYS_GPA: u64 = 0x10000;
pub const SYS_LEN: usize = 0x10000;
pub const PML4: u64 = SYS_GPA;
pub const GDT: u64 = SYS_GPA + 0x6000;
pub const IDT: u64 = SYS_GPA + 0x7000;
pub const TSS: u64 = SYS_GPA + 0x8000;
pub const HANDLERS: u64 = SYS_GPA + 0x9000;
pub const KSTACK: u64 = SYS_GPA + 0xf000;
pub const IST1_STACK: u64 = SYS_GPA + 0xe000;

/// An anonymous host mapping used as guest memory.
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize, fixed: Option<u64>) -> Mapping {
        let (addr, flags) = match fixed {
            Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED_NOREPLACE),
            None => (std::ptr::null_mut(), 0),
        };
        // SAFETY: anonymous private mapping; with MAP_FIXED_NOREPLACE the kernel refuses to replace an existing
        // mapping, so no Rust-owned memory is clobbered.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of {len:#x} bytes at {fixed:x?} failed");
        if let Some(a) = fixed {
            assert_eq!(p as u64, a, "mmap did not honour the fixed address");
        }
        Mapping { ptr: p as *mut u8, len }
    }

    pub fn write(&self, off: u64, b: &[u8]) {
        assert!(off as usize + b.len() <= self.len);
        // SAFETY: in bounds of the mapping (checked above); the mapping is plain memory owned by this test.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(off as usize), b.len()) };
    }

    pub fn read(&self, off: u64, b: &mut [u8]) {
        assert!(off as usize + b.len() <= self.len);
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off as usize), b.as_mut_ptr(), b.len()) };
    }

    pub fn w64(&self, off: u64, v: u64) {
        self.write(off, &v.to_le_bytes());
    }

    pub fn r64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(off, &mut b);
        u64::from_le_bytes(b)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no references into it outlive `self`.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The system area (page tables, GDT, IDT, TSS, handlers, stacks) at guest physical SYS_GPA.
pub fn build_system_area() -> Mapping {
    let m = Mapping::new(SYS_LEN, None);
    let o = |gpa: u64| gpa - SYS_GPA;
    // PML4[0] -> PDPT, PDPT[0..4] -> PD0..3, each PD maps 1 GiB with 2 MiB pages (P|RW|US|PS).
    m.w64(o(PML4), (PML4 + 0x1000) | 7);
    for g in 0..4u64 {
        m.w64(o(PML4 + 0x1000) + g * 8, (PML4 + 0x2000 + g * 0x1000) | 7);
        for e in 0..512u64 {
            m.w64(o(PML4 + 0x2000 + g * 0x1000) + e * 8, ((g << 30) | (e << 21)) | 0x87);
        }
    }
    // GDT like Linux: 0x10 kernel CS (L), 0x18 kernel DS, 0x23 user CS32, 0x2b user DS, 0x33 user CS64, 0x40 TSS.
    m.w64(o(GDT) + 0x10, 0x00af_9b00_0000_ffff);
    m.w64(o(GDT) + 0x18, 0x00cf_9300_0000_ffff);
    m.w64(o(GDT) + 0x20, 0x00cf_fb00_0000_ffff);
    m.w64(o(GDT) + 0x28, 0x00cf_f300_0000_ffff);
    m.w64(o(GDT) + 0x30, 0x00af_fb00_0000_ffff);
    let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40) | (((TSS >> 24) & 0xff) << 56);
    m.w64(o(GDT) + 0x40, tss_lo);
    m.w64(o(GDT) + 0x48, TSS >> 32);
    // TSS: RSP0 at +4, IST1 at +0x24.
    m.write(o(TSS) + 4, &KSTACK.to_le_bytes());
    m.write(o(TSS) + 0x24, &IST1_STACK.to_le_bytes());
    // IDT: interrupt gates (DPL 3 so INT3/INT n from user reach them), #DF on IST1.
    for v in 0..256u64 {
        let off = HANDLERS + v;
        let ist = if v == 8 { 1u64 } else { 0 };
        let lo = (off & 0xffff) | (0x10 << 16) | (ist << 32) | (0xeeu64 << 40) | (((off >> 16) & 0xffff) << 48);
        m.w64(o(IDT) + v * 16, lo);
        m.w64(o(IDT) + v * 16 + 8, off >> 32);
        m.write(o(HANDLERS) + v, &[0xf4]);
    }
    m
}

pub fn seg(selector: u16, type_: u8, dpl: u8, l: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl,
        db: !l,
        s: true,
        l,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Special registers for 64-bit mode at CPL `cpl` with the system area above.
pub fn long_mode_sregs(cpl: u8) -> SpecialRegs {
    let (cs, ss) = if cpl == 3 {
        (seg(0x33, 0xb, 3, true), seg(0x2b, 3, 3, false))
    } else {
        (seg(0x10, 0xb, 0, true), seg(0x18, 3, 0, false))
    };
    let null = Segment { unusable: true, ..Default::default() };
    SpecialRegs {
        cs,
        ss,
        ds: null,
        es: null,
        fs: null,
        gs: null,
        tr: Segment { base: TSS, limit: 0x67, selector: 0x40, type_: 0xb, present: true, ..Default::default() },
        ldt: null,
        gdt: DescriptorTable { base: GDT, limit: 0x4f },
        idt: DescriptorTable { base: IDT, limit: 0xfff },
        cr0: 0x8005_0033,
        cr2: 0,
        cr3: PML4,
        cr4: 0x6a0,
        cr8: 0,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
    }
}

/// Builds a CPU over the system area plus extra (gpa, mapping) regions.
pub fn make_cpu(sys: &Mapping, extra: &[(u64, &Mapping)], cpl: u8) -> SoftVcpu {
    let mut regions = vec![(SYS_GPA, sys.ptr, sys.len)];
    for (g, m) in extra {
        regions.push((*g, m.ptr, m.len));
    }
    // SAFETY: the mappings are owned by the caller and outlive the CPU in every test (dropped after it).
    let ram = unsafe { GuestRam::new(&regions) }.expect("valid RAM layout");
    let mut cpu = SoftVcpu::new(ram);
    cpu.set_sregs(&long_mode_sregs(cpl)).expect("sregs");
    cpu
}

/// Which handler the CPU halted in, if it halted in one.
pub fn halted_vector(cpu: &SoftVcpu, exit: &VcpuExit) -> Option<u8> {
    let rip = cpu.regs().ok()?.rip;
    if *exit == VcpuExit::Halted && (HANDLERS + 1..=HANDLERS + 256).contains(&rip) {
        Some((rip - HANDLERS - 1) as u8)
    } else {
        None
    }
}

/// An IoHandler that records port writes and answers reads from a table.
#[derive(Default)]
pub struct RecordingIo {
    pub out: Mutex<Vec<(u16, Vec<u8>)>>,
    pub mmio: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl IoHandler for RecordingIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(if port == 0x3fd { 0x60 } else { 0xff });
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.out.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = (addr as u8).wrapping_add(k as u8);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.lock().unwrap().push((addr, data.to_vec()));
    }
}

impl Mapping {
    pub fn read_vec(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(off, &mut v);
        v
    }
}
