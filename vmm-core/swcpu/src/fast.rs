//! Pre-decoded fast paths: the most frequent instruction forms (GPR moves, loads and stores, register ALU
//! operations, INC/DEC, Jcc, PUSH/POP/CALL/RET in 64-bit code) get an [`Op`] chosen once when the block is
//! decoded, so executing them skips the generic `Exec::step` match on iced's mnemonic and operand kinds.
//!
//! Only 32- and 64-bit general-purpose register operands qualify (no AH..BH merging, no 8/16-bit partial
//! writes), and nothing with a LOCK prefix; everything else is `Op::Generic` and runs through `step`. The
//! semantics are those of the corresponding arms of `step` (checked by the differential test, which runs
//! through the same loop).

use iced_x86::{Code, Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::{self, cond, mask, sext};
use crate::cpu::{Exec, Res, AF, ARITH, CF, OF, SEG_FS, SEG_GS, SEG_SS, ZF};
use crate::exec::gpr_info;

/// ALU operation of `AluRR`/`AluRI`.
const ADD: u8 = 0;
const SUB: u8 = 1;
const AND: u8 = 2;
const OR: u8 = 3;
const XOR: u8 = 4;
const CMP: u8 = 5;
const TEST: u8 = 6;
const ADC: u8 = 7;
const SBB: u8 = 8;

/// A pre-decoded instruction form. Register numbers are GPR indices (0 = RAX .. 15 = R15); `sz` is 4 or 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    Generic,
    MovRR {
        d: u8,
        s: u8,
        sz: u8,
    },
    MovRI {
        d: u8,
        sz: u8,
    },
    /// Load: register <- memory operand.
    MovRM {
        d: u8,
        sz: u8,
        m: Mem,
    },
    /// Store: memory operand <- register.
    MovMR {
        s: u8,
        sz: u8,
        m: Mem,
    },
    /// Memory <- immediate; `sz` is the memory operand size (1, 2, 4 or 8).
    MovMI {
        sz: u8,
        m: Mem,
    },
    /// Register 32/64 <- memory of `ssz` bytes, zero- or sign-extended.
    MovxRM {
        d: u8,
        sz: u8,
        ssz: u8,
        signed: bool,
        m: Mem,
    },
    Lea {
        d: u8,
        sz: u8,
        m: Mem,
    },
    /// Register op memory (register destination).
    AluRM {
        op: u8,
        d: u8,
        sz: u8,
        m: Mem,
    },
    /// CMP/TEST memory, immediate (no write); `sz` is the memory operand size.
    CmpMI {
        op: u8,
        sz: u8,
        m: Mem,
    },
    /// CMP/TEST memory, register (no write).
    CmpMR {
        op: u8,
        s: u8,
        sz: u8,
        m: Mem,
    },
    JmpRel,
    /// Read-modify-write of memory with an immediate / a register source (ADD, SUB, AND, OR, XOR, ADC, SBB).
    RmwMI {
        op: u8,
        sz: u8,
        m: Mem,
    },
    RmwMR {
        op: u8,
        s: u8,
        sz: u8,
        m: Mem,
    },
    IncDecM {
        sz: u8,
        dec: bool,
        m: Mem,
    },
    /// NOP, PAUSE, fences, ENDBR, prefetches (no architectural effect here).
    Nop,
    /// Register 32/64 <- register of `ssz` bytes (`high`: AH..BH), zero- or sign-extended.
    MovxRR {
        d: u8,
        s: u8,
        sz: u8,
        ssz: u8,
        high: bool,
        signed: bool,
    },
    /// IMUL r, r/m (`three`: r, r/m, imm) with register operands.
    ImulRR {
        d: u8,
        s: u8,
        sz: u8,
        three: bool,
        /// The flags are read before being overwritten (see `drop_dead_flags`); false skips computing them.
        f: bool,
    },
    /// Shift/rotate group on a register by an immediate or CL; `op` as in `alu::shift`.
    ShiftR {
        op: u8,
        d: u8,
        sz: u8,
        f: bool,
    },
    /// SETcc on AL..BL/SPL..R15L.
    SetccR {
        cc: u8,
        d: u8,
    },
    CmovRR {
        cc: u8,
        d: u8,
        s: u8,
        sz: u8,
    },
    AluRR {
        op: u8,
        d: u8,
        s: u8,
        sz: u8,
        f: bool,
    },
    AluRI {
        op: u8,
        d: u8,
        sz: u8,
        f: bool,
    },
    IncDec {
        d: u8,
        sz: u8,
        dec: bool,
    },
    Jcc {
        cc: u8,
    },
    /// 64-bit mode only (8-byte stack slots, SS base ignored).
    Push64 {
        r: u8,
    },
    Pop64 {
        r: u8,
    },
    CallRel64,
    Ret64,
}

