#!/usr/bin/env bash
# Adds the Python pieces to the packed GPU folder (.gpu/, made by tools/pack_gpu.sh, which this
# runs first if .gpu/jv4.gz is missing): the wheel (release, abi3, manylinux, stripped; the CUDA
# kernels built for sm_90a as in every build), the pytest suite, the docs256 throughput check
# (tools/py_docs_bench.py) and tools/gpu_python.sh. Then, on the GPU machine, from the repository root:
#   bash .gpu/gpu_python.sh          # its last lines are the summary
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
# The device tool carries at most 64 MiB in all, the repository's tracked files included.
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
limit=$(((63 << 20) - tracked))
[ -f "$out/jv4.gz" ] || bash tools/pack_gpu.sh

venv=target/pyenv
[ -x "$venv/bin/maturin" ] || {
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "maturin==1.16.0"
}
rm -rf target/wheels-gpu
PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv" \
    maturin build --release --strip -m python/Cargo.toml -o target/wheels-gpu

rm -rf "$out/wheels" "$out/python_tests"
mkdir -p "$out/wheels"
cp target/wheels-gpu/jv4-*.whl "$out/wheels/"
cp -r python/tests "$out/python_tests"
rm -rf "$out/python_tests/__pycache__"
cp tools/gpu_python.sh tools/py_docs_bench.py "$out/"

size=$(du -sb "$out" | cut -f1)
if [ "$size" -gt "$limit" ]; then
    echo "pack_python_gpu: $out is $((size >> 20)) MiB, over the $((limit >> 20)) MiB left of the carry limit beside the tracked files" >&2
    exit 1
fi
echo "packed $out: $((size >> 20)) MiB; wheel $(du -k "$out"/wheels/*.whl | cut -f1) KiB: $(basename "$out"/wheels/*.whl)"
echo "device command (carry: $out):  bash $out/gpu_python.sh"
