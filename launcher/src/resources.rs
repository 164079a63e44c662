//! Opening the host resources a [`Plan`] lists, in its order, with QEMU's messages when one cannot be opened.
//! Every descriptor is close-on-exec: a child gets exactly the ones attached to its `Configure`.

use std::fs::{File, OpenOptions};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tessera_ipc::messages::{Accel, ChardevBackend, ChildConfig, FdIndex};

use crate::config::{AccelKind, SocketAddr};
use crate::error::{os_error, Error, Result};
use crate::plan::{Plan, Resource};

/// The opened descriptors, indexed like `Plan::resources`.
pub struct Opened {
    fds: Vec<OwnedFd>,
    /// Slave paths of the ptys, by resource number.
    pty_paths: Vec<(usize, String)>,
}

impl Opened {
    pub fn fd(&self, resource: usize) -> BorrowedFd<'_> {
        self.fds[resource].as_fd()
    }

    pub fn pty_path(&self, resource: usize) -> Option<&str> {
        self.pty_paths.iter().find(|(r, _)| *r == resource).map(|(_, p)| p.as_str())
    }
}

/// Called while the launcher blocks (waiting for a socket client): returns an error to give up, e.g. because a
/// terminating signal arrived.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> Result<()>;

/// The accelerator that initialised, and for KVM the device descriptor the probe opened: the core gets it in
/// its `Configure` (`CoreConfig::kvm`), because a sandboxed core cannot open `/dev/kvm` by path.
pub struct SelectedAccel {
    pub kind: AccelKind,
    pub kvm_device: Option<OwnedFd>,
}

/// Probe the accelerators in order, as QEMU's `configure_accelerators`: the first that initialises wins;
/// each failure is reported, and a fallback announced.
pub fn select_accel(candidates: &[AccelKind], kvm_device: &str, prog: &str) -> Result<SelectedAccel> {
    let mut failed = false;
    for (i, a) in candidates.iter().enumerate() {
        match a {
            AccelKind::Tcg => {
                if failed {
                    crate::err_line(&format!("{prog}: falling back to tcg"));
                }
                return Ok(SelectedAccel { kind: AccelKind::Tcg, kvm_device: None });
            }
            AccelKind::Kvm => match probe_kvm(kvm_device) {
                Ok(fd) => {
                    if failed {
                        crate::err_line(&format!("{prog}: falling back to kvm"));
                    }
                    return Ok(SelectedAccel { kind: AccelKind::Kvm, kvm_device: Some(fd) });
                }
                Err(e) if i + 1 == candidates.len() => return Err(e),
                Err(e) => {
                    crate::err_line(&e.render(prog));
                    failed = true;
                }
            },
        }
    }
    // `config` always lists at least one accelerator.
    Ok(SelectedAccel { kind: AccelKind::Tcg, kvm_device: None })
}

/// KVM is usable when its device opens read-write (QEMU's kvm_init does exactly this first). The descriptor
/// is kept for the core.
pub fn probe_kvm(device: &str) -> Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)
        .map(OwnedFd::from)
        .map_err(|e| Error::KvmUnavailable(os_error(e)))
}

