"""PyTorch reference of jina-embeddings-v4, written from shared/docs/MODEL.md on top of transformers'
Qwen2.5-VL (Jina's own modeling code cannot be downloaded here). It computes what Jina's
`encode_text` / `encode_image` compute, the same way (padded batches, SDPA attention, per-row task
LoRA, masked mean pooling, the multi-vector projector with its LoRA), once in fp32 and once as Jina
runs it (bf16 weights under bf16 autocast), and dumps intermediates for debugging.

Runs on the GPU machine (torch 2.11, transformers 5.17) or anywhere torch and transformers are installed.

    # the tiny fixtures of tests/fixtures/tiny (see tests/fixtures/README.md for the one device command)
    python3 tools/reference.py fixtures --model tests/fixtures/tiny/model \
        --images tests/fixtures/images --out OUTDIR

The checkpoint is read exactly as shipped (legacy base names, new adapter names: docs/MODEL.md §9.1b), so the
same folder serves the engine and this reference.
"""
import argparse
import glob
import inspect
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TASKS = ["retrieval", "text-matching", "code"]
LORA_TARGETS = {
    "self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}


# ---------------------------------------------------------------------------------------------
# Model: Qwen2.5-VL from the checkpoint + per-row task LoRA + the multi-vector projector


class TaskContext:
    """Which task each batch row uses; set before every forward (jina's task_label)."""

    tasks = None


class TaskLoRALinear(nn.Module):
    """y = base(x) + scale · (x·Aᵀ)·Bᵀ with A, B of the row's task (PEFT's LoRA arithmetic:
    x is cast to the LoRA weights' dtype; under autocast the matmuls run in bf16)."""

    def __init__(self, base, lora_a, lora_b, scale):
        super().__init__()
        self.base = base
        self.lora_a = nn.ParameterDict({t.replace("-", "_"): nn.Parameter(a, requires_grad=False) for t, a in lora_a.items()})
        self.lora_b = nn.ParameterDict({t.replace("-", "_"): nn.Parameter(b, requires_grad=False) for t, b in lora_b.items()})
        self.scale = scale

    def delta(self, x, task):
        key = task.replace("-", "_")
        a, b = self.lora_a[key], self.lora_b[key]
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.scale

    def forward(self, x):
        y = self.base(x)
        tasks = TaskContext.tasks
        if isinstance(tasks, str):
            return y + self.delta(x, tasks)
        # Per-row tasks: x is [B, L, in] (decoder) with one task per batch row.
        out = y.clone()
        for task in sorted(set(tasks)):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=x.device)
            out[rows] = y[rows] + self.delta(x[rows], task).to(y.dtype)
        return out


