//! tessera-net: a virtio-net device over vhost-user, with user-mode networking (libslirp) or a
//! tap device on the host side.
//!
//! Code map:
//! - [`frame`]: virtio-net frames in guest memory (TX chains to frames, frames into RX
//!   buffers, MRG_RXBUF). Front-end independent; fuzzed through [`testing::fuzz_queues`].
//! - [`slirp`]: a safe owner of one libslirp instance (callbacks, poll set, timers).
//! - [`tap`]: a tap descriptor as the host side.
//! - [`netloop`]: the network thread moving frames between the host side and the queues.
//! - [`vhost_user`]: the adapter to rust-vmm's vhost-user-backend and the serve loop.
//! - [`relay`]: passes vhost-user messages between the front end and the daemon, absorbing
//!   QEMU's SET_VRING_ENABLE sent before feature negotiation.
//! - [`config`]: command-line flags and QEMU's `-netdev user` sub-options.

pub mod config;
pub mod error;
pub mod frame;
pub mod netloop;
pub(crate) use tessera_backend_support::ratelimit;
pub mod relay;
pub mod slirp;
pub mod tap;
pub mod testing;
pub mod vhost_user;

pub use error::{Error, Result};
