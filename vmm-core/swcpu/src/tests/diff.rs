//! Differential test: random single instructions run natively on the host CPU and on the software CPU from
//! the same registers, flags, XMM registers and memory; results must agree (up to flags the SDM leaves
//! undefined).
//!
//! How it works. A 32 KiB region is mapped RWX at the fixed host address `BASE` and is also guest RAM at the
//! same guest physical address (the guest identity-maps the low 4 GiB), so pointers in registers mean the
//! same thing on both sides. Instructions come from random bytes decoded by iced-x86, filtered to the
//! implemented families and re-encoded with memory operands rewritten to `[rbx + disp]` inside a data
//! buffer. The host side runs `prologue; insn; epilogue`: the prologue loads the register file from `IN`,
//! the epilogue stores it to `OUT` (RIP-independent absolute `[disp32]` addressing). Host faults arrive as
//! signals; the handler records trap number and error code from the ucontext and resumes at a recovery stub.
//! The soft side starts at the instruction at CPL 3 with the epilogue's first byte patched to INT3, so it
//! ends in the IDT's #BP handler (normal completion) or in another vector's handler (an exception).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, Encoder, Instruction, Mnemonic as M, OpKind, Register};
use tessera_vcpu::{Regs, SpecialRegs, Vcpu};

use super::guest::*;

const BASE: u64 = 0x5000_0000;
const LEN: usize = 0x8000;
const RECOVER: u64 = BASE + 0x800;
const SEQ: u64 = BASE + 0x1000;
const IN: u64 = BASE + 0x2000;
const OUT: u64 = BASE + 0x2100;
const HOST_RSP: u64 = BASE + 0x2200;
const XIN: u64 = BASE + 0x3000;
const XOUT: u64 = BASE + 0x3100;
/// FXSAVE images: the x87/MMX state loaded before (FXRSTOR) and stored after (FXSAVE) the code under test.
const FXIN: u64 = BASE + 0x3200;
const FXOUT: u64 = BASE + 0x3400;
const DATA: u64 = BASE + 0x4000;
const DATA_LEN: usize = 0x2000;
const RBX_VAL: u64 = DATA + 0x1000;
const STACK_TOP: u64 = BASE + 0x8000;
const RSP_VAL: u64 = BASE + 0x7800;

static LOCK: Mutex<()> = Mutex::new(());
static SIG: AtomicI64 = AtomicI64::new(0);
static TRAPNO: AtomicI64 = AtomicI64::new(0);
static ERR: AtomicI64 = AtomicI64::new(0);
static FAULT_RIP: AtomicI64 = AtomicI64::new(0);
static CR2: AtomicI64 = AtomicI64::new(0);

extern "C" fn on_signal(sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers; we only read and patch registers.
    unsafe {
        let uc = ctx as *mut libc::ucontext_t;
        let g = &mut (*uc).uc_mcontext.gregs;
        SIG.store(sig as i64, Ordering::SeqCst);
        TRAPNO.store(g[libc::REG_TRAPNO as usize], Ordering::SeqCst);
        ERR.store(g[libc::REG_ERR as usize], Ordering::SeqCst);
        FAULT_RIP.store(g[libc::REG_RIP as usize], Ordering::SeqCst);
        CR2.store(g[libc::REG_CR2 as usize], Ordering::SeqCst);
        g[libc::REG_RIP as usize] = RECOVER as i64;
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Register values biased towards edge cases.
    fn value(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << self.below(64),
            3 => (1u64 << self.below(64)).wrapping_sub(1),
            4 => self.below(256),
            5 => [0x7f, 0x80, 0x7fff, 0x8000, 0x7fff_ffff, 0x8000_0000, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000]
                [self.below(8) as usize],
            _ => self.next(),
        }
    }
}

fn gpr64() -> [AsmRegister64; 16] {
    [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15]
}

fn prologue() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r).unwrap();
    }
    a.mov(qword_ptr(HOST_RSP), rsp).unwrap();
    a.mov(rsp, qword_ptr(IN + 4 * 8)).unwrap();
    a.push(qword_ptr(IN + 16 * 8)).unwrap();
    a.popfq().unwrap();
    a.fxrstor64(ptr(FXIN)).unwrap();
    for (k, r) in gpr64().iter().enumerate() {
        if k != 4 {
            a.mov(*r, qword_ptr(IN + k as u64 * 8)).unwrap();
        }
    }
    for (k, x) in [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15]
        .iter()
        .enumerate()
    {
        a.movdqu(*x, xmmword_ptr(XIN + k as u64 * 16)).unwrap();
    }
    a.jmp(SEQ).unwrap();
    a.assemble(BASE).unwrap()
}

