//! 16550A UARTs. The register model is vm-superio's `Serial`; this file wires it to Tessera: transmitted bytes go
//! to the chardev process over the serial channel ([`CoreToChardev::Output`]), received bytes come back as
//! [`ChardevToCore::Input`] and enter the RX FIFO as the guest drains it, a [`ChardevToCore::Break`] shows as
//! LSR.BI, and the interrupt goes to an [`IrqLine`] (the ISA IRQ of the port).
//!
//! The chardev process may go away and come back (issue #8: a crash restarted by the launcher). Meanwhile the
//! guest keeps running and what it prints is kept, up to [`AWAY_BUFFER`] bytes (the oldest dropped and counted
//! beyond that); [`SerialPort::reconnect`] takes the new channel and sends that first.
//!
//! A chardev killed with SIGKILL also takes with it what it had received but not yet written (in its socket
//! buffer, its queue, its writer thread). So output is acknowledged: the core asks for it with an empty
//! `Output` as the first message on each channel, the chardev answers [`ChardevToCore::Written`] with a
//! running count of bytes it is done with, and the core keeps what it sent but has not seen acknowledged in a
//! replay buffer of [`REPLAY_BUFFER`] bytes. On reconnect the replay buffer goes out first, then the away
//! buffer. Nothing on the UART path waits for acknowledgements: they only trim the replay buffer. Delivery is
//! at least once: bytes the dead chardev wrote but had not yet acknowledged are written again.

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

/// How long a reconnect waits for the old channel's input thread to read the acknowledgements still in it.
const OLD_CHANNEL_DRAIN: Duration = Duration::from_millis(200);
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
/// Output sent to the chardev process but not yet acknowledged as written, kept to be sent again if it dies.
/// The chardev acknowledges within a host write's time, so this only fills when its host side is slow or
/// stuck (it queues up to 4 MiB); beyond it the oldest bytes are no longer kept, and are counted as lost if
/// the chardev then dies without acknowledging them.
pub const REPLAY_BUFFER: usize = 1 << 20;

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
    /// Bytes taken for sending on the current channel and not yet acknowledged (the oldest may have been let go,
    /// see [`REPLAY_BUFFER`]). Bytes enter before they are sent, so an acknowledgement can never outrun them.
    replay: VecDeque<u8>,
    /// Position of `replay[0]` in the current channel's output stream (bytes since the channel opened).
    replay_start: u64,
    /// The highest [`ChardevToCore::Written`] count received on the current channel.
    acked: u64,
    /// The empty `Output` asking for acknowledgements went out on the current channel.
    ack_requested: bool,
    /// The generation whose input thread ended last (it read the old channel to its end, acknowledgements
    /// included).
    input_ended: Option<u64>,
}

impl OutputState {
    /// `batch` is about to be sent on the current channel.
    fn keep_for_replay(&mut self, batch: &[u8]) {
        self.replay.extend(batch);
        // Trimmed in steps of a quarter, as the away buffer is, so a full buffer does not move a MiB per batch.
        if self.replay.len() > REPLAY_BUFFER + REPLAY_BUFFER / 4 {
            let excess = self.replay.len() - REPLAY_BUFFER;
            self.replay.drain(..excess);
            self.replay_start += excess as u64;
        }
    }

