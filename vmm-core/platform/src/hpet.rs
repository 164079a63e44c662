//! The HPET (IA-PC HPET Specification 1.0a): a 100 MHz 64-bit main counter and three
//! comparators at MMIO 0xfed00000, with legacy replacement routing (timer 0 → IRQ0/GSI2,
//! timer 1 → IRQ8) as QEMU offers it. Counting is computed from the guest clock.
//!
//! Not modelled: FSB (MSI) delivery (never advertised).

use crate::clock::{ns_to_ticks, ticks_to_ns_ceil, GuestClock};

/// MMIO base.
pub const HPET_BASE: u64 = 0xfed0_0000;
/// Size of the register window.
pub const HPET_SIZE: u64 = 0x400;
/// Counter rate: a 10 ns period, as QEMU's.
pub const HPET_HZ: u64 = 100_000_000;
const PERIOD_FS: u64 = 10_000_000;
/// Number of comparators.
pub const NUM_TIMERS: usize = 3;
/// Which GSIs a comparator may be routed to when not in legacy mode: 2, 8 and 16-23 (QEMU's
/// PC value).
const ROUTE_CAP: u64 = 0x00ff_0104;

/// Capabilities (§2.3.4): revision 1, NUM_TIM_CAP, 64-bit counter, legacy replacement capable,
/// vendor 0x8086, counter period in fs.
pub const GCAP_ID: u64 =
    0x01 | ((NUM_TIMERS as u64 - 1) << 8) | (1 << 13) | (1 << 15) | (0x8086 << 16) | (PERIOD_FS << 32);

const CFG_ENABLE: u64 = 1 << 0;
const CFG_LEGACY: u64 = 1 << 1;

const TN_LEVEL: u64 = 1 << 1;
const TN_ENABLE: u64 = 1 << 2;
const TN_PERIODIC: u64 = 1 << 3;
const TN_PERIODIC_CAP: u64 = 1 << 4;
const TN_SIZE_CAP: u64 = 1 << 5;
const TN_SETVAL: u64 = 1 << 6;
const TN_32BIT: u64 = 1 << 8;
const TN_ROUTE_SHIFT: u32 = 9;
const TN_ROUTE_MASK: u64 = 0x1f << TN_ROUTE_SHIFT;
/// Guest-writable timer configuration bits.
const TN_WRITABLE: u64 = TN_LEVEL | TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT | TN_ROUTE_MASK;

/// Where a comparator's interrupt goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HpetRoute {
    /// Legacy replacement: an ISA IRQ (0 or 8), through the 8259 and IOAPIC like the
    /// PIT/RTC it replaces.
    Isa(u8),
    /// A GSI (IOAPIC pin), from the comparator's INT_ROUTE_CNF.
    Gsi(u32),
}

/// An interrupt output change of the HPET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HpetIrq {
    /// An edge-triggered comparator matched.
    Pulse(HpetRoute),
    /// A level-triggered comparator's output is now at this level.
    Level(HpetRoute, bool),
}

#[derive(Clone, Debug, Default)]
struct Timer {
    config: u64,
    cmp: u64,
    period: u64,
}

/// The HPET.
#[derive(Clone, Debug)]
pub struct Hpet {
    clock: GuestClock,
    config: u64,
    /// General interrupt status (level-triggered comparators that fired).
    isr: u64,
    /// Counter value at `base_ns` (or the frozen value while halted).
    counter_base: u64,
    base_ns: u64,
    /// Counter value up to which comparator matches have been evaluated.
    checked: u64,
    timers: [Timer; NUM_TIMERS],
}

impl Hpet {
    /// A halted HPET with every comparator disabled.
    pub fn new(clock: GuestClock) -> Self {
        let mut timers: [Timer; NUM_TIMERS] = Default::default();
        for t in timers.iter_mut() {
            t.config = TN_PERIODIC_CAP | TN_SIZE_CAP | (ROUTE_CAP << 32);
            t.cmp = u64::MAX;
        }
        Hpet { clock, config: 0, isr: 0, counter_base: 0, base_ns: 0, checked: 0, timers }
    }

    fn enabled(&self) -> bool {
        self.config & CFG_ENABLE != 0
    }

