//! tessera-blk at the vhost-user protocol level, with hand-built messages (no rust-vmm code on
//! the client side): a malformed message closes only that connection, with a log line, and the
//! backend serves the next connection; the features and config space it reports are right.

#[path = "vhost_user_client.rs"]
mod vhost_user_client;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_tests::linux_guest::{built_binary, TempDir};

const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
/// Header flag: protocol version 1 (vhost-user spec, "Header").
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;

const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_MQ: u64 = 1 << 12;
const PROTOCOL_F_MQ: u64 = 1 << 0;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_F_CONFIG: u64 = 1 << 9;
const PROTOCOL_F_INFLIGHT_SHMFD: u64 = 1 << 12;

struct Backend {
    child: Child,
    dir: PathBuf,
}

impl Backend {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> (Self, PathBuf) {
        let sock = dir.join("blk.sock");
        let child = Command::new(built_binary("tessera-blk").expect("tessera-blk binary"))
            .arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(image)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("log")).expect("log"))
            .spawn()
            .expect("start tessera-blk");
        let b = Backend { child, dir: dir.to_owned() };
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(20), "no socket: {}", b.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        (b, sock)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn send(s: &mut UnixStream, request: u32, payload: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&VERSION_1.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).expect("send");
}

fn reply(s: &mut UnixStream, request: u32) -> Vec<u8> {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).expect("reply header");
    let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    assert_eq!(code, request, "reply to another request");
    assert_ne!(flags & REPLY, 0, "reply flag not set");
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).expect("reply body");
    body
}

fn get_u64(s: &mut UnixStream, request: u32) -> u64 {
    send(s, request, &[]);
    let body = reply(s, request);
    u64::from_le_bytes(body[..8].try_into().expect("8-byte reply"))
}

fn image(dir: &Path, mib: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    let f = fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

#[test]
fn malformed_message_closes_only_that_connection() {
    let dir = TempDir::new("blk-vu-bad").unwrap();
    let img = image(dir.path(), 8);
    let (mut backend, sock) = Backend::start(dir.path(), &img, &["--format", "raw"]);

    // A header announcing a payload far beyond the protocol's maximum, then garbage.
    let mut bad = connect(&sock);
    let mut msg = Vec::new();
    msg.extend_from_slice(&GET_FEATURES.to_le_bytes());
    msg.extend_from_slice(&VERSION_1.to_le_bytes());
    msg.extend_from_slice(&0x7fff_ffffu32.to_le_bytes());
    msg.extend_from_slice(&[0xa5; 64]);
    bad.write_all(&msg).unwrap();
    let mut buf = [0u8; 16];
    // The backend closes the connection: EOF (or a reset), never a reply.
    match bad.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("got {n} bytes in reply to a malformed message"),
    }
    assert!(
        backend.wait_log("closing the vhost-user connection"),
        "no log line for the malformed message:\n{}",
        backend.log()
    );

    // An unknown request code on a fresh connection: same treatment.
    let mut bad = connect(&sock);
    send(&mut bad, 0xdead, &[]);
    match bad.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("got {n} bytes in reply to an unknown request"),
    }

    // The backend keeps serving: the next connection gets answers.
    let mut good = connect(&sock);
    let features = get_u64(&mut good, GET_FEATURES);
    assert_ne!(features & F_VERSION_1, 0);
    assert!(backend.child.try_wait().unwrap().is_none(), "backend exited:\n{}", backend.log());
}

#[test]
fn features_and_config_space() {
    let dir = TempDir::new("blk-vu-feat").unwrap();
    let img = image(dir.path(), 16);
    let (_backend, sock) = Backend::start(dir.path(), &img, &["--format", "raw", "--num-queues", "3"]);
    let mut s = connect(&sock);
    let features = get_u64(&mut s, GET_FEATURES);
    for (bit, name) in [
        (F_VERSION_1, "VERSION_1"),
        (F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (BLK_F_DISCARD, "DISCARD"),
        (BLK_F_MQ, "MQ"),
    ] {
        assert_ne!(features & bit, 0, "{name} missing from {features:#x}");
    }
    assert_eq!(features & BLK_F_RO, 0, "RO offered on a writable export");

    let proto = get_u64(&mut s, GET_PROTOCOL_FEATURES);
    for (bit, name) in [
        (PROTOCOL_F_MQ, "MQ"),
        (PROTOCOL_F_REPLY_ACK, "REPLY_ACK"),
        (PROTOCOL_F_CONFIG, "CONFIG"),
        (PROTOCOL_F_INFLIGHT_SHMFD, "INFLIGHT_SHMFD"),
    ] {
        assert_ne!(proto & bit, 0, "protocol feature {name} missing from {proto:#x}");
    }
    send(&mut s, SET_PROTOCOL_FEATURES, &(proto & (PROTOCOL_F_MQ | PROTOCOL_F_CONFIG)).to_le_bytes());
    assert_eq!(get_u64(&mut s, GET_QUEUE_NUM), 3);

    // GET_CONFIG: offset, size, flags, then the payload area (vhost-user spec, "Device config").
    let size = 60u32;
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&size.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&vec![0u8; size as usize]);
    send(&mut s, GET_CONFIG, &payload);
    let body = reply(&mut s, GET_CONFIG);
    let cfg = &body[12..];
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap());
    assert_eq!(capacity, (16 << 20) / 512, "capacity in sectors");
    let blk_size = u32::from_le_bytes(cfg[20..24].try_into().unwrap());
    assert_eq!(blk_size, 512);
    let num_queues = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
    assert_eq!(num_queues, 3);
}

