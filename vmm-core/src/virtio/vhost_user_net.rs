//! `virtio-net-pci` over vhost-user: the network device runs in a backend (tessera-net, or one the user started
//! with `-netdev vhost-user`). vhost-user-net backends do not serve the device configuration (QEMU keeps its own),
//! so the core builds it from the command line: `mac`, `status` (link up), `max_virtqueue_pairs` (virtio 1.2
//! §5.1.4). The feature bits are the backend's, limited to those a vhost-user-net front end may pass on (QEMU
//! hw/net/vhost_net.c `user_feature_bits`) and a split-ring, no-IOMMU transport can carry, plus `MAC` and
//! `STATUS`, which are the core's.
//!
//! Multiqueue: `VIRTIO_NET_F_MQ` needs `VIRTIO_NET_F_CTRL_VQ` (§5.1.3.1). With more than one queue pair the core
//! offers both and serves the control queue itself ([`CtrlQueue`], a thread that waits on the queue's kick): the
//! only command class it has is `VIRTIO_NET_CTRL_MQ` (`VQ_PAIRS_SET`, §5.1.6.5.5), since none of the features
//! that bring the others (`CTRL_RX`, `CTRL_MAC_ADDR`, `CTRL_VLAN`, `GUEST_ANNOUNCE`, `CTRL_GUEST_OFFLOADS`) is
//! offered; anything else is answered `VIRTIO_NET_ERR`. Multiqueue is offered only on a tessera-net the launcher
//! started: it delivers every received frame on receiveq1, which any pair count includes, so no ring needs
//! disabling when the driver sets fewer pairs. With one pair neither `MQ` nor `CTRL_VQ` is offered, and the
//! driver runs without a control queue (no receive filtering: tessera-net filters nothing anyway).

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::{Connection, DeviceSpec, VhostUser};
use super::{QueueConfig, VirtioDevice};
use crate::memory::GuestRam;
use crate::Error;

/// virtio device ID of a network card (virtio 1.2 §5).
const DEVICE_TYPE: u16 = 1;
/// QEMU's default `rx_queue_size`/`tx_queue_size` for virtio-net.
pub const QUEUE_SIZE: u16 = 256;
/// QEMU's control queue size.
const CTRL_QUEUE_SIZE: u16 = 64;
/// Largest control command the core reads (class, command, data); `VQ_PAIRS_SET` is 4 bytes.
const CTRL_MAX_LEN: usize = 4096;
/// Control command classes and acks (§5.1.6.5).
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
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
    name: String,
    vu: VhostUser,
    config: [u8; CONFIG_LEN],
    queue_pairs: u16,
    ram: Arc<GuestRam>,
    ctrl: Option<CtrlQueue>,
}

impl VhostUserNet {
    /// Connect and negotiate (see [`VhostUser::connect`]): an RX and a TX queue per pair, all served by the
    /// backend.
    pub fn connect(
        name: String,
        conn: Connection,
        mac: [u8; 6],
        queue_pairs: u16,
        ram: Arc<GuestRam>,
    ) -> Result<Self, Error> {
        // virtio 1.2 §5.1.4: max_virtqueue_pairs is 1..=0x8000; the PCI transport has 64 queues at most.
        if queue_pairs == 0 || 2 * u32::from(queue_pairs) + 1 > 64 {
            return Err(Error::Config(format!("{name}: {queue_pairs} queue pairs is not supported (1-31)")));
        }
        let spec = DeviceSpec {
            num_queues: 2 * queue_pairs,
            queue_size: QUEUE_SIZE,
            forwarded: FORWARDED,
            wanted_protocol: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            required_protocol: &[],
        };
        let vu = VhostUser::connect(name.clone(), conn, spec, ram.clone())?;
        Ok(VhostUserNet { name, vu, config: config_space(mac, queue_pairs), queue_pairs, ram, ctrl: None })
    }

    /// The features the core adds to the backend's.
    fn own_features(&self) -> u64 {
        if self.queue_pairs > 1 {
            OWN | (1 << VIRTIO_NET_F_CTRL_VQ) | (1 << VIRTIO_NET_F_MQ)
        } else {
            OWN
        }
    }