fn epilogue(ip: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    for (k, r) in gpr64().iter().enumerate() {
        a.mov(qword_ptr(OUT + k as u64 * 8), *r).unwrap();
    }
    a.pushfq().unwrap();
    a.pop(qword_ptr(OUT + 16 * 8)).unwrap();
    a.cld().unwrap();
    for (k, x) in [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15]
        .iter()
        .enumerate()
    {
        a.movdqu(xmmword_ptr(XOUT + k as u64 * 16), *x).unwrap();
    }
    // The MMX registers, TOP and the tags; then back to the empty x87 stack the Rust ABI expects.
    a.fxsave64(ptr(FXOUT)).unwrap();
    a.fninit().unwrap();
    a.mov(rsp, qword_ptr(HOST_RSP)).unwrap();
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r).unwrap();
    }
    a.ret().unwrap();
    a.assemble(ip).unwrap()
}

fn recover_stub() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.cld().unwrap();
    a.fninit().unwrap();
    a.mov(rsp, qword_ptr(HOST_RSP)).unwrap();
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r).unwrap();
    }
    a.ret().unwrap();
    a.assemble(RECOVER).unwrap()
}

/// Integer families covered (step 1) plus the SSE2 subset.
fn wanted(i: &Instruction) -> bool {
    use M::*;
    matches!(
        i.mnemonic(),
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shl
            | Sal
            | Shr
            | Sar
            | Shld
            | Shrd
            | Mul
            | Imul
            | Div
            | Idiv
            | Lea
            | Mov
            | Movzx
            | Movsx
            | Movsxd
            | Xchg
            | Cmpxchg
            | Cmpxchg8b
            | Cmpxchg16b
            | Xadd
            | Bswap
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Cbw
            | Cwde
            | Cdqe
            | Cwd
            | Cdq
            | Cqo
            | Clc
            | Stc
            | Cmc
            | Cld
            | Std
            | Lahf
            | Sahf
            | Push
            | Pop
            | Pushfq
            | Nop
            | Xlatb
            | Movsb
            | Movsw
            | Movsd
            | Movsq
            | Stosb
            | Stosw
            | Stosd
            | Stosq
            | Lodsb
            | Lodsw
            | Lodsd
            | Lodsq
            | Scasb
            | Scasw
            | Scasd
            | Scasq
            | Cmpsb
            | Cmpsw
            | Cmpsd
            | Cmpsq
            | Movaps
            | Movups
            | Movdqa
            | Movdqu
            | Movd
            | Movq
            | Movlpd
            | Movhpd
            | Movhps
            | Movlps
            | Pcmpeqb
            | Pcmpeqw
            | Pcmpeqd
            | Pcmpgtb
            | Pcmpgtw
            | Pcmpgtd
            | Pmovmskb
            | Pminub
            | Pmaxub
            | Pxor
            | Por
            | Pand
            | Pandn
            | Xorps
            | Andps
            | Orps
            | Paddb
            | Paddw
            | Paddd
            | Paddq
            | Psubb
            | Psubw
            | Psubd
            | Psubq
            | Pshufd
            | Pslldq
            | Psrldq
            | Punpcklbw
            | Punpcklwd
            | Punpckldq
            | Punpcklqdq
            | Punpckhbw
            | Punpckhwd
            | Punpckhdq
            | Punpckhqdq
            | Psllw
            | Pslld
            | Psllq
            | Psrlw
            | Psrld
            | Psrlq
            | Psraw
            | Psrad
            | Packuswb
            | Packsswb
            | Packssdw
            | Pshuflw
            | Pshufhw
            | Shufps
            | Pavgb
            | Psadbw
            | Pmullw
            | Pmuludq
            | Pextrw
            | Pinsrw
            | Addsd
            | Subsd
            | Mulsd
            | Divsd
            | Minsd
            | Maxsd
            | Sqrtsd
            | Addss
            | Subss
            | Mulss
            | Divss
            | Minss
            | Maxss
            | Sqrtss
            | Addpd
            | Subpd
            | Mulpd
            | Divpd
            | Minpd
            | Maxpd
            | Sqrtpd
            | Addps
            | Subps
            | Mulps
            | Divps
            | Minps
            | Maxps
            | Sqrtps
            | Cvtsi2sd
            | Cvtsi2ss
            | Cvtss2sd
            | Cvtsd2ss
            | Cvtps2pd
            | Cvtpd2ps
            | Cvtdq2pd
            | Cvtdq2ps
            | Cvttps2dq
            | Cvtps2dq
            | Cvttpd2dq
            | Cvtpd2dq
            | Cvttsd2si
            | Cvtsd2si
            | Cvttss2si
            | Cvtss2si
            | Comisd
            | Ucomisd
            | Comiss
            | Ucomiss
            | Cmppd
            | Cmpps
            | Cmpss
            | Paddsb
            | Paddsw
            | Psubsb
            | Psubsw
            | Pmaddwd
            | Pminsw
            | Pmaxsw
            | Pmulhw
            | Pmulhuw
            | Paddusb
            | Paddusw
            | Psubusb
            | Psubusw
            | Pavgw
            | Unpcklps
            | Unpckhps
            | Unpcklpd
            | Unpckhpd
            | Shufpd
            | Movhlps
            | Movlhps
            | Movmskps
            | Movmskpd
            | Andnps
            | Andpd
            | Orpd
            | Xorpd
            | Andnpd
            | Emms
            | Movq2dq
            | Movdq2q
            | Movntq
            | Pshufw
            | Cvtpi2ps
            | Cvtpi2pd
            | Cvtps2pi
            | Cvttps2pi
            | Cvtpd2pi
            | Cvttpd2pi
            | Maskmovq
            | Maskmovdqu
    )
}

