//! The start of every child process: adopt the control channel the launcher left at [`CONTROL_FD`],
//! shake hands, and receive the configuration.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::channel::{Channel, IpcError};
use crate::fds::ReceivedFds;
use crate::messages::{ChildConfig, LauncherToChild, Role};
use crate::CONTROL_FD;

/// What a child gets from the launcher before it starts serving.
pub struct ChildStart {
    pub control: Channel,
    pub config: ChildConfig,
    pub fds: ReceivedFds,
}

#[derive(Debug, thiserror::Error)]
pub enum ChildStartError {
    #[error("file descriptor {fd} is not a socket: this program is started by the tessera launcher, not by hand")]
    NoControlChannel { fd: i32 },
    #[error(transparent)]
    Ipc(#[from] IpcError),
    #[error("the launcher sent {0} before the configuration")]
    Unexpected(&'static str),
}

/// Adopt `fd` (normally [`CONTROL_FD`]) as the control channel, handshake as `role`, and wait for
/// [`LauncherToChild::Configure`].
pub fn start_child(role: Role, fd: i32) -> Result<ChildStart, ChildStartError> {
    let is_socket =
        nix::sys::stat::fstat(fd).map(|st| (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFSOCK).unwrap_or(false);
    if !is_socket {
        return Err(ChildStartError::NoControlChannel { fd });
    }
    // SAFETY: `fd` is an open socket (checked above) that the launcher passed to this process for exactly
    // this use; nothing else in the process owns it.
    let control = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    control.handshake(role, Role::Launcher)?;
    let (msg, fds): (LauncherToChild, _) = control.recv()?;
    match msg {
        LauncherToChild::Configure(config) => Ok(ChildStart { control, config, fds: ReceivedFds::new(fds) }),
        LauncherToChild::Shutdown => Err(ChildStartError::Unexpected("Shutdown")),
        LauncherToChild::VhostUserReconnect { .. } => Err(ChildStartError::Unexpected("VhostUserReconnect")),
        LauncherToChild::SerialReconnect { .. } => Err(ChildStartError::Unexpected("SerialReconnect")),
        LauncherToChild::Monitor { .. } => Err(ChildStartError::Unexpected("Monitor")),
    }
}

/// [`start_child`] on the standard control descriptor.
pub fn start_child_default(role: Role) -> Result<ChildStart, ChildStartError> {
    start_child(role, CONTROL_FD)
}
