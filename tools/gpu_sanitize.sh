#!/usr/bin/env bash
# The sanitize stage (issue 12, deliverable 7): the GPU suite's attention, model and engine tests
# under compute-sanitizer memcheck, synccheck and initcheck (GEMM outputs marked, see below), and
# the attention tests (small shapes) under racecheck. Each tool's log goes to $OUT/san_<tool>.txt; one summary line per tool:
#   sanitize <tool>: N errors (suite: P passed, F failed) in S s
# then the initcheck probe of cuBLASLt (tests/gpu/probe.rs), one line per operand left unwritten,
# which tells where any initcheck report inside cuBLAS comes from. The exit status is non-zero
# when a tool found errors or a test failed.
#
# Runs from the packed folder (tools/pack_gpu.sh copies it to .gpu/sanitize.sh), on the device:
#   bash .gpu/sanitize.sh               # or JV4_STAGES=sanitize bash .gpu/run.sh
# Settings: $JV4_SAN_TOOLS (default "memcheck synccheck initcheck racecheck"; "probe": only the
# initcheck probes), $JV4_SAN_TESTS (name filters of the suite, default "attention_ text_
# image_outputs engine_ chunk_ linear_stream_matches"), $JV4_SAN_RACE_TESTS (default
# "attention_matches_reference attention_rejects linear_stream_matches"), the attention cases'
# size cap $JV4_SAN_ATTN_MAX_TOKENS (default 6000; racecheck 1600), the weight-streaming GEMM's
# cases $JV4_STREAM_CASES, $JV4_SAN_TIMEOUT per tool run in seconds (default 240),
# $JV4_SAN_INITCHECK_ARGS (extra initcheck options), $JV4_SAN_TAILS=0 (skip the operand-tail probes).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
cd "$here"
# The packed binaries travel gzipped (tools/pack_gpu.sh): unpack them once.
for b in jv4 jv4-bench gpu-tests; do [ -f "$b.gz" ] && gunzip -f "$b.gz" && chmod +x "$b"; done
export JV4_FIXTURES="${JV4_FIXTURES:-$here/../tests/fixtures}"
san="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
if [ -z "$san" ]; then
    echo "sanitize: compute-sanitizer not found"
    exit 1
fi
tools="${JV4_SAN_TOOLS:-memcheck synccheck initcheck racecheck}"
tests="${JV4_SAN_TESTS:-attention_ text_ image_outputs engine_ chunk_ linear_stream_matches}"
race_tests="${JV4_SAN_RACE_TESTS:-attention_matches_reference attention_rejects linear_stream_matches}"
# The weight-streaming GEMM under the sanitizers: three cases (gate_up takes the 64-row tiles).
export JV4_STREAM_CASES="${JV4_STREAM_CASES:-o_lora_a,qkv,gate_up}"
limit="${JV4_SAN_TIMEOUT:-240}"
status=0

# The error count of a sanitizer log (racecheck has its own summary line).
errors_of() {
    local n
    n=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$1" | tail -1 | grep -Eo '[0-9]+')
    if [ -z "$n" ]; then
        n=$(grep -Eo 'RACECHECK SUMMARY: [0-9]+ hazards? displayed \([0-9]+ error' "$1" | tail -1 | grep -Eo '\([0-9]+' | tr -d '(')
    fi
    echo "${n:-?}"
}

# The kernels named by a log's reports (the line after each report: "at <kernel>+0x.." in newer
# versions, "at 0x.. in <kernel>" in older ones).
kernels_of() {
    grep -A1 -E '^========= +(Uninitialized|Invalid|Race|Barrier)' "$1" | grep -E '^========= +at ' |
        sed -E 's/^=+ +at +//; s/^0x[0-9a-f]+ in //; s/^void //; s/[(<+].*//' | sort -u | head -5 | tr '\n' ' '
}

