//! A vhost-user message relay between the front end and rust-vmm's daemon, to work around one
//! ordering difference.
//!
//! QEMU's virtio-net (7.2 here) sends `SET_VRING_ENABLE` when the device is realized, before
//! any `SET_FEATURES`, whenever the backend offers `VHOST_USER_F_PROTOCOL_FEATURES`; and it
//! fails to start vhost-user-net without that feature (its `vhost_user_set_vring_enable`
//! returns EINVAL). rust-vmm's vhost 0.18 (`BackendReqHandler`) answers a `SET_VRING_ENABLE`
//! before the feature is acked with `InactiveFeature`, which ends the connection. The spec
//! ("Ring states") makes the enable state meaningful only once the feature is negotiated,
//! but QEMU does not send it again (its `vhost_net_start` restores the enable state before
//! `vhost_dev_start` negotiates features). So the relay holds early enables back (answering
//! them itself when the front end asked for a reply), replays the last state of each ring
//! right after forwarding a `SET_FEATURES` that acks the feature, and passes everything else
//! through unchanged, file descriptors included.
//!
//! Message layout (vhost-user spec, "Message Specification"): a 12-byte header
//! `{request: u32, flags: u32, size: u32}` then `size` bytes of payload; descriptors travel as
//! SCM_RIGHTS with the header.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
/// Flags: version 1, reply, need_reply.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Largest payload we relay (the spec's messages are far smaller; memory tables of 509
/// regions stay under 17 KiB).
const MAX_PAYLOAD: usize = 1 << 20;
/// Most descriptors one message carries: SET_MEM_TABLE sends one per region, at most 8
/// (VHOST_MEMORY_BASELINE_NREGIONS); more are dropped by the kernel (MSG_CTRUNC).
const MAX_FDS: usize = 32;

/// Reads one message: header, payload, and the descriptors that came with it.
fn recv_msg(s: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut hdr = [0u8; HDR];
    let mut fds_raw = [-1 as RawFd; MAX_FDS];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR {
        let mut iov = [libc::iovec { iov_base: hdr[got..].as_mut_ptr() as *mut libc::c_void, iov_len: HDR - got }];
        // SAFETY: the iovec points into `hdr`, which is live and writable for its length.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds_raw) }.map_err(io::Error::from)?;
        for fd in &fds_raw[..nfds] {
            // SAFETY: recvmsg just created these descriptors for us; we own them now.
            fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        got += n;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("vhost-user message of {size} bytes")));
    }
    let mut msg = hdr.to_vec();
    msg.resize(HDR + size, 0);
    let mut r = s;
    r.read_exact(&mut msg[HDR..])?;
    Ok(Some((msg, fds)))
}

fn send_msg(s: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let n = s.send_with_fds(&[msg], &raw).map_err(io::Error::from)?;
    if n < msg.len() {
        let mut w = s;
        w.write_all(&msg[n..])?;
    }
    Ok(())
}

fn field(msg: &[u8], at: usize) -> u32 {
    msg.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(0)
}

/// Relays between `front` (QEMU) and `back` (the daemon) until either side closes; then shuts
/// both down.
pub fn run(front: UnixStream, back: UnixStream) {
    let acked = Arc::new(AtomicBool::new(false));
    let (f2, b2) = match (front.try_clone(), back.try_clone()) {
        (Ok(f), Ok(b)) => (f, b),
        _ => {
            log::error!("cannot duplicate the vhost-user sockets for the relay");
            return;
        }
    };
    // Backend -> front end: replies, passed through.
    let replies = std::thread::Builder::new().name("vu-relay".into()).spawn(move || {
        while let Ok(Some((msg, fds))) = recv_msg(&b2) {
            if send_msg(&f2, &msg, &fds).is_err() {
                break;
            }
        }
        let _ = f2.shutdown(std::net::Shutdown::Both);
        let _ = b2.shutdown(std::net::Shutdown::Both);
    });
    // Last enable state per ring sent before the feature was acked.
    let mut held: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
    // Front end -> backend, on this thread.
    loop {
        let (msg, fds) = match recv_msg(&front) {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                log::error!("vhost-user relay: {e}");
                break;
            }
        };
        let request = field(&msg, 0);
        let flags = field(&msg, 4);
        if request == SET_FEATURES && msg.len() >= HDR + 8 {
            let v = u64::from_le_bytes(msg[HDR..HDR + 8].try_into().unwrap_or([0; 8]));
            let now_acked = v & PROTOCOL_FEATURES_BIT != 0;
            acked.store(now_acked, Ordering::SeqCst);
            if send_msg(&back, &msg, &fds).is_err() {
                break;
            }
            if now_acked {
                let mut ok = true;
                for (index, num) in std::mem::take(&mut held) {
                    // Without NEED_REPLY: the daemon answers nothing, the front end expects nothing.
                    let mut m = Vec::with_capacity(HDR + 8);
                    m.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                    m.extend_from_slice(&VERSION_1.to_le_bytes());
                    m.extend_from_slice(&8u32.to_le_bytes());
                    m.extend_from_slice(&index.to_le_bytes());
                    m.extend_from_slice(&num.to_le_bytes());
                    ok &= send_msg(&back, &m, &[]).is_ok();
                }
                if !ok {
                    break;
                }
            }
            continue;
        }
        if request == SET_VRING_ENABLE && !acked.load(Ordering::SeqCst) {
            log::debug!("SET_VRING_ENABLE before SET_FEATURES: held back by the relay");
            if msg.len() >= HDR + 8 {
                held.insert(field(&msg, HDR), field(&msg, HDR + 4));
            }
            if flags & NEED_REPLY != 0 {
                let mut reply = Vec::with_capacity(HDR + 8);
                reply.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                reply.extend_from_slice(&(VERSION_1 | REPLY).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                if send_msg(&front, &reply, &[]).is_err() {
                    break;
                }
            }
            continue;
        }
        if send_msg(&back, &msg, &fds).is_err() {
            break;
        }
    }
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = back.shutdown(std::net::Shutdown::Both);
    if let Ok(h) = replies {
        let _ = h.join();
    }
}
