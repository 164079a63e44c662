//! virtio-blk requests: parse one descriptor chain, execute it on a [`BlockIo`], write the status.
//!
//! Layout (virtio 1.2 §5.2.6): a 16-byte device-readable header `{type: le32, reserved: le32,
//! sector: le64}`, then the data (readable for writes, writable for reads), then one writable
//! status byte at the very end of the chain. Drivers may split these across descriptors in any
//! way (VIRTIO_F_ANY_LAYOUT is implied by VIRTIO_F_VERSION_1, §2.7.4), so nothing here assumes
//! descriptor boundaries.
//!
//! Everything in a chain is guest-controlled: every failure becomes a virtio status
//! (IOERR/UNSUPP) and a rate-limited log line, never a panic.

use std::io;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::image::{BlockIo, GuestSlice};
use crate::ratelimit::guest_error;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
const HEADER_LEN: usize = 16;
/// Size of one `virtio_blk_discard_write_zeroes` segment (§5.2.6).
const SEGMENT_LEN: usize = 16;
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Limits advertised in the config space and enforced here.
#[derive(Clone, Debug)]
pub struct DiskLimits {
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl Default for DiskLimits {
    fn default() -> Self {
        DiskLimits {
            // 1 GiB per segment keeps a single fallocate/imago call bounded.
            max_discard_sectors: 1 << 21,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 21,
            max_write_zeroes_seg: 32,
        }
    }
}

/// The device-side facts a request is checked against.
#[derive(Clone, Debug)]
pub struct DiskProps {
    pub read_only: bool,
    /// GET_ID answer, zero-padded (§5.2.6: "not NUL-terminated if 20 bytes long").
    pub serial: [u8; ID_BYTES],
    pub limits: DiskLimits,
}

/// One descriptor of a chain, as the driver described it (addresses are not yet checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// What went wrong with a request, mapped to a virtio status by [`RequestError::status`].
#[derive(Debug)]
enum RequestError {
    /// The chain does not have the shape of a virtio-blk request (IOERR).
    Malformed(&'static str),
    /// A descriptor points outside guest memory (IOERR).
    BadAddress(u64, u32),
    /// Sector range beyond the end of the disk (IOERR).
    OutOfRange { sector: u64, bytes: u64 },
    /// A write-type request on a read-only export (IOERR).
    ReadOnly(u32),
    /// Request type or flag we do not implement (UNSUPP).
    Unsupported(u32),
    /// The host I/O failed (IOERR).
    Io(u32, io::Error),
    /// Non-blocking mode only: the host I/O would have to wait; nothing is reported yet.
    WouldBlock,
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Malformed(why) => write!(f, "malformed request: {why}"),
            RequestError::BadAddress(a, l) => {
                write!(f, "descriptor {a:#x}+{l:#x} is outside guest memory")
            }
            RequestError::OutOfRange { sector, bytes } => {
                write!(f, "{bytes} bytes at sector {sector} reach past the end of the disk")
            }
            RequestError::ReadOnly(t) => write!(f, "request type {t} on a read-only disk"),
            RequestError::Unsupported(t) => write!(f, "unsupported request type or flags {t:#x}"),
            RequestError::Io(t, e) => write!(f, "host I/O for request type {t} failed: {e}"),
            RequestError::WouldBlock => write!(f, "host I/O would block"),
        }
    }
}

/// Executes the request in `descs` and writes its status; returns the number of bytes written
/// into the chain (the used-ring length, §2.7.8), 0 if the chain has no usable status byte.
pub fn process_request(mem: &GuestMemoryMmap, descs: &[Desc], disk: &dyn BlockIo, props: &DiskProps) -> u32 {
    complete_request(mem, descs, disk, props, false).unwrap_or(0)
}

/// [`process_request`] without waiting for the device: `None` when the request needs I/O that
/// would block (a page-cache miss, writeback, FLUSH, DISCARD, WRITE_ZEROES); nothing has been
/// reported to the driver then, and the request must be run again with [`process_request`] on
/// a thread that may block. Requests that fail validation complete here with their status.
pub fn try_process_request(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    disk: &dyn BlockIo,
    props: &DiskProps,
) -> Option<u32> {
    complete_request(mem, descs, disk, props, true)
}

