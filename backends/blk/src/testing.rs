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
