"""PyTorch timings of the text workloads `jv4-bench text` runs, for its ratio columns. Two row sets:

- "as jina runs it" (keys `<workload>`): the model of tools/reference.py (transformers' Qwen2.5-VL,
  SDPA, bf16 weights under bf16 autocast, per-row task LoRA unmerged, jina's pooling and projector),
  padded batches the way jina's encode_text makes them;
- "best stock PyTorch" (keys `best/<workload>`): what a demanding user would run instead. The
  retrieval LoRA merged into the weights (W + scale·B·A in f32, rounded to bf16, plain nn.Linear),
  sequences sorted by length in right-padded batches of 32, SDPA forced onto its fastest backend
  that takes the shape (cuDNN, else flash, else memory-efficient), `torch.compile` (max-autotune,
  else the default mode, for the fixed-shape documents; CUDA graphs for the query; dynamic shapes
  or eager for the document mix, whichever is faster). Pooling and the multi-vector projector run
  in both. Compiling is bounded by --compile-budget-s over all workloads: a compile past it is
  interrupted and the next mode (or eager) runs, and `config` says so. On the H200 one
  max-autotune compile of the 36-layer model at 32 x 512 takes more than 170 s.

Each row has ms, tok_s and peak_gb (torch.cuda.max_memory_allocated, reset per workload); best rows
add `config`, a string saying exactly what ran. Token ids are random with the same lengths as ours
(timings do not depend on the ids).

    python3 tools/torch_text_bench.py --model DIR --json torch_text.json [--rows shipped,best]
    # CPU smoke test on the tiny synthetic model (compile in default mode, no SDPA backend choice):
    python3 tools/torch_text_bench.py --model /tmp/tiny-model --json /tmp/t.json --device cpu \
        --workloads docs256,32x512,query16
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference  # noqa: E402

TASKS = reference.TASKS
BEST_BATCH = 32


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


class Device:
    """The few calls that differ between the GPU and the CPU smoke test."""

    def __init__(self, name):
        self.name = name
        self.cuda = name == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else 0.0


def median_time(dev, run, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        dev.sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def row(lengths, sec, peak, **extra):
    return {"ms": sec * 1e3, "tok_s": sum(lengths) / sec, "peak_gb": peak, **extra}


def save(out, path):
    # After every row, so a run cut short by a time limit still leaves what it measured.
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def print_row(name, r):
    print(f"{name:<15} {r['ms']:9.2f} ms {r['tok_s']:10.0f} tok/s peak {r['peak_gb']:.1f} GB", flush=True)


# ---------------------------------------------------------------------------------------------
# As jina runs it


def shipped_rows(model, projector, cfg, all_seqs, args, dev, out):
    for name, seqs in all_seqs.items():
        lengths = [len(s) for s in seqs]
        bs = args.batch if name == "docs256" else len(seqs)
        batches = [seqs[i : i + bs] for i in range(0, len(seqs), bs)]

        def run():
            for b in batches:
                _, _, h, mask = reference.forward(model, projector, b, ["retrieval"] * len(b), cfg["image_token_id"])
                reference.pool_text(h, mask)

        dev.reset_peak()
        with torch.no_grad(), torch.autocast(dev.name, dtype=torch.bfloat16):
            run()  # warm-up
            dev.sync()
            sec = median_time(dev, run, args.iters if name != "query16" else 20)
        out[name] = row(lengths, sec, dev.peak_gb())
        print_row(name, out[name])
        save(out, args.json)


def shipped_vectors(model, projector, cfg, seqs, dev):
    """Single vectors of one padded batch as jina computes them (the merge check's reference)."""
    with torch.no_grad(), torch.autocast(dev.name, dtype=torch.bfloat16):
        _, _, h, mask = reference.forward(model, projector, seqs, ["retrieval"] * len(seqs), cfg["image_token_id"])
        return reference.pool_text(h, mask).float()


# ---------------------------------------------------------------------------------------------
# Best stock PyTorch


def merge_lora(model, projector, task="retrieval"):
    """Replaces every task-LoRA linear by its base nn.Linear with W + scale·B·A of `task` (in f32,
    rounded once to the weights' dtype); the adapters of all tasks are dropped. Returns the projector."""
    key = task.replace("-", "_")

    def merged(m):
        base = m.base
        with torch.no_grad():
            a, b = m.lora_a[key].float(), m.lora_b[key].float()
            w = base.weight.float() + m.scale * (b @ a)
            base.weight.copy_(w.to(base.weight.dtype))
        return base

    for layer in model.model.language_model.layers:
        for block, projs in reference.LORA_TARGETS.items():
            parent = getattr(layer, block)
            for p in projs:
                setattr(parent, p, merged(getattr(parent, p)))
    return merged(projector)


def make_embed(model, projector, masked):
    """One batch -> (single vectors, multi-vector rows). Text only, so the language model is called
    directly with its default 1-D positions (identical to M-RoPE's for text). Equal-length batches hand
    transformers a ready mask mapping of None, so SDPA gets is_causal and no mask tensor (transformers
    < 5.x under torch < 2.14 would otherwise materialise an [L, L] mask while compiling)."""
    lm = model.model.language_model

    def embed(ids, mask):
        attn = mask if masked else {"full_attention": None}
        h = lm(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        multi = F.normalize(projector(h), p=2, dim=-1)
        return reference.pool_text(h, mask), multi

    return embed


def padded(batch, device):
    L = max(len(x) for x in batch)
    ids = torch.zeros((len(batch), L), dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


SDPA_ORDER = ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"]


def sdpa_context(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


class Budget:
    """Total seconds torch.compile may take over all workloads; a compile that would run past it is
    interrupted (SIGALRM) and the workload falls back to eager."""

    def __init__(self, seconds):
        self.left = seconds

    def call(self, fn, share=1.0):
        if self.left < 5:
            raise TimeoutError("compile budget spent")

        def alarm(_sig, _frame):
            raise TimeoutError("compile ran past the budget")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, self.left * share)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            self.left -= time.perf_counter() - t0


def min_cos(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def best_workload(name, seqs, embed_of, args, dev, budget, modes, dynamic=False, eager_fallback=True):
    """Times one workload in the best configuration, compiled with the first of `modes` that compiles
    within the budget (eager if none does, or with no modes); returns (its row, None), or (None,
    why) where no mode compiled and `eager_fallback` is off."""
    lengths = [len(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    batches = [[seqs[i] for i in order[k : k + BEST_BATCH]] for k in range(0, len(order), BEST_BATCH)]
    masked = any(len(set(len(s) for s in b)) > 1 for b in batches)
    eager = embed_of(masked)
    parts = ["LoRA merged (retrieval, bf16 weights)", f"sorted by length, batches of {BEST_BATCH}",
             "right-padded with mask" if masked else "equal lengths, is_causal (no mask)"]

    # The SDPA backend: the first of cuDNN, flash, memory-efficient that takes every batch's shape.
    inputs = [padded(b, dev.name) for b in batches]
    backend = None
    with torch.no_grad():
        if dev.cuda:
            for cand in SDPA_ORDER:
                try:
                    with sdpa_context(cand):
                        ref = [eager(*x)[0].float() for x in inputs]
                    dev.sync()
                    backend = cand
                    break
                except RuntimeError as e:
                    print(f"  {name}: SDPA {cand} refused: {str(e).splitlines()[0][:160]}", flush=True)
            if backend is None:
                ref = [eager(*x)[0].float() for x in inputs]
        else:
            ref = [eager(*x)[0].float() for x in inputs]
    parts.append(f"SDPA {backend.split('_')[0].lower() if backend else 'default'}")

    def ctx():
        return sdpa_context(backend) if backend else contextlib.nullcontext()

    def run_with(fn):
        def run():
            for b in batches:
                fn(*padded(b, dev.name))
        return run

    def measure(fn, mode):
        run = run_with(fn)
        with torch.no_grad(), ctx():
            dev.reset_peak()
            run()  # warm-up (a second one for CUDA graphs, which record on it)
            if mode == "reduce-overhead":
                run()
            dev.sync()
            sec = median_time(dev, run, args.iters if name != "query16" else 20)
        return sec, dev.peak_gb()

    compiled_s, cos, used, failed = None, None, None, []
    fn = eager
    for k, mode in enumerate(modes):
        label = f"torch.compile(mode={mode!r}{', dynamic=True' if dynamic else ''})"
        comp = torch.compile(eager, mode=mode, dynamic=dynamic if dynamic else False)

        def first():
            with torch.no_grad(), ctx():
                got = [comp(*x)[0].float() for x in inputs]
                dev.sync()
                return got

        t0 = time.perf_counter()
        try:
            # A mode with a fallback after it gets at most half of what is left of the budget.
            got = budget.call(first, share=0.5 if k + 1 < len(modes) else 1.0)
            compiled_s = time.perf_counter() - t0
            cos = min(min_cos(g, r) for g, r in zip(got, ref))
            fn, used = comp, mode
            parts.append(f"{label}, compiled in {compiled_s:.0f} s")
            break
        except Exception as e:  # noqa: BLE001 - any compile failure falls back
            torch._dynamo.reset()
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            reason = f"{type(e).__name__}: {' '.join(lines[:2])[:140]}"
            print(f"  {name}: {label} failed after {time.perf_counter() - t0:.0f} s ({reason})", flush=True)
            failed.append(f"{label} fell back after {time.perf_counter() - t0:.0f} s: {reason}")
    if used is None:
        if not eager_fallback:
            return None, "; ".join(failed)
        parts.append("eager")
    parts += failed
    sec, peak = measure(fn, used)
    r = row(lengths, sec, peak, config="; ".join(parts), backend=backend or "default")
    if compiled_s is not None:
        r["compile_s"] = compiled_s
        r["compiled_vs_eager_cos"] = cos
        print(f"  {name}: compiled in {compiled_s:.1f} s, single cos vs eager {cos:.6f}", flush=True)
    return r, None


def best_rows(model, projector, cfg, all_seqs, args, dev, out, check):
    """Merges the LoRA, checks the merge against the shipped vectors, then times every workload."""
    t0 = time.perf_counter()
    projector = merge_lora(model, projector)
    print(f"LoRA merged in {time.perf_counter() - t0:.1f} s", flush=True)
    if dev.cuda:
        torch.cuda.empty_cache()
    embeds = {m: make_embed(model, projector, m) for m in (False, True)}

    check_seqs, want = check
    with torch.no_grad():
        got = embeds[True](*padded(check_seqs, dev.name))[0].float()
    cos = min_cos(got, want)
    flag = "ok" if cos > 0.999 else "FAILED (expected > 0.999)"
    print(f"merge check: best vs shipped single vectors, {len(check_seqs)} sequences of "
          f"{[len(s) for s in check_seqs]} tokens, min cos {cos:.6f} {flag}", flush=True)
    out["best/check"] = {"min_cos": cos, "lengths": [len(s) for s in check_seqs]}

    budget = Budget(args.compile_budget_s)
    fixed_modes = args.fixed_modes.split(",") if args.fixed_modes else []
    query_modes = args.query_modes.split(",") if args.query_modes else []
    # The cheap compile first (the query's), then the documents by size; the document mix runs eager
    # and tries a dynamic-shape compile at the end with what is left of the budget.
    for name in sorted(all_seqs, key=lambda n: ["query16", "32x512", "2x8192", "1x32768", "docs256"].index(n)):
        modes = {"query16": query_modes, "docs256": []}.get(name, fixed_modes)
        r, _ = best_workload(name, all_seqs[name], embeds.get, args, dev, budget, modes)
        torch._dynamo.reset()
        if dev.cuda:
            torch.cuda.empty_cache()
        out[f"best/{name}"] = r
        save(out, args.json)
        print_row(f"best/{name}", r)
        print(f"  config: {r['config']}", flush=True)
    if "docs256" in all_seqs and args.dynamic_docs and fixed_modes:
        eager = out["best/docs256"]
        r, why = best_workload("docs256", all_seqs["docs256"], embeds.get, args, dev, budget, fixed_modes,
                               dynamic=True, eager_fallback=False)
        torch._dynamo.reset()
        if r is not None and r["ms"] < eager["ms"]:
            r["config"] += f" (eager: {eager['ms']:.1f} ms)"
            out["best/docs256"] = r
        elif r is not None:
            eager["config"] += f" (dynamic-shape compile slower: {r['ms']:.1f} ms)"
        else:
            eager["config"] += f" (dynamic-shape compile not used: {why})"
        save(out, args.json)
        print_row("best/docs256", out["best/docs256"])
        print(f"  config: {out['best/docs256']['config']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--batch", type=int, default=8, help="jina's encode_text batch size for docs256")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rows", default="shipped,best", help="which row sets: shipped, best or both")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--workloads", default=",".join(workloads()), help="comma-separated subset")
    ap.add_argument("--compile-budget-s", type=float, default=240.0,
                    help="total seconds torch.compile may take; past it a workload runs eager")
    ap.add_argument("--fixed-modes", default=None,
                    help="torch.compile modes to try in turn for the fixed-shape documents ('' for eager); default "
                    "max-autotune-no-cudagraphs,default on cuda, default on cpu")
    ap.add_argument("--query-modes", default=None,
                    help="the same for query16; default reduce-overhead (CUDA graphs) on cuda, default on cpu")
    ap.add_argument("--dynamic-docs", type=int, default=1, help="0: skip the dynamic-shape compile of docs256")
    args = ap.parse_args()
    if args.fixed_modes is None:
        args.fixed_modes = "max-autotune-no-cudagraphs,default" if args.device == "cuda" else "default"
    if args.query_modes is None:
        args.query_modes = "reduce-overhead" if args.device == "cuda" else "default"
    rows = set(args.rows.split(","))
    dev = Device(args.device)
    model, projector, cfg = reference.build(args.model, torch.bfloat16, dev.name)
    vocab = min(cfg["text_config"]["vocab_size"], 150000)
    g = torch.Generator().manual_seed(1)
    # Every workload's ids are drawn in the same order whatever is selected, so a row's ids do not
    # depend on the flags.
    all_seqs = {name: [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
                for name, lengths in workloads().items()}
    picked = args.workloads.split(",")
    all_seqs = {k: v for k, v in all_seqs.items() if k in picked}
    out = {}
    if os.path.exists(args.json):
        out = json.load(open(args.json))  # keep the other row set of an earlier run
    if "shipped" in rows:
        shipped_rows(model, projector, cfg, all_seqs, args, dev, out)
    if "best" in rows:
        # The merge check's reference, computed before the merge: a padded batch of mixed lengths.
        docs = workloads()["docs256"]
        check_seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in [docs[1], docs[7], 16, docs[3]]]
        check = (check_seqs, shipped_vectors(model, projector, cfg, check_seqs, dev))
        best_rows(model, projector, cfg, all_seqs, args, dev, out, check)
    save(out, args.json)


if __name__ == "__main__":
    main()
