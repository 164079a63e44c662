//! The vhost-user adapter: feeds descriptor chains from the rings rust-vmm's vhost-user-backend
//! manages into [`crate::request::process_request`]. No block logic lives here.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::image::BlockIo;
use crate::request::{process_queue, DiskProps, SECTOR_SIZE};
use crate::{Error, Result};

/// Largest single data segment we advertise (`size_max`).
const SIZE_MAX: u32 = 1 << 20;

/// The device as it outlives any one vhost-user connection: the open image and its properties.
pub struct BlkDevice {
    pub disk: Arc<dyn BlockIo>,
    pub props: DiskProps,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl BlkDevice {
    /// virtio-blk feature bits (virtio 1.2 §5.2.3) plus the generic ones we support.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.props.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// `struct virtio_blk_config` (§5.2.4) up to `unused1`, little-endian.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let capacity = self.disk.size() / SECTOR_SIZE;
        let l = &self.props.limits;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        // Two descriptors of every chain carry the header and the status byte.
        let seg_max = u32::from(self.queue_size).saturating_sub(2).max(1);
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&l.max_discard_sectors.to_le_bytes());
        c[40..44].copy_from_slice(&l.max_discard_seg.to_le_bytes());
        // discard_sector_alignment: hole punching works in file system blocks.
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&l.max_write_zeroes_sectors.to_le_bytes());
        c[52..56].copy_from_slice(&l.max_write_zeroes_seg.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One connection's backend. A fresh one is made per connection so that the worker threads and
/// their exit events of a finished connection go away with it.
pub struct VhostBlk {
    dev: Arc<BlkDevice>,
    config: Vec<u8>,
    mem: RwLock<Option<Mem>>,
    event_idx: std::sync::atomic::AtomicBool,
}

impl VhostBlk {
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        let config = dev.config_space();
        VhostBlk { dev, config, mem: RwLock::new(None), event_idx: std::sync::atomic::AtomicBool::new(false) }
    }

    /// Executes every available chain, then notifies the driver if it asked for it.
    fn process_vring(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().ok().and_then(|m| m.clone()) else {
            return Ok(());
        };
        let mem = atomic.memory();
        // The vring lock is held for the whole batch: only this queue's worker thread processes
        // it, and a GET_VRING_BASE from the front end then waits for in-flight requests.
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let needs_notification = match process_queue(queue, &mem, self.dev.disk.as_ref(), &self.dev.props)
        {
            Ok(0) => false,
            Ok(_) => queue.needs_notification(&*mem).unwrap_or(true),
            Err(e) => {
                crate::ratelimit::guest_error(format_args!("queue unusable: {e}"));
                false
            }
        };
        if needs_notification {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VhostUserBackend for VhostBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // INFLIGHT_SHMFD is not offered: vhost-user-backend 0.24 answers GET/SET_INFLIGHT_FD
        // with an error and gives backends no hook to serve them (see docs/blk.md).
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The front end asks for the config size it computed from our features; answer with
        // exactly `size` bytes, zero beyond what we define.
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(self.config.len());
        let end = (offset as usize).saturating_add(size as usize).min(self.config.len());
        out[..end - start].copy_from_slice(&self.config[start..end]);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Only `wce` is writable in virtio-blk, and we do not offer CONFIG_WCE.
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "virtio-blk config space is read-only in tessera-blk"))
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        if let Ok(mut m) = self.mem.write() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: queues are independent, so multiqueue scales with cores.
        (0..self.dev.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Called once per worker thread when the connection's handler is built.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on queue event {device_event}");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        if self.event_idx.load(std::sync::atomic::Ordering::Relaxed) {
            // Re-check after re-enabling notifications, or a chain made available in between
            // would wait for the next kick (virtio 1.2 §2.7.10).
            loop {
                let _ = vring.disable_notification();
                self.process_vring(vring)?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.process_vring(vring)?;
        }
        Ok(())
    }
}

/// Serves `dev` on the vhost-user socket at `path`, one front end at a time, forever: when a
/// front end disconnects (or sends something malformed) the connection is dropped, the disk is
/// flushed, and the socket is served again. Returns only if the socket cannot be listened on.
pub fn serve(path: &Path, dev: Arc<BlkDevice>) -> Result<()> {
    loop {
        serve_one(path, dev.clone())?;
    }
}

/// Serves one connection on `path`; Ok when it ended (cleanly or not), Err if we cannot listen.
pub fn serve_one(path: &Path, dev: Arc<BlkDevice>) -> Result<()> {
    let backend = Arc::new(VhostBlk::new(dev.clone()));
    let mut daemon =
        VhostUserDaemon::new("tessera-blk".to_owned(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(|e| Error::Daemon { path: path.to_owned(), reason: e.to_string() })?;
    info!("waiting for a vhost-user front end on {}", path.display());
    match daemon.serve(path) {
        Ok(()) => info!("front end disconnected from {}", path.display()),
        Err(vhost_user_backend::Error::CreateVhostUserListener(e)) => {
            return Err(Error::Listen { path: path.to_owned(), reason: e.to_string() })
        }
        Err(e) => error!("vhost-user connection on {} closed: {e}; waiting for the next one", path.display()),
    }
    if let Err(e) = dev.disk.flush() {
        error!("flushing the image after the connection ended failed: {e}");
    }
    Ok(())
}
