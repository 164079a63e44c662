//! Serving QMP: each monitor listens on its socket and serves one client at a time (as QEMU's socket chardev
//! does: the next client waits in the backlog until the current one leaves). A client gets the greeting, must
//! negotiate with `qmp_capabilities`, then sends commands; replies go out in the order of the commands (a
//! command forwarded to the core holds the client's later input until the core answers), and events go to
//! every client in command mode. Output lines end in "\r\n", as QEMU's monitor writes them.
//!
//! Writes are blocking with a timeout ([`WRITE_TIMEOUT`]): a client that does not read its replies is
//! dropped rather than allowed to stall the launcher's supervision loop for long.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tessera_ipc::messages::{MonitorCommand, MonitorEvent, MonitorValue};

use super::commands::{self, Host, QmpError, Reply, Request};
use super::json::{Piece, Splitter};
use super::MonitorSpec;
use crate::config::SocketAddr;
use crate::error::{os_error, Error, Result};

/// How long a write to a client may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }
}

struct Client {
    stream: Stream,
    /// Which client of its monitor this is (replies from the core for an earlier client are dropped).
    serial: u64,
    splitter: Splitter,
    negotiated: bool,
    /// A command forwarded to the core, by tag: later input waits until it is answered.
    busy: Option<u64>,
    queue: VecDeque<Piece>,
}

struct Monitor {
    spec: MonitorSpec,
    listener: Listener,
    client: Option<Client>,
    clients: u64,
}

struct Pending {
    tag: u64,
    monitor: usize,
    client: u64,
    id: Option<Value>,
}

/// A descriptor to poll and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    Listener(usize),
    Client(usize),
}

/// Everything the monitors need from the rest of the launcher while they serve a client.
pub trait Link: Host {
    /// Send a guest-facing command to the core; `Err` says why it cannot be.
    fn to_core(&mut self, tag: u64, command: MonitorCommand) -> std::result::Result<(), String>;
}

#[derive(Default)]
pub struct Server {
    monitors: Vec<Monitor>,
    pending: Vec<Pending>,
    next_tag: u64,
    /// `quit` was executed: the graph ends (status 0).
    pub quit: bool,
}

/// QEMU's event timestamp: wall-clock seconds and microseconds (qmp-spec §2.5).
fn timestamp() -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    json!({ "seconds": now.as_secs(), "microseconds": now.subsec_micros() })
}

/// QEMU's compact JSON (qobject/qjson.c): `{"return": {}, "id": 1}`, a space after each `:` and `,`.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

