//! System instructions: control/debug registers, descriptor tables, segment loads, event delivery (IDT,
//! IST, error codes), IRETQ, SYSCALL/SYSRET/SWAPGS, MSRs, CPUID, TSC, port I/O and HLT.

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind, Register};
use tessera_vcpu::{Segment, VcpuExit};

use crate::cpu::*;
use crate::exec::gpr_info;

/// Model-specific registers with architectural state. Anything else reads 0 and ignores writes (QEMU TCG's
/// policy, see the fact sheet §0), logged once per MSR with the RIP.
#[derive(Default, Clone)]
pub(crate) struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub apic_base: u64,
    pub tsc_offset: i64,
    pub tsc_aux: u64,
    pub misc: std::collections::BTreeMap<u32, u64>,
}

pub(crate) const MSR_TSC: u32 = 0x10;
pub(crate) const MSR_APIC_BASE: u32 = 0x1b;
pub(crate) const MSR_EFER: u32 = 0xc000_0080;
pub(crate) const MSR_FS_BASE: u32 = 0xc000_0100;
pub(crate) const MSR_GS_BASE: u32 = 0xc000_0101;
pub(crate) const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// What kind of event is being delivered (changes the privilege check and the error code's EXT bit).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Event {
    /// Exception raised by the CPU.
    Exception,
    /// External interrupt (INTR).
    External,
    /// INT n / INT3 / INT1 from software: the gate's DPL is checked against CPL.
    Software,
}

/// Decoded segment descriptor (SDM Vol. 3A "Segment Descriptors").
pub(crate) fn parse_desc(sel: u16, d: u64) -> Segment {
    let g = (d >> 55) & 1 != 0;
    let mut limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit,
        selector: sel,
        type_: ((d >> 40) & 0xf) as u8,
        s: (d >> 44) & 1 != 0,
        dpl: ((d >> 45) & 3) as u8,
        present: (d >> 47) & 1 != 0,
        avl: (d >> 52) & 1 != 0,
        l: (d >> 53) & 1 != 0,
        db: (d >> 54) & 1 != 0,
        g,
        unusable: false,
    }
}

