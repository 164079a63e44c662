//! `vhost-user-blk-pci`: the block device runs in a vhost-user backend (tessera-blk, qemu-storage-daemon);
//! the core negotiates with it, hands it guest RAM (the memfd) and the virtqueues' eventfds, and forwards the
//! device configuration space. Requests never pass through the core (vhost-user spec, "Front-end and back-end").

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{QueueConfig, VirtioDevice};
use crate::memory::GuestRam;
use crate::Error;

/// How long the core waits for a vhost-user reply.
const BACKEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Protocol features the core uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Where the backend is.
pub enum Connection {
    /// A unix socket path the backend listens on.
    Path(String),
    /// A stream already connected to it (passed by the launcher).
    Stream(UnixStream),
}

pub struct VhostUserBlk {
    name: String,
    frontend: Frontend,
    ram: Arc<GuestRam>,
    num_queues: u16,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Queues handed to the backend by the last activation.
    started: Vec<usize>,
    /// The inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), kept so a restarted backend can resume.
    inflight: Option<(VhostUserInflight, File)>,
    /// Set after a failure talking to the backend: the device stays broken until the VM ends.
    broken: Option<String>,
}

fn vu_err<'a>(name: &'a str, what: &'static str) -> impl Fn(vhost::Error) -> Error + 'a {
    move |e| Error::Config(format!("{name}: vhost-user backend: {what}: {e}"))
}

