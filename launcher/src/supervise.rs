//! Supervision of the running graph: one loop polls a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP) and every
//! child's control channel, and ends the graph when a child asks to (`Exit`), gives up (`Fatal`), dies
//! unexpectedly, or the launcher is told to terminate. Ending is always the same: `Shutdown` to the core,
//! then to the chardevs (so they flush what the guest printed last), a grace period, then SIGKILL.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tessera_ipc::messages::{ChildToLauncher, LauncherToChild, MonitorCommand, Role};
use tessera_ipc::{Channel, IpcError};

use crate::error::{os_error, Error, Result};
use crate::qmp::commands::{Host, QmpError};
use crate::qmp::server::{Link, Server, Token};
use crate::restart::{Backends, DEFAULT_RESTART_LIMIT};

/// How long children get to exit after `Shutdown` before they are killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long an unexpected death that is not by a signal waits for other deaths it may explain.
pub const DEATH_SETTLE: Duration = Duration::from_millis(300);
/// How long a child may live on after closing its control channel.
pub const CLOSED_GRACE: Duration = Duration::from_secs(2);
/// How long a child gets from its start to `Ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The signals the launcher handles itself.
pub fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        s.add(sig);
    }
    s
}

/// Block the handled signals and read them through a signalfd instead (no async handlers anywhere).
pub fn signal_fd() -> Result<SignalFd> {
    let set = handled_signals();
    set.thread_block().map_err(|e| Error::host("sigprocmask", os_error(e)))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| Error::host("signalfd", os_error(e)))
}

/// A terminating signal the launcher received, and who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermSignal {
    pub signo: i32,
    pub pid: u32,
}

impl TermSignal {
    /// QEMU's message: `terminating on signal 15 from pid 123 (kill)`, or without the sender when the
    /// kernel sent it (Ctrl-C at the terminal).
    pub fn message(&self) -> String {
        if self.pid == 0 {
            return format!("terminating on signal {}", self.signo);
        }
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "<unknown process>".into());
        format!("terminating on signal {} from pid {} ({comm})", self.signo, self.pid)
    }
}

/// Read pending signals: returns the first terminating one, and whether a SIGCHLD came.
pub fn read_signals(sfd: &mut SignalFd) -> (Option<TermSignal>, bool) {
    let mut term = None;
    let mut chld = false;
    while let Ok(Some(info)) = sfd.read_signal() {
        if info.ssi_signo == Signal::SIGCHLD as u32 {
            chld = true;
        } else if term.is_none() {
            term = Some(TermSignal { signo: info.ssi_signo as i32, pid: info.ssi_pid });
        }
    }
    (term, chld)
}

/// How a child ended, in words.
pub fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            let hint = match tessera_policy::death_hint(sig as i32) {
                // SIGSYS: the seccomp filter of the child's sandbox killed it.
                Some(h) => format!(" (by its sandbox's seccomp filter: {h})"),
                None => String::new(),
            };
            format!("killed by signal {}{}{hint}", sig as i32, if core { " (core dumped)" } else { "" })
        }
        other => format!("{other:?}"),
    }
}

pub struct Child {
    pub role: Role,
    pub label: String,
    pub pid: Pid,
    pub control: Channel,
    pub channel_open: bool,
    /// When its control channel closed (it should exit right after).
    pub closed_at: Option<Instant>,
    pub ready: bool,
    pub exited: Option<WaitStatus>,
    /// True once its end is expected: it sent `Exit`, or it was told to shut down.
    pub expected_end: bool,
    /// The supervised backend it runs (restarted when it dies; see [`crate::restart`]).
    pub unit: Option<usize>,
}

impl Child {
    pub fn new(role: Role, label: String, pid: Pid, control: Channel) -> Child {
        Child {
            role,
            label,
            pid,
            control,
            channel_open: true,
            closed_at: None,
            ready: false,
            exited: None,
            expected_end: false,
            unit: None,
        }
    }

