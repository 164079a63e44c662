//! 16550A UARTs. The register model is vm-superio's `Serial`; this file wires it to Tessera: transmitted bytes go
//! to the chardev process over the serial channel ([`CoreToChardev::Output`]), received bytes come back as
//! [`ChardevToCore::Input`] and enter the RX FIFO as the guest drains it, a [`ChardevToCore::Break`] shows as
//! LSR.BI, and the interrupt goes to an [`IrqLine`] (the ISA IRQ of the port).
//!
//! The chardev process may go away and come back (issue #8: a crash restarted by the launcher). Meanwhile the
//! guest keeps running and what it prints is kept, up to [`AWAY_BUFFER`] bytes (the oldest dropped and counted
//! beyond that); [`SerialPort::reconnect`] takes the new channel and sends that first.

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
/// Guest output kept while the chardev process is away. A guest printing at the software CPU's speed fills this
/// in well over a minute, far longer than a restart takes.
pub const AWAY_BUFFER: usize = 1 << 20;

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
    /// Set when the channel failed (the chardev process is away): output is kept in `buf`, up to
    /// [`AWAY_BUFFER`], until [`SerialPort::reconnect`].
    broken: bool,
    /// Bytes dropped (the oldest first) because `buf` was full while the channel was broken.
    dropped: u64,
    /// Why the channel broke; logged once the guest's output is actually being kept (a chardev that closes as
    /// the VM ends is not worth a line).
    away_reason: Option<String>,
    stop: bool,
    /// The channel to the chardev process; replaced by a reconnect.
    channel: Arc<Channel>,
    /// Counts the channels: an input thread of a replaced channel must not mark its successor broken.
    generation: u64,
}

struct Output {
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

    /// Take what is buffered and send it. Returns false while the channel is broken (the bytes stay buffered).
    fn send_pending(&self) -> bool {
        let _order = self.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (batch, channel, generation) = {
            let mut st = self.lock();
            if st.broken {
                return false;
            }
            (std::mem::take(&mut st.buf), st.channel.clone(), st.generation)
        };
        self.cond.notify_all();
        // A message body is at most 1 MiB (tessera-ipc's frame limit); what was kept while the chardev was away
        // can be that much.
        let mut sent = 0;
        while sent < batch.len() {
            let end = batch.len().min(sent + OUTPUT_LIMIT);
            if let Err(e) = channel.send(&CoreToChardev::Output(batch[sent..end].to_vec()), &[]) {
                // Kept for the next chardev process: the bytes of this batch go first, before what the guest
                // wrote since.
                let mut st = self.lock();
                let mut rest = batch[sent..].to_vec();
                rest.extend_from_slice(&st.buf);
                st.buf = rest;
                if st.generation == generation {
                    self.mark_broken(&mut st, &e.to_string());
                }
                return false;
            }
            sent = end;
        }
        true
    }

    /// The chardev process is away: keep the guest's output from now on.
    fn mark_broken(&self, st: &mut OutputState, why: &str) {
        if !st.broken {
            st.broken = true;
            st.away_reason = Some(why.to_string());
            self.cond.notify_all();
        }
    }

