#!/usr/bin/env bash
# Every test, on any machine (the GPU suite runs where there is a GPU and says SKIPPED where there
# is none): the Rust tests (unit, integration, doctests, the C example through tests/capi.rs), the
# fuzz targets for a minute each, then the Python wheel, pytest and the Ray Data test on the CPU
# backend. One cargo target folder serves all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release
JV4_FUZZ_SECS="${JV4_FUZZ_SECS:-60}" cargo test --release --test fuzz -- --test-threads 1
# The soak on the CPU: the f32 oracle forward costs ~5 ms a token here, so the mix is short texts
# (1-3 words), a few texts of 64-256 tokens, 1% small images (two larger), 20% bad lines.
cargo build --release --bins
soak_model="$(mktemp -d)"
trap 'rm -rf "$soak_model"' EXIT
target/release/jv4 synth --out "$soak_model" > /dev/null
target/release/jv4-bench soak --model "$soak_model" --device cpu --requests "${JV4_SOAK_REQUESTS:-10000}" \
    --callers 4 --warmup 500 --max-batch-tokens 512 --max-text-tokens 256 --max-short-tokens 4 \
    --max-image-side 64 --large-image-side 256 --image-fraction 0.01 --long-fraction 0.001 \
    --bad-fraction 0.2 --recheck-every 500 --rss-tolerance 64MiB | grep -v '^soak: [0-9]'
bash tools/test_python.sh
