//! Arbitrary descriptor tables, avail rings, guest buffers and RX frame lengths through
//! tessera-net's guest-frame path (see `tessera_net::testing::fuzz_queues` for the layout).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_net::testing::fuzz_queues(data);
});
