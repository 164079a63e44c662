//! The PC platform assembled: interrupt routing between the devices and the CPU-facing and
//! bus-facing entry points the core uses.
//!
//! # Interrupt routing (the `GsiRouter`)
//!
//! ```text
//!  PIT ch0 ─IRQ0─┬──────────────► 8259 master IR0 ──┐
//!                └─(MADT override 0→2)─► IOAPIC pin 2
//!  RTC ─IRQ8, SCI ─IRQ9, devices ─IRQn─┬► 8259 IRn  │ INTR
//!                                      └► IOAPIC pin n
//!  HPET timer 0/1 (legacy replacement) ─► IRQ0/IRQ8 in place of the PIT/RTC; other routes ─► GSI
//!                          8259 INTR ─► LAPIC LINT0 (ExtINT) ─► CPU      (virtual wire)
//!                          8259 INTR ──────────────────────► CPU      (LAPIC hw-disabled)
//!                          IOAPIC ─► APIC bus ─► LAPIC IRR ───► CPU
//! ```
//!
//! ISA IRQ n drives 8259 input n and IOAPIC pin n, except IRQ0 which drives pin 2 as QEMU does
//! and as the MADT interrupt source override says; IRQ2 is the 8259 cascade and cannot be
//! driven. GSIs 16-23 reach only the IOAPIC.
//!
//! # CPU side
//!
//! At an instruction boundary with RFLAGS.IF = 1 (and no STI/MOV SS shadow), the CPU asks
//! [`Platform::pending_interrupt`]; if true it runs [`Platform::acknowledge`], the INTA cycle,
//! and delivers the returned vector through the IDT. Which source wins, in order:
//! 1. LAPIC hardware-disabled (IA32_APIC_BASE bit 11 clear; CPU 0 only): the 8259 directly.
//! 2. The LAPIC: the highest IRR vector whose class (vector >> 4) is above PPR's class; it
//!    moves IRR → ISR and stays in service until the guest writes EOI.
//! 3. The 8259 through LINT0 when LINT0 is unmasked in ExtINT mode (virtual wire): the 8259's
//!    INTA (IRR → ISR on the 8259, unless auto-EOI), vector = ICW2 base + IRQ. The LAPIC's
//!    IRR/ISR/PPR are not involved (SDM: ExtINT bypasses them).
//!
//! `acknowledge` returns `None` when nothing is deliverable any more: the CPU then delivers
//! nothing and carries on. A PIC whose INTR dropped between the two calls is not possible here
//! (both run under the caller's lock), so the 8259 spurious vectors (base + 7) only appear
//! when the guest itself races (e.g. an edge request acknowledged by a poll read).
//! NMIs (LINT1 in NMI mode, NMI IPIs) are separate: [`Platform::take_nmi`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::acpi_pm::{self, AcpiPm, ResetControl, SystemRequest};
use crate::clock::GuestClock;
use crate::hpet::{self, Hpet, HpetIrq, HpetRoute};
use crate::ioapic::{self, ApicMessage, IoApic};
use crate::lapic::{self, Ipi, LapicEffects, LocalApic};
use crate::pic::{self, DualPic};
use crate::pit::{self, Pit};
use crate::rtc::{self, Rtc};
use crate::PlatformError;

/// ISA IRQ of the PIT.
pub const IRQ_PIT: u8 = 0;
/// ISA IRQ of the RTC.
pub const IRQ_RTC: u8 = 8;
/// ISA IRQ of the ACPI SCI (level, active high; the MADT says so).
pub const IRQ_SCI: u8 = 9;

/// The port ranges (first port, length) the platform serves; the core registers each on its
/// port bus and forwards accesses to [`Platform::pio_read`]/[`Platform::pio_write`].
pub const PORT_RANGES: &[(u16, u16)] = &[
    (pic::MASTER_CMD, 2),
    (pit::PIT_BASE, 4),
    (pit::PORT_61, 1),
    (rtc::RTC_INDEX, 2),
    (pic::SLAVE_CMD, 2),
    (pic::ELCR_MASTER, 2),
    (acpi_pm::PM_BASE, acpi_pm::PM_LEN),
    (acpi_pm::RESET_CONTROL, 1),
];

/// The HPET's MMIO window (base, length).
pub const HPET_MMIO: (u64, u64) = (hpet::HPET_BASE, hpet::HPET_SIZE);

/// The IOAPIC's MMIO window (base, length). QEMU decodes a 4 KiB page; registers sit in the
/// first 0x20 bytes.
pub const IOAPIC_MMIO: (u64, u64) = (ioapic::IOAPIC_BASE, 0x1000);

/// An interrupt number that maps ISA IRQs onto IOAPIC pins (MADT interrupt source override).
pub fn isa_irq_to_gsi(irq: u8) -> u32 {
    if irq == 0 {
        2
    } else {
        u32::from(irq)
    }
}

/// A start-up IPI event the core must act on for another vCPU (INIT or SIPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupEvent {
    /// INIT: the target CPU enters wait-for-SIPI.
    Init,
    /// Start-up IPI: the target starts in real mode at `vector << 12`.
    Sipi(u8),
}

/// What the platform is made of.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    /// Number of CPUs (LAPIC IDs 0..cpus; CPU 0 is the BSP). 1..=16.
    pub cpus: u8,
    /// Guest RAM below 4 GiB, bytes (for the CMOS memory-size bytes).
    pub ram_below_4g: u64,
    /// Guest RAM above 4 GiB, bytes.
    pub ram_above_4g: u64,
    /// A 32-bit PM timer (FADT TMR_VAL_EXT) instead of 24-bit.
    pub pm_timer_32bit: bool,
}

/// A per-CPU wake-up handle, readable without the platform lock.
///
/// `is_pending` mirrors [`Platform::pending_interrupt`] (maskable interrupts) and
/// `nmi_pending` a pending NMI, as of the last platform operation; `next_deadline_ns` is the
/// earliest guest time at which a timer needs [`Platform::poll`]. A run loop checks them
/// cheaply between instructions, and an idle (HLT) vCPU sleeps in [`InterruptSignal::wait`].
#[derive(Debug)]
pub struct InterruptSignal {
    pending: AtomicBool,
    nmi: AtomicBool,
    kicked: AtomicBool,
    deadline_ns: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

impl InterruptSignal {
    fn new() -> Self {
        InterruptSignal {
            pending: AtomicBool::new(false),
            nmi: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            deadline_ns: AtomicU64::new(u64::MAX),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Whether a maskable interrupt is waiting for this CPU.
    // Inlined into the software CPU's interrupt check, which runs at every block boundary.
    #[inline]
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether an NMI is waiting for this CPU ([`Platform::take_nmi`]).
    pub fn nmi_pending(&self) -> bool {
        self.nmi.load(Ordering::Acquire)
    }

    /// Earliest guest time at which a timer event is due (call [`Platform::poll`] then).
    // Inlined into the software CPU's interrupt check, which runs at every block boundary.
    #[inline]
    pub fn next_deadline_ns(&self) -> Option<u64> {
        match self.deadline_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            d => Some(d),
        }
    }

    /// Wakes a waiting vCPU for a reason of the caller's (pause, exit).
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.notify();
    }

