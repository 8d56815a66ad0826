#!/usr/bin/env bash
# Every test, on any machine (the GPU suite runs where there is a GPU and says SKIPPED where there
# is none): the Rust tests (unit, integration, doctests, the C example through tests/capi.rs), the
# fuzz targets for a minute each, then the Python wheel, pytest and the Ray Data test on the CPU
# backend. One cargo target folder serves all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release
JV4_FUZZ_SECS="${JV4_FUZZ_SECS:-60}" cargo test --release --test fuzz -- --test-threads 1
bash tools/test_python.sh
