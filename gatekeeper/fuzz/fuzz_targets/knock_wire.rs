//! Arbitrary bytes as a whole knock, v1 or v2: split, then open with fixed
//! keys (v2: the identity under a fixed gateway key, then the payload).
#![no_main]

use gatekeeper::knock::wire::{self, v2};
use libfuzzer_sys::fuzz_target;
use x25519_dalek::StaticSecret;

fuzz_target!(|data: &[u8]| {
    if let Ok(sealed) = wire::split(data) {
        let _ = sealed.open(&[7; 32]);
    }
    if let Ok(sealed) = v2::split(data) {
        let gateway = v2::GatewayKey::new(&StaticSecret::from([9; 32]));
        if let Ok(opened) = sealed.identity(&gateway) {
            let _ = sealed.open(&opened, &[7; 32], &gateway);
        }
    }
    let _ = wire::nonce_of(data);
});
