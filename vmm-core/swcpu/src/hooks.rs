//! Hooks through which the machine around the CPU (Tessera's core with its userspace platform) supplies what a
//! real package gets from its chipset: the time base behind RDTSC, the MSRs that belong to the platform
//! (IA32_APIC_BASE moves the LAPIC window the platform decodes), and the wait in HLT.
//!
//! Without hooks the CPU keeps its own [`crate::GuestClock`], stores IA32_APIC_BASE itself and waits in HLT on
//! its own condition variable (the behaviour before hooks existed).

/// The machine's side of time, platform MSRs and idling. Every method has a default that leaves the CPU's own
/// behaviour in place, so an implementation overrides only what it owns.
pub trait CpuHooks: Send + Sync {
    /// The TSC (before the guest's IA32_TIME_STAMP_COUNTER offset) after `instructions` instructions have
    /// retired on this CPU; `None` keeps the CPU's own clock. A machine whose timers run on a clock of its own
    /// answers from that clock, so that the TSC agrees with the PIT, LAPIC timer and PM timer (Linux
    /// calibrates them against each other).
    fn tsc(&self, instructions: u64) -> Option<u64> {
        let _ = instructions;
        None
    }

    /// RDMSR of `index`: `Some(value)` if the machine owns the MSR.
    fn rdmsr(&self, index: u32) -> Option<u64> {
        let _ = index;
        None
    }

    /// WRMSR of `index`: `Some(true)` if the machine took it, `Some(false)` if it refuses the value (the CPU
    /// raises #GP(0)), `None` if the CPU handles the MSR itself.
    fn wrmsr(&self, index: u32, value: u64) -> Option<bool> {
        let _ = (index, value);
        None
    }

    /// HLT with RFLAGS.IF = 1 and no interrupt pending: wait until an interrupt may be pending, the next timer
    /// deadline, or a kick, then return (the CPU checks its interrupt source and kick flag again). Returns false
    /// if the machine does not idle for the CPU (the CPU then waits on its own, 1 ms at a time).
    fn idle(&self, instructions: u64) -> bool {
        let _ = instructions;
        false
    }
}
