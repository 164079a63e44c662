//! virtio 1.x devices: the modern PCI transport ([`pci`], virtio 1.2 §4.1) and the device halves that plug into
//! it ([`vhost_user_blk`]: the device runs in a vhost-user backend process; the core only sets it up through the
//! device-neutral front end in [`vhost_user`]).

pub mod pci;
pub mod vhost_user;
pub mod vhost_user_blk;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// One virtqueue as the driver set it up (guest-physical ring addresses), with its doorbell and interrupt
/// eventfds.
#[derive(Clone)]
pub struct QueueConfig {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub kick: Arc<EventFd>,
    pub call: Arc<EventFd>,
}

/// The device side of a virtio device, as the transport sees it.
pub trait VirtioDevice: Send {
    /// virtio device ID (virtio 1.2 §5): 2 for block.
    fn device_type(&self) -> u16;
    /// One entry per virtqueue: its largest size.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start serving `queues` (only the enabled ones) with the negotiated `features`.
    fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String>;
    /// The driver reset the device (status 0) or the guest rebooted: stop serving.
    fn reset(&mut self);
    /// The transport's configuration-change notification (virtio 1.2 §4.1.5.3: config_generation moves on and the
    /// configuration vector fires). A device whose configuration can change under the driver keeps it.
    fn set_config_notifier(&mut self, _notify: ConfigNotifier) {}
}

/// Called by a device when its configuration changed.
pub type ConfigNotifier = Arc<dyn Fn() + Send + Sync>;

/// QEMU's message (hw/virtio/vhost-user.c) when guest RAM cannot be passed to a vhost-user backend.
pub const NEEDS_SHARED_RAM: &str =
    "Failed initializing vhost-user memory map, consider using -object memory-backend-file share=on";

/// Receives the device id and each event of [`Backends::supervise`].
pub type BackendReport = Arc<dyn Fn(&str, vhost_user::Event) + Send + Sync>;

/// The vhost-user connections of the machine's devices, by device `id` (for backend supervision: disconnect
/// reports, reconnects, `x-tessera-backend-swap`).
#[derive(Clone, Default)]
pub struct Backends {
    pub vhost_user: Vec<(String, vhost_user::VhostUser)>,
}

impl Backends {
    pub fn vhost_user(&self, id: &str) -> Option<&vhost_user::VhostUser> {
        self.vhost_user.iter().find(|(i, _)| i == id).map(|(_, v)| v)
    }

    /// Start supervising every backend (see [`vhost_user::VhostUser::supervise`]); `report` gets the device id
    /// with each event.
    pub fn supervise(&self, report: BackendReport) -> std::io::Result<()> {
        for (id, vu) in &self.vhost_user {
            let id = id.clone();
            let report = report.clone();
            vu.supervise(Arc::new(move |e| report(&id, e)))?;
        }
        Ok(())
    }
}

/// Put PCI bus 0 on the machine (host bridge, config mechanism #1) and the configured vhost-user-blk devices on
/// it, connecting to their backends. Backends are connected before the guest runs, so a missing or
/// incompatible backend is reported at start (as QEMU does at `-device` realize).
pub fn add_pci_devices(
    cfg: &tessera_ipc::messages::CoreConfig,
    fds: &mut tessera_ipc::ReceivedFds,
    devices: &mut crate::devices::Devices,
    engine: &mut dyn crate::runloop::Engine,
    ram: &Arc<crate::memory::GuestRam>,
    log: &Arc<crate::guestlog::GuestLog>,
) -> Result<Backends, crate::Error> {
    use crate::pci::{BarAllocator, ConfigAddressPort, ConfigDataPort, MmioWindow, PciRoot};
    use tessera_ipc::messages::VhostUserSocket;

    let mut root = PciRoot::new();
    let mut backends = Backends::default();
    if !cfg.vhost_user_blk.is_empty() {
        let router = engine.msi_router()?;
        let mut bars = BarAllocator::new(MmioWindow::for_layout(ram.layout()));
        for d in &cfg.vhost_user_blk {
            // RAM the backend maps must be shared: without share=on a backend would see a copy the guest never
            // writes (MAP_PRIVATE), so this is refused before anything starts.
            if !cfg.ram.shared {
                return Err(crate::Error::Config(format!("{}: {NEEDS_SHARED_RAM}", d.origin)));
            }
            let conn = match &d.socket {
                VhostUserSocket::Path(p) => vhost_user::Connection::Path(p.clone()),
                VhostUserSocket::Connected(i) => {
                    vhost_user::Connection::Stream(std::os::unix::net::UnixStream::from(fds.take(*i)?))
                }
            };
            let nq = d.num_queues.unwrap_or(cfg.smp.clamp(1, 64) as u16);
            let dev = vhost_user_blk::VhostUserBlk::connect(d.origin.clone(), conn, nq, ram.clone())?;
            backends.vhost_user.push((d.id.clone(), dev.vhost_user().clone()));
            let bar = bars.alloc(pci::BAR_SIZE, &d.origin)?;
            let slot = match d.slot {
                Some(s) => s,
                None => {
                    root.free_slot().ok_or_else(|| crate::Error::Config(format!("{}: PCI bus 0 is full", d.origin)))?
                }
            };
            let f = pci::VirtioPci::new(d.id.clone(), Box::new(dev), bar, router.clone(), log.clone())?;
            root.add(slot, f)?;
        }
    }
    let root = Arc::new(root);
    // Only the dword at 0xcf8 is the address register (0xcf9 is the chipset's reset control).
    devices.pio.insert(
        0xcf8,
        1,
        "the PCI configuration address register",
        Arc::new(ConfigAddressPort(root.clone())),
    )?;
    devices.pio.insert(0xcfc, 4, "the PCI configuration data window", Arc::new(ConfigDataPort(root.clone())))?;
    devices.pci = Some(root);
    Ok(backends)
}
