//! Inflight I/O tracking at the vhost-user level, without a guest: the test plays the front end
//! (rust-vmm's vhost frontend) and "a previous back end that died". It builds a ring whose avail
//! ring holds four read requests, of which the dead back end had taken three and completed one
//! out of order (its used-ring entry written, its inflight entry not yet cleared: the "last
//! batch" case), and hands tessera-blk the inflight region the way QEMU does after a restart
//! (SET_INFLIGHT_FD, then SET_VRING_BASE with the used index). tessera-blk must resubmit the two
//! still in flight, in counter order, not run the completed one again, and then take the fourth
//! from the avail ring. Also: the region GET_INFLIGHT_FD returns has libvhost-user's size, and a
//! region too small for what it claims is refused while the back end keeps serving.

#[path = "vhost_user_client.rs"]
mod vhost_user_client;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::linux_guest::{built_binary, TempDir};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
use vhost_user_client::{AVAIL, DESC, USED};
const QSIZE: u16 = 32;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const T_IN: u32 = 0;

struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(dir: &Path, image: &Path) -> (Self, PathBuf) {
        let sock = dir.join("blk.sock");
        let log = dir.join("log");
        let child = Command::new(built_binary("tessera-blk").expect("tessera-blk binary"))
            .args(["--socket-path", sock.to_str().unwrap(), "--image", image.to_str().unwrap(), "--format", "raw"])
            // Every request on the queue thread, so completions come in submission order and the
            // used ring shows the resubmission order.
            .args(["--io-threads", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start tessera-blk");
        let b = Backend { child, log };
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "no socket: {}", b.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        (b, sock)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read request of one sector: header, data, status in descriptors head, head+1, head+2.
fn read_request(mem: &GuestMemoryMmap, head: u16, sector: u64) {
    let base = 0x10000 + u64::from(head) * 0x1000;
    let (hdr, data, status) = (base, base + 0x200, base + 0x400);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_slice(&[0xeeu8; 512], GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    for (k, (addr, len, flags)) in
        [(hdr, 16u32, F_NEXT), (data, 512, F_NEXT | F_WRITE), (status, 1, F_WRITE)].into_iter().enumerate()
    {
        let i = head + k as u16;
        let next = if flags & F_NEXT != 0 { i + 1 } else { 0 };
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(DESC + u64::from(i) * 16)).unwrap();
    }
}

fn status(mem: &GuestMemoryMmap, head: u16) -> u8 {
    mem.read_obj(GuestAddress(0x10000 + u64::from(head) * 0x1000 + 0x400)).unwrap()
}

fn data(mem: &GuestMemoryMmap, head: u16) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    mem.read_slice(&mut v, GuestAddress(0x10000 + u64::from(head) * 0x1000 + 0x200)).unwrap();
    v
}

/// Connects and negotiates what QEMU's vhost-user-blk does, inflight tracking included.
fn connect(sock: &Path) -> Frontend {
    let mut fe = Frontend::connect(sock, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features & (F_VERSION_1 | F_PROTOCOL_FEATURES)).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    assert!(proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD), "INFLIGHT_SHMFD not offered: {proto:?}");
    fe.set_protocol_features(proto & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::INFLIGHT_SHMFD))
        .unwrap();
    fe
}