    fn notify(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    fn publish(&self, pending: bool, nmi: bool, deadline: u64) {
        let old_deadline = self.deadline_ns.swap(deadline, Ordering::AcqRel);
        let was = self.pending.swap(pending, Ordering::AcqRel);
        let nmi_was = self.nmi.swap(nmi, Ordering::AcqRel);
        if (pending && !was) || (nmi && !nmi_was) || deadline < old_deadline {
            self.notify();
        }
    }

    /// Blocks until an interrupt or NMI is pending, [`kick`] was called, the deadline moved
    /// earlier, or `timeout` passed (`None`: no timeout). Returns true if woken by an interrupt,
    /// NMI or kick. After it returns the caller should [`Platform::poll`] (a timer may be due)
    /// and check again.
    ///
    /// [`kick`]: InterruptSignal::kick
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline_before = self.deadline_ns.load(Ordering::Acquire);
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = std::time::Instant::now();
        loop {
            if self.is_pending() || self.nmi_pending() || self.kicked.swap(false, Ordering::AcqRel) {
                return true;
            }
            if self.deadline_ns.load(Ordering::Acquire) < deadline_before {
                return false;
            }
            match timeout {
                None => g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let Some(left) = t.checked_sub(start.elapsed()) else {
                        return false;
                    };
                    g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
        }
    }
}

/// The CPU's view of a shared platform: what the software CPU calls at instruction boundaries
/// (its `InterruptSource`: `pending` / `acknowledge` with `&self`) and when idle.
///
/// `pending` is lock-free unless a timer deadline has passed, in which case it takes the lock
/// once to [`Platform::poll`]. On a host clock it reads the time only every
/// [`HOST_CLOCK_CHECK_INTERVAL`] calls (a clock read costs ~35 ns here, comparable to a short
/// interpreted block); a due timer is then seen a few blocks late, microseconds at most.
#[derive(Debug)]
pub struct CpuInterrupts {
    platform: Arc<Mutex<Platform>>,
    signal: Arc<InterruptSignal>,
    clock: GuestClock,
    cpu: usize,
    countdown: std::sync::atomic::AtomicU32,
}

/// How many [`CpuInterrupts::pending`] calls share one host clock read.
pub const HOST_CLOCK_CHECK_INTERVAL: u32 = 32;

impl CpuInterrupts {
    /// The link for `cpu`, or `None` if the platform has no such CPU.
    pub fn new(platform: &Arc<Mutex<Platform>>, cpu: usize) -> Option<Self> {
        let p = platform.lock().unwrap_or_else(|e| e.into_inner());
        Some(CpuInterrupts {
            signal: p.interrupt_signal(cpu)?,
            clock: p.clock().clone(),
            platform: Arc::clone(platform),
            cpu,
            countdown: std::sync::atomic::AtomicU32::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Platform> {
        // A panic elsewhere while holding the lock leaves device state consistent enough
        // (every method finishes its updates before returning); keep going.
        self.platform.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Polls the timers if a deadline has passed.
    pub fn service_timers(&self) {
        if self.signal.next_deadline_ns().is_some_and(|d| self.clock.now_ns() >= d) {
            self.lock().poll();
        }
    }

    /// INTR: a maskable interrupt is pending (due timers serviced first). Ask only with IF=1
    /// and no interrupt shadow.
    pub fn pending(&self) -> bool {
        if self.signal.is_pending() {
            return true;
        }
        if self.signal.next_deadline_ns().is_some() {
            let check = self.clock.is_virtual()
                || self
                    .countdown
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                        Some(if c == 0 { HOST_CLOCK_CHECK_INTERVAL - 1 } else { c - 1 })
                    })
                    .is_ok_and(|c| c == 0);
            if check {
                self.service_timers();
            }
        }
        self.signal.is_pending()
    }

    /// INTA: the vector to deliver, or `None` if nothing is deliverable any more.
    pub fn acknowledge(&self) -> Option<u8> {
        self.lock().acknowledge(self.cpu)
    }

    /// An NMI is pending (take it with [`take_nmi`]).
    ///
    /// [`take_nmi`]: CpuInterrupts::take_nmi
    pub fn nmi_pending(&self) -> bool {
        self.signal.nmi_pending()
    }

    /// Takes the pending NMI.
    pub fn take_nmi(&self) -> bool {
        self.lock().take_nmi(self.cpu)
    }

    /// HLT with IF=1: sleeps until an interrupt, an NMI, a kick or the next timer deadline
    /// (host clock), or moves a virtual clock straight to that deadline; then services the
    /// timers. Returns whether a maskable interrupt is pending afterwards. With no deadline
    /// and nothing pending on a virtual clock it returns false at once (nothing can ever wake
    /// the CPU: the caller decides, e.g. reports a hang). `max_wait` bounds a host-clock sleep
    /// (e.g. to look at other work now and then); `None` sleeps as long as needed.
    pub fn idle(&self, max_wait: Option<Duration>) -> bool {
        if !(self.signal.is_pending() || self.signal.nmi_pending()) {
            let deadline = self.signal.next_deadline_ns();
            if self.clock.is_virtual() {
                if let Some(d) = deadline {
                    // Cannot fail: the clock is virtual.
                    let _ = self.clock.advance_to_ns(d);
                }
            } else {
                let timeout = deadline.and_then(|d| self.clock.host_duration_until(d));
                let timeout = match (timeout, max_wait) {
                    (Some(t), Some(m)) => Some(t.min(m)),
                    (t, m) => t.or(m),
                };
                self.signal.wait(timeout);
            }
        }
        self.service_timers();
        self.signal.is_pending()
    }

    /// The wake-up handle (to [`InterruptSignal::kick`] this CPU from another thread).
    pub fn signal(&self) -> &Arc<InterruptSignal> {
        &self.signal
    }
}

/// An ISA interrupt line of a shared platform, for devices the core owns (16550 UARTs through
/// vm-superio's `Trigger`, i8042): the software-engine counterpart of a KVM irqfd.
///
/// It takes the platform lock, like [`CpuInterrupts`]: call neither while holding that lock
/// (`std::sync::Mutex` is not reentrant), e.g. do not serve a UART access from inside a
/// locked `Platform` call.
#[derive(Clone, Debug)]
pub struct IsaIrq {
    platform: Arc<Mutex<Platform>>,
    irq: u8,
}

impl IsaIrq {
    /// The line for ISA IRQ `irq`; an error for lines the platform owns or that do not exist
    /// ([`Platform::isa_irq_available`]).
    pub fn new(platform: &Arc<Mutex<Platform>>, irq: u8) -> Result<Self, PlatformError> {
        if !Platform::isa_irq_available(irq) {
            return Err(PlatformError::InvalidConfig(format!(
                "ISA IRQ {irq} is the cascade, a platform device's, or does not exist"
            )));
        }
        Ok(IsaIrq { platform: Arc::clone(platform), irq })
    }

    /// An edge (what an irqfd write does): rising then falling.
    pub fn pulse(&self) {
        self.platform.lock().unwrap_or_else(|e| e.into_inner()).pulse_isa_irq(self.irq);
    }

    /// Holds the line at `level` (level-style devices).
    pub fn set_level(&self, level: bool) {
        self.platform.lock().unwrap_or_else(|e| e.into_inner()).set_isa_irq(self.irq, level);
    }
}

/// The PC platform: 8259 pair, 8254 + port 0x61, RTC/CMOS, ACPI PM block, reset control,
/// IOAPIC, one LAPIC per CPU, wired together.
///
/// Not thread-safe by itself: the core keeps it in a `Mutex` shared by the vCPU threads, the
/// device adapters and whoever drives IRQ lines. [`InterruptSignal`]s are read without it.
#[derive(Debug)]
pub struct Platform {
    clock: GuestClock,
    pic: DualPic,
    pit: Pit,
    rtc: Rtc,
    pm: AcpiPm,
    reset: ResetControl,
    hpet: Hpet,
    ioapic: IoApic,
    lapics: Vec<LocalApic>,
    signals: Vec<Arc<InterruptSignal>>,
    /// Current level of each ISA line as driven from outside or by RTC/SCI.
    isa_levels: u16,
    /// Current level of GSIs 16-23.
    gsi_levels: u32,
    request: Option<SystemRequest>,
    startup_events: VecDeque<(usize, StartupEvent)>,
    config: PlatformConfig,
}

impl Platform {
    /// Builds the platform on `clock`.
    pub fn new(clock: GuestClock, config: &PlatformConfig) -> Result<Self, PlatformError> {
        if !(1..=16).contains(&config.cpus) {
            return Err(PlatformError::InvalidConfig(format!(
                "{} CPUs requested; the platform supports 1 to 16",
                config.cpus
            )));
        }
        let mut rtc = Rtc::new(clock.clone());
        rtc.set_memory_layout(config.ram_below_4g, config.ram_above_4g, config.cpus);
        let lapics = (0..config.cpus).map(|i| LocalApic::new(clock.clone(), i, i == 0)).collect();
        let mut p = Platform {
            pic: DualPic::new(),
            pit: Pit::new(clock.clone()),
            rtc,
            pm: AcpiPm::new(clock.clone(), config.pm_timer_32bit),
            reset: ResetControl::default(),
            hpet: Hpet::new(clock.clone()),
            // The IOAPIC's ID follows the LAPICs' (QEMU: ID = number of CPUs).
            ioapic: IoApic::new(config.cpus),
            lapics,
            signals: (0..config.cpus).map(|_| Arc::new(InterruptSignal::new())).collect(),
            isa_levels: 0,
            gsi_levels: 0,
            request: None,
            startup_events: VecDeque::new(),
            clock,
            config: config.clone(),
        };
        p.refresh();
        Ok(p)
    }

    /// A machine reset (the core acts on [`SystemRequest::Reset`] without `-no-reboot`): every
    /// device back to its power-on state, except what a battery keeps (CMOS NVRAM, RTC time).
    /// Interrupt signals stay valid; pending requests and start-up events are dropped.
    pub fn reset(&mut self) {
        let clock = self.clock.clone();
        self.pic = DualPic::new();
        self.pit = Pit::new(clock.clone());
        self.rtc.reset();
        self.pm = AcpiPm::new(clock.clone(), self.config.pm_timer_32bit);
        self.reset = ResetControl::default();
        self.hpet = Hpet::new(clock.clone());
        self.ioapic = IoApic::new(self.config.cpus);
        self.lapics = (0..self.config.cpus).map(|i| LocalApic::new(clock.clone(), i, i == 0)).collect();
        self.request = None;
        self.startup_events.clear();
        // External drivers keep their line levels; re-present them to the fresh controllers.
        let isa = self.isa_levels & !((1 << IRQ_PIT) | (1 << IRQ_RTC) | (1 << IRQ_SCI));
        let gsi = self.gsi_levels;
        self.isa_levels = 0;
        self.gsi_levels = 0;
        for irq in 0..16u8 {
            if isa & (1 << irq) != 0 {
                self.drive_isa(irq, true);
            }
        }
        for g in 16..24u32 {
            if gsi & (1 << g) != 0 {
                self.set_gsi(g, true);
            }
        }
        self.sync_device_lines();
        self.refresh();
    }

    /// The guest clock.
    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    /// Number of CPUs.
    pub fn cpus(&self) -> usize {
        self.lapics.len()
    }

    /// The IOAPIC's APIC ID (for the MADT).
    pub fn ioapic_id(&self) -> u8 {
        self.ioapic.id()
    }

    /// The wake-up handle of `cpu`.
    pub fn interrupt_signal(&self, cpu: usize) -> Option<Arc<InterruptSignal>> {
        self.signals.get(cpu).cloned()
    }

    // ---- interrupt lines ----

    /// Whether the caller may drive ISA IRQ `irq`: not IRQ2 (the 8259 cascade) and not the
    /// lines the platform's own devices drive (IRQ0 PIT, IRQ8 RTC, IRQ9 SCI).
    pub fn isa_irq_available(irq: u8) -> bool {
        irq <= 15 && ![2, IRQ_PIT, IRQ_RTC, IRQ_SCI].contains(&irq)
    }

    /// Drives ISA IRQ `irq` to `level` (active high); the line stays there until driven again.
    /// One driver per line: a caller sharing a line (COM1 and COM3 on IRQ4) ORs its sources
    /// first. Lines the platform owns ([`isa_irq_available`] false) are refused with a log.
    ///
    /// [`isa_irq_available`]: Platform::isa_irq_available
    pub fn set_isa_irq(&mut self, irq: u8, level: bool) {
        if !Self::isa_irq_available(irq) {
            log::warn!("platform: ISA IRQ {irq} is not available to other devices, ignored");
            return;
        }
        self.drive_isa(irq, level);
        self.refresh();
    }

    /// A rising then falling edge on ISA IRQ `irq` (an edge-triggered source such as the PIT).
    pub fn pulse_isa_irq(&mut self, irq: u8) {
        if !Self::isa_irq_available(irq) {
            log::warn!("platform: ISA IRQ {irq} is not available to other devices, ignored");
            return;
        }
        self.drive_isa(irq, true);
        self.drive_isa(irq, false);
        self.refresh();
    }

    /// Drives a GSI: 0-15 are the ISA IRQs (GSI 2 is ISA IRQ0), 16-23 reach only the IOAPIC.
    pub fn set_gsi(&mut self, gsi: u32, level: bool) {
        match gsi {
            0..=15 => return self.set_isa_irq(if gsi == 2 { 0 } else { gsi as u8 }, level),
            16..=23 => {
                let bit = 1u32 << gsi;
                if level {
                    self.gsi_levels |= bit;
                } else {
                    self.gsi_levels &= !bit;
                }
                let mut msgs = Vec::new();
                self.ioapic.set_irq(gsi as usize, level, &mut msgs);
                self.dispatch(msgs);
            }
            _ => log::warn!("platform: GSI {gsi} does not exist (the IOAPIC has 24 pins)"),
        }
        self.refresh();
    }

    /// Delivers a message-signalled interrupt (PCI MSI/MSI-X) written to `address` with `data`, as the
    /// chipset would on a memory write to 0xfee0_0000-0xfeef_ffff (Intel SDM vol. 3 §11.11.1-2): address
    /// bits 19:12 destination ID, bit 2 destination mode (1 = logical); data bits 7:0 vector, 10:8
    /// delivery mode, bit 15 trigger mode (1 = level). A write outside that range is not an interrupt
    /// and is dropped with a warning.
    pub fn deliver_msi(&mut self, address: u64, data: u32) {
        if address >> 20 != 0xfee {
            log::warn!("platform: MSI to {address:#x} is outside the interrupt range, dropped");
            return;
        }
        let msg = ApicMessage {
            vector: data as u8,
            delivery_mode: ((data >> 8) & 7) as u8,
            logical: address & 4 != 0,
            destination: (address >> 12) as u8,
            level_triggered: data & (1 << 15) != 0,
        };
        self.dispatch(vec![msg]);
        self.refresh();
    }

    fn drive_isa(&mut self, irq: u8, level: bool) {
        let bit = 1u16 << irq;
        if level {
            self.isa_levels |= bit;
        } else {
            self.isa_levels &= !bit;
        }
        self.pic.set_irq(irq, level);
        let mut msgs = Vec::new();
        self.ioapic.set_irq(isa_irq_to_gsi(irq) as usize, level, &mut msgs);
        self.dispatch(msgs);
    }

    /// Drives GSI `gsi` directly (HPET routing): the IOAPIC pin, and for 0-15 except 2 the
    /// 8259 input of the same number.
    fn drive_gsi(&mut self, gsi: u32, level: bool) {
        if gsi < 16 && gsi != 2 {
            self.pic.set_irq(gsi as u8, level);
        }
        let mut msgs = Vec::new();
        self.ioapic.set_irq(gsi as usize, level, &mut msgs);
        self.dispatch(msgs);
    }

    fn apply_hpet(&mut self, events: Vec<HpetIrq>) {
        for e in events {
            match e {
                HpetIrq::Pulse(HpetRoute::Isa(irq)) => {
                    self.drive_isa(irq, true);
                    self.drive_isa(irq, false);
                }
                HpetIrq::Pulse(HpetRoute::Gsi(g)) => {
                    self.drive_gsi(g, true);
                    self.drive_gsi(g, false);
                }
                HpetIrq::Level(HpetRoute::Isa(irq), l) => self.drive_isa(irq, l),
                HpetIrq::Level(HpetRoute::Gsi(g), l) => self.drive_gsi(g, l),
            }
        }
    }

    fn deliver(&mut self, target: usize, m: &ApicMessage) {
        let l = &mut self.lapics[target];
        match m.delivery_mode {
            0 | 1 => l.accept_fixed(m.vector, m.level_triggered),
            4 => l.accept_nmi(),
            5 => self.startup_events.push_back((target, StartupEvent::Init)),
            6 => self.startup_events.push_back((target, StartupEvent::Sipi(m.vector))),
            mode => log::warn!("platform: APIC delivery mode {mode} (vector {:#x}) not modelled, dropped", m.vector),
        }
    }

    fn dispatch(&mut self, msgs: Vec<ApicMessage>) {
        for m in msgs {
            let targets: Vec<usize> = (0..self.lapics.len())
                .filter(|&i| self.lapics[i].matches_destination(m.logical, m.destination))
                .collect();
            // Lowest priority: one target. With no arbitration modelled, the first match.
            let n = if m.delivery_mode == 1 { 1 } else { targets.len() };
            for &t in targets.iter().take(n) {
                self.deliver(t, &m);
            }
        }
    }

    fn send_ipi(&mut self, from: usize, ipi: Ipi) {
        let targets: Vec<usize> = (0..self.lapics.len())
            .filter(|&i| match ipi.shorthand {
                1 => i == from,
                2 => true,
                3 => i != from,
                _ => self.lapics[i].matches_destination(ipi.message.logical, ipi.message.destination),
            })
            .collect();
        for t in targets {
            self.deliver(t, &ipi.message);
        }
    }

    fn apply_lapic_effects(&mut self, cpu: usize, fx: LapicEffects) {
        if let Some(v) = fx.eoi_broadcast {
            let mut msgs = Vec::new();
            self.ioapic.end_of_interrupt(v, &mut msgs);
            self.dispatch(msgs);
        }
        if let Some(ipi) = fx.ipi {
            self.send_ipi(cpu, ipi);
        }
    }

    /// Re-reads the IRQ outputs of the RTC and the SCI and drives their lines.
    fn sync_device_lines(&mut self) {
        // HPET legacy replacement disconnects the RTC's IRQ8 (HPET spec §2.3.9).
        let rtc = self.rtc.irq_level() && !self.hpet.legacy_replacement();
        if rtc != (self.isa_levels & (1 << IRQ_RTC) != 0) {
            self.drive_isa(IRQ_RTC, rtc);
        }
        let sci = self.pm.sci_level();
        if sci != (self.isa_levels & (1 << IRQ_SCI) != 0) {
            self.drive_isa(IRQ_SCI, sci);
        }
    }

    /// Recomputes every CPU's [`InterruptSignal`].
    fn refresh(&mut self) {
        let deadline = self.next_deadline_ns().unwrap_or(u64::MAX);
        for cpu in 0..self.lapics.len() {
            let pending = self.pending_interrupt(cpu);
            let nmi = self.lapics[cpu].nmi_pending();
            self.signals[cpu].publish(pending, nmi, deadline);
        }
    }

    // ---- time ----

    /// Brings every timer up to the guest clock: PIT IRQ0 edges, RTC and PM timer flags, LAPIC
    /// timers. Call it when guest time has reached [`next_deadline_ns`], after an idle wait, or
    /// every so often from the run loop.
    ///
    /// [`next_deadline_ns`]: Platform::next_deadline_ns
    pub fn poll(&mut self) {
        let now = self.clock.now_ns();
        // The PIT keeps counting under HPET legacy replacement, but its IRQ0 is disconnected.
        if self.pit.update(now) && !self.hpet.legacy_replacement() {
            self.drive_isa(IRQ_PIT, true);
            self.drive_isa(IRQ_PIT, false);
        }
        let mut hpet_events = Vec::new();
        self.hpet.update(now, &mut hpet_events);
        self.apply_hpet(hpet_events);
        self.rtc.update(now);
        self.pm.update(now);
        self.sync_device_lines();
        for l in &mut self.lapics {
            l.update(now);
        }
        self.refresh();
    }

    /// The earliest guest time (ns) at which a timer will raise an interrupt, if any: the run
    /// loop can sleep (host clock) or jump the clock (virtual clock) until then when idle.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let now = self.clock.now_ns();
        [
            self.pit.next_deadline_ns(),
            self.rtc.next_deadline_ns(now),
            self.pm.next_deadline_ns(),
            self.hpet.next_deadline_ns(),
        ]
        .into_iter()
        .chain(self.lapics.iter().map(|l| l.next_deadline_ns()))
        .flatten()
        .min()
    }

    // ---- CPU side ----

    /// Whether `cpu` has a maskable interrupt to take (see the module docs for the order).
    /// The CPU asks only when RFLAGS.IF = 1 and no interrupt shadow is active.
    pub fn pending_interrupt(&self, cpu: usize) -> bool {
        let Some(l) = self.lapics.get(cpu) else {
            return false;
        };
        if !l.hw_enabled() {
            return cpu == 0 && self.pic.intr();
        }
        l.deliverable_vector().is_some() || (l.lint0_passes_extint() && self.pic.intr())
    }

    /// The interrupt-acknowledge cycle for `cpu`: returns the vector to deliver and marks it in
    /// service (LAPIC ISR or 8259 ISR), or `None` if nothing is deliverable.
    pub fn acknowledge(&mut self, cpu: usize) -> Option<u8> {
        let l = self.lapics.get_mut(cpu)?;
        let v = if !l.hw_enabled() {
            (cpu == 0 && self.pic.intr()).then(|| self.pic.acknowledge())
        } else if let Some(v) = l.acknowledge() {
            Some(v)
        } else if l.lint0_passes_extint() && self.pic.intr() {
            Some(self.pic.acknowledge())
        } else {
            None
        };
        self.refresh();
        v
    }

    /// Takes a pending NMI for `cpu` (deliver vector 2 unless NMIs are blocked; if they are,
    /// keep it and deliver after IRET).
    pub fn take_nmi(&mut self, cpu: usize) -> bool {
        let r = self.lapics.get_mut(cpu).is_some_and(|l| l.take_nmi());
        self.refresh();
        r
    }

    /// RDMSR IA32_APIC_BASE (0x1b) for `cpu`.
    pub fn apic_base_msr(&self, cpu: usize) -> u64 {
        self.lapics.get(cpu).map_or(0, |l| l.base_msr())
    }

    /// WRMSR IA32_APIC_BASE for `cpu`; an error means the CPU should raise #GP(0).
    pub fn set_apic_base_msr(&mut self, cpu: usize, value: u64) -> Result<(), PlatformError> {
        let l = self.lapics.get_mut(cpu).ok_or_else(|| PlatformError::InvalidConfig(format!("no CPU {cpu}")))?;
        l.set_base_msr(value)?;
        self.refresh();
        Ok(())
    }

    /// The next INIT/SIPI addressed to a vCPU, for the core to act on.
    pub fn take_startup_event(&mut self) -> Option<(usize, StartupEvent)> {
        self.startup_events.pop_front()
    }

    /// A power-off or reset the guest asked for, taken once.
    pub fn take_system_request(&mut self) -> Option<SystemRequest> {
        self.request.take()
    }

    /// Sets a CMOS NVRAM byte (0x0e-0x7f, clock registers excepted), for what a firmware or
    /// QEMU would leave there beyond the memory sizes.
    pub fn set_cmos(&mut self, index: usize, value: u8) {
        self.rtc.set_nvram(index, value);
    }

    /// Presses the ACPI power button (QEMU `system_powerdown`).
    pub fn press_power_button(&mut self) {
        self.pm.press_power_button();
        self.sync_device_lines();
        self.refresh();
    }

    // ---- bus side ----

    /// Whether `port` belongs to the platform.
    pub fn handles_port(port: u16) -> bool {
        PORT_RANGES.iter().any(|&(base, len)| port >= base && port - base < len)
    }

    /// Port read of `data.len()` bytes (1, 2 or 4) at `port`. Returns false (data untouched) if
    /// the port is not the platform's. Byte-wide devices see consecutive byte accesses.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if !Self::handles_port(port) {
            return false;
        }
        let pm_end = acpi_pm::PM_BASE + acpi_pm::PM_LEN;
        if (acpi_pm::PM_BASE..pm_end).contains(&port) {
            self.pm.read(port - acpi_pm::PM_BASE, data);
        } else {
            for (i, d) in data.iter_mut().enumerate() {
                *d = self.read_byte(port.wrapping_add(i as u16));
            }
        }
        self.sync_device_lines();
        self.refresh();
        true
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.read(port),
            0x40..=0x43 => self.pit.read(port),
            pit::PORT_61 => self.pit.read_port61(),
            0x70 | 0x71 => self.rtc.read(port),
            acpi_pm::RESET_CONTROL => self.reset.read(),
            _ => 0xff,
        }
    }

