//! The 8254 programmable interval timer (ports 0x40-0x43) and port 0x61 (NMI status and
//! control: channel 2 gate and output, speaker enable, refresh toggle).
//!
//! Behaviour follows the Intel 8254 data sheet ("Modes", "Read Operations", "Read-Back
//! Command") and the IBM PC AT port 0x61 layout. Counting is computed from the guest clock at
//! 1.193182 MHz; nothing ticks in the background.

use crate::clock::{ns_to_ticks, ticks_to_ns_ceil, GuestClock};

/// Input clock of the 8254 on a PC.
pub const PIT_HZ: u64 = 1_193_182;
/// First port (channel 0); channels 1, 2 follow, then the control word register at 0x43.
pub const PIT_BASE: u16 = 0x40;
/// NMI status and control register ("port B").
pub const PORT_61: u16 = 0x61;
/// Half-period of the DRAM refresh toggle (port 0x61 bit 4): 15.085 µs, as on the AT.
const REFRESH_HALF_PERIOD_NS: u64 = 15_085;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Latch = 0,
    Lsb = 1,
    Msb = 2,
    LsbMsb = 3,
}

impl Access {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            3 => Access::LsbMsb,
            _ => Access::Latch,
        }
    }
}

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// Programmed count N (1..=65536, or 1..=10000 in BCD).
    count: u64,
    /// A count has been written since the last control word (the data sheet's "null count"
    /// is the opposite).
    loaded: bool,
    /// Counting has started (count loaded, and for modes 1/5 triggered by the gate).
    running: bool,
    /// PIT tick at which counting (re)started.
    start_tick: u64,
    /// Elapsed ticks frozen while the gate holds the count (modes 0, 2, 3, 4 with gate low).
    frozen: Option<u64>,
    gate: bool,
    /// Next count byte written is the MSB (LSB/MSB access).
    write_msb_next: bool,
    write_lsb: u8,
    /// Next byte read is the MSB (LSB/MSB access).
    read_msb_next: bool,
    latched_count: Option<u16>,
    latched_status: Option<u8>,
    /// Rising edges of OUT already reported (channel 0 drives IRQ0).
    edges_reported: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: Access::LsbMsb,
            bcd: false,
            count: 0x10000,
            loaded: false,
            running: false,
            start_tick: 0,
            frozen: None,
            gate,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latched_count: None,
            latched_status: None,
            edges_reported: 0,
        }
    }

    fn wrap(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x10000
        }
    }

    /// Ticks counted since the start (frozen while the gate holds counting).
    fn elapsed(&self, t: u64) -> u64 {
        self.frozen.unwrap_or(t.saturating_sub(self.start_tick))
    }

    /// The counting element (CE) at tick `t`.
    fn counter(&self, t: u64) -> u64 {
        if !self.running {
            return self.count % self.wrap();
        }
        let d = self.elapsed(t);
        let n = self.count;
        let wrap = self.wrap();
        match self.mode {
            2 => n - d % n,
            // Mode 3 decrements by two each clock (8254 data sheet "Mode 3").
            3 => (n - (2 * d) % n) & !1,
            // Modes 0, 1, 4, 5 keep counting down through 0 and wrap.
            _ => (n % wrap + wrap - d % wrap) % wrap,
        }
    }

    /// The OUT pin at tick `t`.
    fn out(&self, t: u64) -> bool {
        if !self.running {
            // After a control word: mode 0 drives OUT low, every other mode high.
            return self.mode != 0;
        }
        let d = self.elapsed(t);
        let n = self.count;
        match self.mode {
            0 | 1 => d >= n,
            2 => {
                if !self.gate {
                    return true;
                }
                d % n != n - 1 || n == 1
            }
            3 => {
                if !self.gate {
                    return true;
                }
                d % n < n.div_ceil(2)
            }
            _ => d != n, // 4 and 5: a one-clock low pulse when the count reaches 0
        }
    }

    /// Number of rising edges of OUT at ticks <= `t` since counting started.
    fn rising_edges(&self, t: u64) -> u64 {
        if !self.running {
            return 0;
        }
        let d = self.elapsed(t);
        let n = self.count;
        match self.mode {
            0 | 1 => u64::from(d >= n),
            2 | 3 => d / n,
            _ => u64::from(d > n),
        }
    }

    /// Tick (absolute) of the next rising edge not yet reported.
    fn next_edge_tick(&self) -> Option<u64> {
        if !self.running || self.frozen.is_some() {
            return None;
        }
        let n = self.count;
        let rel = match self.mode {
            0 | 1 if self.edges_reported == 0 => n,
            2 | 3 => (self.edges_reported + 1).saturating_mul(n),
            4 | 5 if self.edges_reported == 0 => n + 1,
            _ => return None,
        };
        Some(self.start_tick.saturating_add(rel))
    }

    fn status(&self, t: u64) -> u8 {
        (u8::from(self.out(t)) << 7)
            | (u8::from(!self.loaded) << 6)
            | ((self.access as u8) << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn encode(&self, v: u64) -> u16 {
        if self.bcd {
            let v = v % 10_000;
            (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
        } else {
            v as u16
        }
    }

    fn decode(&self, raw: u16) -> u64 {
        let v = if self.bcd {
            let r = u64::from(raw);
            (r >> 12 & 0xf) * 1000 + (r >> 8 & 0xf) * 100 + (r >> 4 & 0xf) * 10 + (r & 0xf)
        } else {
            u64::from(raw)
        };
        if v == 0 {
            self.wrap()
        } else {
            v
        }
    }

    fn latch(&mut self, t: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.encode(self.counter(t)));
            self.read_msb_next = false;
        }
    }

    fn control(&mut self, val: u8) {
        self.access = Access::from_bits(val >> 4);
        self.mode = match (val >> 1) & 7 {
            6 => 2,
            7 => 3,
            m => m,
        };
        self.bcd = val & 1 != 0;
        self.loaded = false;
        self.running = false;
        self.frozen = None;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.edges_reported = 0;
    }

    fn load(&mut self, raw: u16, t: u64) {
        self.count = self.decode(raw);
        self.loaded = true;
        self.edges_reported = 0;
        self.frozen = None;
        self.start_tick = t;
        // Modes 1 and 5 wait for a rising gate edge; the others start counting at once (and
        // hold while the gate is low).
        self.running = !matches!(self.mode, 1 | 5);
        if self.running && !self.gate && matches!(self.mode, 0 | 2 | 3 | 4) {
            self.frozen = Some(0);
        }
    }

    fn write(&mut self, val: u8, t: u64) {
        match self.access {
            Access::Lsb => self.load(u16::from(val), t),
            Access::Msb => self.load(u16::from(val) << 8, t),
            Access::LsbMsb | Access::Latch => {
                if self.write_msb_next {
                    self.write_msb_next = false;
                    self.load(u16::from(self.write_lsb) | u16::from(val) << 8, t);
                } else {
                    self.write_lsb = val;
                    self.write_msb_next = true;
                }
            }
        }
    }

    fn read(&mut self, t: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        let (value, latched) = match self.latched_count {
            Some(v) => (v, true),
            None => (self.encode(self.counter(t)), false),
        };
        let (byte, done) = match self.access {
            Access::Lsb => (value as u8, true),
            Access::Msb => ((value >> 8) as u8, true),
            Access::LsbMsb | Access::Latch => {
                if self.read_msb_next {
                    self.read_msb_next = false;
                    ((value >> 8) as u8, true)
                } else {
                    self.read_msb_next = true;
                    (value as u8, false)
                }
            }
        };
        if latched && done {
            self.latched_count = None;
        }
        byte
    }

    fn set_gate(&mut self, gate: bool, t: u64) {
        let rising = gate && !self.gate;
        let falling = !gate && self.gate;
        self.gate = gate;
        match self.mode {
            1 | 5 if rising && self.loaded => {
                self.running = true;
                self.start_tick = t;
                self.edges_reported = 0;
            }
            0 | 4 if self.running => {
                if falling {
                    self.frozen = Some(self.elapsed(t));
                } else if rising {
                    if let Some(d) = self.frozen.take() {
                        self.start_tick = t.saturating_sub(d);
                    }
                }
            }
            2 | 3 if self.running => {
                if falling {
                    self.frozen = Some(self.elapsed(t));
                } else if rising {
                    // A rising gate reloads the counter (data sheet, modes 2 and 3).
                    self.frozen = None;
                    self.start_tick = t;
                    self.edges_reported = 0;
                }
            }
            _ => {}
        }
    }
}

