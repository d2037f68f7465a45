//! Arbitrary bytes as a whole knock: split, then open with a fixed key.
#![no_main]

use gatekeeper::knock::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(sealed) = wire::split(data) {
        let _ = sealed.open(&[7; 32]);
    }
});
