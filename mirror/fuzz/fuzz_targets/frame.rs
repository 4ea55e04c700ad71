//! A byte stream from the replication port through the frame decoder (and re-encoder).
//! Run: `cd mirror/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_len=4096`.
//! Headers that fail get a second chance with a recomputed checksum (see `fuzz_stream`), so
//! the fuzzer reaches every body decoder. `mirror/tests/frame_props.rs` runs the same function
//! from proptest in CI.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mirror::repl::frame::fuzz_stream(data);
});
