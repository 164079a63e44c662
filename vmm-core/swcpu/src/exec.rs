//! The interpreter: one decoded iced-x86 `Instruction` at a time.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::{self, cond, mask, sext, sign};
use crate::cpu::*;

/// GPR index, size in bytes, and whether it is AH/CH/DH/BH, from iced's `Register` numbering
/// (AL..BL, AH..BH, SPL..R15L, AX..R15W, EAX..R15D, RAX..R15; checked by a unit test).
#[inline(always)]
pub(crate) fn gpr_info(r: Register) -> Option<(usize, usize, bool)> {
    let n = r as usize;
    match n {
        1..=4 => Some((n - 1, 1, false)),
        5..=8 => Some((n - 5, 1, true)),
        9..=20 => Some((n - 5, 1, false)),
        21..=36 => Some((n - 21, 2, false)),
        37..=52 => Some((n - 37, 4, false)),
        53..=68 => Some((n - 53, 8, false)),
        _ => None,
    }
}

#[inline(always)]
fn cc_of(i: &Instruction) -> u8 {
    (i.condition_code() as u8).wrapping_sub(1)
}

impl Exec<'_> {
    // ---- registers ----

    #[inline(always)]
    pub fn get_reg(&self, r: Register) -> u64 {
        match gpr_info(r) {
            Some((idx, 1, true)) => (self.c.gpr[idx] >> 8) & 0xff,
            Some((idx, sz, _)) => self.c.gpr[idx] & mask(sz),
            None => 0,
        }
    }

    /// Writes a GPR with x86-64 rules: 32-bit writes zero the upper half, 8/16-bit writes merge.
    #[inline(always)]
    pub fn set_reg(&mut self, r: Register, v: u64) {
        if let Some((idx, sz, high)) = gpr_info(r) {
            let g = &mut self.c.gpr[idx];
            *g = match (sz, high) {
                (1, true) => (*g & !0xff00) | ((v & 0xff) << 8),
                (1, false) => (*g & !0xff) | (v & 0xff),
                (2, _) => (*g & !0xffff) | (v & 0xffff),
                (4, _) => v & 0xffff_ffff,
                _ => v,
            };
        }
    }

    /// Writes `size` bytes of GPR `idx` (for implicit operands like RAX/RDX).
    #[inline]
    pub fn set_gpr_sized(&mut self, idx: usize, size: usize, v: u64) {
        let g = &mut self.c.gpr[idx];
        *g = match size {
            1 => (*g & !0xff) | (v & 0xff),
            2 => (*g & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    #[inline(always)]
    pub fn seg_base(&self, seg: usize) -> u64 {
        // Only 64-bit mode ignores the ES/CS/SS/DS bases; compatibility mode uses them.
        if seg < SEG_FS && self.c.long64() {
            0
        } else {
            self.c.seg[seg].base
        }
    }

    /// Offset part of a memory operand (what LEA computes).
    #[inline(always)]
    pub fn ea_off(&self, i: &Instruction) -> u64 {
        let mut a = i.memory_displacement64();
        let base = i.memory_base();
        let mut addr32 = false;
        if base != Register::None {
            if base == Register::RIP {
            } else if base == Register::EIP {
                addr32 = true;
            } else {
                if let Some((_, 4, _)) = gpr_info(base) {
                    addr32 = true;
                }
                a = a.wrapping_add(self.get_reg(base));
            }
        }
        let idx = i.memory_index();
        if idx != Register::None {
            if let Some((_, 4, _)) = gpr_info(idx) {
                addr32 = true;
            }
            a = a.wrapping_add(self.get_reg(idx).wrapping_mul(i.memory_index_scale() as u64));
        }
        if addr32 || (base == Register::None && idx == Register::None && i.memory_displ_size() == 4 && !self.c.long64())
        {
            a &= 0xffff_ffff;
        }
        a
    }

    #[inline(always)]
    pub fn ea(&self, i: &Instruction) -> u64 {
        let off = self.ea_off(i);
        let seg = i.memory_segment();
        let s = (seg as usize).wrapping_sub(Register::ES as usize);
        if s < 6 {
            off.wrapping_add(self.seg_base(s))
        } else {
            off
        }
    }

    /// Operand size of operand `n` in bytes.
    #[inline(always)]
    pub fn op_size(&self, i: &Instruction, n: u32) -> usize {
        match i.op_kind(n) {
            OpKind::Register => gpr_info(i.op_register(n)).map_or(8, |g| g.1),
            OpKind::Memory => i.memory_size().size(),
            _ => 8,
        }
    }

    #[inline(always)]
    pub fn rd(&mut self, i: &Instruction, n: u32, sz: usize) -> Res<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.get_reg(i.op_register(n))),
            OpKind::Memory => {
                let a = self.ea(i);
                self.read(a, sz)
            }
            _ => Ok(i.immediate(n) & mask(sz)),
        }
    }

    #[inline(always)]
    pub fn wr(&mut self, i: &Instruction, n: u32, sz: usize, v: u64) -> Res<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(i.op_register(n), v);
                Ok(())
            }
            _ => {
                let a = self.ea(i);
                self.write(a, sz, v)
            }
        }
    }

    /// Read-modify-write of operand 0. With a LOCK prefix (or for XCHG) on RAM the update is a host
    /// compare-and-swap loop, so it is atomic against other vCPU threads sharing guest RAM.
    #[inline]
    pub fn rmw(&mut self, i: &Instruction, sz: usize, mut f: impl FnMut(u64) -> u64) -> Res<u64> {
        if i.op_kind(0) == OpKind::Register {
            let r = i.op_register(0);
            let old = self.get_reg(r);
            let new = f(old);
            self.set_reg(r, new);
            return Ok(old);
        }
        let a = self.ea(i);
        if i.has_lock_prefix() || i.mnemonic() == M::Xchg {
            if let Some(p) = self.atomic_ptr(a, sz)? {
                return Ok(atomic_update(p, sz, &mut f));
            }
        }
        self.probe_write(a, sz)?;
        let old = self.read(a, sz)?;
        let new = f(old);
        self.write(a, sz, new)?;
        Ok(old)
    }

    /// Host pointer for an aligned, writable RAM location (the atomic path), after checking permissions.
    fn atomic_ptr(&mut self, la: u64, sz: usize) -> Res<Option<*mut u8>> {
        // Locked operations fault as writes even when the caller then falls back to a plain read + write.
        self.probe_write(la, sz)?;
        if la & (sz as u64 - 1) != 0 {
            return Ok(None);
        }
        let user = self.user();
        let gpa = self.la_to_gpa(la, Access::Write, user)?;
        if self.c.code_pages.contains(&(gpa & !0xfff)) {
            self.c.invalidate_code_page(gpa & !0xfff);
        }
        Ok(self.c.ram.host_ptr(gpa, sz as u64))
    }

    #[inline]
    fn set_arith(&mut self, f: u64) {
        self.c.rflags = (self.c.rflags & !ARITH) | f;
    }

    #[inline]
    pub fn push(&mut self, sz: usize, v: u64) -> Res<()> {
        let sp = self.c.gpr[4].wrapping_sub(sz as u64);
        let base = self.seg_base(SEG_SS);
        self.write(sp.wrapping_add(base), sz, v)?;
        self.c.gpr[4] = sp;
        Ok(())
    }

    #[inline]
    pub fn pop(&mut self, sz: usize) -> Res<u64> {
        let sp = self.c.gpr[4];
        let base = self.seg_base(SEG_SS);
        let v = self.read(sp.wrapping_add(base), sz)?;
        self.c.gpr[4] = sp.wrapping_add(sz as u64);
        Ok(v)
    }

    /// Executes one instruction. On entry `self.rip` already points past it; branches overwrite it.
    pub fn step(&mut self, i: &Instruction) -> Res<()> {
        match i.mnemonic() {
            M::Mov => {
                if i.op_kind(0) == OpKind::Register && gpr_info(i.op0_register()).is_none()
                    || i.op_kind(1) == OpKind::Register && gpr_info(i.op1_register()).is_none()
                {
                    return self.mov_special(i);
                }
                let sz = self.op_size(i, 0);
                let v = self.rd(i, 1, sz)?;
                self.wr(i, 0, sz, v)
            }
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor => {
                let sz = self.op_size(i, 0);
                let b = self.rd(i, 1, sz)?;
                let m = i.mnemonic();
                let cin = self.c.rflags & CF;
                let mut fl = 0;
                self.rmw(i, sz, |a| {
                    let (r, f) = match m {
                        M::Add => alu::add(a, b, 0, sz),
                        M::Adc => alu::add(a, b, cin, sz),
                        M::Sub => alu::sub(a, b, 0, sz),
                        M::Sbb => alu::sub(a, b, cin, sz),
                        M::And => (a & b, alu::logic(a & b, sz)),
                        M::Or => ((a | b) & mask(sz), alu::logic(a | b, sz)),
                        _ => ((a ^ b) & mask(sz), alu::logic(a ^ b, sz)),
                    };
                    fl = f;
                    r
                })?;
                self.set_arith(fl);
                Ok(())
            }
            M::Cmp => {
                let sz = self.op_size(i, 0);
                let a = self.rd(i, 0, sz)?;
                let b = self.rd(i, 1, sz)?;
                self.set_arith(alu::sub(a, b, 0, sz).1);
                Ok(())
            }
            M::Test => {
                let sz = self.op_size(i, 0);
                let a = self.rd(i, 0, sz)?;
                let b = self.rd(i, 1, sz)?;
                self.set_arith(alu::logic(a & b, sz));
                Ok(())
            }
            M::Inc | M::Dec | M::Neg | M::Not => {
                let sz = self.op_size(i, 0);
                let m = i.mnemonic();
                let mut fl = self.c.rflags & ARITH;
                self.rmw(i, sz, |a| match m {
                    M::Inc => {
                        let (r, f) = alu::add(a, 1, 0, sz);
                        fl = (f & !CF) | (fl & CF);
                        r
                    }
                    M::Dec => {
                        let (r, f) = alu::sub(a, 1, 0, sz);
                        fl = (f & !CF) | (fl & CF);
                        r
                    }
                    M::Neg => {
                        let (r, f) = alu::sub(0, a, 0, sz);
                        fl = f;
                        r
                    }
                    _ => !a & mask(sz),
                })?;
                self.set_arith(fl);
                Ok(())
            }
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                let sz = self.op_size(i, 0);
                let cnt = if i.op_count() < 2 { 1 } else { self.rd(i, 1, 1)? };
                let cnt = (cnt & if sz == 8 { 63 } else { 31 }) as u32;
                if cnt == 0 {
                    return self.zero_count(i, sz);
                }
                let op = match i.mnemonic() {
                    M::Rol => 0,
                    M::Ror => 1,
                    M::Rcl => 2,
                    M::Rcr => 3,
                    M::Shl => 4,
                    M::Shr => 5,
                    M::Sal => 6,
                    _ => 7,
                };
                let old = self.c.rflags & ARITH;
                let mut fl = old;
                self.rmw(i, sz, |a| {
                    let (r, f) = alu::shift(op, a, cnt, sz, old);
                    fl = f;
                    r
                })?;
                self.set_arith(fl);
                Ok(())
            }
            M::Shld | M::Shrd => {
                let sz = self.op_size(i, 0);
                let src = self.rd(i, 1, sz)?;
                let cnt = (self.rd(i, 2, 1)? & if sz == 8 { 63 } else { 31 }) as u32;
                if cnt == 0 {
                    return self.zero_count(i, sz);
                }
                let bits = (sz * 8) as u32;
                let left = i.mnemonic() == M::Shld;
                let mut fl = 0;
                self.rmw(i, sz, |a| {
                    let a = a & mask(sz);
                    // Combine dst:src into a double-width value and shift (counts > bits for 16-bit operands
                    // are undefined; this wraps through src like AMD).
                    let (res, cf) = if left {
                        let w = ((a as u128) << bits) | src as u128;
                        let cf = ((w >> (2 * bits).saturating_sub(cnt).min(127)) & 1) as u64;
                        (((w << cnt) >> bits) as u64 & mask(sz), cf)
                    } else {
                        let w = ((src as u128) << bits) | a as u128;
                        let cf = ((w >> (cnt - 1)) & 1) as u64;
                        ((w >> cnt) as u64 & mask(sz), cf)
                    };
                    let of = ((res ^ a) & sign(sz) != 0) as u64;
                    fl = alu::szp(res, sz) | cf | (of << 11);
                    res
                })?;
                self.set_arith(fl);
                Ok(())
            }
            M::Mul | M::Imul if i.op_count() == 1 => {
                let sz = self.op_size(i, 0);
                let b = self.rd(i, 0, sz)?;
                let a = self.c.gpr[0] & mask(sz);
                let bits = sz * 8;
                let (lo, hi, ovf) = if i.mnemonic() == M::Mul {
                    let p = a as u128 * b as u128;
                    let lo = p as u64 & mask(sz);
                    let hi = (p >> bits) as u64 & mask(sz);
                    (lo, hi, hi != 0)
                } else {
                    let p = sext(a, sz) as i128 * sext(b, sz) as i128;
                    let lo = p as u64 & mask(sz);
                    let hi = (p >> bits) as u64 & mask(sz);
                    (lo, hi, sext(lo, sz) as i128 != p)
                };
                if sz == 1 {
                    self.set_gpr_sized(0, 2, lo | (hi << 8));
                } else {
                    self.set_gpr_sized(0, sz, lo);
                    self.set_gpr_sized(2, sz, hi);
                }
                let f = alu::szp(lo, sz) & !(ZF | AF) | if ovf { CF | OF } else { 0 };
                self.set_arith(f);
                Ok(())
            }
            M::Imul => {
                let sz = self.op_size(i, 0);
                let (a, b) = if i.op_count() == 2 {
                    (self.rd(i, 0, sz)?, self.rd(i, 1, sz)?)
                } else {
                    (self.rd(i, 1, sz)?, self.rd(i, 2, sz)?)
                };
                let p = sext(a, sz) as i128 * sext(b, sz) as i128;
                let lo = p as u64 & mask(sz);
                let ovf = sext(lo, sz) as i128 != p;
                self.wr(i, 0, sz, lo)?;
                let f = alu::szp(lo, sz) & !(ZF | AF) | if ovf { CF | OF } else { 0 };
                self.set_arith(f);
                Ok(())
            }
            M::Div | M::Idiv => {
                let sz = self.op_size(i, 0);
                let d = self.rd(i, 0, sz)?;
                if d == 0 {
                    return Err(Fault::Exc(VEC_DE, None));
                }
                let bits = sz * 8;
                let n: u128 = if sz == 1 {
                    (self.c.gpr[0] & 0xffff) as u128
                } else {
                    ((self.c.gpr[2] & mask(sz)) as u128) << bits | (self.c.gpr[0] & mask(sz)) as u128
                };
                let (q, r) = if i.mnemonic() == M::Div {
                    let q = n / d as u128;
                    if q >> bits != 0 {
                        return Err(Fault::Exc(VEC_DE, None));
                    }
                    (q as u64, (n % d as u128) as u64)
                } else {
                    let sh = 128 - 2 * bits;
                    let n = ((n << sh) as i128) >> sh;
                    let d = sext(d, sz) as i128;
                    if n == i128::MIN >> sh && d == -1 {
                        return Err(Fault::Exc(VEC_DE, None));
                    }
                    let q = n / d;
                    let lim = 1i128 << (bits - 1);
                    if q >= lim || q < -lim {
                        return Err(Fault::Exc(VEC_DE, None));
                    }
                    (q as u64 & mask(sz), (n % d) as u64 & mask(sz))
                };
                if sz == 1 {
                    self.set_gpr_sized(0, 2, q | (r << 8));
                } else {
                    self.set_gpr_sized(0, sz, q);
                    self.set_gpr_sized(2, sz, r);
                }
                Ok(())
            }
            M::Lea => {
                let sz = self.op_size(i, 0);
                let a = self.ea_off(i);
                self.set_reg(i.op0_register(), a & mask(sz));
                Ok(())
            }
            M::Movzx | M::Movsx | M::Movsxd => {
                let dsz = self.op_size(i, 0);
                let ssz = self.op_size(i, 1);
                let v = self.rd(i, 1, ssz)?;
                let v = if i.mnemonic() == M::Movzx { v } else { sext(v, ssz) as u64 & mask(dsz) };
                self.set_reg(i.op0_register(), v);
                Ok(())
            }
            M::Xchg => {
                let sz = self.op_size(i, 0);
                if i.op_kind(0) == OpKind::Register && i.op_kind(1) == OpKind::Register {
                    let (r0, r1) = (i.op0_register(), i.op1_register());
                    let (a, b) = (self.get_reg(r0), self.get_reg(r1));
                    self.set_reg(r0, b);
                    self.set_reg(r1, a);
                    return Ok(());
                }
                // The register is operand 1 for `xchg m, r` and operand 0 for `xchg r, m`.
                let (mem_n, reg) =
                    if i.op_kind(0) == OpKind::Memory { (0, i.op1_register()) } else { (1, i.op0_register()) };
                let v = self.get_reg(reg);
                let old = if mem_n == 0 {
                    self.rmw(i, sz, |_| v)?
                } else {
                    let a = self.ea(i);
                    if let Some(p) = self.atomic_ptr(a, sz)? {
                        atomic_update(p, sz, &mut |_| v)
                    } else {
                        let old = self.read(a, sz)?;
                        self.write(a, sz, v)?;
                        old
                    }
                };
                self.set_reg(reg, old);
                Ok(())
            }
            M::Cmpxchg => {
                let sz = self.op_size(i, 0);
                let src = self.rd(i, 1, sz)?;
                let acc = self.c.gpr[0] & mask(sz);
                let mut eq = false;
                if i.op_kind(0) == OpKind::Register {
                    // A register destination is written only on success (AMD and Intel keep the upper half of a
                    // 32-bit destination when the comparison fails).
                    let r = i.op0_register();
                    let d = self.get_reg(r);
                    self.set_arith(alu::sub(acc, d, 0, sz).1);
                    if d == acc {
                        self.set_reg(r, src);
                    } else {
                        self.set_gpr_sized(0, sz, d);
                    }
                    return Ok(());
                }
                let old = self.rmw(i, sz, |d| {
                    eq = d & mask(sz) == acc;
                    if eq {
                        src
                    } else {
                        d
                    }
                })?;
                self.set_arith(alu::sub(acc, old, 0, sz).1);
                if !eq {
                    self.set_gpr_sized(0, sz, old);
                }
                Ok(())
            }
            M::Cmpxchg8b | M::Cmpxchg16b => self.cmpxchg_wide(i),
            M::Xadd => {
                let sz = self.op_size(i, 0);
                let src = self.rd(i, 1, sz)?;
                let mut fl = 0;
                if i.op_kind(0) == OpKind::Register {
                    // SRC gets the old DEST first, then DEST the sum (matters for `xadd r, r` on one register).
                    let r0 = i.op0_register();
                    let d = self.get_reg(r0);
                    let (r, f) = alu::add(d, src, 0, sz);
                    self.set_reg(i.op1_register(), d);
                    self.set_reg(r0, r);
                    self.set_arith(f);
                    return Ok(());
                }
                let old = self.rmw(i, sz, |d| {
                    let (r, f) = alu::add(d, src, 0, sz);
                    fl = f;
                    r
                })?;
                self.set_reg(i.op1_register(), old);
                self.set_arith(fl);
                Ok(())
            }
            M::Bswap => {
                let r = i.op0_register();
                let v = self.get_reg(r);
                let v = match gpr_info(r).map_or(8, |g| g.1) {
                    4 => (v as u32).swap_bytes() as u64,
                    8 => v.swap_bytes(),
                    // 16-bit BSWAP is undefined; Intel and AMD clear the register's low word.
                    _ => 0,
                };
                self.set_reg(r, v);
                Ok(())
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
            | M::Cmovg => {
                let sz = self.op_size(i, 0);
                let v = self.rd(i, 1, sz)?;
                let r = i.op0_register();
                if cond(cc_of(i), self.c.rflags) {
                    self.set_reg(r, v);
                } else if sz == 4 {
                    // A 32-bit CMOV writes its destination (zero-extending) even when the condition is false.
                    let cur = self.get_reg(r);
                    self.set_reg(r, cur);
                }
                Ok(())
            }
            M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg => {
                let v = cond(cc_of(i), self.c.rflags) as u64;
                self.wr(i, 0, 1, v)
            }
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
            | M::Jg => {
                if cond(cc_of(i), self.c.rflags) {
                    self.c.rip = i.near_branch_target();
                }
                Ok(())
            }
            M::Jmp => match i.op_kind(0) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    self.c.rip = i.near_branch_target();
                    Ok(())
                }
                OpKind::Register | OpKind::Memory if i.memory_size().size() != 10 && i.memory_size().size() != 6 => {
                    let sz = self.op_size(i, 0);
                    self.c.rip = self.rd(i, 0, sz)?;
                    Ok(())
                }
                _ => self.far_jmp_call(i, false),
            },
            M::Call => match i.op_kind(0) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    // 8 bytes in 64-bit mode, 4 in 32-bit code (2 with a 66 prefix).
                    let sz = (-i.stack_pointer_increment()) as usize;
                    let ret = self.c.rip;
                    self.push(sz, ret)?;
                    self.c.rip = i.near_branch_target();
                    Ok(())
                }
                OpKind::Register | OpKind::Memory if i.memory_size().size() != 10 && i.memory_size().size() != 6 => {
                    let sz = (-i.stack_pointer_increment()) as usize;
                    let t = self.rd(i, 0, sz)?;
                    let ret = self.c.rip;
                    self.push(sz, ret)?;
                    self.c.rip = t;
                    Ok(())
                }
                _ => self.far_jmp_call(i, true),
            },
            M::Ret => {
                let sz = match i.code() {
                    iced_x86::Code::Retnd | iced_x86::Code::Retnd_imm16 => 4,
                    iced_x86::Code::Retnw | iced_x86::Code::Retnw_imm16 => 2,
                    _ => 8,
                };
                let t = self.pop(sz)?;
                if i.op_count() == 1 {
                    self.c.gpr[4] = self.c.gpr[4].wrapping_add(i.immediate16() as u64);
                }
                self.c.rip = t;
                Ok(())
            }
            M::Jrcxz | M::Jecxz | M::Loop | M::Loope | M::Loopne => {
                use iced_x86::Code as C;
                let a32 = matches!(
                    i.code(),
                    C::Jecxz_rel8_64 | C::Loop_rel8_64_ECX | C::Loope_rel8_64_ECX | C::Loopne_rel8_64_ECX
                );
                let m = if a32 { 0xffff_ffff } else { u64::MAX };
                let take = match i.mnemonic() {
                    M::Jrcxz | M::Jecxz => self.c.gpr[1] & m == 0,
                    mn => {
                        let c = self.c.gpr[1].wrapping_sub(1) & m;
                        self.set_gpr_sized(1, if a32 { 4 } else { 8 }, c);
                        c != 0
                            && match mn {
                                M::Loope => self.c.rflags & ZF != 0,
                                M::Loopne => self.c.rflags & ZF == 0,
                                _ => true,
                            }
                    }
                };
                if take {
                    self.c.rip = i.near_branch_target();
                }
                Ok(())
            }
            M::Push => {
                let sz = (-i.stack_pointer_increment()) as usize;
                if i.op_kind(0) == OpKind::Register && gpr_info(i.op0_register()).is_none() {
                    let s = (i.op0_register() as usize) - Register::ES as usize;
                    let v = self.c.seg[s].selector as u64;
                    return self.push(sz, v);
                }
                let v = self.rd(i, 0, sz)?;
                let v = if i.op_kind(0) == OpKind::Register || i.op_kind(0) == OpKind::Memory {
                    v
                } else {
                    i.immediate(0) & mask(sz)
                };
                self.push(sz, v)
            }
            M::Pop => {
                let sz = i.stack_pointer_increment() as usize;
                if i.op_kind(0) == OpKind::Register && gpr_info(i.op0_register()).is_none() {
                    let s = (i.op0_register() as usize) - Register::ES as usize;
                    let v = self.read(self.c.gpr[4].wrapping_add(self.seg_base(SEG_SS)), sz)?;
                    self.load_seg(s, v as u16)?;
                    self.c.gpr[4] = self.c.gpr[4].wrapping_add(sz as u64);
                    if s == SEG_SS {
                        self.c.shadow = true;
                        self.c.end_block = true;
                    }
                    return Ok(());
                }
                let sp = self.c.gpr[4];
                let v = self.read(sp.wrapping_add(self.seg_base(SEG_SS)), sz)?;
                self.c.gpr[4] = sp.wrapping_add(sz as u64);
                // A memory destination is computed with the incremented RSP (SDM Vol. 2B "POP").
                if let Err(e) = self.wr(i, 0, sz, v) {
                    self.c.gpr[4] = sp;
                    return Err(e);
                }
                Ok(())
            }
            M::Pushf | M::Pushfq => {
                let sz = (-i.stack_pointer_increment()) as usize;
                let v = self.c.rflags & !(RF | VM);
                self.push(sz, v)
            }
            M::Popf | M::Popfq => {
                let sz = i.stack_pointer_increment() as usize;
                let v = self.pop(sz)?;
                self.write_rflags(v, sz);
                Ok(())
            }
            M::Leave => {
                // iced reports no fixed stack increment for LEAVE (RSP comes from RBP): size from the code.
                let sz = match i.code() {
                    iced_x86::Code::Leavew => 2,
                    iced_x86::Code::Leaved => 4,
                    _ => 8,
                };
                self.c.gpr[4] = self.c.gpr[5];
                let v = self.pop(sz)?;
                self.set_gpr_sized(5, sz, v);
                Ok(())
            }
            M::Enter => {
                let level = i.immediate8_2nd() & 31;
                if level != 0 {
                    return self.unimpl(i, "ENTER with nesting level");
                }
                let rbp = self.c.gpr[5];
                self.push(8, rbp)?;
                self.c.gpr[5] = self.c.gpr[4];
                self.c.gpr[4] = self.c.gpr[4].wrapping_sub(i.immediate16() as u64);
                Ok(())
            }
            M::Cbw => {
                let v = sext(self.c.gpr[0], 1) as u64;
                self.set_gpr_sized(0, 2, v);
                Ok(())
            }
            M::Cwde => {
                let v = sext(self.c.gpr[0], 2) as u64;
                self.set_gpr_sized(0, 4, v);
                Ok(())
            }
            M::Cdqe => {
                self.c.gpr[0] = sext(self.c.gpr[0], 4) as u64;
                Ok(())
            }
            M::Cwd | M::Cdq | M::Cqo => {
                let sz = match i.mnemonic() {
                    M::Cwd => 2,
                    M::Cdq => 4,
                    _ => 8,
                };
                let v = if self.c.gpr[0] & sign(sz) != 0 { u64::MAX } else { 0 };
                self.set_gpr_sized(2, sz, v);
                Ok(())
            }
            M::Bt | M::Bts | M::Btr | M::Btc => self.bit_test(i),
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => {
                // `f3 0f bc`/`f3 0f bd` run as BSF/BSR: BMI1/ABM are not advertised (Linux's `__ffs` relies on it).
                let sz = self.op_size(i, 0);
                let v = self.rd(i, 1, sz)?;
                let f = self.c.rflags & ARITH & !ZF;
                if v == 0 {
                    self.set_arith(f | ZF);
                } else {
                    let r = if matches!(i.mnemonic(), M::Bsf | M::Tzcnt) {
                        v.trailing_zeros() as u64
                    } else {
                        63 - v.leading_zeros() as u64
                    };
                    self.set_reg(i.op0_register(), r);
                    self.set_arith(f);
                }
                Ok(())
            }
            M::Clc => {
                self.c.rflags &= !CF;
                Ok(())
            }
            M::Stc => {
                self.c.rflags |= CF;
                Ok(())
            }
            M::Cmc => {
                self.c.rflags ^= CF;
                Ok(())
            }
            M::Cld => {
                self.c.rflags &= !DF;
                Ok(())
            }
            M::Std => {
                self.c.rflags |= DF;
                Ok(())
            }
            M::Lahf => {
                let v = (self.c.rflags & 0xd5) | 2;
                self.set_reg(Register::AH, v);
                Ok(())
            }
            M::Sahf => {
                let ah = (self.c.gpr[0] >> 8) & 0xd5;
                self.c.rflags = (self.c.rflags & !0xd5) | ah;
                Ok(())
            }
            M::Xlatb => {
                let a = self.c.gpr[3].wrapping_add(self.c.gpr[0] & 0xff).wrapping_add(self.seg_base(SEG_DS));
                let v = self.read(a, 1)?;
                self.set_gpr_sized(0, 1, v);
                Ok(())
            }
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
            | M::Prefetchw
            | M::Prefetch
            | M::Clflush => Ok(()),
            M::Movsb
            | M::Movsw
            | M::Movsd
            | M::Movsq
            | M::Stosb
            | M::Stosw
            | M::Stosd
            | M::Stosq
            | M::Lodsb
            | M::Lodsw
            | M::Lodsd
            | M::Lodsq
            | M::Scasb
            | M::Scasw
            | M::Scasd
            | M::Scasq
            | M::Cmpsb
            | M::Cmpsw
            | M::Cmpsd
            | M::Cmpsq
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd
                if i.op_count() == 0 || is_string_kind(i.op_kind(0)) || is_string_kind(i.op_kind(i.op_count() - 1)) =>
            {
                self.string_op(i)
            }
            _ => self.step_system(i),
        }
    }

    /// A shift or rotate whose masked count is 0: no flags change, but a 32-bit register destination is
    /// still written (zero-extended) and a memory operand is still checked for a write access.
    fn zero_count(&mut self, i: &Instruction, sz: usize) -> Res<()> {
        if i.op_kind(0) == OpKind::Memory {
            // Still a read-modify-write access: a fault reports a write (as the host CPU does).
            let a = self.ea(i);
            self.probe_write(a, sz)?;
            self.read(a, sz)?;
        } else if sz == 4 {
            let r = i.op0_register();
            let v = self.get_reg(r);
            self.set_reg(r, v);
        }
        Ok(())
    }

    fn bit_test(&mut self, i: &Instruction) -> Res<()> {
        let sz = self.op_size(i, 0);
        let bits = (sz * 8) as u64;
        let (off, imm) = match i.op_kind(1) {
            OpKind::Register => (self.get_reg(i.op1_register()), false),
            _ => (i.immediate(1), true),
        };
        let bit = off & (bits - 1);
        let m = i.mnemonic();
        let apply = |v: u64| match m {
            M::Bts => v | (1 << bit),
            M::Btr => v & !(1 << bit),
            M::Btc => v ^ (1 << bit),
            _ => v,
        };
        let old = if i.op_kind(0) == OpKind::Memory && !imm {
            // A register bit offset addresses memory beyond the operand (signed, SDM Vol. 2A "BT").
            let disp = (sext(off, sz) >> (bits.trailing_zeros())) * sz as i64;
            let addr32 = i.memory_base().size() == 4 || i.memory_index().size() == 4;
            let mut off = self.ea_off(i).wrapping_add(disp as u64);
            if addr32 {
                off &= 0xffff_ffff;
            }
            let seg = (i.memory_segment() as usize).wrapping_sub(Register::ES as usize);
            let a = off.wrapping_add(if seg < 6 { self.seg_base(seg) } else { 0 });
            if m == M::Bt {
                self.read(a, sz)?
            } else if i.has_lock_prefix() {
                match self.atomic_ptr(a, sz)? {
                    Some(p) => atomic_update(p, sz, &mut |v| apply(v)),
                    None => {
                        let v = self.read(a, sz)?;
                        self.write(a, sz, apply(v))?;
                        v
                    }
                }
            } else {
                self.probe_write(a, sz)?;
                let v = self.read(a, sz)?;
                self.write(a, sz, apply(v))?;
                v
            }
        } else if m == M::Bt {
            self.rd(i, 0, sz)?
        } else {
            self.rmw(i, sz, apply)?
        };
        self.c.rflags = (self.c.rflags & !CF) | ((old >> bit) & 1);
        Ok(())
    }

    fn cmpxchg_wide(&mut self, i: &Instruction) -> Res<()> {
        let wide = i.mnemonic() == M::Cmpxchg16b;
        let a = self.ea(i);
        let g = &self.c.gpr;
        if wide {
            if a & 15 != 0 {
                return gp0();
            }
            let expect = (g[0] as u128) | ((g[2] as u128) << 64);
            let new = (g[3] as u128) | ((g[1] as u128) << 64);
            let host = self.atomic_ptr(a, 16)?.filter(|p| (*p as usize) & 15 == 0);
            let (eq, old) = match host {
                // SAFETY: `p` points at 16 bytes of live guest RAM inside one page (from `atomic_ptr`, GuestRam
                // contract), 16-byte aligned (checked above); the locked host instruction is the atomic access.
                Some(p) => unsafe { host_cmpxchg16b(p as *mut u128, expect, new) },
                None => {
                    // Not atomic against other threads: only reached on a RAM mapping whose host address is not
                    // 16-byte aligned, on MMIO, or on non-x86-64 hosts.
                    let mut b = [0u8; 16];
                    let user = self.user();
                    self.read_bytes(a, &mut b, user)?;
                    let old = u128::from_le_bytes(b);
                    let eq = old == expect;
                    self.write_bytes(a, &(if eq { new } else { old }).to_le_bytes(), user)?;
                    (eq, old)
                }
            };
            if eq {
                self.c.rflags |= ZF;
            } else {
                self.c.gpr[0] = old as u64;
                self.c.gpr[2] = (old >> 64) as u64;
                self.c.rflags &= !ZF;
            }
        } else {
            let expect = (g[0] & 0xffff_ffff) | (g[2] << 32);
            let new = (g[3] & 0xffff_ffff) | (g[1] << 32);
            let mut eq = false;
            let old = match self.atomic_ptr(a, 8)? {
                Some(p) => atomic_update(p, 8, &mut |v| {
                    eq = v == expect;
                    if eq {
                        new
                    } else {
                        v
                    }
                }),
                None => {
                    let v = self.read(a, 8)?;
                    eq = v == expect;
                    self.write(a, 8, if eq { new } else { v })?;
                    v
                }
            };
            if eq {
                self.c.rflags |= ZF;
            } else {
                self.c.gpr[0] = old & 0xffff_ffff;
                self.c.gpr[2] = old >> 32;
                self.c.rflags &= !ZF;
            }
        }
        Ok(())
    }

    pub fn write_rflags(&mut self, v: u64, sz: usize) {
        // SDM Vol. 2B "POPF": IOPL changes only at CPL 0, IF only when CPL <= IOPL; VM/RF are not popped.
        let mut changeable = CF | PF | AF | ZF | SF | TF | DF | OF | NT | AC | ID | IF | IOPL;
        let iopl = (self.c.rflags & IOPL) >> 12;
        if self.c.cpl != 0 {
            changeable &= !IOPL;
        }
        if self.c.cpl as u64 > iopl {
            changeable &= !IF;
        }
        if sz == 2 {
            changeable &= 0xffff;
        }
        let old_if = self.c.rflags & IF;
        self.c.rflags = (self.c.rflags & !changeable) | (v & changeable) | 2;
        if self.c.rflags & IF != old_if {
            self.c.end_block = true;
        }
    }

    fn string_op(&mut self, i: &Instruction) -> Res<()> {
        use M::*;
        let m = i.mnemonic();
        let sz = match m {
            Movsb | Stosb | Lodsb | Scasb | Cmpsb | Insb | Outsb => 1,
            Movsw | Stosw | Lodsw | Scasw | Cmpsw | Insw | Outsw => 2,
            Movsd | Stosd | Lodsd | Scasd | Cmpsd | Insd | Outsd => 4,
            _ => 8,
        };
        let mut a32 = false;
        for n in 0..i.op_count() {
            if matches!(i.op_kind(n), OpKind::MemorySegESI | OpKind::MemoryESEDI) {
                a32 = true;
            }
            if matches!(i.op_kind(n), OpKind::MemorySegSI | OpKind::MemoryESDI) {
                return self.unimpl(i, "16-bit address size string instruction");
            }
        }
        let am = if a32 { 0xffff_ffffu64 } else { u64::MAX };
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let step = if self.c.rflags & DF != 0 { (sz as u64).wrapping_neg() } else { sz as u64 };
        let src_seg = {
            let s = (i.memory_segment() as usize).wrapping_sub(Register::ES as usize);
            if s < 6 {
                s
            } else {
                SEG_DS
            }
        };
        let src_base = self.seg_base(src_seg);
        let dst_base = self.seg_base(SEG_ES);
        // Bounded chunk per dispatch so interrupts and kicks are seen during long REP strings; RIP stays on
        // the instruction until RCX reaches 0 (SDM Vol. 2B "REP/REPE/REPZ/REPNE/REPNZ", interruptible).
        let mut budget = 8192u32;
        let bulk = rep
            && !a32
            && self.c.rflags & DF == 0
            && matches!(m, Movsb | Movsw | Movsd | Movsq | Stosb | Stosw | Stosd | Stosq);
        loop {
            if rep && self.c.gpr[1] & am == 0 {
                return Ok(());
            }
            if bulk {
                if let Some(n) = self.bulk_string(m, sz, src_base, dst_base) {
                    let bytes = n * sz as u64;
                    self.c.gpr[7] = self.c.gpr[7].wrapping_add(bytes);
                    if !matches!(m, Stosb | Stosw | Stosd | Stosq) {
                        self.c.gpr[6] = self.c.gpr[6].wrapping_add(bytes);
                    }
                    self.c.gpr[1] -= n;
                    budget = budget.saturating_sub(1 + (n / 64) as u32);
                    if self.c.gpr[1] != 0 && budget == 0 {
                        self.c.rip = self.c.cur_ip;
                        self.c.end_block = true;
                        return Ok(());
                    }
                    continue;
                }
            }
            let si = self.c.gpr[6] & am;
            let di = self.c.gpr[7] & am;
            let mut cmp_flags = None;
            match m {
                Movsb | Movsw | Movsd | Movsq => {
                    let v = self.read(src_base.wrapping_add(si), sz)?;
                    self.write(dst_base.wrapping_add(di), sz, v)?;
                    self.c.gpr[6] = (self.c.gpr[6] & !am) | (si.wrapping_add(step) & am);
                    self.c.gpr[7] = (self.c.gpr[7] & !am) | (di.wrapping_add(step) & am);
                }
                Stosb | Stosw | Stosd | Stosq => {
                    let v = self.c.gpr[0] & mask(sz);
                    self.write(dst_base.wrapping_add(di), sz, v)?;
                    self.c.gpr[7] = (self.c.gpr[7] & !am) | (di.wrapping_add(step) & am);
                }
                Lodsb | Lodsw | Lodsd | Lodsq => {
                    let v = self.read(src_base.wrapping_add(si), sz)?;
                    self.set_gpr_sized(0, sz, v);
                    self.c.gpr[6] = (self.c.gpr[6] & !am) | (si.wrapping_add(step) & am);
                }
                Scasb | Scasw | Scasd | Scasq => {
                    let v = self.read(dst_base.wrapping_add(di), sz)?;
                    cmp_flags = Some(alu::sub(self.c.gpr[0], v, 0, sz).1);
                    self.c.gpr[7] = (self.c.gpr[7] & !am) | (di.wrapping_add(step) & am);
                }
                Cmpsb | Cmpsw | Cmpsd | Cmpsq => {
                    let a = self.read(src_base.wrapping_add(si), sz)?;
                    let b = self.read(dst_base.wrapping_add(di), sz)?;
                    cmp_flags = Some(alu::sub(a, b, 0, sz).1);
                    self.c.gpr[6] = (self.c.gpr[6] & !am) | (si.wrapping_add(step) & am);
                    self.c.gpr[7] = (self.c.gpr[7] & !am) | (di.wrapping_add(step) & am);
                }
                Insb | Insw | Insd => {
                    self.io_allowed(self.c.gpr[2] as u16, sz)?;
                    let mut b = [0u8; 4];
                    self.io.pio_read(self.c.gpr[2] as u16, &mut b[..sz]);
                    self.write(dst_base.wrapping_add(di), sz, u32::from_le_bytes(b) as u64)?;
                    self.c.gpr[7] = (self.c.gpr[7] & !am) | (di.wrapping_add(step) & am);
                }
                _ => {
                    self.io_allowed(self.c.gpr[2] as u16, sz)?;
                    let v = self.read(src_base.wrapping_add(si), sz)?;
                    self.io.pio_write(self.c.gpr[2] as u16, &v.to_le_bytes()[..sz]);
                    self.c.gpr[6] = (self.c.gpr[6] & !am) | (si.wrapping_add(step) & am);
                }
            }
            if let Some(f) = cmp_flags {
                self.set_arith(f);
            }
            if !rep {
                return Ok(());
            }
            let c = self.c.gpr[1].wrapping_sub(1) & am;
            self.c.gpr[1] = (self.c.gpr[1] & !am) | c;
            if cmp_flags.is_some() {
                let zf = self.c.rflags & ZF != 0;
                if (i.has_repe_prefix() && !zf) || (i.has_repne_prefix() && zf) {
                    return Ok(());
                }
            }
            if c == 0 {
                return Ok(());
            }
            budget -= 1;
            if budget == 0 {
                self.c.rip = self.c.cur_ip;
                self.c.end_block = true;
                return Ok(());
            }
        }
    }

    /// Forward REP MOVS/STOS over RAM pages the TLB already maps: copies or fills up to the end of the current
    /// source/destination page in one host operation. Returns the number of elements done, or `None` to take
    /// the element-by-element path (TLB miss, MMIO, code page, fewer than 2 elements, or an overlap where a
    /// forward element copy differs from memmove).
    fn bulk_string(&mut self, m: M, sz: usize, src_base: u64, dst_base: u64) -> Option<u64> {
        let di = dst_base.wrapping_add(self.c.gpr[7]);
        let mut n = self.c.gpr[1].min((0x1000 - (di & 0xfff)) / sz as u64);
        let movs = matches!(m, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
        let si = src_base.wrapping_add(self.c.gpr[6]);
        if movs {
            n = n.min((0x1000 - (si & 0xfff)) / sz as u64);
        }
        if n < 2 {
            return None;
        }
        let len = n as usize * sz;
        let dst = self.host_range(di, len, true)?;
        if movs {
            let src = self.host_range(si, len, false)?;
            let (s, d) = (src as usize, dst as usize);
            if d > s && d < s + len {
                return None;
            }
            // SAFETY: both ranges lie inside RAM pages the TLB maps (GuestRam contract keeps them mapped); with
            // dst <= src or disjoint ranges, memmove equals the architectural forward element copy.
            unsafe { std::ptr::copy(src, dst, len) };
        } else {
            let v = self.c.gpr[0];
            // SAFETY: `[dst, dst + len)` is inside one mapped, writable RAM page (checked by `host_range`);
            // unaligned raw writes, no references into guest memory.
            unsafe {
                match sz {
                    1 => std::ptr::write_bytes(dst, v as u8, len),
                    2 => (0..n as usize).for_each(|k| (dst.add(2 * k) as *mut u16).write_unaligned(v as u16)),
                    4 => (0..n as usize).for_each(|k| (dst.add(4 * k) as *mut u32).write_unaligned(v as u32)),
                    _ => (0..n as usize).for_each(|k| (dst.add(8 * k) as *mut u64).write_unaligned(v)),
                }
            }
        }
        Some(n)
    }

    /// Logs an unimplemented instruction once per address and stops the vCPU with `Unsupported`.
    pub fn unimpl<T>(&mut self, i: &Instruction, what: &str) -> Res<T> {
        let msg = format!("unimplemented instruction `{i}` ({what}, {:?}) at RIP {:#x}", i.code(), self.c.cur_ip);
        log::error!("{msg}");
        Err(Fault::Exit(tessera_vcpu::VcpuExit::Unsupported(msg)))
    }
}

