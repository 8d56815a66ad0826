"""PyTorch timings of the cases `jv4-bench ops` runs, for the ratio column: same shapes, bf16,
CUDA events after warm-up, median of many runs. Writes {case: ms} as JSON.

    python3 tools/torch_ops_bench.py --json torch_ops.json

The cases (name, op, shape) come from `jv4-bench ops --list-cases` (the jv4-bench beside this
script, or --cases FILE), i.e. from the ops' CASES tables: names and shapes cannot drift apart.
Each op is timed as HF transformers / PEFT computes it; `lora_mask` has no PyTorch counterpart
(PEFT runs one adapter per batch) and is left out.
"""
import argparse
import itertools
import json
import os
import subprocess

import torch
import torch.nn.functional as F

def attention_cases():
    """The cases of `jv4-bench attention` (same names, same shapes): (name, (heads, kv_heads, d),
    causal, segment lengths)."""
    text, vision = (16, 2, 128), (16, 16, 80)
    cases = [(f"causal/L={l}", text, True, [l]) for l in (512, 2048, 4096, 8192, 16384, 32768)]
    cases.append(("causal/32x512", text, True, [512] * 32))
    cases.append(("causal/docs256", text, True, [16 + (i * 7919) % 1009 for i in range(256)]))
    cases += [(f"vision/win64/{n}", vision, False, [64] * (n // 64)) for n in (4096, 9216)]
    cases += [(f"vision/full/{n}", vision, False, [n]) for n in (4096, 9216)]
    return cases


def rmsnorm_hf(x, weight, eps):
    """Qwen2RMSNorm.forward."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def mrope_cos_sin(position_ids, head_dim, theta, dtype):
    """Qwen2_5_VLRotaryEmbedding.forward: position_ids [3, B, S] -> cos, sin [3, B, S, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(position_ids.device) / head_dim))
    inv_freq_expanded = inv_freq[None, None, :, None].float().expand(3, position_ids.shape[1], -1, 1)
    position_ids_expanded = position_ids[:, :, None, :].float()
    freqs = (inv_freq_expanded @ position_ids_expanded).transpose(2, 3)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """HF Qwen2.5-VL: q [B, Hq, S, hd], k [B, Hkv, S, hd], cos/sin [3, B, S, hd]."""
    mrope_section = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))], dim=-1).unsqueeze(
        unsqueeze_dim
    )
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))], dim=-1).unsqueeze(
        unsqueeze_dim
    )
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def vision_rotary(q, k, cos, sin):
    """HF Qwen2.5-VL apply_rotary_pos_emb_vision: the rotation in f32, back to bf16."""
    orig_q, orig_k = q.dtype, k.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(orig_q), k_embed.to(orig_k)


def load_cases(path):
    if path:
        with open(path) as f:
            return json.load(f)
    exe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jv4-bench")
    return json.loads(subprocess.run([exe, "ops", "--list-cases"], check=True, capture_output=True, text=True).stdout)


def randn(*shape, dev, scale=1.0):
    return torch.randn(*shape, device=dev, dtype=torch.bfloat16) * scale