    fn alive(&self) -> bool {
        self.exited.is_none()
    }
}

/// Why the graph ends.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// A child asked for the end of the VM with this exit status.
    Exit(i32),
    /// A child gave up; the message is printed, status 1.
    Fatal(String),
    /// Something went wrong around a child (died, sent garbage, did not start); printed, status 1.
    Failed(String),
    /// The launcher was told to terminate; QEMU exits 0 after saying so.
    Signal(TermSignal),
}

impl End {
    pub fn status(&self) -> i32 {
        match self {
            End::Exit(code) => *code,
            End::Signal(_) => 0,
            End::Fatal(_) | End::Failed(_) => 1,
        }
    }
}

pub struct Graph {
    pub children: Vec<Child>,
    pub sfd: SignalFd,
    /// The QMP monitors (none without -qmp / -mon).
    pub qmp: Server,
    /// The backends restarted when they die, once the graph runs.
    pub backends: Backends,
    /// QMP events raised while the server was busy, sent at the next turn of the loop.
    pub events: Vec<(String, Option<Value>)>,
    /// Deaths of supervised backends seen by the last reap, to be restarted.
    deaths: Vec<(usize, Pid, String, bool)>,
    /// Every child got ready: from now on a backend's death is a restart, not the end.
    pub running: bool,
}

impl Graph {
    pub fn new(sfd: SignalFd) -> Graph {
        Graph {
            children: Vec::new(),
            sfd,
            qmp: Server::default(),
            backends: Backends::new(DEFAULT_RESTART_LIMIT, tessera_policy::SandboxOptions::default(), false),
            events: Vec::new(),
            deaths: Vec::new(),
            running: false,
        }
    }

    /// Whether the death of `c` is a restart rather than the end of the VM.
    fn restartable(&self, c: &Child) -> bool {
        self.running && self.backends.limit > 0 && c.unit.is_some() && c.role != Role::Core
    }

    /// Send the queued QMP events.
    fn flush_events(&mut self) {
        for (name, data) in std::mem::take(&mut self.events) {
            self.qmp.event(&name, data);
        }
    }

    /// Run a QMP step with the server taken out of the graph (its commands act on the graph).
    fn with_qmp(&mut self, f: impl FnOnce(&mut Server, &mut Graph)) {
        let mut qmp = std::mem::take(&mut self.qmp);
        f(&mut qmp, self);
        self.qmp = qmp;
        self.flush_events();
    }

    /// Reap every child that has exited; an unexpected death ends the graph. When several go at once (the
    /// chardev exits by itself once the core is gone, sometimes before the core's own death is visible), the
    /// most telling death is reported: killed by a signal before a non-zero status before a clean exit, the
    /// core before the others. A death that is not by a signal waits [`DEATH_SETTLE`] for company first.
    fn reap(&mut self) -> Option<End> {
        let mut worst = self.reap_once(None);
        // A backend that exited by itself may have followed the core: wait for the core's death too.
        let quiet_death = self.deaths.iter().any(|d| !d.3);
        if quiet_death || worst.as_ref().is_some_and(|(rank, _)| *rank < 4) {
            let deadline = Instant::now() + DEATH_SETTLE;
            while Instant::now() < deadline && self.children.iter().any(|c| c.alive()) {
                std::thread::sleep(Duration::from_millis(10));
                worst = self.reap_once(worst);
            }
        }
        // Restartable deaths were set aside; anything else (the core's above all) ends the graph.
        if let Some((_, message)) = worst {
            self.deaths.clear();
            return Some(End::Failed(message));
        }
        if !self.deaths.is_empty() {
            // A backend that exited while the VM ends (a chardev leaves once the core closed its serial
            // channels) is no crash: the core's Exit, if it came meanwhile, is the news.
            for i in 0..self.children.len() {
                if self.children[i].channel_open {
                    if let Some(end) = self.read_messages(i) {
                        self.deaths.clear();
                        return Some(end);
                    }
                }
            }
        }
        for (unit, pid, how, _) in std::mem::take(&mut self.deaths) {
            self.backend_died(unit, pid, how);
        }
        None
    }

