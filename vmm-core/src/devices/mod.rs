//! Device front halves and the buses they sit on. Devices are reached through [`Devices`], the
//! [`tessera_vcpu::IoHandler`] every vCPU engine calls during `run`.

pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod serial;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tessera_vcpu::IoHandler;

use crate::guestlog::GuestLog;
use crate::runloop::ResettableIo;
use bus::Bus;

pub struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub serials: Vec<Arc<serial::SerialPort>>,
    pub i8042: Option<Arc<i8042::I8042>>,
    /// PCI bus 0: its BARs are looked up on MMIO accesses no fixed device claims.
    pub pci: Option<Arc<crate::pci::PciRoot>>,
    log: Arc<GuestLog>,
    /// (is MMIO, address) of unhandled accesses already logged: `-d unimp` logs each once.
    unimp_seen: Mutex<HashSet<(bool, u64)>>,
}

impl Devices {
    pub fn new(log: Arc<GuestLog>) -> Devices {
        Devices {
            pio: Bus::new("port I/O"),
            mmio: Bus::new("MMIO"),
            serials: Vec::new(),
            i8042: None,
            pci: None,
            log,
            unimp_seen: Mutex::new(HashSet::new()),
        }
    }

    /// Send what the UARTs still buffer, and stop their output threads.
    pub fn stop(&self) {
        for s in &self.serials {
            s.stop();
        }
    }

    fn unhandled(&self, mmio: bool, write: bool, addr: u64, size: usize) {
        if !self.log.enabled("unimp") {
            return;
        }
        let first = self.unimp_seen.lock().unwrap_or_else(|p| p.into_inner()).insert((mmio, addr));
        if first {
            let (space, fmt_addr) =
                if mmio { ("MMIO", format!("{addr:#x}")) } else { ("port I/O", format!("port {addr:#x}")) };
            let dir = if write { "write to" } else { "read from" };
            self.log.line_for(
                "unimp",
                &format!("unassigned {space} {dir} {fmt_addr} (size {size}); further accesses not logged"),
            );
        }
    }
}

impl IoHandler for Devices {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            // Nothing answers: the ISA bus floats high.
            data.fill(0xff);
            self.unhandled(false, false, u64::from(port), data.len());
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if !self.pio.write(u64::from(port), data) {
            self.unhandled(false, true, u64::from(port), data.len());
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) && !self.pci.as_ref().is_some_and(|p| p.mmio_read(addr, data)) {
            data.fill(0xff);
            self.unhandled(true, false, addr, data.len());
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) && !self.pci.as_ref().is_some_and(|p| p.mmio_write(addr, data)) {
            self.unhandled(true, true, addr, data.len());
        }
    }
}

impl ResettableIo for Devices {
    fn reset(&self) {
        for s in &self.serials {
            s.reset();
        }
        if let Some(k) = &self.i8042 {
            k.reset();
        }
        if let Some(p) = &self.pci {
            p.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unassigned_ports_read_all_ones_and_are_logged_once_with_unimp() {
        let path = std::env::temp_dir().join(format!("tessera-unimp-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let d = Devices::new(GuestLog::new(vec!["unimp".into()], Box::new(file)));
        let mut b = [0u8; 2];
        d.pio_read(0x80, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.pio_read(0x80, &mut b);
        d.pio_write(0x81, &[1]);
        let mut m = [0u8; 4];
        d.mmio_read(0xfee0_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).ok();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("read from port 0x80"), "{text}");
        assert!(lines[1].contains("write to port 0x81"), "{text}");
        assert!(lines[2].contains("MMIO read from 0xfee00000"), "{text}");
    }

    #[test]
    fn without_unimp_nothing_is_logged() {
        let path = std::env::temp_dir().join(format!("tessera-nounimp-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let d = Devices::new(GuestLog::new(vec![], Box::new(file)));
        let mut b = [0u8; 1];
        d.pio_read(0x80, &mut b);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_file(&path).ok();
    }
}
