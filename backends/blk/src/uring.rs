//! One io_uring per queue thread for `O_DIRECT` reads and writes of raw images.
//!
//! Without it every `--direct` request crosses threads twice (queue thread → I/O pool → back),
//! since a direct transfer blocks for the device. With a ring the queue thread submits the
//! transfer itself, straight from guest memory, and learns of completions through an eventfd it
//! polls next to its kick: one thread, no hand-off, and a batch of completions is put on the used
//! ring and notified once. Everything else (page cache, qcow2, FLUSH, DISCARD, malformed
//! requests, buffers `O_DIRECT` cannot take) keeps the synchronous path.
//!
//! Where io_uring is unavailable (old kernel, disabled by sysctl or a seccomp policy that
//! answers EPERM/ENOSYS) the ring is not created, logged once, and the pool serves `--direct`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use log::warn;
use vm_memory::{GuestAddress, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::image::BlockIo;
use crate::request::{finish_rw, prepare_rw, process_request, Desc, DiskProps};

/// Guest buffers must be aligned like this for the ring (the logical block size of nearly every
/// device); others take the synchronous path, which bounces them.
const ALIGN: usize = 512;

static UNAVAILABLE_LOGGED: AtomicBool = AtomicBool::new(false);

/// A transfer in flight on the ring.
struct Slot {
    head: u16,
    /// Read by the kernel until completion; never touched meanwhile.
    iovs: Vec<libc::iovec>,
    write: bool,
    len: u32,
    status: GuestAddress,
    /// For a synchronous retry (short transfer, EINVAL from an alignment the device wants).
    descs: Vec<Desc>,
    /// Keeps the guest memory the iovecs point into mapped until completion.
    mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
}

// SAFETY: the raw pointers in `iovs` point into guest memory kept mapped by `mem`; a Slot is
// only used by the one queue thread that owns its ring.
unsafe impl Send for Slot {}

pub struct QueueRing {
    ring: IoUring,
    event: EventFd,
    fd: RawFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Pushed but not yet submitted.
    unsubmitted: bool,
}

impl QueueRing {
    /// A ring for a queue of `size` descriptors on `disk`, or None if the disk does not take
    /// direct submissions or io_uring is not available here.
    pub fn new(disk: &dyn BlockIo, size: u16) -> Option<QueueRing> {
        let fd = disk.direct_fd()?;
        let made = (|| -> io::Result<(IoUring, EventFd)> {
            // Operations submitted through a ring are not seen by seccomp: create it disabled,
            // restrict it to the two opcodes this path uses (and no further registrations), then
            // enable it (io_uring_register(2): IORING_REGISTER_RESTRICTIONS).
            let ring: IoUring = IoUring::builder().setup_r_disabled().build(u32::from(size).max(8))?;
            let event = EventFd::new(EFD_NONBLOCK)?;
            ring.submitter().register_eventfd(event.as_raw_fd())?;
            ring.submitter().register_restrictions(&mut [
                Restriction::sqe_op(opcode::Readv::CODE),
                Restriction::sqe_op(opcode::Writev::CODE),
            ])?;
            ring.submitter().register_enable_rings()?;
            Ok((ring, event))
        })();
        match made {
            Ok((ring, event)) => Some(QueueRing {
                ring,
                event,
                fd,
                slots: (0..size).map(|_| None).collect(),
                free: (0..usize::from(size)).rev().collect(),
                unsubmitted: false,
            }),
            Err(e) => {
                if !UNAVAILABLE_LOGGED.swap(true, Ordering::Relaxed) {
                    warn!("io_uring unavailable ({e}); --direct requests go through the I/O thread pool");
                }
                None
            }
        }
    }

    /// The eventfd that becomes readable when transfers complete.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues the request in `descs` on the ring if it is a read or write the ring can do;
    /// otherwise gives `descs` back for the synchronous path.
    pub fn push(
        &mut self,
        head: u16,
        descs: Vec<Desc>,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
        disk: &dyn BlockIo,
        props: &DiskProps,
    ) -> Result<(), Vec<Desc>> {
        let Some(req) = prepare_rw(mem, &descs, disk, props) else { return Err(descs) };
        let iovs: Vec<libc::iovec> = req
            .bufs
            .iter()
            .map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() })
            .collect();
        let aligned =
            iovs.iter().all(|v| (v.iov_base as usize).is_multiple_of(ALIGN) && v.iov_len.is_multiple_of(ALIGN));
        if !aligned || iovs.len() > libc::UIO_MAXIOV as usize {
            return Err(descs);
        }
        let Some(index) = self.free.pop() else { return Err(descs) };
        let (write, len, offset, status) = (req.write, req.len, req.offset, req.status);
        drop(req);
        let slot = Slot { head, iovs, write, len, status, descs, mem: mem.clone() };
        let (ptr, n) = (slot.iovs.as_ptr(), slot.iovs.len() as u32);
        let entry = if write {
            opcode::Writev::new(types::Fd(self.fd), ptr, n).offset(offset).build()
        } else {
            opcode::Readv::new(types::Fd(self.fd), ptr, n).offset(offset).build()
        }
        .user_data(index as u64);
        self.slots[index] = Some(slot);
        // SAFETY: the iovec array and the guest memory it points into live in `self.slots[index]`
        // (the Vec's heap buffer does not move, the guard keeps the mapping) until the
        // completion for `index` is reaped; the fd is the image's, open for the disk's lifetime.
        let mut pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        if !pushed {
            // Submission queue full: hand what is queued to the kernel and try once more.
            let _ = self.ring.submit();
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
        }
        if !pushed {
            let descs = self.slots[index].take().map(|s| s.descs).unwrap_or_default();
            self.free.push(index);
            return Err(descs);
        }
        self.unsubmitted = true;
        Ok(())
    }

    /// Hands queued transfers to the kernel.
    pub fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        match self.ring.submit() {
            Ok(_) => self.unsubmitted = false,
            // Left in the submission queue; the next submit (next kick or completion) retries.
            Err(e) => warn!("io_uring submit failed: {e}; retrying with the next batch"),
        }
    }

    /// Collects finished transfers: (head, used length) of each, status written.
    pub fn reap(&mut self, disk: &dyn BlockIo, props: &DiskProps) -> Vec<(u16, u32)> {
        let _ = self.event.read();
        let finished: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        let mut done = Vec::with_capacity(finished.len());
        for (key, res) in finished {
            let Some(slot) = usize::try_from(key).ok().and_then(|i| self.slots.get_mut(i)).and_then(Option::take)
            else {
                continue;
            };
            self.free.push(key as usize);
            let used = if res >= 0 && res as u32 == slot.len {
                finish_rw(&slot.mem, slot.write, slot.len, slot.status, Ok(()))
            } else if res >= 0 || res == -libc::EINVAL {
                // Short transfer, or an alignment this device wants beyond ours: the synchronous
                // path completes it (whole, again; it bounces what O_DIRECT cannot take).
                process_request(&slot.mem, &slot.descs, disk, props)
            } else {
                finish_rw(&slot.mem, slot.write, slot.len, slot.status, Err(io::Error::from_raw_os_error(-res)))
            };
            done.push((slot.head, used));
        }
        done
    }

    /// Waits until at least one transfer completes (for draining before the thread exits).
    pub fn wait_one(&mut self) {
        self.submit();
        if let Err(e) = self.ring.submit_and_wait(1) {
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("io_uring wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
