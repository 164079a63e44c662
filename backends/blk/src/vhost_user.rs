//! The vhost-user adapter: feeds descriptor chains from the rings rust-vmm's vhost-user-backend
//! manages into [`crate::request::process_request`]. No block logic lives here.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::image::BlockIo;
use crate::request::{process_request, try_process_request, Desc, DiskProps, SECTOR_SIZE};
use crate::{Error, Result};

/// Largest single data segment we advertise (`size_max`).
const SIZE_MAX: u32 = 1 << 20;

/// The device as it outlives any one vhost-user connection: the open image and its properties.
pub struct BlkDevice {
    pub disk: Arc<dyn BlockIo>,
    pub props: DiskProps,
    pub num_queues: u16,
    pub queue_size: u16,
    /// Threads of the I/O pool per connection (0: every request on its queue's thread).
    pub io_threads: usize,
    /// The image bypasses the page cache, so its I/O blocks on the device.
    pub direct: bool,
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
        // A chain may not be longer than the queue size (virtio 1.2 §2.7.5.3.1), and two of its
        // descriptors carry the header and the status byte. The front end reads the config
        // before the driver picks a queue size, so assume the smallest common one: 128 is
        // QEMU's vhost-user-blk-pci default.
        let seg_max = u32::from(self.queue_size.min(128)).saturating_sub(2).max(1);
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

/// Requests at least this large go to the I/O pool even on the page cache: copying a MiB is
/// long enough that doing several in parallel beats the thread hand-off.
const OFFLOAD_MIN_BYTES: u64 = 128 << 10;

/// A request handed to the I/O pool; it completes itself on its vring.
struct Job {
    vring: VringRwLock,
    /// Keeps the memory map the descriptors were translated against alive until completion.
    mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
    descs: Vec<Desc>,
    head: u16,
    queue: usize,
}

/// Requests in flight in the pool, per queue, so that GET_VRING_BASE can wait for them.
type Inflight = Arc<(Mutex<Vec<usize>>, Condvar)>;

/// One connection's backend. A fresh one is made per connection so that the worker threads and
/// their exit events of a finished connection go away with it.
pub struct VhostBlk {
    dev: Arc<BlkDevice>,
    config: Vec<u8>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// Sender side of the I/O pool (None: every request runs on its queue's thread).
    pool: Option<Arc<Pool>>,
    inflight: Inflight,
}

impl VhostBlk {
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        let config = dev.config_space();
        let inflight: Inflight = Arc::new((Mutex::new(vec![0; usize::from(dev.num_queues)]), Condvar::new()));
        let pool = (dev.io_threads > 0).then(|| start_pool(&dev, &inflight)).flatten();
        VhostBlk { dev, config, mem: RwLock::new(None), event_idx: AtomicBool::new(false), pool, inflight }
    }

    /// Whether a request goes straight to the pool: blocking device I/O (O_DIRECT) always,
    /// page-cache I/O when large (copies that long run better in parallel). Others are tried
    /// here without blocking first (a small page-cache copy is cheaper than a thread hand-off).
    fn offload(&self, descs: &[Desc]) -> bool {
        self.pool.is_some()
            && (self.dev.direct || descs.iter().map(|d| u64::from(d.len)).sum::<u64>() >= OFFLOAD_MIN_BYTES)
    }

