//! The network thread: it creates the host side (libslirp or a tap), polls it, and moves frames
//! between it and the guest's queues; it outlives vhost-user connections, so user-mode
//! connections and hostfwd listeners survive a front-end reconnect.
//!
//! The host side and the frames waiting for the guest live in a [`Pump`] under a mutex, so that
//! other threads can reach the host side (the tap's offload settings when the driver acks its
//! features). vhost-user-backend's worker thread reads the queue kicks and wakes the network
//! thread, which does the queue work ([`NetShared::on_kick`]). Serving the kick on the worker
//! itself (one thread hop less per kick) was tried and measured: it was not faster, rather
//! slower, against QEMU's own `-netdev user` in the same runs (docs/benchmarks.md), so the
//! network thread keeps all of it. It never holds the mutex while it sleeps in `poll`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{HostSide, UserConfig};
use crate::frame::{
    deliver_rx, deliver_rx_with, process_tx_with, RxOutcome, TxMode, MAX_GSO_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN,
};
use crate::slirp::Slirp;
use crate::tap::{Tap, RX_BUF_LEN};
use crate::{Error, Result};

/// Frames for the guest waiting for RX buffers: above this, host sockets (or the tap) are not
/// read until the guest takes some, which is what pushes back on the host-side TCP senders.
const BACKLOG_HIGH: usize = 256;

/// What the vhost-user side hands the network thread for the current connection.
#[derive(Default)]
struct Attachment {
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    vrings: Option<Vec<VringRwLock>>,
    mergeable: bool,
    /// VIRTIO_NET_F_GUEST_CSUM negotiated: a tap's header flags may reach the guest (without it
    /// the device must set them to 0, §5.1.6.4).
    guest_csum: bool,
}

/// The host side and the frames for the guest that wait for RX buffers.
struct Pump {
    host: Host,
    backlog: VecDeque<Vec<u8>>,
}

impl Pump {
    /// TX to the host side, then whatever the host side has for the guest into RX buffers.
    /// Returns whether a frame moved.
    fn run(&mut self, att: &NetShared) -> bool {
        let (mem, vrings, mergeable, guest_csum) = {
            let a = att.lock();
            (a.mem.clone(), a.vrings.clone(), a.mergeable, a.guest_csum)
        };
        match (mem, vrings) {
            (Some(mem), Some(vrings)) if vrings.len() >= 2 => {
                let mem = mem.memory();
                let vnet = self.host.vnet_hdr().then_some(guest_csum);
                // TX first: what the guest sent may produce answers (ARP, ACKs) to deliver. Every
                // pair's transmitq feeds the one host side; frames for the guest all go to
                // receiveq1, which any number of pairs in use includes (virtio 1.2 §5.1.6.5.5: the
                // device must not use receive queues beyond the pairs set; pair 1 is always one).
                let mut sent = 0;
                for tx in vrings.iter().skip(1).step_by(2) {
                    sent += transmit(tx, &mem, &mut self.host);
                    if self.host.tx_blocked() {
                        break;
                    }
                }
                self.host.take_output(&mut self.backlog);
                let received = receive(&vrings[0], &mem, &mut self.backlog, mergeable, vnet);
                sent + received > 0
            }
            _ => {
                // No guest attached: nothing can take frames.
                self.host.take_output(&mut self.backlog);
                self.backlog.clear();
                false
            }
        }
    }
}

/// Shared between the vhost-user adapter and the network thread.
pub struct NetShared {
    att: Mutex<Attachment>,
    wake: EventFd,
    /// Set by the network thread once the host side exists.
    pump: Mutex<Option<Pump>>,
}

impl NetShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Attachment> {
        self.att.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        self.lock().mem = Some(mem);
        self.kick();
    }

    pub fn set_vrings(&self, vrings: &[VringRwLock]) {
        log::trace!("kick");
        let mut a = self.lock();
        if a.vrings.is_none() {
            a.vrings = Some(vrings.to_vec());
        }
    }

    pub fn set_mergeable(&self, on: bool) {
        self.lock().mergeable = on;
    }

    /// Forgets the connection: frames for the guest are dropped until the next one.
    pub fn detach(&self) {
        *self.lock() = Attachment::default();
    }

    fn pump(&self) -> std::sync::MutexGuard<'_, Option<Pump>> {
        self.pump.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A queue was kicked: the network thread serves it (see the module comment for why not the
    /// calling worker thread).
    pub fn on_kick(&self) {
        self.kick();
    }

    /// Whether the host side can take and give offloaded frames (a tap with a vnet header).
    pub fn offloads(&self) -> bool {
        self.pump().as_ref().is_some_and(|p| p.host.vnet_hdr())
    }

    /// The guest's negotiated features: a tap is told which offloads the guest takes
    /// (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN → TUN_F_*), so it hands over only frames the guest
    /// can receive.
    pub fn set_guest_features(&self, features: u64) {
        use virtio_bindings::virtio_net::*;
        self.lock().guest_csum = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let mut flags = 0;
        if features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0 {
            flags |= crate::tap::TUN_F_CSUM;
            if features & (1 << VIRTIO_NET_F_GUEST_TSO4) != 0 {
                flags |= crate::tap::TUN_F_TSO4;
            }
            if features & (1 << VIRTIO_NET_F_GUEST_TSO6) != 0 {
                flags |= crate::tap::TUN_F_TSO6;
            }
            if features & (1 << VIRTIO_NET_F_GUEST_ECN) != 0 {
                flags |= crate::tap::TUN_F_TSO_ECN;
            }
        }
        if let Some(Pump { host: Host::Tap { tap, .. }, .. }) = self.pump().as_ref() {
            if let Err(e) = tap.set_offload(flags) {
                warn!("cannot set the tap's offloads to {flags:#x}: {e}");
            }
        }
    }

    /// Wakes the network thread (a queue was kicked, or the connection changed).
    pub fn kick(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the network thread: {e}");
        }
    }
}