/// An `IN` or `OUT` request, validated and resolved into guest memory, for a caller that runs
/// the transfer itself (tessera-blk's io_uring path); [`finish_rw`] then writes its status.
pub struct RwRequest<'m> {
    pub write: bool,
    /// Byte offset on the disk.
    pub offset: u64,
    pub bufs: Vec<GuestSlice<'m>>,
    /// Bytes to transfer.
    pub len: u32,
    pub status: GuestAddress,
}

/// The request in `descs` as an [`RwRequest`] if it is a well-formed `IN`, or `OUT` on a
/// writable disk, with a usable status byte; `None` for anything else, including every malformed
/// request: those go through [`process_request`], which reports them.
pub fn prepare_rw<'m>(
    mem: &'m GuestMemoryMmap,
    descs: &[Desc],
    disk: &dyn BlockIo,
    props: &DiskProps,
) -> Option<RwRequest<'m>> {
    let last = descs.last().filter(|d| d.writable && d.len > 0)?;
    let status = GuestAddress(last.addr).checked_add(u64::from(last.len) - 1)?;
    if !mem.check_range(status, 1, Permissions::Write) {
        return None;
    }
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return None;
    }
    let mut readable = Vec::with_capacity(first_writable);
    for d in &descs[..first_writable] {
        resolve(mem, d.addr, d.len, &mut readable).ok()?;
    }
    let mut header = [0u8; HEADER_LEN];
    let data_out = take_prefix(&readable, &mut header).ok()?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);
    let (write, bufs) = match req_type {
        VIRTIO_BLK_T_IN => {
            let mut writable = Vec::with_capacity(descs.len() - first_writable);
            let lastidx = descs.len() - 1;
            for (i, d) in descs.iter().enumerate().skip(first_writable) {
                let len = if i == lastidx { d.len - 1 } else { d.len };
                resolve(mem, d.addr, len, &mut writable).ok()?;
            }
            (false, writable)
        }
        VIRTIO_BLK_T_OUT if !props.read_only => (true, data_out),
        _ => return None,
    };
    let len = total_len(&bufs);
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return None;
    }
    let offset = check_range(disk, sector, len).ok()?;
    Some(RwRequest { write, offset, bufs, len: u32::try_from(len).ok()?, status })
}

/// Completes an [`RwRequest`] whose transfer ended with `result`: writes its status byte and
/// returns the used length (§2.7.8).
pub fn finish_rw(mem: &GuestMemoryMmap, write: bool, len: u32, status: GuestAddress, result: io::Result<()>) -> u32 {
    let (byte, written) = match result {
        Ok(()) => (VIRTIO_BLK_S_OK as u8, if write { 0 } else { len }),
        Err(e) => {
            guest_error(format_args!("host I/O for request type {} failed: {e}", u32::from(write)));
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    if mem.write_obj(byte, status).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

fn complete_request(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    disk: &dyn BlockIo,
    props: &DiskProps,
    nowait: bool,
) -> Option<u32> {
    // The status byte is the last byte of the chain, which must be device-writable.
    let Some(last) = descs.last().filter(|d| d.writable && d.len > 0) else {
        guest_error(format_args!("request without a writable status byte at the end of its chain: dropped"));
        return Some(0);
    };
    let status_addr = GuestAddress(last.addr).checked_add(u64::from(last.len) - 1);
    let Some(status_addr) = status_addr.filter(|a| mem.check_range(*a, 1, Permissions::Write)) else {
        guest_error(format_args!(
            "status byte at {:#x}+{:#x} is outside guest memory: request dropped",
            last.addr, last.len
        ));
        return Some(0);
    };

    let (status, written) = match execute(mem, descs, disk, props, nowait) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(RequestError::WouldBlock) => return None,
        Err(e) => {
            guest_error(format_args!("{e}"));
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        // check_range passed above, so this is unreachable short of a memory-map change racing
        // us; report nothing rather than claim a status the driver never saw.
        return Some(0);
    }
    Some(written.saturating_add(1))
}

/// Executes every chain available in `queue` and puts each on the used ring; returns how many
/// were completed. The caller decides about notifying the driver (`queue.needs_notification`).
///
/// An error means the ring itself is unusable (e.g. an avail index more than the queue size
/// ahead, §2.7.6); the queue should be left alone until the driver resets it.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &dyn BlockIo,
    props: &DiskProps,
) -> Result<usize, virtio_queue::Error> {
    let chains: Vec<_> = queue.iter(mem)?.collect();
    let mut descs = Vec::with_capacity(4);
    for chain in &chains {
        descs.clear();
        // The chain iterator follows indirect tables and stops at a loop or a descriptor it
        // cannot read; a truncated chain then fails our shape checks below.
        descs.extend(chain.clone().map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }));
        let used = process_request(mem, &descs, disk, props);
        queue.add_used(mem, chain.head_index(), used)?;
    }
    Ok(chains.len())
}

