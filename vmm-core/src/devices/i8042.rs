//! The part of the i8042 keyboard controller that a PC guest needs without a keyboard: the status port reads
//! sanely for Linux's probe and its reset path (`kb_wait` polls status bit 1), the controller commands answer,
//! and the reset commands (0xFE on port 0x64, or output port bit 0 cleared through 0xD1) reset the machine.
//!
//! Written here rather than taken from vm-superio: its `I8042Device` only knows the 0xFE command and reads every
//! register as 0, so the controller commands Linux's i8042 driver issues (read/write the command byte,
//! self-tests) would time out.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use super::bus::BusDevice;
use crate::runloop::VmEvent;

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

// Status register bits (IBM PC/AT technical reference, 8042 status).
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

// Command byte bits.
const CTR_KBD_DISABLED: u8 = 0x10;
const CTR_AUX_DISABLED: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

#[derive(Default)]
struct State {
    ctr: u8,
    output: VecDeque<u8>,
    /// The command waiting for its data byte on port 0x60.
    pending: Option<u8>,
    last_was_command: bool,
}

pub struct I8042 {
    state: Mutex<State>,
    events: Sender<VmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Arc<I8042> {
        Arc::new(I8042 { state: Mutex::new(State::power_on()), events })
    }

    pub fn reset(&self) {
        *self.lock() = State::power_on();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reset_machine(&self) {
        let _ = self.events.send(VmEvent::Reset("the i8042 keyboard controller pulsed the reset line".into()));
    }

    fn status(&self) -> u8 {
        let st = self.lock();
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if !st.output.is_empty() {
            s |= STATUS_OBF;
        }
        if st.last_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn read_data(&self) -> u8 {
        let mut st = self.lock();
        st.output.pop_front().unwrap_or(0)
    }

    fn command(&self, cmd: u8) {
        let mut st = self.lock();
        st.last_was_command = true;
        match cmd {
            0x20 => {
                let ctr = st.ctr;
                st.output.push_back(ctr);
            }
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => st.pending = Some(cmd),
            0xa7 => st.ctr |= CTR_AUX_DISABLED,
            0xa8 => st.ctr &= !CTR_AUX_DISABLED,
            // AUX interface test: 0x01 ("clock line stuck low") tells Linux there is no mouse port.
            0xa9 => st.output.push_back(0x01),
            // Controller self-test passed.
            0xaa => st.output.push_back(0x55),
            // Keyboard interface test passed.
            0xab => st.output.push_back(0x00),
            0xad => st.ctr |= CTR_KBD_DISABLED,
            0xae => st.ctr &= !CTR_KBD_DISABLED,
            // Output port: reset line inactive (bit 0), A20 enabled (bit 1).
            0xd0 => st.output.push_back(0x03),
            // Pulse output lines: a pulse on bit 0 (low bit clear in the command) is the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => {
                drop(st);
                self.reset_machine();
            }
            _ => {}
        }
    }

    fn write_data(&self, v: u8) {
        let mut st = self.lock();
        st.last_was_command = false;
        match st.pending.take() {
            Some(0x60) => st.ctr = v,
            Some(0xd1) => {
                if v & 1 == 0 {
                    drop(st);
                    self.reset_machine();
                }
            }
            // Write to the keyboard output buffer: it reads back as if the keyboard sent it.
            Some(0xd2) => st.output.push_back(v),
            // No mouse: bytes for it are dropped.
            Some(_) => {}
            // A byte for the keyboard. There is no keyboard behind this controller: answer like QEMU's ps2
            // keyboard does to the probe commands so a driver sees a consistent device.
            None => match v {
                0xff => st.output.extend([0xfa, 0xaa]),
                0xf2 => st.output.extend([0xfa, 0xab, 0x83]),
                0xee => st.output.push_back(0xee),
                _ => st.output.push_back(0xfa),
            },
        }
    }
}

impl State {
    fn power_on() -> State {
        State { ctr: CTR_XLATE | 0x01, ..State::default() }
    }
}

/// One of the two ports of the controller on the port I/O bus.
pub struct I8042Port {
    pub dev: Arc<I8042>,
    pub port: u16,
}

impl BusDevice for I8042Port {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let v = if self.port == COMMAND_PORT { self.dev.status() } else { self.dev.read_data() };
        data.fill(0xff);
        data[0] = v;
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if self.port == COMMAND_PORT {
            self.dev.command(v)
        } else {
            self.dev.write_data(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> (I8042Port, I8042Port, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let dev = I8042::new(tx);
        (I8042Port { dev: dev.clone(), port: DATA_PORT }, I8042Port { dev, port: COMMAND_PORT }, rx)
    }

    fn inb(p: &I8042Port) -> u8 {
        let mut d = [0];
        p.read(0, &mut d);
        d[0]
    }

    #[test]
    fn fe_on_the_command_port_resets() {
        let (_, cmd, rx) = ports();
        assert_eq!(inb(&cmd) & 0x02, 0, "input buffer empty: Linux's kb_wait goes on");
        cmd.write(0, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset(_))));
    }

    #[test]
    fn output_port_bit_0_resets() {
        let (data, cmd, rx) = ports();
        cmd.write(0, &[0xd1]);
        data.write(0, &[0x03]);
        assert!(rx.try_recv().is_err());
        cmd.write(0, &[0xd1]);
        data.write(0, &[0x02]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset(_))));
    }

    #[test]
    fn command_byte_round_trips_and_self_test_answers() {
        let (data, cmd, rx) = ports();
        assert_eq!(inb(&cmd) & STATUS_OBF, 0);
        cmd.write(0, &[0x60]);
        data.write(0, &[0x47]);
        cmd.write(0, &[0x20]);
        assert_eq!(inb(&cmd) & STATUS_OBF, STATUS_OBF);
        assert_eq!(inb(&data), 0x47);
        assert_eq!(inb(&cmd) & STATUS_OBF, 0);
        cmd.write(0, &[0xaa]);
        assert_eq!(inb(&data), 0x55);
        assert!(rx.try_recv().is_err());
    }
}
