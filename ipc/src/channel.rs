//! A framed, fd-passing channel over a `SOCK_STREAM` unix socket.
//!
//! Frames are written whole under a lock, so several threads may send on one channel. File descriptors are
//! attached (SCM_RIGHTS) to the first bytes of their frame; the receiver queues every descriptor it gets and
//! hands each frame the number its header announces. After any receive error other than
//! [`IpcError::WouldBlock`] the byte stream can no longer be trusted: drop the channel.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Serialize};

use crate::frame::{self, FrameError, HEADER_LEN, MAX_FDS};
use crate::messages::{Hello, Role};
use crate::PROTOCOL_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("IPC {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the peer closed the IPC channel")]
    Closed,
    #[error("the peer closed the IPC channel in the middle of a frame ({have} bytes buffered)")]
    Truncated { have: usize },
    #[error("an IPC frame announces {expected} file descriptors but only {got} arrived")]
    MissingFds { expected: usize, got: usize },
    #[error("file descriptors sent over IPC were lost (control message truncated)")]
    FdsTruncated,
    #[error("IPC handshake with {expected} failed: {reason}")]
    Handshake { expected: Role, reason: String },
    /// Only from [`Channel::try_recv`] on a non-blocking socket: no whole frame is available yet.
    #[error("no complete IPC frame available yet")]
    WouldBlock,
}

impl IpcError {
    fn io(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        IpcError::Io { op, source: e.into() }
    }
}

#[derive(Default)]
struct RxState {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

pub struct Channel {
    sock: UnixStream,
    send_lock: Mutex<()>,
    rx: Mutex<RxState>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("fd", &self.sock.as_raw_fd()).finish()
    }
}

/// Bytes read per `recvmsg`.
const READ_CHUNK: usize = 64 * 1024;

impl Channel {
    pub fn new(sock: UnixStream) -> Self {
        Self { sock, send_lock: Mutex::new(()), rx: Mutex::new(RxState::default()) }
    }

    /// Wrap an inherited or received descriptor (it must be a connected `SOCK_STREAM` unix socket).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self::new(UnixStream::from(fd))
    }

    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> Result<(Channel, Channel), IpcError> {
        let (a, b) = UnixStream::pair().map_err(|e| IpcError::io("socketpair", e))?;
        Ok((Channel::new(a), Channel::new(b)))
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    pub fn into_socket(self) -> UnixStream {
        self.sock
    }

    pub fn set_nonblocking(&self, on: bool) -> Result<(), IpcError> {
        self.sock.set_nonblocking(on).map_err(|e| IpcError::io("set_nonblocking", e))
    }

    /// Send one message with `fds` attached. Blocks until the whole frame is written, even on a
    /// non-blocking socket (it waits for room with poll).
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let bytes = frame::encode(msg, fds.len())?;
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _guard = self.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = 0;
        while sent < bytes.len() {
            let iov = [IoSlice::new(&bytes[sent..])];
            let rights = [ControlMessage::ScmRights(&raw)];
            // Descriptors travel with the first chunk only.
            let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() { &rights } else { &[] };
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT)?,
                Err(e) => return Err(IpcError::io("send", e)),
            }
        }
        Ok(())
    }

    fn wait(&self, events: PollFlags) -> Result<(), IpcError> {
        let mut fds = [PollFd::new(self.sock.as_fd(), events)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(IpcError::io("poll", e)),
        }
    }

    /// Receive one message and the descriptors that came with it, blocking until a whole frame is there
    /// (on a non-blocking socket this waits with poll).
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        loop {
            match self.try_recv() {
                Err(IpcError::WouldBlock) => self.wait(PollFlags::POLLIN)?,
                other => return other,
            }
        }
    }

    /// Receive one message if a whole frame is buffered or can be read without blocking. On a blocking socket
    /// this behaves like [`Channel::recv`]; on a non-blocking one it returns [`IpcError::WouldBlock`] when the
    /// frame is not complete yet (the bytes read so far stay buffered).
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = frame::decode::<T>(&rx.buf)? {
                if rx.fds.len() < d.fds {
                    // The descriptors of a frame arrive with its first byte, so they are here if the frame is.
                    return Err(IpcError::MissingFds { expected: d.fds, got: rx.fds.len() });
                }
                rx.buf.drain(..d.consumed);
                let fds = rx.fds.drain(..d.fds).collect();
                return Ok((d.msg, fds));
            }
            match self.read_some(&mut rx)? {
                0 if rx.buf.is_empty() => return Err(IpcError::Closed),
                0 => return Err(IpcError::Truncated { have: rx.buf.len() }),
                _ => {}
            }
        }
    }

    /// True when bytes of a frame are buffered but the frame is incomplete (useful before a poll).
    pub fn has_partial_frame(&self) -> bool {
        !self.rx.lock().unwrap_or_else(|p| p.into_inner()).buf.is_empty()
    }

    fn read_some(&self, rx: &mut RxState) -> Result<usize, IpcError> {
        let start = rx.buf.len();
        // An oversized frame is refused as soon as its header is buffered (frame::parse_header), so the buffer
        // never grows past MAX_BODY plus one chunk.
        rx.buf.resize(start + READ_CHUNK.max(HEADER_LEN), 0);
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let result = {
            let mut iov = [IoSliceMut::new(&mut rx.buf[start..])];
            recvmsg::<()>(self.sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC).map(
                |msg| {
                    let mut got = Vec::new();
                    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(fds) = c {
                                got.extend(fds);
                            }
                        }
                    }
                    (msg.bytes, got, truncated)
                },
            )
        };
        match result {
            Ok((n, fds, truncated)) => {
                rx.buf.truncate(start + n);
                for fd in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us (SCM_RIGHTS); nothing
                    // else owns it.
                    rx.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if truncated {
                    return Err(IpcError::FdsTruncated);
                }
                Ok(n)
            }
            Err(e) => {
                rx.buf.truncate(start);
                match e {
                    Errno::EAGAIN => Err(IpcError::WouldBlock),
                    // An interrupted read returns no data; the caller's loop reads again.
                    Errno::EINTR => self.read_some(rx),
                    Errno::ECONNRESET => Err(IpcError::Closed),
                    e => Err(IpcError::io("receive", e)),
                }
            }
        }
    }

    /// Exchange [`Hello`]s: announce `me`, require the peer to be `expect` and to speak our protocol version.
    pub fn handshake(&self, me: Role, expect: Role) -> Result<(), IpcError> {
        self.send(&Hello { magic: *b"tessera", version: PROTOCOL_VERSION, role: me }, &[])?;
        let fail = |reason: String| IpcError::Handshake { expected: expect, reason };
        let (hello, fds): (Hello, _) = self.recv().map_err(|e| fail(e.to_string()))?;
        if !fds.is_empty() {
            return Err(fail(format!("unexpected {} file descriptors with the greeting", fds.len())));
        }
        if &hello.magic != b"tessera" {
            return Err(fail("the peer is not a Tessera process".into()));
        }
        if hello.version != PROTOCOL_VERSION {
            return Err(fail(format!(
                "the peer speaks IPC version {}, this build speaks version {}",
                hello.version, PROTOCOL_VERSION
            )));
        }
        if hello.role != expect {
            return Err(fail(format!("the peer is {}", hello.role)));
        }
        Ok(())
    }

    /// Write raw bytes (tests use this to send malformed frames).
    #[doc(hidden)]
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), IpcError> {
        let _guard = self.send_lock.lock().unwrap_or_else(|p| p.into_inner());
        (&self.sock).write_all(bytes).map_err(|e| IpcError::io("send", e))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
