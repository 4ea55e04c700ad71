//! A whole client byte stream (flags, options, requests) through the pure codec.
//! Run: `cd nbd-server/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run connection`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::fuzzing::{drive_connection, sample_exports};

fuzz_target!(|data: &[u8]| {
    let exports = sample_exports();
    drive_connection(&exports, data);
});
