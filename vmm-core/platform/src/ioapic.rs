//! The I/O APIC (Intel 82093AA data sheet): 24 redirection entries behind IOREGSEL (offset 0x00)
//! and IOWIN (offset 0x10) in the MMIO window at 0xfec00000.
//!
//! Input pins carry active-high levels (the MADT declares ISA IRQs active-high and the router
//! inverts nothing), so the polarity bit is stored but not applied, as on QEMU's IOAPIC.

/// Default MMIO base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const IOAPIC_SIZE: u64 = 0x20;
/// Number of redirection entries (pins / GSIs 0..24).
pub const NUM_PINS: usize = 24;
/// Version register: 82093AA version 0x11, maximum redirection entry 23. Version 0x11 has no
/// EOI register, so Linux clears remote IRR of level entries with the LAPIC EOI broadcast.
const VERSION: u32 = 0x11 | ((NUM_PINS as u32 - 1) << 16);

const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the guest may write in a redirection entry (not delivery status, not remote IRR).
const RTE_WRITABLE: u64 = !(RTE_REMOTE_IRR | RTE_DELIVERY_STATUS) & 0xff00_0000_0001_ffff;

/// An interrupt message the IOAPIC (or a LAPIC's ICR) sends on the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicMessage {
    /// Vector (fixed / lowest priority delivery) or SIPI page.
    pub vector: u8,
    /// Delivery mode: 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 6 start-up, 7 ExtINT.
    pub delivery_mode: u8,
    /// Logical (true) or physical destination.
    pub logical: bool,
    /// Destination APIC ID (physical) or logical mask.
    pub destination: u8,
    /// Level-triggered (the target sets TMR and broadcasts the EOI back).
    pub level_triggered: bool,
}

/// The IOAPIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u8,
    ioregsel: u8,
    redirection: [u64; NUM_PINS],
    /// Current input level of every pin.
    levels: u32,
}

impl IoApic {
    /// An IOAPIC with APIC ID `id`, every entry masked (the power-on state).
    pub fn new(id: u8) -> Self {
        IoApic { id, ioregsel: 0, redirection: [RTE_MASKED; NUM_PINS], levels: 0 }
    }

