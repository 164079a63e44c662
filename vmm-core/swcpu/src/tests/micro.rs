//! Micro-guests: small 64-bit programs assembled with iced-x86, run on the software CPU inside the harness
//! of `guest.rs`, checked through port output, the halting handler and the exception frame.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use iced_x86::code_asm::*;
use tessera_vcpu::{Regs, Vcpu, VcpuExit};

use super::guest::*;
use crate::{InterruptSource, SoftVcpu};

const CODE: u64 = 0x10_0000;
const CODE_LEN: usize = 0x10000;
const STACK: u64 = CODE + 0xf000;

struct Guest {
    cpu: SoftVcpu,
    io: RecordingIo,
    sys: Mapping,
    mem: Mapping,
    exit: VcpuExit,
}

impl Guest {
    fn serial(&self) -> Vec<u8> {
        self.io.out.lock().unwrap().iter().filter(|(p, _)| *p == 0x3f8).flat_map(|(_, d)| d.clone()).collect()
    }
    fn vector(&self) -> Option<u8> {
        halted_vector(&self.cpu, &self.exit)
    }
    /// Reads a qword of guest memory in the code region or the system area.
    fn r64(&self, gpa: u64) -> u64 {
        if gpa >= CODE {
            self.mem.r64(gpa - CODE)
        } else {
            self.sys.r64(gpa - SYS_GPA)
        }
    }
}

fn run(asm: &mut CodeAssembler, cpl: u8, setup: impl FnOnce(&mut SoftVcpu)) -> Guest {
    let code = asm.assemble(CODE).expect("assemble");
    let sys = build_system_area();
    let mem = Mapping::new(CODE_LEN, None);
    mem.write(0, &code);
    let mut cpu = make_cpu(&sys, &[(CODE, &mem)], cpl);
    cpu.set_regs(&Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() }).unwrap();
    setup(&mut cpu);
    cpu.set_instruction_budget(Some(1_000_000));
    let io = RecordingIo::default();
    let exit = cpu.run(&io).unwrap();
    Guest { cpu, io, sys, mem, exit }
}

fn asm() -> CodeAssembler {
    CodeAssembler::new(64).unwrap()
}

#[test]
fn serial_output_with_out_and_rep_outsb() {
    let mut a = asm();
    let mut msg = a.create_label();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, b'H' as u32).unwrap();
    a.out(dx, al).unwrap();
    a.lea(rsi, ptr(msg)).unwrap();
    a.mov(ecx, 5u32).unwrap();
    a.rep().outsb().unwrap();
    a.mov(dx, 0x3fdu32).unwrap();
    a.in_(al, dx).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut msg).unwrap();
    a.db(b"ello!").unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.exit, VcpuExit::Halted, "HLT with IF=0 returns Halted");
    assert_eq!(g.serial(), b"Hello!\x60");
}

#[test]
fn divide_error_pushes_faulting_rip() {
    let mut a = asm();
    a.mov(eax, 1u32).unwrap();
    a.xor(ecx, ecx).unwrap();
    let div_ip = CODE + 7;
    a.div(ecx).unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.vector(), Some(0));
    // Same CPL, no IST: the frame is on the current stack, 16-byte aligned.
    let frame = STACK - 40;
    assert_eq!(g.r64(frame), div_ip, "#DE is a fault: RIP of the DIV");
    assert_eq!(g.r64(frame + 8), 0x10, "CS");
}

