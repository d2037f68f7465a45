//! Arbitrary bytes as the portal's first record: stripping never panics,
//! and whatever it strips survives a round trip through the client's insert.
#![no_main]

use gatekeeper::portal::client_hello::{insert_knock, strip_knock};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(stripped) = strip_knock(data) else {
        return;
    };
    let knock = stripped.knock.unwrap_or_else(|| b"knock".to_vec());
    if let Ok(knocked) = insert_knock(&stripped.record, &knock) {
        let again = strip_knock(&knocked).expect("an inserted knock strips cleanly");
        assert_eq!(again.knock.as_deref(), Some(&knock[..]));
        assert_eq!(again.record, stripped.record);
    }
});
