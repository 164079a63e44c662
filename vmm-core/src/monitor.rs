//! The core's side of the monitor (QMP runs in the launcher, which forwards the guest-facing commands as
//! `LauncherToChild::Monitor`): the guest's run state, pausing and resuming the vCPUs of either engine, the
//! ACPI power button and a monitor-requested reset.
//!
//! Pausing is engine-neutral: every vCPU thread passes the [`VmState`] gate before each `Vcpu::run`; `stop`
//! closes the gate, kicks every vCPU out of `run` (KVM: the signal-based kick; the software CPU: its exit flag)
//! and waits until every vCPU thread is parked at the gate. The vCPUs keep their state while parked, so `cont`
//! only opens the gate again. QEMU's state names and transitions follow qapi/run-state.json and
//! softmmu/runstate.c (QEMU 8.2): `stop` in `prelaunch` stays `prelaunch`; a reset of a machine that was not
//! running leaves it in `prelaunch`; `cont` after a guest power-off under `-no-shutdown` needs `system_reset`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tessera_ipc::messages::{MonitorCommand, MonitorEvent, MonitorValue};

use crate::runloop::{VcpuKick, VmEvent};

/// How long `stop` waits for the vCPUs to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a parked vCPU looks at its thread's stop flag (the run loop ends a run by kicking, not by the gate).
const PARKED_POLL: Duration = Duration::from_millis(50);

/// QEMU's `RunState`, the part Tessera has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// `-S`, or reset while not running: the vCPUs wait for `cont`.
    Prelaunch,
    Running,
    Paused,
    /// The guest powered off under `-no-shutdown`.
    Shutdown,
}

impl RunStatus {
    /// QEMU's name, as `query-status` returns it.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Prelaunch => "prelaunch",
            RunStatus::Running => "running",
            RunStatus::Paused => "paused",
            RunStatus::Shutdown => "shutdown",
        }
    }
}

struct Gate {
    status: RunStatus,
    /// vCPU threads alive, and how many of them wait at the gate.
    active: usize,
    parked: usize,
}

/// Where monitor events go (the control channel in the core process).
pub type EventSink = Arc<dyn Fn(MonitorEvent) + Send + Sync>;
/// Presses the machine's ACPI power button.
pub type PowerButton = Arc<dyn Fn() + Send + Sync>;

/// The run state shared by the run loop, its vCPU threads and the control thread.
pub struct VmState {
    gate: Mutex<Gate>,
    /// `gate.status == Running`, readable without the lock: the vCPUs' fast path between two runs.
    running: AtomicBool,
    /// The launcher has a monitor (`MonitorCommand::EnableEvents`): events are sent.
    events_enabled: AtomicBool,
    changed: Condvar,
    kicks: Mutex<Vec<Arc<dyn VcpuKick>>>,
    power_button: Option<PowerButton>,
    sink: Option<EventSink>,
    no_reboot: bool,
}