    fn stop_ctrl(&mut self) {
        if let Some(c) = self.ctrl.take() {
            c.stop();
        }
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
        // receiveq1, transmitq1, ..., receiveqN, transmitqN, then controlq with MQ (§5.1.2).
        let mut sizes = vec![QUEUE_SIZE; 2 * usize::from(self.queue_pairs)];
        if self.queue_pairs > 1 {
            sizes.push(CTRL_QUEUE_SIZE);
        }
        sizes
    }

    fn features(&self) -> u64 {
        self.vu.forwarded_features() | self.own_features()
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
        self.stop_ctrl();
        let data_queues = 2 * usize::from(self.queue_pairs);
        let (backend, own): (Vec<QueueConfig>, Vec<QueueConfig>) =
            queues.into_iter().partition(|q| q.index < data_queues);
        if features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
            if let Some(q) = own.into_iter().find(|q| q.index == data_queues) {
                let mq = features & (1 << VIRTIO_NET_F_MQ) != 0;
                let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                let max_pairs = if mq { self.queue_pairs } else { 1 };
                self.ctrl = Some(CtrlQueue::start(&self.name, q, event_idx, max_pairs, self.ram.clone())?);
            }
        }
        // The backend is told only bits it offered: MAC, STATUS, CTRL_VQ and MQ may be the core's alone.
        let r = self.vu.activate(features & self.vu.backend_features(), &backend);
        if r.is_err() {
            self.stop_ctrl();
        }
        r
    }

    fn reset(&mut self) {
        self.stop_ctrl();
        self.vu.reset();
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        self.stop_ctrl();
    }
}

/// The control virtqueue, served by the core on a thread of its own that waits for the queue's kick.
struct CtrlQueue {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CtrlQueue {
    fn start(name: &str, q: QueueConfig, event_idx: bool, max_pairs: u16, ram: Arc<GuestRam>) -> Result<Self, String> {
        let mut queue = Queue::new(CTRL_QUEUE_SIZE).map_err(|e| format!("control queue: {e}"))?;
        queue.set_size(q.size);
        queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(q.driver as u32), Some((q.driver >> 32) as u32));
        queue.set_used_ring_address(Some(q.device as u32), Some((q.device >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(ram.memory()) {
            return Err(format!("the control queue (size {}) is not in guest RAM", q.size));
        }
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name} ctrl"))
            .spawn(move || ctrl_loop(queue, &q, &thread_stop, max_pairs, &ram))
            .map_err(|e| format!("control queue thread: {e}"))?;
        Ok(CtrlQueue { stop, thread: Some(thread) })
    }

    fn stop(mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wait for kicks (or the stop event) and answer the commands made available.
fn ctrl_loop(mut queue: Queue, q: &QueueConfig, stop: &EventFd, max_pairs: u16, ram: &GuestRam) {
    loop {
        let mut fds = [
            libc::pollfd { fd: q.kick.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let _ = q.kick.read();
        if process_ctrl(&mut queue, ram.memory(), max_pairs) {
            let _ = q.call.write(1);
        }
    }
}

/// Answer every command made available; returns whether the driver wants an interrupt. Every byte is the
/// guest's: a malformed chain gets `VIRTIO_NET_ERR` (or nothing, without a writable byte), never a panic.
fn process_ctrl<M: GuestMemory>(queue: &mut Queue, mem: &M, max_pairs: u16) -> bool {
    let mut answered = false;
    loop {
        let _ = queue.disable_notification(mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut cmd = Vec::new();
            let mut ack: Option<GuestAddress> = None;
            let mut well_formed = true;
            for d in chain {
                if d.is_write_only() {
                    // The ack byte is the first device-writable byte (§5.1.6.5).
                    if ack.is_none() && d.len() > 0 {
                        ack = Some(d.addr());
                    }
                } else if ack.is_some() || cmd.len() + d.len() as usize > CTRL_MAX_LEN {
                    // Readable after writable, or larger than any command we know.
                    well_formed = false;
                } else {
                    let start = cmd.len();
                    cmd.resize(start + d.len() as usize, 0);
                    if mem.read_slice(&mut cmd[start..], d.addr()).is_err() {
                        well_formed = false;
                    }
                }
            }
            let status = if well_formed { ctrl_command(&cmd, max_pairs) } else { CTRL_ERR };
            let written = ack.is_some_and(|a| mem.write_obj(status, a).is_ok());
            let _ = queue.add_used(mem, head, u32::from(written));
            answered = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    answered && queue.needs_notification(mem).unwrap_or(true)
}

/// One control command (`class`, `command`, data): `VIRTIO_NET_OK` or `VIRTIO_NET_ERR`.
fn ctrl_command(cmd: &[u8], max_pairs: u16) -> u8 {
    match cmd {
        [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi] => {
            // §5.1.6.5.5: 1 ..= max_virtqueue_pairs. The backend keeps every ring: tessera-net delivers on
            // receiveq1 only, so no frame lands beyond the pairs set.
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if (1..=max_pairs).contains(&pairs) {
                CTRL_OK
            } else {
                CTRL_ERR
            }
        }
        _ => CTRL_ERR,
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
    fn control_commands() {
        assert_eq!(ctrl_command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0], 2), CTRL_OK);
        assert_eq!(ctrl_command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0], 2), CTRL_OK);
        assert_eq!(ctrl_command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 3, 0], 2), CTRL_ERR);
        assert_eq!(ctrl_command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 0, 0], 2), CTRL_ERR);
        assert_eq!(ctrl_command(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2], 2), CTRL_ERR);
        // Receive mode (class 0) and others: not offered, so refused.
        assert_eq!(ctrl_command(&[0, 0, 1], 2), CTRL_ERR);
        assert_eq!(ctrl_command(&[], 2), CTRL_ERR);
    }

