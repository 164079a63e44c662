//! The core's vhost-user front end on its own (tessera-core as a library, no guest): a backend reached by path is
//! redialed by the core itself after it dies, and `reconnect_with` a path swaps a live device to another backend
//! (`x-tessera-backend-swap`). The test plays the driver: one virtqueue in guest RAM, virtio-blk requests put
//! in it by hand (virtio 1.2 §2.7 split ring, §5.2.6 request layout), completion read from the used ring.
//!
//! Checked: a request made while the backend is dead waits and completes once the restarted backend is back (with
//! no `VhostUserReconnect`: the core dials the path every 10 ms); after a swap to qemu-storage-daemon the next
//! request is served by it; the data is in the image. And a backend's VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (on the
//! backend request channel) reaches the device's configuration notifier (a small backend written here:
//! qemu-storage-daemon 7.2 does not send one after `block_resize`).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_core::memory::GuestRam;
use tessera_core::virtio::vhost_user::{Connection, Event};
use tessera_core::virtio::vhost_user_blk::VhostUserBlk;
use tessera_core::virtio::{QueueConfig, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUFS: u64 = 0x10000;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Proc(Option<Child>);
impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tessera_blk(img: &Path, sock: &Path) -> Proc {
    let bin = match std::env::var_os("TESSERA_BLK") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().join("tessera-blk"),
    };
    let c = Command::new(&bin)
        .arg("--socket-path")
        .arg(sock)
        .arg("--image")
        .arg(img)
        .args(["--format", "raw", "--num-queues", "1", "--io-threads", "0", "--no-locking"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} (cargo build -p tessera-blk): {e}", bin.display()));
    Proc(Some(c))
}

fn qsd(img: &Path, sock: &Path) -> Option<Proc> {
    let c = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={},locking=off", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proc(Some(c)))
}

fn wait_listening(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {}", sock.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Request `n`: write `data` (512 bytes) to `sector`. Three descriptors: header, data, status.
fn submit(ram: &GuestRam, kick: &EventFd, n: u16, sector: u64, data: &[u8; 512]) {
    let m = ram.memory();
    let buf = BUFS + u64::from(n) * 0x1000;
    // struct virtio_blk_req header: type (1 = OUT), reserved, sector.
    m.write_obj(1u32, GuestAddress(buf)).unwrap();
    m.write_obj(0u32, GuestAddress(buf + 4)).unwrap();
    m.write_obj(sector, GuestAddress(buf + 8)).unwrap();
    m.write_slice(data, GuestAddress(buf + 0x100)).unwrap();
    m.write_obj(0xffu8, GuestAddress(buf + 0x400)).unwrap();
    let head = (n * 3) % QSIZE;
    let parts: [(u64, u32, u16); 3] = [(buf, 16, 1), (buf + 0x100, 512, 1), (buf + 0x400, 1, 2)];
    for (i, (addr, len, flags)) in parts.iter().enumerate() {
        let d = DESC + u64::from((head + i as u16) % QSIZE) * 16;
        m.write_obj(*addr, GuestAddress(d)).unwrap();
        m.write_obj(*len, GuestAddress(d + 8)).unwrap();
        m.write_obj(*flags, GuestAddress(d + 12)).unwrap();
        m.write_obj((head + i as u16 + 1) % QSIZE, GuestAddress(d + 14)).unwrap();
    }
    let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    m.write_obj(head, GuestAddress(AVAIL + 4 + u64::from(idx % QSIZE) * 2)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
}

/// Wait until the used index reaches `want`; the status byte of request `n` must be 0 (OK).
fn completed(ram: &GuestRam, n: u16, want: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let used: u16 = ram.memory().read_obj(GuestAddress(USED + 2)).unwrap();
        if used == want {
            let status: u8 = ram.memory().read_obj(GuestAddress(BUFS + u64::from(n) * 0x1000 + 0x400)).unwrap();
            assert_eq!(status, 0, "status of request {n}");
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn sector_of(img: &Path, sector: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    std::fs::File::open(img).unwrap().read_exact_at(&mut b, sector * 512).unwrap();
    b
}

fn next_event(rx: &mpsc::Receiver<Event>) -> Event {
    rx.recv_timeout(Duration::from_secs(20)).expect("an event from the supervisor")
}

/// The next event other than `RestoreFailed`: while a backend restarts, a redial can reach the dying process's
/// listener (its backlog is reset when the process finishes exiting); the core reports that and dials again.
fn next_outcome(rx: &mpsc::Receiver<Event>) -> Event {
    loop {
        match next_event(rx) {
            Event::RestoreFailed { reason } => eprintln!("a restore attempt failed, the core retries: {reason}"),
            other => return other,
        }
    }
}

#[test]
fn the_core_redials_a_restarted_backend_and_swaps_to_another() {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = Dir(std::env::temp_dir().join(format!("tessera-vu-redial-{}-{n}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let img = dir.0.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let sock_a = dir.0.join("a.sock");
    let mut blk = tessera_blk(&img, &sock_a);
    wait_listening(&sock_a);

    let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
    let name = "-device vhost-user-blk-pci,chardev=c0".to_string();
    let mut dev = VhostUserBlk::connect(name, Connection::Path(sock_a.display().to_string()), 1, ram.clone())
        .expect("connect to tessera-blk");
    let vu = dev.vhost_user().clone();
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    vu.supervise(Arc::new(move |e| {
        let _ = tx.lock().unwrap().send(e);
    }))
    .unwrap();
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let call = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let q = QueueConfig {
        index: 0,
        size: QSIZE,
        desc: DESC,
        driver: AVAIL,
        device: USED,
        kick: kick.clone(),
        call: call.clone(),
    };
    let version_1 = 1u64 << 32;
    assert_ne!(dev.features() & version_1, 0);
    dev.activate(version_1, vec![q]).expect("activate");

    submit(&ram, &kick, 0, 1, &[0x11; 512]);
    assert!(completed(&ram, 0, 1, Duration::from_secs(10)), "request 0 completed");
    assert_eq!(sector_of(&img, 1), [0x11; 512]);

    // The backend dies; a request made meanwhile waits.
    blk.kill();
    assert!(matches!(next_event(&rx), Event::Disconnected { .. }));
    submit(&ram, &kick, 1, 2, &[0x22; 512]);
    assert!(!completed(&ram, 1, 2, Duration::from_millis(200)), "nothing serves the queue while the backend is dead");
    let restarted = Instant::now();
    let _blk2 = tessera_blk(&img, &sock_a);
    match next_outcome(&rx) {
        Event::Reconnected { stall, in_flight } => {
            eprintln!(
                "redialed: stall {} ms, {} ms after the restart began, {in_flight} request(s) waiting",
                stall.as_millis(),
                restarted.elapsed().as_millis()
            );
            assert_eq!(in_flight, 1);
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    assert!(completed(&ram, 1, 2, Duration::from_secs(10)), "the waiting request completed after the restart");
    assert_eq!(sector_of(&img, 2), [0x22; 512]);

    // Swap to qemu-storage-daemon on the same image while tessera-blk serves.
    let sock_b = dir.0.join("b.sock");
    let Some(_q) = qsd(&img, &sock_b) else {
        eprintln!("SKIPPED the swap: qemu-storage-daemon is absent (qemu-utils)");
        return;
    };
    wait_listening(&sock_b);
    vu.reconnect_with(Connection::Path(sock_b.display().to_string()));
    assert!(matches!(next_event(&rx), Event::Disconnected { .. }));
    match next_event(&rx) {
        Event::Reconnected { stall, .. } => eprintln!("swapped: stall {} ms", stall.as_millis()),
        other => panic!("expected Reconnected, got {other:?}"),
    }
    submit(&ram, &kick, 2, 3, &[0x33; 512]);
    assert!(completed(&ram, 2, 3, Duration::from_secs(10)), "qemu-storage-daemon served the request after the swap");
    assert_eq!(sector_of(&img, 3), [0x33; 512]);
    // The device's configuration now comes from the new backend too.
    let mut cap = [0u8; 8];
    dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048, "capacity in sectors through GET_CONFIG");
}

/// A minimal vhost-user-blk backend written for this test (qemu-storage-daemon 7.2 does not announce a resize
/// to its front end): it negotiates, answers GET_CONFIG with the capacity the test sets, keeps the backend request
/// channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ) and sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on it when asked.
mod fake_backend {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};

    // vhost-user spec, "Front-end message types" / "Back-end message types" / header flags.
    const GET_FEATURES: u32 = 1;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const GET_QUEUE_NUM: u32 = 17;
    const SET_BACKEND_REQ_FD: u32 = 21;
    const GET_CONFIG: u32 = 24;
    const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
    const VERSION: u32 = 1;
    const REPLY: u32 = 4;
    const NEED_REPLY: u32 = 8;
    /// VERSION_1 and VHOST_USER_F_PROTOCOL_FEATURES.
    const FEATURES: u64 = 1 << 32 | 1 << 30;
    /// MQ, BACKEND_REQ, CONFIG.
    const PROTOCOL: u64 = 1 | 1 << 5 | 1 << 9;

    /// Header and attached descriptors of one message (SCM_RIGHTS), then its payload.
    fn recv(s: &mut UnixStream) -> Option<(u32, u32, Vec<u8>, Vec<OwnedFd>)> {
        let mut hdr = [0u8; 12];
        let mut iov = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: 12 };
        let mut cbuf = [0u64; 16];
        // SAFETY: zero is a valid msghdr; the pointers below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: a valid socket and msghdr.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_WAITALL) };
        if n != 12 {
            return None;
        }
        let mut fds = Vec::new();
        // SAFETY: walking the control messages the kernel wrote into `cbuf`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<i32>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for k in 0..count {
                        fds.push(OwnedFd::from_raw_fd(data.add(k).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let word = |k: usize| u32::from_le_bytes(hdr[k * 4..k * 4 + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(2) as usize];
        s.read_exact(&mut payload).ok()?;
        Some((word(0), word(1), payload, fds))
    }

    fn send(s: &mut impl Write, request: u32, flags: u32, payload: &[u8]) {
        let mut m = Vec::new();
        for w in [request, flags, payload.len() as u32] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(payload);
        s.write_all(&m).unwrap();
    }

    /// Serve `stream`; every message on `change` makes the backend announce a configuration change.
    pub fn serve(mut stream: UnixStream, capacity: Arc<AtomicU64>, change: mpsc::Receiver<()>) {
        let mut change = Some(change);
        while let Some((req, flags, payload, mut fds)) = recv(&mut stream) {
            let reply = |s: &mut UnixStream, body: &[u8]| send(s, req, VERSION | REPLY, body);
            match req {
                GET_FEATURES => reply(&mut stream, &FEATURES.to_le_bytes()),
                GET_PROTOCOL_FEATURES => reply(&mut stream, &PROTOCOL.to_le_bytes()),
                GET_QUEUE_NUM => reply(&mut stream, &1u64.to_le_bytes()),
                GET_CONFIG => {
                    // offset, size, flags, then `size` bytes of struct virtio_blk_config (capacity first).
                    let size = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
                    let mut body = payload[..12].to_vec();
                    let mut cfg = vec![0u8; size];
                    cfg[..8].copy_from_slice(&capacity.load(Ordering::SeqCst).to_le_bytes());
                    body.extend_from_slice(&cfg);
                    reply(&mut stream, &body);
                }
                SET_BACKEND_REQ_FD => {
                    let mut ch = UnixStream::from(fds.pop().expect("SET_BACKEND_REQ_FD carries a descriptor"));
                    if let Some(change) = change.take() {
                        std::thread::spawn(move || {
                            while change.recv().is_ok() {
                                send(&mut ch, BACKEND_CONFIG_CHANGE_MSG, VERSION, &[]);
                            }
                        });
                    }
                }
                _ => {
                    if flags & NEED_REPLY != 0 {
                        reply(&mut stream, &0u64.to_le_bytes());
                    }
                }
            }
        }
    }
}

#[test]
fn a_configuration_change_announced_by_the_backend_reaches_the_device() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (front, back) = std::os::unix::net::UnixStream::pair().unwrap();
    let capacity = Arc::new(AtomicU64::new(2048));
    let (change_tx, change_rx) = mpsc::channel();
    {
        let capacity = capacity.clone();
        std::thread::spawn(move || fake_backend::serve(back, capacity, change_rx));
    }
    let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
    let name = "-device vhost-user-blk-pci,chardev=c0".to_string();
    let mut dev = VhostUserBlk::connect(name, Connection::Stream(front), 1, ram).expect("connect to the fake backend");
    assert!(dev.vhost_user().protocol_features().contains(vhost::vhost_user::VhostUserProtocolFeatures::BACKEND_REQ));
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    dev.set_config_notifier(Arc::new(move || {
        let _ = tx.lock().unwrap().send(());
    }));
    let read_capacity = |dev: &mut VhostUserBlk| {
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        u64::from_le_bytes(cap)
    };
    assert_eq!(read_capacity(&mut dev), 2048);
    capacity.store(4096, Ordering::SeqCst);
    change_tx.send(()).unwrap();
    rx.recv_timeout(Duration::from_secs(10)).expect("VHOST_USER_BACKEND_CONFIG_CHANGE_MSG reached the device");
    assert_eq!(read_capacity(&mut dev), 4096, "the new capacity through GET_CONFIG");
}
