//! The core's vhost-user front end on its own (tessera-core as a library, no guest): a backend reached by path is
//! redialed by the core itself after it dies, and `reconnect_with` a path swaps a live device to another backend
//! (`x-tessera-backend-swap`). The test plays the driver: one virtqueue in guest RAM, virtio-blk requests put
//! in it by hand (virtio 1.2 §2.7 split ring, §5.2.6 request layout), completion read from the used ring.
//!
//! Checked: a request made while the backend is dead waits and completes once the restarted backend is back (with
//! no `VhostUserReconnect`: the core dials the path every 10 ms); after a swap to qemu-storage-daemon the next
//! request is served by it; the data is in the image.

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
    match next_event(&rx) {
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
