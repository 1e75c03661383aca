//! Client frame parsing on arbitrary bytes: never a panic, and whatever is accepted is a valid
//! frame whose replies are valid JSON (the properties in `server/tests/properties/checks.rs`).
//! The first byte picks the body limit (0 to 1020 bytes, so both sides of it are reached).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/tests/properties/checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| {
    if let Some((&limit, frame)) = data.split_first() {
        checks::check_client_bytes(frame, usize::from(limit) * 4);
    }
});
