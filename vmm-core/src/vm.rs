//! The core process's VM: built from the launcher's [`CoreConfig`] and run until it ends, with the control
//! contract of docs/ARCHITECTURE.md:
//! * configuration errors → `Fatal { message }` (QEMU's wording where QEMU has one), exit status 1;
//! * `Ready` once the vCPUs of the first boot run;
//! * the end of the VM → the UARTs' last bytes are sent, then `Exit { code, reason }`, exit status 0;
//! * `Shutdown` from the launcher → flush, exit 0.

use std::fs::File;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use tessera_ipc::messages::{Accel, ChildToLauncher, CoreConfig, LauncherToChild};
use tessera_ipc::{Channel, IpcError, ReceivedFds};

use crate::boot::{self, BootSource, LinuxEntry};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::{I8042Port, COMMAND_PORT, DATA_PORT, I8042};
use crate::devices::serial::{SerialPort, ISA_SERIAL_PORTS, SERIAL_PORT_LEN};
use crate::devices::Devices;
use crate::guestlog::GuestLog;
use crate::kvm::cpuid::CpuModel;
use crate::kvm::KvmEngine;
use crate::memory::GuestRam;
use crate::runloop::{Engine, Outcome, RunLoop, VmEvent};
use crate::tcg::TcgEngine;
use crate::Error;

pub struct Vm {
    control: Arc<Channel>,
    devices: Arc<Devices>,
    runloop: RunLoop,
    events_tx: Sender<VmEvent>,
    log: Arc<GuestLog>,
    /// The devices' vhost-user connections, for backend supervision.
    backends: crate::virtio::Backends,
    /// The chardev `id=` of each UART in `devices.serials`, for `SerialReconnect`.
    serial_ids: Vec<String>,
}

/// How Linux is entered with `accel`: the software CPU skips the decompressor (shared notes §0).
pub fn linux_entry_for(accel: Accel) -> LinuxEntry {
    match accel {
        Accel::Kvm => LinuxEntry::BootProtocol64,
        Accel::Tcg => LinuxEntry::Decompressed,
    }
}

/// The engine for `accel`: KVM, or Tessera's software CPU with the userspace platform ([`TcgEngine`]).
pub fn make_engine(cfg: &CoreConfig, ram: Arc<GuestRam>) -> Result<Box<dyn Engine>, Error> {
    let model = CpuModel::parse(&cfg.cpu_model)?;
    match cfg.accel {
        Accel::Kvm => Ok(Box::new(KvmEngine::open(ram, cfg.smp, model)?)),
        Accel::Tcg => Ok(Box::new(TcgEngine::new(ram, cfg.smp, cfg.serial.len())?)),
    }
}

