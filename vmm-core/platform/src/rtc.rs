//! The CMOS real-time clock and NVRAM (Motorola MC146818A data sheet; ports 0x70 index with the
//! NMI-disable bit 7, 0x71 data; IRQ8).
//!
//! The time is the guest clock's wall time (host time when the clock was made, plus guest time
//! since) plus whatever offset the guest set. Update-ended, alarm and periodic flags are computed
//! from the guest clock when register C is read or [`Rtc::update`] runs; nothing ticks in the
//! background.

use crate::clock::{GuestClock, NS_PER_SEC};

/// Index port (bit 7: NMI disable).
pub const RTC_INDEX: u16 = 0x70;
/// Data port.
pub const RTC_DATA: u16 = 0x71;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const REG_CENTURY: usize = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// UIP is high 244 µs before the update and during the 1984 µs update cycle (data sheet,
/// "Update Cycle").
const UIP_BEFORE_NS: u64 = 244_000;
const UIP_UPDATE_NS: u64 = 1_984_000;

/// Days since 1970-01-01 → (year, month 1-12, day 1-31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to an era starting on 0000-03-01 so that leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146097
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month 1-12, day 1-31) → days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Broken-down RTC time (binary values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tm {
    sec: u32,
    min: u32,
    hour: u32,
    /// 1 = Sunday.
    wday: u32,
    mday: u32,
    mon: u32,
    year: i64,
}

impl Tm {
    fn from_unix(secs: i64) -> Tm {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, mon, mday) = civil_from_days(days);
        Tm {
            sec: (rem % 60) as u32,
            min: (rem / 60 % 60) as u32,
            hour: (rem / 3600) as u32,
            // 1970-01-01 was a Thursday (5 with Sunday = 1).
            wday: ((days + 4).rem_euclid(7) + 1) as u32,
            mday,
            mon,
            year,
        }
    }

    fn to_unix(self) -> i64 {
        let mon = self.mon.clamp(1, 12);
        let mday = self.mday.clamp(1, 31);
        days_from_civil(self.year, mon, mday) * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.min.min(59)) * 60
            + i64::from(self.sec.min(59))
    }
}

/// The MC146818 with its 128 bytes of CMOS.
#[derive(Clone, Debug)]
pub struct Rtc {
    clock: GuestClock,
    index: u8,
    nmi_disabled: bool,
    cmos: [u8; 128],
    /// Added to the clock's wall time (ns); moved by guest writes to the time registers.
    offset_ns: i128,
    /// While register B.SET is on: the time being set, frozen.
    frozen: Option<Tm>,
    /// Last unix second for which update-ended was evaluated.
    last_second: i64,
    /// Last periodic-interrupt period index evaluated.
    last_period: u64,
}

impl Rtc {
    /// An RTC following the clock's wall time, 24-hour BCD mode, 32.768 kHz time base and a
    /// 1024 Hz periodic rate (what a BIOS leaves).
    pub fn new(clock: GuestClock) -> Self {
        let mut cmos = [0u8; 128];
        cmos[REG_A] = 0x26;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = 0x80; // VRT: the battery is good
        let mut rtc = Rtc {
            clock,
            index: 0,
            nmi_disabled: false,
            cmos,
            offset_ns: 0,
            frozen: None,
            last_second: 0,
            last_period: 0,
        };
        let now = rtc.clock.now_ns();
        rtc.last_second = rtc.unix_secs(now);
        rtc.last_period = rtc.period_index(now).unwrap_or(0);
        rtc
    }

    /// Sets an NVRAM byte (index 0x0e-0x7f; the clock registers are refused).
    pub fn set_nvram(&mut self, index: usize, value: u8) {
        if (0x0e..0x80).contains(&index) && index != REG_CENTURY {
            self.cmos[index] = value;
        }
    }