#[test]
fn restart_resubmits_in_counter_order_and_skips_the_completed() {
    let dir = TempDir::new("blk-inflight-proto").unwrap();
    let img = dir.path().join("disk.raw");
    let content: Vec<u8> = (0..(64u32 << 10)).map(|i| (i.wrapping_mul(7) % 251) as u8).collect();
    fs::write(&img, &content).unwrap();
    let sector = |s: u64| content[(s as usize) * 512..(s as usize + 1) * 512].to_vec();
    let (backend, sock) = Backend::start(dir.path(), &img);

    // The region, as a first back end would have handed it out (GET_INFLIGHT_FD).
    let mut fe = connect(&sock);
    let (info, region) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).expect("GET_INFLIGHT_FD");
    // libvhost-user's size: align_up(16 * 32 + 2, 64).
    assert_eq!(info.mmap_size, 576, "region size");
    assert_eq!(info.num_queues, 1);
    assert_eq!(region.metadata().unwrap().len(), 576);
    drop(fe);

    // Guest memory and the ring the dead back end left: four reads on the avail ring (heads 0,
    // 3, 6, 9 of sectors 10, 20, 30, 40); it had taken the first three (counters 7, 5, 6: so
    // the order to resubmit is head 3, then head 6, then head 0... except that head 3 had been
    // completed: it is on the used ring (used idx 1) and the last batch, its entry not cleared).
    let shm = dir.path().join("guest.mem");
    let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&shm).unwrap();
    let mem = vhost_user_client::guest_memory(&file);
    for (head, s) in [(0u16, 10u64), (3, 20), (6, 30), (9, 40)] {
        read_request(&mem, head, s);
        let slot = u64::from(head / 3);
        mem.write_obj(head, GuestAddress(AVAIL + 4 + slot * 2)).unwrap();
    }
    mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
    // Head 3 completed by the dead back end: status OK, data it read, used elem, used idx 1.
    mem.write_obj(0u8, GuestAddress(0x10000 + 3 * 0x1000 + 0x400)).unwrap();
    mem.write_slice(&[0x33u8; 512], GuestAddress(0x10000 + 3 * 0x1000 + 0x200)).unwrap();
    mem.write_obj(3u32, GuestAddress(USED + 4)).unwrap();
    mem.write_obj(513u32, GuestAddress(USED + 8)).unwrap();
    mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
    // The region: version 1, desc_num 32, last_batch_head 3, used_idx 0 (the dead back end
    // died between the used ring update and clearing head 3).
    let header: Vec<u8> =
        [0u64.to_le_bytes().to_vec(), [1u16, QSIZE, 3, 0].iter().flat_map(|v| v.to_le_bytes()).collect()].concat();
    region.write_at(&header, 0).unwrap();
    for (head, counter) in [(0u16, 7u64), (3, 5), (6, 6)] {
        let mut e = [0u8; 16];
        e[0] = 1;
        e[8..16].copy_from_slice(&counter.to_le_bytes());
        region.write_at(&e, 16 + u64::from(head) * 16).unwrap();
    }

    // The restart, as QEMU 7.2 does it: SET_INFLIGHT_FD, then the rings with base = used idx.
    let mut fe = connect(&sock);
    fe.set_inflight_fd(&info, region.as_raw_fd()).expect("SET_INFLIGHT_FD");
    let (_call, _kick) = vhost_user_client::start_queue0(&mut fe, &mem, &file, QSIZE, 1);

    let used_idx = || mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    let start = Instant::now();
    while used_idx() != 4 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "used idx {} (want 4: 1 before + 2 resubmitted + 1 new)\n{}",
            used_idx(),
            backend.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(), 4, "more completions than requests\n{}", backend.log());
    let used: Vec<u32> = (1..4).map(|k| mem.read_obj(GuestAddress(USED + 4 + k * 8)).unwrap()).collect();
    // Head 6 (counter 6) before head 0 (counter 7), then the new one; head 3 not again.
    assert_eq!(used, vec![6, 0, 9], "used ring order\n{}", backend.log());
    for (head, s) in [(0u16, 10u64), (6, 30), (9, 40)] {
        assert_eq!(status(&mem, head), 0, "status of head {head}");
        assert_eq!(data(&mem, head), sector(s), "data of head {head}");
    }
    assert_eq!(data(&mem, 3), vec![0x33u8; 512], "the completed request ran again");
    assert!(backend.log().contains("resubmitting 2 request(s)"), "{}", backend.log());
    // The region now shows nothing in flight and follows the used ring.
    let mut h = [0u8; 16];
    region.read_at(&mut h, 0).unwrap();
    assert_eq!(u16::from_le_bytes([h[14], h[15]]), 4, "region used_idx");
    for head in 0..QSIZE {
        let mut e = [0u8; 1];
        region.read_at(&mut e, 16 + u64::from(head) * 16).unwrap();
        assert_eq!(e[0], 0, "head {head} still marked in flight");
    }
}

#[test]
fn too_small_region_is_refused_and_the_backend_keeps_serving() {
    let dir = TempDir::new("blk-inflight-bad").unwrap();
    let img = dir.path().join("disk.raw");
    fs::write(&img, vec![0u8; 64 << 10]).unwrap();
    let (mut backend, sock) = Backend::start(dir.path(), &img);
    let mut fe = connect(&sock);
    let (info, region) = fe.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QSIZE)).expect("GET_INFLIGHT_FD");
    // Claims four queues of 256 in a region made for one of 32.
    let bad = VhostUserInflight::new(info.mmap_size, 0, 4, 256);
    let refused = fe.set_inflight_fd(&bad, region.as_raw_fd()).is_err() || fe.get_features().is_err();
    assert!(refused, "a region too small for its queues was accepted\n{}", backend.log());
    drop(fe);
    let start = Instant::now();
    while !backend.log().contains("cannot hold 4 queue(s) of 256 descriptors") {
        assert!(start.elapsed() < Duration::from_secs(10), "no log line naming the sizes\n{}", backend.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(backend.child.try_wait().unwrap().is_none(), "backend exited\n{}", backend.log());
    let fe = connect(&sock);
    assert_ne!(fe.get_features().unwrap() & F_VERSION_1, 0, "next connection not served\n{}", backend.log());
}