#[test]
fn page_fault_error_code_cr2_and_invlpg() {
    // Map 0x4000_0000 (PD1 entry 0) as a 2 MiB page, touch it, then mark it not present: the stale TLB entry
    // may still be used, but after INVLPG the write must fault with error code 2 and CR2 = the address.
    let pd1 = PML4 + 0x3000;
    let target = 0x4000_0010u64;
    let mut a = asm();
    a.mov(rbx, target).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap();
    a.mov(rcx, pd1).unwrap();
    a.mov(qword_ptr(rcx), 0i32).unwrap();
    a.invlpg(byte_ptr(rbx)).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.vector(), Some(14));
    let frame = STACK - 48;
    assert_eq!(g.r64(frame), 2, "error code: write, supervisor, not present");
    assert_eq!(g.cpu.sregs().unwrap().cr2, target);
    let pd0_entry = g.r64(PML4 + 0x2000);
    assert_ne!(pd0_entry & 0x20, 0, "accessed bit set on the code's 2 MiB page");
}

#[test]
fn user_fetch_from_nx_page_sets_id_bit() {
    // Mark the stack's 2 MiB page NX (EFER.NXE is set) and jump there from CPL 3: #PF with P|U|I/D = 0x15.
    let sys = build_system_area();
    let mem = Mapping::new(CODE_LEN, None);
    let mut a = asm();
    a.mov(rax, 0x20_0000u64 + 0x100).unwrap();
    a.jmp(rax).unwrap();
    mem.write(0, &a.assemble(CODE).unwrap());
    // PD0 entry 1 (2..4 MiB) gets XD.
    let e = sys.r64(PML4 + 0x2000 + 8 - SYS_GPA);
    sys.w64(PML4 + 0x2000 + 8 - SYS_GPA, e | (1 << 63));
    let mut cpu = make_cpu(&sys, &[(CODE, &mem)], 3);
    cpu.set_regs(&Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() }).unwrap();
    let io = RecordingIo::default();
    let exit = cpu.run(&io).unwrap();
    assert_eq!(halted_vector(&cpu, &exit), Some(14));
    assert_eq!(sys.r64(KSTACK - 48 - SYS_GPA), 0x15);
    assert_eq!(cpu.sregs().unwrap().cr2, 0x20_0100);
}

#[test]
fn syscall_sysret_swapgs_round_trip() {
    let mut a = asm();
    let mut kernel = a.create_label();
    // User part (CPL 3).
    a.mov(eax, b'*' as u32).unwrap();
    a.mov(r11, 0u64).unwrap();
    a.syscall().unwrap();
    let mut after = a.create_label();
    a.set_label(&mut after).unwrap();
    a.mov(edx, 0x1234u32).unwrap();
    a.int3().unwrap();
    // Kernel part: SWAPGS, port output, SWAPGS back, SYSRETQ.
    a.set_label(&mut kernel).unwrap();
    a.swapgs().unwrap();
    a.mov(r12, rcx).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.swapgs().unwrap();
    a.sysretq().unwrap();
    let res = a.assemble_options(CODE, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS).unwrap();
    let lstar = res.label_ip(&kernel).unwrap();
    let ret_ip = res.label_ip(&after).unwrap();
    let g = run(&mut a, 3, |cpu| {
        cpu.set_msrs(&[
            (0xc000_0081, 0x0023_0010_0000_0000),
            (0xc000_0082, lstar),
            (0xc000_0084, 0x0025_7fd5),
            (0xc000_0102, 0xdead_0000),
        ])
        .unwrap();
    });
    assert_eq!(g.serial(), b"*");
    assert_eq!(g.vector(), Some(3), "back in user mode, INT3 reached the #BP handler");
    let r = g.cpu.regs().unwrap();
    assert_eq!(r.rdx, 0x1234);
    assert_eq!(r.r12, ret_ip, "SYSCALL put the return RIP in RCX");
    let frame = KSTACK - 40;
    assert_eq!(g.r64(frame + 8), 0x33, "user CS after SYSRETQ");
    assert_eq!(g.r64(frame + 32), 0x2b, "user SS after SYSRETQ");
    assert_eq!(g.cpu.sregs().unwrap().gs.base, 0, "GS base swapped back");
}

struct OneShot {
    vector: u8,
    raised: AtomicBool,
}
impl InterruptSource for OneShot {
    fn pending(&self) -> bool {
        !self.raised.load(Ordering::SeqCst)
    }
    fn acknowledge(&self) -> Option<u8> {
        (!self.raised.swap(true, Ordering::SeqCst)).then_some(self.vector)
    }
}

