"""encode_document throughput through the Python wheel against the Rust engine, on one engine in
one process: the text benches' 256-document mix as texts (`jv4._jv4._docs256`: document i has
16 + (i * 7919) % 1009 tokens with its passage prompt, as `jv4-bench text` docs256), embedded by
`Engine.encode_document(docs)` (Python lists in, a NumPy array out) and by `Engine::embed` called
from Rust on the same strings (`jv4._jv4._time_embed`: requests built per pass, no Python object
per input). The two alternate, `--rounds` times `--reps` passes each after a warm-up of both;
medians are compared. Prints one JSON line and the verdict (target: within 5%).

    python3 py_docs_bench.py --model DIR [--device cuda:0] [--rounds 3] [--reps 3] [--max-batch-tokens 16384] [--docs N]
"""

import argparse
import json
import statistics
import sys
import time

import jv4
from jv4 import _jv4


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--docs", type=int, default=256, help="the first N documents only (a smoke test)")
    a = ap.parse_args()
    docs = _jv4._docs256(a.model)[: a.docs]
    engine = jv4.Engine(a.model, device=a.device, max_batch_tokens=a.max_batch_tokens)
    tokens = int(engine.encode(docs, prompt_name="passage").tokens.sum())
    out = engine.encode_document(docs)  # warm-up of both paths
    assert out.shape == (len(docs), engine.hidden_size)
    rust_tokens, _ = _jv4._time_embed(engine._engine, docs, 1)
    if rust_tokens != tokens:
        print(f"token counts differ: Rust {rust_tokens}, Python {tokens}", file=sys.stderr)
        return 1
    py, rust = [], []
    for _ in range(max(1, a.rounds)):
        rust += _jv4._time_embed(engine._engine, docs, a.reps)[1]
        for _ in range(a.reps):
            t0 = time.perf_counter()
            engine.encode_document(docs)
            py.append(time.perf_counter() - t0)
    p, r = statistics.median(py), statistics.median(rust)
    line = {
        "docs": len(docs),
        "tokens": tokens,
        "python_sec": p,
        "rust_sec": r,
        "python_tok_s": tokens / p,
        "rust_tok_s": tokens / r,
        "ratio": r / p,
        "python_all": py,
        "rust_all": rust,
    }
    print(json.dumps(line))
    verdict = "within 5%" if line["ratio"] >= 0.95 else "MORE THAN 5% SLOWER"
    print(
        f"encode_document docs256 ({len(docs)} documents, {tokens} tokens): Python {tokens / p:.0f} tok/s, Rust Engine::embed "
        f"{tokens / r:.0f} tok/s, ratio {line['ratio']:.3f} ({verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