impl Vm {
    pub fn new(cfg: CoreConfig, mut fds: ReceivedFds, control: Arc<Channel>) -> Result<Vm, Error> {
        let log_out: Box<dyn std::io::Write + Send> = match cfg.log.file {
            Some(i) => Box::new(File::from(fds.take(i)?)),
            None => Box::new(std::io::stderr()),
        };
        let log = GuestLog::new(cfg.log.items.clone(), log_out);
        if cfg.serial.len() > ISA_SERIAL_PORTS.len() {
            return Err(Error::Config(format!(
                "only {} ISA serial ports exist, {} were configured",
                ISA_SERIAL_PORTS.len(),
                cfg.serial.len()
            )));
        }
        let Some(kernel) = cfg.boot.kernel.clone() else { return Err(Error::NoKernel) };
        let mut src = BootSource {
            kernel: File::from(fds.take(kernel.fd)?),
            kernel_path: kernel.path,
            initrd: match cfg.boot.initrd.clone() {
                Some(f) => Some((File::from(fds.take(f.fd)?), f.path)),
                None => None,
            },
            cmdline: cfg.boot.cmdline.clone(),
        };

        let ram = Arc::new(GuestRam::new(cfg.ram.size)?);
        let linux_entry = linux_entry_for(cfg.accel);
        // Load the kernel now so that a bad image is reported before anything runs. The software CPU's engine
        // comes first: it owns the ACPI tables the boot code points the kernel at (and cannot fail on a
        // hostile image); KVM is opened after the kernel was judged, as before.
        let (first_entry, mut engine, acpi) = if cfg.accel == Accel::Tcg {
            let engine = make_engine(&cfg, ram.clone())?;
            let acpi = engine.acpi();
            (boot::load_with_acpi(&ram, &mut src, linux_entry, acpi)?, engine, acpi)
        } else {
            let entry = boot::load(&ram, &mut src, linux_entry)?;
            (entry, make_engine(&cfg, ram.clone())?, None)
        };

        let (events_tx, events): (Sender<VmEvent>, Receiver<VmEvent>) = mpsc::channel();
        let mut devices = Devices::new(log.clone());
        engine.attach_devices(&mut devices, &events_tx)?;
        for (i, s) in cfg.serial.iter().enumerate() {
            let (base, irq) = ISA_SERIAL_PORTS[i];
            let channel = Arc::new(Channel::from_fd(fds.take(s.channel)?));
            let line = engine.irq_line(irq)?;
            let port = SerialPort::new(format!("serial{i} ({})", s.chardev_id), channel, line, log.clone());
            devices.pio.insert(u64::from(base), SERIAL_PORT_LEN, "a 16550A UART", port.clone())?;
            devices.serials.push(port);
        }
        let kbd = I8042::new(events_tx.clone());
        devices.pio.insert(
            u64::from(DATA_PORT),
            1,
            "the i8042 data port",
            Arc::new(I8042Port { dev: kbd.clone(), port: DATA_PORT }),
        )?;
        devices.pio.insert(
            u64::from(COMMAND_PORT),
            1,
            "the i8042 command port",
            Arc::new(I8042Port { dev: kbd.clone(), port: COMMAND_PORT }),
        )?;
        devices.i8042 = Some(kbd);
        if let Some(d) = cfg.debug_exit {
            devices.pio.insert(
                u64::from(d.iobase),
                u64::from(d.iosize),
                "isa-debug-exit",
                Arc::new(DebugExit::new(events_tx.clone())),
            )?;
        }
        let backends = crate::virtio::add_pci_devices(&cfg, &mut fds, &mut devices, engine.as_mut(), &ram, &log)?;
        if fds.unused() > 0 {
            log.error(&format!("{} file descriptors from the launcher were not used", fds.unused()));
        }
        let devices = Arc::new(devices);

        let mut pending = Some(first_entry);
        let boot_ram = ram.clone();
        let boot_fn = Box::new(move |vcpu: &mut dyn tessera_vcpu::Vcpu| {
            // The first boot uses what `new` loaded; a reboot loads the images again, as QEMU does.
            let entry = match pending.take() {
                Some(e) => e,
                None => boot::load_with_acpi(&boot_ram, &mut src, linux_entry, acpi)?,
            };
            entry.apply(vcpu)
        });
        let sink_channel = control.clone();
        let sink: crate::monitor::EventSink = Arc::new(move |event| {
            // A lost event means a lost channel, which the control thread reports.
            let _ = sink_channel.send(&ChildToLauncher::MonitorEvent(event), &[]);
        });
        let state =
            Arc::new(crate::monitor::VmState::new(cfg.start_paused, cfg.no_reboot, engine.power_button(), Some(sink)));
        let runloop = RunLoop {
            engine,
            io: devices.clone(),
            boot: boot_fn,
            events,
            events_tx: events_tx.clone(),
            no_reboot: cfg.no_reboot,
            no_shutdown: cfg.no_shutdown,
            state,
        };
        let serial_ids = cfg.serial.iter().map(|s| s.chardev_id.clone()).collect();
        Ok(Vm { control, devices, runloop, events_tx, log, backends, serial_ids })
    }

