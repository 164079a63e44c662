//! CPUID for KVM vCPUs: what `KVM_GET_SUPPORTED_CPUID` offers, cut down to the `-cpu` model, with each vCPU's
//! topology fields (APIC IDs) filled in.

use kvm_bindings::kvm_cpuid_entry2;

use crate::Error;

/// The `-cpu` models the core accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuModel {
    /// Everything KVM can give (QEMU `-cpu host`).
    Host,
    /// With KVM the same as `host` (QEMU: "max" = all features the accelerator supports).
    Max,
    /// QEMU's default x86-64 model: the baseline features of QEMU target/i386/cpu.c `qemu64` definition.
    Qemu64,
}

impl CpuModel {
    pub fn parse(name: &str) -> Result<CpuModel, Error> {
        match name {
            "host" => Ok(CpuModel::Host),
            "max" => Ok(CpuModel::Max),
            "qemu64" => Ok(CpuModel::Qemu64),
            // QEMU's wording for an unknown model.
            other => Err(Error::Config(format!("unable to find CPU model '{other}'"))),
        }
    }
}

fn bits(list: &[u32]) -> u32 {
    list.iter().fold(0, |acc, b| acc | (1 << b))
}

// Leaf 1 EDX of qemu64: PPRO_FEATURES | MTRR | CLFLUSH | MCA | PSE36 (QEMU target/i386/cpu.c).
// FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH MMX FXSR SSE SSE2
const QEMU64_1_EDX: &[u32] = &[0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26];
// Leaf 1 ECX: SSE3, CX16, plus what QEMU adds under KVM: x2APIC (kvm_default_props) and the hypervisor bit.
const QEMU64_1_ECX: &[u32] = &[0, 13, 21, 31];
// 0x80000001 EDX: SYSCALL, NX, LM; ECX: LAHF_LM (qemu64's SVM is left out: no nested virtualisation).
const QEMU64_81_EDX: &[u32] = &[11, 20, 29];
const QEMU64_81_ECX: &[u32] = &[0];
const QEMU64_LEVEL: u32 = 0xd;
const QEMU64_XLEVEL: u32 = 0x8000_000a;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// The CPUID table for vCPU `index` of `smp`.
pub fn for_vcpu(supported: &[kvm_cpuid_entry2], model: CpuModel, index: u32, smp: u32) -> Vec<kvm_cpuid_entry2> {
    let mut out: Vec<kvm_cpuid_entry2> = supported.to_vec();
    if model == CpuModel::Qemu64 {
        out.retain(|e| {
            e.function <= QEMU64_LEVEL
                || (0x4000_0000..0x8000_0000).contains(&e.function)
                || (e.function >= 0x8000_0000 && e.function <= QEMU64_XLEVEL)
        });
        for e in out.iter_mut() {
            match e.function {
                0 => e.eax = e.eax.min(QEMU64_LEVEL),
                1 => {
                    e.edx &= bits(QEMU64_1_EDX);
                    e.ecx &= bits(QEMU64_1_ECX);
                }
                7 => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                0x8000_0000 => e.eax = e.eax.min(QEMU64_XLEVEL),
                0x8000_0001 => {
                    e.edx &= bits(QEMU64_81_EDX);
                    e.ecx &= bits(QEMU64_81_ECX);
                }
                _ => {}
            }
        }
    }
    for e in out.iter_mut() {
        match e.function {
            1 => {
                // EBX: initial APIC ID (31:24), logical processors per package (23:16), CLFLUSH line size in
                // 8-byte units (15:8) (SDM Vol. 2A, CPUID leaf 01H).
                e.ebx = (index << 24) | (8 << 8);
                if smp > 1 {
                    e.ebx |= smp.min(255) << 16;
                    e.edx |= LEAF1_EDX_HTT;
                }
                e.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            // x2APIC ID of this logical processor (leaves 0BH and 1FH, EDX).
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: r[0], ebx: r[1], ecx: r[2], edx: r[3], ..Default::default() }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x1f, 1, 2, 3]),
            entry(1, 0, [0x806f8, 0, 0xffff_ffff, 0xffff_ffff]),
            entry(7, 0, [0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            entry(0xb, 0, [1, 1, 0x100, 7]),
            entry(0x14, 0, [1, 1, 1, 1]),
            entry(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0xffff_ffff]),
            entry(0x8000_001f, 0, [1, 1, 1, 1]),
        ]
    }

    fn find(t: &[kvm_cpuid_entry2], f: u32) -> Option<&kvm_cpuid_entry2> {
        t.iter().find(|e| e.function == f)
    }

    #[test]
    fn qemu64_keeps_the_baseline_only() {
        let t = for_vcpu(&host(), CpuModel::Qemu64, 0, 1);
        assert_eq!(find(&t, 0).unwrap().eax, 0xd);
        assert_eq!(find(&t, 0x8000_0000).unwrap().eax, 0x8000_000a);
        assert!(find(&t, 0x14).is_none() && find(&t, 0x8000_001f).is_none());
        assert!(find(&t, 0x4000_0000).is_some(), "KVM paravirt leaves stay");
        let l1 = find(&t, 1).unwrap();
        assert_eq!(l1.ecx, (1 << 0) | (1 << 13) | (1 << 21) | (1 << 31));
        assert_eq!(l1.edx & (1 << 26), 1 << 26, "SSE2");
        assert_eq!(l1.edx & (1 << 28), 0, "no HTT with one vCPU");
        assert_eq!(l1.edx & (1 << 1), 0, "no VME");
        let l7 = find(&t, 7).unwrap();
        assert_eq!((l7.ebx, l7.ecx, l7.edx), (0, 0, 0));
        let e1 = find(&t, 0x8000_0001).unwrap();
        assert_eq!((e1.edx, e1.ecx), ((1 << 11) | (1 << 20) | (1 << 29), 1));
    }

    #[test]
    fn host_keeps_everything_and_sets_apic_ids() {
        let t = for_vcpu(&host(), CpuModel::Host, 3, 4);
        assert_eq!(t.len(), host().len());
        let l1 = find(&t, 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&t, 0xb).unwrap().edx, 3);
        assert_eq!(find(&t, 7).unwrap().ebx, 0xffff_ffff);
    }

    #[test]
    fn unknown_models_are_refused_in_qemus_words() {
        assert_eq!(CpuModel::parse("max").unwrap(), CpuModel::Max);
        assert_eq!(CpuModel::parse("pentium9").unwrap_err().to_string(), "unable to find CPU model 'pentium9'");
    }
}
