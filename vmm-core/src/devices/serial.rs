//! 16550A UARTs. The register model is vm-superio's `Serial`; this file wires it to Tessera: transmitted bytes go
//! to the chardev process over the serial channel ([`CoreToChardev::Output`]), received bytes come back as
//! [`ChardevToCore::Input`] and enter the RX FIFO as the guest drains it, a [`ChardevToCore::Break`] shows as
//! LSR.BI, and the interrupt goes to an [`IrqLine`] (the ISA IRQ of the port).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tessera_ipc::messages::{ChardevToCore, CoreToChardev};
use tessera_ipc::{Channel, IpcError};
use vm_superio::{Serial, Trigger};

use super::bus::BusDevice;
use crate::guestlog::GuestLog;

/// The legacy PC serial ports in ISA order (Linux asm/serial.h, QEMU's `isa-serial` defaults).
pub const ISA_SERIAL_PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

/// Registers of a 16550 occupy eight consecutive ports.
pub const SERIAL_PORT_LEN: u64 = 8;

const LSR_OFFSET: u8 = 5;
const LCR_OFFSET: u8 = 3;
const LCR_DLAB: u8 = 0x80;
/// LSR bit 4, Break Interrupt: set when a break was received, cleared by reading LSR (16550A data sheet, LSR).
const LSR_BREAK: u8 = 0x10;

/// How long transmitted bytes may wait to be batched into one message.
const OUTPUT_LATENCY: Duration = Duration::from_millis(2);
/// Send at once when this much is buffered.
const OUTPUT_BATCH: usize = 4096;
/// Beyond this, a transmitting vCPU waits for the chardev process to catch up (as a real UART would hold THR).
const OUTPUT_LIMIT: usize = 256 * 1024;
/// The input thread stops reading the channel while this much input waits for the guest, so a flood from the
/// host side is held back by the socket instead of growing the core's memory.
const INPUT_LIMIT: usize = 64 * 1024;

/// An interrupt line a device can raise. The ISA serial interrupt is edge-triggered here: each call is one pulse.
pub trait IrqLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

#[derive(Clone)]
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Transmitted bytes on their way to the chardev process.
struct OutputState {
    buf: Vec<u8>,
    /// Set when the channel failed: output is dropped from then on (logged once).
    broken: bool,
    stop: bool,
}

struct Output {
    channel: Arc<Channel>,
    state: Mutex<OutputState>,
    /// Signalled when bytes arrive (for the flusher) and when the buffer drains (for a waiting vCPU).
    cond: Condvar,
    /// Held while a batch is taken and sent, so batches leave in order whichever thread sends them.
    send_lock: Mutex<()>,
    name: String,
    log: Arc<GuestLog>,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take what is buffered and send it. Returns false once the channel is broken.
    fn send_pending(&self) -> bool {
        let _order = self.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        let batch = {
            let mut st = self.lock();
            if st.broken {
                st.buf.clear();
                return false;
            }
            std::mem::take(&mut st.buf)
        };
        self.cond.notify_all();
        if batch.is_empty() {
            return true;
        }
        if let Err(e) = self.channel.send(&CoreToChardev::Output(batch), &[]) {
            let mut st = self.lock();
            st.broken = true;
            st.buf.clear();
            drop(st);
            self.cond.notify_all();
            self.log.error(&format!("{}: output to the chardev process is lost: {e}", self.name));
            return false;
        }
        true
    }

