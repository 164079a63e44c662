//! The vCPU interface that the core's run loop, boot code and devices use, whichever engine runs the guest:
//! KVM (`tessera-core`'s `kvm` module) or Tessera's software CPU (`tessera-swcpu`).
//!
//! Port and MMIO accesses are served *during* [`Vcpu::run`] through an [`IoHandler`] callback, so an
//! interpreter can touch a device in the middle of an instruction (a `rep outsb`, an MMIO read-modify-write)
//! and KVM's exits are handled the same way. `run` returns only for events the run loop must decide on.

use std::fmt;

/// General-purpose registers, RIP and RFLAGS (the layout of KVM's `kvm_regs`, engine-neutral).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl fmt::Debug for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\nRSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\nR12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
             RIP={:016x} RFL={:08x}",
            self.rax,
            self.rbx,
            self.rcx,
            self.rdx,
            self.rsi,
            self.rdi,
            self.rbp,
            self.rsp,
            self.r8,
            self.r9,
            self.r10,
            self.r11,
            self.r12,
            self.r13,
            self.r14,
            self.r15,
            self.rip,
            self.rflags
        )
    }
}

/// A segment register with its hidden descriptor cache (the fields of KVM's `kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

/// GDTR/IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers (KVM's `kvm_sregs` without the interrupt bitmap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The parts of the x87/SSE state that boot code sets (FCW=0x37f, MXCSR=0x1f80 at reset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuControl {
    pub fcw: u16,
    pub mxcsr: u32,
}

impl Default for FpuControl {
    fn default() -> Self {
        Self { fcw: 0x37f, mxcsr: 0x1f80 }
    }
}

/// Devices as a vCPU sees them: port I/O and MMIO outside guest RAM. Called from the vCPU thread while
/// `run` is in progress. Reads of nothing return all ones (the handler fills `data`).
pub trait IoHandler: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// HLT with interrupts disabled and nothing that can wake it, or HLT on an engine that lets the run loop
    /// wait for an interrupt.
    Halted,
    /// The guest asked for a reset, or triple-faulted (QEMU resets; with `-no-reboot` it exits).
    Reset,
    /// The guest asked to power off (ACPI S5).
    PowerOff,
    /// Another thread asked this vCPU to stop running (pause, shutdown, backend swap).
    Interrupted,
    /// The engine met something it does not implement; the string names it and the guest address.
    Unsupported(String),
}

/// Errors of a vCPU engine itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{0}")]
    Engine(String),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, VcpuError>;

/// One virtual CPU. Implemented by the KVM vCPU and by the software CPU; the boot code sets the entry state
/// through the setters, the run loop calls [`Vcpu::run`] until it returns an exit to act on.
pub trait Vcpu: Send {
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<SpecialRegs>;
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    fn set_fpu_control(&mut self, fpu: &FpuControl) -> Result<()>;
    /// Write model-specific registers (index, value).
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()>;
    /// Run the guest until an exit the run loop must act on. Port and MMIO accesses go to `io`.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit>;
}
