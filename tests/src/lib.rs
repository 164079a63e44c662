//! Helpers shared by the integration tests: locating the built binaries, building tiny guests.
pub mod tiny_guest;

pub mod chardev;

pub mod bins;
