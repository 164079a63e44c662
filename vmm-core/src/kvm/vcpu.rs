//! A KVM vCPU behind [`tessera_vcpu::Vcpu`]: port and MMIO exits are served through the [`IoHandler`] inside
//! `run`, which returns only for what the run loop decides on (reset, power-off, a kick).
//!
//! Kicking: [`KvmKick::kick`] sets the vCPU's stop flag and sends [`kick_signal`] to its thread. The signal
//! handler sets `kvm_run.immediate_exit` of the vCPU running on that thread, so a signal that lands between the
//! flag check and the `KVM_RUN` ioctl still makes the ioctl return at once (KVM API, "immediate_exit").

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::{kvm_dtable, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use tessera_vcpu::{
    DescriptorTable, FpuControl, IoHandler, Regs, Result, Segment, SpecialRegs, Vcpu, VcpuError, VcpuExit,
};

use crate::runloop::VcpuKick;

thread_local! {
    /// The `kvm_run` area of the vCPU running on this thread, for the kick signal handler.
    static RUNNING: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks vCPU threads out of `KVM_RUN` (the first real-time signal glibc leaves free).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only async-signal-safe work here: a thread-local read and a store into the mapped kvm_run page.
    let _ = RUNNING.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: `p` is set by `KvmVcpu::run` on this thread to its own kvm_run mapping and cleared before
            // run returns, so it points to a live mapping; a byte store is atomic with respect to this thread.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

/// Install the kick handler once per process (without SA_RESTART: `KVM_RUN` must return EINTR).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value that is then filled in; `on_kick` is
        // async-signal-safe (see above).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// What another thread needs to stop a running vCPU.
pub struct KvmKick {
    stop: AtomicBool,
    /// `pthread_t` of the thread running the vCPU, 0 while unknown.
    thread: AtomicU64,
}

impl VcpuKick for KvmKick {
    fn kick(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of a vCPU thread; the run loop joins vCPU threads only after it stops
            // kicking them, so the thread exists. A failed pthread_kill has no effect to undo.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    kick: Arc<KvmKick>,
}

impl KvmVcpu {
    pub fn new(fd: VcpuFd, index: u32) -> KvmVcpu {
        KvmVcpu { fd, index, kick: Arc::new(KvmKick { stop: AtomicBool::new(false), thread: AtomicU64::new(0) }) }
    }

    pub fn kicker(&self) -> Arc<KvmKick> {
        self.kick.clone()
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn os(what: &'static str, e: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Os { what, source: std::io::Error::from_raw_os_error(e.errno()) }
    }

    fn run_loop(&mut self, io: &dyn IoHandler, run: *mut kvm_run) -> Result<VcpuExit> {
        loop {
            if self.kick.stop.swap(false, Ordering::SeqCst) {
                return Ok(VcpuExit::Interrupted);
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    KvmExit::IoIn(port, data) => {
                        // SAFETY: `run` is this vCPU's kvm_run mapping; after an IO exit the `io` member of the
                        // union is the valid one (KVM API, KVM_EXIT_IO).
                        let size = unsafe { (*run).__bindgen_anon_1.io.size } as usize;
                        for chunk in data.chunks_mut(size.max(1)) {
                            io.pio_read(port, chunk);
                        }
                    }
                    KvmExit::IoOut(port, data) => {
                        // SAFETY: as above.
                        let size = unsafe { (*run).__bindgen_anon_1.io.size } as usize;
                        for chunk in data.chunks(size.max(1)) {
                            io.pio_write(port, chunk);
                        }
                    }
                    KvmExit::MmioRead(addr, data) => io.mmio_read(addr, data),
                    KvmExit::MmioWrite(addr, data) => io.mmio_write(addr, data),
                    // Only without an in-kernel LAPIC; the run loop decides how to wait.
                    KvmExit::Hlt => return Ok(VcpuExit::Halted),
                    // A triple fault (SDM Vol. 3 §6.15, "Double Fault Exception": a fault while delivering #DF
                    // shuts the processor down) is a reset on a PC.
                    KvmExit::Shutdown => return Ok(VcpuExit::Reset),
                    KvmExit::SystemEvent(kind, _) => match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => return Ok(VcpuExit::Reset),
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => return Ok(VcpuExit::PowerOff),
                        other => {
                            return Ok(VcpuExit::Unsupported(format!(
                                "KVM system event {other} on vCPU {}",
                                self.index
                            )))
                        }
                    },
                    KvmExit::Intr => {}
                    KvmExit::FailEntry(reason, cpu) => {
                        return Err(VcpuError::Engine(format!(
                            "KVM could not enter the guest on vCPU {} (host CPU {cpu}, hardware reason {reason:#x})",
                            self.index
                        )))
                    }
                    KvmExit::InternalError => {
                        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the union is valid.
                        let suberror = unsafe { (*run).__bindgen_anon_1.internal.suberror };
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        return Ok(VcpuExit::Unsupported(format!(
                            "KVM internal error {suberror} on vCPU {} at RIP {rip:#x}{}",
                            self.index,
                            if suberror == 1 { " (instruction emulation failed)" } else { "" }
                        )));
                    }
                    other => return Ok(VcpuExit::Unsupported(format!("KVM exit {other:?} on vCPU {}", self.index))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => return Err(Self::os("KVM_RUN", e)),
            }
        }
    }
}

impl Vcpu for KvmVcpu {
    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(|e| Self::os("KVM_GET_REGS", e))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        let k = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&k).map_err(|e| Self::os("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let s = self.fd.get_sregs().map_err(|e| Self::os("KVM_GET_SREGS", e))?;
        Ok(SpecialRegs {
            cs: seg_from_kvm(&s.cs),
            ds: seg_from_kvm(&s.ds),
            es: seg_from_kvm(&s.es),
            fs: seg_from_kvm(&s.fs),
            gs: seg_from_kvm(&s.gs),
            ss: seg_from_kvm(&s.ss),
            tr: seg_from_kvm(&s.tr),
            ldt: seg_from_kvm(&s.ldt),
            gdt: DescriptorTable { base: s.gdt.base, limit: s.gdt.limit },
            idt: DescriptorTable { base: s.idt.base, limit: s.idt.limit },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegs) -> Result<()> {
        // Start from KVM's own state so the pending-interrupt bitmap is kept as it is.
        let mut k: kvm_sregs = self.fd.get_sregs().map_err(|e| Self::os("KVM_GET_SREGS", e))?;
        k.cs = seg_to_kvm(&s.cs);
        k.ds = seg_to_kvm(&s.ds);
        k.es = seg_to_kvm(&s.es);
        k.fs = seg_to_kvm(&s.fs);
        k.gs = seg_to_kvm(&s.gs);
        k.ss = seg_to_kvm(&s.ss);
        k.tr = seg_to_kvm(&s.tr);
        k.ldt = seg_to_kvm(&s.ldt);
        k.gdt = kvm_dtable { base: s.gdt.base, limit: s.gdt.limit, ..Default::default() };
        k.idt = kvm_dtable { base: s.idt.base, limit: s.idt.limit, ..Default::default() };
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        k.apic_base = s.apic_base;
        self.fd.set_sregs(&k).map_err(|e| Self::os("KVM_SET_SREGS", e))
    }

    fn set_fpu_control(&mut self, fpu: &FpuControl) -> Result<()> {
        let mut f = self.fd.get_fpu().map_err(|e| Self::os("KVM_GET_FPU", e))?;
        f.fcw = fpu.fcw;
        f.mxcsr = fpu.mxcsr;
        self.fd.set_fpu(&f).map_err(|e| Self::os("KVM_SET_FPU", e))
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let list = Msrs::from_entries(&entries).map_err(|e| VcpuError::Engine(format!("MSR list: {e:?}")))?;
        let done = self.fd.set_msrs(&list).map_err(|e| Self::os("KVM_SET_MSRS", e))?;
        if done != msrs.len() {
            return Err(VcpuError::Engine(format!(
                "KVM refused MSR {:#x} (wrote {done} of {})",
                msrs[done].0,
                msrs.len()
            )));
        }
        Ok(())
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.kick.thread.store(me, Ordering::SeqCst);
        let run: *mut kvm_run = self.fd.get_kvm_run();
        RUNNING.with(|p| p.set(run));
        let result = self.run_loop(io, run);
        RUNNING.with(|p| p.set(std::ptr::null_mut()));
        self.kick.thread.store(0, Ordering::SeqCst);
        result
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}