    /// Run the VM to its end and report it to the launcher. Returns the process exit status.
    pub fn run(mut self) -> i32 {
        for s in &self.devices.serials {
            if let Err(e) = s.start() {
                return report_fatal(&self.control, &format!("cannot start the serial threads: {e}"));
            }
        }
        if let Err(e) = self.backends.supervise(backend_reporter(&self.control, &self.log)) {
            return report_fatal(&self.control, &format!("cannot start the backend supervision threads: {e}"));
        }
        let control = self.control.clone();
        let events = self.events_tx.clone();
        let state = self.runloop.state.clone();
        let backends = self.backends.clone();
        let serials: Vec<(String, Arc<SerialPort>)> =
            self.serial_ids.iter().cloned().zip(self.devices.serials.iter().cloned()).collect();
        let log = self.log.clone();
        let spawned = std::thread::Builder::new().name("control".into()).spawn(move || loop {
            match control.recv::<LauncherToChild>() {
                Ok((LauncherToChild::Shutdown, _)) => {
                    let _ = events.send(VmEvent::LauncherShutdown);
                    return;
                }
                // A second configuration is not part of the protocol; the launcher is confused but alive.
                Ok((LauncherToChild::Configure(_), _)) => {}
                // The monitor's guest-facing commands (crate::monitor); events go out before the reply.
                Ok((LauncherToChild::Monitor { tag, command }, _)) => {
                    let result = state.handle(&command, &events);
                    let _ = control.send(&ChildToLauncher::MonitorReply { tag, result }, &[]);
                }
                Ok((LauncherToChild::VhostUserReconnect { id, socket }, fds)) => {
                    vhost_user_reconnect(&backends, &id, socket, &mut ReceivedFds::new(fds), &log)
                }
                Ok((LauncherToChild::SerialReconnect { chardev_id, channel }, fds)) => {
                    serial_reconnect(&serials, &chardev_id, channel, &mut ReceivedFds::new(fds), &log)
                }
                Err(IpcError::Closed) => {
                    let _ = events.send(VmEvent::ControlLost("the launcher closed the control channel".into()));
                    return;
                }
                Err(e) => {
                    let _ = events.send(VmEvent::ControlLost(e.to_string()));
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            return report_fatal(&self.control, &format!("cannot start the control thread: {e}"));
        }
        let control = self.control.clone();
        let mut ready_failed = false;
        let outcome = self.runloop.run(&mut || {
            ready_failed = control.send(&ChildToLauncher::Ready, &[]).is_err();
        });
        // The guest's last bytes go out before the launcher hears that the VM is over.
        self.devices.stop();
        match outcome {
            Outcome::Exit { code, reason } => match self.control.send(&ChildToLauncher::Exit { code, reason }, &[]) {
                Ok(()) => 0,
                Err(_) => 1,
            },
            Outcome::Shutdown => 0,
            Outcome::LauncherGone(why) => {
                if !ready_failed {
                    self.log.error(&format!("stopping: {why}"));
                }
                1
            }
            Outcome::Fatal(message) => report_fatal(&self.control, &message),
        }
    }
}

/// What the supervision of vhost-user backends reports: to the launcher (`BackendDisconnected`,
/// `BackendReconnected`) and to the log.
fn backend_reporter(control: &Arc<Channel>, log: &Arc<GuestLog>) -> crate::virtio::BackendReport {
    use crate::virtio::vhost_user::Event;
    let control = control.clone();
    let log = log.clone();
    Arc::new(move |id: &str, e: Event| {
        let id = id.to_string();
        match e {
            Event::Disconnected { reason } => {
                log.error(&format!("{id}: vhost-user backend disconnected ({reason}); its requests wait"));
                let _ = control.send(&ChildToLauncher::BackendDisconnected { id, reason }, &[]);
            }
            Event::Reconnected { stall, in_flight } => {
                let stall_ms = stall.as_millis() as u64;
                log.error(&format!(
                    "{id}: vhost-user backend reconnected, device restored after {stall_ms} ms \
                     ({in_flight} requests were in flight)"
                ));
                let _ = control.send(&ChildToLauncher::BackendReconnected { id, stall_ms }, &[]);
            }
            Event::RestoreFailed { reason } => {
                log.error(&format!("{id}: cannot restore the device on the new backend connection: {reason}"))
            }
        }
    })
}

/// `VhostUserReconnect`: hand the new connection (an attached stream, or a path to dial) to the device's
/// supervisor. A bad message is the launcher's mistake: logged, and the VM goes on.
fn vhost_user_reconnect(
    backends: &crate::virtio::Backends,
    id: &str,
    socket: tessera_ipc::messages::VhostUserSocket,
    fds: &mut ReceivedFds,
    log: &GuestLog,
) {
    use crate::virtio::vhost_user::Connection;
    use tessera_ipc::messages::VhostUserSocket;
    let Some(vu) = backends.vhost_user(id) else {
        log.error(&format!("VhostUserReconnect: no vhost-user device has id '{id}'"));
        return;
    };
    let conn = match socket {
        VhostUserSocket::Path(p) => Connection::Path(p),
        VhostUserSocket::Connected(i) => match fds.take(i) {
            Ok(fd) => Connection::Stream(std::os::unix::net::UnixStream::from(fd)),
            Err(e) => {
                log.error(&format!("VhostUserReconnect for '{id}': {e}"));
                return;
            }
        },
    };
    vu.reconnect_with(conn);
}

/// `SerialReconnect`: the chardev process behind `chardev_id` was restarted; the first of its UARTs whose
/// channel is down (else the first) takes the new channel.
fn serial_reconnect(
    serials: &[(String, Arc<SerialPort>)],
    chardev_id: &str,
    channel: tessera_ipc::messages::FdIndex,
    fds: &mut ReceivedFds,
    log: &GuestLog,
) {
    let mut ports = serials.iter().filter(|(id, _)| id == chardev_id).map(|(_, p)| p);
    let Some(first) = ports.clone().next() else {
        log.error(&format!("SerialReconnect: no serial port is connected to chardev '{chardev_id}'"));
        return;
    };
    let port = ports.find(|p| p.away_buffered().is_some()).unwrap_or(first);
    let fd = match fds.take(channel) {
        Ok(fd) => fd,
        Err(e) => {
            log.error(&format!("SerialReconnect for '{chardev_id}': {e}"));
            return;
        }
    };
    if let Err(e) = port.reconnect(Arc::new(Channel::from_fd(fd))) {
        log.error(&format!("SerialReconnect for '{chardev_id}': cannot start the input thread: {e}"));
    }
}

/// Tell the launcher the core cannot go on; returns the exit status for that case.
pub fn report_fatal(control: &Channel, message: &str) -> i32 {
    if control.send(&ChildToLauncher::Fatal { message: message.to_string() }, &[]).is_err() {
        // Nobody to tell: at least the terminal hears it.
        eprintln!("tessera-core: {message}");
    }
    1
}
