//! Inflight I/O tracking (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, "Inflight I/O
//! tracking" in QEMU's docs/interop/vhost-user.rst), split virtqueues only: tessera-blk does not
//! offer `VIRTIO_F_RING_PACKED` (virtio-queue 0.18 has no packed rings), so a front end never
//! gives it a packed region.
//!
//! The region is shared memory the back end allocates (GET_INFLIGHT_FD) and the front end keeps
//! while the back end dies and hands back to the next one (SET_INFLIGHT_FD). Per queue it holds
//! one 16-byte header and one 16-byte entry per descriptor:
//!
//! ```text
//! header: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx
//! entry:  u8 inflight, u8 padding[5], u16 next, u64 counter
//! ```
//!
//! Queue regions follow each other, each `align_up(16 * queue_size + 2, 64)` bytes: the same
//! sizing as QEMU's libvhost-user, so a region can move between libvhost-user based back ends
//! and this one.
//!
//! The protocol (spec, "split virtqueue"): when a chain is taken from the avail ring, its head
//! entry gets the next value of a per-queue counter and `inflight = 1`. When it is put on the
//! used ring: `next = last_batch_head`, `last_batch_head = head`, then the used ring is
//! updated, then `inflight = 0` and `used_idx` = the used ring's new index. tessera-blk puts one
//! chain at a time (its completions come from several threads in any order, serialized by the
//! vring lock), so a batch is always one chain. On reconnect: if `used_idx` differs from the
//! used ring's index, the last batch reached the used ring but was not cleared: clear it; then
//! every entry still marked inflight is resubmitted, in counter order, before new requests.
//!
//! Everything in the region comes from the front end on reconnect; indexes read from it are
//! bounds-checked and nothing in it can make us panic or touch memory outside the mapping.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::request::Desc;

/// The region layout version we write (and the only one the spec defines).
const VERSION: u16 = 1;
/// Queue regions are aligned like libvhost-user's.
const ALIGN: u64 = 64;
const HEADER: usize = 16;
const ENTRY: usize = 16;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Bytes of one queue's part of the region.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (ENTRY as u64 * u64::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

