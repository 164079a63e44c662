//! The one error type of the chardev process.

use tessera_ipc::child::ChildStartError;
use tessera_ipc::{FdError, IpcError};

#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    #[error("cannot start")]
    Start(#[from] ChildStartError),
    #[error("the launcher sent a configuration for another kind of process")]
    WrongConfig,
    #[error("the configuration names a descriptor that did not arrive")]
    MissingFd(#[from] FdError),
    #[error("cannot put the terminal into raw mode")]
    RawMode(#[source] nix::Error),
    #[error("cannot {op}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("IPC with the launcher failed")]
    Control(#[source] IpcError),
}

impl ChardevError {
    pub fn sys(op: &'static str, source: nix::Error) -> Self {
        ChardevError::Sys { op, source }
    }

    /// The error and its causes on one line, for logs and `Fatal` messages.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            out.push_str(": ");
            out.push_str(&s.to_string());
            src = s.source();
        }
        out
    }
}
