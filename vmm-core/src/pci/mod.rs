//! PCI bus 0 of the `pc` machine: configuration mechanism #1 at ports 0xcf8/0xcfc, an i440FX-like host bridge
//! at 00.0, endpoint functions in the other slots, and the 32-bit MMIO window their BARs live in.
//!
//! Layout and interrupt decisions are in docs/virtio-pci.md. In short: BARs are assigned by the core before the
//! guest starts (there is no firmware), placed in [`MmioWindow`] (from the end of low RAM, at least 0xc000_0000,
//! to the IOAPIC at 0xfec0_0000); a guest may move them and the window follows. Endpoints interrupt with MSI-X
//! only (Interrupt Pin 0), so no INTx routing table is needed.

pub mod config;
pub mod msi;
pub mod msix;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::devices::bus::BusDevice;
use crate::memory::RamLayout;
use crate::Error;
use config::ConfigSpace;

/// Configuration mechanism #1 (PCI Local Bus spec 3.0 §3.2.2.3.2): the address register and the data window.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_DATA_PORT: u16 = 0xcfc;

/// The end (exclusive) of the 32-bit MMIO window: the IOAPIC, LAPIC, HPET and BIOS area sit above it.
pub const MMIO_WINDOW_END: u64 = 0xfec0_0000;

/// A PCI function on bus 0.
pub trait PciFunction: Send + Sync {
    /// Read `data.len()` (1, 2 or 4) bytes of configuration space at `offset` (< 256, naturally aligned).
    fn config_read(&self, offset: u16, data: &mut [u8]);
    fn config_write(&self, offset: u16, data: &[u8]);
    /// If `addr` falls in one of this function's memory BARs (and memory decoding is on): (BAR index, offset).
    fn bar_lookup(&self, addr: u64) -> Option<(usize, u64)>;
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// Power-on state (guest reboot).
    fn reset(&self);
}

/// The guest-physical range BARs are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    pub start: u64,
    pub end: u64,
}

impl MmioWindow {
    /// For the `pc` RAM layout: above low RAM (rounded up to 256 MiB) but never below 0xc000_0000, as QEMU's
    /// `pc` keeps its PCI hole; guest RAM never reaches into it (memory.rs splits RAM at 0xc000_0000).
    pub fn for_layout(layout: &RamLayout) -> MmioWindow {
        let low_end = layout.low_ram_end().div_ceil(256 << 20) * (256 << 20);
        MmioWindow { start: low_end.max(crate::memory::PCI_HOLE_START), end: MMIO_WINDOW_END }
    }
}

/// Hands out naturally aligned BAR addresses from the window, lowest first.
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    pub fn new(w: MmioWindow) -> BarAllocator {
        BarAllocator { next: w.start, end: w.end }
    }

    /// `size` must be a power of two (BARs decode naturally aligned power-of-two ranges, PCI 3.0 §6.2.5.1).
    pub fn alloc(&mut self, size: u64, what: &str) -> Result<u64, Error> {
        if !size.is_power_of_two() {
            return Err(Error::Config(format!("{what}: BAR size {size:#x} is not a power of two")));
        }
        let base = self.next.div_ceil(size) * size;
        match base.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next = end;
                Ok(base)
            }
            _ => Err(Error::Config(format!("{what}: no room for a {size:#x}-byte BAR in the PCI MMIO window"))),
        }
    }
}

