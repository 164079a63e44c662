//! Helpers shared by the integration tests: locating the built binaries, building tiny guests.

pub mod linux_guest;
