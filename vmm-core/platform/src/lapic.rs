//! The local APIC in xAPIC mode (Intel SDM Vol. 3A, chapter "Advanced Programmable Interrupt
//! Controller (APIC)"): MMIO registers at the APIC base (0xfee00000 by default), the
//! IA32_APIC_BASE MSR, IRR/ISR/TMR, priorities, EOI, the LVT and the timer.
//!
//! Not modelled: x2APIC (never advertised), TSC-deadline timer mode (never advertised, so the
//! mode field only has its one-shot/periodic bit), the CMCI LVT (the version register says
//! five LVT entries), focus checking and EOI-broadcast suppression.

use crate::clock::{ns_to_ticks, ticks_to_ns_ceil, GuestClock};
use crate::ioapic::ApicMessage;
use crate::PlatformError;

/// Default physical base of the xAPIC window.
pub const APIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC window.
pub const APIC_SIZE: u64 = 0x1000;
/// The LAPIC timer's input clock ("bus clock"), the 1 GHz KVM and QEMU use: well above the
/// 1 MHz floor of Linux's `calibrate_APIC_clock`.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;

/// Version register: version 0x14 (integrated APIC), max LVT entry 5 (timer, thermal, perf,
/// LINT0, LINT1, error), no EOI-broadcast suppression.
const VERSION: u32 = 0x14 | (5 << 16);

const MSR_BSP: u64 = 1 << 8;
const MSR_X2APIC: u64 = 1 << 10;
const MSR_ENABLE: u64 = 1 << 11;
/// CPUID 0x80000008 advertises 40 physical address bits (notes §3), so base bits 12..40.
const MSR_BASE_MASK: u64 = 0x0000_00ff_ffff_f000;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;

/// LVT indices.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;

/// Writable bits per LVT entry (SDM figure "Local Vector Table (LVT)").
const LVT_WRITABLE: [u32; 6] = [
    0x0003_00ff, // timer: vector, mask, periodic (bit 18 TSC-deadline not advertised)
    0x0001_07ff, // thermal: vector, delivery mode, mask
    0x0001_07ff, // perf
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];

/// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// What a write to the LAPIC asks the rest of the platform to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LapicEffects {
    /// EOI of a level-triggered vector: broadcast to the IOAPIC.
    pub eoi_broadcast: Option<u8>,
    /// An IPI written to ICR, to be routed by the platform.
    pub ipi: Option<Ipi>,
}

/// An inter-processor interrupt from ICR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// The message (vector, delivery mode, destination).
    pub message: ApicMessage,
    /// ICR destination shorthand: 0 none, 1 self, 2 all including self, 3 all excluding self.
    pub shorthand: u8,
    /// APIC ID of the sender.
    pub source_id: u8,
}

/// One local APIC.
#[derive(Clone, Debug)]
pub struct LocalApic {
    clock: GuestClock,
    id: u8,
    base_msr: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    irr: [u32; 8],
    isr: [u32; 8],
    tmr: [u32; 8],
    /// Errors collected since the last ESR write.
    esr_pending: u32,
    /// What ESR reads (latched by the last ESR write).
    esr: u32,
    lvt: [u32; 6],
    icr_low: u32,
    icr_high: u32,
    timer_initial: u32,
    timer_dcr: u32,
    /// Guest time at which the current count was `timer_initial`.
    timer_start_ns: u64,
    /// Timer expirations already signalled since `timer_start_ns` (periodic), or whether the
    /// one-shot fired.
    timer_fired: u64,
    nmi_pending: bool,
    lint_levels: [bool; 2],
}

