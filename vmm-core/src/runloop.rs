//! The engine-neutral run loop. It sees vCPUs only as `dyn Vcpu` (KVM today; the software CPU for `-accel tcg`
//! plugs in as another [`Engine`]), runs each on its own thread, and turns what they and the devices report
//! ([`VmEvent`]) into the end of the VM or a reboot.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tessera_vcpu::{IoHandler, Vcpu, VcpuExit};

use crate::boot::AcpiInfo;
use crate::devices::serial::IrqLine;
use crate::devices::Devices;
use crate::monitor::{RunStatus, VmState};
use crate::Error;
use tessera_ipc::messages::MonitorEvent;

/// Something that happened that the run loop must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// isa-debug-exit was written with this value.
    DebugExit(u64),
    /// The guest reset the machine (keyboard controller, triple fault); the string says how.
    Reset(String),
    /// The guest powered the machine off.
    PowerOff(String),
    /// A vCPU or device cannot go on.
    Failed(String),
    /// The launcher sent `Shutdown`.
    LauncherShutdown,
    /// The control channel to the launcher broke.
    ControlLost(String),
    /// The monitor asked for a reset (`system_reset`; its event went out already, see [`crate::monitor`]).
    MonitorReset,
}

/// Makes a running vCPU return from [`Vcpu::run`] with [`VcpuExit::Interrupted`] soon, from any thread.
pub trait VcpuKick: Send + Sync {
    fn kick(&self);
}

pub struct VcpuHandle {
    pub vcpu: Box<dyn Vcpu>,
    pub kick: Arc<dyn VcpuKick>,
}

/// A way of running guest code: KVM, or the software CPU.
pub trait Engine: Send {
    /// Fresh vCPUs in power-on state, index 0 the bootstrap processor. Called at start and again for every
    /// guest reboot; the engine drops whatever machine state it kept from the previous run.
    fn create_vcpus(&mut self) -> Result<Vec<VcpuHandle>, Error>;
    /// The ISA interrupt line `irq` (0–15), for a device to raise. Lines stay valid across reboots.
    fn irq_line(&mut self, irq: u32) -> Result<Arc<dyn IrqLine>, Error>;
    /// MSI delivery and doorbells for PCI devices (see [`crate::pci::msi`]). An engine with a userspace
    /// interrupt controller returns a [`crate::pci::msi::ThreadedMsiRouter`] that injects into it.
    fn msi_router(&mut self) -> Result<Arc<dyn crate::pci::msi::MsiRouter>, Error> {
        Err(Error::Config("PCI devices are not available with this accelerator yet (no MSI delivery)".into()))
    }
    /// Put the engine's own devices on the core's buses (the software CPU's platform ports), before the core
    /// adds its optional devices, so that overlaps are refused. `events` is for what those devices report
    /// (a power-off or reset request).
    fn attach_devices(&mut self, devices: &mut Devices, events: &Sender<VmEvent>) -> Result<(), Error> {
        let _ = (devices, events);
        Ok(())
    }
    /// The ACPI tables the engine keeps in guest RAM, if any (the boot code points the kernel at them).
    fn acpi(&self) -> Option<AcpiInfo> {
        None
    }
    /// The machine's ACPI power button (`system_powerdown`), if it has ACPI.
    fn power_button(&self) -> Option<crate::monitor::PowerButton> {
        None
    }
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Report `Exit { code, reason }` to the launcher.
    Exit { code: i32, reason: String },
    /// The launcher asked us to stop.
    Shutdown,
    /// The launcher is gone.
    LauncherGone(String),
    /// Report `Fatal { message }`.
    Fatal(String),
}

/// Devices the run loop resets on a guest reboot.
pub trait ResettableIo: IoHandler {
    fn reset(&self);
}

/// Loads the kernel (again, on reboot) and sets the boot vCPU's entry state.
pub type BootFn = Box<dyn FnMut(&mut dyn Vcpu) -> Result<(), Error> + Send>;

pub struct RunLoop {
    pub engine: Box<dyn Engine>,
    pub io: Arc<dyn ResettableIo>,
    pub boot: BootFn,
    pub events: Receiver<VmEvent>,
    /// For vCPU threads to report on.
    pub events_tx: Sender<VmEvent>,
    pub no_reboot: bool,
    pub no_shutdown: bool,
    /// The run state the monitor reads and changes; vCPU threads pass its gate before each run.
    pub state: Arc<VmState>,
}

/// How long stopping vCPUs may take before the run loop gives up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

struct Running {
    threads: Vec<JoinHandle<()>>,
    kicks: Vec<Arc<dyn VcpuKick>>,
    stopping: Arc<AtomicBool>,
}