impl VmState {
    pub fn new(
        start_paused: bool,
        no_reboot: bool,
        power_button: Option<PowerButton>,
        sink: Option<EventSink>,
    ) -> Self {
        let status = if start_paused { RunStatus::Prelaunch } else { RunStatus::Running };
        VmState {
            gate: Mutex::new(Gate { status, active: 0, parked: 0 }),
            running: AtomicBool::new(status == RunStatus::Running),
            events_enabled: AtomicBool::new(false),
            changed: Condvar::new(),
            kicks: Mutex::new(Vec::new()),
            power_button,
            sink,
            no_reboot,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        // Every update of the gate is complete before the lock is released.
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> RunStatus {
        self.lock().status
    }

    pub fn set_status(&self, status: RunStatus) {
        let mut g = self.lock();
        g.status = status;
        self.running.store(status == RunStatus::Running, Ordering::SeqCst);
        drop(g);
        self.changed.notify_all();
    }

    /// Send a monitor event (nowhere without a sink, e.g. in tests).
    pub fn emit(&self, event: MonitorEvent) {
        if !self.events_enabled.load(Ordering::SeqCst) {
            return;
        }
        if let Some(s) = &self.sink {
            s(event);
        }
    }

    /// The kicks of the vCPUs of the current boot (set by the run loop at each start).
    pub fn set_kicks(&self, kicks: Vec<Arc<dyn VcpuKick>>) {
        *self.kicks.lock().unwrap_or_else(|e| e.into_inner()) = kicks;
    }

    /// A vCPU thread starts / ends.
    pub fn enter(&self) {
        self.lock().active += 1;
    }

    pub fn leave(&self) {
        let mut g = self.lock();
        g.active = g.active.saturating_sub(1);
        drop(g);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before each run: returns at once while the machine runs; otherwise parks until
    /// it runs again or `stopping()` says the thread must end.
    pub fn wait_runnable(&self, stopping: &dyn Fn() -> bool) {
        if self.running.load(Ordering::SeqCst) {
            return;
        }
        let mut g = self.lock();
        if g.status == RunStatus::Running {
            return;
        }
        g.parked += 1;
        self.changed.notify_all();
        while g.status != RunStatus::Running && !stopping() {
            g = match self.changed.wait_timeout(g, PARKED_POLL) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        g.parked -= 1;
        drop(g);
        self.changed.notify_all();
    }

    /// Stop the vCPUs: close the gate, kick them out of guest code, wait until all are parked.
    fn pause(&self, status: RunStatus) -> Result<(), String> {
        self.set_status(status);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut g = self.lock();
        while g.parked < g.active {
            drop(g);
            // Kicked under the lock: the run loop clears the kicks (taking it) before it joins the threads,
            // so no kick reaches a thread that is gone.
            for k in self.kicks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                k.kick();
            }
            g = self.lock();
            if Instant::now() > deadline {
                return Err(format!("{} vCPU(s) did not stop within 3 seconds", g.active - g.parked));
            }
            g = match self.changed.wait_timeout(g, Duration::from_millis(5)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Ok(())
    }

    /// Carry out a monitor command. Events go out before the result, as in QEMU. `events` is the run loop's
    /// queue (for a reset).
    pub fn handle(&self, command: &MonitorCommand, events: &Sender<VmEvent>) -> Result<MonitorValue, String> {
        match command {
            MonitorCommand::EnableEvents => {
                self.events_enabled.store(true, Ordering::SeqCst);
                Ok(MonitorValue::Empty)
            }
            MonitorCommand::QueryStatus => {
                let s = self.status();
                Ok(MonitorValue::Status { running: s == RunStatus::Running, status: s.name().into() })
            }
            // QEMU's vm_stop: only a running machine stops (and says so).
            MonitorCommand::Stop => {
                if self.status() == RunStatus::Running {
                    self.pause(RunStatus::Paused)?;
                    self.emit(MonitorEvent::Stop);
                }
                Ok(MonitorValue::Empty)
            }
            MonitorCommand::Cont => match self.status() {
                // QEMU qmp_cont: runstate_needs_reset().
                RunStatus::Shutdown => Err("Resetting the Virtual Machine is required".into()),
                RunStatus::Running => Ok(MonitorValue::Empty),
                RunStatus::Prelaunch | RunStatus::Paused => {
                    self.set_status(RunStatus::Running);
                    self.emit(MonitorEvent::Resume);
                    Ok(MonitorValue::Empty)
                }
            },
            MonitorCommand::SystemPowerdown => match &self.power_button {
                Some(press) => {
                    self.emit(MonitorEvent::Powerdown);
                    press();
                    Ok(MonitorValue::Empty)
                }
                None => Err("system_powerdown: this machine has no ACPI power button with -accel kvm yet \
                             (Tessera's KVM machine has no ACPI; -accel tcg has one)"
                    .into()),
            },
            MonitorCommand::SystemReset => {
                // QEMU qemu_system_reset_request: with -no-reboot a reset request is a shutdown request.
                let reason = "host-qmp-system-reset".to_string();
                if self.no_reboot {
                    self.emit(MonitorEvent::Shutdown { guest: false, reason });
                } else {
                    self.emit(MonitorEvent::Reset { guest: false, reason });
                }
                events.send(VmEvent::MonitorReset).map_err(|_| "the run loop is gone; the VM is ending".to_string())?;
                Ok(MonitorValue::Empty)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    struct Kick(Arc<AtomicBool>);
    impl VcpuKick for Kick {
        fn kick(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A fake vCPU thread: spins in "guest code" until kicked, passes the gate between runs.
    fn vcpu(state: Arc<VmState>, runs: Arc<AtomicUsize>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
        let kicked = Arc::new(AtomicBool::new(false));
        state.set_kicks(vec![Arc::new(Kick(kicked.clone()))]);
        state.enter();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let s = stop.clone();
                state.wait_runnable(&move || s.load(Ordering::SeqCst));
                runs.fetch_add(1, Ordering::SeqCst);
                while !kicked.swap(false, Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            state.leave();
        })
    }

    #[test]
    fn stop_parks_the_vcpus_and_cont_resumes_them_with_qemus_events() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let sink: EventSink = Arc::new(move |ev| e.lock().unwrap().push(ev));
        let state = Arc::new(VmState::new(false, false, None, Some(sink)));
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let t = vcpu(state.clone(), runs.clone(), stop.clone());
        let (tx, _rx) = std::sync::mpsc::channel();
        // No events until the launcher asks for them.
        state.emit(MonitorEvent::Powerdown);
        assert_eq!(state.handle(&MonitorCommand::EnableEvents, &tx), Ok(MonitorValue::Empty));
        assert_eq!(state.handle(&MonitorCommand::Stop, &tx), Ok(MonitorValue::Empty));
        let parked_runs = runs.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(runs.load(Ordering::SeqCst), parked_runs, "a paused vCPU does not run");
        assert_eq!(
            state.handle(&MonitorCommand::QueryStatus, &tx),
            Ok(MonitorValue::Status { running: false, status: "paused".into() })
        );
        // A second stop changes nothing and says nothing.
        assert_eq!(state.handle(&MonitorCommand::Stop, &tx), Ok(MonitorValue::Empty));
        assert_eq!(state.handle(&MonitorCommand::Cont, &tx), Ok(MonitorValue::Empty));
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) == parked_runs {
            assert!(Instant::now() < deadline, "the vCPU did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*events.lock().unwrap(), vec![MonitorEvent::Stop, MonitorEvent::Resume]);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }

    #[test]
    fn prelaunch_shutdown_and_the_missing_power_button_answer_like_qemu() {
        let (tx, rx) = std::sync::mpsc::channel();
        let state = VmState::new(true, false, None, None);
        assert_eq!(
            state.handle(&MonitorCommand::QueryStatus, &tx),
            Ok(MonitorValue::Status { running: false, status: "prelaunch".into() })
        );
        assert_eq!(state.handle(&MonitorCommand::Stop, &tx), Ok(MonitorValue::Empty));
        assert_eq!(state.status(), RunStatus::Prelaunch);
        assert!(state.handle(&MonitorCommand::SystemPowerdown, &tx).unwrap_err().contains("no ACPI power button"));
        state.set_status(RunStatus::Shutdown);
        assert_eq!(
            state.handle(&MonitorCommand::Cont, &tx),
            Err("Resetting the Virtual Machine is required".to_string())
        );
        assert_eq!(state.handle(&MonitorCommand::SystemReset, &tx), Ok(MonitorValue::Empty));
        assert_eq!(rx.try_recv(), Ok(VmEvent::MonitorReset));
    }
}
