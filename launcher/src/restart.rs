//! Restarting backends while the guest runs (issue #8). A backend process (tessera-chardev, tessera-blk)
//! that dies unexpectedly after the graph is up is started again with the same sandbox options and the same
//! host descriptors (the launcher keeps them: image, terminal, listening sockets, pty, log files), a fresh
//! channel to the core (a new serial socketpair; a fresh listening socket for tessera-blk and a connection to
//! it), and the
//! core is told to reconnect (`SerialReconnect`, `VhostUserReconnect`).
//!
//! Repeated deaths back off ([`backoff`]: 0, 50 ms, 100 ms, ... up to 2 s). A device whose backend died
//! `limit` times in a row (`-tessera-restart-limit N`, default [`DEFAULT_RESTART_LIMIT`]) is reported failed
//! (QMP `X_TESSERA_BACKEND_FAILED` and a log line) and left disconnected; the VM goes on. The streak ends when
//! the backend stays up for [`STABLE_AFTER`] or the core reports the device reconnected. `-tessera-restart-limit
//! 0` turns restarts off: a backend's death ends the VM, as before restarts existed. The core's death always
//! ends the VM, and so does a backend's death by its seccomp filter (SIGSYS: a sandbox violation). See
//! docs/ARCHITECTURE.md "Exit and supervision".

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tessera_ipc::messages::{FdIndex, LauncherToChild, Role, VhostUserSocket};

use crate::plan::{BackendPlan, ChildPlan};
use crate::qmp::commands::QmpError;
use crate::supervise::{describe, Child, Graph, SHUTDOWN_GRACE};

/// Restarts in a row before a device is reported failed, unless `-tessera-restart-limit` says otherwise.
pub const DEFAULT_RESTART_LIMIT: u32 = 10;
/// A backend that lived this long ends its failure streak.
pub const STABLE_AFTER: Duration = Duration::from_secs(5);
/// The longest wait between two restarts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The wait before restart number `streak` of a streak (1 = the first death): 0, 50 ms, 100 ms, 200 ms, ...
pub fn backoff(streak: u32) -> Duration {
    if streak <= 1 {
        return Duration::ZERO;
    }
    let ms = 50u64.saturating_mul(1u64 << (streak - 2).min(16));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

pub enum Kind {
    /// A tessera-chardev; `links[i]` is the position in `plan.fds` of its serial link number i (in the order
    /// of the core's UARTs), which gets a fresh socketpair at each start.
    Chardev { plan: Box<ChildPlan>, links: Vec<usize> },
    /// A vhost-user backend the launcher started (tessera-blk for a `-drive`; tessera-net will be one too):
    /// `listener` is the resource number of its first listening socket; each restart gets a fresh one.
    VhostUser { plan: BackendPlan, listener: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Running,
    /// Dead; restarted at this time.
    Waiting(Instant),
    /// Past the restart limit.
    Failed,
    /// Swapped to an external backend (`x-tessera-backend-swap`): no longer supervised.
    Swapped,
}

pub struct Unit {
    /// The device or chardev id QMP names it by.
    pub id: String,
    pub kind: Kind,
    pub path: PathBuf,
    pub pid: Option<Pid>,
    pub state: State,
    /// Deaths in a row.
    pub streak: u32,
    pub restarts: u32,
    pub started: Instant,
    /// When its backend went away (for the stall), while it is away.
    pub down_since: Option<Instant>,
    /// Last death, for the failure report.
    pub last_death: String,
}

impl Unit {
    pub fn new(id: String, kind: Kind, path: PathBuf, pid: Pid) -> Unit {
        Unit {
            id,
            kind,
            path,
            pid: Some(pid),
            state: State::Running,
            streak: 0,
            restarts: 0,
            started: Instant::now(),
            down_since: None,
            last_death: String::new(),
        }
    }

    fn binary(&self) -> &'static str {
        match &self.kind {
            Kind::Chardev { plan, .. } => plan.binary,
            Kind::VhostUser { plan, .. } => plan.binary,
        }
    }
}

/// The supervised backends and what restarting them needs.
pub struct Backends {
    pub units: Vec<Unit>,
    pub limit: u32,
    /// Host descriptors kept for restarts, by resource number.
    pub kept: Vec<(usize, OwnedFd)>,
    pub sandbox: tessera_policy::SandboxOptions,
    pub detached: bool,
    /// vhost-user devices whose backend the user runs (`-device vhost-user-blk-pci`): swappable only.
    pub external: Vec<String>,
    /// Numbers the listening sockets of restarted vhost-user backends.
    next_socket: u64,
}

impl Backends {
    pub fn new(limit: u32, sandbox: tessera_policy::SandboxOptions, detached: bool) -> Backends {
        Backends { units: Vec::new(), limit, kept: Vec::new(), sandbox, detached, external: Vec::new(), next_socket: 0 }
    }

    fn kept_fd(&self, resource: usize) -> Option<BorrowedFd<'_>> {
        self.kept.iter().find(|(r, _)| *r == resource).map(|(_, fd)| fd.as_fd())
    }

    /// When the next scheduled restart is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.units
            .iter()
            .filter_map(|u| match u.state {
                State::Waiting(at) => Some(at),
                _ => None,
            })
            .min()
    }
}