impl Running {
    /// Kick every vCPU until all threads have ended (or the timeout passed). Returns false on timeout.
    fn stop(self) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            for k in &self.kicks {
                k.kick();
            }
            for t in &self.threads {
                t.thread().unpark();
            }
            if self.threads.iter().all(|t| t.is_finished()) {
                break;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for t in self.threads {
            let _ = t.join();
        }
        true
    }
}

impl RunLoop {
    /// Boot and run the VM until it ends. `on_started` is called once, when the vCPUs of the first boot run.
    pub fn run(&mut self, on_started: &mut dyn FnMut()) -> Outcome {
        let mut started = false;
        loop {
            let running = match self.start() {
                Ok(r) => r,
                Err(e) => return Outcome::Fatal(e.to_string()),
            };
            if !started {
                on_started();
                started = true;
            }
            let outcome = self.wait(running);
            match outcome {
                Some(o) => return o,
                None => {
                    self.io.reset();
                    // Events of the previous run (a second vCPU's reset, a late debug-exit) belong to it; only the
                    // launcher's word carries over.
                    while let Ok(ev) = self.events.try_recv() {
                        match ev {
                            VmEvent::LauncherShutdown => return Outcome::Shutdown,
                            VmEvent::ControlLost(m) => return Outcome::LauncherGone(m),
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    fn start(&mut self) -> Result<Running, Error> {
        let mut vcpus = self.engine.create_vcpus()?;
        let Some(bsp) = vcpus.first_mut() else {
            return Err(Error::Config("the machine has no vCPU".into()));
        };
        (self.boot)(bsp.vcpu.as_mut())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut kicks = Vec::new();
        for (index, h) in vcpus.into_iter().enumerate() {
            kicks.push(h.kick.clone());
            let io = self.io.clone();
            let events = self.events_tx.clone();
            let stop = stopping.clone();
            let vcpu = h.vcpu;
            let state = self.state.clone();
            state.enter();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    vcpu_thread(index, vcpu, io, events, stop, &state);
                    state.leave();
                })
                .map_err(|e| {
                    self.state.leave();
                    Error::Thread { what: "a vCPU thread", source: e }
                })?;
            threads.push(t);
        }
        self.state.set_kicks(kicks.clone());
        Ok(Running { threads, kicks, stopping })
    }

    /// Wait for the event that ends this run: `Some(outcome)` ends the VM, `None` reboots it.
    fn wait(&mut self, running: Running) -> Option<Outcome> {
        let mut running = Some(running);
        let state = self.state.clone();
        let stop = |r: &mut Option<Running>| {
            if let Some(r) = r.take() {
                // No monitor kick may reach a thread that is being joined (see `VmState::pause`).
                state.set_kicks(Vec::new());
                if !r.stop() {
                    return Err(Outcome::Fatal("a vCPU did not stop within 3 seconds".into()));
                }
            }
            Ok(())
        };
        let outcome = loop {
            let Ok(ev) = self.events.recv() else {
                break Some(Outcome::Fatal("the run loop lost its event channel".into()));
            };
            match ev {
                VmEvent::DebugExit(v) => {
                    break Some(Outcome::Exit {
                        code: crate::devices::debug_exit::exit_code(v),
                        reason: format!("the guest wrote {v:#x} to isa-debug-exit"),
                    })
                }
                VmEvent::Reset(why) if self.no_reboot => {
                    self.state.emit(MonitorEvent::Shutdown { guest: true, reason: "guest-reset".into() });
                    break Some(Outcome::Exit { code: 0, reason: format!("{why} (-no-reboot)") });
                }
                VmEvent::Reset(_) => {
                    self.state.emit(MonitorEvent::Reset { guest: true, reason: "guest-reset".into() });
                    break None;
                }
                VmEvent::MonitorReset if self.no_reboot => {
                    break Some(Outcome::Exit { code: 0, reason: "system_reset from the monitor (-no-reboot)".into() })
                }
                // QEMU: a machine that was not running is in `prelaunch` after the reset, and waits for `cont`.
                VmEvent::MonitorReset => {
                    if self.state.status() != RunStatus::Running {
                        self.state.set_status(RunStatus::Prelaunch);
                    }
                    break None;
                }
                VmEvent::PowerOff(why) if self.no_shutdown => {
                    // QEMU -no-shutdown: the guest stops, the processes stay until told otherwise.
                    self.state.emit(MonitorEvent::Shutdown { guest: true, reason: "guest-shutdown".into() });
                    self.state.set_status(RunStatus::Shutdown);
                    self.state.emit(MonitorEvent::Stop);
                    if let Err(o) = stop(&mut running) {
                        break Some(o);
                    }
                    let _ = why;
                }
                VmEvent::PowerOff(why) => {
                    self.state.emit(MonitorEvent::Shutdown { guest: true, reason: "guest-shutdown".into() });
                    break Some(Outcome::Exit { code: 0, reason: why });
                }
                VmEvent::Failed(m) => break Some(Outcome::Fatal(m)),
                VmEvent::LauncherShutdown => break Some(Outcome::Shutdown),
                VmEvent::ControlLost(m) => break Some(Outcome::LauncherGone(m)),
            }
        };
        if let Err(o) = stop(&mut running) {
            return Some(o);
        }
        outcome
    }
}

fn vcpu_thread(
    index: usize,
    mut vcpu: Box<dyn Vcpu>,
    io: Arc<dyn ResettableIo>,
    events: Sender<VmEvent>,
    stop: Arc<AtomicBool>,
    state: &VmState,
) {
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        while !stop.load(Ordering::SeqCst) {
            // Paused by the monitor (or -S): wait here, state kept, until `cont` or the end of this run.
            state.wait_runnable(&|| stop.load(Ordering::SeqCst));
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let exit = match vcpu.run(io.as_ref()) {
                Ok(exit) => exit,
                Err(e) => return Some(VmEvent::Failed(format!("vCPU {index}: {e}"))),
            };
            match exit {
                VcpuExit::Interrupted => {}
                // Only an engine without an interrupt controller of its own returns this; it is woken by a
                // kick (the wake-up on interrupts comes with the software CPU's platform devices).
                VcpuExit::Halted => std::thread::park_timeout(Duration::from_millis(10)),
                VcpuExit::Reset => {
                    return Some(VmEvent::Reset(format!("vCPU {index} shut down (triple fault or reset request)")))
                }
                VcpuExit::PowerOff => return Some(VmEvent::PowerOff(format!("vCPU {index}: the guest powered off"))),
                VcpuExit::Unsupported(what) => return Some(VmEvent::Failed(format!("vCPU {index}: {what}"))),
            }
        }
        None
    }));
    let event = match result {
        Ok(ev) => ev,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Some(VmEvent::Failed(format!("vCPU {index} crashed: {what}")))
        }
    };
    if let Some(ev) = event {
        let _ = events.send(ev);
    }
}