/// The i440FX host bridge (vendor 8086, device 1237), as QEMU's `pc` has it at 00.0. Linux's
/// `pci_sanity_check` looks for a host bridge or an Intel/Compaq device before it trusts mechanism #1.
pub struct HostBridge {
    cfg: Mutex<ConfigSpace>,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        HostBridge { cfg: Mutex::new(ConfigSpace::new(0x8086, 0x1237, 0x02, 0x06_00_00, 0, 0)) }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciFunction for HostBridge {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        lock(&self.cfg).read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        lock(&self.cfg).write(offset, data);
    }
    fn bar_lookup(&self, _: u64) -> Option<(usize, u64)> {
        None
    }
    fn bar_read(&self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _: usize, _: u64, _: &[u8]) {}
    fn reset(&self) {
        lock(&self.cfg).reset();
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bus 0 with its 32 slots (function 0 only) and the config address register.
pub struct PciRoot {
    slots: Vec<Option<Arc<dyn PciFunction>>>,
    address: AtomicU32,
}

impl PciRoot {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> PciRoot {
        let mut slots: Vec<Option<Arc<dyn PciFunction>>> = (0..32).map(|_| None).collect();
        slots[0] = Some(Arc::new(HostBridge::new()));
        PciRoot { slots, address: AtomicU32::new(0) }
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Option<u8> {
        self.slots.iter().position(|s| s.is_none()).map(|i| i as u8)
    }

    pub fn add(&mut self, slot: u8, f: Arc<dyn PciFunction>) -> Result<(), Error> {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(f);
                Ok(())
            }
            Some(Some(_)) => Err(Error::Config(format!("PCI slot {slot:#x} is already in use"))),
            None => Err(Error::Config(format!("PCI slot {slot:#x} does not exist (0-31)"))),
        }
    }

    /// The function and register offset the address register selects for a data access at byte `lane` of
    /// 0xcfc, if enabled and on bus 0 function 0.
    fn selected(&self, lane: u64) -> Option<(&Arc<dyn PciFunction>, u16)> {
        let a = self.address.load(Ordering::SeqCst);
        // Bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2 register.
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 || (a >> 8) & 7 != 0 {
            return None;
        }
        let dev = ((a >> 11) & 0x1f) as usize;
        let f = self.slots[dev].as_ref()?;
        Some((f, (a & 0xfc) as u16 + lane as u16))
    }

    fn mmio_lookup(&self, addr: u64) -> Option<(&Arc<dyn PciFunction>, usize, u64)> {
        self.slots.iter().flatten().find_map(|f| f.bar_lookup(addr).map(|(b, o)| (f, b, o)))
    }

    pub fn reset(&self) {
        self.address.store(0, Ordering::SeqCst);
        for f in self.slots.iter().flatten() {
            f.reset();
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// Port 0xcf8 (4 bytes): only dword accesses reach the address register; byte and word accesses are other
/// chipset registers (0xcf9 reset control, Linux's 0xcfb probe), which this bridge ignores.
pub struct ConfigAddressPort(pub Arc<PciRoot>);

impl BusDevice for ConfigAddressPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.0.address.load(Ordering::SeqCst).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            // Bits 30:24 are reserved and read as 0; bits 1:0 select type 0/1 and are not a register offset.
            self.0.address.store(v & 0x80ff_fffc, Ordering::SeqCst);
        }
    }
}

/// Port 0xcfc (4 bytes): the data window; byte lanes address bytes of the selected dword.
pub struct ConfigDataPort(pub Arc<PciRoot>);

impl BusDevice for ConfigDataPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.0.selected(offset) {
            Some((f, reg)) if usize::from(reg & 3) + data.len() <= 4 => f.config_read(reg, data),
            // No device: master abort, all ones (PCI 3.0 §6.1).
            _ => data.fill(0xff),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some((f, reg)) = self.0.selected(offset) {
            if usize::from(reg & 3) + data.len() <= 4 {
                f.config_write(reg, data);
            }
        }
    }
}

impl PciRoot {
    /// An MMIO read at guest-physical `addr`; `false` if no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.mmio_lookup(addr) {
            Some((f, bar, off)) => {
                f.bar_read(bar, off, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.mmio_lookup(addr) {
            Some((f, bar, off)) => {
                f.bar_write(bar, off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(root: &Arc<PciRoot>, addr: u32, lane: u64, len: usize) -> u32 {
        ConfigAddressPort(root.clone()).write(0, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        ConfigDataPort(root.clone()).read(lane, &mut d[..len]);
        u32::from_le_bytes(d)
    }

    #[test]
    fn mechanism_1_reaches_the_host_bridge_and_empty_slots_read_all_ones() {
        let root = Arc::new(PciRoot::new());
        assert_eq!(cfg_read(&root, 0x8000_0000, 0, 4), 0x1237_8086);
        assert_eq!(cfg_read(&root, 0x8000_0008, 2, 2), 0x0600, "class: host bridge");
        assert_eq!(cfg_read(&root, 0x8000_0800, 0, 4), 0xffff_ffff, "slot 1 is empty");
        assert_eq!(cfg_read(&root, 0x0000_0000, 0, 4), 0xffff_ffff, "enable bit clear");
        assert_eq!(cfg_read(&root, 0x8001_0000, 0, 4), 0xffff_ffff, "bus 1 does not exist");
        // Linux's probe: the address register reads back what was written (reserved bits clear).
        let mut d = [0u8; 4];
        ConfigAddressPort(root.clone()).read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8001_0000);
        assert_eq!(root.free_slot(), Some(1));
    }

    #[test]
    fn the_window_starts_above_low_ram_and_bars_are_aligned() {
        let small = MmioWindow::for_layout(&RamLayout::pc(512 << 20));
        assert_eq!(small, MmioWindow { start: 0xc000_0000, end: MMIO_WINDOW_END });
        let mid = MmioWindow::for_layout(&RamLayout::pc(0xd800_0000));
        assert_eq!(mid.start, 0xe000_0000);
        let mut a = BarAllocator::new(small);
        assert_eq!(a.alloc(0x1000, "x").unwrap(), 0xc000_0000);
        assert_eq!(a.alloc(0x8000, "x").unwrap(), 0xc000_8000);
        assert!(a.alloc(0x3000, "x").is_err());
        assert!(a.alloc(1 << 31, "x").is_err());
    }
}
