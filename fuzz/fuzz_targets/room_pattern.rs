//! Room-pattern matching on arbitrary (pattern, name) pairs against the reference matcher (the
//! properties in `server/tests/properties/checks.rs`). The first byte says where the pattern
//! ends and the name begins.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../server/tests/properties/checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::check_pattern_bytes(data));
