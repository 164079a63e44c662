//! virtio-net frames in guest memory: taking transmitted frames off the TX queue and placing
//! received frames into RX buffers (virtio 1.2 §5.1.6). Front-end independent: the vhost-user
//! adapter and the fuzz harness drive a `virtio_queue::Queue` through these functions.
//!
//! Every descriptor is guest-controlled: a bad chain is returned to the driver (used length 0
//! for TX, nothing written for RX) with a rate-limited log line, never a panic.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::ratelimit::guest_error;

/// `struct virtio_net_hdr` with `num_buffers`: with VIRTIO_F_VERSION_1 the header always has
/// this size, whether or not MRG_RXBUF is negotiated (§5.1.6).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame we accept from the guest or pass to it: MTU 1500 + 14-byte header + a
/// VLAN tag. We offer no TSO/UFO, so the guest never sends anything longer (§5.1.6.2).
pub const MAX_FRAME_LEN: usize = 1500 + 14 + 4;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Largest frame with segmentation offload (a tap with a vnet header, HOST_TSO/GUEST_TSO
/// negotiated): a 64 KiB IP packet plus Ethernet and VLAN headers, as Linux's tun takes them.
pub const MAX_GSO_FRAME_LEN: usize = 65535 + 14 + 4;

/// How TX frames leave [`process_tx_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxMode {
    /// Plain Ethernet frames (libslirp, a tap without vnet header): the header is stripped and
    /// must ask for no offload; at most [`MAX_FRAME_LEN`].
    Plain,
    /// With the 12-byte virtio-net header in front, for a tap opened with `IFF_VNET_HDR` (its
    /// `struct virtio_net_hdr_v1` is the same layout): checksum and GSO requests pass through
    /// to the kernel, which checks them; frames up to [`MAX_GSO_FRAME_LEN`].
    VnetHdr,
}

/// One descriptor as the driver described it (address not yet checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Why a transmitted chain was not a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum TxError {
    /// A device-writable descriptor in a TX chain (§5.1.6.2: TX buffers are device-readable).
    Writable,
    OutsideMemory {
        addr: u64,
        len: u32,
    },
    TooLong(u64),
    TooShort(usize),
    /// Offload requested in the header though we offered none (flags, gso_type).
    Offload {
        flags: u8,
        gso_type: u8,
    },
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Writable => write!(f, "device-writable descriptor in a TX chain"),
            TxError::OutsideMemory { addr, len } => write!(f, "TX buffer {addr:#x}+{len:#x} is outside guest memory"),
            TxError::TooLong(n) => write!(f, "TX frame of {n} bytes (with header) exceeds {MAX_FRAME_LEN}"),
            TxError::TooShort(n) => write!(f, "TX chain of {n} bytes is shorter than header + Ethernet header"),
            TxError::Offload { flags, gso_type } => {
                write!(f, "TX header asks for offloads not negotiated (flags {flags:#x}, gso_type {gso_type})")
            }
        }
    }
}

/// Copies the frame of a TX chain (header stripped) into `buf`.
pub fn read_tx_frame(mem: &GuestMemoryMmap, descs: &[Desc], buf: &mut Vec<u8>) -> Result<(), TxError> {
    read_tx_frame_with(mem, descs, buf, TxMode::Plain)
}

/// Copies a TX chain into `buf` as `mode` wants it.
pub fn read_tx_frame_with(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    buf: &mut Vec<u8>,
    mode: TxMode,
) -> Result<(), TxError> {
    buf.clear();
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let max = match mode {
        TxMode::Plain => MAX_FRAME_LEN,
        TxMode::VnetHdr => MAX_GSO_FRAME_LEN,
    };
    if total > (VNET_HDR_LEN + max) as u64 {
        return Err(TxError::TooLong(total));
    }
    if total < (VNET_HDR_LEN + MIN_FRAME_LEN) as u64 {
        return Err(TxError::TooShort(total as usize));
    }
    for d in descs {
        if d.writable {
            return Err(TxError::Writable);
        }
        let start = buf.len();
        buf.resize(start + d.len as usize, 0);
        mem.read_slice(&mut buf[start..], GuestAddress(d.addr))
            .map_err(|_| TxError::OutsideMemory { addr: d.addr, len: d.len })?;
    }
    if mode == TxMode::VnetHdr {
        // The kernel validates the header (virtio_net_hdr_to_skb) and drops what it cannot do.
        return Ok(());
    }
    // Header fields (§5.1.6): flags at 0, gso_type at 1. Without CSUM/HOST_TSO negotiated the
    // driver must leave both 0; a frame asking for work we never offered is not sent half-done.
    let (flags, gso_type) = (buf[0], buf[1]);
    if flags != 0 || gso_type != 0 {
        return Err(TxError::Offload { flags, gso_type });
    }
    buf.drain(..VNET_HDR_LEN);
    Ok(())
}

/// Takes every available TX chain off `queue`, passing each valid frame to `send` and
/// completing the chain. `send` returns false when the host side cannot take the frame now
/// (e.g. a full tap queue): the chain is then left available and processing stops, to be
/// resumed when the host side can take more. Returns the number of chains completed.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    send: impl FnMut(&[u8]) -> bool,
) -> Result<usize, virtio_queue::Error> {
    process_tx_with(queue, mem, TxMode::Plain, send)
}