    /// A control queue of 4 entries in 64 KiB of guest memory: descriptors at 0, avail at 0x100, used at
    /// 0x200, buffers from 0x1000.
    fn ctrl_ring(chains: &[&[(u64, u32, bool)]]) -> (vm_memory::GuestMemoryMmap, Queue) {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut i = 0u16;
        let mut heads = Vec::new();
        for chain in chains {
            heads.push(i);
            for (n, &(addr, len, writable)) in chain.iter().enumerate() {
                let last = n + 1 == chain.len();
                let flags: u16 = if last { 0 } else { 1 } | if writable { 2 } else { 0 };
                let d = 16 * u64::from(i);
                mem.write_obj(addr, GuestAddress(d)).unwrap();
                mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                mem.write_obj(i + 1, GuestAddress(d + 14)).unwrap();
                i += 1;
            }
        }
        for (n, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(0x104 + 2 * n as u64)).unwrap();
        }
        mem.write_obj(heads.len() as u16, GuestAddress(0x102)).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(0x100), Some(0));
        q.set_used_ring_address(Some(0x200), Some(0));
        q.set_ready(true);
        (mem, q)
    }

    #[test]
    fn control_queue_answers_and_survives_bad_chains() {
        // 1: VQ_PAIRS_SET 2, split header/data/ack. 2: VQ_PAIRS_SET 5 (too many). 3: readable after writable.
        // 4: no writable byte at all. 5: a 64 KiB command.
        let (mem, mut q) = ctrl_ring(&[
            &[(0x1000, 2, false), (0x1002, 2, false), (0x1100, 1, true)],
            &[(0x2000, 4, false), (0x2100, 1, true)],
            &[(0x3100, 1, true), (0x3000, 4, false)],
            &[(0x4000, 4, false)],
            &[(0x0, 0x10000, false), (0x5100, 1, true)],
        ]);
        mem.write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 5, 0], GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0], GuestAddress(0x3000)).unwrap();
        for a in [0x1100u64, 0x2100, 0x3100, 0x5100] {
            mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
        }
        assert!(process_ctrl(&mut q, &mem, 2));
        let ack = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!([ack(0x1100), ack(0x2100), ack(0x3100), ack(0x5100)], [CTRL_OK, CTRL_ERR, CTRL_ERR, CTRL_ERR]);
        // Every chain was returned, with 1 byte written where there was a byte to write.
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x202)).unwrap(), 5);
        let used_len = |n: u64| mem.read_obj::<u32>(GuestAddress(0x204 + 8 * n + 4)).unwrap();
        assert_eq!([used_len(0), used_len(1), used_len(2), used_len(3), used_len(4)], [1, 1, 1, 0, 1]);
        // Nothing more to do.
        assert!(!process_ctrl(&mut q, &mem, 2));
    }

    #[test]
    fn no_multiqueue_without_a_control_queue() {
        let forwarded = FORWARDED.iter().fold(0u64, |m, &b| m | 1 << b);
        for b in [VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MTU, VIRTIO_NET_F_GUEST_ANNOUNCE] {
            assert_eq!(forwarded & (1 << b), 0, "bit {b}");
        }
    }
}