    /// The IOAPIC's ID (IOAPICID bits 27:24).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The redirection entry of `pin` (for tests and debugging).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    fn message(&self, pin: usize) -> ApicMessage {
        let e = self.redirection[pin];
        ApicMessage {
            vector: e as u8,
            delivery_mode: ((e >> 8) & 7) as u8,
            logical: e & (1 << 11) != 0,
            destination: (e >> 56) as u8,
            level_triggered: e & RTE_LEVEL != 0,
        }
    }

    /// Sends the interrupt of `pin` if its state calls for it; appends to `out`.
    fn service(&mut self, pin: usize, out: &mut Vec<ApicMessage>) {
        let e = self.redirection[pin];
        if e & RTE_MASKED != 0 || self.levels & (1 << pin) == 0 {
            return;
        }
        if e & RTE_LEVEL != 0 {
            // Level: one message per assertion until the EOI clears remote IRR.
            if e & RTE_REMOTE_IRR != 0 {
                return;
            }
            self.redirection[pin] |= RTE_REMOTE_IRR;
        }
        out.push(self.message(pin));
    }

    /// Drives input `pin` to `level`; any message to deliver is appended to `out`.
    /// An edge-triggered pin sends on the rising edge; an edge arriving while the entry is
    /// masked is lost, as on the 82093AA.
    pub fn set_irq(&mut self, pin: usize, level: bool, out: &mut Vec<ApicMessage>) {
        if pin >= NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        let level_triggered = self.redirection[pin] & RTE_LEVEL != 0;
        if level && (level_triggered || !was) {
            self.service(pin, out);
        }
    }

    /// The EOI broadcast of a LAPIC for `vector`: clears remote IRR of level entries with that
    /// vector and re-sends those whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8, out: &mut Vec<ApicMessage>) {
        for pin in 0..NUM_PINS {
            let e = self.redirection[pin];
            if e & RTE_REMOTE_IRR != 0 && e as u8 == vector {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                self.service(pin, out);
            }
        }
    }

    fn read_reg(&self) -> u32 {
        match self.ioregsel {
            0x00 => u32::from(self.id & 0x0f) << 24,
            0x01 => VERSION,
            0x02 => u32::from(self.id & 0x0f) << 24,
            r @ 0x10..=0x3f => {
                let e = self.redirection[usize::from(r - 0x10) / 2];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, val: u32, out: &mut Vec<ApicMessage>) {
        match self.ioregsel {
            0x00 => self.id = ((val >> 24) & 0x0f) as u8,
            r @ 0x10..=0x3f => {
                let pin = usize::from(r - 0x10) / 2;
                let old = self.redirection[pin];
                let new = if r & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(val)
                } else {
                    (old & 0x0000_0000_ffff_ffff) | (u64::from(val) << 32)
                };
                let mut e = (old & !RTE_WRITABLE) | (new & RTE_WRITABLE);
                if e & RTE_LEVEL == 0 {
                    // Remote IRR is only defined for level entries.
                    e &= !RTE_REMOTE_IRR;
                }
                self.redirection[pin] = e;
                // Unmasking (or switching to level) with the line asserted sends now.
                if e & RTE_LEVEL != 0 {
                    self.service(pin, out);
                }
            }
            _ => {} // Version and arbitration are read-only.
        }
    }

    /// MMIO read at `offset` from the base. IOREGSEL at 0x00, IOWIN at 0x10 (32-bit registers;
    /// narrower reads return the low bytes).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v: u32 = match offset & !3 {
            0x00 => u32::from(self.ioregsel),
            0x10 => self.read_reg(),
            _ => 0,
        };
        let bytes = (v >> ((offset & 3) * 8)).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset`; messages to deliver are appended to `out`.
    pub fn write(&mut self, offset: u64, data: &[u8], out: &mut Vec<ApicMessage>) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.ioregsel = v as u8,
            0x10 => self.write_reg(v, out),
            _ => log::debug!("ioapic: write of {data:x?} to unknown offset {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wr(io: &mut IoApic, reg: u8, val: u32) -> Vec<ApicMessage> {
        let mut out = Vec::new();
        io.write(0, &[reg], &mut out);
        io.write(0x10, &val.to_le_bytes(), &mut out);
        out
    }

    fn rd(io: &mut IoApic, reg: u8) -> u32 {
        let mut out = Vec::new();
        io.write(0, &[reg], &mut out);
        let mut d = [0u8; 4];
        io.read(0x10, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn id_version_and_entries_read_back() {
        let mut io = IoApic::new(1);
        assert_eq!(rd(&mut io, 0), 1 << 24);
        assert_eq!(rd(&mut io, 1), 0x0017_0011);
        assert_eq!(rd(&mut io, 0x10), 0x0001_0000, "masked at reset");
        wr(&mut io, 0x14, 0x0000_a031);
        wr(&mut io, 0x15, 0x0300_0000);
        assert_eq!(rd(&mut io, 0x14), 0x0000_a031);
        assert_eq!(rd(&mut io, 0x15), 0x0300_0000);
        // Remote IRR and delivery status are read-only.
        wr(&mut io, 0x14, 0x0000_5031);
        assert_eq!(rd(&mut io, 0x14), 0x0000_0031);
    }

    #[test]
    fn edge_pin_sends_on_rising_edge_only_when_unmasked() {
        let mut io = IoApic::new(0);
        let mut out = Vec::new();
        io.set_irq(2, true, &mut out);
        assert!(out.is_empty(), "masked");
        io.set_irq(2, false, &mut out);
        wr(&mut io, 0x14, 0x30);
        io.set_irq(2, true, &mut out);
        io.set_irq(2, true, &mut out);
        assert_eq!(
            out,
            vec![ApicMessage {
                vector: 0x30,
                delivery_mode: 0,
                logical: false,
                destination: 0,
                level_triggered: false
            }]
        );
    }

    #[test]
    fn level_pin_uses_remote_irr_and_eoi_resends() {
        let mut io = IoApic::new(0);
        let mut out = Vec::new();
        wr(&mut io, 0x10 + 2 * 9, 0x1_8039); // masked, level
        io.set_irq(9, true, &mut out);
        assert!(out.is_empty());
        out = wr(&mut io, 0x10 + 2 * 9, 0x8039); // unmask: line high, sends
        assert_eq!(out.len(), 1);
        assert!(out[0].level_triggered);
        assert_ne!(rd(&mut io, 0x10 + 2 * 9) & (1 << 14), 0, "remote IRR");
        out.clear();
        io.set_irq(9, true, &mut out);
        assert!(out.is_empty(), "remote IRR blocks");
        io.end_of_interrupt(0x39, &mut out);
        assert_eq!(out.len(), 1, "still asserted after EOI: sent again");
        out.clear();
        io.set_irq(9, false, &mut out);
        io.end_of_interrupt(0x39, &mut out);
        assert!(out.is_empty());
        assert_eq!(rd(&mut io, 0x10 + 2 * 9) & (1 << 14), 0);
        io.end_of_interrupt(0x40, &mut out);
        assert!(out.is_empty());
    }
}