    /// Port write at `port`. Returns false if the port is not the platform's.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        if !Self::handles_port(port) {
            return false;
        }
        let pm_end = acpi_pm::PM_BASE + acpi_pm::PM_LEN;
        if (acpi_pm::PM_BASE..pm_end).contains(&port) {
            if let Some(r) = self.pm.write(port - acpi_pm::PM_BASE, data) {
                self.request = Some(r);
            }
        } else {
            for (i, &b) in data.iter().enumerate() {
                self.write_byte(port.wrapping_add(i as u16), b);
            }
        }
        self.sync_device_lines();
        self.refresh();
        true
    }

    fn write_byte(&mut self, port: u16, val: u8) {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1 => self.pic.write(port, val),
            0x40..=0x43 => self.pit.write(port, val),
            pit::PORT_61 => self.pit.write_port61(val),
            0x70 | 0x71 => self.rtc.write(port, val),
            acpi_pm::RESET_CONTROL => {
                if let Some(r) = self.reset.write(val) {
                    self.request = Some(r);
                }
            }
            _ => {}
        }
    }

    /// Whether `addr` is in an MMIO window of the platform as seen by `cpu` (the LAPIC window
    /// follows that CPU's IA32_APIC_BASE and vanishes while the LAPIC is hardware-disabled).
    pub fn handles_mmio(&self, cpu: usize, addr: u64) -> bool {
        self.lapic_offset(cpu, addr).is_some()
            || Self::ioapic_offset(addr).is_some()
            || Self::hpet_offset(addr).is_some()
    }

    fn hpet_offset(addr: u64) -> Option<u64> {
        let (base, len) = HPET_MMIO;
        (addr >= base && addr - base < len).then(|| addr - base)
    }

    fn lapic_offset(&self, cpu: usize, addr: u64) -> Option<u64> {
        let l = self.lapics.get(cpu)?;
        let base = l.mmio_base();
        (l.hw_enabled() && addr >= base && addr - base < lapic::APIC_SIZE).then(|| addr - base)
    }

    fn ioapic_offset(addr: u64) -> Option<u64> {
        let (base, len) = IOAPIC_MMIO;
        (addr >= base && addr - base < len).then(|| addr - base)
    }

    /// MMIO read by `cpu`. Returns false if `addr` is not the platform's.
    pub fn mmio_read(&mut self, cpu: usize, addr: u64, data: &mut [u8]) -> bool {
        if let Some(off) = self.lapic_offset(cpu, addr) {
            // Reading the current count can fire the timer.
            self.lapics[cpu].read(off, data);
        } else if let Some(off) = Self::ioapic_offset(addr) {
            self.ioapic.read(off, data);
        } else if let Some(off) = Self::hpet_offset(addr) {
            self.hpet.read(off, data);
        } else {
            return false;
        }
        self.refresh();
        true
    }

    /// MMIO write by `cpu`. Returns false if `addr` is not the platform's.
    pub fn mmio_write(&mut self, cpu: usize, addr: u64, data: &[u8]) -> bool {
        if let Some(off) = self.lapic_offset(cpu, addr) {
            let fx = self.lapics[cpu].write(off, data);
            self.apply_lapic_effects(cpu, fx);
        } else if let Some(off) = Self::ioapic_offset(addr) {
            let mut msgs = Vec::new();
            self.ioapic.write(off, data, &mut msgs);
            self.dispatch(msgs);
        } else if let Some(off) = Self::hpet_offset(addr) {
            let was_legacy = self.hpet.legacy_replacement();
            let mut events = Vec::new();
            self.hpet.write(off, data, &mut events);
            self.apply_hpet(events);
            if was_legacy != self.hpet.legacy_replacement() {
                // Level outputs follow their new routes; the RTC line (dis)connects.
                let levels = self.hpet.level_outputs();
                self.apply_hpet(levels.into_iter().map(|(r, l)| HpetIrq::Level(r, l)).collect());
                self.sync_device_lines();
            }
        } else {
            return false;
        }
        self.refresh();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NS_PER_SEC;

    const LAPIC: u64 = 0xfee0_0000;

    fn platform(clock: &GuestClock) -> Platform {
        Platform::new(
            clock.clone(),
            &PlatformConfig { cpus: 1, ram_below_4g: 512 << 20, ram_above_4g: 0, pm_timer_32bit: false },
        )
        .unwrap()
    }

    fn out8(p: &mut Platform, port: u16, v: u8) {
        assert!(p.pio_write(port, &[v]));
    }
    fn in8(p: &mut Platform, port: u16) -> u8 {
        let mut d = [0u8];
        assert!(p.pio_read(port, &mut d));
        d[0]
    }
    fn lapic_w(p: &mut Platform, off: u64, v: u32) {
        assert!(p.mmio_write(0, LAPIC + off, &v.to_le_bytes()));
    }
    fn lapic_r(p: &mut Platform, off: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(p.mmio_read(0, LAPIC + off, &mut d));
        u32::from_le_bytes(d)
    }
    fn ioapic_w(p: &mut Platform, reg: u32, v: u32) {
        assert!(p.mmio_write(0, 0xfec0_0000, &reg.to_le_bytes()));
        assert!(p.mmio_write(0, 0xfec0_0010, &v.to_le_bytes()));
    }
    fn pic_init(p: &mut Platform) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            out8(p, port, v);
        }
    }

    #[test]
    fn msi_reaches_the_addressed_lapic() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        lapic_w(&mut p, 0xf0, 0x1ff); // SVR: software enable
        p.deliver_msi(0xfee0_1000, 0x45); // APIC ID 1 does not exist: nobody takes it
        assert!(!p.pending_interrupt(0));
        p.deliver_msi(0x1234_0000, 0x45); // not an interrupt address
        assert!(!p.pending_interrupt(0));
        p.deliver_msi(0xfee0_0000, 0x45); // physical, APIC ID 0, fixed, edge
        assert!(p.pending_interrupt(0));
        assert_eq!(p.acknowledge(0), Some(0x45));
    }

    #[test]
    fn pit_irq0_reaches_cpu_through_virtual_wire() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        let sig = p.interrupt_signal(0).unwrap();
        pic_init(&mut p);
        out8(&mut p, 0x43, 0x34);
        out8(&mut p, 0x40, 0xa5);
        out8(&mut p, 0x40, 0x12); // 4773
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(sig.next_deadline_ns(), Some(d));
        c.advance_to_ns(d).unwrap();
        assert!(!sig.is_pending(), "nothing until poll");
        p.poll();
        assert!(sig.is_pending());
        assert!(p.pending_interrupt(0));
        assert_eq!(p.acknowledge(0), Some(0x30));
        assert!(!p.pending_interrupt(0));
        assert!(!sig.is_pending());
        assert_eq!(p.acknowledge(0), None);
        out8(&mut p, 0x20, 0x20);
    }

    #[test]
    fn platform_owned_lines_are_refused_to_callers() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        for irq in [0, 2, 8, 9, 16] {
            p.set_isa_irq(irq, true);
            p.pulse_isa_irq(irq);
            assert!(!p.pending_interrupt(0), "IRQ {irq}");
        }
        p.set_isa_irq(3, true);
        assert_eq!(p.acknowledge(0), Some(0x33));
        // GSI 2 is ISA IRQ0, the PIT's: refused too. GSI 16+ reach only the IOAPIC.
        p.set_gsi(2, true);
        p.set_gsi(17, true);
        assert!(!p.pending_interrupt(0));
    }

    #[test]
    fn nolapic_path_when_apic_hw_disabled() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        // LINT0 masked: the 8259 does not get through while the LAPIC is enabled ...
        lapic_w(&mut p, 0xf0, 0x1ff);
        lapic_w(&mut p, 0x350, 0x10700);
        p.set_isa_irq(4, true);
        assert!(!p.pending_interrupt(0));
        // ... but does once the LAPIC is disabled in the MSR.
        p.set_apic_base_msr(0, 0xfee0_0100).unwrap();
        assert!(!p.handles_mmio(0, LAPIC));
        assert!(p.pending_interrupt(0));
        assert_eq!(p.acknowledge(0), Some(0x34));
    }

    #[test]
    fn ioapic_routes_pit_via_override_to_lapic_and_eoi() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        out8(&mut p, 0x21, 0xff); // 8259 fully masked, as Linux does in APIC mode
        lapic_w(&mut p, 0xf0, 0x1ff);
        lapic_w(&mut p, 0x350, 0x10700);
        ioapic_w(&mut p, 0x10 + 2 * 2, 0x30); // pin 2, vector 0x30, edge, physical dest 0
        ioapic_w(&mut p, 0x10 + 2 * 2 + 1, 0);
        p.drive_isa(0, true);
        p.drive_isa(0, false);
        p.refresh();
        assert!(p.pending_interrupt(0));
        assert_eq!(p.acknowledge(0), Some(0x30));
        assert_eq!(lapic_r(&mut p, 0x100 + 0x10), 1 << 16, "ISR 0x30");
        lapic_w(&mut p, 0xb0, 0);
        assert_eq!(lapic_r(&mut p, 0x100 + 0x10), 0);
        // Pin 0 is not the PIT: a pulse with pin 0 programmed does nothing.
        ioapic_w(&mut p, 0x10, 0x31);
        ioapic_w(&mut p, 0x10 + 2 * 2, 0x1_0030);
        p.drive_isa(0, true);
        p.drive_isa(0, false);
        p.refresh();
        assert!(!p.pending_interrupt(0));
    }

    #[test]
    fn ioapic_logical_and_lowest_priority_destinations_with_two_cpus() {
        let c = GuestClock::virtual_clock(0);
        let mut p = Platform::new(
            c.clone(),
            &PlatformConfig { cpus: 2, ram_below_4g: 1 << 30, ram_above_4g: 0, pm_timer_32bit: false },
        )
        .unwrap();
        for cpu in 0..2 {
            let w = |p: &mut Platform, off: u64, v: u32| {
                assert!(p.mmio_write(cpu, LAPIC + off, &v.to_le_bytes()));
            };
            w(&mut p, 0xf0, 0x1ff);
            w(&mut p, 0x350, 0x10700);
            w(&mut p, 0xe0, 0xffff_ffff); // flat model
            w(&mut p, 0xd0, 1 << (24 + cpu));
        }
        // Pin 5, logical destination 0x02: CPU 1 only.
        ioapic_w(&mut p, 0x10 + 2 * 5, 0x0000_0845);
        ioapic_w(&mut p, 0x10 + 2 * 5 + 1, 0x0200_0000);
        p.pulse_isa_irq(5);
        assert!(!p.pending_interrupt(0));
        assert_eq!(p.acknowledge(1), Some(0x45));
        let eoi = |p: &mut Platform, cpu: usize| {
            assert!(p.mmio_write(cpu, LAPIC + 0xb0, &0u32.to_le_bytes()));
        };
        eoi(&mut p, 1);
        // Lowest priority to 0x03: exactly one CPU gets it.
        ioapic_w(&mut p, 0x10 + 2 * 5, 0x0000_0946);
        ioapic_w(&mut p, 0x10 + 2 * 5 + 1, 0x0300_0000);
        p.pulse_isa_irq(5);
        let got = [p.acknowledge(0), p.acknowledge(1)];
        assert_eq!(got.iter().filter(|v| **v == Some(0x46)).count(), 1, "{got:?}");
        eoi(&mut p, 0);
        eoi(&mut p, 1);
        // Physical broadcast 0xff with fixed mode reaches both.
        ioapic_w(&mut p, 0x10 + 2 * 5, 0x0000_0047);
        ioapic_w(&mut p, 0x10 + 2 * 5 + 1, 0xff00_0000);
        p.pulse_isa_irq(5);
        assert_eq!(p.acknowledge(0), Some(0x47));
        assert_eq!(p.acknowledge(1), Some(0x47));
        // NMI delivery mode through the IOAPIC.
        ioapic_w(&mut p, 0x10 + 2 * 5, 0x0000_0400);
        ioapic_w(&mut p, 0x10 + 2 * 5 + 1, 0x0100_0000);
        p.pulse_isa_irq(5);
        assert!(p.interrupt_signal(1).unwrap().nmi_pending());
        assert!(p.take_nmi(1));
        assert!(!p.take_nmi(0));
        // An INIT/SIPI pair from CPU 0's ICR to APIC ID 1 becomes start-up events.
        assert!(p.mmio_write(0, LAPIC + 0x310, &0x0100_0000u32.to_le_bytes()));
        assert!(p.mmio_write(0, LAPIC + 0x300, &0x0000_4500u32.to_le_bytes()));
        assert!(p.mmio_write(0, LAPIC + 0x300, &0x0000_4609u32.to_le_bytes()));
        assert_eq!(p.take_startup_event(), Some((1, StartupEvent::Init)));
        assert_eq!(p.take_startup_event(), Some((1, StartupEvent::Sipi(9))));
        assert_eq!(p.take_startup_event(), None);
    }

    #[test]
    fn sci_is_level_through_ioapic_with_remote_irr() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        lapic_w(&mut p, 0xf0, 0x1ff);
        lapic_w(&mut p, 0x350, 0x10700); // APIC mode: the 8259 path is closed
        ioapic_w(&mut p, 0x10 + 2 * 9, 0x8039); // level, vector 0x39
        ioapic_w(&mut p, 0x10 + 2 * 9 + 1, 0);
        assert!(p.pio_write(0x602, &0x0100u16.to_le_bytes())); // PWRBTN_EN
        p.press_power_button();
        assert_eq!(p.acknowledge(0), Some(0x39));
        assert_eq!(lapic_r(&mut p, 0x180 + 0x10), 1 << 25, "TMR marks level");
        // Clear the status, then EOI: no redelivery.
        assert!(p.pio_write(0x600, &0x0100u16.to_le_bytes()));
        lapic_w(&mut p, 0xb0, 0);
        assert!(!p.pending_interrupt(0));
        // Status left set at EOI: delivered again.
        p.press_power_button();
        assert_eq!(p.acknowledge(0), Some(0x39));
        lapic_w(&mut p, 0xb0, 0);
        assert_eq!(p.acknowledge(0), Some(0x39));
    }

    #[test]
    fn lapic_timer_agrees_with_pit_jiffies_like_calibrate_apic_clock() {
        // calibrate_APIC_clock: LAPIC timer one-shot from 0xffffffff, divide by 16, count
        // the decrement over 25 PIT jiffies (HZ=250), then expect the same period back.
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        lapic_w(&mut p, 0xf0, 0x1ff);
        out8(&mut p, 0x43, 0x34);
        out8(&mut p, 0x40, (4773 & 0xff) as u8);
        out8(&mut p, 0x40, (4773 >> 8) as u8);
        lapic_w(&mut p, 0x3e0, 0x3);
        lapic_w(&mut p, 0x320, 0x1_00ec);
        lapic_w(&mut p, 0x380, 0xffff_ffff);
        let mut jiffies = 0u32;
        let mut start = None;
        while jiffies < 26 {
            c.advance_ns(10_000).unwrap();
            p.poll();
            if p.pending_interrupt(0) {
                assert_eq!(p.acknowledge(0), Some(0x30));
                out8(&mut p, 0x20, 0x20);
                jiffies += 1;
                if jiffies == 1 {
                    start = Some(lapic_r(&mut p, 0x390));
                }
            }
        }
        let delta = u64::from(start.unwrap() - lapic_r(&mut p, 0x390));
        // 25 jiffies of 4773 PIT ticks = 100 ms; at 1 GHz / 16 that is 6.25 M ticks.
        let per_jiffy = delta / 25;
        let expect = 1_000_000_000 / 16 / 250;
        assert!(per_jiffy.abs_diff(expect) * 1000 < expect, "{per_jiffy} vs {expect}");
        // The bus clock is ≥ 1 MHz: period * HZ * 16 = bus Hz.
        assert!(per_jiffy * 250 * 16 >= 1_000_000);
        // Now periodic at that rate: fires once per jiffy (±2 over 25 in Linux's check).
        lapic_w(&mut p, 0x320, 0x2_00ef);
        lapic_w(&mut p, 0x380, per_jiffy as u32);
        let t0 = c.now_ns();
        let mut lapic_ticks = 0;
        while c.now_ns() - t0 < 100_000_000 {
            c.advance_ns(10_000).unwrap();
            p.poll();
            while let Some(v) = p.acknowledge(0) {
                if v == 0xef {
                    lapic_ticks += 1;
                    lapic_w(&mut p, 0xb0, 0);
                } else {
                    out8(&mut p, 0x20, 0x20);
                }
            }
        }
        assert!((24..=26).contains(&lapic_ticks), "{lapic_ticks}");
    }

    #[test]
    fn self_ipi_and_idle_wait_wakes_on_interrupt() {
        let c = GuestClock::host();
        let p = Arc::new(Mutex::new(platform(&c)));
        let sig = p.lock().unwrap().interrupt_signal(0).unwrap();
        lapic_w(&mut p.lock().unwrap(), 0xf0, 0x1ff);
        let p2 = Arc::clone(&p);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            // ICR: self shorthand, fixed, vector 0xf3 (what irq_work's self-IPI writes).
            lapic_w(&mut p2.lock().unwrap(), 0x300, 0x4_00f3);
        });
        let woke = sig.wait(Some(Duration::from_secs(5)));
        t.join().unwrap();
        assert!(woke);
        assert_eq!(p.lock().unwrap().acknowledge(0), Some(0xf3));
        // A timeout with nothing pending returns false.
        assert!(!sig.wait(Some(Duration::from_millis(5))));
    }

    #[test]
    fn cpu_interrupts_link_services_timers_and_idles_on_a_virtual_clock() {
        let c = GuestClock::virtual_clock(0);
        let p = Arc::new(Mutex::new(platform(&c)));
        let link = CpuInterrupts::new(&p, 0).unwrap();
        assert!(CpuInterrupts::new(&p, 1).is_none());
        {
            let mut g = p.lock().unwrap();
            pic_init(&mut g);
            out8(&mut g, 0x43, 0x34);
            out8(&mut g, 0x40, 0xa5);
            out8(&mut g, 0x40, 0x12);
        }
        assert!(!link.pending());
        // HLT: the clock jumps to the PIT's deadline and the tick is pending.
        assert!(link.idle(None));
        assert_eq!(c.now_ns(), crate::clock::ticks_to_ns_ceil(4773, pit::PIT_HZ));
        assert_eq!(link.acknowledge(), Some(0x30));
        assert!(!link.pending());
        // An LINT1 NMI is reported apart from INTR.
        {
            let mut g = p.lock().unwrap();
            lapic_w(&mut g, 0xf0, 0x1ff);
            lapic_w(&mut g, 0x360, 0x400);
            g.lapics[0].set_lint(1, true);
            g.refresh();
        }
        assert!(link.nmi_pending());
        assert!(!link.signal().is_pending());
        assert!(link.take_nmi());
        assert!(!link.nmi_pending());
    }

    #[test]
    fn host_clock_pending_sees_a_due_timer_within_the_check_interval() {
        let c = GuestClock::host();
        let p = Arc::new(Mutex::new(platform(&c)));
        pic_init(&mut p.lock().unwrap());
        let link = CpuInterrupts::new(&p, 0).unwrap();
        {
            let mut g = p.lock().unwrap();
            out8(&mut g, 0x43, 0x30); // mode 0, 100 ticks ≈ 84 µs
            out8(&mut g, 0x40, 100);
            out8(&mut g, 0x40, 0);
        }
        std::thread::sleep(Duration::from_millis(2));
        let calls = (1..=HOST_CLOCK_CHECK_INTERVAL).find(|_| link.pending());
        assert!(calls.is_some(), "timer not seen in {HOST_CLOCK_CHECK_INTERVAL} calls");
        assert_eq!(link.acknowledge(), Some(0x30));
    }

    #[test]
    fn isa_irq_handle_pulses_a_uart_line_and_wakes_an_idle_cpu() {
        let c = GuestClock::host();
        let p = Arc::new(Mutex::new(platform(&c)));
        assert!(IsaIrq::new(&p, 0).is_err());
        assert!(IsaIrq::new(&p, 2).is_err());
        assert!(IsaIrq::new(&p, 16).is_err());
        let com1 = IsaIrq::new(&p, 4).unwrap();
        pic_init(&mut p.lock().unwrap());
        let link = CpuInterrupts::new(&p, 0).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            com1.pulse();
        });
        // No timer armed: only the pulse can end this idle.
        let start = std::time::Instant::now();
        assert!(link.idle(Some(Duration::from_secs(10))));
        t.join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(15));
        assert_eq!(link.acknowledge(), Some(0x34));
    }

    #[test]
    fn hpet_legacy_replacement_takes_over_irq0_and_irq8() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        // PIT periodic on IRQ0, as before the HPET takes over.
        out8(&mut p, 0x43, 0x34);
        out8(&mut p, 0x40, 0xa5);
        out8(&mut p, 0x40, 0x12);
        let hw = |p: &mut Platform, off: u64, v: u32| {
            assert!(p.mmio_write(0, 0xfed0_0000 + off, &v.to_le_bytes()));
        };
        let mut d = [0u8; 4];
        assert!(p.mmio_read(0, 0xfed0_0000, &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x8086_a201);
        // Legacy replacement + enable; timer 0 periodic every 1 ms (100000 ticks).
        hw(&mut p, 0x10, 3);
        hw(&mut p, 0x100, 0x14c);
        hw(&mut p, 0x108, 100_000);
        hw(&mut p, 0x108, 100_000);
        assert_eq!(p.next_deadline_ns(), Some(1_000_000), "the HPET's, before the PIT's 4 ms");
        let mut irq0 = 0;
        for _ in 0..4500 {
            c.advance_ns(1_000).unwrap();
            p.poll();
            while let Some(v) = p.acknowledge(0) {
                assert_eq!(v, 0x30);
                irq0 += 1;
                out8(&mut p, 0x20, 0x20);
            }
        }
        // 4.5 ms: four HPET ticks; the PIT's tick at 4 ms is disconnected.
        assert_eq!(irq0, 4);
        // RTC periodic flag raised under legacy mode does not reach IRQ8.
        out8(&mut p, 0x70, 0x0b);
        out8(&mut p, 0x71, 0x42);
        c.advance_ns(2_000_000).unwrap();
        p.poll();
        while p.acknowledge(0) == Some(0x30) {
            out8(&mut p, 0x20, 0x20);
        }
        assert!(!p.pending_interrupt(0), "IRQ8 disconnected");
        // Leaving legacy mode gives IRQ8 back to the RTC (its flag is still up).
        hw(&mut p, 0x10, 1);
        assert_eq!(p.acknowledge(0), Some(0x38));
    }

    #[test]
    fn rtc_irq8_through_cascade_and_reg_c_clears_it() {
        let c = GuestClock::virtual_clock(1_700_000_000);
        let mut p = platform(&c);
        pic_init(&mut p);
        out8(&mut p, 0x70, 0x0b);
        out8(&mut p, 0x71, 0x42); // PIE, 24h
        let d = p.next_deadline_ns().unwrap();
        assert_eq!(d, NS_PER_SEC / 1024);
        c.advance_to_ns(d).unwrap();
        p.poll();
        assert_eq!(p.acknowledge(0), Some(0x38));
        out8(&mut p, 0x70, 0x0c);
        assert_eq!(in8(&mut p, 0x71), 0xc0);
        out8(&mut p, 0xa0, 0x20);
        out8(&mut p, 0x20, 0x20);
        assert!(!p.pending_interrupt(0));
    }

    #[test]
    fn acpi_power_off_and_cf9_reset_requests() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        assert!(p.pio_write(0x604, &0x2001u16.to_le_bytes()));
        assert_eq!(p.take_system_request(), Some(SystemRequest::PowerOff));
        assert_eq!(p.take_system_request(), None);
        out8(&mut p, 0xcf9, 0x02);
        out8(&mut p, 0xcf9, 0x06);
        assert_eq!(p.take_system_request(), Some(SystemRequest::Reset));
        let mut d = [0u8; 1];
        assert!(!p.pio_read(0x3f8, &mut d), "not ours");
        assert_eq!(in8(&mut p, 0x70), 0xff);
    }

    #[test]
    fn reset_restores_power_on_state_but_keeps_cmos_and_lines() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        pic_init(&mut p);
        lapic_w(&mut p, 0xf0, 0x1ff);
        lapic_w(&mut p, 0x350, 0x10700);
        out8(&mut p, 0x70, 0x40);
        out8(&mut p, 0x71, 0x77);
        p.set_isa_irq(4, true);
        out8(&mut p, 0xcf9, 0x06);
        p.reset();
        assert_eq!(p.take_system_request(), None);
        assert_eq!(lapic_r(&mut p, 0xf0), 0xff, "LAPIC software-disabled again");
        assert_eq!(lapic_r(&mut p, 0x350), 0x700, "virtual wire again");
        assert_eq!(in8(&mut p, 0x21), 0x00, "PIC IMR cleared");
        out8(&mut p, 0x70, 0x40);
        assert_eq!(in8(&mut p, 0x71), 0x77, "NVRAM kept");
        // IRQ4 still high: after the guest re-initialises the PIC it needs a new edge, as on
        // hardware, but the line level itself was kept.
        pic_init(&mut p);
        p.set_isa_irq(4, false);
        p.set_isa_irq(4, true);
        assert_eq!(p.acknowledge(0), Some(0x34));
    }

    #[test]
    fn config_and_cmos_memory_size() {
        let c = GuestClock::virtual_clock(0);
        let mut p = platform(&c);
        out8(&mut p, 0x70, 0x34);
        assert_eq!(in8(&mut p, 0x71), 0x00);
        p.set_cmos(0x3d, 0x21);
        p.set_cmos(0x00, 0x99); // a clock register: refused
        out8(&mut p, 0x70, 0x3d);
        assert_eq!(in8(&mut p, 0x71), 0x21);
        out8(&mut p, 0x70, 0x35);
        assert_eq!(in8(&mut p, 0x71), 0x1f);
        assert_eq!(p.ioapic_id(), 1);
        assert!(Platform::new(c, &PlatformConfig { cpus: 0, ram_below_4g: 0, ram_above_4g: 0, pm_timer_32bit: false })
            .is_err());
    }
}
