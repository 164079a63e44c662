//! Command-line flags of `tessera-blk` and their validation.

use std::path::PathBuf;

use clap::{ArgGroup, Parser};

use crate::error::{Error, Result};
use crate::image::{ImageFormat, ImageOptions};
use crate::request::{DiskLimits, DiskProps, ID_BYTES};

/// Most queues we serve; each gets its own worker thread.
pub const MAX_QUEUES: u16 = 64;
/// Most I/O pool threads.
pub const MAX_IO_THREADS: usize = 256;

/// Serve a disk image to a vhost-user front end (QEMU's vhost-user-blk-pci, tessera-core).
#[derive(Debug, Parser)]
#[command(name = "tessera-blk", version)]
#[command(group(ArgGroup::new("socket").required(true).args(["socket_path", "socket_fd"])))]
#[command(group(ArgGroup::new("disk").required(true).args(["image", "image_fd"])))]
pub struct Args {
    /// Path of the vhost-user UNIX socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// An inherited, already listening UNIX socket to serve instead (a launcher binds it before
    /// sandboxing us).
    #[arg(long)]
    pub socket_fd: Option<i32>,
    /// Disk image to serve.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// An inherited descriptor of the image to serve instead, opened read-write (read-only
    /// with --read-only).
    #[arg(long)]
    pub image_fd: Option<i32>,
    /// Image format; probed from the image when omitted (a raw guess is warned about).
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// Export the disk read-only (VIRTIO_BLK_F_RO); writes fail in the guest.
    #[arg(long)]
    pub read_only: bool,
    /// Number of request queues, one worker thread each.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size the front end may configure (power of two).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    pub direct: bool,
    /// Threads running the I/O that would block a queue thread (page-cache misses, O_DIRECT,
    /// flushes, discards, requests of 128 KiB or more), so deep queues run in parallel; 0 runs
    /// every request on its queue's thread.
    #[arg(long, default_value_t = 16)]
    pub io_threads: usize,
    /// How O_DIRECT reads and writes of raw images run: `io_uring` (one ring per queue thread,
    /// falling back to threads where io_uring is unavailable: uring.rs) or `threads` (the I/O
    /// pool), like QEMU's `aio=`. Only `--direct` uses it, so io_uring is the default: the
    /// sandbox's blk profile allows it (group io-uring) and each ring is restricted to
    /// READV/WRITEV before it is enabled.
    #[arg(long, value_enum, default_value_t = Aio::IoUring)]
    pub aio: Aio,
    /// Do not take QEMU-compatible image locks (QEMU's `file.locking=off`).
    #[arg(long)]
    pub no_locking: bool,
    /// Serial number returned to VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
}

/// `--aio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Aio {
    #[value(name = "io_uring")]
    IoUring,
    Threads,
}

/// Where the vhost-user socket comes from.
#[derive(Clone, Debug)]
pub enum SocketSource {
    Path(PathBuf),
    /// An inherited listening socket.
    Fd(i32),
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub socket: SocketSource,
    pub image: ImageOptions,
    pub num_queues: u16,
    pub queue_size: u16,
    pub io_threads: usize,
    pub aio: Aio,
    pub props: DiskProps,
}

impl TryFrom<Args> for BlkConfig {
    type Error = Error;

    fn try_from(a: Args) -> Result<Self> {
        if a.num_queues == 0 || a.num_queues > MAX_QUEUES {
            return Err(Error::NumQueues { got: a.num_queues, max: MAX_QUEUES });
        }
        if a.queue_size < 2 || !a.queue_size.is_power_of_two() {
            return Err(Error::QueueSize(a.queue_size));
        }
        if a.io_threads > MAX_IO_THREADS {
            return Err(Error::IoThreads { got: a.io_threads, max: MAX_IO_THREADS });
        }
        if a.serial.len() > ID_BYTES {
            return Err(Error::SerialTooLong(a.serial.len()));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..a.serial.len()].copy_from_slice(a.serial.as_bytes());
        Ok(BlkConfig {
            socket: match (a.socket_path, a.socket_fd) {
                (Some(p), _) => SocketSource::Path(p),
                (None, Some(fd)) => SocketSource::Fd(fd),
                // clap's "socket" group requires one of them.
                (None, None) => return Err(Error::NoSocket),
            },
            image: ImageOptions {
                path: match (&a.image, a.image_fd) {
                    (Some(p), _) => p.clone(),
                    (None, Some(fd)) => PathBuf::from(format!("image fd {fd}")),
                    (None, None) => return Err(Error::NoImage),
                },
                format: a.format,
                read_only: a.read_only,
                direct: a.direct,
                lock: !a.no_locking,
                fd: if a.image.is_some() { None } else { a.image_fd },
            },
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            io_threads: a.io_threads,
            aio: a.aio,
            props: DiskProps { read_only: a.read_only, serial, limits: DiskLimits::default() },
        })
    }
}
