//! Output to a host descriptor from a thread of its own.
//!
//! The terminal, pipe or socket on the host side may be slow or stuck (a paused terminal, a socket client
//! that does not read). Writing from the event loop would then stop input handling too. So the event loop
//! only appends to a bounded queue, and a writer thread does blocking writes. Past the cap new output is
//! dropped (and the caller warns). This also leaves shared descriptors such as the launcher's stdout in
//! blocking mode: setting O_NONBLOCK on them would change them for every process sharing the terminal.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Largest chunk handed to one `write`.
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct State {
    target: Option<Arc<OwnedFd>>,
    /// Bumped by every target change, so an error from a write to an old target is not blamed on the new one.
    generation: u64,
    queue: VecDeque<u8>,
    /// The thread holds bytes it took from the queue and is writing them.
    busy: bool,
    stop: bool,
    error: Option<Errno>,
    /// When the thread last finished a write, or when bytes were queued while it was idle.
    last_progress: Option<Instant>,
    /// Bytes ever queued.
    pushed: u64,
    /// Bytes ever finished with: written, or discarded (target changed or failed). Always
    /// `pushed - queue.len() - (the chunk being written)`.
    done: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Work for the thread.
    wake: Condvar,
    /// The thread finished a write.
    progress: Condvar,
    /// Signalled by the thread after each write it finished, so the event loop can poll for progress (a
    /// condition variable cannot be polled). An eventfd: the sandbox allows them (eventfd2) and not socketpair.
    progress_fd: EventFd,
    /// Called by the thread with [`State::done`] after each write it finished (see [`HostWriter::on_done`]).
    on_done: Mutex<Option<DoneHook>>,
}

