//! QEMU's `isa-debug-exit`: a write of `v` ends the VM with exit status `(v << 1) | 1` (QEMU
//! hw/misc/debugexit.c), so a test guest can report a result that can never look like a clean 0.

use std::sync::mpsc::Sender;

use super::bus::BusDevice;
use crate::runloop::VmEvent;

pub struct DebugExit {
    events: Sender<VmEvent>,
}

impl DebugExit {
    pub fn new(events: Sender<VmEvent>) -> DebugExit {
        DebugExit { events }
    }
}

/// The exit status QEMU uses for a value written to isa-debug-exit.
pub fn exit_code(value: u64) -> i32 {
    ((value << 1) | 1) as i32
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // QEMU's debug_exit_read returns 0.
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        // The run loop may already be gone when the VM is ending; nothing to do then.
        let _ = self.events.send(VmEvent::DebugExit(u64::from_le_bytes(v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_reports_the_value_at_its_access_size() {
        let (tx, rx) = std::sync::mpsc::channel();
        let d = DebugExit::new(tx);
        d.write(0, &[0x31]);
        d.write(0, &[0x34, 0x12]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::DebugExit(0x31));
        assert_eq!(rx.try_recv().unwrap(), VmEvent::DebugExit(0x1234));
        assert_eq!(exit_code(0x31), 0x63);
        assert_eq!(exit_code(0), 1);
    }
}
