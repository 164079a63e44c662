//! Tessera's software x86-64 CPU: an interpreter over iced-x86-decoded instruction blocks.
//!
//! Code map:
//! - [`mem`]: guest RAM regions ([`GuestRam`]), raw host pointers with unaligned accesses.
//! - `cpu`: architectural state, 4-level paging with a software TLB (A/D bits, NX, global pages), linear
//!   memory access, the decoded-block cache (keyed by linear RIP + guest physical address, invalidated by
//!   writes to code pages).
//! - `exec`: the integer instruction set and string instructions; `alu`: flag computation.
//! - `fast`: the per-instruction operation each block stores next to its decoded instructions, chosen at decode
//!   time for the frequent forms (GPR moves, loads/stores, register ALU, Jcc, push/pop/call/ret, ...) so they skip
//!   `Exec::step`'s generic match; everything else is `Op::Generic`.
//! - `system`: control registers, descriptor tables, segment loads, IDT delivery with IST, IRETQ,
//!   SYSCALL/SYSRET/SWAPGS, MSRs, port I/O; `cpuid`: the advertised feature set.
//! - `fpu`: x87 control, FXSAVE/FXRSTOR, MMX, the SSE/SSE2 integer/move subset.
//!
//! Modes: 64-bit long mode, and enough 32-bit protected mode (flat segments, paging off, then into long mode)
//! for Linux's PVH entry. Event delivery outside long mode, real mode and legacy 32-bit paging stop with
//! `VcpuExit::Unsupported`; decoder bitness, segment bases and paging already dispatch on the mode.
//!
//! Interrupts: the platform implements [`InterruptSource`]. `run` checks it at block boundaries (blocks end
//! at every branch, so the latency is a few instructions) honouring IF and the STI/MOV SS shadow.
//! HLT with IF=1 waits *inside* `run` (on a condition variable, re-checking the source every millisecond
//! and whenever [`VcpuHandle::wake`] is called); `run` returns [`VcpuExit::Halted`] only for HLT with IF=0
//! or when no interrupt source is installed. [`VcpuHandle::kick`] makes `run` return
//! [`VcpuExit::Interrupted`] at the next block boundary (or wakes a waiting HLT).
//!
//! Time: [`GuestClock`] is host monotonic time since the vCPU was created, scaled to the TSC frequency; the
//! TSC, and later the LAPIC timer and PIT, derive from it, so they agree with each other.
//!
//! Machine hooks ([`CpuHooks`], [`SoftVcpu::set_hooks`]): a machine with timers of its own supplies the TSC
//! (given the retired-instruction count, for an instruction-counting clock), owns platform MSRs such as
//! IA32_APIC_BASE, and does the HLT wait; [`VcpuHandle::retired_instructions`] lets its device code read the
//! count as of the current block. Tessera's core uses them for `-accel tcg`.

mod alu;
mod cpu;
mod cpuid;
mod exec;
mod fast;
mod fpu;
mod hooks;
pub mod mem;
mod system;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use hooks::CpuHooks;
use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};
pub use mem::GuestRam;
use tessera_vcpu::{FpuControl, IoHandler, Regs, SpecialRegs, Vcpu, VcpuError, VcpuExit};

use cpu::{Access, Block, Cpu, Exec, Fault, Res};
use system::Event;

/// Errors of the software CPU's own setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid guest RAM layout: {0}")]
    BadRam(String),
}

/// The platform's interrupt controller as the CPU sees it (the INTR line and the INTA cycle).
pub trait InterruptSource: Send + Sync {
    /// An interrupt is pending on INTR (checked only when RFLAGS.IF=1 and no shadow is active).
    fn pending(&self) -> bool;
    /// Acknowledge: the vector to deliver, or `None` if the request went away (spurious).
    fn acknowledge(&self) -> Option<u8>;
}

/// The guest's time base: host monotonic time since creation, and the TSC derived from it.
#[derive(Clone, Copy, Debug)]
pub struct GuestClock {
    start: Instant,
    tsc_khz: u64,
}

