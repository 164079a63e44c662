//! ACPI fixed hardware at QEMU's PIIX4 addresses: the PM1a event block (PM1_STS, PM1_EN) at
//! 0x600, the PM1a control block at 0x604, the PM timer at 0x608 (ACPI 6.5 §4.8.3 "PM1 Event
//! Grouping", "PM1 Control Grouping", "Power Management Timer"); and the PIIX reset control
//! register at 0xcf9.

use crate::clock::{ns_to_ticks, ticks_to_ns_ceil, GuestClock};

/// First port of the block (PM1a_EVT).
pub const PM_BASE: u16 = 0x600;
/// Length of the block: PM1a_EVT (4), PM1a_CNT (2, padded to 4), PM_TMR (4).
pub const PM_LEN: u16 = 12;
/// PM1a event block (PM1_STS at +0, PM1_EN at +2).
pub const PM1A_EVT: u16 = 0x600;
/// PM1a control block.
pub const PM1A_CNT: u16 = 0x604;
/// PM timer.
pub const PM_TMR: u16 = 0x608;
/// The PM timer's rate (ACPI: 3.579545 MHz).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The SLP_TYP value the DSDT's `\_S5` names and PM1a_CNT treats as soft-off. QEMU's PIIX4
/// uses 0 as well.
pub const SLP_TYP_S5: u8 = 0;
/// The PIIX reset control register.
pub const RESET_CONTROL: u16 = 0xcf9;

const STS_TMR: u16 = 1 << 0;
const STS_PWRBTN: u16 = 1 << 8;
/// PM1_STS bits this model can set (timer, global lock, power button, RTC) and WAK_STS.
const STS_BITS: u16 = STS_TMR | (1 << 5) | STS_PWRBTN | (1 << 10) | (1 << 15);
/// PM1_EN bits (TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN).
const EN_BITS: u16 = STS_TMR | (1 << 5) | STS_PWRBTN | (1 << 10);
const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;

/// A request from the guest to the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemRequest {
    /// Soft-off (ACPI S5).
    PowerOff,
    /// Hard reset (0xcf9, or the core's i8042 / triple fault paths).
    Reset,
}

/// PM1a event/control blocks and the PM timer.
#[derive(Clone, Debug)]
pub struct AcpiPm {
    clock: GuestClock,
    timer_32bit: bool,
    sts: u16,
    en: u16,
    cnt: u16,
    /// Timer MSB periods already reflected in TMR_STS.
    tmr_periods: u64,
}

impl AcpiPm {
    /// The PM block with a 24-bit (FADT TMR_VAL_EXT clear) or 32-bit timer. SCI_EN starts set:
    /// with no SMI_CMD in the FADT the platform is always in ACPI mode (ACPI 6.5 §4.8.2.5).
    pub fn new(clock: GuestClock, timer_32bit: bool) -> Self {
        let mut pm = AcpiPm { clock, timer_32bit, sts: 0, en: 0, cnt: CNT_SCI_EN, tmr_periods: 0 };
        pm.tmr_periods = pm.periods(pm.clock.now_ns());
        pm
    }

    /// Whether the PM timer is 32 bits wide (the FADT must say the same).
    pub fn timer_32bit(&self) -> bool {
        self.timer_32bit
    }

    fn msb_shift(&self) -> u32 {
        if self.timer_32bit {
            31
        } else {
            23
        }
    }

    fn periods(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns, PM_TIMER_HZ) >> self.msb_shift()
    }

    fn timer_value(&self, now_ns: u64) -> u32 {
        let t = ns_to_ticks(now_ns, PM_TIMER_HZ);
        if self.timer_32bit {
            t as u32
        } else {
            (t & 0x00ff_ffff) as u32
        }
    }

    /// Sets TMR_STS when the timer's top bit has changed since the last look.
    pub fn update(&mut self, now_ns: u64) {
        let p = self.periods(now_ns);
        if p != self.tmr_periods {
            self.tmr_periods = p;
            self.sts |= STS_TMR;
        }
    }

    /// The SCI output (level, IRQ9): an enabled status bit is set.
    pub fn sci_level(&self) -> bool {
        self.cnt & CNT_SCI_EN != 0 && self.sts & self.en & EN_BITS != 0
    }

    /// When TMR_STS will next be set, if the guest enabled its interrupt.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if self.en & STS_TMR == 0 {
            return None;
        }
        Some(ticks_to_ns_ceil((self.tmr_periods + 1) << self.msb_shift(), PM_TIMER_HZ))
    }

    /// Presses the power button (PWRBTN_STS; the guest sees an SCI if PWRBTN_EN).
    pub fn press_power_button(&mut self) {
        self.sts |= STS_PWRBTN;
    }

    fn image(&mut self) -> [u8; 12] {
        let now = self.clock.now_ns();
        self.update(now);
        let mut b = [0u8; 12];
        b[0..2].copy_from_slice(&self.sts.to_le_bytes());
        b[2..4].copy_from_slice(&self.en.to_le_bytes());
        // SLP_EN is write-only and reads 0.
        b[4..6].copy_from_slice(&(self.cnt & !CNT_SLP_EN).to_le_bytes());
        b[8..12].copy_from_slice(&self.timer_value(now).to_le_bytes());
        b
    }

    /// Read of `data.len()` bytes at `offset` in the block (0..12). The timer is sampled once per
    /// access, so a 32-bit read never tears.
    pub fn read(&mut self, offset: u16, data: &mut [u8]) {
        let img = self.image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = img.get(usize::from(offset) + i).copied().unwrap_or(0xff);
        }
    }

    /// Write at `offset`; returns a power-off request when SLP_EN is written with the S5 type.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<SystemRequest> {
        let mut req = None;
        for (i, &b) in data.iter().enumerate() {
            let off = usize::from(offset) + i;
            let shift = 8 * (off & 1);
            let v = u16::from(b) << shift;
            let byte_mask = 0xffu16 << shift;
            match off {
                // PM1_STS: write 1 to clear.
                0 | 1 => self.sts &= !(v & STS_BITS),
                2 | 3 => self.en = (self.en & !byte_mask) | (v & EN_BITS & byte_mask),
                4 | 5 => {
                    self.cnt = (self.cnt & !byte_mask) | (v & byte_mask);
                    if self.cnt & CNT_SLP_EN != 0 {
                        self.cnt &= !CNT_SLP_EN;
                        let typ = ((self.cnt >> 10) & 7) as u8;
                        if typ == SLP_TYP_S5 {
                            req = Some(SystemRequest::PowerOff);
                        } else {
                            log::warn!(
                                "acpi: sleep type {typ} requested; only S5 (type {SLP_TYP_S5}) is implemented, ignored"
                            );
                        }
                    }
                }
                _ => {} // PM timer and padding are read-only.
            }
        }
        req
    }
}

