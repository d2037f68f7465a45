//! Arbitrary bytes as the plaintext of a correctly sealed knock, so the
//! JSON parsing behind a valid tag is what gets exercised.
#![no_main]

use gatekeeper::knock::wire;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = wire::seal_bytes(&[1; 16], &KEY, &[2; wire::NONCE_LEN], data) {
        let sealed = wire::split(&packet).expect("seal_bytes output splits");
        let _ = sealed.open(&KEY);
    }
});
