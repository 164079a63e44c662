//! Nothing a guest does may panic the platform: random port and MMIO accesses of every size
//! over every window, interleaved with time jumps, polls, INTA cycles and MSR writes.

use std::sync::{Arc, Mutex};

use tessera_platform::platform::PORT_RANGES;
use tessera_platform::{CpuInterrupts, GuestClock, Platform, PlatformConfig};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_guest_accesses_never_panic() {
    for seed in 1..=8u64 {
        let clock = GuestClock::virtual_clock(seed * 1_000_000);
        let p = Arc::new(Mutex::new(
            Platform::new(
                clock.clone(),
                &PlatformConfig {
                    cpus: 2,
                    ram_below_4g: 1 << 30,
                    ram_above_4g: 1 << 32,
                    pm_timer_32bit: seed % 2 == 0,
                },
            )
            .unwrap(),
        ));
        let cpus = [CpuInterrupts::new(&p, 0).unwrap(), CpuInterrupts::new(&p, 1).unwrap()];
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut delivered = 0u64;
        for _ in 0..100_000 {
            let sizes = [1usize, 2, 4, 8, 3, 0];
            let len = sizes[rng.below(sizes.len() as u64) as usize];
            let mut buf = [0u8; 8];
            for b in buf.iter_mut() {
                *b = rng.next() as u8;
            }
            let cpu = rng.below(2) as usize;
            match rng.below(10) {
                0..=3 => {
                    let (base, n) = PORT_RANGES[rng.below(PORT_RANGES.len() as u64) as usize];
                    let port = base.wrapping_add(rng.below(u64::from(n) + 2) as u16);
                    let mut g = p.lock().unwrap();
                    if rng.below(2) == 0 {
                        g.pio_write(port, &buf[..len]);
                    } else {
                        g.pio_read(port, &mut buf[..len]);
                    }
                }
                4..=6 => {
                    let base = [0xfee0_0000u64, 0xfec0_0000, 0xfed0_0000][rng.below(3) as usize];
                    let addr = base + rng.below(0x1010);
                    let mut g = p.lock().unwrap();
                    if rng.below(3) == 0 {
                        g.mmio_read(cpu, addr, &mut buf[..len]);
                    } else {
                        // Mostly aligned dwords, so that registers really get programmed.
                        let addr = if rng.below(4) != 0 { addr & !0xf } else { addr };
                        let l = if rng.below(4) != 0 { 4 } else { len };
                        g.mmio_write(cpu, addr, &buf[..l]);
                    }
                }
                7 => {
                    clock.advance_ns(rng.below(5_000_000)).unwrap();
                    p.lock().unwrap().poll();
                }
                8 => {
                    if cpus[cpu].pending() && cpus[cpu].acknowledge().is_some() {
                        delivered += 1;
                    }
                    cpus[cpu].take_nmi();
                    let mut g = p.lock().unwrap();
                    while g.take_startup_event().is_some() {}
                    g.take_system_request();
                }
                _ => {
                    let mut g = p.lock().unwrap();
                    match rng.below(4) {
                        0 => {
                            let _ = g.set_apic_base_msr(cpu, rng.next() & 0xffff_ffff_ffff);
                        }
                        1 => g.set_isa_irq(rng.below(20) as u8, rng.below(2) == 0),
                        2 => g.set_gsi(rng.below(30) as u32, rng.below(2) == 0),
                        _ => {
                            if rng.below(1000) == 0 {
                                g.reset();
                            } else {
                                g.pulse_isa_irq(rng.below(16) as u8);
                            }
                        }
                    }
                }
            }
        }
        // Something got through: the random programming is not all dead air.
        assert!(delivered > 0, "seed {seed}: no interrupt was ever delivered");
    }
}
