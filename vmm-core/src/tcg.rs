//! `-accel tcg`: guests on Tessera's software CPU (`tessera-swcpu`) with the PC platform modelled in userspace
//! (`tessera-platform`: 8259 pair, PIT, RTC/CMOS, ACPI PM, HPET, IOAPIC, LAPIC, ACPI tables).
//!
//! # Wiring
//! * One [`Platform`] in a `Mutex`, shared by the vCPU thread, the UART threads (their IRQ lines are
//!   [`IsaIrq`]s) and the port adapters. Its port ranges are claimed on the core's port bus
//!   ([`Engine::attach_devices`]) so that an isa-debug-exit placed on them is refused like any other overlap;
//!   its MMIO windows (LAPIC, IOAPIC, HPET) are decoded before the core's MMIO bus by [`MachineIo`], because the
//!   LAPIC window is per CPU and follows IA32_APIC_BASE.
//! * The CPU asks the platform for interrupts at block boundaries ([`CpuIrq`], its `InterruptSource`) and its
//!   MSR 0x1b, TSC and HLT go to the platform through [`tessera_swcpu::CpuHooks`] ([`Hooks`]).
//! * The ACPI tables (RSDP, RSDT/XSDT, FADT with `\_S5`, MADT, HPET) are written at [`ACPI_BASE`] in the BIOS
//!   area on every boot; the boot code marks that area reserved in e820 and puts the RSDP address in
//!   `boot_params.acpi_rsdp_addr` (or PVH `rsdp_paddr`).
//! * A PM1a_CNT write with SLP_EN and S5, or a 0xcf9 reset, becomes `VcpuExit::PowerOff` / `VcpuExit::Reset` of
//!   the vCPU that wrote it, and the run loop ends or reboots the VM as for KVM.
//!
//! # Time: an instruction-counting clock
//! Every timer of the platform and the TSC read one virtual [`GuestClock`] which the vCPU moves forward by
//! [`NS_PER_INSTRUCTION`] for every retired instruction (QEMU's `-icount`), and which jumps to the next timer
//! deadline while the guest idles in HLT, after sleeping that long on the host so that an idle guest keeps
//! wall-clock pace (`-icount sleep=on`). Why not the host clock: Linux measures its clocks against each other
//! (the TSC against PIT channel 2 in `quick_pit_calibrate`, the LAPIC timer against PIT jiffies in
//! `calibrate_APIC_clock`, the TSC against the PM timer or HPET in the clocksource watchdog). With host time, a
//! vCPU thread descheduled in the middle of such a measurement (2 cores shared by several builds here) fails or
//! skews it: "Fast TSC calibration failed", "APIC timer disabled due to verification failure", a TSC marked
//! unstable (shared notes §5). On the instruction clock all of them see exactly the same elapsed time whatever
//! the host does, so the guest needs no `tsc_early_khz=`, `tsc=reliable` or `no_timer_check`, and a boot is
//! reproducible. The cost: guest time runs at the interpreter's pace while the guest computes (slower than wall
//! time when the interpreter is slower than [`NS_PER_INSTRUCTION`] says), like QEMU with `-icount`.
//!
//! With more than one vCPU the instruction clock would need the vCPUs to agree on one time (QEMU runs icount
//! vCPUs round-robin on one thread); the software CPU runs one vCPU for now and `-smp` above 1 is refused.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tessera_platform::acpi::{write_tables_with_pci, AcpiConfig, PciRootWindow};
use tessera_platform::platform::{HPET_MMIO, IOAPIC_MMIO, PORT_RANGES};
use tessera_platform::{GuestClock, InterruptSignal, IsaIrq, Platform, PlatformConfig, SystemRequest};
use tessera_swcpu::{CpuHooks, InterruptSource, SoftVcpu, SoftVcpuConfig, VcpuHandle as SwHandle};
use tessera_vcpu::{FpuControl, IoHandler, Regs, SpecialRegs, Vcpu, VcpuExit};
use vm_memory::Bytes;

use crate::boot::AcpiInfo;
use crate::devices::bus::BusDevice;
use crate::devices::serial::{IrqLine, ISA_SERIAL_PORTS};
use crate::devices::Devices;
use crate::memory::GuestRam;
use crate::runloop::{Engine, VcpuHandle, VcpuKick, VmEvent};
use crate::Error;

