//! The 8259A programmable interrupt controller pair (master at 0x20/0x21, slave at 0xa0/0xa1,
//! cascaded on master IRQ2) with the PIIX edge/level control registers (ELCR) at 0x4d0/0x4d1.
//!
//! Behaviour follows the Intel 8259A data sheet (ICW1-4, OCW1-3, "Interrupt Sequence",
//! "End of Interrupt", "Priority modes", "Poll command") and, for ELCR, the Intel 82371AB PIIX4
//! data sheet ("ELCR1/ELCR2 - Edge/Level Control Registers").

/// Master command port.
pub const MASTER_CMD: u16 = 0x20;
/// Master data (mask) port.
pub const MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const SLAVE_CMD: u16 = 0xa0;
/// Slave data (mask) port.
pub const SLAVE_DATA: u16 = 0xa1;
/// ELCR for IRQ0-7.
pub const ELCR_MASTER: u16 = 0x4d0;
/// ELCR for IRQ8-15.
pub const ELCR_SLAVE: u16 = 0x4d1;

/// One 8259A.
#[derive(Clone, Debug, Default)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// Input line levels, for edge detection.
    lines: u8,
    /// ELCR: bit set = level-sensitive input.
    elcr: u8,
    /// Bits of ELCR the guest may set.
    elcr_writable: u8,
    /// ICW1.LTIM: every input level-sensitive.
    ltim: bool,
    /// Rotation: IRQ number that currently has the lowest priority, plus one (mod 8).
    priority_add: u8,
    /// 0 = operational; 2..=4 = the next byte on the data port is ICW2..ICW4.
    init_step: u8,
    /// ICW1.IC4: an ICW4 follows.
    icw4_expected: bool,
    /// ICW1.SNGL: no ICW3.
    single: bool,
    /// ICW2 bits 7:3.
    vector_base: u8,
    /// ICW4.AEOI.
    auto_eoi: bool,
    /// OCW2 rotate-in-automatic-EOI mode.
    rotate_on_auto_eoi: bool,
    /// ICW4.SFNM.
    special_fully_nested: bool,
    /// OCW3 read register select: true = ISR, false = IRR.
    read_isr: bool,
    /// OCW3 poll command armed for the next read.
    poll: bool,
    /// OCW3 special mask mode.
    special_mask: bool,
}

impl Chip {
    fn new(elcr_writable: u8) -> Self {
        Chip { elcr_writable, ..Default::default() }
    }

    fn level_mask(&self) -> u8 {
        if self.ltim {
            0xff
        } else {
            self.elcr
        }
    }

    /// Drives input `irq` (0..8) to `level`.
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if self.level_mask() & bit != 0 {
            // Level-sensitive: the request follows the line.
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            // Edge-sensitive: a rising edge latches a request; it stays until acknowledged.
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The highest-priority set bit of `mask` as a priority rank (0 = highest), or 8 for none.
    fn rank(&self, mask: u8) -> u8 {
        (0..8).find(|&r| mask & (1 << ((r + self.priority_add) & 7)) != 0).unwrap_or(8)
    }

    /// The IRQ (0..8) this chip wants to signal on INT, if any beats what is in service.
    fn pending_irq(&self) -> Option<u8> {
        let req = self.rank(self.irr & !self.imr);
        if req == 8 {
            return None;
        }
        // In special mask mode, masked in-service levels do not inhibit lower priorities.
        let mut isr = self.isr;
        if self.special_mask {
            isr &= !self.imr;
        }
        // In special fully nested mode (master), a slave in service does not block a further
        // request from the same slave (8259A data sheet "Special Fully Nest Mode").
        if self.special_fully_nested {
            isr &= !(1 << 2);
        }
        let cur = self.rank(isr);
        if req < cur {
            Some((req + self.priority_add) & 7)
        } else {
            None
        }
    }

    /// The INTA handshake for `irq` on this chip: clears an edge request and marks it in service.
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        if self.level_mask() & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
    }

    /// Highest-priority in-service IRQ.
    fn highest_isr(&self) -> Option<u8> {
        let r = self.rank(self.isr);
        (r < 8).then_some((r + self.priority_add) & 7)
    }

