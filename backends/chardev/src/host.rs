//! The host side of a chardev: where guest output goes and user input comes from.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{shutdown, Shutdown};

use crate::telnet::TelnetFilter;

/// A readable host descriptor (the output side, when it is the same descriptor, is in the writer).
pub struct Conn {
    pub fd: Arc<OwnedFd>,
    pub telnet: Option<TelnetFilter>,
}

impl Conn {
    pub fn new(fd: Arc<OwnedFd>) -> Self {
        Self { fd, telnet: None }
    }

    /// Shut a socket down both ways so a writer thread blocked on it returns at once (the descriptor itself
    /// closes when its last reference goes).
    pub fn hang_up(&self) {
        let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&self.fd.as_fd()), Shutdown::Both);
    }
}

pub enum Host {
    /// `null`: output discarded, no input.
    Null,
    /// `stdio`, `file`: the output descriptor is fixed; input, if any, is read until EOF.
    Stream { input: Option<Conn> },
    /// `socket,server=on`: one client at a time; after it leaves the next is accepted.
    Server { listener: OwnedFd, client: Option<Conn>, telnet: bool },
    /// `socket,server=off`: the connection the launcher made; once closed, output is dropped.
    Client { conn: Option<Conn> },
    /// `pty`: the master side; nobody may have the slave open yet, or any more.
    Pty { master: Arc<OwnedFd>, connected: bool, path: String },
}