#[test]
fn sti_shadow_then_hlt_wakes_on_interrupt() {
    let mut a = asm();
    a.nop().unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |cpu| {
        cpu.set_interrupt_source(Arc::new(OneShot { vector: 0x40, raised: AtomicBool::new(false) }))
    });
    assert_eq!(g.vector(), Some(0x40));
    // The interrupt was held off by the STI shadow, so it arrived after the first HLT (which it woke).
    assert_eq!(g.r64(STACK - 40), CODE + 3, "saved RIP is after the first HLT");
    assert_ne!(g.r64(STACK - 40 + 16) & 0x200, 0, "saved RFLAGS has IF");
}

#[test]
fn self_modifying_code_is_seen() {
    let mut a = asm();
    let mut target = a.create_label();
    a.call(target).unwrap();
    a.lea(rbx, ptr(target)).unwrap();
    a.mov(byte_ptr(rbx + 1), b'B' as u32).unwrap();
    a.call(target).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut target).unwrap();
    a.mov(al, b'A' as u32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.ret().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.serial(), b"AB");
    assert!(g.cpu.stats().code_page_invalidations >= 1);
}

#[test]
fn iretq_to_user_then_int_gate_switches_to_rsp0() {
    let mut a = asm();
    let mut user = a.create_label();
    a.lea(rax, ptr(user)).unwrap();
    a.push(0x2bi32).unwrap();
    a.push(STACK as i32 - 0x800).unwrap();
    a.push(0x202i32).unwrap();
    a.push(0x33i32).unwrap();
    a.push(rax).unwrap();
    a.iretq().unwrap();
    a.set_label(&mut user).unwrap();
    a.mov(ebx, 7u32).unwrap();
    a.int(0x80).unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.vector(), Some(0x80));
    let frame = KSTACK - 40;
    assert_eq!(g.r64(frame + 8), 0x33);
    assert_eq!(g.r64(frame + 24), STACK - 0x800, "user RSP saved");
    assert_eq!(g.r64(frame + 32), 0x2b);
    assert_eq!(g.cpu.regs().unwrap().rsp, frame, "stack switched to TSS.RSP0");
    assert_eq!(g.cpu.regs().unwrap().rbx, 7);
}

#[test]
fn fault_during_delivery_becomes_double_fault_on_ist() {
    // Mark the #GP gate not present, then raise #GP: delivering it raises #NP (contributory on
    // contributory) so the CPU delivers #DF, whose gate uses IST1.
    let mut a = asm();
    a.mov(rcx, IDT + 13 * 16 + 5).unwrap();
    a.mov(byte_ptr(rcx), 0x0eu32).unwrap();
    a.mov(rax, 0x8000_0000_0000_0000u64).unwrap();
    a.mov(rax, qword_ptr(rax)).unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.vector(), Some(8));
    assert_eq!(g.cpu.regs().unwrap().rsp, IST1_STACK - 48, "#DF frame on the IST1 stack");
    assert_eq!(g.r64(IST1_STACK - 48), 0, "#DF error code is 0");
}

#[test]
fn triple_fault_resets() {
    let mut a = asm();
    a.mov(rcx, IDTR_ZERO).unwrap();
    a.lidt(ptr(rcx)).unwrap();
    a.ud2().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.exit, VcpuExit::Reset);
}
const IDTR_ZERO: u64 = CODE + 0x800;

#[test]
fn unimplemented_instruction_is_reported_with_address() {
    let mut a = asm();
    a.nop().unwrap();
    // x87 arithmetic is not implemented yet: `fadd st, st(1)`.
    a.db(&[0xd8, 0xc1]).unwrap();
    let g = run(&mut a, 0, |_| {});
    match g.exit {
        VcpuExit::Unsupported(s) => assert!(s.contains("fadd") && s.contains("0x100001"), "{s}"),
        e => panic!("expected Unsupported, got {e:?}"),
    }
}