def legacy_to_hf(name):
    """Checkpoint base names (legacy spelling) -> transformers 5 parameter names."""
    if name.startswith("model.language_model.") or name.startswith("model.visual."):
        return name
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def build(model_dir, dtype, device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    text = dict(cfg["text_config"])
    vision = dict(cfg["vision_config"])
    special = {k: cfg[k] for k in ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id"] if k in cfg}
    for k in ["bos_token_id", "eos_token_id"]:
        if k in special:
            text[k] = special[k]
    qcfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **special)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qcfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()

    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        shards = sorted(set(json.load(open(index_path))["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        state.update(load_file(os.path.join(model_dir, shard)))
    proj_w = state.pop("multi_vector_projector.weight")
    proj_b = state.pop("multi_vector_projector.bias")
    state = {legacy_to_hf(k): v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("lm_head")]
    if missing or unexpected:
        sys.exit(f"checkpoint does not fit the model: missing {missing[:5]}..., unexpected {unexpected[:5]}...")

    acfg = json.load(open(os.path.join(model_dir, "adapters", "adapter_config.json")))
    r, alpha = acfg["r"], acfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if acfg.get("use_rslora") else alpha / r
    lora = load_file(os.path.join(model_dir, "adapters", "adapter_model.safetensors"))

    def ab(prefix):
        a = {t: lora[f"{prefix}.lora_A.{t}.weight"].to(device=device, dtype=dtype) for t in TASKS}
        b = {t: lora[f"{prefix}.lora_B.{t}.weight"].to(device=device, dtype=dtype) for t in TASKS}
        return a, b

    lm = model.model.language_model
    for i, layer in enumerate(lm.layers):
        for block, projs in LORA_TARGETS.items():
            parent = getattr(layer, block)
            for p in projs:
                a, b = ab(f"base_model.model.model.language_model.layers.{i}.{block}.{p}")
                setattr(parent, p, TaskLoRALinear(getattr(parent, p), a, b, scale))
    hidden = text["hidden_size"]
    proj = nn.Linear(hidden, proj_w.shape[0], bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        proj.weight.copy_(proj_w.to(dtype))
        proj.bias.copy_(proj_b.to(dtype))
    a, b = ab("base_model.model.multi_vector_projector")
    projector = TaskLoRALinear(proj, a, b, scale)
    return model, projector, cfg


# ---------------------------------------------------------------------------------------------
# Forward the way jina's encode_text / encode_image do


class Capture:
    """Hooks that record what transformers computed: M-RoPE positions, the spliced embeddings, and in
    the vision tower the patch embeddings, each block's input (the first one is after the window
    permutation), its cu_seqlens and the rotary cos/sin."""

    def __init__(self, model):
        self.positions = None
        self.inputs_embeds = None
        self.patch_embed = None
        self.blocks = []
        lm = model.model.language_model
        visual = model.model.visual

        def patch_hook(_module, _args, out):
            self.patch_embed = out.detach().float().clone()
            self.blocks = []

        def block_hook(_module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.blocks.append({
                "x": x.detach().float().clone(),
                "cu_seqlens": kwargs.get("cu_seqlens"),
                "pe": kwargs.get("position_embeddings"),
            })

        visual.patch_embed.register_forward_hook(patch_hook)
        for blk in visual.blocks:
            blk.register_forward_pre_hook(block_hook, with_kwargs=True)

        def rope_hook(_module, args, kwargs):
            pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            self.positions = pos.detach().clone()

        def lm_hook(_module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None:
                self.inputs_embeds = emb.detach().float().clone()

        lm.rotary_emb.register_forward_pre_hook(rope_hook, with_kwargs=True)
        lm.register_forward_pre_hook(lm_hook, with_kwargs=True)


def vision_dumps(cap, fullatt):
    """Window permutation, segment boundaries and rotary tables as transformers computed them."""
    out = {}
    if cap.patch_embed is None or not cap.blocks:
        return out
    x = cap.patch_embed
    y = cap.blocks[0]["x"]
    g = x.shape[0] // 4
    xg, yg = x.reshape(g, -1), y.reshape(g, -1)
    # Each group of 4 patch rows in block 0's input is one group of the patch embeddings.
    match = (yg[:, None, :] == xg[None, :, :]).all(-1)
    if bool((match.sum(1) == 1).all()):
        out["window_index"] = match.float().argmax(1).to(torch.int32).cpu()
    for i, b in enumerate(cap.blocks):
        if b["cu_seqlens"] is not None:
            key = "cu_seqlens" if i in fullatt else "cu_window_seqlens"
            out[key] = torch.as_tensor(b["cu_seqlens"]).to(torch.int32).cpu()
    pe = cap.blocks[0]["pe"]
    if pe is not None:
        out["rope_cos"] = pe[0].float().cpu()
        out["rope_sin"] = pe[1].float().cpu()
    out["block_inputs"] = torch.stack([b["x"] for b in cap.blocks]).cpu()
    return out


def forward(model, projector, ids_list, tasks, image_token_id, pixel_values=None, grid_thw=None, want_hidden=False):
    """One padded batch (right padding) through the model; returns per sequence the final-norm
    hidden states [L, H] and the multi-vector rows [L, P] (projected, per-token L2-normalised)."""
    device = next(model.parameters()).device
    L = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), L), 0, dtype=torch.long, device=device)
    mask = torch.zeros((len(ids_list), L), dtype=torch.long, device=device)
    for i, x in enumerate(ids_list):
        ids[i, : len(x)] = torch.tensor(x, device=device)
        mask[i, : len(x)] = 1
    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=want_hidden, use_cache=False)
    if pixel_values is not None:
        kwargs["pixel_values"] = pixel_values
        kwargs["image_grid_thw"] = grid_thw
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        # Without it transformers 5 gives image tokens plain 1-D positions (docs/DEVICE_PYTORCH.md).
        kwargs["mm_token_type_ids"] = (ids == image_token_id).long()
    if hasattr(model.model, "rope_deltas"):
        model.model.rope_deltas = None
    TaskContext.tasks = tasks
    out = model.model(**kwargs)
    h = out.last_hidden_state
    multi = F.normalize(projector(h), p=2, dim=-1)
    seqs = []
    for i, x in enumerate(ids_list):
        seqs.append((h[i, : len(x)], multi[i, : len(x)]))
    hidden = [hs[0] for hs in out.hidden_states] if want_hidden else None
    return seqs, hidden, h, mask


def pool_text(h, mask):
    """jina: masked mean over all real tokens (in the model's dtype), then L2."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), p=2, dim=-1)


def pool_span(h, ids_list, vs, ve):
    """jina for images: mean over the first vision_start ..= first vision_end, then L2."""
    out = []
    for i, x in enumerate(ids_list):
        s, e = x.index(vs), x.index(ve)
        out.append(F.normalize(h[i, s : e + 1].mean(0), p=2, dim=-1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Fixtures for the tiny model


def image_processor(pre):
    """The reference's processor (the fast one, as jina loads it), from preprocessor_config.json."""
    try:
        from transformers import Qwen2VLImageProcessorFast as Processor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Processor

    size = {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]}
    return Processor(
        size=size, min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"],
        temporal_patch_size=pre["temporal_patch_size"], merge_size=pre["merge_size"],
        image_mean=pre["image_mean"], image_std=pre["image_std"],
    )


def pil_pixel_values(pil, grid, pre):
    """The same preprocessing with PIL's bicubic resize instead of torchvision's (docs/MODEL.md §4.1 steps 3-5),
    to show how far the two resamplers are apart."""
    import numpy as np
    from PIL import Image

    _, gh, gw = grid
    p, tp, m = pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]
    img = np.asarray(pil.resize((gw * p, gh * p), Image.BICUBIC)).astype(np.float32) / 255.0
    img = (img - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    chw = img.transpose(2, 0, 1)  # [3, H, W]
    x = np.stack([chw] * tp)  # [t, 3, H, W]
    x = x.reshape(tp, 3, gh // m, m, p, gw // m, m, p)
    # rows (bh, bw, mh, mw); columns (c, t, ph, pw)
    x = x.transpose(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, 3 * tp * p * p)
    return torch.from_numpy(np.ascontiguousarray(x))


def unpatchify_u8(pv, grid, pre):
    """pixel_values [gh·gw, 3·t·p·p] -> the resized image [H, W, 3] as uint8 (exact: the values
    came from uint8 through (u/255 - mean)/std in f32)."""
    _, gh, gw = grid
    p, tp, m = pre["patch_size"], pre["temporal_patch_size"], pre["merge_size"]
    x = pv.reshape(gh // m, gw // m, m, m, 3, tp, p, p)[:, :, :, :, :, 0]
    x = x.permute(0, 2, 5, 1, 3, 6, 4).reshape(gh * p, gw * p, 3)
    mean = torch.tensor(pre["image_mean"], dtype=torch.float32)
    std = torch.tensor(pre["image_std"], dtype=torch.float32)
    u = torch.round((x * std + mean) * 255.0)
    back = ((u / 255.0) - mean) / std
    assert (back - x).abs().max() < 1e-5, "pixel_values did not come from uint8"
    return u.clamp(0, 255).to(torch.uint8)


def image_ids(cfg, n_tokens):
    """The image template of docs/MODEL.md §4.2 with the model's special ids. In a small test vocabulary the
    plain words are mapped into it (the real ids 872, 198, 74785, 279, 2168, 13 taken modulo 2000);
    a full-size vocabulary gets the real ids."""
    vocab = cfg["text_config"]["vocab_size"]
    im_start = cfg["bos_token_id"] + 1
    im_end = cfg["eos_token_id"]
    fit = (lambda x: x) if vocab > 151655 else (lambda x: x % 2000)
    words = [fit(x) for x in [74785, 279, 2168, 13]]
    return (
        [im_start, fit(872), 198, cfg["vision_start_token_id"]]
        + [cfg["image_token_id"]] * n_tokens
        + [cfg["vision_end_token_id"]] + words + [im_end, 198]
    )


def fixtures(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from PIL import Image
    import transformers

    cfg = json.load(open(os.path.join(args.model, "config.json")))
    pre = json.load(open(os.path.join(args.model, "preprocessor_config.json")))
    spec = json.load(open(os.path.join(args.images, "images.json")))
    merge = pre["merge_size"]
    vocab = cfg["text_config"]["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)

    # Texts: random ids below the special range, varied lengths, every task; the first three
    # tokens stand for the prompt prefix ("Query: " / "Passage: " are [2859, 25, 220] / [12187,
    # 424, 25, 220] in the real vocabulary; here mapped modulo 2000).
    texts = []
    lengths = [1, 3, 4, 17, 64, 200]
    for i, n in enumerate(lengths):
        prompt = "query" if i % 2 == 0 else "passage"
        prefix = [2859 % 2000, 25, 220] if prompt == "query" else [12187 % 2000, 424, 25, 220]
        body = torch.randint(0, min(2000, vocab), (max(0, n - len(prefix)),), generator=g).tolist()
        texts.append({"ids": (prefix + body)[:n], "task": TASKS[i % 3], "prompt": prompt})

    out_t = {}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "device": device,
            "texts": texts, "images": [], "mixed_batch": [0, 1, 2], "tensors": {}}

    fast = image_processor(pre)
    images = []
    for im in spec["images"]:
        path = os.path.join(args.images, im["file"])
        pil = Image.open(path).convert("RGB")  # jina: paths are opened and converted like this
        proc_kwargs = {}
        if "max_pixels" in im:
            proc_kwargs = dict(max_pixels=im["max_pixels"], size={"shortest_edge": pre["min_pixels"], "longest_edge": im["max_pixels"]})
            p = image_processor({**pre, "max_pixels": im["max_pixels"]})
        else:
            p = fast
        enc = p(images=[pil], return_tensors="pt")
        pv, thw = enc["pixel_values"].float(), enc["image_grid_thw"]
        name = os.path.splitext(im["file"])[0]
        name_small = name in ("grad_224x224", "round_70x42")
        if name_small:
            out_t[f"image/{name}/pixel_values"] = pv
        # The resized uint8 image each resampler produced (recovered exactly from pixel_values):
        # one byte per value keeps the fixtures small, and normalise + patchify are checked on the
        # two images above.
        out_t[f"image/{name}/resized"] = unpatchify_u8(pv, thw[0].tolist(), pre)
        out_t[f"image/{name}/resized_pil"] = unpatchify_u8(pil_pixel_values(pil, thw[0].tolist(), pre), thw[0].tolist(), pre)
        if not im.get("embed", True) or name_small:
            out_t[f"image/{name}/rgb"] = torch.from_numpy(__import__("numpy").asarray(pil).copy())
        n_tokens = int(thw.prod().item()) // (merge * merge)
        ids = image_ids(cfg, n_tokens)
        entry = {"file": im["file"], "grid_thw": thw[0].tolist(), "ids": ids, "task": TASKS[len(images) % 3],
                 "embed": im.get("embed", True)}
        meta["images"].append(entry)
        images.append((name, pv, thw, entry))

    for mode, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        model, projector, _ = build(args.model, dtype, device)
        cap = Capture(model)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (mode == "bf16" and device == "cuda") else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            # Texts one at a time (as separate requests) ...
            for i, t in enumerate(texts):
                seqs, hidden, h, mask = forward(model, projector, [t["ids"]], [t["task"]], cfg["image_token_id"], want_hidden=(i == 3))
                single = pool_text(h, mask)[0]
                out_t[f"text/{i}/single/{mode}"] = single.float().cpu()
                out_t[f"text/{i}/multi/{mode}"] = seqs[0][1].float().cpu()
                if mode == "fp32":
                    out_t[f"text/{i}/positions"] = cap.positions[:, 0, :].cpu().to(torch.int32)
                if hidden is not None:
                    out_t[f"text/{i}/hidden/{mode}"] = torch.stack(hidden).float().cpu()
            # ... and three of them in one padded batch with a task per row (jina's mixed batch).
            batch = [texts[j] for j in meta["mixed_batch"]]
            seqs, _, h, mask = forward(model, projector, [b["ids"] for b in batch], [b["task"] for b in batch], cfg["image_token_id"])
            singles = pool_text(h, mask)
            for k, j in enumerate(meta["mixed_batch"]):
                out_t[f"mixed/{j}/single/{mode}"] = singles[k].float().cpu()
                out_t[f"mixed/{j}/multi/{mode}"] = seqs[k][1].float().cpu()
            # Images one per sequence, as encode_image does.
            for name, pv, thw, entry in images:
                if not entry["embed"]:
                    continue
                seqs, hidden, h, mask = forward(
                    model, projector, [entry["ids"]], [entry["task"]], cfg["image_token_id"],
                    pixel_values=pv.to(device=device, dtype=dtype), grid_thw=thw.to(device), want_hidden=(name == images[0][0]))
                single = pool_span(h, [entry["ids"]], cfg["vision_start_token_id"], cfg["vision_end_token_id"])[0]
                out_t[f"image/{name}/single/{mode}"] = single.float().cpu()
                out_t[f"image/{name}/multi/{mode}"] = seqs[0][1].float().cpu()
                rows = [r for r, x in enumerate(entry["ids"]) if x == cfg["image_token_id"]]
                out_t[f"image/{name}/vision/{mode}"] = cap.inputs_embeds[0, rows].cpu()
                dumps = vision_dumps(cap, cfg["vision_config"]["fullatt_block_indexes"])
                vcap = {}
                if mode == "fp32":
                    out_t[f"image/{name}/positions"] = cap.positions[:, 0, :].cpu().to(torch.int32)
                    for key in ["window_index", "cu_seqlens", "cu_window_seqlens", "rope_cos", "rope_sin"]:
                        if key in dumps:
                            out_t[f"image/{name}/{key}"] = dumps[key]
                        else:
                            print(f"{name}: no {key} captured")
                if name == images[0][0]:
                    vcap["block_inputs"] = dumps.get("block_inputs")
                    vcap = {k: v for k, v in vcap.items() if v is not None}
                if hidden is not None:
                    out_t[f"image/{name}/hidden/{mode}"] = torch.stack(hidden).float().cpu()
                for key, val in vcap.items():
                    out_t[f"image/{name}/{key}/{mode}"] = val
        del model, projector
        torch.cuda.empty_cache() if device == "cuda" else None

    # Sanity: the image positions must follow docs/MODEL.md §7.3 (h and w vary over the image block).
    for name, pv, thw, entry in images:
        if entry["embed"]:
            pos = out_t[f"image/{name}/positions"]
            rows = [r for r, x in enumerate(entry["ids"]) if x == cfg["image_token_id"]]
            if pos[1, rows].unique().numel() < 2 and thw[0, 1] > 2 * merge:
                sys.exit(f"{name}: image tokens got 1-D positions: the reference is wrong (mm_token_type_ids?)")

    out_t = {k: v.contiguous() for k, v in out_t.items()}
    meta["tensors"] = {k: list(v.shape) for k, v in out_t.items()}
    os.makedirs(args.out, exist_ok=True)
    pre_keys = [k for k in out_t if k.split("/")[-1] in ("pixel_values", "resized", "resized_pil", "rgb")]
    save_file({k: out_t[k] for k in pre_keys}, os.path.join(args.out, "preprocess.safetensors"))
    save_file({k: v for k, v in out_t.items() if k not in pre_keys}, os.path.join(args.out, "reference.safetensors"))
    json.dump(meta, open(os.path.join(args.out, "reference.json"), "w"), indent=1)
    # The fp32 run against the bf16 run: how far apart the two references are.
    report = []
    for k in sorted(out_t):
        if k.endswith("/fp32") and "/single/" in k:
            a, b = out_t[k], out_t[k[:-4] + "bf16"]
            report.append(f"{k[:-5]:<32} fp32 vs bf16 cos {F.cosine_similarity(a, b, dim=0).item():.6f}")
    print("\n".join(report))
    print(f"wrote {len(out_t)} tensors to {args.out}")


def texts(args):
    """Random-id texts of the given lengths (tasks cycling) through the model as jina runs it (bf16
    weights under bf16 autocast, one request per forward): the single vectors, and the multi-vector
    rows of the texts up to 1024 tokens. For GPU parity on the full model (jv4-bench parity).
    `--fp32`: the same texts (same seed, same ids) in float32 throughout, no TF32: the fidelity
    reference both the engine and the bf16 run are measured against."""
    import contextlib

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda"
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    model, projector, cfg = build(args.model, dtype, device)
    autocast = contextlib.nullcontext() if args.fp32 else torch.autocast("cuda", dtype=torch.bfloat16)
    vocab = min(cfg["text_config"]["vocab_size"], 150000)
    g = torch.Generator().manual_seed(args.seed)
    lengths = [int(x) for x in args.lengths.split(",")]
    out, meta = {}, []
    with torch.no_grad(), autocast:
        for i, n in enumerate(lengths):
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            task = TASKS[i % 3]
            seqs, _, h, mask = forward(model, projector, [ids], [task], cfg["image_token_id"])
            out[f"{i}/single"] = pool_text(h, mask)[0].float().cpu()
            if n <= 1024:
                out[f"{i}/multi"] = seqs[0][1].float().cpu()
            out[f"{i}/ids"] = torch.tensor(ids, dtype=torch.int32)
            meta.append({"task": task, "len": n})
            print(f"text {i}: {n} tokens, {task}", flush=True)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, args.out, metadata={"texts": json.dumps(meta)})


def compare(args):
    """Per text: single-vector cosine and multi-vector mean per-token cosine of `got` against
    `ref` (two `texts` files of the same seed and lengths), the largest single-vector error and
    the margin (smallest distance between different texts' reference vectors over it)."""
    a, b = load_file(args.got), load_file(args.ref)
    n = len([k for k in b if k.endswith("/single")])
    print(f"{'text':<5} {'tokens':>7} {'single cos':>12} {'multi mean cos':>15}")
    worst = 0.0
    for i in range(n):
        s = F.cosine_similarity(a[f"{i}/single"].double(), b[f"{i}/single"].double(), dim=0).item()
        worst = max(worst, (a[f"{i}/single"].double() - b[f"{i}/single"].double()).abs().max().item())
        m = "-"
        if f"{i}/multi" in b:
            m = f"{F.cosine_similarity(a[f'{i}/multi'].double(), b[f'{i}/multi'].double(), dim=-1).mean().item():.6f}"
        print(f"{i:<5} {b[f'{i}/ids'].numel():>7} {s:>12.6f} {m:>15}")
    refs = [b[f"{i}/single"].double() for i in range(n)]
    dmin = min((refs[i] - refs[j]).norm().item() for i in range(n) for j in range(i + 1, n))
    print(f"max |got - ref| = {worst:.4f}, min distance between different texts = {dmin:.4f}, ratio {dmin / max(worst, 1e-30):.1f}x")


def images(args):
    """Synthetic images of several sizes through the reference processor and the model as jina runs
    it (bf16 autocast, one image per forward): writes pixel_values, grids, ids and the single and
    multi vectors (GPU parity, jv4-bench images), and times the forwards (the PyTorch column of the
    image benchmark)."""
    import numpy as np
    from PIL import Image

    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda"
    model, projector, cfg = build(args.model, torch.bfloat16, device)
    pre = json.load(open(os.path.join(args.model, "preprocessor_config.json")))
    merge = pre["merge_size"]
    rng = np.random.default_rng(args.seed)
    # (h, w, max_pixels): default-cap photos and documents of several aspects, a 4096-patch and a
    # 9216-patch image (larger max_pixels, as jina recommends for dense documents).
    cases = [(800, 1000, None), (2200, 1700, None), (224, 224, None), (1000, 300, None), (640, 480, None),
             (896, 896, 4096 * 196), (1344, 1344, 9216 * 196)]
    out, meta = {}, []
    for i, (h, w, mp) in enumerate(cases):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([127 + 100 * np.sin(x / (5.0 + i)) * np.cos(y / 9.0), 255 * (x + y) / (h + w),
                        255 * ((x // 17 + y // 23) % 2)], -1) + rng.normal(0, 20, (h, w, 3))
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        p = image_processor({**pre, "max_pixels": mp or pre["max_pixels"]})
        enc = p(images=[pil], return_tensors="pt")
        pv, thw = enc["pixel_values"].float(), enc["image_grid_thw"]
        ids = image_ids(cfg, int(thw.prod().item()) // (merge * merge))
        task = TASKS[i % 3]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            run = lambda: forward(model, projector, [ids], [task], cfg["image_token_id"],
                                  pixel_values=pv.to(device=device, dtype=torch.bfloat16), grid_thw=thw.to(device))
            seqs, _, hh, mask = run()
            single = pool_span(hh, [ids], cfg["vision_start_token_id"], cfg["vision_end_token_id"])[0]
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        times.sort()
        out[f"{i}/pixel_values"] = pv.contiguous()
        out[f"{i}/ids"] = torch.tensor(ids, dtype=torch.int32)
        out[f"{i}/single"] = single.float().cpu()
        out[f"{i}/multi"] = seqs[0][1].float().cpu().contiguous()
        meta.append({"task": task, "grid": thw[0].tolist(), "hw": [h, w], "torch_ms": times[len(times) // 2] * 1e3})
        print(f"image {i}: {h}x{w} grid {thw[0].tolist()} {len(ids)} tokens, torch {times[2] * 1e3:.1f} ms", flush=True)
    save_file(out, args.out, metadata={"images": json.dumps(meta)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("images", help="bf16 reference vectors and timings of synthetic images (full model)")
    im.add_argument("--model", required=True)
    im.add_argument("--out", required=True)
    im.add_argument("--seed", type=int, default=0)
    tx = sub.add_parser("texts", help="bf16 reference vectors of random-id texts (full-model GPU parity)")
    tx.add_argument("--model", required=True)
    tx.add_argument("--lengths", default="16,100,512,1000,2048,8192,32768")
    tx.add_argument("--out", required=True)
    tx.add_argument("--seed", type=int, default=0)
    tx.add_argument("--fp32", action="store_true", help="float32 throughout (the fidelity reference)")
    cm = sub.add_parser("compare", help="cosines of one texts file against another (e.g. bf16 vs --fp32)")
    cm.add_argument("got")
    cm.add_argument("ref")
    f = sub.add_parser("fixtures", help="reference outputs and dumps for the tiny fixture model")
    f.add_argument("--model", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    if args.cmd == "fixtures":
        fixtures(args)
    elif args.cmd == "texts":
        texts(args)
    elif args.cmd == "images":
        images(args)
    elif args.cmd == "compare":
        compare(args)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