#[test]
fn read_only_export_offers_ro() {
    let dir = TempDir::new("blk-vu-ro").unwrap();
    let img = image(dir.path(), 4);
    let (_backend, sock) = Backend::start(dir.path(), &img, &["--format", "raw", "--read-only"]);
    let mut s = connect(&sock);
    let features = get_u64(&mut s, GET_FEATURES);
    assert_ne!(features & BLK_F_RO, 0);
    assert_eq!(features & BLK_F_DISCARD, 0, "DISCARD offered on a read-only export");
}

#[test]
fn bad_flags_fail_with_a_clear_error() {
    let dir = TempDir::new("blk-vu-args").unwrap();
    let bin = built_binary("tessera-blk").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let err = run(&["--socket-path", sock, "--image", missing.to_str().unwrap()]);
    assert!(err.contains("missing.img"), "error does not name the image: {err}");
    let img = image(dir.path(), 1);
    let err = run(&["--socket-path", sock, "--image", img.to_str().unwrap(), "--num-queues", "0"]);
    assert!(err.contains("--num-queues"), "{err}");
}

mod chains {
    //! Crafted descriptor chains through a real vhost-user connection (rust-vmm's vhost
    //! frontend on the client side, shared memory from a file in /dev/shm).

    use super::*;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use vhost_user_client::{AVAIL, DESC, USED};
    const QSIZE: u16 = 32;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    struct Ring {
        mem: GuestMemoryMmap,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Ring {
        fn desc(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
            let i = self.next_desc;
            self.next_desc += 1;
            let at = GuestAddress(DESC + u64::from(i) * 16);
            let next = if flags & F_NEXT != 0 { i + 1 } else { 0 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&d, at).unwrap();
            i
        }

        fn header(&self, at: u64, t: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        }

        /// A request: header at `hdr`, optional data descriptor, status byte at `status`.
        fn request(&mut self, hdr: (u64, u32), data: Option<(u64, u32, bool)>, status: u64) -> u16 {
            self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let head = self.desc(hdr.0, hdr.1, F_NEXT);
            if let Some((addr, len, writable)) = data {
                self.desc(addr, len, F_NEXT | if writable { F_WRITE } else { 0 });
            }
            self.desc(status, 1, F_WRITE);
            let slot = GuestAddress(AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2);
            self.mem.write_obj(head, slot).unwrap();
            self.avail_idx += 1;
            head
        }

        fn publish(&self) {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn status(&self, at: u64) -> u8 {
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }
    }

    #[test]
    fn bad_chains_get_a_status_and_the_backend_keeps_serving() {
        let dir = TempDir::new("blk-vu-chains").unwrap();
        let img = dir.path().join("disk.raw");
        let content: Vec<u8> = (0..(64 << 10)).map(|i: u32| (i % 253) as u8).collect();
        fs::write(&img, &content).unwrap();
        let (backend, sock) = Backend::start(dir.path(), &img, &["--format", "raw"]);

        // Guest memory shared through a file the backend maps.
        let shm = dir.path().join("guest.mem");
        let file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&shm).unwrap();
        let mem = vhost_user_client::guest_memory(&file);

        let mut fe = Frontend::connect(&sock, 1).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features & (F_VERSION_1 | F_PROTOCOL_FEATURES)).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto & VhostUserProtocolFeatures::CONFIG).unwrap();
        let (_call, kick) = vhost_user_client::start_queue0(&mut fe, &mem, &file, QSIZE, 0);

        let mut ring = Ring { mem: mem.clone(), next_desc: 0, avail_idx: 0 };
        let (t_in, t_unknown) = (0u32, 0x77u32);
        let st = |i: u64| 0x20000 + i;
        let data = |i: u64| 0x40000 + i * 0x1000;
        ring.header(0x10000, t_in, 1);
        ring.request((0x10000, 16), Some((data(0), 512, true)), st(0)); // good read of sector 1
        ring.header(0x10100, t_in, 0);
        ring.request((0x10100, 16), Some((0x7_0000_0000, 512, true)), st(1)); // data outside memory
        ring.header(0x10200, t_in, 128);
        ring.request((0x10200, 16), Some((data(2), 512, true)), st(2)); // past the end (128 sectors)
        ring.header(0x10300, t_unknown, 0);
        ring.request((0x10300, 16), None, st(3)); // unknown type
        ring.header(0x10400, t_in, 0);
        ring.request((0x10400, 8), Some((data(4), 512, true)), st(4)); // truncated header
        ring.header(0x10500, t_in, 127);
        ring.request((0x10500, 16), Some((data(5), 512, true)), st(5)); // good read of the last sector
        ring.publish();
        kick.write(1).unwrap();