/// See [`HostWriter::on_done`].
pub type DoneHook = Box<dyn Fn(u64) + Send>;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across anything that can panic; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What happened to bytes given to [`HostWriter::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// No host descriptor is attached (a socket server without a client, a pty nobody opened): dropped, as
    /// QEMU drops output nobody can receive.
    NoTarget,
    /// The queue is full: dropped.
    Overflow,
}

pub struct HostWriter {
    shared: Arc<Shared>,
    cap: usize,
}

impl HostWriter {
    /// Start a writer thread named `name`, queueing at most `cap` bytes.
    pub fn spawn(name: &str, target: Option<Arc<OwnedFd>>, cap: usize) -> std::io::Result<Self> {
        let progress_fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State { target, ..State::default() }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            progress_fd,
            on_done: Mutex::new(None),
        });
        let worker = shared.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || run(&worker))?;
        Ok(Self { shared, cap })
    }

    /// Have the thread call `hook` with [`HostWriter::done`] right after each write it finished, before it
    /// signals [`HostWriter::progress_fd`]: what must follow a write closely (acknowledgements) need not wait
    /// for the event loop to be scheduled.
    pub fn on_done(&self, hook: DoneHook) {
        *self.shared.on_done.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Readable once the thread has finished a write since the last [`HostWriter::take_progress`].
    pub fn progress_fd(&self) -> BorrowedFd<'_> {
        self.shared.progress_fd.as_fd()
    }

    /// Clear [`HostWriter::progress_fd`]'s readiness.
    pub fn take_progress(&self) {
        // EAGAIN when there was none; nothing else can fail on an eventfd read.
        let _ = self.shared.progress_fd.read();
    }

    /// Bytes ever queued: the position in the output stream just after the last queued byte.
    pub fn pushed(&self) -> u64 {
        self.shared.lock().pushed
    }

    /// Bytes ever finished with (written, or discarded with the queue of a target that changed or failed):
    /// every position up to this one is done.
    pub fn done(&self) -> u64 {
        self.shared.lock().done
    }

    /// Queue `data` for the current target.
    pub fn push(&self, data: &[u8]) -> Pushed {
        if data.is_empty() {
            return Pushed::Queued;
        }
        let mut st = self.shared.lock();
        if st.target.is_none() {
            return Pushed::NoTarget;
        }
        if st.queue.len() + data.len() > self.cap {
            return Pushed::Overflow;
        }
        if st.queue.is_empty() && !st.busy {
            st.last_progress = Some(Instant::now());
        }
        st.queue.extend(data);
        st.pushed += data.len() as u64;
        self.shared.wake.notify_one();
        Pushed::Queued
    }

    /// Switch to a new target (or none); what was queued for the old one is discarded.
    pub fn set_target(&self, target: Option<Arc<OwnedFd>>) {
        let mut st = self.shared.lock();
        st.target = target;
        st.generation += 1;
        st.done += st.queue.len() as u64;
        st.queue.clear();
        st.error = None;
    }

    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// How long output has been waiting without the target taking any of it; `None` when nothing waits.
    pub fn stalled_for(&self, now: Instant) -> Option<std::time::Duration> {
        let st = self.shared.lock();
        if st.queue.is_empty() && !st.busy {
            return None;
        }
        st.last_progress.map(|t| now.saturating_duration_since(t))
    }

    pub fn has_target(&self) -> bool {
        self.shared.lock().target.is_some()
    }

    /// The error that made the thread give up on the current target, once.
    pub fn take_error(&self) -> Option<Errno> {
        self.shared.lock().error.take()
    }

    /// Wait until everything queued is written or `deadline` passes; true if it was all written.
    pub fn flush(&self, deadline: Instant) -> bool {
        let mut st = self.shared.lock();
        while !st.queue.is_empty() || st.busy {
            let now = Instant::now();
            if now >= deadline || st.target.is_none() {
                return st.queue.is_empty() && !st.busy;
            }
            st = self.shared.progress.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }
}

impl Drop for HostWriter {
    fn drop(&mut self) {
        // The thread may be blocked in a write that never finishes; it is not joined, and ends with the
        // process.
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

fn run(shared: &Shared) {
    loop {
        let (target, generation, chunk) = {
            let mut st = shared.lock();
            while st.queue.is_empty() && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.queue.is_empty() {
                return;
            }
            let n = st.queue.len().min(CHUNK);
            let chunk: Vec<u8> = st.queue.drain(..n).collect();
            st.busy = true;
            (st.target.clone(), st.generation, chunk)
        };
        let result = match &target {
            Some(fd) => write_all(fd, &chunk),
            None => Ok(()),
        };
        let mut st = shared.lock();
        st.busy = false;
        st.last_progress = Some(Instant::now());
        st.done += chunk.len() as u64;
        if let Err(e) = result {
            if st.generation == generation {
                st.target = None;
                st.done += st.queue.len() as u64;
                st.queue.clear();
                st.error = Some(e);
            }
        }
        let done = st.done;
        drop(st);
        shared.progress.notify_all();
        if let Some(hook) = &*shared.on_done.lock().unwrap_or_else(|p| p.into_inner()) {
            hook(done);
        }
        // Fails only if the counter would overflow, when a wake-up is pending anyway.
        let _ = shared.progress_fd.write(1);
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> Result<(), Errno> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            // The launcher may hand over a non-blocking descriptor: wait for room.
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn bytes_arrive_in_order_and_the_cap_drops() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let writer = HostWriter::spawn("test-writer", Some(Arc::new(w)), 8).unwrap();
        assert_eq!(writer.push(b"hello"), Pushed::Queued);
        // Whether these fit depends on how fast the thread takes "hello"; at most 8 bytes are ever queued.
        assert!(writer.flush(Instant::now() + Duration::from_secs(5)));
        assert_eq!(writer.push(b" world"), Pushed::Queued);
        assert_eq!(writer.push(b"123456789"), Pushed::Overflow);
        assert!(writer.flush(Instant::now() + Duration::from_secs(5)));
        assert_eq!((writer.pushed(), writer.done()), (11, 11), "the overflowing bytes were never queued");
        writer.set_target(None);
        assert_eq!(writer.push(b"lost"), Pushed::NoTarget);
        assert_eq!(writer.done(), 11);
        drop(writer);
        let mut got = Vec::new();
        std::fs::File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello world");
    }

    #[test]
    fn a_broken_target_is_reported_and_dropped() {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let writer = HostWriter::spawn("test-writer", Some(Arc::new(w)), 1024).unwrap();
        writer.push(b"nobody reads this");
        writer.flush(Instant::now() + Duration::from_secs(5));
        assert_eq!(writer.take_error(), Some(Errno::EPIPE));
        assert!(!writer.has_target());
        assert_eq!(writer.done(), 17, "failed bytes are done with too");
    }
}
