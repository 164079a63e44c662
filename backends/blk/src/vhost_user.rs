//! The vhost-user device: features and config space, the request path from the rings (queue
//! threads, the I/O pool, inflight tracking) into [`crate::request::process_request`], and the
//! serve loop. The vhost-user messages are handled in [`crate::handler`]; no block logic lives
//! here.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use log::{error, info, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError, Listener};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::handler::BlkHandler;
use crate::image::BlockIo;
use crate::inflight::{chain_descs, InflightRegion};
use crate::request::{process_request, try_process_request, Desc, DiskProps, SECTOR_SIZE};
use crate::uring::QueueRing;
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
    /// O_DIRECT reads and writes on one io_uring per queue thread (`--aio io_uring`).
    pub io_uring: bool,
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

/// The inflight region the front end gave this connection, if any.
type Region = Option<Arc<InflightRegion>>;

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
    region: Region,
}

/// What the queue threads and the pool share about completions.
struct Completions {
    /// Requests in flight in the pool, per queue, so that GET_VRING_BASE can wait for them.
    pending: Mutex<Vec<usize>>,
    idle: Condvar,
    /// Whether a request completed on this connection yet: the first one is logged, which
    /// marks the end of a restart's stall (tests/blk_restart_inflight.rs measures it).
    first_done: AtomicBool,
}

type Pending = Arc<Completions>;

impl Completions {
    fn note_completion(&self, q: usize) {
        if !self.first_done.swap(true, Ordering::Relaxed) {
            info!("queue {q}: first request completed on this connection");
        }
    }
}

/// One connection's device state: the request path the queue threads and the pool share. A
/// fresh one is made per connection so that its pool goes away with it.
pub struct VhostBlk {
    dev: Arc<BlkDevice>,
    config: Vec<u8>,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    /// Sender side of the I/O pool (None: every request runs on its queue's thread).
    pool: Option<Arc<Pool>>,
    pending: Pending,
    region: RwLock<Region>,
    /// Per queue: the inflight counter of the next chain taken from the avail ring.
    counters: Vec<AtomicU64>,
}

impl VhostBlk {
    pub fn new(dev: Arc<BlkDevice>) -> Self {
        let config = dev.config_space();
        let pending: Pending = Arc::new(Completions {
            pending: Mutex::new(vec![0; usize::from(dev.num_queues)]),
            idle: Condvar::new(),
            first_done: AtomicBool::new(false),
        });
        let pool = (dev.io_threads > 0).then(|| start_pool(&dev, &pending)).flatten();
        let counters = (0..dev.num_queues).map(|_| AtomicU64::new(1)).collect();
        VhostBlk {
            dev,
            config,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            pool,
            pending,
            region: RwLock::new(None),
            counters,
        }
    }

    pub fn dev(&self) -> &BlkDevice {
        &self.dev
    }

