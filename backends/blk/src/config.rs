//! Command-line flags of `tessera-blk` and their validation.

use std::path::PathBuf;

use clap::Parser;

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
pub struct Args {
    /// Path of the vhost-user UNIX socket to listen on (replaced if it exists).
    #[arg(long)]
    pub socket_path: PathBuf,
    /// Disk image to serve.
    #[arg(long)]
    pub image: PathBuf,
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
    /// Do not take QEMU-compatible image locks (QEMU's `file.locking=off`).
    #[arg(long)]
    pub no_locking: bool,
    /// Serial number returned to VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub socket_path: PathBuf,
    pub image: ImageOptions,
    pub num_queues: u16,
    pub queue_size: u16,
    pub io_threads: usize,
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
            socket_path: a.socket_path,
            image: ImageOptions {
                path: a.image,
                format: a.format,
                read_only: a.read_only,
                direct: a.direct,
                lock: !a.no_locking,
            },
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            io_threads: a.io_threads,
            props: DiskProps { read_only: a.read_only, serial, limits: DiskLimits::default() },
        })
    }
}
