//! x87 control instructions, FXSAVE/FXRSTOR, MMX (integer set and the SSE-era MMX-register forms; MMn is the
//! mantissa of x87 register Rn), and the SSE/SSE2 subset that Linux and glibc use (fact sheet §3, §8). x87
//! floating-point arithmetic is not implemented yet and stops with `Unsupported`.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;

/// Integer to 80-bit extended real (exact for 64-bit integers).
fn int_to_f80(v: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    if v == 0 {
        return out;
    }
    let neg = v < 0;
    let m = v.unsigned_abs();
    let lz = m.leading_zeros();
    let mant = m << lz;
    let exp = 16383 + 63 - lz as u16;
    out[..8].copy_from_slice(&mant.to_le_bytes());
    out[8..10].copy_from_slice(&(exp | if neg { 0x8000 } else { 0 }).to_le_bytes());
    out
}

fn lanes(a: u128, b: u128, w: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let n = 128 / (w * 8);
    let m = if w == 8 { u64::MAX } else { (1u64 << (w * 8)) - 1 };
    let mut r = 0u128;
    for k in 0..n {
        let sh = k * w * 8;
        let x = (a >> sh) as u64 & m;
        let y = (b >> sh) as u64 & m;
        r |= ((f(x, y) & m) as u128) << sh;
    }
    r
}

fn sx(v: u64, w: usize) -> i64 {
    crate::alu::sext(v, w)
}

fn unpack(a: u128, b: u128, w: usize, high: bool) -> u128 {
    let n = 64 / (w * 8);
    let m = if w == 8 { u64::MAX as u128 } else { (1u128 << (w * 8)) - 1 };
    let (a, b) = if high { (a >> 64, b >> 64) } else { (a, b) };
    let mut r = 0u128;
    for k in 0..n {
        let x = (a >> (k * w * 8)) & m;
        let y = (b >> (k * w * 8)) & m;
        r |= x << (2 * k * w * 8);
        r |= y << ((2 * k + 1) * w * 8);
    }
    r
}

const LO64: u128 = u64::MAX as u128;
const LO32: u128 = u32::MAX as u128;

fn d(v: u128, k: u32) -> f64 {
    f64::from_bits((v >> (64 * k)) as u64)
}
fn s(v: u128, k: u32) -> f32 {
    f32::from_bits((v >> (32 * k)) as u32)
}
/// x86 NaN propagation for binary operations (SDM Vol. 1 "Floating-Point Exception Conditions", table
/// "Rules for handling NaNs"): a NaN in the first operand wins, quieted; else a NaN in the second. Rust's
/// float ops may commute operands, so NaN inputs are resolved here before the host operation runs.
fn nan64(x: f64, y: f64, f: impl Fn(f64, f64) -> f64) -> f64 {
    if x.is_nan() {
        f64::from_bits(x.to_bits() | (1 << 51))
    } else if y.is_nan() {
        f64::from_bits(y.to_bits() | (1 << 51))
    } else {
        f(x, y)
    }
}
fn nan32(x: f32, y: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    if x.is_nan() {
        f32::from_bits(x.to_bits() | (1 << 22))
    } else if y.is_nan() {
        f32::from_bits(y.to_bits() | (1 << 22))
    } else {
        f(x, y)
    }
}

fn pd(f: impl Fn(f64, f64) -> f64, a: u128, b: u128) -> u128 {
    (f(d(a, 0), d(b, 0)).to_bits() as u128) | ((f(d(a, 1), d(b, 1)).to_bits() as u128) << 64)
}
fn ps(f: impl Fn(f32, f32) -> f32, a: u128, b: u128) -> u128 {
    (0..4).fold(0u128, |r, k| r | ((f(s(a, k), s(b, k)).to_bits() as u128) << (32 * k)))
}
fn sd(f: impl Fn(f64, f64) -> f64, a: u128, b: u128) -> u128 {
    (a & !LO64) | f(d(a, 0), d(b, 0)).to_bits() as u128
}
fn ss(f: impl Fn(f32, f32) -> f32, a: u128, b: u128) -> u128 {
    (a & !LO32) | f(s(a, 0), s(b, 0)).to_bits() as u128
}
/// MINSD/MAXSD semantics: the second operand when either is NaN or both are zero (SDM Vol. 2B "MINSD").
fn min64(x: f64, y: f64) -> f64 {
    if x < y {
        x
    } else {
        y
    }
}
fn max64(x: f64, y: f64) -> f64 {
    if x > y {
        x
    } else {
        y
    }
}
fn min32(x: f32, y: f32) -> f32 {
    if x < y {
        x
    } else {
        y
    }
}
fn max32(x: f32, y: f32) -> f32 {
    if x > y {
        x
    } else {
        y
    }
}
/// Float to int32 with x86's integer-indefinite result for NaN/out of range.
fn f2i32(t: f64) -> u32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&t) {
        t as i32 as u32
    } else {
        0x8000_0000
    }
}

fn sat_s(v: i64, w: usize) -> u64 {
    let (lo, hi) = if w == 1 { (-128i64, 127i64) } else { (-32768, 32767) };
    v.clamp(lo, hi) as u64 & if w == 1 { 0xff } else { 0xffff }
}