/// [`process_tx`], frames made as `mode` says.
pub fn process_tx_with(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mode: TxMode,
    mut send: impl FnMut(&[u8]) -> bool,
) -> Result<usize, virtio_queue::Error> {
    let mut buf = Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME_LEN);
    let mut done = 0;
    loop {
        let before = queue.next_avail();
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        let descs: Vec<Desc> =
            chain.map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect();
        match read_tx_frame_with(mem, &descs, &mut buf, mode) {
            Ok(()) => {
                if !send(&buf) {
                    queue.set_next_avail(before);
                    break;
                }
            }
            Err(e) => guest_error(format_args!("{e}: frame dropped")),
        }
        // TX chains are device-readable only: the used length is 0 (§5.1.6.2).
        if let Err(e) = queue.add_used(mem, head, 0) {
            guest_error(format_args!("cannot add to the TX used ring: {e}"));
        }
        done += 1;
    }
    Ok(done)
}

/// What became of a frame offered to the RX queue.
#[derive(Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many buffers (chains).
    Delivered(u16),
    /// Not enough buffers available now: nothing was taken from the queue; try again after the
    /// driver adds buffers.
    NoBuffers,
    /// The frame could not be delivered (too long, or the one buffer without MRG_RXBUF too
    /// small, or unusable descriptors); the buffers taken were returned with used length 0.
    Dropped,
}

/// (address, length) pieces of guest memory.
type Pieces = Vec<(GuestAddress, usize)>;

/// Writable bytes of a chain that lie in guest memory.
fn writable_pieces(mem: &GuestMemoryMmap, descs: &[Desc]) -> Option<Pieces> {
    let mut out = Vec::with_capacity(descs.len());
    for d in descs {
        // §5.1.6.3: RX buffers are device-writable; a readable one means a broken driver.
        if !d.writable {
            return None;
        }
        if d.len == 0 {
            continue;
        }
        let a = GuestAddress(d.addr);
        a.checked_add(u64::from(d.len))?;
        if !mem.check_range(a, d.len as usize, Permissions::Write) {
            return None;
        }
        out.push((a, d.len as usize));
    }
    Some(out)
}

/// Places `frame` (an Ethernet frame without virtio header) into RX buffers: with `mergeable`
/// (VIRTIO_NET_F_MRG_RXBUF) across as many chains as needed, `num_buffers` telling the driver
/// how many (§5.1.6.4); otherwise into a single chain.
pub fn deliver_rx(queue: &mut Queue, mem: &GuestMemoryMmap, frame: &[u8], mergeable: bool) -> RxOutcome {
    deliver_rx_with(queue, mem, [0; VNET_HDR_LEN], frame, mergeable, MAX_FRAME_LEN)
}

/// [`deliver_rx`] with the header's `flags`, `gso_type`, `hdr_len`, `gso_size`, `csum_start`
/// and `csum_offset` taken from `hdr` (a tap's vnet header; `num_buffers` is ours to set), and
/// frames up to `max_len`.
pub fn deliver_rx_with(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    hdr: [u8; VNET_HDR_LEN],
    frame: &[u8],
    mergeable: bool,
    max_len: usize,
) -> RxOutcome {
    if frame.len() > max_len {
        return RxOutcome::Dropped;
    }
    let need = VNET_HDR_LEN + frame.len();
    let start = queue.next_avail();
    let mut chains: Vec<(u16, Option<Pieces>)> = Vec::new();
    let mut capacity = 0usize;
    while capacity < need {
        let next = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                guest_error(format_args!("RX queue unusable: {e}"));
                None
            }
        };
        let Some(chain) = next else {
            // Put back what was taken: the frame waits for more buffers.
            queue.set_next_avail(start);
            return RxOutcome::NoBuffers;
        };
        let head = chain.head_index();
        let descs: Vec<Desc> =
            chain.map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect();
        let pieces = writable_pieces(mem, &descs);
        if pieces.is_none() {
            guest_error(format_args!("RX buffer with a readable descriptor or outside guest memory: skipped"));
        }
        capacity += pieces.as_ref().map(|p| p.iter().map(|x| x.1).sum()).unwrap_or(0);
        chains.push((head, pieces));
        if !mergeable || chains.len() >= usize::from(u16::MAX) {
            break;
        }
    }
    if capacity < need {
        guest_error(format_args!("RX buffer of {capacity} bytes too small for a {need}-byte frame: frame dropped"));
        for (head, _) in &chains {
            let _ = queue.add_used(mem, *head, 0);
        }
        return RxOutcome::Dropped;
    }
    // Header: as given (all 0 without offloads), num_buffers = chains used (§5.1.6.4.2).
    let mut hdr = hdr;
    let nbuf = chains.len() as u16;
    hdr[10..12].copy_from_slice(&nbuf.to_le_bytes());
    let mut data = Vec::with_capacity(need);
    data.extend_from_slice(&hdr);
    data.extend_from_slice(frame);
    let mut off = 0usize;
    for (head, pieces) in &chains {
        let mut used = 0usize;
        for &(addr, len) in pieces.iter().flatten() {
            if off == need {
                break;
            }
            let n = len.min(need - off);
            // Checked above; a failure here means the memory map changed under us.
            if mem.write_slice(&data[off..off + n], addr).is_err() {
                guest_error(format_args!("RX write to {:#x} failed", addr.0));
            }
            used += n;
            off += n;
        }
        if let Err(e) = queue.add_used(mem, *head, used as u32) {
            guest_error(format_args!("cannot add to the RX used ring: {e}"));
        }
    }
    RxOutcome::Delivered(nbuf)
}