def torch_case(c, dev):
    """The PyTorch call for one case of `jv4-bench ops --list-cases`, inputs made; None if none."""
    op = c["op"]
    if op in ("linear", "linear_stream"):
        w = randn(c["n"], c["k"], dev=dev) / c["k"] ** 0.5
        x = randn(c["m"], c["k"], dev=dev)
        return lambda: F.linear(x, w)
    if op == "swiglu":
        # What the HF Qwen2 MLP does: act(gate) * up on two separate projections' outputs.
        t, i = c["tokens"], c["inter"]
        g, u = randn(t, i, dev=dev, scale=2.0), randn(t, i, dev=dev, scale=2.0)
        return lambda: F.silu(g) * u
    if op == "gelu":
        x = randn(c["n"], dev=dev)
        return lambda: F.gelu(x)
    if op == "embedding":
        table = randn(c["vocab"], c["dim"], dev=dev)
        ids = torch.randint(0, c["vocab"], (c["tokens"],), device=dev)
        return lambda: F.embedding(ids, table)
    if op == "rmsnorm":
        # Qwen2RMSNorm.forward (HF): f32 math, x·rsqrt rounded to bf16, then times the weight.
        x, w = randn(c["tokens"], c["dim"], dev=dev), randn(c["dim"], dev=dev)
        return lambda: rmsnorm_hf(x, w, 1e-6)
    if op == "mrope":
        # apply_multimodal_rotary_pos_emb (HF Qwen2.5-VL) on q, k views of the fused qkv output,
        # with the cos/sin tables precomputed (HF computes them once per forward, outside the
        # layers); text positions.
        m, qh, kvh, hd = c["tokens"], c["q_heads"], c["kv_heads"], c["head_dim"]
        qkv = randn(m, (qh + 2 * kvh) * hd, dev=dev)
        q = qkv[:, : qh * hd].view(1, m, qh, hd).transpose(1, 2)
        k = qkv[:, qh * hd : (qh + kvh) * hd].view(1, m, kvh, hd).transpose(1, 2)
        cos, sin = mrope_cos_sin(torch.arange(m, device=dev).expand(3, 1, m), hd, 1e6, torch.bfloat16)
        return lambda: apply_multimodal_rotary_pos_emb(q, k, cos, sin, c["section"])
    if op == "vision_rope":
        p, h, hd = c["patches"], c["heads"], c["head_dim"]
        qkv = randn(p, 3 * h * hd, dev=dev).view(p, 3, h, hd)
        q, k = qkv[:, 0], qkv[:, 1]
        angles = torch.rand(p, hd // 2, device=dev) * 128
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return lambda: vision_rotary(q, k, cos, sin)
    if op == "mean_pool_l2":
        # Mean over each span (a segment sum, then the count), then F.normalize, in f32.
        spans, d = c["spans"], c["dim"]
        h = randn(c["tokens"], d, dev=dev)
        seg = torch.cat([torch.full((n,), i, device=dev) for i, n in enumerate(spans)])
        rows = h[: len(seg)]
        counts = torch.tensor(spans, device=dev, dtype=torch.float32)[:, None]

        def pool():
            s = torch.zeros(len(spans), d, device=dev).index_add_(0, seg, rows.float())
            return F.normalize(s / counts, dim=-1)

        return pool
    if op == "l2_rows":
        x = randn(c["tokens"], c["dim"], dev=dev)
        return lambda: F.normalize(x.float(), dim=-1)
    if op == "gather_rows":
        x = randn(c["rows"], c["len"], dev=dev)
        index = torch.randperm(c["rows"], device=dev)
        return lambda: x.index_select(0, index)
    if op == "scatter_rows_f32":
        v = randn(c["n"], c["len"], dev=dev)
        out = torch.randn(c["rows"], c["len"], device=dev)
        rows = torch.randperm(c["rows"], device=dev)[: c["n"]]
        return lambda: out.index_copy_(0, rows, v.float())
    return None


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def attention(out, iters):
    """SDPA on [B, H, L, d] views of [B, L, H, d] tensors (how HF calls it), under the flash and the
    cuDNN backends. GQA: k and v are expanded to the query heads once, outside the timed call
    (HF's repeat_kv copies them inside every forward), so torch is timed at its best: its kernel
    alone. Equal-length segments run as a batch; the 256 mixed documents (no padded batch would
    be fair) run through the flash backend's own varlen entry (cu_seqlens), cuDNN has none here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    for name, (h, kvh, d), causal, segs in attention_cases():
        if len(set(segs)) == 1:
            b, l = len(segs), segs[0]
            q = torch.randn(b, l, h, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
            k, v = (
                torch.randn(b, l, kvh, d, device=dev, dtype=torch.bfloat16)
                .transpose(1, 2)
                .repeat_interleave(h // kvh, dim=1)
                for _ in range(2)
            )
            for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        out[f"attention/{name}/{label}"] = time_ms(
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), iters
                        )
                except Exception as e:  # a backend that refuses the shape: no row
                    print(f"attention/{name}/{label}: {type(e).__name__}: {str(e)[:200]}")
            del q, k, v
        else:
            t = sum(segs)
            q = torch.randn(t, h, d, device=dev, dtype=torch.bfloat16)
            k, v = (
                torch.randn(t, kvh, d, device=dev, dtype=torch.bfloat16).repeat_interleave(h // kvh, dim=1)
                for _ in range(2)
            )
            cu = torch.tensor([0] + list(itertools.accumulate(segs)), device=dev, dtype=torch.int32)
            m = max(segs)
            try:
                out[f"attention/{name}/flash"] = time_ms(
                    lambda: torch.ops.aten._flash_attention_forward(
                        q, k, v, cu, cu, m, m, 0.0, causal, False, scale=d**-0.5
                    ),
                    iters,
                )
            except Exception as e:
                print(f"attention/{name}/flash: {type(e).__name__}: {str(e)[:200]}")
            del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--cases", help="JSON from `jv4-bench ops --list-cases` (default: run it)")
    ap.add_argument("--only", choices=["attention"], help="run only these cases")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = {}
    if args.only == "attention":
        attention(out, args.iters)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        for k, v in out.items():
            print(f"{k:<36} {v:.4f} ms")
        return
    for case in load_cases(args.cases):
        fn = torch_case(case, dev)
        if fn is not None:
            out[case["case"]] = time_ms(fn, args.iters)
        del fn  # the case's tensors
        torch.cuda.empty_cache()
    attention(out, args.iters)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in out.items():
        print(f"{k:<36} {v:.4f} ms")


if __name__ == "__main__":
    main()