/// A listening unix socket at a private abstract address (`tessera-<launcher pid>-restart<n>`), nothing on disk.
fn fresh_listener(counter: &mut u64) -> Result<(UnixListener, std::os::unix::net::SocketAddr), String> {
    use std::os::linux::net::SocketAddrExt;
    *counter += 1;
    let name = format!("tessera-{}-restart{counter}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("naming the vhost-user socket: {e}"))?;
    let l = UnixListener::bind_addr(&addr).map_err(|e| format!("binding the vhost-user socket: {e}"))?;
    Ok((l, addr))
}

impl Graph {
    fn unit_index(&self, id: &str) -> Option<usize> {
        self.backends.units.iter().position(|u| u.id == id)
    }

    /// A supervised backend died unexpectedly (`how` says how): report it and schedule its restart, or report
    /// the device failed past the limit.
    pub fn backend_died(&mut self, unit: usize, pid: Pid, how: String) {
        let limit = self.backends.limit;
        let u = &mut self.backends.units[unit];
        if u.pid != Some(pid) {
            return;
        }
        u.pid = None;
        if u.state == State::Swapped {
            // The device is served elsewhere now; this process was on its way out.
            return;
        }
        if u.started.elapsed() >= STABLE_AFTER {
            u.streak = 0;
        }
        u.streak += 1;
        let label = u.binary();
        u.last_death = format!("{label} (pid {pid}) died: {how}");
        let id = u.id.clone();
        let reason = u.last_death.clone();
        let first = u.down_since.is_none();
        if first {
            u.down_since = Some(Instant::now());
        }
        crate::err_line(&format!("tessera: {id}: {label} (pid {pid}) died: {how}"));
        if first {
            self.queue_event("X_TESSERA_BACKEND_DISCONNECTED", json!({ "id": id, "reason": reason }));
        }
        self.schedule_or_fail(unit, limit);
    }

    fn schedule_or_fail(&mut self, unit: usize, limit: u32) {
        let u = &mut self.backends.units[unit];
        if u.streak > limit {
            u.state = State::Failed;
            let (id, streak, last) = (u.id.clone(), u.streak, u.last_death.clone());
            crate::err_line(&format!(
                "tessera: {id}: giving up after {} restarts in a row (-tessera-restart-limit {limit}); \
                 the device stays disconnected; last: {last}",
                streak - 1
            ));
            self.queue_event("X_TESSERA_BACKEND_FAILED", json!({ "id": id, "restarts": streak - 1, "reason": last }));
        } else {
            u.state = State::Waiting(Instant::now() + backoff(u.streak));
        }
    }

    /// Start every backend whose restart is due.
    pub fn restart_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.backends.units.len() {
            if matches!(self.backends.units[i].state, State::Waiting(at) if at <= now) {
                if let Err(why) = self.start_unit(i) {
                    // A start that failed is a death like any other: it counts, and backs off.
                    let limit = self.backends.limit;
                    let u = &mut self.backends.units[i];
                    u.streak += 1;
                    u.last_death = why.clone();
                    crate::err_line(&format!("tessera: {}: restart failed: {why}", u.id));
                    self.schedule_or_fail(i, limit);
                }
            }
        }
    }

    /// Start unit `i`'s backend anew and point the core at it.
    fn start_unit(&mut self, i: usize) -> Result<(), String> {
        let core = self.children.iter().position(|c| c.role == Role::Core && c.exited.is_none() && c.channel_open);
        let Some(core) = core else { return Err("the core is gone".into()) };
        let fresh = match self.backends.units[i].kind {
            Kind::VhostUser { .. } => Some(fresh_listener(&mut self.backends.next_socket)?),
            Kind::Chardev { .. } => None,
        };
        let b = &self.backends;
        let u = &b.units[i];
        match &u.kind {
            Kind::Chardev { plan, links } => {
                let mut core_ends = Vec::new();
                let mut chardev_ends = Vec::new();
                for _ in links {
                    let (a, c) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
                    core_ends.push(OwnedFd::from(a));
                    chardev_ends.push(OwnedFd::from(c));
                }
                let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
                for (pos, &r) in plan.fds.iter().enumerate() {
                    match links.iter().position(|&l| l == pos) {
                        Some(n) => fds.push(chardev_ends[n].as_fd()),
                        None => fds.push(b.kept_fd(r).ok_or_else(|| format!("internal: resource #{r} was not kept"))?),
                    }
                }
                let started =
                    crate::spawn::start(&u.path, plan.binary, b.detached, &b.sandbox).map_err(|e| e.to_string())?;
                let pid = started.pid;
                if let Err(e) = crate::spawn::configure(&started, plan.role, &plan.config, &fds) {
                    return Err(match Graph::wait_briefly(pid) {
                        Some(status) => format!("{} (pid {pid}) died: {}", plan.binary, describe(status)),
                        None => {
                            let _ = kill(pid, Signal::SIGKILL);
                            let _ = waitpid(pid, None);
                            e.to_string()
                        }
                    });
                }
                let mut child = Child::new(plan.role, plan.label.clone(), pid, started.control);
                child.unit = Some(i);
                let id = u.id.clone();
                drop(fds);
                self.children.push(child);
                // One reconnect per UART the chardev serves, in UART order.
                for end in &core_ends {
                    let msg = LauncherToChild::SerialReconnect { chardev_id: id.clone(), channel: FdIndex(0) };
                    self.children[core]
                        .control
                        .send(&msg, &[end.as_fd()])
                        .map_err(|e| format!("telling the core: {e}"))?;
                }
                self.unit_started(i, pid);
            }
            Kind::VhostUser { plan, listener } => {
                // A fresh listening socket for each start (at a new private abstract address): a connection
                // made for a backend that died at once dies with it, instead of waiting in a kept socket's
                // backlog for the next backend to take it first.
                let (fresh, addr) = fresh.ok_or("internal: no listener")?;
                let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
                for &r in &plan.fds {
                    if r == *listener {
                        fds.push(fresh.as_fd());
                    } else {
                        fds.push(b.kept_fd(r).ok_or_else(|| format!("internal: resource #{r} was not kept"))?);
                    }
                }
                let started = crate::spawn::start_plain(&u.path, plan.binary, &plan.args, &fds, b.detached, &b.sandbox)
                    .map_err(|e| e.to_string())?;
                let pid = started.pid;
                let mut child = Child::new(plan.role, plan.label.clone(), pid, started.control);
                child.ready = true;
                child.unit = Some(i);
                let id = u.id.clone();
                drop(fds);
                self.children.push(child);
                // Connected while the launcher still holds the listener too, so that a backend that already died
                // is reported by its exit status (SIGCHLD) rather than by a refused connection; the connection
                // waits in the backlog until the backend accepts it, and is reset if it dies first.
                let stream = UnixStream::connect_addr(&addr).map_err(|e| format!("connecting to tessera-blk: {e}"))?;
                drop(fresh);
                let msg = LauncherToChild::VhostUserReconnect { id, socket: VhostUserSocket::Connected(FdIndex(0)) };
                self.children[core]
                    .control
                    .send(&msg, &[stream.as_fd()])
                    .map_err(|e| format!("telling the core: {e}"))?;
                self.unit_started(i, pid);
            }
        }
        Ok(())
    }

    fn unit_started(&mut self, i: usize, pid: Pid) {
        let u = &mut self.backends.units[i];
        u.pid = Some(pid);
        u.state = State::Running;
        u.started = Instant::now();
        u.restarts += 1;
        crate::err_line(&format!("tessera: {}: restarted {} (pid {pid}, restart {})", u.id, u.binary(), u.restarts));
    }

    /// A chardev that was restarted is serving again (its `Ready`): the device is back.
    pub fn unit_ready(&mut self, i: usize) {
        if matches!(self.backends.units[i].kind, Kind::Chardev { .. }) {
            self.device_reconnected(&self.backends.units[i].id.clone(), None);
        }
    }

    /// The device is served again (the core said so, or its chardev is ready): one RECONNECTED per outage.
    pub fn device_reconnected(&mut self, id: &str, stall_ms: Option<u64>) {
        if let Some(i) = self.unit_index(id) {
            let u = &mut self.backends.units[i];
            u.streak = 0;
            // Once per outage: a chardev's Ready and the core's own report of the same return are one event.
            if let Some(since) = u.down_since.take() {
                let stall = stall_ms.unwrap_or(since.elapsed().as_millis() as u64);
                self.queue_event("X_TESSERA_BACKEND_RECONNECTED", json!({ "id": id, "stall-ms": stall }));
            }
        } else {
            self.queue_event("X_TESSERA_BACKEND_RECONNECTED", json!({ "id": id, "stall-ms": stall_ms.unwrap_or(0) }));
        }
        // A swap finishes here: the launcher's backend of that device is no longer needed.
        self.stop_swapped(id);
    }

    /// The core lost a device's backend (its own report).
    pub fn device_disconnected(&mut self, id: &str, reason: &str) {
        match self.unit_index(id) {
            Some(i) if self.backends.units[i].down_since.is_some() => {}
            Some(i) => {
                self.backends.units[i].down_since = Some(Instant::now());
                self.queue_event("X_TESSERA_BACKEND_DISCONNECTED", json!({ "id": id, "reason": reason }));
            }
            None => self.queue_event("X_TESSERA_BACKEND_DISCONNECTED", json!({ "id": id, "reason": reason })),
        }
    }

    /// Stop unit `i`'s current process in order (its end is expected): `Shutdown` for a chardev (it flushes),
    /// SIGTERM for tessera-blk (it flushes the image); SIGKILL after the grace period. Returns once it is gone.
    fn stop_unit_process(&mut self, i: usize) {
        let Some(pid) = self.backends.units[i].pid.take() else { return };
        let Some(c) = self.children.iter_mut().find(|c| c.pid == pid && c.exited.is_none()) else { return };
        c.expected_end = true;
        if c.role == Role::Chardev && c.channel_open {
            let _ = c.control.send(&LauncherToChild::Shutdown, &[]);
        } else {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        let status = loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Ok(WaitStatus::StillAlive) => {
                    let _ = kill(pid, Signal::SIGKILL);
                    break waitpid(pid, None).ok();
                }
                Ok(s) => break Some(s),
                Err(_) => break None,
            }
        };
        if let Some(c) = self.children.iter_mut().find(|c| c.pid == pid) {
            c.exited = Some(status.unwrap_or(WaitStatus::Exited(pid, -1)));
            c.channel_open = false;
        }
    }

    fn stop_swapped(&mut self, id: &str) {
        if let Some(i) = self.unit_index(id) {
            if self.backends.units[i].state == State::Swapped {
                self.stop_unit_process(i);
                // Nothing restarts it now: its descriptors are let go (the image's with its locks, which live
                // as long as the open file does).
                if let Kind::VhostUser { plan, .. } = &self.backends.units[i].kind {
                    let fds = plan.fds.clone();
                    let used_elsewhere = |r: &usize| {
                        self.backends.units.iter().enumerate().any(|(j, u)| {
                            j != i
                                && match &u.kind {
                                    Kind::VhostUser { plan, .. } => plan.fds.contains(r),
                                    Kind::Chardev { plan, .. } => plan.fds.contains(r),
                                }
                        })
                    };
                    let drop_now: Vec<usize> = fds.into_iter().filter(|r| !used_elsewhere(r)).collect();
                    self.backends.kept.retain(|(r, _)| !drop_now.contains(r));
                }
            }
        }
    }

    fn queue_event(&mut self, name: &str, data: Value) {
        self.events.push((name.to_string(), Some(data)));
    }

    /// `x-tessera-backend-restart`.
    pub fn qmp_backend_restart(&mut self, id: &str) -> Result<(), QmpError> {
        let Some(i) = self.unit_index(id) else {
            if self.backends.external.iter().any(|e| e == id) {
                return Err(QmpError::generic(format!(
                    "the backend of '{id}' was not started by Tessera (-device vhost-user-blk-pci): restart it \
                     yourself, or use x-tessera-backend-swap"
                )));
            }
            return Err(QmpError::device_not_found(id));
        };
        if self.backends.units[i].state == State::Swapped {
            return Err(QmpError::generic(format!("'{id}' was swapped to another backend")));
        }
        let was_up = self.backends.units[i].down_since.is_none();
        self.stop_unit_process(i);
        let u = &mut self.backends.units[i];
        u.down_since.get_or_insert_with(Instant::now);
        u.state = State::Running;
        if was_up {
            self.queue_event(
                "X_TESSERA_BACKEND_DISCONNECTED",
                json!({ "id": id, "reason": "x-tessera-backend-restart" }),
            );
        }
        let u = &mut self.backends.units[i];
        // The operator's restart starts a new streak (a failed device gets its restarts again).
        u.streak = 0;
        self.start_unit(i).map_err(|why| {
            let limit = self.backends.limit;
            let u = &mut self.backends.units[i];
            u.streak += 1;
            u.last_death = why.clone();
            self.schedule_or_fail(i, limit);
            QmpError::generic(format!("restarting the backend of '{id}' failed: {why}"))
        })
    }

    /// `x-tessera-backend-swap`: the launcher connects to `socket` (it opens host resources; a sandboxed core
    /// cannot) and hands the core the stream; the launcher's own backend of the device, if any, is stopped once
    /// the core reports the device reconnected.
    pub fn qmp_backend_swap(&mut self, id: &str, socket: &str) -> Result<(), QmpError> {
        let unit = self.unit_index(id);
        let blk = match unit {
            Some(i) => matches!(self.backends.units[i].kind, Kind::VhostUser { .. }),
            None => self.backends.external.iter().any(|e| e == id),
        };
        if !blk {
            return Err(match unit {
                Some(_) => QmpError::generic(format!("'{id}' is not a vhost-user device; only those can be swapped")),
                None => QmpError::device_not_found(id),
            });
        }
        let stream = UnixStream::connect(socket)
            .map_err(|e| QmpError::generic(format!("Failed to connect to '{socket}': {e}")))?;
        let core = self.children.iter().find(|c| c.role == Role::Core && c.exited.is_none() && c.channel_open);
        let Some(core) = core else { return Err(QmpError::generic("the VM is not running")) };
        let msg =
            LauncherToChild::VhostUserReconnect { id: id.to_string(), socket: VhostUserSocket::Connected(FdIndex(0)) };
        core.control.send(&msg, &[stream.as_fd()]).map_err(|e| QmpError::generic(format!("telling the core: {e}")))?;
        if let Some(i) = unit {
            let u = &mut self.backends.units[i];
            u.state = State::Swapped;
            // The switch is an outage of its own, ended by the core's report.
            u.down_since = Some(Instant::now());
        }
        Ok(())
    }

    /// `x-tessera-query-backends`.
    pub fn qmp_backends(&self) -> Value {
        let mut out: Vec<Value> = self
            .backends
            .units
            .iter()
            .map(|u| {
                let state = match u.state {
                    State::Running if u.pid.is_some() => "running",
                    State::Running | State::Waiting(_) => "restarting",
                    State::Failed => "failed",
                    State::Swapped => "swapped",
                };
                json!({
                    "id": u.id,
                    "binary": u.binary(),
                    "pid": u.pid.map(|p| p.as_raw()),
                    "state": state,
                    "restarts": u.restarts,
                })
            })
            .collect();
        out.extend(
            self.backends
                .external
                .iter()
                .map(|id| json!({ "id": id, "binary": null, "pid": null, "state": "external", "restarts": 0 })),
        );
        Value::Array(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_50ms_and_is_capped() {
        let ms: Vec<u128> = (1..=9).map(|s| backoff(s).as_millis()).collect();
        assert_eq!(ms, vec![0, 50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
