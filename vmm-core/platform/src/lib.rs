//! PC platform devices modelled in userspace, for Tessera's software CPU (KVM has them in the
//! kernel): 8259A pair + ELCR, 8254 PIT + port 0x61, MC146818 RTC/CMOS, ACPI PM1a/PM timer,
//! PIIX reset control (0xcf9), HPET, IOAPIC, one xAPIC LAPIC per CPU, and the ACPI tables
//! describing them (the HPET table only if asked for).
//!
//! Engine-neutral: no KVM, no bus types. Each device has `read`/`write` on its register window
//! and takes time from one [`GuestClock`]; [`Platform`] wires them together (see
//! [`platform`] for the interrupt routing and the exact CPU-side semantics).
//!
//! # How the core uses it
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use tessera_platform::{CpuInterrupts, GuestClock, Platform, PlatformConfig, Tsc};
//!
//! let clock = GuestClock::host(); // or GuestClock::virtual_clock(start_unix_secs)
//! let cfg = PlatformConfig { cpus: 1, ram_below_4g: 512 << 20, ram_above_4g: 0, pm_timer_32bit: false };
//! let platform = Arc::new(Mutex::new(Platform::new(clock.clone(), &cfg)?));
//! let tsc = Tsc::new(clock.clone(), 2_000_000_000)?; // RDTSC; pass tsc_early_khz=2000000
//!
//! // Bus adapter (per vCPU, cpu = its index): ports in tessera_platform::platform::PORT_RANGES,
//! // MMIO at the LAPIC base (per CPU, follows MSR 0x1b) and IOAPIC_MMIO.
//! let mut data = [0u8; 1];
//! let handled = platform.lock().unwrap().pio_read(0x61, &mut data);
//!
//! // Devices the core owns (UARTs) drive their IRQ lines, like a KVM irqfd:
//! let com1_irq = tessera_platform::IsaIrq::new(&platform, 4)?;
//! com1_irq.pulse();
//!
//! // The CPU side of vCPU 0 (what the software CPU's InterruptSource wraps):
//! let irq = CpuInterrupts::new(&platform, 0).unwrap();
//! // at an instruction boundary with IF=1 and no STI/MOV-SS shadow:
//! if irq.pending() {
//!     if let Some(vector) = irq.acknowledge() {
//!         // deliver `vector` through the IDT
//!     }
//! }
//! // HLT with IF=1: sleep (host clock) or jump (virtual clock) to the next timer deadline,
//! // waking early for an interrupt; then check `pending` again.
//! irq.idle(None);
//! # Ok::<(), tessera_platform::PlatformError>(())
//! ```
//!
//! # Checked against Linux 6.1
//!
//! Debian's 6.1.0-56 kernel, run on the software CPU (the swcpu branch's `linux-boot` example
//! with this crate as its bus, a vm-superio 16550 on IRQ4 through [`IsaIrq`], the ACPI tables at
//! 0xe0000 and `acpi_rsdp_addr` set), reached a busybox `/init` and ended the VM in each mode:
//!
//! | command line (plus `console=ttyS0 nokaslr tsc_early_khz=1000000`) | IRQ0 | end |
//! |---|---|---|
//! | `acpi=off noapic nolapic` | XT-PIC | `reboot -f` → i8042 |
//! | `acpi=off` (virtual wire, no MP table) | XT-PIC | `reboot -f` → i8042 |
//! | `noapic` | XT-PIC, LAPIC timer, SCI on XT-PIC 9 | `poweroff -f` → S5 |
//! | (full ACPI) | IO-APIC 2-edge, LAPIC timer, SCI fasteoi | `poweroff -f` → S5 |
//! | (full ACPI, HPET table) | IO-APIC 2-edge from HPET legacy timer 0 | `poweroff -f` → S5 |
//!
//! With a host clock and a busy host, Linux's own PIT calibration of the TSC and its
//! clocksource watchdog are at the mercy of host scheduling (a descheduled vCPU thread looks
//! like an SMI); pass `tsc_early_khz=` (the [`Tsc`] rate) and `tsc=reliable`, or use the virtual
//! clock.
//!
//! ACPI: [`acpi::write_tables`] into a buffer copied to guest memory (0xe0000 is a good
//! place); its `rsdp_addr` goes to `boot_params.acpi_rsdp_addr` / PVH `rsdp_paddr`. A
//! [`SystemRequest`] from [`Platform::take_system_request`] ends or resets the VM.

pub mod acpi;
pub mod acpi_pm;
pub mod clock;
pub mod hpet;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod rtc;

pub use acpi_pm::SystemRequest;
pub use clock::{GuestClock, Tsc};
pub use platform::{CpuInterrupts, InterruptSignal, IsaIrq, Platform, PlatformConfig, StartupEvent};

use thiserror::Error;

/// Errors of the platform crate.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// A host clock follows `CLOCK_MONOTONIC`; only a virtual clock can be moved by the caller.
    #[error("the guest clock follows the host clock and cannot be advanced by the caller")]
    HostClockNotSettable,
    /// A configuration value the caller passed is unusable.
    #[error("invalid platform configuration: {0}")]
    InvalidConfig(String),
    /// A WRMSR to IA32_APIC_BASE with reserved bits or the (unadvertised) x2APIC bit.
    #[error("invalid IA32_APIC_BASE value {0:#x}: reserved or x2APIC bits set")]
    InvalidApicBase(u64),
    /// The buffer given for the ACPI tables is too small.
    #[error("the ACPI tables need {needed} bytes but the buffer has {available}")]
    AcpiBufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}
