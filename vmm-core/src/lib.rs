//! Tessera's core process: guest RAM (a memfd), the vCPUs (KVM, or Tessera's software CPU for `-accel tcg`),
//! kernel boot, and the device front halves.
//!
//! Modules: [`memory`] (RAM layout and memfd), [`boot`] (PVH ELF, bzImage, decompressed vmlinux), [`kvm`]
//! (VM, vCPUs, CPUID), [`tcg`] (the software CPU with the userspace PC platform), [`devices`] (bus, 16550A,
//! isa-debug-exit, i8042), [`runloop`] (engine-neutral vCPU threads and VM events), [`vm`] (configuration →
//! running VM, the control contract).
//!
//! # Engines
//! An engine implements [`runloop::Engine`]: `create_vcpus` returns fresh `Box<dyn tessera_vcpu::Vcpu>`s (index
//! 0 is the BSP), each with a [`runloop::VcpuKick`] that makes a running `run` return `VcpuExit::Interrupted`
//! soon; `irq_line(n)` returns the [`devices::serial::IrqLine`] a device pulses for ISA IRQ `n`;
//! `attach_devices` claims the engine's own ports on the core's bus; `acpi` says where its ACPI tables are.
//! [`vm::make_engine`] picks one per `Accel`:
//! * KVM ([`kvm::KvmEngine`]): in-kernel PIC/IOAPIC/PIT/LAPIC, the bzImage entered through the 64-bit boot
//!   protocol.
//! * The software CPU ([`tcg::TcgEngine`], QEMU's default accelerator): `tessera-swcpu` with `tessera-platform`
//!   (PIC, PIT, RTC/CMOS, ACPI PM, HPET, IOAPIC, LAPIC, ACPI tables at 0xe0000), time from an
//!   instruction-counting clock (see [`tcg`]), one vCPU. [`vm::linux_entry_for`] picks
//!   [`boot::LinuxEntry::Decompressed`] for it: a bzImage is unpacked on the host
//!   ([`boot::elf64::load_decompressed`]) and the BSP starts at the vmlinux's `startup_64`; a PVH ELF is entered
//!   in 32-bit protected mode as on KVM.
//!
//! The run loop applies the entry state through the `Vcpu` setters ([`boot::EntryState::apply`]) and serves
//! port/MMIO accesses through [`devices::Devices`] (the `IoHandler`; the software engine decodes the
//! platform's MMIO windows in front of it). `VcpuExit::Halted` makes the vCPU thread park until kicked (10 ms at
//! most); the software CPU idles inside `run` instead, woken by its platform's interrupts and timers.

pub mod boot;
pub mod devices;
pub mod guestlog;
pub mod kvm;
pub mod memory;
pub mod monitor;
pub mod pci;
pub mod runloop;
pub mod tcg;
pub mod virtio;
pub mod vm;

pub use vm::Vm;

/// Errors of the core. Messages are what the launcher prints after its `qemu-system-x86_64: ` prefix; where
/// QEMU has a message for the same case, it is QEMU's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("-m {}: guest RAM must be at least {} KiB", fmt_size(*size), min >> 10)]
    RamTooSmall { size: u64, min: u64 },
    #[error("-m {}: too large for this host's address space", fmt_size(*size))]
    RamTooLarge { size: u64 },
    #[error("cannot allocate {} of guest RAM: {}", fmt_size(*size), strerror(source))]
    Ram { size: u64, source: std::io::Error },
    #[error("cannot place {device} on the {bus} bus at {base:#x} (+{len:#x}): {reason}")]
    BusRange { bus: &'static str, device: &'static str, base: u64, len: u64, reason: String },
    #[error("could not read kernel file '{path}': {}", strerror(source))]
    ReadKernel { path: String, source: std::io::Error },
    #[error("could not read initrd file '{path}': {}", strerror(source))]
    ReadInitrd { path: String, source: std::io::Error },
    /// QEMU hw/i386/x86.c prints "qemu: invalid kernel header" for a file too short for its setup sectors.
    #[error("invalid kernel header")]
    InvalidKernelHeader,
    /// QEMU's message for an ELF without XEN_ELFNOTE_PHYS32_ENTRY.
    #[error("Error loading uncompressed kernel without PVH ELF Note")]
    NoPvhNote,
    #[error("-kernel {path}: cannot boot this image: {reason}")]
    UnsupportedKernel { path: String, reason: String },
    #[error("-kernel {path}: the kernel does not fit in guest RAM")]
    KernelDoesNotFit { path: String },
    #[error(
        "-kernel {path}: the kernel needs RAM up to {} to start, but the guest has {} (use a larger -m)",
        fmt_size(*need), fmt_size(*have)
    )]
    KernelNeedsRam { path: String, need: u64, have: u64 },
    /// QEMU's wording (hw/i386/x86.c), with the room left above the kernel as the maximum.
    #[error("initrd is too large, cannot support (max: {room}, need {size})")]
    InitrdDoesNotFit { size: u64, room: u64 },
    #[error("-append: {0}")]
    Cmdline(String),
    #[error("cannot write {what} at guest address {addr:#x}")]
    BootData { what: &'static str, addr: u64 },
    #[error("boot parameters: {0}")]
    BootConfig(String),
    #[error("no -kernel given: booting from firmware or disks is not supported yet; use -kernel")]
    NoKernel,
    /// QEMU: "failed to initialize kvm: No such file or directory".
    #[error("failed to initialize kvm: {}", strerror(.0))]
    KvmInit(std::io::Error),
    #[error("failed to initialize kvm: this KVM lacks {0}")]
    KvmMissing(&'static str),
    #[error("KVM: {what} failed: {}", strerror(source))]
    Kvm { what: &'static str, source: std::io::Error },
    #[error("{0}")]
    Vcpu(#[from] tessera_vcpu::VcpuError),
    #[error("cannot start {what}: {source}")]
    Thread { what: &'static str, source: std::io::Error },
    #[error("the launcher's configuration is inconsistent: {0}")]
    Fd(#[from] tessera_ipc::FdError),
    #[error("{0}")]
    Config(String),
}

/// An OS error as QEMU prints it: the C library's text without Rust's "(os error N)".
fn strerror(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}

fn fmt_size(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes & ((1 << 30) - 1) == 0 {
        format!("{}G", bytes >> 30)
    } else if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{}M", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes & ((1 << 10) - 1) == 0 {
        format!("{}K", bytes >> 10)
    } else {
        format!("{bytes}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_qemus() {
        let enoent = || std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(Error::KvmInit(enoent()).to_string(), "failed to initialize kvm: No such file or directory");
        assert_eq!(Error::InvalidKernelHeader.to_string(), "invalid kernel header");
        assert_eq!(
            Error::InitrdDoesNotFit { size: 100, room: 50 }.to_string(),
            "initrd is too large, cannot support (max: 50, need 100)"
        );
        assert_eq!(
            Error::ReadKernel { path: "/x".into(), source: enoent() }.to_string(),
            "could not read kernel file '/x': No such file or directory"
        );
        assert_eq!(
            Error::KernelNeedsRam { path: "bz".into(), need: 80 << 20, have: 64 << 20 }.to_string(),
            "-kernel bz: the kernel needs RAM up to 80M to start, but the guest has 64M (use a larger -m)"
        );
        assert_eq!(
            Error::RamTooSmall { size: 4096, min: MIN }.to_string(),
            "-m 4K: guest RAM must be at least 2048 KiB"
        );
    }

    const MIN: u64 = crate::memory::MIN_RAM;
}
