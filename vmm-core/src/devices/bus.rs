//! An address bus (port I/O or MMIO): devices claim address ranges; an access goes to the device whose range
//! holds its first byte. The device trait is deliberately small (read and write at an offset in its range):
//! PCI configuration, reset and power hooks will get traits of their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::Error;

/// A device on a bus. `offset` is relative to the start of the range it was inserted at; `data.len()` is the
/// access size (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Clone)]
struct Entry {
    len: u64,
    name: &'static str,
    dev: Arc<dyn BusDevice>,
}

/// Ranges are kept sorted by base; they never overlap (checked on insert).
#[derive(Clone, Default)]
pub struct Bus {
    kind: &'static str,
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// `kind` names the bus in errors ("port I/O", "MMIO").
    pub fn new(kind: &'static str) -> Bus {
        Bus { kind, ranges: BTreeMap::new() }
    }

    /// Claim `[base, base + len)` for `dev`. Empty ranges, ranges that wrap around the address space and ranges
    /// that overlap a claimed one are refused.
    pub fn insert(&mut self, base: u64, len: u64, name: &'static str, dev: Arc<dyn BusDevice>) -> Result<(), Error> {
        let bad = |reason: String| Error::BusRange { bus: self.kind, device: name, base, len, reason };
        if len == 0 {
            return Err(bad("the range is empty".into()));
        }
        let last = base.checked_add(len - 1).ok_or_else(|| bad("the range overflows the address space".into()))?;
        // The closest range starting at or below `last` is the only one that can overlap.
        if let Some((&b, e)) = self.ranges.range(..=last).next_back() {
            if b + (e.len - 1) >= base {
                return Err(bad(format!("it overlaps {} at {:#x}..={:#x}", e.name, b, b + (e.len - 1))));
            }
        }
        self.ranges.insert(base, Entry { len, name, dev });
        Ok(())
    }

    /// The device that claims `addr`, with the offset of `addr` in its range.
    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let (&base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off < e.len).then_some((e, off))
    }

    /// Read through the claiming device; `false` when nothing claims `addr` (`data` is then left alone).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.dev.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Write through the claiming device; `false` when nothing claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                e.dev.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_claiming_device_at_their_offset() {
        let mut bus = Bus::new("port I/O");
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, "a", a.clone()).unwrap();
        bus.insert(0x2f8, 8, "b", b.clone()).unwrap();
        assert!(bus.write(0x3fd, &[7]));
        assert!(bus.write(0x2f8, &[1, 2]));
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.write(0x3f7, &[1]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3ff, &mut d));
        assert_eq!(d, [7]);
        let mut d = [0xaau8; 1];
        assert!(!bus.read(0x300, &mut d));
        assert_eq!(d, [0xaa]);
        assert_eq!(*a.0.lock().unwrap(), vec![(5, vec![7])]);
        assert_eq!(*b.0.lock().unwrap(), vec![(0, vec![1, 2])]);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let mut bus = Bus::new("port I/O");
        let d = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, "com1", d.clone()).unwrap();
        for (base, len) in [(0x3f0, 9), (0x3ff, 1), (0x3f8, 8), (0x3fa, 2), (0x3f0, 0x20)] {
            let err = bus.insert(base, len, "x", d.clone()).unwrap_err().to_string();
            assert!(err.contains("overlaps com1"), "{err}");
        }
        assert!(bus.insert(0x3f0, 8, "x", d.clone()).is_ok());
        assert!(bus.insert(0x400, 0, "x", d.clone()).unwrap_err().to_string().contains("empty"));
        assert!(bus.insert(u64::MAX, 2, "x", d.clone()).unwrap_err().to_string().contains("overflows"));
        assert!(bus.insert(u64::MAX, 1, "x", d).is_ok());
    }
}