    /// The chardev process is done with the first `count` bytes of this channel's output. `Err` with the
    /// number of bytes sent when it claims more than that (a confused peer: the claim is capped).
    fn acknowledge(&mut self, count: u64) -> Result<(), u64> {
        let sent = self.replay_start + self.replay.len() as u64;
        let capped = count.min(sent);
        if capped > self.acked {
            self.acked = capped;
            if capped > self.replay_start {
                self.replay.drain(..(capped - self.replay_start) as usize);
                self.replay_start = capped;
            }
        }
        if count > sent {
            Err(sent)
        } else {
            Ok(())
        }
    }
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
        let (batch, channel, generation, ask) = {
            let mut st = self.lock();
            if st.broken {
                return false;
            }
            let batch = std::mem::take(&mut st.buf);
            // Into the replay buffer before it is sent: if the send fails, or the chardev dies before writing
            // it, the next chardev process gets it first (the bytes of this batch before what the guest wrote
            // since).
            st.keep_for_replay(&batch);
            let ask = !std::mem::replace(&mut st.ack_requested, true);
            (batch, st.channel.clone(), st.generation, ask)
        };
        self.cond.notify_all();
        let fail = |e: IpcError| {
            let mut st = self.lock();
            if st.generation == generation {
                self.mark_broken(&mut st, &e.to_string());
            }
            false
        };
        if ask {
            // The request for acknowledgements (see `CoreToChardev::Output`), first on every channel.
            if let Err(e) = channel.send(&CoreToChardev::Output(Vec::new()), &[]) {
                return fail(e);
            }
        }
        // A message body is at most 1 MiB (tessera-ipc's frame limit); what was kept while the chardev was away
        // can be that much.
        let mut sent = 0;
        while sent < batch.len() {
            let end = batch.len().min(sent + OUTPUT_LIMIT);
            if let Err(e) = channel.send(&CoreToChardev::Output(batch[sent..end].to_vec()), &[]) {
                return fail(e);
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
                replay: VecDeque::new(),
                replay_start: 0,
                acked: 0,
                ack_requested: false,
                input_ended: None,
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

    /// The chardev process was restarted: `channel` replaces the old channel. What the old one had not
    /// acknowledged is sent first, then what the guest printed meanwhile (by the output thread, in order), then
    /// output and input go on as before.
    pub fn reconnect(self: &Arc<Self>, channel: Arc<Channel>) -> io::Result<()> {
        let (dropped, replayed, lost) = {
            let mut st = self.output.lock();
            // The launcher may restart the chardev before this side has read the dead one's last
            // acknowledgements (they sit in the old channel, before its end): wait for the old input thread to
            // reach the end, or what was acknowledged would be sent twice. A dead peer's channel ends at once;
            // the bound is for an old chardev process that is somehow still there.
            let deadline = std::time::Instant::now() + OLD_CHANNEL_DRAIN;
            while st.input_ended != Some(st.generation) {
                let now = std::time::Instant::now();
                if now >= deadline {
                    break;
                }
                st = self.output.cond.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            // Let go of before being acknowledged (the replay buffer was full): gone with the old process.
            let lost = st.replay_start.saturating_sub(st.acked);
            let mut resend: Vec<u8> = std::mem::take(&mut st.replay).into();
            let replayed = resend.len();
            resend.extend_from_slice(&st.buf);
            st.buf = resend;
            st.replay_start = 0;
            st.acked = 0;
            st.ack_requested = false;
            st.channel = channel;
            st.generation += 1;
            st.broken = false;
            st.away_reason = None;
            (std::mem::take(&mut st.dropped), replayed, lost)
        };
        self.output.cond.notify_all();
        if replayed > 0 {
            self.log.error(&format!(
                "{}: sending again {replayed} bytes of guest output the old chardev process had not confirmed",
                self.name
            ));
        }
        if dropped + lost > 0 {
            self.log.error(&format!(
                "{}: {} bytes of guest output were dropped while the chardev process was away",
                self.name,
                dropped + lost
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
        let mut warned = false;
        let gone = |why: &str| {
            let mut st = self.output.lock();
            if st.generation == generation && !st.stop {
                self.output.mark_broken(&mut st, why);
            }
            st.input_ended = Some(generation);
            self.output.cond.notify_all();
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
                    ChardevToCore::Written(count) => {
                        let mut st = self.output.lock();
                        if st.generation != generation {
                            continue;
                        }
                        if let Err(sent) = st.acknowledge(count) {
                            drop(st);
                            if !std::mem::replace(&mut warned, true) {
                                self.log.error(&format!(
                                    "{}: the chardev process acknowledged {count} bytes of output, but only {sent} \
                                     were sent; taken as {sent}",
                                    self.name
                                ));
                            }
                        }
                    }
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
        assert_eq!(msg, CoreToChardev::Output(Vec::new()), "first the request for acknowledgements");
        let (msg, _): (CoreToChardev, _) = chardev.recv().unwrap();
        assert_eq!(msg, CoreToChardev::Output(b"hello\n".to_vec()));
    }

    #[test]
    fn the_flusher_sends_without_being_asked() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        p.write(0, b"x");
        assert_eq!(receive(&chardev, 1), b"x");
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

    /// Play the chardev acknowledging the first `count` bytes, and wait until the core has taken it in.
    fn acknowledge(p: &SerialPort, chardev: &Channel, count: u64) {
        chardev.set_nonblocking(false).unwrap();
        chardev.send(&ChardevToCore::Written(count), &[]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.output.lock().acked < count && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Close the chardev's end and wait until the core noticed (its input thread sees the hang-up).
    fn chardev_dies(p: &SerialPort, chardev: Channel) {
        drop(chardev);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.away_buffered().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(p.away_buffered().is_some(), "the closed channel was noticed");
    }

    #[test]
    fn output_while_the_chardev_is_away_is_kept_and_sent_first_on_reconnect() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        for b in b"before " {
            p.write(0, &[*b]);
        }
        assert_eq!(receive(&chardev, 7), b"before ");
        // Written by the chardev: not sent again.
        acknowledge(&p, &chardev, 7);
        // Whatever the guest prints from now on is kept.
        chardev_dies(&p, chardev);
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
        // The "x" whose send failed is in the replay buffer, not in the away buffer.
        assert_eq!(kept as u64 + dropped, total as u64);
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        // More than a socket buffer: sent while this thread reads.
        let sender = {
            let p = p.clone();
            std::thread::spawn(move || p.flush())
        };
        let got = receive(&chardev, kept + 1);
        sender.join().unwrap();
        assert_eq!(got.len(), kept + 1);
        assert_eq!(got[0], b'x', "the unacknowledged byte first");
        assert_eq!(&got[1..], &data[total - kept..], "then the newest bytes, in order");
        p.stop();
    }

    #[test]
    fn unacknowledged_output_is_sent_again_before_the_away_buffer() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        p.write(0, b"a");
        assert_eq!(receive(&chardev, 1), b"a");
        p.write(0, b"b");
        assert_eq!(receive(&chardev, 1), b"b");
        // The chardev wrote "a"; "b" was still in its queue when it died.
        acknowledge(&p, &chardev, 1);
        chardev_dies(&p, chardev);
        p.write(0, b"c");
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        assert_eq!(receive(&chardev, 2), b"bc", "the unacknowledged byte, then the away buffer");
        // The count starts again on the new channel.
        acknowledge(&p, &chardev, 2);
        p.write(0, b"d");
        assert_eq!(receive(&chardev, 1), b"d");
        chardev_dies(&p, chardev);
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        p.write(0, b"e");
        assert_eq!(receive(&chardev, 2), b"de");
        p.stop();
    }

    #[test]
    fn an_acknowledgement_beyond_what_was_sent_is_capped() {
        let (p, chardev, _) = port();
        p.start().unwrap();
        p.write(0, b"a");
        p.write(0, b"b");
        assert_eq!(receive(&chardev, 2), b"ab");
        acknowledge(&p, &chardev, 1 << 40);
        assert_eq!(p.output.lock().acked, 2);
        // Going back is ignored.
        acknowledge(&p, &chardev, 1);
        p.write(0, b"c");
        assert_eq!(receive(&chardev, 1), b"c");
        chardev_dies(&p, chardev);
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        p.write(0, b"d");
        assert_eq!(receive(&chardev, 2), b"cd");
        p.stop();
    }

    #[test]
    fn the_replay_buffer_is_bounded_and_keeps_the_newest_bytes() {
        let (p, chardev, _) = port();
        let data: Vec<u8> = (0..REPLAY_BUFFER * 2).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let got = receive(&chardev, REPLAY_BUFFER * 2);
            (got, chardev)
        });
        for c in data.chunks(64 * 1024) {
            OutputWriter(p.output.clone()).write_all(c).unwrap();
            p.flush();
        }
        let (got, chardev) = reader.join().unwrap();
        assert_eq!(got.len(), data.len());
        let (start, kept) = {
            let st = p.output.lock();
            (st.replay_start, st.replay.len())
        };
        assert!((REPLAY_BUFFER..=REPLAY_BUFFER + REPLAY_BUFFER / 4).contains(&kept), "kept {kept}");
        assert_eq!(start + kept as u64, data.len() as u64);
        drop(chardev);
        p.flush();
        let (core, chardev) = Channel::pair().unwrap();
        p.reconnect(Arc::new(core)).unwrap();
        let sender = {
            let p = p.clone();
            std::thread::spawn(move || p.flush())
        };
        let again = receive(&chardev, kept);
        sender.join().unwrap();
        assert_eq!(&again[..], &data[data.len() - kept..], "the newest unacknowledged bytes");
    }

    #[test]
    fn identifies_as_16550a_with_fifo() {
        let (p, _chardev, _) = port();
        assert_eq!(inb(&p, 2) & 0xc0, 0xc0);
        assert_ne!(inb(&p, 5), 0xff);
    }
}
