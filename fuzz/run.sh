#!/usr/bin/env bash
# Coverage-guided fuzzing of seqcast's client frame parser and room-pattern matcher (the crate
# `protocol/`): builds the libFuzzer targets of fuzz/ and runs each for a bounded time, starting
# from (and growing) fuzz/corpus/<target>/. Exits non-zero on a crash, leaving the input in
# fuzz/artifacts/<target>/. See docs/security.md, "Fuzzing".
#
# Usage: fuzz/run.sh [seconds per target, default 60] [extra libFuzzer flags, e.g. -jobs=2 -workers=2]
#
# Works on the stable toolchain: it passes rustc the SanitizerCoverage flags that cargo-fuzz
# passes (all stable `-C` options), without AddressSanitizer, which needs nightly. Rust code is
# memory safe without `unsafe` (forbidden in this workspace), so the sanitizer would add little;
# panics, overflow checks and debug assertions are what the targets catch. `--target` keeps the
# flags off build scripts and proc macros, which must not be instrumented.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true

host="$(rustc -vV | sed -n 's/^host: //p')"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export RUSTFLAGS="--cfg fuzzing -Cdebug-assertions -Coverflow-checks \
-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --locked --release --bins --target "$host"

bin="$CARGO_TARGET_DIR/$host/release"
run() {
    local target="$1"
    shift
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "fuzz/run.sh: $target for ${seconds}s" >&2
    "$bin/$target" -max_total_time="$seconds" -artifact_prefix="artifacts/$target/" \
        -print_final_stats=1 "$@" "corpus/$target"
}
run client_frame -dict=dict/client_frame.dict "$@"
run room_pattern "$@"
