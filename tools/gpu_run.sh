#!/usr/bin/env bash
# Runs on the GPU machine, from the packed folder made by tools/pack_gpu.sh: device facts, a
# benchmark of the ops beside PyTorch (when python3 has torch), then the GPU test suite, whose
# summary `N passed, M failed` is the last line. Full logs go to $OUT (or <this folder>/out).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
cd "$here"

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$out/device.txt"
./jv4 gpu 2>&1 | tee -a "$out/device.txt"

echo "== checkpoint load (a random full-size checkpoint in the real layout, written here)"
model="${JV4_MODEL_DIR:-}"
if [ -z "$model" ]; then
    model=/tmp/jv4-synth-full
    ./jv4 synth --preset full --out "$model" 2>&1 | tee "$out/synth.txt"
fi
./jv4 info --model "$model" 2>&1 | tee "$out/info.txt"

echo "== benchmark (ours vs PyTorch, same call)"
if python3 -c "import torch" 2>/dev/null; then
    python3 torch_ops_bench.py --json "$out/torch_ops.json" > "$out/torch_ops.txt" 2>&1 || echo "torch benchmark failed: see $out/torch_ops.txt"
fi
./jv4-bench ops --torch-json "$out/torch_ops.json" 2>&1 | tee "$out/bench_ops.txt"

echo "== GPU test suite"
./gpu-tests 2>&1 | tee "$out/gpu-tests.log"
exit "${PIPESTATUS[0]}"
