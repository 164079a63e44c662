//! A tap device as the host side: Ethernet frames in and out of a `/dev/net/tun` descriptor.
//! Opened with `IFF_VNET_HDR` (12-byte header, `TUNSETVNETHDRSZ`) the frames carry the
//! virtio-net header both ways, which is how checksum and segmentation offloads pass between
//! the guest and the host's stack; `TUNSETOFFLOAD` tells the kernel what the guest can take.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use crate::frame::{MAX_FRAME_LEN, MAX_GSO_FRAME_LEN, VNET_HDR_LEN};
use crate::{Error, Result};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
// _IOW('T', 202, int) and _IOR('T', 210, unsigned int) from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
// _IOW('T', 208, unsigned int) and _IOW('T', 216, int).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// TUNSETOFFLOAD flags (<linux/if_tun.h>).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Large enough for a vnet header and the largest GSO frame.
pub const RX_BUF_LEN: usize = VNET_HDR_LEN + MAX_GSO_FRAME_LEN;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap queue.
pub struct Tap {
    file: File,
    /// Frames carry the 12-byte virtio-net header.
    vnet_hdr: bool,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and return plain ints.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens the tap interface `name` (created if it does not exist and we may), with a vnet
    /// header.
    pub fn open(name: &str) -> Result<Self> {
        let err = |source| Error::TapOpen { name: name.to_owned(), source };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "invalid interface name")));
        }
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err)?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which IfReq lays out (40 bytes).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        set_nonblocking(file.as_raw_fd()).map_err(err)?;
        let tap = Tap { file, vnet_hdr: true };
        tap.set_vnet_hdr_size().map_err(err)?;
        Ok(tap)
    }

    fn set_vnet_hdr_size(&self) -> io::Result<()> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is live.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether frames carry the virtio-net header (offloads are possible).
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The offloads the guest can take (`TUN_F_*`): the kernel then hands us frames with
    /// partial checksums or up to 64 KiB long only where the guest negotiated that.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        if !self.vnet_hdr {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes over an open tap descriptor (passed by a privileged parent).
    pub fn from_fd(fd: RawFd) -> Result<Self> {
        let err = |source| Error::TapOpen { name: format!("fd {fd}"), source };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF fills a `struct ifreq`; fails harmlessly on a non-tun descriptor.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "not a tun/tap descriptor")));
        }
        if req.flags & IFF_TAP == 0 {
            return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "a tun (layer 3) device, not a tap")));
        }
        if req.flags & IFF_NO_PI == 0 {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "opened with packet info; tessera-net needs IFF_TAP|IFF_NO_PI (and optionally IFF_VNET_HDR)",
            )));
        }
        set_nonblocking(fd).map_err(err)?;
        // SAFETY: the caller hands this descriptor over to us (checked open in config.rs).
        let tap = Tap { file: unsafe { File::from_raw_fd(fd) }, vnet_hdr: req.flags & IFF_VNET_HDR != 0 };
        if tap.vnet_hdr {
            tap.set_vnet_hdr_size().map_err(err)?;
        }
        Ok(tap)
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Sends one frame; false if the tap queue is full now.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        match self.file.write(frame) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                // E.g. the interface is down (EIO): the frame is lost, as on a real link.
                crate::ratelimit::guest_error(format_args!("tap write failed: {e}; frame dropped"));
                true
            }
        }
    }

    /// Reads one frame if there is one (with its vnet header when the tap has them). Frames
    /// above the MTU only come when the guest negotiated segmentation offload.
    pub fn recv(&mut self, buf: &mut [u8; RX_BUF_LEN]) -> Option<usize> {
        let max = if self.vnet_hdr { VNET_HDR_LEN + MAX_GSO_FRAME_LEN } else { MAX_FRAME_LEN };
        match self.file.read(buf) {
            Ok(n) if n > 0 && n <= max => Some(n),
            Ok(n) if n > max => {
                // Larger than the guest's MTU: it could not take it anyway.
                crate::ratelimit::guest_error(format_args!("tap frame of {n} bytes exceeds the MTU: dropped"));
                Some(0)
            }
            _ => None,
        }
    }
}
