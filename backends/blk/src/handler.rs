//! tessera-blk's vhost-user request handler, on the `vhost` crate's
//! [`VhostUserBackendReqHandlerMut`] (message parsing, fd passing, REPLY_ACK and the checks of
//! malformed messages stay in `vhost`).
//!
//! Why not rust-vmm's `vhost-user-backend` (`VhostUserDaemon`), which served tessera-blk before:
//! its handler answers GET/SET_INFLIGHT_FD with an error, and it is a private type that can be
//! neither wrapped nor constructed from outside the crate (`VhostUserDaemon` owns it, its
//! constructor and its epoll worker's constructor are crate-private). Inflight tracking also has
//! to run at the moment a queue starts (resubmit before new requests) and around every used-ring
//! update, which its worker loop gives no hook for. Writing the handler here on the `vhost` crate
//! is the smaller sound design: ~300 lines, reusing vhost-user-backend's `VringRwLock` for the
//! queue state, instead of a patched copy of that crate.
//!
//! Ring states follow the spec ("Ring states"): a ring is started by SET_VRING_KICK and stopped
//! by GET_VRING_BASE; with `VHOST_USER_F_PROTOCOL_FEATURES` it only processes while enabled by
//! SET_VRING_ENABLE, without it it is enabled from SET_FEATURES on. A started and enabled ring
//! has one thread of its own waiting on its kick eventfd.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::inflight::InflightRegion;
use crate::uring::QueueRing;
use crate::vhost_user::VhostBlk;

/// Memory slots we accept (CONFIGURE_MEM_SLOTS); what vhost-user-backend offered before.
const MAX_MEM_SLOTS: u64 = 509;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Front-end virtual address range → guest physical (SET_VRING_ADDR passes front-end VAs).
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

#[derive(Default)]
struct QueueCtl {
    started: bool,
    enabled: bool,
    /// Set when the ring starts, consumed when its thread starts: look at the inflight region.
    recover: bool,
    thread: Option<(EventNotifier, JoinHandle<()>)>,
}

/// One connection's state.
pub struct BlkHandler {
    blk: Arc<VhostBlk>,
    vrings: Vec<VringRwLock>,
    queues: Vec<QueueCtl>,
    mem: Mem,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
}

fn invalid(what: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what.into()))
}

