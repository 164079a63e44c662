//! The one error enum of tessera-net.

use std::path::PathBuf;

/// Everything that can go wrong in tessera-net outside a single guest frame (a bad frame is
/// dropped and logged, never an `Error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --user option '{option}': {reason}")]
    UserOption { option: String, reason: String },
    #[error("--user option '{0}' is not supported by tessera-net yet")]
    UserOptionUnsupported(String),
    #[error("invalid --mac '{0}': expected six hexadecimal bytes such as 52:54:00:12:34:56, not multicast")]
    Mac(String),
    #[error("--num-queues must be between 1 and {max}, got {got}")]
    NumQueues { got: u16, max: u16 },
    #[error("--queue-size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("exactly one of --user, --tap and --tap-fd may be given")]
    BackendChoice,
    #[error("--tap-fd {0} is not an open file descriptor")]
    TapFd(i32),
    #[error("cannot open tap device '{name}'")]
    TapOpen {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("libslirp refused the configuration ({0})")]
    SlirpInit(String),
    #[error("cannot set up the network thread")]
    NetThread(#[source] std::io::Error),
    #[error("cannot create the vhost-user daemon for socket {path}: {reason}")]
    Daemon { path: PathBuf, reason: String },
    #[error("one of --socket-path and --socket-fd is required")]
    NoSocket,
    #[error("--socket-fd {0} is not a listening UNIX socket")]
    NotListening(i32),
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