/// The host side of the device.
enum Host {
    User(Box<Slirp>),
    Tap { tap: Tap, tx_blocked: bool, out: VecDeque<Vec<u8>>, buf: Box<[u8; RX_BUF_LEN]> },
}

impl Host {
    fn send(&mut self, frame: &[u8]) -> bool {
        match self {
            Host::User(s) => {
                s.input(frame);
                true
            }
            Host::Tap { tap, tx_blocked, .. } => {
                let ok = tap.send(frame);
                *tx_blocked = !ok;
                ok
            }
        }
    }

    /// Frames to and from the host side carry the virtio-net header (a tap with IFF_VNET_HDR).
    fn vnet_hdr(&self) -> bool {
        matches!(self, Host::Tap { tap, .. } if tap.vnet_hdr())
    }

    fn tx_blocked(&self) -> bool {
        matches!(self, Host::Tap { tx_blocked: true, .. })
    }

    fn take_output(&mut self, backlog: &mut VecDeque<Vec<u8>>) {
        match self {
            Host::User(s) => {
                let (frames, dropped) = s.take_output();
                if dropped > 0 {
                    warn!("{dropped} frames for the guest dropped: too many waiting for RX buffers");
                }
                backlog.extend(frames);
            }
            Host::Tap { out, .. } => backlog.append(out),
        }
    }

    /// Adds the host side's descriptors; returns the index of the first.
    fn fill(&mut self, fds: &mut Vec<libc::pollfd>, timeout_ms: &mut u32, want_input: bool) -> usize {
        match self {
            Host::User(s) => {
                if want_input {
                    s.fill_pollfds(fds, timeout_ms)
                } else {
                    fds.len()
                }
            }
            Host::Tap { tap, tx_blocked, .. } => {
                let mut events = 0;
                if want_input {
                    events |= libc::POLLIN;
                }
                if *tx_blocked {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd { fd: tap.fd(), events, revents: 0 });
                fds.len() - 1
            }
        }
    }

    fn handle(&mut self, fds: &[libc::pollfd], first: usize, polled_input: bool, failed: bool) {
        match self {
            Host::User(s) => {
                if polled_input {
                    s.handle_pollfds(fds, first, failed);
                }
                s.run_timers();
            }
            Host::Tap { tap, tx_blocked, out, buf } => {
                let Some(p) = fds.get(first) else {
                    return;
                };
                if p.revents & libc::POLLOUT != 0 {
                    *tx_blocked = false;
                }
                if p.revents & libc::POLLIN != 0 {
                    let min = if tap.vnet_hdr() { VNET_HDR_LEN + MIN_FRAME_LEN } else { 1 };
                    while out.len() < BACKLOG_HIGH {
                        match tap.recv(buf) {
                            Some(n) if n < min => continue,
                            Some(n) => out.push_back(buf[..n].to_vec()),
                            None => break,
                        }
                    }
                }
            }
        }
    }
}