#[cfg(test)]
mod tests {
    //! The run loop with a scripted engine: no KVM needed, and the shape an engine plugs in with.

    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use tessera_vcpu::{FpuControl, Regs, SpecialRegs};

    use crate::devices::debug_exit::DebugExit;
    use crate::devices::Devices;
    use crate::guestlog::GuestLog;

    #[derive(Clone)]
    enum Step {
        Out(u16, u8),
        Exit(VcpuExit),
        Panic,
        SpinUntilKicked,
    }

    #[derive(Default)]
    struct Kick(AtomicBool);
    impl VcpuKick for Kick {
        fn kick(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    struct ScriptedVcpu {
        steps: VecDeque<Step>,
        kick: Arc<Kick>,
    }

    impl Vcpu for ScriptedVcpu {
        fn regs(&self) -> tessera_vcpu::Result<Regs> {
            Ok(Regs::default())
        }
        fn set_regs(&mut self, _: &Regs) -> tessera_vcpu::Result<()> {
            Ok(())
        }
        fn sregs(&self) -> tessera_vcpu::Result<SpecialRegs> {
            Ok(SpecialRegs::default())
        }
        fn set_sregs(&mut self, _: &SpecialRegs) -> tessera_vcpu::Result<()> {
            Ok(())
        }
        fn set_fpu_control(&mut self, _: &FpuControl) -> tessera_vcpu::Result<()> {
            Ok(())
        }
        fn set_msrs(&mut self, _: &[(u32, u64)]) -> tessera_vcpu::Result<()> {
            Ok(())
        }
        fn run(&mut self, io: &dyn IoHandler) -> tessera_vcpu::Result<VcpuExit> {
            loop {
                if self.kick.0.swap(false, Ordering::SeqCst) {
                    return Ok(VcpuExit::Interrupted);
                }
                match self.steps.pop_front() {
                    Some(Step::Out(port, v)) => io.pio_write(port, &[v]),
                    Some(Step::Exit(e)) => return Ok(e),
                    Some(Step::Panic) => panic!("scripted panic"),
                    Some(Step::SpinUntilKicked) | None => {
                        self.steps.push_front(Step::SpinUntilKicked);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
    }

    /// Boot `n` (0-based) runs `scripts[n]` on vCPU 0; other vCPUs spin until kicked.
    struct ScriptedEngine {
        scripts: Vec<Vec<Step>>,
        boots: Arc<AtomicUsize>,
        smp: usize,
    }

    impl Engine for ScriptedEngine {
        fn create_vcpus(&mut self) -> Result<Vec<VcpuHandle>, Error> {
            let n = self.boots.fetch_add(1, Ordering::SeqCst);
            let script =
                self.scripts.get(n).cloned().ok_or_else(|| Error::Config(format!("no script for boot {n}")))?;
            Ok((0..self.smp)
                .map(|i| {
                    let kick = Arc::new(Kick::default());
                    let steps = if i == 0 { script.clone().into() } else { VecDeque::new() };
                    VcpuHandle { vcpu: Box::new(ScriptedVcpu { steps, kick: kick.clone() }), kick }
                })
                .collect())
        }
        fn irq_line(&mut self, _: u32) -> Result<Arc<dyn IrqLine>, Error> {
            Err(Error::Config("no interrupts here".into()))
        }
    }

    struct CountingIo {
        devices: Devices,
        resets: AtomicUsize,
    }
    impl IoHandler for CountingIo {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            self.devices.pio_read(port, data)
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.devices.pio_write(port, data)
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            self.devices.mmio_read(addr, data)
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            self.devices.mmio_write(addr, data)
        }
    }
    impl ResettableIo for CountingIo {
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn run(scripts: Vec<Vec<Step>>, smp: usize, no_reboot: bool) -> (Outcome, usize, usize, usize) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut devices = Devices::new(GuestLog::stderr(vec![]));
        devices.pio.insert(0x501, 2, "isa-debug-exit", Arc::new(DebugExit::new(tx.clone()))).unwrap();
        let io = Arc::new(CountingIo { devices, resets: AtomicUsize::new(0) });
        let boots = Arc::new(AtomicUsize::new(0));
        let booted = Arc::new(Mutex::new(0usize));
        let b = booted.clone();
        let mut rl = RunLoop {
            engine: Box::new(ScriptedEngine { scripts, boots: boots.clone(), smp }),
            io: io.clone(),
            boot: Box::new(move |_| {
                *b.lock().unwrap() += 1;
                Ok(())
            }),
            events: rx,
            events_tx: tx,
            no_reboot,
            no_shutdown: false,
            state: Arc::new(VmState::new(false, no_reboot, None, None)),
        };
        let mut started = 0;
        let outcome = rl.run(&mut || started += 1);
        assert_eq!(started, 1, "on_started is called once, for the first boot only");
        let booted = *booted.lock().unwrap();
        (outcome, boots.load(Ordering::SeqCst), booted, io.resets.load(Ordering::SeqCst))
    }

    #[test]
    fn a_reset_reboots_and_a_debug_exit_ends_the_vm() {
        let (outcome, boots, booted, resets) =
            run(vec![vec![Step::Exit(VcpuExit::Reset)], vec![Step::Out(0x501, 7), Step::SpinUntilKicked]], 2, false);
        assert_eq!(outcome, Outcome::Exit { code: 15, reason: "the guest wrote 0x7 to isa-debug-exit".into() });
        assert_eq!((boots, booted, resets), (2, 2, 1), "two machines, two boots, devices reset once");
    }

    #[test]
    fn a_reset_with_no_reboot_exits_0() {
        let (outcome, boots, _, _) = run(vec![vec![Step::Exit(VcpuExit::Reset)]], 1, true);
        assert!(matches!(outcome, Outcome::Exit { code: 0, .. }), "{outcome:?}");
        assert_eq!(boots, 1);
    }

    #[test]
    fn what_an_engine_cannot_do_and_a_crashing_vcpu_are_fatal() {
        let (outcome, ..) =
            run(vec![vec![Step::Exit(VcpuExit::Unsupported("opcode 0f 0b at 0x1000".into()))]], 1, false);
        assert_eq!(outcome, Outcome::Fatal("vCPU 0: opcode 0f 0b at 0x1000".into()));
        let (outcome, ..) = run(vec![vec![Step::Panic]], 2, false);
        assert!(matches!(&outcome, Outcome::Fatal(m) if m.contains("vCPU 0 crashed")), "{outcome:?}");
    }

    #[test]
    fn an_engine_error_at_reboot_is_fatal() {
        // No script for the second boot: create_vcpus fails.
        let (outcome, ..) = run(vec![vec![Step::Exit(VcpuExit::Reset)]], 1, false);
        assert_eq!(outcome, Outcome::Fatal("no script for boot 1".into()));
    }
}