/// Guest nanoseconds per retired instruction: a 200 MIPS machine. Near what the interpreter does on the
/// host it was measured on, so that busy-waits (`udelay`, the 100 ms LAPIC calibration) take about as long in
/// wall time as they claim; a faster guess only makes guest time run slower than wall time while busy.
pub const NS_PER_INSTRUCTION: u64 = 10;
/// The TSC rate: 1 GHz, i.e. guest nanoseconds. Linux measures it (against the PIT) and gets exactly this.
pub const TSC_HZ: u64 = 1_000_000_000;
/// Where the ACPI tables go: the BIOS area's lower half, inside Linux's RSDP scan range (0xe0000-0xfffff,
/// ACPICA `ACPI_HI_RSDP_WINDOW_BASE`), below the BIOS ROM range the e820 map already reserves.
pub const ACPI_BASE: u64 = 0xe0000;
/// The room for them (up to 0xf0000).
pub const ACPI_SIZE: u64 = 0x10000;
/// The longest a halted vCPU sleeps without looking again (a timer-less guest still notices a stop request
/// through its kick; this only bounds a lost wake-up).
const MAX_IDLE: Duration = Duration::from_millis(200);

const REQ_NONE: u8 = 0;
const REQ_POWEROFF: u8 = 1;
const REQ_RESET: u8 = 2;

/// The instruction clock of one boot: guest ns = retired instructions × [`NS_PER_INSTRUCTION`] + `offset`.
/// Only the vCPU thread moves it; other threads read the platform clock's last value.
struct InsnClock {
    clock: GuestClock,
    offset: AtomicU64,
}

impl InsnClock {
    fn new(clock: GuestClock) -> InsnClock {
        let offset = AtomicU64::new(clock.now_ns());
        InsnClock { clock, offset }
    }

    fn at(&self, instructions: u64) -> u64 {
        instructions.wrapping_mul(NS_PER_INSTRUCTION).wrapping_add(self.offset.load(Ordering::Relaxed))
    }

    /// Bring the platform clock up to `instructions`; returns the guest time.
    fn sync(&self, instructions: u64) -> u64 {
        // Cannot fail: the clock is virtual (made in `TcgEngine::new`).
        self.clock.advance_to_ns(self.at(instructions)).unwrap_or(0)
    }

    /// Idle time passed: guest time is now `target` at `instructions`.
    fn skip_to(&self, instructions: u64, target: u64) {
        let now = self.clock.advance_to_ns(target).unwrap_or(target);
        self.offset.store(now.wrapping_sub(instructions.wrapping_mul(NS_PER_INSTRUCTION)), Ordering::Relaxed);
    }
}

/// What the vCPU, its hooks and the port adapters share for one boot.
struct Machine {
    platform: Arc<Mutex<Platform>>,
    time: InsnClock,
    signal: Arc<InterruptSignal>,
    cpu: SwHandle,
    /// A power-off or reset the platform asked for, for the vCPU to return as its exit.
    request: AtomicU8,
    /// The run loop's events: a request is reported at once, ahead of anything the guest does after it.
    events: Option<Sender<VmEvent>>,
}

impl Machine {
    fn lock(&self) -> MutexGuard<'_, Platform> {
        // Platform methods finish their updates before returning; a panic elsewhere leaves it usable.
        self.platform.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Guest time up to date before a device register is read or written.
    fn sync(&self) {
        self.time.sync(self.cpu.retired_instructions());
    }

    /// After a write: a power-off or reset request goes to the run loop at once (like the i8042's reset, so
    /// that it is ordered before whatever the guest does next, e.g. an isa-debug-exit write in the same block),
    /// and the vCPU stops at its next block boundary.
    fn check_request(&self, p: &mut Platform) {
        if let Some(r) = p.take_system_request() {
            let (code, event) = match r {
                SystemRequest::PowerOff => {
                    (REQ_POWEROFF, VmEvent::PowerOff("the guest powered off (ACPI S5 through PM1a_CNT)".into()))
                }
                SystemRequest::Reset => {
                    (REQ_RESET, VmEvent::Reset("the guest reset the machine through port 0xcf9".into()))
                }
            };
            match &self.events {
                Some(tx) => {
                    let _ = tx.send(event);
                }
                None => self.request.store(code, Ordering::SeqCst),
            }
            self.cpu.kick();
        }
    }
}