/// Random instruction bytes biased to the opcode map areas of the implemented families.
fn random_bytes(rng: &mut Rng) -> [u8; 16] {
    let mut b = [0u8; 16];
    for x in b.iter_mut() {
        *x = rng.next() as u8;
    }
    let mut k = 0;
    if rng.below(4) == 0 {
        b[k] = [0x66, 0xf2, 0xf3, 0xf0, 0x67][rng.below(5) as usize];
        k += 1;
    }
    if rng.below(2) == 0 {
        b[k] = 0x40 | (rng.below(16) as u8);
        k += 1;
    }
    if rng.below(2) == 0 {
        b[k] = 0x0f;
        const OPS: &[u8] = &[
            0x40, 0x44, 0x4c, 0x4f, 0x90, 0x95, 0x9c, 0xa3, 0xab, 0xb3, 0xbb, 0xba, 0xa4, 0xa5, 0xac, 0xad, 0xaf, 0xb0,
            0xb1, 0xb6, 0xb7, 0xbe, 0xbf, 0xbc, 0xbd, 0xc0, 0xc1, 0xc7, 0xc8, 0xcb, 0x10, 0x11, 0x28, 0x29, 0x6f, 0x7f,
            0x6e, 0x7e, 0xd6, 0x12, 0x13, 0x16, 0x17, 0x74, 0x75, 0x76, 0x64, 0x65, 0x66, 0xd7, 0xda, 0xde, 0xef, 0xeb,
            0xdb, 0xdf, 0x57, 0x54, 0x56, 0xfc, 0xfd, 0xfe, 0xd4, 0xf8, 0xf9, 0xfa, 0xfb, 0x70, 0x73, 0x72, 0x71, 0x60,
            0x61, 0x62, 0x6c, 0x68, 0x69, 0x6a, 0x6d, 0xd1, 0xd2, 0xd3, 0xe1, 0xe2, 0xf1, 0xf2, 0xf3, 0x67, 0x63, 0x6b,
            0xc6, 0xe0, 0xf6, 0xd5, 0xf4, 0xc5, 0xc4, 0x58, 0x59, 0x5c, 0x5e, 0x5d, 0x5f, 0x51, 0x2a, 0x2c, 0x2d, 0x2e,
            0x2f, 0x5a, 0x5b, 0xe6, 0xc2, 0xe8, 0xe9, 0xec, 0xed, 0xf5, 0xea, 0xee, 0xe5, 0xe4, 0xdc, 0xdd, 0xd8, 0xd9,
            0xe3, 0x14, 0x15, 0x50, 0x55, 0x77, 0xe7, 0xf7,
        ];
        b[k + 1] = match rng.below(4) {
            // CMOVcc and SETcc over all 16 conditions.
            0 => 0x40 + rng.below(16) as u8,
            1 => 0x90 + rng.below(16) as u8,
            _ => OPS[rng.below(OPS.len() as u64) as usize],
        };
    } else {
        let ranges: [(u8, u8); 10] = [
            (0x00, 0x3f),
            (0x69, 0x6b),
            (0x80, 0x8b),
            (0x8d, 0x8d),
            (0x90, 0x9f),
            (0xa4, 0xaf),
            (0xc0, 0xc1),
            (0xd0, 0xd3),
            (0xf5, 0xf9),
            (0xfe, 0xff),
        ];
        let (lo, hi) = ranges[rng.below(ranges.len() as u64) as usize];
        b[k] = lo + (rng.below((hi - lo) as u64 + 1) as u8);
    }
    b
}

fn uses_rsp(i: &Instruction) -> bool {
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).full_register() == Register::RSP)
}

