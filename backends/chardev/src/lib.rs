//! Tessera's character-device backend process: the host side of one `-chardev` / `-serial`.
//!
//! Started by the launcher as `tessera-chardev --ipc-fd 3`. It receives a [`ChardevConfig`] with its
//! descriptors, answers `Ready`, and then moves bytes: guest output from each front end (a serial channel to
//! tessera-core) to the host side, host input to the focused front end. See docs/ARCHITECTURE.md.
//!
//! * [`server`]: the event loop.
//! * [`mux`]: Ctrl-A escape keys and timestamps (`mux=on`).
//! * [`telnet`]: `telnet=on` negotiation and input filtering.
//! * [`terminal`]: raw mode, restored on every way out.
//! * [`writer`]: bounded output queues drained by writer threads.
//!
//! [`ChardevConfig`]: tessera_ipc::messages::ChardevConfig

pub mod error;
pub mod host;
pub mod mux;
pub mod server;
pub mod telnet;
pub mod terminal;
pub mod writer;

pub use error::ChardevError;
pub use server::Chardev;