/// The platform's interrupt controller as the CPU's `InterruptSource` (INTR and INTA).
struct CpuIrq(Arc<Machine>);

impl InterruptSource for CpuIrq {
    fn pending(&self) -> bool {
        let m = &self.0;
        if m.signal.is_pending() {
            return true;
        }
        // Called at every block boundary with IF=1: only atomics unless a timer is due.
        if let Some(d) = m.signal.next_deadline_ns() {
            let n = m.cpu.retired_instructions();
            if m.time.at(n) >= d {
                m.time.sync(n);
                m.lock().poll();
            }
        }
        m.signal.is_pending()
    }

    fn acknowledge(&self) -> Option<u8> {
        self.0.lock().acknowledge(0)
    }
}

/// TSC, IA32_APIC_BASE and HLT through the platform.
struct Hooks(Arc<Machine>);

/// IA32_APIC_BASE (SDM Vol. 3A "Local APIC Status and Location").
const MSR_APIC_BASE: u32 = 0x1b;

impl CpuHooks for Hooks {
    fn tsc(&self, instructions: u64) -> Option<u64> {
        let ns = self.0.time.sync(instructions);
        Some(tessera_platform::clock::ns_to_ticks(ns, TSC_HZ))
    }

    fn rdmsr(&self, index: u32) -> Option<u64> {
        (index == MSR_APIC_BASE).then(|| self.0.lock().apic_base_msr(0))
    }

    fn wrmsr(&self, index: u32, value: u64) -> Option<bool> {
        (index == MSR_APIC_BASE).then(|| self.0.lock().set_apic_base_msr(0, value).is_ok())
    }

    fn idle(&self, instructions: u64) -> bool {
        let m = &self.0;
        let now = m.time.sync(instructions);
        m.lock().poll();
        if m.signal.is_pending() {
            return true;
        }
        let deadline = m.signal.next_deadline_ns();
        let wait = deadline.map_or(MAX_IDLE, |d| Duration::from_nanos(d.saturating_sub(now)).min(MAX_IDLE));
        let slept = Instant::now();
        m.signal.wait(Some(wait));
        // Idle time passes at wall-clock pace, up to the deadline that ended the wait.
        let elapsed = u64::try_from(slept.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut target = now.saturating_add(elapsed);
        if let Some(d) = deadline {
            target = if wait < MAX_IDLE && !m.signal.is_pending() { target.max(d) } else { target.min(d) };
        }
        m.time.skip_to(instructions, target);
        m.lock().poll();
        true
    }
}

/// Platform MMIO (per-CPU LAPIC window, IOAPIC, HPET) first, then the core's devices.
struct MachineIo<'a> {
    m: &'a Machine,
    next: &'a dyn IoHandler,
}

impl IoHandler for MachineIo<'_> {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        // Platform ports are on the bus (`PlatformPorts`).
        self.next.pio_read(port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        self.next.pio_write(port, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if platform_mmio(addr) {
            self.m.sync();
            let mut p = self.m.lock();
            if p.mmio_read(0, addr, data) {
                return;
            }
        }
        self.next.mmio_read(addr, data)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if platform_mmio(addr) {
            self.m.sync();
            let mut p = self.m.lock();
            if p.mmio_write(0, addr, data) {
                self.m.check_request(&mut p);
                return;
            }
        }
        self.next.mmio_write(addr, data)
    }
}

/// The windows the platform may decode: a quick filter so RAM-adjacent MMIO does not take the lock.
fn platform_mmio(addr: u64) -> bool {
    // The LAPIC can be moved anywhere by IA32_APIC_BASE; Linux keeps it at 0xfee00000. Everything at or above
    // the IOAPIC (0xfec00000) up to 4 GiB goes to the platform first, which covers all three default windows.
    let in_window = |(base, len): (u64, u64)| addr >= base && addr - base < len;
    (addr >= IOAPIC_MMIO.0 && addr < 1 << 32) || in_window(HPET_MMIO)
}

