//! Flag computation for the integer instructions (SDM Vol. 1 "EFLAGS Register", Vol. 2 per-instruction
//! "Flags Affected"). Flags are computed eagerly; undefined flags follow what AMD Zen hosts produce where the
//! differential test could observe it, otherwise they are left as documented below.

use crate::cpu::{AF, CF, OF, PF, SF, ZF};

#[inline]
pub(crate) fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

#[inline]
pub(crate) fn sign(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

#[inline]
pub(crate) fn sext(v: u64, size: usize) -> i64 {
    let sh = 64 - size * 8;
    ((v << sh) as i64) >> sh
}

#[inline]
pub(crate) fn szp(res: u64, size: usize) -> u64 {
    let mut f = 0;
    if res & mask(size) == 0 {
        f |= ZF;
    }
    if res & sign(size) != 0 {
        f |= SF;
    }
    if (res as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// a + b + carry: (result, flags).
#[inline]
pub(crate) fn add(a: u64, b: u64, carry: u64, size: usize) -> (u64, u64) {
    let m = mask(size);
    let wide = (a & m) as u128 + (b & m) as u128 + carry as u128;
    let res = (wide as u64) & m;
    let mut f = szp(res, size);
    if wide >> (size * 8) != 0 {
        f |= CF;
    }
    if (a ^ res) & (b ^ res) & sign(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// a - b - borrow: (result, flags).
#[inline]
pub(crate) fn sub(a: u64, b: u64, borrow: u64, size: usize) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let res = a.wrapping_sub(b).wrapping_sub(borrow) & m;
    let mut f = szp(res, size);
    if (a as u128) < b as u128 + borrow as u128 {
        f |= CF;
    }
    if (a ^ b) & (a ^ res) & sign(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// AND/OR/XOR/TEST: CF=OF=0, AF undefined (cleared, as AMD and Intel do).
#[inline]
pub(crate) fn logic(res: u64, size: usize) -> u64 {
    szp(res, size)
}

/// Shift/rotate group; `count` already masked to 5 or 6 bits and nonzero. Returns (result, new arithmetic
/// flags, which flags are written). Flags not written keep their value.
pub(crate) fn shift(op: u8, a: u64, count: u32, size: usize, old: u64) -> (u64, u64) {
    let bits = (size * 8) as u32;
    let m = mask(size);
    let a = a & m;
    let msb = |v: u64| (v >> (bits - 1)) & 1;
    let cf_in = old & CF;
    match op {
        // ROL
        0 => {
            let c = count % bits;
            let res = if c == 0 { a } else { ((a << c) | (a >> (bits - c))) & m };
            let cf = res & 1;
            let of = msb(res) ^ cf;
            (res, (old & !(CF | OF)) | cf | (of << 11))
        }
        // ROR
        1 => {
            let c = count % bits;
            let res = if c == 0 { a } else { ((a >> c) | (a << (bits - c))) & m };
            let cf = msb(res);
            let of = msb(res) ^ ((res >> (bits - 2)) & 1);
            (res, (old & !(CF | OF)) | cf | (of << 11))
        }
        // RCL
        2 => {
            let c = count % (bits + 1);
            let mut res = a;
            let mut cf = cf_in;
            for _ in 0..c {
                let out = msb(res);
                res = ((res << 1) | cf) & m;
                cf = out;
            }
            let of = msb(res) ^ cf;
            (res, (old & !(CF | OF)) | cf | (of << 11))
        }
        // RCR
        3 => {
            let c = count % (bits + 1);
            let mut res = a;
            let mut cf = cf_in;
            let of = msb(a) ^ cf_in;
            for _ in 0..c {
                let out = res & 1;
                res = (res >> 1) | (cf << (bits - 1));
                cf = out;
            }
            // OF is defined for 1-bit rotates as MSB(dest) XOR CF before the rotate.
            (res, (old & !(CF | OF)) | cf | (of << 11))
        }
        // SHL/SAL
        4 | 6 => {
            let wide = (a as u128) << count;
            let res = (wide as u64) & m;
            let cf = ((wide >> bits) & 1) as u64;
            let of = msb(res) ^ cf;
            (res, szp(res, size) | cf | (of << 11) | AF)
        }
        // SHR
        5 => {
            let res = if count >= 64 { 0 } else { a >> count };
            let cf = if count > 64 { 0 } else { (a >> (count - 1)) & 1 };
            let of = if count == 1 { msb(a) } else { 0 };
            (res, szp(res, size) | cf | (of << 11) | AF)
        }
        // SAR
        _ => {
            let s = sext(a, size);
            let res = (s >> count.min(63)) as u64 & m;
            let cf = ((s >> (count - 1).min(63)) & 1) as u64;
            (res, szp(res, size) | cf | AF)
        }
    }
}

/// Evaluates a condition code (SDM Vol. 1 "Jcc" condition table), numbered like the opcode's low nibble.
#[inline]
pub(crate) fn cond(cc: u8, f: u64) -> bool {
    let r = match cc >> 1 {
        0 => f & OF != 0,
        1 => f & CF != 0,
        2 => f & ZF != 0,
        3 => f & (CF | ZF) != 0,
        4 => f & SF != 0,
        5 => f & PF != 0,
        6 => (f & SF != 0) != (f & OF != 0),
        _ => f & ZF != 0 || ((f & SF != 0) != (f & OF != 0)),
    };
    r != (cc & 1 != 0)
}
