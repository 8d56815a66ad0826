#!/usr/bin/env bash
# Load figures of `jv4 serve` (issue 13) on one machine, over loopback: optionally the offline
# engine first (`jv4-bench engine`, the same docs256 mix and 16-token queries called in-process),
# then `jv4 serve` on the model folder, a wait for /health, `jv4-bench serve-load` against it,
# and the server stopped with SIGTERM (it must exit 0 after finishing what is queued).
#
# Usage: bash tools/serve_bench.sh MODEL_DIR [DEVICE] [serve-load args...]
#   DEVICE: cuda (default), cuda:N or cpu. $JV4_BIN_DIR: where jv4 and jv4-bench are
#   (default target/release). $JV4_BENCH_OFFLINE=0 skips the offline engine run (on by default
#   for CUDA; it needs a GPU). $JV4_SERVE_ARGS: extra `jv4 serve` flags. $JV4_SERVE_PORT (18080).
# Small CPU check: bash tools/serve_bench.sh /tmp/tiny cpu --concurrency 1,4 --seconds 1 \
#   --max-requests 40 --docs 8 --reps 1
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: serve_bench.sh MODEL_DIR [DEVICE] [serve-load args...]}
device=${2:-cuda}
shift $(( $# >= 2 ? 2 : 1 ))
bin=${JV4_BIN_DIR:-target/release}
port=${JV4_SERVE_PORT:-18080}
offline_default=1
[ "$device" = cpu ] && offline_default=0
if [ "${JV4_BENCH_OFFLINE:-$offline_default}" = 1 ]; then
    echo "== offline engine (jv4-bench engine, 256 callers) =="
    "$bin/jv4-bench" engine --model "$model" --callers 256
fi

echo "== jv4 serve --device $device on 127.0.0.1:$port =="
log=$(mktemp)
# shellcheck disable=SC2086
"$bin/jv4" serve --model "$model" --device "$device" --host 127.0.0.1 --port "$port" \
    --max-queue 4096 ${JV4_SERVE_ARGS:-} 2>"$log" &
pid=$!
stop() { kill "$pid" 2>/dev/null || true; }
trap stop EXIT
up=0
for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        # /health answers 200 once the model is loaded (the port opens only then).
        if printf 'GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' | \
            (exec 3<>"/dev/tcp/127.0.0.1/$port"; cat >&3; head -1 <&3) | grep -q ' 200 '; then
            up=1
            break
        fi
    fi
    sleep 0.5
done
if [ "$up" != 1 ]; then
    echo "jv4 serve did not come up:"
    cat "$log"
    exit 1
fi
head -1 "$log"

echo "== jv4-bench serve-load =="
"$bin/jv4-bench" serve-load --url "http://127.0.0.1:$port" "$@"

kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
trap - EXIT
tail -1 "$log"
rm -f "$log"
if [ "$rc" != 0 ]; then
    echo "jv4 serve exited with $rc after SIGTERM"
    exit 1
fi
echo "serve_bench: done"
