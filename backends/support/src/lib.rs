//! What Tessera's vhost-user backends share.

pub mod ratelimit;