/// Starts the network thread for `host`; returns once the host side is set up (or failed).
pub fn start(host: HostSide) -> Result<Arc<NetShared>> {
    let shared = Arc::new(NetShared {
        att: Mutex::new(Attachment::default()),
        wake: EventFd::new(EFD_NONBLOCK).map_err(Error::NetThread)?,
        pump: Mutex::new(None),
    });
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("net".into())
        .spawn(move || {
            // The host side is created here; from now on it is used under `pump`'s mutex.
            let host = match host {
                HostSide::User(c) => user(&c).map(|s| Host::User(Box::new(s))),
                HostSide::Tap(name) => Tap::open(&name).map(new_tap),
                HostSide::TapFd(fd) => Tap::from_fd(fd).map(new_tap),
            };
            match host {
                Ok(h) => {
                    *thread_shared.pump() = Some(Pump { host: h, backlog: VecDeque::new() });
                    let _ = tx.send(Ok(()));
                    run(&thread_shared);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(Error::NetThread)?;
    rx.recv().map_err(|_| Error::NetThread(std::io::Error::other("the network thread died while starting")))??;
    Ok(shared)
}

fn new_tap(tap: Tap) -> Host {
    Host::Tap { tap, tx_blocked: false, out: VecDeque::new(), buf: Box::new([0; RX_BUF_LEN]) }
}

fn user(c: &UserConfig) -> Result<Slirp> {
    let s = Slirp::new(c)?;
    info!(
        "user networking (libslirp {}): network {}/{}, host {}, DNS {}, first DHCP address {}{}",
        Slirp::version(),
        c.net,
        c.mask,
        c.host,
        c.dns,
        c.dhcp_start,
        if c.restrict { ", restricted" } else { "" }
    );
    for f in &c.hostfwd {
        info!(
            "hostfwd {} {}:{} -> {}:{}",
            if f.udp { "udp" } else { "tcp" },
            f.host_addr,
            f.host_port,
            f.guest_addr.unwrap_or(c.dhcp_start),
            f.guest_port
        );
    }
    Ok(s)
}

/// Whether a vring may be used now: set up by the front end and not stopped. Checked under
/// the vring's lock, which GET_VRING_BASE takes to clear `ready`, so a stopped queue is never
/// touched after the front end read its state.
fn usable(st: &vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemoryMmap>>) -> bool {
    st.get_queue().ready() && st.is_enabled()
}

fn run(shared: &NetShared) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        let (first, want_input, timeout_ms) = {
            let mut guard = shared.pump();
            let Some(p) = guard.as_mut() else { return };
            p.run(shared);
            fds.clear();
            fds.push(libc::pollfd { fd: shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            let mut timeout_ms: u32 = 1000;
            let want_input = p.backlog.len() < BACKLOG_HIGH;
            let first = p.host.fill(&mut fds, &mut timeout_ms, want_input);
            (first, want_input, timeout_ms)
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms as libc::c_int) };
        let failed = n < 0;
        if failed {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!("poll failed: {e}");
            }
            for f in fds.iter_mut() {
                f.revents = 0;
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = shared.wake.read();
        }
        if let Some(p) = shared.pump().as_mut() {
            p.host.handle(&fds, first, want_input, failed);
        }
    }
}

use std::os::fd::AsRawFd;

/// Sends every frame the guest made available on TX, re-checking after re-enabling
/// notifications so a frame added in between is not left waiting (virtio 1.2 §2.7.10).
/// Returns the number of chains taken.
fn transmit(vring: &VringRwLock, mem: &GuestMemoryMmap, host: &mut Host) -> usize {
    let mut st = vring.get_mut();
    if !usable(&st) {
        return 0;
    }
    let mut done = 0;
    let mode = if host.vnet_hdr() { TxMode::VnetHdr } else { TxMode::Plain };
    loop {
        let q = st.get_queue_mut();
        let _ = q.disable_notification(mem);
        match process_tx_with(q, mem, mode, |f| {
            log::trace!("TX frame of {} bytes", f.len());
            host.send(f)
        }) {
            Ok(n) => done += n,
            Err(e) => {
                crate::ratelimit::guest_error(format_args!("TX queue unusable: {e}"));
                break;
            }
        }
        if host.tx_blocked() {
            // Resumed when the host side is writable again; no kick needed meanwhile.
            break;
        }
        match q.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    if done > 0 && st.get_queue_mut().needs_notification(mem).unwrap_or(true) {
        if let Err(e) = st.signal_used_queue() {
            warn!("cannot signal the TX queue: {e}");
        }
    }
    done
}

/// Delivers waiting frames into RX buffers. When buffers run out, notifications are enabled so
/// the driver's next kick (after it adds buffers) wakes us.
/// Returns the number of frames delivered.
/// With `vnet` Some, each frame starts with the tap's virtio-net header, which reaches the guest
/// if `vnet` is Some(true) (GUEST_CSUM negotiated) and is replaced by zeros otherwise.
fn receive(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    backlog: &mut VecDeque<Vec<u8>>,
    mergeable: bool,
    vnet: Option<bool>,
) -> usize {
    if backlog.is_empty() {
        return 0;
    }
    let mut st = vring.get_mut();
    if !usable(&st) {
        return 0;
    }
    let mut used = 0usize;
    loop {
        let q = st.get_queue_mut();
        while let Some(f) = backlog.front() {
            let outcome = match (vnet, f.split_first_chunk::<VNET_HDR_LEN>()) {
                (Some(true), Some((hdr, frame))) => deliver_rx_with(q, mem, *hdr, frame, mergeable, MAX_GSO_FRAME_LEN),
                (Some(false), Some((_, frame))) => deliver_rx(q, mem, frame, mergeable),
                _ => deliver_rx(q, mem, f, mergeable),
            };
            log::trace!("RX frame of {} bytes: {outcome:?}", f.len());
            match outcome {
                RxOutcome::Delivered(_) => used += 1,
                RxOutcome::Dropped => {}
                RxOutcome::NoBuffers => break,
            }
            backlog.pop_front();
        }
        if backlog.is_empty() {
            let _ = q.disable_notification(mem);
            break;
        }
        match q.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    if used > 0 && st.get_queue_mut().needs_notification(mem).unwrap_or(true) {
        if let Err(e) = st.signal_used_queue() {
            warn!("cannot signal the RX queue: {e}");
        }
    }
    used
}