/// The 8254 and port 0x61.
#[derive(Clone, Debug)]
pub struct Pit {
    clock: GuestClock,
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written (gate 2, speaker data, parity and I/O check disables).
    port61: u8,
}

impl Pit {
    /// A PIT in its power-on state (channels in mode 0, nothing loaded).
    pub fn new(clock: GuestClock) -> Self {
        Pit {
            clock,
            // Channels 0 and 1 have their gates tied high; channel 2's comes from port 0x61.
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
        }
    }

    fn tick(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns, PIT_HZ)
    }

    /// Port read, `port` in 0x40..=0x43 (0x43 reads as 0xff: the control register is
    /// write-only).
    pub fn read(&mut self, port: u16) -> u8 {
        let t = self.tick(self.clock.now_ns());
        match port.wrapping_sub(PIT_BASE) {
            i @ 0..=2 => self.channels[usize::from(i)].read(t),
            _ => 0xff,
        }
    }

    /// Port write, `port` in 0x40..=0x43.
    pub fn write(&mut self, port: u16, val: u8) {
        let t = self.tick(self.clock.now_ns());
        match port.wrapping_sub(PIT_BASE) {
            i @ 0..=2 => self.channels[usize::from(i)].write(val, t),
            3 => {
                let sc = val >> 6;
                if sc == 3 {
                    // Read-back: bit 5 clear latches counts, bit 4 clear latches status,
                    // bits 1-3 select channels 0-2.
                    for (i, ch) in self.channels.iter_mut().enumerate() {
                        if val & (2 << i) == 0 {
                            continue;
                        }
                        if val & 0x20 == 0 {
                            ch.latch(t);
                        }
                        if val & 0x10 == 0 && ch.latched_status.is_none() {
                            ch.latched_status = Some(ch.status(t));
                        }
                    }
                } else {
                    let ch = &mut self.channels[usize::from(sc)];
                    if (val >> 4) & 3 == 0 {
                        ch.latch(t);
                    } else {
                        ch.control(val);
                    }
                }
            }
            _ => {}
        }
    }

    /// Port 0x61 read: bit 5 is channel 2's OUT, bit 4 the refresh toggle, bits 6-7 (NMI
    /// sources) are never set.
    pub fn read_port61(&mut self) -> u8 {
        let now = self.clock.now_ns();
        let t = self.tick(now);
        let refresh = (now / REFRESH_HALF_PERIOD_NS) & 1 == 1;
        (self.port61 & 0x0f) | (u8::from(refresh) << 4) | (u8::from(self.channels[2].out(t)) << 5)
    }

    /// Port 0x61 write: bit 0 gates channel 2, bits 1-3 are stored.
    pub fn write_port61(&mut self, val: u8) {
        let t = self.tick(self.clock.now_ns());
        self.port61 = val & 0x0f;
        self.channels[2].set_gate(val & 1 != 0, t);
    }

    /// Reports whether channel 0's OUT had a rising edge (IRQ0) since the last call. Several
    /// missed edges count as one: a late tick, not a burst.
    pub fn update(&mut self, now_ns: u64) -> bool {
        let t = self.tick(now_ns);
        let ch = &mut self.channels[0];
        let edges = ch.rising_edges(t);
        if edges > ch.edges_reported {
            ch.edges_reported = edges;
            true
        } else {
            false
        }
    }

    /// Guest time of channel 0's next rising edge (the next IRQ0), if one is coming.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.channels[0].next_edge_tick().map(|tick| ticks_to_ns_ceil(tick, PIT_HZ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Tsc;

    fn ns_of_ticks(t: u64) -> u64 {
        ticks_to_ns_ceil(t, PIT_HZ)
    }

    #[test]
    fn mode2_periodic_irq0_like_linux_hz250() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        // Linux init_pit_timer periodic: 0x34, LATCH = 1193182/250 rounded = 4773.
        pit.write(0x43, 0x34);
        pit.write(0x40, (4773 & 0xff) as u8);
        assert_eq!(pit.next_deadline_ns(), None, "not loaded until the MSB");
        pit.write(0x40, (4773 >> 8) as u8);
        let d = pit.next_deadline_ns().unwrap();
        assert_eq!(d, ns_of_ticks(4773));
        c.advance_to_ns(d - 1).unwrap();
        assert!(!pit.update(c.now_ns()));
        c.advance_to_ns(d).unwrap();
        assert!(pit.update(c.now_ns()));
        assert!(!pit.update(c.now_ns()));
        assert_eq!(pit.next_deadline_ns(), Some(ns_of_ticks(2 * 4773)));
        // Missed periods coalesce into one edge.
        c.advance_to_ns(ns_of_ticks(10 * 4773)).unwrap();
        assert!(pit.update(c.now_ns()));
        assert!(!pit.update(c.now_ns()));
        assert_eq!(pit.next_deadline_ns(), Some(ns_of_ticks(11 * 4773)));
    }

    #[test]
    fn latch_and_lsb_msb_reads() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write(0x43, 0x30); // ch0 lohi mode 0
        pit.write(0x40, 0x00);
        pit.write(0x40, 0x10); // 0x1000
        c.advance_to_ns(ns_of_ticks(0x10)).unwrap();
        pit.write(0x43, 0x00); // latch ch0
        c.advance_to_ns(ns_of_ticks(0x20)).unwrap();
        assert_eq!(pit.read(0x40), 0xf0);
        assert_eq!(pit.read(0x40), 0x0f, "latched 0x0ff0 despite time moving");
        // Unlatched live read now.
        assert_eq!(pit.read(0x40), 0xe0);
        assert_eq!(pit.read(0x40), 0x0f);
        // Mode 0 wraps after terminal count and OUT stays high.
        c.advance_to_ns(ns_of_ticks(0x1001)).unwrap();
        assert!(pit.update(c.now_ns()));
        assert_eq!(pit.read(0x40), 0xff);
        assert_eq!(pit.read(0x40), 0xff);
        assert_eq!(pit.next_deadline_ns(), None, "mode 0 fires once");
    }

    #[test]
    fn read_back_status_and_count() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write(0x43, 0xb6); // ch2 lohi mode 3
        pit.write(0x43, 0xe8); // read-back status of ch2
        assert_eq!(pit.read(0x42), 0xf6, "OUT high, null count, lohi, mode 3");
        pit.write(0x42, 100);
        pit.write(0x42, 0);
        pit.write(0x43, 0xc8); // read-back count+status of ch2
        assert_eq!(pit.read(0x42), 0xb6, "status first, count loaded now");
        assert_eq!(pit.read(0x42), 100, "gate low: count held");
        assert_eq!(pit.read(0x42), 0);
    }

    #[test]
    fn bcd_counting() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write(0x43, 0x31); // ch0 lohi mode 0 BCD
        pit.write(0x40, 0x00);
        pit.write(0x40, 0x10); // BCD 1000
        c.advance_to_ns(ns_of_ticks(1)).unwrap();
        pit.write(0x43, 0x00);
        assert_eq!(pit.read(0x40), 0x99);
        assert_eq!(pit.read(0x40), 0x09, "BCD 0999");
    }

    #[test]
    fn channel2_gate_and_out_via_port61() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write_port61(0x00);
        pit.write(0x43, 0xb0); // ch2 lohi mode 0
        pit.write(0x42, 100);
        pit.write(0x42, 0);
        assert_eq!(pit.read_port61() & 0x20, 0, "OUT low in mode 0");
        c.advance_to_ns(ns_of_ticks(200)).unwrap();
        assert_eq!(pit.read_port61() & 0x20, 0, "gate low: not counting");
        pit.write_port61(0x01);
        assert_eq!(pit.read_port61() & 0x03, 0x01);
        c.advance_to_ns(ns_of_ticks(299)).unwrap();
        assert_eq!(pit.read_port61() & 0x20, 0);
        c.advance_to_ns(ns_of_ticks(300)).unwrap();
        assert_eq!(pit.read_port61() & 0x20, 0x20, "OUT high after 100 gated ticks");
    }

    #[test]
    fn mode3_square_wave_and_mode4_strobe() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write_port61(0x01);
        pit.write(0x43, 0xb6); // ch2 lohi mode 3
        pit.write(0x42, 10);
        pit.write(0x42, 0);
        // High for 5 ticks, low for 5, period 10; the count steps by 2.
        for (tick, high) in [(0, true), (4, true), (5, false), (9, false), (10, true), (15, false)] {
            c.advance_to_ns(ns_of_ticks(tick)).unwrap();
            assert_eq!(pit.read_port61() & 0x20 != 0, high, "tick {tick}");
        }
        pit.write(0x43, 0x80); // latch ch2
        let lo = pit.read(0x42);
        let hi = pit.read(0x42);
        assert_eq!(u16::from(lo) | (u16::from(hi) << 8), 10, "mode 3 decrements by 2");
        // Gate low forces OUT high and holds the count; a rising gate reloads.
        c.advance_to_ns(ns_of_ticks(17)).unwrap();
        pit.write_port61(0x00);
        assert_ne!(pit.read_port61() & 0x20, 0);
        c.advance_to_ns(ns_of_ticks(100)).unwrap();
        pit.write_port61(0x01);
        c.advance_to_ns(ns_of_ticks(105)).unwrap();
        assert_eq!(pit.read_port61() & 0x20, 0, "restarted at the rising gate");

        // Mode 4 (what Linux's PIT one-shot clockevent uses, 0x38): OUT low for one tick at
        // terminal count, IRQ0 on the following rising edge, once.
        pit.write(0x43, 0x38);
        pit.write(0x40, 100);
        pit.write(0x40, 0);
        let t0 = c.now_ns();
        let start = crate::clock::ns_to_ticks(t0, PIT_HZ);
        assert_eq!(pit.next_deadline_ns(), Some(ns_of_ticks(start + 101)));
        c.advance_to_ns(ns_of_ticks(start + 100)).unwrap();
        assert!(!pit.update(c.now_ns()));
        c.advance_to_ns(ns_of_ticks(start + 101)).unwrap();
        assert!(pit.update(c.now_ns()));
        assert_eq!(pit.next_deadline_ns(), None);
    }

    #[test]
    fn mode1_waits_for_a_gate_trigger_and_lsb_only_access() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        pit.write(0x43, 0x92); // ch2 LSB only, mode 1
        pit.write(0x42, 50);
        assert_ne!(pit.read_port61() & 0x20, 0, "OUT high until triggered");
        c.advance_to_ns(ns_of_ticks(100)).unwrap();
        assert_eq!(pit.read(0x42), 50, "not counting without a trigger");
        pit.write_port61(0x01); // rising gate: trigger
        assert_eq!(pit.read_port61() & 0x20, 0, "OUT low after the trigger");
        c.advance_to_ns(ns_of_ticks(120)).unwrap();
        assert_eq!(pit.read(0x42), 30);
        c.advance_to_ns(ns_of_ticks(150)).unwrap();
        assert_ne!(pit.read_port61() & 0x20, 0, "one-shot done");
        // MSB-only access.
        pit.write(0x43, 0x20); // ch0 MSB only, mode 0
        pit.write(0x40, 0x01); // count 0x100
        assert_eq!(pit.read(0x40), 0x01);
    }

    #[test]
    fn refresh_bit_toggles_with_guest_time() {
        let c = GuestClock::virtual_clock(0);
        let mut pit = Pit::new(c.clone());
        let a = pit.read_port61() & 0x10;
        c.advance_ns(REFRESH_HALF_PERIOD_NS).unwrap();
        let b = pit.read_port61() & 0x10;
        assert_ne!(a, b);
    }

    /// Linux's `quick_pit_calibrate` (K: arch/x86/kernel/tsc.c), step for step: channel 2 in
    /// mode 0 from 0xffff, `pit_expect_msb` needs more than 5 reads of each MSB value, the loop
    /// stops once the TSC error bars are under 500 ppm and the next MSB is confirmed. Each port
    /// read costs 50 ns of guest time here, as an emulated `inb` might.
    #[test]
    fn quick_pit_calibrate_succeeds_and_measures_the_tsc() {
        for tsc_hz in [1_000_000_000u64, 2_500_000_000, 3_700_000_123] {
            let c = GuestClock::virtual_clock(0);
            let tsc = Tsc::new(c.clone(), tsc_hz).unwrap();
            let mut pit = Pit::new(c.clone());
            let inb42 = |pit: &mut Pit| {
                c.advance_ns(50).unwrap();
                pit.read(0x42)
            };
            let verify_msb = |pit: &mut Pit, val: u8| {
                inb42(pit);
                inb42(pit) == val
            };
            // Returns (tsc at the last read that still showed `val`, d, count > 5).
            let expect_msb = |pit: &mut Pit, val: u8| {
                let mut t = 0;
                let mut count = 0;
                while count < 50_000 {
                    if !verify_msb(pit, val) {
                        break;
                    }
                    t = tsc.read();
                    count += 1;
                }
                (t, tsc.read() - t, count > 5)
            };
            let v = pit.read_port61();
            pit.write_port61((v & !0x02) | 0x01);
            pit.write(0x43, 0xb0);
            pit.write(0x42, 0xff);
            pit.write(0x42, 0xff);
            verify_msb(&mut pit, 0);
            let (t0, d1, ok) = expect_msb(&mut pit, 0xff);
            assert!(ok, "first MSB not seen often enough");
            let max_iter = 25 * PIT_HZ / 1000 / 256;
            let mut khz = None;
            for i in 1..=max_iter {
                let (t, d2, ok) = expect_msb(&mut pit, (0xff - i) as u8);
                assert!(ok, "MSB {:#x}: calibration would fail", 0xff - i);
                let delta = t - t0;
                if d1 + d2 >= delta >> 11 {
                    continue;
                }
                assert!(verify_msb(&mut pit, (0xfe - i) as u8));
                let delta = (delta as i64 + (d2 as i64 - d1 as i64) / 2) as u64;
                khz = Some(delta * PIT_HZ / (i * 256 * 1000));
                break;
            }
            let khz = khz.expect("Fast TSC calibration failed");
            let want = tsc_hz / 1000;
            // Linux's own bound is 500 ppm.
            assert!(khz.abs_diff(want) * 2000 <= want, "{khz} kHz vs {want} kHz");
        }
    }

    /// Linux's `pit_calibrate_tsc`: channel 2 mode 0 for 10 ms, poll port 0x61 bit 5.
    #[test]
    fn pit_calibrate_tsc_sees_out2_after_10ms() {
        let c = GuestClock::virtual_clock(0);
        let tsc = Tsc::new(c.clone(), 3_000_000_000).unwrap();
        let mut pit = Pit::new(c.clone());
        let v = pit.read_port61();
        pit.write_port61((v & !0x02) | 0x01);
        let latch = PIT_HZ / 100;
        pit.write(0x43, 0xb0);
        pit.write(0x42, latch as u8);
        pit.write(0x42, (latch >> 8) as u8);
        let t0 = tsc.read();
        let mut loops = 0u64;
        while pit.read_port61() & 0x20 == 0 {
            c.advance_ns(50).unwrap();
            loops += 1;
            assert!(loops < 1_000_000);
        }
        let delta = tsc.read() - t0;
        let khz = delta / 10; // ms = 10
        assert!(khz.abs_diff(3_000_000) < 3_000, "{khz}");
    }
}
