//! PC platform devices modelled in userspace (used with the software CPU; KVM has them in the
//! kernel).
//!
//! Every device is engine-neutral: plain `read`/`write` methods on its register window, time taken
//! from one [`clock::GuestClock`].

pub mod acpi;
pub mod acpi_pm;
pub mod clock;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod rtc;

pub use acpi_pm::SystemRequest;
pub use clock::{GuestClock, Tsc};
pub use platform::{InterruptSignal, Platform, PlatformConfig, StartupEvent};

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