/// Resolves `len` bytes of guest memory at `addr` into host slices.
fn resolve<'m>(
    mem: &'m GuestMemoryMmap,
    addr: u64,
    len: u32,
    out: &mut Vec<GuestSlice<'m>>,
) -> Result<(), RequestError> {
    if len == 0 {
        return Ok(());
    }
    let bad = || RequestError::BadAddress(addr, len);
    let iter = mem.get_slices(GuestAddress(addr), len as usize, Permissions::ReadWrite).map_err(|_| bad())?;
    for s in iter {
        out.push(s.map_err(|_| bad())?);
    }
    Ok(())
}

/// Total length of a slice list.
fn total_len(slices: &[GuestSlice<'_>]) -> u64 {
    slices.iter().map(|s| s.len() as u64).sum()
}

/// Copies the first `buf.len()` bytes out of `slices` and returns the remaining slices.
fn take_prefix<'m>(slices: &[GuestSlice<'m>], buf: &mut [u8]) -> Result<Vec<GuestSlice<'m>>, RequestError> {
    let mut need = buf.len();
    let mut pos = 0;
    let mut rest = Vec::with_capacity(slices.len());
    for s in slices {
        if need == 0 {
            rest.push(*s);
            continue;
        }
        let n = need.min(s.len());
        s.copy_to(&mut buf[pos..pos + n]);
        pos += n;
        need -= n;
        if n < s.len() {
            rest.push(s.offset(n).map_err(|_| RequestError::Malformed("cannot split a data descriptor"))?);
        }
    }
    if need > 0 {
        return Err(RequestError::Malformed("chain shorter than the request header"));
    }
    Ok(rest)
}

/// Checks `[sector, sector + bytes/512)` against the disk; returns the byte offset.
fn check_range(disk: &dyn BlockIo, sector: u64, bytes: u64) -> Result<u64, RequestError> {
    let oor = || RequestError::OutOfRange { sector, bytes };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(oor)?;
    let end = offset.checked_add(bytes).ok_or_else(oor)?;
    // Only whole sectors are addressable; a trailing partial sector of a raw file is not.
    let capacity = disk.size() & !(SECTOR_SIZE - 1);
    if end > capacity {
        return Err(oor());
    }
    Ok(offset)
}

