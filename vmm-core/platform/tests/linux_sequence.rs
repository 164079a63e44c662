//! Linux 6.1's use of the platform, replayed through the public API only, on a virtual clock:
//! the register sequences of `init_8259A`, `setup_IO_APIC`/`check_timer`, `setup_local_APIC`,
//! `calibrate_APIC_clock`, the LAPIC one-shot clockevent with HLT idle, `mc146818_get_time`
//! and `acpi_power_off`. The sequences follow the kernel sources named in each step; a CPU
//! loop stands in for the software CPU (IF=1 between "instructions", each costing guest time).

use tessera_platform::acpi::{self, AcpiConfig};
use tessera_platform::{GuestClock, Platform, PlatformConfig, SystemRequest};

const LAPIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
/// HZ=250 (cfg), PIT_LATCH = (1193182 + HZ/2) / HZ.
const PIT_LATCH: u16 = 4773;

struct Machine {
    clock: GuestClock,
    p: Platform,
    /// Interrupt vectors taken, in order.
    taken: Vec<u8>,
    jiffies: u64,
    lapic_ticks: u64,
}

impl Machine {
    fn new() -> Self {
        let clock = GuestClock::virtual_clock(1_795_618_207);
        let p = Platform::new(
            clock.clone(),
            &PlatformConfig { cpus: 1, ram_below_4g: 512 << 20, ram_above_4g: 0, pm_timer_32bit: false },
        )
        .unwrap();
        Machine { clock, p, taken: Vec::new(), jiffies: 0, lapic_ticks: 0 }
    }
    fn outb(&mut self, port: u16, v: u8) {
        assert!(self.p.pio_write(port, &[v]), "port {port:#x}");
    }
    fn inb(&mut self, port: u16) -> u8 {
        let mut d = [0];
        assert!(self.p.pio_read(port, &mut d), "port {port:#x}");
        d[0]
    }
    fn apic_write(&mut self, reg: u64, v: u32) {
        assert!(self.p.mmio_write(0, LAPIC + reg, &v.to_le_bytes()));
    }
    fn apic_read(&mut self, reg: u64) -> u32 {
        let mut d = [0; 4];
        assert!(self.p.mmio_read(0, LAPIC + reg, &mut d));
        u32::from_le_bytes(d)
    }
    fn io_apic_write(&mut self, reg: u32, v: u32) {
        assert!(self.p.mmio_write(0, IOAPIC, &reg.to_le_bytes()));
        assert!(self.p.mmio_write(0, IOAPIC + 0x10, &v.to_le_bytes()));
    }
    fn io_apic_read(&mut self, reg: u32) -> u32 {
        assert!(self.p.mmio_write(0, IOAPIC, &reg.to_le_bytes()));
        let mut d = [0; 4];
        assert!(self.p.mmio_read(0, IOAPIC + 0x10, &mut d));
        u32::from_le_bytes(d)
    }

    /// One guest "instruction" of `ns` with IF=1: time passes, due timers fire, and a pending
    /// interrupt is taken and handled the way Linux's handlers acknowledge it.
    fn step(&mut self, ns: u64) {
        self.clock.advance_ns(ns).unwrap();
        let sig = self.p.interrupt_signal(0).unwrap();
        if sig.next_deadline_ns().is_some_and(|d| self.clock.now_ns() >= d) {
            self.p.poll();
        }
        if sig.is_pending() {
            if let Some(v) = self.p.acknowledge(0) {
                self.handle(v);
            }
        }
    }

    fn handle(&mut self, v: u8) {
        self.taken.push(v);
        match v {
            // ISA IRQ0 through the IOAPIC (edge): tick, LAPIC EOI.
            0x30 if self.p.apic_base_msr(0) & (1 << 11) != 0 && self.apic_read(0x350) & (1 << 16) != 0 => {
                self.jiffies += 1;
                self.apic_write(0xb0, 0);
            }
            // ISA IRQ0 from the 8259 (virtual wire / PIC mode): mask_and_ack_8259A.
            0x30 => {
                self.jiffies += 1;
                let _ = self.inb(0x21);
                self.outb(0x21, 0xfa);
                self.outb(0x20, 0x60);
                self.outb(0x21, 0xfa & !1);
            }
            0xec => {
                self.lapic_ticks += 1;
                self.apic_write(0xb0, 0);
            }
            0xff => {} // spurious: no EOI
            _ => panic!("unexpected vector {v:#x}"),
        }
    }