    pub fn update_memory(&self, mem: Mem) {
        if let Ok(mut m) = self.mem.write() {
            *m = Some(mem);
        }
    }

    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    /// GET_CONFIG: exactly `size` bytes from `offset`, zero beyond what we define (the front
    /// end asks for the size it computed from our features).
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(self.config.len());
        let end = (offset as usize).saturating_add(size as usize).min(self.config.len());
        out[..end - start].copy_from_slice(&self.config[start..end]);
        out
    }

    pub fn set_inflight(&self, region: Region) {
        if let Ok(mut r) = self.region.write() {
            *r = region;
        }
    }

    fn region(&self) -> Region {
        self.region.read().ok().and_then(|r| r.clone())
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<GuestMemoryMmap>> {
        self.mem.read().ok().and_then(|m| m.as_ref().map(|a| a.memory()))
    }

    /// Queue start with an inflight region: recover it against the used ring (spec, "Inflight
    /// I/O tracking") and position the avail index after what is still in flight. Returns the
    /// heads to resubmit, oldest first.
    pub fn start_queue(&self, vring: &VringRwLock, q: usize, features: u64) -> Vec<u16> {
        let (Some(region), Some(mem)) = (self.region(), self.memory()) else { return Vec::new() };
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = match queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                error!("queue {q}: cannot read the used ring to recover in-flight requests: {e}");
                return Vec::new();
            }
        };
        let tracker = match region.queue(q as u16, queue.size()) {
            Ok(t) => t,
            Err(e) => {
                error!("queue {q}: not tracking in-flight requests: {e}");
                return Vec::new();
            }
        };
        let rec = tracker.recover(used, features);
        queue.set_next_avail(rec.next_avail);
        queue.set_next_used(used);
        if let Some(c) = self.counters.get(q) {
            c.store(rec.next_counter, Ordering::Relaxed);
        }
        if !rec.resubmit.is_empty() {
            info!("queue {q}: resubmitting {} request(s) that were in flight", rec.resubmit.len());
        }
        rec.resubmit
    }

    /// Runs the chains with these heads again (their inflight entries stay as they are).
    pub fn resubmit(&self, vring: &VringRwLock, q: usize, heads: &[u16], ring: &mut Option<QueueRing>) {
        let Some(mem) = self.memory() else { return };
        let region = self.region();
        let (table, size) = {
            let state = vring.get_ref();
            (state.get_queue().desc_table(), state.get_queue().size())
        };
        let mut batch = Vec::with_capacity(heads.len());
        let mut malformed = Vec::new();
        for &head in heads {
            match chain_descs(&mem, table, size, head) {
                Some(descs) => batch.push((head, descs)),
                None => {
                    crate::ratelimit::guest_error(format_args!("queue {q}: in-flight chain {head} is malformed"));
                    malformed.push((head, 0));
                }
            }
        }
        self.run_batch(vring, q, &mem, batch, malformed, &region, ring);
    }

    /// Whether a request goes straight to the pool: blocking device I/O (O_DIRECT) always,
    /// page-cache I/O when large (copies that long run better in parallel). Others are tried
    /// here without blocking first (a small page-cache copy is cheaper than a thread hand-off).
    fn offload(&self, descs: &[Desc]) -> bool {
        self.pool.is_some()
            && (self.dev.direct || descs.iter().map(|d| u64::from(d.len)).sum::<u64>() >= OFFLOAD_MIN_BYTES)
    }

    /// Executes a batch of chains taken from queue `q`, without holding the vring lock during
    /// I/O (pool threads completing other requests need it): small page-cache requests here,
    /// what would block in the pool. Then completes what ran here in one go (`done` holds chains
    /// already finished, e.g. malformed ones) and notifies the driver if it asked for it.
    #[allow(clippy::too_many_arguments)]
    fn run_batch(
        &self,
        vring: &VringRwLock,
        q: usize,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
        batch: Vec<(u16, Vec<Desc>)>,
        mut done: Vec<(u16, u32)>,
        region: &Region,
        ring: &mut Option<QueueRing>,
    ) {
        // Writes the file system cannot try without blocking (ext4 buffered writes) would run one
        // after the other on this thread, each possibly stalling in writeback: at depth (more than
        // one request at hand, or some already in the pool) they go to the pool and run in
        // parallel. At depth 1 one runs here (no hand-off).
        let writes_to_pool = self.pool.is_some()
            && !self.dev.disk.nonblocking_writes()
            && (batch.len() > 1 || lock(&self.pending.pending).get(q).is_some_and(|n| *n > 0));
        for (head, descs) in batch {
            // Direct reads and writes go on the queue's io_uring when it has one.
            let descs = match ring.as_mut() {
                Some(r) => match r.push(head, descs, mem, self.dev.disk.as_ref(), &self.dev.props) {
                    Ok(()) => continue,
                    Err(descs) => descs,
                },
                None => descs,
            };
            let inline = match &self.pool {
                None => Some(run_request(mem, &descs, &self.dev)),
                Some(_) if self.offload(&descs) => None,
                Some(_) if writes_to_pool && is_write(mem, &descs) => None,
                Some(_) => try_run_request(mem, &descs, &self.dev),
            };
            match (inline, &self.pool) {
                (Some(used), _) => done.push((head, used)),
                (None, Some(pool)) => {
                    if let Some(slot) = lock(&self.pending.pending).get_mut(q) {
                        *slot += 1;
                    }
                    pool.submit(Job {
                        vring: vring.clone(),
                        mem: mem.clone(),
                        descs,
                        head,
                        queue: q,
                        region: region.clone(),
                    });
                }
                (None, None) => done.push((head, run_request(mem, &descs, &self.dev))),
            }
        }
        if let Some(r) = ring.as_mut() {
            r.submit();
        }
        self.complete_batch(vring, q, mem, done, region);
    }

    /// Puts what finished on the used ring and notifies the driver if it asked for it.
    fn complete_batch(
        &self,
        vring: &VringRwLock,
        q: usize,
        mem: &GuestMemoryMmap,
        done: Vec<(u16, u32)>,
        region: &Region,
    ) {
        if done.is_empty() {
            return;
        }
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        for (head, used) in done {
            complete(queue, mem, head, used, q, region.as_deref());
        }
        self.pending.note_completion(q);
        if queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                warn!("cannot signal queue {q}: {e}");
            }
        }
    }

    /// Takes every available chain from the ring (marking it in flight), then runs them.
    fn process_vring(&self, vring: &VringRwLock, q: usize, ring: &mut Option<QueueRing>) {
        let Some(mem) = self.memory() else { return };
        let region = self.region();
        let batch: Vec<(u16, Vec<Desc>)> = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let chains: Vec<_> = match queue.iter(&*mem) {
                Ok(it) => it.collect(),
                Err(e) => {
                    // E.g. an avail index more than the queue size ahead (§2.7.6): the driver is
                    // broken; leave the queue alone until it resets the device.
                    crate::ratelimit::guest_error(format_args!("queue {q} unusable: {e}"));
                    return;
                }
            };
            let tracker = region.as_ref().and_then(|r| r.queue(q as u16, queue.size()).ok());
            chains
                .into_iter()
                .map(|chain| {
                    let head = chain.head_index();
                    if let (Some(t), Some(counter)) = (&tracker, self.counters.get(q)) {
                        t.start(head, counter.fetch_add(1, Ordering::Relaxed));
                    }
                    (
                        head,
                        chain.map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect(),
                    )
                })
                .collect()
        };
        if !batch.is_empty() {
            self.run_batch(vring, q, &mem, batch, Vec::new(), &region, ring);
        }
    }

    /// A kick (or a queue start): process the ring, with EVENT_IDX re-checking after notifications
    /// are re-enabled, or a chain made available in between would wait for the next kick
    /// (virtio 1.2 §2.7.10).
    pub fn handle_kick(&self, vring: &VringRwLock, q: usize, ring: &mut Option<QueueRing>) {
        let mut run = |v: &VringRwLock| self.process_vring(v, q, ring);
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                let _ = vring.disable_notification();
                run(vring);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            run(vring);
        }
    }

    /// The queue's io_uring signalled: complete what finished.
    pub fn reap(&self, vring: &VringRwLock, q: usize, ring: &mut QueueRing) {
        let done = ring.reap(self.dev.disk.as_ref(), &self.dev.props);
        if let Some(mem) = self.memory() {
            self.complete_batch(vring, q, &mem, done, &self.region());
        }
    }

    /// Before a queue thread exits (queue stopped, connection gone): let every transfer on its
    /// ring finish and complete it, so nothing taken from the ring is left neither used nor in
    /// flight anywhere.
    pub fn drain(&self, vring: &VringRwLock, q: usize, ring: &mut QueueRing) {
        while ring.in_flight() > 0 {
            ring.wait_one();
            self.reap(vring, q, ring);
        }
    }

    /// Waits (bounded, so a stuck host I/O cannot hang the control connection forever) until
    /// queue `q` has no request left in the pool.
    pub fn wait_queue_idle(&self, q: usize) {
        let (count, cv) = (&self.pending.pending, &self.pending.idle);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut guard = lock(count);
        while guard.get(q).copied().unwrap_or(0) > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                warn!("queue {q} stopped with requests still in flight");
                break;
            }
            guard = cv.wait_timeout(guard, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Whether the chain is an `OUT` request, from its header's type (first 4 bytes, which the first
/// descriptor holds in every driver we know; a header split before them reads as not a write,
/// which only means the request may run on the queue thread).
fn is_write(mem: &GuestMemoryMmap, descs: &[Desc]) -> bool {
    descs.first().filter(|d| d.len >= 4 && !d.writable).is_some_and(|d| {
        vm_memory::Bytes::read_obj::<u32>(mem, vm_memory::GuestAddress(d.addr))
            .is_ok_and(|t| u32::from_le(t) == VIRTIO_BLK_T_OUT)
    })
}

/// Puts `head` on the used ring, keeping the inflight region (if any) in step: the chain becomes
/// the last batch before the used ring moves, and is cleared after (spec, "Inflight I/O
/// tracking", split virtqueue). Called with the vring locked, so one queue's completions are
/// serialized whichever thread makes them.
fn complete(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    used: u32,
    q: usize,
    region: Option<&InflightRegion>,
) {
    let tracker = region.and_then(|r| r.queue(q as u16, queue.size()).ok());
    if let Some(t) = &tracker {
        t.before_used(head);
    }
    add_used(queue, mem, head, used);
    if let Some(t) = &tracker {
        t.after_used(head, queue.next_used());
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

/// The I/O pool: a job queue under one mutex, and a stack of idle threads. A thread that
/// finishes a job takes the next one without sleeping, and a new job wakes the thread that went
/// idle last, so under load the same few threads stay hot (cache, scheduler). A condvar would
/// wake the longest-waiting, coldest thread (futex waiters are FIFO): at 1 MiB page-cache reads,
/// QD4, all 16 threads took turns in `perf`; an mpsc receiver behind a mutex was worse still
/// (~2x slower on 2 cores).
struct Pool {
    state: Mutex<PoolState>,
}

struct PoolState {
    jobs: VecDeque<Job>,
    idle: Vec<std::thread::Thread>,
    closed: bool,
}

impl Pool {
    fn submit(&self, job: Job) {
        let wake = {
            let mut g = lock(&self.state);
            g.jobs.push_back(job);
            g.idle.pop()
        };
        if let Some(t) = wake {
            t.unpark();
        }
    }

    /// Lets the threads exit once the queue is drained.
    fn close(&self) {
        let idle = {
            let mut g = lock(&self.state);
            g.closed = true;
            std::mem::take(&mut g.idle)
        };
        for t in idle {
            t.unpark();
        }
    }

    fn next(&self) -> Option<Job> {
        let me = std::thread::current();
        loop {
            {
                let mut g = lock(&self.state);
                // Woken, spuriously or not, this thread is not idle any more.
                g.idle.retain(|t| t.id() != me.id());
                if let Some(job) = g.jobs.pop_front() {
                    return Some(job);
                }
                if g.closed {
                    return None;
                }
                g.idle.push(me.clone());
            }
            // An unpark between the unlock and here makes park return at once.
            std::thread::park();
        }
    }
}

/// Starts `dev.io_threads` threads executing offloaded requests, each completing its request on
/// its vring (virtio allows completion in any order, §2.7.8).
fn start_pool(dev: &Arc<BlkDevice>, pending: &Pending) -> Option<Arc<Pool>> {
    let pool =
        Arc::new(Pool { state: Mutex::new(PoolState { jobs: VecDeque::new(), idle: Vec::new(), closed: false }) });
    for i in 0..dev.io_threads {
        let worker_pool = pool.clone();
        let dev = dev.clone();
        let pending = pending.clone();
        let spawned = std::thread::Builder::new().name(format!("blk-io{i}")).spawn(move || {
            while let Some(job) = worker_pool.next() {
                let used = run_request(&job.mem, &job.descs, &dev);
                {
                    let mut state = job.vring.get_mut();
                    complete(state.get_queue_mut(), &job.mem, job.head, used, job.queue, job.region.as_deref());
                    pending.note_completion(job.queue);
                    if state.get_queue_mut().needs_notification(&*job.mem).unwrap_or(true) {
                        if let Err(e) = state.signal_used_queue() {
                            warn!("cannot signal queue {}: {e}", job.queue);
                        }
                    }
                }
                if let Some(slot) = lock(&pending.pending).get_mut(job.queue) {
                    *slot = slot.saturating_sub(1);
                }
                pending.idle.notify_all();
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
    info!("waiting for a vhost-user front end on {}", path.display());
    let stream = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue,
            Err(e) => {
                error!("cannot accept a connection on {}: {e}", path.display());
                return Ok(false);
            }
        }
    };
    let blk = Arc::new(VhostBlk::new(dev.clone()));
    let handler =
        BlkHandler::new(blk.clone()).map_err(|e| Error::Daemon { path: path.to_owned(), reason: e.to_string() })?;
    let handler = Arc::new(Mutex::new(handler));
    let mut conn = BackendReqHandler::from_stream(stream, handler.clone());
    info!("front end connected on {}", path.display());
    let result = loop {
        if let Err(e) = conn.handle_request() {
            break e;
        }
    };
    match result {
        VhostUserError::Disconnected | VhostUserError::PartialMessage | VhostUserError::SocketBroken(_) => {
            info!("front end disconnected from {}", path.display())
        }
        e => error!("closing the vhost-user connection on {}: {e}; waiting for the next one", path.display()),
    }
    // Stop the queue threads, then let the pool finish what it holds before the next front end
    // may connect: a request still running would otherwise be resubmitted from the inflight
    // region by the next connection and completed twice.
    drop(conn);
    if let Ok(mut h) = handler.lock() {
        h.shutdown();
    }
    drop(handler);
    for q in 0..usize::from(dev.num_queues) {
        blk.wait_queue_idle(q);
    }
    drop(blk);
    if let Err(e) = dev.disk.flush() {
        error!("flushing the image after the connection ended failed: {e}");
    }
    Ok(true)
}
