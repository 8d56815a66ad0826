#!/usr/bin/env bash
# The Python wheel on the GPU machine, from the packed folder (tools/pack_gpu.sh, then
# tools/pack_python_gpu.sh adds wheels/, python_tests/ and py_docs_bench.py).
# Stages (all by default; pick with JV4_PY_STAGES="tiny full bench"):
#   tiny   the pytest suite on the CUDA backend with the synthetic tiny model (what CI runs on the
#          CPU), plus test_oracle.py: the GPU against the CPU backend by cosine
#   full   the same suite on a full-size checkpoint (`jv4 synth --preset full`, or $JV4_MODEL_DIR)
#   bench  encode_document throughput on the docs256 texts against the Rust engine on the same
#          texts and engine (tools/py_docs_bench.py), then `jv4-bench text`'s bare forwards
# Needs python3 with numpy and pytest (the machine's own); the wheel is installed offline into
# /tmp/jv4-site. Tests needing ray or openai (not installed there) are skipped, and pytest says so.
# Logs go to $OUT (or <this folder>/out); the last lines are the summary.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
# The packed binaries travel gzipped (tools/pack_gpu.sh): unpack them once.
for b in jv4 jv4-bench gpu-tests; do [ -f "$here/$b.gz" ] && gunzip -f "$here/$b.gz" && chmod +x "$here/$b"; done
stages="${JV4_PY_STAGES:-tiny full bench}"
has() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
model="${JV4_MODEL_DIR:-/tmp/jv4-synth-full}"
site=/tmp/jv4-site
summary=()

python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$here"/wheels/jv4-*.whl || { echo "gpu_python: the wheel did not install"; exit 1; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import sys, jv4, numpy, pytest; print("python", sys.version.split()[0], "| jv4", jv4.__version__, jv4.__file__, "| numpy", numpy.__version__, "| pytest", pytest.__version__)' \
    || { echo "gpu_python: cannot import jv4 / numpy / pytest"; exit 1; }
for m in ray openai PIL; do
    python3 -c "import $m" 2>/dev/null || echo "gpu_python: $m is not installed here: the tests needing it are skipped"
done
export JV4_BIN="$here/jv4" JV4_TEST_DEVICE="${JV4_TEST_DEVICE:-cuda:0}"
# Several engines (and the CLI) hold the model at once in some tests: bound each one's activations.
export JV4_MEM_BUDGET="${JV4_MEM_BUDGET:-8GiB}"
cd /tmp # nothing here shadows the installed package
rc=0

suite() { # name, then extra env assignments
    local name=$1
    shift
    echo "== pytest ($name, $JV4_TEST_DEVICE)"
    env "$@" python3 -m pytest -q -rs -p no:cacheprovider --durations=5 "$here/python_tests" 2>&1 | tee "$out/py_$name.log"
    local r=${PIPESTATUS[0]}
    [ "$r" -eq 0 ] || rc=$r
    summary+=("pytest $name: $(grep -E '^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$out/py_$name.log" | tail -1)")
}

if has full || has bench; then
    if [ ! -f "$model/config.json" ]; then
        "$here/jv4" synth --preset full --out "$model" > "$out/synth.txt" 2>&1 || { echo "synth failed"; tail -3 "$out/synth.txt"; exit 1; }
    fi
fi
has tiny && suite tiny
has full && suite full JV4_TEST_MODEL="$model"
if has bench; then
    echo "== encode_document throughput, docs256 texts (Python vs Rust Engine::embed, one engine, alternating)"
    # The whole GPU for it: no activation bound.
    env -u JV4_MEM_BUDGET python3 "$here/py_docs_bench.py" --model "$model" --device "$JV4_TEST_DEVICE" 2>&1 | tee "$out/bench.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
    summary+=("bench: $(tail -1 "$out/bench.txt")")
    # The bare forwards on random ids (no tokenizer, no engine), for context.
    [ -x "$here/jv4-bench" ] && "$here/jv4-bench" text --model "$model" --iters 3 2>&1 | grep -E "^(workload|docs256)" | tee -a "$out/bench.txt"
fi
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $rc
