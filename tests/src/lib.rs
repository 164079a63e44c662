//! Helpers shared by the integration tests: locating the built binaries, fake launchers, building guests.
pub mod bins;
pub mod chardev;
pub mod linux_guest;
pub mod misbehave;
pub mod qmp;
pub mod tiny_guest;