    /// Whether legacy replacement routing is on (the PIT's IRQ0 and the RTC's IRQ8 are then
    /// disconnected, spec §2.3.9).
    pub fn legacy_replacement(&self) -> bool {
        self.config & CFG_LEGACY != 0
    }

    fn counter(&self, now_ns: u64) -> u64 {
        if self.enabled() {
            self.counter_base.wrapping_add(ns_to_ticks(now_ns.saturating_sub(self.base_ns), HPET_HZ))
        } else {
            self.counter_base
        }
    }

    fn route(&self, n: usize) -> HpetRoute {
        if self.legacy_replacement() && n < 2 {
            return HpetRoute::Isa(if n == 0 { 0 } else { 8 });
        }
        HpetRoute::Gsi(((self.timers[n].config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32)
    }

    /// The first counter value after `after` at which comparator `n` matches.
    fn next_match(&self, n: usize, after: u64) -> Option<u64> {
        let t = &self.timers[n];
        if t.config & TN_32BIT != 0 {
            let cmp = t.cmp & 0xffff_ffff;
            let mut m = (after & !0xffff_ffff) | cmp;
            if m <= after {
                m = m.checked_add(1 << 32)?;
            }
            Some(m)
        } else {
            (t.cmp > after).then_some(t.cmp)
        }
    }

    /// Evaluates comparator matches up to the guest clock; interrupt output changes are
    /// appended to `out`. A periodic comparator that missed several periods fires once.
    pub fn update(&mut self, now_ns: u64, out: &mut Vec<HpetIrq>) {
        if !self.enabled() {
            return;
        }
        let c = self.counter(now_ns);
        let prev = self.checked;
        if c <= prev {
            return;
        }
        for n in 0..NUM_TIMERS {
            let Some(m) = self.next_match(n, prev) else {
                continue;
            };
            if m > c {
                continue;
            }
            let cfg = self.timers[n].config;
            if cfg & TN_PERIODIC != 0 {
                let period = self.timers[n].period.max(1);
                // Next comparator value strictly after the current count.
                let k = (c - m) / period + 1;
                let next = m.wrapping_add(k.wrapping_mul(period));
                self.timers[n].cmp = if cfg & TN_32BIT != 0 { next & 0xffff_ffff } else { next };
            }
            if cfg & TN_ENABLE == 0 {
                continue;
            }
            let route = self.route(n);
            if cfg & TN_LEVEL != 0 {
                self.isr |= 1 << n;
                out.push(HpetIrq::Level(route, true));
            } else {
                out.push(HpetIrq::Pulse(route));
            }
        }
        self.checked = c;
    }

    /// Guest time of the next enabled comparator match.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        (0..NUM_TIMERS)
            .filter(|&n| self.timers[n].config & TN_ENABLE != 0)
            .filter_map(|n| self.next_match(n, self.checked))
            .min()
            .map(|m| {
                let ticks = m.wrapping_sub(self.counter_base);
                self.base_ns.saturating_add(ticks_to_ns_ceil(ticks, HPET_HZ))
            })
    }

    /// Current interrupt levels of the level-triggered comparators (for re-driving lines).
    pub fn level_outputs(&self) -> Vec<(HpetRoute, bool)> {
        (0..NUM_TIMERS)
            .filter(|&n| self.timers[n].config & TN_LEVEL != 0)
            .map(|n| {
                let on = self.isr & (1 << n) != 0 && self.timers[n].config & TN_ENABLE != 0;
                (self.route(n), on)
            })
            .collect()
    }

    fn read_reg(&self, reg: u64) -> u64 {
        let now = self.clock.now_ns();
        match reg {
            0x000 => GCAP_ID,
            0x010 => self.config,
            0x020 => self.isr,
            0x0f0 => self.counter(now),
            0x100..=0x15f => {
                let n = ((reg - 0x100) / 0x20) as usize;
                let t = &self.timers[n];
                match (reg - 0x100) % 0x20 {
                    0x00 => t.config,
                    0x08 => t.cmp,
                    _ => 0, // FSB route: not offered.
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, val: u64, mask: u64, out: &mut Vec<HpetIrq>) {
        let now = self.clock.now_ns();
        // Evaluate up to now under the old settings first.
        self.update(now, out);
        let merge = |old: u64| (old & !mask) | (val & mask);
        match reg {
            0x010 => {
                let old = self.config;
                let new = merge(old) & (CFG_ENABLE | CFG_LEGACY);
                if old & CFG_ENABLE == 0 && new & CFG_ENABLE != 0 {
                    self.base_ns = now;
                    self.checked = self.counter_base;
                } else if old & CFG_ENABLE != 0 && new & CFG_ENABLE == 0 {
                    self.counter_base = self.counter(now);
                }
                self.config = new;
                // Routing changed: level outputs move with it (the caller re-drives them).
            }
            0x020 => {
                // Write 1 to clear a level-triggered status bit.
                let clear = val & mask & ((1 << NUM_TIMERS) - 1);
                for n in 0..NUM_TIMERS {
                    if clear & (1 << n) != 0 && self.isr & (1 << n) != 0 {
                        self.isr &= !(1 << n);
                        out.push(HpetIrq::Level(self.route(n), false));
                    }
                }
            }
            // The main counter is writable while halted (spec §2.3.7).
            0x0f0 if !self.enabled() => {
                self.counter_base = merge(self.counter_base);
                self.checked = self.counter_base;
            }
            0x100..=0x15f => {
                let n = ((reg - 0x100) / 0x20) as usize;
                match (reg - 0x100) % 0x20 {
                    0x00 => {
                        let t = &mut self.timers[n];
                        let old = t.config;
                        let new = merge(old);
                        t.config = (old & !TN_WRITABLE) | (new & TN_WRITABLE);
                        if t.config & TN_32BIT != 0 {
                            t.cmp &= 0xffff_ffff;
                        }
                        if old & TN_LEVEL != 0 && t.config & TN_LEVEL == 0 && self.isr & (1 << n) != 0 {
                            self.isr &= !(1 << n);
                            out.push(HpetIrq::Level(self.route(n), false));
                        }
                    }
                    0x08 => {
                        // Periodic: every write sets the period, and with VAL_SET also the
                        // comparator; one-shot: the comparator (QEMU's reading of §2.3.9.2).
                        let t = &mut self.timers[n];
                        let width = if t.config & TN_32BIT != 0 { 0xffff_ffff } else { u64::MAX };
                        let periodic = t.config & TN_PERIODIC != 0;
                        if !periodic || t.config & TN_SETVAL != 0 {
                            t.cmp = merge(t.cmp) & width;
                        }
                        if periodic {
                            t.period = merge(t.period) & width;
                        }
                        t.config &= !TN_SETVAL;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// MMIO read at `offset` (32- or 64-bit accesses; any size returns the addressed bytes).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v = self.read_reg(offset & !7).to_le_bytes();
        let within = (offset & 7) as usize;
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(within + i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset`; interrupt output changes are appended to `out`.
    pub fn write(&mut self, offset: u64, data: &[u8], out: &mut Vec<HpetIrq>) {
        let within = (offset & 7) as usize;
        if data.is_empty() || within + data.len() > 8 {
            log::debug!("hpet: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        let mut b = [0u8; 8];
        b[within..within + data.len()].copy_from_slice(data);
        let mut m = [0u8; 8];
        m[within..within + data.len()].fill(0xff);
        self.write_reg(offset & !7, u64::from_le_bytes(b), u64::from_le_bytes(m), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w32(h: &mut Hpet, off: u64, v: u32) -> Vec<HpetIrq> {
        let mut out = Vec::new();
        h.write(off, &v.to_le_bytes(), &mut out);
        out
    }
    fn r32(h: &Hpet, off: u64) -> u32 {
        let mut d = [0u8; 4];
        h.read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn ns(ticks: u64) -> u64 {
        ticks_to_ns_ceil(ticks, HPET_HZ)
    }

    #[test]
    fn capabilities_and_counter() {
        let c = GuestClock::virtual_clock(0);
        let mut h = Hpet::new(c.clone());
        assert_eq!(r32(&h, 0), 0x8086_a201);
        assert_eq!(r32(&h, 4), 10_000_000);
        c.advance_ns(1_000).unwrap();
        assert_eq!(r32(&h, 0xf0), 0, "halted");
        w32(&mut h, 0xf0, 500);
        w32(&mut h, 0x10, 1);
        c.advance_ns(1_000).unwrap();
        assert_eq!(r32(&h, 0xf0), 600, "100 MHz from 500");
        w32(&mut h, 0xf0, 0);
        assert_eq!(r32(&h, 0xf0), 600, "not writable while running");
        w32(&mut h, 0x10, 0);
        c.advance_ns(1_000).unwrap();
        assert_eq!(r32(&h, 0xf0), 600, "halted again");
        // Timer caps: periodic and 64-bit capable, routes 2, 8, 16-23.
        let cap = r32(&h, 0x100);
        assert_eq!(cap & 0x30, 0x30);
        assert_eq!(r32(&h, 0x104), 0x00ff_0104);
    }

    /// Linux's legacy periodic setup (K: arch/x86/kernel/hpet.c hpet_set_periodic): the
    /// comparator written twice, the second write setting the period.
    #[test]
    fn legacy_periodic_timer0_like_linux() {
        let c = GuestClock::virtual_clock(0);
        let mut h = Hpet::new(c.clone());
        w32(&mut h, 0x10, 3); // enable + legacy
        let delta = 400_000u32; // 4 ms
        let now = r32(&h, 0xf0);
        w32(&mut h, 0x100, (TN_ENABLE | TN_PERIODIC | TN_SETVAL | TN_32BIT) as u32);
        w32(&mut h, 0x108, now + delta);
        w32(&mut h, 0x108, delta);
        assert_eq!(h.next_deadline_ns(), Some(ns(u64::from(delta))));
        let mut out = Vec::new();
        c.advance_to_ns(ns(u64::from(delta)) - 1).unwrap();
        h.update(c.now_ns(), &mut out);
        assert!(out.is_empty());
        c.advance_to_ns(ns(u64::from(delta))).unwrap();
        h.update(c.now_ns(), &mut out);
        assert_eq!(out, vec![HpetIrq::Pulse(HpetRoute::Isa(0))]);
        assert_eq!(r32(&h, 0x108), 2 * delta, "comparator advanced by the period");
        // Missed periods coalesce.
        out.clear();
        c.advance_to_ns(ns(10 * u64::from(delta))).unwrap();
        h.update(c.now_ns(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(r32(&h, 0x108), 11 * delta);
    }

    /// Linux's one-shot clockevent: comparator = counter + delta, 32-bit mode, the match must
    /// fire once even though it is an equality compare.
    #[test]
    fn one_shot_32bit_fires_once_and_wraps() {
        let c = GuestClock::virtual_clock(0);
        let mut h = Hpet::new(c.clone());
        w32(&mut h, 0x10, 1);
        w32(&mut h, 0x120, (TN_ENABLE | TN_32BIT | (20 << TN_ROUTE_SHIFT)) as u32);
        w32(&mut h, 0x128, 1000);
        let mut out = Vec::new();
        c.advance_to_ns(ns(5000)).unwrap();
        h.update(c.now_ns(), &mut out);
        assert_eq!(out, vec![HpetIrq::Pulse(HpetRoute::Gsi(20))]);
        out.clear();
        c.advance_to_ns(ns(9000)).unwrap();
        h.update(c.now_ns(), &mut out);
        assert!(out.is_empty(), "one-shot");
        // The next match of a 32-bit comparator is after the counter wraps its low half.
        assert_eq!(h.next_deadline_ns(), Some(ns((1 << 32) + 1000)));
    }

    #[test]
    fn level_mode_status_and_clear() {
        let c = GuestClock::virtual_clock(0);
        let mut h = Hpet::new(c.clone());
        w32(&mut h, 0x10, 1);
        w32(&mut h, 0x140, (TN_ENABLE | TN_LEVEL | (17 << TN_ROUTE_SHIFT)) as u32);
        w32(&mut h, 0x148, 100);
        w32(&mut h, 0x14c, 0);
        let mut out = Vec::new();
        c.advance_to_ns(ns(100)).unwrap();
        h.update(c.now_ns(), &mut out);
        assert_eq!(out, vec![HpetIrq::Level(HpetRoute::Gsi(17), true)]);
        assert_eq!(r32(&h, 0x20), 4);
        assert_eq!(h.level_outputs(), vec![(HpetRoute::Gsi(17), true)]);
        assert_eq!(w32(&mut h, 0x20, 4), vec![HpetIrq::Level(HpetRoute::Gsi(17), false)]);
        assert_eq!(r32(&h, 0x20), 0);
    }
}