    fn reap_once(&mut self, mut worst: Option<(u8, String)>) -> Option<(u8, String)> {
        let restartable: Vec<bool> = self.children.iter().map(|c| self.restartable(c)).collect();
        for (c, restart) in self.children.iter_mut().zip(restartable).filter(|(c, _)| c.alive()) {
            let status = match waitpid(c.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => status,
                Err(Errno::ECHILD) => WaitStatus::Exited(c.pid, -1),
                _ => continue,
            };
            c.exited = Some(status);
            if c.expected_end {
                continue;
            }
            // A process its seccomp filter killed (SIGSYS) tried what its sandbox forbids: it may be under a
            // guest's control, so it is not given another try; the graph ends as for any fatal death.
            let sandbox_kill = matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _));
            if let (true, Some(unit), false) = (restart, c.unit, sandbox_kill) {
                c.channel_open = false;
                let signaled = matches!(status, WaitStatus::Signaled(..));
                self.deaths.push((unit, c.pid, describe(status), signaled));
                continue;
            }
            let rank = match status {
                WaitStatus::Signaled(..) => 4,
                WaitStatus::Exited(_, 0) => 0,
                _ => 2,
            } + u8::from(c.role == Role::Core);
            let worse = match &worst {
                Some((r, _)) => rank > *r,
                None => true,
            };
            if worse {
                worst = Some((rank, format!("{} (pid {}) died: {}", c.label, c.pid, describe(status))));
            }
        }
        worst
    }

    /// Read what the children sent.
    fn read_messages(&mut self, index: usize) -> Option<End> {
        loop {
            let c = &mut self.children[index];
            let msg = match c.control.try_recv::<ChildToLauncher>() {
                Ok((msg, _fds)) => msg,
                Err(IpcError::WouldBlock) => return None,
                // The process is going away: its exit status (SIGCHLD) says how.
                Err(IpcError::Closed) => {
                    c.channel_open = false;
                    c.closed_at = Some(Instant::now());
                    if c.role == Role::Core {
                        self.with_qmp(|q, g| q.core_gone(g));
                    }
                    return None;
                }
                Err(e) => {
                    c.channel_open = false;
                    return Some(End::Failed(format!("{} (pid {}) broke the control channel: {e}", c.label, c.pid)));
                }
            };
            match msg {
                ChildToLauncher::Ready => {
                    c.ready = true;
                    if let (true, Some(unit)) = (self.running, c.unit) {
                        self.unit_ready(unit);
                        self.flush_events();
                    }
                }
                ChildToLauncher::Exit { code, reason: _ } => {
                    c.expected_end = true;
                    return Some(End::Exit(code));
                }
                ChildToLauncher::Fatal { message } => {
                    c.expected_end = true;
                    return Some(End::Fatal(message));
                }
                ChildToLauncher::MonitorReply { tag, result } => self.with_qmp(|q, g| q.core_reply(tag, result, g)),
                ChildToLauncher::MonitorEvent(e) => self.qmp.core_event(&e),
                ChildToLauncher::BackendDisconnected { id, reason } => {
                    crate::err_line(&format!("tessera: {id}: backend disconnected: {reason}"));
                    self.device_disconnected(&id, &reason);
                    self.flush_events();
                }
                ChildToLauncher::BackendReconnected { id, stall_ms } => {
                    self.device_reconnected(&id, Some(stall_ms));
                    self.flush_events();
                }
            }
        }
    }

    /// Run until the graph must end. With `until_ready`, return `None` as soon as every child is `Ready`
    /// (within [`READY_TIMEOUT`]). The QMP monitors are served all along, and due backend restarts started.
    pub fn run(&mut self, until_ready: bool) -> Option<End> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if until_ready && self.children.iter().all(|c| c.ready) {
                return None;
            }
            if self.qmp.quit {
                return Some(End::Exit(0));
            }
            let mut wait: Option<Duration> = None;
            if until_ready {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let slow: Vec<String> = self
                        .children
                        .iter()
                        .filter(|c| !c.ready)
                        .map(|c| format!("{} (pid {})", c.label, c.pid))
                        .collect();
                    return Some(End::Failed(format!(
                        "{} did not get ready within {} s",
                        slow.join(", "),
                        READY_TIMEOUT.as_secs()
                    )));
                }
                wait = Some(left);
            }
            // A child that closed its control channel but lingers is as good as dead.
            let lingering = self
                .children
                .iter()
                .find(|c| c.alive() && !c.expected_end && c.closed_at.is_some_and(|t| t.elapsed() > CLOSED_GRACE));
            if let Some(c) = lingering {
                return Some(End::Failed(format!("{} (pid {}) closed its control channel", c.label, c.pid)));
            }
            if self.children.iter().any(|c| c.alive() && c.closed_at.is_some()) {
                wait = Some(wait.map_or(Duration::from_millis(100), |w| w.min(Duration::from_millis(100))));
            }
            if let Some(due) = self.backends.next_due() {
                let left = due.saturating_duration_since(Instant::now());
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
            let timeout = match wait {
                Some(w) => PollTimeout::try_from(w.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX),
                None => PollTimeout::NONE,
            };
            let watched: Vec<usize> = (0..self.children.len()).filter(|&i| self.children[i].channel_open).collect();
            let (sig_ready, ready_channels, ready_qmp) = {
                let mut pfds = vec![PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
                for &i in &watched {
                    pfds.push(PollFd::new(self.children[i].control.as_fd(), PollFlags::POLLIN));
                }
                // The monitors serve once the graph is up (a command for the core before it runs would have
                // nobody to answer it); until then clients wait in the backlog.
                let qmp_fds = if self.running { self.qmp.poll_fds() } else { Vec::new() };
                for (fd, _) in &qmp_fds {
                    pfds.push(PollFd::new(*fd, PollFlags::POLLIN));
                }
                match poll(&mut pfds, timeout) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Some(End::Failed(format!("poll failed: {}", crate::error::strerror(&e.into())))),
                }
                let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
                let sig = ready(&pfds[0]);
                let chans: Vec<usize> =
                    watched.iter().zip(&pfds[1..]).filter(|(_, p)| ready(p)).map(|(&i, _)| i).collect();
                let qmp: Vec<Token> = qmp_fds
                    .iter()
                    .zip(&pfds[1 + watched.len()..])
                    .filter(|(_, p)| ready(p))
                    .map(|((_, t), _)| *t)
                    .collect();
                (sig, chans, qmp)
            };
            // Messages first: a child that sent Exit and then exited must not be reported as dead.
            for i in ready_channels {
                if let Some(end) = self.read_messages(i) {
                    return Some(end);
                }
            }
            for token in ready_qmp {
                self.with_qmp(|q, g| q.ready(token, g));
            }
            if sig_ready {
                let (term, chld) = read_signals(&mut self.sfd);
                if let Some(t) = term {
                    return Some(End::Signal(t));
                }
                if chld {
                    // Drain messages sent just before the exit, then look at the exit.
                    for i in 0..self.children.len() {
                        if self.children[i].channel_open {
                            if let Some(end) = self.read_messages(i) {
                                return Some(end);
                            }
                        }
                    }
                    if let Some(end) = self.reap() {
                        return Some(end);
                    }
                    self.flush_events();
                    // Children that are gone for good (restarted ones) leave the list.
                    self.children.retain(|c| c.alive() || c.unit.is_none());
                }
            }
            if self.running {
                self.restart_due();
                self.flush_events();
            }
        }
    }

    /// Stop every child: `Shutdown` to the core first, then to the others, then SIGKILL after the grace
    /// period. Returns when every child has been reaped.
    pub fn shutdown(&mut self) {
        // The VM is ending: no more restarts, and deaths from here on (a chardev leaves once the core is gone)
        // are not news.
        self.running = false;
        let _ = self.reap();
        for wave in [true, false] {
            let mut any = false;
            for c in self.children.iter_mut().filter(|c| c.alive() && (c.role == Role::Core) == wave) {
                c.expected_end = true;
                any = true;
                // A child that closed its channel is on its way out (a chardev flushes first): it gets the same
                // grace period, then SIGKILL like the others.
                if c.role == Role::Block {
                    // tessera-blk takes no messages: SIGTERM makes it flush the image and exit 0.
                    let _ = nix::sys::signal::kill(c.pid, Signal::SIGTERM);
                } else if c.channel_open {
                    let _ = c.control.send(&LauncherToChild::Shutdown, &[]);
                }
            }
            if any {
                self.wait_all(wave, SHUTDOWN_GRACE);
            }
        }
        for c in self.children.iter().filter(|c| c.alive()) {
            let _ = nix::sys::signal::kill(c.pid, Signal::SIGKILL);
        }
        for c in self.children.iter_mut().filter(|c| c.alive()) {
            c.exited = waitpid(c.pid, None).ok();
        }
    }

    /// Wait until every child of the wave (core or not) has exited, or `grace` passed. A second terminating
    /// signal cuts the wait short.
    fn wait_all(&mut self, core_wave: bool, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            let _ = self.reap();
            if !self.children.iter().any(|c| c.alive() && (c.role == Role::Core) == core_wave) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfds = [PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
            let t = PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
            let _ = poll(&mut pfds, t);
            let (term, _) = read_signals(&mut self.sfd);
            if term.is_some() {
                return;
            }
        }
    }

    /// After a failed start: the status of a child that just went away, waiting briefly for it.
    pub fn wait_briefly(pid: Pid) -> Option<WaitStatus> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                Ok(s) => return Some(s),
            }
        }
    }
}

