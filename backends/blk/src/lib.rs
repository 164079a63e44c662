//! tessera-blk: a virtio-blk device serving raw and qcow2 images.
//!
//! Code map:
//! - [`request`]: parses and executes virtio-blk requests from a list of descriptors, over the
//!   [`image::BlockIo`] host trait. Front-end independent; unit-tested on [`testing::MemDisk`].
//! - [`image`]: the host side: raw files (`preadv`/`pwritev`, hole punching) and qcow2 (imago).
//! - [`vhost_user`]: the device behind vhost-user (queues, I/O pool), and the serve loop that
//!   waits for the next front end after a disconnect.
//! - [`handler`]: the vhost-user request handler (on the `vhost` crate).
//! - [`inflight`]: the inflight region (`INFLIGHT_SHMFD`) that lets a restarted back end
//!   resubmit what its predecessor had in flight.
//! - [`uring`]: one io_uring per queue thread for O_DIRECT reads and writes (`--aio io_uring`).
//! - [`config`]: command-line flags, validated into a [`config::BlkConfig`].

pub mod config;
pub mod error;
pub mod handler;
pub mod image;
pub mod inflight;
pub(crate) use tessera_backend_support::ratelimit;
pub mod request;
pub mod signals;
pub mod testing;
pub mod uring;
pub mod vhost_user;

pub use error::{Error, Result};