/// A mapped inflight region (the front end's copy stays valid when we die).
pub struct InflightRegion {
    ptr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    /// Kept open: GET_INFLIGHT_FD hands a duplicate to the front end.
    file: File,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics at aligned
// offsets inside it (see `header_u16`/`entry`), so sharing it between threads is sound.
unsafe impl Send for InflightRegion {}
// SAFETY: as above, all accesses are atomic.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh zeroed region for `num_queues` queues of `queue_size`.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Self> {
        if num_queues == 0 || queue_size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "GET_INFLIGHT_FD for zero queues or queue size 0"));
        }
        let len = queue_region_size(queue_size) * u64::from(num_queues);
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"tessera-blk-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len)?; // a new memfd reads as zeroes: a fresh region (version 0)
        let region = Self::map(file, 0, len, num_queues, queue_size)?;
        for q in 0..num_queues {
            region.header_u16(q, 10).store(queue_size, Ordering::Relaxed); // desc_num
        }
        Ok(region)
    }

    /// SET_INFLIGHT_FD: maps the region the front end kept. Its size must cover the queues it
    /// claims; the contents are checked when a queue starts.
    pub fn open(msg: &VhostUserInflight, file: File) -> io::Result<Self> {
        let need = queue_region_size(msg.queue_size) * u64::from(msg.num_queues);
        if msg.num_queues == 0 || msg.queue_size == 0 || msg.mmap_size < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "SET_INFLIGHT_FD: {} bytes cannot hold {} queue(s) of {} descriptors ({need} bytes needed)",
                    msg.mmap_size, msg.num_queues, msg.queue_size
                ),
            ));
        }
        let region = Self::map(file, msg.mmap_offset, need, msg.num_queues, msg.queue_size)?;
        Ok(region)
    }

    fn map(file: File, offset: u64, len: u64, num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "inflight region too large");
        let len_usize = usize::try_from(len).map_err(|_| too_big())?;
        let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
        if !offset.is_multiple_of(4096) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "inflight region offset not page aligned"));
        }
        let size = file.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            // Mapping past the end of the file would SIGBUS on first access.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region {offset}+{len} is beyond its file ({size} bytes)"),
            ));
        }
        // SAFETY: a new shared mapping of `len` bytes of `file` at a page-aligned offset inside
        // it (checked above); the result is checked and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(InflightRegion { ptr: ptr.cast(), len: len_usize, num_queues, queue_size, file })
    }

    /// The GET_INFLIGHT_FD reply.
    pub fn describe(&self) -> VhostUserInflight {
        VhostUserInflight::new(self.len as u64, 0, self.num_queues, self.queue_size)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn queue_base(&self, q: u16) -> usize {
        usize::from(q) * queue_region_size(self.queue_size) as usize
    }

    fn header_u16(&self, q: u16, off: usize) -> &AtomicU16 {
        assert!(q < self.num_queues && off < HEADER && off.is_multiple_of(2));
        // SAFETY: in bounds (q < num_queues, the region holds num_queues queue regions of at
        // least HEADER + ENTRY * queue_size bytes) and 2-aligned (the mapping is page aligned,
        // queue regions are multiples of 64 bytes, `off` is even); AtomicU16 has u16's layout.
        unsafe { &*self.ptr.add(self.queue_base(q) + off).cast::<AtomicU16>() }
    }

    fn entry(&self, q: u16, i: u16) -> (&AtomicU8, &AtomicU16, &AtomicU64) {
        assert!(q < self.num_queues && i < self.queue_size);
        let at = self.queue_base(q) + HEADER + usize::from(i) * ENTRY;
        // SAFETY: in bounds (i < queue_size, see header_u16) and each field at its natural
        // alignment (entries are 16 bytes from a 16-aligned header end: inflight at +0, next
        // at +6, counter at +8); atomics have the layout of their integers.
        unsafe {
            (
                &*self.ptr.add(at).cast::<AtomicU8>(),
                &*self.ptr.add(at + 6).cast::<AtomicU16>(),
                &*self.ptr.add(at + 8).cast::<AtomicU64>(),
            )
        }
    }

    fn features(&self, q: u16) -> &AtomicU64 {
        assert!(q < self.num_queues);
        // SAFETY: the first 8 bytes of queue q's region, 64-aligned; see header_u16.
        unsafe { &*self.ptr.add(self.queue_base(q)).cast::<AtomicU64>() }
    }

    /// The tracker for queue `q` of a ring of `ring_size` descriptors, or why this region cannot
    /// track it.
    pub fn queue(&self, q: u16, ring_size: u16) -> io::Result<QueueInflight<'_>> {
        if q >= self.num_queues {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region has {} queue(s), queue {q} started", self.num_queues),
            ));
        }
        if ring_size > self.queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region tracks {} descriptors, queue {q} has {ring_size}", self.queue_size),
            ));
        }
        Ok(QueueInflight { region: self, q, ring_size })
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's view of the region.
pub struct QueueInflight<'a> {
    region: &'a InflightRegion,
    q: u16,
    ring_size: u16,
}

/// What a queue start found in the region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first (counter order).
    pub resubmit: Vec<u16>,
    /// The next counter value for new requests.
    pub next_counter: u64,
    /// The next avail index: the used ring index plus what is still in flight.
    pub next_avail: u16,
}

