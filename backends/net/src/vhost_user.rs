//! The vhost-user adapter: features, config space, and the serve loop. Queue processing lives
//! in the network thread ([`crate::netloop`]); the worker thread here only forwards kicks.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::netloop::NetShared;
use crate::{Error, Result};

/// The device as it outlives any one connection.
pub struct NetDevice {
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub net: Arc<NetShared>,
}

/// Offloads a tap with a vnet header passes through (the kernel's tun does the work on the host
/// side: `virtio_net_hdr_to_skb`/`_from_skb`). No UFO: Linux's tun no longer accepts it.
const OFFLOADS: &[u32] = &[
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
];

/// MTU advertised with VIRTIO_NET_F_MTU: what libslirp and a default tap carry.
pub const MTU: u16 = 1500;

impl NetDevice {
    /// virtio-net feature bits (virtio 1.2 §5.1.3). Checksum and TCP segmentation offloads only
    /// with a tap that has a vnet header ([`OFFLOADS`]): libslirp (and a tap without the
    /// header) takes and gives complete frames.
    /// `VHOST_USER_F_PROTOCOL_FEATURES` is required by QEMU's vhost-user-net (see [`crate::relay`]
    /// for what that takes with rust-vmm's vhost).
    pub fn features(&self) -> u64 {
        let offloads = if self.net.offloads() { OFFLOADS.iter().fold(0u64, |f, b| f | 1 << b) } else { 0 };
        offloads
            | (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_MTU)
            | if self.queue_pairs > 1 { 1 << VIRTIO_NET_F_MQ } else { 0 }
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// `struct virtio_net_config` (§5.1.4): mac, status, max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&MTU.to_le_bytes());
        c
    }
}

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One connection's backend.
pub struct VhostNet {
    dev: Arc<NetDevice>,
    config: Vec<u8>,
}

impl VhostNet {
    pub fn new(dev: Arc<NetDevice>) -> Self {
        let config = dev.config_space();
        VhostNet { dev, config }
    }
}

impl VhostUserBackend for VhostNet {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        // RX and TX per pair (§5.1.2); the control queue, when a front end needs one, is
        // QEMU's own (it handles VIRTIO_NET_F_CTRL_VQ itself for vhost-user).
        2 * usize::from(self.dev.queue_pairs)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.features()
    }

    fn acked_features(&self, features: u64) {
        self.dev.net.set_mergeable(features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0);
        self.dev.net.set_guest_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG is not offered: QEMU's virtio-net keeps its own config space (mac= etc.) and
        // warns about a backend offering it; a front end of ours takes the MAC from the launcher.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on the queues; the network thread just uses them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(self.config.len());
        let end = (offset as usize).saturating_add(size as usize).min(self.config.len());
        out[..end - start].copy_from_slice(&self.config[start..end]);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // virtio-net's config space is read-only to the driver (§5.1.4).
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "virtio-net config space is read-only"))
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.dev.net.set_memory(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread: it only forwards kicks to the network thread.
        vec![(1u64 << self.num_queues()) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
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
        self.dev.net.set_vrings(vrings);
        self.dev.net.on_kick();
        Ok(())
    }
}

/// Serves `dev` on the vhost-user socket at `path`, one front end at a time, forever (bound
/// once; after a disconnect the next connection is accepted). Returns only if a socket cannot
/// be listened on.
pub fn serve(path: &Path, dev: Arc<NetDevice>) -> Result<()> {
    let listen_err = |e: io::Error| Error::Listen { path: path.to_owned(), reason: e.to_string() };
    if path.exists() {
        let _ = std::fs::remove_file(path);
    }
    let public = UnixListener::bind(path).map_err(listen_err)?;
    serve_listener(public, path, dev)
}

/// [`serve`] on an inherited listening socket (`--socket-fd`, bound by the launcher).
pub fn serve_fd(fd: RawFd, dev: Arc<NetDevice>) -> Result<()> {
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
    let public = unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    serve_listener(public, Path::new(&format!("socket fd {fd}")), dev)
}

/// The serve loop on a listening socket; `path` names it in log lines. Each connection goes
/// through [`crate::relay`] to the daemon over a private connection made by [`private_link`].
pub fn serve_listener(public: UnixListener, path: &Path, dev: Arc<NetDevice>) -> Result<()> {
    let mut serial = 0u64;
    loop {
        info!("waiting for a vhost-user front end on {}", path.display());
        let front = match public.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                error!("cannot accept a connection on {}: {e}", path.display());
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let (private, back) = match private_link(&mut serial) {
            Ok(l) => l,
            Err(e) => {
                error!("cannot connect the relay to the daemon: {e}");
                continue;
            }
        };
        let relay =
            std::thread::Builder::new().name("vu-relay-in".into()).spawn(move || crate::relay::run(front, back));
        if let Err(e) = relay {
            error!("cannot start the vhost-user relay: {e}");
            continue;
        }
        // The daemon accepts the one connection queued (ours); the listener and its name go right after.
        serve_connection(private, path, dev.clone())?;
        if let Ok(h) = relay {
            let _ = h.join();
        }
    }
}

