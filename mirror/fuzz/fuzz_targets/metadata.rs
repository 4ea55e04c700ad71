//! A whole metadata file (both header slots and the maps) through the parser and the reader.
//! Run: `cd mirror/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run metadata -- -max_len=20000`
//! (a whole small file is 16 KiB; the first input byte selects CRC fix-up, see `fuzz_parse`).
//! `mirror/tests/metadata_props.rs` drives the same function from proptest, so CI covers it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mirror::metadata::fuzz_parse(data);
});