    /// Executes (or hands to the pool) every available chain, then notifies the driver about the
    /// ones completed here if it asked for it.
    fn process_vring(&self, vring: &VringRwLock, queue_index: usize) -> io::Result<()> {
        let Some(atomic) = self.mem.read().ok().and_then(|m| m.clone()) else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let chains: Vec<_> = match queue.iter(&*mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                // E.g. an avail index more than the queue size ahead (§2.7.6): the driver is
                // broken; leave the queue alone until it resets the device.
                crate::ratelimit::guest_error(format_args!("queue {queue_index} unusable: {e}"));
                return Ok(());
            }
        };
        let mut completed_here = 0;
        for chain in chains {
            let head = chain.head_index();
            let descs: Vec<Desc> =
                chain.map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect();
            // Small page-cache requests run here; what would block goes to the pool.
            let inline = if self.offload(&descs) {
                None
            } else if self.pool.is_some() {
                try_run_request(&mem, &descs, &self.dev)
            } else {
                Some(run_request(&mem, &descs, &self.dev))
            };
            let Some(used) = inline else {
                let job = Job { vring: vring.clone(), mem: mem.clone(), descs, head, queue: queue_index };
                if let Some(slot) = lock(&self.inflight.0).get_mut(queue_index) {
                    *slot += 1;
                }
                if let Some(pool) = &self.pool {
                    pool.submit(job);
                }
                continue;
            };
            add_used(queue, &mem, head, used);
            completed_here += 1;
        }
        if completed_here > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

/// Runs one request, containing a panic (a bug in us or in imago, never guest input by design)
/// to that request: it completes without a status, the error is logged, and the thread (a
/// queue's or the pool's) keeps serving.
fn run_request(mem: &GuestMemoryMmap, descs: &[Desc], dev: &BlkDevice) -> u32 {
    let run = std::panic::AssertUnwindSafe(|| process_request(mem, descs, dev.disk.as_ref(), &dev.props));
    match std::panic::catch_unwind(run) {
        Ok(used) => used,
        Err(_) => {
            error!("internal error while executing a request (see the panic message above); request dropped");
            0
        }
    }
}

/// [`try_process_request`] with the same panic containment as [`run_request`].
fn try_run_request(mem: &GuestMemoryMmap, descs: &[Desc], dev: &BlkDevice) -> Option<u32> {
    let run = std::panic::AssertUnwindSafe(|| try_process_request(mem, descs, dev.disk.as_ref(), &dev.props));
    match std::panic::catch_unwind(run) {
        Ok(used) => used,
        Err(_) => {
            error!("internal error while executing a request (see the panic message above); request dropped");
            Some(0)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn add_used(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap, head: u16, used: u32) {
    if let Err(e) = queue.add_used(mem, head, used) {
        crate::ratelimit::guest_error(format_args!("cannot add to the used ring: {e}"));
    }
}

/// The I/O pool: a job queue under one mutex and a condvar. A thread that finishes a job takes
/// the next one without sleeping, so under load the same few threads stay hot (an mpsc receiver
/// behind a mutex instead hands every job to a different, cold thread: measured ~2x slower for
/// 1 MiB page-cache reads on 2 cores).
struct Pool {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    cv: Condvar,
}

impl Pool {
    fn submit(&self, job: Job) {
        lock(&self.jobs).0.push_back(job);
        self.cv.notify_one();
    }

    /// Lets the threads exit once the queue is drained.
    fn close(&self) {
        lock(&self.jobs).1 = true;
        self.cv.notify_all();
    }

    fn next(&self) -> Option<Job> {
        let mut g = lock(&self.jobs);
        loop {
            if let Some(job) = g.0.pop_front() {
                return Some(job);
            }
            if g.1 {
                return None;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Starts `dev.io_threads` threads executing offloaded requests, each completing its request on
/// its vring (virtio allows completion in any order, §2.7.8).
fn start_pool(dev: &Arc<BlkDevice>, inflight: &Inflight) -> Option<Arc<Pool>> {
    let pool = Arc::new(Pool { jobs: Mutex::new((VecDeque::new(), false)), cv: Condvar::new() });
    for i in 0..dev.io_threads {
        let worker_pool = pool.clone();
        let dev = dev.clone();
        let inflight = inflight.clone();
        let spawned = std::thread::Builder::new().name(format!("blk-io{i}")).spawn(move || {
            while let Some(job) = worker_pool.next() {
                let used = run_request(&job.mem, &job.descs, &dev);
                {
                    let mut state = job.vring.get_mut();
                    add_used(state.get_queue_mut(), &job.mem, job.head, used);
                    if state.get_queue_mut().needs_notification(&*job.mem).unwrap_or(true) {
                        if let Err(e) = state.signal_used_queue() {
                            warn!("cannot signal queue {}: {e}", job.queue);
                        }
                    }
                }
                let (count, cv) = &*inflight;
                if let Some(slot) = lock(count).get_mut(job.queue) {
                    *slot = slot.saturating_sub(1);
                }
                cv.notify_all();
            }
        });
        if let Err(e) = spawned {
            error!("cannot start I/O thread {i}: {e}; serving requests on the queue threads");
            pool.close();
            return None;
        }
    }
    Some(pool)
}

impl Drop for VhostBlk {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.close();
        }
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
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // ADD/REM_MEM_REG, served by vhost-user-backend; libblkio requires it.
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
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

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: requests already taken from this queue must complete first, or the
        // front end (or the next backend after a restart) would see them neither used nor
        // available. Bounded, so a stuck host I/O cannot hang the control connection forever.
        let (count, cv) = &*self.inflight;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut guard = lock(count);
        while guard.get(queue_index as usize).copied().unwrap_or(0) > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                warn!("queue {queue_index} stopped with requests still in flight");
                break;
            }
            guard = cv.wait_timeout(guard, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
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
        if self.event_idx.load(Ordering::Relaxed) {
            // Re-check after re-enabling notifications, or a chain made available in between
            // would wait for the next kick (virtio 1.2 §2.7.10).
            loop {
                let _ = vring.disable_notification();
                self.process_vring(vring, usize::from(device_event))?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.process_vring(vring, usize::from(device_event))?;
        }
        Ok(())
    }
}

/// Serves `dev` on the vhost-user socket at `path`, one front end at a time, forever: when a
/// front end disconnects (or sends something malformed) the connection is dropped, the disk is
/// flushed, and the next connection is accepted. The socket is bound once, so a front end that
/// reconnects at any moment finds it. Returns only if the socket cannot be listened on.
pub fn serve(path: &Path, dev: Arc<BlkDevice>) -> Result<()> {
    let listener =
        Listener::new(path, true).map_err(|e| Error::Listen { path: path.to_owned(), reason: e.to_string() })?;
    serve_listener(listener, path, dev)
}

/// [`serve`] on a listening socket inherited as descriptor `fd` (taken over by this call).
pub fn serve_fd(fd: i32, dev: Arc<BlkDevice>) -> Result<()> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`; a bad fd only fails.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if fd < 3 || ret != 0 || accepting == 0 {
        return Err(Error::NotListening(fd));
    }
    // SAFETY: `fd` is an open, listening socket (checked above) that our parent handed to us;
    // nothing else in this process owns it.
    let listener = unsafe { <Listener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    serve_listener(listener, Path::new(&format!("socket fd {fd}")), dev)
}

/// The serve loop on an already listening socket; `name` labels it in log lines.
pub fn serve_listener(mut listener: Listener, name: &Path, dev: Arc<BlkDevice>) -> Result<()> {
    loop {
        if !serve_connection(&mut listener, name, dev.clone())? {
            // accept() itself failed (e.g. out of file descriptors): do not spin.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Accepts one connection on `listener` and serves it until it ends. Ok(true) when a
/// connection was served (however it ended), Ok(false) when none could be accepted.
pub fn serve_connection(listener: &mut Listener, path: &Path, dev: Arc<BlkDevice>) -> Result<bool> {
    let backend = Arc::new(VhostBlk::new(dev.clone()));
    let mut daemon =
        VhostUserDaemon::new("tessera-blk".to_owned(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(|e| Error::Daemon { path: path.to_owned(), reason: e.to_string() })?;
    info!("waiting for a vhost-user front end on {}", path.display());
    if let Err(e) = daemon.start(listener) {
        error!("cannot accept a connection on {}: {e}", path.display());
        return Ok(false);
    }
    info!("front end connected on {}", path.display());
    let result = daemon.wait();
    // The worker threads of this connection exit; the next connection gets fresh ones.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("front end disconnected from {}", path.display()),
        Err(e) => error!("closing the vhost-user connection on {}: {e}; waiting for the next one", path.display()),
    }
    if let Err(e) = dev.disk.flush() {
        error!("flushing the image after the connection ended failed: {e}");
    }
    Ok(true)
}