# run <label> <log> <env...> -- <sanitizer args...> -- <test filters...>
run_tool() {
    local label=$1 log=$2
    shift 2
    local envs=() args=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    while [ "$1" != "--" ]; do args+=("$1"); shift; done
    shift
    local t0=$SECONDS
    env "${envs[@]}" timeout "$limit" "$san" "${args[@]}" ./gpu-tests "$@" > "$log" 2>&1
    local rc=$? took=$((SECONDS - t0))
    local n suite
    n=$(errors_of "$log")
    suite=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    [ "$rc" = 124 ] && suite="TIMED OUT after ${limit} s; ${suite:-no summary}"
    echo "sanitize $label: $n errors (suite: ${suite:-none}) in ${took} s"
    if [ "$n" != 0 ] || [ "$rc" != 0 ]; then
        status=1
        # The first reports, for the note: what was read, by which kernel.
        grep -E '^========= +(Uninitialized|Invalid|Race|Barrier|Program hit|Error)|^========= +at |^========= +Address|^=========     Device Frame' "$log" | head -12 | sed 's/^/    /'
        echo "    kernels: $(kernels_of "$log")"
    fi
    last_errors=$n
}
last_errors=0

# shellcheck disable=SC2086
for tool in $tools; do
    case $tool in
        racecheck)
            run_tool racecheck "$out/san_racecheck.txt" JV4_ATTN_MAX_TOKENS="${JV4_SAN_RACE_MAX_TOKENS:-1600}" \
                JV4_STREAM_CASES="${JV4_SAN_RACE_STREAM_CASES:-o_lora_a}" -- \
                --tool racecheck --racecheck-report hazard --print-limit 50 -- $race_tests
            ;;
        probe) ;; # the initcheck probes only (below)
        initcheck)
            # Each GEMM's output marked (JV4_SANITIZE_MARK_GEMM=1, src/cuda/blas.rs): the tool does
            # not see cuBLASLt's stores (the probe below shows it), and the mark covers exactly what
            # a GEMM writes. Eager forwards (JV4_GRAPHS=0): under initcheck a graph replay reports
            # reads of rows its own nodes wrote, cause not found (docs/RELIABILITY.md); a graph
            # replays the eager forward bit for bit (graph_forward_equals_eager_bitwise).
            run_tool initcheck "$out/san_initcheck.txt" JV4_ATTN_MAX_TOKENS="${JV4_SAN_ATTN_MAX_TOKENS:-6000}" \
                JV4_SANITIZE_MARK_GEMM=1 JV4_GRAPHS=0 -- --tool initcheck --print-limit 50 ${JV4_SAN_INITCHECK_ARGS:-} -- $tests
            ;;
        *)
            run_tool "$tool" "$out/san_$tool.txt" JV4_ATTN_MAX_TOKENS="${JV4_SAN_ATTN_MAX_TOKENS:-6000}" -- \
                --tool "$tool" --print-limit 50 -- $tests
            ;;
    esac
done