/// Flags the SDM leaves undefined for this instruction (masked out of the comparison).
fn undefined_flags(i: &Instruction, regs_in: &[u64; 17]) -> u64 {
    use crate::cpu::{AF, CF, OF, PF, SF, ZF};
    let count = || -> u64 {
        if i.op_count() < 2 {
            1
        } else if i.op_kind(i.op_count() - 1) == OpKind::Register {
            regs_in[1] & 0xff
        } else {
            i.immediate(i.op_count() - 1)
        }
    };
    let mask = |c: u64| {
        if i.op_kind(0) == OpKind::Register && i.op0_register().size() == 8 || i.memory_size().size() == 8 {
            c & 63
        } else {
            c & 31
        }
    };
    match i.mnemonic() {
        M::And | M::Or | M::Xor | M::Test => AF,
        M::Shl | M::Sal | M::Shr | M::Sar | M::Shld | M::Shrd => AF | if mask(count()) > 1 { OF } else { 0 },
        M::Rol | M::Ror | M::Rcl | M::Rcr if mask(count()) > 1 => OF,
        M::Mul | M::Imul => SF | ZF | AF | PF,
        M::Div | M::Idiv => CF | OF | SF | ZF | AF | PF,
        M::Bsf | M::Bsr => CF | OF | SF | AF | PF,
        M::Bt | M::Bts | M::Btr | M::Btc => OF | SF | AF | PF,
        _ => 0,
    }
}

struct Outcome {
    /// None = completed normally, Some(vector, error code).
    fault: Option<(u8, u64)>,
    /// CR2 after a #PF.
    cr2: u64,
    regs: [u64; 17],
    xmm: [u128; 16],
    /// x87/MMX state: FSW, abridged FTW, then ST(0)..ST(7) (10 bytes each), as FXSAVE lays them out.
    x87: X87,
    data: Vec<u8>,
    stack: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct X87 {
    fsw: u16,
    ftw: u8,
    st: [[u8; 10]; 8],
}

impl X87 {
    fn from_image(b: &[u8]) -> X87 {
        let mut st = [[0u8; 10]; 8];
        for (k, r) in st.iter_mut().enumerate() {
            r.copy_from_slice(&b[32 + 16 * k..42 + 16 * k]);
        }
        X87 { fsw: u16::from_le_bytes([b[2], b[3]]), ftw: b[4], st }
    }