impl VhostUserBlk {
    /// Connect and negotiate: SET_OWNER, features, protocol features, queue count. `name` names the device in
    /// messages (QEMU's `-device vhost-user-blk-pci,chardev=...` prefix).
    pub fn connect(name: String, conn: Connection, num_queues: u16, ram: Arc<GuestRam>) -> Result<Self, Error> {
        if num_queues == 0 || num_queues > 64 {
            return Err(Error::Config(format!("{name}: num-queues property must be between 1 and 64")));
        }
        let stream = match conn {
            Connection::Path(p) => UnixStream::connect(&p)
                .map_err(|e| Error::Config(format!("{name}: Failed to connect to '{p}': {}", crate::strerror(&e))))?,
            Connection::Stream(s) => s,
        };
        // Every vhost-user request waits for its reply on a vCPU thread: a backend that stops answering must
        // not hang the guest for ever. After this long the request fails and the device needs a reset.
        stream
            .set_read_timeout(Some(BACKEND_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(BACKEND_TIMEOUT)))
            .map_err(|e| Error::Config(format!("{name}: vhost-user socket: {e}")))?;
        let frontend = Frontend::from_stream(stream, u64::from(num_queues));
        frontend.set_owner().map_err(vu_err(&name, "SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(vu_err(&name, "GET_FEATURES"))?;
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if backend_features & pf == 0 {
            return Err(Error::Config(format!(
                "{name}: the vhost-user backend lacks VHOST_USER_F_PROTOCOL_FEATURES, which vhost-user-blk needs"
            )));
        }
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::Config(format!("{name}: the vhost-user backend does not offer VIRTIO_F_VERSION_1")));
        }
        // Protocol features are negotiated right after GET_FEATURES, before any SET_FEATURES, as QEMU does
        // (libvhost-user drops a front end that sets features first).
        let mut frontend = frontend;
        let offered = frontend.get_protocol_features().map_err(vu_err(&name, "GET_PROTOCOL_FEATURES"))?;
        let protocol = offered & wanted_protocol_features();
        frontend.set_protocol_features(protocol).map_err(vu_err(&name, "SET_PROTOCOL_FEATURES"))?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            // QEMU hw/block/vhost-user-blk.c.
            return Err(Error::Config(format!("{name}: VHOST_USER_PROTOCOL_F_CONFIG not supported")));
        }
        let max_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(vu_err(&name, "GET_QUEUE_NUM"))?
        } else {
            1
        };
        if u64::from(num_queues) > max_queues {
            // QEMU's wording.
            return Err(Error::Config(format!(
                "{name}: The maximum number of queues supported by the backend is {max_queues}"
            )));
        }
        let mut d = VhostUserBlk {
            name,
            frontend,
            ram,
            num_queues,
            backend_features,
            protocol,
            started: Vec::new(),
            inflight: None,
            broken: None,
        };
        // Read the configuration once now so that a backend that cannot answer is refused at start.
        d.fetch_config()?;
        Ok(d)
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    fn fetch_config(&mut self) -> Result<[u8; CONFIG_LEN], Error> {
        let buf = [0u8; CONFIG_LEN];
        let (_, payload) = self
            .frontend
            .get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::empty(), &buf)
            .map_err(vu_err(&self.name, "GET_CONFIG"))?;
        let mut out = [0u8; CONFIG_LEN];
        let n = payload.len().min(CONFIG_LEN);
        out[..n].copy_from_slice(&payload[..n]);
        // The guest sees the queue count of this device, not the backend's maximum (as QEMU does).
        out[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&self.num_queues.to_le_bytes());
        Ok(out)
    }

    fn host_addr(&self, gpa: u64, len: u64, what: &str) -> Result<u64, String> {
        let mem = self.ram.memory();
        let ok = mem.check_range(GuestAddress(gpa), len as usize);
        match mem.get_host_address(GuestAddress(gpa)) {
            Ok(p) if ok => Ok(p as u64),
            _ => Err(format!("the {what} at {gpa:#x} (+{len:#x}) is not in guest RAM")),
        }
    }

    fn start(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), String> {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        // The backend keeps VHOST_USER_F_PROTOCOL_FEATURES only if it is set again with the guest's features.
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend.set_features(features | pf).map_err(e("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .ram
            .host_regions()
            .into_iter()
            .map(|(r, host)| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host,
                mmap_offset: r.file_offset,
                mmap_handle: self.ram.memfd().as_raw_fd(),
            })
            .collect();
        self.frontend.set_mem_table(&regions).map_err(e("SET_MEM_TABLE"))?;
        if self.protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            if self.inflight.is_none() {
                let req = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.num_queues,
                    queue_size: QUEUE_SIZE,
                };
                let got = self.frontend.get_inflight_fd(&req).map_err(e("GET_INFLIGHT_FD"))?;
                self.inflight = Some(got);
            }
            if let Some((info, file)) = &self.inflight {
                self.frontend.set_inflight_fd(info, file.as_raw_fd()).map_err(e("SET_INFLIGHT_FD"))?;
            }
        }
        for q in queues {
            let n = u64::from(q.size);
            // Split virtqueue part sizes (virtio 1.2 §2.7): 16-byte descriptors, 6 + 2n avail, 6 + 8n used.
            let desc = self.host_addr(q.desc, 16 * n, "descriptor table")?;
            let avail = self.host_addr(q.driver, 6 + 2 * n, "available ring")?;
            let used = self.host_addr(q.device, 6 + 8 * n, "used ring")?;
            self.frontend.set_vring_num(q.index, q.size).map_err(e("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            };
            self.frontend.set_vring_addr(q.index, &cfg).map_err(e("SET_VRING_ADDR"))?;
            self.frontend.set_vring_base(q.index, 0).map_err(e("SET_VRING_BASE"))?;
            self.frontend.set_vring_call(q.index, &q.call).map_err(e("SET_VRING_CALL"))?;
            self.frontend.set_vring_kick(q.index, &q.kick).map_err(e("SET_VRING_KICK"))?;
            // With VHOST_USER_F_PROTOCOL_FEATURES rings start disabled (vhost-user spec, "Ring states").
            self.frontend.set_vring_enable(q.index, true).map_err(e("SET_VRING_ENABLE"))?;
            self.started.push(q.index);
        }
        Ok(())
    }

    /// Stop the started rings: GET_VRING_BASE stops a ring (vhost-user spec, "Ring states").
    fn stop(&mut self) {
        for q in std::mem::take(&mut self.started) {
            let _ = self.frontend.set_vring_enable(q, false);
            if let Err(err) = self.frontend.get_vring_base(q) {
                self.broken = Some(format!("GET_VRING_BASE: {err}"));
            }
        }
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
        let mask = FORWARDED.iter().fold(0u64, |m, &b| m | 1 << b);
        let mut f = self.backend_features & mask;
        if self.num_queues == 1 {
            f &= !(1 << VIRTIO_BLK_F_MQ);
        }
        f
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        // Forwarded on every read, so the guest sees a resized disk (GET_CONFIG from offset 0: libvhost-user
        // ignores the offset field).
        let cfg = if self.broken.is_some() { Err(()) } else { self.fetch_config().map_err(|_| ()) };
        let off = offset as usize;
        data.fill(0);
        if let Ok(c) = cfg {
            if off < CONFIG_LEN {
                let n = data.len().min(CONFIG_LEN - off);
                data[..n].copy_from_slice(&c[off..off + n]);
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` (offset 32) is writable in virtio-blk's configuration.
        if offset as usize + data.len() <= CONFIG_LEN && self.broken.is_none() {
            if let Err(e) = self.frontend.set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data) {
                self.broken = Some(format!("SET_CONFIG: {e}"));
            }
        }
    }

    fn activate(&mut self, features: u64, queues: Vec<QueueConfig>) -> Result<(), String> {
        if let Some(b) = &self.broken {
            return Err(format!("the vhost-user backend failed earlier ({b})"));
        }
        if queues.is_empty() {
            return Err("no virtqueue was enabled".into());
        }
        let r = self.start(features, &queues);
        if r.is_err() {
            self.stop();
        }
        r
    }

    fn reset(&mut self) {
        self.stop();
    }
}
