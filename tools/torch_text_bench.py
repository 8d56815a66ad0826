"""PyTorch timings of the text workloads `jv4-bench text` runs, for the ratio column: the model of
tools/reference.py (transformers' Qwen2.5-VL, SDPA, bf16 weights under bf16 autocast, per-row task
LoRA unmerged, jina's pooling and projector), padded batches the way jina's encode_text makes them.
Token ids are random with the same lengths as ours (timings do not depend on the ids).

    python3 tools/torch_text_bench.py --model DIR --json torch_text.json
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

TASKS = reference.TASKS


def workloads():
    # The same lengths as jv4-bench text: spread over 16..1024 by a formula both sides compute.
    docs = [16 + (i * 7919) % 1009 for i in range(256)]
    return {
        "docs256": docs,
        "32x512": [512] * 32,
        "2x8192": [8192] * 2,
        "1x32768": [32768],
        "query16": [16],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=8, help="jina's encode_text batch size for docs256")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    dev = "cuda"
    model, projector, cfg = reference.build(args.model, torch.bfloat16, dev)
    vocab = min(cfg["text_config"]["vocab_size"], 150000)
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, lengths in workloads().items():
        seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
        bs = args.batch if name == "docs256" else len(seqs)
        batches = [seqs[i : i + bs] for i in range(0, len(seqs), bs)]

        def run():
            for b in batches:
                _, _, h, mask = reference.forward(model, projector, b, ["retrieval"] * len(b), cfg["image_token_id"])
                reference.pool_text(h, mask)

        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            run()  # warm-up
            torch.cuda.synchronize()
            times = []
            for _ in range(args.iters if name != "query16" else 20):
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        times.sort()
        sec = times[len(times) // 2]
        out[name] = {"ms": sec * 1e3, "tok_s": sum(lengths) / sec, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(f"{name:<10} {sec * 1e3:9.2f} ms {sum(lengths) / sec:10.0f} tok/s peak {out[name]['peak_gb']:.1f} GB", flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
