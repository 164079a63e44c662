//! An in-memory [`BlockIo`] for unit tests and the fuzz target.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::image::{BlockIo, GuestSlice};

/// A disk held in a `Vec<u8>`, recording discards and able to fail on demand.
#[derive(Default)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    discards: Mutex<Vec<(u64, u64)>>,
    fail_next: AtomicBool,
    would_block: AtomicBool,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk { data: Mutex::new(vec![0; size]), ..Default::default() }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    pub fn fill(&self, byte: u8) {
        self.lock().fill(byte);
    }

    pub fn discards(&self) -> Vec<(u64, u64)> {
        self.discards.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Makes non-blocking reads and writes (`try_*`) report that they would block.
    pub fn set_would_block(&self, on: bool) {
        self.would_block.store(on, Ordering::SeqCst);
    }

    /// Makes the next read or write fail with an I/O error.
    pub fn fail_next_io(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let size = self.lock().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    fn check_fail(&self) -> io::Result<()> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            Err(io::Error::other("injected failure"))
        } else {
            Ok(())
        }
    }
}

impl BlockIo for MemDisk {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, mut offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.check_fail()?;
        for b in bufs {
            let r = self.range(offset, b.len() as u64)?;
            b.copy_from(&self.lock()[r]);
            offset += b.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, mut offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        self.check_fail()?;
        for b in bufs {
            let r = self.range(offset, b.len() as u64)?;
            b.copy_to(&mut self.lock()[r]);
            offset += b.len() as u64;
        }
        Ok(())
    }

    fn try_read_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if self.would_block.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        self.read_at(offset, bufs)
    }

    fn try_write_at(&self, offset: u64, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        if self.would_block.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        self.write_at(offset, bufs)
    }

    fn flush(&self) -> io::Result<()> {
        self.check_fail()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.range(offset, len)?;
        if let Ok(mut d) = self.discards.lock() {
            d.push((offset, len));
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}

/// Fuzz harness shared by the cargo-fuzz target and a stable-toolchain unit test: a fixed ring
/// layout in 64 KiB of guest memory, with the input as the descriptor table, the avail ring and
/// the memory behind them, run through [`crate::request::process_queue`] against a 64 KiB
/// [`MemDisk`]. Whatever the bytes, nothing may panic; the used ring must stay consistent.
pub fn fuzz_queue(data: &[u8]) {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const QUEUE_SIZE: u16 = 16;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x100;
    const USED: u64 = 0x200;
    const DATA: u64 = 0x400;
    const MEM: usize = 0x1_0000;

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    // Byte 0: flags (event idx, read-only); then the descriptor table (16 x 16 bytes), the
    // avail ring (flags, idx, 16 entries), and everything else from DATA on.
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let take = |rest: &[u8], n: usize| -> (Vec<u8>, Vec<u8>) {
        let n = n.min(rest.len());
        (rest[..n].to_vec(), rest[n..].to_vec())
    };
    let (desc, rest) = take(rest, usize::from(QUEUE_SIZE) * 16);
    let (avail, rest) = take(&rest, 4 + 2 * usize::from(QUEUE_SIZE));
    let rest = &rest[..rest.len().min(MEM - DATA as usize)];
    if mem.write_slice(&desc, GuestAddress(DESC)).is_err()
        || mem.write_slice(&avail, GuestAddress(AVAIL)).is_err()
        || mem.write_slice(rest, GuestAddress(DATA)).is_err()
    {
        return;
    }

    let Ok(mut queue) = Queue::new(QUEUE_SIZE) else {
        return;
    };
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);

    let disk = MemDisk::new(0x1_0000);
    let props = crate::request::DiskProps {
        read_only: flags & 2 != 0,
        serial: *b"fuzz-serial-01234567",
        limits: crate::request::DiskLimits::default(),
    };
    // Twice: the second pass sees the state the first left (next_avail, used idx).
    for _ in 0..2 {
        if let Ok(n) = crate::request::process_queue(&mut queue, &mem, &disk, &props) {
            assert!(n <= usize::from(QUEUE_SIZE), "more chains than the queue holds");
        }
        let _ = queue.needs_notification(&mem);
    }
}
