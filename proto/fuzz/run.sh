#!/usr/bin/env bash
# Runs the decoder fuzz target for SECONDS (default 60) with AddressSanitizer.
#
#   proto/fuzz/run.sh [SECONDS] [extra libFuzzer flags...]
#
# Only stable Rust is installed here, so RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
# nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module) to stable rustc.
# Needs `cargo install cargo-fuzz`. Seeds the corpus on first use; findings land in
# proto/fuzz/artifacts/decoder/ (corpus/ and artifacts/ are git-ignored).
set -euo pipefail

seconds="${1:-60}"
shift || true
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
corpus="$fuzz_dir/corpus/decoder"

if [ -z "$(ls -A "$corpus" 2>/dev/null)" ]; then
    (cd "$fuzz_dir" && cargo run --quiet --example seeds -- "$corpus")
fi

cd "$fuzz_dir/.."
RUSTC_BOOTSTRAP=1 exec cargo fuzz run decoder "$corpus" -- \
    -dict="$fuzz_dir/decoder.dict" \
    -max_total_time="$seconds" \
    -print_final_stats=1 \
    "$@"