#[test]
fn cpuid_reports_amd_long_mode_and_no_avx() {
    let mut a = asm();
    a.mov(eax, 0x8000_0001u32).unwrap();
    a.cpuid().unwrap();
    a.mov(r8, rdx).unwrap();
    a.mov(eax, 1u32).unwrap();
    a.cpuid().unwrap();
    a.mov(r9, rcx).unwrap();
    a.mov(r10, rdx).unwrap();
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    let r = g.cpu.regs().unwrap();
    assert_eq!((r.rbx as u32, r.rdx as u32, r.rcx as u32), (0x6874_7541, 0x6974_6e65, 0x444d_4163), "AuthenticAMD");
    assert_ne!(r.r8 & (1 << 29), 0, "LM");
    assert_ne!(r.r8 & (1 << 20), 0, "NX");
    assert_eq!(r.r9 & (1 << 28), 0, "no AVX");
    assert_eq!(r.r9 & (1 << 26), 0, "no XSAVE");
    let need = (1 << 0) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 15) | (1 << 24) | (1 << 25) | (1 << 26);
    assert_eq!(r.r10 & need, need, "Linux's required leaf-1 EDX features");
    // glibc's x86-64 baseline ISA level (sysdeps/x86/get-isa-level.h): CMOV, CX8, FPU, FXSR, MMX, SSE, SSE2.
    let baseline = (1 << 15) | (1 << 8) | (1 << 0) | (1 << 24) | (1 << 23) | (1 << 25) | (1 << 26);
    assert_eq!(r.r10 & baseline, baseline, "glibc's baseline in leaf 1 EDX");
    assert_ne!(r.r8 & (1 << 23), 0, "MMX mirrored in 0x8000_0001 EDX");
}

/// MMX registers alias the x87 registers (SDM Vol. 1 §9.5): FXSAVE stores MMn in the ST slot of physical
/// register n with an all-ones exponent and all tags valid after an MMX instruction, EMMS empties the tags,
/// and FXRSTOR brings the values back.
#[test]
fn mmx_state_lives_in_the_x87_registers_and_fxsave_image() {
    let img = CODE + 0x8000;
    let img2 = CODE + 0x8400;
    let mut a = asm();
    a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
    a.movq(mm3, rax).unwrap();
    a.mov(rbx, img).unwrap();
    a.fxsave64(ptr(rbx)).unwrap();
    a.emms().unwrap();
    a.mov(rbx, img2).unwrap();
    a.fxsave64(ptr(rbx)).unwrap();
    a.pxor(mm3, mm3).unwrap();
    a.mov(rbx, img).unwrap();
    a.fxrstor64(ptr(rbx)).unwrap();
    a.movq(rcx, mm3).unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.exit, VcpuExit::Halted);
    assert_eq!(g.cpu.regs().unwrap().rcx, 0x1122_3344_5566_7788, "MM3 restored by FXRSTOR");
    assert_eq!(g.r64(img) >> 32 & 0xff, 0xff, "all tags valid after MOVQ");
    assert_eq!(g.r64(img) >> 27 & 7, 0, "TOP 0");
    assert_eq!(g.r64(img + 32 + 16 * 3), 0x1122_3344_5566_7788, "MM3 in ST slot 3");
    assert_eq!(g.r64(img + 40 + 16 * 3) & 0xffff, 0xffff, "exponent all ones");
    assert_eq!(g.r64(img2) >> 32 & 0xff, 0, "EMMS empties the tags");
}

