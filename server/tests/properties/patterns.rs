//! Room-pattern matching (`seqcast::auth::pattern_matches`) against a reference matcher.

use proptest::collection::vec;
use proptest::prelude::*;

use seqcast::auth::pattern_matches;

use crate::checks::{check_pattern, check_pattern_bytes, reference_matches};
use crate::config;

proptest! {
    #![proptest_config(config(5_000))]

    /// A small alphabet (with a multi-byte character, since the matcher works on bytes) makes
    /// matches, near misses and runs of `*` common.
    #[test]
    fn small_alphabet(pattern in "[ab*é-]{0,12}", name in "[abé-]{0,12}") {
        check_pattern(&pattern, &name);
    }

    /// Names may contain `*` too (a room name cannot, but the matcher must not care).
    #[test]
    fn stars_on_both_sides(pattern in "[a*]{0,10}", name in "[a*]{0,10}") {
        check_pattern(&pattern, &name);
    }
}

// Long inputs make the quadratic reference slow in a debug build: fewer cases.
proptest! {
    #![proptest_config(config(800))]

    /// Anything at all, including the empty pattern and the empty name.
    #[test]
    fn arbitrary_strings(pattern in any::<String>(), name in any::<String>()) {
        check_pattern(&pattern, &name);
    }

    /// The fuzz target's input format.
    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..300)) {
        check_pattern_bytes(&data);
    }
}

proptest! {
    #![proptest_config(config(5_000))]

    /// `prefix*` is exactly "starts with `prefix`" (the protocol's `team-*` example).
    #[test]
    fn prefix_patterns(prefix in "[a-z:-]{0,6}", name in "[a-z:-]{0,12}") {
        prop_assert_eq!(
            pattern_matches(&format!("{prefix}*"), &name),
            name.starts_with(&prefix)
        );
    }

    /// Patterns built to force backtracking (`*a*a*...b` against long runs of `a`) against
    /// room names of the longest allowed length: still right.
    #[test]
    fn backtracking(stars in 1_usize..12, run in 100_usize..=128, tail in "[ab]{0,2}") {
        let pattern = format!("{}b", "*a".repeat(stars));
        let name = format!("{}{tail}", "a".repeat(run - tail.len()));
        prop_assert_eq!(
            pattern_matches(&pattern, &name),
            reference_matches(&pattern, &name)
        );
    }
}
