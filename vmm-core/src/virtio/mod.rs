//! virtio 1.x devices: the modern PCI transport ([`pci`], virtio 1.2 §4.1) and the device halves that plug into
//! it ([`vhost_user_blk`]: the device runs in a vhost-user backend process; the core only sets it up).

pub mod pci;
pub mod vhost_user_blk;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// One virtqueue as the driver set it up (guest-physical ring addresses), with its doorbell and interrupt
/// eventfds.
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
}
