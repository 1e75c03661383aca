//! Property tests (the bounded smoke run of seqcast's fuzzing, part of `cargo test`):
//!
//! - [`frames`]: client frame parsing never panics and accepts only valid frames, on arbitrary
//!   text and bytes and on JSON-shaped near-misses; every valid frame round-trips;
//! - [`patterns`]: room-pattern matching agrees with a reference matcher;
//! - [`store`]: random sequences of batches (sequential and concurrent, with repeated idempotency
//!   keys) against SQLite and Postgres keep seqs gap-free, answer duplicates with the original,
//!   and page consistently.
//!
//! The frame and pattern properties live in `properties/checks.rs`, which the coverage-guided
//! fuzz targets in `fuzz/` run too. Each test runs a fixed number of cases; `PROPTEST_CASES=N`
//! overrides it for a long run (see `docs/security.md`, "Fuzzing").
#![allow(clippy::unwrap_used)]

mod support;

#[path = "properties/checks.rs"]
mod checks;
#[path = "properties/frames.rs"]
mod frames;
#[path = "properties/patterns.rs"]
mod patterns;
#[path = "properties/store.rs"]
mod store;

use proptest::test_runner::Config;

/// The proptest configuration of a property: `default_cases` cases unless `PROPTEST_CASES` says
/// otherwise, no regression files written into the source tree (a failure prints its minimal
/// input instead), and shrinking bounded in time so a failing run still ends.
pub fn config(default_cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        failure_persistence: None,
        max_shrink_time: 30_000,
        ..Config::default()
    }
}