/// One vCPU of the software engine: the [`SoftVcpu`] with the platform in front of the core's devices.
struct TcgVcpu {
    cpu: SoftVcpu,
    machine: Arc<Machine>,
    /// Keeps the mapping the CPU's raw RAM pointers point into alive.
    _ram: Arc<GuestRam>,
}

impl Vcpu for TcgVcpu {
    fn regs(&self) -> tessera_vcpu::Result<Regs> {
        self.cpu.regs()
    }
    fn set_regs(&mut self, regs: &Regs) -> tessera_vcpu::Result<()> {
        self.cpu.set_regs(regs)
    }
    fn sregs(&self) -> tessera_vcpu::Result<SpecialRegs> {
        self.cpu.sregs()
    }
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> tessera_vcpu::Result<()> {
        self.cpu.set_sregs(sregs)
    }
    fn set_fpu_control(&mut self, fpu: &FpuControl) -> tessera_vcpu::Result<()> {
        self.cpu.set_fpu_control(fpu)
    }
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> tessera_vcpu::Result<()> {
        self.cpu.set_msrs(msrs)
    }

    fn run(&mut self, io: &dyn IoHandler) -> tessera_vcpu::Result<VcpuExit> {
        let machine = self.machine.clone();
        let exit = self.cpu.run(&MachineIo { m: &machine, next: io })?;
        match machine.request.swap(REQ_NONE, Ordering::SeqCst) {
            REQ_POWEROFF => Ok(VcpuExit::PowerOff),
            REQ_RESET => Ok(VcpuExit::Reset),
            _ => Ok(exit),
        }
    }
}

struct Kick {
    cpu: SwHandle,
    signal: Arc<InterruptSignal>,
}

impl VcpuKick for Kick {
    fn kick(&self) {
        self.cpu.kick();
        // A vCPU idling in HLT waits on the platform's signal.
        self.signal.kick();
    }
}

/// A UART's interrupt line: an edge on the platform's ISA IRQ, like KVM's irqfd.
struct IsaLine(IsaIrq);

impl IrqLine for IsaLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.pulse();
        Ok(())
    }
}

/// The platform's I/O ports on the core's port bus.
struct PlatformPorts {
    base: u16,
    machine: Arc<Mutex<Option<Arc<Machine>>>>,
    platform: Arc<Mutex<Platform>>,
}