        let start = Instant::now();
        while ring.used_idx() != 6 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "only {} of 6 requests completed:\n{}",
                ring.used_idx(),
                backend.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let statuses: Vec<u8> = (0..6).map(|i| ring.status(st(i))).collect();
        // OK, IOERR, IOERR, UNSUPP, IOERR, OK (virtio 1.2 §5.2.6)
        assert_eq!(statuses, vec![0, 1, 1, 2, 1, 0], "statuses; backend log:\n{}", backend.log());
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(data(0))).unwrap();
        assert_eq!(got, content[512..1024]);
        mem.read_slice(&mut got, GuestAddress(data(5))).unwrap();
        assert_eq!(got, content[127 * 512..128 * 512]);
        assert!(backend.log().contains("outside guest memory"), "no log line:\n{}", backend.log());
    }
}

#[test]
fn random_messages_never_take_the_backend_down() {
    let dir = TempDir::new("blk-vu-random").unwrap();
    let img = image(dir.path(), 4);
    let (mut backend, sock) = Backend::start(dir.path(), &img, &["--format", "raw"]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let mut s = connect(&sock);
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        // One to three messages per connection, mostly with plausible headers.
        for _ in 0..1 + next() % 3 {
            let code = (next() % 48) as u32;
            let flags = if next() % 8 == 0 { next() as u32 } else { VERSION_1 };
            let len = (next() % 96) as usize;
            let claimed = if next() % 4 == 0 { next() as u32 } else { len as u32 };
            let mut msg = Vec::new();
            msg.extend_from_slice(&code.to_le_bytes());
            msg.extend_from_slice(&flags.to_le_bytes());
            msg.extend_from_slice(&claimed.to_le_bytes());
            msg.extend((0..len).map(|_| next() as u8));
            if s.write_all(&msg).is_err() {
                break; // the backend already closed this connection
            }
        }
        let mut sink = [0u8; 512];
        while let Ok(n) = s.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        drop(s);
        assert!(backend.child.try_wait().unwrap().is_none(), "backend died at round {round}:\n{}", backend.log());
    }
    // Still serving.
    let mut good = connect(&sock);
    let features = get_u64(&mut good, GET_FEATURES);
    assert_ne!(features & F_VERSION_1, 0);
}

/// A launcher opens the image and binds the socket, then starts tessera-blk with the
/// descriptors (so a sandboxed tessera-blk needs no paths).
#[test]
fn serves_inherited_socket_and_image_descriptors() {
    use std::os::fd::AsRawFd;

    let dir = TempDir::new("blk-vu-fds").unwrap();
    let img = image(dir.path(), 6);
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let file = fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
    let (lfd, ifd) = (listener.as_raw_fd(), file.as_raw_fd());
    let log = dir.path().join("log");
    let mut cmd = Command::new(built_binary("tessera-blk").unwrap());
    cmd.args(["--socket-fd", "3", "--image-fd", "4", "--format", "raw"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
    tessera_tests::bins::pass_fds(&mut cmd, vec![lfd, ifd]);
    let child = cmd.spawn().expect("start tessera-blk");
    let backend = Backend { child, dir: dir.path().to_owned() };
    drop(listener);
    drop(file);

    let mut s = connect(&sock);
    assert_ne!(get_u64(&mut s, GET_FEATURES) & F_VERSION_1, 0, "log:\n{}", backend.log());
    send(&mut s, SET_PROTOCOL_FEATURES, &PROTOCOL_F_CONFIG.to_le_bytes());
    let mut payload = Vec::new();
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&8u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&[0u8; 8]);
    send(&mut s, GET_CONFIG, &payload);
    let body = reply(&mut s, GET_CONFIG);
    assert_eq!(
        u64::from_le_bytes(body[12..20].try_into().unwrap()),
        (6 << 20) / 512,
        "capacity of the inherited image"
    );
    // The inherited image is locked like one opened by path.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 512"]).arg(&img).output();
    if let Ok(out) = out {
        assert!(!out.status.success(), "qemu-io wrote an image tessera-blk serves");
    }
}

#[test]
fn bad_descriptors_are_refused_clearly() {
    let bin = built_binary("tessera-blk").unwrap();
    let dir = TempDir::new("blk-vu-badfd").unwrap();
    let img = image(dir.path(), 1);
    let out =
        Command::new(&bin).args(["--socket-fd", "1", "--image"]).arg(&img).stdout(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--socket-fd 1"), "{err}");
    let sock = dir.path().join("s.sock");
    let out = Command::new(&bin).arg("--socket-path").arg(&sock).args(["--image-fd", "77"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("descriptor 77"), "{err}");
}