impl GuestClock {
    pub fn new(tsc_khz: u64) -> Self {
        GuestClock { start: Instant::now(), tsc_khz: tsc_khz.max(1) }
    }
    /// Guest nanoseconds since the clock started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    /// TSC ticks (before the guest's IA32_TSC offset).
    pub fn tsc(&self) -> u64 {
        (self.now_ns() as u128 * self.tsc_khz as u128 / 1_000_000) as u64
    }
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }
}

pub(crate) fn clock_tsc(c: &Cpu) -> u64 {
    match c.hooks.as_ref().and_then(|h| h.tsc(c.instructions)) {
        Some(t) => t,
        None => c.clock.tsc(),
    }
}

/// Construction options.
#[derive(Clone, Copy, Debug)]
pub struct SoftVcpuConfig {
    /// TSC frequency in kHz (default 1 GHz).
    pub tsc_khz: u64,
    /// Advertise a local APIC in CPUID (a LAPIC device must then answer at 0xfee00000).
    pub apic: bool,
}

impl Default for SoftVcpuConfig {
    fn default() -> Self {
        SoftVcpuConfig { tsc_khz: 1_000_000, apic: true }
    }
}

#[derive(Default)]
struct Shared {
    kick: AtomicBool,
    /// Instructions retired as of the start of the current block (for the machine's instruction clock).
    retired: AtomicU64,
    wake: Mutex<bool>,
    cond: Condvar,
}

/// Lets other threads stop a running vCPU or wake a halted one.
#[derive(Clone)]
pub struct VcpuHandle(Arc<Shared>);

impl VcpuHandle {
    /// Makes `run` return `VcpuExit::Interrupted` at the next block boundary.
    pub fn kick(&self) {
        self.0.kick.store(true, Ordering::SeqCst);
        self.wake();
    }
    /// Wakes a vCPU waiting in HLT so it re-checks its interrupt source (call after raising a line).
    pub fn wake(&self) {
        let mut w = self.0.wake.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.0.cond.notify_all();
    }
    /// Instructions retired by the vCPU as of the start of its current block (readable from device code the
    /// vCPU calls, e.g. to advance an instruction-driven clock before a timer register is read).
    #[inline]
    pub fn retired_instructions(&self) -> u64 {
        self.0.retired.load(Ordering::Relaxed)
    }
}

/// Execution counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub instructions: u64,
    pub blocks_decoded: u64,
    pub code_page_invalidations: u64,
}

/// The software vCPU.
pub struct SoftVcpu {
    cpu: Cpu,
    irq: Option<Arc<dyn InterruptSource>>,
    shared: Arc<Shared>,
    budget: Option<u64>,
}