    /// An FXRSTOR image with default control words and this state.
    fn image(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&0x37fu16.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.ftw;
        b[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for k in 0..8 {
            b[32 + 16 * k..42 + 16 * k].copy_from_slice(&self.st[k]);
        }
        b
    }
}

fn run_host(m: &Mapping, regs: &[u64; 17], xmm: &[u128; 16], x87: &X87) -> Outcome {
    m.write(FXIN - BASE, &x87.image());
    for (k, v) in regs.iter().enumerate() {
        m.w64(IN - BASE + k as u64 * 8, *v);
    }
    for (k, v) in xmm.iter().enumerate() {
        m.write(XIN - BASE + k as u64 * 16, &v.to_le_bytes());
    }
    SIG.store(0, Ordering::SeqCst);
    // SAFETY: BASE holds the prologue we assembled (a complete C-ABI function: it saves the callee-saved
    // registers and the host RSP, and the epilogue or the recovery stub restores them and returns). The code
    // under test touches only the test mapping (memory operands are rewritten to [rbx+disp] in DATA, the stack
    // is inside the mapping) and faults come back through the signal handler to the recovery stub.
    unsafe {
        let f: extern "C" fn() = std::mem::transmute(BASE as usize);
        f();
    }
    let fault = match SIG.load(Ordering::SeqCst) {
        0 => None,
        _ => Some((TRAPNO.load(Ordering::SeqCst) as u8, ERR.load(Ordering::SeqCst) as u64)),
    };
    let mut out = [0u64; 17];
    for (k, v) in out.iter_mut().enumerate() {
        *v = m.r64(OUT - BASE + k as u64 * 8);
    }
    let mut x = [0u128; 16];
    for (k, v) in x.iter_mut().enumerate() {
        let mut b = [0u8; 16];
        m.read(XOUT - BASE + k as u64 * 16, &mut b);
        *v = u128::from_le_bytes(b);
    }
    let mut fx = [0u8; 512];
    m.read(FXOUT - BASE, &mut fx);
    let x87 = X87::from_image(&fx);
    let mut data = vec![0u8; DATA_LEN];
    m.read(DATA - BASE, &mut data);
    let mut stack = vec![0u8; (STACK_TOP - RSP_VAL + 0x100) as usize];
    m.read(RSP_VAL - 0x100 - BASE, &mut stack);
    Outcome { fault, cr2: CR2.load(Ordering::SeqCst) as u64, regs: out, xmm: x, x87, data, stack }
}

fn run_soft(m: &Mapping, sys: &Mapping, regs: &[u64; 17], xmm: &[u128; 16], x87: &X87) -> Result<Outcome, String> {
    let mut cpu = make_cpu(sys, &[(BASE, m)], 3);
    // Only the test region is mapped (4 KiB pages), so stray accesses #PF like on the host.
    cpu.set_sregs(&SpecialRegs { cr3: DIFF_PML4, ..long_mode_sregs(3) }).unwrap();
    let g = regs;
    cpu.set_regs(&Regs {
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
        rip: SEQ,
        rflags: g[16],
    })
    .unwrap();
    for (k, v) in xmm.iter().enumerate() {
        cpu.set_xmm(k, *v);
    }
    {
        // FXSAVE's ST(k) is physical register (TOP + k) mod 8.
        let f = &mut cpu.cpu.fpu;
        f.fsw = x87.fsw;
        f.ftw = x87.ftw;
        let top = ((x87.fsw >> 11) & 7) as usize;
        for k in 0..8 {
            f.st[(top + k) & 7] = [0; 16];
            f.st[(top + k) & 7][..10].copy_from_slice(&x87.st[k]);
        }
    }
    cpu.set_instruction_budget(Some(100_000));
    let io = RecordingIo::default();
    let exit = cpu.run(&io).unwrap();
    let vector = halted_vector(&cpu, &exit)
        .ok_or_else(|| format!("soft CPU ended with {exit:?} at {:#x}", cpu.regs().unwrap().rip))?;
    let has_err = matches!(vector, 8 | 10..=14 | 17);
    let frame = KSTACK - 40 - if has_err { 8 } else { 0 };
    let o = frame - SYS_GPA;
    let err = if has_err { sys.r64(o) } else { 0 };
    let f = if has_err { o + 8 } else { o };
    let (frip, fflags, frsp) = (sys.r64(f), sys.r64(f + 16), sys.r64(f + 24));
    let r = cpu.regs().unwrap();
    let mut out = [
        r.rax, r.rcx, r.rdx, r.rbx, frsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        fflags,
    ];
    let fault = if vector == 3 { None } else { Some((vector, err)) };
    if fault.is_none() {
        // The host's epilogue starts right after the instruction: the trap frame's RIP is epilogue + 1.
        let _ = frip;
    } else {
        out[16] = fflags;
    }
    let mut x = [0u128; 16];
    for (k, v) in x.iter_mut().enumerate() {
        *v = cpu.xmm(k);
    }
    let mut data = vec![0u8; DATA_LEN];
    m.read(DATA - BASE, &mut data);
    let mut stack = vec![0u8; (STACK_TOP - RSP_VAL + 0x100) as usize];
    m.read(RSP_VAL - 0x100 - BASE, &mut stack);
    let fault_cr2 = cpu.sregs().unwrap().cr2;
    let f = &cpu.cpu.fpu;
    let top = ((f.fsw >> 11) & 7) as usize;
    let mut st = [[0u8; 10]; 8];
    for (k, r) in st.iter_mut().enumerate() {
        r.copy_from_slice(&f.st[(top + k) & 7][..10]);
    }
    let x87 = X87 { fsw: f.fsw, ftw: f.ftw, st };
    Ok(Outcome { fault, cr2: fault_cr2, regs: out, xmm: x, x87, data, stack })
}

/// Builds one test case from random bytes: decode, filter, rewrite memory operands, re-encode.
fn make_case(rng: &mut Rng) -> Option<(Instruction, Vec<u8>)> {
    let bytes = random_bytes(rng);
    let mut dec = Decoder::with_ip(64, &bytes, SEQ, DecoderOptions::NONE);
    let mut i = dec.decode();
    if i.is_invalid() || !wanted(&i) || uses_rsp(&i) {
        return None;
    }
    // `f3 0f bc/bd` decode as TZCNT/LZCNT, which the host (with BMI1/ABM) runs differently by design.
    if matches!(i.mnemonic(), M::Tzcnt | M::Lzcnt | M::Popcnt) {
        return None;
    }
    if i.segment_prefix() == Register::FS || i.segment_prefix() == Register::GS {
        i.set_segment_prefix(Register::None);
    }
    if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
        let addr32 = i.memory_base().size() == 4 || i.memory_index().size() == 4;
        i.set_memory_base(if addr32 { Register::EBX } else { Register::RBX });
        // A third of the cases also get an index, R12 scaled by 1-8 (R12 holds 0..0xff then, see
        // `INDEX_REG`), so the pre-decoded address forms of `fast` are compared too. Not for BT/BTS/BTR/BTC,
        // whose bit offset already moves the address.
        let index = rng.below(3) == 0 && !matches!(i.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc);
        if index {
            i.set_memory_index(if addr32 { Register::R12D } else { Register::R12 });
            i.set_memory_index_scale(1 << rng.below(4));
        } else {
            i.set_memory_index(Register::None);
            i.set_memory_index_scale(1);
        }
        let disp = (rng.below(0x1000) as i64 - 0x800) as u64;
        i.set_memory_displacement64(if addr32 { disp & 0xffff_ffff } else { disp });
        i.set_memory_displ_size(if addr32 { 4 } else { 8 });
    }
    let mut enc = Encoder::new(64);
    let len = enc.encode(&i, SEQ).ok()?;
    let code = enc.take_buffer();
    let mut dec = Decoder::with_ip(64, &code, SEQ, DecoderOptions::NONE);
    let i2 = dec.decode();
    if i2.is_invalid() || i2.len() != len {
        return None;
    }
    Some((i2, code))
}

/// The index register of rewritten memory operands (`make_case`): GPR 12, kept below 0x100 so that
/// `RBX_VAL + disp + R12 * 8` stays inside DATA.
const INDEX_REG: usize = 12;

/// Page tables (in the system area's spare pages) mapping the system area's 2 MiB page and the test region
/// with 4 KiB user pages, nothing else.
const DIFF_PML4: u64 = SYS_GPA + 0xa000;

fn build_diff_tables(sys: &Mapping) {
    let o = |g: u64| g - SYS_GPA;
    let (pdpt, pd0, pd1, pt) = (DIFF_PML4 + 0x1000, DIFF_PML4 + 0x2000, DIFF_PML4 + 0x3000, DIFF_PML4 + 0x4000);
    for p in [DIFF_PML4, pdpt, pd0, pd1, pt] {
        sys.write(o(p), &[0u8; 0x1000]);
    }
    sys.w64(o(DIFF_PML4), pdpt | 7);
    sys.w64(o(pdpt), pd0 | 7);
    sys.w64(o(pdpt) + 8 * (BASE >> 30), pd1 | 7);
    sys.w64(o(pd0), 0x87);
    sys.w64(o(pd1) + 8 * ((BASE >> 21) & 511), pt | 7);
    for k in 0..(LEN as u64 / 0x1000) {
        sys.w64(o(pt) + 8 * (((BASE >> 12) & 511) + k), (BASE + k * 0x1000) | 7);
    }
}

/// iced's `RflagsBits` (OF SF ZF AF CF PF) as RFLAGS bits.
fn iced_flags(b: u32) -> u64 {
    use crate::cpu::{AF, CF, OF, PF, SF, ZF};
    [(0x01, OF), (0x02, SF), (0x04, ZF), (0x08, AF), (0x10, CF), (0x20, PF)]
        .iter()
        .filter(|(i, _)| b & i != 0)
        .fold(0, |acc, (_, f)| acc | f)
}

/// A run of 2-6 random instructions (one block on the soft side, so the dead-flag elimination of `fast` is
/// exercised: early instructions whose flags a later one overwrites skip computing them). Returns the last
/// instruction, the code, and the flags left undefined at the end. Rejected: RBX writers before the last
/// instruction (RBX and R12 address the memory operands), instructions needing special register setups, count-in-CL
/// shifts (their flag effect depends on CL, which earlier instructions change), and flag reads while a flag is undefined.
fn make_sequence(rng: &mut Rng, regs: &[u64; 17]) -> Option<(Instruction, Vec<u8>, u64, String)> {
    let n = 2 + rng.below(5) as usize;
    let mut code = Vec::new();
    let mut undef = 0u64;
    let mut text = Vec::new();
    let mut last = None;
    for k in 0..n {
        let (i, c) = make_case(rng)?;
        let special = (0..i.op_count()).any(|n| {
            matches!(
                i.op_kind(n),
                OpKind::MemoryESRDI
                    | OpKind::MemoryESEDI
                    | OpKind::MemorySegRSI
                    | OpKind::MemorySegESI
                    | OpKind::MemorySegRDI
                    | OpKind::MemorySegEDI
            )
        }) || matches!(i.mnemonic(), M::Xlatb | M::Bt | M::Bts | M::Btr | M::Btc | M::Shld | M::Shrd);
        if special {
            return None;
        }
        let by_cl = matches!(i.mnemonic(), M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr)
            && i.op_count() == 2
            && i.op_kind(1) == OpKind::Register;
        if by_cl {
            return None;
        }
        if k + 1 < n {
            let writes_rbx = (0..i.op_count()).any(|n| {
                i.op_kind(n) == OpKind::Register
                    && matches!(i.op_register(n).full_register(), Register::RBX | Register::R12)
            });
            if writes_rbx || matches!(i.mnemonic(), M::Cmpxchg8b | M::Cmpxchg16b) {
                return None;
            }
        }
        if i.rflags_read() != 0 && undef != 0 {
            return None;
        }
        undef = (undef & !iced_flags(i.rflags_modified())) | undefined_flags(&i, regs);
        // The code of each instruction was encoded at SEQ: only RIP-independent forms can move.
        let mut dec = Decoder::with_ip(64, &c, SEQ + code.len() as u64, DecoderOptions::NONE);
        let moved = dec.decode();
        if moved.is_invalid() || moved.memory_base() == Register::RIP || moved.is_ip_rel_memory_operand() {
            return None;
        }
        text.push(format!("{i}"));
        code.extend_from_slice(&c);
        last = Some(moved);
    }
    Some((last?, code, undef, text.join("; ")))
}

#[test]
fn differential_random_instructions() {
    differential(false);
}

/// Like `differential_random_instructions`, with sequences of instructions executed as one block.
#[test]
fn differential_random_sequences() {
    differential(true);
}

fn differential(sequences: bool) {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mapping::new(LEN, Some(BASE));
    let sys = build_system_area();
    build_diff_tables(&sys);
    m.write(0, &prologue());
    m.write(RECOVER - BASE, &recover_stub());
    let mut old = [std::mem::MaybeUninit::<libc::sigaction>::uninit(); 5];
    let sigs = [libc::SIGSEGV, libc::SIGFPE, libc::SIGILL, libc::SIGBUS, libc::SIGTRAP];
    for (k, s) in sigs.iter().enumerate() {
        // SAFETY: installing a SA_SIGINFO handler that only touches atomics and the ucontext; the previous
        // handlers are restored at the end of the test.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigaction(*s, &sa, old[k].as_mut_ptr());
        }
    }
    let only: Option<String> = std::env::var("SWCPU_DIFF_ONLY").ok();
    let seed = std::env::var("SWCPU_DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1234_5678_9abc_def1u64);
    let cases: usize = std::env::var("SWCPU_DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut rng = Rng(seed);
    let mut failures = Vec::new();
    let mut tested = 0usize;
    let mut faults = 0usize;
    let mut seen = std::collections::BTreeSet::new();
    while tested < cases {
        let mut seq_regs = [0u64; 17];
        let mut seq_undef = 0;
        let mut seq_text = String::new();
        let (insn, code) = if sequences {
            for r in seq_regs.iter_mut() {
                *r = rng.value();
            }
            seq_regs[INDEX_REG] = rng.below(0x100);
            let Some((i, c, u, t)) = make_sequence(&mut rng, &seq_regs) else { continue };
            seq_undef = u;
            seq_text = t;
            (i, c)
        } else {
            let Some(c) = make_case(&mut rng) else { continue };
            c
        };
        if only.as_ref().is_some_and(|o| !format!("{insn}").starts_with(o.as_str())) {
            continue;
        }
        tested += 1;
        seen.insert(format!("{:?}", insn.mnemonic()));
        let mut regs = [0u64; 17];
        for r in regs.iter_mut() {
            *r = rng.value();
        }
        if sequences {
            regs = seq_regs;
        }
        regs[3] = RBX_VAL;
        regs[INDEX_REG] = rng.below(0x100);
        // Sometimes point the memory operand at unmapped memory (on both sides) to compare #PF delivery.
        if rng.below(16) == 0 {
            regs[3] = BASE + 0x9000 + rng.below(0x1000);
        }
        regs[4] = RSP_VAL;
        let strings = (0..insn.op_count()).any(|n| {
            matches!(
                insn.op_kind(n),
                OpKind::MemoryESRDI
                    | OpKind::MemoryESEDI
                    | OpKind::MemorySegRSI
                    | OpKind::MemorySegESI
                    | OpKind::MemorySegRDI
                    | OpKind::MemorySegEDI
            )
        });
        if (strings || insn.mnemonic() == M::Xlatb) && !sequences {
            regs[6] = DATA + 0x400 + rng.below(0x200);
            regs[7] = DATA + 0x1000 + rng.below(0x200);
            regs[1] = rng.below(48);
            // Overlapping copies (byte-replicating forward MOVS) and page-crossing destinations.
            match rng.below(4) {
                0 => regs[7] = regs[6] + rng.below(16),
                1 => regs[7] = DATA + 0xfe0 + rng.below(0x20),
                _ => {}
            }
            regs[0] = if rng.below(2) == 0 { rng.value() } else { 0 };
        }
        // A register bit offset moves a memory operand by offset/8 bytes: keep it inside DATA so the
        // instruction cannot hit the harness's code or register areas.
        if matches!(insn.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
            && !sequences
            && insn.op_kind(0) == OpKind::Memory
            && insn.op_kind(1) == OpKind::Register
        {
            let idx = insn.op1_register().full_register() as usize - Register::RAX as usize;
            if idx == 3 {
                // The offset register is the base register itself: the address would leave DATA.
                continue;
            }
            regs[idx] = (rng.below(8192) as i64 - 4096) as u64;
        }
        let df = if rng.below(4) == 0 { crate::cpu::DF } else { 0 };
        regs[16] = (rng.next() & crate::cpu::ARITH) | df | 0x202;
        // 16-bit SHLD/SHRD with a count above 16 is undefined (SDM Vol. 2B "SHLD").
        if matches!(insn.mnemonic(), M::Shld | M::Shrd) && insn.memory_size().size() == 2
            || matches!(insn.mnemonic(), M::Shld | M::Shrd) && insn.op0_register().size() == 2
        {
            let c = if insn.op_kind(2) == OpKind::Immediate8 { insn.immediate8() as u64 } else { regs[1] & 0xff };
            if c & 31 > 16 {
                continue;
            }
        }
        let mut xmm = [0u128; 16];
        for x in xmm.iter_mut() {
            *x = (rng.value() as u128) << 64 | rng.value() as u128;
        }
        // Random TOP (no pending exceptions), tags, and register contents: MMX-looking ones (exponent all ones)
        // or arbitrary.
        let mut st = [[0u8; 10]; 8];
        for r in st.iter_mut() {
            r[..8].copy_from_slice(&rng.value().to_le_bytes());
            let e = if rng.below(2) == 0 { 0xffff } else { rng.next() as u16 };
            r[8..].copy_from_slice(&e.to_le_bytes());
        }
        let x87 = X87 { fsw: (rng.below(8) as u16) << 11, ftw: rng.next() as u8, st };
        let mut data = vec![0u8; DATA_LEN];
        for d in data.iter_mut() {
            *d = rng.next() as u8;
        }
        let mut stack = vec![0u8; (STACK_TOP - RSP_VAL + 0x100) as usize];
        for d in stack.iter_mut() {
            *d = rng.next() as u8;
        }
        let reset = |m: &Mapping| {
            m.write(DATA - BASE, &data);
            m.write(RSP_VAL - 0x100 - BASE, &stack);
        };
        m.write(SEQ - BASE, &code);
        let epi = SEQ + code.len() as u64;
        m.write(epi - BASE, &epilogue(epi));
        reset(&m);
        let host = run_host(&m, &regs, &xmm, &x87);
        reset(&m);
        m.write(epi - BASE, &[0xcc]);
        let soft = match run_soft(&m, &sys, &regs, &xmm, &x87) {
            Ok(o) => o,
            Err(e) => {
                let insn = if sequences { seq_text.clone() } else { format!("{insn}") };
                failures.push(format!("{insn} ({:02x?}): {e}", code));
                continue;
            }
        };
        let mut why = Vec::new();
        if host.fault.map(|f| f.0) != soft.fault.map(|f| f.0) {
            why.push(format!("fault host {:?} soft {:?}", host.fault, soft.fault));
        } else if let (Some((v, he)), Some((_, se))) = (host.fault, soft.fault) {
            faults += 1;
            // #PF: error code (P/W/U/I-D; Linux adds nothing else for user faults) and CR2 must match.
            if v == 14 && (he != se || host.cr2 != soft.cr2) {
                why.push(format!("#PF host err {he:#x} cr2 {:#x}, soft err {se:#x} cr2 {:#x}", host.cr2, soft.cr2));
            }
            // #GP: the error code (a selector for segment loads, else 0).
            if v == 13 && he != se {
                why.push(format!("#GP host err {he:#x}, soft err {se:#x}"));
            }
        } else {
            let names = [
                "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
                "r15",
            ];
            for k in 0..16 {
                if host.regs[k] != soft.regs[k] {
                    why.push(format!(
                        "{} host {:#x} soft {:#x} (in {:#x})",
                        names[k], host.regs[k], soft.regs[k], regs[k]
                    ));
                }
            }
            let undef = if sequences { seq_undef } else { undefined_flags(&insn, &regs) };
            let fm = !undef & 0xcd5;
            if host.regs[16] & fm != soft.regs[16] & fm {
                why.push(format!(
                    "rflags host {:#x} soft {:#x} (in {:#x}, compared {fm:#x})",
                    host.regs[16], soft.regs[16], regs[16]
                ));
            }
            for k in 0..16 {
                if host.xmm[k] != soft.xmm[k] {
                    why.push(format!("xmm{k} host {:#x} soft {:#x}", host.xmm[k], soft.xmm[k]));
                }
            }
            if host.x87 != soft.x87 {
                why.push(format!("x87/MMX state host {:x?} soft {:x?}", host.x87, soft.x87));
            }
            if host.data != soft.data {
                let at = host.data.iter().zip(&soft.data).position(|(a, b)| a != b).unwrap_or(0);
                why.push(format!("memory differs at {:#x}", DATA + at as u64));
            }
            // The host epilogue's PUSHFQ writes just below the final RSP; compare from there up.
            let keep = (host.regs[4] - (RSP_VAL - 0x100)) as usize;
            if host.stack[keep..] != soft.stack[keep..] {
                why.push("stack differs".into());
            }
        }
        if !why.is_empty() {
            let insn = if sequences { seq_text.clone() } else { format!("{insn}") };
            failures.push(format!("{insn} ({:02x?}): {}", code, why.join("; ")));
        }
    }
    for (k, s) in sigs.iter().enumerate() {
        // SAFETY: restoring the handlers saved above.
        unsafe { libc::sigaction(*s, old[k].as_ptr(), std::ptr::null_mut()) };
    }
    eprintln!(
        "differential (sequences: {sequences}): {tested} cases, {faults} faulting on both, {} mnemonics: {:?}",
        seen.len(),
        seen
    );
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(40);
        panic!("{n} mismatches of {tested}:\n{}", failures.join("\n"));
    }
}