    /// The flusher thread: sends what the guest transmits, at most [`OUTPUT_LATENCY`] after it was written.
    fn flusher(&self) {
        loop {
            {
                let mut st = self.lock();
                // While the chardev process is away the bytes stay buffered: wait for a reconnect.
                while (st.buf.is_empty() || st.broken) && !st.stop {
                    st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.stop {
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
            self.send_pending();
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
            // The chardev side is away: keep the bytes for its successor, the newest AWAY_BUFFER of them. Trimmed
            // in steps of a quarter so a guest printing into a full buffer does not move a MiB per byte.
            if let Some(why) = st.away_reason.take() {
                out.log.error(&format!(
                    "{}: the chardev process is away ({why}); keeping up to {AWAY_BUFFER} bytes of guest output",
                    out.name
                ));
            }
            st.buf.extend_from_slice(data);
            if st.buf.len() > AWAY_BUFFER + AWAY_BUFFER / 4 {
                let excess = st.buf.len() - AWAY_BUFFER;
                st.buf.drain(..excess);
                st.dropped += excess as u64;
            }
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
            state: Mutex::new(OutputState {
                buf: Vec::new(),
                broken: false,
                dropped: 0,
                away_reason: None,
                stop: false,
                channel,
                generation: 0,
            }),
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
        self.start_input()
    }

    fn start_input(self: &Arc<Self>) -> io::Result<()> {
        let (channel, generation) = {
            let st = self.output.lock();
            (st.channel.clone(), st.generation)
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-rx", self.name))
            .spawn(move || me.input_loop(&channel, generation))?;
        Ok(())
    }

    /// The chardev process was restarted: `channel` replaces the old channel. What the guest printed meanwhile
    /// is sent first (by the output thread, in order), then output and input go on as before.
    pub fn reconnect(self: &Arc<Self>, channel: Arc<Channel>) -> io::Result<()> {
        let dropped = {
            let mut st = self.output.lock();
            st.channel = channel;
            st.generation += 1;
            st.broken = false;
            st.away_reason = None;
            std::mem::take(&mut st.dropped)
        };
        self.output.cond.notify_all();
        if dropped > 0 {
            self.log.error(&format!(
                "{}: {dropped} bytes of guest output were dropped while the chardev process was away",
                self.name
            ));
        }
        self.start_input()
    }

    /// Bytes kept for the chardev process while it is away (`None` while it is connected).
    pub fn away_buffered(&self) -> Option<(usize, u64)> {
        let st = self.output.lock();
        st.broken.then_some((st.buf.len(), st.dropped))
    }

    fn input_loop(&self, channel: &Channel, generation: u64) {
        let gone = |why: &str| {
            let mut st = self.output.lock();
            if st.generation == generation && !st.stop {
                self.output.mark_broken(&mut st, why);
            }
        };
        loop {
            match channel.recv::<ChardevToCore>() {
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
                // The chardev process went away (or the VM is ending): output is kept until a reconnect.
                Err(IpcError::Closed) => return gone("it closed the serial channel"),
                Err(e) => {
                    self.log.error(&format!("{}: input from the chardev process stopped: {e}", self.name));
                    return gone(&e.to_string());
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

    /// Read Output messages until `want` bytes arrived (or a few seconds passed).
    fn receive(chardev: &Channel, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        chardev.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.len() < want && std::time::Instant::now() < deadline {
            match chardev.try_recv::<CoreToChardev>() {
                Ok((CoreToChardev::Output(b), _)) => got.extend(b),
                Err(IpcError::WouldBlock) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("receive: {e}"),
            }
        }
        got
    }

    #[test]
    fn output_while_the_chardev_is_away_is_kept_and_sent_first_on_reconnect() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        for b in b"before " {
            p.write(0, &[*b]);
        }
        assert_eq!(receive(&chardev, 7), b"before ");
        drop(chardev);
        // The input thread sees the hang-up; whatever the guest prints from then on is kept.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.away_buffered().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(p.away_buffered().is_some(), "the closed channel was noticed");
        let text: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for b in &text {
            p.write(0, &[*b]);
        }
        assert_eq!(p.away_buffered(), Some((text.len(), 0)));
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        for b in b"after" {
            p.write(0, &[*b]);
        }
        let got = receive(&chardev, text.len() + 5);
        let mut want = text.clone();
        want.extend_from_slice(b"after");
        assert_eq!(got, want, "everything, in order, nothing twice");
        // Input flows again on the new channel.
        p.write(1, &[1]);
        chardev.set_nonblocking(false).unwrap();
        chardev.send(&ChardevToCore::Input(b"k".to_vec()), &[]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while inb(&p, 5) & 1 == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(inb(&p, 0), b'k');
        p.stop();
    }

    #[test]
    fn the_away_buffer_keeps_the_newest_bytes_and_counts_the_dropped_ones() {
        let (p, chardev, _) = port();
        drop(chardev);
        // No threads: the failed flush marks the channel broken.
        p.write(0, b"x");
        p.flush();
        let total = AWAY_BUFFER * 2;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        for c in data.chunks(4096) {
            OutputWriter(p.output.clone()).write_all(c).unwrap();
        }
        let (kept, dropped) = p.away_buffered().unwrap();
        assert!((AWAY_BUFFER..=AWAY_BUFFER + AWAY_BUFFER / 4).contains(&kept), "kept {kept}");
        assert_eq!(kept as u64 + dropped, total as u64 + 1);
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        // More than a socket buffer: sent while this thread reads.
        let sender = {
            let p = p.clone();
            std::thread::spawn(move || p.flush())
        };
        let got = receive(&chardev, kept);
        sender.join().unwrap();
        assert_eq!(got.len(), kept);
        assert_eq!(&got[..], &data[total - kept..], "the newest bytes, in order");
        p.stop();
    }

    #[test]
    fn identifies_as_16550a_with_fifo() {
        let (p, _chardev, _) = port();
        assert_eq!(inb(&p, 2) & 0xc0, 0xc0);
        assert_ne!(inb(&p, 5), 0xff);
    }
}