impl BlkHandler {
    pub fn new(blk: Arc<VhostBlk>) -> io::Result<Self> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let n = usize::from(blk.dev().num_queues);
        let mut vrings = Vec::with_capacity(n);
        for _ in 0..n {
            vrings.push(VringRwLock::new(mem.clone(), blk.dev().queue_size).map_err(io::Error::other)?);
        }
        let queues = (0..n).map(|_| QueueCtl::default()).collect();
        Ok(BlkHandler {
            blk,
            vrings,
            queues,
            mem,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
        })
    }

    fn vring(&self, index: u32) -> VuResult<&VringRwLock> {
        self.vrings.get(index as usize).ok_or_else(|| invalid(format!("no queue {index}")))
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa)
            .ok_or_else(|| invalid(format!("ring address {va:#x} is in no memory region")))
    }

    /// Publishes a new memory map to the rings and the request path.
    fn publish(&mut self, mem: GuestMemoryMmap) {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(mem);
        self.blk.update_memory(self.mem.clone());
    }

    /// Stops queue `q`'s thread (if any) and waits for it.
    fn stop_thread(&mut self, q: usize) {
        if let Some((exit, join)) = self.queues.get_mut(q).and_then(|c| c.thread.take()) {
            if let Err(e) = exit.notify() {
                error!("cannot stop the thread of queue {q}: {e}");
            }
            if join.join().is_err() {
                error!("the thread of queue {q} panicked");
            }
        }
    }

    /// Starts or stops queue `q`'s thread to match its state.
    fn update_queue(&mut self, q: usize) -> VuResult<()> {
        let Some(ctl) = self.queues.get(q) else { return Ok(()) };
        let run = ctl.started && ctl.enabled;
        if !run {
            self.stop_thread(q);
            return Ok(());
        }
        if self.queues[q].thread.is_some() {
            return Ok(());
        }
        let vring = self.vrings[q].clone();
        let kick = vring.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
        let Some(kick) = kick else { return Ok(()) };
        let resubmit = if std::mem::take(&mut self.queues[q].recover) {
            self.blk.start_queue(&vring, q, self.acked_features)
        } else {
            Vec::new()
        };
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(VuError::ReqHandlerError)?;
        let blk = self.blk.clone();
        let join = std::thread::Builder::new()
            .name(format!("blk-queue{q}"))
            .spawn(move || queue_thread(blk, vring, q, kick, consumer, resubmit))
            .map_err(VuError::ReqHandlerError)?;
        self.queues[q].thread = Some((notifier, join));
        Ok(())
    }

    pub fn shutdown(&mut self) {
        for q in 0..self.queues.len() {
            self.stop_thread(q);
        }
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A started, enabled queue: resubmit what the inflight region listed, then serve kicks until
/// told to exit. The kick fd stays open while this runs (the handler stops this thread before
/// it replaces or drops the fd).
fn queue_thread(
    blk: Arc<VhostBlk>,
    vring: VringRwLock,
    q: usize,
    kick: RawFd,
    exit: EventConsumer,
    resubmit: Vec<u16>,
) {
    let mut ring = if blk.dev().direct && blk.dev().io_uring {
        let size = vring.get_ref().get_queue().size();
        let ring = QueueRing::new(blk.dev().disk.as_ref(), size);
        if ring.is_some() {
            info!("queue {q}: O_DIRECT reads and writes on io_uring");
        }
        ring
    } else {
        None
    };
    if !resubmit.is_empty() {
        blk.resubmit(&vring, q, &resubmit, &mut ring);
    }
    // A kick may have come before we were here (or before the previous back end died).
    blk.handle_kick(&vring, q, &mut ring);
    let mut fds = [
        libc::pollfd { fd: kick, events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: exit.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        // poll ignores negative descriptors.
        libc::pollfd { fd: ring.as_ref().map_or(-1, |r| r.event_fd()), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: poll on three pollfds we own for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("queue {q}: poll failed: {e}; queue stopped");
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        if fds[2].revents != 0 {
            if let Some(r) = ring.as_mut() {
                blk.reap(&vring, q, r);
            }
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            warn!("queue {q}: kick eventfd unusable; queue stopped");
            break;
        }
        if fds[0].revents != 0 {
            let _ = vring.read_kick();
            blk.handle_kick(&vring, q, &mut ring);
        }
    }
    if let Some(r) = ring.as_mut() {
        blk.drain(&vring, q, r);
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.shutdown();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for q in 0..self.queues.len() {
            self.queues[q].enabled = false;
            self.update_queue(q)?;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.blk.dev().features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.blk.dev().features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.blk.set_event_idx(event_idx);
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled from the start (spec, "Ring
        // states"); with it they wait for SET_VRING_ENABLE.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for q in 0..self.queues.len() {
                self.queues[q].enabled = true;
                self.vrings[q].set_enabled(true);
                self.update_queue(q)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let region = GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                .ok_or_else(|| invalid("memory region wraps around the address space"))?;
            regions.push(region);
            mappings.push(Mapping { vmm_addr: r.user_addr, size: r.memory_size, gpa: r.guest_phys_addr });
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| invalid(format!("memory table: {e}")))?;
        self.publish(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.blk.dev().queue_size);
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(invalid(format!("queue {index}: size {num} (power of two up to {max} expected)")));
        }
        self.vring(index)?.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let (d, a, u) = (self.vmm_va_to_gpa(descriptor)?, self.vmm_va_to_gpa(available)?, self.vmm_va_to_gpa(used)?);
        let vring = self.vring(index)?;
        vring.set_queue_info(d, a, u).map_err(|_| invalid(format!("queue {index}: bad ring addresses")))?;
        // The used index lives in guest memory; start from it (SET_VRING_BASE only carries the
        // avail index for split rings).
        let idx = vring.queue_used_idx().map_err(|_| invalid(format!("queue {index}: used ring unreadable")))?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = index as usize;
        let vring = self.vring(index)?.clone();
        if let Some(ctl) = self.queues.get_mut(q) {
            ctl.started = false;
        }
        self.update_queue(q)?;
        // Requests taken from this ring complete first, or the front end (or the next back end)
        // would find them neither used nor available.
        self.blk.wait_queue_idle(q);
        vring.set_queue_ready(false);
        let next_avail = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = usize::from(index);
        let vring = self.vring(u32::from(index))?.clone();
        // The queue thread polls the old fd: stop it before the fd goes.
        self.stop_thread(q);
        vring.set_kick(fd);
        vring.set_queue_ready(true);
        let ctl = &mut self.queues[q];
        if !ctl.started {
            ctl.started = true;
            ctl.recover = true;
        }
        self.update_queue(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.set_call(fd);
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // ADD/REM_MEM_REG; libblkio requires it.
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.blk.dev().num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        let vring = self.vring(index)?.clone();
        vring.set_enabled(enable);
        self.queues[index as usize].enabled = enable;
        self.update_queue(index as usize)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        Ok(self.blk.get_config(offset, size))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        // Only `wce` is writable in virtio-blk, and we do not offer CONFIG_WCE.
        Err(VuError::ReqHandlerError(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "virtio-blk config space is read-only in tessera-blk",
        )))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if msg.num_queues > self.blk.dev().num_queues {
            return Err(invalid(format!(
                "GET_INFLIGHT_FD for {} queues, the device has {}",
                msg.num_queues,
                self.blk.dev().num_queues
            )));
        }
        let region = InflightRegion::create(msg.num_queues, msg.queue_size).map_err(VuError::ReqHandlerError)?;
        let file = region.file().try_clone().map_err(VuError::ReqHandlerError)?;
        let reply = region.describe();
        info!("inflight region created: {} queue(s) of {} descriptors", msg.num_queues, msg.queue_size);
        self.blk.set_inflight(Some(Arc::new(region)));
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::open(msg, file).map_err(VuError::ReqHandlerError)?;
        info!("inflight region set: {} queue(s) of {} descriptors", msg.num_queues, msg.queue_size);
        self.blk.set_inflight(Some(Arc::new(region)));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let r = GuestRegionMmap::new(region.mmap_region(fd)?, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| invalid("memory region wraps around the address space"))?;
        let mem = self.mem.memory().insert_region(Arc::new(r)).map_err(|e| invalid(format!("ADD_MEM_REG: {e}")))?;
        self.publish(mem);
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| invalid(format!("REM_MEM_REG: {e}")))?;
        self.publish(mem);
        self.mappings.retain(|m| m.gpa != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("shared memory regions are not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging is not supported"))
    }
}
