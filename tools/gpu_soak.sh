#!/usr/bin/env bash
# The soak on the GPU (issue 12, deliverable 9): `jv4-bench soak` pushes $JV4_SOAK_REQUESTS
# (default 100,000) mixed requests through one engine on the full-size model from 8 caller
# threads: texts of 1 to 32,768 tokens (log-uniform up to 512, mean ≈ 85, 0.05% long), images
# (small ones and two large ones the preprocessor resizes down), 5% bad lines of nine kinds, every
# task and output. It checks every answer, and device memory and host RSS after the warm-up
# against the end (tolerance 256 MiB each); its last line is `soak: PASS ...` or `soak: FAIL ...`.
#
# Runs from the packed folder (tools/pack_gpu.sh copies it to .gpu/soak.sh), on the device:
#   bash .gpu/soak.sh                   # the log goes to $OUT/soak.log
# The model is $JV4_MODEL_DIR, else /tmp/jv4-synth-full, written first if missing (as gpu_run.sh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
cd "$here"
# The packed binaries travel gzipped (tools/pack_gpu.sh): unpack them once.
for b in jv4 jv4-bench gpu-tests; do [ -f "$b.gz" ] && gunzip -f "$b.gz" && chmod +x "$b"; done
model="${JV4_MODEL_DIR:-/tmp/jv4-synth-full}"
if [ ! -f "$model/config.json" ]; then
    ./jv4 synth --preset full --out "$model" > "$out/synth.txt" 2>&1 || { echo "soak: synth failed"; tail -3 "$out/synth.txt"; exit 1; }
fi
echo "== soak: ${JV4_SOAK_REQUESTS:-100000} requests through one engine ($model)"
# shellcheck disable=SC2086
./jv4-bench soak --model "$model" --device cuda --requests "${JV4_SOAK_REQUESTS:-100000}" \
    --log "$out/soak.log" ${JV4_SOAK_ARGS:-} > "$out/soak_progress.txt" 2>&1
rc=$?
tail -n 40 "$out/soak_progress.txt"
exit $rc