    /// The flusher thread: sends what the guest transmits, at most [`OUTPUT_LATENCY`] after it was written.
    fn flusher(&self) {
        loop {
            {
                let mut st = self.lock();
                while st.buf.is_empty() && !st.stop && !st.broken {
                    st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop || st.broken {
                    return;
                }
                if st.buf.len() < OUTPUT_BATCH {
                    // Let a burst of single-byte writes gather into one message.
                    st = self.cond.wait_timeout(st, OUTPUT_LATENCY).unwrap_or_else(|p| p.into_inner()).0;
                    if st.stop {
                        return;
                    }
                }
            }
            if !self.send_pending() {
                return;
            }
        }
    }
}

/// The `Write` end vm-superio's UART transmits into.
#[derive(Clone)]
struct OutputWriter(Arc<Output>);

impl Write for OutputWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let out = &self.0;
        let mut st = out.lock();
        while st.buf.len() >= OUTPUT_LIMIT && !st.broken && !st.stop {
            st = out.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.broken {
            // The chardev side is gone: the byte is lost, as on a UART with nothing attached. Not an error for
            // the guest.
            return Ok(data.len());
        }
        let was_empty = st.buf.is_empty();
        st.buf.extend_from_slice(data);
        let full = st.buf.len() >= OUTPUT_BATCH;
        drop(st);
        if was_empty || full {
            out.cond.notify_all();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // vm-superio flushes after every byte; batching is the flusher thread's job, so nothing to do here.
        Ok(())
    }
}

struct UartState {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, OutputWriter>,
    /// Input the FIFO had no room for yet, fed in as the guest reads.
    pending: VecDeque<u8>,
    /// A break was received and LSR has not been read since.
    break_seen: bool,
}

/// One 16550A on the port I/O bus.
pub struct SerialPort {
    state: Mutex<UartState>,
    /// Signalled when the guest drained input (the input thread may read more from the channel).
    drained: Condvar,
    output: Arc<Output>,
    irq: IrqTrigger,
    name: String,
    log: Arc<GuestLog>,
}

impl SerialPort {
    /// A UART named `name` (for messages) talking to the chardev process over `channel`, raising `irq`.
    pub fn new(name: String, channel: Arc<Channel>, irq: Arc<dyn IrqLine>, log: Arc<GuestLog>) -> Arc<SerialPort> {
        let output = Arc::new(Output {
            channel,
            state: Mutex::new(OutputState { buf: Vec::new(), broken: false, stop: false }),
            cond: Condvar::new(),
            send_lock: Mutex::new(()),
            name: name.clone(),
            log: log.clone(),
        });
        let irq = IrqTrigger(irq);
        let uart = Serial::new(irq.clone(), OutputWriter(output.clone()));
        Arc::new(SerialPort {
            state: Mutex::new(UartState { uart, pending: VecDeque::new(), break_seen: false }),
            drained: Condvar::new(),
            output,
            irq,
            name,
            log,
        })
    }

    fn lock(&self) -> MutexGuard<'_, UartState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the threads that move bytes between this UART and its channel. They end when the channel closes
    /// or [`SerialPort::stop`] is called (output) / the process exits (input).
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let out = self.output.clone();
        std::thread::Builder::new().name(format!("{}-tx", self.name)).spawn(move || out.flusher())?;
        let me = self.clone();
        std::thread::Builder::new().name(format!("{}-rx", self.name)).spawn(move || me.input_loop())?;
        Ok(())
    }