/// `lock cmpxchg16b` on the host: returns (equal, old value). Stable Rust has no 128-bit atomic type.
/// RBX cannot be named as an asm operand (LLVM reserves it), so the low half of `new` is swapped in and out.
///
/// # Safety
/// `p` must be valid for reads and writes of 16 bytes and 16-byte aligned.
#[cfg(target_arch = "x86_64")]
unsafe fn host_cmpxchg16b(p: *mut u128, expect: u128, new: u128) -> (bool, u128) {
    let (mut lo, mut hi) = (expect as u64, (expect >> 64) as u64);
    let ok: u8;
    // SAFETY: the caller guarantees `p`; RBX is restored before the asm block ends; no stack use.
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{p}]",
            "sete {ok}",
            "xchg {tmp}, rbx",
            p = in(reg) p,
            tmp = inout(reg) new as u64 => _,
            ok = out(reg_byte) ok,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (ok != 0, (lo as u128) | ((hi as u128) << 64))
}

/// Fallback for other hosts: not atomic against other threads.
///
/// # Safety
/// `p` must be valid for reads and writes of 16 bytes.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn host_cmpxchg16b(p: *mut u128, expect: u128, new: u128) -> (bool, u128) {
    // SAFETY: the caller guarantees `p`; unaligned raw accesses.
    unsafe {
        let old = p.read_unaligned();
        if old == expect {
            p.write_unaligned(new);
        }
        (old == expect, old)
    }
}

fn is_string_kind(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// Compare-and-swap loop on a host pointer into guest RAM (aligned, `sz` in 1/2/4/8).
pub(crate) fn atomic_update(p: *mut u8, sz: usize, f: &mut dyn FnMut(u64) -> u64) -> u64 {
    use std::sync::atomic::*;
    macro_rules! cas {
        ($a:ty, $t:ty) => {{
            // SAFETY: callers pass a pointer from `GuestRam::host_ptr` for `sz` bytes, aligned to `sz`; the
            // mapping outlives the CPU (GuestRam contract) and is only accessed atomically or with raw accesses.
            let a = unsafe { <$a>::from_ptr(p as *mut $t) };
            let mut cur = a.load(Ordering::SeqCst);
            loop {
                let new = f(cur as u64) as $t;
                match a.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => break cur as u64,
                    Err(x) => cur = x,
                }
            }
        }};
    }
    match sz {
        1 => cas!(AtomicU8, u8),
        2 => cas!(AtomicU16, u16),
        4 => cas!(AtomicU32, u32),
        _ => cas!(AtomicU64, u64),
    }
}
