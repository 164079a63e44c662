//! The one error enum of tessera-blk.

use std::path::PathBuf;

/// Everything that can go wrong in tessera-blk outside a single guest request (request
/// failures become a virtio status, never an `Error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open image {path}")]
    OpenImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the header of image {path} to detect its format")]
    DetectFormat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "image {path}: {format} images cannot be served by tessera-blk; convert it with \
         `qemu-img convert -O qcow2`, or pass --format raw to serve its bytes as they are"
    )]
    UnsupportedFormat { path: PathBuf, format: &'static str },
    #[error(
        "image {path} is in use by another process (QEMU-style lock on byte {byte}); stop it, or \
         pass --no-locking if sharing is intended"
    )]
    InUse { path: PathBuf, byte: i64 },
    #[error("{what}: descriptor {fd} is not an open descriptor we may take (stdio, or closed)")]
    BadFd { what: PathBuf, fd: i32 },
    #[error("one of --socket-path and --socket-fd is required")]
    NoSocket,
    #[error("one of --image and --image-fd is required")]
    NoImage,
    #[error("--socket-fd {0} is not a listening UNIX socket")]
    NotListening(i32),
    #[error("cannot lock image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path} is {size} bytes, smaller than one 512-byte sector")]
    ImageTooSmall { path: PathBuf, size: u64 },
    #[error("--num-queues must be between 1 and {max}, got {got}")]
    NumQueues { got: u16, max: u16 },
    #[error("--io-threads must be at most {max}, got {got}")]
    IoThreads { got: usize, max: usize },
    #[error("--queue-size must be a power of two between 2 and 32768, got {0}")]
    QueueSize(u16),
    #[error("--serial must be at most 20 bytes, got {0} bytes")]
    SerialTooLong(usize),
    #[error("cannot create the vhost-user daemon for socket {path}: {reason}")]
    Daemon { path: PathBuf, reason: String },
    #[error("cannot listen on vhost-user socket {path}: {reason}")]
    Listen { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