impl Host for Graph {
    fn backend_restart(&mut self, id: &str) -> std::result::Result<(), QmpError> {
        self.qmp_backend_restart(id)
    }

    fn backend_swap(&mut self, id: &str, socket: &str) -> std::result::Result<(), QmpError> {
        self.qmp_backend_swap(id, socket)
    }

    fn backends(&self) -> Value {
        self.qmp_backends()
    }
}

impl Link for Graph {
    fn to_core(&mut self, tag: u64, command: MonitorCommand) -> std::result::Result<(), String> {
        let core = self.children.iter().find(|c| c.role == Role::Core && c.alive() && c.channel_open && c.ready);
        let Some(core) = core else { return Err("the VM is not running yet".into()) };
        core.control
            .send(&LauncherToChild::Monitor { tag, command }, &[])
            .map_err(|e| format!("the core cannot be reached: {e}"))
    }
}

/// QEMU's SHUTDOWN event when the launcher is told to terminate.
pub fn signal_event() -> (String, Option<Value>) {
    ("SHUTDOWN".into(), Some(json!({ "guest": false, "reason": "host-signal" })))
}

/// The error text of an [`End`] that prints one.
pub fn end_message(end: &End) -> Option<String> {
    match end {
        End::Exit(_) => None,
        End::Fatal(m) | End::Failed(m) => Some(m.clone()),
        End::Signal(t) => Some(t.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_death_by_sigsys_names_the_seccomp_filter() {
        let pid = Pid::from_raw(42);
        let text = describe(WaitStatus::Signaled(pid, Signal::SIGSYS, false));
        assert!(text.starts_with("killed by signal 31 (by its sandbox's seccomp filter: "), "{text}");
        assert!(text.contains("seccomp=log"), "{text}");
        assert_eq!(describe(WaitStatus::Signaled(pid, Signal::SIGKILL, false)), "killed by signal 9");
    }
}