impl LocalApic {
    /// A LAPIC with APIC ID `id` in the state after reset. The bootstrap processor has the BSP
    /// flag, and (as the BIOS leaves it on a PC, and QEMU does at reset) LINT0 in ExtINT mode so
    /// that the 8259 reaches the CPU through it (virtual wire).
    pub fn new(clock: GuestClock, id: u8, bsp: bool) -> Self {
        let mut lvt = [LVT_MASKED; 6];
        if bsp {
            lvt[LVT_LINT0] = 7 << 8;
        }
        LocalApic {
            clock,
            id,
            base_msr: APIC_DEFAULT_BASE | MSR_ENABLE | if bsp { MSR_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            esr_pending: 0,
            esr: 0,
            lvt,
            icr_low: 0,
            icr_high: 0,
            timer_initial: 0,
            timer_dcr: 0,
            timer_start_ns: 0,
            timer_fired: 0,
            nmi_pending: false,
            lint_levels: [false; 2],
        }
    }

    /// APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// RDMSR IA32_APIC_BASE (0x1b).
    pub fn base_msr(&self) -> u64 {
        self.base_msr
    }

    /// WRMSR IA32_APIC_BASE. Errors (the CPU should raise #GP) on reserved bits and on the
    /// x2APIC enable bit, which is never advertised. The BSP flag is read-only. Clearing the
    /// enable bit hardware-disables the APIC: its window disappears, the 8259 reaches the CPU
    /// directly, and it comes back software-disabled.
    pub fn set_base_msr(&mut self, value: u64) -> Result<(), PlatformError> {
        if value & !(MSR_BASE_MASK | MSR_ENABLE | MSR_BSP) != 0 || value & MSR_X2APIC != 0 {
            return Err(PlatformError::InvalidApicBase(value));
        }
        let enable = value & MSR_ENABLE != 0;
        if !enable {
            self.svr &= !SVR_ENABLE;
            self.mask_all_lvt();
        }
        self.base_msr = (value & (MSR_BASE_MASK | MSR_ENABLE)) | (self.base_msr & MSR_BSP);
        Ok(())
    }

    /// Whether the APIC is enabled in IA32_APIC_BASE.
    pub fn hw_enabled(&self) -> bool {
        self.base_msr & MSR_ENABLE != 0
    }

    /// Whether SVR's APIC software enable bit is set.
    pub fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Physical address of the register window (meaningful while [`hw_enabled`]).
    ///
    /// [`hw_enabled`]: LocalApic::hw_enabled
    pub fn mmio_base(&self) -> u64 {
        self.base_msr & MSR_BASE_MASK
    }

    fn mask_all_lvt(&mut self) {
        for l in self.lvt.iter_mut() {
            *l |= LVT_MASKED;
        }
    }

    /// Whether LINT0 is unmasked in ExtINT mode: the 8259's INTR passes through (virtual wire).
    pub fn lint0_passes_extint(&self) -> bool {
        let l = self.lvt[LVT_LINT0];
        l & LVT_MASKED == 0 && (l >> 8) & 7 == 7
    }

    fn get_bit(arr: &[u32; 8], v: u8) -> bool {
        arr[usize::from(v >> 5)] & (1 << (v & 31)) != 0
    }
    fn set_bit(arr: &mut [u32; 8], v: u8, on: bool) {
        let w = &mut arr[usize::from(v >> 5)];
        if on {
            *w |= 1 << (v & 31);
        } else {
            *w &= !(1 << (v & 31));
        }
    }
    fn highest(arr: &[u32; 8]) -> Option<u8> {
        (0..8).rev().find(|&i| arr[i] != 0).map(|i| (i * 32 + 31 - arr[i].leading_zeros() as usize) as u8)
    }

    fn record_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let l = self.lvt[LVT_ERROR];
        if l & LVT_MASKED == 0 {
            let v = l as u8;
            if v >= 16 {
                Self::set_bit(&mut self.irr, v, true);
                Self::set_bit(&mut self.tmr, v, false);
            }
        }
    }

    /// Accepts a fixed/lowest-priority interrupt: sets IRR (and TMR for level). A
    /// software-disabled APIC drops it (as KVM does); vectors 0-15 are illegal (ESR bit 6).
    pub fn accept_fixed(&mut self, vector: u8, level_triggered: bool) {
        if !self.hw_enabled() || !self.sw_enabled() {
            return;
        }
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        Self::set_bit(&mut self.irr, vector, true);
        Self::set_bit(&mut self.tmr, vector, level_triggered);
    }