/// Tries before [`private_link`] gives up: each failure means another process connected to the name first.
const PRIVATE_LINK_TRIES: u32 = 16;

/// A listener for rust-vmm's daemon and the relay's connection to it, queued and not yet accepted.
///
/// Why not a socketpair: vhost-user-backend 0.24's `VhostUserDaemon` takes its connection only from
/// `start(&mut Listener)` (accept) or `start_client(path)` (connect); the function that serves a given
/// stream is private. So a listener is needed, and in an empty read-only root only an abstract name
/// can be bound; under `--user` that name is in the host's network namespace, where any process can
/// connect to it (and read it from /proc/net/unix). What keeps others out:
/// - the listener exists for one connection only: bound here, dropped once the daemon accepted;
/// - its backlog is 0, so it holds at most one pending connection (af_unix refuses more while the
///   queue is not empty: `unix_recvq_full`), and the relay's own connect is non-blocking: it
///   succeeds only if the queue was empty, i.e. no other connection is ahead of it. Then the one
///   connection the daemon accepts is the relay's. If another process got in first, the connect
///   fails with EAGAIN, that listener is dropped (resetting the intruder) and a new name is tried.
pub fn private_link(serial: &mut u64) -> io::Result<(Listener, UnixStream)> {
    for _ in 0..PRIVATE_LINK_TRIES {
        *serial += 1;
        // Abstract names are limited to 107 bytes: name it by process and connection.
        let name = format!("tessera-net-{}-{}", std::process::id(), serial);
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        // SAFETY: listen on a descriptor we own; no pointer arguments.
        if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match connect_nonblocking(name.as_bytes()) {
            Ok(back) => {
                back.set_nonblocking(false)?;
                return Ok((listener.into(), back));
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                log::warn!("another process connected to the relay's private socket {name}: dropped, trying anew");
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "the relay's private socket was taken by another process {PRIVATE_LINK_TRIES} times in a row"
    )))
}

/// connect(2) to the abstract unix name `name` without waiting: EAGAIN when the listener's queue is full.
fn connect_nonblocking(name: &[u8]) -> io::Result<UnixStream> {
    // SAFETY: no pointer arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() just returned this descriptor; nothing else owns it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if name.len() + 1 > sun.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "abstract socket name too long"));
    }
    // sun_path[0] stays 0: an abstract name (unix(7)).
    for (d, b) in sun.sun_path[1..].iter_mut().zip(name) {
        *d = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: `sun` is a valid sockaddr_un and `len` does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(sock))
}

/// Accepts one connection on `listener`, closes the listener (its name goes with it) and serves the
/// connection until it ends. Ok(false) when none could be accepted.
pub fn serve_connection(mut listener: Listener, path: &Path, dev: Arc<NetDevice>) -> Result<bool> {
    let backend = Arc::new(VhostNet::new(dev.clone()));
    let mut daemon =
        VhostUserDaemon::new("tessera-net".to_owned(), backend, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
            .map_err(|e| Error::Daemon { path: path.to_owned(), reason: e.to_string() })?;
    if let Err(e) = daemon.start(&mut listener) {
        error!("cannot accept a connection on {}: {e}", path.display());
        return Ok(false);
    }
    drop(listener);
    info!("front end connected on {}", path.display());
    let result = daemon.wait();
    dev.net.detach();
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
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_private_link_lets_no_other_connection_reach_the_daemon() {
        let mut serial = 0;
        let (listener, mut back) = private_link(&mut serial).unwrap();
        let name = format!("tessera-net-{}-{serial}", std::process::id());
        // Another process cannot queue behind the relay's connection (backlog 0)...
        let intruder = connect_nonblocking(name.as_bytes()).map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(intruder, Err(Some(libc::EAGAIN)), "a second connection was queued");
        // ...so what the daemon accepts is the relay's.
        let mut accepted = listener.accept().unwrap().expect("a queued connection");
        back.write_all(b"relay").unwrap();
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"relay");
        // Once the daemon has accepted, the listener goes, and the name with it.
        drop(listener);
        let late = connect_nonblocking(name.as_bytes()).map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(late, Err(Some(libc::ECONNREFUSED)));
    }

    #[test]
    fn the_private_link_detects_a_connection_ahead_of_the_relays() {
        // An intruder that connects between bind and the relay's connect fills the one-place queue: the
        // relay's non-blocking connect then fails, and private_link moves on to a fresh name.
        let name = format!("tessera-net-test-{}", std::process::id());
        let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        // SAFETY: listen on a descriptor we own; no pointer arguments.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _intruder = connect_nonblocking(name.as_bytes()).unwrap();
        let relay = connect_nonblocking(name.as_bytes()).map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(relay, Err(Some(libc::EAGAIN)));
    }
}