impl PlatformPorts {
    fn machine(&self) -> Option<Arc<Machine>> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BusDevice for PlatformPorts {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let port = self.base.wrapping_add(offset as u16);
        let m = self.machine();
        if let Some(m) = &m {
            m.sync();
        }
        let mut p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        if !p.pio_read(port, data) {
            data.fill(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let port = self.base.wrapping_add(offset as u16);
        let m = self.machine();
        if let Some(m) = &m {
            m.sync();
        }
        let mut p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        p.pio_write(port, data);
        if let Some(m) = &m {
            m.check_request(&mut p);
        }
    }
}

/// The software-CPU engine.
pub struct TcgEngine {
    ram: Arc<GuestRam>,
    platform: Arc<Mutex<Platform>>,
    clock: GuestClock,
    acpi: Vec<u8>,
    acpi_info: AcpiInfo,
    /// The machine of the current boot, for the port adapters.
    current: Arc<Mutex<Option<Arc<Machine>>>>,
    boots: u64,
    events: Option<Sender<VmEvent>>,
}

impl TcgEngine {
    /// `serials`: how many ISA UARTs the core will create (COM1.. in order), for the DSDT.
    pub fn new(ram: Arc<GuestRam>, smp: u32, serials: usize) -> Result<TcgEngine, Error> {
        if smp != 1 {
            return Err(Error::Config(format!(
                "-smp {smp}: Tessera's software CPU (-accel tcg) runs one vCPU for now; use -smp 1 or -accel kvm"
            )));
        }
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let clock = GuestClock::virtual_clock(start);
        let layout = ram.layout();
        let below = layout.low_ram_end();
        let above = layout.high_ram().map_or(0, |r| r.size);
        let cfg = PlatformConfig { cpus: 1, ram_below_4g: below, ram_above_4g: above, pm_timer_32bit: false };
        let platform = Platform::new(clock.clone(), &cfg).map_err(|e| Error::Config(format!("platform: {e}")))?;
        let acpi_cfg = AcpiConfig {
            cpus: 1,
            ioapic_id: platform.ioapic_id(),
            pm_timer_32bit: false,
            i8042: true,
            hpet: true,
            serial_ports: ISA_SERIAL_PORTS.iter().take(serials).map(|&(base, irq)| (base, irq as u8)).collect(),
        };
        let mut acpi = vec![0u8; ACPI_SIZE as usize];
        let l =
            // PCI0 in the DSDT: with ACPI, Linux scans only the root bridges it declares (docs/virtio-pci.md).
            {
                let w = crate::pci::MmioWindow::for_layout(layout);
                let pci = PciRootWindow { mmio_start: w.start as u32, mmio_end: w.end as u32 };
                write_tables_with_pci(&acpi_cfg, Some(&pci), &mut acpi, ACPI_BASE)
            }
            .map_err(|e| Error::Config(format!("ACPI tables: {e}")))?;
        acpi.truncate(l.len);
        Ok(TcgEngine {
            ram,
            platform: Arc::new(Mutex::new(platform)),
            clock,
            acpi,
            acpi_info: AcpiInfo { rsdp_addr: l.rsdp_addr, base: ACPI_BASE, size: ACPI_SIZE },
            current: Arc::new(Mutex::new(None)),
            boots: 0,
            events: None,
        })
    }

    /// Where the ACPI tables are, for the boot code (e820 and the RSDP pointer).
    pub fn acpi_info(&self) -> AcpiInfo {
        self.acpi_info
    }

    fn swcpu_ram(&self) -> Result<tessera_swcpu::GuestRam, Error> {
        let regions: Vec<(u64, *mut u8, usize)> = self
            .ram
            .host_regions()
            .into_iter()
            .map(|(r, host)| (r.guest_addr, host as *mut u8, r.size as usize))
            .collect();
        // SAFETY: the regions are the core's vm-memory mappings of the RAM memfd; every TcgVcpu holds an
        // Arc<GuestRam> so they stay mapped as long as a CPU built from them exists, and nothing remaps them.
        unsafe { tessera_swcpu::GuestRam::new(&regions) }
            .map_err(|e| Error::Config(format!("the software CPU cannot use guest RAM: {e}")))
    }
}

impl Engine for TcgEngine {
    /// MSIs of PCI devices go into the platform's LAPICs from a thread watching the devices' eventfds.
    fn msi_router(&mut self) -> Result<Arc<dyn crate::pci::msi::MsiRouter>, Error> {
        let platform = self.platform.clone();
        let router = crate::pci::msi::ThreadedMsiRouter::new(Arc::new(move |m: crate::pci::msi::MsiMessage| {
            platform.lock().unwrap_or_else(|e| e.into_inner()).deliver_msi(m.address, m.data);
        }))?;
        Ok(router)
    }

    fn create_vcpus(&mut self) -> Result<Vec<VcpuHandle>, Error> {
        let mut p = self.platform.lock().unwrap_or_else(|e| e.into_inner());
        if self.boots > 0 {
            p.reset();
        }
        self.boots += 1;
        // The tables are written again on every boot: the previous guest may have overwritten them.
        self.ram
            .memory()
            .write_slice(&self.acpi, vm_memory::GuestAddress(ACPI_BASE))
            .map_err(|_| Error::BootData { what: "the ACPI tables", addr: ACPI_BASE })?;
        let signal = p.interrupt_signal(0).ok_or_else(|| Error::Config("the platform has no CPU 0".into()))?;
        drop(p);

        let mut cpu = SoftVcpu::with_config(self.swcpu_ram()?, SoftVcpuConfig { tsc_khz: TSC_HZ / 1000, apic: true });
        let machine = Arc::new(Machine {
            platform: self.platform.clone(),
            time: InsnClock::new(self.clock.clone()),
            signal: signal.clone(),
            cpu: cpu.handle(),
            request: AtomicU8::new(REQ_NONE),
            events: self.events.clone(),
        });
        cpu.set_interrupt_source(Arc::new(CpuIrq(machine.clone())));
        cpu.set_hooks(Arc::new(Hooks(machine.clone())));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(machine.clone());
        let kick = Arc::new(Kick { cpu: cpu.handle(), signal });
        Ok(vec![VcpuHandle { vcpu: Box::new(TcgVcpu { cpu, machine, _ram: self.ram.clone() }), kick }])
    }

    fn irq_line(&mut self, irq: u32) -> Result<Arc<dyn IrqLine>, Error> {
        let line = u8::try_from(irq)
            .map_err(|_| Error::Config(format!("ISA IRQ {irq} does not exist")))
            .and_then(|n| IsaIrq::new(&self.platform, n).map_err(|e| Error::Config(e.to_string())))?;
        Ok(Arc::new(IsaLine(line)))
    }

    fn attach_devices(&mut self, devices: &mut Devices, events: &Sender<VmEvent>) -> Result<(), Error> {
        self.events = Some(events.clone());
        for &(base, len) in PORT_RANGES {
            let dev = Arc::new(PlatformPorts { base, machine: self.current.clone(), platform: self.platform.clone() });
            devices.pio.insert(u64::from(base), u64::from(len), "the PC platform (PIC, PIT, RTC, ACPI)", dev)?;
        }
        Ok(())
    }

    fn acpi(&self) -> Option<AcpiInfo> {
        Some(self.acpi_info)
    }

    /// PWRBTN_STS in the PM1a event block; the guest sees an SCI when it enabled PWRBTN_EN (ACPI 6.5 §4.8.3.1).
    fn power_button(&self) -> Option<crate::monitor::PowerButton> {
        let platform = self.platform.clone();
        Some(Arc::new(move || platform.lock().unwrap_or_else(|e| e.into_inner()).press_power_button()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instruction_clock_counts_instructions_and_keeps_idle_skips() {
        let clock = GuestClock::virtual_clock(0);
        clock.advance_ns(1_000).unwrap();
        let t = InsnClock::new(clock.clone());
        // Time starts where the platform clock was and moves with retired instructions only when synced.
        assert_eq!(t.at(0), 1_000);
        assert_eq!(t.at(100), 1_000 + 100 * NS_PER_INSTRUCTION);
        assert_eq!(clock.now_ns(), 1_000);
        assert_eq!(t.sync(100), 1_000 + 100 * NS_PER_INSTRUCTION);
        assert_eq!(clock.now_ns(), 1_000 + 100 * NS_PER_INSTRUCTION);
        // An idle skip to 1 ms at instruction 100: later instructions count from there.
        t.skip_to(100, 1_000_000);
        assert_eq!(t.at(100), 1_000_000);
        assert_eq!(t.sync(110), 1_000_000 + 10 * NS_PER_INSTRUCTION);
        // Guest time never goes back, even if asked to skip to the past.
        t.skip_to(110, 5);
        assert_eq!(clock.now_ns(), 1_000_000 + 10 * NS_PER_INSTRUCTION);
        assert_eq!(t.at(110), clock.now_ns());
    }

    #[test]
    fn platform_mmio_covers_its_windows_and_not_ram() {
        assert!(platform_mmio(0xfee0_0300), "LAPIC ICR");
        assert!(platform_mmio(0xfec0_0010), "IOAPIC data window");
        assert!(platform_mmio(0xfed0_00f0), "HPET main counter");
        assert!(!platform_mmio(0x1000));
        assert!(!platform_mmio(0xe0000), "the ACPI tables are RAM");
        assert!(!platform_mmio(1 << 32), "RAM above 4 GiB");
    }

    #[test]
    fn more_than_one_vcpu_is_refused_and_the_acpi_tables_fit() {
        let ram = Arc::new(GuestRam::new(64 << 20).unwrap());
        let err = TcgEngine::new(ram.clone(), 2, 1).err().expect("-smp 2 refused");
        assert!(err.to_string().contains("-smp 2"), "{err}");
        let e = TcgEngine::new(ram, 1, 4).unwrap();
        let a = e.acpi_info();
        assert_eq!((a.base, a.size), (ACPI_BASE, ACPI_SIZE));
        assert!(a.rsdp_addr >= ACPI_BASE && a.rsdp_addr < ACPI_BASE + ACPI_SIZE && a.rsdp_addr & 0xf == 0);
        assert!(e.acpi.len() as u64 <= ACPI_SIZE);
    }
}