/// CR0.EM=1 makes MMX instructions (EMMS too) #UD; CR0.TS=1 makes them #NM (SDM Vol. 2 "PADDB", "EMMS").
#[test]
fn mmx_faults_with_cr0_em_and_ts() {
    for (bit, insn, vector) in [(4u32, 0, 6u8), (4, 1, 6), (8, 0, 7), (8, 1, 7)] {
        let mut a = asm();
        a.mov(rax, cr0).unwrap();
        a.or(eax, bit).unwrap();
        a.mov(cr0, rax).unwrap();
        if insn == 0 {
            a.paddb(mm0, mm1).unwrap();
        } else {
            a.emms().unwrap();
        }
        a.hlt().unwrap();
        let g = run(&mut a, 0, |_| {});
        assert_eq!(g.vector(), Some(vector), "CR0 bit {bit:#x}, instruction {insn}");
    }
}

#[test]
fn kick_from_another_thread_interrupts_a_spinning_guest() {
    let mut a = asm();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.inc(rax).unwrap();
    a.jmp(top).unwrap();
    let code = a.assemble(CODE).unwrap();
    let sys = build_system_area();
    let mem = Mapping::new(CODE_LEN, None);
    mem.write(0, &code);
    let mut cpu = make_cpu(&sys, &[(CODE, &mem)], 0);
    cpu.set_regs(&Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() }).unwrap();
    let h = cpu.handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        h.kick();
    });
    let exit = cpu.run(&RecordingIo::default()).unwrap();
    t.join().unwrap();
    assert_eq!(exit, VcpuExit::Interrupted);
    assert!(cpu.regs().unwrap().rax > 0);
}

struct Line {
    raised: AtomicBool,
    taken: AtomicBool,
}
impl InterruptSource for Line {
    fn pending(&self) -> bool {
        self.raised.load(Ordering::SeqCst) && !self.taken.load(Ordering::SeqCst)
    }
    fn acknowledge(&self) -> Option<u8> {
        (!self.taken.swap(true, Ordering::SeqCst)).then_some(0x50)
    }
}

#[test]
fn hlt_with_interrupts_enabled_waits_for_a_line_raised_later() {
    let mut a = asm();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let sys = build_system_area();
    let mem = Mapping::new(CODE_LEN, None);
    mem.write(0, &code);
    let mut cpu = make_cpu(&sys, &[(CODE, &mem)], 0);
    cpu.set_regs(&Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() }).unwrap();
    let line = Arc::new(Line { raised: AtomicBool::new(false), taken: AtomicBool::new(false) });
    cpu.set_interrupt_source(line.clone());
    let h = cpu.handle();
    let l2 = line.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        l2.raised.store(true, Ordering::SeqCst);
        h.wake();
    });
    let exit = cpu.run(&RecordingIo::default()).unwrap();
    t.join().unwrap();
    assert_eq!(halted_vector(&cpu, &exit), Some(0x50), "the HLT waited inside run and took the interrupt");
    assert_eq!(mem.r64(STACK - 40 - CODE), CODE + 2, "return address is after the first HLT");
}

#[test]
fn code_changed_by_dma_is_seen_after_a_tlb_flush() {
    let mut a = asm();
    let mut target = a.create_label();
    a.mov(rax, cr3).unwrap();
    a.mov(cr3, rax).unwrap();
    a.call(target).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut target).unwrap();
    a.mov(al, b'A' as u32).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.out(dx, al).unwrap();
    a.ret().unwrap();
    let mut g = run(&mut a, 0, |_| {});
    assert_eq!(g.serial(), b"A");
    // A device rewrites the immediate of `mov al, 'A'` directly in guest RAM (no CPU store).
    let code = g.mem.read_vec(0, 64);
    let at = code.windows(2).position(|w| w == [0xb0, b'A']).expect("mov al, 'A'") + 1;
    g.mem.write(at as u64, b"B");
    g.cpu.set_regs(&Regs { rip: CODE, rsp: STACK, rflags: 2, ..Default::default() }).unwrap();
    let exit = g.cpu.run(&g.io).unwrap();
    assert_eq!(exit, VcpuExit::Halted);
    assert_eq!(g.serial(), b"AB", "the MOV CR3 flush made the CPU re-check the code page");
}