    /// Poll command read: like INTA, but returns `0x80 | irq` or 0 instead of a vector.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending_irq() {
            Some(irq) => {
                self.ack(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    fn write_cmd(&mut self, val: u8) {
        if val & 0x10 != 0 {
            // ICW1: start initialization. The data sheet: IMR cleared, IR7 gets lowest priority,
            // special mask mode cleared, status read set to IRR; the edge-sense latch is reset so
            // that a line already high needs a new rising edge.
            self.init_step = 2;
            self.icw4_expected = val & 0x01 != 0;
            self.single = val & 0x02 != 0;
            self.ltim = val & 0x08 != 0;
            self.imr = 0;
            self.isr = 0;
            self.irr &= self.level_mask() & self.lines;
            self.lines = 0;
            self.priority_add = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.auto_eoi = false;
            self.rotate_on_auto_eoi = false;
            self.special_fully_nested = false;
            if self.icw4_expected {
                log::trace!("8259: ICW1 {val:#x}");
            }
        } else if val & 0x08 != 0 {
            // OCW3.
            if val & 0x04 != 0 {
                self.poll = true;
            }
            match val & 0x03 {
                0x02 => self.read_isr = false,
                0x03 => self.read_isr = true,
                _ => {}
            }
            match val & 0x60 {
                0x40 => self.special_mask = false,
                0x60 => self.special_mask = true,
                _ => {}
            }
        } else {
            // OCW2: R, SL, EOI in bits 7:5, level in 2:0.
            let level = val & 7;
            match val >> 5 {
                0b000 => self.rotate_on_auto_eoi = false,
                0b100 => self.rotate_on_auto_eoi = true,
                0b001 | 0b101 => {
                    // Non-specific EOI (optionally rotating): the highest in-service level.
                    if let Some(irq) = self.highest_isr() {
                        self.isr &= !(1 << irq);
                        if val >> 5 == 0b101 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << level),
                0b111 => {
                    self.isr &= !(1 << level);
                    self.priority_add = (level + 1) & 7;
                }
                0b110 => self.priority_add = (level + 1) & 7,
                _ => {} // 0b010: no operation.
            }
        }
    }

    fn write_data(&mut self, val: u8) {
        match self.init_step {
            2 => {
                self.vector_base = val & 0xf8;
                self.init_step = if !self.single {
                    3
                } else if self.icw4_expected {
                    4
                } else {
                    0
                };
            }
            3 => {
                // ICW3: the cascade wiring is fixed (slave on master IR2), nothing to record.
                self.init_step = if self.icw4_expected { 4 } else { 0 };
            }
            4 => {
                // ICW4: bit 0 (8086 mode) is assumed; bit 1 AEOI; bit 4 SFNM.
                self.auto_eoi = val & 0x02 != 0;
                self.special_fully_nested = val & 0x10 != 0;
                self.init_step = 0;
            }
            _ => self.imr = val, // OCW1.
        }
    }

    fn read_cmd(&mut self) -> u8 {
        if self.poll {
            self.poll_read()
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    fn read_data(&mut self) -> u8 {
        if self.poll {
            self.poll_read()
        } else {
            self.imr
        }
    }
}

/// The master/slave 8259A pair of a PC.
#[derive(Clone, Debug)]
pub struct DualPic {
    master: Chip,
    slave: Chip,
}

impl Default for DualPic {
    fn default() -> Self {
        Self::new()
    }
}

impl DualPic {
    /// A pair in its power-on state (not initialised: vector base 0, nothing masked).
    pub fn new() -> Self {
        // PIIX4 ELCR: IRQ0, 1, 2, 8 and 13 are always edge (their ELCR bits are reserved).
        DualPic { master: Chip::new(0xf8), slave: Chip::new(0xde) }
    }

    /// Drives ISA IRQ `irq` (0..16) to `level`. IRQ2 on the master is the cascade input and is
    /// driven from the slave, not from outside.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != 2 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => return,
        }
        self.update_cascade();
    }

    /// The slave's INT output drives master IR2. It is a level, not an edge: the master's
    /// request must disappear when the slave's does (a level-triggered slave input withdrawn
    /// before INTA), or the CPU would get a spurious IRQ15.
    fn update_cascade(&mut self) {
        let slave_int = self.slave.pending_irq().is_some();
        if slave_int {
            self.master.irr |= 1 << 2;
            self.master.lines |= 1 << 2;
        } else {
            self.master.irr &= !(1 << 2);
            self.master.lines &= !(1 << 2);
        }
    }

    /// The INTR output of the master: whether the pair asks the CPU for an interrupt.
    pub fn intr(&self) -> bool {
        self.master.pending_irq().is_some()
    }

    /// The INTA cycle. Returns the vector of the highest-priority pending request and moves it
    /// from IRR to ISR (unless auto-EOI). If INTR is not asserted any more, the 8259A answers
    /// with IR7 of the master (a spurious interrupt: vector base + 7, ISR untouched); a slave
    /// whose request went away answers with its own IR7 (base + 7) while the master marks IR2
    /// in service, as the hardware does.
    pub fn acknowledge(&mut self) -> u8 {
        match self.master.pending_irq() {
            None => self.master.vector_base | 7,
            Some(2) => {
                self.master.ack(2);
                let v = match self.slave.pending_irq() {
                    Some(sirq) => {
                        self.slave.ack(sirq);
                        self.slave.vector_base | sirq
                    }
                    None => self.slave.vector_base | 7,
                };
                self.update_cascade();
                v
            }
            Some(irq) => {
                self.master.ack(irq);
                self.master.vector_base | irq
            }
        }
    }

    /// Port read in 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1.
    pub fn read(&mut self, port: u16) -> u8 {
        let v = match port {
            MASTER_CMD => self.master.read_cmd(),
            MASTER_DATA => self.master.read_data(),
            SLAVE_CMD => self.slave.read_cmd(),
            SLAVE_DATA => self.slave.read_data(),
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            _ => 0xff,
        };
        self.update_cascade();
        v
    }

    /// Port write in 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1.
    pub fn write(&mut self, port: u16, val: u8) {
        match port {
            MASTER_CMD => self.master.write_cmd(val),
            MASTER_DATA => self.master.write_data(val),
            SLAVE_CMD => self.slave.write_cmd(val),
            SLAVE_DATA => self.slave.write_data(val),
            ELCR_MASTER => self.master.elcr = val & self.master.elcr_writable,
            ELCR_SLAVE => self.slave.elcr = val & self.slave.elcr_writable,
            _ => {}
        }
        self.update_cascade();
    }

    /// Whether ISA IRQ `irq` is level-sensitive (ELCR or ICW1.LTIM).
    pub fn is_level(&self, irq: u8) -> bool {
        match irq {
            0..=7 => self.master.level_mask() & (1 << irq) != 0,
            8..=15 => self.slave.level_mask() & (1 << (irq - 8)) != 0,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Linux's `init_8259A` writes (K: arch/x86/kernel/i8259.c).
    fn linux_init(pic: &mut DualPic, auto_eoi: bool) {
        pic.write(MASTER_DATA, 0xff);
        pic.write(SLAVE_DATA, 0xff);
        pic.write(MASTER_CMD, 0x11);
        pic.write(MASTER_DATA, 0x30);
        pic.write(MASTER_DATA, 0x04);
        pic.write(MASTER_DATA, if auto_eoi { 0x03 } else { 0x01 });
        pic.write(SLAVE_CMD, 0x11);
        pic.write(SLAVE_DATA, 0x38);
        pic.write(SLAVE_DATA, 0x02);
        pic.write(SLAVE_DATA, 0x01);
        pic.write(MASTER_DATA, 0xfb); // all masked but the cascade
        pic.write(SLAVE_DATA, 0xff);
    }

    fn unmask(pic: &mut DualPic, irq: u8) {
        if irq < 8 {
            let m = pic.read(MASTER_DATA) & !(1 << irq);
            pic.write(MASTER_DATA, m);
        } else {
            let m = pic.read(SLAVE_DATA) & !(1 << (irq - 8));
            pic.write(SLAVE_DATA, m);
        }
    }

    #[test]
    fn edge_irq_is_delivered_once_and_needs_eoi() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.read(MASTER_DATA), 0xfb);
        pic.set_irq(0, true);
        assert!(!pic.intr(), "masked");
        unmask(&mut pic, 0);
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), 0x30);
        assert!(!pic.intr());
        // ISR readable via OCW3.
        pic.write(MASTER_CMD, 0x0b);
        assert_eq!(pic.read(MASTER_CMD), 0x01);
        // Line still high: no new edge, no new request even after EOI.
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.read(MASTER_CMD), 0x00);
        assert!(!pic.intr());
        pic.set_irq(0, false);
        pic.set_irq(0, true);
        assert!(pic.intr());
        // IRR readable.
        pic.write(MASTER_CMD, 0x0a);
        assert_eq!(pic.read(MASTER_CMD), 0x01);
    }