struct NoIo;
impl IoHandler for NoIo {
    fn pio_read(&self, _: u16, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn pio_write(&self, _: u16, _: &[u8]) {}
    fn mmio_read(&self, _: u64, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

impl SoftVcpu {
    pub fn new(ram: GuestRam) -> Self {
        Self::with_config(ram, SoftVcpuConfig::default())
    }

    pub fn with_config(ram: GuestRam, config: SoftVcpuConfig) -> Self {
        let mut cpu = Cpu::new(ram);
        cpu.advertise_apic = config.apic;
        cpu.clock = GuestClock::new(config.tsc_khz);
        cpu.msr.apic_base = 0xfee0_0900;
        cpu.msr.pat = 0x0007_0406_0007_0406;
        SoftVcpu { cpu, irq: None, shared: Arc::new(Shared::default()), budget: None }
    }

    pub fn handle(&self) -> VcpuHandle {
        VcpuHandle(self.shared.clone())
    }

    pub fn set_interrupt_source(&mut self, src: Arc<dyn InterruptSource>) {
        self.irq = Some(src);
    }

    /// Installs the machine's hooks (see [`CpuHooks`]).
    pub fn set_hooks(&mut self, hooks: Arc<dyn CpuHooks>) {
        self.cpu.hooks = Some(hooks);
    }

    pub fn clock(&self) -> GuestClock {
        self.cpu.clock
    }

    /// Stop `run` with `VcpuExit::Interrupted` once this many more instructions have retired (tests, benches).
    pub fn set_instruction_budget(&mut self, n: Option<u64>) {
        self.budget = n.map(|n| self.cpu.instructions + n);
    }

    pub fn stats(&self) -> Stats {
        Stats {
            instructions: self.cpu.instructions,
            blocks_decoded: self.cpu.cache.decoded,
            code_page_invalidations: self.cpu.cache.invalidations,
        }
    }

    pub fn xmm(&self, n: usize) -> u128 {
        self.cpu.fpu.xmm[n & 15]
    }

    pub fn set_xmm(&mut self, n: usize, v: u128) {
        self.cpu.fpu.xmm[n & 15] = v;
    }

    /// Reads an MSR as RDMSR would (for the core's save/restore and tests).
    pub fn msr(&mut self, index: u32) -> Option<u64> {
        let mut ex = Exec { c: &mut self.cpu, io: &NoIo };
        ex.rdmsr(index).ok()
    }

    fn run_inner(&mut self, io: &dyn IoHandler) -> VcpuExit {
        let shared = self.shared.clone();
        let irq = self.irq.clone();
        let budget = self.budget;
        let mut ex = Exec { c: &mut self.cpu, io };
        // The block that ran last, the cache generation it was fetched in, and whether it is in the cache (so
        // that it is alive while the generation is unchanged); its links give the next block.
        let mut prev: *const Block = std::ptr::null();
        let mut prev_gen = u64::MAX;
        loop {
            if shared.kick.load(Ordering::Relaxed) && shared.kick.swap(false, Ordering::SeqCst) {
                return VcpuExit::Interrupted;
            }
            if budget.is_some_and(|b| ex.c.instructions >= b) {
                return VcpuExit::Interrupted;
            }
            shared.retired.store(ex.c.instructions, Ordering::Relaxed);
            let had_shadow = ex.c.shadow;
            if !had_shadow && ex.c.rflags & cpu::IF != 0 {
                if let Some(src) = &irq {
                    if src.pending() {
                        if let Some(v) = src.acknowledge() {
                            ex.c.halted = false;
                            ex.c.cur_ip = ex.c.rip;
                            if let Some(exit) = ex.raise(v, None, Event::External) {
                                return exit;
                            }
                            continue;
                        }
                    }
                }
            }
            if ex.c.halted {
                if ex.c.rflags & cpu::IF == 0 || irq.is_none() {
                    return VcpuExit::Halted;
                }
                if ex.c.hooks.as_ref().is_some_and(|h| h.idle(ex.c.instructions)) {
                    continue;
                }
                let mut w = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
                if !*w {
                    w = shared.cond.wait_timeout(w, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
                }
                *w = false;
                continue;
            }
            let rip = ex.c.rip;
            let mode = ex.c.cpl as u32 | ex.c.bitness() << 8;
            let gen = ex.c.cache.gen;
            let linked = if prev_gen == gen {
                // SAFETY: `prev` was in the cache when fetched in generation `gen` (prev_gen is only set for
                // cached blocks), and blocks leave the cache only with a generation bump, so it is alive.
                let p = unsafe { &*prev };
                let l = p.links[(rip != p.end_ip) as usize].get();
                (l.rip == rip && l.gen == gen && l.mode == mode).then_some(l.to)
            } else {
                None
            };
            let fetched = match linked {
                Some(b) => Ok((b, true)),
                None => ex.fetch_block(),
            };
            let blk = match fetched {
                Ok((b, cached)) => {
                    if linked.is_none() && prev_gen == gen && ex.c.cache.gen == gen && cached {
                        // SAFETY: as above, `prev` is alive: no generation bump since it was fetched.
                        let p = unsafe { &*prev };
                        p.links[(rip != p.end_ip) as usize].set(cpu::Link { rip, gen, mode, to: b });
                    }
                    prev = b;
                    prev_gen = if cached { ex.c.cache.gen } else { u64::MAX };
                    // SAFETY: `fetch_block` keeps the block alive (in the cache or `cache.retired`) until its
                    // next call, which comes after the last use of `blk` in this iteration; a linked block is in
                    // the cache (links are made only to cached blocks and die with the generation). Blocks are
                    // only read through shared references (`runs` and `links` are `Cell`s).
                    unsafe { &*b }
                }
                Err(Fault::Exc(v, e)) => {
                    ex.c.cur_ip = ex.c.rip;
                    if let Some(exit) = ex.raise(v, e, Event::Exception) {
                        return exit;
                    }
                    continue;
                }
                Err(Fault::Exit(x)) => return x,
            };
            blk.runs.set(blk.runs.get().wrapping_add(1));
            // `-d in_asm`-style tracing (target `swcpu::insn`), checked once per block to keep the loop cheap.
            let trace = log::log_enabled!(target: "swcpu::insn", log::Level::Trace);
            ex.c.end_block = false;
            if had_shadow {
                // Under an interrupt shadow only the first instruction runs, through the generic path: it
                // computes the flags that `drop_dead_flags` may have left to a later instruction of the block.
                let i = &blk.insns[0];
                if trace {
                    log::trace!(target: "swcpu::insn", "{:#x}: {i}", ex.c.rip);
                }
                ex.c.cur_ip = ex.c.rip;
                ex.c.rip = i.next_ip();
                let r = ex.step(i);
                ex.c.shadow = false;
                match ex.retire(r) {
                    Some(Some(exit)) => return exit,
                    _ => continue,
                }
            }
            for (i, op) in blk.insns.iter().zip(blk.ops.iter()) {
                if trace {
                    log::trace!(target: "swcpu::insn", "{:#x}: {i}", ex.c.rip);
                }
                ex.c.cur_ip = ex.c.rip;
                ex.c.rip = i.next_ip();
                let r = ex.step_op(op, i);
                if r.is_err() {
                    match ex.retire(r) {
                        Some(Some(exit)) => return exit,
                        _ => break,
                    }
                }
                ex.c.instructions += 1;
                if ex.c.end_block {
                    break;
                }
            }
        }
    }
}

impl Exec<'_> {
    /// After one instruction: counts it if it completed, else rewinds RIP and delivers its exception.
    /// `None`: it completed; `Some(None)`: an exception was delivered (leave the block); `Some(Some(exit))`:
    /// `run` returns `exit`.
    #[inline(always)]
    fn retire(&mut self, r: Res<()>) -> Option<Option<VcpuExit>> {
        match r {
            Ok(()) => {
                self.c.instructions += 1;
                None
            }
            Err(Fault::Exc(v, e)) => {
                self.c.rip = self.c.cur_ip;
                Some(self.raise(v, e, Event::Exception))
            }
            Err(Fault::Exit(x)) => {
                self.c.rip = self.c.cur_ip;
                Some(Some(x))
            }
        }
    }
}

impl Exec<'_> {
    /// Delivers an exception, escalating to #DF and triple fault per SDM Vol. 3A "Exception and Interrupt
    /// Classes" (benign / contributory / page fault).
    fn raise(&mut self, v: u8, e: Option<u32>, kind: Event) -> Option<VcpuExit> {
        log::trace!("event {v} error {e:?} at RIP {:#x}", self.c.cur_ip);
        let contributory = |x: u8| matches!(x, 0 | 10..=13);
        let mut cur = (v, e, kind);
        for _ in 0..3 {
            match self.deliver(cur.0, cur.1, cur.2) {
                Ok(()) => return None,
                Err(Fault::Exit(x)) => return Some(x),
                Err(Fault::Exc(v2, e2)) => {
                    if cur.0 == cpu::VEC_DF && cur.2 == Event::Exception {
                        break;
                    }
                    let first = if cur.2 == Event::Exception { cur.0 } else { 255 };
                    let df = (contributory(first) && contributory(v2))
                        || (first == cpu::VEC_PF && (contributory(v2) || v2 == cpu::VEC_PF));
                    cur = if df { (cpu::VEC_DF, Some(0), Event::Exception) } else { (v2, e2, Event::Exception) };
                }
            }
        }
        log::error!("triple fault at RIP {:#x} (first event: vector {v}, error {e:?})", self.c.cur_ip);
        Some(VcpuExit::Reset)
    }

    /// The block at RIP, and whether it is in the cache (page-crossing instructions are not). The pointer stays
    /// valid until the next call: the block is owned by the cache or, if removed from it (or never cached), by
    /// `cache.retired`, which only this function empties.
    fn fetch_block(&mut self) -> Res<(*const Block, bool)> {
        if !self.c.cache.retired.is_empty() {
            self.c.cache.retired.clear();
        }
        let rip = self.c.rip;
        let user = self.user();
        let gpa = self.la_to_gpa(rip, Access::Exec, user)?;
        let bits = self.c.bitness();
        let key = (rip, gpa | ((bits as u64) << 56));
        let slot = (rip as usize ^ (rip >> 12) as usize) & (cpu::FAST_BLOCKS - 1);
        if let Some((k, b)) = &self.c.cache.fast[slot] {
            if *k == key {
                return Ok((Arc::as_ptr(b), true));
            }
        }
        let b = match self.c.cache.map.get(&key) {
            Some(b) => b.clone(),
            None => self.decode_block(rip, gpa, bits, key)?,
        };
        let p = Arc::as_ptr(&b);
        // Blocks spanning two pages (decoded per use) are not cached anywhere.
        let cached = self.c.cache.map.contains_key(&key);
        if cached {
            self.c.cache.fast[slot] = Some((key, b));
        } else {
            self.c.cache.retired.push(b);
        }
        Ok((p, cached))
    }

    #[cold]
    #[inline(never)]
    fn decode_block(&mut self, rip: u64, gpa: u64, bits: u32, key: (u64, u64)) -> Res<Arc<Block>> {
        let avail = (0x1000 - (gpa & 0xfff)) as usize;
        let mut buf = [0u8; 0x1000];
        if !self.c.ram.read(gpa, &mut buf[..avail]) {
            return Err(Fault::Exit(VcpuExit::Unsupported(format!(
                "instruction fetch from non-RAM guest physical address {gpa:#x} (RIP {rip:#x})"
            ))));
        }
        let mut dec = Decoder::with_ip(bits, &buf[..avail], rip, DecoderOptions::NONE);
        let mut insns = Vec::with_capacity(16);
        let mut i = Instruction::default();
        let mut crosses = false;
        while dec.can_decode() && insns.len() < 256 {
            dec.decode_out(&mut i);
            if i.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes {
                crosses = true;
                break;
            }
            insns.push(i);
            if i.flow_control() != FlowControl::Next || i.is_invalid() {
                break;
            }
        }
        if insns.is_empty() && crosses {
            return self.decode_crossing(rip, gpa, bits);
        }
        let page = gpa & !0xfff;
        let used = (dec.position()).min(avail);
        let mut ops: Vec<fast::Op> = insns.iter().map(|i| fast::classify(i, bits)).collect();
        fast::drop_dead_flags(&mut ops, &insns);
        let end_ip = insns.last().map_or(rip, |i| i.next_ip());
        let b = Arc::new(Block {
            end_ip,
            links: Default::default(),
            ops: ops.into_boxed_slice(),
            insns: insns.into_boxed_slice(),
            gpa,
            bytes: buf[..used].to_vec().into_boxed_slice(),
            runs: Default::default(),
        });
        self.c.mark_code_page(page);
        self.c.cache.page_blocks.entry(page).or_default().push(key);
        self.c.cache.map.insert(key, b.clone());
        self.c.cache.decoded += 1;
        Ok(b)
    }

    /// An instruction that straddles a page boundary: fetched through both translations and decoded every
    /// time (not cached; rare).
    #[cold]
    #[inline(never)]
    fn decode_crossing(&mut self, rip: u64, gpa: u64, bits: u32) -> Res<Arc<Block>> {
        let first = (0x1000 - (gpa & 0xfff)) as usize;
        let mut b = [0u8; 15];
        self.phys_read(gpa, &mut b[..first.min(15)]);
        let user = self.user();
        let next = (rip & !0xfff).wrapping_add(0x1000);
        let g2 = self.la_to_gpa(next, Access::Exec, user)?;
        if first < 15 {
            self.phys_read(g2, &mut b[first..]);
        }
        let mut dec = Decoder::with_ip(bits, &b, rip, DecoderOptions::NONE);
        let i = dec.decode();
        Ok(Arc::new(Block {
            end_ip: i.next_ip(),
            links: Default::default(),
            ops: Box::new([fast::classify(&i, bits)]),
            insns: vec![i].into_boxed_slice(),
            gpa,
            bytes: Box::new([]),
            runs: Default::default(),
        }))
    }
}

impl Vcpu for SoftVcpu {
    fn regs(&self) -> tessera_vcpu::Result<Regs> {
        let g = &self.cpu.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.cpu.rip,
            rflags: self.cpu.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> tessera_vcpu::Result<()> {
        self.cpu.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15,
        ];
        self.cpu.rip = r.rip;
        self.cpu.rflags = (r.rflags & 0x3f_7fd7) | 2;
        self.cpu.halted = false;
        Ok(())
    }

    fn sregs(&self) -> tessera_vcpu::Result<SpecialRegs> {
        let c = &self.cpu;
        Ok(SpecialRegs {
            es: c.seg[cpu::SEG_ES],
            cs: c.seg[cpu::SEG_CS],
            ss: c.seg[cpu::SEG_SS],
            ds: c.seg[cpu::SEG_DS],
            fs: c.seg[cpu::SEG_FS],
            gs: c.seg[cpu::SEG_GS],
            tr: c.tr,
            ldt: c.ldt,
            gdt: c.gdt,
            idt: c.idt,
            cr0: c.cr0,
            cr2: c.cr2,
            cr3: c.cr3,
            cr4: c.cr4,
            cr8: c.cr8,
            efer: c.efer,
            apic_base: c.msr.apic_base,
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegs) -> tessera_vcpu::Result<()> {
        if s.efer & cpu::EFER_LMA != 0 && (s.cr0 & cpu::CR0_PG == 0 || s.cr4 & cpu::CR4_PAE == 0) {
            return Err(VcpuError::Engine(format!(
                "EFER.LMA set without CR0.PG and CR4.PAE (CR0={:#x} CR4={:#x})",
                s.cr0, s.cr4
            )));
        }
        let c = &mut self.cpu;
        c.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        c.tr = s.tr;
        c.ldt = s.ldt;
        c.gdt = s.gdt;
        c.idt = s.idt;
        c.cr0 = s.cr0;
        c.cr2 = s.cr2;
        c.cr3 = s.cr3;
        c.cr4 = s.cr4;
        c.cr8 = s.cr8;
        c.efer = s.efer;
        c.msr.apic_base = s.apic_base;
        c.cpl = s.cs.dpl;
        c.flush_tlb(false);
        c.flush_code_cache();
        Ok(())
    }

    fn set_fpu_control(&mut self, f: &FpuControl) -> tessera_vcpu::Result<()> {
        self.cpu.fpu.fcw = f.fcw;
        self.cpu.fpu.mxcsr = f.mxcsr;
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> tessera_vcpu::Result<()> {
        let mut ex = Exec { c: &mut self.cpu, io: &NoIo };
        for &(idx, v) in msrs {
            ex.wrmsr(idx, v).map_err(|_| VcpuError::Engine(format!("MSR {idx:#x} rejects value {v:#x}")))?;
        }
        Ok(())
    }

    fn run(&mut self, io: &dyn IoHandler) -> tessera_vcpu::Result<VcpuExit> {
        Ok(self.run_inner(io))
    }
}

#[cfg(test)]
mod tests;
