//! CPUID: an AMD-vendor feature set listing only what this CPU implements (fact sheet §3: the AMD vendor
//! avoids PTI and VERW in Linux; qemu64's table minus the features not implemented here).

use crate::cpu::Cpu;

const fn s4(s: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*s)
}

/// Leaf 1 EDX: FPU, TSC, MSR, PAE, CX8, APIC (when configured), PGE, CMOV, CLFSH, MMX, FXSR, SSE, SSE2
/// (glibc's x86-64 baseline ISA level needs CMOV, CX8, FPU, FXSR, MMX, SSE, SSE2).
/// Not advertised: DE, PSE, MCE, SEP, MTRR, MCA, PAT, PSE36 (fewer MSRs and paths to emulate).
const LEAF1_EDX: u32 = (1 << 0)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 15)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: CX16, hypervisor.
const LEAF1_ECX: u32 = (1 << 13) | (1 << 31);

pub(crate) fn cpuid(c: &Cpu, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let _ = sub;
    let apic = if c.msr_apic_advertised() { 1 << 9 } else { 0 };
    match leaf {
        0 => (0xd, s4(b"Auth"), s4(b"cAMD"), s4(b"enti")),
        // Family 15, model 107, stepping 1 (qemu64 since QEMU 6.1); CLFLUSH line 8*8 bytes, APIC ID 0.
        1 => (0x0006_0fb1, 0x0000_0800, LEAF1_ECX, LEAF1_EDX | apic),
        2..=0xd => (0, 0, 0, 0),
        0x8000_0000 => (0x8000_0008, s4(b"Auth"), s4(b"cAMD"), s4(b"enti")),
        // AMD mirrors the leaf-1 EDX bits 0-9,12-17,23,24; plus SYSCALL(11), NX(20), LM(29). ECX: LAHF_LM.
        0x8000_0001 => (0x0006_0fb1, 0, 1, (LEAF1_EDX & 0x0183_f3ff) | apic | (1 << 11) | (1 << 20) | (1 << 29)),
        0x8000_0002..=0x8000_0004 => {
            let name = b"Tessera software CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
            let o = (leaf - 0x8000_0002) as usize * 16;
            let w = |k: usize| u32::from_le_bytes([name[o + k], name[o + k + 1], name[o + k + 2], name[o + k + 3]]);
            (w(0), w(4), w(8), w(12))
        }
        0x8000_0005 => (0x01ff_01ff, 0x01ff_01ff, 0x4002_0140, 0x4002_0140),
        0x8000_0006 => (0, 0x4200_4200, 0x0200_8140, 0x0080_8140),
        0x8000_0007 => (0, 0, 0, 0),
        // 40-bit physical, 48-bit linear addresses.
        0x8000_0008 => (0x3028, 0, 0, 0),
        _ => (0, 0, 0, 0),
    }
}

impl Cpu {
    fn msr_apic_advertised(&self) -> bool {
        self.advertise_apic
    }
}
