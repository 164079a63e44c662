//! `vhost-user-blk-pci`: the block device runs in a vhost-user backend (tessera-blk, qemu-storage-daemon). This
//! file holds what is block-specific: the feature bits forwarded to the guest, the configuration space (forwarded
//! with GET_CONFIG, `num_queues` patched) and the queue count. The connection itself is [`super::vhost_user`].

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::vhost_user::{Connection, DeviceSpec, VhostUser};
use super::{QueueConfig, VirtioDevice};
use crate::memory::GuestRam;
use crate::Error;
use std::sync::Arc;

/// QEMU's default `queue-size` for vhost-user-blk.
pub const QUEUE_SIZE: u16 = 128;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding (virtio 1.2 §5.2.4), the size
/// QEMU 7.2 asks backends for.
const CONFIG_LEN: usize = 60;
/// Offset of `num_queues` in it.
const CONFIG_NUM_QUEUES: usize = 34;

/// Feature bits the core passes from the backend to the guest: the block features QEMU's vhost-user-blk
/// forwards (hw/block/vhost-user-blk.c `user_feature_bits`) that a split-ring, no-IOMMU transport can carry.
const FORWARDED: &[u32] = &[
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
];

/// `CONFIG` is required (QEMU hw/block/vhost-user-blk.c's message).
const REQUIRED: &[(VhostUserProtocolFeatures, &str)] =
    &[(VhostUserProtocolFeatures::CONFIG, "VHOST_USER_PROTOCOL_F_CONFIG not supported")];

pub struct VhostUserBlk {
    vu: VhostUser,
    num_queues: u16,
    /// The last configuration the backend gave: what the guest reads while the backend is away.
    last_config: Vec<u8>,
}

impl VhostUserBlk {
    /// Connect and negotiate (see [`VhostUser::connect`]), then read the configuration once so that a backend
    /// that cannot answer is refused at start.
    pub fn connect(name: String, conn: Connection, num_queues: u16, ram: Arc<GuestRam>) -> Result<Self, Error> {
        if num_queues == 0 || num_queues > 64 {
            return Err(Error::Config(format!("{name}: num-queues property must be between 1 and 64")));
        }
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // For VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: a resized disk interrupts the guest.
            | VhostUserProtocolFeatures::BACKEND_REQ;
        let spec = DeviceSpec {
            num_queues,
            queue_size: QUEUE_SIZE,
            forwarded: FORWARDED,
            wanted_protocol: wanted,
            required_protocol: REQUIRED,
        };
        let vu = VhostUser::connect(name.clone(), conn, spec, ram)?;
        let mut d = VhostUserBlk { vu, num_queues, last_config: Vec::new() };
        d.last_config = d.fetch_config().map_err(|e| Error::Config(format!("{name}: vhost-user backend: {e}")))?;
        Ok(d)
    }

    /// The shared connection (for supervision: disconnect reports and reconnects).
    pub fn vhost_user(&self) -> &VhostUser {
        &self.vu
    }

    fn fetch_config(&self) -> Result<Vec<u8>, String> {
        let mut out = self.vu.get_config(CONFIG_LEN)?;
        // The guest sees the queue count of this device, not the backend's maximum (as QEMU does).
        out[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&self.num_queues.to_le_bytes());
        Ok(out)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u16 {
        2
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.num_queues)]
    }

    fn features(&self) -> u64 {
        let mut f = self.vu.forwarded_features();
        if self.num_queues == 1 {
            f &= !(1 << VIRTIO_BLK_F_MQ);
        }
        f
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        // Forwarded on every read, so the guest sees a resized disk; while the backend is away (restarting), the
        // last configuration it gave.
        if let Ok(c) = self.fetch_config() {
            self.last_config = c;
        }
        let off = offset as usize;
        data.fill(0);
        if off < self.last_config.len() {
            let n = data.len().min(self.last_config.len() - off);
            data[..n].copy_from_slice(&self.last_config[off..off + n]);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` (offset 32) is writable in virtio-blk's configuration.
        if offset as usize + data.len() <= CONFIG_LEN {
            self.vu.set_config(offset as u32, data);
        }
    }

    fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
        self.vu.activate(features, &queues)
    }

    fn reset(&mut self) {
        self.vu.reset();
    }

    fn set_config_notifier(&mut self, notify: super::ConfigNotifier) {
        self.vu.set_config_notifier(notify);
    }
}