impl QueueInflight<'_> {
    /// Queue start: initializes a fresh region (version 0), or recovers an old one against the
    /// used ring's current index `used_idx` (spec: "When reconnecting").
    pub fn recover(&self, used_idx: u16, features: u64) -> Recovery {
        let r = self.region;
        let version = r.header_u16(self.q, 8);
        let desc_num = r.header_u16(self.q, 10);
        let last_batch_head = r.header_u16(self.q, 12);
        let region_used = r.header_u16(self.q, 14);
        r.features(self.q).store(features, Ordering::Relaxed);
        desc_num.store(r.queue_size, Ordering::Relaxed);
        if version.load(Ordering::Acquire) == 0 {
            for i in 0..self.ring_size {
                r.entry(self.q, i).0.store(0, Ordering::Relaxed);
            }
            region_used.store(used_idx, Ordering::Relaxed);
            last_batch_head.store(0, Ordering::Relaxed);
            version.store(VERSION, Ordering::Release);
            return Recovery { resubmit: Vec::new(), next_counter: 1, next_avail: used_idx };
        }
        let stale = used_idx.wrapping_sub(region_used.load(Ordering::Acquire));
        if stale != 0 {
            // The last batch reached the used ring before we died, its entries were not cleared
            // yet: walk it from last_batch_head through `next`, at most `stale` entries.
            let mut i = last_batch_head.load(Ordering::Relaxed);
            for _ in 0..stale.min(self.ring_size) {
                if i >= self.ring_size {
                    break;
                }
                let (inflight, next, _) = r.entry(self.q, i);
                inflight.store(0, Ordering::Relaxed);
                i = next.load(Ordering::Relaxed);
            }
            region_used.store(used_idx, Ordering::Release);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.ring_size)
            .filter_map(|i| {
                let (inflight, _, counter) = r.entry(self.q, i);
                (inflight.load(Ordering::Acquire) == 1).then(|| (counter.load(Ordering::Relaxed), i))
            })
            .collect();
        pending.sort_unstable();
        let next_counter = pending.last().map_or(1, |(c, _)| c.wrapping_add(1));
        let resubmit: Vec<u16> = pending.into_iter().map(|(_, i)| i).collect();
        // Every chain taken from the avail ring is either on the used ring or still in flight
        // (whatever the completion order), so the avail ring was consumed up to this index.
        let next_avail = used_idx.wrapping_add(resubmit.len() as u16);
        Recovery { resubmit, next_counter, next_avail }
    }

    /// A chain with head `head` was taken from the avail ring (spec steps: counter, inflight).
    pub fn start(&self, head: u16, counter: u64) {
        if head >= self.ring_size {
            return;
        }
        let (inflight, _, c) = self.region.entry(self.q, head);
        c.store(counter, Ordering::Relaxed);
        inflight.store(1, Ordering::Release);
    }

    /// Before `head` goes on the used ring: it becomes the last batch (a batch of one).
    pub fn before_used(&self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        let last = self.region.header_u16(self.q, 12);
        self.region.entry(self.q, head).1.store(last.load(Ordering::Relaxed), Ordering::Relaxed);
        last.store(head, Ordering::Release);
        // The used ring write that follows must not be seen before these.
        fence(Ordering::SeqCst);
    }

    /// After the used ring's index became `used_idx` with `head` on it.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.ring_size {
            self.region.entry(self.q, head).0.store(0, Ordering::Release);
        }
        self.region.header_u16(self.q, 14).store(used_idx, Ordering::Release);
    }
}