pub fn to_qemu_json(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    if serde::Serialize::serialize(v, &mut ser).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

fn error_value(e: &QmpError) -> Value {
    json!({ "class": e.class, "desc": e.desc })
}

fn bind(addr: &SocketAddr) -> Result<Listener> {
    match addr {
        SocketAddr::Unix(path) => {
            // QEMU replaces a stale socket left by an earlier run.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            UnixListener::bind(path)
                .map(Listener::Unix)
                .map_err(|e| Error::BindUnix { path: path.clone(), source: os_error(e) })
        }
        SocketAddr::Tcp { host, port } => {
            let host = if host.is_empty() { "0.0.0.0" } else { host.as_str() };
            let port_num: u16 = port.parse().map_err(|_| Error::Resolve {
                host: host.to_string(),
                port: port.clone(),
                reason: "the port is not a number from 0 to 65535".into(),
            })?;
            TcpListener::bind((host, port_num)).map(Listener::Tcp).map_err(|e| Error::BindInet(os_error(e)))
        }
    }
}

impl Server {
    /// Bind every monitor's socket. With `wait=on` (QEMU's default for a server), the first client is accepted
    /// here, before the guest starts, as QEMU does; `interrupt` may cut that wait short.
    pub fn open(specs: &[MonitorSpec], prog: &str, interrupt: &mut dyn FnMut() -> Result<()>) -> Result<Server> {
        let mut server = Server::default();
        for spec in specs {
            let listener = bind(&spec.socket.addr).map_err(|e| e.at(spec.location.clone()))?;
            let set_nb = match &listener {
                Listener::Unix(l) => l.set_nonblocking(true),
                Listener::Tcp(l) => l.set_nonblocking(true),
            };
            set_nb.map_err(|e| Error::host("fcntl", os_error(e)))?;
            server.monitors.push(Monitor { spec: spec.clone(), listener, client: None, clients: 0 });
        }
        for i in 0..server.monitors.len() {
            if !server.monitors[i].spec.socket.wait {
                continue;
            }
            let m = &server.monitors[i];
            let shown = match (&m.spec.socket.addr, &m.listener) {
                (_, Listener::Tcp(l)) => {
                    format!("disconnected:tcp:{},server=on", l.local_addr().map(|a| a.to_string()).unwrap_or_default())
                }
                (a, _) => format!("disconnected:unix:{a},server=on"),
            };
            crate::err_line(&format!("{prog}: {}: info: QEMU waiting for connection on: {shown}", m.spec.location));
            loop {
                interrupt()?;
                let mut p = [nix::poll::PollFd::new(server.listener_fd(i), nix::poll::PollFlags::POLLIN)];
                if let Ok(n) = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(1000u16)) {
                    if n > 0 {
                        server.accept(i);
                        if server.monitors[i].client.is_some() {
                            break;
                        }
                    }
                }
            }
        }
        Ok(server)
    }

    pub fn is_empty(&self) -> bool {
        self.monitors.is_empty()
    }

    fn listener_fd(&self, i: usize) -> BorrowedFd<'_> {
        match &self.monitors[i].listener {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }

    /// The descriptors to poll for input: a monitor's listener while it has no client, else its client, unless
    /// that client waits for the core (its further input stays in the socket: what is queued is bounded by one
    /// read, as QEMU bounds its request queue).
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, Token)> {
        (0..self.monitors.len())
            .filter_map(|i| match &self.monitors[i].client {
                Some(c) if c.busy.is_some() => None,
                Some(c) => Some((c.stream.as_fd(), Token::Client(i))),
                None => Some((self.listener_fd(i), Token::Listener(i))),
            })
            .collect()
    }

    fn accept(&mut self, i: usize) {
        let m = &mut self.monitors[i];
        let stream = match &m.listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
        };
        let Ok(stream) = stream else { return };
        // Accepted sockets do not inherit O_NONBLOCK on Linux; reads happen only after poll said so.
        let timeout = match &stream {
            Stream::Unix(s) => s.set_write_timeout(Some(WRITE_TIMEOUT)),
            Stream::Tcp(s) => s.set_write_timeout(Some(WRITE_TIMEOUT)),
        };
        if timeout.is_err() {
            return;
        }
        m.clients += 1;
        m.client = Some(Client {
            stream,
            serial: m.clients,
            splitter: Splitter::new(),
            negotiated: false,
            busy: None,
            queue: VecDeque::new(),
        });
        // qmp-spec §2.2: the greeting. No capability is offered (no out-of-band execution yet).
        let greeting = json!({ "QMP": { "version": commands::version(), "capabilities": [] } });
        self.send(i, &greeting);
    }

    /// Write one JSON message to monitor `i`'s client; a failed write drops the client.
    fn send(&mut self, i: usize, v: &Value) {
        let m = &mut self.monitors[i];
        let Some(c) = &mut m.client else { return };
        let text = if m.spec.pretty { serde_json::to_string_pretty(v).unwrap_or_default() } else { to_qemu_json(v) };
        let mut text = text;
        text.push('\n');
        let text = text.replace('\n', "\r\n");
        if c.stream.write_all(text.as_bytes()).is_err() {
            m.client = None;
        }
    }

    fn respond(&mut self, i: usize, id: Option<Value>, result: std::result::Result<Value, QmpError>) {
        let mut obj = Map::new();
        match result {
            Ok(v) => {
                obj.insert("return".into(), v);
            }
            Err(e) => {
                obj.insert("error".into(), error_value(&e));
            }
        }
        if let Some(id) = id {
            obj.insert("id".into(), id);
        }
        self.send(i, &Value::Object(obj));
    }

    /// Send an event to every client in command mode.
    pub fn event(&mut self, name: &str, data: Option<Value>) {
        let mut obj = Map::new();
        obj.insert("timestamp".into(), timestamp());
        obj.insert("event".into(), Value::String(name.into()));
        if let Some(d) = data {
            obj.insert("data".into(), d);
        }
        let v = Value::Object(obj);
        for i in 0..self.monitors.len() {
            if self.monitors[i].client.as_ref().is_some_and(|c| c.negotiated) {
                self.send(i, &v);
            }
        }
    }

    /// A run-state event from the core, as QEMU names it (qapi/run-state.json).
    pub fn core_event(&mut self, e: &MonitorEvent) {
        match e {
            MonitorEvent::Stop => self.event("STOP", None),
            MonitorEvent::Resume => self.event("RESUME", None),
            MonitorEvent::Powerdown => self.event("POWERDOWN", None),
            MonitorEvent::Reset { guest, reason } => {
                self.event("RESET", Some(json!({ "guest": guest, "reason": reason })))
            }
            MonitorEvent::Shutdown { guest, reason } => {
                self.event("SHUTDOWN", Some(json!({ "guest": guest, "reason": reason })))
            }
        }
    }

    /// The core answered a forwarded command.
    pub fn core_reply(&mut self, tag: u64, result: std::result::Result<MonitorValue, String>, link: &mut dyn Link) {
        let Some(p) = self.pending.iter().position(|p| p.tag == tag) else { return };
        let p = self.pending.swap_remove(p);
        let current = self.monitors[p.monitor].client.as_ref().is_some_and(|c| c.serial == p.client);
        if !current {
            return;
        }
        let result = match result {
            Ok(MonitorValue::Empty) => Ok(json!({})),
            // QEMU 8.2's StatusInfo still carries the deprecated `singlestep` member.
            Ok(MonitorValue::Status { running, status }) => {
                Ok(json!({ "status": status, "singlestep": false, "running": running }))
            }
            Err(desc) => Err(QmpError::generic(desc)),
        };
        self.respond(p.monitor, p.id, result);
        if let Some(c) = &mut self.monitors[p.monitor].client {
            c.busy = None;
        }
        self.pump(p.monitor, link);
    }

    /// The core is gone: every forwarded command fails, so that no client waits forever.
    pub fn core_gone(&mut self, link: &mut dyn Link) {
        for p in std::mem::take(&mut self.pending) {
            if self.monitors[p.monitor].client.as_ref().is_some_and(|c| c.serial == p.client) {
                self.respond(p.monitor, p.id, Err(QmpError::generic("the VM is shutting down")));
                if let Some(c) = &mut self.monitors[p.monitor].client {
                    c.busy = None;
                }
                self.pump(p.monitor, link);
            }
        }
    }

    /// Something happened on a polled descriptor.
    pub fn ready(&mut self, token: Token, link: &mut dyn Link) {
        match token {
            Token::Listener(i) => self.accept(i),
            Token::Client(i) => {
                let mut buf = [0u8; 16 * 1024];
                let Some(c) = &mut self.monitors[i].client else { return };
                match c.stream.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // The client left: the next one may connect (QEMU serves clients one after another).
                        self.monitors[i].client = None;
                    }
                    Ok(n) => {
                        let pieces = c.splitter.feed(&buf[..n]);
                        c.queue.extend(pieces);
                        self.pump(i, link);
                    }
                }
            }
        }
    }

    /// Handle queued input of monitor `i`'s client until it waits for the core or runs out.
    fn pump(&mut self, i: usize, link: &mut dyn Link) {
        loop {
            let Some(c) = &mut self.monitors[i].client else { return };
            if c.busy.is_some() || self.quit {
                return;
            }
            let Some(piece) = c.queue.pop_front() else { return };
            let negotiated = c.negotiated;
            let serial = c.serial;
            let value = match piece {
                Piece::Error(e) => {
                    self.respond(i, None, Err(QmpError::generic(e)));
                    continue;
                }
                Piece::Value(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(v) => v,
                    Err(e) => {
                        self.respond(i, None, Err(QmpError::generic(format!("JSON parse error, {e}"))));
                        continue;
                    }
                },
            };
            let (id, name, args) = match commands::parse_request(value) {
                Request::Invalid { id, error } => {
                    self.respond(i, id, Err(error));
                    continue;
                }
                Request::Command { id, name, args } => (id, name, args),
            };
            if !negotiated {
                // qmp-spec §2.3: capabilities negotiation mode accepts only qmp_capabilities.
                if name != "qmp_capabilities" {
                    let e = QmpError::command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'");
                    self.respond(i, id, Err(e));
                    continue;
                }
                let result = commands::negotiate(&args);
                if result.is_ok() {
                    if let Some(c) = &mut self.monitors[i].client {
                        c.negotiated = true;
                    }
                }
                self.respond(i, id, result.map(|()| json!({})));
                continue;
            }
            let Some(def) = commands::find(&name) else {
                let e = QmpError::command_not_found(format!("The command {name} has not been found"));
                self.respond(i, id, Err(e));
                continue;
            };
            if let Err(e) = commands::check_args(def, &args) {
                self.respond(i, id, Err(e));
                continue;
            }
            match (def.run)(link, &args) {
                Reply::Return(v) => self.respond(i, id, Ok(v)),
                Reply::Error(e) => self.respond(i, id, Err(e)),
                Reply::Quit => {
                    // QEMU sends SHUTDOWN before the return of `quit`, then the VM ends.
                    self.event("SHUTDOWN", Some(json!({ "guest": false, "reason": "host-qmp-quit" })));
                    self.respond(i, id, Ok(json!({})));
                    self.quit = true;
                }
                Reply::Core(cmd) => {
                    self.next_tag += 1;
                    let tag = self.next_tag;
                    match link.to_core(tag, cmd) {
                        Ok(()) => {
                            self.pending.push(Pending { tag, monitor: i, client: serial, id });
                            if let Some(c) = &mut self.monitors[i].client {
                                c.busy = Some(tag);
                            }
                        }
                        Err(why) => self.respond(i, id, Err(QmpError::generic(why))),
                    }
                }
            }
        }
    }

    /// Remove the unix sockets the monitors created (QEMU unlinks them at exit).
    pub fn close(&mut self) {
        for m in self.monitors.drain(..) {
            if let SocketAddr::Unix(path) = &m.spec.socket.addr {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
