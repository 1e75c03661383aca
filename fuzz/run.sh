#!/usr/bin/env bash
# Coverage-guided fuzzing of seqcast's client frame parser and room-pattern matcher: builds the
# libFuzzer targets of fuzz/ and runs each for a bounded time. Exits non-zero on a crash (the
# input is saved in fuzz/artifacts/<target>/). See docs/security.md, "Fuzzing".
#
# Usage: fuzz/run.sh [seconds per target, default 60]
# Needs a nightly toolchain; installs cargo-fuzz from crates.io when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

cargo +nightly fuzz build
cargo +nightly fuzz run client_frame -- \
    -dict=fuzz/dict/client_frame.dict -max_total_time="$seconds"
cargo +nightly fuzz run room_pattern -- -max_total_time="$seconds"
