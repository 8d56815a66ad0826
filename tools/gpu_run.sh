#!/usr/bin/env bash
# Runs on the GPU machine, from the packed folder made by tools/pack_gpu.sh. Stages (all by
# default; pick with JV4_STAGES="device load ops text parity embed tests"):
#   device  the GPU, kernels, allocator
#   load    write a random full-size checkpoint in the real layout (or use $JV4_MODEL_DIR) and load it
#   ops     op benchmarks beside PyTorch (same call, ratio column)
#   text    text-path benchmark beside PyTorch (tokens/s, latency, peak memory)
#   engine  the whole engine (Engine::embed) on the text workloads, and concurrent 16-token queries
#   parity  the full model against PyTorch bf16 (tools/reference.py texts), incl. 8k and 32k tokens
#   fidelity  against a float32 PyTorch run of the same texts (up to 8k tokens): ours in both LoRA
#           modes (merged, stacked) and PyTorch bf16, each against fp32
#   survey  cuBLASLt candidates per decoder GEMM shape: µs per height, bitwise agreement
#   serve   `jv4 serve` load figures beside the offline engine (tools/serve_bench.sh)
#   images  images on the full model against PyTorch bf16: parity, latency, images/s
#   embed   the runner on real text (tokenizer.json packed alongside)
#   tests   the GPU test suite; its summary `N passed, M failed` is the last line
#   faults  the device-fault tests (tests/gpu/fault.rs), each in a process of its own: a sticky
#           CUDA error breaks the context of the process it happens in
#   sanitize  attention, model and engine tests under compute-sanitizer (gpu_sanitize.sh)
#   soak    100,000 mixed requests through one engine (gpu_soak.sh)
#   cold    cold start to the first embedding, and the load's GB/s (gpu_cold_start.sh)
# (sanitize, soak and cold take minutes each: not in the default list.)
# Full logs go to $OUT (or <this folder>/out).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
cd "$here"
# The packed binaries travel gzipped (tools/pack_gpu.sh): unpack them once.
for b in jv4 jv4-bench gpu-tests; do [ -f "$b.gz" ] && gunzip -f "$b.gz" && chmod +x "$b"; done
stages="${JV4_STAGES:-device load ops text engine parity images embed tests faults}"
has() { case " $stages " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
torch_ok() { python3 -c "import torch" 2>/dev/null; }
model="${JV4_MODEL_DIR:-/tmp/jv4-synth-full}"
export JV4_FIXTURES="${JV4_FIXTURES:-$here/../tests/fixtures}"

if has device; then
    echo "== device"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$out/device.txt"
    ./jv4 gpu 2>&1 | tee -a "$out/device.txt"
fi
if has load || has text || has engine || has parity || has fidelity || has images || has embed || has serve || has soak || has cold; then
    if [ ! -f "$model/config.json" ]; then
        ./jv4 synth --preset full --out "$model" 2>&1 | tee "$out/synth.txt"
    fi
fi
if has load; then
    echo "== checkpoint load"
    ./jv4 info --model "$model" 2>&1 | tee "$out/info.txt"
fi
if has ops; then
    echo "== op benchmark (ours vs PyTorch, same call)"
    torch_ok && { python3 torch_ops_bench.py --json "$out/torch_ops.json" > "$out/torch_ops.txt" 2>&1 || echo "torch ops benchmark failed: see $out/torch_ops.txt"; }
    ./jv4-bench ops --torch-json "$out/torch_ops.json" 2>&1 | tee "$out/bench_ops.txt"
fi
if has text; then
    echo "== text benchmark (ours vs PyTorch, same call)"
    # $JV4_TORCH_TEXT_ARGS: e.g. "--compile-budget-s 100 --fixed-modes default" to bound compiling.
    # shellcheck disable=SC2086
    torch_ok && { python3 torch_text_bench.py --model "$model" --json "$out/torch_text.json" ${JV4_TORCH_TEXT_ARGS:-} > "$out/torch_text.txt" 2>&1 || echo "torch text benchmark failed: see $out/torch_text.txt"; }
    ./jv4-bench text --model "$model" --torch-json "$out/torch_text.json" --max-batch-tokens 32768 2>&1 | tee "$out/bench_text.txt"
    # $JV4_TEXT_AB: settings to A/B in the same call, e.g. "JV4_LORA=merged JV4_BLAS_INVARIANT=0".
    for ab in ${JV4_TEXT_AB:-}; do
        echo "-- with $ab:"
        env "$ab" ./jv4-bench text --model "$model" --torch-json "$out/torch_text.json" --max-batch-tokens 32768 2>&1 | tee "$out/bench_text_${ab%%=*}.txt"
    done
    # A baseline build carried beside this one (base/jv4-bench): the same workloads, same call.
    if [ -x base/jv4-bench ]; then
        echo "-- baseline build (base/):"
        base/jv4-bench text --model "$model" --torch-json "$out/torch_text.json" --max-batch-tokens 32768 2>&1 | tee "$out/bench_text_base.txt"
    fi
fi
if has engine; then
    echo "== engine (Engine::embed end to end; compare with the text stage's bare forwards)"
    ./jv4-bench engine --model "$model" --max-batch-tokens 32768 2>&1 | tee "$out/bench_engine.txt"
fi
if has parity; then
    echo "== full-model parity against PyTorch bf16"
    if torch_ok && python3 reference.py texts --model "$model" --out "$out/ref_texts.safetensors" > "$out/ref_texts.txt" 2>&1; then
        ./jv4-bench parity --model "$model" --reference "$out/ref_texts.safetensors" 2>&1 | tee "$out/parity.txt"
    else
        echo "reference run failed: see $out/ref_texts.txt"
    fi
fi
if has fidelity; then
    echo "== fidelity against float32 (ours merged, ours stacked, PyTorch bf16)"
    lens=16,100,512,1000,2048,8192 # fp32 SDPA at 32k would need a 64 GB score matrix
    if torch_ok && python3 reference.py texts --lengths $lens --model "$model" --out /tmp/fid_bf16.safetensors > "$out/fid_bf16.txt" 2>&1 \
        && python3 reference.py texts --lengths $lens --fp32 --model "$model" --out /tmp/fid_fp32.safetensors > "$out/fid_fp32.txt" 2>&1; then
        echo "-- PyTorch bf16 (as jina runs it) vs fp32"
        python3 reference.py compare /tmp/fid_bf16.safetensors /tmp/fid_fp32.safetensors 2>&1 | grep -v '^done' | tee "$out/fid_torch.txt"
        for mode in merged stacked; do
            echo "-- ours, LoRA $mode, vs fp32"
            JV4_LORA=$mode ./jv4-bench parity --model "$model" --reference /tmp/fid_fp32.safetensors 2>&1 | tee "$out/fid_$mode.txt"
        done
    else
        echo "reference run failed:"; tail -3 "$out/fid_bf16.txt" "$out/fid_fp32.txt"
    fi
fi
if has survey; then
    echo "== cuBLASLt survey"
    ./jv4-bench blas-survey 2>&1 | tee "$out/survey.txt"
fi
if has serve; then
    echo "== server load (jv4 serve over loopback) beside the offline engine"
    JV4_BIN_DIR="$here" bash serve_bench.sh "$model" cuda 2>&1 | tee "$out/serve.txt"
fi
if has images; then
    echo "== images: full-model parity and speed against PyTorch bf16"
    if torch_ok && python3 reference.py images --model "$model" --out /tmp/ref_images.safetensors > "$out/ref_images.txt" 2>&1; then
        ./jv4-bench images --model "$model" --reference /tmp/ref_images.safetensors 2>&1 | tee "$out/images.txt"
        if [ -x base/jv4-bench ]; then
            echo "-- baseline build (base/):"
            base/jv4-bench images --model "$model" --reference /tmp/ref_images.safetensors 2>&1 | tee "$out/images_base.txt"
        fi
        if [ -n "${JV4_AB_REDUCTION:-}" ]; then
            echo "-- JV4_BLAS_REDUCTION=any:"
            JV4_BLAS_REDUCTION=any ./jv4-bench images --model "$model" --reference /tmp/ref_images.safetensors 2>&1 | tee "$out/images_anyreduction.txt"
        fi
    else
        echo "reference run failed:"; tail -5 "$out/ref_images.txt"
    fi
fi
if has embed; then
    echo "== the runner (texts, an image, bad lines)"
    printf '%s\n' '{"id": "q1", "text": "What is the capital of France?"}' \
        '{"id": "p1", "text": "Paris is the capital of France.", "prompt_name": "passage"}' \
        '{"id": "bad", "text": 42}' 'not json' \
        '{"id": "c1", "text": "fn main() {}", "task": "code", "prompt_name": "passage"}' \
        "{\"id\": \"img\", \"image\": \"$here/../tests/fixtures/images/grad_224x224.png\"}" \
        '{"id": "img64-bad", "image_base64": "aGVsbG8="}' > "$out/embed_in.jsonl"
    ./jv4 embed --model "$model" --device cuda --input "$out/embed_in.jsonl" --output "$out/embed_out.jsonl" --dims 128 --vector both 2> "$out/embed_err.txt"
    echo "exit $? ; $(wc -l < "$out/embed_out.jsonl") output lines; errors:"; cat "$out/embed_err.txt" | tail -5
    python3 -c "import json,sys; [print(d.get('id'), len(d.get('embedding', [])), len(d.get('multi_vector', [])), d.get('error','')) for d in map(json.loads, open(sys.argv[1]))]" "$out/embed_out.jsonl"
    echo "-- an image larger than the patch budget by itself (resized down to fit, no out-of-memory):"
    printf '%s\n' "{\"id\": \"big\", \"image\": \"$here/../tests/fixtures/images/big_600x800.webp\", \"max_pixels\": 12845056}" \
        | ./jv4 embed --model "$model" --max-batch-patches 1024 --vector multi 2>&1 \
        | python3 -c "import json,sys; [print(d.get('id'), 'tokens', len(d.get('multi_vector', [])), d.get('error','')) for d in map(json.loads, sys.stdin)]"
fi
rc=0
if has cold; then
    bash cold_start.sh || rc=1
fi
if has soak; then
    bash soak.sh || rc=1
fi
if has sanitize; then
    echo "== sanitize (compute-sanitizer memcheck, synccheck, initcheck, racecheck)"
    bash sanitize.sh || rc=1
fi
if has tests; then
    echo "== GPU test suite"
    ./gpu-tests 2>&1 | tee "$out/gpu-tests.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
# Last: a sticky error breaks the context of its process, so each fault test has its own.
if has faults; then
    echo "== device faults (each test in a process of its own)"
    for t in device_fault_turns_the_engine_lost device_fault_on_one_of_two_devices; do
        JV4_GPU_FAULT=$t ./gpu-tests > "$out/fault_$t.log" 2>&1 || rc=1
        grep -E '^(test |  )' "$out/fault_$t.log" | tail -4
    done
    if has tests; then
        echo "suite: $(tail -1 "$out/gpu-tests.log")"
    fi
fi
exit $rc