#[test]
fn cmpxchg16b_success_and_failure() {
    let mut a = asm();
    let slot = CODE + 0x800;
    a.mov(rsi, slot).unwrap();
    // Memory holds 1:2. Compare with RDX:RAX = 2:1 -> equal, store RCX:RBX = 4:3.
    a.mov(qword_ptr(rsi), 1i32).unwrap();
    a.mov(qword_ptr(rsi + 8), 2i32).unwrap();
    a.mov(eax, 1u32).unwrap();
    a.mov(edx, 2u32).unwrap();
    a.mov(ebx, 3u32).unwrap();
    a.mov(ecx, 4u32).unwrap();
    a.lock().cmpxchg16b(xmmword_ptr(rsi)).unwrap();
    a.setz(r8b).unwrap();
    // Now compare with 2:1 again -> not equal, RDX:RAX gets the current 4:3.
    a.mov(eax, 1u32).unwrap();
    a.mov(edx, 2u32).unwrap();
    a.lock().cmpxchg16b(xmmword_ptr(rsi)).unwrap();
    a.setz(r9b).unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.exit, VcpuExit::Halted);
    let r = g.cpu.regs().unwrap();
    assert_eq!((r.r8 & 0xff, r.r9 & 0xff), (1, 0), "ZF after success, then after failure");
    assert_eq!((r.rax, r.rdx), (3, 4), "failure loads the memory value into RDX:RAX");
    assert_eq!((g.r64(slot), g.r64(slot + 8)), (3, 4));
}

/// Loops with dead flag results inside their blocks (IMUL, ADD and SHR flags overwritten before any read) and
/// chained blocks (the loop body links to itself): the registers must match the same computation done in Rust.
#[test]
fn loops_with_dead_flags_and_chained_blocks() {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut a = asm();
    let mut l1 = a.create_label();
    let mut l2 = a.create_label();
    a.mov(ecx, 1000u32).unwrap();
    a.xor(eax, eax).unwrap();
    a.mov(edx, 1u32).unwrap();
    a.mov(rbx, K).unwrap();
    a.set_label(&mut l1).unwrap();
    a.imul_2(rdx, rbx).unwrap();
    a.add(rax, rdx).unwrap();
    a.mov(rsi, rax).unwrap();
    a.shr(rsi, 7u32).unwrap();
    a.xor(rax, rsi).unwrap();
    a.sub(ecx, 1u32).unwrap();
    a.jne(l1).unwrap();
    a.xor(r8d, r8d).unwrap();
    a.mov(r9d, 500u32).unwrap();
    a.set_label(&mut l2).unwrap();
    a.add(r8, 3i32).unwrap();
    a.cmp(r8, r9).unwrap();
    a.jb(l2).unwrap();
    // CF from the last SUB, carried into ADC across the block boundary: flags at block ends stay exact.
    a.mov(r10d, 5u32).unwrap();
    a.sub(r10d, 6u32).unwrap();
    a.mov(r11d, 0u32).unwrap();
    a.adc(r11d, 0u32).unwrap();
    a.hlt().unwrap();
    let g = run(&mut a, 0, |_| {});
    assert_eq!(g.exit, VcpuExit::Halted);
    let (mut acc, mut prod) = (0u64, 1u64);
    for _ in 0..1000 {
        prod = prod.wrapping_mul(K);
        acc = acc.wrapping_add(prod);
        acc ^= acc >> 7;
    }
    let r = g.cpu.regs().unwrap();
    assert_eq!((r.rax, r.rdx, r.rcx), (acc, prod, 0));
    assert_eq!((r.r8, r.r9), (501, 500));
    assert_eq!((r.r10, r.r11), (0xffff_ffff, 1));
    // The loop blocks were decoded once each and then reached through links or the cache.
    assert!(g.cpu.stats().blocks_decoded < 10, "{:?}", g.cpu.stats());
}