/// The descriptors of the chain whose head is `head` in the descriptor table at `desc_table`
/// (virtio 1.2 §2.7.5, following one indirect table, §2.7.5.3), for resubmitting a request that
/// is no longer on the avail ring. virtio-queue 0.18 only builds chains from the avail ring
/// (`DescriptorChain::new` is crate-private), hence this walk. `None` if the chain is not
/// well-formed (out-of-range index, loop, unreadable table, nested indirect).
pub fn chain_descs(mem: &GuestMemoryMmap, desc_table: u64, ring_size: u16, head: u16) -> Option<Vec<Desc>> {
    let read = |table: u64, i: u32| -> Option<Descriptor> {
        let addr = table.checked_add(u64::from(i) * 16)?;
        let raw: RawDescriptor = mem.read_obj(GuestAddress(addr)).ok()?;
        Some(Descriptor::from(raw))
    };
    let mut out = Vec::new();
    let (mut table, mut size, mut i) = (desc_table, u32::from(ring_size), u32::from(head));
    let mut indirect = false;
    let mut steps = 0u32;
    loop {
        if i >= size {
            return None;
        }
        let d = read(table, i)?;
        if d.flags() & VRING_DESC_F_INDIRECT != 0 {
            // §2.7.5.3.1: no nested indirect tables; the table holds whole descriptors.
            if indirect || !out.is_empty() || !d.len().is_multiple_of(16) || d.len() == 0 {
                return None;
            }
            indirect = true;
            table = d.addr().0;
            size = d.len() / 16;
            i = 0;
            steps = 0;
            continue;
        }
        out.push(Desc { addr: d.addr().0, len: d.len(), writable: d.flags() & VRING_DESC_F_WRITE != 0 });
        steps += 1;
        if d.flags() & VRING_DESC_F_NEXT == 0 {
            return Some(out);
        }
        if steps >= size {
            return None; // a loop
        }
        i = u32::from(d.next());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_size_matches_libvhost_user() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1), 64);
        for qs in 1..600u16 {
            assert!(queue_region_size(qs) >= (HEADER + ENTRY * usize::from(qs)) as u64);
        }
    }

    #[test]
    fn fresh_then_out_of_order_then_recover() {
        let region = InflightRegion::create(2, 8).unwrap();
        let q = region.queue(1, 8).unwrap();
        let rec = q.recover(0, 0);
        assert_eq!(rec, Recovery { resubmit: vec![], next_counter: 1, next_avail: 0 });
        // Take heads 3, 5, 0, 6 (counters 1..4); complete 5 then 0 (out of order).
        for (c, h) in [3u16, 5, 0, 6].iter().enumerate() {
            q.start(*h, c as u64 + 1);
        }
        q.before_used(5);
        q.after_used(5, 1);
        q.before_used(0);
        // Died after the used ring index became 2 but before clearing head 0.
        let again = InflightRegion::open(&region.describe(), region.file().try_clone().unwrap()).unwrap();
        let q2 = again.queue(1, 8).unwrap();
        let rec = q2.recover(2, 0);
        assert_eq!(rec.resubmit, vec![3, 6]);
        assert_eq!(rec.next_avail, 4);
        assert_eq!(rec.next_counter, 5);
        // Queue 0 was never started: still fresh.
        assert!(again.queue(0, 8).unwrap().recover(7, 0).resubmit.is_empty());
        // Died before the used index moved: head 0 is resubmitted too.
        let q3 = region.queue(1, 8).unwrap();
        q3.start(1, 9);
        q3.before_used(1);
        let rec = q3.recover(2, 0);
        assert_eq!(rec.resubmit, vec![3, 6, 1]);
    }

    #[test]
    fn bad_regions_are_refused() {
        let region = InflightRegion::create(1, 8).unwrap();
        let mut msg = region.describe();
        msg.num_queues = 4;
        assert!(InflightRegion::open(&msg, region.file().try_clone().unwrap()).is_err());
        let mut msg = region.describe();
        msg.mmap_offset = 4096;
        assert!(InflightRegion::open(&msg, region.file().try_clone().unwrap()).is_err());
        assert!(region.queue(1, 8).is_err());
        assert!(region.queue(0, 16).is_err());
        // A garbage region never panics and never resubmits more than the ring holds.
        // SAFETY: writes within the mapping of `region` (len bytes).
        unsafe { std::ptr::write_bytes(region.ptr, 0xff, region.len) };
        let rec = region.queue(0, 8).unwrap().recover(3, 0);
        assert!(rec.resubmit.len() <= 8);
    }

    #[test]
    fn chain_walk() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let put = |at: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&b, GuestAddress(at)).unwrap();
        };
        // head 2 -> 5 -> 1 (end)
        put(2 * 16, 0x1000, 16, VRING_DESC_F_NEXT, 5);
        put(5 * 16, 0x2000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1);
        put(16, 0x3000, 1, VRING_DESC_F_WRITE, 0);
        let d = chain_descs(&mem, 0, 8, 2).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[1], Desc { addr: 0x2000, len: 512, writable: true });
        // A loop: 3 -> 3.
        put(3 * 16, 0x1000, 16, VRING_DESC_F_NEXT, 3);
        assert!(chain_descs(&mem, 0, 8, 3).is_none());
        assert!(chain_descs(&mem, 0, 8, 9).is_none());
        // Indirect: head 4 points at a table of two at 0x800.
        put(4 * 16, 0x800, 32, VRING_DESC_F_INDIRECT, 0);
        put(0x800, 0x1000, 16, VRING_DESC_F_NEXT, 1);
        put(0x810, 0x3000, 1, VRING_DESC_F_WRITE, 0);
        assert_eq!(chain_descs(&mem, 0, 8, 4).unwrap().len(), 2);
        // Table outside memory.
        assert!(chain_descs(&mem, 0xffff_0000, 8, 0).is_none());
    }
}