    /// HLT with IF=1: jump the virtual clock to the next deadline, then take what is pending.
    fn hlt(&mut self) {
        let sig = self.p.interrupt_signal(0).unwrap();
        if !sig.is_pending() {
            let d = sig.next_deadline_ns().expect("HLT with no timer armed would hang");
            self.clock.advance_to_ns(d).unwrap();
            self.p.poll();
        }
        let v = self.p.acknowledge(0).expect("woken without an interrupt");
        self.handle(v);
    }
}

#[test]
fn linux_apic_boot_sequence() {
    let mut m = Machine::new();

    // ACPI: the tables the kernel would parse say IRQ0 → GSI2, SCI level/high.
    let mut tables = vec![0u8; 4096];
    let layout = acpi::write_tables(
        &AcpiConfig {
            cpus: 1,
            ioapic_id: m.p.ioapic_id(),
            pm_timer_32bit: false,
            i8042: false,
            hpet: false,
            serial_ports: vec![],
        },
        &mut tables,
        0xe0000,
    )
    .unwrap();
    assert_eq!(layout.rsdp_addr, 0xe0000);

    // K: arch/x86/kernel/i8259.c probe_8259A + init_8259A(0), all masked but the cascade.
    m.outb(0xa1, 0xff);
    m.outb(0x21, 0xa5);
    assert_eq!(m.inb(0x21), 0xa5, "probe_8259A: a PIC is present");
    for (port, v) in [
        (0x21, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfb),
        (0xa1, 0xff),
    ] {
        m.outb(port, v);
    }

    // K: drivers/clocksource/i8253.c pit_set_periodic.
    m.outb(0x43, 0x34);
    m.outb(0x40, PIT_LATCH as u8);
    m.outb(0x40, (PIT_LATCH >> 8) as u8);

    // K: apic.c setup_local_APIC on the BSP: APIC mode, LINT0 ExtINT masked, LINT1 NMI.
    assert_eq!(m.p.apic_base_msr(0), 0xfee0_0900);
    assert_eq!(m.apic_read(0x30) & 0xff, 0x14, "integrated APIC");
    m.apic_write(0x80, 0);
    m.apic_write(0xe0, 0xffff_ffff);
    m.apic_write(0xd0, 1 << 24);
    m.apic_write(0xf0, 0x3ff);
    m.apic_write(0x350, 0x1_0700);
    m.apic_write(0x360, 0x400);
    m.apic_write(0x280, 0);
    m.apic_write(0x280, 0);
    assert_eq!(m.apic_read(0x280), 0, "ESR clean");

    // K: io_apic.c: every pin masked, then IRQ0 on pin 2 (MADT override), vector 0x30, edge.
    let ver = m.io_apic_read(1);
    assert_eq!((ver >> 16) & 0xff, 23);
    for pin in 0..24 {
        m.io_apic_write(0x10 + 2 * pin, 0x1_0000);
    }
    m.io_apic_write(0x10 + 2 * 2 + 1, 0);
    m.io_apic_write(0x10 + 2 * 2, 0x30);

    // check_timer → timer_irq_works: IF=1, wait up to 160 M TSC cycles for > 4 jiffies.
    let t0 = m.clock.now_ns();
    while m.jiffies <= 4 {
        m.step(1_000);
        assert!(m.clock.now_ns() - t0 < 160_000_000, "8254 timer not connected to IO-APIC");
    }

    // calibrate_APIC_clock: TMICT 0xffffffff one-shot masked, /16; 25 jiffies measured.
    m.apic_write(0x320, 0x1_00ec);
    m.apic_write(0x3e0, 0x3);
    m.apic_write(0x380, 0xffff_ffff);
    let j0 = m.jiffies;
    while m.jiffies == j0 {
        m.step(1_000);
    }
    let t1 = m.apic_read(0x390);
    let j1 = m.jiffies;
    while m.jiffies < j1 + 25 {
        m.step(1_000);
    }
    let t2 = m.apic_read(0x390);
    let lapic_timer_period = u64::from(t1 - t2) * 16 / 25;
    assert!(lapic_timer_period >= 1_000_000 / 250, "APIC frequency too slow");
    // Verification: periodic at the calibrated rate alongside the PIT; ±2 over 25 jiffies.
    m.apic_write(0x320, 0x2_00ec);
    m.apic_write(0x3e0, 0x3);
    m.apic_write(0x380, (lapic_timer_period / 16) as u32);
    let (j2, l2) = (m.jiffies, m.lapic_ticks);
    while m.lapic_ticks < l2 + 25 {
        m.step(1_000);
    }
    let deltaj = m.jiffies - j2;
    assert!((23..=27).contains(&deltaj), "APIC timer disabled due to verification failure: {deltaj}");

    // Switch to the LAPIC one-shot clockevent; the PIT is shut down (mode 0, count 0).
    m.outb(0x43, 0x30);
    m.outb(0x40, 0);
    m.outb(0x40, 0);
    m.apic_write(0x320, 0x00ec);
    m.apic_write(0x3e0, 0x3);
    // Tickless idle: program the next event 4 ms ahead, HLT until it fires, 20 times. The PIT's
    // one leftover mode-0 expiry (55 ms after shutdown) arrives as one more IRQ0.
    let start = m.clock.now_ns();
    let l3 = m.lapic_ticks;
    for _ in 0..20 {
        m.apic_write(0x380, (lapic_timer_period / 16) as u32);
        m.hlt();
        while m.taken.last() == Some(&0x30) {
            m.hlt();
        }
    }
    assert_eq!(m.lapic_ticks, l3 + 20);
    let slept = m.clock.now_ns() - start;
    assert!((75_000_000..=85_000_000).contains(&slept), "20 × 4 ms of idle took {slept} ns");

    // mc146818_get_time: wait for UIP clear, read time, check seconds unchanged.
    let mut tries = 0;
    let sec = loop {
        m.outb(0x70, 0);
        let s = m.inb(0x71);
        m.outb(0x70, 0x0a);
        if m.inb(0x71) & 0x80 != 0 {
            m.step(100_000);
            tries += 1;
            assert!(tries < 100, "RTC stuck in update");
            continue;
        }
        m.outb(0x70, 0);
        if m.inb(0x71) == s {
            break s;
        }
    };
    assert!(sec <= 0x59 && sec & 0x0f <= 9, "BCD seconds {sec:#x}");
    m.outb(0x70, 0x0d);
    assert_eq!(m.inb(0x71) & 0x40, 0, "RTC_VALID bit 6 clear");

    // The PM timer moves with the same clock: 1 ms = 3579.545 ticks.
    let rd_pm = |m: &mut Machine| {
        let mut d = [0; 4];
        assert!(m.p.pio_read(0x608, &mut d));
        u32::from_le_bytes(d)
    };
    let a = rd_pm(&mut m);
    m.clock.advance_ns(1_000_000).unwrap();
    let b = rd_pm(&mut m);
    assert!((3579..=3580).contains(&(b.wrapping_sub(a) & 0xff_ffff)));

    // acpi_power_off: SLP_TYP from \_S5 (0), then SLP_TYP|SLP_EN.
    assert!(m.p.pio_write(0x604, &0x0001u16.to_le_bytes()));
    assert_eq!(m.p.take_system_request(), None);
    assert!(m.p.pio_write(0x604, &0x2001u16.to_le_bytes()));
    assert_eq!(m.p.take_system_request(), Some(SystemRequest::PowerOff));
}

/// `acpi=off noapic nolapic` (notes §10 milestone 2): the 8259 alone, IRQ0 "XT-PIC".
#[test]
fn linux_pic_mode_sequence() {
    let mut m = Machine::new();
    for (port, v) in [
        (0x21, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfa),
        (0xa1, 0xff),
    ] {
        m.outb(port, v);
    }
    m.outb(0x43, 0x34);
    m.outb(0x40, PIT_LATCH as u8);
    m.outb(0x40, (PIT_LATCH >> 8) as u8);
    // With nolapic Linux leaves the LAPIC as reset left it: LINT0 ExtINT carries the 8259.
    let t0 = m.clock.now_ns();
    while m.jiffies < 250 {
        m.hlt();
    }
    let elapsed = m.clock.now_ns() - t0;
    assert!(elapsed.abs_diff(1_000_000_000) < 5_000_000, "250 jiffies took {elapsed} ns");
    assert!(m.taken.iter().all(|&v| v == 0x30));
}