/// Open every resource of `plan`, in order.
pub fn open_all(plan: &Plan, prog: &str, interrupt: Interrupt<'_>) -> Result<Opened> {
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(plan.resources.len());
    let mut pty_paths = Vec::new();
    // The other end of each serial link, until its owner comes up in the list.
    let mut pending_links: Vec<(usize, OwnedFd)> = Vec::new();
    for (index, r) in plan.resources.iter().enumerate() {
        let fd: OwnedFd = match r {
            // QEMU starts the log afresh ("w"); every process appends to the shared descriptor.
            Resource::LogFile(path) => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_APPEND | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| Error::LogFile { path: path.clone(), source: os_error(e) })?
                .into(),
            Resource::Stdin => dup(std::io::stdin().as_fd())?,
            Resource::Stdout => dup(std::io::stdout().as_fd())?,
            Resource::OutputFile { path, append, location } => {
                let mut o = OpenOptions::new();
                o.write(true).create(true);
                if *append {
                    o.append(true);
                } else {
                    o.truncate(true);
                }
                o.open(path)
                    .map_err(|e| Error::CouldNotOpen { path: path.clone(), source: os_error(e) }.at(location.clone()))?
                    .into()
            }
            Resource::ChardevLog { path, append, location } => {
                let mut o = OpenOptions::new();
                o.write(true).create(true);
                if *append {
                    o.append(true);
                } else {
                    o.truncate(true);
                }
                o.open(path)
                    .map_err(|e| {
                        Error::CouldNotCreate { path: path.clone(), source: os_error(e) }.at(location.clone())
                    })?
                    .into()
            }
            Resource::Listener { addr, telnet: _, location } => listen(addr).map_err(|e| e.at(location.clone()))?,
            Resource::Accepted { listener, location } => {
                let Resource::Listener { addr, telnet, .. } = &plan.resources[*listener] else {
                    return Err(Error::Message(format!("internal: resource #{listener} is not a listener")));
                };
                let l = fds[*listener].as_fd();
                let shown = describe_listener(addr, *telnet, l);
                crate::err_line(&format!("{prog}: {location}: info: QEMU waiting for connection on: {shown}"));
                accept(l, interrupt).map_err(|e| match e {
                    Error::Host { op: "accept", source } => {
                        Error::Accept { target: addr.to_string(), source }.at(location.clone())
                    }
                    e => e,
                })?
            }
            Resource::Connect { addr, location } => connect(addr).map_err(|e| e.at(location.clone()))?,
            Resource::PtyMaster { label } => {
                let (master, path) = open_pty()?;
                // QEMU prints this on stdout, unprefixed; tools read the path from it.
                crate::out(&format!("char device redirected to {path} (label {label})\n"));
                pty_paths.push((index, path));
                master
            }
            Resource::SerialCore(link) | Resource::SerialChardev(link) => {
                match pending_links.iter().position(|(l, _)| l == link) {
                    Some(p) => pending_links.swap_remove(p).1,
                    None => {
                        let (a, b) = UnixStream::pair().map_err(|e| Error::host("socketpair", os_error(e)))?;
                        pending_links.push((*link, b.into()));
                        a.into()
                    }
                }
            }
            Resource::Image { path, read_only, location } => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map(OwnedFd::from)
                // QEMU block/file-posix.c wording.
                .map_err(|e| {
                    Error::Message(format!("Could not open '{path}': {}", crate::error::strerror(&os_error(e))))
                        .at(location.clone())
                })?,
            Resource::BlkListener(n) => UnixListener::bind_addr(&blk_socket_addr(*n)?)
                .map(OwnedFd::from)
                .map_err(|e| Error::host("binding the vhost-user socket of tessera-blk", os_error(e)))?,
            Resource::BlkConnect(n) => UnixStream::connect_addr(&blk_socket_addr(*n)?)
                .map(OwnedFd::from)
                .map_err(|e| Error::host("connecting to the vhost-user socket of tessera-blk", os_error(e)))?,
            Resource::NetListener(n) => UnixListener::bind_addr(&crate::net::socket_addr(*n)?)
                .map(OwnedFd::from)
                .map_err(|e| Error::host("binding the vhost-user socket of tessera-net", os_error(e)))?,
            Resource::NetConnect(n) => UnixStream::connect_addr(&crate::net::socket_addr(*n)?)
                .map(OwnedFd::from)
                .map_err(|e| Error::host("connecting to the vhost-user socket of tessera-net", os_error(e)))?,
            Resource::Tap { ifname, location } => {
                crate::net::open_tap(ifname.as_deref()).map_err(|e| e.at(location.clone()))?
            }
            Resource::Kernel(path) => {
                let f = File::open(path).map_err(|e| Error::KernelOpen { path: path.clone(), source: os_error(e) })?;
                if f.metadata().is_ok_and(|m| m.is_dir()) {
                    let source = os_error(std::io::Error::from_raw_os_error(libc::EISDIR));
                    return Err(Error::KernelRead { path: path.clone(), source });
                }
                f.into()
            }
            Resource::Initrd(path) => {
                let f = File::open(path).map_err(|e| Error::InitrdOpen { path: path.clone(), source: os_error(e) })?;
                if f.metadata().is_ok_and(|m| m.is_dir()) {
                    let source = os_error(std::io::Error::from_raw_os_error(libc::EISDIR));
                    return Err(Error::InitrdOpen { path: path.clone(), source });
                }
                f.into()
            }
        };
        fds.push(fd);
    }
    Ok(Opened { fds, pty_paths })
}

/// Fill in what only opening told: the pty paths and the accelerator that initialised.
/// The core's `/dev/kvm`, when KVM initialised, is attached after its planned descriptors (`fds`): see
/// [`child_fds`].
pub fn finish_config(config: &mut ChildConfig, fds: &[usize], opened: &Opened, accel: &SelectedAccel) {
    match config {
        ChildConfig::Core(core) => {
            core.accel = match accel.kind {
                AccelKind::Kvm => Accel::Kvm,
                AccelKind::Tcg => Accel::Tcg,
            };
            core.kvm = accel.kvm_device.as_ref().map(|_| FdIndex(fds.len() as u32));
        }
        ChildConfig::Chardev(c) => {
            if let ChardevBackend::Pty { master, path } = &mut c.backend {
                if let Some(p) = fds.get(master.0 as usize).and_then(|r| opened.pty_path(*r)) {
                    *path = p.to_string();
                }
            }
        }
    }
}

/// The descriptors to attach to a child's `Configure`, in `FdIndex` order: its planned resources, then (core
/// only) the `/dev/kvm` descriptor [`finish_config`] named.
pub fn child_fds<'a>(
    fds: &[usize],
    opened: &'a Opened,
    is_core: bool,
    accel: &'a SelectedAccel,
) -> Vec<BorrowedFd<'a>> {
    let mut out: Vec<BorrowedFd<'a>> = fds.iter().map(|&r| opened.fd(r)).collect();
    if is_core {
        if let Some(kvm) = &accel.kvm_device {
            out.push(kvm.as_fd());
        }
    }
    out
}

