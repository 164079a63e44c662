//! Arbitrary descriptor tables, avail rings and request bytes through tessera-blk's queue
//! processing (see `tessera_blk::testing::fuzz_queue` for the layout).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_blk::testing::fuzz_queue(data);
});
