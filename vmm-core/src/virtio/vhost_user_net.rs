//! `virtio-net-pci` over vhost-user: the network device runs in a backend (tessera-net, or one the user started
//! with `-netdev vhost-user`). vhost-user-net backends do not serve the device configuration (QEMU keeps its own),
//! so the core builds it from the command line: `mac`, `status` (link up), `max_virtqueue_pairs` (virtio 1.2
//! §5.1.4). The feature bits are the backend's, limited to those a vhost-user-net front end may pass on (QEMU
//! hw/net/vhost_net.c `user_feature_bits`) and a split-ring, no-IOMMU transport can carry, plus `MAC` and
//! `STATUS`, which are the core's.
//!
//! One queue pair, no control queue: `VIRTIO_NET_F_MQ` needs `VIRTIO_NET_F_CTRL_VQ` (§5.1.3.1), whose commands
//! (receive mode, MAC filter, announce, queue pair count) the front end would have to serve; that is not here
//! yet, so neither is offered. Without `CTRL_VQ` the driver runs in promiscuous-equivalent mode, which is what
//! tessera-net delivers anyway.

use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::vhost_user::{Connection, DeviceSpec, VhostUser};
use super::{QueueConfig, VirtioDevice};
use crate::memory::GuestRam;
use crate::Error;

/// virtio device ID of a network card (virtio 1.2 §5).
const DEVICE_TYPE: u16 = 1;
/// QEMU's default `rx_queue_size`/`tx_queue_size` for virtio-net.
pub const QUEUE_SIZE: u16 = 256;
/// `mac`, `status`, `max_virtqueue_pairs`, `mtu` of `struct virtio_net_config`; `mtu` stays 0 since
/// `VIRTIO_NET_F_MTU` is not offered (the core does not know the backend's MTU).
const CONFIG_LEN: usize = 12;

/// Feature bits passed from the backend to the guest.
const FORWARDED: &[u32] = &[
    VIRTIO_F_NOTIFY_ON_EMPTY,
    VIRTIO_F_ANY_LAYOUT,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GSO,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
];

/// Feature bits the core itself provides: the MAC and the link status come from its configuration space.
const OWN: u64 = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);

pub struct VhostUserNet {
    vu: VhostUser,
    config: [u8; CONFIG_LEN],
}

impl VhostUserNet {
    /// Connect and negotiate (see [`VhostUser::connect`]): one RX and one TX queue.
    pub fn connect(name: String, conn: Connection, mac: [u8; 6], ram: Arc<GuestRam>) -> Result<Self, Error> {
        let spec = DeviceSpec {
            num_queues: 2,
            queue_size: QUEUE_SIZE,
            forwarded: FORWARDED,
            wanted_protocol: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            required_protocol: &[],
        };
        let vu = VhostUser::connect(name, conn, spec, ram)?;
        Ok(VhostUserNet { vu, config: config_space(mac, 1) })
    }

    /// The shared connection (for supervision: disconnect reports and reconnects).
    pub fn vhost_user(&self) -> &VhostUser {
        &self.vu
    }
}

/// `struct virtio_net_config` (virtio 1.2 §5.1.4), little-endian: the link is always up.
fn config_space(mac: [u8; 6], queue_pairs: u16) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    c[0..6].copy_from_slice(&mac);
    c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
    c
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // receiveq1, transmitq1 (§5.1.2).
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        self.vu.forwarded_features() | OWN
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let off = offset as usize;
        if off < CONFIG_LEN {
            let n = data.len().min(CONFIG_LEN - off);
            data[..n].copy_from_slice(&self.config[off..off + n]);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The driver must not write virtio-net's configuration (§5.1.4: all fields are read-only for it without
        // VIRTIO_NET_F_CTRL_MAC_ADDR's legacy path); writes are ignored, as QEMU does for modern devices.
    }

    fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
        // The backend is told only bits it offered: MAC and STATUS may be the core's alone.
        self.vu.activate(features & self.vu.backend_features(), &queues)
    }

    fn reset(&mut self) {
        self.vu.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_space([0x52, 0x54, 0, 0x12, 0x34, 0x56], 1);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn no_multiqueue_without_a_control_queue() {
        let forwarded = FORWARDED.iter().fold(0u64, |m, &b| m | 1 << b);
        for b in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MTU, VIRTIO_NET_F_GUEST_ANNOUNCE] {
            assert_eq!(forwarded & (1 << b), 0, "bit {b}");
        }
    }
}