/// The abstract unix address of tessera-blk number `n`: private to this launcher (its pid), nothing on disk.
fn blk_socket_addr(n: usize) -> Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("tessera-{}-blk{n}", std::process::id());
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| Error::host("naming the vhost-user socket of tessera-blk", os_error(e)))
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(|e| Error::host("dup", os_error(e)))
}

fn tcp_addrs(host: &str, port: &str, passive: bool) -> Result<Vec<std::net::SocketAddr>> {
    let host = if host.is_empty() && passive {
        "0.0.0.0"
    } else if host.is_empty() {
        "localhost"
    } else {
        host
    };
    let fail = |reason: String| Error::Resolve { host: host.to_string(), port: port.to_string(), reason };
    let port_num: u16 = port.parse().map_err(|_| fail("the port is not a number from 0 to 65535".into()))?;
    let addrs: Vec<_> = (host, port_num).to_socket_addrs().map_err(|e| fail(e.to_string()))?.collect();
    if addrs.is_empty() {
        return Err(fail("no address".into()));
    }
    Ok(addrs)
}

fn listen(addr: &SocketAddr) -> Result<OwnedFd> {
    match addr {
        SocketAddr::Unix(path) => {
            // QEMU replaces a stale socket left by an earlier run.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let l =
                UnixListener::bind(path).map_err(|e| Error::BindUnix { path: path.clone(), source: os_error(e) })?;
            Ok(l.into())
        }
        SocketAddr::Tcp { host, port } => {
            let addrs = tcp_addrs(host, port, true)?;
            let l = TcpListener::bind(&addrs[..]).map_err(|e| Error::BindInet(os_error(e)))?;
            Ok(l.into())
        }
    }
}

/// QEMU's description of a listening chardev: `disconnected:unix:/path,server=on`,
/// `disconnected:tcp:0.0.0.0:4444,server=on`.
fn describe_listener(addr: &SocketAddr, telnet: bool, fd: BorrowedFd<'_>) -> String {
    match addr {
        SocketAddr::Unix(path) => format!("disconnected:unix:{path},server=on"),
        SocketAddr::Tcp { host, port } => {
            let bound = fd
                .try_clone_to_owned()
                .ok()
                .and_then(|fd| TcpListener::from(fd).local_addr().ok())
                .map(|a| a.to_string())
                .unwrap_or_else(|| format!("{host}:{port}"));
            let kind = if telnet { "telnet" } else { "tcp" };
            format!("disconnected:{kind}:{bound},server=on")
        }
    }
}

/// Wait for and accept the first client, giving `interrupt` a chance to stop the wait once a second.
fn accept(listener: BorrowedFd<'_>, interrupt: Interrupt<'_>) -> Result<OwnedFd> {
    loop {
        interrupt()?;
        let mut p = [PollFd::new(listener, PollFlags::POLLIN)];
        match poll(&mut p, PollTimeout::from(1000u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => break,
            Err(e) => return Err(Error::host("accept", os_error(e))),
        }
    }
    let fd = nix::sys::socket::accept4(listener.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC)
        .map_err(|e| Error::host("accept", os_error(e)))?;
    // SAFETY: accept4 just returned this new descriptor; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn connect(addr: &SocketAddr) -> Result<OwnedFd> {
    match addr {
        SocketAddr::Unix(path) => UnixStream::connect(path)
            .map(OwnedFd::from)
            .map_err(|e| Error::Connect { target: path.clone(), source: os_error(e) }),
        SocketAddr::Tcp { host, port } => {
            let addrs = tcp_addrs(host, port, false)?;
            TcpStream::connect(&addrs[..])
                .map(OwnedFd::from)
                .map_err(|e| Error::Connect { target: format!("{host}:{port}"), source: os_error(e) })
        }
    }
}

fn open_pty() -> Result<(OwnedFd, String)> {
    let err = |e: nix::errno::Errno| Error::Pty(os_error(e));
    // O_NOCTTY: the pty must never become the launcher's controlling terminal (it may be a session leader
    // after -daemonize).
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(err)?;
    nix::pty::grantpt(&master).map_err(err)?;
    nix::pty::unlockpt(&master).map_err(err)?;
    let path = nix::pty::ptsname_r(&master).map_err(err)?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(master);
    // SAFETY: `into_raw_fd` gave up ownership of this open descriptor; it is owned here from now on.
    Ok((unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_probe_failure_reads_like_qemu() {
        let e = probe_kvm("/nonexistent/kvm").unwrap_err();
        assert_eq!(
            e.render("qemu-system-x86_64"),
            "Could not access KVM kernel module: No such file or directory\n\
             qemu-system-x86_64: failed to initialize kvm: No such file or directory"
        );
        // With a fallback the same failure is only a warning.
        let fallback = select_accel(&[AccelKind::Kvm, AccelKind::Tcg], "/nonexistent/kvm", "t").unwrap();
        assert_eq!(fallback.kind, AccelKind::Tcg);
        assert!(fallback.kvm_device.is_none());
        assert!(select_accel(&[AccelKind::Kvm], "/nonexistent/kvm", "t").is_err());
    }
}
