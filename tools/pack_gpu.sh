#!/usr/bin/env bash
# Builds the GPU test suite, the runner and the benchmark in release mode and packs them,
# stripped and gzipped (the scripts unpack them on first use), with what they need, into .gpu/
# (git-ignored), ready to carry to a GPU machine.
# Prints the one command that runs everything there; its last line is `N passed, M failed`.
#
#   bash tools/pack_gpu.sh            # then, on the GPU machine, from the repository root:
#   bash .gpu/run.sh                  # logs go to $OUT (or .gpu/out) as well
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
# The device tool carries at most 64 MiB in all, the repository's tracked files included.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$(((63 << 20) - tracked))

cargo build --release --bins
test_exe=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])')
[ -n "$test_exe" ] || { echo "pack_gpu: could not find the gpu test binary" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out"
cp target/release/jv4 target/release/jv4-bench "$out/"
cp "$test_exe" "$out/gpu-tests"
strip "$out/jv4" "$out/jv4-bench" "$out/gpu-tests"
gzip -9 "$out/jv4" "$out/jv4-bench" "$out/gpu-tests"
cp tools/gpu_run.sh "$out/run.sh"
cp tools/gpu_soak.sh "$out/soak.sh"
cp tools/gpu_sanitize.sh "$out/sanitize.sh"
cp tools/gpu_cold_start.sh "$out/cold_start.sh"
cp tools/torch_ops_bench.py tools/torch_text_bench.py tools/reference.py tools/serve_bench.sh tools/gpu_python.sh "$out/"
# The GPU tests read tests/fixtures of the repository, which travels with the working tree. The
# runner demo uses the model folder's own tokenizer.json (`jv4 synth` writes one); the real one
# (11 MB) would push binaries + working tree over the carry limit.

size=$(du -sb "$out" | cut -f1)
if [ "$size" -gt "$limit" ]; then
    echo "pack_gpu: $out is $((size >> 20)) MiB, over the $((limit >> 20)) MiB left of the carry limit beside the tracked files" >&2
    exit 1
fi
echo "packed $out: $((size >> 20)) MiB ($(ls "$out" | tr '\n' ' '))"
echo "device command (carry: $out):  bash $out/run.sh"
