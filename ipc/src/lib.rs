//! Tessera's IPC: how Tessera's own processes talk to each other over unix sockets.
//!
//! * [`frame`]: the wire format. Every message is one frame: an 8-byte header (magic `"TS"`, the number of
//!   file descriptors that travel with the frame, the body length) and a bincode body of at most
//!   [`frame::MAX_BODY`] bytes. Decoding is pure and total: any byte string either decodes, asks for more
//!   bytes, or fails with a [`frame::FrameError`] naming what is wrong. It is fuzzed (`ipc/fuzz`).
//! * [`channel`]: a [`channel::Channel`] sends and receives frames over a `SOCK_STREAM` unix socket, passing
//!   file descriptors with `SCM_RIGHTS`, and starts with a versioned handshake ([`channel::Channel::handshake`]).
//! * [`messages`]: every message exchanged between Tessera processes, and nothing else anywhere defines one.
//!
//! * [`child`]: how a child process adopts its control channel and receives its configuration;
//!   [`fds`]: descriptor lists named by [`messages::FdIndex`].
//!
//! vhost-user (block, net) is not carried here: it has its own protocol and crates.

pub mod channel;
pub mod child;
pub mod fds;
pub mod frame;
pub mod messages;

pub use channel::{Channel, IpcError};
pub use fds::{FdError, FdList, ReceivedFds};
pub use frame::FrameError;

/// Version of the protocol spoken by this build; both ends of a channel must speak the same one.
/// 2: acknowledged serial output (`ChardevToCore::Written`, the empty `CoreToChardev::Output` asking for it).
pub const PROTOCOL_VERSION: u32 = 2;

/// The file descriptor number at which a child process finds its control channel to the launcher.
pub const CONTROL_FD: i32 = 3;
