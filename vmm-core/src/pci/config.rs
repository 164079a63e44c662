//! A type 0 configuration header (PCI Local Bus spec 3.0 §6.1) with 32-bit memory BARs and a capability list.

/// Command register bit 1: the function decodes its memory BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status register bit 4: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
const COMMAND: usize = 0x04;
const BAR0: usize = 0x10;
const CAP_PTR: usize = 0x34;
/// Where capabilities start (after the 64-byte header).
pub const FIRST_CAP: usize = 0x40;

/// 256 bytes of configuration space, with per-byte write masks so the guest can only change what is writable.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    wmask: [u8; 256],
    /// Size of each memory BAR (0: not implemented).
    bar_size: [u64; 6],
    initial: Box<[u8; 256]>,
    next_cap: usize,
    last_cap: Option<usize>,
}

impl ConfigSpace {
    /// `class` is base class << 16 | subclass << 8 | prog-if.
    pub fn new(vendor: u16, device: u16, revision: u8, class: u32, sub_vendor: u16, sub_device: u16) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            wmask: [0; 256],
            bar_size: [0; 6],
            initial: Box::new([0; 256]),
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        c.set16(0x00, vendor);
        c.set16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = class as u8;
        c.bytes[0x0a] = (class >> 8) as u8;
        c.bytes[0x0b] = (class >> 16) as u8;
        c.set16(0x2c, sub_vendor);
        c.set16(0x2e, sub_device);
        // Command: I/O, memory, bus master, INTx disable are the writable bits we honour or store.
        c.wmask[COMMAND] = 0x07;
        c.wmask[COMMAND + 1] = 0x04;
        // Interrupt Line is scratch for the OS; Interrupt Pin stays 0 (no INTx, MSI-X only).
        c.wmask[0x3c] = 0xff;
        *c.initial = c.bytes;
        c
    }

    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([self.bytes[off], self.bytes[off + 1], self.bytes[off + 2], self.bytes[off + 3]])
    }

    /// Implement BAR `i` as a 32-bit non-prefetchable memory BAR of `size` bytes (power of two, ≥ 16) at `addr`.
    pub fn add_mem_bar(&mut self, i: usize, size: u64, addr: u64) {
        self.bar_size[i] = size;
        let off = BAR0 + 4 * i;
        self.set32(off, addr as u32);
        // The low 4 bits are type bits (0: 32-bit memory, not prefetchable); the address bits below the size
        // read as 0, which is how the OS sizes the BAR (PCI 3.0 §6.2.5.1).
        let mask = !(size as u32 - 1) & !0xf;
        self.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        *self.initial = self.bytes;
    }

    /// Append a capability with ID `id` and `body` (the bytes after ID and next pointer), writable where
    /// `wmask` says. Returns its offset.
    pub fn add_cap(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        let len = 2 + body.len();
        assert!(off + len <= 256, "capabilities overflow configuration space");
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + len].copy_from_slice(body);
        self.wmask[off + 2..off + 2 + wmask.len()].copy_from_slice(wmask);
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAP_PTR] = off as u8;
                let st = self.get16(0x06) | STATUS_CAP_LIST;
                self.set16(0x06, st);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len).div_ceil(4) * 4;
        *self.initial = self.bytes;
        off
    }

    pub fn read(&self, off: u16, data: &mut [u8]) {
        let off = usize::from(off);
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// Write through the masks.
    pub fn write(&mut self, off: u16, data: &[u8]) {
        let off = usize::from(off);
        for (i, &b) in data.iter().enumerate() {
            if let (Some(cur), Some(m)) = (self.bytes.get(off + i).copied(), self.wmask.get(off + i)) {
                self.bytes[off + i] = (cur & !m) | (b & m);
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.get16(COMMAND)
    }

    /// BAR `i`'s base if implemented and memory decoding is on.
    pub fn bar_addr(&self, i: usize) -> Option<u64> {
        if self.bar_size[i] == 0 || self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        Some(u64::from(self.get32(BAR0 + 4 * i) & !0xf))
    }

    pub fn bar_size(&self, i: usize) -> u64 {
        self.bar_size[i]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8; 256] {
        &mut self.bytes
    }

    /// Back to the state the device was built with (BARs at their assigned addresses, decoding as set then).
    pub fn reset(&mut self) {
        self.bytes = *self.initial;
    }

    /// Turn on memory decoding in the initial state too: with no firmware, the core plays the BIOS and
    /// leaves devices enabled at their assigned BARs, as SeaBIOS would.
    pub fn enable_memory_at_boot(&mut self) {
        let c = self.command() | COMMAND_MEMORY | 0x4;
        self.set16(COMMAND, c);
        *self.initial = self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_the_address_moves() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 1, 0x01_80_00, 0x1af4, 0x0002);
        c.add_mem_bar(0, 0x8000, 0xc000_0000);
        c.enable_memory_at_boot();
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        let mut d = [0u8; 4];
        c.read(0x10, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_8000);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
        // Unimplemented BARs stay 0, read-only IDs stay.
        c.write(0x14, &0xffff_ffffu32.to_le_bytes());
        c.write(0x00, &0u32.to_le_bytes());
        c.read(0x14, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        c.read(0x00, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1042_1af4);
        c.write(0x04, &[0, 0]);
        assert_eq!(c.bar_addr(0), None, "memory decoding off");
        c.reset();
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0, 0);
        let a = c.add_cap(0x11, &[0; 10], &[]);
        let b = c.add_cap(0x09, &[14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((a, b), (0x40, 0x4c));
        assert_eq!(c.bytes[0x34], 0x40);
        assert_eq!(c.bytes[0x41], 0x4c);
        assert_eq!(c.bytes[0x4d], 0);
        assert_ne!(c.get16(0x06) & STATUS_CAP_LIST, 0);
    }
}