/// The PIIX reset control register (0xcf9): bit 2 going to 1 resets the machine (bit 1 picks
/// hard/soft, both are a full reset here).
#[derive(Clone, Debug, Default)]
pub struct ResetControl {
    value: u8,
}

impl ResetControl {
    /// Byte read.
    pub fn read(&self) -> u8 {
        self.value
    }

    /// Byte write; a reset request when RST_CPU (bit 2) goes from 0 to 1.
    pub fn write(&mut self, val: u8) -> Option<SystemRequest> {
        let rising = val & 4 != 0 && self.value & 4 == 0;
        self.value = val & 0x0a;
        rising.then_some(SystemRequest::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NS_PER_SEC;

    fn rd32(pm: &mut AcpiPm, off: u16) -> u32 {
        let mut d = [0u8; 4];
        pm.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz_and_wraps_at_24_bits() {
        let c = GuestClock::virtual_clock(0);
        let mut pm = AcpiPm::new(c.clone(), false);
        assert_eq!(rd32(&mut pm, 8), 0);
        c.advance_ns(NS_PER_SEC).unwrap();
        assert_eq!(rd32(&mut pm, 8), 3_579_545);
        c.advance_to_ns(ticks_to_ns_ceil(0x0100_0005, PM_TIMER_HZ)).unwrap();
        assert_eq!(rd32(&mut pm, 8), 5, "24-bit wrap");
        let mut pm32 = AcpiPm::new(c.clone(), true);
        assert_eq!(rd32(&mut pm32, 8), 0x0100_0005);
    }

    #[test]
    fn tmr_sts_raises_sci_when_enabled_and_clears_on_write_one() {
        let c = GuestClock::virtual_clock(0);
        let mut pm = AcpiPm::new(c.clone(), false);
        pm.write(2, &1u16.to_le_bytes());
        let d = pm.next_deadline_ns().unwrap();
        assert_eq!(d, ticks_to_ns_ceil(1 << 23, PM_TIMER_HZ));
        c.advance_to_ns(d).unwrap();
        pm.update(c.now_ns());
        assert!(pm.sci_level());
        let mut s = [0u8; 2];
        pm.read(0, &mut s);
        assert_eq!(u16::from_le_bytes(s) & 1, 1);
        pm.write(0, &[0x01, 0x00]);
        assert!(!pm.sci_level());
        pm.press_power_button();
        assert!(!pm.sci_level(), "PWRBTN_EN off");
        pm.write(2, &0x0100u16.to_le_bytes());
        assert!(pm.sci_level());
    }

    #[test]
    fn slp_en_with_s5_type_powers_off() {
        let c = GuestClock::virtual_clock(0);
        let mut pm = AcpiPm::new(c, false);
        let mut d = [0u8; 2];
        pm.read(4, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1, "SCI_EN set");
        // Another sleep type is refused.
        assert_eq!(pm.write(4, &(0x2000u16 | 1 << 10 | 1).to_le_bytes()), None);
        // Linux acpi_hw_legacy_sleep: SLP_TYP first, then SLP_TYP|SLP_EN.
        let typ = u16::from(SLP_TYP_S5) << 10;
        assert_eq!(pm.write(4, &(typ | 1).to_le_bytes()), None);
        assert_eq!(pm.write(4, &(typ | 0x2001).to_le_bytes()), Some(SystemRequest::PowerOff));
        pm.read(4, &mut d);
        assert_eq!(u16::from_le_bytes(d) & 0x2000, 0, "SLP_EN reads 0");
    }

    #[test]
    fn reset_control_0xcf9() {
        let mut r = ResetControl::default();
        assert_eq!(r.write(0x02), None);
        assert_eq!(r.write(0x06), Some(SystemRequest::Reset));
        assert_eq!(r.read(), 0x02);
    }
}