impl Exec<'_> {
    fn cpl0(&self) -> Res<()> {
        if self.c.cpl != 0 {
            return gp0();
        }
        Ok(())
    }

    /// Reads the 8-byte descriptor for `sel` from the GDT or LDT, returning (address, descriptor).
    pub fn read_desc(&mut self, sel: u16) -> Res<(u64, u64)> {
        let (base, limit) = if sel & 4 != 0 {
            if self.c.ldt.unusable || self.c.ldt.selector & !3 == 0 {
                return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
            }
            (self.c.ldt.base, self.c.ldt.limit as u64)
        } else {
            (self.c.gdt.base, self.c.gdt.limit as u64)
        };
        let off = (sel & !7) as u64;
        if off + 7 > limit {
            return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
        }
        let a = base.wrapping_add(off);
        let d = self.read_as(a, 8, false)?;
        Ok((a, d))
    }

    /// Loads a data/stack segment register (SDM Vol. 2A "MOV", "POP" protected-mode checks, reduced to what
    /// 64-bit mode checks).
    pub fn load_seg(&mut self, s: usize, sel: u16) -> Res<()> {
        if sel & !3 == 0 {
            if s == SEG_SS && (!self.c.long64() || self.c.cpl == 3 || (sel & 3) as u8 != self.c.cpl) {
                return gp0();
            }
            // A null selector leaves the segment unusable; like Intel, FS/GS base are cleared (the kernel then
            // does not set X86_BUG_NULL_SEG).
            self.c.seg[s] = Segment { selector: sel, unusable: true, ..Default::default() };
            return Ok(());
        }
        let (addr, d) = self.read_desc(sel)?;
        let mut seg = parse_desc(sel, d);
        let err = Some((sel & !3) as u32);
        let code = seg.type_ & 8 != 0;
        let rpl = (sel & 3) as u8;
        if !seg.s {
            return Err(Fault::Exc(VEC_GP, err));
        }
        if s == SEG_SS {
            if code || seg.type_ & 2 == 0 || rpl != self.c.cpl || seg.dpl != self.c.cpl {
                return Err(Fault::Exc(VEC_GP, err));
            }
            if !seg.present {
                return Err(Fault::Exc(VEC_SS, err));
            }
        } else {
            if code && seg.type_ & 2 == 0 {
                return Err(Fault::Exc(VEC_GP, err));
            }
            // Data or non-conforming code: DPL >= max(CPL, RPL).
            if (!code || seg.type_ & 4 == 0) && seg.dpl < self.c.cpl.max(rpl) {
                return Err(Fault::Exc(VEC_GP, err));
            }
            if !seg.present {
                return Err(Fault::Exc(VEC_NP, err));
            }
        }
        if seg.type_ & 1 == 0 {
            seg.type_ |= 1;
            self.write_as(addr.wrapping_add(5), 1, (d >> 40) | 1, false)?;
        }
        self.c.seg[s] = seg;
        Ok(())
    }

    /// Loads CS for a far transfer to privilege `new_cpl` (already checked by the caller).
    fn load_cs(&mut self, sel: u16, new_cpl: u8) -> Res<()> {
        let (_, d) = self.read_desc(sel)?;
        let mut seg = parse_desc(sel, d);
        let err = Some((sel & !3) as u32);
        if !seg.s || seg.type_ & 8 == 0 {
            return Err(Fault::Exc(VEC_GP, err));
        }
        if !seg.present {
            return Err(Fault::Exc(VEC_NP, err));
        }
        if seg.l && seg.db {
            return Err(Fault::Exc(VEC_GP, err));
        }
        seg.selector = (sel & !3) | new_cpl as u16;
        seg.type_ |= 1;
        self.c.seg[SEG_CS] = seg;
        self.c.cpl = new_cpl;
        self.c.end_block = true;
        Ok(())
    }

    fn code_desc_for(&mut self, sel: u16) -> Res<Segment> {
        if sel & !3 == 0 {
            return gp0();
        }
        let (_, d) = self.read_desc(sel)?;
        let seg = parse_desc(sel, d);
        if !seg.s || seg.type_ & 8 == 0 {
            return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
        }
        Ok(seg)
    }

    pub fn far_jmp_call(&mut self, i: &Instruction, call: bool) -> Res<()> {
        let (off, sel, osz) = match i.op_kind(0) {
            // `jmp/call ptr16:16/32` (invalid in 64-bit mode; the PVH entry uses it to enter long mode).
            OpKind::FarBranch32 => (i.far_branch32() as u64, i.far_branch_selector(), 4),
            OpKind::FarBranch16 => (i.far_branch16() as u64, i.far_branch_selector(), 2),
            OpKind::Memory => {
                let osz = i.memory_size().size().saturating_sub(2).clamp(2, 8);
                let a = self.ea(i);
                let off = self.read(a, osz)?;
                (off, self.read(a.wrapping_add(osz as u64), 2)? as u16, osz)
            }
            _ => return self.unimpl(i, "far branch operand"),
        };
        let seg = self.code_desc_for(sel)?;
        let conforming = seg.type_ & 4 != 0;
        if (conforming && seg.dpl > self.c.cpl)
            || (!conforming && (seg.dpl != self.c.cpl || (sel & 3) as u8 > self.c.cpl))
        {
            return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
        }
        if call {
            let (cs, ret) = (self.c.seg[SEG_CS].selector as u64, self.c.rip);
            self.push(osz, cs)?;
            self.push(osz, ret)?;
        }
        let cpl = self.c.cpl;
        self.load_cs(sel, cpl)?;
        self.c.rip = off;
        Ok(())
    }

    pub(crate) fn retf(&mut self, i: &Instruction) -> Res<()> {
        let osz = if i.code() == Code::Retfq || i.code() == Code::Retfq_imm16 {
            8
        } else if i.code() == Code::Retfw || i.code() == Code::Retfw_imm16 {
            2
        } else {
            4
        };
        let sp = self.c.gpr[4];
        let ssb = self.seg_base(SEG_SS);
        let rip = self.read(sp.wrapping_add(ssb), osz)?;
        let sel = self.read(sp.wrapping_add(ssb).wrapping_add(osz as u64), osz)? as u16;
        let rpl = (sel & 3) as u8;
        if rpl != self.c.cpl {
            return self.unimpl(i, "far return to another privilege level");
        }
        self.code_desc_for(sel)?;
        self.load_cs(sel, rpl)?;
        let imm = if i.op_count() == 1 { i.immediate16() as u64 } else { 0 };
        self.c.gpr[4] = sp.wrapping_add(2 * osz as u64 + imm);
        self.c.rip = rip;
        Ok(())
    }

    fn tss_read(&mut self, off: u64) -> Res<u64> {
        if off + 8 > self.c.tr.limit as u64 + 1 {
            return Err(Fault::Exc(VEC_TS, Some((self.c.tr.selector & !3) as u32)));
        }
        let a = self.c.tr.base.wrapping_add(off);
        self.read_as(a, 8, false)
    }

    /// Delivers an event through the 64-bit IDT (SDM Vol. 3A "Interrupt and Exception Handling in 64-bit
    /// Mode", "64-Bit Mode Stack Frame", "Interrupt Stack Table"). `self.rip` is the return address pushed.
    pub fn deliver(&mut self, vector: u8, err: Option<u32>, kind: Event) -> Res<()> {
        if self.c.efer & EFER_LMA == 0 {
            return Err(Fault::Exit(VcpuExit::Unsupported(format!(
                "delivery of vector {vector} outside long mode (real/protected-mode IDT not implemented) at RIP {:#x}",
                self.c.cur_ip
            ))));
        }
        let ext = (kind == Event::External) as u32;
        let gate_err = Some(vector as u32 * 8 + 2 + ext);
        if vector as u64 * 16 + 15 > self.c.idt.limit as u64 {
            return Err(Fault::Exc(VEC_GP, gate_err));
        }
        let ga = self.c.idt.base.wrapping_add(vector as u64 * 16);
        let lo = self.read_as(ga, 8, false)?;
        let hi = self.read_as(ga.wrapping_add(8), 8, false)?;
        let ty = (lo >> 40) & 0xf;
        let dpl = ((lo >> 45) & 3) as u8;
        if ty != 0xe && ty != 0xf {
            return Err(Fault::Exc(VEC_GP, gate_err));
        }
        if kind == Event::Software && dpl < self.c.cpl {
            return Err(Fault::Exc(VEC_GP, gate_err));
        }
        if (lo >> 47) & 1 == 0 {
            return Err(Fault::Exc(VEC_NP, gate_err));
        }
        let sel = (lo >> 16) as u16;
        let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let ist = (lo >> 32) & 7;
        let cs = self.code_desc_for(sel)?;
        if !cs.l || cs.db {
            return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32 + ext)));
        }
        let new_cpl = if cs.type_ & 4 != 0 { self.c.cpl } else { cs.dpl };
        if new_cpl > self.c.cpl {
            return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32 + ext)));
        }
        if !cs.present {
            return Err(Fault::Exc(VEC_NP, Some((sel & !3) as u32 + ext)));
        }
        let old_rsp = self.c.gpr[4];
        let old_ss = self.c.seg[SEG_SS].selector as u64;
        let mut rsp = if ist != 0 {
            self.tss_read(0x24 + (ist - 1) * 8)?
        } else if new_cpl < self.c.cpl {
            self.tss_read(4 + new_cpl as u64 * 8)?
        } else {
            old_rsp
        };
        rsp &= !0xf;
        let user = new_cpl == 3;
        let mut frame = vec![old_ss, old_rsp, self.c.rflags, self.c.seg[SEG_CS].selector as u64, self.c.rip];
        if let Some(e) = err {
            frame.push(e as u64);
        }
        for v in frame {
            rsp = rsp.wrapping_sub(8);
            self.write_as(rsp, 8, v, user)?;
        }
        if new_cpl < self.c.cpl {
            self.c.seg[SEG_SS] = Segment { selector: new_cpl as u16, unusable: true, ..Default::default() };
        }
        self.load_cs(sel, new_cpl)?;
        self.c.gpr[4] = rsp;
        self.c.rflags &= !(TF | NT | RF | VM);
        if ty == 0xe {
            self.c.rflags &= !IF;
        }
        self.c.rip = target;
        self.c.end_block = true;
        Ok(())
    }

    fn iret(&mut self, i: &Instruction) -> Res<()> {
        if i.code() != Code::Iretq {
            return self.unimpl(i, "IRET with 16/32-bit operand size");
        }
        if self.c.rflags & NT != 0 {
            return gp0();
        }
        let sp = self.c.gpr[4];
        let mut v = [0u64; 5];
        for (k, x) in v.iter_mut().enumerate() {
            *x = self.read(sp.wrapping_add(k as u64 * 8), 8)?;
        }
        let [rip, cs, fl, rsp, ss] = v;
        let (cs, ss) = (cs as u16, ss as u16);
        let new_cpl = (cs & 3) as u8;
        if new_cpl < self.c.cpl {
            return Err(Fault::Exc(VEC_GP, Some((cs & !3) as u32)));
        }
        let seg = self.code_desc_for(cs)?;
        let conforming = seg.type_ & 4 != 0;
        if (!conforming && seg.dpl != new_cpl) || (conforming && seg.dpl > new_cpl) {
            return Err(Fault::Exc(VEC_GP, Some((cs & !3) as u32)));
        }
        if !seg.l && new_cpl != 3 {
            return self.unimpl(i, "IRETQ to a compatibility-mode kernel segment");
        }
        // RFLAGS with the privilege of the CPL before the return.
        self.write_rflags(fl, 8);
        self.c.rflags &= !RF;
        let old_cpl = self.c.cpl;
        self.load_cs(cs, new_cpl)?;
        if new_cpl != old_cpl || ss & !3 != 0 {
            if let Err(e) = self.load_seg(SEG_SS, ss) {
                self.c.cpl = old_cpl;
                return Err(e);
            }
        } else {
            self.c.seg[SEG_SS] = Segment { selector: ss, unusable: true, ..Default::default() };
        }
        if new_cpl > old_cpl {
            // Data segments the new CPL may not use become null (SDM Vol. 2A "IRET", RETURN-TO-OUTER-PRIVILEGE).
            for s in [SEG_ES, SEG_DS, SEG_FS, SEG_GS] {
                let d = self.c.seg[s];
                let code_conf = d.type_ & 0xc == 0xc;
                if !d.unusable && d.dpl < new_cpl && !code_conf {
                    let base = d.base;
                    self.c.seg[s] = Segment { selector: 0, unusable: true, ..Default::default() };
                    if s >= SEG_FS {
                        self.c.seg[s].base = base;
                    }
                }
            }
        }
        self.c.gpr[4] = rsp;
        self.c.rip = rip;
        self.c.end_block = true;
        Ok(())
    }

    pub fn io_allowed(&mut self, port: u16, size: usize) -> Res<()> {
        let iopl = ((self.c.rflags & IOPL) >> 12) as u8;
        if self.c.cpl <= iopl {
            return Ok(());
        }
        // I/O permission bitmap in the TSS (SDM Vol. 1 "I/O Permission Bit Map").
        let base = self.tss_read(0x66).map(|v| v & 0xffff)?;
        let off = base + port as u64 / 8;
        if off + 1 > self.c.tr.limit as u64 {
            return gp0();
        }
        let bits = self.read_as(self.c.tr.base.wrapping_add(off), 2, false)?;
        let m = ((1u64 << size) - 1) << (port % 8);
        if bits & m != 0 {
            return gp0();
        }
        Ok(())
    }

    pub(crate) fn mov_special(&mut self, i: &Instruction) -> Res<()> {
        let (r0, r1) = (i.op0_register(), i.op1_register());
        if i.op_kind(0) == OpKind::Register && r0.is_segment_register() {
            let v = self.rd(i, 1, 2)? as u16;
            let s = r0 as usize - Register::ES as usize;
            if s == SEG_CS {
                return ud();
            }
            self.load_seg(s, v)?;
            if s == SEG_SS {
                self.c.shadow = true;
                self.c.end_block = true;
            }
            return Ok(());
        }
        if i.op_kind(1) == OpKind::Register && r1.is_segment_register() {
            let s = r1 as usize - Register::ES as usize;
            let v = self.c.seg[s].selector as u64;
            // To a register the selector is zero-extended to the operand size; to memory 16 bits are stored.
            return if i.op_kind(0) == OpKind::Register {
                {
                    self.set_reg(r0, v);
                    Ok(())
                }
            } else {
                self.wr(i, 0, 2, v)
            };
        }
        if r0.is_cr() || r1.is_cr() {
            self.cpl0()?;
            if r0.is_cr() {
                let v = self.get_reg(r1);
                return self.write_cr(r0.number(), v, i);
            }
            let v = match r1.number() {
                0 => self.c.cr0,
                2 => self.c.cr2,
                3 => self.c.cr3,
                4 => self.c.cr4,
                8 => self.c.cr8,
                _ => return ud(),
            };
            self.set_reg(r0, v);
            return Ok(());
        }
        if r0.is_dr() || r1.is_dr() {
            // DR8-DR15 (REX.R) do not exist.
            if (r0.is_dr() && r0.number() > 7) || (r1.is_dr() && r1.number() > 7) {
                return ud();
            }
            self.cpl0()?;
            if r0.is_dr() {
                let v = self.get_reg(r1);
                self.c.dr[r0.number()] = v;
                if r0.number() == 7 && v & 0xff != 0 {
                    self.log_once(
                        0xd7,
                        format!(
                            "hardware breakpoints enabled (DR7={v:#x}) but not implemented, at RIP {:#x}",
                            self.c.cur_ip
                        ),
                    );
                }
            } else {
                let v = self.c.dr[r1.number()];
                self.set_reg(r0, v);
            }
            return Ok(());
        }
        self.unimpl(i, "MOV with special register")
    }

    pub fn write_cr(&mut self, n: usize, v: u64, i: &Instruction) -> Res<()> {
        self.c.end_block = true;
        match n {
            0 => {
                if v >> 32 != 0 || (v & CR0_PG != 0 && v & CR0_PE == 0) || (v & (1 << 29) != 0 && v & (1 << 30) == 0) {
                    return gp0();
                }
                let old = self.c.cr0;
                if v & CR0_PG != 0 && old & CR0_PG == 0 && self.c.efer & EFER_LME != 0 {
                    if self.c.cr4 & CR4_PAE == 0 {
                        return gp0();
                    }
                    self.c.efer |= EFER_LMA;
                }
                if v & CR0_PG == 0 && self.c.efer & EFER_LMA != 0 {
                    if self.c.long64() {
                        return gp0();
                    }
                    self.c.efer &= !EFER_LMA;
                }
                self.c.cr0 = v | 0x10;
                if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
                    self.c.flush_tlb(false);
                }
            }
            2 => self.c.cr2 = v,
            3 => {
                if v & !((1u64 << PHYS_BITS) - 1) & !(1 << 63) != 0 {
                    return gp0();
                }
                self.c.cr3 = v & !(1 << 63);
                // SDM Vol. 3A "Global Pages": a CR3 load keeps global translations.
                self.c.flush_tlb(true);
            }
            4 => {
                // Bits we support: VME..PCE minus what we don't advertise, OSFXSR, OSXMMEXCPT.
                let allowed = (1 << 1)
                    | (1 << 2)
                    | (1 << 3)
                    | (1 << 4)
                    | (1 << 5)
                    | (1 << 6)
                    | (1 << 7)
                    | (1 << 8)
                    | (1 << 9)
                    | (1 << 10);
                if v & !allowed != 0 {
                    self.log_once(0xc4, format!("CR4 write {v:#x} sets unsupported bits, at RIP {:#x}", self.c.cur_ip));
                    return gp0();
                }
                if self.c.efer & EFER_LMA != 0 && v & CR4_PAE == 0 {
                    return gp0();
                }
                let old = self.c.cr4;
                self.c.cr4 = v;
                if (old ^ v) & (CR4_PGE | CR4_PAE) != 0 {
                    self.c.flush_tlb(false);
                }
            }
            8 => self.c.cr8 = v & 0xf,
            _ => return self.unimpl(i, "MOV to an undefined control register"),
        }
        Ok(())
    }

    pub fn log_once(&mut self, key: u64, msg: String) {
        if self.c.logged.insert(key) {
            log::warn!("{msg}");
        }
    }

    pub fn rdmsr(&mut self, idx: u32) -> Res<u64> {
        if let Some(v) = self.c.hooks.as_ref().and_then(|h| h.rdmsr(idx)) {
            return Ok(v);
        }
        let m = &self.c.msr;
        Ok(match idx {
            MSR_TSC => (self.clock_tsc() as i64).wrapping_add(m.tsc_offset) as u64,
            MSR_APIC_BASE => m.apic_base,
            MSR_EFER => self.c.efer,
            0xc000_0081 => m.star,
            0xc000_0082 => m.lstar,
            0xc000_0083 => m.cstar,
            0xc000_0084 => m.sfmask,
            MSR_FS_BASE => self.c.seg[SEG_FS].base,
            MSR_GS_BASE => self.c.seg[SEG_GS].base,
            MSR_KERNEL_GS_BASE => m.kernel_gs_base,
            0x174 => m.sysenter_cs,
            0x175 => m.sysenter_esp,
            0x176 => m.sysenter_eip,
            0x277 => m.pat,
            0xc000_0103 => m.tsc_aux,
            _ => {
                if let Some(v) = m.misc.get(&idx) {
                    return Ok(*v);
                }
                let rip = self.c.cur_ip;
                self.log_once(
                    0x1_0000_0000 | idx as u64,
                    format!("unknown MSR {idx:#x} read at RIP {rip:#x}: returning 0"),
                );
                0
            }
        })
    }

    pub fn wrmsr(&mut self, idx: u32, v: u64) -> Res<()> {
        let canon = |v: u64| ((v as i64) << 16 >> 16) as u64 == v;
        match self.c.hooks.as_ref().and_then(|h| h.wrmsr(idx, v)) {
            Some(true) => return Ok(()),
            Some(false) => return gp0(),
            None => {}
        }
        match idx {
            MSR_TSC => {
                let now = self.clock_tsc() as i64;
                self.c.msr.tsc_offset = (v as i64).wrapping_sub(now);
            }
            MSR_APIC_BASE => self.c.msr.apic_base = v,
            MSR_EFER => {
                // SCE, LME, NXE are writable; LMA follows CR0.PG (SDM Vol. 3A "IA32_EFER").
                if v & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return gp0();
                }
                let lma = self.c.efer & EFER_LMA;
                if self.c.cr0 & CR0_PG != 0 && (v ^ self.c.efer) & EFER_LME != 0 {
                    return gp0();
                }
                if (self.c.efer ^ v) & EFER_NXE != 0 {
                    self.c.flush_tlb(false);
                }
                self.c.efer = (v & !EFER_LMA) | lma;
            }
            0xc000_0081 => self.c.msr.star = v,
            0xc000_0082 | 0xc000_0083 | MSR_FS_BASE | MSR_GS_BASE | MSR_KERNEL_GS_BASE if !canon(v) => return gp0(),
            0xc000_0082 => self.c.msr.lstar = v,
            0xc000_0083 => self.c.msr.cstar = v,
            0xc000_0084 => self.c.msr.sfmask = v & 0xffff_ffff,
            MSR_FS_BASE => self.c.seg[SEG_FS].base = v,
            MSR_GS_BASE => self.c.seg[SEG_GS].base = v,
            MSR_KERNEL_GS_BASE => self.c.msr.kernel_gs_base = v,
            0x174 => self.c.msr.sysenter_cs = v,
            0x175 => self.c.msr.sysenter_esp = v,
            0x176 => self.c.msr.sysenter_eip = v,
            0x277 => self.c.msr.pat = v,
            0xc000_0103 => self.c.msr.tsc_aux = v & 0xffff_ffff,
            _ => {
                let rip = self.c.cur_ip;
                self.log_once(
                    0x2_0000_0000 | idx as u64,
                    format!("unknown MSR {idx:#x} write of {v:#x} at RIP {rip:#x}: ignored"),
                );
            }
        }
        self.c.end_block = true;
        Ok(())
    }

    pub fn clock_tsc(&self) -> u64 {
        crate::clock_tsc(self.c)
    }

    pub fn step_system(&mut self, i: &Instruction) -> Res<()> {
        match i.mnemonic() {
            M::Cli | M::Sti => {
                let iopl = ((self.c.rflags & IOPL) >> 12) as u8;
                if self.c.cpl > iopl {
                    return gp0();
                }
                if i.mnemonic() == M::Cli {
                    self.c.rflags &= !IF;
                } else if self.c.rflags & IF == 0 {
                    self.c.rflags |= IF;
                    // SDM Vol. 2B "STI": interrupts are recognised after the next instruction.
                    self.c.shadow = true;
                    self.c.end_block = true;
                }
                Ok(())
            }
            M::Hlt => {
                self.cpl0()?;
                self.c.halted = true;
                self.c.end_block = true;
                Ok(())
            }
            M::In | M::Out => {
                let (port, sz) = if i.mnemonic() == M::In {
                    let sz = gpr_info(i.op0_register()).map_or(1, |g| g.1);
                    let p = if i.op_kind(1) == OpKind::Register { self.c.gpr[2] as u16 } else { i.immediate8() as u16 };
                    (p, sz)
                } else {
                    let sz = gpr_info(i.op1_register()).map_or(1, |g| g.1);
                    let p = if i.op_kind(0) == OpKind::Register { self.c.gpr[2] as u16 } else { i.immediate8() as u16 };
                    (p, sz)
                };
                self.io_allowed(port, sz)?;
                if i.mnemonic() == M::In {
                    let mut b = [0u8; 4];
                    self.io.pio_read(port, &mut b[..sz]);
                    self.set_gpr_sized(0, sz, u32::from_le_bytes(b) as u64);
                } else {
                    let v = (self.c.gpr[0] as u32).to_le_bytes();
                    self.io.pio_write(port, &v[..sz]);
                }
                Ok(())
            }
            M::Int | M::Int3 | M::Int1 => {
                let v = match i.mnemonic() {
                    M::Int => i.immediate8(),
                    M::Int3 => VEC_BP,
                    _ => VEC_DB,
                };
                // Traps: the pushed RIP is the next instruction (already in `rip`).
                let kind = if i.mnemonic() == M::Int1 { Event::Exception } else { Event::Software };
                self.deliver(v, None, kind)
            }
            M::Ud0 | M::Ud1 | M::Ud2 | M::INVALID => ud(),
            M::Iretq | M::Iretd | M::Iret => self.iret(i),
            M::Retf => self.retf(i),
            M::Cpuid => {
                let (a, b, c, d) = crate::cpuid::cpuid(self.c, self.c.gpr[0] as u32, self.c.gpr[1] as u32);
                self.c.gpr[0] = a as u64;
                self.c.gpr[3] = b as u64;
                self.c.gpr[1] = c as u64;
                self.c.gpr[2] = d as u64;
                Ok(())
            }
            M::Rdtsc => {
                if self.c.cr4 & (1 << 2) != 0 && self.c.cpl != 0 {
                    return gp0();
                }
                let t = (self.clock_tsc() as i64).wrapping_add(self.c.msr.tsc_offset) as u64;
                self.c.gpr[0] = t & 0xffff_ffff;
                self.c.gpr[2] = t >> 32;
                Ok(())
            }
            M::Rdmsr => {
                self.cpl0()?;
                let v = self.rdmsr(self.c.gpr[1] as u32)?;
                self.c.gpr[0] = v & 0xffff_ffff;
                self.c.gpr[2] = v >> 32;
                Ok(())
            }
            M::Wrmsr => {
                self.cpl0()?;
                let v = (self.c.gpr[0] & 0xffff_ffff) | (self.c.gpr[2] << 32);
                self.wrmsr(self.c.gpr[1] as u32, v)
            }
            M::Swapgs => {
                if !self.c.long64() {
                    return ud();
                }
                self.cpl0()?;
                std::mem::swap(&mut self.c.seg[SEG_GS].base, &mut self.c.msr.kernel_gs_base);
                Ok(())
            }
            M::Syscall => self.syscall(),
            M::Sysretq | M::Sysret => self.sysret(i),
            M::Invlpg => {
                self.cpl0()?;
                let a = self.ea(i);
                self.c.invlpg(a);
                self.c.end_block = true;
                Ok(())
            }
            M::Wbinvd | M::Invd => self.cpl0(),
            M::Clts => {
                self.cpl0()?;
                self.c.cr0 &= !(1 << 3);
                Ok(())
            }
            M::Lgdt | M::Lidt => {
                self.cpl0()?;
                let a = self.ea(i);
                let limit = self.read(a, 2)? as u16;
                let base = if self.c.long64() {
                    self.read(a.wrapping_add(2), 8)?
                } else {
                    self.read(a.wrapping_add(2), 4)? & 0xff_ffff_ffff
                };
                let t = if i.mnemonic() == M::Lgdt { &mut self.c.gdt } else { &mut self.c.idt };
                t.base = base;
                t.limit = limit;
                Ok(())
            }
            M::Sgdt | M::Sidt => {
                let t = if i.mnemonic() == M::Sgdt { self.c.gdt } else { self.c.idt };
                let a = self.ea(i);
                self.write(a, 2, t.limit as u64)?;
                self.write(a.wrapping_add(2), 8, t.base)
            }
            M::Ltr | M::Lldt => {
                self.cpl0()?;
                let sel = self.rd(i, 0, 2)? as u16;
                let ltr = i.mnemonic() == M::Ltr;
                if sel & !3 == 0 {
                    if ltr {
                        return gp0();
                    }
                    self.c.ldt = Segment { unusable: true, ..Default::default() };
                    return Ok(());
                }
                if sel & 4 != 0 {
                    return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
                }
                let (addr, d) = self.read_desc(sel)?;
                let hi = if self.c.efer & EFER_LMA != 0 { self.read_as(addr.wrapping_add(8), 8, false)? } else { 0 };
                let mut seg = parse_desc(sel, d);
                seg.base |= (hi & 0xffff_ffff) << 32;
                let want = if ltr { 9 } else { 2 };
                if seg.s || seg.type_ != want {
                    return Err(Fault::Exc(VEC_GP, Some((sel & !3) as u32)));
                }
                if !seg.present {
                    return Err(Fault::Exc(VEC_NP, Some((sel & !3) as u32)));
                }
                if ltr {
                    seg.type_ = 0xb;
                    self.write_as(addr.wrapping_add(5), 1, (d >> 40) | 2, false)?;
                    self.c.tr = seg;
                } else {
                    self.c.ldt = seg;
                }
                Ok(())
            }
            M::Str | M::Sldt => {
                let v = if i.mnemonic() == M::Str { self.c.tr.selector } else { self.c.ldt.selector } as u64;
                let sz = if i.op_kind(0) == OpKind::Register { self.op_size(i, 0) } else { 2 };
                self.wr(i, 0, sz, v)
            }
            M::Smsw => {
                let sz = if i.op_kind(0) == OpKind::Register { self.op_size(i, 0) } else { 2 };
                let v = self.c.cr0;
                self.wr(i, 0, sz, v & crate::alu::mask(sz))
            }
            M::Lmsw => {
                self.cpl0()?;
                let v = self.rd(i, 0, 2)?;
                // LMSW changes PE (set only), MP, EM, TS.
                let new = (self.c.cr0 & !0xe) | (v & 0xf) | (self.c.cr0 & 1);
                self.write_cr(0, new, i)
            }
            M::Lsl | M::Lar => {
                let sel = self.rd(i, 1, 2)? as u16;
                let ok = if sel & !3 == 0 { None } else { self.read_desc(sel).ok() };
                match ok {
                    Some((_, d)) => {
                        let s = parse_desc(sel, d);
                        let v = if i.mnemonic() == M::Lsl { s.limit as u64 } else { d >> 32 & 0x00ff_ff00 };
                        let sz = self.op_size(i, 0);
                        self.set_reg(i.op0_register(), v & crate::alu::mask(sz));
                        self.c.rflags |= ZF;
                    }
                    None => self.c.rflags &= !ZF,
                }
                Ok(())
            }
            M::Verr | M::Verw => {
                // Only the flag result: ZF=1 if the segment is accessible for reading/writing.
                let sel = self.rd(i, 0, 2)? as u16;
                let ok = sel & !3 != 0
                    && self.read_desc(sel).is_ok_and(|(_, d)| {
                        let s = parse_desc(sel, d);
                        s.s && s.dpl >= self.c.cpl.max((sel & 3) as u8)
                            && if i.mnemonic() == M::Verw { s.type_ & 0xa == 2 } else { s.type_ & 0xa != 8 }
                    });
                if ok {
                    self.c.rflags |= ZF
                } else {
                    self.c.rflags &= !ZF
                }
                Ok(())
            }
            _ => self.step_fpu(i),
        }
    }

    fn syscall(&mut self) -> Res<()> {
        // SDM Vol. 2B "SYSCALL" / AMD APM Vol. 3 "SYSCALL".
        if self.c.efer & EFER_SCE == 0 || !self.c.long64() {
            return ud();
        }
        let star = self.c.msr.star;
        let cs = ((star >> 32) & 0xfffc) as u16;
        self.c.gpr[1] = self.c.rip;
        self.c.gpr[11] = self.c.rflags & !RF;
        self.c.rflags &= !(self.c.msr.sfmask | RF);
        self.c.rflags |= 2;
        self.c.seg[SEG_CS] = flat_seg(cs, 0xb, 0, true);
        self.c.seg[SEG_SS] = flat_seg(cs + 8, 3, 0, false);
        self.c.cpl = 0;
        self.c.rip = self.c.msr.lstar;
        self.c.end_block = true;
        Ok(())
    }

    fn sysret(&mut self, i: &Instruction) -> Res<()> {
        if self.c.efer & EFER_SCE == 0 || !self.c.long64() {
            return ud();
        }
        self.cpl0()?;
        let base = ((self.c.msr.star >> 48) & 0xffff) as u16;
        if i.code() == Code::Sysretq {
            let rip = self.c.gpr[1];
            if ((rip as i64) << 16 >> 16) as u64 != rip {
                return gp0();
            }
            self.c.seg[SEG_CS] = flat_seg((base + 16) | 3, 0xb, 3, true);
            self.c.rip = rip;
        } else {
            self.c.seg[SEG_CS] = flat_seg(base | 3, 0xb, 3, false);
            self.c.seg[SEG_CS].db = true;
            self.c.rip = self.c.gpr[1] & 0xffff_ffff;
        }
        // SS.selector = STAR[63:48]+8 with RPL 3; AMD keeps the cached SS attributes (X86_BUG_SYSRET_SS_ATTRS),
        // which Linux works around; a flat writable DPL3 descriptor is what the GDT holds anyway.
        self.c.seg[SEG_SS] = flat_seg((base + 8) | 3, 3, 3, false);
        self.c.rflags = (self.c.gpr[11] & 0x3c_7fd7) | 2;
        self.c.cpl = 3;
        self.c.end_block = true;
        Ok(())
    }
}

pub(crate) fn flat_seg(selector: u16, type_: u8, dpl: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}
