//! Micro-benchmark: instructions per second of the interpreter on a few loop kernels.
//!
//! `cargo run -p tessera-swcpu --release --example mips`

use std::time::Instant;

use tessera_swcpu::{GuestRam, SoftVcpu};
use tessera_vcpu::{DescriptorTable, IoHandler, Regs, Segment, SpecialRegs, Vcpu};

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

/// (name, machine code of a loop body ending in `dec rcx; jnz start`).
fn kernels() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // add rax, rbx; xor rdx, rax; dec rcx; jnz
        ("alu", vec![0x48, 0x01, 0xd8, 0x48, 0x31, 0xc2, 0x48, 0xff, 0xc9, 0x75, 0xf5, 0xf4]),
        // mov rax, [rsi]; add [rdi], rax; dec rcx; jnz
        ("memory", vec![0x48, 0x8b, 0x06, 0x48, 0x01, 0x07, 0x48, 0xff, 0xc9, 0x75, 0xf5, 0xf4]),
        // push rax; pop rbx; call +0 ... (call next; pop rdx); dec rcx; jnz
        ("stack", vec![0x50, 0x5b, 0xe8, 0x00, 0x00, 0x00, 0x00, 0x5a, 0x48, 0xff, 0xc9, 0x75, 0xf3, 0xf4]),
    ]
}

fn main() {
    const RAM: usize = 4 << 20;
    let mut mem = vec![0u64; RAM / 8];
    let base = mem.as_mut_ptr() as *mut u8;
    let w = |off: usize, b: &[u8]| {
        // SAFETY: `off + b.len()` stays inside the RAM vector, which outlives every use here.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(off), b.len()) }
    };
    // Identity map 0..1 GiB with 2 MiB pages: PML4 0x1000, PDPT 0x2000, PD 0x3000.
    w(0x1000, &0x2003u64.to_le_bytes());
    w(0x2000, &0x3003u64.to_le_bytes());
    for e in 0..512u64 {
        w(0x3000 + e as usize * 8, &((e << 21) | 0x83).to_le_bytes());
    }
    for (name, code) in kernels() {
        w(0x10000, &code);
        // SAFETY: the vector lives until the end of main, after the CPU.
        let ram = unsafe { GuestRam::new(&[(0, base, RAM)]) }.expect("RAM");
        let mut cpu = SoftVcpu::new(ram);
        let cs = Segment {
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: true,
            s: true,
            l: true,
            g: true,
            ..Default::default()
        };
        let ds = Segment { selector: 0x10, type_: 3, l: false, db: true, ..cs };
        cpu.set_sregs(&SpecialRegs {
            cs,
            ds,
            es: ds,
            ss: ds,
            fs: ds,
            gs: ds,
            tr: Segment { limit: 0x67, type_: 0xb, present: true, ..Default::default() },
            ldt: Segment { unusable: true, ..Default::default() },
            gdt: DescriptorTable::default(),
            idt: DescriptorTable::default(),
            cr0: 0x8000_0011,
            cr3: 0x1000,
            cr4: 0x20,
            efer: 0x500,
            ..Default::default()
        })
        .expect("sregs");
        let n = 20_000_000u64;
        cpu.set_regs(&Regs {
            rip: 0x10000,
            rcx: n,
            rsi: 0x20000,
            rdi: 0x20100,
            rsp: 0x30000,
            rflags: 2,
            ..Default::default()
        })
        .expect("regs");
        cpu.set_instruction_budget(Some(200_000_000));
        let t = Instant::now();
        let exit = cpu.run(&NoIo).expect("run");
        let el = t.elapsed().as_secs_f64();
        let st = cpu.stats();
        println!(
            "{name:8} {:>6.1} MIPS ({} instructions in {el:.2} s, {} blocks decoded, exit {exit:?})",
            st.instructions as f64 / el / 1e6,
            st.instructions,
            st.blocks_decoded
        );
    }
}
