#!/usr/bin/env bash
# Cold start (issue 12, deliverable 6), with the checkpoint in the page cache: three runs each of
#   - `jv4 info`: the load report (bytes, seconds, GB/s of the checkpoint to the GPU), then once
#     at each fill-thread count of $JV4_COLD_THREADS;
#   - `jv4-bench load`: the parts of the load alone ($JV4_LOAD_BENCH=0 skips it);
#   - `jv4 embed` on one text: wall time from the process's start to its first output line (the
#     first embedding written), and to its exit.
# Targets: ≥ 15 GB/s, ≤ 3 s to the first embedding. Prints one line per run and a summary.
#
# Runs from the packed folder (tools/pack_gpu.sh copies it to .gpu/cold_start.sh):
#   bash .gpu/cold_start.sh             # the log goes to $OUT/cold_start.txt
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
cd "$here"
# The packed binaries travel gzipped (tools/pack_gpu.sh): unpack them once.
for b in jv4 jv4-bench gpu-tests; do [ -f "$b.gz" ] && gunzip -f "$b.gz" && chmod +x "$b"; done
model="${JV4_MODEL_DIR:-/tmp/jv4-synth-full}"
if [ ! -f "$model/config.json" ]; then
    ./jv4 synth --preset full --out "$model" > "$out/synth.txt" 2>&1 || { echo "cold start: synth failed"; exit 1; }
fi
# Into the page cache (and the driver warmed once, as a host that restarts would find it).
cat "$model"/*.safetensors "$model"/adapters/*.safetensors > /dev/null
./jv4 info --model "$model" > /dev/null 2>&1
echo "== cold start ($model, checkpoint in the page cache)" | tee "$out/cold_start.txt"
for i in 1 2 3; do
    ./jv4 info --model "$model" 2>&1 | grep -E '^(loaded onto|prepared for)' | sed "s/^/info run $i: /" | tee -a "$out/cold_start.txt"
done
# The load at several fill-thread counts ($JV4_LOAD_THREADS; the default is src/cuda/staging.rs's).
for t in ${JV4_COLD_THREADS:-2 4 8 12 16}; do
    JV4_LOAD_THREADS=$t ./jv4 info --model "$model" 2>&1 | grep -E '^(loaded onto|prepared for)' | sed "s/^/info, $t fill threads: /" | tee -a "$out/cold_start.txt"
done
# Where the load's time goes: each part of the page cache → GPU path alone (benches/load.rs).
[ "${JV4_LOAD_BENCH:-1}" = 0 ] || ./jv4-bench load --model "$model" --threads "${JV4_LOAD_BENCH_THREADS:-1,2,4,8,16}" 2>&1 | tee -a "$out/cold_start.txt"
python3 - "$here/jv4" "$model" "${JV4_COLD_DEVICE:-cuda}" <<'PY' 2>&1 | tee -a "$out/cold_start.txt"
import subprocess, sys, time
jv4, model, device = sys.argv[1], sys.argv[2], sys.argv[3]
firsts = []
for i in range(3):
    t0 = time.monotonic()
    p = subprocess.Popen([jv4, "embed", "--model", model, "--device", device],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(b'{"id": "q", "text": "What is the capital of France?"}\n')
    p.stdin.close()
    line = p.stdout.readline()
    t1 = time.monotonic()
    p.stdout.read()
    err = p.stderr.read().decode(errors="replace").strip().splitlines()
    rc = p.wait()
    t2 = time.monotonic()
    ok = b'"embedding"' in line and b'"id":"q"' in line
    firsts.append(t1 - t0)
    print(f"embed run {i + 1}: first embedding written after {t1 - t0:.2f} s, exit after {t2 - t0:.2f} s "
          f"(exit {rc}, {'an embedding' if ok else 'NO embedding: ' + line[:120].decode(errors='replace')})"
          + (f"; stderr: {err[-1]}" if err else ""))
best = min(firsts)
print(f"cold start: first embedding in {best:.2f} s best of 3 (median {sorted(firsts)[1]:.2f} s); target <= 3 s: "
      + ("met" if best <= 3.0 else "missed"))
PY