    /// Accepts an NMI.
    pub fn accept_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Takes a pending NMI (the CPU delivers vector 2 if it is not blocking NMIs).
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Whether an NMI is pending.
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Processor priority (SDM "Processor Priority Register (PPR)").
    pub fn ppr(&self) -> u8 {
        let isrv = Self::highest(&self.isr).unwrap_or(0);
        let tpr = self.tpr as u8;
        if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xf0
        }
    }

    /// The vector the APIC would present to the CPU now: the highest IRR vector whose priority
    /// class is above PPR's.
    pub fn deliverable_vector(&self) -> Option<u8> {
        let v = Self::highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The CPU's interrupt acknowledge: moves the deliverable vector from IRR to ISR.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.deliverable_vector()?;
        Self::set_bit(&mut self.irr, v, false);
        Self::set_bit(&mut self.isr, v, true);
        Some(v)
    }

    /// Drives LINT0/LINT1 (`pin` 0 or 1). Fixed and NMI modes act on the rising edge; ExtINT on
    /// LINT0 is handled by the platform (the vector comes from the 8259's INTA).
    pub fn set_lint(&mut self, pin: usize, level: bool) {
        let Some(prev) = self.lint_levels.get_mut(pin) else {
            return;
        };
        let rising = level && !*prev;
        *prev = level;
        let l = self.lvt[LVT_LINT0 + pin];
        if !rising || l & LVT_MASKED != 0 {
            return;
        }
        match (l >> 8) & 7 {
            0 => self.accept_fixed(l as u8, false),
            4 => self.accept_nmi(),
            _ => {}
        }
    }

    fn timer_divisor(&self) -> u64 {
        // Divide configuration: bits 0, 1, 3 (SDM "Divide Configuration Register").
        let code = (self.timer_dcr & 3) | ((self.timer_dcr >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    fn timer_periodic(&self) -> bool {
        self.lvt[LVT_TIMER] & (1 << 17) != 0
    }

    /// Timer ticks (after the divider) since the count was loaded.
    fn timer_ticks(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns.saturating_sub(self.timer_start_ns), APIC_BUS_HZ) / self.timer_divisor()
    }

    fn current_count(&self, now_ns: u64) -> u32 {
        let init = u64::from(self.timer_initial);
        if init == 0 {
            return 0;
        }
        let t = self.timer_ticks(now_ns);
        if self.timer_periodic() {
            (init - t % init) as u32
        } else if t >= init {
            0
        } else {
            (init - t) as u32
        }
    }

    /// Guest time of the next timer expiry not yet signalled.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let init = u64::from(self.timer_initial);
        if init == 0 || (!self.timer_periodic() && self.timer_fired > 0) {
            return None;
        }
        let ticks = (self.timer_fired + 1).saturating_mul(init).saturating_mul(self.timer_divisor());
        Some(self.timer_start_ns.saturating_add(ticks_to_ns_ceil(ticks, APIC_BUS_HZ)))
    }

    /// Fires the timer if its deadline has passed (a periodic timer that missed several periods
    /// fires once: the guest sees a late tick, never a burst). Returns whether it fired.
    pub fn update(&mut self, now_ns: u64) -> bool {
        let Some(deadline) = self.next_deadline_ns() else {
            return false;
        };
        if now_ns < deadline {
            return false;
        }
        let init = u64::from(self.timer_initial);
        self.timer_fired = if self.timer_periodic() { self.timer_ticks(now_ns) / init } else { 1 };
        let l = self.lvt[LVT_TIMER];
        if l & LVT_MASKED == 0 {
            self.accept_fixed(l as u8, false);
        }
        true
    }

    fn restart_timer(&mut self, now_ns: u64) {
        self.timer_start_ns = now_ns;
        self.timer_fired = 0;
    }

    fn read_reg(&mut self, reg: u32) -> u32 {
        let now = self.clock.now_ns();
        match reg {
            0x20 => u32::from(self.id) << 24,
            0x30 => VERSION,
            0x80 => self.tpr,
            0x90 => 0, // APR: arbitration priority, not modelled on one bus.
            0xa0 => u32::from(self.ppr()),
            0xd0 => self.ldr,
            0xe0 => self.dfr,
            0xf0 => self.svr,
            0x100..=0x170 => self.isr[((reg - 0x100) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((reg - 0x180) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - 0x200) >> 4) as usize],
            0x280 => self.esr,
            0x300 => self.icr_low,
            0x310 => self.icr_high,
            0x320..=0x370 => self.lvt[((reg - 0x320) >> 4) as usize],
            0x380 => self.timer_initial,
            0x390 => {
                self.update(now);
                self.current_count(now)
            }
            0x3e0 => self.timer_dcr,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u32, val: u32) -> LapicEffects {
        let now = self.clock.now_ns();
        let mut fx = LapicEffects::default();
        match reg {
            0x20 => self.id = (val >> 24) as u8,
            0x80 => self.tpr = val & 0xff,
            0xb0 => {
                // EOI: retire the highest in-service vector; a level-triggered one is
                // broadcast to the IOAPIC (SDM "EOI Register").
                if let Some(v) = Self::highest(&self.isr) {
                    Self::set_bit(&mut self.isr, v, false);
                    if Self::get_bit(&self.tmr, v) {
                        fx.eoi_broadcast = Some(v);
                    }
                }
            }
            0xd0 => self.ldr = val & 0xff00_0000,
            0xe0 => self.dfr = (val & 0xf000_0000) | 0x0fff_ffff,
            0xf0 => {
                self.svr = val & 0x3ff;
                if val & SVR_ENABLE == 0 {
                    self.mask_all_lvt();
                }
            }
            0x280 => {
                // A write latches the errors collected so far and clears them.
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            0x300 => {
                self.icr_low = val & 0x000c_ffff; // delivery status always reads idle
                fx.ipi = self.send_ipi();
            }
            0x310 => self.icr_high = val & 0xff00_0000,
            0x320..=0x370 => {
                let i = ((reg - 0x320) >> 4) as usize;
                let mut v = val & LVT_WRITABLE[i];
                if !self.sw_enabled() {
                    v |= LVT_MASKED;
                }
                if i == LVT_TIMER && self.timer_initial != 0 {
                    // Bring the expiry count up to date before the mode may change.
                    self.update(now);
                }
                self.lvt[i] = v;
            }
            0x380 => {
                self.timer_initial = val;
                self.restart_timer(now);
            }
            0x3e0 => {
                // Keep the current count continuous across a divider change.
                let count = self.current_count(now);
                let fired = self.timer_fired;
                self.timer_dcr = val & 0xb;
                if self.timer_initial != 0 && count != 0 {
                    let elapsed = u64::from(self.timer_initial - count) * self.timer_divisor();
                    self.timer_start_ns = now.saturating_sub(ticks_to_ns_ceil(elapsed, APIC_BUS_HZ));
                    self.timer_fired = if self.timer_periodic() { 0 } else { fired };
                }
            }
            _ => {}
        }
        fx
    }

    fn send_ipi(&mut self) -> Option<Ipi> {
        let lo = self.icr_low;
        let mode = ((lo >> 8) & 7) as u8;
        let vector = lo as u8;
        if matches!(mode, 0 | 1) && vector < 16 {
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        // INIT level de-assert (mode 5, level 0, trigger level) is a no-op on modern CPUs.
        if mode == 5 && lo & (1 << 14) == 0 && lo & (1 << 15) != 0 {
            return None;
        }
        Some(Ipi {
            message: ApicMessage {
                vector,
                delivery_mode: mode,
                logical: lo & (1 << 11) != 0,
                destination: (self.icr_high >> 24) as u8,
                level_triggered: false,
            },
            shorthand: ((lo >> 18) & 3) as u8,
            source_id: self.id,
        })
    }

    /// Whether this APIC is a target of `dest` in the given destination mode (SDM "Determining
    /// IPI Destination": physical ID or 0xff broadcast; logical flat or cluster model).
    pub fn matches_destination(&self, logical: bool, dest: u8) -> bool {
        if !logical {
            return dest == 0xff || dest == self.id;
        }
        let ldr = (self.ldr >> 24) as u8;
        if self.dfr >> 28 == 0xf {
            ldr & dest != 0
        } else {
            // Cluster model: high nibble cluster (0xf broadcast), low nibble member mask.
            ((dest >> 4) == 0xf || (dest >> 4) == (ldr >> 4)) && (dest & ldr & 0x0f) != 0
        }
    }

    /// MMIO read at `offset` in the window. Registers are 32 bits on 16-byte boundaries; bytes
    /// 4..16 of each slot read as 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let reg = (offset & 0xff0) as u32;
        let within = (offset & 0xf) as usize;
        let v = self.read_reg(reg).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(within + i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset`. Only aligned 32-bit writes reach a register (the SDM requires
    /// them); anything else is ignored with a log line.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> LapicEffects {
        if offset & 0xf != 0 || data.len() != 4 {
            log::debug!("lapic: unaligned {}-byte write at {offset:#x} ignored", data.len());
            return LapicEffects::default();
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg((offset & 0xff0) as u32, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(l: &mut LocalApic, off: u64) -> u32 {
        let mut d = [0u8; 4];
        l.read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn wr(l: &mut LocalApic, off: u64, v: u32) -> LapicEffects {
        l.write(off, &v.to_le_bytes())
    }
    fn enabled(clock: &GuestClock) -> LocalApic {
        let mut l = LocalApic::new(clock.clone(), 0, true);
        wr(&mut l, 0xf0, 0x1ff);
        l
    }

    #[test]
    fn reset_state_matches_qemu() {
        let c = GuestClock::virtual_clock(0);
        let mut l = LocalApic::new(c, 0, true);
        assert_eq!(l.base_msr(), 0xfee0_0900);
        assert_eq!(rd(&mut l, 0x30), 0x0005_0014);
        assert_eq!(rd(&mut l, 0xf0), 0xff);
        assert_eq!(rd(&mut l, 0xe0), 0xffff_ffff);
        assert_eq!(rd(&mut l, 0x350), 0x700, "BSP LINT0 ExtINT");
        assert_eq!(rd(&mut l, 0x320), 0x10000);
        assert!(l.lint0_passes_extint());
    }

    #[test]
    fn priority_isr_and_eoi() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        l.accept_fixed(0x31, false);
        l.accept_fixed(0x62, true);
        assert_eq!(rd(&mut l, 0x200 + 0x10), 1 << 17);
        assert_eq!(l.acknowledge(), Some(0x62));
        assert_eq!(rd(&mut l, 0x100 + 0x30), 1 << 2, "ISR bit 0x62");
        assert_eq!(rd(&mut l, 0xa0), 0x60, "PPR from ISR");
        assert_eq!(l.deliverable_vector(), None, "0x31 below the in-service class");
        let fx = wr(&mut l, 0xb0, 0);
        assert_eq!(fx.eoi_broadcast, Some(0x62), "level vector broadcast");
        assert_eq!(l.deliverable_vector(), Some(0x31));
        // TPR masks classes at or below it.
        wr(&mut l, 0x80, 0x30);
        assert_eq!(l.deliverable_vector(), None);
        wr(&mut l, 0x80, 0x20);
        assert_eq!(l.acknowledge(), Some(0x31));
        assert_eq!(wr(&mut l, 0xb0, 0).eoi_broadcast, None, "edge: no broadcast");
    }

    #[test]
    fn software_disabled_drops_fixed_and_masks_lvt() {
        let c = GuestClock::virtual_clock(0);
        let mut l = LocalApic::new(c, 0, true);
        l.accept_fixed(0x40, false);
        assert_eq!(l.deliverable_vector(), None);
        wr(&mut l, 0x350, 0x700);
        assert_eq!(rd(&mut l, 0x350), 0x10700, "LVT stays masked while disabled");
        wr(&mut l, 0xf0, 0x1ff);
        wr(&mut l, 0x350, 0x700);
        assert_eq!(rd(&mut l, 0x350), 0x700);
        // Illegal vector sets ESR after the latching write.
        l.accept_fixed(0x05, false);
        assert_eq!(rd(&mut l, 0x280), 0);
        wr(&mut l, 0x280, 0);
        assert_eq!(rd(&mut l, 0x280), 0x40);
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        wr(&mut l, 0x3e0, 0x3); // divide by 16
        wr(&mut l, 0x320, 0xec);
        wr(&mut l, 0x380, 1000); // 1000 * 16 ns
        assert_eq!(l.next_deadline_ns(), Some(16_000));
        c.advance_ns(8_000).unwrap();
        assert_eq!(rd(&mut l, 0x390), 500);
        assert!(!l.update(c.now_ns()));
        c.advance_ns(8_000).unwrap();
        assert!(l.update(c.now_ns()));
        assert_eq!(l.acknowledge(), Some(0xec));
        assert_eq!(rd(&mut l, 0x390), 0);
        assert_eq!(l.next_deadline_ns(), None);
        c.advance_ns(100_000).unwrap();
        assert!(!l.update(c.now_ns()));
    }

    #[test]
    fn periodic_timer_reloads_and_divider_1() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        wr(&mut l, 0x3e0, 0xb); // divide by 1
        wr(&mut l, 0x320, 0x2_00ec);
        wr(&mut l, 0x380, 100);
        c.advance_ns(250).unwrap();
        assert_eq!(rd(&mut l, 0x390), 50);
        assert_eq!(l.acknowledge(), Some(0xec), "fired (once) for the missed periods");
        wr(&mut l, 0xb0, 0);
        assert_eq!(l.next_deadline_ns(), Some(300));
        c.advance_ns(50).unwrap();
        assert!(l.update(c.now_ns()));
        // Masked timer still counts but raises nothing.
        wr(&mut l, 0x320, 0x3_00ec);
        c.advance_ns(100).unwrap();
        assert!(l.update(c.now_ns()));
        assert_eq!(rd(&mut l, 0x200 + 0x70), 1 << 12, "only the earlier 0xec is pending");
    }

    #[test]
    fn lint_pins_in_fixed_and_nmi_modes_and_cluster_destinations() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        wr(&mut l, 0x350, 0x0000_0061); // LINT0 fixed vector 0x61
        l.set_lint(0, true);
        l.set_lint(0, true); // no new edge
        assert_eq!(l.acknowledge(), Some(0x61));
        assert_eq!(l.acknowledge(), None);
        assert!(!l.lint0_passes_extint());
        wr(&mut l, 0x360, 0x0000_0400); // LINT1 NMI
        l.set_lint(1, true);
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        // Cluster model: cluster 2, member bit 1.
        wr(&mut l, 0xe0, 0x0fff_ffff);
        assert_eq!(rd(&mut l, 0xe0), 0x0fff_ffff);
        wr(&mut l, 0xd0, 0x2200_0000);
        assert!(l.matches_destination(true, 0x22));
        assert!(l.matches_destination(true, 0xf2), "broadcast cluster");
        assert!(!l.matches_destination(true, 0x12), "other cluster");
        assert!(!l.matches_destination(true, 0x21), "other member");
        // SVR keeps the vector and focus bits, drops EOI-broadcast suppression (not offered).
        wr(&mut l, 0xf0, 0x13ff);
        assert_eq!(rd(&mut l, 0xf0), 0x3ff);
    }

    #[test]
    fn apic_base_msr_rules() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        assert!(l.set_base_msr(0xfee0_0d00).is_err(), "x2APIC not advertised");
        assert!(l.set_base_msr(1 << 50).is_err(), "beyond MAXPHYADDR");
        l.set_base_msr(0xfed0_0800).unwrap();
        assert_eq!(l.base_msr(), 0xfed0_0900, "BSP bit kept, base moved");
        assert_eq!(l.mmio_base(), 0xfed0_0000);
        l.set_base_msr(0xfed0_0000).unwrap();
        assert!(!l.hw_enabled());
        assert!(!l.sw_enabled(), "comes back software-disabled");
    }

    #[test]
    fn icr_self_ipi_and_destinations() {
        let c = GuestClock::virtual_clock(0);
        let mut l = enabled(&c);
        wr(&mut l, 0x310, 0);
        let fx = wr(&mut l, 0x300, 0x4_00f3); // self shorthand, fixed, vector 0xf3
        let ipi = fx.ipi.unwrap();
        assert_eq!(ipi.shorthand, 1);
        assert_eq!(ipi.message.vector, 0xf3);
        assert!(wr(&mut l, 0x300, 0x4_0003).ipi.is_none(), "illegal vector");
        wr(&mut l, 0x280, 0);
        assert_eq!(rd(&mut l, 0x280), 0x20);
        wr(&mut l, 0xd0, 0x0100_0000);
        assert!(l.matches_destination(true, 0x01));
        assert!(!l.matches_destination(true, 0x02));
        assert!(l.matches_destination(false, 0));
        assert!(l.matches_destination(false, 0xff));
        assert!(!l.matches_destination(false, 1));
    }
}