# Where initcheck's reports inside cuBLAS come from: the GEMMs of the model at 1-17 rows with
# every operand at the start of its pages; first with every tail written, then with one
# operand's tail left unwritten at a time. Reports with everything written: cuBLAS reads its
# own memory (workspace); reports only for one operand: it reads past that operand's end
# (values that, as the probe checks in the suite, never change a result).
case " $tools " in *" initcheck "* | *" probe "*)
    # Does initcheck see a GEMM's stores? y = x·wᵀ then our swiglu reads y (values checked), at
    # heights where cuBLASLt runs gemv, small-tile and Hopper TMA-store kernels; then the same
    # with the output marked (JV4_SANITIZE_MARK_GEMM=1).
    # ($JV4_SAN_PROBES=0 skips them.)
    [ "${JV4_SAN_PROBES:-1}" = 0 ] || for m in 1 16 512 4096; do
        for mark in 0 1; do
            log="$out/san_probe_gemm_m${m}_mark${mark}.txt"
            JV4_PROBE_M=$m JV4_SANITIZE_MARK_GEMM=$mark timeout "$limit" "$san" --tool initcheck --print-limit 5 \
                ./gpu-tests probe_gemm_output_read_by_a_kernel > "$log" 2>&1
            n=$(errors_of "$log")
            suite=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
            echo "sanitize initcheck probe, a GEMM's output read by swiglu, m=$m, marked=$mark: $n errors (${suite:-no summary}) $(kernels_of "$log")"
        done
    done
    # Does initcheck see the writes made inside a graph launch (a kernel node; a memset node)?
    # Then gelu(y) eagerly reads them (values checked); the control runs everything eagerly.
    for graph in 1 memset 0; do
        log="$out/san_probe_graph${graph}.txt"
        JV4_PROBE_GRAPH=$graph timeout "$limit" "$san" --tool initcheck --print-limit 5 \
            ./gpu-tests probe_graph_writes_read_eagerly > "$log" 2>&1
        n=$(errors_of "$log")
        suite=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
        echo "sanitize initcheck probe, a graph's output read eagerly, graph=$graph: $n errors (${suite:-no summary}) $(kernels_of "$log")"
    done
    # A graph of two nodes, embedding then rmsnorm, at 16 then 64 rows from one pool (the open
    # graph case of docs/RELIABILITY.md).
    log="$out/san_probe_graph_chain.txt"
    timeout "$limit" "$san" --tool initcheck --print-limit 5 ./gpu-tests probe_graph_chain_embedding_rmsnorm > "$log" 2>&1
    echo "sanitize initcheck probe, a two-node graph (embedding, rmsnorm), 16 then 64 rows: $(errors_of "$log") errors ($(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)) $(kernels_of "$log")"
    # Graphs held together from one shared pool, with GEMM nodes (probe_graph_pool_forward_like),
    # unmarked and marked; then the model's own graph test, marked, with graphs on.
    for mark in 0 1; do
        log="$out/san_probe_graph_pool_mark${mark}.txt"
        JV4_SANITIZE_MARK_GEMM=$mark timeout "$limit" "$san" --tool initcheck --print-limit 5 \
            ./gpu-tests probe_graph_pool_forward_like > "$log" 2>&1
        echo "sanitize initcheck probe, held graphs from one pool with GEMM nodes, marked=$mark: $(errors_of "$log") errors ($(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)) $(kernels_of "$log")"
    done
    # The same with 36 layers (hundreds of nodes, as the model's graphs have: their reports come
    # only from each new graph's first launch, docs/RELIABILITY.md).
    log="$out/san_probe_graph_pool_36.txt"
    JV4_PROBE_LAYERS=36 JV4_SANITIZE_MARK_GEMM=1 timeout "$limit" "$san" --tool initcheck --print-limit 5 \
        ./gpu-tests probe_graph_pool_forward_like > "$log" 2>&1
    echo "sanitize initcheck probe, held graphs from one pool, 36 layers, marked: $(errors_of "$log") errors ($(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)) $(kernels_of "$log")"
    log="$out/san_graph_forward.txt"
    JV4_SANITIZE_MARK_GEMM=1 timeout "$limit" "$san" --tool initcheck --print-limit 20 \
        ./gpu-tests graph_forward_equals_eager_bitwise > "$log" 2>&1
    echo "sanitize initcheck, graph_forward_equals_eager_bitwise (graphs on, marked): $(errors_of "$log") errors ($(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)) $(kernels_of "$log")"
    # (cuBLASLt's reads past its operands: 0 errors on the H200 in every case; $JV4_SAN_TAILS=0 skips.)
    [ "${JV4_SAN_TAILS:-1}" = 0 ] || for left in "" x w bias y; do
        log="$out/san_probe_${left:-none}.txt"
        JV4_PROBE_UNWRITTEN="$left" timeout "$limit" "$san" --tool initcheck --print-limit 5 \
            ./gpu-tests linear_ignores_bytes_past_its_operands > "$log" 2>&1
        n=$(errors_of "$log")
        kernels=$(kernels_of "$log")
        echo "sanitize initcheck probe, tails unwritten: ${left:-none}: $n errors ${kernels:+(kernels: $kernels)}"
    done
    ;;
esac
exit $status
