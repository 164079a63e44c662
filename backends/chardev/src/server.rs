//! The chardev event loop: one thread polls the control channel, every front-end channel, the host input and
//! (socket server) the listener; guest output leaves through [`HostWriter`] threads.

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, SockFlag};
use tessera_ipc::frame;
use tessera_ipc::messages::{
    ChardevBackend, ChardevConfig, ChardevToCore, ChildToLauncher, CoreToChardev, LauncherToChild,
};
use tessera_ipc::{Channel, IpcError, ReceivedFds};

use crate::error::ChardevError;
use crate::host::{Conn, Host};
use crate::mux::{help_text, Mux, MuxEvent, Timestamps};
use crate::telnet::{TelnetFilter, TelnetInput, NEGOTIATION};
use crate::terminal::{self, RawMode};
use crate::writer::{HostWriter, Pushed};

/// Guest output queued for the host side before new output is dropped. Dropping only happens once the host
/// side is stuck (see [`STUCK_TIME`]): before that, a backlog of [`BACKLOG`] bytes stops the reading of front
/// ends, which makes the core wait, as a real UART waits for a slow line.
const HOST_QUEUE_CAP: usize = 4 << 20;
/// Larger than one frame ([`frame::MAX_BODY`]), so a frame read below it always fits under the cap.
const BACKLOG: usize = 1 << 20;
/// A host side that has taken nothing for this long is stuck: guest output is then read and dropped past
/// the cap, so the core never waits on a terminal nobody drains.
const STUCK_TIME: Duration = Duration::from_secs(2);
/// Poll interval while front ends are held back for a backlog (the writer threads do not wake the loop).
const BACKLOG_POLL: Duration = Duration::from_millis(10);
/// The log file is a local file: give it more room.
const LOGFILE_QUEUE_CAP: usize = 8 << 20;
/// Input queued for one front end before the host input stops being read (the terminal or socket then
/// buffers it: input is never dropped).
const FRONTEND_TX_CAP: usize = 64 * 1024;
/// Bytes read from the host per read.
const READ_CHUNK: usize = 4096;
/// Frames taken from one front end per poll round, so one busy front end cannot starve the others.
const FRAMES_PER_ROUND: usize = 256;
/// How long `Shutdown` waits for front ends to reach EOF (the core's last output must not be lost).
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// How long the writers get to empty their queues on the way out.
const FLUSH_TIME: Duration = Duration::from_secs(2);
/// How often a pty nobody has open is checked for a new reader.
const PTY_RECHECK: Duration = Duration::from_secs(1);
/// Least time between two "output dropped" warnings.
const WARN_INTERVAL: Duration = Duration::from_secs(5);
/// Acknowledgement marks kept before new ones are merged into the last (which delays an acknowledgement until
/// the merged output is written, and keeps memory bounded whatever the core sends).
const MAX_MARKS: usize = 4096;

struct Frontend {
    /// 0-based position in the configuration, for messages.
    number: usize,
    chan: Channel,
    /// Encoded frames not yet written, shared with the output writer's thread (acknowledgements).
    tx: Arc<Mutex<Tx>>,
    open: bool,
    /// `Output` bytes received on this channel.
    received: u64,
}

/// Encoded frames for one front end not yet written, from `off`.
#[derive(Default)]
struct Tx {
    buf: Vec<u8>,
    off: usize,
}

