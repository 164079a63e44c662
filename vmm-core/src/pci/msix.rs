//! MSI-X (PCI Local Bus spec 3.0 §6.8.2): the capability in configuration space, and the table and pending bit
//! array in a memory BAR.

use super::config::ConfigSpace;
use super::msi::MsiMessage;

pub const CAP_ID_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control bit 0 (§6.8.2.9).
const ENTRY_MASKED: u32 = 1;
/// "No vector" in virtio's `*_msix_vector` registers (virtio 1.2 §4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Clone, Debug)]
pub struct Msix {
    /// Offset of the capability in configuration space.
    cap: usize,
    /// (address low, address high, data, vector control) per vector.
    entries: Vec<[u32; 4]>,
}

impl Msix {
    /// Add the capability for `vectors` vectors with the table at `table_off` and the PBA at `pba_off` of BAR
    /// `bar` (offsets 8-byte aligned).
    pub fn new(cfg: &mut ConfigSpace, vectors: u16, bar: u8, table_off: u32, pba_off: u32) -> Msix {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        // Only Enable and Function Mask are writable.
        let cap = cfg.add_cap(CAP_ID_MSIX, &body, &[0x00, 0xc0]);
        Msix { cap, entries: vec![[0, 0, 0, ENTRY_MASKED]; usize::from(vectors)] }
    }

    fn control(&self, cfg: &ConfigSpace) -> u16 {
        cfg.get16(self.cap + 2)
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        self.control(cfg) & CTRL_ENABLE != 0
    }

    /// The message `vector` sends now, or `None` if MSI-X is off, the function or the vector is masked, or the
    /// vector does not exist.
    pub fn message(&self, cfg: &ConfigSpace, vector: u16) -> Option<MsiMessage> {
        let ctrl = self.control(cfg);
        if ctrl & CTRL_ENABLE == 0 || ctrl & CTRL_FUNCTION_MASK != 0 {
            return None;
        }
        let e = self.entries.get(usize::from(vector))?;
        if e[3] & ENTRY_MASKED != 0 {
            return None;
        }
        Some(MsiMessage { address: u64::from(e[0]) | u64::from(e[1]) << 32, data: e[2] })
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * 16
    }

    /// Table read at `off` (dword or qword accesses; others read as 0).
    pub fn table_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        let mut i = 0;
        while i + 4 <= data.len() {
            let o = off + i as u64;
            if let Some(e) = self.entries.get((o / 16) as usize) {
                data[i..i + 4].copy_from_slice(&e[(o % 16 / 4) as usize].to_le_bytes());
            }
            i += 4;
        }
    }

    /// Table write; returns true if a message or mask changed.
    pub fn table_write(&mut self, off: u64, data: &[u8]) -> bool {
        let mut changed = false;
        let mut i = 0;
        while i + 4 <= data.len() {
            let o = off + i as u64;
            if let Some(e) = self.entries.get_mut((o / 16) as usize) {
                let w = (o % 16 / 4) as usize;
                let mut v = u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                if w == 3 {
                    v &= ENTRY_MASKED;
                }
                changed |= e[w] != v;
                e[w] = v;
            }
            i += 4;
        }
        changed
    }

    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = [0, 0, 0, ENTRY_MASKED];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_delivers_only_when_enabled_and_unmasked() {
        let mut cfg = ConfigSpace::new(1, 2, 0, 0, 0, 0);
        let mut m = Msix::new(&mut cfg, 3, 0, 0x4000, 0x5000);
        let cap = m.cap;
        let mut d = [0u8; 4];
        cfg.read(cap as u16 + 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4000);
        cfg.read(cap as u16, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 16, 2, "table size - 1");
        assert!(m.table_write(16, &0xfee0_0000u32.to_le_bytes()));
        m.table_write(24, &0x31u32.to_le_bytes());
        assert_eq!(m.message(&cfg, 1), None, "MSI-X disabled");
        cfg.write(cap as u16 + 3, &[0x80]);
        assert_eq!(m.message(&cfg, 1), None, "vector masked");
        m.table_write(28, &0u32.to_le_bytes());
        assert_eq!(m.message(&cfg, 1), Some(MsiMessage { address: 0xfee0_0000, data: 0x31 }));
        cfg.write(cap as u16 + 3, &[0xc0]);
        assert_eq!(m.message(&cfg, 1), None, "function masked");
        assert_eq!(m.message(&cfg, 7), None);
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    }
}