    #[test]
    fn in_service_blocks_lower_and_equal_priority_only() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 1);
        unmask(&mut pic, 4);
        unmask(&mut pic, 0);
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), 0x34);
        pic.set_irq(1, true);
        assert!(pic.intr(), "IRQ1 beats IRQ4 in service");
        assert_eq!(pic.acknowledge(), 0x31);
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert!(!pic.intr(), "IRQ4 blocked while IRQ1 and IRQ4 are in service");
        // Non-specific EOI clears the highest in service (IRQ1), IRQ4 still in service.
        pic.write(MASTER_CMD, 0x20);
        assert!(!pic.intr());
        // Specific EOI for 4.
        pic.write(MASTER_CMD, 0x64);
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), 0x34);
    }

    #[test]
    fn slave_irq_cascades_through_irq2() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        unmask(&mut pic, 8);
        pic.set_irq(8, true);
        assert!(pic.intr());
        assert_eq!(pic.acknowledge(), 0x38);
        assert!(!pic.intr());
        pic.write(SLAVE_CMD, 0x0b);
        assert_eq!(pic.read(SLAVE_CMD), 0x01);
        pic.write(MASTER_CMD, 0x0b);
        assert_eq!(pic.read(MASTER_CMD), 0x04, "master has IR2 in service");
        pic.write(SLAVE_CMD, 0x20);
        pic.write(MASTER_CMD, 0x20);
        assert_eq!(pic.read(MASTER_CMD), 0x00);
    }

    #[test]
    fn spurious_vectors_when_request_vanished() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        assert_eq!(pic.acknowledge(), 0x37, "master spurious IRQ7");
        pic.write(MASTER_CMD, 0x0b);
        assert_eq!(pic.read(MASTER_CMD), 0, "spurious IRQ7 not put in service");
    }

    #[test]
    fn level_triggered_via_elcr_follows_the_line() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pic.write(ELCR_SLAVE, 0xff);
        assert_eq!(pic.read(ELCR_SLAVE), 0xde, "IRQ8 and IRQ13 can't be level");
        pic.write(ELCR_MASTER, 0x07);
        assert_eq!(pic.read(ELCR_MASTER), 0x00);
        assert!(pic.is_level(9) && !pic.is_level(8));
        unmask(&mut pic, 9);
        pic.set_irq(9, true);
        assert_eq!(pic.acknowledge(), 0x39);
        pic.write(SLAVE_CMD, 0x20);
        pic.write(MASTER_CMD, 0x20);
        assert!(pic.intr(), "still high: requested again without a new edge");
        pic.set_irq(9, false);
        assert!(!pic.intr(), "level request withdrawn");
    }

    #[test]
    fn auto_eoi_and_rotation() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, true);
        pic.write(MASTER_DATA, 0x00);
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x33);
        pic.write(MASTER_CMD, 0x0b);
        assert_eq!(pic.read(MASTER_CMD), 0, "AEOI leaves ISR clear");
        // Set priority: IRQ5 lowest, so IRQ6 highest: IRQ6 beats IRQ1.
        pic.write(MASTER_CMD, 0xc5);
        pic.set_irq(1, true);
        pic.set_irq(6, true);
        assert_eq!(pic.acknowledge(), 0x36);
        assert_eq!(pic.acknowledge(), 0x31);
    }

    #[test]
    fn poll_mode_and_special_mask() {
        let mut pic = DualPic::new();
        linux_init(&mut pic, false);
        pic.write(MASTER_DATA, 0x00);
        pic.set_irq(5, true);
        pic.write(MASTER_CMD, 0x0c); // OCW3 poll
        assert_eq!(pic.read(MASTER_CMD), 0x85);
        pic.write(MASTER_CMD, 0x0c);
        assert_eq!(pic.read(MASTER_CMD), 0x00, "acknowledged by the poll");
        // IRQ5 in service blocks IRQ6 ...
        pic.set_irq(6, true);
        assert!(!pic.intr());
        // ... unless special mask mode and IRQ5 masked.
        pic.write(MASTER_DATA, 0x20);
        pic.write(MASTER_CMD, 0x68);
        assert!(pic.intr());
        pic.write(MASTER_CMD, 0x48);
        assert!(!pic.intr());
    }
}