fn execute(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    disk: &dyn BlockIo,
    props: &DiskProps,
    nowait: bool,
) -> Result<u32, RequestError> {
    // §2.7.4.2: device-readable descriptors precede device-writable ones.
    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Err(RequestError::Malformed("device-readable descriptor after a device-writable one"));
    }
    let mut readable = Vec::with_capacity(first_writable);
    for d in &descs[..first_writable] {
        resolve(mem, d.addr, d.len, &mut readable)?;
    }
    // Writable data excludes the status byte (the last byte of the last descriptor).
    let mut writable = Vec::with_capacity(descs.len() - first_writable);
    let last = descs.len() - 1;
    for (i, d) in descs.iter().enumerate().skip(first_writable) {
        let len = if i == last { d.len - 1 } else { d.len };
        resolve(mem, d.addr, len, &mut writable)?;
    }

    let mut header = [0u8; HEADER_LEN];
    let data_out = take_prefix(&readable, &mut header)?;
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
    ]);

    match req_type {
        VIRTIO_BLK_T_IN => {
            let len = total_len(&writable);
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed("read length not a multiple of 512"));
            }
            let offset = check_range(disk, sector, len)?;
            let r = if nowait { disk.try_read_at(offset, &writable) } else { disk.read_at(offset, &writable) };
            r.map_err(|e| io_error(req_type, e))?;
            u32::try_from(len).map_err(|_| RequestError::Malformed("chain longer than 4 GiB"))
        }
        VIRTIO_BLK_T_OUT => {
            if props.read_only {
                return Err(RequestError::ReadOnly(req_type));
            }
            let len = total_len(&data_out);
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::Malformed("write length not a multiple of 512"));
            }
            let offset = check_range(disk, sector, len)?;
            let r = if nowait { disk.try_write_at(offset, &data_out) } else { disk.write_at(offset, &data_out) };
            r.map_err(|e| io_error(req_type, e))?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH if nowait => Err(RequestError::WouldBlock),
        VIRTIO_BLK_T_FLUSH => {
            disk.flush().map_err(|e| RequestError::Io(req_type, e))?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut remaining = ID_BYTES;
            let mut pos = 0;
            for s in &writable {
                if remaining == 0 {
                    break;
                }
                let n = remaining.min(s.len());
                s.copy_from(&props.serial[pos..pos + n]);
                pos += n;
                remaining -= n;
            }
            Ok(pos as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if props.read_only {
                return Err(RequestError::ReadOnly(req_type));
            }
            if nowait {
                return Err(RequestError::WouldBlock);
            }
            discard_or_zero(req_type, &data_out, disk, &props.limits)?;
            Ok(0)
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn io_error(req_type: u32, e: io::Error) -> RequestError {
    if e.kind() == io::ErrorKind::WouldBlock {
        RequestError::WouldBlock
    } else {
        RequestError::Io(req_type, e)
    }
}

/// DISCARD and WRITE_ZEROES carry an array of `{sector: le64, num_sectors: le32, flags: le32}`
/// segments as their readable data (§5.2.6).
fn discard_or_zero(
    req_type: u32,
    data: &[GuestSlice<'_>],
    disk: &dyn BlockIo,
    limits: &DiskLimits,
) -> Result<(), RequestError> {
    let discard = req_type == VIRTIO_BLK_T_DISCARD;
    let (max_sectors, max_seg) = if discard {
        (limits.max_discard_sectors, limits.max_discard_seg)
    } else {
        (limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg)
    };
    let len = total_len(data);
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN as u64) {
        return Err(RequestError::Malformed("discard/write-zeroes data is not a whole number of segments"));
    }
    let count = len / SEGMENT_LEN as u64;
    if count > u64::from(max_seg) {
        return Err(RequestError::Malformed("more segments than max_*_seg allows"));
    }
    let mut raw = vec![0u8; len as usize];
    take_prefix(data, &mut raw)?;
    // Validate every segment before touching the disk, so a bad one leaves nothing half-done.
    let mut segs = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(SEGMENT_LEN) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // §5.2.6.2: the unmap flag is only defined for WRITE_ZEROES; other bits are reserved.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
            return Err(RequestError::Unsupported(flags));
        }
        if num > max_sectors {
            return Err(RequestError::Malformed("segment larger than max_*_sectors"));
        }
        let bytes = u64::from(num) << SECTOR_SHIFT;
        let offset = check_range(disk, sector, bytes)?;
        segs.push((offset, bytes, unmap));
    }
    for (offset, bytes, unmap) in segs {
        if bytes == 0 {
            continue;
        }
        let r = if discard { disk.discard(offset, bytes) } else { disk.write_zeroes(offset, bytes, unmap) };
        r.map_err(|e| RequestError::Io(req_type, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemDisk;

    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn props(read_only: bool) -> DiskProps {
        let mut serial = [0u8; ID_BYTES];
        serial[..4].copy_from_slice(b"ts01");
        DiskProps { read_only, serial, limits: DiskLimits::default() }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
        Desc { addr: at, len: 16, writable: false }
    }

    fn status_desc(at: u64) -> Desc {
        Desc { addr: at, len: 1, writable: true }
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn write_then_read_round_trips() {
        let m = mem();
        let disk = MemDisk::new(8192);
        let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        m.write_slice(&data, GuestAddress(0x1000)).unwrap();
        let w = [
            header(&m, 0x100, VIRTIO_BLK_T_OUT, 2),
            Desc { addr: 0x1000, len: 512, writable: false },
            Desc { addr: 0x1200, len: 512, writable: false },
            status_desc(0x200),
        ];
        assert_eq!(process_request(&m, &w, &disk, &props(false)), 1);
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
        assert_eq!(&disk.contents()[1024..2048], &data[..]);

        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 2),
            Desc { addr: 0x4000, len: 1024, writable: true },
            status_desc(0x300),
        ];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 1025);
        assert_eq!(status(&m, 0x300), VIRTIO_BLK_S_OK as u8);
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn header_and_status_may_share_descriptors_with_data() {
        // ANY_LAYOUT: header+data in one readable descriptor; data+status in one writable one.
        let m = mem();
        let disk = MemDisk::new(4096);
        let mut buf = vec![0xabu8; 16 + 512];
        buf[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        buf[8..16].copy_from_slice(&1u64.to_le_bytes());
        m.write_slice(&buf, GuestAddress(0x2000)).unwrap();
        let w = [Desc { addr: 0x2000, len: 16 + 512, writable: false }, status_desc(0x3000)];
        assert_eq!(process_request(&m, &w, &disk, &props(false)), 1);
        assert_eq!(&disk.contents()[512..1024], &[0xab; 512][..]);

        let r = [header(&m, 0x100, VIRTIO_BLK_T_IN, 1), Desc { addr: 0x5000, len: 513, writable: true }];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 513);
        assert_eq!(status(&m, 0x5000 + 512), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn out_of_range_read_is_ioerr() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 7),
            Desc { addr: 0x4000, len: 1024, writable: true },
            status_desc(0x300),
        ];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 1);
        assert_eq!(status(&m, 0x300), VIRTIO_BLK_S_IOERR as u8);
        // Sector numbers that overflow a byte offset are out of range too.
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, u64::MAX / 2),
            Desc { addr: 0x4000, len: 512, writable: true },
            status_desc(0x300),
        ];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x300), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 0),
            Desc { addr: MEM_SIZE as u64 - 256, len: 512, writable: true },
            status_desc(0x300),
        ];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 1);
        assert_eq!(status(&m, 0x300), VIRTIO_BLK_S_IOERR as u8);
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_OUT, 0),
            Desc { addr: u64::MAX - 10, len: 512, writable: false },
            status_desc(0x300),
        ];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x300), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn status_outside_memory_or_missing_drops_the_request() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [header(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0), status_desc(MEM_SIZE as u64)];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 0);
        let r = [header(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0)];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 0);
        assert_eq!(process_request(&m, &[], &disk, &props(false)), 0);
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr_and_leaves_data() {
        let m = mem();
        let disk = MemDisk::new(4096);
        m.write_slice(&[0x55; 512], GuestAddress(0x1000)).unwrap();
        let w = [
            header(&m, 0x100, VIRTIO_BLK_T_OUT, 0),
            Desc { addr: 0x1000, len: 512, writable: false },
            status_desc(0x200),
        ];
        process_request(&m, &w, &disk, &props(true));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_IOERR as u8);
        assert!(disk.contents().iter().all(|b| *b == 0));
        // Flush stays fine on a read-only disk.
        let f = [header(&m, 0x100, VIRTIO_BLK_T_FLUSH, 0), status_desc(0x200)];
        process_request(&m, &f, &disk, &props(true));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn truncated_header_and_bad_order_are_ioerr() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [Desc { addr: 0x100, len: 8, writable: false }, status_desc(0x200)];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_IOERR as u8);
        let r = [
            Desc { addr: 0x4000, len: 512, writable: true },
            header(&m, 0x100, VIRTIO_BLK_T_IN, 0),
            status_desc(0x200),
        ];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [header(&m, 0x100, 0x1234, 0), status_desc(0x200)];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn get_id_returns_serial() {
        let m = mem();
        let disk = MemDisk::new(4096);
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_GET_ID, 0),
            Desc { addr: 0x4000, len: 20, writable: true },
            status_desc(0x200),
        ];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 21);
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0x4000)).unwrap();
        assert_eq!(&id[..4], b"ts01");
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
    }

    fn segment(mem: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) -> Desc {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(at)).unwrap();
        Desc { addr: at, len: 16, writable: false }
    }

    #[test]
    fn write_zeroes_and_discard() {
        let m = mem();
        let disk = MemDisk::new(8192);
        disk.fill(0xff);
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            segment(&m, 0x800, 2, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            status_desc(0x200),
        ];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
        let c = disk.contents();
        assert!(c[..1024].iter().all(|b| *b == 0xff));
        assert!(c[1024..2560].iter().all(|b| *b == 0));
        assert!(c[2560..].iter().all(|b| *b == 0xff));

        // Discard with the unmap flag is UNSUPP (§5.2.6.2); past the end is IOERR.
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0),
            segment(&m, 0x800, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            status_desc(0x200),
        ];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_UNSUPP as u8);
        let r = [header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0), segment(&m, 0x800, 15, 2, 0), status_desc(0x200)];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_IOERR as u8);
        let r = [header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0), segment(&m, 0x800, 14, 2, 0), status_desc(0x200)];
        process_request(&m, &r, &disk, &props(false));
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
        assert_eq!(disk.discards(), vec![(14 * 512, 1024)]);
    }

    #[test]
    fn host_io_error_is_ioerr() {
        let m = mem();
        let disk = MemDisk::new(4096);
        disk.fail_next_io();
        let r = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 0),
            Desc { addr: 0x4000, len: 512, writable: true },
            status_desc(0x200),
        ];
        assert_eq!(process_request(&m, &r, &disk, &props(false)), 1);
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn non_blocking_attempt_defers_without_a_status() {
        let m = mem();
        let disk = MemDisk::new(4096);
        disk.set_would_block(true);
        let read = [
            header(&m, 0x100, VIRTIO_BLK_T_IN, 0),
            Desc { addr: 0x4000, len: 512, writable: true },
            status_desc(0x200),
        ];
        m.write_obj(0xeeu8, GuestAddress(0x200)).unwrap();
        assert_eq!(try_process_request(&m, &read, &disk, &props(false)), None);
        assert_eq!(status(&m, 0x200), 0xee, "a deferred request must not report a status");
        // FLUSH always waits for the device; invalid requests complete at once.
        let flush = [header(&m, 0x300, VIRTIO_BLK_T_FLUSH, 0), status_desc(0x210)];
        assert_eq!(try_process_request(&m, &flush, &disk, &props(false)), None);
        let past_end = [
            header(&m, 0x400, VIRTIO_BLK_T_IN, 8),
            Desc { addr: 0x4000, len: 512, writable: true },
            status_desc(0x220),
        ];
        assert_eq!(try_process_request(&m, &past_end, &disk, &props(false)), Some(1));
        assert_eq!(status(&m, 0x220), VIRTIO_BLK_S_IOERR as u8);
        // The blocking retry completes it.
        assert_eq!(process_request(&m, &read, &disk, &props(false)), 513);
        assert_eq!(status(&m, 0x200), VIRTIO_BLK_S_OK as u8);
        disk.set_would_block(false);
        assert_eq!(try_process_request(&m, &read, &disk, &props(false)), Some(513));
    }

    #[test]
    fn random_rings_never_panic() {
        // The cargo-fuzz target's harness, on stable, with a cheap PRNG: chains that loop, point
        // anywhere, nest indirect tables, and carry random headers.
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let len = (next() % 1200) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make many descriptors plausible: small addresses and lengths, sane next fields.
            if round % 2 == 0 {
                for d in 0..16usize {
                    let base = 1 + d * 16;
                    if base + 16 <= data.len() {
                        let addr = 0x400 + (next() % 0x3000);
                        data[base..base + 8].copy_from_slice(&addr.to_le_bytes());
                        let l = (next() % 1100) as u32;
                        data[base + 8..base + 12].copy_from_slice(&l.to_le_bytes());
                        data[base + 14] = (next() % 16) as u8;
                        data[base + 15] = 0;
                    }
                }
            }
            crate::testing::fuzz_queue(&data);
        }
    }
}