    /// Fills the memory-size bytes the way QEMU's `pc_cmos_init` does: base memory (KiB,
    /// ≤ 640) at 0x15/0x16, memory from 1 MiB (KiB, ≤ 65535) at 0x17/0x18 and 0x30/0x31,
    /// memory from 16 MiB below 4 GiB (64 KiB units, ≤ 65535) at 0x34/0x35, memory above
    /// 4 GiB (64 KiB units, 24 bits) at 0x5b-0x5d, and the CPU count minus one at 0x5f.
    pub fn set_memory_layout(&mut self, below_4g: u64, above_4g: u64, cpus: u8) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let base = (below_4g / KIB).min(640);
        self.cmos[0x15] = base as u8;
        self.cmos[0x16] = (base >> 8) as u8;
        let ext = (below_4g.saturating_sub(MIB) / KIB).min(65535);
        for (lo, hi) in [(0x17, 0x18), (0x30, 0x31)] {
            self.cmos[lo] = ext as u8;
            self.cmos[hi] = (ext >> 8) as u8;
        }
        let high = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(65535);
        self.cmos[0x34] = high as u8;
        self.cmos[0x35] = (high >> 8) as u8;
        let above = above_4g / (64 * KIB);
        self.cmos[0x5b] = above as u8;
        self.cmos[0x5c] = (above >> 8) as u8;
        self.cmos[0x5d] = (above >> 16) as u8;
        self.cmos[0x5f] = cpus.saturating_sub(1);
    }

    /// The RESET pin (machine reset): interrupt enables and flags cleared (data sheet, "RESET"
    /// pin); time, NVRAM and the rest of register B stay (the chip is battery-backed).
    pub fn reset(&mut self) {
        self.cmos[REG_B] &= !(B_PIE | B_AIE | B_UIE | 0x08);
        self.cmos[REG_C] = 0;
        self.index = 0;
        self.nmi_disabled = false;
    }

    /// Whether the guest has set the NMI-disable bit (port 0x70 bit 7).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn wall_ns(&self, now_ns: u64) -> i128 {
        self.clock.wall_unix_ns(now_ns) as i128 + self.offset_ns
    }

    fn unix_secs(&self, now_ns: u64) -> i64 {
        self.wall_ns(now_ns).div_euclid(NS_PER_SEC as i128) as i64
    }

    /// Whether the divider chain runs (register A bits 6:4 = 010, the 32.768 kHz time base).
    fn running(&self) -> bool {
        self.cmos[REG_A] & 0x70 == 0x20
    }

    fn current_tm(&self, now_ns: u64) -> Tm {
        self.frozen.unwrap_or_else(|| Tm::from_unix(self.unix_secs(now_ns)))
    }

    fn uip(&self, now_ns: u64) -> bool {
        if !self.running() || self.cmos[REG_B] & B_SET != 0 {
            return false;
        }
        let frac = self.wall_ns(now_ns).rem_euclid(NS_PER_SEC as i128) as u64;
        !(UIP_UPDATE_NS..NS_PER_SEC - UIP_BEFORE_NS).contains(&frac)
    }

    /// Periodic interrupt period in ns from register A's rate (data sheet table "Periodic
    /// Interrupt Rate"): rates 1 and 2 mean 256 and 128 Hz, rate r ≥ 3 means 65536 >> r Hz.
    fn period_ns(&self) -> Option<u64> {
        let rate = u32::from(self.cmos[REG_A] & 0x0f);
        if rate == 0 || !self.running() {
            return None;
        }
        let cycles_32k: u64 = match rate {
            1 => 128,
            2 => 256,
            r => 1 << (r - 1),
        };
        Some(cycles_32k * NS_PER_SEC / 32_768)
    }

    fn period_index(&self, now_ns: u64) -> Option<u64> {
        self.period_ns().map(|p| now_ns / p)
    }

    fn bin_to_reg(&self, v: u32) -> u8 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            (((v / 10 % 10) << 4) | (v % 10)) as u8
        }
    }

    fn reg_to_bin(&self, v: u8) -> u32 {
        if self.cmos[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
        }
    }

    fn hour_to_reg(&self, hour: u32) -> u8 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.bin_to_reg(hour);
        }
        // 12-hour mode: 1-12 with bit 7 for PM.
        let pm = hour >= 12;
        let h = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.bin_to_reg(h) | if pm { 0x80 } else { 0 }
    }

    fn reg_to_hour(&self, v: u8) -> u32 {
        if self.cmos[REG_B] & B_24H != 0 {
            return self.reg_to_bin(v);
        }
        let h = self.reg_to_bin(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h + 12
        } else {
            h
        }
    }

    fn alarm_matches(&self, tm: &Tm) -> bool {
        // An alarm byte with bits 7:6 = 11 is "don't care" (data sheet, "Alarm").
        let check = |reg: usize, val: u32, hour: bool| {
            let a = self.cmos[reg];
            a >= 0xc0 || if hour { self.reg_to_hour(a) == val } else { self.reg_to_bin(a) == val }
        };
        check(1, tm.sec, false) && check(3, tm.min, false) && check(5, tm.hour, true)
    }

    /// Brings the interrupt flags up to date with the guest clock.
    pub fn update(&mut self, now_ns: u64) {
        if let Some(idx) = self.period_index(now_ns) {
            if idx > self.last_period {
                self.cmos[REG_C] |= C_PF;
            }
            self.last_period = idx;
        }
        if self.running() && self.cmos[REG_B] & B_SET == 0 {
            let s = self.unix_secs(now_ns);
            if s > self.last_second {
                self.cmos[REG_C] |= C_UF;
                if self.alarm_matches(&Tm::from_unix(s)) {
                    self.cmos[REG_C] |= C_AF;
                }
            }
            self.last_second = s;
        }
        let c = self.cmos[REG_C];
        let b = self.cmos[REG_B];
        let irq =
            (c & C_PF != 0 && b & B_PIE != 0) || (c & C_AF != 0 && b & B_AIE != 0) || (c & C_UF != 0 && b & B_UIE != 0);
        if irq {
            self.cmos[REG_C] |= C_IRQF;
        }
    }

    /// The IRQ8 output (register C.IRQF).
    pub fn irq_level(&self) -> bool {
        self.cmos[REG_C] & C_IRQF != 0
    }

    /// Guest time of the next event that would raise IRQ8 (an enabled periodic, update-ended
    /// or alarm interrupt).
    pub fn next_deadline_ns(&self, now_ns: u64) -> Option<u64> {
        let b = self.cmos[REG_B];
        let mut next: Option<u64> = None;
        if b & B_PIE != 0 {
            if let Some(p) = self.period_ns() {
                next = Some((now_ns / p + 1) * p);
            }
        }
        if b & (B_UIE | B_AIE) != 0 && self.running() && b & B_SET == 0 {
            let frac = self.wall_ns(now_ns).rem_euclid(NS_PER_SEC as i128) as u64;
            let sec = now_ns + (NS_PER_SEC - frac);
            next = Some(next.map_or(sec, |n| n.min(sec)));
        }
        next
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        let i = usize::from(self.index);
        let tm = self.current_tm(now);
        match i {
            0 => self.bin_to_reg(tm.sec),
            2 => self.bin_to_reg(tm.min),
            4 => self.hour_to_reg(tm.hour),
            6 => self.bin_to_reg(tm.wday),
            7 => self.bin_to_reg(tm.mday),
            8 => self.bin_to_reg(tm.mon),
            9 => self.bin_to_reg(tm.year.rem_euclid(100) as u32),
            REG_CENTURY => self.bin_to_reg(tm.year.div_euclid(100) as u32),
            REG_A => (self.cmos[REG_A] & !A_UIP) | if self.uip(now) { A_UIP } else { 0 },
            REG_C => {
                self.update(now);
                std::mem::take(&mut self.cmos[REG_C])
            }
            _ => self.cmos[i],
        }
    }

    fn write_data(&mut self, val: u8) {
        let now = self.clock.now_ns();
        let i = usize::from(self.index);
        match i {
            0 | 2 | 4 | 6 | 7 | 8 | 9 | REG_CENTURY => {
                let mut tm = self.current_tm(now);
                match i {
                    0 => tm.sec = self.reg_to_bin(val),
                    2 => tm.min = self.reg_to_bin(val),
                    4 => tm.hour = self.reg_to_hour(val),
                    6 => tm.wday = self.reg_to_bin(val),
                    7 => tm.mday = self.reg_to_bin(val),
                    8 => tm.mon = self.reg_to_bin(val),
                    9 => tm.year = tm.year.div_euclid(100) * 100 + i64::from(self.reg_to_bin(val)),
                    _ => tm.year = i64::from(self.reg_to_bin(val)) * 100 + tm.year.rem_euclid(100),
                }
                if self.frozen.is_some() {
                    self.frozen = Some(tm);
                } else {
                    self.set_time(tm, now);
                }
            }
            REG_A => {
                self.update(now);
                self.cmos[REG_A] = val & 0x7f;
                self.last_period = self.period_index(now).unwrap_or(0);
            }
            REG_B => {
                self.update(now);
                let old = self.cmos[REG_B];
                let mut v = val;
                if v & B_SET != 0 {
                    // SET stops updates and clears UIE (data sheet, register B bit 7).
                    v &= !B_UIE;
                    if self.frozen.is_none() {
                        self.frozen = Some(self.current_tm(now));
                    }
                } else if old & B_SET != 0 {
                    if let Some(tm) = self.frozen.take() {
                        self.set_time(tm, now);
                    }
                }
                self.cmos[REG_B] = v;
                // Enabling an interrupt whose flag is already up raises IRQ8 now.
                self.update(now);
            }
            REG_C | REG_D => {} // read-only
            _ => self.cmos[i] = val,
        }
    }

    /// Makes the RTC read `tm` at guest time `now_ns`, the second starting now.
    fn set_time(&mut self, tm: Tm, now_ns: u64) {
        let want = i128::from(tm.to_unix()) * NS_PER_SEC as i128;
        self.offset_ns = want - self.clock.wall_unix_ns(now_ns) as i128;
        self.last_second = self.unix_secs(now_ns);
    }

    /// Port read (0x70 reads 0xff: the index register is write-only).
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            RTC_DATA => self.read_data(),
            _ => 0xff,
        }
    }

    /// Port write.
    pub fn write(&mut self, port: u16, val: u8) {
        match port {
            RTC_INDEX => {
                self.nmi_disabled = val & 0x80 != 0;
                self.index = val & 0x7f;
            }
            RTC_DATA => self.write_data(val),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-25 14:50:07 UTC, a Wednesday.
    const T0: u64 = 1_795_618_207;

    fn rd(rtc: &mut Rtc, i: u8) -> u8 {
        rtc.write(RTC_INDEX, i);
        rtc.read(RTC_DATA)
    }
    fn wr(rtc: &mut Rtc, i: u8, v: u8) {
        rtc.write(RTC_INDEX, i);
        rtc.write(RTC_DATA, v);
    }

    #[test]
    fn calendar_conversion() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let tm = Tm::from_unix(T0 as i64);
        assert_eq!(tm, Tm { sec: 7, min: 50, hour: 14, wday: 4, mday: 25, mon: 11, year: 2026 });
        assert_eq!(tm.to_unix(), T0 as i64);
    }

    #[test]
    fn reads_time_in_bcd_and_binary_and_12h() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c.clone());
        assert_eq!(rd(&mut rtc, 0), 0x07);
        assert_eq!(rd(&mut rtc, 2), 0x50);
        assert_eq!(rd(&mut rtc, 4), 0x14);
        assert_eq!(rd(&mut rtc, 6), 0x04);
        assert_eq!(rd(&mut rtc, 7), 0x25);
        assert_eq!(rd(&mut rtc, 8), 0x11);
        assert_eq!(rd(&mut rtc, 9), 0x26);
        assert_eq!(rd(&mut rtc, 0x32), 0x20);
        assert_eq!(rd(&mut rtc, 0x0d), 0x80);
        wr(&mut rtc, 0x0b, B_BINARY | B_24H);
        assert_eq!(rd(&mut rtc, 2), 50);
        wr(&mut rtc, 0x0b, 0);
        assert_eq!(rd(&mut rtc, 4), 0x82, "2 PM in 12-hour BCD");
        c.advance_ns(3 * NS_PER_SEC).unwrap();
        wr(&mut rtc, 0x0b, B_24H);
        assert_eq!(rd(&mut rtc, 0), 0x10, "guest time moves the RTC");
    }

    #[test]
    fn guest_can_set_the_time_with_set_bit() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c.clone());
        // mc146818_set_time: SET, divider chain held in reset, time written, then restored.
        wr(&mut rtc, 0x0b, B_SET | B_24H);
        let freq = rd(&mut rtc, 0x0a);
        wr(&mut rtc, 0x0a, freq | 0x70);
        assert_eq!(rd(&mut rtc, 0x0a) & A_UIP, 0, "no update while held in reset");
        wr(&mut rtc, 4, 0x23);
        wr(&mut rtc, 2, 0x59);
        wr(&mut rtc, 0, 0x58);
        c.advance_ns(5 * NS_PER_SEC).unwrap();
        assert_eq!(rd(&mut rtc, 0), 0x58, "frozen while SET");
        wr(&mut rtc, 0x0a, freq);
        wr(&mut rtc, 0x0b, B_24H);
        c.advance_ns(3 * NS_PER_SEC).unwrap();
        assert_eq!(rd(&mut rtc, 0), 0x01);
        assert_eq!(rd(&mut rtc, 2), 0x00);
        assert_eq!(rd(&mut rtc, 4), 0x00);
        assert_eq!(rd(&mut rtc, 7), 0x26, "rolled into the next day");
    }

    #[test]
    fn uip_window_lets_linux_read_a_stable_second() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c.clone());
        assert_ne!(rd(&mut rtc, 0x0a) & A_UIP, 0, "just after the second boundary");
        c.advance_ns(UIP_UPDATE_NS).unwrap();
        assert_eq!(rd(&mut rtc, 0x0a), 0x26);
        c.advance_to_ns(NS_PER_SEC - UIP_BEFORE_NS - 1).unwrap();
        assert_eq!(rd(&mut rtc, 0x0a) & A_UIP, 0);
        c.advance_ns(1).unwrap();
        assert_ne!(rd(&mut rtc, 0x0a) & A_UIP, 0, "244 µs before the update");
        // mc146818_get_time: poll UIP with 1 ms steps; it must clear within a few ms.
        let mut polls = 0;
        while rd(&mut rtc, 0x0a) & A_UIP != 0 {
            c.advance_ns(1_000_000).unwrap();
            polls += 1;
            assert!(polls < 5);
        }
        assert_eq!(rd(&mut rtc, 0), 0x08);
    }

    #[test]
    fn periodic_interrupt_and_register_c_clear_on_read() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c.clone());
        wr(&mut rtc, 0x0a, 0x26); // 1024 Hz
        wr(&mut rtc, 0x0b, B_24H | B_PIE);
        let d = rtc.next_deadline_ns(c.now_ns()).unwrap();
        assert_eq!(d, NS_PER_SEC / 1024);
        c.advance_to_ns(d - 1).unwrap();
        rtc.update(c.now_ns());
        assert!(!rtc.irq_level());
        c.advance_to_ns(d).unwrap();
        rtc.update(c.now_ns());
        assert!(rtc.irq_level());
        assert_eq!(rd(&mut rtc, 0x0c), C_IRQF | C_PF);
        assert!(!rtc.irq_level());
        assert_eq!(rd(&mut rtc, 0x0c), 0);
    }

    #[test]
    fn update_and_alarm_interrupts() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c.clone());
        wr(&mut rtc, 0x0a, 0x20); // no periodic rate, so PF stays clear
        wr(&mut rtc, 1, 0x09); // alarm at hh:mm:09, any hour/minute
        wr(&mut rtc, 3, 0xc0);
        wr(&mut rtc, 5, 0xff);
        wr(&mut rtc, 0x0b, B_24H | B_AIE);
        c.advance_ns(NS_PER_SEC).unwrap(); // :08
        rtc.update(c.now_ns());
        assert!(!rtc.irq_level(), "UF set but UIE off, no alarm yet");
        assert_eq!(rd(&mut rtc, 0x0c), C_UF);
        c.advance_ns(NS_PER_SEC).unwrap(); // :09
        rtc.update(c.now_ns());
        assert!(rtc.irq_level());
        assert_eq!(rd(&mut rtc, 0x0c), C_IRQF | C_AF | C_UF);
        wr(&mut rtc, 0x0b, B_24H | B_UIE);
        assert_eq!(rtc.next_deadline_ns(c.now_ns()), Some(c.now_ns() + NS_PER_SEC));
    }

    #[test]
    fn nvram_memory_layout_and_nmi_bit() {
        let c = GuestClock::virtual_clock(T0);
        let mut rtc = Rtc::new(c);
        rtc.set_memory_layout(512 << 20, 1 << 30, 1);
        assert_eq!((rd(&mut rtc, 0x15), rd(&mut rtc, 0x16)), (0x80, 0x02));
        // (512 - 1) MiB in KiB = 523264 > 65535: capped.
        assert_eq!((rd(&mut rtc, 0x17), rd(&mut rtc, 0x18)), (0xff, 0xff));
        assert_eq!((rd(&mut rtc, 0x30), rd(&mut rtc, 0x31)), (0xff, 0xff));
        // (512 - 16) MiB / 64 KiB = 7936 = 0x1f00.
        assert_eq!((rd(&mut rtc, 0x34), rd(&mut rtc, 0x35)), (0x00, 0x1f));
        // 1 GiB / 64 KiB = 0x4000.
        assert_eq!((rd(&mut rtc, 0x5b), rd(&mut rtc, 0x5c), rd(&mut rtc, 0x5d)), (0x00, 0x40, 0x00));
        rtc.write(RTC_INDEX, 0x80 | 0x40);
        assert!(rtc.nmi_disabled());
        rtc.write(RTC_DATA, 0x5a);
        assert_eq!(rtc.read(RTC_DATA), 0x5a);
        rtc.write(RTC_INDEX, 0x40);
        assert!(!rtc.nmi_disabled());
    }
}