/// A memory operand's address, pre-decoded for 64-bit code: `disp + base + (index << shift)` (iced's
/// `memory_displacement64` already holds the absolute target of RIP-relative operands), truncated to 32 bits
/// with an address-size prefix, plus the FS or GS base. Anything else (other modes, EIP-relative) is `SLOW` and
/// goes through `Exec::ea`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mem {
    /// GPR index, or `NO_REG`.
    base: u8,
    index: u8,
    /// Scale shift (bits 0-1) and `MF_*` flags.
    fl: u8,
}
const NO_REG: u8 = 16;
const MF_A32: u8 = 4;
const MF_FS: u8 = 8;
const MF_GS: u8 = 16;
const MF_SLOW: u8 = 32;

fn mem_of(i: &Instruction, bits: u32) -> Mem {
    let slow = Mem { base: NO_REG, index: NO_REG, fl: MF_SLOW };
    if bits != 64 {
        return slow;
    }
    let mut fl = 0;
    let mut reg = |r: Register| match r {
        Register::None | Register::RIP => Some(NO_REG),
        r => match gpr_info(r) {
            Some((idx, 8, false)) => Some(idx as u8),
            Some((idx, 4, false)) => {
                fl |= MF_A32;
                Some(idx as u8)
            }
            _ => None,
        },
    };
    let (Some(base), Some(index)) = (reg(i.memory_base()), reg(i.memory_index())) else { return slow };
    fl |= match i.memory_index_scale() {
        1 => 0,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    fl |= match i.memory_segment() {
        Register::FS => MF_FS,
        Register::GS => MF_GS,
        Register::ES | Register::CS | Register::SS | Register::DS => 0,
        _ => return slow,
    };
    Mem { base, index, fl }
}

/// A 32/64-bit GPR operand: (index, size).
fn reg32_64(i: &Instruction, n: u32) -> Option<(u8, u8)> {
    if i.op_kind(n) != OpKind::Register {
        return None;
    }
    match gpr_info(i.op_register(n)) {
        Some((idx, sz @ (4 | 8), false)) => Some((idx as u8, sz as u8)),
        _ => None,
    }
}

/// The memory operand's size if it is 1, 2, 4 or 8 bytes.
fn mem_sz(i: &Instruction) -> Option<u8> {
    match i.memory_size().size() {
        sz @ (1 | 2 | 4 | 8) => Some(sz as u8),
        _ => None,
    }
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// Chooses the fast form of `i` (decoded with `bits`), or `Op::Generic`.
pub(crate) fn classify(i: &Instruction, bits: u32) -> Op {
    if i.has_lock_prefix() || i.is_invalid() {
        return Op::Generic;
    }
    let long = bits == 64;
    let m = if i.op_count() > 0 && (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
        mem_of(i, bits)
    } else {
        Mem { base: NO_REG, index: NO_REG, fl: MF_SLOW }
    };
    match i.mnemonic() {
        M::Mov if i.op_count() == 2 => {
            let (k0, k1) = (i.op_kind(0), i.op_kind(1));
            match (reg32_64(i, 0), reg32_64(i, 1)) {
                (Some((d, sz)), Some((s, sz1))) if sz == sz1 => Op::MovRR { d, s, sz },
                (Some((d, sz)), None) if is_imm(k1) => Op::MovRI { d, sz },
                (Some((d, sz)), None) if k1 == OpKind::Memory && i.memory_size().size() == sz as usize => {
                    Op::MovRM { d, sz, m }
                }
                (None, Some((s, sz))) if k0 == OpKind::Memory && i.memory_size().size() == sz as usize => {
                    Op::MovMR { s, sz, m }
                }
                (None, None) if k0 == OpKind::Memory && is_imm(k1) && mem_sz(i).is_some() => {
                    Op::MovMI { sz: mem_sz(i).unwrap_or(8), m }
                }
                _ => Op::Generic,
            }
        }
        mn @ (M::Movzx | M::Movsx | M::Movsxd) if i.op_kind(1) == OpKind::Memory => match (reg32_64(i, 0), mem_sz(i)) {
            (Some((d, sz)), Some(ssz)) if ssz < sz => Op::MovxRM { d, sz, ssz, signed: mn != M::Movzx, m },
            _ => Op::Generic,
        },
        M::Nop
        | M::Endbr64
        | M::Endbr32
        | M::Pause
        | M::Lfence
        | M::Mfence
        | M::Sfence
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw => Op::Nop,
        m @ (M::Movzx | M::Movsx | M::Movsxd) if i.op_kind(1) == OpKind::Register => {
            match (reg32_64(i, 0), gpr_info(i.op1_register())) {
                (Some((d, sz)), Some((s, ssz, high))) if ssz < sz as usize => {
                    Op::MovxRR { d, s: s as u8, sz, ssz: ssz as u8, high, signed: m != M::Movzx }
                }
                _ => Op::Generic,
            }
        }
        M::Imul if i.op_count() >= 2 => {
            let three = i.op_count() == 3;
            match (reg32_64(i, 0), reg32_64(i, 1)) {
                (Some((d, sz)), Some((s, sz1))) if sz == sz1 && (!three || is_imm(i.op_kind(2))) => {
                    Op::ImulRR { d, s, sz, three, f: true }
                }
                _ => Op::Generic,
            }
        }
        m @ (M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar) => {
            let op = match m {
                M::Rol => 0,
                M::Ror => 1,
                M::Rcl => 2,
                M::Rcr => 3,
                M::Shl => 4,
                M::Shr => 5,
                M::Sal => 6,
                _ => 7,
            };
            let count_ok = i.op_count() == 1
                || is_imm(i.op_kind(1))
                || (i.op_kind(1) == OpKind::Register && i.op1_register() == iced_x86::Register::CL);
            match reg32_64(i, 0) {
                Some((d, sz)) if count_ok => Op::ShiftR { op, d, sz, f: true },
                _ => Op::Generic,
            }
        }
        M::Sete
        | M::Setne
        | M::Seto
        | M::Setno
        | M::Setb
        | M::Setae
        | M::Setbe
        | M::Seta
        | M::Sets
        | M::Setns
        | M::Setp
        | M::Setnp
        | M::Setl
        | M::Setge
        | M::Setle
        | M::Setg
            if i.op_kind(0) == OpKind::Register =>
        {
            match gpr_info(i.op0_register()) {
                Some((d, 1, false)) => Op::SetccR { cc: (i.condition_code() as u8).wrapping_sub(1), d: d as u8 },
                _ => Op::Generic,
            }
        }
        M::Cmovo
        | M::Cmovno
        | M::Cmovb
        | M::Cmovae
        | M::Cmove
        | M::Cmovne
        | M::Cmovbe
        | M::Cmova
        | M::Cmovs
        | M::Cmovns
        | M::Cmovp
        | M::Cmovnp
        | M::Cmovl
        | M::Cmovge
        | M::Cmovle
        | M::Cmovg => match (reg32_64(i, 0), reg32_64(i, 1)) {
            (Some((d, sz)), Some((s, sz1))) if sz == sz1 => {
                Op::CmovRR { cc: (i.condition_code() as u8).wrapping_sub(1), d, s, sz }
            }
            _ => Op::Generic,
        },
        M::Lea => match reg32_64(i, 0) {
            Some((d, sz)) => Op::Lea { d, sz, m },
            None => Op::Generic,
        },
        M::Jmp if matches!(i.op_kind(0), OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64) => {
            Op::JmpRel
        }
        mn @ (M::Add | M::Sub | M::And | M::Or | M::Xor | M::Cmp | M::Test | M::Adc | M::Sbb) if i.op_count() == 2 => {
            let op = match mn {
                M::Add => ADD,
                M::Adc => ADC,
                M::Sbb => SBB,
                M::Sub => SUB,
                M::And => AND,
                M::Or => OR,
                M::Xor => XOR,
                M::Cmp => CMP,
                _ => TEST,
            };
            match (reg32_64(i, 0), reg32_64(i, 1)) {
                (Some((d, sz)), Some((s, sz1))) if sz == sz1 => Op::AluRR { op, d, s, sz, f: true },
                (Some((d, sz)), None) if is_imm(i.op_kind(1)) => Op::AluRI { op, d, sz, f: true },
                (Some((d, sz)), None) if i.op_kind(1) == OpKind::Memory && mem_sz(i) == Some(sz) => {
                    Op::AluRM { op, d, sz, m }
                }
                (None, None) if (op == CMP || op == TEST) && i.op_kind(0) == OpKind::Memory && is_imm(i.op_kind(1)) => {
                    mem_sz(i).map_or(Op::Generic, |sz| Op::CmpMI { op, sz, m })
                }
                (None, Some((s, sz)))
                    if (op == CMP || op == TEST) && i.op_kind(0) == OpKind::Memory && mem_sz(i) == Some(sz) =>
                {
                    Op::CmpMR { op, s, sz, m }
                }
                (None, None) if i.op_kind(0) == OpKind::Memory && is_imm(i.op_kind(1)) => {
                    mem_sz(i).map_or(Op::Generic, |sz| Op::RmwMI { op, sz, m })
                }
                (None, Some((s, sz))) if i.op_kind(0) == OpKind::Memory && mem_sz(i) == Some(sz) => {
                    Op::RmwMR { op, s, sz, m }
                }
                _ => Op::Generic,
            }
        }
        mn @ (M::Inc | M::Dec) => match reg32_64(i, 0) {
            Some((d, sz)) => Op::IncDec { d, sz, dec: mn == M::Dec },
            None if i.op_kind(0) == OpKind::Memory => {
                mem_sz(i).map_or(Op::Generic, |sz| Op::IncDecM { sz, dec: mn == M::Dec, m })
            }
            None => Op::Generic,
        },
        M::Jo
        | M::Jno
        | M::Jb
        | M::Jae
        | M::Je
        | M::Jne
        | M::Jbe
        | M::Ja
        | M::Js
        | M::Jns
        | M::Jp
        | M::Jnp
        | M::Jl
        | M::Jge
        | M::Jle
        | M::Jg => Op::Jcc { cc: (i.condition_code() as u8).wrapping_sub(1) },
        _ if !long => Op::Generic,
        _ => match i.code() {
            Code::Push_r64 => reg32_64(i, 0).map_or(Op::Generic, |(r, _)| Op::Push64 { r }),
            Code::Pop_r64 => reg32_64(i, 0).map_or(Op::Generic, |(r, _)| Op::Pop64 { r }),
            Code::Call_rel32_64 => Op::CallRel64,
            Code::Retnq => Op::Ret64,
            _ => Op::Generic,
        },
    }
}

/// How an op touches the arithmetic flags, for `drop_dead_flags`: (reads them, overwrites all six, may fault or
/// leave the block early). A fault delivers an exception whose frame holds RFLAGS as of the faulting
/// instruction, and an early block exit (a write to a code page) lets the next block read them, so both count as
/// reads.
fn flag_use(op: &Op, i: &Instruction) -> (bool, bool) {
    match *op {
        Op::MovRR { .. } | Op::MovRI { .. } | Op::Lea { .. } | Op::MovxRR { .. } | Op::Nop | Op::JmpRel => {
            (false, false)
        }
        Op::AluRR { op, .. } | Op::AluRI { op, .. } => (op == ADC || op == SBB, true),
        Op::ImulRR { .. } => (false, true),
        // Shifts by a nonzero immediate write all six flags; by CL (maybe 0) or rotates they keep some.
        Op::ShiftR { op: 4..=7, sz, .. } if i.op_count() == 2 && is_imm(i.op_kind(1)) => {
            (false, i.immediate(1) & if sz == 8 { 63 } else { 31 } != 0)
        }
        // Everything else reads flags, keeps some of them (INC/DEC keep CF), touches memory (may fault), or
        // is generic.
        _ => (true, false),
    }
}

/// Marks the flag results nobody can observe: within a block, an instruction's flags are dead when a later
/// instruction overwrites all six before any instruction reads them, may fault, or may end the block
/// (everything between runs on registers only, so nothing can interrupt it: interrupts are taken between
/// blocks). Their ops then skip computing flags. Flags are live at the end of the block. The run loop executes
/// a block's first instruction alone under an interrupt shadow, through the generic path, which always
/// computes flags.
pub(crate) fn drop_dead_flags(ops: &mut [Op], insns: &[Instruction]) {
    let mut live = true;
    for (op, i) in ops.iter_mut().zip(insns).rev() {
        let (reads, kills) = flag_use(op, i);
        if !live {
            match op {
                Op::AluRR { f, .. } | Op::AluRI { f, .. } | Op::ImulRR { f, .. } => *f = false,
                Op::ShiftR { f, .. } if kills => *f = false,
                _ => {}
            }
        }
        if reads {
            live = true;
        } else if kills {
            live = false;
        }
    }
}

impl Exec<'_> {
    #[inline(always)]
    fn put(&mut self, r: u8, sz: u8, v: u64) {
        // 32-bit writes zero the upper half (SDM Vol. 1 3.4.1.1).
        self.c.gpr[r as usize & 15] = if sz == 8 { v } else { v & 0xffff_ffff };
    }

    #[inline(always)]
    fn get(&self, r: u8, sz: u8) -> u64 {
        self.c.gpr[r as usize & 15] & mask(sz as usize)
    }

    /// (result, arithmetic flags) of `op` on `sz`-byte operands.
    #[inline(always)]
    fn calc(&self, op: u8, sz: u8, a: u64, b: u64) -> (u64, u64) {
        let s = sz as usize;
        let cin = self.c.rflags & CF;
        match op {
            ADD => alu::add(a, b, 0, s),
            ADC => alu::add(a, b, cin, s),
            SBB => alu::sub(a, b, cin, s),
            SUB | CMP => alu::sub(a, b, 0, s),
            AND | TEST => (a & b, alu::logic(a & b, s)),
            OR => (a | b, alu::logic(a | b, s)),
            _ => (a ^ b, alu::logic(a ^ b, s)),
        }
    }

    /// Read-modify-write of `sz` bytes of RAM at linear `a` when the TLB already grants the write (the common
    /// case); `None` sends the instruction to the generic path, which also handles faults, MMIO and code pages.
    #[inline(always)]
    fn rmw_fast(&mut self, a: u64, sz: u8, f: impl FnOnce(&Self, u64) -> (u64, u64)) -> Option<()> {
        let p = self.host_range(a, sz as usize, true)?;
        // SAFETY: `host_range` returned a pointer to `sz` bytes inside one guest RAM page that the TLB maps
        // writable for the current privilege (GuestRam contract: live for the CPU's lifetime); raw unaligned
        // accesses never form references into guest memory.
        let old = unsafe {
            match sz {
                1 => p.read() as u64,
                2 => (p as *const u16).read_unaligned() as u64,
                4 => (p as *const u32).read_unaligned() as u64,
                _ => (p as *const u64).read_unaligned(),
            }
        };
        let (r, fl) = f(self, old);
        // SAFETY: as above.
        unsafe {
            match sz {
                1 => p.write(r as u8),
                2 => (p as *mut u16).write_unaligned(r as u16),
                4 => (p as *mut u32).write_unaligned(r as u32),
                _ => (p as *mut u64).write_unaligned(r),
            }
        }
        self.c.rflags = (self.c.rflags & !ARITH) | fl;
        Some(())
    }

    #[inline(always)]
    fn alu(&mut self, op: u8, d: u8, sz: u8, a: u64, b: u64) {
        let (r, f) = self.calc(op, sz, a, b);
        if op != CMP && op != TEST {
            self.put(d, sz, r);
        }
        self.c.rflags = (self.c.rflags & !ARITH) | f;
    }

    /// Offset of a memory operand (what LEA computes) from its pre-decoded form.
    #[inline(always)]
    fn ea_off_m(&self, m: Mem, i: &Instruction) -> u64 {
        if m.fl & MF_SLOW != 0 {
            return self.ea_off(i);
        }
        let mut a = i.memory_displacement64();
        if m.base < NO_REG {
            a = a.wrapping_add(self.c.gpr[m.base as usize & 15]);
        }
        if m.index < NO_REG {
            a = a.wrapping_add(self.c.gpr[m.index as usize & 15] << (m.fl & 3));
        }
        if m.fl & MF_A32 != 0 {
            a &= 0xffff_ffff;
        }
        a
    }

    /// Linear address of a memory operand from its pre-decoded form (64-bit mode: only FS and GS have bases).
    #[inline(always)]
    fn ea_m(&self, m: Mem, i: &Instruction) -> u64 {
        if m.fl & MF_SLOW != 0 {
            return self.ea(i);
        }
        let a = self.ea_off_m(m, i);
        if m.fl & (MF_FS | MF_GS) == 0 {
            a
        } else if m.fl & MF_FS != 0 {
            a.wrapping_add(self.c.seg[SEG_FS].base)
        } else {
            a.wrapping_add(self.c.seg[SEG_GS].base)
        }
    }

    /// `alu` for an instruction whose flags nobody reads (`drop_dead_flags`): the result only.
    #[inline(always)]
    fn alu_nf(&mut self, op: u8, d: u8, sz: u8, a: u64, b: u64) {
        let r = match op {
            ADD => a.wrapping_add(b),
            SUB => a.wrapping_sub(b),
            AND => a & b,
            OR => a | b,
            XOR => a ^ b,
            CMP | TEST => return,
            _ => self.calc(op, sz, a, b).0,
        };
        self.put(d, sz, r);
    }

    /// Executes `i` through its pre-decoded form `op` (`Op::Generic` goes to `step`).
    #[inline(always)]
    pub fn step_op(&mut self, op: &Op, i: &Instruction) -> Res<()> {
        match *op {
            Op::Generic => self.step(i),
            Op::MovRR { d, s, sz } => {
                let v = self.c.gpr[s as usize & 15];
                self.put(d, sz, v);
                Ok(())
            }
            Op::MovRI { d, sz } => {
                self.put(d, sz, i.immediate(1));
                Ok(())
            }
            Op::MovRM { d, sz, m } => {
                let a = self.ea_m(m, i);
                let v = self.read(a, sz as usize)?;
                self.put(d, sz, v);
                Ok(())
            }
            Op::MovMR { s, sz, m } => {
                let a = self.ea_m(m, i);
                let v = self.c.gpr[s as usize & 15];
                self.write(a, sz as usize, v)
            }
            Op::MovMI { sz, m } => {
                let a = self.ea_m(m, i);
                self.write(a, sz as usize, i.immediate(1))
            }
            Op::MovxRM { d, sz, ssz, signed, m } => {
                let a = self.ea_m(m, i);
                let v = self.read(a, ssz as usize)?;
                let v = if signed { sext(v, ssz as usize) as u64 } else { v };
                self.put(d, sz, v);
                Ok(())
            }
            Op::Lea { d, sz, m } => {
                let a = self.ea_off_m(m, i);
                self.put(d, sz, a);
                Ok(())
            }
            Op::AluRM { op, d, sz, m } => {
                let a = self.ea_m(m, i);
                let b = self.read(a, sz as usize)?;
                let v = self.get(d, sz);
                self.alu(op, d, sz, v, b);
                Ok(())
            }
            Op::CmpMI { op, sz, m } => {
                let a = self.ea_m(m, i);
                let v = self.read(a, sz as usize)?;
                let b = i.immediate(1) & mask(sz as usize);
                self.alu(op, 0, sz, v, b);
                Ok(())
            }
            Op::CmpMR { op, s, sz, m } => {
                let a = self.ea_m(m, i);
                let v = self.read(a, sz as usize)?;
                let b = self.get(s, sz);
                self.alu(op, 0, sz, v, b);
                Ok(())
            }
            Op::Nop => Ok(()),
            Op::MovxRR { d, s, sz, ssz, high, signed } => {
                let g = self.c.gpr[s as usize & 15];
                let v = if high { (g >> 8) & 0xff } else { g & mask(ssz as usize) };
                let v = if signed { sext(v, ssz as usize) as u64 } else { v };
                self.put(d, sz, v);
                Ok(())
            }
            Op::ImulRR { d, s, sz, three, f } => {
                let z = sz as usize;
                let (a, b) = if three {
                    (self.get(s, sz), i.immediate(2) & mask(z))
                } else {
                    (self.get(d, sz), self.get(s, sz))
                };
                if !f {
                    // The low half of a product does not depend on signedness.
                    self.put(d, sz, a.wrapping_mul(b));
                    return Ok(());
                }
                let p = sext(a, z) as i128 * sext(b, z) as i128;
                let lo = p as u64 & mask(z);
                let ovf = sext(lo, z) as i128 != p;
                self.put(d, sz, lo);
                let f = alu::szp(lo, z) & !(ZF | AF) | if ovf { CF | OF } else { 0 };
                self.c.rflags = (self.c.rflags & !ARITH) | f;
                Ok(())
            }
            Op::ShiftR { op, d, sz, f } => {
                if !f {
                    // Only SHL/SAL/SHR/SAR by a nonzero immediate count lose their flags (`drop_dead_flags`).
                    let cnt = (i.immediate(1) as u32) & if sz == 8 { 63 } else { 31 };
                    let a = self.get(d, sz);
                    let r = match op {
                        4 | 6 => a << cnt,
                        5 => a >> cnt,
                        _ => (sext(a, sz as usize) >> cnt) as u64,
                    };
                    self.put(d, sz, r);
                    return Ok(());
                }
                let cnt = if i.op_count() < 2 {
                    1
                } else if i.op_kind(1) == OpKind::Register {
                    self.c.gpr[1] & 0xff
                } else {
                    i.immediate(1) & 0xff
                };
                let cnt = (cnt & if sz == 8 { 63 } else { 31 }) as u32;
                if cnt == 0 {
                    // Flags untouched; a 32-bit destination is still written (zero-extended).
                    let v = self.get(d, sz);
                    self.put(d, sz, v);
                    return Ok(());
                }
                let a = self.get(d, sz);
                let old = self.c.rflags & ARITH;
                let (r, f) = alu::shift(op, a, cnt, sz as usize, old);
                self.put(d, sz, r);
                self.c.rflags = (self.c.rflags & !ARITH) | f;
                Ok(())
            }
            Op::SetccR { cc, d } => {
                let v = cond(cc, self.c.rflags) as u64;
                let g = &mut self.c.gpr[d as usize & 15];
                *g = (*g & !0xff) | v;
                Ok(())
            }
            Op::CmovRR { cc, d, s, sz } => {
                // A 32-bit CMOV writes its destination (zero-extending) even when the condition is false.
                let v = if cond(cc, self.c.rflags) { self.c.gpr[s as usize & 15] } else { self.c.gpr[d as usize & 15] };
                self.put(d, sz, v);
                Ok(())
            }
            Op::RmwMI { op, sz, m } => {
                let a = self.ea_m(m, i);
                let b = i.immediate(1) & mask(sz as usize);
                match self.rmw_fast(a, sz, |ex, v| ex.calc(op, sz, v, b)) {
                    Some(()) => Ok(()),
                    None => self.step(i),
                }
            }
            Op::RmwMR { op, s, sz, m } => {
                let a = self.ea_m(m, i);
                let b = self.get(s, sz);
                match self.rmw_fast(a, sz, |ex, v| ex.calc(op, sz, v, b)) {
                    Some(()) => Ok(()),
                    None => self.step(i),
                }
            }
            Op::IncDecM { sz, dec, m } => {
                let a = self.ea_m(m, i);
                let cf = self.c.rflags & CF;
                let r = self.rmw_fast(a, sz, |_, v| {
                    let (r, f) = if dec { alu::sub(v, 1, 0, sz as usize) } else { alu::add(v, 1, 0, sz as usize) };
                    // INC/DEC leave CF alone.
                    (r, (f & !CF) | cf)
                });
                match r {
                    Some(()) => Ok(()),
                    None => self.step(i),
                }
            }
            Op::JmpRel => {
                self.c.rip = i.near_branch_target();
                Ok(())
            }
            Op::AluRR { op, d, s, sz, f } => {
                let (a, b) = (self.get(d, sz), self.get(s, sz));
                if f {
                    self.alu(op, d, sz, a, b);
                } else {
                    self.alu_nf(op, d, sz, a, b);
                }
                Ok(())
            }
            Op::AluRI { op, d, sz, f } => {
                let a = self.get(d, sz);
                let b = i.immediate(1) & mask(sz as usize);
                if f {
                    self.alu(op, d, sz, a, b);
                } else {
                    self.alu_nf(op, d, sz, a, b);
                }
                Ok(())
            }
            Op::IncDec { d, sz, dec } => {
                let a = self.get(d, sz);
                let (r, f) = if dec { alu::sub(a, 1, 0, sz as usize) } else { alu::add(a, 1, 0, sz as usize) };
                self.put(d, sz, r);
                // INC/DEC leave CF alone.
                self.c.rflags = (self.c.rflags & !(ARITH & !CF)) | (f & !CF);
                Ok(())
            }
            Op::Jcc { cc } => {
                if cond(cc, self.c.rflags) {
                    self.c.rip = i.near_branch_target();
                }
                Ok(())
            }
            Op::Push64 { r } => {
                let v = self.c.gpr[r as usize & 15];
                self.push(8, v)
            }
            Op::Pop64 { r } => {
                let sp = self.c.gpr[4];
                let v = self.read(sp.wrapping_add(self.seg_base(SEG_SS)), 8)?;
                self.c.gpr[4] = sp.wrapping_add(8);
                self.c.gpr[r as usize & 15] = v;
                Ok(())
            }
            Op::CallRel64 => {
                let ret = self.c.rip;
                self.push(8, ret)?;
                self.c.rip = i.near_branch_target();
                Ok(())
            }
            Op::Ret64 => {
                let t = self.pop(8)?;
                self.c.rip = t;
                Ok(())
            }
        }
    }
}