impl Exec<'_> {
    fn x87_ok(&self) -> Res<()> {
        if self.c.cr0 & (CR0_EM | CR0_TS) != 0 {
            return Err(Fault::Exc(VEC_NM, None));
        }
        Ok(())
    }

    fn sse_ok(&self) -> Res<()> {
        if self.c.cr0 & CR0_EM != 0 || self.c.cr4 & CR4_OSFXSR == 0 {
            return ud();
        }
        if self.c.cr0 & CR0_TS != 0 {
            return Err(Fault::Exc(VEC_NM, None));
        }
        Ok(())
    }

    fn top(&self) -> usize {
        ((self.c.fpu.fsw >> 11) & 7) as usize
    }

    fn fxsave(&mut self, a: u64) -> Res<()> {
        if a & 15 != 0 {
            return gp0();
        }
        let f = self.c.fpu.clone();
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
        b[4] = f.ftw;
        b[6..8].copy_from_slice(&f.fop.to_le_bytes());
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        let top = self.top();
        for k in 0..8 {
            b[32 + 16 * k..42 + 16 * k].copy_from_slice(&f.st[(top + k) & 7][..10]);
        }
        for k in 0..16 {
            b[160 + 16 * k..176 + 16 * k].copy_from_slice(&f.xmm[k].to_le_bytes());
        }
        let user = self.user();
        // Bytes 464..512 are available to software and not written (SDM Vol. 2A "FXSAVE").
        self.write_bytes(a, &b[..464], user)
    }

    fn fxrstor(&mut self, a: u64) -> Res<()> {
        if a & 15 != 0 {
            return gp0();
        }
        let mut b = [0u8; 464];
        let user = self.user();
        self.read_bytes(a, &mut b, user)?;
        let mxcsr = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
        if mxcsr & !0xffff != 0 {
            return gp0();
        }
        let f = &mut self.c.fpu;
        f.fcw = u16::from_le_bytes([b[0], b[1]]);
        f.fsw = u16::from_le_bytes([b[2], b[3]]);
        f.ftw = b[4];
        f.fop = u16::from_le_bytes([b[6], b[7]]);
        f.fip = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        f.fdp = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
        f.mxcsr = mxcsr;
        let top = ((f.fsw >> 11) & 7) as usize;
        for k in 0..8 {
            let mut r = [0u8; 16];
            r[..10].copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
            f.st[(top + k) & 7] = r;
        }
        for k in 0..16 {
            f.xmm[k] = u128::from_le_bytes(b[160 + 16 * k..176 + 16 * k].try_into().unwrap_or_default());
        }
        Ok(())
    }

    fn xmm_of(&self, r: Register) -> Option<usize> {
        if r.is_xmm() {
            Some(r.number())
        } else {
            None
        }
    }

    /// Reads operand `n` as a 128-bit value (XMM register, GPR, or memory of the operand's size).
    fn rx(&mut self, i: &Instruction, n: u32) -> Res<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                match self.xmm_of(r) {
                    Some(x) => Ok(self.c.fpu.xmm[x]),
                    None if r.is_mm() => ud(),
                    None => Ok(self.get_reg(r) as u128),
                }
            }
            OpKind::Memory => {
                let a = self.ea(i);
                let sz = i.memory_size().size();
                if sz == 16 {
                    let mut b = [0u8; 16];
                    let user = self.user();
                    self.read_bytes(a, &mut b, user)?;
                    Ok(u128::from_le_bytes(b))
                } else {
                    Ok(self.read(a, sz)? as u128)
                }
            }
            _ => Ok(i.immediate(n) as u128),
        }
    }

    fn aligned16(&self, i: &Instruction) -> Res<()> {
        if (i.op_kind(0) == OpKind::Memory || i.op_kind(1) == OpKind::Memory) && self.ea(i) & 15 != 0 {
            return gp0();
        }
        Ok(())
    }

    /// Writes operand 0: an XMM register (whole), a GPR, or memory of the operand's size.
    fn wx(&mut self, i: &Instruction, v: u128) -> Res<()> {
        match i.op_kind(0) {
            OpKind::Register => {
                let r = i.op0_register();
                match self.xmm_of(r) {
                    Some(x) => self.c.fpu.xmm[x] = v,
                    None if r.is_mm() => return ud(),
                    None => self.set_reg(r, v as u64),
                }
                Ok(())
            }
            _ => {
                let a = self.ea(i);
                let sz = i.memory_size().size();
                if sz == 16 {
                    let user = self.user();
                    self.write_bytes(a, &v.to_le_bytes(), user)
                } else {
                    self.write(a, sz, v as u64)
                }
            }
        }
    }

    fn x0(&self, i: &Instruction) -> Res<usize> {
        match self.xmm_of(i.op0_register()) {
            Some(x) if i.op_kind(0) == OpKind::Register => Ok(x),
            _ => ud(),
        }
    }

    /// MMX exception checks (SDM Vol. 2 MMX instructions, "Numeric Exceptions"/"Protected Mode Exceptions"):
    /// #UD with CR0.EM set, #NM with CR0.TS set. (#MF for a pending x87 exception cannot arise here: x87
    /// arithmetic is not implemented, so no x87 exception is ever left pending.)
    fn mmx_ok(&self) -> Res<()> {
        if self.c.cr0 & CR0_EM != 0 {
            return ud();
        }
        if self.c.cr0 & CR0_TS != 0 {
            return Err(Fault::Exc(VEC_NM, None));
        }
        Ok(())
    }

    /// MMn is the 64-bit mantissa of physical x87 register Rn (SDM Vol. 1 §9.5.1 "MMX Instructions and the
    /// x87 FPU Tag Word"): it does not move with TOP.
    pub(crate) fn mm_get(&self, n: usize) -> u64 {
        let r = &self.c.fpu.st[n & 7];
        u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
    }

    /// Writing MMn also sets the sign and exponent of Rn to all ones (SDM Vol. 1 §9.5.1).
    fn mm_set(&mut self, n: usize, v: u64) {
        let r = &mut self.c.fpu.st[n & 7];
        r[..8].copy_from_slice(&v.to_le_bytes());
        r[8] = 0xff;
        r[9] = 0xff;
    }

    /// Every MMX instruction but EMMS sets TOP to 0 and all tags valid (SDM Vol. 1 Table 9-2); the abridged
    /// tag word (FXSAVE's format, which `ftw` holds) has a 1 per valid register.
    fn mmx_enter(&mut self) {
        self.c.fpu.fsw &= !0x3800;
        self.c.fpu.ftw = 0xff;
    }

    /// Reads operand `n` of an MMX-form instruction: an MMX register, a GPR, memory of the operand's size,
    /// or an immediate.
    fn rm(&mut self, i: &Instruction, n: u32) -> Res<u64> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if r.is_mm() {
                    Ok(self.mm_get(r.number()))
                } else if r.is_xmm() {
                    ud()
                } else {
                    Ok(self.get_reg(r))
                }
            }
            OpKind::Memory => {
                let a = self.ea(i);
                let sz = i.memory_size().size();
                self.read(a, sz)
            }
            _ => Ok(i.immediate(n)),
        }
    }

    /// MASKMOVQ/MASKMOVDQU (SDM Vol. 2B "MASKMOVQ"): the bytes of `v` whose mask byte has its top bit set go
    /// to DS:[RDI] (EDI with a 0x67 prefix; the segment may be overridden), one byte store each.
    fn maskmov(&mut self, i: &Instruction, v: u128, mask: u128, n: u32) -> Res<()> {
        let off = match i.op_kind(0) {
            OpKind::MemorySegRDI => self.get_reg(Register::RDI),
            OpKind::MemorySegEDI => self.get_reg(Register::RDI) & 0xffff_ffff,
            _ => return self.unimpl(i, "masked move without an RDI/EDI address"),
        };
        let seg = (i.memory_segment() as usize).wrapping_sub(Register::ES as usize);
        let a = if seg < 6 { off.wrapping_add(self.seg_base(seg)) } else { off };
        for k in 0..n {
            if (mask >> (8 * k + 7)) & 1 != 0 {
                self.write(a.wrapping_add(k as u64), 1, (v >> (8 * k)) as u64 & 0xff)?;
            }
        }
        Ok(())
    }

    /// Integer MMX instructions and the SSE-era MMX-register forms (PSHUFW, PMINUB, PAVGB, PSADBW, PMOVMSKB,
    /// PEXTRW, PINSRW, MOVNTQ, PMULUDQ, PADDQ, PSUBQ). The lane arithmetic is `int_op`, shared with SSE2.
    fn step_mmx(&mut self, i: &Instruction) -> Res<()> {
        self.mmx_ok()?;
        let m = i.mnemonic();
        match m {
            M::Movd | M::Movq | M::Movntq => {
                let v = self.rm(i, 1)?;
                let v = if m == M::Movd { v & 0xffff_ffff } else { v };
                match i.op_kind(0) {
                    OpKind::Register if i.op0_register().is_mm() => self.mm_set(i.op0_register().number(), v),
                    OpKind::Register => self.set_reg(i.op0_register(), v),
                    _ => {
                        let a = self.ea(i);
                        self.write(a, if m == M::Movd { 4 } else { 8 }, v)?;
                    }
                }
            }
            M::Maskmovq => {
                let v = self.mm_get(i.op1_register().number()) as u128;
                let mask = self.mm_get(i.op2_register().number()) as u128;
                self.maskmov(i, v, mask, 8)?;
            }
            M::Pmovmskb => {
                let v = self.rm(i, 1)?;
                let r = (0..8).fold(0u64, |r, k| r | (((v >> (8 * k + 7)) & 1) << k));
                self.set_reg(i.op0_register(), r);
            }
            M::Pextrw => {
                let v = self.rm(i, 1)?;
                let k = (i.immediate8() & 3) as u32;
                self.set_reg(i.op0_register(), (v >> (16 * k)) & 0xffff);
            }
            M::Pinsrw => {
                let x = i.op0_register().number();
                let v = self.rm(i, 1)? & 0xffff;
                let k = (i.immediate8() & 3) as u32;
                let cur = self.mm_get(x);
                self.mm_set(x, (cur & !(0xffff << (16 * k))) | (v << (16 * k)));
            }
            _ => {
                let r0 = i.op0_register();
                if i.op_kind(0) != OpKind::Register || !r0.is_mm() {
                    return self.unimpl(i, "MMX form not implemented");
                }
                let a = self.mm_get(r0.number()) as u128;
                let b = if i.op_count() > 1 && i.op_kind(1) != OpKind::Immediate8 { self.rm(i, 1)? as u128 } else { 0 };
                match self.int_op(i, a, b, true) {
                    Some(r) => self.mm_set(r0.number(), r as u64),
                    None => return self.unimpl(i, "MMX instruction not implemented"),
                }
            }
        }
        self.mmx_enter();
        Ok(())
    }

    pub fn step_fpu(&mut self, i: &Instruction) -> Res<()> {
        let m = i.mnemonic();
        match m {
            M::Fninit | M::Finit => {
                self.x87_ok()?;
                let f = &mut self.c.fpu;
                f.fcw = 0x37f;
                f.fsw = 0;
                f.ftw = 0;
                f.fop = 0;
                f.fip = 0;
                f.fdp = 0;
                Ok(())
            }
            M::Fnclex | M::Fclex => {
                self.x87_ok()?;
                self.c.fpu.fsw &= 0x7f00;
                Ok(())
            }
            M::Wait => {
                if self.c.cr0 & (CR0_TS | 2) == (CR0_TS | 2) {
                    return Err(Fault::Exc(VEC_NM, None));
                }
                Ok(())
            }
            M::Fldcw => {
                self.x87_ok()?;
                let a = self.ea(i);
                self.c.fpu.fcw = self.read(a, 2)? as u16;
                Ok(())
            }
            M::Fnstcw | M::Fstcw => {
                self.x87_ok()?;
                let v = self.c.fpu.fcw as u64;
                self.wr(i, 0, 2, v)
            }
            M::Fnstsw | M::Fstsw => {
                self.x87_ok()?;
                let v = self.c.fpu.fsw as u64;
                self.wr(i, 0, 2, v)
            }
            M::Emms => {
                self.mmx_ok()?;
                // SDM Vol. 1 Table 9-2: EMMS sets all tags empty (abridged FTW 0) and TOP to 0, like other
                // MMX instructions (the host CPU agrees; the differential test compares it).
                self.c.fpu.fsw &= !0x3800;
                self.c.fpu.ftw = 0;
                Ok(())
            }
            M::Fild => {
                self.x87_ok()?;
                let a = self.ea(i);
                let sz = i.memory_size().size();
                let v = crate::alu::sext(self.read(a, sz)?, sz);
                let top = (self.top() + 7) & 7;
                let f = &mut self.c.fpu;
                if f.ftw & (1 << top) != 0 {
                    return self.unimpl(i, "x87 stack overflow");
                }
                f.st[top] = int_to_f80(v);
                f.ftw |= 1 << top;
                f.fsw = (f.fsw & !0x3800) | ((top as u16) << 11);
                Ok(())
            }
            M::Ffree => {
                self.x87_ok()?;
                let k = (self.top() + i.op0_register().number()) & 7;
                self.c.fpu.ftw &= !(1 << k);
                Ok(())
            }
            M::Fxsave | M::Fxsave64 => {
                self.x87_ok()?;
                let a = self.ea(i);
                self.fxsave(a)
            }
            M::Fxrstor | M::Fxrstor64 => {
                self.x87_ok()?;
                let a = self.ea(i);
                self.fxrstor(a)
            }
            M::Ldmxcsr => {
                self.sse_ok()?;
                let a = self.ea(i);
                let v = self.read(a, 4)? as u32;
                if v & !0xffff != 0 {
                    return gp0();
                }
                self.c.fpu.mxcsr = v;
                Ok(())
            }
            M::Stmxcsr => {
                self.sse_ok()?;
                let v = self.c.fpu.mxcsr as u64;
                self.wr(i, 0, 4, v)
            }
            M::Xgetbv
            | M::Xsetbv
            | M::Xsave
            | M::Xrstor
            | M::Xsave64
            | M::Xrstor64
            | M::Rdtscp
            | M::Rdrand
            | M::Rdseed
            | M::Popcnt
            | M::Movbe
            | M::Rdpid
            | M::Monitor
            | M::Mwait
            | M::Rdfsbase
            | M::Rdgsbase
            | M::Wrfsbase
            | M::Wrgsbase
            | M::Invpcid
            | M::Stac
            | M::Clac
            | M::Serialize => {
                // Not advertised in CPUID: a real CPU without the feature raises #UD.
                ud()
            }
            _ => self.step_sse(i),
        }
    }

    fn step_sse(&mut self, i: &Instruction) -> Res<()> {
        let m = i.mnemonic();
        let is_sse = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_xmm())
            || matches!(m, M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si);
        let has_mm = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm());
        if matches!(m, M::Movq2dq | M::Movdq2q) {
            // SSE2 moves between the MMX and XMM files (SDM Vol. 2B "MOVQ2DQ", "MOVDQ2Q"): SSE2 exception
            // checks, and the MMX state transition.
            self.sse_ok()?;
            if m == M::Movq2dq {
                let x = self.x0(i)?;
                self.c.fpu.xmm[x] = self.mm_get(i.op1_register().number()) as u128;
            } else {
                let v = self.rx(i, 1)? as u64;
                self.mm_set(i.op0_register().number(), v);
            }
            self.mmx_enter();
            return Ok(());
        }
        let mmx_convert =
            matches!(m, M::Cvtpi2ps | M::Cvtpi2pd | M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi);
        if mmx_convert || has_mm && is_sse {
            return self.sse_mmx_convert(i);
        }
        if !is_sse {
            if has_mm {
                return self.step_mmx(i);
            }
            if m == M::Movnti {
                let sz = self.op_size(i, 1);
                let v = self.get_reg(i.op1_register());
                return self.wr(i, 0, sz, v);
            }
            return self.unimpl(i, "not implemented");
        }
        self.sse_ok()?;
        match m {
            M::Maskmovdqu => {
                let v = self.rx(i, 1)?;
                let mask = self.rx(i, 2)?;
                self.maskmov(i, v, mask, 16)
            }
            M::Movaps | M::Movapd | M::Movdqa | M::Movntdq | M::Movntps | M::Movntpd => {
                self.aligned16(i)?;
                let v = self.rx(i, 1)?;
                self.wx(i, v)
            }
            M::Movups | M::Movupd | M::Movdqu => {
                let v = self.rx(i, 1)?;
                self.wx(i, v)
            }
            M::Movd | M::Movq => {
                let sz = if m == M::Movd { 4 } else { 8 };
                let v = self.rx(i, 1)? & if sz == 4 { 0xffff_ffff } else { u64::MAX as u128 };
                if i.op_kind(0) == OpKind::Register && i.op0_register().is_xmm() {
                    // Loads into an XMM register zero the rest of it.
                    let x = i.op0_register().number();
                    self.c.fpu.xmm[x] = v;
                    Ok(())
                } else if i.op_kind(0) == OpKind::Register {
                    self.set_reg(i.op0_register(), v as u64);
                    Ok(())
                } else {
                    let a = self.ea(i);
                    self.write(a, sz, v as u64)
                }
            }
            M::Movss | M::Movsd => {
                let sz = if m == M::Movss { 4 } else { 8 };
                let lm = (1u128 << (sz * 8)) - 1;
                if i.op_kind(0) == OpKind::Memory {
                    let v = self.rx(i, 1)?;
                    let a = self.ea(i);
                    return self.write(a, sz, v as u64);
                }
                let x = self.x0(i)?;
                let v = self.rx(i, 1)?;
                if i.op_kind(1) == OpKind::Memory {
                    self.c.fpu.xmm[x] = v & lm;
                } else {
                    self.c.fpu.xmm[x] = (self.c.fpu.xmm[x] & !lm) | (v & lm);
                }
                Ok(())
            }
            M::Movlpd | M::Movlps | M::Movhpd | M::Movhps => {
                let high = matches!(m, M::Movhpd | M::Movhps);
                if i.op_kind(0) == OpKind::Memory {
                    let v = self.rx(i, 1)?;
                    let a = self.ea(i);
                    return self.write(a, 8, if high { (v >> 64) as u64 } else { v as u64 });
                }
                let x = self.x0(i)?;
                let v = self.rx(i, 1)? as u64 as u128;
                let cur = self.c.fpu.xmm[x];
                self.c.fpu.xmm[x] =
                    if high { (cur & u64::MAX as u128) | (v << 64) } else { (cur & !(u64::MAX as u128)) | v };
                Ok(())
            }
            M::Movhlps | M::Movlhps => {
                let x = self.x0(i)?;
                let v = self.rx(i, 1)?;
                let cur = self.c.fpu.xmm[x];
                self.c.fpu.xmm[x] = if m == M::Movhlps {
                    (cur & !(u64::MAX as u128)) | (v >> 64)
                } else {
                    (cur & u64::MAX as u128) | (v << 64)
                };
                Ok(())
            }
            M::Pmovmskb | M::Movmskps | M::Movmskpd => {
                let v = self.rx(i, 1)?;
                let (w, n) = match m {
                    M::Pmovmskb => (8, 16),
                    M::Movmskps => (32, 4),
                    _ => (64, 2),
                };
                let mut r = 0u64;
                for k in 0..n {
                    r |= (((v >> (k * w + w - 1)) & 1) as u64) << k;
                }
                self.set_reg(i.op0_register(), r);
                Ok(())
            }
            M::Pextrw => {
                let v = self.rx(i, 1)?;
                let k = (i.immediate8() & 7) as u32;
                let r = (v >> (16 * k)) as u64 & 0xffff;
                self.wr(i, 0, if i.op_kind(0) == OpKind::Memory { 2 } else { 4 }, r)
            }
            M::Pinsrw => {
                let x = self.x0(i)?;
                let v = self.rx(i, 1)? & 0xffff;
                let k = (i.immediate8() & 7) as u32;
                let cur = self.c.fpu.xmm[x];
                self.c.fpu.xmm[x] = (cur & !(0xffffu128 << (16 * k))) | (v << (16 * k));
                Ok(())
            }
            M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
                self.check_rounding();
                let v = self.rx(i, 1)?;
                let f = if matches!(m, M::Cvttsd2si | M::Cvtsd2si) {
                    f64::from_bits(v as u64)
                } else {
                    f32::from_bits(v as u32) as f64
                };
                let t = if matches!(m, M::Cvttsd2si | M::Cvttss2si) { f.trunc() } else { f.round_ties_even() };
                let r = if self.op_size(i, 0) == 8 {
                    // Out of range or NaN gives the "integer indefinite" value (SDM Vol. 1 "Invalid Operation").
                    if (-(2f64.powi(63))..2f64.powi(63)).contains(&t) {
                        t as i64 as u64
                    } else {
                        1 << 63
                    }
                } else if (-2_147_483_648.0..2_147_483_648.0).contains(&t) {
                    t as i32 as u32 as u64
                } else {
                    0x8000_0000
                };
                self.set_reg(i.op0_register(), r);
                Ok(())
            }
            M::Comisd | M::Ucomisd | M::Comiss | M::Ucomiss => {
                let x = self.x0(i)?;
                let b = self.rx(i, 1)?;
                let a = self.c.fpu.xmm[x];
                let (a, b) = if matches!(m, M::Comisd | M::Ucomisd) {
                    (f64::from_bits(a as u64), f64::from_bits(b as u64))
                } else {
                    (f32::from_bits(a as u32) as f64, f32::from_bits(b as u32) as f64)
                };
                // SDM Vol. 2A "COMISD": unordered ZF,PF,CF = 111; greater 000; less 001; equal 100.
                let f = match a.partial_cmp(&b) {
                    None => ZF | PF | CF,
                    Some(std::cmp::Ordering::Greater) => 0,
                    Some(std::cmp::Ordering::Less) => CF,
                    Some(std::cmp::Ordering::Equal) => ZF,
                };
                self.c.rflags = (self.c.rflags & !ARITH) | f;
                Ok(())
            }
            _ => self.sse_binop(i),
        }
    }

    /// The conversions between packed int32 in an MMX register and floats in an XMM register (SDM Vol. 2A
    /// "CVTPI2PS" .. "CVTTPD2PI"): SSE/SSE2 exception checks; an MMX register operand makes them MMX
    /// instructions for the x87 state (TOP 0, tags valid), a memory source does not.
    fn sse_mmx_convert(&mut self, i: &Instruction) -> Res<()> {
        self.sse_ok()?;
        let m = i.mnemonic();
        match m {
            M::Cvtpi2ps | M::Cvtpi2pd => {
                let x = self.x0(i)?;
                let v = match i.op_kind(1) {
                    OpKind::Register => self.mm_get(i.op1_register().number()),
                    _ => self.rx(i, 1)? as u64,
                };
                let (lo, hi) = (v as u32 as i32, (v >> 32) as u32 as i32);
                self.check_rounding();
                let cur = self.c.fpu.xmm[x];
                self.c.fpu.xmm[x] = if m == M::Cvtpi2ps {
                    (cur & !LO64) | (lo as f32).to_bits() as u128 | (((hi as f32).to_bits() as u128) << 32)
                } else {
                    (lo as f64).to_bits() as u128 | (((hi as f64).to_bits() as u128) << 64)
                };
            }
            M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => {
                if i.op_kind(0) != OpKind::Register || !i.op0_register().is_mm() {
                    return ud();
                }
                if matches!(m, M::Cvtpd2pi | M::Cvttpd2pi) && i.op_kind(1) == OpKind::Memory {
                    self.aligned16(i)?;
                }
                let v = self.rx(i, 1)?;
                let f: [f64; 2] = if matches!(m, M::Cvtps2pi | M::Cvttps2pi) {
                    [s(v, 0) as f64, s(v, 1) as f64]
                } else {
                    [d(v, 0), d(v, 1)]
                };
                let trunc = matches!(m, M::Cvttps2pi | M::Cvttpd2pi);
                if !trunc {
                    self.check_rounding();
                }
                let r = f.iter().enumerate().fold(0u64, |r, (k, &t)| {
                    let t = if trunc { t.trunc() } else { t.round_ties_even() };
                    r | ((f2i32(t) as u64) << (32 * k))
                });
                self.mm_set(i.op0_register().number(), r);
            }
            _ => return self.unimpl(i, "instruction with MMX and XMM operands not implemented"),
        }
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm()) {
            self.mmx_enter();
        }
        Ok(())
    }

    /// Arithmetic here uses the host's SSE with its default rounding (nearest-even), which is what the guest
    /// gets unless it changes MXCSR.RC; a different mode is logged once (not emulated yet).
    fn check_rounding(&mut self) {
        if self.c.fpu.mxcsr & 0x6000 != 0 {
            let (mx, rip) = (self.c.fpu.mxcsr, self.c.cur_ip);
            self.log_once(
                0x3_0000_0000,
                format!("MXCSR rounding mode {mx:#x} not emulated (using nearest) at RIP {rip:#x}"),
            );
        }
    }

    /// SSE/SSE2 floating-point arithmetic and conversions with the host's IEEE operations (same ISA, so NaN
    /// propagation and results match; MXCSR status flags are not updated yet).
    fn sse_float(&mut self, i: &Instruction, a: u128, b: u128) -> Option<u128> {
        let m = i.mnemonic();
        let r = match m {
            M::Addsd => sd(|x, y| nan64(x, y, |x, y| x + y), a, b),
            M::Subsd => sd(|x, y| nan64(x, y, |x, y| x - y), a, b),
            M::Mulsd => sd(|x, y| nan64(x, y, |x, y| x * y), a, b),
            M::Divsd => sd(|x, y| nan64(x, y, |x, y| x / y), a, b),
            M::Minsd => sd(min64, a, b),
            M::Maxsd => sd(max64, a, b),
            M::Sqrtsd => sd(|_, y| y.sqrt(), a, b),
            M::Addss => ss(|x, y| nan32(x, y, |x, y| x + y), a, b),
            M::Subss => ss(|x, y| nan32(x, y, |x, y| x - y), a, b),
            M::Mulss => ss(|x, y| nan32(x, y, |x, y| x * y), a, b),
            M::Divss => ss(|x, y| nan32(x, y, |x, y| x / y), a, b),
            M::Minss => ss(min32, a, b),
            M::Maxss => ss(max32, a, b),
            M::Sqrtss => ss(|_, y| y.sqrt(), a, b),
            M::Addpd => pd(|x, y| nan64(x, y, |x, y| x + y), a, b),
            M::Subpd => pd(|x, y| nan64(x, y, |x, y| x - y), a, b),
            M::Mulpd => pd(|x, y| nan64(x, y, |x, y| x * y), a, b),
            M::Divpd => pd(|x, y| nan64(x, y, |x, y| x / y), a, b),
            M::Minpd => pd(min64, a, b),
            M::Maxpd => pd(max64, a, b),
            M::Sqrtpd => pd(|_, y| y.sqrt(), a, b),
            M::Addps => ps(|x, y| nan32(x, y, |x, y| x + y), a, b),
            M::Subps => ps(|x, y| nan32(x, y, |x, y| x - y), a, b),
            M::Mulps => ps(|x, y| nan32(x, y, |x, y| x * y), a, b),
            M::Divps => ps(|x, y| nan32(x, y, |x, y| x / y), a, b),
            M::Minps => ps(min32, a, b),
            M::Maxps => ps(max32, a, b),
            M::Sqrtps => ps(|_, y| y.sqrt(), a, b),
            M::Cmpsd | M::Cmpss | M::Cmppd | M::Cmpps => {
                // Predicates 0-7 (SDM Vol. 2A "CMPPD" table): EQ, LT, LE, UNORD, NEQ, NLT, NLE, ORD.
                let p = i.immediate8() & 7;
                let t = |x: f64, y: f64| -> bool {
                    let r = match p & 3 {
                        0 => x == y,
                        1 => x < y,
                        2 => x <= y,
                        _ => x.is_nan() || y.is_nan(),
                    };
                    if p < 4 {
                        r
                    } else {
                        !r
                    }
                };
                match m {
                    M::Cmpsd => (a & !LO64) | if t(d(a, 0), d(b, 0)) { LO64 } else { 0 },
                    M::Cmpss => (a & !LO32) | if t(s(a, 0) as f64, s(b, 0) as f64) { LO32 } else { 0 },
                    M::Cmppd => (0..2).fold(0u128, |r, k| r | if t(d(a, k), d(b, k)) { LO64 << (64 * k) } else { 0 }),
                    _ => (0..4)
                        .fold(0u128, |r, k| r | if t(s(a, k) as f64, s(b, k) as f64) { LO32 << (32 * k) } else { 0 }),
                }
            }
            M::Cvtsi2sd | M::Cvtsi2ss => {
                let v = if self.op_size(i, 1) == 8 { b as u64 as i64 } else { b as u32 as i32 as i64 };
                if m == M::Cvtsi2sd {
                    (a & !LO64) | (v as f64).to_bits() as u128
                } else {
                    (a & !LO32) | (v as f32).to_bits() as u128
                }
            }
            M::Cvtss2sd => (a & !LO64) | (s(b, 0) as f64).to_bits() as u128,
            M::Cvtsd2ss => (a & !LO32) | (d(b, 0) as f32).to_bits() as u128,
            M::Cvtps2pd => (s(b, 0) as f64).to_bits() as u128 | (((s(b, 1) as f64).to_bits() as u128) << 64),
            M::Cvtpd2ps => (d(b, 0) as f32).to_bits() as u128 | (((d(b, 1) as f32).to_bits() as u128) << 32),
            M::Cvtdq2pd => {
                ((b as u32 as i32 as f64).to_bits() as u128)
                    | (((((b >> 32) as u32 as i32) as f64).to_bits() as u128) << 64)
            }
            M::Cvtdq2ps => {
                (0..4).fold(0u128, |r, k| r | ((((b >> (32 * k)) as u32 as i32 as f32).to_bits() as u128) << (32 * k)))
            }
            M::Cvttps2dq | M::Cvtps2dq => (0..4).fold(0u128, |r, k| {
                let f = s(b, k) as f64;
                let t = if m == M::Cvttps2dq { f.trunc() } else { f.round_ties_even() };
                r | ((f2i32(t) as u128) << (32 * k))
            }),
            M::Cvttpd2dq | M::Cvtpd2dq => (0..2).fold(0u128, |r, k| {
                let f = d(b, k);
                let t = if m == M::Cvttpd2dq { f.trunc() } else { f.round_ties_even() };
                r | ((f2i32(t) as u128) << (32 * k))
            }),
            _ => return None,
        };
        self.check_rounding();
        Some(r)
    }

    fn sse_binop(&mut self, i: &Instruction) -> Res<()> {
        let x = self.x0(i)?;
        // Legacy-SSE memory operands of full-width ops must be 16-byte aligned.
        if i.op_kind(1) == OpKind::Memory && i.memory_size().size() == 16 {
            self.aligned16(i)?;
        }
        let a = self.c.fpu.xmm[x];
        let b = self.rx(i, 1)?;
        if let Some(r) = self.sse_float(i, a, b) {
            self.c.fpu.xmm[x] = r;
            return Ok(());
        }
        match self.int_op(i, a, b, false) {
            Some(r) => {
                self.c.fpu.xmm[x] = r;
                Ok(())
            }
            None => self.unimpl(i, "SSE instruction not implemented"),
        }
    }

    /// The integer lane operations shared by the SSE2 (128-bit, `mmx` false) and MMX (64-bit, `mmx` true,
    /// operands zero-extended to 128 bits) forms: element-wise operations give the same low 64 bits either
    /// way; unpack, pack and shuffles depend on the register width and take `mmx` into account.
    fn int_op(&self, i: &Instruction, a: u128, b: u128, mmx: bool) -> Option<u128> {
        let m = i.mnemonic();
        let r = match m {
            M::Pxor | M::Xorps | M::Xorpd => a ^ b,
            M::Por | M::Orps | M::Orpd => a | b,
            M::Pand | M::Andps | M::Andpd => a & b,
            M::Pandn | M::Andnps | M::Andnpd => !a & b,
            M::Paddb => lanes(a, b, 1, u64::wrapping_add),
            M::Paddw => lanes(a, b, 2, u64::wrapping_add),
            M::Paddd => lanes(a, b, 4, u64::wrapping_add),
            M::Paddq => lanes(a, b, 8, u64::wrapping_add),
            M::Psubb => lanes(a, b, 1, u64::wrapping_sub),
            M::Psubw => lanes(a, b, 2, u64::wrapping_sub),
            M::Psubd => lanes(a, b, 4, u64::wrapping_sub),
            M::Psubq => lanes(a, b, 8, u64::wrapping_sub),
            M::Paddusb => lanes(a, b, 1, |x, y| (x + y).min(0xff)),
            M::Paddusw => lanes(a, b, 2, |x, y| (x + y).min(0xffff)),
            M::Psubusb | M::Psubusw => lanes(a, b, if m == M::Psubusb { 1 } else { 2 }, |x, y| x.saturating_sub(y)),
            M::Paddsb => lanes(a, b, 1, |x, y| sat_s(sx(x, 1) + sx(y, 1), 1)),
            M::Paddsw => lanes(a, b, 2, |x, y| sat_s(sx(x, 2) + sx(y, 2), 2)),
            M::Psubsb => lanes(a, b, 1, |x, y| sat_s(sx(x, 1) - sx(y, 1), 1)),
            M::Psubsw => lanes(a, b, 2, |x, y| sat_s(sx(x, 2) - sx(y, 2), 2)),
            M::Pmaddwd => lanes(a, b, 4, |x, y| {
                let lo = sx(x & 0xffff, 2) * sx(y & 0xffff, 2);
                let hi = sx(x >> 16, 2) * sx(y >> 16, 2);
                (lo + hi) as u64
            }),
            M::Pcmpeqb => lanes(a, b, 1, |x, y| if x == y { u64::MAX } else { 0 }),
            M::Pcmpeqw => lanes(a, b, 2, |x, y| if x == y { u64::MAX } else { 0 }),
            M::Pcmpeqd => lanes(a, b, 4, |x, y| if x == y { u64::MAX } else { 0 }),
            M::Pcmpgtb => lanes(a, b, 1, |x, y| if sx(x, 1) > sx(y, 1) { u64::MAX } else { 0 }),
            M::Pcmpgtw => lanes(a, b, 2, |x, y| if sx(x, 2) > sx(y, 2) { u64::MAX } else { 0 }),
            M::Pcmpgtd => lanes(a, b, 4, |x, y| if sx(x, 4) > sx(y, 4) { u64::MAX } else { 0 }),
            M::Pminub => lanes(a, b, 1, u64::min),
            M::Pmaxub => lanes(a, b, 1, u64::max),
            M::Pminsw => lanes(a, b, 2, |x, y| if sx(x, 2) < sx(y, 2) { x } else { y }),
            M::Pmaxsw => lanes(a, b, 2, |x, y| if sx(x, 2) > sx(y, 2) { x } else { y }),
            M::Pavgb => lanes(a, b, 1, |x, y| (x + y + 1) >> 1),
            M::Pavgw => lanes(a, b, 2, |x, y| (x + y + 1) >> 1),
            M::Pmullw => lanes(a, b, 2, |x, y| x.wrapping_mul(y)),
            M::Pmulhuw => lanes(a, b, 2, |x, y| (x * y) >> 16),
            M::Pmulhw => lanes(a, b, 2, |x, y| ((sx(x, 2) * sx(y, 2)) >> 16) as u64),
            M::Pmuludq => lanes(a, b, 8, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
            M::Psadbw => {
                let mut r = 0u128;
                for h in 0..2 {
                    let mut s = 0u64;
                    for k in 0..8 {
                        let sh = h * 64 + k * 8;
                        s += ((a >> sh) as u8).abs_diff((b >> sh) as u8) as u64;
                    }
                    r |= (s as u128) << (h * 64);
                }
                r
            }
            // The 64-bit forms interleave the low (high) halves of the 64-bit operands: the low (high) 64 bits
            // of the 128-bit low interleave.
            M::Punpcklbw | M::Punpcklwd | M::Punpckldq | M::Punpckhbw | M::Punpckhwd | M::Punpckhdq if mmx => {
                let w = match m {
                    M::Punpcklbw | M::Punpckhbw => 1,
                    M::Punpcklwd | M::Punpckhwd => 2,
                    _ => 4,
                };
                let r = unpack(a, b, w, false);
                if matches!(m, M::Punpckhbw | M::Punpckhwd | M::Punpckhdq) {
                    r >> 64
                } else {
                    r & LO64
                }
            }
            M::Punpcklbw => unpack(a, b, 1, false),
            M::Punpcklwd => unpack(a, b, 2, false),
            M::Punpckldq | M::Unpcklps => unpack(a, b, 4, false),
            M::Punpcklqdq | M::Unpcklpd => unpack(a, b, 8, false),
            M::Punpckhbw => unpack(a, b, 1, true),
            M::Punpckhwd => unpack(a, b, 2, true),
            M::Punpckhdq | M::Unpckhps => unpack(a, b, 4, true),
            M::Punpckhqdq | M::Unpckhpd => unpack(a, b, 8, true),
            M::Packuswb | M::Packsswb | M::Packssdw => {
                let (w, ow) = if m == M::Packssdw { (4, 2) } else { (2, 1) };
                let n = if mmx { 8 / w } else { 16 / w };
                let mut r = 0u128;
                for k in 0..2 * n {
                    let src = if k < n { a } else { b };
                    let v = sx((src >> ((k % n) * w * 8)) as u64 & ((1u64 << (w * 8)) - 1), w);
                    let s = if m == M::Packuswb { v.clamp(0, 255) as u64 } else { sat_s(v, ow) };
                    r |= (s as u128) << (k * ow * 8);
                }
                r
            }
            M::Pshufd | M::Shufps => {
                let imm = i.immediate8() as u32;
                let mut r = 0u128;
                for k in 0..4 {
                    let sel = (imm >> (2 * k)) & 3;
                    // PSHUFD picks all four dwords from the source; SHUFPS the low two from the destination.
                    let src = if m == M::Shufps && k < 2 { a } else { b };
                    r |= ((src >> (32 * sel)) & 0xffff_ffff) << (32 * k);
                }
                r
            }
            M::Shufpd => {
                let imm = i.immediate8();
                let lo = if imm & 1 != 0 { a >> 64 } else { a & u64::MAX as u128 };
                let hi = if imm & 2 != 0 { b >> 64 } else { b & u64::MAX as u128 };
                lo | (hi << 64)
            }
            M::Pshuflw | M::Pshufhw => {
                let imm = i.immediate8() as u32;
                let base = if m == M::Pshufhw { 64 } else { 0 };
                let half = (b >> base) as u64;
                let mut h = 0u64;
                for k in 0..4 {
                    h |= ((half >> (16 * ((imm >> (2 * k)) & 3))) & 0xffff) << (16 * k);
                }
                if m == M::Pshufhw {
                    (b & u64::MAX as u128) | ((h as u128) << 64)
                } else {
                    (b & !(u64::MAX as u128)) | h as u128
                }
            }
            M::Pshufw => {
                let imm = i.immediate8() as u32;
                (0..4).fold(0u128, |r, k| r | (((b >> (16 * ((imm >> (2 * k)) & 3))) & 0xffff) << (16 * k)))
            }
            M::Pslldq | M::Psrldq => {
                let n = i.immediate8().min(16) as u32 * 8;
                if n >= 128 {
                    0
                } else if m == M::Pslldq {
                    a << n
                } else {
                    a >> n
                }
            }
            M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad => {
                let cnt = if i.op_kind(1) == OpKind::Register || i.op_kind(1) == OpKind::Memory {
                    b as u64
                } else {
                    i.immediate8() as u64
                };
                let w = match m {
                    M::Psllw | M::Psrlw | M::Psraw => 2,
                    M::Pslld | M::Psrld | M::Psrad => 4,
                    _ => 8,
                };
                let bits = w as u64 * 8;
                match m {
                    M::Psllw | M::Pslld | M::Psllq => lanes(a, 0, w, |x, _| if cnt >= bits { 0 } else { x << cnt }),
                    M::Psrlw | M::Psrld | M::Psrlq => lanes(a, 0, w, |x, _| if cnt >= bits { 0 } else { x >> cnt }),
                    _ => lanes(a, 0, w, |x, _| (sx(x, w) >> cnt.min(bits - 1)) as u64),
                }
            }
            _ => return None,
        };
        Some(r)
    }
}
