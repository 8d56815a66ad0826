"""PyTorch timings of the cases `jv4-bench ops` runs, for the ratio column: same shapes, bf16,
CUDA events after warm-up, median of many runs. Writes {case: ms} as JSON.

    python3 tools/torch_ops_bench.py --json torch_ops.json
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as F

GEMMS = [("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 22016, 2048), ("down", 2048, 11008)]
TOKENS = [16, 512, 4096, 16384]


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
    for name, n, k in GEMMS:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        for m in TOKENS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out[f"linear/{name}/m={m}"] = time_ms(lambda: F.linear(x, w), args.iters)
    inter = 11008
    for m in TOKENS[1:]:
        gu = torch.randn(m, 2 * inter, device=dev, dtype=torch.bfloat16) * 2
        # What the HF Qwen2 MLP does: act(gate) * up on two separate projections' outputs.
        g, u = gu[:, :inter].contiguous(), gu[:, inter:].contiguous()
        out[f"swiglu/{inter}/m={m}"] = time_ms(lambda: F.silu(g) * u, args.iters)
    # Qwen2RMSNorm.forward (HF): f32 math, x·rsqrt rounded to bf16, then times the weight.
    m, d = 4096, 2048
    x = torch.randn(m, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(d, device=dev, dtype=torch.bfloat16)
    out[f"rmsnorm/{d}/m={m}"] = time_ms(lambda: rmsnorm_hf(x, w, 1e-6), args.iters)
    # apply_multimodal_rotary_pos_emb (HF Qwen2.5-VL) on q, k views of the fused qkv output, with
    # the cos/sin tables precomputed (HF computes them once per forward, outside the layers).
    qh, kvh, hd = 16, 2, 128
    qkv = torch.randn(m, (qh + 2 * kvh) * hd, device=dev, dtype=torch.bfloat16)
    q = qkv[:, : qh * hd].view(1, m, qh, hd).transpose(1, 2)
    k = qkv[:, qh * hd : (qh + kvh) * hd].view(1, m, kvh, hd).transpose(1, 2)
    cos, sin = mrope_cos_sin(torch.arange(m, device=dev).expand(3, 1, m), hd, 1e6, torch.bfloat16)
    out[f"mrope/{qkv.shape[1]}/m={m}"] = time_ms(
        lambda: apply_multimodal_rotary_pos_emb(q, k, cos, sin, [16, 24, 24]), args.iters
    )
    attention(out, args.iters)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    for k, v in out.items():
        print(f"{k:<28} {v:.4f} ms")


if __name__ == "__main__":
    main()