impl Tx {
    fn pending(&self) -> usize {
        self.buf.len() - self.off
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; a poisoned value is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Acknowledged output ([`ChardevToCore::Written`]), shared by the event loop (which adds marks as output
/// arrives) and the output writer's thread, which sends acknowledgements itself right after a host write
/// completes: a crash between "written" and "acknowledged" makes the core send those bytes again (at least
/// once), and going through the event loop would widen that moment by a thread wake-up.
///
/// What counts as written: handed to the host side (a completed `write`), or dropped because the host side
/// cannot take output (`null`, a socket server with no client, a pty nobody opened, a host side stuck past its
/// queue, a failed host descriptor), as QEMU drops output nobody can receive. The log file is not waited for:
/// it is a copy, and the host side is what the user reads.
struct AckBook {
    /// Output waiting in the host writer on behalf of front ends that want acknowledgements, in stream order.
    marks: VecDeque<Mark>,
    fronts: Vec<AckFront>,
}

struct AckFront {
    /// The core asked for acknowledgements (an empty `Output`).
    ack: bool,
    open: bool,
    /// Output bytes the host side is done with.
    written: u64,
    /// The count last sent (or queued in `tx`).
    acked: u64,
    tx: Arc<Mutex<Tx>>,
    /// The front end's channel socket (a duplicate: the writer thread sends on it).
    sock: std::os::unix::net::UnixStream,
}

impl AckBook {
    /// The host writer is done with every position up to `done`: acknowledge what that covers.
    fn settle(&mut self, done: u64) {
        while let Some(m) = self.marks.front() {
            if m.pos > done {
                break;
            }
            let f = &mut self.fronts[m.frontend];
            f.written = f.written.max(m.count);
            self.marks.pop_front();
        }
        for f in &mut self.fronts {
            f.send();
        }
    }
}

impl AckFront {
    fn send(&mut self) {
        if !self.ack || !self.open || self.written <= self.acked {
            return;
        }
        let mut tx = lock(&self.tx);
        // Behind queued frames (input the core has not taken yet) it waits, and the event loop sends the
        // latest count once they are out: one acknowledgement in the queue at a time.
        if tx.pending() > 0 {
            return;
        }
        // Encoding a `Written` cannot fail (a fixed-size body far below the frame limit).
        let Ok(bytes) = frame::encode(&ChardevToCore::Written(self.written), 0) else { return };
        self.acked = self.written;
        match (&self.sock).write(&bytes) {
            Ok(n) if n == bytes.len() => {}
            Ok(n) => *tx = Tx { buf: bytes[n..].to_vec(), off: 0 },
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {
                *tx = Tx { buf: bytes, off: 0 }
            }
            // The channel is gone: the event loop's read finds out and closes it.
            Err(_) => {}
        }
    }
}

/// The end of one front end's output in the host writer's stream: once the writer is done with position
/// `pos`, that front end's first `count` bytes are written (or were dropped by policy).
struct Mark {
    pos: u64,
    frontend: usize,
    count: u64,
}

impl Frontend {
    fn pending(&self) -> usize {
        lock(&self.tx).pending()
    }
}

#[derive(Clone, Copy)]
enum Tag {
    Control,
    Frontend(usize),
    HostInput,
    Listener,
    /// The host writer finished a write: acknowledgements may be due.
    Progress,
}

/// Why the loop ended.
enum End {
    /// `Shutdown`, or every front end closed: exit 0.
    Done,
    /// The launcher went away or spoke nonsense: exit 1.
    LauncherGone,
}

pub struct Chardev {
    id: String,
    control: Channel,
    frontends: Vec<Frontend>,
    focus: usize,
    host: Host,
    out: HostWriter,
    logfile: Option<HostWriter>,
    mux: Option<Mux>,
    timestamps: Timestamps,
    raw: Option<RawMode>,
    dropped: DropWarning,
    accept_failures: DropWarning,
    input_dropped: DropWarning,
    exit_sent: bool,
    /// Set by `Shutdown`: front ends are read until EOF or this deadline, then the process exits.
    draining: Option<Instant>,
    /// The launcher closed its end after `Shutdown` (allowed: it has said all it had to say).
    control_closed: bool,
    acks: Arc<Mutex<AckBook>>,
}

impl Chardev {
    /// Take the descriptors named in `cfg` and set the host side up (raw mode included).
    pub fn new(cfg: ChardevConfig, mut fds: ReceivedFds, control: Channel) -> Result<Self, ChardevError> {
        control.set_nonblocking(true).map_err(ChardevError::Control)?;
        let mut frontends = Vec::new();
        let mut fronts = Vec::new();
        for (number, index) in cfg.frontends.iter().enumerate() {
            let chan = Channel::from_fd(fds.take(*index)?);
            chan.set_nonblocking(true).map_err(ChardevError::Control)?;
            let sock =
                chan.socket().try_clone().map_err(|e| ChardevError::sys("duplicate a serial channel", errno(&e)))?;
            let tx = Arc::new(Mutex::new(Tx::default()));
            fronts.push(AckFront { ack: false, open: true, written: 0, acked: 0, tx: tx.clone(), sock });
            frontends.push(Frontend { number, chan, tx, open: true, received: 0 });
        }
        let acks = Arc::new(Mutex::new(AckBook { marks: VecDeque::new(), fronts }));
        let logfile = match cfg.logfile {
            Some(index) => Some(spawn_writer("chardev-logfile", Some(Arc::new(fds.take(index)?)), LOGFILE_QUEUE_CAP)?),
            None => None,
        };
        // `-D` is for the `-d` items; the chardev has none of its own yet, and its errors go to stderr.
        if let Some(index) = cfg.log.file {
            drop(fds.take(index)?);
        }
        let mut raw = None;
        let mut telnet_greeting = false;
        let (host, target) = match cfg.backend {
            ChardevBackend::Null => (Host::Null, None),
            ChardevBackend::Stdio { input, output, raw: want_raw } => {
                let input_index = input;
                let input = fds.take(input)?;
                // One descriptor for both directions (a terminal opened read-write) is fine too.
                let output = if output == input_index {
                    input.try_clone().map_err(|e| ChardevError::sys("duplicate the terminal descriptor", errno(&e)))?
                } else {
                    fds.take(output)?
                };
                if want_raw && nix::unistd::isatty(input.as_raw_fd()).unwrap_or(false) {
                    raw = Some(RawMode::enter(input.as_fd(), cfg.signal)?);
                }
                (Host::Stream { input: Some(Conn::new(Arc::new(input))) }, Some(Arc::new(output)))
            }
            ChardevBackend::File { output, input } => {
                let input = input.map(|i| fds.take(i)).transpose()?;
                let output = fds.take(output)?;
                (Host::Stream { input: input.map(|i| Conn::new(Arc::new(i))) }, Some(Arc::new(output)))
            }
            ChardevBackend::SocketServer { listener, connected, telnet } => {
                let listener = fds.take(listener)?;
                // Only this process accepts on the listener; non-blocking so a client that vanished between
                // poll and accept cannot stall the loop.
                set_nonblocking(&listener)?;
                let client = connected.map(|c| fds.take(c)).transpose()?.map(|c| {
                    let mut conn = Conn::new(Arc::new(c));
                    if telnet {
                        conn.telnet = Some(TelnetFilter::new());
                    }
                    conn
                });
                let target = client.as_ref().map(|c| c.fd.clone());
                telnet_greeting = telnet && target.is_some();
                (Host::Server { listener, client, telnet }, target)
            }
            ChardevBackend::SocketClient { stream } => {
                let conn = Conn::new(Arc::new(fds.take(stream)?));
                let target = Some(conn.fd.clone());
                (Host::Client { conn: Some(conn) }, target)
            }
            ChardevBackend::Pty { master, path } => {
                let master = Arc::new(fds.take(master)?);
                let connected = pty_has_reader(&master);
                let target = connected.then(|| master.clone());
                (Host::Pty { master, connected, path }, target)
            }
        };
        let out = spawn_writer("chardev-output", target, HOST_QUEUE_CAP)?;
        let book = acks.clone();
        out.on_done(Box::new(move |done| lock(&book).settle(done)));
        if telnet_greeting {
            out.push(&NEGOTIATION);
        }
        let unused = fds.unused();
        let chardev = Chardev {
            id: cfg.id,
            control,
            frontends,
            focus: 0,
            host,
            out,
            logfile,
            mux: cfg.mux.then(Mux::new),
            timestamps: Timestamps::default(),
            raw,
            dropped: DropWarning::default(),
            accept_failures: DropWarning::default(),
            input_dropped: DropWarning::default(),
            exit_sent: false,
            draining: None,
            control_closed: false,
            acks,
        };
        if unused > 0 {
            chardev.log(format_args!("{unused} descriptors from the launcher were not named in the configuration"));
        }
        Ok(chardev)
    }

    /// Serve until told to stop; returns the exit status.
    pub fn run(mut self) -> i32 {
        if let Err(e) = self.control.send(&ChildToLauncher::Ready, &[]) {
            self.log(format_args!("cannot tell the launcher it is ready: {e}"));
            return self.finish(End::LauncherGone);
        }
        let end = loop {
            if let Some(end) = self.round() {
                break end;
            }
        };
        self.finish(end)
    }

    fn finish(&mut self, end: End) -> i32 {
        let deadline = Instant::now() + FLUSH_TIME;
        let complete = self.out.flush(deadline) & self.logfile.as_ref().is_none_or(|l| l.flush(deadline));
        // What was written while flushing must not be written twice by a successor (an operator restart).
        self.send_acks();
        terminal::restore();
        self.raw.take();
        if !complete {
            self.log("the host side did not take all remaining output in time; the rest is lost");
        }
        match end {
            End::Done => 0,
            End::LauncherGone => 1,
        }
    }

    /// One poll and what it found. `Some` when the process should end.
    fn round(&mut self) -> Option<End> {
        let now = Instant::now();
        if let Some(deadline) = self.draining {
            if now >= deadline || !self.frontends.iter().any(|f| f.open) {
                return Some(End::Done);
            }
        }
        let mut timeout = self.draining.map(|d| d - now);
        let mut at_most = |limit: Duration| timeout = Some(timeout.map_or(limit, |t| t.min(limit)));
        if let Host::Pty { connected: false, .. } = self.host {
            at_most(PTY_RECHECK);
        }
        // While draining, the core's last words matter more than pacing: read them even into a backlog.
        let backlog = self.draining.is_none() && self.output_backlog(now);
        if backlog {
            at_most(BACKLOG_POLL);
        }
        let ready = match self.poll_once(timeout, backlog) {
            Ok(ready) => ready,
            Err(e) => {
                self.log(format_args!("poll failed: {e}"));
                return Some(End::LauncherGone);
            }
        };
        for (tag, revents) in ready {
            let end = match tag {
                Tag::Control => self.on_control(),
                Tag::Frontend(i) => {
                    if revents.contains(PollFlags::POLLOUT) {
                        self.flush_frontend(i);
                    }
                    if revents.intersects(!PollFlags::POLLOUT) {
                        self.on_frontend(i);
                    }
                    None
                }
                Tag::HostInput => {
                    self.on_host_input();
                    None
                }
                Tag::Listener => {
                    self.on_listener();
                    None
                }
                Tag::Progress => {
                    self.out.take_progress();
                    None
                }
            };
            if end.is_some() {
                return end;
            }
        }
        self.check_writers();
        self.send_acks();
        if let Host::Pty { master, connected: connected @ false, .. } = &mut self.host {
            if pty_has_reader(master) {
                *connected = true;
                self.out.set_target(Some(master.clone()));
            }
        }
        if self.draining.is_none() && !self.frontends.is_empty() && !self.frontends.iter().any(|f| f.open) {
            // The core closed every serial channel: nothing more can come; leave as on Shutdown.
            self.draining = Some(Instant::now());
        }
        None
    }

    /// True when guest output waits for a host side that is slow but not stuck: front ends are not read.
    fn output_backlog(&self, now: Instant) -> bool {
        std::iter::once(&self.out)
            .chain(self.logfile.as_ref())
            .any(|w| w.queued() > BACKLOG && w.stalled_for(now).is_some_and(|t| t < STUCK_TIME))
    }

    fn poll_once(&self, timeout: Option<Duration>, backlog: bool) -> nix::Result<Vec<(Tag, PollFlags)>> {
        let mut tags = Vec::new();
        let mut fds = Vec::new();
        if !self.control_closed {
            tags.push(Tag::Control);
            fds.push(PollFd::new(self.control.as_fd(), PollFlags::POLLIN));
        }
        // Also wakes the loop when the writer thread left part of an acknowledgement to send.
        tags.push(Tag::Progress);
        fds.push(PollFd::new(self.out.progress_fd(), PollFlags::POLLIN));
        for (i, f) in self.frontends.iter().enumerate().filter(|(_, f)| f.open) {
            let mut events = if backlog { PollFlags::empty() } else { PollFlags::POLLIN };
            if f.pending() > 0 {
                events |= PollFlags::POLLOUT;
            }
            tags.push(Tag::Frontend(i));
            fds.push(PollFd::new(f.chan.as_fd(), events));
        }
        if self.draining.is_none() {
            if let Some(conn) = self.host_input() {
                // Without mux, a core that does not take input holds the host input back (nothing is lost); with
                // mux, input is always read so the escape keys work (see `send_to_frontend`).
                let room = self.focused().is_none_or(|i| self.frontends[i].pending() < FRONTEND_TX_CAP);
                if room || self.mux.is_some() {
                    tags.push(Tag::HostInput);
                    fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
                }
            }
            if let Host::Server { listener, client: None, .. } = &self.host {
                tags.push(Tag::Listener);
                fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            }
        }
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up so a deadline 0.4 ms away does not spin.
            Some(t) => {
                PollTimeout::try_from(t.as_millis().saturating_add(1).min(60_000) as u32).unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        Ok(tags
            .into_iter()
            .zip(fds.iter())
            .filter_map(|(tag, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (tag, r)))
            .collect())
    }

    fn host_input(&self) -> Option<&Arc<OwnedFd>> {
        match &self.host {
            Host::Null => None,
            Host::Stream { input, .. } => input.as_ref().map(|c| &c.fd),
            Host::Server { client, .. } => client.as_ref().map(|c| &c.fd),
            Host::Client { conn } => conn.as_ref().map(|c| &c.fd),
            Host::Pty { master, connected, .. } => connected.then_some(master),
        }
    }

    // -------------------------------------------------------------------------------------------------------
    // control channel

    fn on_control(&mut self) -> Option<End> {
        loop {
            match self.control.try_recv::<LauncherToChild>() {
                Ok((LauncherToChild::Shutdown, _)) => {
                    if self.draining.is_none() {
                        self.draining = Some(Instant::now() + DRAIN_TIME);
                    }
                }
                Ok((LauncherToChild::Configure(_), _)) => {
                    self.log("the launcher sent a second configuration; it is ignored");
                }
                Ok((other, _)) => {
                    self.log(format_args!("a core-only control message reached tessera-chardev; ignored: {other:?}"));
                }
                Err(IpcError::WouldBlock) => return None,
                Err(IpcError::Closed) if self.draining.is_some() => {
                    self.control_closed = true;
                    return None;
                }
                Err(IpcError::Closed) => {
                    self.log("the launcher closed the control channel; exiting");
                    return Some(End::LauncherGone);
                }
                Err(e) => {
                    self.log(format_args!("control channel: {e}; exiting"));
                    return Some(End::LauncherGone);
                }
            }
        }
    }

    fn notify_launcher(&mut self, msg: ChildToLauncher) {
        if let Err(e) = self.control.send(&msg, &[]) {
            self.log(format_args!("cannot send {msg:?} to the launcher: {e}"));
        }
    }

    // -------------------------------------------------------------------------------------------------------
    // front ends

    fn on_frontend(&mut self, i: usize) {
        for _ in 0..FRAMES_PER_ROUND {
            let f = &self.frontends[i];
            if !f.open {
                return;
            }
            match f.chan.try_recv::<CoreToChardev>() {
                Ok((CoreToChardev::Output(bytes), fds)) => {
                    if !fds.is_empty() {
                        self.close_frontend(i, Some(format!("an output frame carried {} file descriptors", fds.len())));
                        return;
                    }
                    if bytes.is_empty() {
                        // The core keeps a replay buffer and asks for acknowledgements (see `CoreToChardev`).
                        lock(&self.acks).fronts[i].ack = true;
                        continue;
                    }
                    self.guest_output(&bytes);
                    let f = &mut self.frontends[i];
                    f.received += bytes.len() as u64;
                    let count = f.received;
                    self.mark(i, count);
                }
                Err(IpcError::WouldBlock) => return,
                Err(IpcError::Closed) => {
                    self.close_frontend(i, None);
                    return;
                }
                Err(e) => {
                    self.close_frontend(i, Some(e.to_string()));
                    return;
                }
            }
        }
    }

    /// Front end `i`'s first `count` bytes are in the host writer's stream (or were dropped by policy) up to its
    /// current end.
    fn mark(&mut self, frontend: usize, count: u64) {
        let mut book = lock(&self.acks);
        if !book.fronts[frontend].ack {
            return;
        }
        let pos = self.out.pushed();
        let full = book.marks.len() >= MAX_MARKS;
        if let Some(last) = book.marks.back_mut() {
            if last.frontend == frontend && (last.pos == pos || full) {
                last.pos = pos;
                last.count = count;
                return;
            }
        }
        book.marks.push_back(Mark { pos, frontend, count });
    }

    /// Acknowledge what the writer finished with that its thread has not acknowledged (output dropped by
    /// policy, which no write follows; an acknowledgement that had to wait behind input), and push out what is
    /// left of a partly sent one.
    fn send_acks(&mut self) {
        let done = self.out.done();
        lock(&self.acks).settle(done);
        for i in 0..self.frontends.len() {
            if self.frontends[i].pending() > 0 {
                self.flush_frontend(i);
            }
        }
    }

    fn close_frontend(&mut self, i: usize, why: Option<String>) {
        lock(&self.acks).fronts[i].open = false;
        let f = &mut self.frontends[i];
        f.open = false;
        *lock(&f.tx) = Tx::default();
        let _ = f.chan.socket().shutdown(std::net::Shutdown::Both);
        let number = f.number;
        if let Some(why) = why {
            self.log(format_args!("front end #{number}: {why}; closing that channel"));
        }
    }

    /// The front end that receives input: the focused one, or the next open one if it closed.
    fn focused(&self) -> Option<usize> {
        let n = self.frontends.len();
        (0..n).map(|k| (self.focus + k) % n).find(|&i| self.frontends[i].open)
    }

    fn send_to_frontend(&mut self, msg: &ChardevToCore) {
        let Some(i) = self.focused() else {
            // No front end left (or none configured): input has nowhere to go.
            return;
        };
        self.focus = i;
        if self.frontends[i].pending() >= FRONTEND_TX_CAP {
            // Only in mux mode (otherwise input is not read past the cap): the core has stopped taking input,
            // and the escape keys must keep working so the user can still leave with C-a x.
            if self.input_dropped.record(1).is_some() {
                self.log(format_args!("front end #{i} is not taking input; typed keys are dropped"));
            }
            return;
        }
        match frame::encode(msg, 0) {
            Ok(bytes) => lock(&self.frontends[i].tx).buf.extend_from_slice(&bytes),
            Err(e) => {
                self.log(format_args!("cannot encode input for front end #{i}: {e}"));
                return;
            }
        }
        self.flush_frontend(i);
    }

    fn flush_frontend(&mut self, i: usize) {
        let f = &self.frontends[i];
        if !f.open {
            return;
        }
        let failed = {
            let mut tx = lock(&f.tx);
            loop {
                if tx.pending() == 0 {
                    *tx = Tx::default();
                    break None;
                }
                let off = tx.off;
                match f.chan.socket().write(&tx.buf[off..]) {
                    Ok(n) => tx.off += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
            }
        };
        if let Some(e) = failed {
            self.close_frontend(i, Some(format!("cannot send input: {e}")));
        }
    }

    // -------------------------------------------------------------------------------------------------------
    // host side

    /// Bytes from the guest (or from the mux itself): stamped if asked, then to the host and the log file.
    fn guest_output(&mut self, bytes: &[u8]) {
        let mut data = Vec::with_capacity(bytes.len());
        self.timestamps.apply(bytes, Instant::now(), &mut data);
        if self.out.push(&data) == Pushed::Overflow {
            if let Some(total) = self.dropped.record(data.len() as u64) {
                self.log(format_args!("the host side is not keeping up with guest output: {total} bytes dropped"));
            }
        }
        if let Some(log) = &self.logfile {
            log.push(&data);
        }
    }

    fn on_host_input(&mut self) {
        let Some(fd) = self.host_input().cloned() else {
            return;
        };
        let mut buf = [0u8; READ_CHUNK];
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => self.host_input_ended(None),
            Ok(n) => self.host_bytes(&buf[..n]),
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => self.host_input_ended(Some(e)),
        }
    }

    fn host_input_ended(&mut self, error: Option<Errno>) {
        match &mut self.host {
            Host::Null => {}
            Host::Stream { input } => {
                *input = None;
                if let Some(e) = error {
                    self.log(format_args!("reading input failed: {e}; input is ignored from now on"));
                }
            }
            Host::Server { client, .. } => {
                // As QEMU: the client is gone, output is dropped until the next one connects.
                if let Some(c) = client.take() {
                    c.hang_up();
                }
                self.out.set_target(None);
            }
            Host::Client { conn } => {
                if let Some(c) = conn.take() {
                    c.hang_up();
                }
                self.out.set_target(None);
                let why = error.map_or_else(|| "closed the connection".to_string(), |e| format!("failed: {e}"));
                self.log(format_args!("the socket peer {why}; guest output is dropped from now on"));
            }
            Host::Pty { connected, .. } => {
                // EIO: the last reader closed the slave side. QEMU drops output until someone opens it again.
                *connected = false;
                self.out.set_target(None);
            }
        }
    }

    fn on_listener(&mut self) {
        let Host::Server { listener, client, telnet } = &mut self.host else {
            return;
        };
        match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => {
                // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
                let fd = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
                let mut conn = Conn::new(fd.clone());
                if *telnet {
                    conn.telnet = Some(TelnetFilter::new());
                }
                let greet = *telnet;
                *client = Some(conn);
                self.out.set_target(Some(fd));
                if greet {
                    self.out.push(&NEGOTIATION);
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => {}
            Err(e) => {
                // EMFILE and the like: keep serving; poll reports the waiting client again, so pause a little
                // and warn at a bounded rate.
                if self.accept_failures.record(1).is_some() {
                    self.log(format_args!("accepting a socket client failed: {e}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Input typed on the host side: telnet commands stripped, escape keys run, the rest to the guest.
    fn host_bytes(&mut self, bytes: &[u8]) {
        let pieces = match &mut self.host {
            Host::Server { client: Some(Conn { telnet: Some(filter), .. }), .. } => filter.feed(bytes),
            _ => vec![TelnetInput::Data(bytes.to_vec())],
        };
        for piece in pieces {
            match piece {
                TelnetInput::Break => self.send_to_frontend(&ChardevToCore::Break),
                TelnetInput::Data(data) => match &mut self.mux {
                    None => self.send_to_frontend(&ChardevToCore::Input(data)),
                    Some(mux) => {
                        for event in mux.feed(&data) {
                            self.mux_event(event);
                        }
                    }
                },
            }
        }
    }

    fn mux_event(&mut self, event: MuxEvent) {
        match event {
            MuxEvent::Input(data) => self.send_to_frontend(&ChardevToCore::Input(data)),
            MuxEvent::Help => self.guest_output(&help_text()),
            MuxEvent::Exit => {
                // QEMU's exact words: scripts and users look for them.
                self.guest_output(b"QEMU: Terminated\n\r");
                if !self.exit_sent {
                    self.exit_sent = true;
                    let reason = format!("Ctrl-A x on chardev '{}'", self.id);
                    self.notify_launcher(ChildToLauncher::Exit { code: 0, reason });
                }
            }
            MuxEvent::Commit => {
                self.guest_output(b"\n\rC-a s: no disk images to commit (Tessera has no -snapshot drives)\n\r")
            }
            MuxEvent::Break => self.send_to_frontend(&ChardevToCore::Break),
            MuxEvent::SwitchFocus => self.switch_focus(),
            MuxEvent::ToggleTimestamps => self.timestamps.toggle(),
        }
    }

    /// `C-a c` cycles through the front ends and then the monitor, as in QEMU. Tessera has no monitor yet:
    /// reaching its place says so and goes on to the first front end.
    fn switch_focus(&mut self) {
        let open: Vec<usize> = (0..self.frontends.len()).filter(|&i| self.frontends[i].open).collect();
        let current = self.focused();
        let next = current.and_then(|c| open.iter().copied().find(|&i| i > c));
        match next {
            Some(i) => self.focus = i,
            None => {
                self.focus = open.first().copied().unwrap_or(0);
                self.guest_output(
                    b"\n\rC-a c: Tessera has no monitor yet; keyboard input stays with the guest's console\n\r",
                );
            }
        }
    }

    fn check_writers(&mut self) {
        if let Some(e) = self.out.take_error() {
            match self.host {
                // A socket or pty reader that went away; the read side notices it too and says what it needs to.
                Host::Server { .. } | Host::Client { .. } | Host::Pty { .. } => {}
                Host::Null | Host::Stream { .. } => {
                    self.log(format_args!("writing guest output failed: {e}; further output is dropped"))
                }
            }
        }
        if let Some(e) = self.logfile.as_ref().and_then(|l| l.take_error()) {
            self.log(format_args!("writing the log file failed: {e}; the log file gets no more output"));
        }
    }

    fn log(&self, msg: impl Display) {
        // Not eprintln!: a closed stderr must not panic the process.
        let _ = writeln!(std::io::stderr(), "tessera-chardev: {}: {msg}", self.id);
    }
}

fn spawn_writer(name: &str, target: Option<Arc<OwnedFd>>, cap: usize) -> Result<HostWriter, ChardevError> {
    HostWriter::spawn(name, target, cap).map_err(|e| ChardevError::sys("start an output thread", errno(&e)))
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), ChardevError> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| ChardevError::sys("read descriptor flags", e))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| ChardevError::sys("set descriptor flags", e))?;
    Ok(())
}

/// A pty master reports POLLHUP while no process has the slave side open.
fn pty_has_reader(master: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0].revents().unwrap_or(PollFlags::empty()).contains(PollFlags::POLLHUP),
        Err(_) => false,
    }
}

/// Counts dropped output and says when a warning is due (at most once per [`WARN_INTERVAL`]), so a guest
/// flooding a stuck terminal cannot flood stderr as well.
#[derive(Default)]
struct DropWarning {
    last: Option<Instant>,
    since_last: u64,
}

impl DropWarning {
    /// Record `n` dropped bytes; `Some(total since the last warning)` when a warning should be printed.
    fn record(&mut self, n: u64) -> Option<u64> {
        self.since_last += n;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}