    fn input_loop(&self) {
        loop {
            match self.output.channel.recv::<ChardevToCore>() {
                Ok((msg, _fds)) => match msg {
                    ChardevToCore::Input(bytes) => {
                        self.push_input(&bytes);
                        let mut st = self.lock();
                        while st.pending.len() >= INPUT_LIMIT {
                            st = self.drained.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    ChardevToCore::Break => self.push_break(),
                },
                Err(IpcError::Closed) => return,
                Err(e) => {
                    self.log.error(&format!("{}: input from the chardev process stopped: {e}", self.name));
                    return;
                }
            }
        }
    }

    /// Queue bytes for the guest: as many as fit go into the RX FIFO now (raising the interrupt), the rest when
    /// the guest has read some.
    pub fn push_input(&self, bytes: &[u8]) {
        let mut st = self.lock();
        st.pending.extend(bytes);
        self.feed(&mut st);
    }

    /// A break condition: a 16550 loads a zero character into the FIFO and sets LSR.BI (16550A data sheet, LSR
    /// bit 4).
    pub fn push_break(&self) {
        let mut st = self.lock();
        st.break_seen = true;
        st.pending.push_back(0);
        self.feed(&mut st);
    }

    fn feed(&self, st: &mut UartState) {
        while !st.pending.is_empty() && st.uart.fifo_capacity() > 0 {
            let (a, _) = st.pending.as_slices();
            let n = a.len().min(st.uart.fifo_capacity());
            let chunk: Vec<u8> = a[..n].to_vec();
            match st.uart.enqueue_raw_bytes(&chunk) {
                Ok(0) => break,
                Ok(done) => {
                    st.pending.drain(..done);
                }
                Err(e) => {
                    // In loopback mode the UART takes nothing from outside; keep the input for later.
                    self.log.error(&format!("{}: raising the receive interrupt failed: {e}", self.name));
                    break;
                }
            }
        }
    }

    /// Send every byte the guest has transmitted so far (before the VM reports its end).
    pub fn flush(&self) {
        self.output.send_pending();
    }

    /// Stop the output thread after sending what is buffered.
    pub fn stop(&self) {
        self.flush();
        self.output.lock().stop = true;
        self.output.cond.notify_all();
    }

    /// Back to power-on register state (a guest reboot); queued input stays queued.
    pub fn reset(&self) {
        let mut st = self.lock();
        st.uart = Serial::new(self.irq.clone(), OutputWriter(self.output.clone()));
        st.break_seen = false;
        self.feed(&mut st);
    }

    fn read_reg(&self, offset: u8) -> u8 {
        let mut st = self.lock();
        let dlab = st.uart.read(LCR_OFFSET) & LCR_DLAB != 0;
        let mut v = st.uart.read(offset);
        if offset == LSR_OFFSET {
            if st.break_seen {
                v |= LSR_BREAK;
                st.break_seen = false;
            }
        } else if offset == 0 && !dlab {
            // The guest took a byte from the FIFO: there is room for queued input.
            self.feed(&mut st);
            if st.pending.len() < INPUT_LIMIT {
                self.drained.notify_all();
            }
        }
        v
    }

    fn write_reg(&self, offset: u8, value: u8) {
        let mut st = self.lock();
        if let Err(e) = st.uart.write(offset, value) {
            drop(st);
            self.log.error(&format!("{}: {e}", self.name));
        }
    }
}

impl BusDevice for SerialPort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = if off < SERIAL_PORT_LEN { self.read_reg(off as u8) } else { 0xff };
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            if off < SERIAL_PORT_LEN {
                self.write_reg(off as u8, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl IrqLine for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn port() -> (Arc<SerialPort>, Channel, Arc<CountingIrq>) {
        let (core, chardev) = Channel::pair().unwrap();
        let irq = Arc::new(CountingIrq::default());
        let p = SerialPort::new("serial0".into(), Arc::new(core), irq.clone(), GuestLog::stderr(vec![]));
        (p, chardev, irq)
    }

    fn inb(p: &SerialPort, off: u64) -> u8 {
        let mut d = [0];
        p.read(off, &mut d);
        d[0]
    }

    #[test]
    fn transmitted_bytes_reach_the_chardev_in_one_batch_and_flush_sends_them_at_once() {
        let (p, chardev, _) = port();
        for b in b"hello\n" {
            p.write(0, &[*b]);
        }
        // No flusher thread is running here: only the explicit flush sends.
        p.flush();
        let (msg, _): (CoreToChardev, _) = chardev.recv().unwrap();
        assert_eq!(msg, CoreToChardev::Output(b"hello\n".to_vec()));
    }

    #[test]
    fn the_flusher_sends_without_being_asked() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        p.write(0, b"x");
        let (msg, _): (CoreToChardev, _) = chardev.recv().unwrap();
        assert_eq!(msg, CoreToChardev::Output(b"x".to_vec()));
        p.stop();
    }

    #[test]
    fn input_beyond_the_fifo_waits_until_the_guest_reads() {
        let (p, _chardev, irq) = port();
        p.write(1, &[1]); // IER: received-data interrupt on
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        p.push_input(&input);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut got = Vec::new();
        while inb(&p, 5) & 1 != 0 {
            got.push(inb(&p, 0));
        }
        assert_eq!(got, input, "every byte arrives, in order, nothing dropped at the 64-byte FIFO");
        assert!(irq.0.load(Ordering::SeqCst) > 1, "refills raise the interrupt again");
    }

    #[test]
    fn break_sets_lsr_bi_until_lsr_is_read() {
        let (p, _chardev, _) = port();
        p.push_break();
        let lsr = inb(&p, 5);
        assert_eq!(lsr & (LSR_BREAK | 1), LSR_BREAK | 1);
        assert_eq!(inb(&p, 5) & LSR_BREAK, 0);
        assert_eq!(inb(&p, 0), 0, "the break character is a zero byte");
    }

    #[test]
    fn identifies_as_16550a_with_fifo() {
        let (p, _chardev, _) = port();
        assert_eq!(inb(&p, 2) & 0xc0, 0xc0);
        assert_ne!(inb(&p, 5), 0xff);
    }
}
